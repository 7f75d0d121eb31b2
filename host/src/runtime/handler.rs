//! A loaded handler and its lifecycle calls. Every call instantiates the
//! pre-linked component in a fresh store with the call's limits: a deadline
//! in epochs, a memory cap, and the grants as WASI preopens and host checks.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, Trap};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder};

use super::bindings::{
    Description, InstalledItem, Outcome, Phase, Plan, Status, StepContext, UpdateHandlerPre,
};
use super::cache::CacheUse;
use super::engine::ticks_for;
use super::network;
use super::state::{CallScope, HostState, Limiter};
use super::stdio::GuestOutput;
use crate::capabilities::{Access, Grants, HandlerManifest};

/// Extra time the async backstop allows beyond the epoch deadline, for a
/// guest blocked in a host call.
const BACKSTOP_GRACE: Duration = Duration::from_millis(50);

/// Why a call did not return normally.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallFault {
    /// The call ran past its time limit.
    TimeLimit {
        /// The limit, in milliseconds.
        limit_ms: u64,
    },
    /// The guest grew memory past its cap.
    MemoryLimit {
        /// The cap, in MiB.
        limit_mb: u64,
    },
    /// The guest trapped (a panic, unreachable, a host-side fault).
    Trap(String),
}

impl fmt::Display for CallFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallFault::TimeLimit { limit_ms } => {
                write!(f, "exceeded its time limit of {limit_ms} ms")
            }
            CallFault::MemoryLimit { limit_mb } => {
                write!(f, "exceeded its memory limit of {limit_mb} MiB")
            }
            CallFault::Trap(detail) => write!(f, "trapped: {detail}"),
        }
    }
}

impl std::error::Error for CallFault {}

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
        invoke!(self, Phase::Describe, CallScope::default(), |h, store| h
            .call_describe(store))
    }

    /// Calls `validate`.
    pub async fn validate(
        &self,
        scope: CallScope,
        ctx: &StepContext,
    ) -> Result<Result<Plan, Status>> {
        invoke!(self, Phase::Validate, scope, |h, store| h
            .call_validate(store, ctx))
    }

    /// Calls `is-installed`.
    pub async fn is_installed(
        &self,
        scope: CallScope,
        ctx: &StepContext,
    ) -> Result<Result<bool, Status>> {
        invoke!(self, Phase::IsInstalled, scope, |h, store| h
            .call_is_installed(store, ctx))
    }

    /// Calls `inventory` with the handler's device configuration.
    pub async fn inventory(&self) -> Result<Result<Vec<InstalledItem>, Status>> {
        invoke!(self, Phase::Inventory, CallScope::default(), |h, store| h
            .call_inventory(store, &self.config_json))
    }

    /// Calls one of the phases that return an [`Outcome`]: download, backup,
    /// install, apply, verify, commit, rollback or cleanup.
    pub async fn run_phase(
        &self,
        phase: Phase,
        scope: CallScope,
        ctx: &StepContext,
    ) -> Result<Outcome> {
        match phase {
            Phase::Download => invoke!(self, phase, scope, |h, s| h.call_download(s, ctx)),
            Phase::Backup => invoke!(self, phase, scope, |h, s| h.call_backup(s, ctx)),
            Phase::Install => invoke!(self, phase, scope, |h, s| h.call_install(s, ctx)),
            Phase::Apply => invoke!(self, phase, scope, |h, s| h.call_apply(s, ctx)),
            Phase::Verify => invoke!(self, phase, scope, |h, s| h.call_verify(s, ctx)),
            Phase::Commit => invoke!(self, phase, scope, |h, s| h.call_commit(s, ctx)),
            Phase::Rollback => invoke!(self, phase, scope, |h, s| h.call_rollback(s, ctx)),
            Phase::Cleanup => invoke!(self, phase, scope, |h, s| h.call_cleanup(s, ctx)),
            other => anyhow::bail!("{other:?} does not return an outcome; use its own method"),
        }
    }

    async fn instantiate(
        &self,
        phase: Phase,
        scope: CallScope,
    ) -> Result<(Store<HostState>, super::bindings::UpdateHandler)> {
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
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| &mut s.limiter);
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
    /// granted hosts, no environment, no arguments, no inherited stdio.
    fn wasi_ctx(&self, output: &[GuestOutput; 2]) -> Result<WasiCtx> {
        let mut builder = WasiCtxBuilder::new();
        builder.stdout(output[0].clone()).stderr(output[1].clone());
        // Local file operations run on the calling thread: a guest already
        // occupies its worker while it runs, and a hand-off to the blocking
        // pool per syscall cost ~5x the whole call (see benches/handler_call).
        // Set before the preopens, which capture it.
        builder.allow_blocking_current_thread(true);
        for grant in &self.grants.paths {
            let perms = match grant.access {
                Access::ReadOnly => FsPerms::ReadOnly,
                Access::ReadWrite => FsPerms::ReadWrite,
            };
            builder
                .preopened_dir(&grant.host, grant.guest.to_string_lossy(), perms)
                .map_err(anyhow::Error::from)
                .with_context(|| {
                    format!(
                        "handler {}: cannot open granted {}",
                        self.name,
                        grant.host.display()
                    )
                })?;
        }
        if self.grants.network.is_empty() {
            network::refuse_all(&mut builder);
        } else {
            network::allow_hosts(&mut builder, &self.grants.network);
        }
        Ok(builder.build())
    }

    /// Writes what the guest printed to the agent log.
    fn log_output(&self, phase: Phase, store: &Store<HostState>) {
        for (stream, output) in ["stdout", "stderr"].into_iter().zip(&store.data().output) {
            let (text, dropped) = output.take();
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                tracing::info!(target: "handler", handler = self.name, ?phase, stream, "{line}");
            }
            if dropped > 0 {
                tracing::warn!(target: "handler", handler = self.name, ?phase, stream, "{dropped} more bytes dropped");
            }
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
