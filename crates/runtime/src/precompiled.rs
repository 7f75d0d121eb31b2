//! Handlers precompiled on a build machine and shipped beside their wasm,
//! for devices whose build has no compiler (the runtime-only build).
//!
//! An artifact is two files beside `<name>.wasm`: `<name>.cwasm`
//! (wasmtime's serialized component: native code, or Pulley bytecode) and
//! `<name>.cwasm.json`, its record: the sha256 of the wasm it was compiled
//! from, the engine target and engine hash it was compiled for (see
//! [`EngineTarget::engine_hash`]), and the sha256 and size of the `.cwasm`.
//!
//! Loading checks, in order, and refuses with a message naming both sides:
//! the record's wasm sha256 against the manifest's pin (so the toml still
//! pins the source wasm), its engine hash against this agent's, the
//! `.cwasm` (opened without following a symlink) against the recorded
//! size and sha256; then wasmtime checks the artifact's own record of
//! target, CPU features, tunables and version. The checks catch a stale,
//! truncated, altered or misplaced artifact; they do not make native code
//! from an untrusted writer safe: like the handlers themselves, the
//! directory must be writable by root only.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::engine::EngineTarget;

/// The extension of a precompiled component.
pub const ARTIFACT_EXTENSION: &str = "cwasm";
/// The extension of its record.
pub const RECORD_EXTENSION: &str = "cwasm.json";
/// The format of the record, written as `format`.
const FORMAT: u32 = 1;
/// The largest record read (it is a few hundred bytes).
pub const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// The largest `.cwasm` that `handlers install` takes along (a Python
/// component's is a few tens of megabytes).
pub const MAX_ARTIFACT_BYTES: u64 = 512 << 20;

/// What a `.cwasm` was built from and for (`<name>.cwasm.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ArtifactRecord {
    /// Record format, 1.
    pub format: u32,
    /// The handler's name.
    pub handler: String,
    /// The sha256 of the wasm it was compiled from.
    pub wasm_sha256: String,
    /// The engine target it was compiled for.
    pub target: String,
    /// That target's engine hash under the otabox that compiled it.
    pub engine_hash: String,
    /// The sha256 of the `.cwasm`.
    pub cwasm_sha256: String,
    /// The size of the `.cwasm` in bytes.
    pub cwasm_size: u64,
    /// The otabox version that compiled it.
    pub built_by: String,
}

/// The artifact's two files for the handler whose wasm is `wasm_path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactPaths {
    /// `<name>.cwasm`.
    pub cwasm: PathBuf,
    /// `<name>.cwasm.json`.
    pub record: PathBuf,
}

impl ArtifactPaths {
    /// The artifact beside `wasm_path`.
    pub fn beside(wasm_path: &Path) -> Self {
        Self {
            cwasm: wasm_path.with_extension(ARTIFACT_EXTENSION),
            record: wasm_path.with_extension(RECORD_EXTENSION),
        }
    }

    /// The artifact of handler `name` in `dir`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        Self::beside(&dir.join(format!("{name}.wasm")))
    }

    /// Whether either file exists (a symlink counts).
    pub fn present(&self) -> bool {
        self.cwasm.symlink_metadata().is_ok() || self.record.symlink_metadata().is_ok()
    }
}

/// An artifact just written.
#[derive(Debug)]
pub struct Written {
    /// Where.
    pub paths: ArtifactPaths,
    /// Its record.
    pub record: ArtifactRecord,
}

/// Compiles `wasm` (pinned as `wasm_sha256`) for `target` and writes
/// `<name>.cwasm` and then `<name>.cwasm.json` into `dir`, each replaced
/// whole (temp file and rename), so a reader sees no record of a
/// half-written artifact.
#[cfg(feature = "compiler")]
pub fn write(
    dir: &Path,
    name: &str,
    wasm: &[u8],
    wasm_sha256: &str,
    target: &EngineTarget,
) -> Result<Written> {
    let engine = crate::engine::engine_for(target)?;
    let cwasm = engine
        .precompile_component(wasm)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("cannot compile {name} for {target}"))?;
    let record = ArtifactRecord {
        format: FORMAT,
        handler: name.to_string(),
        wasm_sha256: wasm_sha256.to_string(),
        target: target.to_string(),
        engine_hash: target.engine_hash(),
        cwasm_sha256: otabox_core::trust::sha256_hex(&cwasm),
        cwasm_size: cwasm.len() as u64,
        built_by: env!("CARGO_PKG_VERSION").to_string(),
    };
    let paths = ArtifactPaths::in_dir(dir, name);
    let json = serde_json::to_vec_pretty(&record).context("cannot encode the artifact record")?;
    // Published files of a handler directory: readable by all, like the
    // wasm beside them.
    for (path, bytes) in [(&paths.cwasm, &cwasm), (&paths.record, &json)] {
        otabox_core::durable::StagedFile::write(path, bytes, 0o644)?.commit()?;
    }
    otabox_core::durable::sync_dir(dir)?;
    Ok(Written { paths, record })
}

