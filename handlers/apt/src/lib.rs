//! The `otabox/apt:1` handler (alias `microsoft/apt:1`): Debian packages
//! from a Device Update apt manifest, through apt-get and dpkg-query run by
//! the host's process capability.
//!
//! Lifecycle:
//! - `validate` parses the manifest strictly ([`manifest`], [`version`]) and
//!   the device config ([`config`]); warns when the manifest drops a
//!   package the previous manifest of the same name installed.
//! - `is-installed`: the handler's record ([`record`]) holds the step's
//!   installed criteria *and* dpkg has every listed package at its version
//!   (Debian comparison) and none of the removed ones; no apt-get runs.
//! - `download`: `apt-get update` (any index that fails to download or to
//!   verify fails the step) and `apt-get --download-only install`.
//! - `backup`: `apt-get -s install` lists every package the install changes
//!   (dependencies included) with its current version or absence; kept in a
//!   checkpoint.
//! - `install`: one `apt-get install` with `name=version` pins, plain names
//!   and `name-` removals, in the listed order.
//! - `apply`: an agent restart when the manifest installs the agent's own
//!   package (or sets `agentRestartRequired`).
//! - `verify` re-checks dpkg; `commit` writes the record; `rollback`
//!   reinstalls the previous versions and removes what was new, or says
//!   which versions are no longer available.
//!
//! Failures carry apt's words and name what to fix ([`status`]).

pub mod apt;
pub mod config;
pub mod diagnose;
pub mod manifest;
pub mod record;
pub mod status;
pub mod version;

use std::path::Path;

use otabox_sdk::InstalledItem;
use otabox_sdk::prelude::*;

use crate::apt::Apt;
use crate::config::{AptConfig, InventoryScope};
use crate::diagnose::Change;
pub use crate::manifest::{AptManifest, PackageAction};
use crate::record::{Record, Records, STATE_DIR};
use crate::version::Version;

/// The handler's canonical update type.
pub const UPDATE_TYPE: &str = "otabox/apt:1";
/// The Device Update name of the same type.
pub const DEVICE_UPDATE_TYPE: &str = "microsoft/apt:1";

/// Checkpoint key: the changes `backup` expects the install to make.
const BACKUP_KEY: &str = "backup.changes";
/// Checkpoint key: the `apt-get install` targets `download` spelled.
const TARGETS_KEY: &str = "install.targets";

/// apt for the step's configured root.
fn apt_for(job: &Job) -> Apt<'_> {
    Apt::new(&job.config)
}

/// The `apt-get install` arguments, in the listed order, as the manifest
/// spells them (for the plan).
fn targets(job: &Job) -> Vec<String> {
    job.manifest
        .packages
        .iter()
        .map(PackageAction::apt_argument)
        .collect()
}

/// The targets `download` spelled (see [`spell_targets`]), kept so backup
/// and install use the same ones; spelled again when none were kept.
fn apt_targets(job: &Job, apt: &Apt<'_>) -> Result<Vec<String>, Status> {
    let kept: Option<Vec<String>> =
        checkpoint::get_json(TARGETS_KEY).map_err(checkpoint_failure)?;
    match kept {
        Some(targets) => Ok(targets),
        None => spell_targets(job, apt),
    }
}

/// The targets with each pinned version spelled as the repositories spell
/// an equal version (`1.0.8` asked, `1.0.8-0` published, or the reverse):
/// apt pins by exact text. Reads the indexes `update` fetched; runs nothing
/// when no version is pinned.
fn spell_targets(job: &Job, apt: &Apt<'_>) -> Result<Vec<String>, Status> {
    let packages = &job.manifest.packages;
    let pinned: Vec<&str> = packages
        .iter()
        .filter(|p| {
            matches!(
                p,
                PackageAction::Install {
                    version: Some(_),
                    ..
                }
            )
        })
        .map(PackageAction::name)
        .collect();
    let offered = apt.available(&pinned)?;
    Ok(packages
        .iter()
        .map(|p| p.apt_argument_in(&offered))
        .collect())
}

