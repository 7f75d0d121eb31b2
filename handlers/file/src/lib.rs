//! The `otabox/file:1` handler: installs one verified payload file at a
//! destination inside a directory the device grants, atomically, with backup
//! and rollback.
//!
//! Manifest:
//! ```json
//! {"name": "app-config", "version": "1.2.0",
//!  "payload": "app.conf", "destination": "/var/lib/app/app.conf"}
//! ```
//! Installed criteria: `<name>-<version>`. The file is installed when the
//! destination holds exactly the payload's bytes (sha256).
//!
//! Lifecycle: `backup` copies an existing destination to
//! `<destination>.otabox-backup`; `install` writes `<destination>.otabox-new`
//! and fsyncs it; `apply` renames it over the destination; `verify` re-hashes
//! the destination; `commit` drops the backup; `rollback` restores it (or
//! removes a destination that did not exist before); `cleanup` removes the
//! temporary file. `inventory` lists the files under the configured `root`.
//! Failures are numbered in [`status`].

pub mod status;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use otabox_sdk::prelude::*;
use otabox_sdk::{InstalledItem, PayloadInfo, checkpoint};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// The handler's update type.
pub const UPDATE_TYPE: &str = "otabox/file:1";

/// Checkpoint key: whether the destination existed before the update.
const BACKUP_KEY: &str = "backup.existed";

/// The step manifest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Logical name of the file, used in the installed criteria.
    pub name: String,
    /// Version of the file's content.
    pub version: String,
    /// Name of the payload that holds the content.
    pub payload: String,
    /// Absolute destination path; must lie in a granted directory.
    pub destination: String,
}

/// Device configuration of this handler.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Directory whose files `inventory` lists.
    pub root: Option<String>,
}

impl FromJson for Config {
    /// Parses and checks the configuration JSON the host passes (also at
    /// load, through `inventory`).
    fn parse(json: &str) -> Result<Self, String> {
        let config: Self = from_json(json, "file handler config")?;
        if let Some(root) = &config.root {
            let path = Path::new(root);
            if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
                return Err(format!(
                    "invalid file handler config: `root` = {root:?} must be an absolute path without `..`"
                ));
            }
        }
        Ok(config)
    }
}

struct FileHandler;

/// A step of this handler.
type Job = otabox_sdk::Job<FileHandler>;

impl Handler for FileHandler {
    type Manifest = Manifest;
    type Config = Config;

    fn describe() -> Description {
        Description::new("file", env!("CARGO_PKG_VERSION"), [UPDATE_TYPE]).with_rollback()
    }

    /// The payload the manifest names must be one the step declares.
    fn check(job: &Job) -> Result<(), Status> {
        payload_info(job).map(|_| ())
    }

    fn validate(job: &Job) -> Result<Plan, Status> {
        let m = &job.manifest;
        Ok(Plan::new(format!("{}-{}", m.name, m.version)).payload(m.payload.clone()))
    }

