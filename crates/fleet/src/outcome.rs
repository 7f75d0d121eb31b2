//! What became of a device's desired deployment, as `otabox fleet status`
//! shows it: one kind (pending, running, succeeded, failed, rolled back,
//! inconsistent, rejected, cancelled) and the device's reason.

use serde::Serialize;
use serde_json::Value;

use super::DeviceStatus;

/// The kind of outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutcomeKind {
    /// Nothing deployed.
    #[default]
    None,
    /// Deployed; the device has not reported on it yet.
    Pending,
    /// The device is running it.
    Running,
    /// Installed (or found installed already).
    Succeeded,
    /// Failed before changing anything.
    Failed,
    /// Failed, and the previous state was restored.
    RolledBack,
    /// Failed, and the previous state could not be restored.
    Inconsistent,
    /// The device refused the deployment (it never ran).
    Rejected,
    /// Cancelled by the operator (or replaced on the device).
    Cancelled,
}

impl OutcomeKind {
    /// The table's word for it.
    pub fn label(self) -> &'static str {
        match self {
            OutcomeKind::None => "-",
            OutcomeKind::Pending => "pending",
            OutcomeKind::Running => "running",
            OutcomeKind::Succeeded => "succeeded",
            OutcomeKind::Failed => "failed",
            OutcomeKind::RolledBack => "rolled back",
            OutcomeKind::Inconsistent => "inconsistent",
            OutcomeKind::Rejected => "rejected",
            OutcomeKind::Cancelled => "cancelled",
        }
    }
}

/// An outcome and its reason (as the device gave it, uncut).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// The kind.
    #[serde(rename = "outcome")]
    pub kind: OutcomeKind,
    /// Why, or what it is doing (running).
    pub reason: Option<String>,
}

impl Outcome {
    fn new(kind: OutcomeKind, reason: Option<String>) -> Self {
        Self {
            kind,
            reason: reason.filter(|r| !r.is_empty()),
        }
    }
}

/// The outcome of `status`'s desired deployment: the device's result for
/// the job, else its rejection of this shadow version, else what it is
/// doing, else its acknowledgement; a cancel not yet answered (or a
/// withdrawn deployment) counts as cancelled, anything else as pending.
pub fn of(status: &DeviceStatus) -> Outcome {
    let Some(job) = status.job() else {
        return match status.withdrawn {
            Some(_) => Outcome::new(
                OutcomeKind::Cancelled,
                Some("withdrawn after the device rejected it".into()),
            ),
            None => Outcome::default(),
        };
    };
    let reported = status.reported.as_ref();
    let cancel = status.is_cancel();
    if let Some(result) = reported
        .and_then(|r| r.get("lastResult"))
        .filter(|r| r.get("jobId").and_then(Value::as_str) == Some(job))
    {
        return of_result(result);
    }
    if let Some(rejection) = status.rejection() {
        let what = if cancel { "cancel rejected: " } else { "" };
        let reason = format!("{what}{}", rejection.reason);
        return Outcome::new(OutcomeKind::Rejected, Some(reason));
    }
    if let Some(state) = reported.and_then(|r| running(r, job)) {
        return Outcome::new(OutcomeKind::Running, Some(state));
    }
    if let Some(ack) = &status.ack {
        let kind = match ack.status {
            otabox_core::shadow::AckStatus::Success => OutcomeKind::Succeeded,
            otabox_core::shadow::AckStatus::Failure => OutcomeKind::Failed,
        };
        return Outcome::new(kind, None);
    }
    if cancel {
        let reason = "cancelled before the device ran it".to_string();
        return Outcome::new(OutcomeKind::Cancelled, Some(reason));
    }
    Outcome::new(OutcomeKind::Pending, None)
}

/// The outcome a `lastResult` reports; the reason names the failing
/// step's phase (`failed in download: …`).
fn of_result(result: &Value) -> Outcome {
    let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).unwrap_or("").to_string();
    let kind = match result.get("result").and_then(Value::as_str) {
        Some("succeeded" | "already-installed") => OutcomeKind::Succeeded,
        Some("failed-rolled-back") => OutcomeKind::RolledBack,
        Some("failed-inconsistent") => OutcomeKind::Inconsistent,
        Some("cancelled") => OutcomeKind::Cancelled,
        _ => OutcomeKind::Failed,
    };
    let message = text(result, "message");
    let failing = result
        .get("steps")
        .and_then(Value::as_array)
        .and_then(|steps| {
            steps
                .iter()
                .find(|s| text(s, "result").starts_with("failed"))
        });
    let reason = match failing {
        Some(step) => {
            let step_message = text(step, "message");
            let message = if message.is_empty() {
                step_message
            } else {
                message
            };
            format!("{}: {message}", text(step, "result"))
        }
        None => message,
    };
    Outcome::new(kind, Some(reason))
}

/// What the device is doing for `job`, when it is busy with it.
fn running(reported: &Value, job: &str) -> Option<String> {
    let state = reported.pointer("/agent/state").and_then(Value::as_str)?;
    if state == "idle" || reported.get("jobId").and_then(Value::as_str) != Some(job) {
        return None;
    }
    let progress = reported.get("progress").and_then(|p| {
        let phase = p.get("phase")?.as_str()?;
        let (done, total) = (p.get("done")?.as_u64()?, p.get("total")?.as_u64()?);
        Some(match total {
            0 => format!(", {phase}"),
            total => format!(", {phase} {}%", done.saturating_mul(100) / total),
        })
    });
    Some(format!("{state}{}", progress.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn status(reported: Value) -> DeviceStatus {
        DeviceStatus {
            id: "d".into(),
            group: None,
            version: 3,
            desired: Some(json!({"jobId": "j"})),
            reported: Some(reported),
            ack: None,
            last_seen: None,
            rejected: None,
            withdrawn: None,
            presence: None,
            cloud_refused: None,
            outcome: Outcome::default(),
        }
    }

    #[test]
    fn each_result_has_its_kind_and_the_failing_steps_reason() {
        let result = |result: &str, step: &str, message: &str| {
            of(&status(json!({"agent": {"state": "idle"}, "lastResult": {
                "jobId": "j", "result": result, "message": "",
                "steps": [{"result": "installed", "message": ""}, {"result": step, "message": message}]}})))
        };
        assert_eq!(
            result("failed", "failed in download", "HTTP 404"),
            Outcome::new(
                OutcomeKind::Failed,
                Some("failed in download: HTTP 404".into())
            )
        );
        assert_eq!(
            result("failed-rolled-back", "failed in install", "disk").kind,
            OutcomeKind::RolledBack
        );
        assert_eq!(
            result("succeeded", "installed", ""),
            Outcome::new(OutcomeKind::Succeeded, None)
        );
        let other_job = of(&status(
            json!({"agent": {"state": "installing"}, "jobId": "j",
                   "lastResult": {"jobId": "old", "result": "failed"},
                   "progress": {"step": 0, "phase": "download", "done": 1, "total": 4}}),
        ));
        assert_eq!(
            other_job,
            Outcome::new(
                OutcomeKind::Running,
                Some("installing, download 25%".into())
            )
        );
        assert_eq!(
            of(&status(json!({"agent": {"state": "idle"}}))).kind,
            OutcomeKind::Pending
        );
    }
}