struct AptHandler;

/// A step of this handler.
type Job = otabox_sdk::Job<AptHandler>;

impl Handler for AptHandler {
    type Manifest = AptManifest;
    type Config = AptConfig;

    fn describe() -> Description {
        Description::new(
            "apt",
            env!("CARGO_PKG_VERSION"),
            [UPDATE_TYPE, DEVICE_UPDATE_TYPE],
        )
        .with_rollback()
    }

    fn validate(job: &Job) -> Result<Plan, Status> {
        let m = &job.manifest;
        let mut plan = Plan::new(m.installed_criteria());
        match Records::load(Path::new(STATE_DIR)) {
            Ok(records) => {
                let dropped = records.dropped_by(m);
                if !dropped.is_empty() {
                    plan = plan.warning(format!(
                        "manifest {} {} is not cumulative: it no longer lists {} from the previous \
                         {} manifest; apt leaves them as they are",
                        m.name,
                        m.version,
                        dropped.join(", "),
                        m.name
                    ));
                }
            }
            Err(e) => plan = plan.warning(format!("the cumulative check was skipped: {e}")),
        }
        plan.details
            .push(("packages".into(), targets(job).join(" ")));
        if m.restarts_agent(&job.config.agent_packages) {
            plan.details.push(("agent-restart".into(), "yes".into()));
        }
        Ok(plan)
    }

    fn is_installed(job: &Job) -> Result<bool, Status> {
        let records = Records::load(Path::new(STATE_DIR))
            .map_err(|e| Status::new(status::RECORD_FAILED, e))?;
        let recorded = records
            .manifests
            .get(&job.manifest.name)
            .is_some_and(|r| r.criteria == job.manifest.installed_criteria());
        if !recorded {
            return Ok(false);
        }
        let differences = differences(job)?;
        if !differences.is_empty() {
            info!(
                "{} is recorded but dpkg differs: {}",
                job.manifest.installed_criteria(),
                differences.join("; ")
            );
        }
        Ok(differences.is_empty())
    }

    fn download(job: &Job) -> Result<Outcome, Status> {
        let apt = apt_for(job);
        progress(Phase::Download, 0, 2);
        if cancel_requested() {
            return Ok(Outcome::Cancelled);
        }
        apt.update()?;
        progress(Phase::Download, 1, 2);
        if cancel_requested() {
            return Ok(Outcome::Cancelled);
        }
        let targets = spell_targets(job, &apt)?;
        checkpoint::set_json(TARGETS_KEY, &targets).map_err(checkpoint_failure)?;
        apt.download(&targets, &job.manifest.packages)?;
        progress(Phase::Download, 2, 2);
        Ok(Outcome::Success)
    }

    fn backup(job: &Job) -> Result<Outcome, Status> {
        let apt = apt_for(job);
        let changes = apt.simulate(&apt_targets(job, &apt)?)?.map_err(|out| {
            status::apt_failure(
                status::INSTALL_FAILED,
                "apt-get cannot plan the install",
                &out,
                &job.manifest.packages,
            )
        })?;
        info!("the install changes {}", describe_changes(&changes));
        checkpoint::set_json(BACKUP_KEY, &changes).map_err(checkpoint_failure)?;
        Ok(Outcome::Success)
    }

    fn install(job: &Job) -> Result<Outcome, Status> {
        let apt = apt_for(job);
        let out = apt.install(&apt_targets(job, &apt)?)?;
        if out.success() {
            return Ok(Outcome::Success);
        }
        let failure = status::apt_failure(
            status::INSTALL_FAILED,
            "apt-get install failed",
            &out,
            &job.manifest.packages,
        );
        Err(with_dpkg_states(&apt, failure))
    }

