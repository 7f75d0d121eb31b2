//! Running jobs: the worker taking accepted jobs one at a time, pinning
//! their handlers, one [`run_steps`] for fresh and resumed jobs, and how
//! their steps' results conclude the job.

use std::sync::{Arc, Mutex, PoisonError};

use anyhow::Result;
use tokio::sync::mpsc;

use super::recovery::{await_reboot, finish_then_reboot, restart_agent};
use super::report::{agent_state_of, progress_reporter};
use super::staging::{download_status, fetch_manifest, fetch_payloads, step_request};
use super::{Shared, lock};
use otabox_core::journal::{JobPhase, JobRecord, Journal};
use otabox_core::model::{Phase, Status, StepState, UpdateHandler};
use otabox_core::shadow::{AgentState, JobResult, StepOutcome};
use otabox_core::step::{self as workflow, StepRequest, StepResult, host_codes};
use otabox_runtime::CancelFlag;

/// The handler serving `update_type`, canonical name or alias.
pub(super) fn serving<'a>(
    handlers: &'a [Arc<dyn UpdateHandler>],
    update_type: &str,
) -> Option<&'a Arc<dyn UpdateHandler>> {
    handlers.iter().find(|h| h.serves(update_type))
}

/// The handler that may continue `step` of a job: the one serving its
/// update type, with the code the job pinned when it started. A step the
/// deployment does not have fails with no status.
pub(super) fn pinned_handler(
    handlers: &[Arc<dyn UpdateHandler>],
    record: &JobRecord,
    step: usize,
) -> Result<Arc<dyn UpdateHandler>, Option<Status>> {
    let update_type = &record.desired.steps.get(step).ok_or(None)?.update_type;
    let Some(handler) = serving(handlers, update_type).cloned() else {
        return Err(Some(workflow::host_status(
            host_codes::NO_HANDLER,
            format!("no handler serves {update_type}"),
        )));
    };
    match handler_changed(record, step, handler.as_ref()) {
        Some(changed) => Err(Some(workflow::host_status(
            host_codes::HANDLER_CHANGED,
            changed,
        ))),
        None => Ok(handler),
    }
}

/// Why `handler` may not continue `step`: its code is not the one the job
/// pinned when it started.
pub(super) fn handler_changed(
    record: &JobRecord,
    step: usize,
    handler: &dyn UpdateHandler,
) -> Option<String> {
    let pinned = record.handler_sha256.get(step)?;
    let now = handler.fingerprint();
    (pinned != now).then(|| {
        format!(
            "handler {} changed while the job was in progress (pinned sha256 {pinned}, now {now}); not continuing with another handler",
            handler.name()
        )
    })
}

/// Runs accepted jobs one at a time (a handler reload waits for the
/// running one).
pub(super) async fn worker(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<JobRecord>) {
    while let Some(record) = jobs.recv().await {
        let _between = shared.between_jobs.lock().await;
        let job_id = record.job_id.clone();
        if let Err(e) = execute(&shared, record).await {
            tracing::error!(job = job_id, "job stopped: {e:#}");
        }
        *lock(&shared.current) = None;
        shared
            .reporter()
            .report_inventory(&format!("inventory:{job_id}"))
            .await;
    }
}

/// Runs a job from its first unfinished step to a terminal state, with
/// the handler set current when it starts.
pub(super) async fn execute(shared: &Arc<Shared>, mut record: JobRecord) -> Result<()> {
    if lock(&shared.cancelled).remove(&record.job_id) {
        return shared
            .reporter()
            .finish(record, JobResult::Cancelled, None)
            .await;
    }
    let cancel = CancelFlag::default();
    *lock(&shared.current) = Some((record.job_id.clone(), cancel.clone()));
    shared
        .reporter()
        .report_progress(&record, AgentState::Validating)?;
    shared
        .journal
        .transition(&mut record, JobPhase::Validating)?;
    let handlers = shared.handlers();
    let pins = match pin_handlers(&handlers, &record) {
        Ok(pins) => pins,
        Err(status) => {
            return shared
                .reporter()
                .finish(record, JobResult::Failed, Some(status))
                .await;
        }
    };
    if !record.handler_sha256.is_empty() && record.handler_sha256 != pins {
        // Nothing was changed yet in this job: run it with the new handler.
        tracing::info!(
            job = record.job_id,
            "a handler changed since the job started; re-pinned before any change"
        );
    }
    record.handler_sha256 = pins;
    let env = job_env(shared, &handlers);
    let (record, end) = run_steps(&env, record, Mode::Fresh, &cancel).await?;
    conclude(shared, record, end).await
}

