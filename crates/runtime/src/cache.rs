//! Precompiled components, keyed by the wasm's sha256 and the engine's
//! compatibility hash, so a restart skips Cranelift.
//!
//! The cache directory must be writable by the agent only: its files are
//! native code that is loaded without further checks. Entries are mapped
//! into memory and must only be replaced by rename, never edited in place.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use wasmtime::Engine;
use wasmtime::component::Component;

use otabox_core::durable;

/// Whether a component came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CacheUse {
    /// Loaded precompiled.
    Hit,
    /// Compiled now, and stored.
    Miss,
    /// Compiled now; no cache directory configured.
    Disabled,
}

/// A directory of precompiled components.
#[derive(Debug, Clone)]
pub struct ComponentCache {
    dir: Option<PathBuf>,
}

impl ComponentCache {
    /// A cache in `dir`, or none.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The cache file for a wasm with `sha256` under `engine`.
    pub fn entry(&self, engine: &Engine, sha256: &str) -> Option<PathBuf> {
        let mut hasher = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let key = format!("{sha256}-{:016x}.cwasm", hasher.finish());
        self.dir.as_ref().map(|d| d.join(key))
    }

    /// Loads the component for `wasm` (whose hash is `sha256`), from the cache
    /// when possible; a stale or corrupt entry is replaced.
    pub fn load(
        &self,
        engine: &Engine,
        wasm: &[u8],
        sha256: &str,
    ) -> Result<(Component, CacheUse)> {
        let Some(entry) = self.entry(engine, sha256) else {
            return Ok((compile(engine, wasm)?, CacheUse::Disabled));
        };
        // Mapped, not copied: only the code pages a handler touches stay
        // resident (3 MB less for three handlers). Entries are only ever
        // replaced by rename (a new inode, see `store`), never rewritten in
        // place, so a live mapping is never truncated under the agent.
        if entry.is_file() {
            // SAFETY: the entry was written by `store` below from a component
            // this engine compiled; the cache directory belongs to the agent,
            // and wasmtime checks the header and engine compatibility.
            match unsafe { Component::deserialize_file(engine, &entry) } {
                Ok(component) => return Ok((component, CacheUse::Hit)),
                Err(e) => tracing::warn!(
                    "recompiling: cache entry {} is unusable: {e:#}",
                    entry.display()
                ),
            }
        }
        let component = compile(engine, wasm)?;
        if let Err(e) = store(&entry, &component) {
            tracing::warn!("cannot cache {}: {e:#}", entry.display());
        }
        Ok((component, CacheUse::Miss))
    }
}

fn compile(engine: &Engine, wasm: &[u8]) -> Result<Component> {
    Component::new(engine, wasm)
        .map_err(anyhow::Error::from)
        .context("not a valid WebAssembly component")
}

fn store(entry: &Path, component: &Component) -> Result<()> {
    if let Some(dir) = entry.parent() {
        durable::create_private_dir(dir)?;
    }
    durable::write_atomic(entry, &component.serialize()?)
}