    fn is_installed(job: &Job) -> Result<bool, Status> {
        let m = &job.manifest;
        let expected = payload_info(job)?.sha256.clone();
        match sha256_file(Path::new(&m.destination)) {
            Ok(actual) => Ok(actual == expected),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_status(
                status::READ_FAILED,
                "cannot read destination",
                &m.destination,
                e,
            )),
        }
    }

    fn backup(job: &Job) -> Result<Outcome, Status> {
        let m = &job.manifest;
        let dest = Path::new(&m.destination);
        let existed = dest.exists();
        if existed {
            copy_synced(dest, &sibling(dest, "otabox-backup")).map_err(|e| {
                io_status(status::BACKUP_FAILED, "backup failed", &m.destination, e)
            })?;
        }
        set_checkpoint(BACKUP_KEY, existed)?;
        Ok(Outcome::Success)
    }

    fn install(job: &Job) -> Result<Outcome, Status> {
        let m = &job.manifest;
        let payload = job.step.open_payload(&m.payload)?;
        let staged = sibling(Path::new(&m.destination), "otabox-new");
        write_payload(&payload, &staged).map_err(|e| match otabox_sdk::fs::denial(&staged) {
            Some(_) => io_status(status::WRITE_FAILED, "cannot write", &m.destination, e),
            None => io_status(
                status::WRITE_FAILED,
                "cannot write staged file",
                &staged.to_string_lossy(),
                e,
            ),
        })?;
        info!("staged {} ({} bytes)", staged.display(), payload.size());
        Ok(Outcome::Success)
    }

    fn apply(job: &Job) -> Result<Outcome, Status> {
        let m = &job.manifest;
        let dest = Path::new(&m.destination);
        fs::rename(sibling(dest, "otabox-new"), dest).map_err(|e| {
            io_status(
                status::ACTIVATE_FAILED,
                "cannot activate file",
                &m.destination,
                e,
            )
        })?;
        Ok(Outcome::Success)
    }

    fn verify(job: &Job) -> Result<Outcome, Status> {
        match Self::is_installed(job)? {
            true => Ok(Outcome::Success),
            false => Err(
                Status::new(status::MISMATCH, "destination does not match the payload")
                    .detail("destination", job.manifest.destination.clone()),
            ),
        }
    }

    fn commit(job: &Job) -> Result<Outcome, Status> {
        remove_sibling(
            job,
            "otabox-backup",
            status::DROP_BACKUP_FAILED,
            "cannot drop backup",
        )
    }

    fn rollback(job: &Job) -> Result<Outcome, Status> {
        let m = &job.manifest;
        let dest = Path::new(&m.destination);
        let existed = checkpoint::get_json::<bool>(BACKUP_KEY)
            .map_err(|e| {
                Status::new(
                    status::ROLLBACK_FAILED,
                    format!("backup record unreadable: {e}"),
                )
            })?
            .ok_or_else(|| {
                Status::new(
                    status::ROLLBACK_FAILED,
                    "no backup was taken; nothing to restore",
                )
            })?;
        let restored = if existed {
            fs::rename(sibling(dest, "otabox-backup"), dest)
        } else {
            remove_if_present(dest)
        };
        restored.map_err(|e| {
            io_status(
                status::ROLLBACK_FAILED,
                "rollback failed",
                &m.destination,
                e,
            )
        })?;
        Ok(Outcome::Success)
    }

    fn cleanup(job: &Job) -> Result<Outcome, Status> {
        remove_sibling(
            job,
            "otabox-new",
            status::CLEANUP_FAILED,
            "cannot remove staged file",
        )
    }

    fn inventory(config: &Config) -> Result<Vec<InstalledItem>, Status> {
        let Some(root) = &config.root else {
            return Ok(Vec::new());
        };
        let failed = |what, e| io_status(status::INVENTORY_FAILED, what, root, e);
        let entries = fs::read_dir(root).map_err(|e| failed("cannot list", e))?;
        let mut items = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_file() || is_temporary(&path) {
                continue;
            }
            let hash = sha256_file(&path).map_err(|e| failed("cannot hash", e))?;
            // A file has no version of its own: its content hash tells
            // the cloud which one is there.
            items.push(InstalledItem {
                name: path.to_string_lossy().into_owned(),
                version: format!("sha256:{hash}"),
                update_type: UPDATE_TYPE.into(),
                details: vec![("sha256".into(), hash)],
            });
        }
        items.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(items)
    }
}

export_handler!(FileHandler);

impl FromJson for Manifest {
    /// Parses and checks the manifest: absolute destination without `..`
    /// (the payload is checked against the step by [`Handler::check`]).
    fn parse(json: &str) -> Result<Self, String> {
        let m: Manifest = from_json(json, "manifest")?;
        if m.name.is_empty() || m.version.is_empty() {
            return Err("invalid manifest: name and version must not be empty".into());
        }
        let dest = Path::new(&m.destination);
        if !dest.is_absolute() || dest.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(format!(
                "invalid manifest: destination {:?} must be an absolute path without `..`",
                m.destination
            ));
        }
        if dest.file_name().is_none() {
            return Err(format!(
                "invalid manifest: destination {:?} names no file",
                m.destination
            ));
        }
        Ok(m)
    }
}

