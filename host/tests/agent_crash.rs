//! The agent stopped dead at every journal point: after a restart each job
//! ends in exactly one terminal state, acknowledged once, applied at most
//! once, and every state file parses. A job that keeps killing the agent
//! is failed by the loop breaker.

mod common;

use std::path::Path;
use std::time::Duration;

use common::services::{AgentProcess, Message, Mosquitto, TestClient};
use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// A counting job whose apply takes `delay_ms`.
fn slow_delta(root: &Path, delay_ms: u64) -> String {
    json!({"version": 1, "state": {"deployment": {
        "schema": 1, "jobId": "job-crash", "version": "2.0",
        "steps": [{"updateType": "otabox-test/hostile:1",
                   "manifest": {"action": "count", "path": root.join("applies").display().to_string(), "delay_ms": delay_ms}}]
    }}})
    .to_string()
}
const UPDATE: &str = "state/dev-1/update";
const DELTA: &str = "state/dev-1/update/delta";

/// Every journal write a job passes, in order.
const POINTS: &[&str] = &[
    "journal:accepted",
    "journal:validating",
    "journal:downloading",
    "journal:installing:backup",
    "journal:installing:install",
    "journal:installing:apply",
    "journal:installing:verify",
    "journal:installing:commit",
    "journal:done",
    "journal:done:reported",
];

fn device(root: &Path, port: u16) -> std::path::PathBuf {
    device_with(root, port, "")
}

/// A device whose `[device]` table gets `extra` lines.
fn device_with(root: &Path, port: u16, extra: &str) -> std::path::PathBuf {
    let caps = hostile_caps(root);
    install_handler(
        &root.join("handlers"),
        "hostile",
        &built_wasm("hostile"),
        "otabox-test/hostile:1",
        &caps,
    );
    let config = root.join("device.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"dev-1\"\n{extra}\n[paths]\nhandlers = \"handlers\"\nstate = \"state\"\n\
             [mqtt]\nport = {port}\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n"
        ),
    )
    .expect("device.toml");
    config
}

/// A plain device with the hostile handler, its agent running and online.
struct Rig {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    _broker: Mosquitto,
    cloud: TestClient,
    agent: AgentProcess,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let broker = Mosquitto::start(&root.join("broker"));
    let config = device(&root, broker.port);
    let cloud = TestClient::connect(broker.port, "cloud", &[UPDATE]);
    let agent = AgentProcess::start(&config);
    cloud.wait_for(WAIT, "the agent's online report", online);
    Rig {
        _dir: dir,
        root,
        _broker: broker,
        cloud,
        agent,
    }
}

fn counting_delta(root: &Path) -> String {
    json!({"version": 1, "state": {"deployment": {
        "schema": 1, "jobId": "job-crash", "version": "2.0",
        "steps": [{"updateType": "otabox-test/hostile:1",
                   "manifest": {"action": "count", "path": root.join("applies").display().to_string()}}]
    }}})
    .to_string()
}

fn is_ack(m: &Message) -> bool {
    m.json.get("jobId").and_then(|j| j.as_str()) == Some("job-crash")
        && m.json.get("status").is_some()
}

fn online(m: &Message) -> bool {
    m.json
        .pointer("/state/reported/deployment/agent/state")
        .is_some()
}

/// Every JSON state file under `state` parses.
fn assert_state_parses(state: &Path) {
    let mut files = vec![state.join("shadow.json")];
    for sub in ["jobs", "outbox"] {
        for entry in std::fs::read_dir(state.join(sub))
            .expect("state dir")
            .flatten()
        {
            let path = entry.path();
            files.push(if path.is_dir() {
                path.join("journal.json")
            } else {
                path
            });
        }
    }
    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|x| x == "json") && f.exists())
    {
        let bytes = std::fs::read(file).expect("read state");
        serde_json::from_slice::<serde_json::Value>(&bytes)
            .unwrap_or_else(|e| panic!("{} does not parse: {e}", file.display()));
    }
}

