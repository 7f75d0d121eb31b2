//! What a job leaves behind, through the real agent and mosquitto: the
//! reported installed criteria change only when a step commits, nothing is
//! fetched before the handler has validated the step and said it is not
//! installed, payloads are deleted once a job ends, and the terminal report
//! carries the inventory as it is after the job.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::services::{AgentProcess, Message, Mosquitto, Nginx, TestClient};
use common::*;
use otabox::runtime::sha256_hex;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const DELTA: &str = "state/dev-1/update/delta";

struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    _broker: Mosquitto,
    nginx: Nginx,
    cloud: TestClient,
    agent: AgentProcess,
    version: u64,
}

impl Rig {
    /// A file-handler device keeping `retained` finished job folders.
    fn start(retained: usize) -> Self {
        Self::start_with(retained, "", "", |_| {})
    }

    /// Same, with extra broker config, extra `[mqtt]` lines, and `prepare`
    /// run on the root before the agent starts.
    fn start_with(
        retained: usize,
        broker_extra: &str,
        mqtt_extra: &str,
        prepare: impl FnOnce(&Path),
    ) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        let broker = Mosquitto::start_with(
            &root.join("broker"),
            common::services::free_port(),
            &format!("allow_anonymous true\n{broker_extra}"),
        );
        let config = file_device(
            &root,
            "dev-1",
            &format!("port = {}\n{mqtt_extra}", broker.port),
        );
        prepare(&root);
        let text = std::fs::read_to_string(&config).expect("config");
        let text = text.replacen(
            "[device]\n",
            &format!("[device]\nretained_jobs = {retained}\n"),
            1,
        ) + "[download]\nattempts = 2\n";
        std::fs::write(&config, text).expect("config");
        // A second handler answering to two update types.
        install_handler(
            &root.join("handlers"),
            "hostile",
            &built_wasm("hostile"),
            "otabox-test/hostile:1\", \"otabox-test/counter:1",
            &format!(
                "[[filesystem]]\npath = \"{}\"\naccess = \"rw\"\n[[commands]]\nprogram = \"/bin/true\"\n[network]\nhosts = [\"127.0.0.1\"]\n",
                root.display()
            ),
        );
        let nginx = Nginx::start(&root.join("nginx"));
        let cloud = TestClient::connect(broker.port, "cloud", &["state/dev-1/update"]);
        let agent = AgentProcess::start(&config);
        if cloud
            .wait_for_or(WAIT, |m| m.agent_state().is_some())
            .is_none()
        {
            panic!("the agent never came online:\n{}", agent.log());
        }
        Self {
            _dir: dir,
            root,
            _broker: broker,
            nginx,
            cloud,
            agent,
            version: 0,
        }
    }

    /// Deploys `content` served by nginx as `name` (the URL may be changed
    /// by `url`), with `manifest` overrides; returns the messages up to the
    /// job's ack.
    fn deploy(&mut self, job: &str, content: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<Message> {
        let name = format!("{job}.conf");
        std::fs::write(self.nginx.www.join(&name), content).expect("payload");
        self.version += 1;
        let mut delta = json!({"version": self.version, "state": {"deployment": {
            "schema": 1, "jobId": job, "version": format!("v-{job}"),
            "steps": [{"updateType": "otabox/file:1",
                "manifest": {"name": "app", "version": job, "payload": "app.conf",
                             "destination": "/var/lib/otabox/files/app.conf"},
                "files": [{"name": "app.conf", "url": self.nginx.url(&name),
                           "size": content.len(), "sha256": sha256_hex(content)}]}]
        }}});
        edit(&mut delta["state"]["deployment"]["steps"][0]);
        self.cloud.publish(DELTA, delta.to_string());
        let job = job.to_string();
        self.cloud
            .try_collect_until(WAIT, move |m| {
                m.json.get("jobId").and_then(Value::as_str) == Some(job.as_str())
                    && m.json.get("status").is_some()
            })
            .unwrap_or_else(|seen| {
                panic!(
                    "timed out waiting for the job's ack; saw {seen:?}\nagent:\n{}",
                    self.agent.log()
                )
            })
    }

    fn installed_file(&self) -> Option<Vec<u8>> {
        std::fs::read(self.root.join("files/app.conf")).ok()
    }

    /// Every file under `state/jobs/*/payloads`.
    fn payload_files(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        walk(&self.root.join("state/jobs"), &mut |p| {
            if p.components().any(|c| c.as_os_str() == "payloads") {
                found.push(p.to_path_buf());
            }
        });
        found
    }

    fn job_folders(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join("state/jobs"))
            .expect("jobs")
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

fn walk(dir: &Path, visit: &mut dyn FnMut(&Path)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            walk(&path, visit);
        } else {
            visit(&path);
        }
    }
}

