//! `otabox:handler/context`: log, progress, cancel-requested.

use super::truncate_utf8;
use crate::runtime::bindings::otabox::handler::context::Host;
use crate::runtime::bindings::{LogLevel, Phase};
use crate::runtime::state::{HostState, ProgressEvent};

/// Longest log line kept from a guest.
pub const MAX_LOG_LINE: usize = 4096;

impl Host for HostState {
    async fn log(&mut self, level: LogLevel, mut message: String) -> wasmtime::Result<()> {
        truncate_utf8(&mut message, MAX_LOG_LINE);
        let (handler, job, phase) = (&*self.handler, &self.scope.job_id, self.phase);
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
                phase,
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
