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

/// Handlers run in wasmtime's Pulley interpreter exactly when the build
/// asks for it (the `pulley` feature) or the host has no Cranelift backend
/// (32-bit ARM); elsewhere as native code.
#[test]
fn handlers_are_interpreted_exactly_where_the_build_says() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_eq!(
        runtime(dir.path()).engine().is_pulley(),
        cfg!(any(feature = "pulley", target_arch = "arm"))
    );
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

/// A command that would outlive the call is killed a tenth of the call's
/// time limit before its end (here 400 ms), so the handler can still
/// report it: here it computes for 50 ms after the kill, five epoch ticks,
/// which the engine would not allow past the call's deadline (a slow
/// board, or the Pulley interpreter, needs such time to clean up and
/// report). Its own failure comes back, not a time-limit fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_keeps_time_to_report_a_command_it_had_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let body = format!(
        "{BASE}[[commands]]\nprogram = \"/bin/sleep\"\nargs = [\"*\"]\n[limits]\ncall_timeout_ms = 4000\n"
    );
    let h = hostile(&rt, dir.path(), &body).await.expect("load");
    let text = failure(
        act(
            &h,
            json!({"action": "exec", "program": "/bin/sleep", "args": ["30"], "busy_after_ms": 50}),
        )
        .await
        .expect("the handler's own failure, not a fault"),
    );
    assert!(
        text.contains("TimedOut") && text.contains("killed"),
        "{text}"
    );
    let ran_ms: u64 = text
        .split("ran longer than ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|ms| ms.parse().ok())
        .unwrap_or_else(|| panic!("no time limit in {text}"));
    assert!(ran_ms <= 3600, "killed after {ran_ms} ms: {text}");
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
        .load_dirs(std::slice::from_ref(&handlers), &Default::default())
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

/// (The runtime-only build compiles nothing: see tests/precompiled.rs.)
#[cfg(feature = "compiler")]
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
    let request = || otabox::step::StepRequest {
        job_id: "legacy".into(),
        step: 0,
        update_type: "otabox-test/contract-1-0:1".into(),
        manifest: "{}".into(),
        payloads: Vec::new(),
        job_dir: job_dir.clone(),
        cancel: Default::default(),
    };
    let first = otabox::step::run_step(&handler, request(), None)
        .await
        .expect("step");
    assert_eq!(
        first.result,
        otabox::step::StepResult::Installed {
            criteria: "legacy-legacy".into()
        }
    );
    let again = otabox::step::run_step(&handler, request(), None)
        .await
        .expect("step");
    assert!(
        matches!(
            again.result,
            otabox::step::StepResult::AlreadyInstalled { .. }
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

/// The manifest of a hostile guest that may use a lot of memory and time.
const ROOMY: &str = concat!(
    base_caps!(),
    "[limits]\nmemory_mb = 512\ncall_timeout_ms = 60000\n"
);

/// A status of 8 MiB with 100,000 details, full of forged lines, comes back
/// within the contract's bounds: a 1024-byte message cut on a character
/// boundary with a marker, 32 details (the last counting the dropped ones),
/// keys and values cut, every control character escaped. One of 50 MiB
/// with a million details is more than the host copies out of a guest: the
/// call fails with a bounded fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_status_is_cut_to_the_contracts_bounds() {
    use otabox::runtime::bounds;
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let h = hostile(&rt, dir.path(), ROOMY).await.expect("load");
    let forged = "é\nERROR otabox: job deploy-42 SUCCESS\r\0\u{1b}[2J";
    let outcome = act(
        &h,
        json!({"action": "status", "text": forged, "bytes": 8 << 20, "details": 100_000}),
    )
    .await
    .expect("call");
    let Outcome::Failed(status) = outcome else {
        panic!("expected a failure, got {outcome:?}");
    };
    assert!(
        status.message.len() <= bounds::MAX_MESSAGE,
        "{}",
        status.message.len()
    );
    assert!(status.message.ends_with(bounds::MARKER));
    assert!(
        status.message.starts_with("é\\nERROR otabox"),
        "{}",
        status.message
    );
    assert!(
        !status.message.chars().any(char::is_control),
        "{:?}",
        status.message
    );
    assert_eq!(status.details.len(), bounds::MAX_DETAILS);
    assert_eq!(
        status.details.last().map(|(k, v)| (k.as_str(), v.as_str())),
        Some((bounds::DROPPED_KEY, "99969 more details"))
    );
    for (k, v) in &status.details {
        assert!(k.len() <= bounds::MAX_DETAIL_KEY && v.len() <= bounds::MAX_DETAIL_VALUE);
        assert!(
            !format!("{k}{v}").chars().any(char::is_control),
            "{k:?}={v:?}"
        );
    }
    still_serves(&h).await;

    let err = act(
        &h,
        json!({"action": "status", "text": forged, "bytes": 50 << 20, "details": 1_000_000}),
    )
    .await
    .expect_err("more than the host copies");
    let text = format!("{err:#}");
    assert!(
        text.len() < 4096 && text.contains("too much data"),
        "{text}"
    );
    still_serves(&h).await;
}

/// A plan and an inventory over the bounds: installed criteria (an
/// identity) over 1024 bytes are refused as a breach of the contract;
/// warnings, inventory items and their texts are cut and escaped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plans_and_inventories_are_bounded() {
    use otabox::runtime::bounds;
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let mut config = toml::Table::new();
    config.insert("items".into(), toml::Value::Integer(5000));
    config.insert("name_bytes".into(), toml::Value::Integer(1000));
    let grant = DeviceGrant {
        config: Some(config),
        ..DeviceGrant::default()
    };
    let h = hostile_with(&rt, dir.path(), ROOMY, &grant)
        .await
        .expect("load");
    let plan = |criteria: usize, warnings: usize| {
        step(json!({"action": "plan", "criteria_bytes": criteria, "warnings": warnings}))
    };
    let err = h
        .validate(CallScope::default(), &plan(bounds::MAX_CRITERIA + 1, 0))
        .await
        .expect_err("criteria over the bound");
    assert!(matches!(fault(&err), CallFault::Breach(_)), "{err:#}");
    assert!(
        format!("{err:#}").contains("installed criteria is 1025 bytes"),
        "{err:#}"
    );
    let ok = h
        .validate(CallScope::default(), &plan(bounds::MAX_CRITERIA, 1000))
        .await
        .expect("call")
        .expect("a plan");
    assert_eq!(ok.installed_criteria.len(), bounds::MAX_CRITERIA);
    assert_eq!(ok.warnings.len(), bounds::MAX_WARNINGS);
    assert_eq!(ok.warnings[0], "warning 0\\nforged");
    assert_eq!(
        ok.warnings.last().map(String::as_str),
        Some("969 more warnings dropped")
    );

    let items = inventory_of(&h).await;
    assert_eq!(items.len(), bounds::MAX_INVENTORY_ITEMS);
    for item in &items {
        assert!(item.name.len() <= bounds::MAX_NAME, "{}", item.name.len());
        assert_eq!(item.version, "1\\u{1b}[2J");
        assert_eq!(item.details.len(), bounds::MAX_ITEM_DETAILS);
    }
}

/// Deep recursion is reported as a stack overflow, whether the engine's
/// call stack runs out or the shadow stack in linear memory wraps below
/// address 0 (which faults at the top of the address space).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stack_overflow_reads_as_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let h = hostile(&rt, dir.path(), BASE).await.expect("load");
    for shadow in [true, false] {
        let err = act(&h, json!({"action": "recurse", "shadow": shadow}))
            .await
            .expect_err("the recursion must trap");
        assert_eq!(
            fault(&err),
            &CallFault::StackOverflow,
            "shadow {shadow}: {err:#}"
        );
        let text = format!("{err:#}");
        assert!(text.contains("stack overflow"), "{text}");
        assert!(!text.contains("memory fault"), "{text}");
        still_serves(&h).await;
    }
}

