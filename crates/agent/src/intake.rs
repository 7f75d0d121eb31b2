//! What the cloud asks of the device, taken in: deltas (a deployment, by
//! value or by reference, or a cancel), checked (parsing, signature and
//! trust rules) and journaled, or rejected with a reason. The local inbox
//! ([`super::inbox`]) admits its requests through the same checks.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use super::{Shared, lock};
use otabox_core::journal::{Acceptance, JobPhase, JobRecord};
use otabox_core::shadow::{DeltaMessage, Rejection, parse_delta};

/// Longest wait for a referenced deployment document.
const REFERENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// A deployment given by reference, fetched (exact size and sha256) and
/// put in the delta in its place; other deltas, and cancels, pass as they
/// are.
async fn resolve_reference(shared: &Shared, mut delta: DeltaMessage) -> Result<DeltaMessage> {
    let desired = &delta.state.deployment;
    let Some(reference) = desired.deployment_ref.as_ref().filter(|_| !desired.cancel) else {
        return Ok(delta);
    };
    let dir = shared.config.paths.state.join("references");
    otabox_core::durable::create_private_dir(&dir)?;
    let path = dir.join(format!("{}.json", desired.job_id));
    let fetch =
        shared
            .downloader
            .fetch_document(&reference.url, &reference.sha256, reference.size, &path);
    let fetched = tokio::time::timeout(REFERENCE_TIMEOUT, fetch).await;
    let bytes = std::fs::read(&path);
    let _ = std::fs::remove_file(&path);
    match fetched {
        Err(_) => {
            anyhow::bail!("the referenced deployment did not arrive within {REFERENCE_TIMEOUT:?}")
        }
        Ok(Err(e)) => anyhow::bail!("cannot fetch the referenced deployment: {e}"),
        Ok(Ok(())) => {}
    }
    let bytes = bytes.context("the referenced deployment was not stored")?;
    anyhow::ensure!(
        bytes.len() as u64 == reference.size,
        "the referenced deployment has {} bytes, not {}",
        bytes.len(),
        reference.size
    );
    delta.state.deployment = desired.resolve(&bytes)?;
    Ok(delta)
}

