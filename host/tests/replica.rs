//! The reference replica with real agents: `otabox fleet` deploys to a
//! group, the replica publishes deltas, records reports and acks and
//! confirms them on `accepted`; a device that was offline gets its delta
//! when it comes online; a rejected deployment is not sent again, and
//! `fleet status` says what became of each deployment and why.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::services::{AgentProcess, Mosquitto, ReplicaProcess, TestClient, fleet};
use common::*;
use otabox::runtime::sha256_hex;
use serde_json::json;

/// A scratch directory (and its canonical path) with a broker and the
/// replica on `replica.db` there, started with `args`.
fn start_cloud(
    args: &[&str],
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Mosquitto,
    std::path::PathBuf,
    ReplicaProcess,
) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let broker = Mosquitto::start(&root.join("broker"));
    let db = root.join("replica.db");
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let replica = ReplicaProcess::start_with(&db, broker.port, &args);
    (dir, root, broker, db, replica)
}

fn device(root: &Path, id: &str, port: u16) -> std::path::PathBuf {
    device_with(root, id, port, "")
}

/// A device whose `[mqtt]` table gets `extra` lines.
fn device_with(root: &Path, id: &str, port: u16, extra: &str) -> std::path::PathBuf {
    file_device(&root.join(id), id, &format!("port = {port}\n{extra}"))
}

