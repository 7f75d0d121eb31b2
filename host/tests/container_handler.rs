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
use otabox::step::{StepReport, StepRequest, StepResult, run_step};
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
    load_lifting(rt, root, config, &[]).await
}

/// Same, the device lifting the docker rule's `deny_args` in `lifts` (the
/// host's layer of the consent the handler's `allow` gives).
async fn load_lifting(rt: &Runtime, root: &Path, config: Value, lifts: &[&str]) -> Handler {
    let manifest = common::copy_built_handler(root, "container");
    let mut grant = DeviceGrant {
        config: Some(toml::Table::try_from(config).expect("config")),
        ..DeviceGrant::default()
    };
    if !lifts.is_empty() {
        grant.allow_args.insert(
            "/usr/bin/docker".into(),
            lifts.iter().map(|l| l.to_string()).collect(),
        );
    }
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
        self.deploy_with(&self.handler, job, manifest).await
    }

    /// Runs the step of `manifest` as job `job` through `handler`.
    async fn deploy_with(&self, handler: &Handler, job: &str, manifest: Value) -> StepReport {
        let request = self.request(job, manifest);
        run_step(handler, request, None).await.expect("step")
    }

    fn request(&self, job: &str, manifest: Value) -> StepRequest {
        StepRequest {
            job_id: job.into(),
            step: 0,
            update_type: "otabox/container:1".into(),
            manifest: manifest.to_string(),
            payloads: Vec::new(),
            job_dir: self.root.join("jobs").join(job),
            cancel: Default::default(),
        }
    }

    /// Calls `validate` alone for job `job`, as `handlers run-phase
    /// validate --job` does; returns the plan's details or the failure.
    async fn validate_only(
        &self,
        job: &str,
        modules: Value,
    ) -> Result<Vec<(String, String)>, String> {
        let manifest = json!({"name": "edge", "version": "1", "modules": modules});
        let request = self.request(job, manifest);
        std::fs::create_dir_all(&request.job_dir).expect("job dir");
        let (scope, ctx) = otabox::step::resumed_call(&self.handler, &request, None);
        match self.handler.validate(scope, &ctx).await.expect("the call") {
            Ok(plan) => Ok(plan.details),
            Err(status) => Err(status.message),
        }
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
        ("app", format!("1@{moved}").as_str()),
        "the rolling tag and the digest it runs"
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
    r.engine.publish(
        &r.image("app:2.0"),
        "app 2.0 broken",
        r#"["/bin/sh","-c","echo starting app 2.0; echo cannot open /dev/sensor0 >&2; exit 3"]"#,
    );
    r.engine
        .publish(&r.image("app:2.2"), "app 2.2 silent", r#"["/bin/false"]"#);
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
    assert!(message.contains("exit code 3"), "{message}");
    assert!(
        message.contains("its last output: ") && message.contains("cannot open /dev/sensor0"),
        "{message}"
    );
    assert!(!message.trim_end().ends_with(':'), "{message}");

    // One that dies without a word says so, with no empty `: ` at the end.
    let report = r
        .deploy("d2b", "2", json!({"app": r.module("app:2.2")}))
        .await;
    let message = r.rolled_back(&report, "app", &app_id, &good);
    assert!(message.ends_with("; it printed nothing"), "{message}");

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
    let mut sensor_module = r.module("sensor:1.0");
    sensor_module["env"] = json!({"MODE": "podman = env"});
    let modules = |app: &str| json!({"sensor": sensor_module, "app": r.module(app)});

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
    let env = r.engine.ok(&[
        "container",
        "inspect",
        "--format",
        "{{json .Config.Env}}",
        "sensor",
    ]);
    assert!(
        env.contains("MODE=podman = env"),
        "the env file reached podman: {env}"
    );
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

/// A device for the agent tests: an isolated dockerd, a registry with
/// `app:1.0` (a long sleep), a broker and a `device.toml` for device `id`
/// granting the container handler.
struct AgentDevice {
    cloud: common::services::TestClient,
    engine: Engine,
    _registry: Registry,
    _broker: common::services::Mosquitto,
    config: PathBuf,
    /// `app:1.0` in the registry, and its digest.
    image: String,
    digest: String,
    /// Dropped last, once the services are stopped.
    _dir: tempfile::TempDir,
}

impl AgentDevice {
    fn start(id: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().canonicalize().expect("canonical");
        let engine = Engine::dockerd(&root.join("engine"));
        let registry = Registry::start(&root.join("registry"));
        let image = format!("{}/app:1.0", registry.address);
        let digest = engine.publish(&image, "app 1.0", r#"["/bin/sleep","3600"]"#);
        let broker = common::services::Mosquitto::start(&root.join("broker"));
        common::copy_built_handler(&root, "container");
        let config = root.join("device.toml");
        std::fs::write(
            &config,
            format!(
                "[device]\nid = \"{id}\"\n[paths]\nhandlers = \"handlers\"\nstate = \"state\"\n\
                 [mqtt]\nport = {}\nreconnect_min_ms = 100\nreconnect_max_ms = 500\n\
                 [handlers.container]\nconfig = {{ host = \"{}\", insecure_registries = [\"{}\"], start_timeout_ms = 10000 }}\n",
                broker.port,
                engine.handler_config()["host"].as_str().unwrap_or_default(),
                registry.address
            ),
        )
        .expect("device.toml");
        let topic = format!("state/{id}/update");
        let cloud = common::services::TestClient::connect(broker.port, "cloud", &[&topic]);
        Self {
            cloud,
            engine,
            _registry: registry,
            _broker: broker,
            config,
            image,
            digest,
            _dir: dir,
        }
    }

    /// A deployment (job `job`, version 1) of the one module `app`.
    fn deployment(job: &str, app: Value) -> Value {
        json!({"schema": 1, "jobId": job, "version": "1",
            "steps": [{"updateType": "otabox/container:1", "manifest":
                {"name": "edge", "version": "1", "modules": {"app": app}}}]})
    }
}

/// The whole path through the agent: a deployment arrives over MQTT, the
/// modules run, the ack says SUCCESS and the reported inventory lists the
/// module with its tag and the digest it runs.
#[test]
fn a_deployment_through_the_agent_runs_the_modules_and_reports_them() {
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(60);
    let d = AgentDevice::start("gw-1");
    let (agent, seen) = common::deploy_through_agent(
        &d.cloud,
        &d.config,
        "gw-1",
        "job-edge",
        AgentDevice::deployment(
            "job-edge",
            json!({"image": d.image, "createOptions": {"HostConfig": {"NetworkMode": "none"}}}),
        ),
    );
    assert_eq!(
        seen.last().expect("ack").json["status"],
        "SUCCESS",
        "{}",
        agent.log()
    );
    assert_eq!(d.engine.state("app"), "running");
    let inventory = "/state/reported/deployment/inventory/otabox~1container:1/app";
    let version = json!(format!("1.0@{}", d.digest));
    if !seen
        .iter()
        .any(|m| m.json.pointer(inventory) == Some(&version))
    {
        let found = d
            .cloud
            .wait_for_or(WAIT, |m| m.json.pointer(inventory) == Some(&version));
        assert!(
            found.is_some(),
            "no inventory with app 1.0\n{}",
            agent.log()
        );
    }
}

/// A changed manifest under the same job id is resolved again: the pins a
/// validate kept are keyed by module name and image reference, so a tag
/// that does not exist fails at validate instead of installing the digest
/// resolved for the old manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_image_under_the_same_job_is_resolved_again() {
    let r = rig().await;
    let v108 = r.publish("temp:1.0.8", "temp 1.0.8");
    let plan = r
        .validate_only("jx", json!({"temp": r.module("temp:1.0.8")}))
        .await
        .expect("1.0.8 validates");
    assert!(
        plan.iter().any(|(k, v)| k == "temp" && v.ends_with(&v108)),
        "{plan:?}"
    );

    let report = r
        .deploy("jx", "1", json!({"temp": r.module("temp:1.0.9")}))
        .await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 40), "{message}");
    assert!(message.contains("temp:1.0.9"), "{message}");
    assert!(r.engine.container_id("temp").is_none(), "nothing installed");

    let v109 = r.publish("temp:1.0.9", "temp 1.0.9");
    installed(
        &r.deploy("jx", "1", json!({"temp": r.module("temp:1.0.9")}))
            .await,
    );
    assert_eq!(r.engine.digest_of("temp"), v109);
}

