//! The `otabox/container:1` handler: IoT Edge-style deployments of
//! container modules ([`manifest`]), driven through the engine's CLI
//! ([`engine`]).
//!
//! - `validate` refuses create options that reach the host without the
//!   device's consent ([`policy`]) and module names held by containers it
//!   does not manage; resolves every tag to a digest in its registry (no
//!   pull) and keeps the pins in a checkpoint by module name and image
//!   reference, so a retry or a resumed job installs exactly the same
//!   images while a changed reference is resolved again; refuses create
//!   commands over the host's limits. An unknown image or tag fails here,
//!   before anything is stopped; a release-candidate tag is refused unless
//!   the deployment allows it.
//! - `is-installed`: every module's container carries exactly the resolved
//!   spec (digest and options) and is in its desired state, and no other
//!   managed container is left.
//! - `download` pulls the pinned digests the engine lacks (a rolling tag
//!   whose digest moved is pulled again).
//! - `install` leaves unchanged modules alone; a changed module's container
//!   is stopped and kept as `<name>.otabox-old`, a new one created; modules
//!   no longer listed are stopped and kept the same way. Only containers
//!   labelled `otabox.managed=true` are ever touched. A module's env
//!   reaches the engine on standard input, never as an argument.
//! - `apply` starts the new containers and waits for running (and healthy,
//!   when the image has a health check); `commit` removes the kept ones;
//!   `rollback` puts them back and starts them as they were.

pub mod engine;
pub mod manifest;
pub mod policy;
pub mod status;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use otabox_sdk::InstalledItem;
use otabox_sdk::prelude::*;
use serde::{Deserialize, Serialize};

use crate::engine::{Container, Engine, OLD, Resolved};
use crate::manifest::{Config, Deployment, DesiredStatus, ImageRef};

/// The handler's update type.
pub const UPDATE_TYPE: &str = "otabox/container:1";

/// Checkpoint key of the pins: module name → image reference and digest.
const RESOLVED_KEY: &str = "resolved-images";
const CHANGES_KEY: &str = "changes";

/// The digest a module's image reference resolved to in this step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pin {
    /// The reference as the manifest gave it.
    image: String,
    /// What it resolved to.
    digest: String,
}

/// What `install` changed, for `apply`, `commit` and `rollback`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Changes {
    /// Modules with a new container.
    created: Vec<String>,
    /// Containers kept as `<name>.otabox-old`, and whether they ran.
    kept: BTreeMap<String, bool>,
}

/// The engine the device configures.
fn engine_for(job: &Job) -> Engine<'_> {
    Engine::new(&job.config)
}

/// Module name → pinned spec. A module whose image reference this step
/// resolved already (same name, same reference) keeps that digest, so a
/// retry installs exactly the same images; any other is resolved in its
/// registry, and the pins are remembered.
fn resolved(job: &Job) -> Result<BTreeMap<String, Resolved>, Status> {
    let saved: BTreeMap<String, Pin> = checkpoint::get_json(RESOLVED_KEY)
        .map_err(|e| Status::new(status::RECORD, format!("checkpoint: {e}")))?
        .unwrap_or_default();
    let engine = engine_for(job);
    let mut pins = BTreeMap::new();
    let mut logged_in = false;
    for (name, module) in job.manifest.all() {
        let pin = match saved.get(name).filter(|p| p.image == module.image) {
            Some(pin) => pin.clone(),
            None => {
                if !logged_in {
                    engine.login_all()?;
                    logged_in = true;
                }
                resolve(&engine, name, &module.image)?
            }
        };
        pins.insert(name.clone(), pin);
    }
    if pins != saved {
        checkpoint::set_json(RESOLVED_KEY, &pins)
            .map_err(|e| Status::new(status::RECORD, format!("checkpoint: {e}")))?;
    }
    Ok(job
        .manifest
        .all()
        .map(|(name, module)| {
            let digest = pins[name].digest.clone();
            let module = module.clone();
            (name.clone(), Resolved { module, digest })
        })
        .collect())
}

/// Refuses a create option that reaches the host without the device's
/// consent.
fn check_policy(job: &Job) -> Result<(), Status> {
    policy::check(&job.manifest, &job.config.allow).map_err(|e| Status::new(status::REFUSED, e))
}

/// Module `name`'s `image` pinned to the digest its registry has for it.
fn resolve(engine: &Engine<'_>, name: &str, image: &str) -> Result<Pin, Status> {
    let parsed = ImageRef::parse(image).map_err(|e| Status::new(code::INVALID_MANIFEST, e))?;
    let digest = engine.resolve(&parsed, image).map_err(|s| Status {
        message: format!("module {name}: {}", s.message),
        ..s
    })?;
    Ok(Pin {
        image: image.to_string(),
        digest,
    })
}

