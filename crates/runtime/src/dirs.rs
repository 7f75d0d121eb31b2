//! The handler directories of a device, read as one set: the packaged
//! handlers first (`/usr/lib/otabox/handlers`), the integrator's last
//! (`/etc/otabox/handlers.d`).
//!
//! A handler's name (its manifest's file stem) is unique across the
//! directories, and so is each update type it declares: a second claim is
//! refused with an error naming both manifests, and the first (earlier
//! directory, then file name) stays. An integrator's handler never
//! silently replaces a packaged one of the same name: an upgrade of the
//! package would then be hidden by a stale copy, and the device's
//! `[handlers.NAME]` grants would apply to other code than the audited
//! one. To replace a packaged handler, install one under another name and
//! disable the packaged one (`[handlers.NAME] enabled = false`): a disabled
//! handler claims no update type.
//!
//! Loading and listing take a shared `flock` on each directory, `handlers
//! install` and `remove` an exclusive one while they rename, so a loader
//! never sees a new `.wasm` beside an old `.toml`.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::capabilities::{DeviceGrant, HandlerManifest};
use crate::{handler_name, manifest_files};

/// A manifest found in the handler directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerFile {
    /// The handler's name (its file stem, even when not a valid name).
    pub name: String,
    /// The manifest (`<dir>/<name>.toml`).
    pub manifest: PathBuf,
    /// Why it is refused before loading: its name or an update type is
    /// already claimed by a handler found earlier.
    pub conflict: Option<Conflict>,
}

/// A second claim of a handler name or an update type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    /// The audit finding id: `duplicate-name` or `duplicate-update-type`.
    pub id: &'static str,
    /// What is claimed twice, naming both manifests.
    pub message: String,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Conflict {}

/// Every manifest of `dirs`, in loading order, each with its conflict with
/// those before it. `device` tells which handlers are disabled (they
/// claim no update type). Fails when a directory cannot be read.
pub fn discover(
    dirs: &[PathBuf],
    device: &BTreeMap<String, DeviceGrant>,
) -> Result<Vec<HandlerFile>> {
    let mut found: Vec<HandlerFile> = Vec::new();
    let mut owners: BTreeMap<String, PathBuf> = BTreeMap::new();
    for dir in dirs {
        for manifest in manifest_files(dir)? {
            let name = handler_name(&manifest).unwrap_or_else(|_| stem(&manifest));
            let enabled = device.get(&name).is_none_or(|g| g.enabled);
            let conflict = found
                .iter()
                .find(|f| f.name == name)
                .map(|first| same_name(&manifest, &first.manifest, &name))
                .or_else(|| {
                    let types = if enabled {
                        declared_types(&manifest)
                    } else {
                        Vec::new()
                    };
                    claim(&mut owners, &manifest, types)
                });
            found.push(HandlerFile {
                name,
                manifest,
                conflict,
            });
        }
    }
    Ok(found)
}

