//! Handler-call benchmark, side by side with the process-per-call plugin
//! model (thin-edge.io, Mender, Device Update's script handler), in one run:
//!
//! - instantiate the pre-linked `file` handler + one `is-installed` call
//!   (goal: median ≤ 100 µs);
//! - spawn a trivial executable (`/bin/true`) and wait for it, per call;
//! - the ratio of the two (goal: the handler call ≥ 10× faster);
//! - load three handlers from a warm compiled-component cache (goal ≤ 20 ms);
//! - for reference: a cold compile of the same component;
//! - a handler's command (`/bin/true`) spawned as before (tokio, its own
//!   process group) vs confined in its own cgroup vs under the subreaper
//!   fallback: the latency the containment adds.
//!
//! Run with `make bench` (or `cargo bench -p otabox --bench handler_call`).
//! Without cargo's `--bench` flag (as `make test` runs it) or with
//! `OTABOX_BENCH_QUICK=1` it makes a short smoke run.

#[path = "support/calibration.rs"]
mod calibration;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use otabox::capabilities::process::confine;
use otabox::capabilities::{CommandIsolation, DeviceGrant};
use otabox::runtime::{CallScope, Handler, PayloadFile, Runtime, StepContext, sha256_hex};

const GUEST_DIR: &str = "/var/lib/otabox/files";

fn main() {
    let quick = std::env::var_os("OTABOX_BENCH_QUICK").is_some()
        || !std::env::args().any(|a| a == "--bench");
    let (calls, spawns, loads) = if quick {
        (300, 100, 10)
    } else {
        (5000, 1000, 50)
    };
    let scratch = tempdir();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    rt.block_on(run(&scratch, calls, spawns, loads, quick));
    calibration::Calibration::measure(&std::env::temp_dir()).print();
    let _ = std::fs::remove_dir_all(&scratch);
}

async fn run(scratch: &Path, calls: usize, spawns: usize, loads: usize, quick: bool) {
    let handlers = scratch.join("handlers");
    let files = scratch.join("files");
    std::fs::create_dir_all(&files).expect("files dir");
    std::fs::write(files.join("app.conf"), b"installed content\n").expect("installed file");
    let manifests = [
        install(
            &handlers,
            "file",
            "file",
            "otabox/file:1",
            &format!("[[filesystem]]\npath = \"{GUEST_DIR}\"\naccess = \"rw\"\n"),
        ),
        install(
            &handlers,
            "hostile",
            "hostile",
            "otabox-test/hostile:1",
            "[[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n[[commands]]\nprogram = \"/bin/true\"\n[network]\nhosts = [\"127.0.0.1\"]\n",
        ),
        install(
            &scratch.join("more"),
            "file",
            "file",
            "otabox/file:1",
            "[[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n",
        ),
    ];
    let mut grant = DeviceGrant::default();
    grant.mounts.insert(GUEST_DIR.into(), files.clone());

    let engine_started = Instant::now();
    let runtime = Runtime::new(Some(scratch.join("cache"))).expect("runtime");
    let engine_time = engine_started.elapsed();
    let cold_started = Instant::now();
    let handler = runtime
        .load_handler(&manifests[0], Some(&grant))
        .await
        .expect("load file handler");
    let cold_load = cold_started.elapsed();

    let ctx = is_installed_context();
    let call = sample(calls, calls / 10, || async {
        let installed = handler
            .is_installed(CallScope::default(), &ctx)
            .await
            .expect("call")
            .expect("status");
        assert!(installed);
    })
    .await;

    let describe = sample(calls, calls / 10, || async {
        handler.describe().await.expect("describe");
    })
    .await;

    let spawn = sample(spawns, spawns / 10, || async {
        let status = Command::new("/bin/true").status().expect("spawn /bin/true");
        assert!(status.success());
    })
    .await;

    let plain = sample(spawns, spawns / 10, || spawn_true(None)).await;
    let in_cgroup = sample(spawns, spawns / 10, || {
        spawn_true(Some(CommandIsolation::Auto))
    })
    .await;
    let reaped = sample(spawns, spawns / 10, || {
        spawn_true(Some(CommandIsolation::Subreaper))
    })
    .await;

    for (i, manifest) in manifests.iter().enumerate() {
        runtime
            .load_handler(manifest, (i == 0).then_some(&grant))
            .await
            .expect("prime the cache");
    }
    let load3 = sample(loads, 2, || async {
        for (i, manifest) in manifests.iter().enumerate() {
            let h = runtime
                .load_handler(manifest, (i == 0).then_some(&grant))
                .await
                .expect("warm load");
            assert_eq!(h.cache, otabox::runtime::CacheUse::Hit);
        }
    })
    .await;

    let figures = Figures {
        call,
        describe,
        spawn,
        commands: [plain, in_cgroup, reaped],
        load3,
        cold_load,
        engine_time,
        calls,
        spawns,
        loads,
    };
    report(&handler, &figures, quick);
}

/// Runs `/bin/true` as a handler's command is run: plainly as before
/// (`None`), or confined as `isolation` says.
async fn spawn_true(isolation: Option<CommandIsolation>) {
    let mut cmd = tokio::process::Command::new("/bin/true");
    cmd.env_clear()
        .current_dir("/")
        .process_group(0)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let status = match isolation {
        None => cmd.spawn().expect("spawn").wait().await,
        Some(isolation) => {
            let (mut child, mut confined) =
                confine::spawn(&mut cmd, &confine::Privileges::default(), isolation)
                    .expect("confined spawn");
            assert_eq!(
                confined.in_cgroup(),
                isolation == CommandIsolation::Auto,
                "containment mode"
            );
            confined.wait(&mut child).await
        }
    };
    assert!(status.expect("wait").success());
}