/// Polls `fleet status` until `device` has an ack for the desired job.
fn wait_for_ack(db: &Path, device: &str, replica: &ReplicaProcess) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status: serde_json::Value =
            serde_json::from_str(&fleet(db, &["status", "--device", device, "--json"]))
                .expect("status json");
        if !status[0]["ack"].is_null() {
            return status[0].clone();
        }
        assert!(
            Instant::now() < deadline,
            "no ack from {device}: {status}\n{}",
            replica.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn fleet_deploys_through_the_replica_to_online_and_offline_devices() {
    let (_dir, root, broker, db, replica) = start_cloud(&[]);
    let cloud = TestClient::connect(broker.port, "observer", &["state/+/update/accepted"]);
    let first = AgentProcess::start(&device(&root, "pump-1", broker.port));
    cloud.wait_for(
        Duration::from_secs(20),
        "pump-1 online (confirmed by the replica)",
        |m| m.topic == "state/pump-1/update/accepted",
    );

    fleet(&db, &["register", "pump-1", "--group", "pumps"]);
    fleet(&db, &["register", "pump-2", "--group", "pumps"]);
    let payload = root.join("app.conf");
    std::fs::write(&payload, "fleet = 1\n").expect("payload");
    let deployment = root.join("deployment.json");
    std::fs::write(
        &deployment,
        json!({"schema": 1, "jobId": "fleet-1", "version": "5.0",
               "steps": [{"updateType": "otabox/file:1",
                 "manifest": {"name": "app", "version": "5", "payload": "app.conf", "destination": "/var/lib/otabox/files/app.conf"},
                 "files": [{"name": "app.conf", "url": format!("file://{}", payload.display()), "size": 10, "sha256": sha256_hex(b"fleet = 1\n")}]}]})
        .to_string(),
    )
    .expect("deployment");
    let out = fleet(
        &db,
        &[
            "deploy",
            deployment.to_str().expect("utf-8"),
            "--group",
            "pumps",
        ],
    );
    assert!(out.contains("deployed fleet-1 to pump-1, pump-2"), "{out}");

    let status = wait_for_ack(&db, "pump-1", &replica);
    assert_eq!(
        status["ack"],
        json!({"jobId": "fleet-1", "status": "SUCCESS", "version": "5.0"}),
        "{}",
        first.log()
    );
    assert_eq!(status["reported"]["lastResult"]["jobId"], "fleet-1");
    cloud.wait_for(
        Duration::from_secs(5),
        "the replica's accepted for pump-1's ack",
        |m| m.topic == "state/pump-1/update/accepted" && m.json.get("jobId").is_some(),
    );
    assert_eq!(
        std::fs::read_to_string(root.join("pump-1/files/app.conf")).expect("installed"),
        "fleet = 1\n"
    );

    let second = AgentProcess::start(&device(&root, "pump-2", broker.port));
    let status = wait_for_ack(&db, "pump-2", &replica);
    assert_eq!(status["ack"]["status"], "SUCCESS", "{}", second.log());
    let table = fleet(&db, &["status"]);
    assert!(
        table.contains("pump-1")
            && table.contains("pump-2")
            && table.matches(" succeeded ").count() == 2,
        "{table}"
    );
}

/// A one-file deployment served from `root`.
fn deployment(root: &Path, job: &str) -> std::path::PathBuf {
    let payload = root.join(format!("{job}.conf"));
    std::fs::write(&payload, "fleet = 2\n").expect("payload");
    let file = root.join(format!("{job}.json"));
    std::fs::write(
        &file,
        json!({"schema": 1, "jobId": job, "version": "6.0",
               "steps": [{"updateType": "otabox/file:1",
                 "manifest": {"name": "app", "version": "6", "payload": "app.conf", "destination": "/var/lib/otabox/files/app.conf"},
                 "files": [{"name": "app.conf", "url": format!("file://{}", payload.display()), "size": 10, "sha256": sha256_hex(b"fleet = 2\n")}]}]})
        .to_string(),
    )
    .expect("deployment");
    file
}

#[test]
fn the_replica_serves_the_aws_shadow_layout_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let broker = Mosquitto::start(&root.join("broker"));
    let db = root.join("replica.db");
    let replica =
        ReplicaProcess::start_with(&db, broker.port, &["--layout".into(), "aws-shadow".into()]);
    let observer = TestClient::connect(
        broker.port,
        "observer",
        &[
            "$aws/things/+/shadow/update/accepted",
            "$aws/things/+/shadow/get/accepted",
        ],
    );
    observer.ready("$aws/things/observer/shadow/get/accepted");
    // By reference, so the desired state fits an AWS IoT shadow.
    let document = deployment(&root, "aws-1");
    let url = format!("file://{}", document.display());
    fleet(
        &db,
        &[
            "deploy",
            document.to_str().expect("utf-8"),
            "--url",
            &url,
            "--device",
            "pump-9",
        ],
    );
    let agent = AgentProcess::start(&device_with(
        &root,
        "pump-9",
        broker.port,
        "layout = \"aws-shadow\"",
    ));
    let answer = observer.wait_for(
        Duration::from_secs(20),
        "the replica's answer to the agent's get",
        |m| m.topic == "$aws/things/pump-9/shadow/get/accepted",
    );
    assert_eq!(
        answer.json["state"]["desired"]["deployment"]["jobId"],
        "aws-1",
        "{}",
        replica.log()
    );
    let desired = &answer.json["state"]["desired"]["deployment"];
    assert_eq!(desired["deploymentRef"]["url"], url.as_str(), "{desired}");
    assert!(desired.get("steps").is_none(), "{desired}");
    let status = wait_for_ack(&db, "pump-9", &replica);
    assert_eq!(status["ack"]["status"], "SUCCESS", "{}", agent.log());
    observer.wait_for(Duration::from_secs(5), "the accepted ack", |m| {
        m.topic == "$aws/things/pump-9/shadow/update/accepted"
            && m.json
                .pointer("/state/reported/deployment/ack/jobId")
                .is_some()
    });
    let log = replica.log();
    assert!(!log.contains("rejected an update"), "{log}");
}

