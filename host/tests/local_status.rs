//! The device-side tools next to a running agent: `otabox status` while a
//! job runs and after (text and JSON), `handlers run-phase` refused while
//! an agent owns the state directory, and `otabox install`: a local
//! deployment journaled and run by the agent, reported on the broker (not
//! acknowledged), surviving an agent kill mid-job, refused as a delta
//! would be.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::services::{AgentProcess, Message, Mosquitto, TestClient};
use common::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const UPDATE: &str = "state/dev-1/update";
const DELTA: &str = "state/dev-1/update/delta";

/// A device `dev-1` with the hostile guest (its test folder granted),
/// `trust` lines appended to its config.
fn device(root: &Path, port: u16, trust: &str) -> PathBuf {
    install_handler(
        &root.join("handlers"),
        "hostile",
        &built_wasm("hostile"),
        "otabox-test/hostile:1",
        &hostile_caps(root),
    );
    let config = root.join("device.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"dev-1\"\n[paths]\nhandlers = \"handlers\"\nstate = \"state\"\n\
             [mqtt]\nport = {port}\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n{trust}"
        ),
    )
    .expect("device.toml");
    config
}

/// A job of one step counting its applies in `root/applies`, the apply
/// taking `delay_ms`.
fn counting(root: &Path, job: &str, delay_ms: u64) -> Value {
    json!({"schema": 1, "jobId": job, "version": "2.0",
           "steps": [{"updateType": "otabox-test/hostile:1",
                      "manifest": {"action": "count", "delay_ms": delay_ms,
                                   "path": root.join("applies").display().to_string()}}]})
}

fn applies(root: &Path) -> usize {
    std::fs::read_to_string(root.join("applies"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn status(config: &Path) -> String {
    let out = otabox(&["status", "--config", &config.display().to_string()]);
    assert!(out.status.success(), "{}", text(&out));
    text(&out)
}

fn status_json(config: &Path) -> Value {
    let out = otabox(&[
        "status",
        "--json",
        "--config",
        &config.display().to_string(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    serde_json::from_slice(&out.stdout).expect("status --json is JSON")
}

fn online(m: &Message) -> bool {
    m.json
        .pointer("/state/reported/deployment/agent/state")
        .is_some()
}

fn result_of<'a>(m: &'a Message, job: &str) -> Option<&'a Value> {
    m.json
        .pointer("/state/reported/deployment/lastResult")
        .filter(|r| r["jobId"] == job)
}

fn is_ack(m: &Message) -> bool {
    m.json.get("status").is_some() && m.json.get("jobId").is_some()
}

/// A broker, a device, a cloud client and the agent, online.
struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    _broker: Mosquitto,
    config: PathBuf,
    cloud: TestClient,
    agent: AgentProcess,
}

fn rig(trust: &str) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let broker = Mosquitto::start(&root.join("broker"));
    let config = device(&root, broker.port, trust);
    let cloud = TestClient::connect(broker.port, "cloud", &[UPDATE]);
    let agent = AgentProcess::start(&config);
    cloud.wait_for(WAIT, "the agent's online report", online);
    Rig {
        _dir: dir,
        root,
        _broker: broker,
        config,
        cloud,
        agent,
    }
}

#[test]
fn status_shows_the_running_job_then_its_result_in_text_and_json() {
    let Rig {
        _dir,
        root,
        _broker,
        config,
        cloud,
        mut agent,
    } = rig("");
    let idle = status(&config);
    assert!(
        idle.contains(&format!("running (pid {}), idle", agent.pid())),
        "{idle}"
    );
    assert!(
        idle.contains(&format!("connected to 127.0.0.1:{}", _broker.port)),
        "{idle}"
    );
    cloud.publish(
        DELTA,
        json!({"version": 1, "state": {"deployment": counting(&root, "job-slow", 3000)}})
            .to_string(),
    );
    cloud.wait_for(WAIT, "the installing report", |m| {
        m.agent_state() == Some("installing")
    });
    std::thread::sleep(Duration::from_millis(300));
    let busy = status(&config);
    assert!(busy.contains("installing"), "{busy}");
    assert!(
        busy.contains("job-slow (version 2.0): installing, step 1 of 1 (apply)"),
        "{busy}"
    );
    let busy = status_json(&config);
    assert_eq!(busy["agent"]["running"], true, "{busy}");
    assert_eq!(busy["agent"]["state"], "installing", "{busy}");
    assert_eq!(busy["job"]["jobId"], "job-slow", "{busy}");
    assert_eq!(busy["job"]["stage"], "apply", "{busy}");
    assert_eq!(busy["broker"]["connected"], true, "{busy}");

    cloud.wait_for(WAIT, "the ack", is_ack);
    let done = status(&config);
    assert!(done.contains("job          -"), "{done}");
    assert!(
        done.contains("last result  job-slow SUCCESS (succeeded)"),
        "{done}"
    );
    assert!(done.contains("otabox-test/hostile:1"), "{done}");
    let done = status_json(&config);
    assert_eq!(done["lastResult"]["jobId"], "job-slow", "{done}");
    assert_eq!(done["runningVersion"], "2.0", "{done}");
    assert_eq!(done["job"], Value::Null, "{done}");

    agent.kill();
    let stopped = status(&config);
    assert!(stopped.contains("not running"), "{stopped}");
    assert!(stopped.contains("(when the agent last ran)"), "{stopped}");
    assert_eq!(status_json(&config)["agent"]["state"], "stopped");
    assert_eq!(applies(&root), 1);
}

#[test]
fn status_reports_a_broker_it_cannot_reach_and_the_reports_waiting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let port = common::services::free_port();
    let config = device(&root, port, "");
    let _agent = AgentProcess::start(&config);
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = status_json(&config);
    while seen["broker"].is_null() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        seen = status_json(&config);
    }
    assert_eq!(seen["broker"]["connected"], false, "{seen}");
    assert_eq!(
        seen["broker"]["broker"],
        format!("127.0.0.1:{port}"),
        "{seen}"
    );
    assert!(
        seen["broker"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("refused")),
        "{seen}"
    );
    let pending = seen["pendingReports"].as_array().expect("a list");
    assert!(
        pending
            .iter()
            .any(|k| k.as_str().is_some_and(|k| k.starts_with("online:"))),
        "the online report waits for the broker: {seen}"
    );
    let text = status(&config);
    assert!(
        text.contains(&format!("not connected to 127.0.0.1:{port} since")),
        "{text}"
    );
    assert!(text.contains("1 report(s): online:"), "{text}");
}

