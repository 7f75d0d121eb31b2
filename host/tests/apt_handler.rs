//! The apt handler through the whole step workflow against a real signed
//! apt repository (packages built by the test, indexes by apt-ftparchive,
//! served by nginx) installing into a scratch root.

mod common;

use std::path::{Path, PathBuf};

use common::apt::{AptRepo, Deb, Sysroot, apt_handler, deb};
use common::{failed, inventory_of, runtime};
use otabox::runtime::{Handler, Runtime};
use otabox::step::{StepReport, StepRequest, StepResult, run_step};
use serde_json::{Value, json};

struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    repo: AptRepo,
    sys: Sysroot,
    handler: Handler,
    _rt: Runtime,
}

/// `foo` depends on `libfoo` at its own version; both exist at 1.0.1 and
/// 1.0.2; `bad`'s postinst fails.
fn standard_packages() -> Vec<Deb> {
    let mut all = Vec::new();
    for v in ["1.0.1", "1.0.2"] {
        all.push(deb("libfoo", v));
        all.push(deb("foo", v).depends(&format!("libfoo (= {v})")));
    }
    all.push(deb("bad", "1.0").postinst_exits(1));
    all.push(deb("tool", "0.9"));
    all.push(deb("tool", "1.1"));
    all
}

async fn rig_with(packages: &[Deb]) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let repo = AptRepo::start(&root);
    repo.add(packages);
    repo.publish();
    let sys = Sysroot::new(&root, &repo);
    let rt = runtime(&root);
    let handler = apt_handler(&rt, &root, &sys).await;
    Rig {
        _dir: dir,
        root,
        repo,
        sys,
        handler,
        _rt: rt,
    }
}

async fn rig() -> Rig {
    rig_with(&standard_packages()).await
}

impl Rig {
    /// Installs `tool` at `version` with the manifest `tools` 1.
    async fn tool_at(&self, job: &str, version: &str) {
        let m = manifest("tools", "1", json!([{"name": "tool", "version": version}]));
        installed(&self.run(job, m).await);
    }

    async fn run(&self, job: &str, manifest: Value) -> StepReport {
        run_step(&self.handler, request(&self.root, job, manifest), None)
            .await
            .expect("the step runs")
    }
}

fn request(root: &Path, job: &str, manifest: Value) -> StepRequest {
    StepRequest {
        job_id: job.into(),
        step: 0,
        update_type: "microsoft/apt:1".into(),
        manifest: manifest.to_string(),
        payloads: Vec::new(),
        job_dir: root.join("jobs").join(job),
        cancel: Default::default(),
    }
}

fn manifest(name: &str, version: &str, packages: Value) -> Value {
    json!({"name": name, "version": version, "packages": packages})
}

fn installed(report: &StepReport) -> &str {
    match &report.result {
        StepResult::Installed { criteria } => criteria,
        other => panic!("expected an install, got {other:?}\n{:?}", report.phases),
    }
}

