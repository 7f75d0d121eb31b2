//! The job side of the agent against scripted handlers: no broker, no wasm.

use std::sync::{Arc, Mutex};

use anyhow::Result;

use super::jobs::*;
use super::lock;
use super::recovery::*;
use otabox_core::journal::Acceptance;
use otabox_core::journal::{self, JobPhase, JobRecord, Journal};
use otabox_core::model::testing::{Answer, FakeHandler};
use otabox_core::model::{CallFault, RebootMode};
use otabox_core::model::{Outcome, Phase, Status, StepContext, StepState, UpdateHandler};
use otabox_core::shadow::{AgentState, JobResult, StepOutcome};
use otabox_core::step::{self as workflow, StepResult, host_codes};
use otabox_runtime::{CallScope, CancelFlag};

/// Reports states and downloads nothing.
#[derive(Default)]
struct QuietHost {
    states: Mutex<Vec<AgentState>>,
}

#[async_trait::async_trait]
impl JobHost for QuietHost {
    fn report_state(&self, _: &JobRecord, state: AgentState) -> Result<()> {
        lock(&self.states).push(state);
        Ok(())
    }

    fn progress(&self, _: &str) -> Option<otabox_runtime::ProgressSink> {
        None
    }

    async fn fetch_manifest(
        &self,
        _: &JobRecord,
        _: usize,
        _: &std::path::Path,
    ) -> Result<(), Status> {
        Ok(())
    }

    async fn fetch_payloads(
        &self,
        _: &JobRecord,
        _: usize,
        _: &std::path::Path,
        names: &[String],
    ) -> Result<(), Status> {
        assert!(names.is_empty(), "the fake plans no payloads");
        Ok(())
    }
}

/// Each handler call with where the journal stood when it came.
type Seen = Arc<Mutex<Vec<(Phase, String)>>>;

/// A journal with one accepted job `j1` of one `otabox/file:1` step, and
/// the file handler played by a fake scripted by `script`.
struct Bench {
    _dir: tempfile::TempDir,
    journal: Journal,
    fake: Arc<FakeHandler>,
    handlers: Vec<Arc<dyn UpdateHandler>>,
    host: QuietHost,
    seen: Seen,
    record: JobRecord,
}

impl Bench {
    fn new(script: impl FnOnce(FakeHandler) -> FakeHandler) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(dir.path()).expect("journal");
        let Acceptance::Accepted(record) = journal
            .accept(1, &otabox_core::shadow::sample_desired("j1"))
            .expect("accept")
        else {
            panic!("not accepted")
        };
        let seen = Seen::default();
        let (watched, log) = (journal.clone(), seen.clone());
        let fake = Arc::new(script(
            FakeHandler::new("file", &["otabox/file:1"]).observe(move |phase| {
                let now = watched.record("j1").expect("read").expect("journaled");
                lock(&log).push((phase, stage(&now.phase)));
            }),
        ));
        let handlers: Vec<Arc<dyn UpdateHandler>> = vec![fake.clone()];
        let mut record = *record;
        record.handler_sha256 = pin_handlers(&handlers, &record).expect("pinned");
        Self {
            _dir: dir,
            journal,
            fake,
            handlers,
            host: QuietHost::default(),
            seen,
            record,
        }
    }

    fn env(&self) -> JobEnv<'_> {
        JobEnv {
            journal: &self.journal,
            handlers: &self.handlers,
            host: &self.host,
        }
    }

    /// Journals `phase` as the agent does before running the steps.
    fn enter(&mut self, phase: JobPhase) {
        self.journal
            .transition(&mut self.record, phase)
            .expect("transition");
    }

    async fn run(&self, mode: Mode) -> (JobRecord, StepsEnd) {
        run_steps(
            &self.env(),
            self.record.clone(),
            mode,
            &CancelFlag::default(),
        )
        .await
        .expect("steps")
    }

    fn seen(&self) -> Vec<(Phase, String)> {
        std::mem::take(&mut lock(&self.seen))
    }
}

/// A journal phase as its failpoint names it, without the prefix.
fn stage(phase: &JobPhase) -> String {
    match phase {
        JobPhase::Installing { stage, .. } => format!("installing:{stage}"),
        other => journal::phase_name(other).into(),
    }
}

fn seen(list: &[(Phase, &str)]) -> Vec<(Phase, String)> {
    list.iter().map(|(p, s)| (*p, s.to_string())).collect()
}

fn installed(result: StepState) -> StepOutcome {
    step_outcome("otabox/file:1", result, Some(FakeHandler::CRITERIA.into()))
}

fn succeeded() -> StepsEnd {
    StepsEnd::ended(JobResult::Succeeded, None)
}

