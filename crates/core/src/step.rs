//! The lifecycle of one update step, phase by phase:
//! validate → is-installed → fetch and verify payloads → download → backup
//! → install → apply → verify → commit, with rollback on a failure after
//! backup (when the handler supports it) and cleanup at the end whatever
//! happened. Nothing is fetched before the handler has validated the step
//! and said it is not installed: `validate` and `is-installed` see the
//! manifest and the declared payload names, sizes and hashes, not the bytes.
//!
//! Reboot and agent-restart requests from install and apply are merged (a
//! reboot covers a restart; immediate wins over deferred); apply still runs,
//! and the step then stops before verify with [`StepResult::RebootRequired`]
//! or [`StepResult::RestartAgent`], without cleanup. After the reboot or
//! restart, [`continue_step`] runs verify → commit → cleanup.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::Serialize;

pub use crate::model::pack;
use crate::model::{CallScope, CancelFlag, PayloadFile, ProgressSink};
use crate::model::{
    ExtendedCode, Outcome, PayloadInfo, Phase, RebootMode, Status, StepContext, UpdateHandler,
};
use crate::trust::verify_file;

pub use crate::host_codes::{self, HOST_FAILURE};

/// One step to run.
#[derive(Debug, Clone)]
pub struct StepRequest {
    /// Job id.
    pub job_id: String,
    /// Step index.
    pub step: u32,
    /// Update type asked for.
    pub update_type: String,
    /// Manifest JSON text.
    pub manifest: String,
    /// Payloads and their local files. Each is checked against its declared
    /// size and sha256 before a handler sees it, unless `verified` is
    /// already set (the caller hashed it, as the downloader does).
    pub payloads: Vec<(PayloadFile, PathBuf)>,
    /// Directory for the job's checkpoints.
    pub job_dir: PathBuf,
    /// Cancellation of the job, seen by the handler as cancel-requested.
    pub cancel: CancelFlag,
}

/// What one phase returned, for the report.
#[derive(Debug, Clone, Serialize)]
pub struct PhaseRecord {
    /// The phase.
    pub phase: String,
    /// Its outcome in words.
    pub outcome: String,
}

/// How the step ended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "kebab-case")]
pub enum StepResult {
    /// Installed and committed.
    Installed {
        /// Installed criteria.
        criteria: String,
    },
    /// Nothing to do: already installed.
    AlreadyInstalled {
        /// Installed criteria.
        criteria: String,
    },
    /// Waiting for a reboot before verify.
    RebootRequired {
        /// Whether immediately or deferred.
        deferred: bool,
    },
    /// Waiting for an agent restart before verify.
    RestartAgent,
    /// Failed.
    Failed {
        /// The phase that failed.
        phase: Phase,
        /// Result code.
        result_code: u32,
        /// Packed extended code.
        extended_code: u32,
        /// Message.
        message: String,
        /// Whether a rollback restored the previous state.
        rolled_back: bool,
    },
    /// Cancelled.
    Cancelled,
}

/// The record of a step run.
#[derive(Debug, Clone, Serialize)]
pub struct StepReport {
    /// Every phase called, in order.
    pub phases: Vec<PhaseRecord>,
    /// Warnings from the plan.
    pub warnings: Vec<String>,
    /// How it ended.
    pub result: StepResult,
    /// The installed criteria of the handler's plan, once validate
    /// returned one (a step that waits for a reboot carries it forward).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned_criteria: Option<String>,
    /// The rollback restored the previous version for the next boot and
    /// asked for a reboot into it (the device still runs the failed one).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reboot_after_rollback: bool,
}

/// Where a step stands after a phase.
enum Flow {
    Next,
    /// Go on, and reboot or restart once install and apply are done.
    Pending(StepResult),
    Stop(StepResult),
}

/// Merges two reboot/restart requests: a reboot covers a restart, and an
/// immediate reboot wins over a deferred one.
pub fn merge(a: Option<StepResult>, b: StepResult) -> StepResult {
    use StepResult::{RebootRequired, RestartAgent};
    match (a, b) {
        (Some(RebootRequired { deferred: x }), RebootRequired { deferred: y }) => {
            RebootRequired { deferred: x && y }
        }
        (Some(r @ RebootRequired { .. }), RestartAgent)
        | (Some(RestartAgent), r @ RebootRequired { .. }) => r,
        (_, b) => b,
    }
}

