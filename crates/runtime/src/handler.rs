//! A loaded handler and its lifecycle calls. Every call instantiates the
//! pre-linked component in a fresh store with the call's limits: a deadline
//! in epochs, a memory cap, and the grants as WASI preopens and host checks.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, Trap, WasmBacktrace};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

use super::bindings::{self as wit, Phase, UpdateHandlerPre};
use super::bounds;
use super::cache::CacheUse;
use super::engine::ticks_for;
use super::imports::context::{MAX_LOG_BYTES_PER_CALL, MAX_LOG_LINE, MAX_LOG_LINES_PER_CALL};
use super::state::{CallScope, HostState, Limiter};
use super::stdio::GuestOutput;
use crate::capabilities::{self, Grants, HandlerManifest};
use otabox_core::model::{
    self, CallFault, Description, InstalledItem, Outcome, Plan, Status, StepContext, UpdateHandler,
};

/// Extra time the async backstop allows beyond the epoch deadline, for a
/// guest blocked in a host call.
const BACKSTOP_GRACE: Duration = Duration::from_millis(50);

/// Most bytes (roughly) the host copies out of the guest in one import
/// call or export return: above the largest input a host function takes
/// (16 MiB of a command's stdin), well below the engine's 128 MiB default.
/// A guest that returns more traps, and the host never allocates for it.
const HOSTCALL_FUEL: usize = 32 << 20;

/// The environment variable that lists the directories granted to a
/// handler, as it sees them, separated by `:`.
pub const GRANTED_PATHS_ENV: &str = "OTABOX_GRANTED_PATHS";

/// The value of [`GRANTED_PATHS_ENV`] for `grants`.
pub(crate) fn granted_paths(grants: &Grants) -> String {
    grants
        .paths
        .iter()
        .map(|p| p.guest.to_string_lossy())
        .collect::<Vec<_>>()
        .join(":")
}

/// The result code by which a handler refuses its device configuration
/// (the SDK's `invalid handler config`).
pub const INVALID_CONFIG: u32 = 11;

/// A handler refused its device configuration (`[handlers.NAME] config`)
/// when it was loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidConfig {
    /// The handler.
    pub handler: String,
    /// The handler's reason, bounded and escaped.
    pub reason: String,
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "handler {0} refuses its device config (`[handlers.{0}] config` in device.toml): {1}",
            self.handler, self.reason
        )
    }
}

impl std::error::Error for InvalidConfig {}

/// A handler that passed every load check and can be called.
pub struct Handler {
    /// Name (the manifest's file stem).
    pub name: String,
    /// The capability manifest file.
    pub manifest_path: PathBuf,
    /// The component file.
    pub wasm_path: PathBuf,
    /// Verified sha256 of the component.
    pub sha256: String,
    /// The declared capabilities.
    pub manifest: HandlerManifest,
    /// The capabilities granted on this device.
    pub grants: Arc<Grants>,
    /// What the handler says it is.
    pub description: Description,
    /// The contract version it was built against, from its export name.
    pub contract: String,
    /// The handler's device configuration, as JSON text.
    pub config_json: String,
    /// Whether the compiled component came from the cache.
    pub cache: CacheUse,
    pub(crate) pre: UpdateHandlerPre<HostState>,
    pub(crate) engine: Engine,
    /// The granted devices, as found at load.
    pub(crate) devices: Arc<[crate::capabilities::devices::host::PinnedDevice]>,
    /// The value of [`GRANTED_PATHS_ENV`].
    pub(crate) granted_paths: String,
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handler")
            .field("name", &self.name)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

/// Calls an export in a fresh instance under the call's limits.
macro_rules! invoke {
    ($self:ident, $phase:expr, $scope:expr, |$iface:ident, $store:ident| $call:expr) => {{
        let phase = $phase;
        let (mut store, instance) = $self.instantiate(phase, $scope).await?;
        let limit = $self.grants.limits.call_timeout();
        let result = {
            let $iface = instance.otabox_handler_handler();
            let $store = &mut store;
            tokio::time::timeout(limit + BACKSTOP_GRACE, $call).await
        };
        $self.explain(phase, &store, result)
    }};
}

impl Handler {
    /// Calls `describe`.
    pub async fn describe(&self) -> Result<Description> {
        let described: Result<wit::Description> =
            invoke!(self, Phase::Describe, CallScope::default(), |h, store| h
                .call_describe(store));
        described.map(|d| bounds::description(d).into())
    }