/// What would fail at install — a create command over the host's limits,
/// too many env entries, a name held by a container otabox does not manage
/// (the module's, or the one its old container is kept under) — fails at
/// validate, and the running module is never stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_name_clashes_are_found_at_validate_with_nothing_stopped() {
    let r = rig().await;
    r.publish("app:1.0", "app 1.0");
    r.publish("app:1.1", "app 1.1");
    installed(
        &r.deploy("d1", "1", json!({"app": r.module("app:1.0")}))
            .await,
    );
    let app_id = r.engine.container_id("app").expect("app");
    let still_running = || {
        assert_eq!(
            r.engine.container_id("app").as_deref(),
            Some(app_id.as_str())
        );
        assert_eq!(r.engine.state("app"), "running");
    };

    let mut many_env = r.module("app:1.1");
    many_env["env"] = (0..10_000)
        .map(|i| (format!("VAR_{i}"), json!("x")))
        .collect::<serde_json::Map<_, _>>()
        .into();
    let mut many_args = r.module("app:1.1");
    many_args["createOptions"]["Cmd"] = (0..5000).map(|i| json!(i.to_string())).collect();
    for (job, module, part) in [
        ("d2", many_env, "10000 env entries"),
        ("d3", many_args, "the host runs at most 4096 arguments"),
    ] {
        let report = r.deploy(job, "2", json!({"app": module})).await;
        let (phase, code, message, _) = failed(&report);
        assert_eq!((phase, code), ("validate", 49), "{message}");
        assert!(message.starts_with("module app: "), "{message}");
        assert!(message.contains(part), "{message}");
        still_running();
    }

    let bystander = r.engine.run_unmanaged("sensor", &r.image("app:1.0"));
    let report = r
        .deploy(
            "d4",
            "2",
            json!({"app": r.module("app:1.1"), "sensor": r.module("app:1.1")}),
        )
        .await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 50), "{message}");
    assert!(
        message
            .contains("module sensor: a container named sensor exists that otabox does not manage"),
        "{message}"
    );
    still_running();
    assert_eq!(r.engine.container_id("sensor"), Some(bystander.clone()));
    assert_eq!(r.engine.state("sensor"), "running");

    let kept_name = r
        .engine
        .run_unmanaged("app.otabox-old", &r.image("app:1.0"));
    let report = r
        .deploy("d5", "2", json!({"app": r.module("app:1.1")}))
        .await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 50), "{message}");
    assert!(message.contains("app.otabox-old"), "{message}");
    still_running();
    assert_eq!(r.engine.container_id("app.otabox-old"), Some(kept_name));

    r.engine.ok(&["rm", "-f", "app.otabox-old"]);
    installed(
        &r.deploy("d6", "2", json!({"app": r.module("app:1.1")}))
            .await,
    );
    assert_eq!(r.engine.container_id("sensor"), Some(bystander));
}

