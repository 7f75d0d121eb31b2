//! Shared fixtures: scratch handler directories with the guests this build
//! produced, pinned manifests, and one-call helpers.
#![allow(dead_code)]

pub mod apt;
pub mod containers;
pub mod firmware;
pub mod languages;
pub mod nspawn;
pub mod package;
pub mod pki;
pub mod services;

use std::path::{Path, PathBuf};

use otabox::capabilities::DeviceGrant;
use otabox::runtime::{CallScope, Handler, Outcome, Phase, Runtime, StepContext, sha256_hex};

/// The `otabox` binary of this build as a command. The tests of a cross
/// build run under qemu-user, which cannot start a binary of the target by
/// itself: `OTABOX_TEST_RUNNER_<ARCH>` (set in `.cargo/config.toml` for the
/// ARM targets) names the emulator and its arguments.
pub fn otabox_command() -> std::process::Command {
    let exe = env!("CARGO_BIN_EXE_otabox");
    let key = format!(
        "OTABOX_TEST_RUNNER_{}",
        std::env::consts::ARCH.to_uppercase()
    );
    let runner = std::env::var(key).unwrap_or_default();
    let mut words = runner.split_whitespace();
    let Some(emulator) = words.next() else {
        return std::process::Command::new(exe);
    };
    let mut command = std::process::Command::new(emulator);
    command.args(words).arg(exe);
    command
}