/// The step's declaration of the payload the manifest names.
fn payload_info(job: &Job) -> Result<&PayloadInfo, Status> {
    let name = &job.manifest.payload;
    job.step
        .payloads()
        .iter()
        .find(|p| p.name == *name)
        .ok_or_else(|| {
            Status::new(
                code::INVALID_MANIFEST,
                format!("invalid manifest: the step has no payload named {name:?}"),
            )
        })
}

/// Removes the destination's `suffix` sibling if it is there; a failure is
/// `code` with `what`.
fn remove_sibling(job: &Job, suffix: &str, code: u32, what: &str) -> Result<Outcome, Status> {
    let dest = &job.manifest.destination;
    remove_if_present(&sibling(Path::new(dest), suffix))
        .map_err(|e| io_status(code, what, dest, e))?;
    Ok(Outcome::Success)
}

fn set_checkpoint(key: &str, value: bool) -> Result<(), Status> {
    checkpoint::set_json(key, &value)
        .map_err(|e| Status::new(status::CHECKPOINT_FAILED, format!("checkpoint: {e}")))
}

fn sibling(dest: &Path, suffix: &str) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    dest.with_file_name(name)
}

fn is_temporary(path: &Path) -> bool {
    let name = path.to_string_lossy();
    name.ends_with(".otabox-new") || name.ends_with(".otabox-backup")
}

/// An I/O failure on `path`; a path outside every granted directory (which
/// the sandbox refuses as "not found") is reported as the denial it is.
fn io_status(code: u32, what: &str, path: &str, e: io::Error) -> Status {
    let message =
        otabox_sdk::fs::denial(Path::new(path)).unwrap_or_else(|| format!("{what}: {path}: {e}"));
    Status::new(code, message)
        .extended(
            Facility::Os,
            0,
            e.raw_os_error().unwrap_or(0).unsigned_abs(),
        )
        .detail("path", path)
}

fn write_payload(payload: &otabox_sdk::Payload, staged: &Path) -> io::Result<()> {
    let mut out = File::create(staged)?;
    let mut reader = payload.reader();
    let total = payload.size();
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        done += n as u64;
        progress(Phase::Install, done, total);
    }
    out.sync_all()
}

fn copy_synced(from: &Path, to: &Path) -> io::Result<()> {
    let mut out = File::create(to)?;
    io::copy(&mut File::open(from)?, &mut out)?;
    out.sync_all()
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn sha256_file(path: &Path) -> io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    io::copy(&mut file, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_well_formed_manifest() {
        let m = Manifest::parse(
            r#"{"name":"cfg","version":"1.0","payload":"a.conf","destination":"/srv/a.conf"}"#,
        )
        .expect("valid manifest");
        assert_eq!(m.destination, "/srv/a.conf");
    }

    #[test]
    fn rejects_relative_and_parent_destinations() {
        for dest in ["srv/a.conf", "/srv/../etc/passwd", "/"] {
            let json =
                format!(r#"{{"name":"cfg","version":"1","payload":"a","destination":"{dest}"}}"#);
            let err = Manifest::parse(&json).expect_err(dest);
            assert!(err.contains("destination"), "{dest}: {err}");
        }
    }

    #[test]
    fn rejects_unknown_fields_and_empty_versions() {
        let unknown = r#"{"name":"c","version":"1","payload":"a","destination":"/a","mode":1}"#;
        assert!(
            Manifest::parse(unknown)
                .unwrap_err()
                .contains("unknown field `mode`")
        );
        let empty = r#"{"name":"c","version":"","payload":"a","destination":"/a"}"#;
        assert!(
            Manifest::parse(empty)
                .unwrap_err()
                .contains("must not be empty")
        );
    }

    #[test]
    fn temporary_siblings_are_named_after_the_destination() {
        assert_eq!(
            sibling(Path::new("/d/a.conf"), "otabox-new"),
            Path::new("/d/a.conf.otabox-new")
        );
        assert!(is_temporary(Path::new("/d/a.conf.otabox-backup")));
    }
}