/// Host binds, host namespaces, `Privileged`, added capabilities and
/// devices are refused at validate, naming the module and the field, with
/// nothing stopped — unless the device config allows them by exact path or
/// name; then the engine gets them, and the module's env arrives intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_reaching_options_need_the_devices_consent() {
    let r = rig().await;
    r.publish("app:1.0", "app 1.0");
    installed(
        &r.deploy("d1", "1", json!({"app": r.module("app:1.0")}))
            .await,
    );
    let app_id = r.engine.container_id("app").expect("app");
    r.engine.run_unmanaged("bystander", &r.image("app:1.0"));
    let data = r.root.join("edge-data");
    std::fs::create_dir_all(data.join("sub")).expect("data dir");
    let data_text = data.display().to_string();
    let module = |host_config: Value| json!({"image": r.image("app:1.0"), "createOptions": {"HostConfig": host_config}});
    for (i, (host_config, field)) in [
        (
            json!({"Binds": ["/:/host"]}),
            "HostConfig.Binds \"/:/host\"",
        ),
        (
            json!({"Binds": [format!("{data_text}/../..:/host")]}),
            "without `..`",
        ),
        (
            json!({"Mounts": [{"Type": "bind", "Source": "/", "Target": "/host"}]}),
            "HostConfig.Mounts \"/\"",
        ),
        (
            json!({"NetworkMode": "host"}),
            "HostConfig.NetworkMode \"host\"",
        ),
        (
            json!({"NetworkMode": "container:bystander"}),
            "HostConfig.NetworkMode \"container:bystander\"",
        ),
        (
            json!({"NetworkMode": "none", "PidMode": "host"}),
            "HostConfig.PidMode \"host\"",
        ),
        (
            json!({"NetworkMode": "none", "IpcMode": "host"}),
            "HostConfig.IpcMode \"host\"",
        ),
        (
            json!({"NetworkMode": "none", "Privileged": true}),
            "HostConfig.Privileged",
        ),
        (
            json!({"NetworkMode": "none", "CapAdd": ["SYS_ADMIN"]}),
            "HostConfig.CapAdd \"SYS_ADMIN\"",
        ),
        (
            json!({"NetworkMode": "none", "Devices": [{"PathOnHost": "/dev/mem"}]}),
            "HostConfig.Devices \"/dev/mem\"",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let report = r
            .deploy(
                &format!("refused-{i}"),
                "2",
                json!({"app": module(host_config)}),
            )
            .await;
        let (phase, code, message, _) = failed(&report);
        assert_eq!((phase, code), ("validate", 48), "{message}");
        assert!(message.starts_with("module app: "), "{message}");
        assert!(message.contains(field), "{field:?} in {message}");
        assert!(
            message.contains("the device does not allow") || field == "without `..`",
            "{message}"
        );
        assert_eq!(
            r.engine.container_id("app").as_deref(),
            Some(app_id.as_str())
        );
        assert_eq!(r.engine.state("app"), "running");
    }

    let mut config = r.engine.handler_config();
    config["insecure_registries"] = json!([r.registry.address]);
    config["start_timeout_ms"] = json!(10000);
    config["allow"] = json!({"binds": [data_text], "capabilities": ["NET_ADMIN"],
                             "devices": ["/dev/null"]});
    let consenting = load_lifting(
        &r.rt,
        &r.root.join("consent"),
        config,
        &["--volume=/*", "--cap-add*", "--device*"],
    )
    .await;
    r.engine.publish(
        &r.image("app:2.0"),
        "app 2.0",
        r#"["/bin/sh","-c","echo \"$GREETING\" > /data/from-module; exec sleep 3600"]"#,
    );
    let greeting = "hello = from env, with spaces";
    let allowed = json!({"image": r.image("app:2.0"), "env": {"GREETING": greeting},
        "createOptions": {"HostConfig": {"NetworkMode": "none",
            "Binds": [format!("{data_text}:/data")], "CapAdd": ["NET_ADMIN"],
            "Devices": [{"PathOnHost": "/dev/null", "PathInContainer": "/dev/sensor"}]}}});
    installed(
        &r.deploy_with(
            &consenting,
            "c1",
            json!({"name": "edge", "version": "3",
            "modules": {"app": allowed}}),
        )
        .await,
    );
    let written = std::fs::read_to_string(data.join("from-module")).expect("the module wrote");
    assert_eq!(written.trim_end(), greeting);
    let caps = r.engine.ok(&[
        "container",
        "inspect",
        "--format",
        "{{json .HostConfig.CapAdd}}",
        "app",
    ]);
    assert!(caps.contains("NET_ADMIN"), "{caps}");

    let under = json!({"image": r.image("app:2.0"), "createOptions": {"HostConfig": {
        "NetworkMode": "none", "Binds": [format!("{data_text}/sub:/data")]}}});
    let report = r
        .deploy_with(
            &consenting,
            "c2",
            json!({"name": "edge", "version": "4",
            "modules": {"app": under}}),
        )
        .await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 48), "{message}");
    assert!(message.contains("/sub:/data"), "{message}");
}

