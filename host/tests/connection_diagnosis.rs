//! What the agent and the replica say at the default log level when the
//! broker connection goes wrong: a wrong CA, a closed port, a broker that
//! comes and goes, an ACL that drops the device's topics, and two clients
//! with the same client id. Each warning names host, port and the likely
//! cause, once per change of state.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::services::{AgentProcess, Mosquitto, ReplicaProcess, TestClient, free_port};
use common::*;

const WAIT: Duration = Duration::from_secs(15);

/// Waits until `done(log())`; returns the log.
fn wait_until(what: &str, log: impl Fn() -> String, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = log();
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `log()` holds a warning containing `needle`; returns the log.
fn wait_for_warning(what: &str, log: impl Fn() -> String, needle: &str) -> String {
    wait_until(what, log, |l| !warnings(l, needle).is_empty())
}

/// Waits until `log()` holds a line containing `needle`; returns the log.
fn wait_for_line(what: &str, log: impl Fn() -> String, needle: &str) -> String {
    wait_until(what, log, |l| l.contains(needle))
}

/// The warning lines of `log` that contain `needle`.
fn warnings<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") && l.contains(needle))
        .collect()
}

/// mosquitto config lines for a TLS listener with the certificate of `pki`.
fn tls_listener(pki: &Pki, extra: &str) -> String {
    let p = pki.dir.display();
    format!("cafile {p}/ca.pem\ncertfile {p}/server.pem\nkeyfile {p}/server.key\n{extra}")
}

/// A CA certificate named `name` that signed nothing.
fn stranger_ca(dir: &Path, name: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("ca dir");
    let ok = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-keyout", "ca.key", "-out", "ca.pem", "-subj"])
        .arg(format!("/CN={name}"))
        .current_dir(dir)
        .output()
        .expect("openssl is installed");
    assert!(ok.status.success(), "{ok:?}");
    dir.join("ca.pem")
}

#[test]
fn a_broker_certificate_from_another_ca_is_named_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let pki = Pki::new(&root.join("pki"));
    let port = free_port();
    let _broker = Mosquitto::start_with(
        &root.join("broker"),
        port,
        &tls_listener(&pki, "allow_anonymous true\n"),
    );
    // A CA of another name (UnknownIssuer), and one of the same name as the
    // broker's (a bad signature).
    let cas = [
        stranger_ca(&root.join("stranger"), "someone-else"),
        stranger_ca(&root.join("namesake"), "otabox-test-ca"),
    ];
    let agents: Vec<AgentProcess> = cas
        .iter()
        .enumerate()
        .map(|(i, ca)| {
            let config = file_device(
                &root.join(format!("dev-{i}")),
                "dev-1",
                &format!("port = {port}\nca_file = \"{}\"", ca.display()),
            );
            AgentProcess::start(&config)
        })
        .collect();
    let started = Instant::now();
    for (agent, ca) in agents.iter().zip(&cas) {
        let log = wait_for_warning("wrong CA", || agent.log(), "is not signed by");
        assert!(started.elapsed() < Duration::from_secs(5), "{log}");
        let line = warnings(&log, "is not signed by")[0];
        assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
        assert!(
            line.contains(&format!("[mqtt] ca_file = {}", ca.display())),
            "{line}"
        );
    }
    // They retry every 100 ms to 1 s: the warning is not repeated.
    std::thread::sleep(Duration::from_secs(2));
    for agent in &agents {
        let log = agent.log();
        assert_eq!(warnings(&log, "cannot connect").len(), 1, "{log}");
    }
}

#[test]
fn a_closed_port_a_broker_that_comes_up_and_one_that_goes_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let port = free_port();
    let config = file_device(root, "dev-1", &format!("port = {port}"));
    let agent = AgentProcess::start(&config);
    let nothing = format!("127.0.0.1:{port}: nothing listens on that port");
    wait_for_warning("closed port", || agent.log(), &nothing);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(warnings(&agent.log(), &nothing).len(), 1, "{}", agent.log());

    let mut broker = Mosquitto::start_with(&root.join("broker"), port, "allow_anonymous true\n");
    let again = format!("connected to 127.0.0.1:{port} again after");
    let log = wait_for_line("broker up", || agent.log(), &again);
    assert!(
        log.lines()
            .any(|l| l.contains(" INFO ") && l.contains(&again)),
        "{log}"
    );

    broker.stop();
    let lost = format!("connection lost (127.0.0.1:{port})");
    wait_for_warning("broker gone", || agent.log(), &lost);
    let log = wait_until(
        "refused again after the broker went away",
        || agent.log(),
        |l| warnings(l, &nothing).len() == 2,
    );
    assert_eq!(warnings(&log, &lost).len(), 1, "{log}");
}