#[tokio::test]
async fn a_fresh_job_journals_each_change_before_the_handler_makes_it() {
    let mut b = Bench::new(|f| f);
    b.enter(JobPhase::Validating);
    let (record, end) = b.run(Mode::Fresh).await;
    assert_eq!(end, succeeded());
    assert_eq!(record.steps, [installed(StepState::Installed)]);
    assert_eq!(
        b.seen(),
        seen(&[
            (Phase::Validate, "validating"),
            (Phase::IsInstalled, "validating"),
            (Phase::Download, "downloading"),
            (Phase::Backup, "installing:backup"),
            (Phase::Install, "installing:install"),
            (Phase::Apply, "installing:apply"),
            (Phase::Verify, "installing:verify"),
            (Phase::Commit, "installing:commit"),
            (Phase::Cleanup, "installing:commit"),
        ])
    );
    let journaled = b.journal.record("j1").expect("read").expect("journaled");
    assert_eq!(
        journaled.steps, record.steps,
        "the step's result is journaled"
    );
    // (Validating is reported by `execute`, before the steps.)
    let mut states = lock(&b.host.states).clone();
    states.dedup();
    assert_eq!(
        states,
        [
            AgentState::Downloading,
            AgentState::Installing,
            AgentState::Verifying
        ]
    );
}

#[tokio::test]
async fn a_resumed_job_journals_the_same_phases_as_a_fresh_one() {
    // Before one `run_steps`, the resumed copy journaled every phase it
    // called, cleanup included ("installing:cleanup"); the fresh one only
    // those that change the system.
    let mut b = Bench::new(|f| f);
    b.record.steps = vec![installed(StepState::PendingReboot)];
    b.enter(JobPhase::Verifying);
    let (record, end) = b.run(Mode::Resumed).await;
    assert_eq!(end, succeeded());
    assert_eq!(record.steps, [installed(StepState::Installed)]);
    assert_eq!(
        b.seen(),
        seen(&[
            (Phase::Verify, "installing:verify"),
            (Phase::Commit, "installing:commit"),
            (Phase::Cleanup, "installing:commit"),
        ])
    );
    let criteria: Vec<Option<String>> = b
        .fake
        .contexts()
        .into_iter()
        .map(|(_, ctx)| ctx.installed_criteria)
        .collect();
    assert_eq!(
        criteria,
        vec![Some(FakeHandler::CRITERIA.to_string()); 3],
        "verify and commit see the criteria planned before the reboot"
    );
    let journaled = b.journal.record("j1").expect("read").expect("journaled");
    assert_eq!(journaled.steps, record.steps);
}

#[tokio::test]
async fn a_step_waiting_for_a_reboot_carries_its_plan_to_the_resumed_run() {
    let mut b = Bench::new(|f| {
        f.answer(
            Phase::Install,
            Answer::Outcome(Outcome::RebootRequired(RebootMode::Deferred)),
        )
    });
    b.enter(JobPhase::Validating);
    let (record, end) = b.run(Mode::Fresh).await;
    assert_eq!(
        end,
        StepsEnd::Pending(StepResult::RebootRequired { deferred: true })
    );
    assert_eq!(record.steps, [installed(StepState::PendingReboot)]);
    assert_eq!(
        b.fake.phases(),
        [
            Phase::Validate,
            Phase::IsInstalled,
            Phase::Download,
            Phase::Backup,
            Phase::Install,
            Phase::Apply
        ],
        "nothing after apply before the reboot, not even cleanup"
    );
    b.record = record;
    b.enter(JobPhase::Verifying);
    let (record, end) = b.run(Mode::Resumed).await;
    assert_eq!(end, succeeded());
    assert_eq!(record.steps, [installed(StepState::Installed)]);
}

#[tokio::test]
async fn a_failed_install_is_rolled_back_and_ends_the_job() {
    let failure = workflow::host_status(99, "disk on fire".into());
    let mut b = Bench::new(|f| f.answer(Phase::Install, Answer::Outcome(Outcome::Failed(failure))));
    b.enter(JobPhase::Validating);
    let (record, end) = b.run(Mode::Fresh).await;
    assert_eq!(end, StepsEnd::ended(JobResult::FailedRolledBack, None));
    assert_eq!(record.steps.len(), 1);
    assert_eq!(record.steps[0].result, StepState::Failed(Phase::Install));
    assert_eq!(record.steps[0].result.to_string(), "failed in install");
    assert_eq!(record.steps[0].message, "disk on fire");
    assert_eq!(record.steps[0].installed_criteria, None);
    let seen = b.seen();
    assert!(
        seen.contains(&(Phase::Rollback, "installing:rollback".into())),
        "{seen:?}"
    );
}