/// Only names that appear in the network grants are resolved. `localhost`
/// is in /etc/hosts, so the system resolver would answer it: with a grant
/// of `127.0.0.1:PORT` the lookup must still fail (the host never asks the
/// resolver), while a grant naming `localhost` resolves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_granted_names_are_resolved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let caps = |host: &str| {
        format!(
            "[[commands]]\nprogram = \"/bin/true\"\n[[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n[network]\nhosts = [\"{host}\"]\n"
        )
    };
    let by_address = hostile(&rt, dir.path(), &caps("127.0.0.1:8080"))
        .await
        .expect("load");
    for name in [
        "localhost",
        "LOCALHOST",
        "exfiltrated-secret.example.com",
        "localhost.",
    ] {
        let text = failure(
            act(&by_address, json!({"action": "resolve", "name": name}))
                .await
                .expect("a refusal is returned"),
        );
        assert!(!text.contains("127.0.0.1"), "{name}: {text}");
    }
    assert_eq!(
        success(
            act(
                &by_address,
                json!({"action": "resolve", "name": "127.0.0.1"})
            )
            .await
            .expect("an address needs no lookup")
        ),
        "127.0.0.1"
    );
    let by_name = hostile(&rt, dir.path(), &caps("localhost:8080"))
        .await
        .expect("load");
    for name in ["localhost", "LocalHost", "localhost."] {
        // `localhost.` is not in /etc/hosts: it resolves only because the
        // host asks for the grant's own spelling.
        let resolved = success(
            act(&by_name, json!({"action": "resolve", "name": name}))
                .await
                .expect("a granted name resolves"),
        );
        assert!(resolved.contains("127.0.0.1"), "{name}: {resolved}");
    }
    failure(
        act(
            &by_name,
            json!({"action": "resolve", "name": "localhost.localdomain"}),
        )
        .await
        .expect("a refusal is returned"),
    );
}

