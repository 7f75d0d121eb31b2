//! The container handler through the step workflow against a real isolated
//! dockerd and a real registry on loopback, with tiny busybox images built
//! and pushed by the tests.

mod common;

use std::path::{Path, PathBuf};

use common::containers::{Engine, Registry};
use common::pki::Pki;
use common::{failed, inventory_of, runtime};
use otabox::capabilities::DeviceGrant;
use otabox::runtime::{Handler, Runtime};
use otabox::workflow::{StepReport, StepRequest, StepResult, run_step};
use serde_json::{Value, json};

struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    engine: Engine,
    registry: Registry,
    handler: Handler,
    rt: Runtime,
}

async fn rig() -> Rig {
    rig_with(None).await
}

/// A rig whose registry requires `login`; the handler gets the login in
/// its device config.
async fn rig_with(login: Option<(&str, &str)>) -> Rig {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let engine = Engine::dockerd(&root.join("engine"));
    let registry = match login {
        Some((user, password)) => {
            let r = Registry::start_with_login(&root.join("registry"), user, password);
            engine.login(&r.address, user, password);
            r
        }
        None => Registry::start(&root.join("registry")),
    };
    let mut config = engine.handler_config();
    config["insecure_registries"] = json!([registry.address]);
    config["start_timeout_ms"] = json!(10000);
    if let Some((user, password)) = login {
        config["credentials_dir"] = json!(root.join("device-docker").display().to_string());
        config["registries"] =
            json!({registry.address.clone(): {"username": user, "password": password}});
    }
    let rt = runtime(&root);
    let handler = load(&rt, &root, config).await;
    Rig {
        _dir: dir,
        root,
        engine,
        registry,
        handler,
        rt,
    }
}

/// The built container handler in `root/handlers` with `config`.
async fn load(rt: &Runtime, root: &Path, config: Value) -> Handler {
    let manifest = common::copy_built_handler(root, "container");
    let grant = DeviceGrant {
        config: Some(toml::Table::try_from(config).expect("config")),
        ..DeviceGrant::default()
    };
    rt.load_handler(&manifest, Some(&grant))
        .await
        .expect("load the container handler")
}

impl Rig {
    fn image(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.registry.address)
    }

    /// Builds and pushes `repo:tag` with a long-running command.
    fn publish(&self, repo_tag: &str, content: &str) -> String {
        self.engine
            .publish(&self.image(repo_tag), content, r#"["/bin/sleep","3600"]"#)
    }

    async fn deploy(&self, job: &str, version: &str, modules: Value) -> StepReport {
        let manifest = json!({"name": "edge", "version": version, "modules": modules});
        self.deploy_manifest(job, manifest).await
    }

    async fn deploy_manifest(&self, job: &str, manifest: Value) -> StepReport {
        let request = StepRequest {
            job_id: job.into(),
            step: 0,
            update_type: "otabox/container:1".into(),
            manifest: manifest.to_string(),
            payloads: Vec::new(),
            job_dir: self.root.join("jobs").join(job),
            cancel: Default::default(),
        };
        run_step(&self.handler, request, None).await.expect("step")
    }

    /// Asserts `report` skipped the step as installed and the containers
    /// are the ones they were.
    fn unchanged<const N: usize>(
        &self,
        report: &StepReport,
        criteria: &str,
        containers: [(&str, String); N],
    ) {
        assert_eq!(
            report.result,
            StepResult::AlreadyInstalled {
                criteria: criteria.into()
            }
        );
        for (name, id) in containers {
            assert_eq!(self.engine.container_id(name), Some(id), "{name}");
        }
    }

    /// Asserts `report` failed at apply (code 44) and rolled back, with
    /// `module` back in container `id` on `digest`, running; returns the
    /// failure message.
    fn rolled_back<'a>(
        &self,
        report: &'a StepReport,
        module: &str,
        id: &str,
        digest: &str,
    ) -> &'a str {
        let (phase, code, message, rolled_back) = failed(report);
        assert_eq!((phase, code, rolled_back), ("apply", 44, true), "{message}");
        assert_eq!(
            self.engine.container_id(module).as_deref(),
            Some(id),
            "the old container is back"
        );
        assert_eq!(self.engine.state(module), "running");
        assert_eq!(self.engine.digest_of(module), digest);
        message
    }

    fn module(&self, repo_tag: &str) -> Value {
        json!({"image": self.image(repo_tag), "createOptions": {"HostConfig": self.engine.host_config()}})
    }
}

