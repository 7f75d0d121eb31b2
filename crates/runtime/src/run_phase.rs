//! `otabox handlers run-phase`: drive one lifecycle phase (or a whole step)
//! of a handler against a manifest given on the command line, outside any
//! job, so authors can try a handler on their own machine.
//!
//! Calls of one `--job` share a checkpoint store under the state
//! directory, so `backup`, `install` and `rollback` can be run one after
//! the other as the agent would.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{CallScope, Handler, Outcome, PayloadFile, Phase, Status, StepContext};
use otabox_core::model::{RebootBehaviour, RebootExpectation};
use otabox_core::step::{self, StepRequest};

/// What to call: one phase of the handler, or the whole step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseChoice {
    /// One lifecycle call.
    Phase(Phase),
    /// The whole step as the agent runs it: validate, payloads,
    /// is-installed, download … commit, rollback on failure, cleanup.
    Step,
}

impl PhaseChoice {
    /// Every choice, by its command-line name: the phases, then `step`.
    pub fn names() -> impl Iterator<Item = &'static str> {
        Phase::ALL.iter().map(|p| p.as_str()).chain(["step"])
    }
}

impl std::str::FromStr for PhaseChoice {
    type Err = otabox_core::model::UnknownPhase;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name == "step" {
            return Ok(Self::Step);
        }
        name.parse().map(Self::Phase)
    }
}

/// One `run-phase` call: the phase, its manifest and payloads, and where
/// its checkpoints live.
#[derive(Debug, Clone)]
pub struct Tryout {
    /// The phase.
    pub phase: PhaseChoice,
    /// The step manifest, JSON text.
    pub manifest: String,
    /// The update type to ask for (default: the handler's first).
    pub update_type: Option<String>,
    /// Payload files: name and path.
    pub payloads: Vec<(String, PathBuf)>,
    /// Job id; calls with the same id share checkpoints.
    pub job_id: String,
    /// Where the job's checkpoints live.
    pub job_dir: PathBuf,
}

/// Parses `NAME=PATH`.
pub fn parse_payload(arg: &str) -> Result<(String, PathBuf), String> {
    match arg.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_string(), PathBuf::from(path)))
        }
        _ => Err(format!("expected NAME=PATH, found {arg:?}")),
    }
}

/// Runs the call; returns its result as JSON and whether it succeeded.
pub async fn run(handler: &Handler, t: &Tryout) -> Result<(Value, bool)> {
    let payloads = t
        .payloads
        .iter()
        .map(|(name, path)| payload_file(name, path))
        .collect::<Result<Vec<_>>>()?;
    let update_type = t
        .update_type
        .clone()
        .unwrap_or_else(|| handler.manifest.handler.update_types[0].to_string());
    std::fs::create_dir_all(&t.job_dir)
        .with_context(|| format!("cannot create {}", t.job_dir.display()))?;
    let scope = CallScope::for_step(&t.job_id, 0, &t.job_dir, payloads.clone());
    let ctx = StepContext {
        job_id: t.job_id.clone(),
        step: 0,
        update_type: update_type.clone(),
        manifest: t.manifest.clone(),
        payloads: payloads.iter().map(step::payload_info).collect(),
        config: handler.config_json.clone(),
        installed_criteria: None,
    };
    let phase = match t.phase {
        PhaseChoice::Phase(Phase::Describe) => {
            let d = handler.describe().await?;
            return Ok((
                json!({"name": d.name, "version": d.version, "update_types": d.update_types,
                "contract": d.contract, "supports_rollback": d.supports_rollback,
                "reboot": match d.reboot {
                    RebootBehaviour::Never => "never",
                    RebootBehaviour::Sometimes => "sometimes",
                    RebootBehaviour::Always => "always",
                }}),
                true,
            ));
        }
        PhaseChoice::Phase(Phase::Validate) => {
            return Ok(match handler.validate(scope, &ctx).await? {
                Ok(plan) => (
                    json!({"installed_criteria": plan.installed_criteria, "payloads": plan.payloads,
                           "reboot": match plan.reboot {
                               RebootExpectation::None => "none",
                               RebootExpectation::Possible => "possible",
                               RebootExpectation::Required => "required",
                           },
                           "warnings": plan.warnings, "details": pairs(&plan.details)}),
                    true,
                ),
                Err(status) => (json!({"failed": status_json(&status)}), false),
            });
        }
        PhaseChoice::Phase(Phase::IsInstalled) => {
            return Ok(match handler.is_installed(scope, &ctx).await? {
                Ok(installed) => (json!({"installed": installed}), true),
                Err(status) => (json!({"failed": status_json(&status)}), false),
            });
        }
        PhaseChoice::Phase(Phase::Inventory) => {
            return Ok(match handler.inventory().await? {
                Ok(items) => (
                    Value::Array(
                        items
                            .iter()
                            .map(|i| json!({"name": i.name, "version": i.version,
                                            "update_type": i.update_type, "details": pairs(&i.details)}))
                            .collect(),
                    ),
                    true,
                ),
                Err(status) => (json!({"failed": status_json(&status)}), false),
            });
        }
        PhaseChoice::Step => {
            let request = StepRequest {
                job_id: t.job_id.clone(),
                step: 0,
                update_type,
                manifest: t.manifest.clone(),
                payloads: payloads
                    .into_iter()
                    .map(|p| {
                        let path = p.verified.clone().unwrap_or_default();
                        (p, path)
                    })
                    .collect(),
                job_dir: t.job_dir.clone(),
                cancel: Default::default(),
            };
            let report = step::run_step(handler, request, None).await?;
            let ok = !matches!(
                report.result,
                step::StepResult::Failed { .. } | step::StepResult::Cancelled
            );
            return Ok((serde_json::to_value(&report)?, ok));
        }
        PhaseChoice::Phase(phase) => phase,
    };
    let outcome = handler.run_phase(phase, scope, &ctx).await?;
    let ok = !matches!(outcome, Outcome::Failed(_) | Outcome::Cancelled);
    Ok((outcome_json(&outcome), ok))
}

/// A payload file as verified: its size and sha256, computed here.
fn payload_file(name: &str, path: &Path) -> Result<PayloadFile> {
    let (size, sha256) = otabox_core::trust::hash_file(path)
        .with_context(|| format!("payload {name}: cannot read {}", path.display()))?;
    Ok(PayloadFile {
        name: name.to_string(),
        size,
        sha256,
        verified: Some(path.to_path_buf()),
    })
}

fn outcome_json(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Failed(status) => json!({"outcome": "failed", "failed": status_json(status)}),
        other => json!({"outcome": other.to_string()}),
    }
}

fn status_json(status: &Status) -> Value {
    json!({
        "result_code": status.result_code,
        "extended_code": status.extended_code.pack(),
        "message": status.message,
        "details": pairs(&status.details),
    })
}

fn pairs(details: &[(String, String)]) -> Value {
    Value::Object(
        details
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_arguments_need_a_name_and_a_path() {
        assert_eq!(
            parse_payload("app.conf=/tmp/a").expect("valid"),
            ("app.conf".to_string(), PathBuf::from("/tmp/a"))
        );
        for bad in ["app.conf", "=/tmp/a", "app.conf="] {
            assert!(parse_payload(bad).is_err(), "{bad}");
        }
    }
}
