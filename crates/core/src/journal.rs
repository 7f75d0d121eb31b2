//! The crash-safe job journal.
//!
//! Layout under the state directory:
//! - `shadow.json`: the last shadow version accepted, the desired state and
//!   the last reported state;
//! - `jobs/<job-id>/journal.json`: one record per job, rewritten atomically
//!   (temp, fsync, rename, fsync dir) at every transition, *before* the side
//!   effect the transition announces.
//!
//! On start the agent asks [`decide`] what to do with each unfinished job:
//! resume a download, ask the handler whether an interrupted install took
//! effect (then roll back where supported), confirm a reboot by boot id,
//! report a result that was not yet reported, or give up on a job that keeps
//! crashing the agent (the loop breaker).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::durable;
use crate::shadow::{DesiredState, JobResult, ReportedState, StepOutcome, validate_job_id};

/// Agent starts that may find the same job unfinished before it is failed.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Where a job stands. Each value is journaled before the work it names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "phase", rename_all = "kebab-case")]
pub enum JobPhase {
    /// Accepted from a delta; nothing done yet.
    Accepted,
    /// Validating the steps with their handlers (no side effects).
    Validating,
    /// Downloading payloads (resumable).
    Downloading,
    /// Changing the system: step `step` is in `stage`.
    Installing {
        /// Step index.
        step: u32,
        /// The phase changing the system: backup, install, apply, verify,
        /// commit, or rollback (a rollback is journaled here too, so a job
        /// stopped during one asks its handler like any other).
        stage: String,
    },
    /// Waiting for a reboot that started on `boot_id`.
    AwaitingReboot {
        /// Boot id when the reboot was asked for.
        boot_id: String,
        /// Whether the deployment deferred it.
        deferred: bool,
    },
    /// Waiting for the agent's own restart.
    AwaitingRestart,
    /// Verifying and committing after install, reboot or restart.
    Verifying,
    /// Finished.
    Done {
        /// How.
        result: JobResult,
    },
}

/// The journal record of one job.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct JobRecord {
    /// Job id.
    pub job_id: String,
    /// Shadow version of the delta that brought it.
    pub shadow_version: u64,
    /// The desired state as accepted.
    pub desired: DesiredState,
    /// sha256 of the handler wasm serving each step, pinned at acceptance.
    #[serde(default)]
    pub handler_sha256: Vec<String>,
    /// Where it stands.
    pub phase: JobPhase,
    /// Per-step results, as known.
    #[serde(default)]
    pub steps: Vec<StepOutcome>,
    /// Agent starts that found this job unfinished while it was working.
    #[serde(default)]
    pub attempts: u32,
    /// Whether the terminal result was acknowledged by the broker.
    #[serde(default)]
    pub reported: bool,
    /// A local deployment (`otabox install`), not the cloud's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
}

impl JobRecord {
    /// A job just accepted from `desired` (a delta's at `shadow_version`,
    /// or a `local` deployment's).
    fn new(shadow_version: u64, desired: &DesiredState, local: bool) -> Self {
        Self {
            job_id: desired.job_id.clone(),
            shadow_version,
            desired: desired.clone(),
            handler_sha256: Vec::new(),
            phase: JobPhase::Accepted,
            steps: Vec::new(),
            attempts: 0,
            reported: false,
            local,
        }
    }
}

/// What to do with a job found in the journal at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// Nothing changed yet: validate and run it from the start.
    Restart,
    /// Continue the download where it stopped.
    ResumeDownload,
    /// Step `step` was changing the system: ask the handler (is-installed,
    /// then rollback where supported).
    AskHandler {
        /// Step index.
        step: u32,
    },
    /// The reboot happened (new boot id): verify and commit.
    VerifyAfterReboot,
    /// Same boot as when the reboot was asked for: keep waiting.
    AwaitReboot,
    /// The agent restarted as asked: verify and commit.
    VerifyAfterRestart,
    /// Continue verify/commit (idempotent per handler contract).
    ContinueVerify,
    /// Finished but not yet reported: report it.
    Report(JobResult),
    /// Finished and reported.
    Nothing,
    /// The job kept crashing the agent: fail it with this message.
    GiveUp(String),
}

