//! Logging, progress and cancellation.

use crate::__bindings::otabox::handler::context as host;
use crate::{LogLevel, Phase};

/// Writes a line to the agent's log (truncated by the host at 4096 bytes).
pub fn log(level: LogLevel, message: &str) {
    host::log(level, message);
}

/// Reports progress of `phase`: `done` of `total` units (`total` 0: unknown).
pub fn progress(phase: Phase, done: u64, total: u64) {
    host::progress(phase, done, total);
}

/// True once the job was cancelled; stop at a safe point and return
/// [`crate::Outcome::Cancelled`].
pub fn cancel_requested() -> bool {
    host::cancel_requested()
}
