//! The Debian package under a real systemd: a bookworm system booted with
//! `systemd-nspawn --boot` (host/tests/common/nspawn.rs) installs the
//! package built from this build (`dpkg -i`), and its service talks to a
//! mosquitto, the reference replica and an nginx started here on the
//! host's loopback. Without root these tests are skipped, loudly; under
//! `OTABOX_REQUIRE_TOOLCHAINS=1` a missing tool fails them. One container
//! runs at a time.
//!
//! The first test needs neither root nor a container: it speaks systemd's
//! notify protocol to the agent through a socket of its own.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::apt::AptRepo;
use common::nspawn::{self, Container};
use common::package::{self, PACKAGE_TOOLS, build_deb, ready};
use common::services::{AgentProcess, Mosquitto, Nginx, ReplicaProcess, TestClient, fleet};
use otabox::runtime::sha256_hex;
use serde_json::json;

/// The device id the tests give the installed agent.
const DEVICE: &str = "dev-1";

/// Containers are booted one at a time (each is a whole system).
static ONE_CONTAINER: Mutex<()> = Mutex::new(());

/// The datagrams the agent sends to `socket` within `window`.
fn notifications(socket: &UnixDatagram, window: Duration) -> Vec<String> {
    let deadline = Instant::now() + window;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match socket.recv(&mut buf) {
            Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    seen
}

#[test]
fn the_agent_tells_systemd_it_is_ready_once_subscribed_and_pings_from_its_loop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
    common::copy_built_handler(dir.path(), "file");
    let config = dir.path().join("device.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"{DEVICE}\"\n[mqtt]\nport = {}\n[paths]\nhandlers = \"handlers\"\nstate = \"state\"\n",
            broker.port
        ),
    )
    .expect("device.toml");
    let cloud = TestClient::connect(broker.port, "observer", &["state/dev-1/update"]);
    let socket_env = socket_path.to_str().expect("utf-8");
    // WatchdogSec=0.4: pings every 100 ms.
    let env = [("NOTIFY_SOCKET", socket_env), ("WATCHDOG_USEC", "400000")];

    let mut agent = AgentProcess::start_with_env(&config, &env);
    let first = notifications(&socket, Duration::from_secs(5));
    let ready = first
        .iter()
        .position(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 in {first:?}\n{}", agent.log()));
    assert!(
        first[ready].contains(&format!("STATUS=subscribed at 127.0.0.1:{}", broker.port)),
        "{first:?}"
    );
    let pings = first.iter().filter(|m| m.trim() == "WATCHDOG=1").count();
    assert!(pings >= 10, "{pings} pings in 5 s at 100 ms: {first:?}");
    // It was subscribed when it said so: its online report is out.
    cloud.wait_for(Duration::from_secs(5), "the online report", |m| {
        m.json.pointer("/state/reported/deployment/agent").is_some()
    });
    agent.kill();

    // A loop that hangs (on the first message it receives) stops pinging,
    // though the rest of the process runs on.
    let hung = [
        ("NOTIFY_SOCKET", socket_env),
        ("WATCHDOG_USEC", "400000"),
        ("OTABOX_FAILPOINT", "session:hang"),
    ];
    let agent = AgentProcess::start_with_env(&config, &hung);
    let seen = notifications(&socket, Duration::from_secs(2));
    assert!(seen.iter().any(|m| m.contains("READY=1")), "{seen:?}");
    cloud.publish("state/dev-1/update/accepted", "{}");
    std::thread::sleep(Duration::from_millis(500));
    // What was queued before the hang.
    notifications(&socket, Duration::from_millis(50));
    let after = notifications(&socket, Duration::from_secs(2));
    assert!(
        after.iter().all(|m| m.trim() != "WATCHDOG=1"),
        "still pinging with a hung loop: {after:?}\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("failpoint session:hang: hanging"),
        "{}",
        agent.log()
    );
}