fn applies(root: &Path) -> usize {
    std::fs::read_to_string(root.join("applies"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

#[test]
fn a_kill_at_every_journal_point_ends_each_job_exactly_once() {
    for point in POINTS {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        let _broker = Mosquitto::start(&root.join("broker"));
        let port = _broker.port;
        let config = device(&root, port);
        let cloud = TestClient::connect(port, "cloud", &[UPDATE]);
        let mut first = AgentProcess::start_with_env(&config, &[("OTABOX_FAILPOINT", point)]);
        cloud.wait_for(WAIT, "the agent's online report", online);
        cloud.publish(DELTA, counting_delta(&root));
        assert!(
            first.wait_exit(WAIT),
            "{point}: the failpoint was not reached\n{}",
            first.log()
        );
        assert_state_parses(&root.join("state"));

        let second = AgentProcess::start(&config);
        let ack = cloud.wait_for(WAIT, "the ack after restart", is_ack);
        let more: Vec<Message> = cloud
            .drain(Duration::from_millis(1500))
            .into_iter()
            .filter(is_ack)
            .collect();
        assert!(
            more.is_empty(),
            "{point}: acknowledged more than once: {ack:?} {more:?}"
        );
        let n = applies(&root);
        assert!(n <= 1, "{point}: applied {n} times\n{}", second.log());
        if ack.json["status"] == "SUCCESS" {
            assert_eq!(n, 1, "{point}: SUCCESS without an apply\n{}", second.log());
        }
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(root.join("state/jobs/job-crash/journal.json")).expect("journal"),
        )
        .expect("parses");
        assert_eq!(record["phase"]["phase"], "done", "{point}: {record}");
        assert_eq!(record["reported"], true, "{point}");
        assert_state_parses(&root.join("state"));
        eprintln!("{point}: {} after restart, applies {n}", ack.json["status"]);
    }
}

#[test]
fn the_loop_breaker_fails_a_job_that_keeps_killing_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let broker = Mosquitto::start(&root.join("broker"));
    let config = device(&root, broker.port);
    let cloud = TestClient::connect(broker.port, "cloud", &[UPDATE]);
    let mut agent =
        AgentProcess::start_with_env(&config, &[("OTABOX_FAILPOINT", "journal:validating")]);
    cloud.wait_for(WAIT, "the agent's online report", online);
    cloud.publish(DELTA, counting_delta(&root));
    for start in 0..4 {
        assert!(
            agent.wait_exit(WAIT),
            "start {start} did not crash\n{}",
            agent.log()
        );
        agent =
            AgentProcess::start_with_env(&config, &[("OTABOX_FAILPOINT", "journal:validating")]);
    }
    let ack = cloud
        .wait_for_or(WAIT, is_ack)
        .unwrap_or_else(|| panic!("no ack from the loop breaker\n{}", agent.log()));
    assert_eq!(ack.json["status"], "FAILURE", "{}", agent.log());
    assert_eq!(applies(&root), 0);
    assert!(agent.log().contains("giving up"), "{}", agent.log());
}

/// A persistent broker (sessions survive a restart; saved every second
/// too, for a broker killed outright), a device, a cloud client with a
/// persistent session, and the agent running the slow counting job, its
/// `installing` report seen.
struct Outage {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    broker: Mosquitto,
    cloud: TestClient,
    agent: AgentProcess,
}

impl Outage {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        let port = common::services::free_port();
        let broker = Mosquitto::start_with(
            &root.join("broker"),
            port,
            &format!(
                "allow_anonymous true\npersistence true\nautosave_interval 1\npersistence_location {}/\n",
                root.join("broker").display()
            ),
        );
        let config = device(&root, port);
        let mut opts = rumqttc::MqttOptions::new("cloud", "127.0.0.1", port);
        opts.set_clean_session(false);
        let cloud = TestClient::connect_with(opts, &[UPDATE]);
        let agent = AgentProcess::start(&config);
        cloud.wait_for(WAIT, "the agent's online report", online);
        // The cloud's subscription is in the broker's saved state.
        std::thread::sleep(Duration::from_millis(1500));
        cloud.publish(DELTA, slow_delta(&root, 2500));
        cloud.wait_for(WAIT, "the installing report", |m| {
            m.agent_state() == Some("installing")
        });
        Self {
            _dir: dir,
            root,
            broker,
            cloud,
            agent,
        }
    }

    /// After the broker is back: the job's result report and its ack each
    /// arrive once, in order, whole, and the ack says SUCCESS.
    fn assert_reports_arrive_once(&self) {
        let (agent, broker) = (&self.agent, &self.broker);
        let mut seen = self
            .cloud
            .try_collect_until(WAIT, is_ack)
            .unwrap_or_else(|seen| {
                panic!(
                    "timed out waiting for the ack after the outage; saw {seen:?}\n\
                 agent:\n{}\nbroker:\n{}",
                    agent.log(),
                    broker.log()
                )
            });
        seen.extend(self.cloud.drain(Duration::from_millis(1500)));
        let kinds: Vec<&str> = seen
            .iter()
            .filter_map(|m| {
                if is_ack(m) {
                    Some("ack")
                } else if m
                    .json
                    .pointer("/state/reported/deployment/lastResult/jobId")
                    .and_then(|j| j.as_str())
                    == Some("job-crash")
                {
                    Some("result")
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(
            kinds,
            ["result", "ack"],
            "each report once, in order: {seen:?}\n{}",
            agent.log()
        );
        let ack = seen.iter().find(|m| is_ack(m)).expect("ack");
        assert_eq!(ack.json["status"], "SUCCESS", "{}", agent.log());
        let log = agent.log();
        for wrong in ["dropped the connection", "reports are limited"] {
            assert!(
                !log.contains(wrong),
                "an outage taken for a refusal:\n{log}"
            );
        }
    }
}

#[test]
fn a_broker_outage_mid_job_delays_reports_but_loses_or_repeats_none() {
    let mut outage = Outage::start();
    outage.broker.stop_gracefully();
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(
        applies(&outage.root),
        1,
        "the job went on while the broker was down\n{}",
        outage.agent.log()
    );
    outage.broker.start_again();
    outage.assert_reports_arrive_once();
}

#[test]
fn a_report_in_flight_when_the_broker_dies_arrives_whole_after_it_returns() {
    let mut outage = Outage::start();
    // Frozen, the broker takes the job's next reports into its socket
    // without acknowledging them; killed, it drops the connection with
    // one in flight, and refuses the agent's reconnects for a while.
    outage.broker.freeze();
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(applies(&outage.root), 1, "{}", outage.agent.log());
    outage.broker.stop();
    std::thread::sleep(Duration::from_millis(2500));
    let log = outage.agent.log();
    assert!(
        log.contains("connection lost"),
        "the agent never saw the broker go: {log}"
    );
    outage.broker.start_again();
    outage.assert_reports_arrive_once();
}

#[test]
fn a_new_deployment_cancels_the_running_one_through_cancel_requested() {
    let Rig {
        _dir,
        root,
        _broker,
        cloud,
        agent,
        ..
    } = rig();
    let job = |version: u64, id: &str, manifest: serde_json::Value| {
        json!({"version": version, "state": {"deployment": {
            "schema": 1, "jobId": id, "version": id,
            "steps": [{"updateType": "otabox-test/hostile:1", "manifest": manifest}]}}})
        .to_string()
    };
    cloud.publish(
        DELTA,
        job(
            1,
            "job-long",
            json!({"action": "wait-cancel", "max_ms": 15000}),
        ),
    );
    cloud.wait_for(WAIT, "job-long installing", |m| {
        m.agent_state() == Some("installing")
    });
    let counter = root.join("applies").display().to_string();
    cloud.publish(
        DELTA,
        job(2, "job-next", json!({"action": "count", "path": counter})),
    );
    let first = cloud.wait_for(WAIT, "job-long's ack", |m| {
        m.json.get("jobId").and_then(|j| j.as_str()) == Some("job-long")
    });
    assert_eq!(first.json["status"], "FAILURE", "{}", agent.log());
    let next = cloud.wait_for(WAIT, "job-next's ack", |m| {
        m.json.get("jobId").and_then(|j| j.as_str()) == Some("job-next")
    });
    assert_eq!(next.json["status"], "SUCCESS", "{}", agent.log());
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("state/jobs/job-long/journal.json")).expect("journal"),
    )
    .expect("json");
    assert_eq!(record["phase"]["result"], "cancelled", "{record}");
}

/// A two-step job: a step asking for `mode` at apply, then a counting step.
fn reboot_job(root: &Path, mode: &str) -> String {
    json!({"version": 1, "state": {"deployment": {
        "schema": 1, "jobId": "job-crash", "version": "4.0",
        "steps": [
            {"updateType": "otabox-test/hostile:1",
             "manifest": {"action": "reboot", "mode": mode, "marker": root.join("verified").display().to_string()}},
            {"updateType": "otabox-test/hostile:1",
             "manifest": {"action": "count", "path": root.join("applies").display().to_string()}}]
    }}})
    .to_string()
}

/// A device that got a reboot job and reported reboot-pending; the boot id
/// comes from a file the test changes to simulate the reboot.
struct RebootRig {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    boot_id: std::path::PathBuf,
    _broker: Mosquitto,
    config: std::path::PathBuf,
    cloud: TestClient,
    env: [(&'static str, String); 1],
    agent: AgentProcess,
}

fn reboot_rig(mode: &str) -> RebootRig {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let boot_id = root.join("boot_id");
    std::fs::write(&boot_id, "boot-1\n").expect("boot id");
    let broker = Mosquitto::start(&root.join("broker"));
    let reboot = format!(
        "reboot_command = [\"/usr/bin/touch\", \"{}\"]",
        root.join("rebooted").display()
    );
    let config = device_with(&root, broker.port, &reboot);
    let cloud = TestClient::connect(broker.port, "cloud", &[UPDATE]);
    let env = [("OTABOX_BOOT_ID_FILE", boot_id.display().to_string())];
    let agent = start_env(&config, &env);
    cloud.wait_for(WAIT, "the agent's online report", online);
    cloud.publish(DELTA, reboot_job(&root, mode));
    cloud.wait_for(WAIT, "the reboot-pending report", |m| {
        m.agent_state() == Some("reboot-pending")
    });
    RebootRig {
        _dir: dir,
        root,
        boot_id,
        _broker: broker,
        config,
        cloud,
        env,
        agent,
    }
}

fn start_env(config: &Path, env: &[(&'static str, String); 1]) -> AgentProcess {
    AgentProcess::start_with_env(config, &[(env[0].0, env[0].1.as_str())])
}

fn verified(root: &Path) -> usize {
    std::fs::read_to_string(root.join("verified"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

fn job_phase(root: &Path) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(root.join("state/jobs/job-crash/journal.json")).expect("journal"),
    )
    .expect("json")
}

#[test]
fn an_immediate_reboot_is_confirmed_by_boot_id_before_verify_and_commit() {
    let RebootRig {
        _dir,
        root,
        boot_id,
        _broker,
        config,
        cloud,
        env,
        mut agent,
    } = reboot_rig("immediate");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !root.join("rebooted").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        root.join("rebooted").exists(),
        "the reboot command did not run\n{}",
        agent.log()
    );
    assert_eq!(
        applies(&root),
        1,
        "the second step installs before the single reboot"
    );
    assert_eq!(verified(&root), 0, "verify waits for the reboot");
    assert_eq!(job_phase(&root)["phase"]["phase"], "awaiting-reboot");

    agent.kill();
    let mut same_boot = start_env(&config, &env);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        verified(&root),
        0,
        "a restart without a reboot must not verify\n{}",
        same_boot.log()
    );
    same_boot.kill();

    std::fs::write(&boot_id, "boot-2\n").expect("new boot id");
    let after = start_env(&config, &env);
    let ack = cloud.wait_for(WAIT, "the ack after the reboot", is_ack);
    assert_eq!(ack.json["status"], "SUCCESS", "{}", after.log());
    assert_eq!(verified(&root), 1);
    assert_eq!(applies(&root), 1);
    assert_eq!(job_phase(&root)["phase"]["result"], "succeeded");
}

#[test]
fn a_deferred_reboot_waits_without_running_the_reboot_command() {
    let RebootRig {
        _dir,
        root,
        boot_id,
        _broker,
        config,
        cloud,
        env,
        mut agent,
    } = reboot_rig("deferred");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !root.join("rebooted").exists(),
        "a deferred reboot must not be started by the agent"
    );
    assert_eq!(job_phase(&root)["phase"]["deferred"], true);
    agent.kill();
    std::fs::write(&boot_id, "boot-2\n").expect("the operator rebooted");
    let after = start_env(&config, &env);
    let ack = cloud.wait_for(WAIT, "the ack after the deferred reboot", is_ack);
    assert_eq!(ack.json["status"], "SUCCESS", "{}", after.log());
    assert_eq!(verified(&root), 1);
}

#[test]
fn an_agent_restart_request_restarts_the_agent_and_completes_the_job() {
    let Rig {
        _dir,
        root,
        _broker,
        cloud,
        agent,
        ..
    } = rig();
    cloud.publish(DELTA, reboot_job(&root, "restart"));
    let ack = cloud.wait_for(WAIT, "the ack after the restart", is_ack);
    assert_eq!(ack.json["status"], "SUCCESS", "{}", agent.log());
    assert_eq!(verified(&root), 1);
    assert_eq!(applies(&root), 1);
    assert_eq!(
        agent.log().matches("agent 0.1.0 started").count(),
        2,
        "{}",
        agent.log()
    );
}

#[test]
fn an_explicit_cancel_stops_the_running_job() {
    let Rig {
        _dir,
        root,
        _broker,
        cloud,
        agent,
        ..
    } = rig();
    let job = |version: u64, cancel: bool| {
        json!({"version": version, "state": {"deployment": {
            "schema": 1, "jobId": "job-long", "version": "9", "cancel": cancel,
            "steps": [{"updateType": "otabox-test/hostile:1", "manifest": {"action": "wait-cancel", "max_ms": 15000}}]}}})
        .to_string()
    };
    cloud.publish(DELTA, job(1, false));
    cloud.wait_for(WAIT, "job-long installing", |m| {
        m.agent_state() == Some("installing")
    });
    let started = std::time::Instant::now();
    cloud.publish(DELTA, job(2, true));
    let ack = cloud.wait_for(WAIT, "job-long's ack", |m| {
        m.json.get("jobId").and_then(|j| j.as_str()) == Some("job-long")
    });
    assert_eq!(ack.json["status"], "FAILURE", "{}", agent.log());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the cancel took {:?}",
        started.elapsed()
    );
    assert_eq!(
        job_phase_of(&root, "job-long")["phase"]["result"],
        "cancelled"
    );
}

fn job_phase_of(root: &Path, job: &str) -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(root.join(format!("state/jobs/{job}/journal.json"))).expect("journal"),
    )
    .expect("json")
}

