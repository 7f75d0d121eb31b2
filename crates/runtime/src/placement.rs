//! `otabox handlers install` and `remove`: an integrator's handler placed
//! into, or taken out of, the last handler directory.
//!
//! The sources are read once, bounded, from regular files only (a FIFO or
//! a device is refused, never waited on); the handler's name is the
//! manifest's file stem. A precompiled artifact beside the source wasm
//! (`.cwasm` + `.cwasm.json`, see [`crate::precompiled`]) goes along, after
//! the checks a load makes (this wasm, this engine, size and sha256): a
//! runtime-only device gets its handlers that way. Placing writes every
//! file under a temporary name in the target directory and syncs it,
//! removes the replaced handler's artifact (it pins the old wasm), renames
//! the `.wasm`, then the artifact's `.cwasm` and record, and the `.toml`
//! last (the manifest is what makes a handler visible), and syncs the
//! directory, all under an exclusive lock on it ([`DirLock`]). Any failure
//! before the manifest's rename puts the replaced files back, so the
//! directory is as it was. A crash between the renames of a replacement
//! leaves the new `.wasm` beside the old `.toml`: that handler is refused
//! (sha256 mismatch, naming both files) until the install is run again.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::capabilities::{DeviceGrant, HandlerManifest};
use crate::dirs::{self, DirLock, HandlerFile};
use crate::engine::EngineTarget;
use crate::handler_name;
use crate::precompiled::{self, ArtifactPaths, ArtifactRecord};
use otabox_core::durable::{self, StagedFile};

/// The largest component `handlers install` reads (Python components are
/// about 18 MB).
pub const MAX_WASM_BYTES: u64 = 256 << 20;
/// The largest manifest it reads.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// The mode of placed handler files: readable by all, as packaged ones.
const PLACED_MODE: u32 = 0o644;

/// A handler to install: its name and the checked bytes of both files.
#[derive(Debug)]
pub struct Candidate {
    /// Its name (the manifest's file stem).
    pub name: String,
    /// The component.
    pub wasm: Vec<u8>,
    /// The manifest, as given.
    pub toml: Vec<u8>,
    /// The manifest, parsed.
    pub manifest: HandlerManifest,
    /// The component's sha256 (the manifest pins it).
    pub sha256: String,
    /// Its precompiled artifact, when one was beside the source wasm.
    pub artifact: Option<ShippedArtifact>,
}

/// A precompiled artifact taken along by `handlers install`: the checked
/// bytes of both files.
#[derive(Debug)]
pub struct ShippedArtifact {
    /// The `.cwasm`.
    pub cwasm: Vec<u8>,
    /// The record (`.cwasm.json`), as given.
    pub record_json: Vec<u8>,
    /// The record, parsed.
    pub record: ArtifactRecord,
}

impl ShippedArtifact {
    /// The artifact beside `wasm` (whose sha256 is `wasm_sha256`), if there
    /// is one: both files, for this wasm and this agent's engine, the
    /// `.cwasm` of the size and sha256 its record gives. One file without
    /// the other is refused.
    pub fn read_beside(wasm: &Path, wasm_sha256: &str) -> Result<Option<Self>> {
        let paths = ArtifactPaths::beside(wasm);
        match (paths.cwasm.exists(), paths.record.exists()) {
            (false, false) => return Ok(None),
            (true, true) => {}
            (cwasm, _) => {
                let (there, missing) = if cwasm {
                    (&paths.cwasm, &paths.record)
                } else {
                    (&paths.record, &paths.cwasm)
                };
                bail!(
                    "{} is there but {} is not: a precompiled artifact is both files \
                     (`otabox handlers precompile --target` writes them); add the other or \
                     remove this one",
                    there.display(),
                    missing.display()
                );
            }
        }
        let record_json = read_source(&paths.record, precompiled::MAX_RECORD_BYTES)?;
        let record = precompiled::parse_record(&record_json, &paths.record)?;
        precompiled::check_record(&record, wasm_sha256, &EngineTarget::this_host())
            .with_context(|| format!("refusing the artifact {}", paths.cwasm.display()))?;
        let cwasm = read_source(&paths.cwasm, precompiled::MAX_ARTIFACT_BYTES)?;
        precompiled::check_cwasm(&cwasm, &record, &paths.cwasm)?;
        Ok(Some(Self {
            cwasm,
            record_json,
            record,
        }))
    }

    /// Writes both files beside `wasm_path` (a scratch copy).
    fn write_beside(&self, wasm_path: &Path) -> std::io::Result<()> {
        let paths = ArtifactPaths::beside(wasm_path);
        fs::write(&paths.cwasm, &self.cwasm)?;
        fs::write(&paths.record, &self.record_json)
    }
}