/// A built guest component (`file` or `hostile`).
pub fn built_wasm(name: &str) -> Vec<u8> {
    let path = Path::new(env!("OTABOX_BUILT_HANDLERS")).join(format!("{name}.wasm"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        !bytes.is_empty(),
        "{} is empty: the wasm build was skipped",
        path.display()
    );
    bytes
}

/// Writes `<dir>/<name>.wasm` and `<dir>/<name>.toml`; `body` is the
/// manifest without `[handler]`, which is generated with the right sha256.
pub fn install_handler(
    dir: &Path,
    name: &str,
    wasm: &[u8],
    update_type: &str,
    body: &str,
) -> PathBuf {
    std::fs::create_dir_all(dir).expect("create handler dir");
    std::fs::write(dir.join(format!("{name}.wasm")), wasm).expect("write wasm");
    let toml = format!(
        "[handler]\nupdate_types = [\"{update_type}\"]\nsha256 = \"{}\"\n\n{body}",
        sha256_hex(wasm)
    );
    let manifest = dir.join(format!("{name}.toml"));
    std::fs::write(&manifest, toml).expect("write manifest");
    #[cfg(not(feature = "compiler"))]
    precompile_beside(dir);
    manifest
}

/// In the runtime-only build (no `compiler` feature), which loads only
/// precompiled artifacts: writes the artifact of every handler of `dir`
/// beside its wasm, with the full build named by `OTABOX_PRECOMPILER`
/// (`.ci/test-runtime-only` sets it), as a build machine would.
#[cfg(not(feature = "compiler"))]
pub fn precompile_beside(dir: &Path) {
    let precompiler = std::env::var_os("OTABOX_PRECOMPILER").expect(
        "OTABOX_PRECOMPILER: the full otabox build that precompiles for the runtime-only tests (run them with .ci/test-runtime-only)",
    );
    let target = otabox::runtime::EngineTarget::this_host();
    let out = std::process::Command::new(precompiler)
        .args(["handlers", "precompile", "--dir"])
        .arg(dir)
        .args(["--target", target.as_str()])
        .output()
        .expect("run the precompiler");
    assert!(
        out.status.success(),
        "precompile for {target}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What the hostile guest needs to run a job on a device: `root`
/// read-write, a command, and loopback.
pub fn hostile_caps(root: &Path) -> String {
    format!(
        "[[filesystem]]\npath = \"{}\"\naccess = \"rw\"\n[[commands]]\nprogram = \"/bin/true\"\n[network]\nhosts = [\"127.0.0.1\"]\n",
        root.display()
    )
}

/// A runtime with a cache in `dir/cache`.
pub fn runtime(dir: &Path) -> Runtime {
    Runtime::new(Some(dir.join("cache"))).expect("runtime")
}

/// Loads the hostile guest with `body` as its capabilities.
pub async fn hostile(rt: &Runtime, dir: &Path, body: &str) -> anyhow::Result<Handler> {
    load_hostile(rt, dir, body, None).await
}

/// Same, with a device grant.
pub async fn hostile_with(
    rt: &Runtime,
    dir: &Path,
    body: &str,
    grant: &DeviceGrant,
) -> anyhow::Result<Handler> {
    load_hostile(rt, dir, body, Some(grant)).await
}

async fn load_hostile(
    rt: &Runtime,
    dir: &Path,
    body: &str,
    grant: Option<&DeviceGrant>,
) -> anyhow::Result<Handler> {
    let manifest = install_handler(
        &dir.join("handlers"),
        "hostile",
        &built_wasm("hostile"),
        "otabox-test/hostile:1",
        body,
    );
    rt.load_handler(&manifest, grant).await
}

/// `len` bytes of xorshift noise from `seed`: payloads that do not compress
/// to nothing and differ per seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A two-worker tokio runtime and an otabox runtime caching in `dir/cache`
/// (benchmarks).
pub fn bench_runtimes(dir: &Path) -> (tokio::runtime::Runtime, Runtime) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    (rt, runtime(dir))
}

/// The median of `samples` (benchmarks).
pub fn median(samples: &[std::time::Duration]) -> std::time::Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

/// A step context carrying `manifest`.
pub fn step(manifest: serde_json::Value) -> StepContext {
    StepContext {
        job_id: "job-1".into(),
        step: 0,
        update_type: "otabox-test/hostile:1".into(),
        manifest: manifest.to_string(),
        payloads: Vec::new(),
        config: "{}".into(),
        installed_criteria: None,
    }
}

/// Calls `install` with `manifest` outside any job.
pub async fn act(handler: &Handler, manifest: serde_json::Value) -> anyhow::Result<Outcome> {
    handler
        .run_phase(Phase::Install, CallScope::default(), &step(manifest))
        .await
}

/// (phase, result code, message, rolled back) of a failed step; panics on
/// anything else.
pub fn failed(report: &otabox::step::StepReport) -> (&str, u32, &str, bool) {
    match &report.result {
        otabox::step::StepResult::Failed {
            phase,
            result_code,
            message,
            rolled_back,
            ..
        } => (phase.as_str(), *result_code, message, *rolled_back),
        other => panic!("expected a failure, got {other:?}\n{:?}", report.phases),
    }
}

/// Copies the packaged handler `name` (`.wasm` and pinned `.toml`) of this
/// build into `dir/handlers`; returns the manifest's path.
pub fn copy_built_handler(dir: &Path, name: &str) -> PathBuf {
    let handlers = dir.join("handlers");
    std::fs::create_dir_all(&handlers).expect("handlers dir");
    for ext in ["wasm", "toml"] {
        std::fs::copy(
            Path::new(env!("OTABOX_BUILT_HANDLERS")).join(format!("{name}.{ext}")),
            handlers.join(format!("{name}.{ext}")),
        )
        .unwrap_or_else(|e| panic!("the built {name} handler: {e}"));
    }
    handlers.join(format!("{name}.toml"))
}

/// Starts the agent for `config`, waits until it reports online, publishes
/// `deployment` (a desired state, schema 1) on the device's delta topic and
/// returns every message up to the ack of `job`, with the agent.
pub fn deploy_through_agent(
    cloud: &services::TestClient,
    config: &Path,
    device: &str,
    job: &str,
    deployment: serde_json::Value,
) -> (services::AgentProcess, Vec<services::Message>) {
    deploy_through_agent_with(cloud, config, &[], device, job, deployment)
}

/// Like [`deploy_through_agent`], the agent started with `env` (such as
/// `OTABOX_LOG`).
pub fn deploy_through_agent_with(
    cloud: &services::TestClient,
    config: &Path,
    env: &[(&str, &str)],
    device: &str,
    job: &str,
    deployment: serde_json::Value,
) -> (services::AgentProcess, Vec<services::Message>) {
    let wait = std::time::Duration::from_secs(60);
    let agent = services::AgentProcess::start_with_env(config, env);
    cloud.wait_for(wait, "the agent online", |m| {
        m.json
            .pointer("/state/reported/deployment/agent/state")
            .is_some()
    });
    cloud.publish(
        &format!("state/{device}/update/delta"),
        serde_json::json!({"version": 1, "state": {"deployment": deployment}}).to_string(),
    );
    let seen = cloud.collect_until(wait, "the ack", |m| {
        m.json.get("jobId").and_then(|j| j.as_str()) == Some(job) && m.json.get("status").is_some()
    });
    (agent, seen)
}

/// What `handler` lists as installed; panics when the call fails.
pub async fn inventory_of(handler: &Handler) -> Vec<otabox::runtime::InstalledItem> {
    handler
        .inventory()
        .await
        .expect("the inventory call")
        .expect("an inventory")
}

/// The text of a `failed` outcome; panics on anything else.
pub fn failure(outcome: Outcome) -> String {
    match outcome {
        Outcome::Failed(status) => status.message,
        other => panic!("expected a failure, got {other:?}"),
    }
}

/// The text of a `skipped` outcome (the hostile guest's success); panics
/// on anything else.
pub fn success(outcome: Outcome) -> String {
    match outcome {
        Outcome::Skipped(text) => text,
        other => panic!("expected success, got {other:?}"),
    }
}

/// Asserts the handler still serves a normal call.
pub async fn still_serves(handler: &Handler) {
    let outcome = act(handler, serde_json::json!({"action": "ok"}))
        .await
        .expect("a normal call after the fault");
    assert!(matches!(outcome, Outcome::Success), "{outcome:?}");
}

/// A device in `dir` with the `file` handler (its `/var/lib/otabox/files`
/// mounted at `dir/files`, and listed by inventory) and a `device.toml`
/// whose `[mqtt]` table gets the lines `mqtt` (further tables, such as
/// `[trust]`, may follow them); returns the config path.
pub fn file_device(dir: &Path, id: &str, mqtt: &str) -> PathBuf {
    install_handler(
        &dir.join("handlers"),
        "file",
        &built_wasm("file"),
        "otabox/file:1",
        "[[filesystem]]\npath = \"/var/lib/otabox/files\"\naccess = \"rw\"\n",
    );
    let config = dir.join("device.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"{id}\"\n[paths]\nhandlers = \"handlers\"\nstate = \"state\"\n\
             [mqtt]\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n{mqtt}\n\
             [handlers.file]\nconfig = {{ root = \"/var/lib/otabox/files\" }}\n\
             [handlers.file.mounts]\n\"/var/lib/otabox/files\" = \"files\"\n"
        ),
    )
    .expect("device.toml");
    config
}

/// Runs the built `otabox` binary with `args` (errors only in its log).
pub fn otabox(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_otabox"))
        .args(args)
        .env("OTABOX_LOG", "error")
        .output()
        .expect("run otabox")
}

/// What a command wrote, stdout then stderr.
pub fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
