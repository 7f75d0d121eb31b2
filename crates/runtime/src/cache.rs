//! Precompiled components, keyed by the wasm's sha256 and the engine's
//! compatibility hash, so a restart skips Cranelift; and the order in which
//! a handler's component is found: the artifact shipped beside its wasm
//! ([`crate::precompiled`]), the cache, the compiler (a build without the
//! `compiler` feature has no cache and stops before the compiler).
//!
//! The cache directory must be writable by the agent only: its files are
//! native code that is loaded without further checks. Entries are mapped
//! into memory and must only be replaced by rename, never edited in place.

use std::path::{Path, PathBuf};

use anyhow::Result;
use wasmtime::Engine;
use wasmtime::component::Component;

use otabox_core::durable;

use crate::precompiled::{self, ArtifactPaths};

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
    /// Loaded from the precompiled artifact beside the wasm (see
    /// [`crate::precompiled`]).
    Artifact,
}

impl CacheUse {
    /// Whether the component was compiled by this process.
    pub fn compiled(self) -> bool {
        matches!(self, Self::Miss | Self::Disabled)
    }
}

/// Why a build without a compiler cannot load a handler: it has neither a
/// usable precompiled artifact nor a cache entry.
#[derive(Debug)]
pub struct NoCompiler {
    /// The handler's wasm.
    pub wasm: PathBuf,
}

impl std::fmt::Display for NoCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let target = crate::engine::EngineTarget::this_host();
        let artifact = crate::precompiled::ArtifactPaths::beside(&self.wasm);
        write!(
            f,
            "this build runs only precompiled handlers, and {} has no artifact beside it: \
             run `otabox handlers precompile --target {target}` on the build machine and \
             install {} and {} beside the wasm",
            self.wasm.display(),
            artifact.cwasm.display(),
            artifact.record.display()
        )
    }
}

impl std::error::Error for NoCompiler {}

/// Whether this build can compile handlers (the `compiler` feature:
/// Cranelift). Without it only precompiled artifacts load.
pub const HAS_COMPILER: bool = cfg!(feature = "compiler");

/// A directory of precompiled components.
#[derive(Debug, Clone)]
pub struct ComponentCache {
    #[cfg_attr(not(feature = "compiler"), allow(dead_code))]
    dir: Option<PathBuf>,
}

impl ComponentCache {
    /// A cache in `dir`, or none.
    pub fn new(dir: Option<PathBuf>) -> Self {
        Self { dir }
    }

    /// The cache file for a wasm with `sha256` under `engine`.
    #[cfg(feature = "compiler")]
    pub fn entry(&self, engine: &Engine, sha256: &str) -> Option<PathBuf> {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let key = format!("{sha256}-{:016x}.cwasm", hasher.finish());
        self.dir.as_ref().map(|d| d.join(key))
    }

    /// None: a build without a compiler writes no cache entries, so it
    /// reads none either (its handlers come precompiled, see
    /// [`crate::precompiled`]).
    #[cfg(not(feature = "compiler"))]
    pub fn entry(&self, _engine: &Engine, _sha256: &str) -> Option<PathBuf> {
        None
    }

    /// Loads the component for `wasm` (whose hash is `sha256`, read from
    /// `wasm_path`): from the precompiled artifact beside it when there is
    /// one, else from the cache, else compiled now and cached (a stale or
    /// corrupt entry is replaced). A build with a compiler compiles past an
    /// unusable artifact (with a warning); a build without one refuses it.
    pub fn load(
        &self,
        engine: &Engine,
        wasm: &[u8],
        sha256: &str,
        wasm_path: &Path,
    ) -> Result<(Component, CacheUse)> {
        let artifact = ArtifactPaths::beside(wasm_path);
        if artifact.present() {
            match precompiled::load(engine, &artifact, sha256) {
                Ok(component) => return Ok((component, CacheUse::Artifact)),
                Err(e) if HAS_COMPILER => tracing::warn!(
                    "compiling {} instead of its precompiled artifact: {e:#}",
                    wasm_path.display()
                ),
                Err(e) => return Err(e),
            }
        }
        let Some(entry) = self.entry(engine, sha256) else {
            let compiled = compile(wasm, wasm_path)?;
            return Ok((from_bytes(engine, &compiled)?, CacheUse::Disabled));
        };
        // Mapped, not copied: only the code pages a handler touches stay
        // resident (3 MB less for three handlers). Entries are only ever
        // replaced by rename (a new inode, see `store`), never rewritten in
        // place, so a live mapping is never truncated under the agent.
        if entry.is_file() {
            match load_entry(engine, &entry) {
                Ok(component) => return Ok((component, CacheUse::Hit)),
                Err(e) => tracing::warn!(
                    "recompiling: cache entry {} is unusable: {e:#}",
                    entry.display()
                ),
            }
        }
        let compiled = compile(wasm, wasm_path)?;
        match store(&entry, &compiled) {
            Ok(()) => match load_entry(engine, &entry) {
                Ok(component) => return Ok((component, CacheUse::Miss)),
                Err(e) => tracing::warn!("cannot load {} again: {e:#}", entry.display()),
            },
            Err(e) => tracing::warn!("cannot cache {}: {e:#}", entry.display()),
        }
        Ok((from_bytes(engine, &compiled)?, CacheUse::Miss))
    }
}

/// Compiles `wasm` with a compiler engine built for it (see
/// [`crate::engine::compiler_engine`]): the serialized component, for the
/// engine of [`crate::engine::new_engine`].
#[cfg(feature = "compiler")]
fn compile(wasm: &[u8], _wasm_path: &Path) -> Result<Vec<u8>> {
    use anyhow::Context;
    crate::engine::compiler_engine()?
        .precompile_component(wasm)
        .map_err(anyhow::Error::from)
        .context("not a valid WebAssembly component")
}

/// Maps a cache entry.
fn load_entry(engine: &Engine, entry: &Path) -> Result<Component> {
    // SAFETY: entries are written by `store` from what this build's
    // compiler made, into a directory that belongs to the agent, and only
    // ever replaced by rename; wasmtime checks the header and the engine's
    // compatibility (target, flags against this CPU, tunables, features).
    unsafe { Component::deserialize_file(engine, entry) }.map_err(anyhow::Error::from)
}

/// Loads a component compiled by this process.
fn from_bytes(engine: &Engine, compiled: &[u8]) -> Result<Component> {
    use anyhow::Context;
    // SAFETY: the bytes come from this build's compiler just now.
    unsafe { Component::deserialize(engine, compiled) }
        .map_err(anyhow::Error::from)
        .context("cannot load the component just compiled")
}

#[cfg(not(feature = "compiler"))]
fn compile(_wasm: &[u8], wasm_path: &Path) -> Result<Vec<u8>> {
    Err(NoCompiler {
        wasm: wasm_path.to_path_buf(),
    }
    .into())
}

fn store(entry: &Path, compiled: &[u8]) -> Result<()> {
    if let Some(dir) = entry.parent() {
        durable::create_private_dir(dir)?;
    }
    durable::write_atomic(entry, compiled)
}
