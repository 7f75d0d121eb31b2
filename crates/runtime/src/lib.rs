//! The Wasm runtime: loads handlers from the handler directories, checks
//! them against their manifests and the device's grants, and calls them
//! sandboxed.
//!
//! Loading a handler: read `<name>.toml`, read `<name>.wasm` and check its
//! sha256 against the manifest, narrow the declared capabilities by the
//! device config, load it precompiled (the artifact beside the wasm, see
//! [`precompiled`], or the cache) or compile it, check every
//! import against the grants (naming the first that has none), link only the
//! granted interfaces, pre-instantiate, call `describe`, and let the handler
//! check its device configuration (`inventory` failing with result code
//! [`INVALID_CONFIG`] refuses it).
//!
//! Beside the runtime: [`capabilities`] (what a handler may do, one module
//! per capability), [`audit`] (declared vs granted vs real imports),
//! [`run_phase`] (one phase of a handler from the command line), [`dirs`]
//! (the handler directories as one set) and [`placement`] (`handlers
//! install` and `remove`).

pub mod audit;
pub mod capabilities;
pub mod dirs;
pub mod placement;
pub mod precompiled;
pub mod run_phase;

pub mod bindings;
pub mod bounds;
mod cache;
mod convert;
mod engine;
mod handler;
pub mod imports;
mod linker;
mod state;
mod stdio;
mod unknown;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use wasmtime::Engine;
use wasmtime::component::Component;

pub use cache::{CacheUse, ComponentCache, HAS_COMPILER, NoCompiler};
pub use engine::{EPOCH_TICK, EngineTarget};
pub use handler::{GRANTED_PATHS_ENV, Handler, INVALID_CONFIG, InvalidConfig};
pub use otabox_core::model::{
    CallFault, Description, InstalledItem, Outcome, Phase, Plan, Status, StepContext,
};
pub use otabox_core::trust::sha256_hex;
pub use state::{CallScope, CancelFlag, HostState, PayloadFile, ProgressEvent, ProgressSink};
pub use unknown::{UnknownHandler, unknown_handlers};

use crate::capabilities::{Access, DeviceGrant, Grants, HandlerManifest, ImportFault};

/// The export every handler must provide (any 1.x version).
pub const HANDLER_EXPORT_PREFIX: &str = "otabox:handler/handler@1.";

/// The engine, its epoch ticker and the compiled-component cache.
pub struct Runtime {
    engine: Engine,
    cache: ComponentCache,
    _ticker: engine::EpochTicker,
}

/// The handlers of the handler directories: those loaded, those refused
/// and why, and those the device disabled.
#[derive(Default)]
pub struct HandlerSet {
    /// Loaded, callable handlers.
    pub handlers: Vec<Arc<Handler>>,
    /// Handlers that failed a load check.
    pub refused: Vec<Refusal>,
    /// Handlers switched off in the device config.
    pub disabled: Vec<String>,
    /// `[handlers.NAME]` tables of the device config that name no handler
    /// of the directories.
    pub unknown: Vec<UnknownHandler>,
}

/// A handler that was not loaded.
#[derive(Debug)]
pub struct Refusal {
    /// Its name.
    pub name: String,
    /// Its manifest file.
    pub manifest: PathBuf,
    /// Why it was refused.
    pub error: anyhow::Error,
}

impl HandlerSet {
    /// The handler serving `update_type` (canonical name or alias).
    pub fn for_update_type(&self, update_type: &str) -> Option<&Arc<Handler>> {
        self.handlers.iter().find(|h| {
            h.manifest
                .handler
                .update_types
                .iter()
                .any(|t| t == update_type)
        })
    }

    /// The handler called `name`.
    pub fn by_name(&self, name: &str) -> Option<&Arc<Handler>> {
        self.handlers.iter().find(|h| h.name == name)
    }

    /// Fails, naming each, when a handler refused its device config: the
    /// agent does not start with one (a typo there would otherwise surface
    /// only when a deployment reaches the handler).
    pub fn require_valid_configs(&self) -> Result<()> {
        let invalid: Vec<String> = self
            .refused
            .iter()
            .filter_map(|r| r.error.downcast_ref::<InvalidConfig>())
            .map(|c| {
                format!(
                    "{c} (fix it, or set `enabled = false` in `[handlers.{}]`)",
                    c.handler
                )
            })
            .collect();
        if !invalid.is_empty() {
            bail!("{}", invalid.join("; "));
        }
        Ok(())
    }
}

