//! A running agent and a changed handler directory: SIGHUP reloads the
//! handlers between jobs (a running job ends with the set it pinned, the
//! next uses the new one); a real agent process and mosquitto.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::services::{AgentProcess, Message, Mosquitto, TestClient};
use common::*;
use otabox::runtime::sha256_hex;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
const UPDATE: &str = "state/dev-1/update";
const DELTA: &str = "state/dev-1/update/delta";

/// A broker, a device in `root` whose `[paths] handlers` is `handlers`
/// (TOML) holding the hostile guest in `root/<first>` (serving
/// `otabox-test/hostile:1`), its agent online, and the cloud's client.
struct Rig {
    /// Bind it (not `..`), or the broker stops at once.
    _broker: Mosquitto,
    cloud: TestClient,
    agent: AgentProcess,
    config: PathBuf,
}

fn rig(root: &Path, first: &str, handlers: &str) -> Rig {
    install_handler(
        &root.join(first),
        "hostile",
        &built_wasm("hostile"),
        "otabox-test/hostile:1",
        &hostile_caps(root),
    );
    let broker = Mosquitto::start(&root.join("broker"));
    let config = write_config(root, broker.port, handlers);
    let cloud = TestClient::connect(broker.port, "cloud", &[UPDATE]);
    let agent = AgentProcess::start(&config);
    cloud.wait_for(WAIT, "the agent online", online);
    Rig {
        _broker: broker,
        cloud,
        agent,
        config,
    }
}

fn write_config(root: &Path, port: u16, handlers: &str) -> PathBuf {
    let config = root.join("device.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"dev-1\"\n[paths]\nhandlers = {handlers}\nstate = \"state\"\n\
             [mqtt]\nport = {port}\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n"
        ),
    )
    .expect("device.toml");
    config
}

/// A job of `update_type` counting applies in `root/<counter>`, each
/// taking `delay_ms`.
fn counting(root: &Path, version: u64, job: &str, update_type: &str, delay_ms: u64) -> String {
    let path = root.join(job).display().to_string();
    json!({"version": version, "state": {"deployment": {
        "schema": 1, "jobId": job, "version": job,
        "steps": [{"updateType": update_type,
                   "manifest": {"action": "count", "path": path, "delay_ms": delay_ms}}]
    }}})
    .to_string()
}

fn online(m: &Message) -> bool {
    m.json
        .pointer("/state/reported/deployment/agent/state")
        .is_some()
}

fn ack_of<'a>(job: &'a str) -> impl Fn(&Message) -> bool + 'a {
    move |m| {
        m.json.get("jobId").and_then(|j| j.as_str()) == Some(job) && m.json.get("status").is_some()
    }
}

/// Publishes `delta` and waits for the acknowledgement of `job`; its
/// status.
fn run_job(
    cloud: &TestClient,
    agent: &AgentProcess,
    delta: String,
    job: &str,
) -> serde_json::Value {
    cloud.publish(DELTA, delta);
    let ack = cloud.wait_for_or(WAIT, ack_of(job));
    let ack = ack.unwrap_or_else(|| panic!("no ack of {job}; agent log:\n{}", agent.log()));
    ack.json["status"].clone()
}

fn journal(root: &Path, job: &str) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(root.join(format!("state/jobs/{job}/journal.json"))).expect("journal"),
    )
    .expect("json")
}

