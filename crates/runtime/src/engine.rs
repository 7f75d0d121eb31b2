//! The shared Wasmtime engine and its epoch ticker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use anyhow::{Context, Result};
use wasmtime::{Config, Engine};

/// Time between epoch ticks; deadlines are whole ticks, so a runaway guest
/// stops at most one tick after its limit.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The Pulley target of this host's pointer width and byte order: the
/// interpreter runs only bytecode of its own width and endianness.
#[cfg(feature = "pulley")]
const PULLEY_TARGET: &str = match (
    cfg!(target_pointer_width = "64"),
    cfg!(target_endian = "big"),
) {
    (true, false) => "pulley64",
    (true, true) => "pulley64be",
    (false, false) => "pulley32",
    (false, true) => "pulley32be",
};

/// Builds the engine every handler runs in. Instances use the on-demand
/// allocator: the pooling allocator measured slower for our small guests
/// (88 us vs 66 us per call in benches/handler_call). With the `pulley`
/// feature handlers run in wasmtime's interpreter on every host; without
/// it they run as native code, except where Cranelift has no backend
/// (32-bit ARM), where wasmtime picks Pulley by itself.
pub fn new_engine() -> Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    #[cfg(feature = "pulley")]
    config
        .target(PULLEY_TARGET)
        .map_err(anyhow::Error::from)
        .context("cannot select the Pulley interpreter")?;
    Engine::new(&config)
        .map_err(anyhow::Error::from)
        .context("cannot create the Wasm engine")
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
