//! [`Step`]: the context of one lifecycle call, with typed accessors.

use serde::de::DeserializeOwned;

use crate::__bindings::otabox::handler::types::{PayloadInfo, Status, StepContext};
use crate::{Payload, StatusExt, code};

/// The step a lifecycle call works on: job id, manifest, payloads, config.
#[derive(Debug, Clone)]
pub struct Step {
    ctx: StepContext,
}

impl Step {
    pub(crate) fn new(ctx: StepContext) -> Self {
        Self { ctx }
    }

    /// The deployment/job id.
    pub fn job_id(&self) -> &str {
        &self.ctx.job_id
    }

    /// Index of the step within the job.
    pub fn index(&self) -> u32 {
        self.ctx.step
    }

    /// The update type the step asked for (possibly an alias).
    pub fn update_type(&self) -> &str {
        &self.ctx.update_type
    }

    /// The manifest as raw JSON text.
    pub fn manifest_json(&self) -> &str {
        &self.ctx.manifest
    }

    /// The manifest parsed as `T`, for a manifest whose shape depends on
    /// the call ([`crate::Handler::Manifest`] parses it once for all). A
    /// parse error is [`code::INVALID_MANIFEST`] naming the problem.
    pub fn manifest<T: DeserializeOwned>(&self) -> Result<T, Status> {
        serde_json::from_str(&self.ctx.manifest)
            .map_err(|e| Status::new(code::INVALID_MANIFEST, format!("invalid manifest: {e}")))
    }

    /// The handler's device configuration parsed as `T`
    /// ([`code::INVALID_CONFIG`] on error). The host passes `{}` when the device config has none.
    pub fn config<T: DeserializeOwned>(&self) -> Result<T, Status> {
        serde_json::from_str(&self.ctx.config)
            .map_err(|e| Status::new(code::INVALID_CONFIG, format!("invalid handler config: {e}")))
    }

    /// The payload files declared for this step.
    pub fn payloads(&self) -> &[PayloadInfo] {
        &self.ctx.payloads
    }

    /// Opens a verified payload of this step (available after download);
    /// [`code::PAYLOAD_UNAVAILABLE`] when the host refuses.
    pub fn open_payload(&self, name: &str) -> Result<Payload, Status> {
        Payload::open(name)
            .map_err(|e| Status::new(code::PAYLOAD_UNAVAILABLE, format!("payload {name}: {e}")))
    }

    /// The installed criteria from `validate`, once known.
    pub fn installed_criteria(&self) -> Option<&str> {
        self.ctx.installed_criteria.as_deref()
    }

    /// The raw context as the host sent it.
    pub fn raw(&self) -> &StepContext {
        &self.ctx
    }
}
