//! What the device tells the cloud: the one reporter of announce, state
//! and progress, inventory, a job's end and its acknowledgement, all
//! through the outbox.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;

use super::jobs::serving;
use super::{AGENT_VERSION, Shared, lock};
use otabox_core::journal::{JobPhase, JobRecord, ShadowRecord};
use otabox_core::model::{Phase, Status, StepState};
use otabox_core::shadow::{
    Ack, AgentInfo, AgentState, JobResult, LastResult, Rejection, ReportedState, StepOutcome,
};

/// The one reporter: everything the device tells the cloud (announce,
/// state and progress, inventory, a job's end and its acknowledgement),
/// kept in the stored reported state where it lasts, and queued in the
/// outbox.
pub(super) struct Reporter<'a> {
    shared: &'a Shared,
}

impl Shared {
    /// The reporter over this agent's journal and outbox.
    pub(super) fn reporter(&self) -> Reporter<'_> {
        Reporter { shared: self }
    }
}

impl Reporter<'_> {
    /// Queues the current reported state at start: its arrival tells the
    /// cloud the agent is online and subscribed.
    pub(super) fn announce(&self) -> Result<()> {
        let shadow = self.store(|_, reported| {
            reported.agent = AgentInfo {
                state: AgentState::Idle,
                version: AGENT_VERSION.into(),
            };
        })?;
        self.enqueue_stored(&unique_key("online"), &shadow);
        Ok(())
    }

    /// Asks every handler for what it manages (`inventory`: canonical update
    /// type → item → version).
    async fn collect_inventory(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        let mut inventory = BTreeMap::new();
        for handler in self.shared.handlers().iter() {
            let Some(update_type) = handler.update_types().into_iter().next() else {
                continue;
            };
            match handler.inventory().await {
                Ok(Ok(items)) if !items.is_empty() => {
                    inventory.insert(
                        update_type,
                        items.into_iter().map(|i| (i.name, i.version)).collect(),
                    );
                }
                Ok(Ok(_)) => {}
                Ok(Err(status)) => tracing::warn!(
                    handler = handler.name(),
                    "inventory failed: {}",
                    status.message
                ),
                Err(e) => tracing::warn!(handler = handler.name(), "inventory failed: {e:#}"),
            }
        }
        inventory
    }

    /// Stores the handlers' inventory in the reported state; true when it
    /// changed.
    pub(super) async fn refresh_inventory(&self) -> bool {
        let inventory = self.collect_inventory().await;
        let mut changed = false;
        let updated = self.store(|_, reported| {
            changed = reported.inventory != inventory;
            reported.inventory = inventory;
        });
        if let Err(e) = updated {
            tracing::error!("cannot store the inventory: {e:#}");
        }
        changed
    }

    /// A report of the stored reported state with the running job's live
    /// state, after `change` to it.
    fn live_report(&self, change: impl FnOnce(&mut Live)) -> String {
        let live = {
            let mut live = lock(&self.shared.live);
            change(&mut live);
            live.clone()
        };
        let mut reported = self.stored_reported();
        if let Some(state) = live.state {
            reported.agent.state = state;
        }
        if live.job_id.is_some() {
            reported.job_id = live.job_id;
        }
        reported.progress = live.progress;
        self.reported_payload(&reported)
    }

    /// The reported state as last stored (idle when none is).
    pub(super) fn stored_reported(&self) -> ReportedState {
        self.shared
            .journal
            .shadow()
            .ok()
            .and_then(|s| s.reported)
            .unwrap_or_else(idle_state)
    }

    /// The report document of `reported`, within `[mqtt] max_report_bytes`
    /// and the layout's budget (in the AWS layout, the shadow's room beside
    /// the desired deployment).
    pub(super) fn reported_payload(&self, reported: &ReportedState) -> String {
        self.shared
            .cloud
            .report(reported, &|| self.running_version())
    }

    /// The version of the job running, as journaled (empty when none is).
    pub(super) fn running_version(&self) -> String {
        self.shared
            .journal
            .shadow()
            .ok()
            .and_then(|s| s.running_version)
            .unwrap_or_default()
    }

    /// Changes the stored reported state (idle when none is stored yet)
    /// with the rest of the shadow record, in one journal write; returns
    /// the record as written.
    fn store(
        &self,
        change: impl FnOnce(&mut ShadowRecord, &mut ReportedState),
    ) -> Result<ShadowRecord> {
        self.shared.journal.update_shadow(|s| {
            let mut reported = s.reported.clone().unwrap_or_else(idle_state);
            change(s, &mut reported);
            s.reported = Some(reported);
        })
    }

    /// Queues the reported state of `shadow` (as stored) under `key`.
    fn enqueue_stored(&self, key: &str, shadow: &ShadowRecord) {
        if let Some(reported) = &shadow.reported {
            self.enqueue(key, self.reported_payload(reported));
        }
    }

    /// Queues a report that only its latest version matters of (progress,
    /// state, a rejection: nothing durable), due at `due`, and wakes the
    /// publisher.
    pub(super) fn push_volatile(&self, key: &str, payload: String, due: std::time::Instant) {
        lock(&self.shared.outbox).push_volatile(
            key,
            &self.shared.cloud.topics().update,
            payload,
            due,
        );
        self.shared.outbox_changed.notify_one();
    }

    /// The report of the stored reported state with `rejection` as its
    /// `lastRejected`; nothing is written.
    pub(super) fn rejection(&self, rejection: Rejection) -> String {
        let mut reported = self.stored_reported();
        reported.last_rejected = Some(rejection);
        self.reported_payload(&reported)
    }

    /// Queues a message on the update topic and wakes the publisher.
    pub(super) fn enqueue(&self, key: &str, payload: String) {
        match lock(&self.shared.outbox).push(key, &self.shared.cloud.topics().update, payload) {
            Ok(_) => self.shared.outbox_changed.notify_one(),
            Err(e) => tracing::error!("cannot queue report {key}: {e:#}"),
        }
    }

    /// Refreshes the inventory and, when it changed, queues the reported state
    /// under the outbox key `key`.
    pub(super) async fn report_inventory(&self, key: &str) {
        if self.refresh_inventory().await
            && let Ok(shadow) = self.shared.journal.shadow()
        {
            self.enqueue_stored(key, &shadow);
        }
    }

    /// Reports the agent's state for a running job.
    pub(super) fn report_progress(&self, record: &JobRecord, state: AgentState) -> Result<()> {
        if state == AgentState::RebootPending {
            // The device is about to reboot: this one is stored and queued
            // durably.
            *lock(&self.shared.live) = Live::default();
            let shadow = self.store(|_, reported| {
                reported.agent.state = state;
                reported.job_id = Some(record.job_id.clone());
            })?;
            self.enqueue_stored(&format!("state:{}:{state:?}", record.job_id), &shadow);
            return Ok(());
        }
        if lock(&self.shared.live).state == Some(state) {
            return Ok(());
        }
        let report = self.live_report(|live| {
            live.job_id = Some(record.job_id.clone());
            live.state = Some(state);
            // Progress belongs to the phase that reported it.
            live.progress = None;
        });
        self.push_volatile(
            &format!("state:{}:{state:?}", record.job_id),
            report,
            std::time::Instant::now() + STATE_REPORT_DELAY,
        );
        Ok(())
    }

    /// Ends a job: journals the result, updates the reported state, queues the
    /// report and the acknowledgement, then marks the job reported.
    pub(super) async fn finish(
        &self,
        mut record: JobRecord,
        result: JobResult,
        status: Option<Status>,
    ) -> Result<()> {
        if !matches!(record.phase, JobPhase::Done { .. }) {
            self.shared
                .journal
                .transition(&mut record, JobPhase::Done { result })?;
        }
        let failing = record.steps.iter().find(|s| s.result_code != 0);
        let (code, extended, message) = match (&status, failing) {
            (Some(s), _) => (s.result_code, s.extended_code.pack(), s.message.clone()),
            (None, Some(step)) => (step.result_code, step.extended_code, step.message.clone()),
            (None, None) => (0, 0, String::new()),
        };
        // Payloads go before the cloud hears of the end (a crash before the
        // report repeats this on restart).
        if let Err(e) = self
            .shared
            .journal
            .retire(&record.job_id, self.shared.config.device.retained_jobs)
        {
            tracing::warn!(
                job = record.job_id,
                "cannot clean up the job's files: {e:#}"
            );
        }
        *lock(&self.shared.live) = Live::default();
        let ack_status = result.ack_status();
        // The terminal report carries what the handlers manage after the job.
        let inventory = self.collect_inventory().await;
        let shadow = self.store(|s, reported| {
            if ack_status == otabox_core::shadow::AckStatus::Success {
                s.running_version = Some(record.desired.version.clone());
            }
            for (update_type, criteria) in self.committed_criteria(&record.steps) {
                reported.installed.insert(update_type, criteria);
            }
            reported.inventory = inventory;
            reported.agent.state = AgentState::Idle;
            reported.job_id = Some(record.job_id.clone());
            reported.progress = None;
            reported.last_result = Some(LastResult {
                job_id: record.job_id.clone(),
                status: ack_status,
                result,
                result_code: code,
                extended_code: extended,
                message: message.clone(),
                steps: record.steps.clone(),
                local: record.local,
            });
        })?;
        let version = shadow.running_version.clone().unwrap_or_default();
        let ack = Ack {
            job_id: record.job_id.clone(),
            status: ack_status,
            version,
        };
        let ack = self.shared.cloud.ack(&ack)?;
        // The result and the ack go out only once the journal says they are
        // queued: a crash in between sends them once, after the restart.
        lock(&self.shared.outbox).hold();
        self.enqueue_stored(&format!("result:{}", record.job_id), &shadow);
        if !record.local {
            // A local job answers no desired deployment of the cloud: reported
            // (above), not acknowledged.
            self.enqueue(&format!("ack:{}", record.job_id), ack);
        }
        record.reported = true;
        let journaled = self.shared.journal.write(&record);
        lock(&self.shared.outbox).release();
        self.shared.outbox_changed.notify_one();
        journaled?;
        match failure_context(&record.steps) {
            Some(step) if message.is_empty() => {
                tracing::warn!(job = record.job_id, ?result, "job finished: {step}")
            }
            Some(step) => tracing::warn!(
                job = record.job_id,
                ?result,
                "job finished: {step}: {message}"
            ),
            None if message.is_empty() => {
                tracing::info!(job = record.job_id, ?result, "job finished")
            }
            None => tracing::warn!(job = record.job_id, ?result, "job finished: {message}"),
        }
        Ok(())
    }

    /// The installed criteria of the steps that committed (installed, or found
    /// already installed), keyed by the canonical update type of the handler
    /// that served each (the first of its manifest's `update_types`, as the
    /// inventory is): a failed, pending or rolled-back step changes nothing.
    fn committed_criteria(&self, steps: &[StepOutcome]) -> Vec<(String, String)> {
        steps
            .iter()
            .filter(|s| s.result.committed())
            .filter_map(|s| {
                let criteria = s.installed_criteria.clone()?;
                Some((self.canonical_update_type(&s.update_type), criteria))
            })
            .collect()
    }

    /// The update type a report keys `update_type` under: the first update type
    /// of the handler serving it (aliases such as `microsoft/apt:1` map to
    /// `otabox/apt:1`), or itself when no handler serves it.
    fn canonical_update_type(&self, update_type: &str) -> String {
        serving(&self.shared.handlers(), update_type)
            .and_then(|h| h.update_types().into_iter().next())
            .unwrap_or_else(|| update_type.to_string())
    }
}

