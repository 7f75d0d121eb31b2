//! Picking up after a restart: what the journal holds is resumed, asked
//! about, or ended; and the continuations a job asks for (a reboot, an
//! agent restart).

use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use super::Shared;
use super::jobs::{continue_pending, pinned_handler, step_outcome};
use super::staging::step_request;
use otabox_core::journal::{self, JobPhase, JobRecord, Resume};
use otabox_core::model::{Outcome, Phase, Status, StepContext, StepState, UpdateHandler};
use otabox_core::shadow::{AgentState, JobResult};
use otabox_core::step::{self as workflow, host_codes};
use otabox_runtime::CallScope;

/// Resumes what the journal holds, before any new delta is taken; returns
/// how many unfinished jobs it found.
pub(super) async fn resume_jobs(
    shared: &Arc<Shared>,
    jobs: &mpsc::UnboundedSender<JobRecord>,
) -> Result<usize> {
    let boot_id = journal::boot_id().unwrap_or_default();
    let unfinished = shared.journal.unfinished()?;
    let count = unfinished.len();
    for mut record in unfinished {
        shared.journal.count_attempt(&mut record)?;
        let decision = journal::decide(&record, &boot_id, journal::DEFAULT_MAX_ATTEMPTS);
        tracing::info!(
            job = record.job_id,
            phase = journal::phase_name(&record.phase),
            ?decision,
            "resuming"
        );
        match decision {
            Resume::Restart | Resume::ResumeDownload => {
                let _ = jobs.send(record);
            }
            Resume::AskHandler { step } => ask_handler(shared, record, step as usize, jobs).await?,
            Resume::Report(result) => shared.reporter().finish(record, result, None).await?,
            Resume::GiveUp(message) => {
                let status = workflow::host_status(host_codes::LOOP_BREAKER, message);
                shared
                    .reporter()
                    .finish(record, JobResult::Failed, Some(status))
                    .await?
            }
            Resume::Nothing => {}
            Resume::AwaitReboot => {
                tracing::info!(
                    job = record.job_id,
                    "still waiting for the device to reboot"
                );
                shared
                    .reporter()
                    .report_progress(&record, AgentState::RebootPending)?;
            }
            Resume::VerifyAfterReboot | Resume::VerifyAfterRestart | Resume::ContinueVerify => {
                let job = record.job_id.clone();
                if let Err(e) = continue_pending(shared, record).await {
                    tracing::error!(job, "cannot finish after the reboot or restart: {e:#}");
                }
            }
        }
    }
    Ok(count)
}

/// A job stopped while step `step` changed the system: ask the handler
/// whether the change took effect; if so continue, if not roll back.
pub(super) async fn ask_handler(
    shared: &Arc<Shared>,
    record: JobRecord,
    step: usize,
    jobs: &mpsc::UnboundedSender<JobRecord>,
) -> Result<()> {
    let handler = match pinned_handler(&shared.handlers(), &record, step) {
        Ok(handler) => handler,
        Err(status) => {
            return shared
                .reporter()
                .finish(record, JobResult::FailedInconsistent, status)
                .await;
        }
    };
    let (scope, ctx) = match step_call(shared, &record, step, handler.as_ref()) {
        Ok(call) => call,
        Err(e) => {
            let status = workflow::host_status(host_codes::DOWNLOAD, format!("{e:#}"));
            return shared
                .reporter()
                .finish(record, JobResult::FailedInconsistent, Some(status))
                .await;
        }
    };
    match settle_interrupted(handler.as_ref(), scope, &ctx).await {
        Interrupted::TookEffect => {
            tracing::info!(
                job = record.job_id,
                step,
                "the interrupted step took effect; continuing"
            );
            let mut record = record;
            record.steps.truncate(step);
            record.steps.push(step_outcome(
                &ctx.update_type,
                StepState::Installed,
                ctx.installed_criteria.clone(),
            ));
            let _ = jobs.send(record);
            Ok(())
        }
        Interrupted::Ended { result, status } => {
            shared.reporter().finish(record, result, Some(status)).await
        }
    }
}

/// What became of a step the agent stopped in while it changed the system.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Interrupted {
    /// The handler says the change is in place: the job goes on after it.
    TookEffect,
    /// It is not, or the handler could not say: the job ends, rolled back
    /// where the handler could.
    Ended {
        /// The job's result.
        result: JobResult,
        /// Why.
        status: Status,
    },
}

