//! The [`UpdateHandler`] trait: the calls the agent and the step workflow
//! make to a handler, and how a call that did not return is classified.

use std::fmt;

use anyhow::Result;

use super::CallScope;
use super::{Description, InstalledItem, Outcome, Phase, Plan, Status, StepContext};

/// A handler as the agent and the step workflow see it.
///
/// Every call answers in two layers: the outer `Err` is a fault (the call
/// did not return: a trap, a time or memory limit, a breach of the
/// contract; it carries a [`CallFault`], see [`fault_of`]); the inner
/// `Err` is the handler's own answer that it failed, a [`Status`]. A fault
/// is never an answer: a trap in `is-installed` does not mean "not
/// installed".
#[async_trait::async_trait]
pub trait UpdateHandler: Send + Sync {
    /// Its name (the manifest's file stem).
    fn name(&self) -> &str;

    /// What it said it is when it was loaded.
    fn description(&self) -> &Description;

    /// The update types it serves, the canonical one first.
    fn update_types(&self) -> Vec<String>;

    /// Its device configuration, as JSON text.
    fn config(&self) -> &str;

    /// What identifies its code (the component's sha256): a job pins it
    /// and continues only with the same.
    fn fingerprint(&self) -> &str;

    /// Calls `describe`.
    async fn describe(&self) -> Result<Description>;

    /// Calls `inventory` with its device configuration.
    async fn inventory(&self) -> Result<Result<Vec<InstalledItem>, Status>>;

    /// Calls `validate`.
    async fn validate(&self, scope: CallScope, ctx: &StepContext) -> Result<Result<Plan, Status>>;

    /// Calls `is-installed`.
    async fn is_installed(
        &self,
        scope: CallScope,
        ctx: &StepContext,
    ) -> Result<Result<bool, Status>>;

    /// Calls one of the phases that return an [`Outcome`]: download, backup,
    /// install, apply, verify, commit, rollback or cleanup.
    async fn run_phase(&self, phase: Phase, scope: CallScope, ctx: &StepContext)
    -> Result<Outcome>;

    /// Whether it serves `update_type` (canonical name or alias).
    fn serves(&self, update_type: &str) -> bool {
        self.update_types().iter().any(|t| t == update_type)
    }
}

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
    /// The guest overflowed its stack: the engine's call stack, or the
    /// shadow stack in its linear memory (which wraps below address 0).
    StackOverflow,
    /// The guest returned a value over the contract's bounds that the
    /// host cannot cut (an identity such as installed criteria).
    Breach(String),
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
            CallFault::StackOverflow => write!(f, "stack overflow: the guest recursed too deep"),
            CallFault::Breach(what) => write!(f, "broke the contract: {what}"),
            CallFault::Trap(detail) => write!(f, "trapped: {detail}"),
        }
    }
}

impl std::error::Error for CallFault {}

/// The fault of a call that did not return, when the error is one (an
/// error without one is the host's: the call could not be set up).
pub fn fault_of(error: &anyhow::Error) -> Option<&CallFault> {
    error.downcast_ref::<CallFault>()
}
