//! Where a job's files live (manifests fetched by URL, payloads) and how
//! they are fetched, and the workflow request of a step over them.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::Shared;
use super::report::progress_reporter;
use crate::download;
use otabox_core::journal::JobRecord;
use otabox_core::model::{Phase, Status};
use otabox_core::shadow::ManifestSource;
use otabox_core::step::{self as workflow, StepRequest, host_codes};
use otabox_runtime::{CancelFlag, PayloadFile};

/// Largest manifest fetched by URL.
pub(super) const MAX_MANIFEST: u64 = 1 << 20;

/// Where the manifest of `step` fetched by URL is kept in the job folder.
pub(super) fn manifest_path(job_dir: &std::path::Path, step: usize) -> PathBuf {
    job_dir.join("manifests").join(format!("{step}.json"))
}

/// Fetches the manifest of `step` when the deployment gives it by URL
/// (before validate: the handler needs it to plan).
pub(super) async fn fetch_manifest(
    shared: &Shared,
    record: &JobRecord,
    step: usize,
    job_dir: &std::path::Path,
) -> Result<(), download::DownloadError> {
    if let Some(ManifestSource::Remote { url, sha256 }) =
        record.desired.steps[step].manifest_source()
    {
        shared
            .downloader
            .fetch_document(url, sha256, MAX_MANIFEST, &manifest_path(job_dir, step))
            .await?;
    }
    Ok(())
}

/// Fetches the payload files of `step` named by its plan into the job
/// folder, each verified (size and sha256) as it comes in.
pub(super) async fn fetch_payloads(
    shared: &Arc<Shared>,
    record: &JobRecord,
    step: usize,
    job_dir: &std::path::Path,
    names: &[String],
) -> Result<(), download::DownloadError> {
    let sink = progress_reporter(shared, &record.job_id);
    let files = record.desired.steps[step]
        .files
        .iter()
        .filter(|f| names.contains(&f.name));
    for file in files {
        let report = |done: u64, total: u64| {
            sink(otabox_runtime::ProgressEvent {
                handler: "host".into(),
                job_id: record.job_id.clone(),
                step: step as u32,
                phase: Phase::Download,
                done,
                total,
            })
        };
        shared
            .downloader
            .fetch_with_progress(
                file,
                &payload_path(job_dir, step, &file.name),
                None,
                &report,
            )
            .await?;
    }
    Ok(())
}

/// The host status of a failed download.
pub(super) fn download_status(e: &download::DownloadError) -> Status {
    let code = match e.kind {
        download::FailureKind::UrlExpired | download::FailureKind::Unauthorized => {
            host_codes::URL_EXPIRED
        }
        download::FailureKind::DiskFull => host_codes::DISK_FULL,
        _ => host_codes::DOWNLOAD,
    };
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    workflow::host_status(code, format!("{kind}: {}", e.message))
}

/// Where the payload `name` of `step` is kept in the job folder.
pub(super) fn payload_path(job_dir: &std::path::Path, step: usize, name: &str) -> PathBuf {
    job_dir.join("payloads").join(step.to_string()).join(name)
}

/// The workflow request of `step`.
pub(super) fn step_request(
    record: &JobRecord,
    step: usize,
    job_dir: &std::path::Path,
) -> Result<StepRequest> {
    let spec = &record.desired.steps[step];
    let manifest = match spec.manifest_source() {
        Some(ManifestSource::Inline(value)) => value.to_string(),
        Some(ManifestSource::Remote { .. }) => {
            let path = manifest_path(job_dir, step);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("step {step}: manifest not fetched"))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .filter(serde_json::Value::is_object)
                .with_context(|| {
                    format!("step {step}: the manifest at its URL is not a JSON object")
                })?;
            text
        }
        None => anyhow::bail!("step {step}: no manifest"),
    };
    Ok(StepRequest {
        job_id: record.job_id.clone(),
        step: step as u32,
        update_type: spec.update_type.to_string(),
        manifest,
        payloads: spec
            .files
            .iter()
            .map(|f| {
                let declared = PayloadFile {
                    name: f.name.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                    verified: None,
                };
                (declared, payload_path(job_dir, step, &f.name))
            })
            .collect(),
        job_dir: job_dir.to_path_buf(),
        cancel: CancelFlag::default(),
    })
}
