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

use crate::escape;

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
    /// How it ended (`installed`, `already-installed`, `failed in PHASE`,
    /// …).
    pub result: crate::model::StepState,
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
    /// A local deployment (`otabox install` on the device), which is not
    /// acknowledged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
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
    /// Inventory items left out to keep the report within its size limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inventory_omitted: Option<u64>,
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

/// Messages in a report that had to be trimmed are cut to this many bytes.
const TRIMMED_MESSAGE: usize = 256;

impl ReportedState {
    /// The state of an idle agent of `version` that has run nothing.
    pub fn idle(version: &str) -> Self {
        ReportedState {
            agent: AgentInfo {
                state: AgentState::Idle,
                version: version.into(),
            },
            job_id: None,
            installed: Default::default(),
            inventory: Default::default(),
            inventory_omitted: None,
            last_result: None,
            progress: None,
            last_rejected: None,
        }
    }

    /// The report document (`{"state": {"reported": {"deployment": …}}}`)
    /// within `max` bytes, by construction: when the whole state does not
    /// fit, messages are cut, then inventory items are left out (counted
    /// in `inventoryOmitted`), then per-step results, and at last only the
    /// agent and the last result's outcome remain.
    pub fn bounded_payload(&self, max: usize) -> String {
        self.bounded_with(max, ReportedState::payload)
    }

    /// As [`ReportedState::bounded_payload`], with the document rendered by
    /// `render` (a layout's own shape).
    pub fn bounded_with(&self, max: usize, render: impl Fn(&ReportedState) -> String) -> String {
        let fits = |state: &ReportedState| {
            let text = render(state);
            (text.len() <= max).then_some(text)
        };
        if let Some(text) = fits(self) {
            return text;
        }
        let mut state = self.clone();
        state.cut_messages();
        if let Some(text) = fits(&state) {
            return text;
        }
        let mut keep = state
            .inventory
            .values()
            .map(BTreeMap::len)
            .max()
            .unwrap_or(0);
        while keep > 0 {
            keep /= 2;
            let trimmed = state.with_inventory_cut_to(keep);
            if let Some(text) = fits(&trimmed) {
                return text;
            }
        }
        state = state.with_inventory_cut_to(0);
        if let Some(result) = &mut state.last_result {
            result.steps.clear();
        }
        if let Some(text) = fits(&state) {
            return text;
        }
        render(&state.minimal())
    }

    fn payload(&self) -> String {
        serde_json::json!({"state": {"reported": {"deployment": self}}}).to_string()
    }

    fn cut_messages(&mut self) {
        let cut = |text: &mut String| *text = escape::text(std::mem::take(text), TRIMMED_MESSAGE);
        if let Some(result) = &mut self.last_result {
            cut(&mut result.message);
            result.steps.iter_mut().for_each(|s| cut(&mut s.message));
        }
        if let Some(rejected) = &mut self.last_rejected {
            cut(&mut rejected.reason);
        }
    }

    /// A copy listing at most `keep` inventory items per update type.
    fn with_inventory_cut_to(&self, keep: usize) -> ReportedState {
        let mut state = self.clone();
        let mut omitted = self.inventory_omitted.unwrap_or(0);
        for items in state.inventory.values_mut() {
            while items.len() > keep {
                items.pop_last();
                omitted += 1;
            }
        }
        state.inventory.retain(|_, items| !items.is_empty());
        state.inventory_omitted = (omitted > 0).then_some(omitted);
        state
    }

    /// Only what the cloud must know: the agent, the job and its outcome.
    fn minimal(&self) -> ReportedState {
        ReportedState {
            agent: self.agent.clone(),
            job_id: self.job_id.clone(),
            installed: BTreeMap::new(),
            inventory: BTreeMap::new(),
            inventory_omitted: None,
            last_result: self.last_result.as_ref().map(|r| LastResult {
                message: escape::text(r.message.clone(), 64),
                steps: Vec::new(),
                ..r.clone()
            }),
            progress: None,
            last_rejected: None,
        }
    }
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

    fn huge_state() -> ReportedState {
        let step = StepOutcome {
            update_type: "otabox/file:1".into(),
            result: "failed in install".into(),
            result_code: 7,
            extended_code: 1,
            message: "m".repeat(100_000),
            installed_criteria: None,
        };
        ReportedState {
            agent: AgentInfo {
                state: AgentState::Idle,
                version: "0.1.0".into(),
            },
            job_id: Some("j".into()),
            installed: BTreeMap::from([("otabox/file:1".into(), "app-1".into())]),
            inventory: BTreeMap::from([(
                "otabox/apt:1".into(),
                (0..5000)
                    .map(|i| (format!("package-{i:05}"), "1.0.0-1".to_string()))
                    .collect(),
            )]),
            inventory_omitted: None,
            last_result: Some(LastResult {
                job_id: "j".into(),
                status: AckStatus::Failure,
                result: JobResult::Failed,
                result_code: 7,
                extended_code: 1,
                message: "x".repeat(2 << 20),
                steps: vec![step; 64],
                local: false,
            }),
            progress: None,
            last_rejected: None,
        }
    }

    #[test]
    fn reports_fit_their_limit_and_say_what_they_left_out() {
        let state = huge_state();
        for max in [4096, 16 << 10, 64 << 10] {
            let text = state.bounded_payload(max);
            assert!(text.len() <= max, "{} > {max}", text.len());
            let back: serde_json::Value = serde_json::from_str(&text).expect("json");
            let doc = &back["state"]["reported"]["deployment"];
            assert_eq!(doc["lastResult"]["status"], "FAILURE", "{max}");
            assert_eq!(doc["lastResult"]["resultCode"], 7);
        }
        let text = state.bounded_payload(64 << 10);
        let back: serde_json::Value = serde_json::from_str(&text).expect("json");
        let doc = &back["state"]["reported"]["deployment"];
        let kept = doc["inventory"]["otabox/apt:1"]
            .as_object()
            .map_or(0, |o| o.len()) as u64;
        assert!(kept > 0, "some inventory kept at 64 KiB");
        assert_eq!(doc["inventoryOmitted"].as_u64(), Some(5000 - kept));
        assert!(doc["lastResult"]["message"].as_str().unwrap_or("").len() <= TRIMMED_MESSAGE);
        let small = huge_state().minimal();
        assert!(small.payload().len() < 1024);
    }

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