/// Decides how to resume `record` given the current boot id.
pub fn decide(record: &JobRecord, boot_id: &str, max_attempts: u32) -> Resume {
    let working = !matches!(
        record.phase,
        JobPhase::Done { .. } | JobPhase::AwaitingReboot { .. } | JobPhase::AwaitingRestart
    );
    if working && record.attempts > max_attempts {
        return Resume::GiveUp(format!(
            "the agent stopped {} times during this job (phase {}); giving up",
            record.attempts,
            phase_name(&record.phase)
        ));
    }
    match &record.phase {
        JobPhase::Accepted | JobPhase::Validating => Resume::Restart,
        JobPhase::Downloading => Resume::ResumeDownload,
        JobPhase::Installing { step, .. } => Resume::AskHandler { step: *step },
        JobPhase::AwaitingReboot {
            boot_id: before, ..
        } if before != boot_id => Resume::VerifyAfterReboot,
        JobPhase::AwaitingReboot { .. } => Resume::AwaitReboot,
        JobPhase::AwaitingRestart => Resume::VerifyAfterRestart,
        JobPhase::Verifying => Resume::ContinueVerify,
        JobPhase::Done { result } if !record.reported => Resume::Report(*result),
        JobPhase::Done { .. } => Resume::Nothing,
    }
}

/// The failpoint after a journal write of `record`.
fn failpoint_name(record: &JobRecord) -> String {
    match &record.phase {
        JobPhase::Installing { stage, .. } => format!("journal:installing:{stage}"),
        JobPhase::Done { .. } if record.reported => "journal:done:reported".into(),
        phase => format!("journal:{}", phase_name(phase)),
    }
}

/// A short name of a phase, for messages.
pub fn phase_name(phase: &JobPhase) -> &'static str {
    match phase {
        JobPhase::Accepted => "accepted",
        JobPhase::Validating => "validating",
        JobPhase::Downloading => "downloading",
        JobPhase::Installing { .. } => "installing",
        JobPhase::AwaitingReboot { .. } => "awaiting-reboot",
        JobPhase::AwaitingRestart => "awaiting-restart",
        JobPhase::Verifying => "verifying",
        JobPhase::Done { .. } => "done",
    }
}

/// The persisted shadow bookkeeping (`shadow.json`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
pub struct ShadowRecord {
    /// Highest shadow version accepted.
    pub last_version: u64,
    /// The desired state last accepted.
    #[serde(default)]
    pub desired: Option<DesiredState>,
    /// The state last reported.
    #[serde(default)]
    pub reported: Option<ReportedState>,
    /// The deployment version the device runs (from the last success).
    #[serde(default)]
    pub running_version: Option<String>,
    /// Highest signed-manifest sequence accepted.
    #[serde(default)]
    pub last_sequence: u64,
}

/// What became of a delta.
#[derive(Debug, Clone, PartialEq)]
pub enum Acceptance {
    /// A new job, journaled.
    Accepted(Box<JobRecord>),
    /// A version at or below the last accepted: ignored.
    Stale {
        /// The last accepted version.
        last: u64,
    },
    /// A job id already journaled (QoS 1 redelivery, or a replay): not
    /// executed again.
    Duplicate(Box<JobRecord>),
    /// A job id that ran long ago: its folder was pruned, its id is
    /// remembered; not executed again.
    Finished(String),
}

/// Ids of pruned job folders remembered in `jobs/pruned.json`, so a job id
/// still runs at most once after its folder is gone.
const PRUNED_MEMORY: usize = 10_000;

/// The journal in a state directory.
#[derive(Debug, Clone)]
pub struct Journal {
    dir: PathBuf,
    /// Serialises read-modify-write of `shadow.json`.
    shadow_lock: std::sync::Arc<std::sync::Mutex<()>>,
}

