//! The agent end to end through a real mosquitto: deltas in, the file
//! handler at work, reports and acknowledgements out.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::services::{AgentProcess, Message, Mosquitto, ReplicaProcess, TestClient};
use common::*;
use otabox::runtime::sha256_hex;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

/// A device: handler dir with the file handler, a device.toml, a payload.
struct Device {
    root: PathBuf,
    config: PathBuf,
}

fn device(root: &Path, port: u16, layout: &str) -> Device {
    let config = file_device(
        root,
        "dev-1",
        &format!("port = {port}\nlayout = \"{layout}\""),
    );
    Device {
        root: root.to_path_buf(),
        config,
    }
}

impl Device {
    /// Writes a payload and returns a delta deploying it as `job`.
    fn delta(&self, version: u64, job: &str, content: &str) -> String {
        let payload = self.root.join(format!("{job}.conf"));
        std::fs::write(&payload, content).expect("payload");
        json!({"version": version, "state": {"deployment": {
            "schema": 1, "jobId": job, "version": format!("v-{job}"),
            "steps": [{"updateType": "otabox/file:1",
                "manifest": {"name": "app", "version": job, "payload": "app.conf", "destination": "/var/lib/otabox/files/app.conf"},
                "files": [{"name": "app.conf", "url": format!("file://{}", payload.display()), "size": content.len(), "sha256": sha256_hex(content.as_bytes())}]}]
        }}})
        .to_string()
    }

    fn installed(&self) -> Option<String> {
        std::fs::read_to_string(self.root.join("files/app.conf")).ok()
    }

