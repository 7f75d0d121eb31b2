//! `otabox install DEPLOYMENT.json`: a local deployment through the running
//! agent. The file is checked as the agent will check it, queued in the
//! agent's inbox (see [`crate::local`]), and the agent is woken; the agent
//! journals it and runs it like a deployment from the cloud. By default
//! the command follows the job's phases and prints its result.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::config::DeviceConfig;
use crate::local::{self, LocalRejection, Owner};
use otabox_core::journal::{JobPhase, Journal};
use otabox_core::outln;

/// How often the state is looked at while waiting.
const POLL: Duration = Duration::from_millis(100);
/// How long the agent may be gone (an agent restart re-executes it) before
/// waiting stops.
const AGENT_GONE: Duration = Duration::from_secs(5);

/// Queues `file` for the agent of `config` and, with `wait`, prints each
/// phase and the result; returns whether the job succeeded (or, without
/// `wait`, was queued).
pub async fn run(config: &DeviceConfig, file: &Path, wait: bool) -> Result<bool> {
    let state = &config.paths.state;
    let max = config.mqtt.max_message_bytes;
    let bytes = read_capped(file, max)?;
    let desired = local::parse_local(&bytes, max)
        .with_context(|| format!("{} is not a valid deployment", file.display()))?;
    let job = desired.job_id.clone();
    let Owner::Agent { pid } = local::owner(state)? else {
        bail!(
            "no agent is running on the state directory {}: start it (`otabox run`) and install again; nothing was queued",
            state.display()
        );
    };
    if Journal::reader(state).knows(&job)? {
        bail!(
            "job {job} ran already on this device: a job id runs at most once; give the deployment a new jobId"
        );
    }
    local::queue(state, &job, &bytes)?;
    match pid {
        Some(pid) => local::wake(pid)?,
        None => tracing::info!("the agent is starting; it takes the deployment once started"),
    }
    outln!(
        "queued {job} for the agent{}",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )?;
    if !wait {
        return Ok(true);
    }
    follow(state, &job).await
}

/// A file's bytes, refused when over `max` bytes.
fn read_capped(file: &Path, max: usize) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(max as u64 + 1).read_to_end(&mut bytes))
        .with_context(|| format!("cannot read {}", file.display()))?;
    if bytes.len() > max {
        bail!(
            "{} is over the {max}-byte limit of a deployment ([mqtt] max_message_bytes)",
            file.display()
        );
    }
    Ok(bytes)
}

/// Prints the job's phases until it ends; returns whether it succeeded.
async fn follow(state: &Path, job: &str) -> Result<bool> {
    let journal = Journal::reader(state);
    let mut last_phase = String::new();
    let mut gone_since: Option<Instant> = None;
    loop {
        if let Some(rejection) = answered(state, job)? {
            outln!("refused: {}", rejection.reason)?;
            return Ok(false);
        }
        if let Some(result) = journal
            .shadow()?
            .reported
            .and_then(|r| r.last_result)
            .filter(|r| r.job_id == job)
        {
            outln!("{}", crate::status::describe_result(&result))?;
            return Ok(result.status == otabox_core::shadow::AckStatus::Success);
        }
        if let Some(record) = journal.record(job)? {
            let phase = phase_text(&record.phase);
            if phase != last_phase {
                outln!("  {phase}")?;
                last_phase = phase;
            }
        }
        match local::owner(state)? {
            Owner::Agent { .. } => gone_since = None,
            Owner::Nobody => {
                if gone_since.get_or_insert_with(Instant::now).elapsed() > AGENT_GONE {
                    bail!(
                        "the agent stopped; job {job} stays in its state directory and goes on when the agent starts again"
                    );
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The agent's answer to a refused request, taken (removed) once read.
fn answered(state: &Path, job: &str) -> Result<Option<LocalRejection>> {
    let path = local::rejection_path(state, job)?;
    let Ok(bytes) = std::fs::read(&path) else {
        return Ok(None);
    };
    let rejection = serde_json::from_slice(&bytes)
        .with_context(|| format!("{} does not parse", path.display()))?;
    let _ = std::fs::remove_file(&path);
    Ok(Some(rejection))
}

fn phase_text(phase: &JobPhase) -> String {
    match phase {
        JobPhase::Installing { step, stage } => format!("step {}: {stage}", step + 1),
        phase => otabox_core::journal::phase_name(phase).to_string(),
    }
}