impl Journal {
    /// Opens (creating) the journal in `state_dir`. The state directory,
    /// the jobs and the shadow bookkeeping (they hold the deployment's
    /// tokens) are made private to the agent, also when an older agent left
    /// them open to others.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let jobs = state_dir.join("jobs");
        durable::create_private_dir(&jobs)?;
        durable::make_private(state_dir)?;
        for entry in [
            jobs,
            state_dir.join("shadow.json"),
            state_dir.join("trust-root.json"),
        ] {
            durable::make_private_tree(&entry)?;
        }
        Ok(Self {
            dir: state_dir.to_path_buf(),
            shadow_lock: Default::default(),
        })
    }

    /// The journal in `state_dir` for reading only (`otabox status`,
    /// `otabox install`): nothing is created or changed, and a running
    /// agent is not disturbed (its files are replaced whole, by rename).
    pub fn reader(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.to_path_buf(),
            shadow_lock: Default::default(),
        }
    }

    /// Whether `job_id` was journaled here (running, finished, or pruned).
    pub fn knows(&self, job_id: &str) -> Result<bool> {
        Ok(self.record(job_id)?.is_some() || self.pruned()?.iter().any(|id| id == job_id))
    }

    /// The directory of a job's files.
    pub fn job_dir(&self, job_id: &str) -> Result<PathBuf> {
        validate_job_id(job_id)?;
        Ok(self.dir.join("jobs").join(job_id))
    }

    /// The shadow bookkeeping (default when none was written yet).
    pub fn shadow(&self) -> Result<ShadowRecord> {
        read_json(&self.dir.join("shadow.json")).map(Option::unwrap_or_default)
    }

    /// Changes the shadow bookkeeping with `change`, atomically and under
    /// a lock; returns the new record.
    pub fn update_shadow(&self, change: impl FnOnce(&mut ShadowRecord)) -> Result<ShadowRecord> {
        let _guard = self
            .shadow_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut shadow = self.shadow()?;
        change(&mut shadow);
        write_json(&self.dir.join("shadow.json"), &shadow)?;
        Ok(shadow)
    }

    /// The record of `job_id`, if journaled.
    pub fn record(&self, job_id: &str) -> Result<Option<JobRecord>> {
        read_json(&self.job_dir(job_id)?.join("journal.json"))
    }

    /// Writes `record` atomically (a failpoint follows; see
    /// [`crate::failpoint`]).
    pub fn write(&self, record: &JobRecord) -> Result<()> {
        self.store(record)?;
        crate::failpoint::hit(&failpoint_name(record));
        Ok(())
    }

    fn store(&self, record: &JobRecord) -> Result<()> {
        let dir = self.job_dir(&record.job_id)?;
        if !dir.exists() {
            durable::create_private_dir(&dir)?;
            durable::sync_dir(dir.parent().unwrap_or(&self.dir))?;
        }
        write_json(&dir.join("journal.json"), record)
    }

    /// Moves `record` to `phase` and journals it before returning.
    pub fn transition(&self, record: &mut JobRecord, phase: JobPhase) -> Result<()> {
        record.phase = phase;
        self.write(record)
    }

    /// Accepts a delta: stale and duplicate deltas change nothing; a new job
    /// is journaled first, then the shadow version advances.
    pub fn accept(&self, shadow_version: u64, desired: &DesiredState) -> Result<Acceptance> {
        self.accept_signed(shadow_version, desired, None)
    }

    /// Like [`Journal::accept`], recording the sequence of the verified
    /// signed manifest that came with the deployment.
    pub fn accept_signed(
        &self,
        shadow_version: u64,
        desired: &DesiredState,
        sequence: Option<u64>,
    ) -> Result<Acceptance> {
        let _guard = self
            .shadow_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut shadow = self.shadow()?;
        if shadow_version <= shadow.last_version {
            return Ok(Acceptance::Stale {
                last: shadow.last_version,
            });
        }
        if let Some(existing) = self.record(&desired.job_id)? {
            return Ok(Acceptance::Duplicate(Box::new(existing)));
        }
        if self.pruned()?.contains(&desired.job_id) {
            return Ok(Acceptance::Finished(desired.job_id.clone()));
        }
        let record = JobRecord::new(shadow_version, desired, false);
        self.write(&record)?;
        shadow.last_version = shadow_version;
        shadow.desired = Some(desired.clone());
        if let Some(sequence) = sequence {
            shadow.last_sequence = shadow.last_sequence.max(sequence);
        }
        write_json(&self.dir.join("shadow.json"), &shadow)?;
        Ok(Acceptance::Accepted(Box::new(record)))
    }

    /// Accepts a local deployment (`otabox install`): journaled like a
    /// delta's, a job id still runs at most once, but the shadow version
    /// and the cloud's desired state stay as they are (the cloud's next
    /// delta is not taken for stale).
    pub fn accept_local(
        &self,
        desired: &DesiredState,
        sequence: Option<u64>,
    ) -> Result<Acceptance> {
        let _guard = self
            .shadow_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(existing) = self.record(&desired.job_id)? {
            return Ok(Acceptance::Duplicate(Box::new(existing)));
        }
        if self.pruned()?.contains(&desired.job_id) {
            return Ok(Acceptance::Finished(desired.job_id.clone()));
        }
        let mut shadow = self.shadow()?;
        let record = JobRecord::new(shadow.last_version, desired, true);
        self.write(&record)?;
        if let Some(sequence) = sequence.filter(|s| *s > shadow.last_sequence) {
            shadow.last_sequence = sequence;
            write_json(&self.dir.join("shadow.json"), &shadow)?;
        }
        Ok(Acceptance::Accepted(Box::new(record)))
    }

    /// Advances the shadow version for a delta that starts no job (a
    /// cancel); false when the version is stale.
    pub fn advance(&self, shadow_version: u64) -> Result<bool> {
        let mut fresh = false;
        self.update_shadow(|s| {
            if shadow_version > s.last_version {
                s.last_version = shadow_version;
                fresh = true;
            }
        })?;
        Ok(fresh)
    }

    /// Jobs that are not finished, or finished but not reported, oldest
    /// shadow version first.
    pub fn unfinished(&self) -> Result<Vec<JobRecord>> {
        let jobs = self.dir.join("jobs");
        let mut records = Vec::new();
        for entry in
            std::fs::read_dir(&jobs).with_context(|| format!("cannot list {}", jobs.display()))?
        {
            let folder = entry?.path();
            if !folder.is_dir() {
                continue;
            }
            if let Some(record) = read_json::<JobRecord>(&folder.join("journal.json"))?
                && !(matches!(record.phase, JobPhase::Done { .. }) && record.reported)
            {
                records.push(record);
            }
        }
        records.sort_by_key(|r| r.shadow_version);
        Ok(records)
    }

    /// Cleans up after a finished job: deletes its payloads (and partial
    /// downloads), then prunes the folders of the oldest finished jobs
    /// beyond the `keep` most recent.
    pub fn retire(&self, job_id: &str, keep: usize) -> Result<()> {
        remove_dir_if_present(&self.job_dir(job_id)?.join("payloads"))?;
        if self.job_folders()? > keep {
            self.prune(keep)?;
        }
        Ok(())
    }

    /// How many job folders there are.
    fn job_folders(&self) -> Result<usize> {
        let jobs = self.dir.join("jobs");
        Ok(std::fs::read_dir(&jobs)
            .with_context(|| format!("cannot list {}", jobs.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .count())
    }

    /// Deletes the payloads of every finished and reported job (left by an
    /// older agent or a crash before cleanup) and the folders of the oldest
    /// of them until at most `keep` job folders are left; the ids of the
    /// pruned ones are remembered first.
    pub fn prune(&self, keep: usize) -> Result<()> {
        let jobs = self.dir.join("jobs");
        let mut finished = Vec::new();
        let mut folders = 0usize;
        for entry in std::fs::read_dir(&jobs)? {
            let path = entry?.path();
            if !path.is_dir() {
                continue;
            }
            folders += 1;
            let Ok(Some(record)) = read_json::<JobRecord>(&path.join("journal.json")) else {
                continue;
            };
            if matches!(record.phase, JobPhase::Done { .. }) && record.reported {
                remove_dir_if_present(&path.join("payloads"))?;
                finished.push((record.shadow_version, record.job_id));
            }
        }
        // Only finished and reported jobs go, oldest first, until `keep`
        // folders are left.
        let excess = folders.saturating_sub(keep).min(finished.len());
        if excess == 0 {
            return Ok(());
        }
        finished.sort();
        let gone: Vec<String> = finished.drain(..excess).map(|(_, id)| id).collect();
        let mut pruned = self.pruned()?;
        pruned.extend(gone.iter().cloned());
        let start = pruned.len().saturating_sub(PRUNED_MEMORY);
        write_json(&jobs.join("pruned.json"), &pruned[start..])?;
        for id in gone {
            remove_dir_if_present(&self.job_dir(&id)?)?;
        }
        durable::sync_dir(&jobs)
    }

    /// Ids of the job folders pruned so far (the most recent
    /// [`PRUNED_MEMORY`]).
    fn pruned(&self) -> Result<Vec<String>> {
        read_json(&self.dir.join("jobs").join("pruned.json")).map(Option::unwrap_or_default)
    }

    /// Counts an agent start that found `record` unfinished (loop breaker),
    /// journaled before anything is resumed.
    pub fn count_attempt(&self, record: &mut JobRecord) -> Result<()> {
        if !matches!(
            record.phase,
            JobPhase::Done { .. } | JobPhase::AwaitingReboot { .. } | JobPhase::AwaitingRestart
        ) {
            record.attempts += 1;
            self.store(record)?;
        }
        Ok(())
    }
}

/// The current boot id: `OTABOX_BOOT_ID_FILE` when set (tests simulate a
/// reboot with it), else the kernel's.
pub fn boot_id() -> Result<String> {
    let path = std::env::var_os("OTABOX_BOOT_ID_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/proc/sys/kernel/random/boot_id"));
    let id = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read boot id from {}", path.display()))?;
    let id = id.trim();
    if id.is_empty() {
        bail!("boot id in {} is empty", path.display());
    }
    Ok(id.to_string())
}