fn installed(report: &StepReport) {
    assert!(
        matches!(report.result, StepResult::Installed { .. }),
        "{:?}\n{:?}",
        report.result,
        report.phases
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_recreate_only_what_changed_and_leave_other_containers_alone() {
    let r = rig().await;
    let sensor = r.publish("sensor:1.0", "sensor 1.0");
    let app_10 = r.publish("app:1.0", "app 1.0");
    let app_11 = r.publish("app:1.1", "app 1.1");
    let bystander = r.engine.run_unmanaged("bystander", &r.image("app:1.0"));

    // First deployment.
    installed(
        &r.deploy(
            "d1",
            "1",
            json!({"sensor": r.module("sensor:1.0"), "app": r.module("app:1.0")}),
        )
        .await,
    );
    assert_eq!(r.engine.state("sensor"), "running");
    assert_eq!(r.engine.state("app"), "running");
    assert_eq!(r.engine.digest_of("app"), app_10);
    assert_eq!(r.engine.digest_of("sensor"), sensor);
    let sensor_id = r.engine.container_id("sensor").expect("sensor");
    let app_id = r.engine.container_id("app").expect("app");

    // A specific tag changes for one module: only that one is recreated.
    installed(
        &r.deploy(
            "d2",
            "2",
            json!({"sensor": r.module("sensor:1.0"), "app": r.module("app:1.1")}),
        )
        .await,
    );
    assert_eq!(
        r.engine.container_id("sensor"),
        Some(sensor_id.clone()),
        "sensor untouched"
    );
    assert_ne!(r.engine.container_id("app"), Some(app_id), "app recreated");
    assert_eq!(r.engine.digest_of("app"), app_11);
    assert_eq!(r.engine.state("app"), "running");
    assert!(
        r.engine.container_id("app.otabox-old").is_none(),
        "commit dropped the old one"
    );

    // The same deployment again: nothing to do.
    let app_id = r.engine.container_id("app").expect("app");
    let again = r
        .deploy(
            "d2-again",
            "2",
            json!({"sensor": r.module("sensor:1.0"), "app": r.module("app:1.1")}),
        )
        .await;
    r.unchanged(&again, "edge-2", [("app", app_id), ("sensor", sensor_id)]);

    // A rolling tag moves in the registry: the next deployment pulls the
    // new digest and recreates the module; a module no longer listed goes.
    let first = r.publish("app:1", "app 1 first build");
    installed(&r.deploy("d3", "3", json!({"app": r.module("app:1")})).await);
    assert_eq!(r.engine.digest_of("app"), first);
    assert!(
        r.engine.container_id("sensor").is_none(),
        "sensor is no longer deployed"
    );
    let moved = r.publish("app:1", "app 1 rebuilt");
    assert_ne!(first, moved);
    installed(&r.deploy("d4", "4", json!({"app": r.module("app:1")})).await);
    assert_eq!(r.engine.digest_of("app"), moved, "re-pulled and recreated");

    let items = inventory_of(&r.handler).await;
    assert_eq!(items.len(), 1, "{items:?}");
    assert_eq!(
        (items[0].name.as_str(), items[0].version.as_str()),
        ("app", "1")
    );

    assert_eq!(
        r.engine.container_id("bystander"),
        Some(bystander),
        "never touched"
    );
    assert_eq!(r.engine.state("bystander"), "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_roll_back_or_stop_before_anything_changes() {
    let r = rig().await;
    let good = r.publish("app:1.0", "app 1.0");
    r.engine
        .publish(&r.image("app:2.0"), "app 2.0 broken", r#"["/bin/false"]"#);
    r.publish("app:2.1-rc1", "app 2.1 candidate");
    installed(
        &r.deploy("d1", "1", json!({"app": r.module("app:1.0")}))
            .await,
    );
    let app_id = r.engine.container_id("app").expect("app");

    // An image that does not start: rolled back to the previous digest.
    let report = r
        .deploy("d2", "2", json!({"app": r.module("app:2.0")}))
        .await;
    let message = r.rolled_back(&report, "app", &app_id, &good);
    assert!(message.contains("module app stopped"), "{message}");

    // An unknown tag: a clear error at validate, nothing stopped.
    let report = r
        .deploy("d3", "3", json!({"app": r.module("app:9.9")}))
        .await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 40), "{message}");
    assert!(
        message.contains("module app") && message.contains("app:9.9"),
        "{message}"
    );
    assert_eq!(r.engine.container_id("app"), Some(app_id.clone()));
    assert_eq!(r.engine.state("app"), "running");

    // A release candidate without opt-in: refused; with it: installed.
    let report = r
        .deploy("d4", "4", json!({"app": r.module("app:2.1-rc1")}))
        .await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 10), "{message}");
    assert!(message.contains("release candidate"), "{message}");
    assert_eq!(r.engine.container_id("app"), Some(app_id));
    let opted = json!({"name": "edge", "version": "5", "allowReleaseCandidates": true,
                       "modules": {"app": r.module("app:2.1-rc1")}});
    installed(&r.deploy_manifest("d5", opted).await);
    assert_eq!(r.engine.state("app"), "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_credentials_come_from_the_device_config_and_stay_secret() {
    const PASSWORD: &str = "s3cret-registry-pw";
    let r = rig_with(Some(("device-7", PASSWORD))).await;
    let digest = r.publish("private:1.0", "private 1.0");
    let modules = json!({"private": r.module("private:1.0")});

    // The same registry without the login: refused at validate.
    let bare_root = r.root.join("bare");
    let mut bare_config = r.engine.handler_config();
    bare_config["insecure_registries"] = json!([r.registry.address]);
    let bare = load(&r.rt, &bare_root, bare_config).await;
    let request = StepRequest {
        job_id: "anon".into(),
        step: 0,
        update_type: "otabox/container:1".into(),
        manifest: json!({"name": "edge", "version": "1", "modules": modules}).to_string(),
        payloads: Vec::new(),
        job_dir: bare_root.join("job"),
        cancel: Default::default(),
    };
    let report = run_step(&bare, request, None).await.expect("step");
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 40), "{message}");
    assert!(message.contains("no basic auth credentials"), "{message}");

    // With the login from the device config: installed, the secret nowhere.
    let report = r.deploy("d1", "1", modules).await;
    installed(&report);
    assert_eq!(r.engine.digest_of("private"), digest);
    let everything = serde_json::to_string(&report).expect("report");
    assert!(!everything.contains(PASSWORD), "{everything}");
    let kept =
        std::fs::read_to_string(r.root.join("device-docker/config.json")).expect("login kept");
    assert!(kept.contains(&r.registry.address));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_are_awaited_and_an_unhealthy_module_is_rolled_back() {
    let r = rig().await;
    let healthy = r
        .engine
        .publish_with_health(&r.image("probe:1.0"), "probe 1.0", true);
    r.engine
        .publish_with_health(&r.image("probe:2.0"), "probe 2.0", false);
    installed(
        &r.deploy("d1", "1", json!({"probe": r.module("probe:1.0")}))
            .await,
    );
    let health = r.engine.ok(&[
        "container",
        "inspect",
        "--format",
        "{{.State.Health.Status}}",
        "probe",
    ]);
    assert_eq!(health, "healthy", "apply waited for the health check");
    let probe_id = r.engine.container_id("probe").expect("probe");

    let report = r
        .deploy("d2", "2", json!({"probe": r.module("probe:2.0")}))
        .await;
    let message = r.rolled_back(&report, "probe", &probe_id, &healthy);
    assert!(message.contains("unhealthy"), "{message}");
}