#[test]
fn an_agent_that_cannot_reach_its_broker_is_ready_offline_and_says_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("notify socket");
    common::copy_built_handler(dir.path(), "file");
    let port = common::services::free_port();
    let config = dir.path().join("device.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"{DEVICE}\"\n[mqtt]\nport = {port}\nreconnect_min_ms = 2000\nreconnect_max_ms = 2000\n\
             [paths]\nhandlers = \"handlers\"\nstate = \"state\"\n"
        ),
    )
    .expect("device.toml");
    let env = [
        ("NOTIFY_SOCKET", socket_path.to_str().expect("utf-8")),
        ("WATCHDOG_USEC", "400000"),
    ];
    let agent = AgentProcess::start_with_env(&config, &env);
    let seen = notifications(&socket, Duration::from_secs(4));
    let ready = seen
        .iter()
        .find(|m| m.contains("READY=1"))
        .unwrap_or_else(|| panic!("not ready while offline: {seen:?}\n{}", agent.log()));
    assert!(
        ready.contains(&format!(
            "STATUS=cannot reach the broker at 127.0.0.1:{port}"
        )),
        "{ready}"
    );
    // The reconnect backoff (2 s here) is part of the loop: pings go on.
    assert!(
        seen.iter().filter(|m| m.trim() == "WATCHDOG=1").count() >= 10,
        "{seen:?}"
    );
}

/// A device: the package installed in a booted container, and the cloud
/// side on the host.
struct Device {
    ct: Container,
    broker: Mosquitto,
    db: PathBuf,
    nginx: Nginx,
    cloud: TestClient,
    /// What `dpkg -i` printed.
    installed: String,
    _replica: ReplicaProcess,
    dir: tempfile::TempDir,
    /// Released last, once the container is halted.
    _one: std::sync::MutexGuard<'static, ()>,
}

/// The name of the running test (the harness names its thread so).
fn test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string()
}