impl Candidate {
    /// Reads and checks `wasm` and `toml`: a valid name, a manifest that
    /// parses, a component whose sha256 is the one it pins.
    pub fn read(wasm: &Path, toml: &Path) -> Result<Self> {
        let name = handler_name(toml)
            .context("the manifest's file name is the handler's name (NAME.toml)")?;
        let toml_bytes = read_source(toml, MAX_MANIFEST_BYTES)?;
        let text = std::str::from_utf8(&toml_bytes)
            .with_context(|| format!("{} is not UTF-8 text", toml.display()))?;
        let manifest = HandlerManifest::parse(text)
            .with_context(|| format!("invalid handler manifest {}", toml.display()))?;
        let wasm_bytes = read_source(wasm, MAX_WASM_BYTES)?;
        let sha256 = manifest.check_pin(&wasm_bytes).map_err(|m| {
            anyhow::anyhow!(
                "{} has sha256 {}, but {} pins {}; refusing a modified or mismatched component",
                wasm.display(),
                m.actual,
                toml.display(),
                m.pinned
            )
        })?;
        let artifact = ShippedArtifact::read_beside(wasm, &sha256)?;
        Ok(Self {
            name,
            wasm: wasm_bytes,
            toml: toml_bytes,
            manifest,
            sha256,
            artifact,
        })
    }

    /// Writes `<name>.wasm`, its artifact if any, and `<name>.toml` into
    /// `dir` (a private scratch directory, for the audit, whose test load
    /// then uses the artifact); returns the manifest's path there.
    pub fn stage(&self, dir: &Path) -> Result<PathBuf> {
        let manifest = dir.join(format!("{}.toml", self.name));
        let wasm = manifest.with_extension("wasm");
        fs::write(&wasm, &self.wasm)
            .and_then(|()| match &self.artifact {
                Some(artifact) => artifact.write_beside(&wasm),
                None => Ok(()),
            })
            .and_then(|()| fs::write(&manifest, &self.toml))
            .with_context(|| format!("cannot stage the handler in {}", dir.display()))?;
        Ok(manifest)
    }

    fn update_types(&self) -> Vec<String> {
        let types = &self.manifest.handler.update_types;
        types.iter().map(|t| t.to_string()).collect()
    }
}

/// Reads `path` whole: a regular file (a link to one is followed) of at
/// most `limit` bytes. Opened without blocking, so a FIFO is refused, not
/// waited on.
pub fn read_source(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!(
            "{} is not a regular file (a directory, FIFO, socket or device)",
            path.display()
        );
    }
    if meta.len() > limit {
        bail!(
            "{} has {} bytes, more than the {limit} a handler file may have",
            path.display(),
            meta.len()
        );
    }
    let mut bytes = Vec::new();
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if bytes.len() as u64 > limit {
        bail!("{} grew beyond {limit} bytes while read", path.display());
    }
    Ok(bytes)
}

/// Refuses a target directory that is missing, not a directory, or a
/// symbolic link (which would place the handler elsewhere than the
/// configured path says).
pub fn check_target(target: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(target)
        .with_context(|| format!("cannot use handler directory {}", target.display()))?;
    if meta.file_type().is_symlink() {
        let to = fs::read_link(target).unwrap_or_default();
        bail!(
            "handler directory {} is a symbolic link (to {}); configure the real directory",
            target.display(),
            to.display()
        );
    }
    if !meta.is_dir() {
        bail!("handler directory {} is not a directory", target.display());
    }
    Ok(())
}

/// Refuses `candidate` when its name is taken in a directory other than
/// `target`, or an update type it declares is claimed by another handler
/// (a handler of the same name in `target` is the one it replaces).
pub fn check_conflicts(
    dirs: &[PathBuf],
    target: &Path,
    device: &BTreeMap<String, DeviceGrant>,
    candidate: &Candidate,
) -> Result<()> {
    let destination = target.join(format!("{}.toml", candidate.name));
    let files = dirs::discover(dirs, device)?;
    if let Some(other) = files
        .iter()
        .find(|f| f.name == candidate.name && f.manifest.parent() != Some(target))
    {
        bail!(
            "{}",
            dirs::same_name(&destination, &other.manifest, &candidate.name)
        );
    }
    let mut owners = BTreeMap::new();
    for file in files.iter().filter(|f| claims(f, device, &candidate.name)) {
        dirs::claim(
            &mut owners,
            &file.manifest,
            dirs::declared_types(&file.manifest),
        );
    }
    match dirs::claim(&mut owners, &destination, candidate.update_types()) {
        Some(conflict) => bail!("{conflict}"),
        None => Ok(()),
    }
}

/// Whether `file` holds its update types: loaded (no conflict), enabled,
/// and not the handler called `replaced`.
fn claims(file: &HandlerFile, device: &BTreeMap<String, DeviceGrant>, replaced: &str) -> bool {
    file.conflict.is_none()
        && file.name != replaced
        && device.get(&file.name).is_none_or(|g| g.enabled)
}