/// The ack's status and the reported state that came before it.
fn outcome(seen: &[Message]) -> (String, Value) {
    let ack = seen.last().expect("the ack");
    let reported = seen
        .iter()
        .rev()
        .find_map(|m| m.json.pointer("/state/reported/deployment"))
        .cloned()
        .unwrap_or_else(|| panic!("no report before the ack: {seen:?}"));
    (ack.json["status"].as_str().unwrap_or("").into(), reported)
}

fn installed_criteria(reported: &Value) -> Value {
    reported["installed"]["otabox/file:1"].clone()
}

#[test]
fn installed_criteria_change_only_when_a_step_commits() {
    let mut rig = Rig::start(100);
    let seen = rig.deploy("good", b"v1\n", |_| {});
    let (status, reported) = outcome(&seen);
    assert_eq!(status, "SUCCESS", "{}", rig.agent.log());
    assert_eq!(installed_criteria(&reported), json!("app-good"));

    // Fails in validate: the manifest lacks its destination.
    let seen = rig.deploy("bad-manifest", b"v2\n", |step| {
        step["manifest"]
            .as_object_mut()
            .expect("manifest")
            .remove("destination");
    });
    let (status, reported) = outcome(&seen);
    assert_eq!(status, "FAILURE");
    assert_eq!(
        reported["lastResult"]["steps"][0]["result"],
        "failed in validate"
    );
    assert_eq!(
        installed_criteria(&reported),
        json!("app-good"),
        "{reported}"
    );

    // Fails in download: the payload is not on the server.
    let seen = rig.deploy("missing-payload", b"v3\n", |step| {
        step["files"][0]["url"] = json!(rig_url_of_nothing(step));
    });
    let (status, reported) = outcome(&seen);
    assert_eq!(status, "FAILURE");
    assert_eq!(
        reported["lastResult"]["steps"][0]["result"],
        "failed in download"
    );
    assert_eq!(
        installed_criteria(&reported),
        json!("app-good"),
        "{reported}"
    );

    // Fails in install and is rolled back: the staging file is blocked.
    let blocker = rig.root.join("files/app.conf.otabox-new");
    std::fs::create_dir_all(&blocker).expect("block the staging file");
    let seen = rig.deploy("rolled-back", b"v4\n", |_| {});
    std::fs::remove_dir(&blocker).expect("unblock");
    let (status, reported) = outcome(&seen);
    assert_eq!(status, "FAILURE");
    assert_eq!(
        reported["lastResult"]["result"], "failed-rolled-back",
        "{reported}"
    );
    assert_eq!(
        installed_criteria(&reported),
        json!("app-good"),
        "{reported}"
    );
    assert_eq!(rig.installed_file().as_deref(), Some(&b"v1\n"[..]));
}

/// The URL of a file the server does not have, on the same server.
fn rig_url_of_nothing(step: &Value) -> String {
    let url = step["files"][0]["url"].as_str().expect("url");
    format!("{}.absent", url)
}

#[test]
fn nothing_is_fetched_for_an_installed_step_and_payloads_go_when_a_job_ends() {
    let mut rig = Rig::start(100);
    let image: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let seen = rig.deploy("big", &image, |_| {});
    let (status, _) = outcome(&seen);
    assert_eq!(status, "SUCCESS", "{}", rig.agent.log());
    let fetched = rig.nginx.requests().len();
    assert_eq!(fetched, 1, "{:?}", rig.nginx.requests());
    assert!(
        rig.payload_files().is_empty(),
        "payloads kept after the job: {:?}",
        rig.payload_files()
    );

    // The same image again under a new job id: already installed, and not
    // one request reaches the payload server.
    let seen = rig.deploy("big-again", &image, |_| {});
    let (status, reported) = outcome(&seen);
    assert_eq!(status, "SUCCESS");
    assert_eq!(
        reported["lastResult"]["result"], "already-installed",
        "{reported}"
    );
    assert_eq!(
        rig.nginx.requests().len(),
        fetched,
        "an installed step fetched its payload: {:?}",
        rig.nginx.requests()
    );
    assert!(
        !seen.iter().any(|m| {
            m.json.pointer("/state/reported/deployment/progress/phase") == Some(&json!("download"))
        }),
        "an installed step reported download progress"
    );

    // A download that fails part-way leaves no partial file behind.
    let seen = rig.deploy("cut", b"short\n", |step| {
        step["files"][0]["size"] = json!(4096);
        step["files"][0]["sha256"] = json!(sha256_hex(&[0u8; 4096]));
    });
    assert_eq!(outcome(&seen).0, "FAILURE");
    assert!(
        rig.payload_files().is_empty(),
        "a failed download left files: {:?}",
        rig.payload_files()
    );
}