    /// Calls `validate`. A plan over the contract's bounds is a fault.
    pub async fn validate(
        &self,
        scope: CallScope,
        ctx: &StepContext,
    ) -> Result<Result<Plan, Status>> {
        let ctx = wit::StepContext::from(ctx);
        let planned: Result<Result<wit::Plan, wit::Status>> =
            invoke!(self, Phase::Validate, scope, |h, store| h
                .call_validate(store, &ctx));
        match planned? {
            Ok(plan) => bounds::plan(plan).map(|p| Ok(p.into())).map_err(|breach| {
                anyhow::Error::new(CallFault::Breach(breach)).context(format!(
                    "handler {}: {:?}",
                    self.name,
                    Phase::Validate
                ))
            }),
            Err(status) => Ok(Err(bounds::status(status).into())),
        }
    }

    /// Calls `is-installed`.
    pub async fn is_installed(
        &self,
        scope: CallScope,
        ctx: &StepContext,
    ) -> Result<Result<bool, Status>> {
        let ctx = wit::StepContext::from(ctx);
        let checked: Result<Result<bool, wit::Status>> =
            invoke!(self, Phase::IsInstalled, scope, |h, store| h
                .call_is_installed(store, &ctx));
        checked.map(|r| r.map_err(|s| bounds::status(s).into()))
    }

    /// Calls `inventory` with the handler's device configuration.
    pub async fn inventory(&self) -> Result<Result<Vec<InstalledItem>, Status>> {
        let listed: Result<Result<Vec<wit::InstalledItem>, wit::Status>> =
            invoke!(self, Phase::Inventory, CallScope::default(), |h, store| h
                .call_inventory(store, &self.config_json));
        listed.map(|r| {
            r.map(|items| {
                bounds::inventory(&self.name, items)
                    .into_iter()
                    .map(Into::into)
                    .collect()
            })
            .map_err(|s| bounds::status(s).into())
        })
    }

    /// Checks the handler's device configuration as it is loaded: the
    /// handler refuses it by failing `inventory` with [`INVALID_CONFIG`].
    /// Any other failure is left to the inventory the agent takes at start
    /// (a tool may be missing for a moment; the config is still valid).
    pub async fn check_config(&self) -> Result<()> {
        match self.inventory().await {
            Ok(Err(status)) if status.result_code == INVALID_CONFIG => {
                Err(anyhow::Error::new(InvalidConfig {
                    handler: self.name.clone(),
                    reason: status.message,
                }))
            }
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::debug!(handler = self.name, "inventory at load: {e:#}");
                Ok(())
            }
        }
    }

    /// Calls one of the phases that return an [`Outcome`]: download, backup,
    /// install, apply, verify, commit, rollback or cleanup.
    pub async fn run_phase(
        &self,
        phase: model::Phase,
        scope: CallScope,
        ctx: &StepContext,
    ) -> Result<Outcome> {
        let ctx = &wit::StepContext::from(ctx);
        let phase = Phase::from(phase);
        let outcome: Result<wit::Outcome> = match phase {
            Phase::Download => invoke!(self, phase, scope, |h, s| h.call_download(s, ctx)),
            Phase::Backup => invoke!(self, phase, scope, |h, s| h.call_backup(s, ctx)),
            Phase::Install => invoke!(self, phase, scope, |h, s| h.call_install(s, ctx)),
            Phase::Apply => invoke!(self, phase, scope, |h, s| h.call_apply(s, ctx)),
            Phase::Verify => invoke!(self, phase, scope, |h, s| h.call_verify(s, ctx)),
            Phase::Commit => invoke!(self, phase, scope, |h, s| h.call_commit(s, ctx)),
            Phase::Rollback => invoke!(self, phase, scope, |h, s| h.call_rollback(s, ctx)),
            Phase::Cleanup => invoke!(self, phase, scope, |h, s| h.call_cleanup(s, ctx)),
            other => anyhow::bail!("{other:?} does not return an outcome; use its own method"),
        };
        outcome.map(|o| bounds::outcome(o).into())
    }