#[test]
fn the_replica_and_the_agent_work_over_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let pki = common::pki::Pki::new(&root.join("pki"));
    let (dev_cert, dev_key) = pki.client("pump-7");
    let (replica_cert, replica_key) = pki.client("otabox-replica");
    let acl = root.join("acl");
    std::fs::write(
        &acl,
        "user otabox-replica\ntopic readwrite state/#\n\npattern readwrite state/%u/#\n",
    )
    .expect("acl");
    let port = common::services::free_port();
    let _broker = Mosquitto::start_with(&root.join("broker"), port, &pki.mosquitto_mtls(&acl));
    let db = root.join("replica.db");
    let replica =
        ReplicaProcess::start_with(&db, port, &pki.replica_args(&replica_cert, &replica_key));
    let tls = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        pki.ca().display(),
        dev_cert.display(),
        dev_key.display()
    );
    let agent = AgentProcess::start(&device_with(&root, "pump-7", port, &tls));
    fleet(
        &db,
        &[
            "deploy",
            deployment(&root, "tls-1").to_str().expect("utf-8"),
            "--device",
            "pump-7",
        ],
    );
    let status = wait_for_ack(&db, "pump-7", &replica);
    assert_eq!(
        status["ack"]["status"],
        "SUCCESS",
        "{}\n{}",
        agent.log(),
        replica.log()
    );
}

/// A signed-only device (a `[trust] root`) with the file handler; its
/// `[mqtt]` table gets `extra` lines.
fn signed_only_device(root: &Path, id: &str, port: u16, extra: &str) -> std::path::PathBuf {
    let dir = root.join(id);
    std::fs::create_dir_all(&dir).expect("device dir");
    let (_, public) = otabox::trust::signed::generate_key().expect("key");
    let trust = otabox::trust::signed::Root {
        version: 1,
        threshold: 1,
        keys: vec![public],
    };
    std::fs::write(
        dir.join("root.json"),
        serde_json::to_string(&trust).expect("root"),
    )
    .expect("root.json");
    file_device(
        &dir,
        id,
        &format!("port = {port}\n{extra}\n[trust]\nroot = \"root.json\""),
    )
}

/// `fleet status --json` of one device.
fn status_of(db: &Path, device: &str) -> serde_json::Value {
    let all: serde_json::Value =
        serde_json::from_str(&fleet(db, &["status", "--device", device, "--json"]))
            .expect("status json");
    all[0].clone()
}