/// The code each step of `record` runs with: the fingerprint of the
/// handler serving its update type; fails when one has none.
pub(super) fn pin_handlers(
    handlers: &[Arc<dyn UpdateHandler>],
    record: &JobRecord,
) -> Result<Vec<String>, Status> {
    record
        .desired
        .steps
        .iter()
        .map(|spec| {
            serving(handlers, &spec.update_type)
                .map(|h| h.fingerprint().to_string())
                .ok_or_else(|| {
                    workflow::host_status(
                        host_codes::NO_HANDLER,
                        format!(
                            "no loaded handler serves update type {:?}",
                            spec.update_type
                        ),
                    )
                })
        })
        .collect()
}

/// What the steps of a job need from the agent around them: state reports
/// and downloads (a test gives its own).
#[async_trait::async_trait]
pub(super) trait JobHost: Send + Sync {
    /// Reports the agent's state for a running job.
    fn report_state(&self, record: &JobRecord, state: AgentState) -> Result<()>;

    /// Where the progress of `job`'s handler calls goes.
    fn progress(&self, job: &str) -> Option<otabox_runtime::ProgressSink>;

    /// Fetches the manifest of `step` when the deployment gives it by URL.
    async fn fetch_manifest(
        &self,
        record: &JobRecord,
        step: usize,
        job_dir: &std::path::Path,
    ) -> Result<(), Status>;

    /// Fetches the payloads of `step` named by its plan into the job folder.
    async fn fetch_payloads(
        &self,
        record: &JobRecord,
        step: usize,
        job_dir: &std::path::Path,
        names: &[String],
    ) -> Result<(), Status>;
}

#[async_trait::async_trait]
impl JobHost for Arc<Shared> {
    fn report_state(&self, record: &JobRecord, state: AgentState) -> Result<()> {
        self.reporter().report_progress(record, state)
    }

    fn progress(&self, job: &str) -> Option<otabox_runtime::ProgressSink> {
        Some(progress_reporter(self, job))
    }

    async fn fetch_manifest(
        &self,
        record: &JobRecord,
        step: usize,
        job_dir: &std::path::Path,
    ) -> Result<(), Status> {
        fetch_manifest(self, record, step, job_dir)
            .await
            .map_err(|e| download_status(&e))
    }

    async fn fetch_payloads(
        &self,
        record: &JobRecord,
        step: usize,
        job_dir: &std::path::Path,
        names: &[String],
    ) -> Result<(), Status> {
        fetch_payloads(self, record, step, job_dir, names)
            .await
            .map_err(|e| download_status(&e))
    }
}

/// What the steps of a job run with.
pub(super) struct JobEnv<'a> {
    pub(super) journal: &'a Journal,
    pub(super) handlers: &'a [Arc<dyn UpdateHandler>],
    pub(super) host: &'a dyn JobHost,
}

/// The agent's [`JobEnv`], with the job's pinned `handlers`.
pub(super) fn job_env<'a>(
    shared: &'a Arc<Shared>,
    handlers: &'a [Arc<dyn UpdateHandler>],
) -> JobEnv<'a> {
    JobEnv {
        journal: &shared.journal,
        handlers,
        host: shared,
    }
}

/// Which steps [`run_steps`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// From the first step without a result, each through its whole
    /// lifecycle.
    Fresh,
    /// The steps waiting for a reboot or restart: verify, commit, cleanup.
    Resumed,
}

/// How the steps of a job ended.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum StepsEnd {
    /// The job ends with `result`.
    Finished {
        /// The job's result.
        result: JobResult,
        /// The host's status, when the host ended it.
        status: Option<Status>,
        /// A rollback restored the previous version for the next boot.
        reboot_after_rollback: bool,
    },
    /// Steps wait for a reboot or agent restart
    /// ([`StepResult::RebootRequired`] or [`StepResult::RestartAgent`]).
    Pending(StepResult),
}

