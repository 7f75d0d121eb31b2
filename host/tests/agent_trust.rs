//! Signed deployments through the agent: only a manifest signed by a
//! threshold of the device's root, fresh, in sequence and for this device
//! runs; every rejection is reported and leaves every state file
//! byte-identical.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::services::{AgentProcess, Message, Mosquitto, TestClient};
use common::*;
use otabox::runtime::sha256_hex;
use otabox::shadow::DesiredState;
use otabox::trust::signed::{self, Root, Target};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Waits until the outbox under `state` is drained (nothing in flight),
/// then snapshots `state`.
fn settled_snapshot(state: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pending = std::fs::read_dir(state.join("outbox"))
            .map(|d| d.flatten().filter(|e| e.file_name() != "sent.json").count())
            .unwrap_or(0);
        if pending == 0 || std::time::Instant::now() > deadline {
            return snapshot(state);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every file under `dir` and its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files.insert(path.clone(), std::fs::read(&path).unwrap_or_default());
            }
        }
    }
    files
}

struct Signer {
    keys: Vec<ed25519_dalek::SigningKey>,
    payload: PathBuf,
    content: Vec<u8>,
}

impl Signer {
    fn desired(&self, job: &str) -> DesiredState {
        serde_json::from_value(json!({
            "schema": 1, "jobId": job, "version": job,
            "steps": [{"updateType": "otabox/file:1",
                "manifest": {"name": "app", "version": job, "payload": "app.conf", "destination": "/var/lib/otabox/files/app.conf"},
                "files": [{"name": "app.conf", "url": format!("file://{}", self.payload.display()),
                           "size": self.content.len(), "sha256": sha256_hex(&self.content)}]}]
        }))
        .expect("desired")
    }

    /// A delta for `desired` signed for `device` with `sequence`, valid for
    /// `valid` seconds around now.
    fn delta(
        &self,
        version: u64,
        mut desired: DesiredState,
        sequence: u64,
        device: &str,
        expires: u64,
    ) -> String {
        let target = Target {
            device: Some(device.into()),
            group: None,
        };
        let manifest =
            signed::describe(&desired, sequence, target, now() - 60, expires).expect("describe");
        desired.signed_manifest = Some(
            serde_json::to_value(signed::sign(&manifest, &self.keys).expect("sign")).expect("json"),
        );
        json!({"version": version, "state": {"deployment": desired}}).to_string()
    }
}

fn new_keys(n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|_| signed::generate_key().expect("key"))
        .collect()
}

fn root_of(version: u32, keys: &[(String, String)]) -> Root {
    Root {
        version,
        threshold: 2,
        keys: keys.iter().map(|(_, p)| p.clone()).collect(),
    }
}

fn signing(keys: &[(String, String)]) -> Vec<ed25519_dalek::SigningKey> {
    keys.iter()
        .map(|(s, _)| signed::signing_key(s).expect("key"))
        .collect()
}

fn signer(root_dir: &Path, keys: &[(String, String)]) -> Signer {
    let content = b"signed = true\n".to_vec();
    let payload = root_dir.join("payload.conf");
    std::fs::write(&payload, &content).expect("payload");
    Signer {
        keys: signing(keys),
        payload,
        content,
    }
}

/// A device whose `[trust] root` is `root`, its agent online.
struct TrustRig {
    _broker: Mosquitto,
    config: PathBuf,
    cloud: TestClient,
    agent: AgentProcess,
}

fn trust_rig(root_dir: &Path, root: &Root) -> TrustRig {
    let broker = Mosquitto::start(&root_dir.join("broker"));
    std::fs::write(
        root_dir.join("root.json"),
        serde_json::to_string(root).expect("root"),
    )
    .expect("root file");
    let mqtt_and_trust = format!("port = {}\n[trust]\nroot = \"root.json\"", broker.port);
    let config = file_device(root_dir, "dev-1", &mqtt_and_trust);
    let cloud = TestClient::connect(broker.port, "cloud", &["state/dev-1/update"]);
    let agent = AgentProcess::start(&config);
    cloud.wait_for(WAIT, "online", |m| {
        m.json.pointer("/state/reported/deployment/agent").is_some()
    });
    TrustRig {
        _broker: broker,
        config,
        cloud,
        agent,
    }
}