    fn jobs(&self) -> Vec<String> {
        let mut jobs: Vec<String> = std::fs::read_dir(self.root.join("state/jobs"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        jobs.sort();
        jobs
    }
}

/// A running setup: broker, device files, cloud-side client, agent.
struct Setup {
    _dir: tempfile::TempDir,
    _broker: Mosquitto,
    dev: Device,
    cloud: TestClient,
    agent: AgentProcess,
    /// In the AWS layout, the replica holding every update to the AWS IoT
    /// Device Shadow service's rules.
    replica: Option<ReplicaProcess>,
}

/// The topic the AWS shadow service (here the replica) refuses updates on.
const AWS_REJECTED: &str = "$aws/things/dev-1/shadow/update/rejected";

/// Starts everything and waits until the agent is online.
fn setup(layout: &str, update: &str) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let dev = device(dir.path(), broker.port, layout);
    let aws = layout == "aws-shadow";
    let replica = aws.then(|| {
        let db = dir.path().join("replica.db");
        let args = ["--layout".to_string(), "aws-shadow".to_string()];
        ReplicaProcess::start_with(&db, broker.port, &args)
    });
    let topics: &[&str] = if aws {
        &[update, AWS_REJECTED]
    } else {
        &[update]
    };
    let cloud = TestClient::connect(broker.port, "cloud", topics);
    let agent = AgentProcess::start(&dev.config);
    cloud.wait_for(WAIT, "the agent's online report", online);
    Setup {
        _dir: dir,
        _broker: broker,
        dev,
        cloud,
        agent,
        replica,
    }
}

/// Fails when the shadow service (the replica) refused any of `seen`.
fn none_refused(s: &Setup, seen: &[Message]) {
    if let Some(refused) = seen.iter().find(|m| m.topic == AWS_REJECTED) {
        panic!(
            "the shadow service refused an update: {}\n{}",
            refused.json,
            s.replica
                .as_ref()
                .map(ReplicaProcess::log)
                .unwrap_or_default()
        );
    }
}

/// The acknowledgement a message carries: the whole message (IoT Atlas),
/// or `state.reported.deployment.ack` (AWS shadow).
fn ack_of(m: &Message) -> Option<&serde_json::Value> {
    m.json
        .pointer("/state/reported/deployment/ack")
        .or(Some(&m.json))
        .filter(|a| a.get("jobId").is_some() && a.get("status").is_some())
}

fn is_ack(m: &Message, job: &str) -> bool {
    ack_of(m)
        .and_then(|a| a.get("jobId"))
        .and_then(|j| j.as_str())
        == Some(job)
}

fn online(m: &Message) -> bool {
    m.json
        .pointer("/state/reported/deployment/agent/state")
        .is_some()
}

fn end_to_end(layout: &str, update: &str, delta: &str) {
    let s = setup(layout, update);
    s.cloud
        .publish(delta, s.dev.delta(1, "job-1", "greeting = 1\n"));
    let seen = s
        .cloud
        .collect_until(WAIT, "the ack of job-1", |m| is_ack(m, "job-1"));
    let ack = seen.last().expect("the ack");
    assert_eq!(
        ack_of(ack),
        Some(&json!({"jobId": "job-1", "status": "SUCCESS", "version": "v-job-1"})),
        "{}",
        s.agent.log()
    );
    assert_eq!(s.dev.installed().as_deref(), Some("greeting = 1\n"));
    let progress = seen
        .iter()
        .find_map(|m| m.json.pointer("/state/reported/deployment/progress"))
        .unwrap_or_else(|| panic!("no progress report: {seen:?}"));
    assert_eq!(
        progress,
        &json!({"step": 0, "phase": "install", "done": 13, "total": 13})
    );
    // The terminal report (before the ack) already carries the inventory
    // as it is after the job.
    let terminal = seen
        .iter()
        .find(|m| {
            m.json
                .pointer("/state/reported/deployment/lastResult/jobId")
                == Some(&json!("job-1"))
        })
        .unwrap_or_else(|| panic!("no terminal report: {seen:?}"));
    let items = &terminal.json["state"]["reported"]["deployment"]["inventory"]["otabox/file:1"];
    assert!(
        items.to_string().contains("/var/lib/otabox/files/app.conf"),
        "{items}"
    );
    let later = s.cloud.drain(Duration::from_millis(500));
    none_refused(&s, &seen);
    none_refused(&s, &later);
}

#[test]
fn in_the_aws_layout_a_deployment_by_reference_runs_and_every_update_passes_the_shadow_rules() {
    let s = setup("aws-shadow", "$aws/things/dev-1/shadow/update");
    let delta: serde_json::Value =
        serde_json::from_str(&s.dev.delta(1, "job-ref", "by = reference\n")).expect("json");
    let document = delta["state"]["deployment"].to_string();
    let path = s.dev.root.join("job-ref.deployment.json");
    std::fs::write(&path, &document).expect("document");
    let reference = json!({"version": 1, "state": {"deployment": {
        "schema": 1, "jobId": "job-ref", "version": "v-job-ref",
        "deploymentRef": {"url": format!("file://{}", path.display()),
                          "size": document.len(), "sha256": sha256_hex(document.as_bytes())}}}});
    s.cloud.publish(
        "$aws/things/dev-1/shadow/update/delta",
        reference.to_string(),
    );
    let seen = s
        .cloud
        .collect_until(WAIT, "the ack of job-ref", |m| is_ack(m, "job-ref"));
    let ack = ack_of(seen.last().expect("the ack")).expect("an ack");
    assert_eq!(ack["status"], "SUCCESS", "{}", s.agent.log());
    assert_eq!(s.dev.installed().as_deref(), Some("by = reference\n"));
    none_refused(&s, &seen);
    none_refused(&s, &s.cloud.drain(Duration::from_millis(500)));

    // A reference whose document does not match is rejected, and the
    // rejection report passes the shadow's rules too.
    let mut wrong = reference.clone();
    wrong["version"] = json!(2);
    wrong["state"]["deployment"]["jobId"] = json!("job-wrong");
    s.cloud
        .publish("$aws/things/dev-1/shadow/update/delta", wrong.to_string());
    let seen = s.cloud.collect_until(WAIT, "the rejection report", |m| {
        m.json
            .pointer("/state/reported/deployment/lastRejected/reason")
            .is_some()
    });
    let reason = seen.last().expect("report").json["state"]["reported"]["deployment"]
        ["lastRejected"]["reason"]
        .to_string();
    assert!(reason.contains("not \\\"job-wrong\\\""), "{reason}");
    none_refused(&s, &seen);
}

#[test]
fn a_report_the_shadow_service_refuses_is_logged_and_trimmed_not_retried_forever() {
    let s = setup("aws-shadow", "$aws/things/dev-1/shadow/update");
    let refusal = json!({"code": 413, "message": "The payload exceeds the maximum size allowed", "timestamp": 1});
    let mut resent = Vec::new();
    for _ in 0..6 {
        s.cloud.publish(AWS_REJECTED, refusal.to_string());
        let seen = s.cloud.drain(Duration::from_millis(1500));
        resent.push(
            seen.iter()
                .filter(|m| online(m))
                .map(|m| m.json.to_string().len())
                .collect::<Vec<_>>(),
        );
    }
    let log = s.agent.log();
    assert!(
        log.contains("WARN") && log.contains("code=413")
            && log.contains("the shadow service rejected an update: The payload exceeds the maximum size allowed"),
        "{log}"
    );
    assert!(
        log.contains("the current state is sent again, trimmed"),
        "{log}"
    );
    assert!(log.contains("the refused one is dropped"), "{log}");
    let counts: Vec<usize> = resent.iter().map(Vec::len).collect();
    assert!(
        counts[0] == 1 && counts[5] == 0,
        "a report sent again per halving, then none: {counts:?}"
    );
    assert!(counts.iter().sum::<usize>() <= 3, "{counts:?}");
}

#[test]
fn a_deployment_runs_end_to_end_in_the_iot_atlas_layout() {
    end_to_end(
        "iot-atlas",
        "state/dev-1/update",
        "state/dev-1/update/delta",
    );
}

#[test]
fn a_deployment_runs_end_to_end_in_the_aws_shadow_layout() {
    end_to_end(
        "aws-shadow",
        "$aws/things/dev-1/shadow/update",
        "$aws/things/dev-1/shadow/update/delta",
    );
}

#[test]
fn redelivered_and_stale_deltas_never_run_a_job_twice() {
    let s = setup("iot-atlas", "state/dev-1/update");
    let first = s.dev.delta(1, "job-a", "a\n");
    for _ in 0..3 {
        s.cloud.publish("state/dev-1/update/delta", first.clone());
    }
    s.cloud
        .publish("state/dev-1/update/delta", s.dev.delta(3, "job-b", "b\n"));
    s.cloud
        .publish("state/dev-1/update/delta", s.dev.delta(2, "job-c", "c\n"));
    s.cloud
        .wait_for(WAIT, "the ack of job-b", |m| is_ack(m, "job-b"));
    let late = s.cloud.drain(Duration::from_millis(1500));
    assert!(
        late.iter()
            .all(|m| !is_ack(m, "job-a") && !is_ack(m, "job-c")),
        "{late:?}"
    );
    assert_eq!(s.dev.jobs(), ["job-a", "job-b"], "{}", s.agent.log());
    assert_eq!(s.dev.installed().as_deref(), Some("b\n"));
    assert_eq!(
        s.agent.log().matches("job finished").count(),
        2,
        "{}",
        s.agent.log()
    );
}

#[test]
fn malformed_deltas_are_rejected_and_reported_and_change_nothing() {
    let s = setup("iot-atlas", "state/dev-1/update");
    let good: serde_json::Value =
        serde_json::from_str(&s.dev.delta(5, "job-ok", "ok\n")).expect("json");
    let mut unknown = good.clone();
    unknown["state"]["deployment"]["extra"] = json!(true);
    let mut wrong_type = good.clone();
    wrong_type["version"] = json!("five");
    let mut missing = good.clone();
    missing["state"]["deployment"]
        .as_object_mut()
        .expect("object")
        .remove("steps");
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"not json at all".to_vec(), "invalid delta"),
        (vec![b' '; 300 << 10], "over the"),
        (unknown.to_string().into_bytes(), "unknown field `extra`"),
        (wrong_type.to_string().into_bytes(), "invalid type"),
        (missing.to_string().into_bytes(), "missing field `steps`"),
        (
            format!("{}{}", "[".repeat(5000), "]".repeat(5000)).into_bytes(),
            "nested deeper",
        ),
    ];
    let shadow_before = std::fs::read(s.dev.root.join("state/shadow.json")).ok();
    for (payload, reason) in bad {
        s.cloud.publish("state/dev-1/update/delta", payload);
        let report = s.cloud.wait_for(WAIT, reason, |m| {
            m.json
                .pointer("/state/reported/deployment/lastRejected/reason")
                .and_then(|r| r.as_str())
                .is_some_and(|r| r.contains(reason))
        });
        assert!(report.topic.ends_with("/update"));
    }
    assert!(s.dev.jobs().is_empty(), "a rejected delta created a job");
    let shadow: serde_json::Value = serde_json::from_slice(
        &std::fs::read(s.dev.root.join("state/shadow.json")).expect("shadow"),
    )
    .expect("parses");
    assert_eq!(
        shadow["last_version"], 0,
        "rejections must not advance the shadow version"
    );
    assert!(shadow_before.is_some());
    s.cloud
        .publish("state/dev-1/update/delta", good.to_string());
    let ack = s
        .cloud
        .wait_for(WAIT, "the ack of job-ok", |m| is_ack(m, "job-ok"));
    assert_eq!(ack.json["status"], "SUCCESS", "{}", s.agent.log());
}