impl StepsEnd {
    /// The job ends with `result` (and the host's `status`), without a
    /// reboot.
    pub(super) fn ended(result: JobResult, status: Option<Status>) -> Self {
        StepsEnd::Finished {
            result,
            status,
            reboot_after_rollback: false,
        }
    }
}

/// Runs the steps of a job that `mode` names, journaling each phase that
/// changes the system before it runs and each step's result after it, the
/// same for fresh and resumed jobs.
pub(super) async fn run_steps(
    env: &JobEnv<'_>,
    mut record: JobRecord,
    mode: Mode,
    cancel: &CancelFlag,
) -> Result<(JobRecord, StepsEnd)> {
    let job_dir = env.journal.job_dir(&record.job_id)?;
    let steps: Vec<usize> = match mode {
        Mode::Fresh => (record.steps.len()..record.desired.steps.len()).collect(),
        Mode::Resumed => (0..record.steps.len())
            .filter(|&i| record.steps[i].result.pending())
            .collect(),
    };
    let mut pending = None;
    for step in steps {
        let handler = match pinned_handler(env.handlers, &record, step) {
            Ok(handler) => handler,
            Err(status) => {
                let end = StepsEnd::ended(JobResult::FailedInconsistent, status);
                return Ok((record, end));
            }
        };
        if mode == Mode::Fresh
            && let Err(status) = env.host.fetch_manifest(&record, step, &job_dir).await
        {
            return Ok((record, StepsEnd::ended(JobResult::Failed, Some(status))));
        }
        let mut request = step_request(&record, step, &job_dir)?;
        request.cancel = cancel.clone();
        let (next, report) = run_one(env, record, step, handler.as_ref(), request, mode).await?;
        record = next;
        let update_type = record.desired.steps[step].update_type.clone();
        let (mut outcome, terminal) = classify(&update_type, &report.result, &record.steps[..step]);
        if matches!(
            report.result,
            StepResult::RebootRequired { .. } | StepResult::RestartAgent
        ) {
            // Verify and commit after the reboot or restart need the plan's
            // criteria; they count as installed only once committed.
            outcome.installed_criteria = report.planned_criteria.clone();
            pending = Some(workflow::merge(pending, report.result.clone()));
        }
        match record.steps.get_mut(step) {
            Some(line) => *line = outcome,
            None => record.steps.push(outcome),
        }
        if let Some(result) = terminal {
            let end = StepsEnd::Finished {
                result,
                status: None,
                reboot_after_rollback: report.reboot_after_rollback,
            };
            return Ok((record, end));
        }
        env.journal.write(&record)?;
    }
    let end = match pending {
        Some(pending) => StepsEnd::Pending(pending),
        None if record
            .steps
            .iter()
            .all(|s| s.result == StepState::AlreadyInstalled) =>
        {
            StepsEnd::ended(JobResult::AlreadyInstalled, None)
        }
        None => StepsEnd::ended(JobResult::Succeeded, None),
    };
    Ok((record, end))
}

/// Runs `step` through `handler`: its whole lifecycle (fresh) or verify and
/// commit (resumed). Before each phase the agent reports its state and,
/// for a phase that changes the system, journals it; the record comes back
/// with those transitions.
pub(super) async fn run_one(
    env: &JobEnv<'_>,
    record: JobRecord,
    step: usize,
    handler: &dyn UpdateHandler,
    request: StepRequest,
    mode: Mode,
) -> Result<(JobRecord, workflow::StepReport)> {
    let snapshot = Mutex::new(record.clone());
    let before = |phase: Phase| -> Result<()> {
        if let Some(state) = agent_state_of(phase) {
            env.host.report_state(&record, state)?;
        }
        if phase.changes_system() {
            let stage = phase.as_str().to_string();
            let step = step as u32;
            env.journal
                .transition(&mut lock(&snapshot), JobPhase::Installing { step, stage })?;
        }
        Ok(())
    };
    let fetch = |names: Vec<String>| -> futures_util::future::BoxFuture<'_, Result<(), Status>> {
        let (record, job_dir, snapshot) = (&record, &request.job_dir, &snapshot);
        Box::pin(async move {
            let journaled = env
                .journal
                .transition(&mut lock(snapshot), JobPhase::Downloading);
            journaled.map_err(|e| {
                workflow::host_status(
                    host_codes::JOURNAL,
                    format!("cannot journal the download: {e:#}"),
                )
            })?;
            env.host
                .report_state(record, AgentState::Downloading)
                .map_err(|e| workflow::host_status(host_codes::JOURNAL, format!("{e:#}")))?;
            env.host.fetch_payloads(record, step, job_dir, &names).await
        })
    };
    let report = match mode {
        Mode::Fresh => {
            let progress = env.host.progress(&record.job_id);
            workflow::run_step_with(handler, request.clone(), progress, &before, Some(&fetch))
                .await?
        }
        Mode::Resumed => {
            let criteria = record.steps[step].installed_criteria.clone();
            workflow::continue_step(handler, request.clone(), criteria, &before).await?
        }
    };
    let record = snapshot
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    Ok((record, report))
}