struct Run<'a> {
    handler: &'a dyn UpdateHandler,
    scope: CallScope,
    ctx: StepContext,
    phases: Vec<PhaseRecord>,
    before: PhaseHook<'a>,
    /// The rollback asked for a reboot into the restored version.
    reboot_after_rollback: bool,
}

/// Called before each handler phase of a step; an error stops the step
/// before the phase runs (the journal could not record it).
pub type PhaseHook<'a> = &'a (dyn Fn(Phase) -> Result<()> + Sync);

/// Fetches the payloads a step's plan names into their local files (the
/// agent downloads them); called once is-installed said no, before the
/// files are verified and handed to the handler. An error fails the step
/// in its download phase with the status returned.
pub type PayloadFetch<'a> =
    &'a (dyn Fn(Vec<String>) -> futures_util::future::BoxFuture<'a, Result<(), Status>> + Sync);

/// Runs one step through `handler`; progress goes to `progress`.
pub async fn run_step(
    handler: &dyn UpdateHandler,
    request: StepRequest,
    progress: Option<ProgressSink>,
) -> Result<StepReport> {
    run_step_with(handler, request, progress, &|_| Ok(()), None).await
}

/// Like [`run_step`], calling `before` ahead of every handler phase and
/// `fetch` (when given) for the planned payloads once the step is known not
/// to be installed.
pub async fn run_step_with(
    handler: &dyn UpdateHandler,
    request: StepRequest,
    progress: Option<ProgressSink>,
    before: PhaseHook<'_>,
    fetch: Option<PayloadFetch<'_>>,
) -> Result<StepReport> {
    std::fs::create_dir_all(&request.job_dir)
        .with_context(|| format!("cannot create job directory {}", request.job_dir.display()))?;
    let declared: Vec<PayloadFile> = request.payloads.iter().map(|(p, _)| p.clone()).collect();
    let (mut scope, ctx) = call_setup(handler, &request, declared, None);
    scope.progress = progress;
    let mut run = Run::new(handler, scope, ctx, before);
    let mut warnings = Vec::new();
    let result = run.drive(&request, fetch, &mut warnings).await;
    if !matches!(
        result,
        StepResult::RebootRequired { .. } | StepResult::RestartAgent
    ) {
        run.cleanup().await;
    }
    Ok(StepReport {
        phases: run.phases,
        warnings,
        result,
        planned_criteria: run.ctx.installed_criteria.clone(),
        reboot_after_rollback: run.reboot_after_rollback,
    })
}

/// Finishes a step after the reboot or agent restart it asked for: verify →
/// commit (rollback on failure, where supported) → cleanup. The payloads
/// fetched before are still in the job folder.
pub async fn continue_step(
    handler: &dyn UpdateHandler,
    request: StepRequest,
    installed_criteria: Option<String>,
    before: PhaseHook<'_>,
) -> Result<StepReport> {
    let (scope, ctx) = resumed_call(handler, &request, installed_criteria.clone());
    let mut run = Run::new(handler, scope, ctx, before);
    let mut result = StepResult::Installed {
        criteria: installed_criteria.clone().unwrap_or_default(),
    };
    for phase in [Phase::Verify, Phase::Commit] {
        if let Flow::Stop(stopped) = run.step(phase, true).await {
            result = stopped;
            break;
        }
    }
    run.cleanup().await;
    Ok(StepReport {
        phases: run.phases,
        warnings: Vec::new(),
        result,
        planned_criteria: installed_criteria,
        reboot_after_rollback: run.reboot_after_rollback,
    })
}

/// The scope and context of a call for a step resumed after a restart or
/// reboot: the payloads fetched before (still in the job folder) count as
/// verified.
pub fn resumed_call(
    handler: &dyn UpdateHandler,
    request: &StepRequest,
    installed_criteria: Option<String>,
) -> (CallScope, StepContext) {
    let payloads: Vec<PayloadFile> = request
        .payloads
        .iter()
        .map(|(p, path)| PayloadFile {
            verified: path.exists().then(|| path.clone()),
            ..p.clone()
        })
        .collect();
    call_setup(handler, request, payloads, installed_criteria)
}