/// `otabox verify` of the deployment in `delta` for dev-1 against the
/// root file of the rig: `Ok(stdout)` when valid, `Err(reason)` when
/// refused.
fn verify_cli(root_dir: &Path, delta: &str) -> Result<String, String> {
    let delta: serde_json::Value = serde_json::from_str(delta).expect("delta");
    let file = root_dir.join("deployment.json");
    std::fs::write(&file, delta["state"]["deployment"].to_string()).expect("deployment");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_otabox"))
        .arg("verify")
        .arg("--root")
        .arg(root_dir.join("root.json"))
        .args(["--device", "dev-1"])
        .arg(&file)
        .output()
        .expect("otabox verify");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    match out.status.code() {
        Some(0) => Ok(stdout),
        Some(1) => Err(stderr
            .strip_prefix("refused: ")
            .unwrap_or_else(|| panic!("not a refusal: {stderr}"))
            .to_string()),
        other => panic!("verify exited {other:?}: {stderr}"),
    }
}

fn is_ack(m: &Message, job: &str) -> bool {
    m.json.get("jobId").and_then(|j| j.as_str()) == Some(job) && m.json.get("status").is_some()
}

#[test]
fn only_a_valid_signed_deployment_runs_and_rejections_change_no_state_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root_dir = dir.path().canonicalize().expect("canonical");
    let keys = new_keys(3);
    let TrustRig {
        _broker,
        config: _,
        cloud,
        agent,
    } = trust_rig(&root_dir, &root_of(1, &keys));
    let signer = signer(&root_dir, &keys[..2]);

    let later = now() + 3600;
    cloud.publish(
        "state/dev-1/update/delta",
        signer.delta(1, signer.desired("job-1"), 10, "dev-1", later),
    );
    let ack = cloud.wait_for(WAIT, "the signed job's ack", |m| is_ack(m, "job-1"));
    assert_eq!(ack.json["status"], "SUCCESS", "{}", agent.log());
    // Let the reports of job-1 drain from the outbox before the snapshot.
    std::thread::sleep(Duration::from_millis(300));
    let state = root_dir.join("state");
    let before = settled_snapshot(&state);

    let mut tampered: serde_json::Value =
        serde_json::from_str(&signer.delta(2, signer.desired("job-2"), 11, "dev-1", later))
            .expect("json");
    tampered["state"]["deployment"]["steps"][0]["manifest"]["destination"] =
        json!("/var/lib/otabox/files/other.conf");
    let unsigned =
        json!({"version": 3, "state": {"deployment": signer.desired("job-3")}}).to_string();
    let cases = [
        (tampered.to_string(), "differ from what was signed"),
        (
            signer.delta(4, signer.desired("job-4"), 10, "dev-1", later),
            "rollback or replay",
        ),
        (unsigned, "accepts signed deployments only"),
        (
            signer.delta(5, signer.desired("job-5"), 12, "dev-2", later),
            "not this device",
        ),
        (
            signer.delta(6, signer.desired("job-6"), 13, "dev-1", now() - 1),
            "expired",
        ),
    ];
    for (delta, reason) in cases {
        cloud.publish("state/dev-1/update/delta", delta);
        cloud.wait_for(WAIT, reason, |m| {
            m.json
                .pointer("/state/reported/deployment/lastRejected/reason")
                .and_then(|r| r.as_str())
                .is_some_and(|r| r.contains(reason))
        });
        assert_eq!(
            snapshot(&state),
            before,
            "a rejection ({reason}) changed a state file"
        );
    }
    cloud.publish(
        "state/dev-1/update/delta",
        signer.delta(7, signer.desired("job-7"), 14, "dev-1", later),
    );
    let ack = cloud.wait_for(WAIT, "the next signed job's ack", |m| is_ack(m, "job-7"));
    assert_eq!(ack.json["status"], "SUCCESS", "{}", agent.log());
    let shadow: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("shadow.json")).expect("shadow"))
            .expect("json");
    assert_eq!(shadow["last_sequence"], 14);
}