/// With a trust root, the deployment's signed manifest must verify (before
/// anything is journaled or fetched), after the root rotations it carries;
/// returns its sequence and the rotated root, if any.
pub(super) fn verify_signature(
    shared: &Shared,
    desired: &otabox_core::shadow::DesiredState,
) -> Result<Verified> {
    let Some(current) = shared.trust.current() else {
        anyhow::ensure!(
            desired.signed_manifest.is_none(),
            "this device has no [trust] root to verify the signed manifest"
        );
        return Ok((None, None));
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let verified = otabox_core::trust::signed::Verifier {
        root: &current,
        device: shared.config.device_id()?,
        groups: &shared.config.trust.groups,
        last_sequence: shared.journal.shadow()?.last_sequence,
        now,
    }
    .verify_deployment(desired)?;
    Ok((Some(verified.manifest.signed.sequence), verified.rotated))
}

/// An explicit cancel: signals the running job, or marks a queued one.
fn cancel_job(shared: &Shared, version: u64, job_id: &str) {
    match shared.journal.advance(version) {
        Ok(true) => {}
        Ok(false) => return tracing::info!(version, "ignored a stale cancel"),
        Err(e) => return tracing::error!("cannot journal a cancel: {e:#}"),
    }
    if let Some((running, cancel)) = lock(&shared.current).as_ref()
        && running == job_id
    {
        tracing::info!(job = job_id, "cancel requested");
        cancel.cancel();
        return;
    }
    match shared.journal.record(job_id) {
        Ok(Some(record)) if !matches!(record.phase, JobPhase::Done { .. }) => {
            tracing::info!(job = job_id, "cancelled before it started");
            lock(&shared.cancelled).insert(job_id.to_string());
        }
        Ok(_) => tracing::info!(job = job_id, "nothing to cancel"),
        Err(e) => tracing::error!("cannot read job {job_id}: {e:#}"),
    }
}

/// The report of a rejected delta: the current reported state with
/// `lastRejected` (the delta's shadow version and job id as far as they
/// can be read, and the reason). Nothing is written: a rejection leaves
/// every state file as it was.
fn rejection(shared: &Shared, payload: &[u8], reason: &str) -> Option<String> {
    tracing::warn!("rejected delta: {reason}");
    let rejected = rejected_delta(payload, shared.config.mqtt.max_message_bytes, reason);
    Some(shared.reporter().rejection(rejected))
}

/// Which delta was rejected: its version and job id when the message is
/// JSON within the size cap and they are well-formed.
fn rejected_delta(payload: &[u8], max_bytes: usize, reason: &str) -> Rejection {
    let value: Option<serde_json::Value> = (payload.len() <= max_bytes)
        .then(|| serde_json::from_slice(payload).ok())
        .flatten();
    let field = |pointer: &str| value.as_ref().and_then(|v| v.pointer(pointer)).cloned();
    Rejection {
        shadow_version: field("/version").and_then(|v| v.as_u64()),
        job_id: field("/state/deployment/jobId")
            .and_then(|v| v.as_str().map(str::to_string))
            .filter(|id| otabox_core::shadow::validate_job_id(id).is_ok()),
        reason: otabox_runtime::bounds::text(reason.to_string(), MAX_REASON_BYTES),
    }
}

/// Longest reason of a rejection, as the contract bounds status messages.
pub(super) const MAX_REASON_BYTES: usize = 1024;

/// Takes in a delta's document: parsed, fetched when it gives the
/// deployment by reference, verified; then a cancel is applied, or the
/// deployment journaled and handed to the worker (cancelling the running
/// job). Returns the report of a rejected delta, if any. The session waits
/// for a referenced document: it is small and its fetch bounded.
pub(super) async fn on_delta(
    shared: &Shared,
    jobs: &mpsc::UnboundedSender<JobRecord>,
    payload: &[u8],
) -> Option<String> {
    let delta = match parse_delta(payload, shared.config.mqtt.max_message_bytes) {
        Ok(delta) => delta,
        Err(e) => return rejection(shared, payload, &format!("{e:#}")),
    };
    shared.cloud.note_desired(&delta.state.deployment);
    let delta = match resolve_reference(shared, delta).await {
        Ok(delta) => delta,
        Err(e) => return rejection(shared, payload, &format!("{e:#}")),
    };
    let verified = match verify_signature(shared, &delta.state.deployment) {
        Ok(verified) => verified,
        Err(e) => {
            return rejection(shared, payload, &format!("untrusted deployment: {e:#}"));
        }
    };
    if delta.state.deployment.cancel {
        cancel_job(shared, delta.version, &delta.state.deployment.job_id);
        return None;
    }
    let journaled = journal_verified(shared, verified, |sequence| {
        shared
            .journal
            .accept_signed(delta.version, &delta.state.deployment, sequence)
    });
    match journaled {
        Ok(Acceptance::Accepted(record)) => {
            tracing::info!(job = record.job_id, version = delta.version, "accepted");
            if let Some((running, cancel)) = lock(&shared.current).as_ref() {
                tracing::info!(job = running, "cancelling: a new deployment arrived");
                cancel.cancel();
            }
            let _ = jobs.send(*record);
        }
        Ok(Acceptance::Stale { last }) => {
            tracing::info!(version = delta.version, last, "ignored a stale delta")
        }
        Ok(Acceptance::Duplicate(record)) => {
            tracing::info!(
                job = record.job_id,
                "ignored a duplicate delta (the job runs at most once)"
            )
        }
        Ok(Acceptance::Finished(job)) => {
            tracing::info!(job, "ignored a delta of a job that ran long ago")
        }
        Err(e) => tracing::error!("cannot journal a delta: {e:#}"),
    }
    None
}

/// A deployment's signature as verified: its sequence and the rotated
/// root it carried (both none without a root of trust).
pub(super) type Verified = (Option<u64>, Option<otabox_core::trust::signed::Root>);

/// Journals a verified deployment with `accept` (given its signed
/// sequence) and, once accepted, keeps the root rotation it carried: the
/// admission of deltas and of the local inbox alike.
pub(super) fn journal_verified(
    shared: &Shared,
    (sequence, rotated): Verified,
    accept: impl FnOnce(Option<u64>) -> Result<Acceptance>,
) -> Result<Acceptance> {
    let acceptance = accept(sequence)?;
    if let (Acceptance::Accepted(_), Some(root)) = (&acceptance, rotated) {
        shared.trust.keep(root);
    }
    Ok(acceptance)
}