impl Runtime {
    /// A runtime whose compiled components are cached in `cache_dir`.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self> {
        let engine = engine::new_engine()?;
        let ticker = engine::EpochTicker::start(&engine)?;
        Ok(Self {
            engine,
            cache: ComponentCache::new(cache_dir),
            _ticker: ticker,
        })
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The compiled-component cache.
    pub fn cache(&self) -> &ComponentCache {
        &self.cache
    }

    /// Loads every `<name>.toml` + `<name>.wasm` of `dirs`, in order (see
    /// [`dirs`]: a second claim of a name or update type is refused,
    /// naming both files). A handler that fails a check is refused (with
    /// the reason) and the others still load. Every directory is locked
    /// shared meanwhile, so a handler being installed is seen whole or not
    /// at all.
    pub async fn load_dirs(
        &self,
        dirs: &[PathBuf],
        device: &BTreeMap<String, DeviceGrant>,
    ) -> Result<HandlerSet> {
        let _locks = dirs::DirLock::shared_all(dirs)?;
        let files = dirs::discover(dirs, device)?;
        let mut set = HandlerSet::default();
        let manifests: Vec<PathBuf> = files.iter().map(|f| f.manifest.clone()).collect();
        set.unknown = unknown_handlers(device, &manifests);
        for unknown in &set.unknown {
            tracing::warn!("{unknown}");
        }
        for dirs::HandlerFile {
            name,
            manifest,
            conflict,
        } in files
        {
            let grant = device.get(&name);
            if grant.is_some_and(|g| !g.enabled) {
                set.disabled.push(name);
                continue;
            }
            let loaded = match conflict {
                Some(conflict) => Err(conflict.into()),
                None => self.load_handler(&manifest, grant).await,
            };
            match loaded {
                Ok(handler) => set.handlers.push(Arc::new(handler)),
                Err(error) => {
                    tracing::error!("refusing handler {name}: {error:#}");
                    set.refused.push(Refusal {
                        name,
                        manifest,
                        error,
                    });
                }
            }
        }
        Ok(set)
    }

    /// Loads one handler from its manifest path, with the device's grant.
    pub async fn load_handler(
        &self,
        manifest_path: &Path,
        device: Option<&DeviceGrant>,
    ) -> Result<Handler> {
        let name = handler_name(manifest_path)?;
        let manifest = HandlerManifest::load(manifest_path)?;
        if let Some(grant) = device {
            grant
                .check()
                .with_context(|| format!("device config for handler {name}"))?;
        }
        let wasm_path = manifest_path.with_extension("wasm");
        let wasm = std::fs::read(&wasm_path)
            .with_context(|| format!("handler {name}: cannot read {}", wasm_path.display()))?;
        let sha256 = verify_hash(&name, &wasm, &manifest, &wasm_path, manifest_path)?;
        let grants = Grants::narrow(&manifest, device)
            .with_context(|| format!("handler {name}: device config"))?;
        prepare_paths(&name, &grants)?;
        let (component, cache) = self
            .cache
            .load(&self.engine, &wasm, &sha256, &wasm_path)
            .with_context(|| format!("handler {name}: {}", wasm_path.display()))?;
        check_imports(&self.engine, &component, &name, &manifest, &grants)?;
        let contract = check_export(&self.engine, &component, &name)?;
        let instance_pre = linker::build(&self.engine, &grants)?
            .instantiate_pre(&component)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("handler {name}: cannot link"))?;
        let pre = bindings::UpdateHandlerPre::new(instance_pre)
            .map_err(anyhow::Error::from)
            .with_context(|| format!("handler {name}: does not implement the handler contract"))?;
        let devices = capabilities::devices::host::PinnedDevice::pin_all(&grants).into();
        let granted_paths = handler::granted_paths(&grants);
        let mut handler = Handler {
            name: name.clone(),
            manifest_path: manifest_path.to_path_buf(),
            wasm_path,
            sha256,
            config_json: device.map_or_else(|| "{}".to_string(), DeviceGrant::config_json),
            manifest,
            grants: Arc::new(grants),
            description: empty_description(),
            contract,
            cache,
            pre,
            engine: self.engine.clone(),
            devices,
            granted_paths,
        };
        handler.description = handler.describe().await?;
        check_description(&handler)?;
        handler.check_config().await?;
        Ok(handler)
    }
}