    async fn instantiate(
        &self,
        phase: Phase,
        scope: CallScope,
    ) -> Result<(Store<HostState>, wit::UpdateHandler)> {
        let limits = self.grants.limits;
        let output = [GuestOutput::default(), GuestOutput::default()];
        let state = HostState {
            wasi: self.wasi_ctx(&output)?,
            table: ResourceTable::new(),
            limiter: Limiter {
                memory_bytes: limits.memory_bytes(),
                exceeded: false,
            },
            handler: Arc::from(self.name.as_str()),
            grants: self.grants.clone(),
            phase,
            scope,
            deadline: Instant::now() + limits.call_timeout(),
            open_payloads: 0,
            output,
            devices: self.devices.clone(),
            log_budget: Default::default(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
        store.set_hostcall_fuel(HOSTCALL_FUEL);
        store.set_epoch_deadline(ticks_for(limits.call_timeout()));
        store.epoch_deadline_trap();
        let instance = self
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(anyhow::Error::from)
            .with_context(|| format!("handler {}: cannot instantiate for {phase:?}", self.name))?;
        Ok((store, instance))
    }

    /// WASI context of one call: preopens for granted paths, sockets for
    /// granted hosts, no arguments, no inherited stdio, and one variable:
    /// [`GRANTED_PATHS_ENV`], so a handler can say that a path it could not
    /// open lies outside its grants (the guest's libc refuses such a path
    /// before the host sees it).
    fn wasi_ctx(&self, output: &[GuestOutput; 2]) -> Result<WasiCtx> {
        let mut builder = WasiCtxBuilder::new();
        builder.stdout(output[0].clone()).stderr(output[1].clone());
        builder.env(GRANTED_PATHS_ENV, &self.granted_paths);
        // Local file operations run on the calling thread: a guest already
        // occupies its worker while it runs, and a hand-off to the blocking
        // pool per syscall cost ~5x the whole call (see benches/handler_call).
        // Set before the preopens, which capture it.
        builder.allow_blocking_current_thread(true);
        for unit in capabilities::ALL {
            unit.configure_wasi(&self.grants, &mut builder)
                .with_context(|| format!("handler {}", self.name))?;
        }
        Ok(builder.build())
    }

    /// Writes what the guest printed to the agent log, escaped, and how
    /// many log lines its budget dropped.
    fn log_output(&self, phase: Phase, store: &Store<HostState>) {
        let handler = &*self.name;
        for (stream, output) in ["stdout", "stderr"].into_iter().zip(&store.data().output) {
            let (text, dropped) = output.take();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let line = bounds::text(line.to_string(), MAX_LOG_LINE);
                tracing::info!(target: "handler", handler, ?phase, stream, "{line}");
            }
            if dropped > 0 {
                tracing::warn!(target: "handler", handler, ?phase, stream, "{dropped} more bytes dropped");
            }
        }
        let dropped = store.data().log_budget.dropped();
        if dropped > 0 {
            tracing::warn!(target: "handler", handler, ?phase, "{dropped} log lines dropped: over the budget of {MAX_LOG_LINES_PER_CALL} lines or {MAX_LOG_BYTES_PER_CALL} bytes per call");
        }
    }

    /// Turns the result of a call into a value or an error with context.
    fn explain<T>(
        &self,
        phase: Phase,
        store: &Store<HostState>,
        result: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>,
    ) -> Result<T> {
        self.log_output(phase, store);
        let limits = self.grants.limits;
        let fault = match result {
            Ok(Ok(value)) => return Ok(value),
            Err(_) => CallFault::TimeLimit {
                limit_ms: limits.call_timeout_ms,
            },
            Ok(Err(_)) if store.data().limiter.exceeded => CallFault::MemoryLimit {
                limit_mb: limits.memory_mb,
            },
            Ok(Err(e)) if stack_overflow(&e) => CallFault::StackOverflow,
            Ok(Err(e)) if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) => {
                CallFault::TimeLimit {
                    limit_ms: limits.call_timeout_ms,
                }
            }
            Ok(Err(e)) => CallFault::Trap(format!("{e:#}")),
        };
        Err(anyhow::Error::new(fault).context(format!("handler {}: {phase:?}", self.name)))
    }
}