/// Podman instead of docker, against a registry whose certificate comes
/// from the device's own CA and which requires a login: refused without
/// the CA, then the same must-holds as with docker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn podman_deploys_from_a_registry_signed_by_a_custom_ca() {
    const USER: &str = "device-9";
    const PASSWORD: &str = "podman-pw-77";
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let pki = Pki::new(&root.join("pki"));
    let certs = root.join("registry-ca");
    std::fs::create_dir_all(&certs).expect("cert dir");
    std::fs::copy(pki.ca(), certs.join("ca.crt")).expect("CA");
    let registry = Registry::start_with(&root.join("registry"), Some((USER, PASSWORD)), Some(&pki));
    let engine = Engine::podman(&root.join("engine"), Some(&certs));
    engine.login(&registry.address, USER, PASSWORD);
    let rt = runtime(&root);
    let mut config = engine.handler_config();
    config["start_timeout_ms"] = json!(10000);
    config["credentials_dir"] = json!(root.join("device-auth").display().to_string());
    config["registries"] =
        json!({registry.address.clone(): {"username": USER, "password": PASSWORD}});
    let without_ca = load(&rt, &root.join("no-ca"), config.clone()).await;
    config["registries"][&registry.address]["cert_dir"] = json!(certs.display().to_string());
    let handler = load(&rt, &root, config).await;
    let r = Rig {
        _dir: dir,
        root,
        engine,
        registry,
        handler,
        rt,
    };
    let app_10 = r.publish("app:1.0", "app 1.0");
    let app_11 = r.publish("app:1.1", "app 1.1");
    let sensor = r.publish("sensor:1.0", "sensor 1.0");
    r.engine
        .publish(&r.image("app:2.0"), "app 2.0 broken", r#"["/bin/false"]"#);
    let modules = |app: &str| json!({"sensor": r.module("sensor:1.0"), "app": r.module(app)});

    // The registry's CA unknown to the device: a clear refusal, nothing run.
    let request = StepRequest {
        job_id: "no-ca".into(),
        step: 0,
        update_type: "otabox/container:1".into(),
        manifest: json!({"name": "edge", "version": "1", "modules": modules("app:1.0")})
            .to_string(),
        payloads: Vec::new(),
        job_dir: r.root.join("no-ca/job"),
        cancel: Default::default(),
    };
    let report = run_step(&without_ca, request, None).await.expect("step");
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 47), "{message}");
    assert!(
        message.contains("certificate signed by unknown authority"),
        "{message}"
    );
    assert!(r.engine.container_id("app").is_none());

    // With the CA: the first deployment, then one changed module.
    let bystander = r.engine.run_unmanaged("bystander", &r.image("app:1.0"));
    let report = r.deploy("d1", "1", modules("app:1.0")).await;
    installed(&report);
    assert!(
        !serde_json::to_string(&report)
            .expect("report")
            .contains(PASSWORD)
    );
    assert_eq!(r.engine.state("app"), "running");
    assert_eq!(r.engine.digest_of("app"), app_10);
    assert_eq!(r.engine.digest_of("sensor"), sensor);
    let sensor_id = r.engine.container_id("sensor").expect("sensor");
    installed(&r.deploy("d2", "2", modules("app:1.1")).await);
    assert_eq!(r.engine.container_id("sensor"), Some(sensor_id.clone()));
    assert_eq!(r.engine.digest_of("app"), app_11);
    let app_id = r.engine.container_id("app").expect("app");

    // An image that does not start: rolled back; an unknown tag: refused
    // before anything stops; the same deployment again: nothing to do.
    let report = r.deploy("d3", "3", modules("app:2.0")).await;
    r.rolled_back(&report, "app", &app_id, &app_11);
    let report = r.deploy("d4", "4", modules("app:9.9")).await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 40), "{message}");
    assert!(message.contains("app:9.9"), "{message}");
    let again = r.deploy("d2-again", "2", modules("app:1.1")).await;
    r.unchanged(&again, "edge-2", [("app", app_id), ("sensor", sensor_id)]);
    assert_eq!(r.engine.container_id("bystander"), Some(bystander));
    assert_eq!(r.engine.state("bystander"), "running");
    assert_eq!(inventory_of(&r.handler).await.len(), 2);
}