#[test]
fn a_failing_job_is_acknowledged_as_failure_with_the_previous_version() {
    let s = setup("iot-atlas", "state/dev-1/update");
    s.cloud
        .publish("state/dev-1/update/delta", s.dev.delta(1, "job-1", "one\n"));
    s.cloud
        .wait_for(WAIT, "the ack of job-1", |m| is_ack(m, "job-1"));
    let mut bad: serde_json::Value =
        serde_json::from_str(&s.dev.delta(2, "job-2", "two\n")).expect("json");
    bad["state"]["deployment"]["steps"][0]["files"][0]["sha256"] = json!("0".repeat(64));
    s.cloud.publish("state/dev-1/update/delta", bad.to_string());
    let ack = s
        .cloud
        .wait_for(WAIT, "the ack of job-2", |m| is_ack(m, "job-2"));
    assert_eq!(
        ack.json,
        json!({"jobId": "job-2", "status": "FAILURE", "version": "v-job-1"})
    );
    assert_eq!(s.dev.installed().as_deref(), Some("one\n"));
}

#[test]
fn in_the_aws_layout_the_agent_catches_up_from_the_shadow_on_connect() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let dev = device(dir.path(), broker.port, "aws-shadow");
    let base = "$aws/things/dev-1/shadow";
    let shadow_service = TestClient::connect(
        broker.port,
        "shadow",
        &[&format!("{base}/get"), &format!("{base}/update")],
    );
    let agent = AgentProcess::start(&dev.config);
    shadow_service.wait_for(WAIT, "the agent's get request", |m| {
        m.topic.ends_with("/get")
    });
    let delta: serde_json::Value =
        serde_json::from_str(&dev.delta(4, "job-missed", "missed = 1\n")).expect("json");
    let shadow = json!({"version": 4, "state": {"desired": {"deployment": delta["state"]["deployment"]}, "reported": {}}});
    shadow_service.publish(&format!("{base}/get/accepted"), shadow.to_string());
    let ack = shadow_service.wait_for(WAIT, "the ack of the missed job", |m| {
        is_ack(m, "job-missed")
    });
    assert_eq!(
        ack_of(&ack).map(|a| &a["status"]),
        Some(&json!("SUCCESS")),
        "{}",
        agent.log()
    );
    assert_eq!(dev.installed().as_deref(), Some("missed = 1\n"));
}