/// A progress sink for `job`: stores the progress in the reported state
/// and reports it at most once a second, and when a phase completes.
pub(super) fn progress_reporter(shared: &Arc<Shared>, job: &str) -> otabox_runtime::ProgressSink {
    let (shared, job) = (shared.clone(), job.to_string());
    let last = Mutex::new(None::<std::time::Instant>);
    let sequence = std::sync::atomic::AtomicU64::new(0);
    Arc::new(move |event: otabox_runtime::ProgressEvent| {
        let complete = event.total > 0 && event.done >= event.total;
        let mut last = lock(&last);
        if !complete && last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(std::time::Instant::now());
        let progress = otabox_core::shadow::Progress {
            step: event.step,
            phase: event.phase.as_str().into(),
            done: event.done,
            total: event.total,
        };
        let report = shared.reporter().live_report(|live| {
            live.job_id = Some(job.clone());
            live.state = agent_state_of(event.phase).or(live.state);
            live.progress = Some(progress);
        });
        let n = sequence.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!("progress:{job}:{n}");
        shared
            .reporter()
            .push_volatile(&key, report, std::time::Instant::now());
    })
}

/// What a running job adds to the stored reported state: held in memory
/// and sent as progress reports, never written (the terminal report
/// replaces it).
#[derive(Debug, Clone, Default)]
pub(super) struct Live {
    job_id: Option<String>,
    state: Option<AgentState>,
    progress: Option<otabox_core::shadow::Progress>,
}