    fn apply(job: &Job) -> Result<Outcome, Status> {
        Ok(if job.manifest.restarts_agent(&job.config.agent_packages) {
            info!("the manifest updates the agent: asking for an agent restart");
            Outcome::RestartAgent
        } else {
            Outcome::Success
        })
    }

    fn verify(job: &Job) -> Result<Outcome, Status> {
        let differences = differences(job)?;
        if differences.is_empty() {
            return Ok(Outcome::Success);
        }
        Err(Status::new(
            status::NOT_AS_EXPECTED,
            format!(
                "after the install dpkg differs from the manifest: {}",
                differences.join("; ")
            ),
        ))
    }

    fn commit(job: &Job) -> Result<Outcome, Status> {
        let dir = Path::new(STATE_DIR);
        let mut records = Records::load(dir).map_err(|e| Status::new(status::RECORD_FAILED, e))?;
        records
            .manifests
            .insert(job.manifest.name.clone(), Record::of(&job.manifest));
        records
            .save(dir)
            .map_err(|e| Status::new(status::RECORD_FAILED, e))?;
        let _ = checkpoint::remove(BACKUP_KEY);
        let _ = checkpoint::remove(TARGETS_KEY);
        Ok(Outcome::Success)
    }

    fn rollback(job: &Job) -> Result<Outcome, Status> {
        rollback(job)
    }

    fn inventory(config: &AptConfig) -> Result<Vec<InstalledItem>, Status> {
        let apt = Apt::new(config);
        let packages = match config.inventory {
            InventoryScope::All => apt.query_all()?,
            InventoryScope::Managed => {
                let records = Records::load(Path::new(STATE_DIR))
                    .map_err(|e| Status::new(status::RECORD_FAILED, e))?;
                let names = records.package_names();
                apt.query(&names.iter().map(String::as_str).collect::<Vec<_>>())?
            }
        };
        Ok(packages
            .into_iter()
            .filter(|(_, p)| p.is_installed())
            .map(|(name, p)| InstalledItem {
                name,
                version: p.version,
                update_type: UPDATE_TYPE.into(),
                details: vec![("status".into(), p.status.trim_end().to_string())],
            })
            .collect())
    }
}

export_handler!(AptHandler);

/// A checkpoint the host could not read or write.
fn checkpoint_failure(e: HostError) -> Status {
    Status::new(status::RECORD_FAILED, format!("checkpoint: {e}"))
}

/// Where dpkg differs from the manifest (empty: it matches).
fn differences(job: &Job) -> Result<Vec<String>, Status> {
    let names: Vec<&str> = job.manifest.packages.iter().map(|p| p.name()).collect();
    let dpkg = apt_for(job).query(&names)?;
    let mut found = Vec::new();
    for package in &job.manifest.packages {
        let current = dpkg.get(package.name()).filter(|p| p.is_installed());
        match (package, current) {
            (PackageAction::Install { name, .. }, None) => {
                found.push(format!("{name} is not installed"));
            }
            (
                PackageAction::Install {
                    name,
                    version: Some(want),
                },
                Some(have),
            ) if !same_version(&have.version, want) => {
                found.push(format!("{name} is at {}, not {want}", have.version));
            }
            (PackageAction::Remove { name }, Some(have)) => {
                found.push(format!("{name} {} is still installed", have.version));
            }
            _ => {}
        }
    }
    Ok(found)
}

/// Debian equality (`1.0.8` equals `1.0.8-0`); text equality when dpkg's
/// version does not parse.
fn same_version(installed: &str, want: &Version) -> bool {
    match Version::parse(installed) {
        Ok(have) => have == *want,
        Err(_) => installed == want.to_string(),
    }
}