/// The manifest of the handler called `name` in `dirs`; fails when there
/// is none, or when it conflicts with one found before it.
pub fn find(
    dirs: &[PathBuf],
    device: &BTreeMap<String, DeviceGrant>,
    name: &str,
) -> Result<PathBuf> {
    let files = discover(dirs, device)?;
    let found = files.into_iter().find(|f| f.name == name);
    match found {
        Some(HandlerFile {
            conflict: Some(conflict),
            ..
        }) => Err(conflict.into()),
        Some(file) => Ok(file.manifest),
        None => anyhow::bail!(
            "no handler {name} in {}",
            dirs.iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Why `manifest`, declaring `types`, may not join a set whose update
/// types are owned as in `owners`; records its claims when it may.
pub fn claim(
    owners: &mut BTreeMap<String, PathBuf>,
    manifest: &Path,
    types: Vec<String>,
) -> Option<Conflict> {
    if let Some((t, owner)) = types
        .iter()
        .find_map(|t| owners.get(t).map(|owner| (t, owner)))
    {
        return Some(Conflict {
            id: "duplicate-update-type",
            message: format!(
                "{}: update type {t:?} is already claimed by {}; one handler per update type (the first found is loaded: packaged before the integrator's, then by file name)",
                manifest.display(),
                owner.display()
            ),
        });
    }
    for t in types {
        owners.insert(t, manifest.to_path_buf());
    }
    None
}

/// The error of a second handler called `name`.
pub fn same_name(manifest: &Path, first: &Path, name: &str) -> Conflict {
    Conflict {
        id: "duplicate-name",
        message: format!(
            "{}: a handler named {name} is already installed as {}; names are unique across the handler directories (to replace a packaged handler, install yours under another name and set `[handlers.{name}] enabled = false`)",
            manifest.display(),
            first.display()
        ),
    }
}

/// The update types `manifest` declares; none when it does not parse (it
/// is refused when loaded, with the reason).
pub fn declared_types(manifest: &Path) -> Vec<String> {
    HandlerManifest::load(manifest)
        .map(|m| {
            m.handler
                .update_types
                .iter()
                .map(|t| t.to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn stem(manifest: &Path) -> String {
    manifest
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// A `flock` on a handler directory, released when dropped.
#[derive(Debug)]
pub struct DirLock {
    _dir: File,
}

impl DirLock {
    /// A shared lock on `dir` (loading, listing): waits while a handler is
    /// being placed or removed.
    pub fn shared(dir: &Path) -> Result<Self> {
        let file = open_dir(dir)?;
        file.lock_shared()
            .with_context(|| format!("cannot lock handler directory {}", dir.display()))?;
        Ok(Self { _dir: file })
    }

    /// An exclusive lock on `dir` (`handlers install`, `remove`): waits for
    /// loaders and other installs.
    pub fn exclusive(dir: &Path) -> Result<Self> {
        let file = open_dir(dir)?;
        file.lock()
            .with_context(|| format!("cannot lock handler directory {}", dir.display()))?;
        Ok(Self { _dir: file })
    }

    /// Shared locks on each of `dirs`, in order.
    pub fn shared_all(dirs: &[PathBuf]) -> Result<Vec<Self>> {
        dirs.iter().map(|d| Self::shared(d)).collect()
    }
}

fn open_dir(dir: &Path) -> Result<File> {
    File::open(dir).with_context(|| format!("cannot read handler directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(dir: &Path, name: &str, types: &[&str]) -> PathBuf {
        std::fs::create_dir_all(dir).expect("dir");
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                "[handler]\nupdate_types = {types:?}\nsha256 = \"{}\"\n",
                "0".repeat(64)
            ),
        )
        .expect("write");
        path
    }

    fn conflicts(found: &[HandlerFile]) -> Vec<(&str, &str)> {
        found
            .iter()
            .filter_map(|f| Some((f.name.as_str(), f.conflict.as_ref()?.message.as_str())))
            .collect()
    }

    #[test]
    fn a_second_claim_of_a_name_or_an_update_type_is_refused_naming_both_files() {
        let root = tempfile::tempdir().expect("tempdir");
        let (packaged, local) = (root.path().join("packaged"), root.path().join("local"));
        let apt = manifest(&packaged, "apt", &["otabox/apt:1", "microsoft/apt:1"]);
        manifest(&packaged, "file", &["otabox/file:1"]);
        let apt_copy = manifest(&local, "apt", &["vendor/apt:1"]);
        let alias = manifest(&local, "myapt", &["microsoft/apt:1"]);
        manifest(&local, "mine", &["vendor/mine:1"]);
        let dirs = [packaged.clone(), local.clone()];

        let found = discover(&dirs, &BTreeMap::new()).expect("discover");
        let names: Vec<&str> = found.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["apt", "file", "apt", "mine", "myapt"]);
        let refused = conflicts(&found);
        assert_eq!(refused.len(), 2, "{refused:?}");
        let (name, why) = refused[0];
        assert_eq!(name, "apt");
        assert!(
            why.contains(&apt_copy.display().to_string())
                && why.contains(&apt.display().to_string())
                && why.contains("enabled = false"),
            "{why}"
        );
        let (name, why) = refused[1];
        assert_eq!(name, "myapt");
        assert!(
            why.contains(&alias.display().to_string())
                && why.contains(&apt.display().to_string())
                && why.contains("\"microsoft/apt:1\""),
            "{why}"
        );

        // The packaged apt disabled: it claims no update type, so the
        // integrator's handler may serve them (under its own name).
        let disabled: BTreeMap<String, DeviceGrant> =
            toml::from_str("[apt]\nenabled = false\n").expect("grants");
        let found = discover(&dirs, &disabled).expect("discover");
        let refused = conflicts(&found);
        assert_eq!(refused.len(), 1, "{refused:?}");
        assert_eq!(refused[0].0, "apt", "the name stays taken");
    }

    #[test]
    fn a_missing_directory_is_named_and_an_odd_file_name_is_kept_for_refusal() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("h");
        manifest(&dir, "Bad Name", &["x/y:1"]);
        let found = discover(std::slice::from_ref(&dir), &BTreeMap::new()).expect("discover");
        assert_eq!(found[0].name, "Bad Name");
        let missing = root.path().join("missing");
        let err = discover(&[dir, missing.clone()], &BTreeMap::new()).expect_err("missing");
        assert!(
            format!("{err:#}").contains(&missing.display().to_string()),
            "{err:#}"
        );
    }
}