/// How long a state change waits before it is reported: a job that ends
/// within it sends only its result.
pub(super) const STATE_REPORT_DELAY: Duration = Duration::from_millis(100);

/// An outbox key `{prefix}:{nanoseconds since the epoch}`, for a report
/// that must not replace an earlier one queued under the same prefix.
pub(super) fn unique_key(prefix: &str) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{prefix}:{stamp}")
}

/// The state of this agent, idle, before it ran anything.
fn idle_state() -> ReportedState {
    ReportedState::idle(AGENT_VERSION)
}

/// The agent state a handler phase stands for, as reported.
pub(super) fn agent_state_of(phase: Phase) -> Option<AgentState> {
    match phase {
        Phase::Validate | Phase::IsInstalled => Some(AgentState::Validating),
        Phase::Download => Some(AgentState::Downloading),
        Phase::Backup | Phase::Install | Phase::Apply => Some(AgentState::Installing),
        Phase::Verify | Phase::Commit => Some(AgentState::Verifying),
        Phase::Rollback => Some(AgentState::RollingBack),
        Phase::Describe | Phase::Cleanup | Phase::Inventory => None,
    }
}

/// Which step failed and in which phase, for the log line of a job that
/// ends: `step 0 (otabox/file:1) failed in download`.
pub(super) fn failure_context(steps: &[StepOutcome]) -> Option<String> {
    steps
        .iter()
        .enumerate()
        .find(|(_, s)| matches!(s.result, StepState::Failed(_)) || s.result_code != 0)
        .map(|(i, s)| format!("step {i} ({}) {}", s.update_type, s.result))
}
