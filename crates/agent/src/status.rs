//! `otabox status`: what the agent of this device is doing, read from its
//! state directory without disturbing it — nothing is written or locked
//! (whether an agent runs is probed with a lock tried and dropped at once),
//! and every state file is replaced whole by the agent (rename), so a read
//! sees the old or the new one; a job folder pruned while it is listed is
//! skipped.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use crate::local::{self, Connection, Owner};
use otabox_core::journal::{JobPhase, JobRecord, Journal};
use otabox_core::outbox::Entry;
use otabox_core::shadow::LastResult;

/// The device's update state as `otabox status` shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    /// The state directory read.
    pub state_dir: PathBuf,
    /// The agent.
    pub agent: AgentStatus,
    /// The broker connection as the agent last recorded it.
    pub broker: Option<Connection>,
    /// The job running (or waiting for a reboot or restart).
    pub job: Option<JobStatus>,
    /// Jobs accepted and waiting for it, in order.
    pub queued: Vec<String>,
    /// Installed criteria per update type.
    pub installed: BTreeMap<String, String>,
    /// The deployment version the device runs (from the last success).
    pub running_version: Option<String>,
    /// The last job's result, with the reason.
    pub last_result: Option<LastResult>,
    /// Reports and acknowledgements queued durably, not yet acknowledged
    /// by the broker (outbox keys, oldest first).
    pub pending_reports: Vec<String>,
    /// Local deployments (`otabox install`) the agent has not taken yet.
    pub pending_local: Vec<String>,
}

/// The agent process.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AgentStatus {
    /// Whether an agent runs on the state directory.
    pub running: bool,
    /// Its process id, when known.
    pub pid: Option<u32>,
    /// What it is doing (`stopped` when it does not run).
    pub state: String,
    /// Its version, as last reported.
    pub version: Option<String>,
}

/// A job in progress.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobStatus {
    /// Job id.
    pub job_id: String,
    /// The deployment's version.
    pub version: String,
    /// A local deployment (`otabox install`).
    pub local: bool,
    /// The journal phase (`validating`, `downloading`, `installing`, …).
    pub phase: String,
    /// The step changing the system, when one is (0-based).
    pub step: Option<u32>,
    /// Steps in all.
    pub steps: usize,
    /// The handler phase of that step (`install`, `apply`, …).
    pub stage: Option<String>,
    /// Agent starts that found the job unfinished.
    pub attempts: u32,
}

/// Reads the status of the agent whose state directory is `state_dir`.
pub fn read(state_dir: &Path) -> Result<DeviceStatus> {
    let owner = local::owner(state_dir)?;
    let journal = Journal::reader(state_dir);
    let shadow = journal.shadow()?;
    let unfinished = unfinished(&journal)?;
    let mut working = unfinished
        .iter()
        .filter(|r| !matches!(r.phase, JobPhase::Done { .. }));
    let job = working.next().map(job_status);
    let queued = working.map(|r| r.job_id.clone()).collect();
    let reported = shadow.reported.clone();
    let (running, pid) = match owner {
        Owner::Nobody => (false, None),
        Owner::Agent { pid } => (true, pid),
    };
    let state = match (&job, running) {
        (_, false) => "stopped".to_string(),
        (Some(job), true) => agent_state(job).to_string(),
        (None, true) => "idle".to_string(),
    };
    Ok(DeviceStatus {
        state_dir: state_dir.to_path_buf(),
        agent: AgentStatus {
            running,
            pid,
            state,
            version: reported.as_ref().map(|r| r.agent.version.clone()),
        },
        broker: local::connection(state_dir),
        job,
        queued,
        installed: reported
            .as_ref()
            .map(|r| r.installed.clone())
            .unwrap_or_default(),
        running_version: shadow.running_version,
        last_result: reported.and_then(|r| r.last_result),
        pending_reports: pending_reports(&state_dir.join("outbox")),
        pending_local: local::requests(state_dir, 0)?
            .into_iter()
            .map(|r| r.name)
            .collect(),
    })
}

/// The unfinished jobs; a listing that races with the agent's pruning is
/// tried again.
fn unfinished(journal: &Journal) -> Result<Vec<JobRecord>> {
    match journal.unfinished() {
        Ok(records) => Ok(records),
        Err(_) => {
            std::thread::sleep(std::time::Duration::from_millis(50));
            journal.unfinished().or_else(|e| {
                let missing = e
                    .chain()
                    .filter_map(|c| c.downcast_ref::<std::io::Error>())
                    .any(|io| io.kind() == std::io::ErrorKind::NotFound);
                if missing { Ok(Vec::new()) } else { Err(e) }
            })
        }
    }
}

fn job_status(record: &JobRecord) -> JobStatus {
    let (step, stage) = match &record.phase {
        JobPhase::Installing { step, stage } => (Some(*step), Some(stage.clone())),
        _ => (None, None),
    };
    JobStatus {
        job_id: record.job_id.clone(),
        version: record.desired.version.clone(),
        local: record.local,
        phase: otabox_core::journal::phase_name(&record.phase).to_string(),
        step,
        steps: record.desired.steps.len(),
        stage,
        attempts: record.attempts,
    }
}