/// Runs `otabox handlers run-phase --phase install` on the hostile guest
/// with `manifest`; returns the output and the peak RSS of the children
/// so far (KiB).
fn run_phase_hostile(
    dir: &std::path::Path,
    manifest: serde_json::Value,
) -> (std::process::Output, i64) {
    install_handler(
        &dir.join("handlers"),
        "hostile",
        &built_wasm("hostile"),
        "otabox-test/hostile:1",
        ROOMY,
    );
    let config = dir.join("device.toml");
    std::fs::write(
        &config,
        "[paths]\nhandlers = \"handlers\"\nstate = \"state\"\n",
    )
    .expect("config");
    let out = otabox_command()
        .args(["handlers", "run-phase", "--config"])
        .arg(&config)
        .args(["--handler", "hostile", "--phase", "install", "--manifest"])
        .arg(manifest.to_string())
        .env("OTABOX_LOG", "info")
        .output()
        .expect("run otabox");
    // SAFETY: getrusage only fills the struct it is given.
    let peak = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        // A `c_long`: 32 bits on 32-bit ARM (so not useless there).
        #[allow(clippy::useless_conversion)]
        i64::from(usage.ru_maxrss)
    };
    (out, peak)
}

/// `handlers run-phase` on a 50 MiB status with a million details prints a
/// bounded result (the call fails: more than the host copies out of a
/// guest) and stays within the guest's memory cap; one of 8 MiB with
/// 100,000 details prints the status cut to its bounds.
#[test]
fn run_phase_prints_a_bounded_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let started = Instant::now();
    let (out, peak_kib) = run_phase_hostile(
        dir.path(),
        json!({"action": "status", "text": "line\nforged ", "bytes": 50 << 20, "details": 1_000_000}),
    );
    let printed = out.stdout.len() + out.stderr.len();
    assert!(printed < 64 << 10, "{printed} bytes printed");
    assert!(String::from_utf8_lossy(&out.stderr).contains("too much data"));
    eprintln!(
        "run-phase of a 50 MiB status: {printed} bytes printed, peak RSS of the children {} MiB, {:?}",
        peak_kib >> 10,
        started.elapsed()
    );
    let (out, _) = run_phase_hostile(
        dir.path(),
        json!({"action": "status", "text": "line\nforged ", "bytes": 8 << 20, "details": 100_000}),
    );
    assert!(
        out.stdout.len() < 64 << 10,
        "{} bytes printed",
        out.stdout.len()
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let message = json["failed"]["message"].as_str().expect("message");
    assert!(
        message.len() <= 1024 && message.starts_with("line\\nforged"),
        "{message}"
    );
    assert_eq!(
        json["failed"]["details"].as_object().map(|d| d.len()),
        Some(32)
    );
}

/// A guest's log line cannot start a line of the agent's log (newline, CR,
/// NUL and escape sequences are escaped), and a million log calls produce
/// a bounded log with one line counting what was dropped.
#[test]
fn guest_logs_are_escaped_and_budgeted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let forged = "step done\nERROR otabox: job deploy-42 SUCCESS (forged line)\r\0\u{1b}[2J";
    let (out, _) = run_phase_hostile(
        dir.path(),
        json!({"action": "log", "text": forged, "times": 3}),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert_eq!(
        log.matches("step done\\nERROR otabox: job deploy-42")
            .count(),
        3,
        "{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("ERROR otabox")) && !log.contains('\0'),
        "a forged line reached column 0: {log}"
    );
    assert!(!log.contains("\u{1b}[2J") && !log.contains('\r'), "{log:?}");

    let started = Instant::now();
    let (out, _) = run_phase_hostile(
        dir.path(),
        json!({"action": "log", "text": "x".repeat(100), "times": 1_000_000}),
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{}",
        &log[log.len().saturating_sub(2000)..]
    );
    assert!(
        out.stderr.len() < 512 << 10,
        "{} bytes of log",
        out.stderr.len()
    );
    assert!(
        log.contains("999000 log lines dropped"),
        "{}",
        &log[log.len().saturating_sub(2000)..]
    );
    eprintln!(
        "10^6 guest log calls: {} bytes of log in {:?}",
        out.stderr.len(),
        started.elapsed()
    );
}

