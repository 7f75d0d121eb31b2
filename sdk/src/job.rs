//! [`Job`]: a step with the handler's manifest and config already parsed.

use crate::__bindings::otabox::handler::types::{Status, StepContext};
use crate::json::FromJson;
use crate::{Handler, StatusExt, Step, code};

/// What a lifecycle call of handler `H` works on: the step as the host sent
/// it, its manifest parsed as [`Handler::Manifest`] and the device config
/// as [`Handler::Config`], both checked by [`Handler::check`].
pub struct Job<H: Handler + ?Sized> {
    /// The step: job id, payloads, raw manifest and config.
    pub step: Step,
    /// The parsed manifest.
    pub manifest: H::Manifest,
    /// The parsed device configuration of the handler.
    pub config: H::Config,
}

impl<H: Handler + ?Sized> Job<H> {
    /// Parses the step's manifest (failing with
    /// [`code::INVALID_MANIFEST`]) and config ([`code::INVALID_CONFIG`]),
    /// then runs [`Handler::check`].
    pub fn of(ctx: StepContext) -> Result<Self, Status> {
        let step = Step::new(ctx);
        let manifest = H::Manifest::parse(step.manifest_json())
            .map_err(|e| Status::new(code::INVALID_MANIFEST, e))?;
        let config = parse_config::<H::Config>(&step.raw().config)?;
        let job = Self {
            step,
            manifest,
            config,
        };
        H::check(&job)?;
        Ok(job)
    }
}

/// The device config parsed as `C`, failing with [`code::INVALID_CONFIG`].
pub(crate) fn parse_config<C: FromJson>(json: &str) -> Result<C, Status> {
    C::parse(json).map_err(|e| Status::new(code::INVALID_CONFIG, e))
}