/// The `*.toml` files of `dir`, sorted.
pub fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read handler directory {}", dir.display()))?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml") && p.is_file())
        .collect();
    files.sort();
    Ok(files)
}

/// The handler name: the manifest's file stem, `[a-z0-9_-]+`.
pub fn handler_name(manifest: &Path) -> Result<String> {
    let stem = manifest
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if !valid_name(stem) {
        bail!(
            "{}: a handler name must be lowercase letters, digits, `-` or `_`",
            manifest.display()
        );
    }
    Ok(stem.to_string())
}

/// Whether `name` is a handler name: `[a-z0-9_-]+` (so never a path).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b))
}

fn verify_hash(
    name: &str,
    wasm: &[u8],
    manifest: &HandlerManifest,
    wasm_path: &Path,
    toml: &Path,
) -> Result<String> {
    manifest.check_pin(wasm).map_err(|m| {
        anyhow::anyhow!(
            "handler {name}: {} has sha256 {}, but {} pins {}; refusing a modified or mismatched component",
            wasm_path.display(),
            m.actual,
            toml.display(),
            m.pinned
        )
    })
}

/// Read-write grants are created when missing; read-only ones must exist.
fn prepare_paths(name: &str, grants: &Grants) -> Result<()> {
    for grant in &grants.paths {
        if !grant.host.exists() && grant.access == Access::ReadWrite {
            std::fs::create_dir_all(&grant.host).with_context(|| {
                format!(
                    "handler {name}: cannot create granted {}",
                    grant.host.display()
                )
            })?;
        }
        if !grant.host.is_dir() {
            bail!(
                "handler {name}: granted path {} is not a directory",
                grant.host.display()
            );
        }
    }
    Ok(())
}

/// Refuses a component that imports an interface its grants do not allow,
/// naming the first such import.
fn check_imports(
    engine: &Engine,
    component: &Component,
    name: &str,
    manifest: &HandlerManifest,
    grants: &Grants,
) -> Result<()> {
    let ty = component.component_type();
    let checks = capabilities::check_imports(ty.imports(engine).map(|(i, _)| i), manifest, grants);
    let Some((check, fault)) = checks.iter().find_map(|c| c.fault.map(|fault| (c, fault))) else {
        return Ok(());
    };
    let (import, what) = (&check.name, check.capability.label());
    match fault {
        ImportFault::Unsupported => {
            bail!("handler {name}: imports `{import}`, which otabox does not provide")
        }
        ImportFault::Undeclared => bail!(
            "handler {name}: imports `{import}` but its manifest declares no {what} capability"
        ),
        ImportFault::Ungranted => bail!(
            "handler {name}: imports `{import}` but the device grants none of its declared {what} capability"
        ),
    }
}

/// The contract version a component was built against, read from its
/// export `otabox:handler/handler@<version>`; `None` when it exports no
/// 1.x handler.
pub fn contract_version(engine: &Engine, component: &Component) -> Option<String> {
    component
        .component_type()
        .exports(engine)
        .find_map(|(n, _)| {
            n.strip_prefix(HANDLER_EXPORT_PREFIX)
                .map(|minor| format!("1.{minor}"))
        })
}

fn check_export(engine: &Engine, component: &Component, name: &str) -> Result<String> {
    if let Some(version) = contract_version(engine, component) {
        return Ok(version);
    }
    let exports: Vec<String> = component
        .component_type()
        .exports(engine)
        .map(|(n, _)| n.to_string())
        .collect();
    bail!("handler {name}: exports {exports:?} but not `otabox:handler/handler@1.x`")
}

fn check_description(handler: &Handler) -> Result<()> {
    let described = &handler.description.update_types;
    if let Some(missing) = handler
        .manifest
        .handler
        .update_types
        .iter()
        .find(|t| !described.iter().any(|d| d == t.as_str()))
    {
        bail!(
            "handler {}: the manifest declares update type {missing:?} but the component describes only {described:?}",
            handler.name
        );
    }
    Ok(())
}

fn empty_description() -> Description {
    Description {
        name: String::new(),
        version: String::new(),
        update_types: Vec::new(),
        contract: String::new(),
        supports_rollback: false,
        reboot: otabox_core::model::RebootBehaviour::Never,
    }
}