/// Polls until `device`'s outcome is `kind`.
fn wait_for_outcome(
    db: &Path,
    device: &str,
    kind: &str,
    log: &dyn Fn() -> String,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = status_of(db, device);
        if status["outcome"] == kind {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{device} never {kind}: {status}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Where one layout carries the desired deployment to the device (its
/// delta, and in the AWS layout the answer to its `get`) and its reports.
struct Delivery {
    replica_args: &'static [&'static str],
    mqtt: &'static str,
    delta: &'static str,
    get_accepted: Option<&'static str>,
    reports: &'static str,
    /// Deployments go by reference (an inline one with files nests too
    /// deep for the AWS shadow).
    by_reference: bool,
}

const IOT_ATLAS: Delivery = Delivery {
    replica_args: &[],
    mqtt: "",
    delta: "state/pump-s/update/delta",
    get_accepted: None,
    reports: "state/pump-s/update",
    by_reference: false,
};

const AWS_SHADOW: Delivery = Delivery {
    replica_args: &["--layout", "aws-shadow"],
    mqtt: "layout = \"aws-shadow\"",
    delta: "$aws/things/pump-s/shadow/update/delta",
    get_accepted: Some("$aws/things/pump-s/shadow/get/accepted"),
    reports: "$aws/things/pump-s/shadow/update",
    by_reference: true,
};

impl Delivery {
    /// How many times the deployment reaches the device within `window`:
    /// deltas, and answers to its `get` that hold a deployment.
    fn count(&self, observer: &TestClient, window: Duration) -> usize {
        observer
            .drain(window)
            .iter()
            .filter(|m| {
                m.topic == self.delta
                    || (Some(m.topic.as_str()) == self.get_accepted
                        && m.json
                            .pointer("/state/desired/deployment")
                            .is_some_and(|d| !d.is_null()))
            })
            .count()
    }
}

/// A signed-only device gets an unsigned deployment: it rejects it once,
/// the replica does not send it again (at most once more when the device
/// comes back: its `get`, in the AWS layout), `fleet cancel` withdraws it
/// without sending anything, and a new deployment is sent again.
fn a_rejected_deployment_is_not_sent_again(layout: Delivery) {
    let (_dir, root, broker, db, replica) = start_cloud(layout.replica_args);
    let topics: Vec<&str> = [layout.delta, layout.reports]
        .into_iter()
        .chain(layout.get_accepted)
        .collect();
    let observer = TestClient::connect(broker.port, "observer", &topics);
    observer.ready(layout.delta);
    let config = signed_only_device(&root, "pump-s", broker.port, layout.mqtt);
    let mut agent = AgentProcess::start(&config);
    let online = |observer: &TestClient| {
        observer.wait_for(Duration::from_secs(20), "pump-s online", |m| {
            m.topic == layout.reports
                && m.json.pointer("/state/reported/deployment/agent").is_some()
        })
    };
    online(&observer);
    observer.drain(Duration::from_millis(300));
    let logs = || format!("{}\n{}", agent_log(&config), replica.log());
    let deploy = |job: &str| {
        let file = deployment(&root, job);
        let url = format!("file://{}", file.display());
        let mut args = vec!["deploy", file.to_str().expect("utf-8")];
        if layout.by_reference {
            args.extend(["--url", &url]);
        }
        fleet(&db, &[&args[..], &["--device", "pump-s"]].concat());
        wait_for_outcome(&db, "pump-s", "rejected", &logs)
    };

    let status = deploy("unsigned-1");
    assert!(
        status["reason"]
            .as_str()
            .is_some_and(|r| r.contains("accepts signed deployments only")),
        "{status}"
    );
    // Counted from the deploy on (the observer kept what came meanwhile).
    let sent = layout.count(&observer, Duration::from_secs(3));
    assert_eq!(
        sent,
        1,
        "the rejected deployment came {sent} times\n{}",
        logs()
    );

    agent.kill();
    agent = AgentProcess::start(&config);
    online(&observer);
    let again = layout.count(&observer, Duration::from_secs(3));
    assert!(
        again <= 1,
        "after a reconnect it came {again} more times\n{}",
        logs()
    );
    let table = fleet(&db, &["status"]);
    let line = table
        .lines()
        .find(|l| l.starts_with("pump-s"))
        .unwrap_or_default();
    assert!(
        line.contains(" rejected ")
            && line.contains("untrusted deployment")
            && !line.contains("idle"),
        "{table}"
    );

    let out = fleet(&db, &["cancel", "--device", "pump-s"]);
    assert!(out.contains("withdrawn") && out.contains("pump-s"), "{out}");
    assert_eq!(
        layout.count(&observer, Duration::from_secs(2)),
        0,
        "a withdrawn deployment sends nothing\n{}",
        logs()
    );
    agent.kill();
    agent = AgentProcess::start(&config);
    online(&observer);
    assert_eq!(
        layout.count(&observer, Duration::from_secs(2)),
        0,
        "{}",
        logs()
    );
    let status = status_of(&db, "pump-s");
    assert_eq!(status["outcome"], "cancelled", "{status}");
    let table = fleet(&db, &["status"]);
    assert!(
        table.contains(" unsigned-1 ") && table.contains(" cancelled "),
        "{table}"
    );

    // A new deployment is the operator's change: it is sent (once).
    deploy("unsigned-2");
    let sent = layout.count(&observer, Duration::from_secs(2));
    assert_eq!(sent, 1, "{}", logs());
    drop(agent);
}

#[test]
fn a_rejected_deployment_is_not_sent_again_and_cancel_withdraws_it() {
    a_rejected_deployment_is_not_sent_again(IOT_ATLAS);
}

#[test]
fn a_rejected_deployment_is_not_sent_again_in_the_aws_shadow_layout() {
    a_rejected_deployment_is_not_sent_again(AWS_SHADOW);
}

fn agent_log(config: &Path) -> String {
    std::fs::read_to_string(config.with_file_name("agent.log")).unwrap_or_default()
}

#[test]
fn republishing_to_a_device_that_keeps_missing_its_delta_backs_off() {
    let (_dir, root, broker, db, replica) = start_cloud(&[]);
    // A device that reports idle over and over and never runs its job (as
    // one whose deltas are lost on the way would).
    let device = TestClient::connect(broker.port, "pump-m", &["state/pump-m/update/delta"]);
    device.ready("state/pump-m/update/delta");
    let idle = json!({"state": {"reported": {"deployment": {"agent": {"state": "idle", "version": "0"}}}}})
        .to_string();
    fleet(
        &db,
        &[
            "deploy",
            deployment(&root, "missed-1").to_str().expect("utf-8"),
            "--device",
            "pump-m",
        ],
    );
    let start = Instant::now();
    let mut deltas = Vec::new();
    while start.elapsed() < Duration::from_secs(4) {
        device.publish("state/pump-m/update", idle.clone());
        deltas.extend(
            device
                .drain(Duration::from_millis(100))
                .into_iter()
                .filter(|m| m.topic == "state/pump-m/update/delta")
                .map(|_| start.elapsed()),
        );
    }
    // The first delta, a republish at once, then after 1 s and 2 s more.
    assert!(
        (2..=5).contains(&deltas.len()),
        "{} deltas in 4 s of idle reports at {deltas:?}\n{}",
        deltas.len(),
        replica.log()
    );
    // The device runs the job: the backoff starts over.
    device.publish(
        "state/pump-m/update",
        json!({"state": {"reported": {"deployment": {"agent": {"state": "installing", "version": "0"}, "jobId": "missed-1"}}}})
            .to_string(),
    );
    std::thread::sleep(Duration::from_millis(300));
    device.drain(Duration::from_millis(100));
    device.publish("state/pump-m/update", idle);
    device.wait_for(
        Duration::from_millis(800),
        "a republish at once after the reset",
        |m| m.topic == "state/pump-m/update/delta",
    );
}

#[test]
fn fleet_status_tells_each_failure_kind_with_its_reason() {
    let (_dir, root, broker, db, replica) = start_cloud(&[]);
    let config = device(&root, "pump-k", broker.port);
    let agent = AgentProcess::start(&config);
    let mut reasons = Vec::new();
    let mut run = |job: &str, edit: &dyn Fn(&mut serde_json::Value), kind: &str, reason: &str| {
        let file = deployment(&root, job);
        let mut value: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&file).expect("read")).expect("json");
        // Each its own version and content, so that none is found
        // installed already.
        let content = format!("job = {job}\n");
        std::fs::write(root.join(format!("{job}.conf")), &content).expect("payload");
        let step = &mut value["steps"][0];
        step["manifest"]["version"] = json!(job);
        step["files"][0]["size"] = json!(content.len());
        step["files"][0]["sha256"] = json!(sha256_hex(content.as_bytes()));
        edit(&mut value["steps"][0]);
        std::fs::write(&file, value.to_string()).expect("write");
        fleet(
            &db,
            &[
                "deploy",
                file.to_str().expect("utf-8"),
                "--device",
                "pump-k",
            ],
        );
        let status = wait_for_ack(&db, "pump-k", &replica);
        assert_eq!(status["outcome"], kind, "{job}: {status}\n{}", agent.log());
        let full = status["reason"].as_str().unwrap_or_default().to_string();
        assert!(full.contains(reason), "{job}: {full}");
        let table = fleet(&db, &["status"]);
        let line = table
            .lines()
            .find(|l| l.starts_with("pump-k"))
            .unwrap_or_default()
            .to_string();
        let label = if kind == "rolled-back" {
            "rolled back"
        } else {
            kind
        };
        assert!(line.contains(&format!(" {label} ")), "{job}: {table}");
        assert!(
            line.contains(&full[..full.len().min(20)]),
            "{job}: the reason in the table: {table}"
        );
        reasons.push(full);
    };
    run("good", &|_| {}, "succeeded", "");
    let table = fleet(&db, &["status"]);
    assert!(
        table.contains(" app-good "),
        "the installed software: {table}"
    );
    run(
        "unknown-type",
        &|s| s["updateType"] = json!("otabox/nope:1"),
        "failed",
        "otabox/nope:1",
    );
    run(
        "payload-typo",
        &|s| {
            let url = s["files"][0]["url"].as_str().expect("url").to_string();
            s["files"][0]["url"] = json!(format!("{url}.typo"));
        },
        "failed",
        "download",
    );
    run(
        "bad-manifest",
        &|s| {
            s["manifest"]
                .as_object_mut()
                .expect("manifest")
                .remove("destination");
        },
        "failed",
        "validate",
    );
    let blocker = root.join("pump-k/files/app.conf.otabox-new");
    std::fs::create_dir_all(&blocker).expect("block the staging file");
    run("rolled-back", &|_| {}, "rolled-back", "install");
    std::fs::remove_dir(&blocker).expect("unblock");
    let failures = &reasons[1..];
    for (i, a) in failures.iter().enumerate() {
        for b in &failures[i + 1..] {
            assert_ne!(a, b, "each failure has its own reason");
        }
    }
}