#[tokio::test]
async fn a_trap_in_validate_fails_the_step_as_a_host_fault() {
    let mut b = Bench::new(|f| {
        f.answer(
            Phase::Validate,
            Answer::Fault(CallFault::TimeLimit { limit_ms: 5 }),
        )
    });
    b.enter(JobPhase::Validating);
    let (record, end) = b.run(Mode::Fresh).await;
    assert_eq!(end, StepsEnd::ended(JobResult::Failed, None));
    assert_eq!(record.steps[0].result, StepState::Failed(Phase::Validate));
    assert_eq!(
        record.steps[0].extended_code,
        workflow::host_status(host_codes::HANDLER_FAULT, String::new())
            .extended_code
            .pack()
    );
    assert!(
        record.steps[0].message.contains("time limit of 5 ms"),
        "{}",
        record.steps[0].message
    );
}

#[tokio::test]
async fn a_handler_changed_since_the_reboot_is_not_continued() {
    let mut b = Bench::new(|f| f);
    b.record.steps = vec![installed(StepState::PendingReboot)];
    b.record.handler_sha256 = vec!["another build".into()];
    b.enter(JobPhase::Verifying);
    let (record, end) = b.run(Mode::Resumed).await;
    let StepsEnd::Finished {
        result: JobResult::FailedInconsistent,
        status: Some(status),
        ..
    } = end
    else {
        panic!("{end:?}")
    };
    assert_eq!(status.extended_code.value, host_codes::HANDLER_CHANGED);
    assert!(b.fake.phases().is_empty(), "no call to another handler");
    assert_eq!(record.steps, [installed(StepState::PendingReboot)]);
}

/// Settles an interrupted step with a fake answering `is-installed` so.
async fn settle(answer: Answer) -> (Interrupted, Vec<Phase>) {
    let fake = FakeHandler::new("file", &["otabox/file:1"]).answer(Phase::IsInstalled, answer);
    let settled = settle_interrupted(&fake, CallScope::default(), &StepContext::default()).await;
    (settled, fake.phases())
}

#[tokio::test]
async fn a_trap_in_is_installed_after_a_crash_is_no_not_installed() {
    let (settled, phases) = settle(Answer::Fault(CallFault::Trap("unreachable".into()))).await;
    let Interrupted::Ended { result, status } = settled else {
        panic!("a trap took for installed: {settled:?}")
    };
    assert_eq!(result, JobResult::FailedRolledBack);
    assert_eq!(status.extended_code.value, host_codes::HANDLER_FAULT);
    assert!(
        status.message.contains("trapped: unreachable"),
        "{}",
        status.message
    );
    assert!(
        status
            .message
            .contains("could not tell whether it took effect"),
        "{}",
        status.message
    );
    assert_eq!(
        phases,
        [Phase::IsInstalled, Phase::Rollback, Phase::Cleanup]
    );

    let (settled, _) = settle(Answer::Fault(CallFault::TimeLimit { limit_ms: 7 })).await;
    let Interrupted::Ended { status, .. } = settled else {
        panic!("{settled:?}")
    };
    assert_eq!(status.extended_code.value, host_codes::HANDLER_FAULT);

    // The plain answers, for contrast.
    let (settled, phases) = settle(Answer::Installed(true)).await;
    assert_eq!(settled, Interrupted::TookEffect);
    assert_eq!(phases, [Phase::IsInstalled]);
    let (settled, _) = settle(Answer::Installed(false)).await;
    let Interrupted::Ended { result, status } = settled else {
        panic!("{settled:?}")
    };
    assert_eq!(result, JobResult::FailedRolledBack);
    assert_eq!(status.extended_code.value, host_codes::JOURNAL);
    assert_eq!(status.message, INTERRUPTED);
}

#[tokio::test]
async fn a_handler_failing_is_installed_after_a_crash_says_so() {
    let refusal = Status {
        result_code: 42,
        message: "cannot read the slot".into(),
        ..Status::default()
    };
    let fake = FakeHandler::new("file", &["otabox/file:1"])
        .rollback(false)
        .answer(Phase::IsInstalled, Answer::Refused(refusal));
    let settled = settle_interrupted(&fake, CallScope::default(), &StepContext::default()).await;
    let Interrupted::Ended { result, status } = settled else {
        panic!("{settled:?}")
    };
    assert_eq!(result, JobResult::FailedInconsistent, "no rollback to run");
    assert_eq!(status.result_code, 42);
    assert!(
        status.message.ends_with("cannot read the slot"),
        "{}",
        status.message
    );
    assert_eq!(fake.phases(), [Phase::IsInstalled, Phase::Cleanup]);
}