/// A delta whose payload is served by nginx at `url`.
fn http_delta(version: u64, job: &str, url: &str, bytes: &[u8]) -> String {
    json!({"version": version, "state": {"deployment": {
        "schema": 1, "jobId": job, "version": format!("v-{job}"),
        "steps": [{"updateType": "otabox/file:1",
            "manifest": {"name": "app", "version": job, "payload": "app.conf", "destination": "/var/lib/otabox/files/app.conf"},
            "files": [{"name": "app.conf", "url": url, "size": bytes.len(), "sha256": sha256_hex(bytes)}]}]
    }}})
    .to_string()
}

#[test]
fn payloads_come_over_http_and_an_expired_url_is_reported_as_such() {
    let s = setup("iot-atlas", "state/dev-1/update");
    let nginx = common::services::Nginx::start(&s.dev.root.join("nginx"));
    let bytes = b"served = \"over http\"\n";
    std::fs::write(nginx.www.join("app.conf"), bytes).expect("payload");
    s.cloud.publish(
        "state/dev-1/update/delta",
        http_delta(1, "job-http", &nginx.url("app.conf"), bytes),
    );
    let ack = s
        .cloud
        .wait_for(WAIT, "the ack of job-http", |m| is_ack(m, "job-http"));
    assert_eq!(ack.json["status"], "SUCCESS", "{}", s.agent.log());
    assert_eq!(
        s.dev.installed().as_deref(),
        Some("served = \"over http\"\n")
    );

    let expired = nginx.url("private/app.conf?X-Signature=s3cret&Expires=1");
    s.cloud.publish(
        "state/dev-1/update/delta",
        // Other bytes than installed: the agent must fetch them.
        http_delta(2, "job-expired", &expired, b"served = \"expired\"\n"),
    );
    let seen = s
        .cloud
        .collect_until(WAIT, "the ack of job-expired", |m| is_ack(m, "job-expired"));
    assert_eq!(seen.last().expect("ack").json["status"], "FAILURE");
    let result = seen
        .iter()
        .find_map(|m| {
            m.json
                .pointer("/state/reported/deployment/lastResult")
                .filter(|r| r["jobId"] == "job-expired")
        })
        .unwrap_or_else(|| panic!("no result report: {seen:?}"));
    let message = result["message"].as_str().unwrap_or_default();
    assert!(message.starts_with("url-expired"), "{result}");
    assert!(
        !message.contains("s3cret"),
        "the pre-signed query leaked into the report: {message}"
    );
    // The log says why, at warning level, without the signature.
    let log = s.agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("job finished") && l.contains("job-expired"))
        .unwrap_or_else(|| panic!("no finish line:\n{log}"));
    assert!(
        line.contains(" WARN ")
            && line.contains("step 0 (otabox/file:1) failed in download: url-expired"),
        "{line}"
    );
    assert!(!log.contains("s3cret"), "the signature leaked into the log");
}