/// Everything one run measured.
struct Figures {
    call: Stats,
    describe: Stats,
    spawn: Stats,
    /// A command spawned plainly, in its own cgroup, under the subreaper.
    commands: [Stats; 3],
    load3: Stats,
    cold_load: Duration,
    engine_time: Duration,
    calls: usize,
    spawns: usize,
    loads: usize,
}

fn report(handler: &Handler, f: &Figures, quick: bool) {
    let Figures {
        call,
        describe,
        spawn,
        commands,
        load3,
        cold_load,
        engine_time,
        calls,
        spawns,
        loads,
    } = f;
    let (cold_load, engine_time) = (*cold_load, *engine_time);
    let ratio = spawn.median.as_secs_f64() / call.median.as_secs_f64();
    let verdict = |ok: bool| if ok { "goal met" } else { "GOAL MISSED" };
    println!(
        "otabox handler-call benchmark ({} profile, handler {} {} bytes)",
        profile(),
        handler.name,
        wasm_size(handler)
    );
    println!("{:<52} {:>10} {:>10} {:>10}", "", "median", "p10", "p90");
    row(
        &format!("instantiate + is-installed, file handler (n={calls})"),
        call,
        us,
    );
    row(
        &format!("instantiate + describe, file handler (n={calls})"),
        describe,
        us,
    );
    row(&format!("spawn /bin/true and wait (n={spawns})"), spawn, us);
    for (label, stats) in ["plain (as before)", "own cgroup", "subreaper"]
        .iter()
        .zip(commands)
    {
        row(
            &format!("command /bin/true, {label} (n={spawns})"),
            stats,
            us,
        );
    }
    let added = |s: &Stats| (s.median.as_secs_f64() - commands[0].median.as_secs_f64()) * 1e6;
    println!(
        "{:<52} {:>+10.1} us (subreaper {:+.1} us)",
        "added per command by its own cgroup (medians)",
        added(&commands[1]),
        added(&commands[2])
    );
    row(
        &format!("load 3 handlers from the warm cache (n={loads})"),
        load3,
        ms,
    );
    println!(
        "{:<52} {:>10}",
        "cold load of the file handler (compile + cache)",
        ms(cold_load)
    );
    println!("{:<52} {:>10}", "engine creation", ms(engine_time));
    println!();
    if quick || cfg!(debug_assertions) {
        println!(
            "smoke run: every measured call succeeded; judge the goals with `make bench` (release, full run)"
        );
        return;
    }
    println!(
        "handler call median {} (goal <= 100 us): {}",
        us(call.median),
        verdict(call.median <= Duration::from_micros(100))
    );
    println!(
        "spawn / handler call = {ratio:.1}x (goal >= 10x): {}",
        verdict(ratio >= 10.0)
    );
    println!(
        "3 warm loads median {} (goal <= 20 ms): {}",
        ms(load3.median),
        verdict(load3.median <= Duration::from_millis(20))
    );
}

/// A step whose destination exists with the payload's content.
fn is_installed_context() -> StepContext {
    let content = b"installed content\n";
    let payload = PayloadFile {
        name: "app.conf".into(),
        size: content.len() as u64,
        sha256: sha256_hex(content),
        verified: None,
    };
    StepContext {
        job_id: "bench".into(),
        step: 0,
        update_type: "otabox/file:1".into(),
        manifest: serde_json::json!({"name": "app", "version": "1", "payload": "app.conf", "destination": format!("{GUEST_DIR}/app.conf")}).to_string(),
        payloads: vec![otabox::model::PayloadInfo { name: payload.name, size: payload.size, sha256: payload.sha256 }],
        config: "{}".into(),
        installed_criteria: None,
    }
}

struct Stats {
    median: Duration,
    p10: Duration,
    p90: Duration,
}

async fn sample<F, Fut>(n: usize, warmup: usize, mut f: F) -> Stats
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..warmup {
        f().await;
    }
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        f().await;
        times.push(started.elapsed());
    }
    times.sort();
    let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    Stats {
        median: at(0.5),
        p10: at(0.1),
        p90: at(0.9),
    }
}

fn row(label: &str, s: &Stats, unit: fn(Duration) -> String) {
    println!(
        "{label:<52} {:>10} {:>10} {:>10}",
        unit(s.median),
        unit(s.p10),
        unit(s.p90)
    );
}

fn us(d: Duration) -> String {
    format!("{:.1} us", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn profile() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

fn wasm_size(handler: &Handler) -> u64 {
    std::fs::metadata(&handler.wasm_path)
        .map(|m| m.len())
        .unwrap_or(0)
}

/// Writes `<dir>/<name>.wasm` (a copy of the built guest `guest`) and its
/// manifest pinned to it.
fn install(dir: &Path, name: &str, guest: &str, update_type: &str, body: &str) -> PathBuf {
    let wasm =
        std::fs::read(Path::new(env!("OTABOX_BUILT_HANDLERS")).join(format!("{guest}.wasm")))
            .expect("built guest");
    std::fs::create_dir_all(dir).expect("handler dir");
    std::fs::write(dir.join(format!("{name}.wasm")), &wasm).expect("wasm");
    let manifest = dir.join(format!("{name}.toml"));
    let toml = format!(
        "[handler]\nupdate_types = [\"{update_type}\"]\nsha256 = \"{}\"\n{body}",
        sha256_hex(&wasm)
    );
    std::fs::write(&manifest, toml).expect("manifest");
    manifest
}

fn tempdir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("otabox-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}