#[test]
fn run_phase_is_refused_while_an_agent_owns_the_state_directory() {
    let Rig {
        _dir,
        root,
        _broker,
        config,
        cloud: _cloud,
        mut agent,
    } = rig("");
    let manifest =
        json!({"action": "count", "path": root.join("applies").display().to_string()}).to_string();
    let config_arg = config.display().to_string();
    let args = [
        "handlers",
        "run-phase",
        "--config",
        &config_arg,
        "--handler",
        "hostile",
        "--phase",
        "apply",
        "--manifest",
        &manifest,
    ];
    let out = otabox(&args);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains(&format!(
            "an agent (pid {}) owns the state directory",
            agent.pid()
        )),
        "{t}"
    );
    assert!(t.contains("otabox install DEPLOYMENT.json"), "{t}");
    assert_eq!(applies(&root), 0, "nothing ran behind the agent's back");

    agent.kill();
    let out = otabox(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(applies(&root), 1, "without an agent run-phase works");
}

/// Writes `deployment` to `root/<name>` and returns its path.
fn deployment_file(root: &Path, name: &str, deployment: &Value) -> String {
    let path = root.join(name);
    std::fs::write(&path, deployment.to_string()).expect("deployment file");
    path.display().to_string()
}

#[test]
fn a_local_install_is_journaled_run_and_reported_but_not_acknowledged() {
    let Rig {
        _dir,
        root,
        _broker,
        config,
        cloud,
        agent,
    } = rig("");
    let config_arg = config.display().to_string();
    let file = deployment_file(&root, "local.json", &counting(&root, "local-1", 0));
    let out = otabox(&["install", "--config", &config_arg, &file]);
    let t = text(&out);
    assert!(out.status.success(), "{t}\n{}", agent.log());
    assert!(t.contains("queued local-1 for the agent (pid"), "{t}");
    assert!(
        t.contains("local-1 SUCCESS (succeeded, local)"),
        "the result is printed: {t}"
    );
    assert_eq!(applies(&root), 1);
    let mut seen = cloud.collect_until(WAIT, "the local job's result", |m| {
        result_of(m, "local-1").is_some()
    });
    let result = result_of(seen.last().expect("result"), "local-1")
        .expect("result")
        .clone();
    assert_eq!(result["local"], true, "{result}");
    assert_eq!(result["status"], "SUCCESS", "{result}");
    seen.extend(cloud.drain(Duration::from_millis(1500)));
    assert!(
        !seen.iter().any(is_ack),
        "a local job is not acknowledged: {seen:?}"
    );
    let record: Value = serde_json::from_slice(
        &std::fs::read(root.join("state/jobs/local-1/journal.json")).expect("journaled"),
    )
    .expect("json");
    assert_eq!(record["local"], true, "{record}");
    assert_eq!(record["phase"]["result"], "succeeded", "{record}");
    let state = root.join("state");
    assert_eq!(
        std::fs::read_dir(state.join("inbox"))
            .expect("inbox")
            .count(),
        0,
        "the request is gone once journaled"
    );

    // The same job id again: a job id runs at most once.
    let out = otabox(&["install", "--config", &config_arg, &file]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("ran already"), "{}", text(&out));

    // The cloud's next delta is not taken for stale: the local job left the
    // shadow version alone.
    cloud.publish(
        DELTA,
        json!({"version": 1, "state": {"deployment": counting(&root, "cloud-1", 0)}}).to_string(),
    );
    let ack = cloud.wait_for(WAIT, "the cloud job's ack", is_ack);
    assert_eq!(ack.json["jobId"], "cloud-1", "{}", agent.log());
    assert_eq!(ack.json["status"], "SUCCESS", "{}", agent.log());

    // --no-wait returns once queued; the job runs all the same.
    let file = deployment_file(&root, "local2.json", &counting(&root, "local-2", 0));
    let out = otabox(&["install", "--no-wait", "--config", &config_arg, &file]);
    assert!(out.status.success(), "{}", text(&out));
    let seen = cloud.wait_for(WAIT, "local-2's result", |m| {
        result_of(m, "local-2").is_some()
    });
    let result = result_of(&seen, "local-2").expect("result");
    assert_eq!(result["status"], "SUCCESS", "{result}");
}