/// Refuses module names held by containers the handler does not manage
/// (the module's own name, or the name its replaced container is kept
/// under), which install would otherwise fail on or remove.
fn check_names(engine: &Engine<'_>, deployment: &Deployment) -> Result<(), Status> {
    let unmanaged = engine.unmanaged_names()?;
    for (name, _) in deployment.all() {
        let kept = format!("{name}{OLD}");
        if let Some(taken) = unmanaged.iter().find(|n| **n == *name || **n == kept) {
            return Err(Status::new(
                status::NAME_TAKEN,
                format!(
                    "module {name}: a container named {taken} exists that otabox does not \
                     manage; rename or remove it, or rename the module"
                ),
            )
            .detail("module", name.clone()));
        }
    }
    Ok(())
}

struct ContainerHandler;

/// A step of this handler: its manifest is the [`Deployment`].
type Job = otabox_sdk::Job<ContainerHandler>;

impl Handler for ContainerHandler {
    type Manifest = Deployment;
    type Config = Config;

    fn describe() -> Description {
        Description::new("container", env!("CARGO_PKG_VERSION"), [UPDATE_TYPE]).with_rollback()
    }

    fn validate(job: &Job) -> Result<Plan, Status> {
        check_policy(job)?;
        check_names(&engine_for(job), &job.manifest)?;
        let resolved = resolved(job)?;
        for (name, want) in &resolved {
            engine::check_limits(name, want).map_err(|e| {
                Status::new(status::TOO_LARGE, format!("module {name}: {e}"))
                    .detail("module", name.clone())
            })?;
        }
        let mut plan = Plan::new(job.manifest.installed_criteria());
        for (name, r) in &resolved {
            plan.details
                .push((name.clone(), format!("{} = {}", r.module.image, r.digest)));
        }
        Ok(plan)
    }

    fn is_installed(job: &Job) -> Result<bool, Status> {
        let resolved = resolved(job)?;
        let managed = engine_for(job).managed()?;
        let all_match = resolved
            .iter()
            .all(|(name, want)| managed.iter().any(|c| &c.name == name && c.matches(want)));
        let no_strays = managed.iter().all(|c| resolved.contains_key(&c.name));
        Ok(all_match && no_strays)
    }

    fn download(job: &Job) -> Result<Outcome, Status> {
        let engine = engine_for(job);
        let resolved = resolved(job)?;
        engine.login_all()?;
        let total = resolved.len() as u64;
        for (i, (name, r)) in resolved.iter().enumerate() {
            if cancel_requested() {
                return Ok(Outcome::Cancelled);
            }
            let pinned = r.pinned();
            if !engine.has_image(&pinned) {
                info!("pulling {pinned} for {name}");
                engine.pull(r)?;
            }
            progress(Phase::Download, i as u64 + 1, total);
        }
        Ok(Outcome::Success)
    }

    fn backup(_job: &Job) -> Result<Outcome, Status> {
        save_changes(&Changes::default())?;
        Ok(Outcome::Success)
    }

    fn install(job: &Job) -> Result<Outcome, Status> {
        install(job)
    }

    fn apply(job: &Job) -> Result<Outcome, Status> {
        let engine = engine_for(job);
        let resolved = resolved(job)?;
        let changes = load_changes()?;
        for name in &changes.created {
            if resolved[name].module.status == DesiredStatus::Running {
                engine.start(name)?;
            }
        }
        for name in &changes.created {
            wait_until_ready(&engine, name, &resolved[name], &job.config)?;
        }
        Ok(Outcome::Success)
    }

    fn verify(job: &Job) -> Result<Outcome, Status> {
        let engine = engine_for(job);
        for (name, want) in resolved(job)? {
            match engine.inspect(&name)? {
                Some(c) if c.matches(&want) => {}
                Some(c) => {
                    return Err(Status::new(
                        status::NOT_RUNNING,
                        format!("module {name} is {}, not as deployed", c.state),
                    ));
                }
                None => {
                    return Err(Status::new(
                        status::NOT_RUNNING,
                        format!("module {name} has no container"),
                    ));
                }
            }
        }
        Ok(Outcome::Success)
    }

    fn commit(job: &Job) -> Result<Outcome, Status> {
        let engine = engine_for(job);
        for name in load_changes()?.kept.keys() {
            engine.remove(&format!("{name}{OLD}"))?;
        }
        Ok(Outcome::Success)
    }

    fn rollback(job: &Job) -> Result<Outcome, Status> {
        rollback(job)
    }

    fn inventory(config: &Config) -> Result<Vec<InstalledItem>, Status> {
        let managed = Engine::new(config).managed()?;
        Ok(managed
            .into_iter()
            .filter(|c| !c.name.ends_with(OLD))
            .filter_map(|c| {
                let spec = c.spec?;
                Some(InstalledItem {
                    name: c.name,
                    version: spec.version(),
                    update_type: UPDATE_TYPE.into(),
                    details: vec![
                        ("image".into(), spec.image),
                        ("digest".into(), spec.digest),
                        ("state".into(), c.state),
                    ],
                })
            })
            .collect())
    }
}