/// Loads the artifact at `paths` into `engine` (whose target is
/// [`EngineTarget::this_host`]) for the wasm pinned as `wasm_sha256`,
/// after the checks the module documentation lists.
pub fn load(engine: &Engine, paths: &ArtifactPaths, wasm_sha256: &str) -> Result<Component> {
    let record = read_record(&paths.record)?;
    check_record(&record, wasm_sha256, &EngineTarget::this_host())?;
    let file = open_cwasm(&paths.cwasm, &record)?;
    // wasmtime maps the file by path: the open descriptor's /proc path is
    // the very inode checked above, even if the name is replaced meanwhile.
    let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    // SAFETY: the file is the artifact `write` produced for this engine
    // target (checked against its record: size and sha256), opened without
    // following a symlink from a directory only root may write; wasmtime
    // checks its header and engine compatibility before using it.
    unsafe { Component::deserialize_file(engine, &fd_path) }
        .map_err(anyhow::Error::from)
        .with_context(|| {
            format!(
                "wasmtime refuses the precompiled artifact {}",
                paths.cwasm.display()
            )
        })
}

/// Reads and parses a record (at most [`MAX_RECORD_BYTES`], not through a
/// symlink).
pub fn read_record(path: &Path) -> Result<ArtifactRecord> {
    let file = open_no_follow(path)?;
    let mut text = Vec::new();
    file.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut text)
        .with_context(|| format!("cannot read {}", path.display()))?;
    if text.len() as u64 > MAX_RECORD_BYTES {
        bail!(
            "{} is larger than {MAX_RECORD_BYTES} bytes: not an artifact record",
            path.display()
        );
    }
    parse_record(&text, path)
}

/// Parses the bytes of the record read from `path` (named in errors).
pub fn parse_record(text: &[u8], path: &Path) -> Result<ArtifactRecord> {
    let record: ArtifactRecord = serde_json::from_slice(text)
        .with_context(|| format!("{} is not an artifact record", path.display()))?;
    if record.format != FORMAT {
        bail!(
            "{} has record format {}, this otabox reads format {FORMAT}",
            path.display(),
            record.format
        );
    }
    Ok(record)
}

/// Checks the bytes of a `.cwasm` read from `path` against its record's
/// size and sha256.
pub fn check_cwasm(bytes: &[u8], record: &ArtifactRecord, path: &Path) -> Result<()> {
    let sha256 = otabox_core::trust::sha256_hex(bytes);
    check_cwasm_digest(bytes.len() as u64, Some(&sha256), record, path)
}

/// Checks the size and, when given, the sha256 of the `.cwasm` at `path`
/// against its record.
fn check_cwasm_digest(
    size: u64,
    sha256: Option<&str>,
    record: &ArtifactRecord,
    path: &Path,
) -> Result<()> {
    if size != record.cwasm_size {
        bail!(
            "{} has {size} bytes, its record says {}: the artifact is truncated or altered",
            path.display(),
            record.cwasm_size
        );
    }
    if let Some(actual) = sha256.filter(|&a| a != record.cwasm_sha256) {
        bail!(
            "{} has sha256 {actual}, its record says {}: the artifact was altered",
            path.display(),
            record.cwasm_sha256
        );
    }
    Ok(())
}

/// Checks a record against the manifest's pin and this engine.
pub fn check_record(record: &ArtifactRecord, wasm_sha256: &str, own: &EngineTarget) -> Result<()> {
    if record.wasm_sha256 != wasm_sha256 {
        bail!(
            "the artifact was compiled from a wasm with sha256 {}, but the manifest pins {wasm_sha256}: \
             precompile the handler again",
            record.wasm_sha256
        );
    }
    let own_hash = own.engine_hash();
    if record.engine_hash != own_hash {
        bail!(
            "the artifact was compiled for engine hash {} (target {}, otabox {}), but this agent's \
             engine hash is {own_hash} (target {own}, otabox {}): on the build machine run \
             `otabox handlers precompile --target {own}` with otabox {}",
            record.engine_hash,
            record.target,
            record.built_by,
            env!("CARGO_PKG_VERSION"),
            env!("CARGO_PKG_VERSION"),
        );
    }
    Ok(())
}

/// Opens the `.cwasm` and checks it is a regular file of the recorded size
/// and sha256.
fn open_cwasm(path: &Path, record: &ArtifactRecord) -> Result<File> {
    let mut file = open_no_follow(path)?;
    let meta = file
        .metadata()
        .with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    // The size first: a file of another size is refused without reading it.
    check_cwasm_digest(meta.len(), None, record, path)?;
    let (size, actual) = otabox_core::trust::hash_reader(&mut file)
        .with_context(|| format!("cannot read {}", path.display()))?;
    check_cwasm_digest(size, Some(&actual), record, path)?;
    Ok(file)
}

/// Opens `path` for reading, refusing a symlink (`O_NOFOLLOW`).
fn open_no_follow(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                anyhow::anyhow!("{} is a symlink: refused", path.display())
            } else {
                anyhow::Error::new(e).context(format!("cannot open {}", path.display()))
            }
        })
}

/// A build without the compiler writes no artifacts.
#[cfg(not(feature = "compiler"))]
pub fn write(
    _dir: &Path,
    name: &str,
    _wasm: &[u8],
    _wasm_sha256: &str,
    target: &EngineTarget,
) -> Result<Written> {
    bail!("cannot compile {name} for {target}: this build has no compiler")
}