/// Asks the handler whether an interrupted step took effect and, unless it
/// did, rolls back where supported, then cleans up. Only a plain "yes"
/// continues the job: a fault of `is-installed` (a trap, a time or memory
/// limit) or its failure status is no answer, and the job's status says
/// which it was instead of taking it for "not installed".
pub(super) async fn settle_interrupted(
    handler: &dyn UpdateHandler,
    scope: CallScope,
    ctx: &StepContext,
) -> Interrupted {
    let unanswered = match handler.is_installed(scope.clone(), ctx).await {
        Ok(Ok(true)) => return Interrupted::TookEffect,
        Ok(Ok(false)) => None,
        Ok(Err(status)) => Some(Status {
            message: format!(
                "{INTERRUPTED}, and is-installed could not tell whether it took effect: {}",
                status.message
            ),
            ..status
        }),
        Err(fault) => {
            tracing::error!(
                handler = handler.name(),
                job = ctx.job_id,
                "is-installed after the interruption: {fault:#}"
            );
            Some(workflow::host_status(
                host_codes::HANDLER_FAULT,
                format!(
                    "{INTERRUPTED}, and is-installed could not tell whether it took effect: {fault:#}"
                ),
            ))
        }
    };
    let rolled_back = handler.description().supports_rollback
        && matches!(
            handler.run_phase(Phase::Rollback, scope.clone(), ctx).await,
            Ok(Outcome::Success | Outcome::Skipped(_))
        );
    let _ = handler.run_phase(Phase::Cleanup, scope, ctx).await;
    Interrupted::Ended {
        result: if rolled_back {
            JobResult::FailedRolledBack
        } else {
            JobResult::FailedInconsistent
        },
        status: unanswered
            .unwrap_or_else(|| workflow::host_status(host_codes::JOURNAL, INTERRUPTED.into())),
    }
}

/// The status message of a job the agent stopped in while a step changed
/// the system.
pub(super) const INTERRUPTED: &str = "the agent stopped while the step was changing the system";

/// The scope and context of a direct call for `step` (payloads as fetched).
pub(super) fn step_call(
    shared: &Shared,
    record: &JobRecord,
    step: usize,
    handler: &dyn UpdateHandler,
) -> Result<(CallScope, StepContext)> {
    let job_dir = shared.journal.job_dir(&record.job_id)?;
    let request = step_request(record, step, &job_dir)?;
    let criteria = record.desired.steps[step].installed_criteria.clone();
    Ok(workflow::resumed_call(handler, &request, criteria))
}

/// Journals the wait for a reboot (with the current boot id) and, unless
/// deferred, runs the reboot command.
pub(super) fn await_reboot(shared: &Shared, mut record: JobRecord, deferred: bool) -> Result<()> {
    let boot_id = journal::boot_id()?;
    shared
        .journal
        .transition(&mut record, JobPhase::AwaitingReboot { boot_id, deferred })?;
    shared
        .reporter()
        .report_progress(&record, AgentState::RebootPending)?;
    if deferred {
        tracing::info!(
            job = record.job_id,
            "reboot deferred: waiting for the device to reboot"
        );
        return Ok(());
    }
    reboot_now(shared, &record.job_id)
}

/// Ends the job as [`finish`] does; then, when a rollback restored the
/// previous version for the next boot only, reboots into it.
pub(super) async fn finish_then_reboot(
    shared: &Shared,
    record: JobRecord,
    result: JobResult,
    status: Option<Status>,
    reboot: bool,
) -> Result<()> {
    let job = record.job_id.clone();
    shared.reporter().finish(record, result, status).await?;
    if reboot {
        tracing::warn!(job, "the rollback takes effect after a reboot");
        reboot_now(shared, &job)?;
    }
    Ok(())
}

/// Runs the device's reboot command.
pub(super) fn reboot_now(shared: &Shared, job: &str) -> Result<()> {
    let command = &shared.config.device.reboot_command;
    let (program, args) = command
        .split_first()
        .context("[device] reboot_command is empty")?;
    tracing::info!(job, "rebooting: {}", command.join(" "));
    let status = std::process::Command::new(program).args(args).status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => {
            anyhow::bail!("the reboot command {command:?} failed ({s}); the job waits for a reboot")
        }
        Err(e) => anyhow::bail!(
            "cannot run the reboot command {command:?}: {e}; the job waits for a reboot"
        ),
    }
}

/// Journals the wait for the agent's restart, then replaces this process
/// with a fresh start of the same command line.
pub(super) fn restart_agent(shared: &Shared, mut record: JobRecord) -> Result<()> {
    shared
        .journal
        .transition(&mut record, JobPhase::AwaitingRestart)?;
    tracing::info!(
        job = record.job_id,
        "restarting the agent as the update asked"
    );
    let mut argv = std::env::args_os();
    let program = argv.next().context("no argv[0] to restart with")?;
    let error =
        std::os::unix::process::CommandExt::exec(std::process::Command::new(&program).args(argv));
    anyhow::bail!(
        "cannot restart the agent ({}): {error}",
        program.to_string_lossy()
    )
}