#[test]
fn a_local_job_survives_an_agent_kill_mid_job() {
    let Rig {
        _dir,
        root,
        _broker,
        config,
        cloud,
        mut agent,
    } = rig("");
    let config_arg = config.display().to_string();
    let file = deployment_file(&root, "local.json", &counting(&root, "local-kill", 4000));
    let out = otabox(&["install", "--no-wait", "--config", &config_arg, &file]);
    assert!(out.status.success(), "{}", text(&out));
    cloud.wait_for(WAIT, "the installing report", |m| {
        m.agent_state() == Some("installing")
    });
    let busy = status_json(&config);
    assert_eq!(busy["job"]["jobId"], "local-kill", "{busy}");
    assert_eq!(busy["job"]["local"], true, "{busy}");
    agent.kill();
    let stopped = status_json(&config);
    assert_eq!(stopped["agent"]["running"], false, "{stopped}");
    assert_eq!(
        stopped["job"]["jobId"], "local-kill",
        "journaled: {stopped}"
    );

    let again = AgentProcess::start(&config);
    let seen = cloud.collect_until(WAIT, "the result after the restart", |m| {
        result_of(m, "local-kill").is_some()
    });
    let result = result_of(seen.last().expect("result"), "local-kill").expect("result");
    assert_eq!(result["local"], true, "{result}");
    assert!(
        result["result"].is_string() && result["status"].is_string(),
        "one terminal state: {result}\n{}",
        again.log()
    );
    assert!(applies(&root) <= 1, "applied at most once");
    let more = cloud.drain(Duration::from_millis(1500));
    assert!(!more.iter().any(is_ack), "not acknowledged: {more:?}");
    let after = status(&config);
    assert!(after.contains("last result  local-kill"), "{after}");
    assert!(after.contains("pending      -"), "{after}");
}