#[test]
fn finished_job_folders_are_pruned_beyond_the_retention_and_never_rerun() {
    let mut rig = Rig::start(2);
    for (i, job) in ["j1", "j2", "j3", "j4"].iter().enumerate() {
        let seen = rig.deploy(job, format!("v{i}\n").as_bytes(), |_| {});
        assert_eq!(outcome(&seen).0, "SUCCESS", "{}", rig.agent.log());
    }
    assert_eq!(rig.job_folders(), ["j3", "j4"]);
    // A redelivery of a pruned job under a newer shadow version is still a
    // duplicate: nothing installs, no ack comes.
    let before = rig.installed_file();
    rig.version += 1;
    let payload = b"v-replayed\n";
    std::fs::write(rig.nginx.www.join("j1.conf"), payload).expect("payload");
    let replay = json!({"version": rig.version, "state": {"deployment": {
        "schema": 1, "jobId": "j1", "version": "v-j1",
        "steps": [{"updateType": "otabox/file:1",
            "manifest": {"name": "app", "version": "replayed", "payload": "app.conf",
                         "destination": "/var/lib/otabox/files/app.conf"},
            "files": [{"name": "app.conf", "url": rig.nginx.url("j1.conf"),
                       "size": payload.len(), "sha256": sha256_hex(payload)}]}]
    }}});
    rig.cloud.publish(DELTA, replay.to_string());
    let after = rig.cloud.drain(Duration::from_secs(2));
    assert!(
        !after
            .iter()
            .any(|m| m.json.get("jobId") == Some(&json!("j1"))),
        "a pruned job ran again: {after:?}"
    );
    assert_eq!(rig.installed_file(), before);
    assert!(
        rig.agent.log().contains("ran long ago"),
        "{}",
        rig.agent.log()
    );
}

#[test]
fn reports_key_installed_and_inventory_alike_and_the_result_carries_the_new_inventory() {
    let mut rig = Rig::start(100);
    let seen = rig.deploy("first", b"one\n", |_| {});
    assert_eq!(outcome(&seen).0, "SUCCESS", "{}", rig.agent.log());
    let seen = rig.deploy("second", b"two\n", |_| {});
    let (status, reported) = outcome(&seen);
    assert_eq!(status, "SUCCESS");
    let keys = |v: &Value| -> Vec<String> {
        v.as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default()
    };
    assert_eq!(keys(&reported["installed"]), keys(&reported["inventory"]));
    assert_eq!(reported["installed"]["otabox/file:1"], "app-second");
    // The terminal report, sent before the ack, shows the file as it is
    // after this job (its sha256), not as it was before.
    let items = &reported["inventory"]["otabox/file:1"];
    assert_eq!(
        items["/var/lib/otabox/files/app.conf"],
        json!(format!("sha256:{}", sha256_hex(b"two\n"))),
        "{items}"
    );
}

#[test]
fn a_step_deployed_under_an_alias_is_reported_under_the_handlers_first_update_type() {
    let mut rig = Rig::start(100);
    let seen = rig.deploy("aliased", b"unused\n", |step| {
        *step = json!({"updateType": "otabox-test/counter:1", "manifest": {"action": "ok"}});
    });
    let (status, reported) = outcome(&seen);
    assert_eq!(status, "SUCCESS", "{}", rig.agent.log());
    assert_eq!(
        reported["installed"],
        json!({"otabox-test/hostile:1": "hostile-0"}),
        "{reported}"
    );
}

/// Fills the file handler's directory with `n` files, so that its
/// inventory makes every report about `n` × 120 bytes long.
fn many_files(n: usize) -> impl FnOnce(&Path) {
    move |root: &Path| {
        let files = root.join("files");
        std::fs::create_dir_all(&files).expect("files");
        for i in 0..n {
            std::fs::write(files.join(format!("extra-{i:04}.conf")), i.to_string()).expect("file");
        }
    }
}

