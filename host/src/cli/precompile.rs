//! `otabox handlers precompile`: compiles every handler of the configured
//! directories into the agent's compiled-component cache, so the agent's next
//! start compiles nothing (the Debian package's postinst runs it). Only the
//! wasm is checked against its manifest's sha256 pin: grants and handler
//! configuration are the agent's business at load time, and a handler the
//! device does not grant still gets its (harmless) cache entry. A handler
//! with a precompiled artifact beside its wasm is loaded from it (the only
//! way a runtime-only build loads anything): the command then checks it.
//!
//! With `--target`/`--out` it writes artifacts for a target instead
//! ([`artifacts`]), on the build machine of runtime-only devices.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use otabox::capabilities::HandlerManifest;
use otabox::outln;
use otabox::runtime::{CacheUse, EngineTarget, Runtime};

/// Precompiles the handlers of the directories `handlers` into `cache`; with `prune`, cache
/// entries that belong to none of them (older handlers, another engine)
/// are deleted. Exits 1 when a handler cannot be compiled.
pub async fn run(handlers: &[PathBuf], cache: PathBuf, prune: bool) -> Result<ExitCode> {
    let runtime = Runtime::new(Some(cache.clone()))?;
    let mut current = BTreeSet::new();
    let mut failed = 0;
    for found in otabox::runtime::dirs::discover(handlers, &Default::default())? {
        let (name, manifest) = (found.name, found.manifest);
        match precompile_one(&runtime, &manifest) {
            Ok((entry, cache_use, took)) => {
                let what = match cache_use {
                    CacheUse::Hit => "already precompiled".to_string(),
                    CacheUse::Artifact => "its precompiled artifact loads".to_string(),
                    _ => format!("compiled in {} ms", took.as_millis()),
                };
                outln!("{name}: {what}")?;
                current.extend(entry);
            }
            Err(e) => {
                failed += 1;
                outln!("{name}: not precompiled: {e:#}")?;
            }
        }
    }
    if prune {
        for stale in stale_entries(&cache, &current)? {
            std::fs::remove_file(&stale)
                .with_context(|| format!("cannot delete {}", stale.display()))?;
            outln!("removed stale cache entry {}", stale.display())?;
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Compiles one handler through the cache: its cache entry, whether it was
/// there already, and how long it took.
fn precompile_one(
    runtime: &Runtime,
    manifest_path: &Path,
) -> Result<(Option<PathBuf>, CacheUse, std::time::Duration)> {
    let (wasm_path, wasm, sha256) = pinned_wasm(manifest_path)?;
    let start = Instant::now();
    let (_, cache_use) = runtime
        .cache()
        .load(runtime.engine(), &wasm, &sha256, &wasm_path)
        .with_context(|| format!("cannot compile {}", wasm_path.display()))?;
    if cache_use == CacheUse::Artifact {
        return Ok((None, cache_use, start.elapsed()));
    }
    let entry = runtime.cache().entry(runtime.engine(), &sha256);
    if let Some(entry) = entry.as_ref().filter(|e| !e.is_file()) {
        anyhow::bail!(
            "compiled, but cannot store {} (see the warning above)",
            entry.display()
        );
    }
    Ok((entry, cache_use, start.elapsed()))
}

/// Reads the wasm beside `manifest_path` and checks it against the
/// manifest's sha256 pin: its path, bytes and sha256.
fn pinned_wasm(manifest_path: &Path) -> Result<(PathBuf, Vec<u8>, String)> {
    let manifest = HandlerManifest::load(manifest_path)?;
    let wasm_path = manifest_path.with_extension("wasm");
    let wasm = std::fs::read(&wasm_path)
        .with_context(|| format!("cannot read {}", wasm_path.display()))?;
    let sha256 = manifest.check_pin(&wasm).map_err(|m| {
        anyhow::anyhow!(
            "{} has sha256 {}, but its manifest pins {}",
            wasm_path.display(),
            m.actual,
            m.pinned
        )
    })?;
    Ok((wasm_path, wasm, sha256))
}

/// Writes a precompiled artifact of every handler of `handlers` for
/// `target` (default: this build's engine target) into `out` (default:
/// beside each wasm). Exits 1 when a handler cannot be compiled.
pub fn artifacts(
    handlers: &[PathBuf],
    target: Option<&str>,
    out: Option<&Path>,
) -> Result<ExitCode> {
    let target = match target {
        Some(triple) => EngineTarget::for_triple(triple)?,
        None => EngineTarget::this_host(),
    };
    if !otabox::runtime::HAS_COMPILER {
        anyhow::bail!(
            "this build runs only precompiled handlers and has no compiler: run `otabox handlers \
             precompile --target {target}` with a build that has one (the default build)"
        );
    }
    if let Some(out) = out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    }
    let mut failed = 0;
    for found in otabox::runtime::dirs::discover(handlers, &Default::default())? {
        let (name, manifest) = (found.name, found.manifest);
        let dir = match out {
            Some(out) => out.to_path_buf(),
            None => manifest.parent().unwrap_or(Path::new(".")).to_path_buf(),
        };
        // Beside the wasm, a loader sees both files of an artifact or none.
        let _lock = match out {
            Some(_) => None,
            None => Some(otabox::runtime::dirs::DirLock::exclusive(&dir)?),
        };
        match write_artifact(&manifest, &name, &dir, &target) {
            Ok(line) => outln!("{name}: {line}")?,
            Err(e) => {
                failed += 1;
                outln!("{name}: not precompiled: {e:#}")?;
            }
        }
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Compiles one handler for `target` into `dir`; what to print.
fn write_artifact(
    manifest: &Path,
    name: &str,
    dir: &Path,
    target: &EngineTarget,
) -> Result<String> {
    let (_, wasm, sha256) = pinned_wasm(manifest)?;
    let start = Instant::now();
    let written = otabox::runtime::precompiled::write(dir, name, &wasm, &sha256, target)?;
    Ok(format!(
        "compiled for {target} in {} ms: {} ({} KiB), engine hash {}",
        start.elapsed().as_millis(),
        written.paths.cwasm.display(),
        written.record.cwasm_size.div_ceil(1024),
        written.record.engine_hash
    ))
}

/// The `*.cwasm` files of `cache` that are not in `current` (none when the
/// cache directory does not exist yet).
fn stale_entries(cache: &Path, current: &BTreeSet<PathBuf>) -> Result<Vec<PathBuf>> {
    let entries = match std::fs::read_dir(cache) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", cache.display())),
    };
    let mut stale = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot read {}", cache.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "cwasm") && !current.contains(&path) {
            stale.push(path);
        }
    }
    stale.sort();
    Ok(stale)
}
