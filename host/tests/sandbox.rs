//! The sandbox holds against a hostile handler: runaway loops, memory bombs,
//! undeclared commands, path escapes, ungranted imports, tampered files —
//! and after each the host serves the next call normally.

mod common;

use std::time::{Duration, Instant};

use common::*;
use otabox::capabilities::DeviceGrant;
use otabox::runtime::{CallFault, CallScope, Outcome, PayloadFile, Phase};
use serde_json::json;

/// The least a hostile guest needs to load: it imports process and
/// filesystem.
macro_rules! base_caps {
    () => {
        "[[commands]]\nprogram = \"/bin/true\"\n[[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n[network]\nhosts = [\"127.0.0.1\"]\n"
    };
}
const BASE: &str = base_caps!();

/// The hostile guest imports `wasi:sockets` too.
macro_rules! net {
    () => {
        "[network]\nhosts = [\"127.0.0.1\"]\n"
    };
}
const NET: &str = net!();

fn fault(err: &anyhow::Error) -> &CallFault {
    err.downcast_ref::<CallFault>()
        .unwrap_or_else(|| panic!("not a call fault: {err:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_infinite_loop_stops_at_its_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let h = hostile(
        &rt,
        dir.path(),
        concat!(base_caps!(), "[limits]\ncall_timeout_ms = 300\n"),
    )
    .await
    .expect("load");
    let started = Instant::now();
    let err = act(&h, json!({"action": "loop"}))
        .await
        .expect_err("the loop must be stopped");
    let elapsed = started.elapsed();
    assert_eq!(
        fault(&err),
        &CallFault::TimeLimit { limit_ms: 300 },
        "{err:#}"
    );
    assert!(
        elapsed >= Duration::from_millis(300),
        "stopped early: {elapsed:?}"
    );
    assert!(
        elapsed <= Duration::from_millis(400),
        "stopped late: {elapsed:?}"
    );
    assert!(
        format!("{err:#}").contains("exceeded its time limit of 300 ms"),
        "{err:#}"
    );
    still_serves(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_bomb_traps_at_its_cap() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let h = hostile(
        &rt,
        dir.path(),
        concat!(base_caps!(), "[limits]\nmemory_mb = 16\n"),
    )
    .await
    .expect("load");
    let err = act(&h, json!({"action": "alloc"}))
        .await
        .expect_err("the bomb must trap");
    assert_eq!(
        fault(&err),
        &CallFault::MemoryLimit { limit_mb: 16 },
        "{err:#}"
    );
    still_serves(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_outside_the_rules_are_denied_and_never_spawned() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let d = dir.path().display();
    let body = format!(
        "[network]\nhosts = [\"127.0.0.1\"]\n[[commands]]\nprogram = \"/usr/bin/touch\"\nargs = [\"{d}/allowed\"]\n\
         [[commands]]\nprogram = \"/bin/sleep\"\nargs = [\"*\"]\n\
         [[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n[limits]\ncall_timeout_ms = 3000\n"
    );
    let h = hostile(&rt, dir.path(), &body).await.expect("load");
    let cases = [
        (
            json!({"action": "exec", "program": "/bin/sh", "args": ["-c", format!("touch {d}/by-shell")]}),
            "by-shell",
            "not declared",
        ),
        (
            json!({"action": "exec", "program": "/usr/bin/touch", "args": [format!("{d}/other")]}),
            "other",
            "match none",
        ),
        (
            json!({"action": "exec", "program": "/usr/bin/touch", "args": [format!("{d}/allowed"), format!("{d}/extra")]}),
            "extra",
            "match none",
        ),
        (
            json!({"action": "exec", "program": "/usr/bin/touch", "args": [format!("{d}/allowed")], "env": [["LD_PRELOAD", "/x.so"]]}),
            "allowed",
            "LD_PRELOAD",
        ),
    ];
    for (request, marker, reason) in cases {
        let text = failure(
            act(&h, request.clone())
                .await
                .expect("a denial is not a fault"),
        );
        assert!(
            text.contains("Denied") && text.contains(reason),
            "{request}: {text}"
        );
        assert!(
            !dir.path().join(marker).exists(),
            "{request}: a process ran"
        );
        still_serves(&h).await;
    }
    let ran = success(act(&h, json!({"action": "exec", "program": "/usr/bin/touch", "args": [format!("{d}/allowed")]})).await.expect("allowed"));
    assert!(ran.contains("exit=Some(0)"), "{ran}");
    assert!(
        dir.path().join("allowed").exists(),
        "the allowed command did not run"
    );

    let started = Instant::now();
    let text = failure(
        act(
            &h,
            json!({"action": "exec", "program": "/bin/sleep", "args": ["30"]}),
        )
        .await
        .expect("timeout is returned"),
    );
    assert!(
        text.contains("TimedOut") && text.contains("killed"),
        "{text}"
    );
    assert!(
        started.elapsed() < Duration::from_millis(3500),
        "{:?}",
        started.elapsed()
    );
    still_serves(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_cannot_escape_the_grant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let grant = root.join("grant");
    let outside = root.join("outside");
    std::fs::create_dir_all(&grant).expect("grant dir");
    std::fs::create_dir_all(&outside).expect("outside dir");
    std::fs::write(grant.join("inside.txt"), "inside").expect("write");
    std::fs::write(outside.join("secret.txt"), "secret").expect("write");
    std::os::unix::fs::symlink("../outside/secret.txt", grant.join("rel-link")).expect("symlink");
    std::os::unix::fs::symlink(outside.join("secret.txt"), grant.join("abs-link"))
        .expect("symlink");
    std::os::unix::fs::symlink(&outside, grant.join("dir-link")).expect("symlink");
    let body = format!(
        "{NET}[[commands]]\nprogram = \"/bin/true\"\n[[filesystem]]\npath = \"{}\"\naccess = \"rw\"\n",
        grant.display()
    );
    let h = hostile(&rt_for(&root), &root, &body).await.expect("load");

    let g = grant.display();
    assert_eq!(
        success(
            act(
                &h,
                json!({"action": "read", "path": format!("{g}/inside.txt")})
            )
            .await
            .expect("read")
        ),
        "inside"
    );
    for path in [
        format!("{g}/../outside/secret.txt"),
        outside.join("secret.txt").display().to_string(),
        "/etc/hostname".to_string(),
        format!("{g}/rel-link"),
        format!("{g}/abs-link"),
        format!("{g}/dir-link/secret.txt"),
    ] {
        let text = failure(
            act(&h, json!({"action": "read", "path": path}))
                .await
                .expect("denial is returned"),
        );
        assert!(!text.contains("secret"), "{path}: leaked {text}");
        still_serves(&h).await;
    }
    for path in [
        format!("{g}/../outside/escaped"),
        format!("{g}/dir-link/escaped"),
        outside.join("escaped").display().to_string(),
    ] {
        failure(
            act(&h, json!({"action": "write", "path": path}))
                .await
                .expect("denial is returned"),
        );
        assert!(
            !outside.join("escaped").exists(),
            "{path}: wrote outside the grant"
        );
    }
    assert_eq!(
        success(
            act(
                &h,
                json!({"action": "write", "path": format!("{g}/new.txt")})
            )
            .await
            .expect("write")
        ),
        "written"
    );
    assert_eq!(
        std::fs::read_to_string(grant.join("new.txt")).expect("written"),
        "written by a guest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_grant_refuses_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let body = format!(
        "{NET}[[commands]]\nprogram = \"/bin/true\"\n[[filesystem]]\npath = \"{}\"\naccess = \"rw\"\n",
        root.display()
    );
    let narrowed = DeviceGrant {
        read_only: vec![root.clone()],
        ..DeviceGrant::default()
    };
    let h = hostile_with(&rt_for(&root), &root, &body, &narrowed)
        .await
        .expect("load");
    failure(
        act(
            &h,
            json!({"action": "write", "path": format!("{}/ro.txt", root.display())}),
        )
        .await
        .expect("denied"),
    );
    assert!(!root.join("ro.txt").exists());
}

fn rt_for(root: &std::path::Path) -> otabox::runtime::Runtime {
    runtime(root)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ungranted_import_is_refused_at_load_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let fs_only = concat!("[[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n", net!());
    let err = hostile(&rt, dir.path(), fs_only)
        .await
        .expect_err("process is imported but not declared");
    let text = format!("{err:#}");
    assert!(
        text.contains("`otabox:handler/process@1.1.0`") && text.contains("declares no process"),
        "{text}"
    );

    let declared = BASE;
    let no_commands = DeviceGrant {
        commands: Some(vec![]),
        ..DeviceGrant::default()
    };
    let err = hostile_with(&rt, dir.path(), declared, &no_commands)
        .await
        .expect_err("device narrowed it away");
    assert!(format!("{err:#}").contains("device grants none"), "{err:#}");

    let no_paths = concat!("[[commands]]\nprogram = \"/bin/true\"\n", net!());
    let err = hostile(&rt, dir.path(), no_paths)
        .await
        .expect_err("filesystem is imported but not declared");
    assert!(format!("{err:#}").contains("`wasi:filesystem/"), "{err:#}");

    let h = hostile(&rt, dir.path(), declared)
        .await
        .expect("the same runtime still loads a correct handler");
    still_serves(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_wasm_and_a_malformed_manifest_are_refused_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let handlers = dir.path().join("handlers");
    let manifest = install_handler(
        &handlers,
        "file",
        &built_wasm("file"),
        "otabox/file:1",
        "[[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n",
    );
    let mut wasm = built_wasm("file");
    let last = wasm.len() - 1;
    wasm[last] ^= 0xFF;
    std::fs::write(handlers.join("file.wasm"), &wasm).expect("tamper");
    let text = format!(
        "{:#}",
        rt.load_handler(&manifest, None)
            .await
            .expect_err("tampered")
    );
    assert!(
        text.contains("sha256") && text.contains("refusing a modified"),
        "{text}"
    );

    std::fs::write(&manifest, "[handler]\nupdate_types = [\"otabox/file:1\"]\nsha256 = \"00\"\n[limits]\nmemory_mb = \"lots\"\n").expect("write");
    let text = format!(
        "{:#}",
        rt.load_handler(&manifest, None)
            .await
            .expect_err("malformed")
    );
    assert!(
        text.contains(&manifest.display().to_string()) && text.contains("memory_mb"),
        "{text}"
    );

    let set = rt
        .load_dir(&handlers, &Default::default())
        .await
        .expect("dir is readable");
    assert!(set.handlers.is_empty());
    assert_eq!(set.refused.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_are_read_only_and_only_after_verification() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let h = hostile(&rt, dir.path(), BASE).await.expect("load");
    let file = dir.path().join("payload.bin");
    std::fs::write(&file, b"payload bytes").expect("write");
    let mut payload = PayloadFile {
        name: "p.bin".into(),
        size: 13,
        sha256: "x".into(),
        verified: None,
    };
    let mut scope = CallScope::for_step("job-1", 0, dir.path(), vec![payload.clone()]);
    let ctx = step(json!({"action": "payload", "name": "p.bin"}));
    let text = failure(
        h.run_phase(Phase::Install, scope.clone(), &ctx)
            .await
            .expect("call"),
    );
    assert!(text.contains("not downloaded and verified"), "{text}");
    payload.verified = Some(file);
    scope.payloads = vec![payload];
    assert_eq!(
        success(
            h.run_phase(Phase::Install, scope.clone(), &ctx)
                .await
                .expect("call")
        ),
        "payload bytes"
    );
    let missing = step(json!({"action": "payload", "name": "other"}));
    assert!(
        failure(
            h.run_phase(Phase::Install, scope, &missing)
                .await
                .expect("call")
        )
        .contains("NotFound")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_durable_per_step_and_checked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let h = hostile(&rt, dir.path(), BASE).await.expect("load");
    let outside_job = failure(
        act(
            &h,
            json!({"action": "checkpoint", "key": "k", "value": "v"}),
        )
        .await
        .expect("call"),
    );
    assert!(outside_job.contains("within a job step"), "{outside_job}");
    let scope = CallScope::for_step("job-1", 2, dir.path(), vec![]);
    let ctx = step(json!({"action": "checkpoint", "key": "stage", "value": "installed"}));
    assert_eq!(
        success(
            h.run_phase(Phase::Install, scope.clone(), &ctx)
                .await
                .expect("call")
        ),
        "installed"
    );
    let stored =
        std::fs::read_to_string(dir.path().join("step-2.checkpoint.json")).expect("persisted");
    assert!(stored.contains("stage"), "{stored}");
    let bad = step(json!({"action": "checkpoint", "key": "../escape", "value": "v"}));
    assert!(
        failure(
            h.run_phase(Phase::Install, scope, &bad)
                .await
                .expect("call")
        )
        .contains("Invalid")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_components_are_cached_and_a_corrupt_entry_is_replaced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let body = BASE;
    let first = hostile(&runtime(dir.path()), dir.path(), body)
        .await
        .expect("load");
    assert_eq!(first.cache, otabox::runtime::CacheUse::Miss);
    let second = hostile(&runtime(dir.path()), dir.path(), body)
        .await
        .expect("load");
    assert_eq!(second.cache, otabox::runtime::CacheUse::Hit);
    // Replace each entry with garbage by rename, as anything touching the
    // cache must (the live handlers above still map the old files).
    for entry in std::fs::read_dir(dir.path().join("cache"))
        .expect("cache dir")
        .flatten()
    {
        let garbage = entry.path().with_extension("garbage");
        std::fs::write(&garbage, b"garbage").expect("write garbage");
        std::fs::rename(&garbage, entry.path()).expect("corrupt");
    }
    let third = hostile(&runtime(dir.path()), dir.path(), body)
        .await
        .expect("a corrupt entry is recompiled");
    assert_eq!(third.cache, otabox::runtime::CacheUse::Miss);
    assert!(matches!(
        act(&third, json!({"action": "ok"})).await.expect("call"),
        Outcome::Success
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_printing_megabytes_is_capped_not_failed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let h = hostile(&rt, dir.path(), BASE).await.expect("load");
    let outcome = act(
        &h,
        json!({"action": "print", "text": "x".repeat(1000), "times": 2000}),
    )
    .await
    .expect("call");
    assert!(matches!(outcome, Outcome::Success), "{outcome:?}");
    still_serves(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_access_is_limited_to_granted_hosts_and_ports() {
    use std::io::Read;
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let granted = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    let other = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    other.set_nonblocking(true).expect("nonblocking");
    let port = granted.local_addr().expect("addr").port();
    let caps = format!(
        "[[commands]]\nprogram = \"/bin/true\"\n[[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n[network]\nhosts = [\"127.0.0.1:{port}\"]\n"
    );
    let h = hostile(&rt, dir.path(), &caps).await.expect("load");
    let accepted = std::thread::spawn(move || {
        let (mut stream, _) = granted.accept().expect("accept");
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).expect("read");
        buf
    });
    assert_eq!(
        success(
            act(
                &h,
                json!({"action": "connect", "address": format!("127.0.0.1:{port}")})
            )
            .await
            .expect("call")
        ),
        "connected"
    );
    assert_eq!(&accepted.join().expect("listener thread"), b"hello");

    let other_port = other.local_addr().expect("addr").port();
    failure(
        act(
            &h,
            json!({"action": "connect", "address": format!("127.0.0.1:{other_port}")}),
        )
        .await
        .expect("denial is returned"),
    );
    assert!(
        other.accept().is_err(),
        "a connection reached an ungranted port"
    );
    still_serves(&h).await;
}

/// A component whose runtime imports `wasi:sockets` loads without any
/// network when its manifest stubs it, and every connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stubbed_sockets_load_and_refuse_every_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listener");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("addr").port();
    let bare =
        "[[commands]]\nprogram = \"/bin/true\"\n[[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n";
    let refused = hostile(&rt, dir.path(), bare)
        .await
        .expect_err("sockets undeclared");
    assert!(
        format!("{refused:#}").contains("wasi:sockets"),
        "{refused:#}"
    );
    let h = hostile(
        &rt,
        dir.path(),
        &format!("{bare}[stubs]\nrefuse = [\"network\"]\n"),
    )
    .await
    .expect("loads with the stub");
    let message = failure(
        act(
            &h,
            json!({"action": "connect", "address": format!("127.0.0.1:{port}")}),
        )
        .await
        .expect("the refusal is returned"),
    );
    assert!(
        message.contains("denied") || message.contains("ermission"),
        "{message}"
    );
    assert!(listener.accept().is_err(), "a stubbed socket connected");
    still_serves(&h).await;
}

/// A handler built against the frozen 1.0.0 contract (its own copy of that
/// WIT) keeps loading and running in this 1.x host, which reports the
/// contract it was built against.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_built_against_contract_1_0_keeps_working() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let manifest = install_handler(
        &dir.path().join("handlers"),
        "contract-1-0",
        &built_wasm("contract-1-0"),
        "otabox-test/contract-1-0:1",
        "",
    );
    let handler = rt
        .load_handler(&manifest, None)
        .await
        .expect("a 1.0 handler loads");
    assert_eq!(handler.contract, "1.0.0");
    assert_eq!(handler.description.contract, "1.0.0");
    let job_dir = dir.path().join("job");
    let request = || otabox::workflow::StepRequest {
        job_id: "legacy".into(),
        step: 0,
        update_type: "otabox-test/contract-1-0:1".into(),
        manifest: "{}".into(),
        payloads: Vec::new(),
        job_dir: job_dir.clone(),
        cancel: Default::default(),
    };
    let first = otabox::workflow::run_step(&handler, request(), None)
        .await
        .expect("step");
    assert_eq!(
        first.result,
        otabox::workflow::StepResult::Installed {
            criteria: "legacy-legacy".into()
        }
    );
    let again = otabox::workflow::run_step(&handler, request(), None)
        .await
        .expect("step");
    assert!(
        matches!(
            again.result,
            otabox::workflow::StepResult::AlreadyInstalled { .. }
        ),
        "its checkpoint import works: {:?}",
        again.result
    );
}

/// A program that outlives the call's time limit is killed together with
/// everything it started (its own process group), so nothing it spawned
/// keeps running after the handler gave up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_program_is_killed_with_its_children() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let pidfile = dir.path().join("child.pid");
    // The base capabilities (the guest's other imports) plus /bin/sh -c.
    let body = format!(
        "{BASE}[[commands]]\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"*\"]\n[limits]\ncall_timeout_ms = 500\n"
    );
    let h = hostile(&rt, dir.path(), &body).await.expect("load");
    let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
    let outcome = act(
        &h,
        json!({"action": "exec", "program": "/bin/sh", "args": ["-c", script]}),
    )
    .await;
    let said = match outcome {
        Ok(o) => failure(o),
        Err(fault) => format!("{fault:#}"),
    };
    assert!(
        said.contains("killed with its children") || said.contains("time limit"),
        "{said}"
    );
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .expect("the child started")
        .trim()
        .parse()
        .expect("pid");
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|stat| {
                // The state follows the command name in parentheses.
                let state = stat.rsplit(')').next().unwrap_or_default().trim_start();
                !state.starts_with('Z')
            })
            .unwrap_or(false)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while alive(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the background child {pid} survived the timeout"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    still_serves(&h).await;
}