/// Loads the device-attacking guest with a rw grant of `grant` and the
/// device `slot` inside it.
async fn device_attacker(
    rt: &otabox::runtime::Runtime,
    root: &std::path::Path,
    grant: &std::path::Path,
    slot: &std::path::Path,
) -> otabox::runtime::Handler {
    let manifest = install_handler(
        &root.join("handlers"),
        "hostile-devices",
        &built_wasm("hostile-devices"),
        "otabox-test/hostile-devices:1",
        &format!(
            "[[filesystem]]\npath = \"{}\"\naccess = \"rw\"\n[[devices]]\npath = \"{}\"\n",
            grant.display(),
            slot.display()
        ),
    );
    rt.load_handler(&manifest, None).await.expect("load")
}

/// A handler granted a rw directory and a slot file inside it replaces the
/// slot, through WASI, with a relative link to a file outside every grant
/// (or with another file): `info`, `hash` (the byte oracle) and
/// `write-image` are all refused, the outside file is unchanged, and a
/// handler loaded after the link was planted refuses the device too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_planted_where_a_device_was_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let (grant, outside) = (root.join("grant"), root.join("outside"));
    std::fs::create_dir_all(&grant).expect("grant");
    std::fs::create_dir_all(&outside).expect("outside");
    let secret = outside.join("passwd");
    let secret_bytes = b"root:x:0:0:root:/root:/bin/bash\n".repeat(256);
    std::fs::write(&secret, &secret_bytes).expect("secret");
    let slot = grant.join("slot.img");
    std::fs::write(&slot, vec![0xAAu8; 8192]).expect("slot");
    // Keeps the slot's inode allocated, so no file made later reuses its
    // number (a reused one would be a file inside the grant: harmless,
    // but the check could not tell).
    std::fs::hard_link(&slot, root.join("slot-inode")).expect("hard link");
    let image = root.join("image.bin");
    std::fs::write(&image, vec![0x55u8; 4096]).expect("image");
    let rt = runtime(&root);
    let h = device_attacker(&rt, &root, &grant, &slot).await;
    let s = slot.display().to_string();
    let call = |manifest: serde_json::Value| {
        let payload = PayloadFile {
            name: "image.bin".into(),
            size: 4096,
            sha256: "x".into(),
            verified: Some(image.clone()),
        };
        let scope = CallScope::for_step("job-1", 0, &root, vec![payload]);
        let h = &h;
        async move {
            h.run_phase(Phase::Install, scope, &step(manifest))
                .await
                .expect("call")
        }
    };
    assert_eq!(
        success(call(json!({"action": "info", "path": s})).await),
        "size=8192 block=false"
    );

    let planted =
        success(call(json!({"action": "plant", "path": s, "target": "../outside/passwd"})).await);
    assert!(planted.ends_with("../outside/passwd"), "{planted}");
    assert!(
        slot.symlink_metadata()
            .expect("planted")
            .file_type()
            .is_symlink()
    );
    let attacks = [
        json!({"action": "info", "path": s}),
        json!({"action": "hash", "path": s, "length": 1}),
        json!({"action": "hash", "path": s, "length": 16}),
        json!({"action": "write", "path": s, "payload": "image.bin"}),
    ];
    for attack in &attacks {
        let text = failure(call(attack.clone()).await);
        assert!(
            text.contains("Denied") && text.contains("symbolic link"),
            "{attack}: {text}"
        );
    }
    assert_eq!(
        std::fs::read(&secret).expect("secret"),
        secret_bytes,
        "written through the link"
    );

    let reloaded = device_attacker(&rt, &root, &grant, &slot).await;
    let payload = PayloadFile {
        name: "image.bin".into(),
        size: 4096,
        sha256: "x".into(),
        verified: Some(image.clone()),
    };
    for attack in &attacks {
        let scope = CallScope::for_step("job-1", 0, &root, vec![payload.clone()]);
        let text = failure(
            reloaded
                .run_phase(Phase::Install, scope, &step(attack.clone()))
                .await
                .expect("call"),
        );
        assert!(
            text.contains("Denied") && text.contains("not usable"),
            "after a reload, {attack}: {text}"
        );
    }
    assert_eq!(std::fs::read(&secret).expect("secret"), secret_bytes);

    std::fs::remove_file(&slot).expect("remove the link");
    std::fs::write(&slot, vec![0xAAu8; 8192]).expect("slot again");
    let text = failure(call(json!({"action": "info", "path": s})).await);
    assert!(text.contains("another file is in its place"), "{text}");
    let fresh = device_attacker(&rt, &root, &grant, &slot).await;
    let scope = CallScope::for_step("job-1", 0, &root, vec![]);
    let replaced = success(
        fresh
            .run_phase(
                Phase::Install,
                scope.clone(),
                &step(json!({"action": "replace", "path": s})),
            )
            .await
            .expect("call"),
    );
    assert_eq!(replaced, "replaced");
    let text = failure(
        fresh
            .run_phase(
                Phase::Install,
                scope,
                &step(json!({"action": "hash", "path": s, "length": 16})),
            )
            .await
            .expect("call"),
    );
    assert!(text.contains("another file is in its place"), "{text}");
}

