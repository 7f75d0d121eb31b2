//! The device shadow: what the cloud wants (desired state, arriving as a
//! delta), what the device reports, and the acknowledgement of a job, in
//! their common shapes (each cloud layout's topics and documents are in
//! the `otabox-cloud` crate).
//!
//! Every message from outside is parsed strictly: a size cap before
//! parsing, a nesting limit, unknown fields refused, and every value checked
//! (ids, names, hashes, URLs) so that nothing malformed reaches the journal.

mod desired;
mod reported;

pub use desired::{
    DEFAULT_MAX_MESSAGE, DeltaMessage, DeploymentRef, DesiredState, FileSpec, ManifestSource,
    RebootPolicy, SCHEMA_VERSION, StepSpec, parse_delta, validate_job_id,
};
pub use reported::{
    Ack, AckStatus, AgentInfo, AgentState, JobResult, LastResult, Progress, Rejection,
    ReportedState, StepOutcome,
};

/// An idle reported state after `job`, for tests.
#[cfg(any(test, feature = "testing"))]
pub fn sample_reported(job: &str) -> ReportedState {
    ReportedState {
        job_id: Some(job.into()),
        ..ReportedState::idle("1.0.0")
    }
}

/// A minimal valid desired state for `job`, for tests.
#[cfg(any(test, feature = "testing"))]
pub fn sample_desired(job: &str) -> DesiredState {
    serde_json::from_value(serde_json::json!({
        "schema": 1, "jobId": job, "version": "1",
        "steps": [{"updateType": "otabox/file:1", "manifest": {}}]
    }))
    .expect("a valid sample")
}
