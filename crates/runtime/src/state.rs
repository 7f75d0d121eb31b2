//! The per-call store data: WASI context, resource table, memory limiter
//! and the scope of the call (job, step, payloads, checkpoints).

use std::sync::Arc;
use std::time::Instant;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::Phase;
use crate::capabilities::Grants;
pub use otabox_core::model::{CallScope, CancelFlag, PayloadFile, ProgressEvent, ProgressSink};

/// Caps linear memory and table growth of one call; remembers a refusal so
/// the trap can be reported as "memory limit exceeded".
pub struct Limiter {
    /// Bytes of linear memory allowed per memory.
    pub memory_bytes: usize,
    /// Set when a growth past the cap was refused.
    pub exceeded: bool,
}

const MAX_TABLE_ELEMENTS: usize = 1 << 20;
const MAX_INSTANCES: usize = 64;

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory_bytes {
            self.exceeded = true;
            wasmtime::bail!(
                "memory limit of {} MiB exceeded (asked for {} bytes)",
                self.memory_bytes >> 20,
                desired
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            self.exceeded = true;
            wasmtime::bail!("table limit of {MAX_TABLE_ELEMENTS} elements exceeded");
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_INSTANCES
    }
}

/// Store data of one call.
pub struct HostState {
    pub(crate) wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: Limiter,
    /// Name of the handler, for logs.
    pub(crate) handler: Arc<str>,
    /// What the handler may do.
    pub(crate) grants: Arc<Grants>,
    /// The phase being called.
    pub(crate) phase: Phase,
    /// The scope of the call.
    pub(crate) scope: CallScope,
    /// When the call must be over.
    pub(crate) deadline: Instant,
    /// Payload handles the guest holds.
    pub(crate) open_payloads: usize,
    /// The guest's captured stdout and stderr.
    pub(crate) output: [super::stdio::GuestOutput; 2],
    /// The granted devices, as found when the handler was loaded.
    pub(crate) devices: Arc<[crate::capabilities::devices::host::PinnedDevice]>,
    /// What the guest logged in this call, against its budget.
    pub(crate) log_budget: super::imports::context::LogBudget,
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl wasmtime_wasi_io::IoView for HostState {
    fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }
}
