//! Local deployments (`otabox install`): taken from the state directory's
//! inbox through the checks a delta passes (parsing, signature and trust
//! rules), journaled, and run by the worker like any other job. A local
//! job is reported (progress, `lastResult` with `"local": true`,
//! `installed`, inventory) but not acknowledged: an acknowledgement answers
//! a desired deployment of the cloud. It does not cancel a running job (it
//! waits for it); a cloud deployment arriving later cancels it as it would
//! any job.

use tokio::signal::unix::{Signal, SignalKind, signal};

use std::sync::Arc;

use tokio::sync::mpsc;

use super::intake::{MAX_REASON_BYTES, journal_verified, verify_signature};

use super::Shared;
use crate::local::{self, LocalRejection, Request, StateLock};
use otabox_core::journal::{Acceptance, JobRecord};
use otabox_core::shadow::Rejection;

/// Takes the state directory for this agent: its lock, and the wakeup
/// signal `otabox install` sends (listened for before the pid that invites
/// it is written; `None` when it cannot be, and the inbox is then polled).
pub(super) fn own_state(state: &std::path::Path) -> anyhow::Result<(StateLock, Option<Signal>)> {
    let wake = match signal(SignalKind::user_defined1()) {
        Ok(wake) => Some(wake),
        Err(e) => {
            tracing::warn!("cannot listen for SIGUSR1 ({e}); local deployments are polled");
            None
        }
    };
    let mut lock = StateLock::own(state)?;
    if wake.is_some() {
        lock.announce()?;
    }
    Ok((lock, wake))
}

/// Takes what waits in the inbox, then again on each wakeup and every
/// [`local::INBOX_POLL`].
pub(super) async fn watch(
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<JobRecord>,
    mut wake: Option<Signal>,
) {
    loop {
        take(&shared, &jobs);
        let woken = async {
            match wake.as_mut() {
                Some(signal) => {
                    signal.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = woken => {}
            _ = tokio::time::sleep(local::INBOX_POLL) => {}
        }
    }
}

/// Journals (or refuses) every request in the inbox.
fn take(shared: &Shared, jobs: &mpsc::UnboundedSender<JobRecord>) {
    let state = &shared.config.paths.state;
    let requests = match local::requests(state, shared.config.mqtt.max_message_bytes) {
        Ok(requests) => requests,
        Err(e) => return tracing::warn!("cannot read the local deployments: {e:#}"),
    };
    for request in requests {
        match admit(shared, &request) {
            Ok(admitted) => {
                if let Err(e) = local::remove_request(&request) {
                    tracing::error!("{e:#}");
                }
                if let Some(record) = admitted {
                    tracing::info!(job = record.job_id, "accepted a local deployment");
                    let _ = jobs.send(record);
                }
            }
            Err(rejection) => {
                tracing::warn!(
                    job = rejection.job_id.as_deref().unwrap_or(&request.name),
                    "refused a local deployment: {}",
                    rejection.reason
                );
                report_rejection(shared, &rejection);
                if let Err(e) = local::refuse(state, &request, &rejection) {
                    tracing::error!("cannot answer a local deployment: {e:#}");
                }
            }
        }
    }
}

/// The journal record of a request, or `None` when the journal holds it
/// already (taken before a crash, the request not yet removed).
fn admit(shared: &Shared, request: &Request) -> Result<Option<JobRecord>, LocalRejection> {
    let refuse = |job_id: Option<&str>, reason: String| LocalRejection {
        job_id: job_id.map(str::to_string),
        reason,
    };
    let bytes = request
        .bytes
        .as_ref()
        .map_err(|e| refuse(None, e.clone()))?;
    let desired = local::parse_local(bytes, shared.config.mqtt.max_message_bytes)
        .map_err(|e| refuse(None, format!("{e:#}")))?;
    let job = Some(desired.job_id.as_str());
    if desired.job_id != request.name {
        return Err(refuse(
            job,
            format!("the request's file must be named {}.json", desired.job_id),
        ));
    }
    let verified = verify_signature(shared, &desired)
        .map_err(|e| refuse(job, format!("untrusted deployment: {e:#}")))?;
    match journal_verified(shared, verified, |sequence| {
        shared.journal.accept_local(&desired, sequence)
    }) {
        Ok(Acceptance::Accepted(record)) => Ok(Some(*record)),
        Ok(Acceptance::Duplicate(record)) if record.local && record.desired == desired => Ok(None),
        Ok(Acceptance::Duplicate(_) | Acceptance::Finished(_)) => Err(refuse(
            job,
            format!(
                "job {} ran already on this device: a job id runs at most once",
                desired.job_id
            ),
        )),
        Ok(Acceptance::Stale { .. }) => Err(refuse(job, "stale".into())),
        Err(e) => Err(refuse(job, format!("cannot journal it: {e:#}"))),
    }
}

/// Tells the cloud of a refused local deployment (`lastRejected`), as of a
/// refused delta; no state file changes.
fn report_rejection(shared: &Shared, rejection: &LocalRejection) {
    let reporter = shared.reporter();
    let payload = reporter.rejection(Rejection {
        shadow_version: None,
        job_id: rejection.job_id.clone(),
        reason: otabox_runtime::bounds::text(rejection.reason.clone(), MAX_REASON_BYTES),
    });
    reporter.push_volatile("rejected:local", payload, std::time::Instant::now());
}
