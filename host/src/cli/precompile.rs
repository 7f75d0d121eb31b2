//! `otabox handlers precompile`: compiles every handler of the configured
//! directories into the agent's compiled-component cache, so the agent's next
//! start compiles nothing (the Debian package's postinst runs it). Only the
//! wasm is checked against its manifest's sha256 pin: grants and handler
//! configuration are the agent's business at load time, and a handler the
//! device does not grant still gets its (harmless) cache entry.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use otabox::capabilities::HandlerManifest;
use otabox::outln;
use otabox::runtime::{CacheUse, Runtime};

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
    let start = Instant::now();
    let (_, cache_use) = runtime
        .cache()
        .load(runtime.engine(), &wasm, &sha256)
        .with_context(|| format!("cannot compile {}", wasm_path.display()))?;
    let entry = runtime.cache().entry(runtime.engine(), &sha256);
    if let Some(entry) = entry.as_ref().filter(|e| !e.is_file()) {
        anyhow::bail!(
            "compiled, but cannot store {} (see the warning above)",
            entry.display()
        );
    }
    Ok((entry, cache_use, start.elapsed()))
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