/// A device config with the client certificate `cert` and key `key`
/// (issued once per test: issuing again rewrites both files, which an
/// agent starting at that moment could read half-old).
fn tls_device(
    root: &Path,
    pki: &Pki,
    id: &str,
    (cert, key): &(PathBuf, PathBuf),
    port: u16,
) -> PathBuf {
    file_device(
        root,
        id,
        &format!(
            "port = {port}\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
            pki.ca().display(),
            cert.display(),
            key.display()
        ),
    )
}

#[test]
fn a_device_id_the_broker_acl_does_not_allow_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let pki = Pki::new(&root.join("pki"));
    let acl = root.join("acl");
    std::fs::write(
        &acl,
        "user replica\ntopic readwrite state/#\n\npattern readwrite state/%u/#\n",
    )
    .expect("acl");
    let port = free_port();
    let _broker = Mosquitto::start_with(&root.join("broker"), port, &pki.mosquitto_mtls(&acl));
    let (cert, key) = pki.client("replica");
    let replica =
        ReplicaProcess::start_with(&root.join("fleet.db"), port, &pki.replica_args(&cert, &key));
    wait_for_line("replica", || replica.log(), "connected to");
    // The certificate says pump-0042; the device id says pump-42.
    let identity = pki.client("pump-0042");
    let wrong = AgentProcess::start(&tls_device(
        &root.join("wrong"),
        &pki,
        "pump-42",
        &identity,
        port,
    ));
    let right = AgentProcess::start(&tls_device(
        &root.join("right"),
        &pki,
        "pump-0042",
        &identity,
        port,
    ));
    let log = wait_for_warning("ACL drops", || wrong.log(), "nothing arrived on");
    let line = warnings(&log, "nothing arrived on")[0];
    for needle in [
        "state/pump-42/update/delta",
        "state/pump-42/update",
        "\"pump-42\"",
        "ACL",
        "cert_file",
    ] {
        assert!(line.contains(needle), "{needle:?} in {line}");
    }
    // The device whose id matches its certificate is answered.
    std::thread::sleep(Duration::from_secs(1));
    let log = right.log();
    assert!(log.contains("connected to"), "{log}");
    assert!(warnings(&log, "nothing arrived").is_empty(), "{log}");
}

#[test]
fn two_clients_with_the_same_client_id_are_detected_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let broker = Mosquitto::start(&root.join("broker"));
    let config = file_device(root, "dev-1", &format!("port = {}", broker.port));
    let agent = AgentProcess::start(&config);
    wait_for_line("agent", || agent.log(), "connected to");
    // Another client takes the same id: mosquitto closes the older
    // connection each time the other connects.
    let _twin = TestClient::connect(broker.port, "dev-1", &[]);
    let log = wait_for_warning("duplicate", || agent.log(), "duplicate client id");
    let line = warnings(&log, "duplicate client id")[0];
    assert!(line.contains("\"dev-1\""), "{line}");
    std::thread::sleep(Duration::from_secs(2));
    let log = agent.log();
    assert_eq!(warnings(&log, "duplicate client id").len(), 1, "{log}");
}

#[test]
fn the_replica_says_when_it_loses_the_broker_and_when_it_is_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let mut broker = Mosquitto::start(&root.join("broker"));
    let port = broker.port;
    let replica = ReplicaProcess::start(&root.join("fleet.db"), port);
    wait_for_line("replica", || replica.log(), "connected to");
    broker.stop();
    let lost = format!("connection lost (127.0.0.1:{port})");
    wait_for_warning("replica lost the broker", || replica.log(), &lost);
    wait_for_warning(
        "replica cannot reconnect",
        || replica.log(),
        &format!("127.0.0.1:{port}: nothing listens on that port"),
    );
    broker.restart();
    wait_for_line(
        "replica back",
        || replica.log(),
        &format!("connected to 127.0.0.1:{port} again"),
    );
}
