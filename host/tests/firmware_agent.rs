//! The firmware handler under the real agent through mosquitto: a reboot is
//! simulated by stopping the agent (its reboot command only leaves a
//! mark), letting the test bootloader boot, and starting the agent again
//! with a new boot id and booted-slot marker.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::firmware::{Board, COMPATIBLE, Loader, health_script};
use common::services::{AgentProcess, Message, Mosquitto, TestClient};
use otabox::replica::{Outcome, OutcomeKind};
use otabox::runtime::sha256_hex;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const UPDATE: &str = "state/fw-1/update";
const DELTA: &str = "state/fw-1/update/delta";

struct Device {
    _dir: tempfile::TempDir,
    root: PathBuf,
    board: Board,
    config: PathBuf,
    _broker: Mosquitto,
    cloud: TestClient,
    boots: u32,
}

impl Device {
    fn new(health_exit: Option<i32>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        let board = Board::new(&root, Loader::Uboot);
        let health = health_exit.map(|code| health_script(&root, code));
        let broker = Mosquitto::start(&root.join("broker"));
        let handlers = root.join("handlers");
        std::fs::create_dir_all(&handlers).expect("handlers");
        let built = Path::new(env!("OTABOX_BUILT_HANDLERS"));
        std::fs::copy(built.join("firmware.wasm"), handlers.join("firmware.wasm")).expect("wasm");
        let mut manifest = std::fs::read_to_string(built.join("firmware.toml")).expect("toml");
        if let Some(h) = &health {
            manifest.push_str(&format!(
                "\n[[commands]]\nprogram = \"{}\"\nargs = [\"**\"]\n",
                h.display()
            ));
        }
        std::fs::write(handlers.join("firmware.toml"), manifest).expect("manifest");
        let config = root.join("device.toml");
        std::fs::write(
            &config,
            format!(
                "[device]\nid = \"fw-1\"\nreboot_command = [\"/usr/bin/touch\", \"{rebooted}\"]\n\
                 [paths]\nhandlers = \"handlers\"\nstate = \"state\"\n\
                 [mqtt]\nport = {port}\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n\
                 [handlers.firmware]\nconfig = {config}\n\
                 [handlers.firmware.mounts]\n\"/var/lib/otabox/firmware\" = \"{r}/fw-state\"\n\
                 \"/run/otabox\" = \"{r}/run\"\n\"/dev/otabox\" = \"{r}/slots\"\n",
                rebooted = root.join("rebooted").display(),
                port = broker.port,
                config = inline_toml(&board.config(health.as_deref())),
                r = root.display(),
            ),
        )
        .expect("device.toml");
        std::fs::write(root.join("boot_id"), "boot-1\n").expect("boot id");
        let cloud = TestClient::connect(broker.port, "cloud", &[UPDATE]);
        Self {
            _dir: dir,
            root,
            board,
            config,
            _broker: broker,
            cloud,
            boots: 1,
        }
    }

    fn start_agent(&self) -> AgentProcess {
        let boot_id = self.root.join("boot_id").display().to_string();
        AgentProcess::start_with_env(&self.config, &[("OTABOX_BOOT_ID_FILE", boot_id.as_str())])
    }

    /// The device reboots: the agent stops, the bootloader boots, and the
    /// agent starts again with a new boot id.
    fn reboot(&mut self, mut agent: AgentProcess, crashes: u32) -> (AgentProcess, String) {
        agent.kill();
        let mut slot = self.board.boot();
        for _ in 0..crashes {
            slot = self.board.boot();
        }
        self.boots += 1;
        std::fs::write(self.root.join("boot_id"), format!("boot-{}\n", self.boots))
            .expect("boot id");
        let _ = std::fs::remove_file(self.root.join("rebooted"));
        (self.start_agent(), slot)
    }

    fn deploy(&self, job: &str, image: &[u8]) {
        let path = self.root.join(format!("{job}.img"));
        std::fs::write(&path, image).expect("image");
        self.cloud.publish(
            DELTA,
            json!({"version": 1, "state": {"deployment": {
                "schema": 1, "jobId": job, "version": "2.0",
                "steps": [{"updateType": "otabox/firmware:1",
                    "manifest": {"name": "rootfs", "version": "2.0", "compatible": COMPATIBLE, "image": "rootfs.img"},
                    "files": [{"name": "rootfs.img", "url": format!("file://{}", path.display()),
                               "size": image.len(), "sha256": sha256_hex(image)}]}]
            }}})
            .to_string(),
        );
    }