#[test]
fn a_job_resumed_after_a_handler_upgrade_is_failed_explicitly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let broker = Mosquitto::start(&root.join("broker"));
    let config = device(&root, broker.port);
    let cloud = TestClient::connect(broker.port, "cloud", &[UPDATE]);
    let mut first = AgentProcess::start_with_env(
        &config,
        &[("OTABOX_FAILPOINT", "journal:installing:install")],
    );
    cloud.wait_for(WAIT, "the agent's online report", online);
    cloud.publish(DELTA, counting_delta(&root));
    assert!(
        first.wait_exit(WAIT),
        "the failpoint was not reached\n{}",
        first.log()
    );

    // A new build of the handler: the same code with a custom section added.
    let mut upgraded = built_wasm("hostile");
    upgraded.extend_from_slice(&[0x00, 13, 11]);
    upgraded.extend_from_slice(b"otabox-testx");
    let caps = hostile_caps(&root);
    install_handler(
        &root.join("handlers"),
        "hostile",
        &upgraded,
        "otabox-test/hostile:1",
        &caps,
    );

    let second = AgentProcess::start(&config);
    let seen = cloud.collect_until(WAIT, "the ack after the upgrade", is_ack);
    assert_eq!(
        seen.last().expect("ack").json["status"],
        "FAILURE",
        "{}",
        second.log()
    );
    let result = seen
        .iter()
        .find_map(|m| m.json.pointer("/state/reported/deployment/lastResult"))
        .unwrap_or_else(|| panic!("no result: {seen:?}"));
    assert_eq!(result["result"], "failed-inconsistent", "{result}");
    assert!(
        result["message"]
            .as_str()
            .unwrap_or_default()
            .contains("changed while the job was in progress"),
        "{result}"
    );
}
