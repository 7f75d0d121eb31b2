//! The agent over TLS (custom CA, user name and password) and mutual TLS,
//! and a broker ACL that keeps a device certificate off other devices'
//! topics.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::pki::Pki;
use common::services::{AgentProcess, Message, Mosquitto, TestClient, free_port};
use common::*;
use otabox::config::MqttSection;
use otabox::runtime::sha256_hex;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn device_config(root: &Path, mqtt: &str) -> PathBuf {
    file_device(root, "dev-1", mqtt)
}

fn delta(root: &Path, job: &str) -> String {
    let payload = root.join("payload.conf");
    std::fs::write(&payload, "tls = true\n").expect("payload");
    json!({"version": 1, "state": {"deployment": {
        "schema": 1, "jobId": job, "version": "3.0",
        "steps": [{"updateType": "otabox/file:1",
            "manifest": {"name": "app", "version": "3", "payload": "app.conf", "destination": "/var/lib/otabox/files/app.conf"},
            "files": [{"name": "app.conf", "url": format!("file://{}", payload.display()), "size": 11, "sha256": sha256_hex(b"tls = true\n")}]}]
    }}})
    .to_string()
}

/// Client options as the agent builds them (TLS, credentials).
fn client_options(id: &str, port: u16, section: MqttSection) -> rumqttc::MqttOptions {
    otabox::mqtt::options(
        &MqttSection {
            port,
            client_id: Some(id.into()),
            ..section
        },
        id,
    )
    .expect("client options")
}

fn is_ack(m: &Message, job: &str) -> bool {
    m.json.get("jobId").and_then(|j| j.as_str()) == Some(job) && m.json.get("status").is_some()
}

fn online(m: &Message) -> bool {
    m.json
        .pointer("/state/reported/deployment/agent/state")
        .is_some()
}

#[test]
fn tls_with_a_custom_ca_and_a_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let pki = Pki::new(&root.join("pki"));
    let passwords = root.join("passwd");
    std::fs::write(&passwords, "").expect("passwd");
    for (user, pass) in [("dev-1", "s3cret"), ("cloud", "cl0ud")] {
        let ok = std::process::Command::new("mosquitto_passwd")
            .arg("-b")
            .arg(&passwords)
            .args([user, pass])
            .status();
        assert!(ok.expect("mosquitto_passwd").success());
    }
    let port = free_port();
    let p = pki.dir.display();
    let _broker = Mosquitto::start_with(
        &root.join("broker"),
        port,
        &format!(
            "cafile {p}/ca.pem\ncertfile {p}/server.pem\nkeyfile {p}/server.key\nallow_anonymous false\npassword_file {}\n",
            passwords.display()
        ),
    );
    std::fs::write(root.join("device.password"), "s3cret\n").expect("password file");
    std::fs::write(root.join("cloud.password"), "cl0ud").expect("password file");
    let tls = |user: &str| MqttSection {
        ca_file: Some(pki.ca()),
        username: Some(user.into()),
        password_file: Some(root.join(format!(
            "{}.password",
            if user == "cloud" { "cloud" } else { "device" }
        ))),
        ..MqttSection::default()
    };
    let cloud = TestClient::connect_with(
        client_options("cloud", port, tls("cloud")),
        &["state/dev-1/update"],
    );
    let config = device_config(
        root,
        &format!(
            "port = {port}\nusername = \"dev-1\"\npassword_file = \"device.password\"\nca_file = \"{}\"",
            pki.ca().display()
        ),
    );
    let agent = AgentProcess::start(&config);
    cloud.wait_for(WAIT, "the agent's online report over TLS", online);
    cloud.publish("state/dev-1/update/delta", delta(root, "job-tls"));
    let ack = cloud.wait_for(WAIT, "the ack over TLS", |m| is_ack(m, "job-tls"));
    assert_eq!(ack.json["status"], "SUCCESS", "{}", agent.log());
}

#[test]
fn mutual_tls_and_an_acl_that_keeps_devices_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let pki = Pki::new(&root.join("pki"));
    let (dev_cert, dev_key) = pki.client("dev-1");
    let (evil_cert, evil_key) = pki.client("dev-2");
    let (cloud_cert, cloud_key) = pki.client("cloud");
    let acl = root.join("acl");
    std::fs::write(
        &acl,
        "user cloud\ntopic readwrite state/#\n\npattern readwrite state/%u/#\n",
    )
    .expect("acl");
    let port = free_port();
    let _broker = Mosquitto::start_with(&root.join("broker"), port, &pki.mosquitto_mtls(&acl));
    let mtls = |cert: &PathBuf, key: &PathBuf| MqttSection {
        ca_file: Some(pki.ca()),
        cert_file: Some(cert.clone()),
        key_file: Some(key.clone()),
        ..MqttSection::default()
    };
    let cloud = TestClient::connect_with(
        client_options("cloud", port, mtls(&cloud_cert, &cloud_key)),
        &["state/#"],
    );
    let config = device_config(
        root,
        &format!(
            "port = {port}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            pki.ca().display(),
            dev_cert.display(),
            dev_key.display()
        ),
    );
    let agent = AgentProcess::start(&config);
    cloud.wait_for(WAIT, "the agent's online report over mutual TLS", online);

    let evil = TestClient::connect_with(
        client_options("dev-2", port, mtls(&evil_cert, &evil_key)),
        &["state/dev-2/update"],
    );
    evil.ready("state/dev-2/update");
    evil.publish("state/dev-1/update/delta", delta(root, "job-evil"));
    evil.publish(
        "state/dev-1/update",
        json!({"jobId": "job-forged", "status": "SUCCESS", "version": "9"}).to_string(),
    );
    let seen = cloud.drain(Duration::from_millis(1500));
    assert!(
        seen.iter()
            .all(|m| !is_ack(m, "job-forged") && !is_ack(m, "job-evil")),
        "{seen:?}"
    );
    assert!(
        !root.join("state/jobs/job-evil").exists(),
        "another device's certificate reached dev-1's delta topic"
    );

    cloud.publish("state/dev-1/update/delta", delta(root, "job-mtls"));
    let ack = cloud.wait_for(WAIT, "the ack over mutual TLS", |m| is_ack(m, "job-mtls"));
    assert_eq!(ack.json["status"], "SUCCESS", "{}", agent.log());
}