/// The whole path through the agent: a deployment arrives over MQTT, the
/// modules run, the ack says SUCCESS and the reported inventory lists the
/// module with its tag.
#[test]
fn a_deployment_through_the_agent_runs_the_modules_and_reports_them() {
    use common::services::{Mosquitto, TestClient};
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(60);
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let engine = Engine::dockerd(&root.join("engine"));
    let registry = Registry::start(&root.join("registry"));
    let image = format!("{}/app:1.0", registry.address);
    engine.publish(&image, "app 1.0", r#"["/bin/sleep","3600"]"#);
    let broker = Mosquitto::start(&root.join("broker"));
    common::copy_built_handler(&root, "container");
    let config = root.join("device.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"gw-1\"\n[paths]\nhandlers = \"handlers\"\nstate = \"state\"\n\
             [mqtt]\nport = {}\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n\
             [handlers.container]\nconfig = {{ host = \"{}\", insecure_registries = [\"{}\"], start_timeout_ms = 10000 }}\n",
            broker.port, engine.handler_config()["host"].as_str().unwrap_or_default(), registry.address
        ),
    )
    .expect("device.toml");
    let cloud = TestClient::connect(broker.port, "cloud", &["state/gw-1/update"]);
    let (agent, seen) = common::deploy_through_agent(
        &cloud,
        &config,
        "gw-1",
        "job-edge",
        json!({"schema": 1, "jobId": "job-edge", "version": "1",
            "steps": [{"updateType": "otabox/container:1", "manifest":
                {"name": "edge", "version": "1", "modules": {"app": {"image": image,
                    "createOptions": {"HostConfig": {"NetworkMode": "none"}}}}}}]}),
    );
    assert_eq!(
        seen.last().expect("ack").json["status"],
        "SUCCESS",
        "{}",
        agent.log()
    );
    assert_eq!(engine.state("app"), "running");
    let inventory = "/state/reported/deployment/inventory/otabox~1container:1/app";
    if !seen
        .iter()
        .any(|m| m.json.pointer(inventory) == Some(&json!("1.0")))
    {
        let found = cloud.wait_for_or(WAIT, |m| m.json.pointer(inventory) == Some(&json!("1.0")));
        assert!(
            found.is_some(),
            "no inventory with app 1.0\n{}",
            agent.log()
        );
    }
}