/// The scope and context of the calls of one step.
fn call_setup(
    handler: &dyn UpdateHandler,
    request: &StepRequest,
    payloads: Vec<PayloadFile>,
    installed_criteria: Option<String>,
) -> (CallScope, StepContext) {
    let ctx = StepContext {
        job_id: request.job_id.clone(),
        step: request.step,
        update_type: request.update_type.clone(),
        manifest: request.manifest.clone(),
        payloads: payloads.iter().map(payload_info).collect(),
        config: handler.config().to_string(),
        installed_criteria,
    };
    let mut scope = CallScope::for_step(&request.job_id, request.step, &request.job_dir, payloads);
    scope.cancel = request.cancel.clone();
    (scope, ctx)
}

impl<'a> Run<'a> {
    fn new(
        handler: &'a dyn UpdateHandler,
        scope: CallScope,
        ctx: StepContext,
        before: PhaseHook<'a>,
    ) -> Self {
        Self {
            handler,
            scope,
            ctx,
            phases: Vec::new(),
            before,
            reboot_after_rollback: false,
        }
    }

    async fn drive(
        &mut self,
        request: &StepRequest,
        fetch: Option<PayloadFetch<'_>>,
        warnings: &mut Vec<String>,
    ) -> StepResult {
        let plan = match self.handler.validate(self.scope.clone(), &self.ctx).await {
            Ok(Ok(plan)) => plan,
            Ok(Err(status)) => return self.failed(Phase::Validate, status, false),
            Err(fault) => return self.failed(Phase::Validate, fault_status(&fault), false),
        };
        self.record(
            Phase::Validate,
            format!("plan: installed criteria {:?}", plan.installed_criteria),
        );
        warnings.extend(plan.warnings.iter().cloned());
        self.ctx.installed_criteria = Some(plan.installed_criteria.clone());
        match self
            .handler
            .is_installed(self.scope.clone(), &self.ctx)
            .await
        {
            Ok(Ok(true)) => {
                self.record(Phase::IsInstalled, "installed".into());
                return StepResult::AlreadyInstalled {
                    criteria: plan.installed_criteria,
                };
            }
            Ok(Ok(false)) => self.record(Phase::IsInstalled, "not installed".into()),
            Ok(Err(status)) => return self.failed(Phase::IsInstalled, status, false),
            Err(fault) => return self.failed(Phase::IsInstalled, fault_status(&fault), false),
        }
        if let Some(fetch) = fetch
            && let Err(status) = self.fetch_payloads(fetch, &plan.payloads).await
        {
            return self.result_of(Phase::Download, status, false);
        }
        if let Err(status) = self.verify_payloads(request, &plan.payloads, fetch.is_some()) {
            return self.result_of(Phase::Download, status, false);
        }
        for phase in [Phase::Download, Phase::Backup] {
            if let Flow::Stop(result) = self.step(phase, false).await {
                return result;
            }
        }
        let mut pending = None;
        for phase in [Phase::Install, Phase::Apply] {
            match self.step(phase, true).await {
                Flow::Next => {}
                Flow::Pending(request) => pending = Some(merge(pending, request)),
                Flow::Stop(result) => return result,
            }
        }
        if let Some(request) = pending {
            return request;
        }
        for phase in [Phase::Verify, Phase::Commit] {
            if let Flow::Stop(result) = self.step(phase, true).await {
                return result;
            }
        }
        StepResult::Installed {
            criteria: plan.installed_criteria,
        }
    }

    async fn cleanup(&mut self) {
        if let Outcome::Failed(status) = self.call(Phase::Cleanup).await {
            tracing::warn!("cleanup of {} failed: {}", self.ctx.job_id, status.message);
        }
    }