/// Everything a container test needs, or `None` when it is skipped; holds
/// the one-container lock until dropped.
fn device() -> Option<Device> {
    let one = ONE_CONTAINER.lock().unwrap_or_else(|e| e.into_inner());
    let tools: Vec<&str> = [nspawn::TOOLS, PACKAGE_TOOLS, &["mosquitto", "nginx"]].concat();
    if !ready(&test_name(), &tools) {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let broker = Mosquitto::start(&root.join("broker"));
    let db = root.join("fleet.db");
    let replica = ReplicaProcess::start(&db, broker.port);
    fleet(&db, &["register", DEVICE]);
    let nginx = Nginx::start(&root.join("nginx"));
    let cloud = TestClient::connect(broker.port, "observer", &["state/dev-1/update"]);
    let deb = build_deb(root, "0.1.0-1");
    let ct = Container::boot(root);
    std::fs::copy(&deb, ct.path("/root/otabox.deb")).expect("copy the package in");
    let installed = ct.ok("dpkg -i /root/otabox.deb 2>&1");
    Some(Device {
        ct,
        broker,
        db,
        nginx,
        cloud,
        installed,
        _replica: replica,
        dir,
        _one: one,
    })
}

impl Device {
    /// Does what an integrator does: sets the device id and the broker in
    /// the conffile, then restarts the service (which returns once the
    /// agent said READY=1).
    fn configure(&self) {
        self.ct.ok(&format!(
            "sed -i -e 's/^# id = .*/id = \"{DEVICE}\"/' -e 's/^# port = 1883/port = {}/' /etc/otabox/device.toml",
            self.broker.port
        ));
        self.ct.ok("systemctl restart otabox");
        assert_eq!(self.ct.property("otabox", "ActiveState"), "active");
    }

    /// Deploys `payload` with the file handler as job `job`, served by
    /// nginx under `location` (`""`, or `"slow/"` at 256 KiB/s).
    fn deploy(&self, job: &str, location: &str, payload: &[u8]) {
        let name = format!("{location}{job}.conf");
        let served = self.nginx.www.join(&name);
        std::fs::create_dir_all(served.parent().expect("parent")).expect("www dir");
        std::fs::write(&served, payload).expect("payload");
        fleet_deploy(
            self,
            json!({"schema": 1, "jobId": job, "version": "1.0",
                   "steps": [{"updateType": "otabox/file:1",
                     "manifest": {"name": "app", "version": job, "payload": "app.conf",
                                  "destination": "/var/lib/otabox/files/app.conf"},
                     "files": [{"name": "app.conf", "url": self.nginx.url(&name),
                                "size": payload.len(), "sha256": sha256_hex(payload)}]}]}),
        );
    }

    /// Every message of the device up to its acknowledgement of `job`, and
    /// those of the 3 s after it.
    fn until_acked(&self, job: &str) -> Vec<serde_json::Value> {
        let mut seen: Vec<serde_json::Value> = self
            .cloud
            .collect_until(Duration::from_secs(90), "the ack", |m| is_ack(&m.json, job))
            .into_iter()
            .map(|m| m.json)
            .collect();
        seen.extend(
            self.cloud
                .drain(Duration::from_secs(3))
                .into_iter()
                .map(|m| m.json),
        );
        seen
    }
}

/// Whether `message` acknowledges `job`.
fn is_ack(message: &serde_json::Value, job: &str) -> bool {
    message["jobId"] == job && message.get("status").is_some()
}

#[test]
fn the_package_installs_and_its_service_runs_a_deployment_to_success() {
    let Some(dev) = device() else { return };
    let ct = &dev.ct;

    // postinst compiled every handler; the unit is valid, enabled, and not
    // started before the device has an id.
    for name in ["apt", "container", "file", "firmware"] {
        assert!(
            dev.installed.contains(&format!("{name}: compiled in ")),
            "{}",
            dev.installed
        );
    }
    assert!(
        dev.installed.contains("set [device] id"),
        "{}",
        dev.installed
    );
    ct.ok("systemd-analyze verify otabox.service");
    assert_eq!(ct.sh_text("systemctl is-enabled otabox").trim(), "enabled");
    assert_eq!(ct.property("otabox", "ActiveState"), "inactive");
    assert_eq!(ct.sh_text("stat -c %a /var/lib/otabox").trim(), "700");
    assert!(ct.path("/etc/otabox/handlers.d").is_dir());

    dev.configure();
    assert_eq!(ct.sh_text("systemctl is-active otabox").trim(), "active");
    assert_eq!(
        ct.property("otabox", "StatusText"),
        format!("subscribed at 127.0.0.1:{}", dev.broker.port)
    );
    // The first start compiled nothing: postinst had.
    let journal = ct.journal("otabox");
    assert!(
        journal.contains("3 handler(s), 0 compiled at start"),
        "{journal}"
    );

    dev.deploy("job-1", "", b"installed = true\n");
    let seen = dev.until_acked("job-1");
    let acks: Vec<&serde_json::Value> = seen.iter().filter(|m| is_ack(m, "job-1")).collect();
    assert_eq!(acks.len(), 1, "{acks:?}");
    assert_eq!(acks[0]["status"], "SUCCESS", "{}", ct.journal("otabox"));
    assert_eq!(
        std::fs::read_to_string(ct.path("/var/lib/otabox/files/app.conf")).expect("installed"),
        "installed = true\n"
    );
    assert_eq!(ct.property("otabox", "NRestarts"), "0");
}

#[test]
fn an_agent_killed_mid_job_is_restarted_by_systemd_and_acknowledges_the_job_once() {
    let Some(dev) = device() else { return };
    let ct = &dev.ct;
    dev.configure();
    let first_pid = ct.property("otabox", "MainPID");

    // 1.5 MiB at 256 KiB/s: about 6 s of download to be killed in.
    let payload = common::noise(3 << 19, 7);
    dev.deploy("job-slow", "slow/", &payload);
    dev.cloud
        .wait_for(Duration::from_secs(30), "the download under way", |m| {
            m.json.pointer("/state/reported/deployment/agent/state") == Some(&json!("downloading"))
        });
    ct.ok("kill -9 $(systemctl show -p MainPID --value otabox)");

    let seen = dev.until_acked("job-slow");
    let acks: Vec<&serde_json::Value> = seen.iter().filter(|m| is_ack(m, "job-slow")).collect();
    assert_eq!(acks.len(), 1, "one acknowledgement: {acks:?}");
    assert_eq!(acks[0]["status"], "SUCCESS", "{}", ct.journal("otabox"));
    assert_eq!(ct.property("otabox", "NRestarts"), "1");
    assert_ne!(ct.property("otabox", "MainPID"), first_pid);
    let journal = ct.journal("otabox");
    assert!(journal.contains("status=9/KILL"), "{journal}");
    assert!(journal.contains("resuming"), "{journal}");
    assert_eq!(
        std::fs::read(ct.path("/var/lib/otabox/files/app.conf")).expect("installed"),
        payload
    );
}

#[test]
fn a_hung_session_loop_is_restarted_by_the_watchdog() {
    let Some(dev) = device() else { return };
    let ct = &dev.ct;
    dev.configure();
    let drop_in = "/etc/systemd/system/otabox.service.d";
    ct.ok(&format!(
        "mkdir -p {drop_in} && printf '[Service]\\nWatchdogSec=2\\n' > {drop_in}/watchdog.conf \
         && systemctl daemon-reload && systemctl restart otabox"
    ));
    // A healthy loop pings: 6 s at WatchdogSec=2, no restart.
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(
        ct.property("otabox", "NRestarts"),
        "0",
        "{}",
        ct.journal("otabox")
    );
    assert_eq!(ct.property("otabox", "ActiveState"), "active");

    // The loop hangs on the first message it gets (the replica's answer to
    // its online report): systemd kills it and starts it again.
    ct.ok(&format!(
        "printf '[Service]\\nEnvironment=OTABOX_FAILPOINT=session:hang\\n' > {drop_in}/hang.conf \
         && systemctl daemon-reload && systemctl restart otabox"
    ));
    ct.wait_for(Duration::from_secs(30), "a restart by the watchdog", |ct| {
        ct.property("otabox", "NRestarts")
            .parse::<u32>()
            .unwrap_or(0)
            >= 1
    });
    let journal = ct.journal("otabox");
    assert!(
        journal.contains("failpoint session:hang: hanging"),
        "{journal}"
    );
    assert!(journal.contains("Watchdog timeout"), "{journal}");

    // Without the failpoint it runs on, and deploys.
    ct.ok(&format!(
        "rm {drop_in}/hang.conf && systemctl daemon-reload && systemctl restart otabox"
    ));
    let restarts = ct.property("otabox", "NRestarts");
    dev.deploy("job-after", "", b"after = true\n");
    let seen = dev.until_acked("job-after");
    assert!(
        seen.iter()
            .any(|m| is_ack(m, "job-after") && m["status"] == "SUCCESS"),
        "{seen:?}"
    );
    assert_eq!(ct.property("otabox", "NRestarts"), restarts);
}

#[test]
fn remove_stops_the_service_and_keeps_config_and_state_and_purge_deletes_them() {
    let Some(dev) = device() else { return };
    let ct = &dev.ct;
    dev.configure();
    dev.deploy("job-1", "", b"kept = true\n");
    dev.until_acked("job-1");

    ct.ok("apt-get remove -y otabox");
    assert_eq!(ct.property("otabox", "ActiveState"), "inactive");
    assert!(
        !ct.sh("pgrep -x otabox").status.success(),
        "the agent still runs"
    );
    for gone in [
        "/usr/bin/otabox",
        "/usr/lib/otabox",
        "/lib/systemd/system/otabox.service",
    ] {
        assert!(
            !ct.path(gone).exists(),
            "{gone} is still there after remove"
        );
    }
    let config =
        std::fs::read_to_string(ct.path("/etc/otabox/device.toml")).expect("conffile kept");
    assert!(
        config.contains(&format!("id = \"{DEVICE}\"")),
        "the integrator's edit is kept"
    );
    assert!(
        ct.path("/var/lib/otabox/journal").exists() || ct.path("/var/lib/otabox/jobs").exists()
    );
    assert!(ct.path("/var/lib/otabox/files/app.conf").exists());
    assert_eq!(
        ct.ok("dpkg-query -W -f='${db:Status-Abbrev}' otabox")
            .trim(),
        "rc"
    );

    ct.ok("apt-get purge -y otabox");
    for gone in [
        "/etc/otabox",
        "/var/lib/otabox",
        "/etc/systemd/system/multi-user.target.wants/otabox.service",
    ] {
        assert!(!ct.path(gone).exists(), "{gone} is still there after purge");
    }
    assert!(!ct.sh("dpkg-query -W otabox").status.success());
}

#[test]
fn the_agent_upgrades_its_own_package_through_apt_and_runs_the_new_binary() {
    let Some(dev) = device() else { return };
    let ct = &dev.ct;
    if !package::tools_ready(&test_name(), &["gpg", "apt-ftparchive"]) {
        return;
    }
    // Version N+1 in a signed repository the device's apt uses, and no
    // other (the Debian mirror the root file system came from is dropped).
    let repo = AptRepo::start(dev.dir.path());
    let next = build_deb(dev.dir.path(), "0.1.0-2");
    std::fs::copy(&next, repo.nginx.www.join("otabox_0.1.0-2.deb")).expect("into the repo");
    repo.publish();
    std::fs::create_dir_all(ct.path("/etc/apt/keyrings")).expect("keyrings");
    std::fs::copy(&repo.keyring, ct.path("/etc/apt/keyrings/otabox-test.gpg")).expect("key");
    ct.ok(&format!(
        "rm -f /etc/apt/sources.list /etc/apt/sources.list.d/* && \
         echo 'deb [signed-by=/etc/apt/keyrings/otabox-test.gpg] http://127.0.0.1:{}/ ./' \
         > /etc/apt/sources.list.d/otabox-test.list",
        repo.nginx.port
    ));
    dev.configure();
    let pid = ct.property("otabox", "MainPID");

    fleet_deploy(
        &dev,
        json!({"schema": 1, "jobId": "job-self", "version": "0.1.0-2",
               "steps": [{"updateType": "otabox/apt:1", "manifest":
                 {"name": "otabox-agent", "version": "0.1.0-2",
                  "packages": [{"name": "otabox", "version": "0.1.0-2"}]}}]}),
    );
    let seen = dev.until_acked("job-self");
    let journal = ct.journal("otabox");
    let acks: Vec<&serde_json::Value> = seen.iter().filter(|m| is_ack(m, "job-self")).collect();
    assert_eq!(acks.len(), 1, "one acknowledgement: {acks:?}\n{journal}");
    assert_eq!(acks[0]["status"], "SUCCESS", "{journal}");

    // dpkg finished (no half-configured package), and the service runs the
    // new binary: the agent re-executed itself, same PID, no restart by
    // systemd, nothing failed.
    assert_eq!(
        ct.ok("dpkg-query -W -f='${Version} ${db:Status-Abbrev}' otabox")
            .trim(),
        "0.1.0-2 ii"
    );
    assert_eq!(ct.property("otabox", "MainPID"), pid);
    assert_eq!(ct.property("otabox", "NRestarts"), "0");
    assert_eq!(ct.property("otabox", "ActiveState"), "active");
    assert_eq!(
        ct.ok(&format!("readlink /proc/{pid}/exe")).trim(),
        "/usr/bin/otabox",
        "the service still runs the replaced binary"
    );
    assert!(
        ct.ok(&format!("/proc/{pid}/exe --version"))
            .starts_with("otabox ")
    );
    assert!(
        journal.contains("restarting the agent as the update asked"),
        "{journal}"
    );
    assert_eq!(journal.matches(" handler(s), ").count(), 2, "{journal}");
    for unclean in [
        " ERROR ",
        "Main process exited",
        "Failed with result",
        "Watchdog timeout",
    ] {
        assert!(
            !journal.contains(unclean),
            "{unclean:?} in the journal:\n{journal}"
        );
    }
}

/// Deploys `deployment` (a desired state, schema 1) to the device.
fn fleet_deploy(dev: &Device, deployment: serde_json::Value) {
    let file = dev.dir.path().join("deployment.json");
    std::fs::write(&file, deployment.to_string()).expect("deployment");
    fleet(
        &dev.db,
        &["deploy", file.to_str().expect("utf-8"), "--device", DEVICE],
    );
}