/// Reports the broker saw up to the job's ack, each within `max` bytes.
fn assert_reports_within(seen: &[Message], max: usize) {
    for m in seen {
        let size = m.json.to_string().len();
        assert!(size <= max, "a report of {size} bytes reached the cloud");
    }
}

#[test]
fn reports_are_trimmed_to_the_configured_limit_before_they_leave() {
    let mut rig = Rig::start_with(
        100,
        "max_packet_size 6000\n",
        "max_report_bytes = 5000",
        many_files(200),
    );
    let seen = rig.deploy("limited", b"small\n", |_| {});
    let (status, reported) = outcome(&seen);
    assert_eq!(status, "SUCCESS", "{}", rig.agent.log());
    assert_reports_within(&seen, 5000);
    assert!(
        reported["inventoryOmitted"].as_u64().unwrap_or(0) > 0,
        "{reported}"
    );
    assert_eq!(installed_criteria(&reported), json!("app-limited"));
    let log = rig.agent.log();
    assert!(!log.contains("connection lost"), "{log}");
}

#[test]
fn a_report_the_broker_refuses_is_trimmed_and_later_reports_still_flow() {
    // The broker drops any packet over 6000 bytes; the agent's limit is
    // the default 64 KiB, so its reports (an inventory of 200 files) are
    // refused until it trims them.
    let mut rig = Rig::start_with(100, "max_packet_size 6000\n", "", many_files(200));
    let seen = rig.deploy("refused", b"first\n", |_| {});
    let (status, _) = outcome(&seen);
    assert_eq!(status, "SUCCESS", "{}", rig.agent.log());
    let seen = rig.deploy("next", b"second\n", |_| {});
    assert_eq!(outcome(&seen).0, "SUCCESS", "{}", rig.agent.log());
    let log = rig.agent.log();
    assert!(log.contains("sending it trimmed"), "{log}");
    let losses = log.matches("connection lost").count();
    assert!(losses <= 8, "{losses} reconnects:\n{log}");
    assert!(log.contains("reports are limited to"), "{log}");
}

#[test]
fn a_small_report_a_broker_keeps_refusing_is_dropped_in_the_end_and_the_ack_still_arrives() {
    // The broker drops any packet over 1500 bytes, below the smallest
    // report limit (4 KiB): the job's result report, carrying a 1 KiB
    // message, cannot be trimmed to fit. Resent a few times, it is
    // dropped; the ack behind it still goes out.
    let mut rig = Rig::start_with(100, "max_packet_size 1500\n", "", |_| {});
    let seen = rig.deploy("tiny-broker", b"unused\n", |step| {
        *step = json!({"updateType": "otabox-test/hostile:1",
                       "manifest": {"action": "status", "text": "refused\n", "bytes": 1200, "details": 0}});
    });
    let ack = seen.last().expect("the ack");
    assert_eq!(ack.json["status"], "FAILURE", "{}", rig.agent.log());
    let log = rig.agent.log();
    assert!(log.contains("cannot be trimmed; dropped it"), "{log}");
    let losses = log.matches("connection lost").count();
    assert!((6..=12).contains(&losses), "{losses} reconnects:\n{log}");
}

#[test]
fn a_handler_returning_a_2_mib_message_fails_its_job_and_the_next_one_succeeds() {
    let mut rig = Rig::start(100);
    let seen = rig.deploy("flood", b"unused\n", |step| {
        *step = json!({"updateType": "otabox-test/hostile:1",
                       "manifest": {"action": "status", "text": "flood\n", "bytes": 2 << 20, "details": 1000}});
    });
    let (status, reported) = outcome(&seen);
    assert_eq!(status, "FAILURE", "{}", rig.agent.log());
    let message = reported["lastResult"]["message"].as_str().unwrap_or("");
    assert!(
        (1..=1024).contains(&message.len()) && message.starts_with("flood\\n"),
        "{message:?}"
    );
    assert_reports_within(&seen, 64 << 10);
    let seen = rig.deploy("after-flood", b"fine\n", |_| {});
    assert_eq!(outcome(&seen).0, "SUCCESS", "{}", rig.agent.log());
    assert!(
        !rig.agent.log().contains("connection lost"),
        "{}",
        rig.agent.log()
    );
}