    /// Calls a phase and decides what follows; `undo` says whether a failure
    /// needs a rollback.
    async fn step(&mut self, phase: Phase, undo: bool) -> Flow {
        match self.call(phase).await {
            Outcome::Success | Outcome::Skipped(_) => Flow::Next,
            Outcome::RebootRequired(mode) if matches!(phase, Phase::Install | Phase::Apply) => {
                Flow::Pending(StepResult::RebootRequired {
                    deferred: mode == RebootMode::Deferred,
                })
            }
            Outcome::RestartAgent if matches!(phase, Phase::Install | Phase::Apply) => {
                Flow::Pending(StepResult::RestartAgent)
            }
            Outcome::RebootRequired(_) | Outcome::RestartAgent => {
                let status = host_status(
                    host_codes::HANDLER_FAULT,
                    format!("{phase:?} may not ask for a reboot or restart"),
                );
                Flow::Stop(self.fail_and_undo(phase, status, undo).await)
            }
            Outcome::Cancelled => {
                if undo {
                    self.rollback().await;
                }
                Flow::Stop(StepResult::Cancelled)
            }
            Outcome::Failed(status) => Flow::Stop(self.fail_and_undo(phase, status, undo).await),
        }
    }

    async fn fail_and_undo(&mut self, phase: Phase, status: Status, undo: bool) -> StepResult {
        let rolled_back = undo && self.rollback().await;
        self.result_of(phase, status, rolled_back)
    }

    /// Rolls back when supported; true when the previous state is restored
    /// (a rollback that needs a reboot to take effect counts, and the
    /// reboot is noted for the agent).
    async fn rollback(&mut self) -> bool {
        if !self.handler.description().supports_rollback {
            self.record(Phase::Rollback, "not supported by the handler".into());
            return false;
        }
        match self.call(Phase::Rollback).await {
            Outcome::Success | Outcome::Skipped(_) => true,
            Outcome::RebootRequired(_) => {
                self.reboot_after_rollback = true;
                true
            }
            _ => false,
        }
    }

    /// Calls an outcome phase; a host-side fault becomes a failed outcome.
    async fn call(&mut self, phase: Phase) -> Outcome {
        if let Err(e) = (self.before)(phase) {
            let status = host_status(
                host_codes::JOURNAL,
                format!("cannot journal {phase}: {e:#}"),
            );
            self.record(phase, format!("not started: {}", status.message));
            return Outcome::Failed(status);
        }
        let outcome = match self
            .handler
            .run_phase(phase, self.scope.clone(), &self.ctx)
            .await
        {
            Ok(outcome) => outcome,
            Err(fault) => Outcome::Failed(fault_status(&fault)),
        };
        self.record(phase, outcome.to_string());
        outcome
    }

    /// Fetches the planned payloads; a failure is recorded as the `payloads`
    /// pseudo-phase.
    async fn fetch_payloads(
        &mut self,
        fetch: PayloadFetch<'_>,
        planned: &[String],
    ) -> Result<(), Status> {
        fetch(planned.to_vec()).await.inspect_err(|status| {
            self.phases.push(PhaseRecord {
                phase: "payloads".into(),
                outcome: format!("failed: {}", status.message),
            });
        })
    }

    /// Checks each planned payload against its declared size and sha256 and
    /// hands the verified file to the scope; `fetched` files were verified
    /// by the fetch as they came in.
    fn verify_payloads(
        &mut self,
        request: &StepRequest,
        planned: &[String],
        fetched: bool,
    ) -> Result<(), Status> {
        for name in planned {
            let Some((declared, path)) = request.payloads.iter().find(|(p, _)| &p.name == name)
            else {
                return Err(host_status(
                    host_codes::UNKNOWN_PAYLOAD,
                    format!("the plan names unknown payload {name:?}"),
                ));
            };
            // A payload the caller already verified (the agent hashes while
            // downloading) is not read a second time.
            let checked = match declared.verified {
                Some(_) => Ok(()),
                None if fetched => Ok(()),
                None => verify_file(path, declared.size, &declared.sha256),
            };
            checked.map_err(|e| {
                let status = host_status(
                    host_codes::PAYLOAD_MISMATCH,
                    format!("payload {name:?}: {e:#}"),
                );
                self.phases.push(PhaseRecord {
                    phase: "payloads".into(),
                    outcome: format!("failed: {}", status.message),
                });
                status
            })?;
            if let Some(p) = self.scope.payloads.iter_mut().find(|p| &p.name == name) {
                p.verified = Some(path.clone());
            }
        }
        self.phases.push(PhaseRecord {
            phase: "payloads".into(),
            outcome: format!("{} verified", planned.len()),
        });
        Ok(())
    }