    /// Starts the agent, deploys a 1 MiB image as `job`, lets the agent
    /// ask for the reboot, reboots into slot B and collects the messages up
    /// to the job's ack.
    fn install_and_boot_the_new_slot(&mut self, job: &'static str) -> (AgentProcess, Vec<Message>) {
        let agent = self.start_agent();
        self.wait_online();
        let image: Vec<u8> = b"rootfs 2.0 "
            .iter()
            .copied()
            .cycle()
            .take(1 << 20)
            .collect();
        self.deploy(job, &image);
        self.wait_rebooted(&agent);
        let (agent, booted) = self.reboot(agent, 0);
        assert_eq!(booted, "B");
        let seen = self.cloud.collect_until(WAIT, "the ack", ack_of(job));
        (agent, seen)
    }

    fn wait_online(&self) {
        self.cloud.wait_for(WAIT, "the agent online", |m| {
            m.json
                .pointer("/state/reported/deployment/agent/state")
                .is_some()
        });
    }

    fn wait_rebooted(&self, agent: &AgentProcess) {
        let deadline = std::time::Instant::now() + WAIT;
        while !self.root.join("rebooted").exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "no reboot asked for\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A JSON value as a TOML inline value (strings, numbers, arrays, tables).
fn inline_toml(value: &Value) -> String {
    match value {
        Value::Object(map) => format!(
            "{{ {} }}",
            map.iter()
                .map(|(k, v)| format!("{k} = {}", inline_toml(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(inline_toml).collect::<Vec<_>>().join(", ")
        ),
        other => other.to_string(),
    }
}

fn ack_of(job: &'static str) -> impl Fn(&Message) -> bool {
    move |m| {
        m.json.get("jobId").and_then(Value::as_str) == Some(job) && m.json.get("status").is_some()
    }
}

/// Asserts the job was acked FAILURE and last reported as rolled back.
fn acked_rolled_back(agent: &AgentProcess, seen: &[Message]) {
    assert_eq!(
        seen.last().expect("ack").json["status"],
        "FAILURE",
        "{}",
        agent.log()
    );
    let result = last_result(seen).expect("a result report");
    assert_eq!(result["result"], "failed-rolled-back", "{result}");
    let job = result["jobId"].as_str().expect("job id");
    let outcome = fleet_outcome(job, seen);
    assert_eq!(outcome.kind, OutcomeKind::RolledBack, "{outcome:?}");
    assert!(
        outcome.reason.as_deref().is_some_and(|r| !r.is_empty()),
        "{outcome:?}"
    );
}

/// What `otabox fleet status` makes of the last result the device
/// reported for `job`.
fn fleet_outcome(job: &str, seen: &[Message]) -> Outcome {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = otabox::replica::Store::open(&dir.path().join("fleet.db")).expect("store");
    let desired = serde_json::from_value(json!({"schema": 1, "jobId": job, "version": "2.0",
        "steps": [{"updateType": "otabox/firmware:1", "manifest": {}}]}))
    .expect("desired");
    store.deploy("fw-1", &desired).expect("deploy");
    let reported = seen
        .iter()
        .rev()
        .find_map(|m| {
            m.json
                .pointer("/state/reported/deployment")
                .filter(|d| d.get("lastResult").is_some())
        })
        .expect("a result report");
    store.record_report("fw-1", reported).expect("report");
    store
        .status("fw-1")
        .expect("status")
        .expect("known")
        .outcome
}

fn last_result(messages: &[Message]) -> Option<&Value> {
    messages
        .iter()
        .rev()
        .find_map(|m| m.json.pointer("/state/reported/deployment/lastResult"))
}

#[test]
fn a_reboot_into_the_new_slot_completes_the_job() {
    let mut dev = Device::new(None);
    let slot_a = dev.board.slot_sha256("A");
    let (agent, seen) = dev.install_and_boot_the_new_slot("job-ab");
    let ack = seen.last().expect("ack");
    assert_eq!(ack.json["status"], "SUCCESS", "{}", agent.log());
    assert_eq!(
        dev.board.slot_sha256("A"),
        slot_a,
        "the booted slot was never touched"
    );
    let env = dev.board.env();
    assert_eq!(
        (env["BOOT_ORDER"].as_str(), env["BOOT_B_LEFT"].as_str()),
        ("B A", "3")
    );
}

#[test]
fn a_failed_health_check_is_rolled_back_and_reported_once() {
    let mut dev = Device::new(Some(3));
    let (agent, seen) = dev.install_and_boot_the_new_slot("job-sick");
    acked_rolled_back(&agent, &seen);
    // The rollback asks for a reboot into A.
    dev.wait_rebooted(&agent);
    let (agent, booted) = dev.reboot(agent, 0);
    assert_eq!(booted, "A");
    dev.wait_online();
    let later = dev.cloud.drain(Duration::from_secs(2));
    assert!(
        !later.iter().any(|m| ack_of("job-sick")(m)),
        "reported once: {later:?}\n{}",
        agent.log()
    );
}

#[test]
fn the_agent_killed_during_the_write_fails_cleanly_and_spares_the_booted_slot() {
    let dev = Device::new(None);
    // A slot large enough that the write takes a while.
    for slot in ["A", "B"] {
        std::fs::File::options()
            .write(true)
            .open(dev.board.slot(slot))
            .and_then(|f| f.set_len(257 << 20))
            .expect("grow slot");
    }
    let slot_a = dev.board.slot_sha256("A");
    let env_before = dev.board.env();
    let mut agent = dev.start_agent();
    dev.wait_online();
    let image: Vec<u8> = (0..256u32 << 20).map(|i| (i % 253) as u8).collect();
    dev.deploy("job-cut", &image);
    let record = dev.root.join("fw-state/slots.json");
    let deadline = std::time::Instant::now() + WAIT;
    while !std::fs::read_to_string(&record).is_ok_and(|t| t.contains("\"writing\"")) {
        assert!(
            std::time::Instant::now() < deadline,
            "the write never began\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    agent.kill();
    let agent = dev.start_agent();
    let seen = dev.cloud.collect_until(WAIT, "the ack", ack_of("job-cut"));
    acked_rolled_back(&agent, &seen);
    assert_eq!(
        dev.board.slot_sha256("A"),
        slot_a,
        "the booted slot was never touched"
    );
    let env = dev.board.env();
    assert_eq!(env["BOOT_ORDER"], "A B", "{env:?} (before: {env_before:?})");
    assert_eq!(
        env["BOOT_B_LEFT"], "0",
        "the half-written slot is never tried"
    );
    assert!(
        std::fs::read_to_string(&record)
            .expect("record")
            .contains("\"bad\""),
        "the slot is marked bad"
    );
    assert_eq!(dev.board.boot(), "A");
}

#[test]
fn an_image_for_another_device_is_refused_before_anything_is_fetched() {
    let dev = Device::new(None);
    let agent = dev.start_agent();
    dev.wait_online();
    let nginx = common::services::Nginx::start(&dev.root.join("nginx"));
    let image = vec![0x5au8; 4 << 20];
    std::fs::write(nginx.www.join("other.img"), &image).expect("image");
    dev.cloud.publish(
        DELTA,
        json!({"version": 1, "state": {"deployment": {
            "schema": 1, "jobId": "job-other", "version": "2.0",
            "steps": [{"updateType": "otabox/firmware:1",
                "manifest": {"name": "rootfs", "version": "2.0", "compatible": "acme,other-board", "image": "rootfs.img"},
                "files": [{"name": "rootfs.img", "url": nginx.url("other.img"),
                           "size": image.len(), "sha256": sha256_hex(&image)}]}]
        }}})
        .to_string(),
    );
    let seen = dev
        .cloud
        .collect_until(WAIT, "the ack", ack_of("job-other"));
    assert_eq!(
        seen.last().expect("ack").json["status"],
        "FAILURE",
        "{}",
        agent.log()
    );
    let result = last_result(&seen).expect("a result report");
    assert_eq!(
        result["steps"][0]["result"], "failed in validate",
        "{result}"
    );
    assert!(
        result["message"]
            .as_str()
            .unwrap_or("")
            .contains("built for \"acme,other-board\""),
        "{result}"
    );
    let outcome = fleet_outcome("job-other", &seen);
    assert_eq!(outcome.kind, OutcomeKind::Failed, "{outcome:?}");
    assert!(
        outcome.reason.as_deref().is_some_and(
            |r| r.starts_with("failed in validate: ") && r.contains("acme,other-board")
        ),
        "{outcome:?}"
    );
    assert_eq!(
        nginx.requests(),
        [],
        "the image was fetched before validate refused it"
    );
}
