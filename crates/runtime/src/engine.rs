//! The shared Wasmtime engine and its epoch ticker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use wasmtime::{Config, Engine};

/// Time between epoch ticks; deadlines are whole ticks, so a runaway guest
/// stops at most one tick after its limit.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The Pulley target of this host's pointer width and byte order: the
/// interpreter runs only bytecode of its own width and endianness.
const PULLEY_TARGET: &str = match (
    cfg!(target_pointer_width = "64"),
    cfg!(target_endian = "big"),
) {
    (true, false) => "pulley64",
    (true, true) => "pulley64be",
    (false, false) => "pulley32",
    (false, true) => "pulley32be",
};

/// Bumped when [`engine_config`] changes what compiled code depends on.
/// Part of the [`EngineTarget::engine_hash`], with otabox's version.
const ENGINE_SETTINGS: &str = "component-model epoch-interruption";

/// What handler code is compiled for: a native target triple
/// (`aarch64-unknown-linux-gnu`) or a Pulley interpreter target
/// (`pulley32`). A device's engine has one; `otabox handlers precompile
/// --target` builds for any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineTarget(String);

impl EngineTarget {
    /// The target of this build's engine: Pulley with the `pulley` feature
    /// and on 32-bit ARM (where Cranelift has no backend, so wasmtime
    /// interprets), otherwise the triple this binary was built for.
    pub fn this_host() -> Self {
        if cfg!(feature = "pulley") || cfg!(target_arch = "arm") {
            Self(PULLEY_TARGET.to_string())
        } else {
            Self(env!("OTABOX_BUILD_TARGET").to_string())
        }
    }

    /// The engine target of a device built for the Rust target `triple`
    /// (the device build's own choice): 32-bit ARM triples (`armv7-…`,
    /// `arm-…`, `thumbv7…`) run Pulley (`pulley32`); a Pulley name stands
    /// for itself; any other triple is native code for it.
    pub fn for_triple(triple: &str) -> Result<Self> {
        let triple = triple.trim();
        if triple.is_empty()
            || !triple
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            bail!("`{triple}` is not a target triple (such as aarch64-unknown-linux-gnu)");
        }
        let arch = triple.split('-').next().unwrap_or_default();
        if arch.starts_with("pulley") {
            return Ok(Self(triple.to_string()));
        }
        if arch.starts_with("arm") || arch.starts_with("thumb") {
            return Ok(Self(
                if arch.ends_with("eb") {
                    "pulley32be"
                } else {
                    "pulley32"
                }
                .to_string(),
            ));
        }
        Ok(Self(triple.to_string()))
    }

    /// The target's name, as `--target` takes it.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether code for this target runs in the Pulley interpreter.
    pub fn is_pulley(&self) -> bool {
        self.0.starts_with("pulley")
    }

    /// The engine hash a precompiled artifact is bound to: the sha256 of
    /// otabox's version (which pins wasmtime's), this target and the
    /// engine settings. The device computes the same from its own build,
    /// without a compiler. (wasmtime's `precompile_compatibility_hash`
    /// covers the compiler's flags, which a runtime-only engine does not
    /// have, so the two sides could never agree on it; wasmtime checks the
    /// artifact's own record of target, flags, tunables and features when
    /// it loads it, behind this check.)
    pub fn engine_hash(&self) -> String {
        otabox_core::trust::sha256_hex(
            format!(
                "otabox-engine/1\notabox {}\ntarget {}\nsettings {ENGINE_SETTINGS}\n",
                env!("CARGO_PKG_VERSION"),
                self.0
            )
            .as_bytes(),
        )
    }
}

impl std::fmt::Display for EngineTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The configuration every handler engine shares: the component model
/// and epoch interruption. Listed in [`ENGINE_SETTINGS`].
fn engine_config() -> Config {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config
}

/// Builds the engine every handler runs in. Instances use the on-demand
/// allocator: the pooling allocator measured slower for our small guests
/// (88 us vs 66 us per call in benches/handler_call). With the `pulley`
/// feature handlers run in wasmtime's interpreter on every host; without
/// it they run as native code, except where Cranelift has no backend
/// (32-bit ARM), where wasmtime picks Pulley by itself.
///
/// The engine has no compiler even in a build with one: it only loads
/// compiled code (the artifact, the cache, or what [`compiler_engine`]
/// has just compiled). An idle agent thus never runs Cranelift, whose code
/// then stays out of its resident memory (benches/service.rs).
pub fn new_engine() -> Result<Engine> {
    #[cfg_attr(not(feature = "compiler"), allow(unused_mut))]
    let mut config = host_config()?;
    #[cfg(feature = "compiler")]
    config.enable_compiler(false);
    Engine::new(&config)
        .map_err(anyhow::Error::from)
        .context("cannot create the Wasm engine")
}

/// An engine that compiles for the engine of [`new_engine`] (tuned to
/// this CPU when native), built when a handler has no compiled code yet
/// and dropped after it.
#[cfg(feature = "compiler")]
pub fn compiler_engine() -> Result<Engine> {
    Engine::new(&host_config()?)
        .map_err(anyhow::Error::from)
        .context("cannot create the Wasm compiler")
}

/// [`engine_config`] for this host: with the `pulley` feature, the Pulley
/// interpreter of this host's width and byte order.
fn host_config() -> Result<Config> {
    let mut config = engine_config();
    if cfg!(feature = "pulley") {
        config
            .target(PULLEY_TARGET)
            .map_err(anyhow::Error::from)
            .context("cannot select the Pulley interpreter")?;
    }
    Ok(config)
}

/// An engine that compiles for `target`, with the device engine's settings,
/// for `otabox handlers precompile --target`. Its code uses the target's
/// baseline CPU features (a cross compiler cannot ask the device's CPU).
#[cfg(feature = "compiler")]
pub fn engine_for(target: &EngineTarget) -> Result<Engine> {
    let mut config = engine_config();
    config
        .target(target.as_str())
        .map_err(anyhow::Error::from)
        .with_context(|| format!("wasmtime does not know the target `{target}`"))?;
    Engine::new(&config)
        .map_err(anyhow::Error::from)
        .with_context(|| {
            format!(
                "this build cannot compile for `{target}` (a build with the `all-targets` \
             feature, the default of a development build, compiles for arm64 and Pulley)"
            )
        })
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    /// Starts the ticker thread for `engine`.
    pub fn start(engine: &Engine) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (engine, flag) = (engine.clone(), stop.clone());
        thread::Builder::new()
            .name("otabox-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .context("cannot start the epoch ticker thread")?;
        Ok(Self { stop })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Ticks that cover `limit`: one more than `limit / tick`, because the
/// first tick may come at any point of the current one. A guest thus gets
/// at least `limit` and at most `limit` plus one tick.
pub fn ticks_for(limit: Duration) -> u64 {
    limit.as_nanos().div_ceil(EPOCH_TICK.as_nanos()) as u64 + 1
}