/// The sandboxed handler as the agent and the step workflow see it: each
/// call converts the WIT values at this edge (see `runtime/convert.rs`).
#[async_trait::async_trait]
impl UpdateHandler for Handler {
    fn name(&self) -> &str {
        &self.name
    }

    fn description(&self) -> &Description {
        &self.description
    }

    fn update_types(&self) -> Vec<String> {
        self.manifest
            .handler
            .update_types
            .iter()
            .map(|t| t.to_string())
            .collect()
    }

    fn config(&self) -> &str {
        &self.config_json
    }

    fn fingerprint(&self) -> &str {
        &self.sha256
    }

    async fn describe(&self) -> Result<Description> {
        Handler::describe(self).await
    }

    async fn inventory(&self) -> Result<Result<Vec<InstalledItem>, Status>> {
        Handler::inventory(self).await
    }

    async fn validate(&self, scope: CallScope, ctx: &StepContext) -> Result<Result<Plan, Status>> {
        Handler::validate(self, scope, ctx).await
    }

    async fn is_installed(
        &self,
        scope: CallScope,
        ctx: &StepContext,
    ) -> Result<Result<bool, Status>> {
        Handler::is_installed(self, scope, ctx).await
    }

    async fn run_phase(
        &self,
        phase: model::Phase,
        scope: CallScope,
        ctx: &StepContext,
    ) -> Result<Outcome> {
        Handler::run_phase(self, phase, scope, ctx).await
    }
}

/// Lowest fault address taken for a shadow stack that wrapped below 0.
const WRAPPED_STACK: u64 = (1 << 32) - (64 << 20);
/// Fewest wasm frames of one function in a backtrace taken for a
/// recursion that ran out of stack.
const RECURSION_FRAMES: usize = 16;

/// Whether a trap is a stack overflow: the engine's call stack ran out, or
/// the guest's shadow stack (at the bottom of its linear memory, growing
/// down) went below address 0 and wrapped to the top of the 32-bit space,
/// where the access faults — at a wrapped address when the engine knows
/// it, else deep in a recursion.
fn stack_overflow(e: &wasmtime::Error) -> bool {
    match e.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => true,
        Some(Trap::MemoryOutOfBounds) => fault_address(e).map_or_else(
            || deep_recursion(e),
            |a| (WRAPPED_STACK..1 << 32).contains(&a),
        ),
        _ => false,
    }
}

/// The wasm address of a memory fault, from the engine's context message.
fn fault_address(e: &wasmtime::Error) -> Option<u64> {
    const PREFIX: &str = "memory fault at wasm address 0x";
    e.chain().find_map(|cause| {
        let text = cause.to_string();
        let hex = text.strip_prefix(PREFIX)?;
        let end = hex
            .find(|c: char| !c.is_ascii_hexdigit())
            .unwrap_or(hex.len());
        u64::from_str_radix(&hex[..end], 16).ok()
    })
}

/// Whether the trap's backtrace is one function recursing: at least
/// [`RECURSION_FRAMES`] frames of it.
fn deep_recursion(e: &wasmtime::Error) -> bool {
    let Some(trace) = e.downcast_ref::<WasmBacktrace>() else {
        return false;
    };
    let frames = trace.frames();
    frames.iter().any(|f| {
        frames
            .iter()
            .filter(|g| g.func_index() == f.func_index() && g.func_name() == f.func_name())
            .count()
            >= RECURSION_FRAMES
    })
}