fn phases(report: &StepReport) -> Vec<&str> {
    report.phases.iter().map(|p| p.phase.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exact_versions_install_upgrade_downgrade_and_remove() {
    let r = rig().await;
    let pinned = |v: &str| json!([{"name": "libfoo", "version": v}, {"name": "foo", "version": v}]);
    let report = r.run("j1", manifest("edge", "1", pinned("1.0.1"))).await;
    assert_eq!(installed(&report), "edge-1");
    assert_eq!(r.sys.version_of("foo").as_deref(), Some("1.0.1"));
    assert_eq!(r.sys.version_of("libfoo").as_deref(), Some("1.0.1"));
    assert_eq!(
        std::fs::read_to_string(r.sys.root.join("usr/share/foo/version")).expect("file"),
        "foo 1.0.1\n"
    );

    installed(&r.run("j2", manifest("edge", "2", pinned("1.0.2"))).await);
    assert_eq!(r.sys.version_of("foo").as_deref(), Some("1.0.2"));
    assert_eq!(r.sys.version_of("libfoo").as_deref(), Some("1.0.2"));

    installed(&r.run("j3", manifest("edge", "3", pinned("1.0.1"))).await);
    assert_eq!(
        r.sys.version_of("foo").as_deref(),
        Some("1.0.1"),
        "downgrade"
    );
    assert_eq!(r.sys.version_of("libfoo").as_deref(), Some("1.0.1"));

    let removal = json!([{"name": "foo-"}, {"name": "libfoo-"}]);
    installed(&r.run("j4", manifest("edge", "4", removal)).await);
    assert_eq!(r.sys.version_of("foo"), None);
    assert_eq!(r.sys.version_of("libfoo"), None);
    assert!(!r.sys.root.join("usr/share/foo/version").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_omitted_version_installs_the_latest_and_inventory_lists_it() {
    let r = rig().await;
    installed(
        &r.run("j1", manifest("tools", "1", json!([{"name": "tool"}])))
            .await,
    );
    assert_eq!(r.sys.version_of("tool").as_deref(), Some("1.1"));
    let items = inventory_of(&r.handler).await;
    let seen: Vec<(&str, &str, &str)> = items
        .iter()
        .map(|i| (i.name.as_str(), i.version.as_str(), i.update_type.as_str()))
        .collect();
    assert_eq!(seen, [("tool", "1.1", "otabox/apt:1")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_not_in_the_repository_fails_clearly_and_changes_nothing() {
    let r = rig().await;
    r.tool_at("j1", "0.9").await;
    let before = r.sys.snapshot();
    let report = r
        .run(
            "j2",
            manifest("tools", "2", json!([{"name": "tool", "version": "7.7"}])),
        )
        .await;
    let (phase, code, message, rolled_back) = failed(&report);
    assert_eq!(
        (phase, code, rolled_back),
        ("download", 33, false),
        "{message}"
    );
    assert!(
        message.starts_with(
            "version not available: version 7.7 of tool is not in any configured repository"
        ),
        "{message}"
    );
    assert_eq!(r.sys.snapshot(), before, "dpkg and apt history unchanged");
    assert_eq!(r.sys.version_of("tool").as_deref(), Some("0.9"));
}

/// `1.0.8` equals `1.0.8-0` when installing too: the manifest's version
/// is resolved to the repository's spelling of an equal version, both
/// ways (and through leading zeros and an explicit `0:` epoch); a version
/// that is only close is still not available.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_equal_version_spelled_otherwise_installs_the_repository_one() {
    let r = rig_with(&[
        deb("thermocontrol", "1.0.1"),
        deb("thermocontrol", "1.0.2"),
        deb("tempreport", "2.0.0-0"),
        deb("tempreport", "2.1.0-0"),
        deb("sensor", "1:2.5-1"),
    ])
    .await;
    let m = manifest(
        "contoso",
        "1",
        json!([
            {"name": "thermocontrol", "version": "1.0.1-0"},
            {"name": "tempreport", "version": "0:2.0.0"},
            {"name": "sensor", "version": "1:2.05-1"}
        ]),
    );
    let report = r.run("j1", m.clone()).await;
    assert_eq!(installed(&report), "contoso-1");
    assert_eq!(r.sys.version_of("thermocontrol").as_deref(), Some("1.0.1"));
    assert_eq!(r.sys.version_of("tempreport").as_deref(), Some("2.0.0-0"));
    assert_eq!(r.sys.version_of("sensor").as_deref(), Some("1:2.5-1"));
    assert_eq!(
        r.run("j2", m).await.result,
        StepResult::AlreadyInstalled {
            criteria: "contoso-1".into()
        }
    );

    let close = manifest(
        "contoso",
        "2",
        json!([{"name": "thermocontrol", "version": "1.0.1-1"}]),
    );
    let before = r.sys.snapshot();
    let report = r.run("j3", close).await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("download", 33), "{message}");
    assert!(
        message.contains("version 1.0.1-1 of thermocontrol is not in any configured repository"),
        "{message}"
    );
    assert_eq!(r.sys.snapshot(), before);
}

/// The seed documents' pin trap: `aziot-edge=1.4.1-1` alone, while a newer
/// `aziot-identity-service` exists. The failure is headlined by its cause
/// and advises the manifest entry to add, which the parser takes and which
/// then installs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_without_its_dependency_pin_names_the_dependency() {
    let r = rig_with(&[
        deb("aziot-identity-service", "1.4.1"),
        deb("aziot-identity-service", "1.4.2"),
        deb("aziot-edge", "1.4.1-1").depends("aziot-identity-service (= 1.4.1)"),
    ])
    .await;
    let before = r.sys.snapshot();
    let mut packages = json!([{"name": "aziot-edge", "version": "1.4.1-1"}]);
    let report = r.run("j1", manifest("edge", "1", packages.clone())).await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("download", 32), "{message}");
    assert!(
        message.starts_with(
            "unmet dependency: aziot-edge depends on aziot-identity-service (= 1.4.1) \
             but 1.4.2 is to be installed"
        ),
        "{message}"
    );
    let advice =
        r#"add {"name":"aziot-identity-service","version":"1.4.1"} to the manifest's packages"#;
    assert!(message.contains(advice), "{message}");
    assert!(!message.contains("(= 1.4.1) in the manifest"), "{message}");
    assert_eq!(r.sys.snapshot(), before);

    let entry: Value =
        serde_json::from_str(r#"{"name":"aziot-identity-service","version":"1.4.1"}"#)
            .expect("the advised entry is JSON");
    packages.as_array_mut().expect("list").insert(0, entry);
    installed(&r.run("j2", manifest("edge", "1", packages)).await);
    assert_eq!(
        r.sys.version_of("aziot-identity-service").as_deref(),
        Some("1.4.1")
    );
    assert_eq!(r.sys.version_of("aziot-edge").as_deref(), Some("1.4.1-1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_postinst_is_reported_and_rolled_back() {
    let r = rig().await;
    let base = json!([{"name": "libfoo", "version": "1.0.1"}, {"name": "foo", "version": "1.0.1"}]);
    installed(&r.run("j1", manifest("edge", "1", base)).await);
    let with_bad = json!([
        {"name": "libfoo", "version": "1.0.2"},
        {"name": "foo", "version": "1.0.2"},
        {"name": "bad", "version": "1.0"}
    ]);
    let report = r.run("j2", manifest("edge", "2", with_bad)).await;
    let (phase, code, message, rolled_back) = failed(&report);
    assert_eq!((phase, code), ("install", 35), "{message}");
    assert!(rolled_back, "{:?}", report.phases);
    for part in [
        "dpkg failed for bad (--configure)",
        "post-installation script subprocess returned error exit status 1",
        "dpkg state: bad 1.0 iF (half-configured)",
    ] {
        assert!(message.contains(part), "{part:?} in {message}");
    }
    assert!(phases(&report).contains(&"rollback"));
    assert_eq!(r.sys.version_of("foo").as_deref(), Some("1.0.1"));
    assert_eq!(r.sys.version_of("libfoo").as_deref(), Some("1.0.1"));
    assert!(
        !r.sys.packages().contains_key("bad"),
        "{:?}",
        r.sys.packages()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn already_installed_runs_no_apt_get_and_a_hand_removal_is_noticed() {
    let r = rig().await;
    let m = manifest("tools", "1", json!([{"name": "tool", "version": "1.1"}]));
    installed(&r.run("j1", m.clone()).await);
    let before = (r.sys.snapshot(), r.repo.request_count());
    let again = r.run("j2", m.clone()).await;
    assert_eq!(
        again.result,
        StepResult::AlreadyInstalled {
            criteria: "tools-1".into()
        }
    );
    assert_eq!(phases(&again), ["validate", "is-installed", "cleanup"]);
    assert_eq!(
        (r.sys.snapshot(), r.repo.request_count()),
        before,
        "no apt-get update, no install"
    );

    r.sys.remove_by_hand("tool");
    let repaired = r.run("j3", m).await;
    assert_eq!(
        installed(&repaired),
        "tools-1",
        "the hand removal is noticed"
    );
    assert_eq!(r.sys.version_of("tool").as_deref(), Some("1.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_manifest_is_refused_before_apt_runs() {
    let r = rig().await;
    let report = r
        .run(
            "j1",
            manifest("tools", "1", json!([{"name": "tool", "version": "=1.1"}])),
        )
        .await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 10), "{message}");
    assert!(message.contains("package \"tool\""), "{message}");
    assert_eq!(r.repo.request_count(), 0, "nothing fetched");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_or_unsigned_repository_is_refused() {
    let r = rig().await;
    let www = &r.repo.nginx.www;
    let signed = std::fs::read_to_string(www.join("InRelease")).expect("InRelease");
    std::fs::write(
        www.join("InRelease"),
        signed.replacen("Origin: otabox-tests", "Origin: otabox-evil", 1),
    )
    .expect("tamper");
    let m = manifest("tools", "1", json!([{"name": "tool"}]));
    let report = r.run("j1", m.clone()).await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("download", 36), "{message}");
    assert!(message.contains("apt refused a repository"), "{message}");
    assert!(message.contains("signatures were invalid"), "{message}");
    assert_eq!(r.sys.version_of("tool"), None);

    std::fs::remove_file(www.join("InRelease")).expect("unsign");
    let report = r.run("j2", m).await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("download", 36), "{message}");
    assert!(message.contains("is not signed"), "{message}");
    assert!(r.sys.packages().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_without_the_previous_versions_says_so() {
    let r = rig().await;
    r.tool_at("j1", "0.9").await;
    std::fs::remove_file(r.repo.nginx.www.join("tool_0.9_all.deb")).expect("drop 0.9");
    r.repo.publish();
    let report = r
        .run(
            "j2",
            manifest(
                "tools",
                "2",
                json!([{"name": "tool", "version": "1.1"}, {"name": "bad"}]),
            ),
        )
        .await;
    let (phase, code, _, rolled_back) = failed(&report);
    assert_eq!((phase, code, rolled_back), ("install", 35, false));
    let rollback = report
        .phases
        .iter()
        .find(|p| p.phase == "rollback")
        .expect("a rollback was tried");
    for part in [
        "failed (38)",
        "version 0.9 of tool is not in any configured repository",
        "nothing was changed back",
    ] {
        assert!(
            rollback.outcome.contains(part),
            "{part:?} in {}",
            rollback.outcome
        );
    }
    assert_eq!(
        r.sys.version_of("tool").as_deref(),
        Some("1.1"),
        "left as it was"
    );
}

/// The seed documents' manifests, as shipped in `examples/apt`.
fn example(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/apt")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect("example manifest"))
        .expect("example JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_manifests_parse_and_install() {
    let r = rig_with(&[
        deb("thermocontrol", "1.0.1"),
        deb("thermocontrol", "1.0.2"),
        deb("tempreport", "2.0.0"),
        deb("tempreport", "2.0.1"),
        deb("foo", "1.0"),
        deb("aziot-identity-service", "1.4.1-1"),
        deb("aziot-identity-service", "1.4.2-1"),
        deb("aziot-edge", "1.4.2-1").depends("aziot-identity-service (= 1.4.2-1)"),
    ])
    .await;
    installed(&r.run("seed-1", example("contoso-iot-edge")).await);
    assert_eq!(r.sys.version_of("thermocontrol").as_deref(), Some("1.0.1"));
    assert_eq!(r.sys.version_of("tempreport").as_deref(), Some("2.0.0"));

    let correct = r.run("seed-2", example("contoso-iot-edge-correct")).await;
    assert_eq!(installed(&correct), "contoso-iot-edge-1.0.0.1");
    assert!(correct.warnings.is_empty(), "{:?}", correct.warnings);
    assert_eq!(r.sys.version_of("thermocontrol").as_deref(), Some("1.0.2"));
    assert_eq!(r.sys.version_of("tempreport").as_deref(), Some("2.0.0"));

    // The same update without tempreport: installed already (same criteria,
    // dpkg matches), and warned about.
    let incorrect = r.run("seed-3", example("contoso-iot-edge-incorrect")).await;
    assert_eq!(
        incorrect.result,
        StepResult::AlreadyInstalled {
            criteria: "contoso-iot-edge-1.0.0.1".into()
        }
    );
    assert_eq!(incorrect.warnings.len(), 1, "{:?}", incorrect.warnings);
    assert!(
        incorrect.warnings[0].contains("is not cumulative")
            && incorrect.warnings[0].contains("tempreport"),
        "{:?}",
        incorrect.warnings
    );

    installed(
        &r.run(
            "seed-4",
            json!({"name": "video-base", "version": "1", "packages": [{"name": "foo"}]}),
        )
        .await,
    );
    installed(&r.run("seed-5", example("contoso-video")).await);
    assert_eq!(r.sys.version_of("foo"), None, "foo- removes foo");

    installed(&r.run("seed-6", example("aziot-edge")).await);
    assert_eq!(r.sys.version_of("aziot-edge").as_deref(), Some("1.4.2-1"));
    assert_eq!(
        r.sys.version_of("aziot-identity-service").as_deref(),
        Some("1.4.2-1")
    );
}

/// The agent updates itself: the manifest lists the agent's package (here
/// `otabox`, a test package whose marker program says its version), the
/// handler asks for an agent restart, the agent re-executes itself and,
/// from its journal, verifies, commits and acknowledges the job.
#[test]
fn an_agent_package_restarts_the_agent_which_completes_the_job() {
    use common::services::{Mosquitto, TestClient};
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(30);
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let marker = |v: &str| {
        deb("otabox", v).file(
            "usr/bin/otabox-marker",
            &format!("#!/bin/sh\necho otabox {v}\n"),
            0o755,
        )
    };
    let repo = AptRepo::start(&root);
    repo.add(&[marker("1.0"), marker("2.0")]);
    repo.publish();
    let sys = Sysroot::new(&root, &repo);
    sys.install_file(&repo.nginx.www.join("otabox_1.0_all.deb"));
    let run_marker = || {
        let out = std::process::Command::new(sys.root.join("usr/bin/otabox-marker"))
            .output()
            .expect("run the marker");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(run_marker(), "otabox 1.0");

    let broker = Mosquitto::start(&root.join("broker"));
    common::copy_built_handler(&root, "apt");
    let config = root.join("device.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"dev-apt\"\n[paths]\nhandlers = \"handlers\"\nstate = \"state\"\n\
             [mqtt]\nport = {}\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n{}",
            broker.port,
            sys.device_toml("")
        ),
    )
    .expect("device.toml");
    let cloud = TestClient::connect(broker.port, "cloud", &["state/dev-apt/update"]);
    let (agent, seen) = common::deploy_through_agent(
        &cloud,
        &config,
        "dev-apt",
        "job-self",
        json!({
            "schema": 1, "jobId": "job-self", "version": "2.0",
            "steps": [{"updateType": "microsoft/apt:1", "manifest":
                {"name": "otabox-agent", "version": "2.0", "packages": [{"name": "otabox", "version": "2.0"}]}}]
        }),
    );
    let ack = seen.last().expect("the ack");
    let log = agent.log();
    assert_eq!(ack.json["status"], "SUCCESS", "{log}");
    assert_eq!(
        run_marker(),
        "otabox 2.0",
        "the package replaced the marker"
    );
    assert_eq!(log.matches("agent 0.1.0 started").count(), 2, "{log}");
    assert!(
        log.contains("restarting the agent as the update asked"),
        "{log}"
    );
    // Deployed as microsoft/apt:1, reported under the handler's canonical
    // update type, as the inventory is.
    let criteria = "/state/reported/deployment/installed/otabox~1apt:1";
    assert!(
        seen.iter()
            .any(|m| m.json.pointer(criteria) == Some(&json!("otabox-agent-2.0"))),
        "{seen:?}"
    );
    let inventory = "/state/reported/deployment/inventory/otabox~1apt:1/otabox";
    if !seen
        .iter()
        .any(|m| m.json.pointer(inventory) == Some(&json!("2.0")))
    {
        let found = cloud.wait_for_or(WAIT, |m| m.json.pointer(inventory) == Some(&json!("2.0")));
        assert!(
            found.is_some(),
            "no inventory with otabox 2.0\n{seen:?}\n{}",
            agent.log()
        );
    }
}
