//! What the device reports: its state, what is installed, the last result,
//! and the acknowledgement of a job.
//!
//! Reported state (published as `{"state": {"reported": {"deployment": …}}}`):
//! ```json
//! {"agent": {"state": "idle", "version": "0.1.0"},
//!  "jobId": "deploy-42",
//!  "installed": {"otabox/file:1": "app-config-1.2.0"},
//!  "lastResult": {"jobId": "deploy-42", "status": "SUCCESS", "result": "succeeded",
//!                 "resultCode": 0, "extendedCode": 0, "message": "",
//!                 "steps": [{"updateType": "otabox/file:1", "result": "installed",
//!                            "resultCode": 0, "extendedCode": 0, "message": ""}]},
//!  "progress": {"step": 0, "phase": "download", "done": 1024, "total": 4096}}
//! ```
//! Acknowledgement: `{"jobId": "deploy-42", "status": "SUCCESS", "version": "1.2.0"}`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the agent is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentState {
    /// No job running.
    Idle,
    /// Checking a deployment.
    Validating,
    /// Fetching payloads.
    Downloading,
    /// Installing or applying.
    Installing,
    /// Waiting for a reboot (deferred, or about to happen).
    RebootPending,
    /// Verifying after a reboot or restart.
    Verifying,
    /// Restoring the previous state.
    RollingBack,
}

/// SUCCESS or FAILURE, as the seed's acknowledgement spells them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum AckStatus {
    /// The job succeeded (or was already installed).
    #[serde(rename = "SUCCESS")]
    Success,
    /// The job failed.
    #[serde(rename = "FAILURE")]
    Failure,
}

/// How a job ended, in detail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobResult {
    /// Every step installed and committed.
    Succeeded,
    /// Nothing to do: every step was already installed.
    AlreadyInstalled,
    /// Failed before changing anything.
    Failed,
    /// Failed, and rollback restored the previous state.
    FailedRolledBack,
    /// Failed, and the previous state could not be restored.
    FailedInconsistent,
    /// Cancelled by the operator or replaced by another job.
    Cancelled,
}

impl JobResult {
    /// The acknowledgement status for this result.
    pub fn ack_status(self) -> AckStatus {
        match self {
            JobResult::Succeeded | JobResult::AlreadyInstalled => AckStatus::Success,
            _ => AckStatus::Failure,
        }
    }
}

/// The result of one step, for the report.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StepOutcome {
    /// The step's update type.
    pub update_type: String,
    /// How it ended (`installed`, `already-installed`, `failed`, …).
    pub result: String,
    /// Result code (0 on success).
    pub result_code: u32,
    /// Packed extended code.
    pub extended_code: u32,
    /// Message (empty on success).
    pub message: String,
    /// Installed criteria, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_criteria: Option<String>,
}

/// The last job's result.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LastResult {
    /// Job id.
    pub job_id: String,
    /// SUCCESS or FAILURE.
    pub status: AckStatus,
    /// The detailed result.
    pub result: JobResult,
    /// Result code of the failing step (0 on success).
    pub result_code: u32,
    /// Its packed extended code.
    pub extended_code: u32,
    /// Its message.
    pub message: String,
    /// Per step.
    pub steps: Vec<StepOutcome>,
}

/// Progress of the running job.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Progress {
    /// Step index.
    pub step: u32,
    /// Phase name.
    pub phase: String,
    /// Units done.
    pub done: u64,
    /// Units in all (0: unknown).
    pub total: u64,
}

/// The agent's own identity in reports.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct AgentInfo {
    /// What it is doing.
    pub state: AgentState,
    /// Its version.
    pub version: String,
}

/// The reported state.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReportedState {
    /// The agent.
    pub agent: AgentInfo,
    /// The job running or last run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Installed criteria per update type.
    #[serde(default)]
    pub installed: BTreeMap<String, String>,
    /// Inventory per update type: item name → version.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inventory: BTreeMap<String, BTreeMap<String, String>>,
    /// The last result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_result: Option<LastResult>,
    /// Progress of the running job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// The last delta rejected, if one was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rejected: Option<Rejection>,
}

/// A delta the device refused: which one (as far as it parsed) and why.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rejection {
    /// The delta's shadow version, when it had a readable one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_version: Option<u64>,
    /// The deployment's job id, when it had a valid one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// Why it was refused.
    pub reason: String,
}

/// The acknowledgement of a job, per the IoT Atlas pattern.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Ack {
    /// Job id.
    pub job_id: String,
    /// SUCCESS or FAILURE.
    pub status: AckStatus,
    /// The version the device runs now (the new one on success, the
    /// previous one on failure).
    pub version: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_matches_the_seed_format() {
        let ack = Ack {
            job_id: "j".into(),
            status: AckStatus::Success,
            version: "1.2.0".into(),
        };
        assert_eq!(
            serde_json::to_string(&ack).expect("json"),
            r#"{"jobId":"j","status":"SUCCESS","version":"1.2.0"}"#
        );
        assert_eq!(JobResult::FailedRolledBack.ack_status(), AckStatus::Failure);
        assert_eq!(JobResult::AlreadyInstalled.ack_status(), AckStatus::Success);
    }
}