/// Polls until `device`'s connection is `online`; returns its status.
fn wait_for_presence(
    db: &Path,
    device: &str,
    online: bool,
    within: Duration,
    log: &dyn Fn() -> String,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let status = status_of(db, device);
        if status["presence"]["online"] == online {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "{device} not {} within {within:?}: {status}\n{}",
            if online { "online" } else { "offline" },
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The agent's shortest keep-alive: mosquitto drops a silent client 1.5
/// keep-alive periods after the last packet it received…
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// …noticed up to this late (mosquitto 2.0.11 does not check every
/// client every second: 11.4 s after the stop measured here).
const BROKER_CHECK: Duration = Duration::from_secs(6);

#[test]
fn fleet_status_shows_a_device_online_offline_after_a_crash_online_again_and_offline_after_a_stop()
{
    let (_dir, root, broker, db, replica) = start_cloud(&[]);
    let logs = || replica.log();
    fleet(&db, &["register", "pump-p"]);
    assert!(
        status_of(&db, "pump-p")["presence"].is_null(),
        "not known before it connects"
    );
    let config = device_with(&root, "pump-p", broker.port, "keep_alive_secs = 5");
    let mut agent = AgentProcess::start(&config);
    wait_for_presence(&db, "pump-p", true, Duration::from_secs(20), &logs);
    let table = fleet(&db, &["status"]);
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|h| h.contains("CONNECTION"))
            && table.lines().nth(1).is_some_and(|l| l.contains(" online ")),
        "{table}"
    );

    // Frozen (SIGSTOP, as a lost network): the connection stays open but
    // silent; the broker gives up after 1.5 keep-alive periods and
    // publishes the will.
    let signal = |agent: &AgentProcess, name: &str| {
        let _ = Command::new("kill")
            .args([name, &agent.pid().to_string()])
            .status();
    };
    let frozen = Instant::now();
    signal(&agent, "-STOP");
    let limit = KEEP_ALIVE.mul_f32(1.5) + BROKER_CHECK;
    let status = wait_for_presence(&db, "pump-p", false, limit, &logs);
    eprintln!("offline {:?} after SIGSTOP", frozen.elapsed());
    assert!(status["presence"]["since"].as_i64().is_some(), "{status}");
    let table = fleet(&db, &["status"]);
    assert!(table.contains("offline for "), "{table}");
    signal(&agent, "-CONT");
    wait_for_presence(&db, "pump-p", true, Duration::from_secs(20), &logs);

    // SIGKILL: no DISCONNECT; the socket closes and the broker publishes
    // the will at once.
    let killed = Instant::now();
    agent.kill();
    wait_for_presence(&db, "pump-p", false, limit, &logs);
    eprintln!("offline {:?} after SIGKILL", killed.elapsed());

    let mut agent = AgentProcess::start(&config);
    let restarted = Instant::now();
    wait_for_presence(&db, "pump-p", true, Duration::from_secs(20), &logs);
    eprintln!("online {:?} after the restart", restarted.elapsed());

    // SIGTERM: the agent stops; its connection ends at once.
    let stopped = Instant::now();
    signal(&agent, "-TERM");
    assert!(agent.wait_exit(Duration::from_secs(10)), "{}", agent.log());
    wait_for_presence(&db, "pump-p", false, Duration::from_secs(3), &logs);
    eprintln!("offline {:?} after SIGTERM", stopped.elapsed());
}

