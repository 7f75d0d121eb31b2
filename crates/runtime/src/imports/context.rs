//! `otabox:handler/context`: log, progress, cancel-requested.
//!
//! Guest log lines are escaped (no control character reaches the agent's
//! log as it is, so no guest text starts a line of its own) and budgeted
//! per call: beyond [`MAX_LOG_LINES_PER_CALL`] lines or
//! [`MAX_LOG_BYTES_PER_CALL`] bytes they are dropped and counted, and one
//! summary line says how many after the call.

use crate::bindings::otabox::handler::context::Host;
use crate::bindings::{LogLevel, Phase};
use crate::bounds;
use crate::state::{HostState, ProgressEvent};

/// Longest log line kept from a guest (marker included).
pub const MAX_LOG_LINE: usize = 4096;
/// Most log lines a guest may write in one call.
pub const MAX_LOG_LINES_PER_CALL: u64 = 1000;
/// Most bytes of log lines a guest may write in one call.
pub const MAX_LOG_BYTES_PER_CALL: u64 = 256 << 10;

/// What a call has logged so far, and what it was refused.
#[derive(Debug, Default)]
pub struct LogBudget {
    lines: u64,
    bytes: u64,
    dropped: u64,
}

impl LogBudget {
    /// Counts a line of `len` bytes; false when it is over the budget.
    fn admit(&mut self, len: usize) -> bool {
        let len = len as u64;
        if self.dropped > 0
            || self.lines >= MAX_LOG_LINES_PER_CALL
            || self.bytes + len > MAX_LOG_BYTES_PER_CALL
        {
            self.dropped += 1;
            return false;
        }
        self.lines += 1;
        self.bytes += len;
        true
    }

    /// Lines dropped in this call.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

impl Host for HostState {
    async fn log(&mut self, level: LogLevel, message: String) -> wasmtime::Result<()> {
        let (handler, job, phase) = (&*self.handler, &self.scope.job_id, self.phase);
        if !self.log_budget.admit(message.len().min(MAX_LOG_LINE)) {
            if self.log_budget.dropped() == 1 {
                tracing::warn!(target: "handler", handler, job, ?phase,
                    "log budget of this call spent ({MAX_LOG_LINES_PER_CALL} lines or {MAX_LOG_BYTES_PER_CALL} bytes): further lines are dropped and counted");
            }
            return Ok(());
        }
        let message = bounds::text(message, MAX_LOG_LINE);
        match level {
            LogLevel::Trace => {
                tracing::trace!(target: "handler", handler, job, ?phase, "{message}")
            }
            LogLevel::Debug => {
                tracing::debug!(target: "handler", handler, job, ?phase, "{message}")
            }
            LogLevel::Info => tracing::info!(target: "handler", handler, job, ?phase, "{message}"),
            LogLevel::Warn => tracing::warn!(target: "handler", handler, job, ?phase, "{message}"),
            LogLevel::Error => {
                tracing::error!(target: "handler", handler, job, ?phase, "{message}")
            }
        }
        Ok(())
    }

    async fn progress(&mut self, phase: Phase, done: u64, total: u64) -> wasmtime::Result<()> {
        if let Some(sink) = &self.scope.progress {
            sink(ProgressEvent {
                handler: self.handler.to_string(),
                job_id: self.scope.job_id.clone(),
                step: self.scope.step,
                phase: phase.into(),
                done,
                total,
            });
        }
        Ok(())
    }

    async fn cancel_requested(&mut self) -> wasmtime::Result<bool> {
        Ok(self.scope.cancel.is_cancelled())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_admits_lines_then_counts_the_rest() {
        let mut budget = LogBudget::default();
        for _ in 0..MAX_LOG_LINES_PER_CALL {
            assert!(budget.admit(10));
        }
        assert!(!budget.admit(1));
        assert!(!budget.admit(1));
        assert_eq!(budget.dropped(), 2);
        let mut bytes = LogBudget::default();
        assert!(bytes.admit(MAX_LOG_BYTES_PER_CALL as usize - 1));
        assert!(!bytes.admit(2), "over the byte budget");
        assert!(!bytes.admit(0), "once spent, spent for the call");
    }
}