export_handler!(ContainerHandler);

fn load_changes() -> Result<Changes, Status> {
    checkpoint::get_json::<Changes>(CHANGES_KEY)
        .map_err(|e| Status::new(status::RECORD, format!("checkpoint: {e}")))
        .map(Option::unwrap_or_default)
}

fn save_changes(changes: &Changes) -> Result<(), Status> {
    checkpoint::set_json(CHANGES_KEY, changes)
        .map_err(|e| Status::new(status::RECORD, format!("checkpoint: {e}")))
}

/// Keeps `c` as `<name>.otabox-old`, stopped; records whether it ran.
fn keep_old(engine: &Engine<'_>, c: &Container, changes: &mut Changes) -> Result<(), Status> {
    let was_running = c.state == "running";
    engine.remove(&format!("{}{OLD}", c.name))?;
    if was_running {
        engine.stop(&c.name)?;
    }
    engine.rename(&c.name, &format!("{}{OLD}", c.name))?;
    changes.kept.insert(c.name.clone(), was_running);
    save_changes(changes)
}

fn install(job: &Job) -> Result<Outcome, Status> {
    check_policy(job)?;
    let engine = engine_for(job);
    let resolved = resolved(job)?;
    let mut changes = load_changes()?;
    let managed = engine.managed()?;
    for (name, want) in &resolved {
        let current = managed.iter().find(|c| &c.name == name);
        if let Some(c) = current {
            if c.matches(want) {
                info!("module {name} is unchanged");
                continue;
            }
            keep_old(&engine, c, &mut changes)?;
        }
        engine.create(name, want)?;
        changes.created.push(name.clone());
        save_changes(&changes)?;
        info!("module {name}: created from {}", want.pinned());
    }
    for stray in managed
        .iter()
        .filter(|c| !c.name.ends_with(OLD) && !resolved.contains_key(&c.name))
    {
        info!("module {} is no longer deployed", stray.name);
        keep_old(&engine, stray, &mut changes)?;
    }
    Ok(Outcome::Success)
}

/// Waits until module `name` runs (and is healthy, with a health check)
/// and keeps running for the settle time without a restart.
fn wait_until_ready(
    engine: &Engine<'_>,
    name: &str,
    want: &Resolved,
    config: &Config,
) -> Result<(), Status> {
    if want.module.status == DesiredStatus::Stopped {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_millis(config.start_timeout_ms);
    let inspect = || {
        engine
            .inspect(name)?
            .ok_or_else(|| Status::new(status::NOT_RUNNING, format!("module {name} disappeared")))
    };
    loop {
        let c = inspect()?;
        if c.state == "running" && c.health.as_deref().is_none_or(|h| h == "healthy") {
            std::thread::sleep(Duration::from_millis(config.settle_ms));
            let later = inspect()?;
            if later.state == "running" && later.restarts == c.restarts {
                return Ok(());
            }
            return Err(not_running(engine, name, &later, "stopped"));
        }
        let failed = matches!(c.state.as_str(), "exited" | "dead" | "restarting")
            || c.health.as_deref() == Some("unhealthy");
        if failed || Instant::now() >= deadline {
            let why = if failed {
                "stopped"
            } else {
                "was not ready in time"
            };
            return Err(not_running(engine, name, &c, why));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Why module `name` is not running, with its exit code and its last
/// output (or that it printed none).
fn not_running(engine: &Engine<'_>, name: &str, c: &Container, why: &str) -> Status {
    let health = c
        .health
        .as_deref()
        .map(|h| format!(", {h}"))
        .unwrap_or_default();
    let exit = if c.state == "running" {
        String::new()
    } else {
        format!(", exit code {}", c.exit_code)
    };
    let output = engine.logs(name);
    let said = if output.is_empty() {
        "it printed nothing".to_string()
    } else {
        format!("its last output: {output}")
    };
    let mut status = Status::new(
        status::NOT_RUNNING,
        format!(
            "module {name} {why} (state {}{health}{exit}, {} restart(s)); {said}",
            c.state, c.restarts
        ),
    )
    .detail("module", name);
    if !output.is_empty() {
        status = status.detail("last-output", output);
    }
    status
}

fn rollback(job: &Job) -> Result<Outcome, Status> {
    let engine = engine_for(job);
    let changes = load_changes()?;
    for name in &changes.created {
        engine.remove(name)?;
    }
    for (name, was_running) in &changes.kept {
        let old = format!("{name}{OLD}");
        if engine.inspect(&old)?.is_none() {
            continue;
        }
        engine.remove(name)?;
        engine.rename(&old, name)?;
        if *was_running {
            engine.start(name)?;
        }
        info!("module {name} restored");
    }
    Ok(Outcome::Success)
}