/// The agent state a job's journal phase stands for, as the agent reports
/// it.
fn agent_state(job: &JobStatus) -> &'static str {
    match (job.phase.as_str(), job.stage.as_deref()) {
        ("accepted" | "validating", _) => "validating",
        ("downloading", _) => "downloading",
        ("installing", Some("verify" | "commit")) | ("verifying", _) => "verifying",
        ("installing", Some("rollback")) => "rolling-back",
        ("installing", _) => "installing",
        ("awaiting-reboot", _) => "reboot-pending",
        ("awaiting-restart", _) => "restarting",
        _ => "idle",
    }
}

/// The keys of the outbox entries not yet acknowledged, oldest first. An
/// entry removed while it is read was sent meanwhile and is left out.
fn pending_reports(dir: &Path) -> Vec<String> {
    let sent: Vec<String> = std::fs::read(dir.join("sent.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let Ok(listing) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut entries: Vec<Entry> = listing
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_stem()
                .and_then(|s| s.to_str())
                .is_some_and(|s| s.parse::<u64>().is_ok())
        })
        .filter_map(|p| serde_json::from_slice(&std::fs::read(p).ok()?).ok())
        .filter(|e: &Entry| !sent.contains(&e.key))
        .collect();
    entries.sort_by_key(|e| e.seq);
    entries.into_iter().map(|e| e.key).collect()
}

impl DeviceStatus {
    /// The status as text for people, one fact a line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |label: &str, text: &str| {
            let _ = writeln!(out, "{label:<13}{text}");
        };
        line("agent", &self.agent_line());
        line("broker", &self.broker_line());
        line("job", &self.job_line());
        if !self.queued.is_empty() {
            line("queued", &self.queued.join(", "));
        }
        if self.installed.is_empty() {
            line("installed", "-");
        }
        for (update_type, criteria) in &self.installed {
            line("installed", &format!("{update_type}: {criteria}"));
        }
        line("version", self.running_version.as_deref().unwrap_or("-"));
        line("last result", &self.result_line());
        if let Some(result) = &self.last_result {
            for (i, step) in result.steps.iter().enumerate() {
                let message = if step.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", step.message)
                };
                line(
                    "",
                    &format!("step {i} {}: {}{message}", step.update_type, step.result),
                );
            }
        }
        line("pending", &listed(&self.pending_reports, "report"));
        line("local", &listed(&self.pending_local, "deployment"));
        out
    }

    fn agent_line(&self) -> String {
        let a = &self.agent;
        match (a.running, a.pid) {
            (false, _) => format!("not running (state directory {})", self.state_dir.display()),
            (true, Some(pid)) => format!("running (pid {pid}), {}", a.state),
            (true, None) => format!("running, {}", a.state),
        }
    }

    fn broker_line(&self) -> String {
        let Some(c) = &self.broker else {
            return "-".into();
        };
        let since = otabox_core::clock::rfc3339(c.since);
        let text = match (&c.error, c.connected) {
            (_, true) => format!("connected to {} since {since}", c.broker),
            (Some(e), false) => format!("not connected to {} since {since}: {e}", c.broker),
            (None, false) => format!("not connected to {} since {since}", c.broker),
        };
        if self.agent.running {
            text
        } else {
            format!("(when the agent last ran) {text}")
        }
    }

    fn job_line(&self) -> String {
        let Some(job) = &self.job else {
            return "-".into();
        };
        let origin = if job.local { ", local" } else { "" };
        let step = match (job.step, &job.stage) {
            (Some(step), Some(stage)) => format!(", step {} of {} ({stage})", step + 1, job.steps),
            _ => String::new(),
        };
        format!(
            "{} (version {}{origin}): {}{step}",
            job.job_id, job.version, job.phase
        )
    }

    fn result_line(&self) -> String {
        self.last_result
            .as_ref()
            .map_or_else(|| "-".into(), describe_result)
    }
}

/// A job's result in one line: `job-1 FAILURE (failed-rolled-back): why`.
pub fn describe_result(r: &LastResult) -> String {
    let name = |v: serde_json::Result<serde_json::Value>| {
        v.ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let result = name(serde_json::to_value(r.result));
    let status = name(serde_json::to_value(r.status));
    let origin = if r.local { ", local" } else { "" };
    let reason = if r.message.is_empty() {
        String::new()
    } else {
        format!(": {}", r.message)
    };
    format!("{} {status} ({result}{origin}){reason}", r.job_id)
}

/// `n thing(s): a, b` or `-`.
fn listed(items: &[String], thing: &str) -> String {
    if items.is_empty() {
        return "-".into();
    }
    format!("{} {thing}(s): {}", items.len(), items.join(", "))
}