#[test]
fn in_the_aws_shadow_layout_the_replica_reads_the_clouds_lifecycle_events() {
    let (_dir, _root, broker, db, replica) = start_cloud(&["--layout", "aws-shadow"]);
    let logs = || replica.log();
    fleet(&db, &["register", "pump-a"]);
    fleet(&db, &["register", "pump-b"]);
    let aws = TestClient::connect(broker.port, "aws-iot", &[]);
    let event = |kind: &str, device: &str, at: i64| {
        aws.publish(
            &format!("$aws/events/presence/{kind}/{device}"),
            json!({"clientId": device, "eventType": kind, "timestamp": at,
                   "sessionIdentifier": "s", "principalIdentifier": "p"})
            .to_string(),
        );
    };
    let now = otabox::clock::now_secs() as i64 * 1000;
    event("connected", "pump-a", now);
    let status = wait_for_presence(&db, "pump-a", true, Duration::from_secs(10), &logs);
    assert_eq!(status["presence"]["since"], now / 1000, "the event's time");
    // Delivered out of order: a disconnect older than the connect.
    event("disconnected", "pump-a", now - 5_000);
    event("connected", "stranger", now);
    event("connected", "pump-b", now);
    wait_for_presence(&db, "pump-b", true, Duration::from_secs(10), &logs);
    assert_eq!(status_of(&db, "pump-a")["presence"]["online"], true);
    let fleet_ids = fleet(&db, &["status", "--json"]);
    assert!(!fleet_ids.contains("stranger"), "{fleet_ids}");
    event("disconnected", "pump-a", now + 1_000);
    wait_for_presence(&db, "pump-a", false, Duration::from_secs(10), &logs);
}

