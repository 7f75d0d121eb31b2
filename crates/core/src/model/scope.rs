//! What one call to a handler works on: the job, the step, its payloads,
//! its checkpoints, cancellation and where progress goes.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// A payload of the current step, as the host knows it.
#[derive(Debug, Clone)]
pub struct PayloadFile {
    /// File name from the desired state.
    pub name: String,
    /// Declared size.
    pub size: u64,
    /// Declared lowercase hex sha256.
    pub sha256: String,
    /// Where the verified bytes are; `None` until download and verification.
    pub verified: Option<PathBuf>,
}

/// Progress of a phase as a handler reported it.
#[derive(Debug, Clone)]
pub struct ProgressEvent {
    /// Handler name.
    pub handler: String,
    /// Job id (empty outside a job).
    pub job_id: String,
    /// Step index.
    pub step: u32,
    /// Phase the handler named.
    pub phase: super::Phase,
    /// Units done.
    pub done: u64,
    /// Units in all (0: unknown).
    pub total: u64,
}

/// Receives progress events.
pub type ProgressSink = Arc<dyn Fn(ProgressEvent) + Send + Sync>;

/// A flag the agent sets to cancel a running job; the step sees it.
#[derive(Debug, Clone, Default)]
pub struct CancelFlag(Arc<AtomicBool>);

impl CancelFlag {
    /// Requests cancellation.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether cancellation was requested.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// What one lifecycle call works on.
#[derive(Clone, Default)]
pub struct CallScope {
    /// Job id (empty for calls outside a job, such as inventory).
    pub job_id: String,
    /// Step index.
    pub step: u32,
    /// The step's payloads.
    pub payloads: Vec<PayloadFile>,
    /// File of the step's checkpoint store; `None` outside a job.
    pub checkpoint_file: Option<PathBuf>,
    /// Cancellation of the job.
    pub cancel: CancelFlag,
    /// Where progress goes.
    pub progress: Option<ProgressSink>,
}

impl CallScope {
    /// A scope for `job_id` step `step`, with checkpoints in `job_dir`.
    pub fn for_step(
        job_id: &str,
        step: u32,
        job_dir: &std::path::Path,
        payloads: Vec<PayloadFile>,
    ) -> Self {
        Self {
            job_id: job_id.to_string(),
            step,
            payloads,
            checkpoint_file: Some(job_dir.join(format!("step-{step}.checkpoint.json"))),
            ..Self::default()
        }
    }
}