fn rollback(job: &Job) -> Result<Outcome, Status> {
    let changes: Vec<Change> = checkpoint::get_json(BACKUP_KEY)
        .map_err(checkpoint_failure)?
        .ok_or_else(|| {
            Status::new(
                status::NO_BACKUP,
                "no backup was taken before the install; nothing is known to restore",
            )
        })?;
    if changes.is_empty() {
        return Ok(Outcome::Skipped("the install changed no package".into()));
    }
    let targets: Vec<String> = changes
        .iter()
        .map(|c| match &c.before {
            Some(v) => format!("{}={v}", c.name),
            None => format!("{}-", c.name),
        })
        .collect();
    let apt = apt_for(job);
    if let Err(out) = apt.simulate(&targets)? {
        let failure = status::apt_failure(
            status::ROLLBACK_FAILED,
            "cannot restore the previous versions",
            &out,
            &[],
        );
        return Err(match failure.result_code {
            status::NOT_AVAILABLE => Status {
                result_code: status::ROLLBACK_UNAVAILABLE,
                message: format!(
                    "{}; nothing was changed back, the packages stay as the install left them",
                    failure.message
                ),
                ..failure
            },
            _ => failure,
        });
    }
    info!("restoring {}", targets.join(" "));
    let out = apt.install(&targets)?;
    if !out.success() {
        let failure = status::apt_failure(
            status::ROLLBACK_FAILED,
            "apt-get could not restore the previous versions",
            &out,
            &[],
        );
        return Err(with_dpkg_states(&apt, failure));
    }
    let names: Vec<&str> = changes.iter().map(|c| c.name.as_str()).collect();
    let dpkg = apt.query(&names)?;
    let unrestored: Vec<String> = changes
        .iter()
        .filter(|c| {
            let now = dpkg
                .get(&c.name)
                .filter(|p| p.is_installed())
                .map(|p| p.version.as_str());
            now != c.before.as_deref()
        })
        .map(|c| c.name.clone())
        .collect();
    if !unrestored.is_empty() {
        return Err(Status::new(
            status::ROLLBACK_FAILED,
            format!(
                "apt-get ran but these are not back: {}",
                unrestored.join(", ")
            ),
        ));
    }
    Ok(Outcome::Success)
}

/// Adds dpkg's state of the packages a script failure names.
fn with_dpkg_states(apt: &Apt<'_>, failure: Status) -> Status {
    let Some(names) = failure
        .details
        .iter()
        .find(|(k, _)| k == "packages")
        .map(|(_, v)| v.clone())
    else {
        return failure;
    };
    let names: Vec<&str> = names.split(", ").collect();
    match apt.query(&names) {
        Ok(states) => {
            let text: Vec<String> = names
                .iter()
                .map(|n| match states.get(*n) {
                    Some(p) => format!("{n} {} {}", p.version, p.describe()),
                    None => format!("{n} not known to dpkg"),
                })
                .collect();
            let text = text.join("; ");
            let message = format!("{}; dpkg state: {text}", failure.message);
            Status { message, ..failure }.detail("dpkg-state", text)
        }
        Err(e) => failure.detail("dpkg-state", format!("unknown: {}", e.message)),
    }
}

fn describe_changes(changes: &[Change]) -> String {
    if changes.is_empty() {
        return "no package".into();
    }
    changes
        .iter()
        .map(|c| {
            format!(
                "{} {} -> {}",
                c.name,
                c.before.as_deref().unwrap_or("(none)"),
                c.after.as_deref().unwrap_or("(removed)")
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_the_debian_way() {
        let want = Version::parse("1.0.8").expect("valid");
        assert!(same_version("1.0.8-0", &want));
        assert!(same_version("1.0.8", &want));
        assert!(!same_version("1.0.8-1", &want));
        assert!(!same_version("1:1.0.8", &want));
    }

    #[test]
    fn changes_are_described_for_the_log() {
        let changes = [
            Change {
                name: "foo".into(),
                before: Some("1".into()),
                after: Some("2".into()),
            },
            Change {
                name: "bar".into(),
                before: None,
                after: Some("1".into()),
            },
        ];
        assert_eq!(describe_changes(&changes), "foo 1 -> 2, bar (none) -> 1");
    }
}
