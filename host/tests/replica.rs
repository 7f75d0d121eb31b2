//! The reference replica with real agents: `otabox fleet` deploys to a
//! group, the replica publishes deltas, records reports and acks and
//! confirms them on `accepted`; a device that was offline gets its delta
//! when it comes online.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::services::{AgentProcess, Mosquitto, ReplicaProcess, TestClient};
use common::*;
use otabox::runtime::sha256_hex;
use serde_json::json;

fn fleet(db: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_otabox"))
        .arg("fleet")
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .expect("fleet");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fleet {args:?}: {text}");
    text
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
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let broker = Mosquitto::start(&root.join("broker"));
    let db = root.join("replica.db");
    let replica = ReplicaProcess::start(&db, broker.port);
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
            && table.matches("Success 5.0").count() == 2,
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