/// Acts on how the steps of a job ended: ends it, or waits for the reboot
/// or restart its steps asked for.
pub(super) async fn conclude(shared: &Shared, record: JobRecord, end: StepsEnd) -> Result<()> {
    match end {
        StepsEnd::Finished {
            result,
            status,
            reboot_after_rollback,
        } => finish_then_reboot(shared, record, result, status, reboot_after_rollback).await,
        StepsEnd::Pending(StepResult::RebootRequired { deferred }) => {
            await_reboot(shared, record, deferred)
        }
        StepsEnd::Pending(_) => restart_agent(shared, record),
    }
}

/// Verifies and commits the steps that waited for a reboot or restart,
/// then ends the job.
pub(super) async fn continue_pending(shared: &Arc<Shared>, mut record: JobRecord) -> Result<()> {
    shared
        .journal
        .transition(&mut record, JobPhase::Verifying)?;
    shared
        .reporter()
        .report_progress(&record, AgentState::Verifying)?;
    let cancel = CancelFlag::default();
    let handlers = shared.handlers();
    let env = job_env(shared, &handlers);
    let (record, end) = run_steps(&env, record, Mode::Resumed, &cancel).await?;
    conclude(shared, record, end).await
}

/// Maps a step's result to its report line and, when the job ends there,
/// the job's result.
pub(super) fn classify(
    update_type: &str,
    result: &StepResult,
    earlier: &[StepOutcome],
) -> (StepOutcome, Option<JobResult>) {
    let changed_before = earlier.iter().any(|s| s.result == StepState::Installed);
    match result {
        StepResult::Installed { criteria } => (
            step_outcome(update_type, StepState::Installed, Some(criteria.clone())),
            None,
        ),
        StepResult::AlreadyInstalled { criteria } => (
            step_outcome(
                update_type,
                StepState::AlreadyInstalled,
                Some(criteria.clone()),
            ),
            None,
        ),
        StepResult::Failed {
            phase,
            result_code,
            extended_code,
            message,
            rolled_back,
        } => {
            let job = match (
                changed_before,
                *rolled_back,
                phase.leaves_system_untouched(),
            ) {
                (false, _, true) => JobResult::Failed,
                (false, true, false) => JobResult::FailedRolledBack,
                _ => JobResult::FailedInconsistent,
            };
            let line = StepOutcome {
                update_type: update_type.into(),
                result: StepState::Failed(*phase),
                result_code: *result_code,
                extended_code: *extended_code,
                message: message.clone(),
                installed_criteria: None,
            };
            (line, Some(job))
        }
        StepResult::Cancelled => (
            step_outcome(update_type, StepState::Cancelled, None),
            Some(JobResult::Cancelled),
        ),
        StepResult::RebootRequired { .. } => (
            step_outcome(update_type, StepState::PendingReboot, None),
            None,
        ),
        StepResult::RestartAgent => (
            step_outcome(update_type, StepState::PendingRestart, None),
            None,
        ),
    }
}

/// The report line of a step that did not fail.
pub(super) fn step_outcome(
    update_type: &str,
    result: StepState,
    criteria: Option<String>,
) -> StepOutcome {
    StepOutcome {
        update_type: update_type.into(),
        result,
        result_code: 0,
        extended_code: 0,
        message: String::new(),
        installed_criteria: criteria,
    }
}