#[test]
fn in_the_aws_shadow_layout_an_inline_deployment_the_service_would_refuse_is_rejected_not_sent() {
    let (_dir, root, broker, db, replica) = start_cloud(AWS_SHADOW.replica_args);
    let delta = "$aws/things/pump-r/shadow/update/delta";
    let get_accepted = "$aws/things/pump-r/shadow/get/accepted";
    let observer = TestClient::connect(broker.port, "observer", &[delta, get_accepted]);
    observer.ready(delta);
    let inline = deployment(&root, "inline-1");
    fleet(
        &db,
        &[
            "deploy",
            inline.to_str().expect("utf-8"),
            "--device",
            "pump-r",
        ],
    );
    let logs = || replica.log();
    let status = wait_for_outcome(&db, "pump-r", "rejected", &logs);
    let reason = status["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("JSON contains too many levels of nesting; maximum is 6")
            && reason.contains("fleet deploy --url"),
        "{status}"
    );
    let table = fleet(&db, &["status"]);
    assert!(table.contains(" rejected "), "{table}");
    let agent = AgentProcess::start(&device_with(&root, "pump-r", broker.port, AWS_SHADOW.mqtt));
    let answer = observer.wait_for(Duration::from_secs(20), "the answer to the get", |m| {
        m.topic == get_accepted
    });
    assert!(
        answer.json["state"]["desired"]["deployment"].is_null(),
        "the service never stored it: {}",
        answer.json
    );
    let sent = observer.drain(Duration::from_millis(500));
    assert!(sent.iter().all(|m| m.topic != delta), "{sent:?}");

    let by_reference = deployment(&root, "ref-1");
    let url = format!("file://{}", by_reference.display());
    fleet(
        &db,
        &[
            "deploy",
            by_reference.to_str().expect("utf-8"),
            "--url",
            &url,
            "--device",
            "pump-r",
        ],
    );
    let status = wait_for_ack(&db, "pump-r", &replica);
    assert_eq!(status["ack"]["status"], "SUCCESS", "{}", agent.log());
    assert_eq!(status["outcome"], "succeeded", "{status}");
}