/// Places `candidate` into `target` (the last of `dirs`), checking the
/// conflicts again under the directory's exclusive lock.
pub fn place(
    dirs: &[PathBuf],
    target: &Path,
    device: &BTreeMap<String, DeviceGrant>,
    candidate: &Candidate,
) -> Result<()> {
    check_target(target)?;
    let _lock = DirLock::exclusive(target)?;
    check_conflicts(dirs, target, device, candidate)?;
    let wasm_path = target.join(format!("{}.wasm", candidate.name));
    let toml_path = wasm_path.with_extension("toml");
    let artifact_paths = ArtifactPaths::beside(&wasm_path);
    let wasm = StagedFile::write(&wasm_path, &candidate.wasm, PLACED_MODE)?;
    let artifact = match &candidate.artifact {
        Some(a) => Some((
            StagedFile::write(&artifact_paths.cwasm, &a.cwasm, PLACED_MODE)?,
            StagedFile::write(&artifact_paths.record, &a.record_json, PLACED_MODE)?,
        )),
        None => None,
    };
    let toml = StagedFile::write(&toml_path, &candidate.toml, PLACED_MODE)?;
    let previous = Previous::keep(&[&wasm_path, &artifact_paths.cwasm, &artifact_paths.record])?;
    let placed = (|| {
        // The replaced handler's artifact pins the old wasm.
        remove_artifact(&wasm_path)?;
        wasm.commit()?;
        if let Some((cwasm, record)) = artifact {
            cwasm.commit()?;
            record.commit()?;
        }
        durable::sync_dir(target)?;
        toml.commit()
    })();
    if let Err(e) = placed {
        previous.restore();
        return Err(e);
    }
    durable::sync_dir(target)
}

/// Deletes the precompiled artifact beside `wasm_path`, if any (the record
/// first: an artifact without one is never loaded).
fn remove_artifact(wasm_path: &Path) -> Result<()> {
    let artifact = crate::precompiled::ArtifactPaths::beside(wasm_path);
    for path in [&artifact.record, &artifact.cwasm] {
        match fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("cannot remove {}", path.display()));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The files a placement replaces (the `.wasm` and the artifact), each
/// kept under a temporary hard link until the manifest is in place, to put
/// back if it cannot be; a file that did not exist is removed instead.
struct Previous(Vec<(PathBuf, Option<PathBuf>)>);

impl Previous {
    fn keep(paths: &[&Path]) -> Result<Self> {
        let mut kept = Self(Vec::new());
        for path in paths {
            let keep = match fs::symlink_metadata(path) {
                Err(_) => None,
                Ok(_) => {
                    let mut name = path.as_os_str().to_owned();
                    name.push(format!(".old-{}", std::process::id()));
                    let keep = PathBuf::from(name);
                    let _ = fs::remove_file(&keep);
                    fs::hard_link(path, &keep).with_context(|| {
                        format!("cannot keep {} while replacing it", path.display())
                    })?;
                    Some(keep)
                }
            };
            kept.0.push((path.to_path_buf(), keep));
        }
        Ok(kept)
    }

    /// Puts every file back (the record last: an artifact without one is
    /// never loaded).
    fn restore(mut self) {
        for (path, keep) in std::mem::take(&mut self.0) {
            let restored = match keep {
                Some(keep) => fs::rename(keep, &path),
                None => match fs::remove_file(&path) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                },
            };
            if let Err(e) = restored {
                tracing::error!("cannot restore {}: {e}", path.display());
            }
        }
    }
}

impl Drop for Previous {
    fn drop(&mut self) {
        for keep in self.0.iter_mut().filter_map(|(_, keep)| keep.take()) {
            let _ = fs::remove_file(keep);
        }
    }
}

/// A handler [`remove`] took out.
#[derive(Debug)]
pub struct Removed {
    /// Its manifest, now gone.
    pub manifest: PathBuf,
    /// The sha256 of its component, when there was one.
    pub sha256: Option<String>,
}

/// Removes the handler `name` from `target` (the last of `dirs`): the
/// manifest first (the handler is gone at once), then the component.
/// Refuses a handler of another directory (a packaged one).
pub fn remove(dirs: &[PathBuf], target: &Path, name: &str) -> Result<Removed> {
    if !crate::valid_name(name) {
        bail!("{name:?} is not a handler name (lowercase letters, digits, `-` or `_`)");
    }
    check_target(target)?;
    let _lock = DirLock::exclusive(target)?;
    let files = dirs::discover(dirs, &BTreeMap::new())?;
    let manifest = target.join(format!("{name}.toml"));
    if !files.iter().any(|f| f.manifest == manifest) {
        return Err(match files.iter().find(|f| f.name == name) {
            Some(other) => anyhow::anyhow!(
                "handler {name} ({}) is packaged with otabox, not installed by `handlers install`: it goes with the package (apt-get remove otabox); to stop using it, set `[handlers.{name}] enabled = false` in the device config",
                other.manifest.display()
            ),
            None => anyhow::anyhow!("no handler {name} in {}", target.display()),
        });
    }
    let wasm = manifest.with_extension("wasm");
    let sha256 = fs::read(&wasm)
        .ok()
        .map(|b| otabox_core::trust::sha256_hex(&b));
    fs::remove_file(&manifest).with_context(|| format!("cannot remove {}", manifest.display()))?;
    durable::sync_dir(target)?;
    match fs::remove_file(&wasm) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot remove {}", wasm.display()));
        }
        _ => {}
    }
    remove_artifact(&wasm)?;
    durable::sync_dir(target)?;
    Ok(Removed { manifest, sha256 })
}