#[test]
fn an_agent_killed_mid_download_resumes_without_fetching_stored_bytes_again() {
    let mut s = setup("iot-atlas", "state/dev-1/update");
    let nginx = common::services::Nginx::start(&s.dev.root.join("nginx"));
    std::fs::create_dir_all(nginx.www.join("slow")).expect("slow dir");
    let bytes: Vec<u8> = (0..(1 << 20))
        .map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(nginx.www.join("slow/big.bin"), &bytes).expect("payload");
    s.cloud.publish(
        "state/dev-1/update/delta",
        http_delta(1, "job-big", &nginx.url("slow/big.bin"), &bytes),
    );
    let partial = s
        .dev
        .root
        .join("state/jobs/job-big/payloads/0/app.conf.partial");
    let deadline = std::time::Instant::now() + WAIT;
    while std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0) < 256 << 10 {
        assert!(
            std::time::Instant::now() < deadline,
            "the download never started\n{}",
            s.agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    s.agent.kill();
    let kept = std::fs::metadata(&partial)
        .map(|m| m.len())
        .expect("a partial file survives the kill");
    s.agent = AgentProcess::start(&s.dev.config);
    let seen = s
        .cloud
        .collect_until(Duration::from_secs(30), "the ack after the restart", |m| {
            is_ack(m, "job-big")
        });
    let ack = seen.last().expect("ack");
    let download_progress: Vec<&serde_json::Value> = seen
        .iter()
        .filter_map(|m| m.json.pointer("/state/reported/deployment/progress"))
        .filter(|p| p["phase"] == "download")
        .collect();
    assert!(
        download_progress
            .iter()
            .any(|p| p["done"] == p["total"] && p["total"] == 1 << 20),
        "download progress, complete at the end: {download_progress:?}"
    );
    assert_eq!(ack.json["status"], "SUCCESS", "{}", s.agent.log());
    let requests = nginx.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let resumed_at: u64 = requests[1]
        .1
        .strip_prefix("bytes=")
        .and_then(|r| r.trim_end_matches('-').parse().ok())
        .unwrap_or(0);
    assert_eq!(requests[1].0, 206, "{requests:?}");
    assert!(
        resumed_at > 0 && resumed_at <= kept,
        "resumed at {resumed_at}, {kept} bytes were on disk: {requests:?}"
    );
}

#[test]
fn a_manifest_by_url_is_fetched_verified_and_used() {
    let s = setup("iot-atlas", "state/dev-1/update");
    let nginx = common::services::Nginx::start(&s.dev.root.join("nginx"));
    let bytes = b"by-url = 1\n";
    std::fs::write(nginx.www.join("app.conf"), bytes).expect("payload");
    let manifest = json!({"name": "app", "version": "7", "payload": "app.conf", "destination": "/var/lib/otabox/files/app.conf"}).to_string();
    std::fs::write(nginx.www.join("manifest.json"), &manifest).expect("manifest");
    let delta = |version: u64, job: &str, sha: &str| {
        json!({"version": version, "state": {"deployment": {
            "schema": 1, "jobId": job, "version": "7",
            "steps": [{"updateType": "otabox/file:1", "manifestUrl": nginx.url("manifest.json"), "manifestSha256": sha,
                "files": [{"name": "app.conf", "url": nginx.url("app.conf"), "size": bytes.len(), "sha256": sha256_hex(bytes)}]}]
        }}})
        .to_string()
    };
    s.cloud.publish(
        "state/dev-1/update/delta",
        delta(1, "job-bad-manifest", &"0".repeat(64)),
    );
    let ack = s.cloud.wait_for(WAIT, "the ack of the bad manifest", |m| {
        is_ack(m, "job-bad-manifest")
    });
    assert_eq!(ack.json["status"], "FAILURE", "{}", s.agent.log());
    assert!(
        s.dev.installed().is_none(),
        "nothing may be installed from an unverified manifest"
    );
    s.cloud.publish(
        "state/dev-1/update/delta",
        delta(2, "job-url", &sha256_hex(manifest.as_bytes())),
    );
    let ack = s
        .cloud
        .wait_for(WAIT, "the ack of job-url", |m| is_ack(m, "job-url"));
    assert_eq!(ack.json["status"], "SUCCESS", "{}", s.agent.log());
    assert_eq!(s.dev.installed().as_deref(), Some("by-url = 1\n"));
}