/// Waits until the agent's log has `count` lines containing `text`.
fn wait_log(agent: &AgentProcess, text: &str, count: usize) {
    let deadline = Instant::now() + WAIT;
    while agent.log().matches(text).count() < count {
        assert!(Instant::now() < deadline, "no {text:?} in\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn hangup(agent: &AgentProcess) {
    let status = std::process::Command::new("kill")
        .args(["-HUP", &agent.pid().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
}

#[test]
fn sighup_loads_a_handler_installed_for_a_new_update_type_while_the_agent_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    std::fs::create_dir_all(root.join("local")).expect("local");
    let Rig {
        _broker,
        cloud,
        agent,
        ..
    } = rig(&root, "packaged", "[\"packaged\", \"local\"]");

    let delta = counting(&root, 1, "job-1", "otabox-test/counter:1", 0);
    let status = run_job(&cloud, &agent, delta, "job-1");
    assert_eq!(status, "FAILURE", "no handler serves it yet");

    // The integrator installs a handler for the new type into the bare
    // directory (no agent is told), then signals the agent.
    let manifest = install_handler(
        &root.join("src"),
        "counter",
        &built_wasm("hostile"),
        "otabox-test/counter:1",
        &hostile_caps(&root),
    );
    let local = root.join("local").display().to_string();
    let wasm = manifest.with_extension("wasm").display().to_string();
    let out = otabox(&[
        "handlers",
        "install",
        "--dir",
        &local,
        &wasm,
        &manifest.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    hangup(&agent);
    wait_log(
        &agent,
        "handlers reloaded on SIGHUP: 2 handler(s) (hostile, counter)",
        1,
    );

    let delta = counting(&root, 2, "job-2", "otabox-test/counter:1", 0);
    let status = run_job(&cloud, &agent, delta, "job-2");
    assert_eq!(status, "SUCCESS", "{}", agent.log());
    assert_eq!(
        std::fs::read_to_string(root.join("job-2")).expect("applied"),
        "applied\n"
    );
}

#[test]
fn a_reload_during_a_job_waits_for_it_and_the_next_job_uses_the_new_handler() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    // One directory as a plain string, as every config before.
    let Rig {
        _broker,
        cloud,
        agent,
        config,
    } = rig(&root, "handlers", "\"handlers\"");

    cloud.publish(
        DELTA,
        counting(&root, 1, "job-slow", "otabox-test/hostile:1", 3000),
    );
    cloud.wait_for(WAIT, "job-slow installing", |m| {
        m.json
            .pointer("/state/reported/deployment/agent/state")
            .and_then(|s| s.as_str())
            == Some("installing")
    });
    // A new build of the same handler, installed mid-job through the
    // config: the installer signals the running agent itself.
    let mut rebuilt = built_wasm("hostile");
    rebuilt.extend_from_slice(&[0x00, 13, 11]);
    rebuilt.extend_from_slice(b"otabox-testx");
    let manifest = install_handler(
        &root.join("src"),
        "hostile",
        &rebuilt,
        "otabox-test/hostile:1",
        &hostile_caps(&root),
    );
    let out = otabox(&[
        "handlers",
        "install",
        "--config",
        &config.display().to_string(),
        &manifest.with_extension("wasm").display().to_string(),
        &manifest.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("the running agent (pid {}) reloads", agent.pid())),
        "{}",
        text(&out)
    );
    hangup(&agent); // a second signal while the job runs changes nothing

    let ack = cloud.wait_for(WAIT, "job-slow's ack", ack_of("job-slow"));
    assert_eq!(ack.json["status"], "SUCCESS", "{}", agent.log());
    let old = sha256_hex(&built_wasm("hostile"));
    assert_eq!(journal(&root, "job-slow")["handler_sha256"], json!([old]));
    wait_log(&agent, "handlers reloaded on SIGHUP", 1);
    let log = agent.log();
    let finished = log.find("job finished").expect("job finished");
    let reloaded = log.find("handlers reloaded on SIGHUP").expect("reloaded");
    assert!(finished < reloaded, "the reload waited for the job:\n{log}");

    let delta = counting(&root, 2, "job-next", "otabox-test/hostile:1", 0);
    let status = run_job(&cloud, &agent, delta, "job-next");
    assert_eq!(status, "SUCCESS", "{}", agent.log());
    assert_eq!(
        journal(&root, "job-next")["handler_sha256"],
        json!([sha256_hex(&rebuilt)])
    );
    assert!(
        !log.contains("changed while the job was in progress"),
        "{log}"
    );
}