fn remove_dir_if_present(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", dir.display()))
        }
        _ => Ok(()),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .with_context(|| format!("state file {} does not parse", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value).context("cannot encode state")?;
    durable::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::shadow::RebootPolicy;

    use crate::shadow::sample_desired as desired;

    #[test]
    fn accept_journals_new_jobs_and_ignores_stale_and_duplicate_deltas() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(dir.path()).expect("open");
        let Acceptance::Accepted(record) = journal.accept(5, &desired("a")).expect("accept") else {
            panic!()
        };
        assert_eq!(record.phase, JobPhase::Accepted);
        assert_eq!(journal.record("a").expect("read"), Some(*record));
        assert_eq!(
            journal.accept(5, &desired("b")).expect("accept"),
            Acceptance::Stale { last: 5 }
        );
        assert_eq!(
            journal.accept(4, &desired("b")).expect("accept"),
            Acceptance::Stale { last: 5 }
        );
        assert!(matches!(
            journal.accept(6, &desired("a")).expect("accept"),
            Acceptance::Duplicate(_)
        ));
        assert_eq!(
            journal.shadow().expect("shadow").last_version,
            5,
            "a duplicate does not advance the version"
        );
        assert!(matches!(
            journal.accept(7, &desired("b")).expect("accept"),
            Acceptance::Accepted(_)
        ));
        let jobs: Vec<String> = journal
            .unfinished()
            .expect("list")
            .into_iter()
            .map(|r| r.job_id)
            .collect();
        assert_eq!(jobs, ["a", "b"]);
        assert_eq!(
            journal.shadow().expect("shadow").desired.map(|d| d.reboot),
            Some(RebootPolicy::Immediate)
        );
    }

    #[test]
    fn a_local_job_is_journaled_once_and_leaves_the_shadow_version_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(dir.path()).expect("open");
        assert!(matches!(
            journal.accept(5, &desired("cloud")).expect("accept"),
            Acceptance::Accepted(_)
        ));
        let Acceptance::Accepted(record) = journal
            .accept_local(&desired("local"), Some(3))
            .expect("accept")
        else {
            panic!()
        };
        assert!(record.local);
        let shadow = journal.shadow().expect("shadow");
        assert_eq!(
            shadow.last_version, 5,
            "the cloud's next delta is not stale"
        );
        assert_eq!(shadow.desired.map(|d| d.job_id).as_deref(), Some("cloud"));
        assert_eq!(shadow.last_sequence, 3, "a signed sequence counts");
        assert!(matches!(
            journal
                .accept_local(&desired("local"), None)
                .expect("again"),
            Acceptance::Duplicate(_)
        ));
        assert!(matches!(
            journal
                .accept_local(&desired("cloud"), None)
                .expect("a cloud id"),
            Acceptance::Duplicate(_)
        ));
        assert!(matches!(
            journal.accept(6, &desired("next")).expect("accept"),
            Acceptance::Accepted(_)
        ));
        assert!(journal.knows("local").expect("knows"));
        assert!(!Journal::reader(dir.path()).knows("other").expect("knows"));
    }

    #[test]
    fn resume_decisions_follow_the_phase_and_the_boot_id() {
        let mut r = JobRecord {
            job_id: "a".into(),
            shadow_version: 1,
            desired: desired("a"),
            handler_sha256: vec![],
            phase: JobPhase::Downloading,
            steps: vec![],
            attempts: 1,
            reported: false,
            local: false,
        };
        assert_eq!(decide(&r, "boot-1", 3), Resume::ResumeDownload);
        r.phase = JobPhase::Installing {
            step: 2,
            stage: "apply".into(),
        };
        assert_eq!(decide(&r, "boot-1", 3), Resume::AskHandler { step: 2 });
        r.phase = JobPhase::AwaitingReboot {
            boot_id: "boot-1".into(),
            deferred: false,
        };
        assert_eq!(decide(&r, "boot-1", 3), Resume::AwaitReboot);
        assert_eq!(decide(&r, "boot-2", 3), Resume::VerifyAfterReboot);
        r.phase = JobPhase::Done {
            result: JobResult::Succeeded,
        };
        assert_eq!(
            decide(&r, "boot-2", 3),
            Resume::Report(JobResult::Succeeded)
        );
        r.reported = true;
        assert_eq!(decide(&r, "boot-2", 3), Resume::Nothing);
    }

    #[test]
    fn a_job_stopped_during_its_rollback_asks_the_handler() {
        let mut r = JobRecord::new(1, &desired("a"), false);
        r.phase = JobPhase::Installing {
            step: 1,
            stage: "rollback".into(),
        };
        assert_eq!(decide(&r, "boot-1", 3), Resume::AskHandler { step: 1 });
    }

    #[test]
    fn journals_in_every_phase_ever_written_still_read_and_are_written_alike() {
        let phases = [
            json!({"phase": "accepted"}),
            json!({"phase": "validating"}),
            json!({"phase": "downloading"}),
            json!({"phase": "installing", "step": 0, "stage": "rollback"}),
            json!({"phase": "awaiting-reboot", "boot_id": "b-1", "deferred": true}),
            json!({"phase": "awaiting-restart"}),
            json!({"phase": "verifying"}),
            json!({"phase": "done", "result": "failed-rolled-back"}),
        ];
        let record = JobRecord::new(3, &desired("a"), false);
        for phase in phases {
            let mut old = serde_json::to_value(&record).expect("encode");
            old["phase"] = phase.clone();
            let read: JobRecord = serde_json::from_value(old).expect("an old journal reads");
            let name = phase["phase"].as_str().expect("tag");
            assert_eq!(phase_name(&read.phase), name);
            assert_eq!(serde_json::to_value(&read.phase).expect("encode"), phase);
        }
    }

    #[test]
    fn the_loop_breaker_fails_a_job_that_keeps_crashing_the_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(dir.path()).expect("open");
        let Acceptance::Accepted(mut record) = journal.accept(1, &desired("a")).expect("accept")
        else {
            panic!()
        };
        journal
            .transition(
                &mut record,
                JobPhase::Installing {
                    step: 0,
                    stage: "install".into(),
                },
            )
            .expect("write");
        for _ in 0..3 {
            let mut r = journal.record("a").expect("read").expect("present");
            journal.count_attempt(&mut r).expect("count");
            assert_eq!(decide(&r, "b", 3), Resume::AskHandler { step: 0 });
        }
        let mut r = journal.record("a").expect("read").expect("present");
        journal.count_attempt(&mut r).expect("count");
        assert!(matches!(decide(&r, "b", 3), Resume::GiveUp(m) if m.contains("4 times")));
        let mut waiting = r.clone();
        waiting.phase = JobPhase::AwaitingReboot {
            boot_id: "b".into(),
            deferred: true,
        };
        journal.count_attempt(&mut waiting).expect("count");
        assert_eq!(waiting.attempts, 4, "waiting for a reboot is not a crash");
    }

    #[test]
    fn a_corrupt_state_file_is_named_and_hostile_ids_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = Journal::open(dir.path()).expect("open");
        std::fs::write(dir.path().join("shadow.json"), b"{not json").expect("write");
        assert!(
            format!("{:#}", journal.shadow().unwrap_err()).contains("shadow.json does not parse")
        );
        assert!(journal.job_dir("../escape").is_err());
    }
}