/// A module's env values never travel as engine arguments: when `docker
/// create` fails, the agent's log (at debug, where every argument list is
/// written) and the reports hold none of them.
#[test]
fn env_values_never_reach_the_agents_log_when_create_fails() {
    const SECRET: &str = "tok-9f3a-never-logged";
    let d = AgentDevice::start("gw-2");
    let module = json!({"image": d.image, "env": {"API_TOKEN": SECRET, "PLAIN": "1"},
        "createOptions": {"HostConfig": {"NetworkMode": "none",
            "Ulimits": [{"Name": "bogus", "Soft": 1, "Hard": 1}]}}});
    let (agent, seen) = common::deploy_through_agent_with(
        &d.cloud,
        &d.config,
        &[("OTABOX_LOG", "debug")],
        "gw-2",
        "job-secret",
        AgentDevice::deployment("job-secret", module),
    );
    let log = agent.log();
    assert_eq!(seen.last().expect("ack").json["status"], "FAILURE", "{log}");
    let reports: Vec<String> = seen.iter().map(|m| m.json.to_string()).collect();
    assert!(
        reports.iter().any(|r| r.contains("cannot create app")),
        "the create failed: {reports:?}"
    );
    assert!(!log.contains(SECRET), "the env value is in the log:\n{log}");
    assert!(log.contains("--env-file=/dev/stdin"), "{log}");
    for report in &reports {
        assert!(!report.contains(SECRET), "{report}");
    }
}