#[test]
fn a_local_install_is_refused_as_a_delta_would_be_and_without_an_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let keys = root.join("keys");
    let out = otabox(&[
        "keygen",
        "--out",
        &keys.display().to_string(),
        "--name",
        "a",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let key = String::from_utf8_lossy(&out.stdout).trim().to_string();
    std::fs::write(
        root.join("root.json"),
        json!({"version": 1, "threshold": 1, "keys": [key]}).to_string(),
    )
    .expect("root.json");
    let trust = format!("[trust]\nroot = \"{}\"\n", root.join("root.json").display());
    let broker = Mosquitto::start(&root.join("broker"));
    let config = device(&root, broker.port, &trust);
    let config_arg = config.display().to_string();
    let file = deployment_file(&root, "unsigned.json", &counting(&root, "local-u", 0));

    let out = otabox(&["install", "--config", &config_arg, &file]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("no agent is running on the state directory"),
        "{t}"
    );
    assert!(t.contains("nothing was queued"), "{t}");
    assert!(!root.join("state/inbox/local-u.json").exists());

    let cloud = TestClient::connect(broker.port, "cloud", &[UPDATE]);
    let agent = AgentProcess::start(&config);
    cloud.wait_for(WAIT, "the agent's online report", online);
    let out = otabox(&["install", "--config", &config_arg, &file]);
    let t = text(&out);
    assert!(!out.status.success(), "{t}");
    assert!(
        t.contains("refused: untrusted deployment: this device accepts signed deployments only"),
        "the agent applies its trust rules: {t}\n{}",
        agent.log()
    );
    let rejected = cloud.wait_for(WAIT, "the rejection report", |m| {
        m.json
            .pointer("/state/reported/deployment/lastRejected/jobId")
            .is_some()
    });
    assert_eq!(
        rejected.json["state"]["reported"]["deployment"]["lastRejected"]["jobId"],
        "local-u"
    );
    assert!(
        !root.join("state/jobs/local-u").exists(),
        "nothing journaled"
    );
    assert_eq!(applies(&root), 0);

    // Signed for this device, it is accepted.
    let out = otabox(&[
        "sign",
        "--key",
        &keys.join("a.key").display().to_string(),
        "--sequence",
        "1",
        "--device",
        "dev-1",
        &file,
    ]);
    assert!(out.status.success(), "{}", text(&out));
    std::fs::write(root.join("signed.json"), &out.stdout).expect("signed");
    let out = otabox(&[
        "install",
        "--config",
        &config_arg,
        &root.join("signed.json").display().to_string(),
    ]);
    assert!(out.status.success(), "{}\n{}", text(&out), agent.log());
    assert_eq!(applies(&root), 1);

    // Malformed: refused before anything is queued.
    let bad = deployment_file(
        &root,
        "bad.json",
        &json!({"schema": 1, "jobId": "x", "version": "1", "steps": [], "extra": 1}),
    );
    let out = otabox(&["install", "--config", &config_arg, &bad]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("is not a valid deployment"),
        "{}",
        text(&out)
    );
    assert!(!root.join("state/inbox/x.json").exists());
}

#[test]
fn the_trust_examples_verify() {
    let trust = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/trust");
    let path = |name: &str| trust.join(name).display().to_string();
    let out = otabox(&[
        "verify",
        "--root",
        &path("root.json"),
        "--rotation",
        &path("root-2.signed.json"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("rotation to root version 2 (1 of 2 keys) is valid"));
    let out = otabox(&[
        "verify",
        "--root",
        &path("root-2.json"),
        "--device",
        "pump-0042",
        &path("deployment-rotating.signed.json"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("valid: job deploy-43 sequence 7"),
        "{}",
        text(&out)
    );
    // Under the first root, the rotation the deployment carries applies,
    // as on the device.
    let out = otabox(&[
        "verify",
        "--root",
        &path("root.json"),
        "--device",
        "pump-0042",
        &path("deployment-rotating.signed.json"),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("valid: job deploy-43 sequence 7")
            && text(&out).contains("rotated by the deployment"),
        "{}",
        text(&out)
    );
    let next: Value =
        serde_json::from_slice(&std::fs::read(path("root-2.json")).expect("root-2")).expect("json");
    let signed: Value =
        serde_json::from_slice(&std::fs::read(path("root-2.signed.json")).expect("rotation"))
            .expect("json");
    assert_eq!(signed["signed"], next, "the signed rotation is root-2.json");
    let deployment: Value = serde_json::from_slice(
        &std::fs::read(path("deployment-rotating.signed.json")).expect("deployment"),
    )
    .expect("json");
    assert_eq!(deployment["rootRotations"][0], signed);
}