    fn record(&mut self, phase: Phase, outcome: String) {
        tracing::info!(
            handler = self.handler.name(),
            job = self.ctx.job_id,
            ?phase,
            "{outcome}"
        );
        self.phases.push(PhaseRecord {
            phase: phase.as_str().into(),
            outcome,
        });
    }

    /// Records a failure of a phase that [`Run::call`] did not record.
    fn failed(&mut self, phase: Phase, status: Status, rolled_back: bool) -> StepResult {
        self.record(phase, format!("failed: {}", status.message));
        self.result_of(phase, status, rolled_back)
    }

    fn result_of(&self, phase: Phase, status: Status, rolled_back: bool) -> StepResult {
        StepResult::Failed {
            phase,
            result_code: status.result_code,
            extended_code: status.extended_code.pack(),
            message: status.message,
            rolled_back,
        }
    }
}

/// What a handler sees of a payload.
pub fn payload_info(p: &PayloadFile) -> PayloadInfo {
    PayloadInfo {
        name: p.name.clone(),
        size: p.size,
        sha256: p.sha256.clone(),
    }
}

/// A status for a failure the host detected (facility 0).
pub fn host_status(component_value: u32, message: String) -> Status {
    Status {
        result_code: HOST_FAILURE,
        extended_code: ExtendedCode {
            facility: 0,
            component: 0,
            value: component_value,
        },
        message,
        details: Vec::new(),
    }
}

fn fault_status(fault: &anyhow::Error) -> Status {
    host_status(host_codes::HANDLER_FAULT, format!("{fault:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reboot_requests_merge() {
        use StepResult::{RebootRequired, RestartAgent};
        assert_eq!(merge(None, RestartAgent), RestartAgent);
        assert_eq!(
            merge(Some(RestartAgent), RebootRequired { deferred: true }),
            RebootRequired { deferred: true }
        );
        assert_eq!(
            merge(
                Some(RebootRequired { deferred: true }),
                RebootRequired { deferred: false }
            ),
            RebootRequired { deferred: false }
        );
        assert_eq!(
            merge(Some(RebootRequired { deferred: true }), RestartAgent),
            RebootRequired { deferred: true }
        );
    }

    #[tokio::test]
    async fn the_plan_reaches_every_later_phase_and_the_result_as_data() {
        use crate::model::testing::{Answer, FakeHandler};
        // Criteria nobody would write in a log line: quotes, a newline and
        // the words the old log line used.
        let criteria = "plan: installed criteria \"app\"\n2.0";
        let plan = crate::model::Plan {
            installed_criteria: criteria.into(),
            payloads: Vec::new(),
            reboot: crate::model::RebootExpectation::None,
            warnings: vec!["disk nearly full".into()],
            details: Vec::new(),
        };
        let handler =
            FakeHandler::new("fake", &["acme/fake:1"]).answer(Phase::Validate, Answer::Plan(plan));
        let dir = tempfile::tempdir().expect("tempdir");
        let request = StepRequest {
            job_id: "job-1".into(),
            step: 0,
            update_type: "acme/fake:1".into(),
            manifest: "{}".into(),
            payloads: Vec::new(),
            job_dir: dir.path().join("job-1"),
            cancel: CancelFlag::default(),
        };
        let report = run_step(&handler, request, None).await.expect("step");
        let installed = StepResult::Installed {
            criteria: criteria.into(),
        };
        assert_eq!(report.result, installed);
        assert_eq!(report.planned_criteria.as_deref(), Some(criteria));
        assert_eq!(report.warnings, ["disk nearly full"]);
        for (phase, ctx) in handler.contexts().into_iter().skip(1) {
            let seen = ctx.installed_criteria.as_deref();
            assert_eq!(seen, Some(criteria), "{phase}");
        }
    }

    #[test]
    fn extended_codes_pack_into_32_bits() {
        let code = ExtendedCode {
            facility: 4,
            component: 0x12,
            value: 0x34567,
        };
        assert_eq!(pack(&code), 0x4123_4567);
        let overflow = ExtendedCode {
            facility: 0xFF,
            component: 0xFF,
            value: u32::MAX,
        };
        assert_eq!(pack(&overflow), 0xFFFF_FFFF);
    }
}