/// `handlers audit` reports a device inside a directory the same handler
/// may write as an error, and as a warning once the device config lists
/// it in `devices_in_writable_paths`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_errs_on_a_device_inside_a_writable_grant() {
    use otabox::audit::{Severity, audit_dirs};
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let grant = root.join("grant");
    std::fs::create_dir_all(&grant).expect("grant");
    let slot = grant.join("slot.img");
    std::fs::write(&slot, vec![0u8; 4096]).expect("slot");
    let rt = runtime(&root);
    device_attacker(&rt, &root, &grant, &slot).await;
    let findings = |device: std::collections::BTreeMap<String, DeviceGrant>| {
        let (rt, handlers) = (&rt, root.join("handlers"));
        async move {
            let audits = audit_dirs(rt, std::slice::from_ref(&handlers), &device)
                .await
                .expect("audit");
            audits[0]
                .findings
                .iter()
                .map(|f| (f.severity, f.message.clone()))
                .collect::<Vec<_>>()
        }
    };
    let found = findings(Default::default()).await;
    let inside: Vec<_> = found
        .iter()
        .filter(|(_, m)| m.contains("lies inside"))
        .collect();
    assert_eq!(inside.len(), 1, "{found:?}");
    assert_eq!(inside[0].0, Severity::Error, "{found:?}");
    assert!(
        inside[0].1.contains(&grant.display().to_string()),
        "{found:?}"
    );

    let allowed = DeviceGrant {
        devices_in_writable_paths: vec![slot.clone()],
        ..DeviceGrant::default()
    };
    let found = findings([("hostile-devices".to_string(), allowed)].into()).await;
    assert!(
        found.iter().all(|(s, _)| *s != Severity::Error),
        "{found:?}"
    );
    assert!(
        found
            .iter()
            .any(|(s, m)| *s == Severity::Warning && m.contains("allowed by")),
        "{found:?}"
    );
}

/// `{payload:NAME}` reaches a program as `/proc/self/fd/N`, a read-only
/// descriptor it inherits from the agent (a rule keeping no capabilities
/// could not open the agent's `/proc/<pid>/fd`): `echo` shows nothing of
/// where the host keeps the payload, and `cat` still reads its bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_argument_reveals_no_host_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let body = format!(
        "{BASE}[[commands]]\nprogram = \"/bin/echo\"\nargs = [\"*\"]\n\
         [[commands]]\nprogram = \"/bin/cat\"\nargs = [\"*\"]\n"
    );
    let h = hostile(&rt, dir.path(), &body).await.expect("load");
    let secret_dir = dir.path().join("state-jobs-42");
    std::fs::create_dir_all(&secret_dir).expect("dir");
    let file = secret_dir.join("payload.bin");
    std::fs::write(&file, b"payload bytes").expect("write");
    let payload = PayloadFile {
        name: "p.bin".into(),
        size: 13,
        sha256: "x".into(),
        verified: Some(file.clone()),
    };
    let scope = CallScope::for_step("job-1", 0, dir.path(), vec![payload]);
    let run = |program: &str, args: serde_json::Value| {
        let ctx = step(json!({"action": "exec", "program": program, "args": args}));
        let (h, scope) = (&h, scope.clone());
        async move {
            h.run_phase(Phase::Install, scope, &ctx)
                .await
                .expect("call")
        }
    };
    let echoed = success(run("/bin/echo", json!(["{payload:p.bin}"])).await);
    assert!(!echoed.contains("state-jobs-42"), "{echoed}");
    assert!(echoed.contains("stdout=/proc/self/fd/"), "{echoed}");
    let read = success(run("/bin/cat", json!(["{payload:p.bin}"])).await);
    assert!(read.contains("stdout=payload bytes"), "{read}");
}