#[test]
fn a_root_rotation_travels_with_a_deployment_and_replaces_the_old_root() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root_dir = dir.path().canonicalize().expect("canonical");
    let old = new_keys(3);
    let new = new_keys(2);
    let TrustRig {
        _broker,
        config,
        cloud,
        mut agent,
    } = trust_rig(&root_dir, &root_of(1, &old));
    let by_new = signer(&root_dir, &new);
    let by_old = signer(&root_dir, &old[..2]);
    let next = root_of(2, &new);
    let good_rotation = serde_json::to_value(
        signed::sign(&next, &[signing(&old[..2]), signing(&new)].concat()).expect("sign"),
    )
    .expect("json");
    let bad_rotation =
        serde_json::to_value(signed::sign(&next, &signing(&new)).expect("sign")).expect("json");
    let later = now() + 3600;
    let with = |rotation: Option<&serde_json::Value>, job: &str| {
        let mut desired = by_new.desired(job);
        desired.root_rotations = rotation.into_iter().cloned().collect();
        desired
    };
    let state = root_dir.join("state");
    let before = settled_snapshot(&state);
    let bad = by_new.delta(1, with(Some(&bad_rotation), "r1"), 1, "dev-1", later);
    let verify_reason = verify_cli(&root_dir, &bad).expect_err("verify refuses the bad rotation");
    cloud.publish("state/dev-1/update/delta", bad);
    let rejected = cloud.wait_for(WAIT, "the bad rotation's rejection", |m| {
        m.json
            .pointer("/state/reported/deployment/lastRejected/reason")
            .and_then(|r| r.as_str())
            .is_some_and(|r| r.contains("rootRotations[0]"))
    });
    assert_eq!(
        rejected.json["state"]["reported"]["deployment"]["lastRejected"]["reason"],
        format!("untrusted deployment: {verify_reason}"),
        "the agent and `otabox verify` refuse for the same reason"
    );
    assert_eq!(
        snapshot(&state),
        before,
        "a rejected rotation changed a state file"
    );

    let good = by_new.delta(2, with(Some(&good_rotation), "r2"), 2, "dev-1", later);
    let valid = verify_cli(&root_dir, &good).expect("verify applies the carried rotation");
    assert!(
        valid.contains("under root version 2 (rotated by the deployment)"),
        "{valid}"
    );
    assert!(
        verify_cli(
            &root_dir,
            &by_new.delta(2, with(None, "r2"), 2, "dev-1", later)
        )
        .expect_err("without the rotation the new keys are strangers")
        .contains("2 needed"),
    );
    cloud.publish("state/dev-1/update/delta", good);
    assert_eq!(
        cloud.wait_for(WAIT, "r2", |m| is_ack(m, "r2")).json["status"],
        "SUCCESS",
        "{}",
        agent.log()
    );
    let kept: Root = serde_json::from_slice(
        &std::fs::read(state.join("trust-root.json")).expect("rotated root kept"),
    )
    .expect("json");
    assert_eq!(kept, next);

    cloud.publish(
        "state/dev-1/update/delta",
        by_old.delta(3, by_old.desired("r3"), 3, "dev-1", later),
    );
    cloud.wait_for(WAIT, "the old keys' rejection", |m| {
        m.json
            .pointer("/state/reported/deployment/lastRejected/reason")
            .and_then(|r| r.as_str())
            .is_some_and(|r| r.contains("valid signature"))
    });
    agent.kill();
    agent = AgentProcess::start(&config);
    cloud.wait_for(WAIT, "online again", |m| {
        m.json
            .pointer("/state/reported/deployment/agent/state")
            .is_some()
    });
    cloud.publish(
        "state/dev-1/update/delta",
        by_new.delta(4, with(None, "r4"), 4, "dev-1", later),
    );
    assert_eq!(
        cloud.wait_for(WAIT, "r4", |m| is_ack(m, "r4")).json["status"],
        "SUCCESS",
        "{}",
        agent.log()
    );
}
