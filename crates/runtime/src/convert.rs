//! The edge between the WIT bindings and the domain model: every value a
//! guest returns becomes a [`otabox_core::model`] value here, and every context
//! it is given becomes a WIT value, so nothing past the runtime sees the
//! bindings.

use super::bindings as wit;
use otabox_core::model;

impl From<model::Phase> for wit::Phase {
    fn from(phase: model::Phase) -> Self {
        match phase {
            model::Phase::Describe => wit::Phase::Describe,
            model::Phase::Validate => wit::Phase::Validate,
            model::Phase::IsInstalled => wit::Phase::IsInstalled,
            model::Phase::Download => wit::Phase::Download,
            model::Phase::Backup => wit::Phase::Backup,
            model::Phase::Install => wit::Phase::Install,
            model::Phase::Apply => wit::Phase::Apply,
            model::Phase::Verify => wit::Phase::Verify,
            model::Phase::Commit => wit::Phase::Commit,
            model::Phase::Rollback => wit::Phase::Rollback,
            model::Phase::Cleanup => wit::Phase::Cleanup,
            model::Phase::Inventory => wit::Phase::Inventory,
        }
    }
}

impl From<wit::Phase> for model::Phase {
    fn from(phase: wit::Phase) -> Self {
        match phase {
            wit::Phase::Describe => model::Phase::Describe,
            wit::Phase::Validate => model::Phase::Validate,
            wit::Phase::IsInstalled => model::Phase::IsInstalled,
            wit::Phase::Download => model::Phase::Download,
            wit::Phase::Backup => model::Phase::Backup,
            wit::Phase::Install => model::Phase::Install,
            wit::Phase::Apply => model::Phase::Apply,
            wit::Phase::Verify => model::Phase::Verify,
            wit::Phase::Commit => model::Phase::Commit,
            wit::Phase::Rollback => model::Phase::Rollback,
            wit::Phase::Cleanup => model::Phase::Cleanup,
            wit::Phase::Inventory => model::Phase::Inventory,
        }
    }
}

impl From<wit::RebootMode> for model::RebootMode {
    fn from(mode: wit::RebootMode) -> Self {
        match mode {
            wit::RebootMode::Immediate => model::RebootMode::Immediate,
            wit::RebootMode::Deferred => model::RebootMode::Deferred,
        }
    }
}

impl From<wit::ExtendedCode> for model::ExtendedCode {
    fn from(code: wit::ExtendedCode) -> Self {
        model::ExtendedCode {
            facility: code.facility,
            component: code.component,
            value: code.value,
        }
    }
}

impl From<wit::Status> for model::Status {
    fn from(status: wit::Status) -> Self {
        model::Status {
            result_code: status.result_code,
            extended_code: status.extended_code.into(),
            message: status.message,
            details: status.details,
        }
    }
}

impl From<wit::Outcome> for model::Outcome {
    fn from(outcome: wit::Outcome) -> Self {
        match outcome {
            wit::Outcome::Success => model::Outcome::Success,
            wit::Outcome::Skipped(why) => model::Outcome::Skipped(why),
            wit::Outcome::RebootRequired(mode) => model::Outcome::RebootRequired(mode.into()),
            wit::Outcome::RestartAgent => model::Outcome::RestartAgent,
            wit::Outcome::Failed(status) => model::Outcome::Failed(status.into()),
            wit::Outcome::Cancelled => model::Outcome::Cancelled,
        }
    }
}

impl From<wit::RebootBehaviour> for model::RebootBehaviour {
    fn from(reboot: wit::RebootBehaviour) -> Self {
        match reboot {
            wit::RebootBehaviour::Never => model::RebootBehaviour::Never,
            wit::RebootBehaviour::Sometimes => model::RebootBehaviour::Sometimes,
            wit::RebootBehaviour::Always => model::RebootBehaviour::Always,
        }
    }
}

impl From<wit::Description> for model::Description {
    fn from(d: wit::Description) -> Self {
        model::Description {
            name: d.name,
            version: d.version,
            update_types: d.update_types,
            contract: d.contract,
            supports_rollback: d.supports_rollback,
            reboot: d.reboot.into(),
        }
    }
}

impl From<wit::RebootExpectation> for model::RebootExpectation {
    fn from(reboot: wit::RebootExpectation) -> Self {
        match reboot {
            wit::RebootExpectation::None => model::RebootExpectation::None,
            wit::RebootExpectation::Possible => model::RebootExpectation::Possible,
            wit::RebootExpectation::Required => model::RebootExpectation::Required,
        }
    }
}

impl From<wit::Plan> for model::Plan {
    fn from(p: wit::Plan) -> Self {
        model::Plan {
            installed_criteria: p.installed_criteria,
            payloads: p.payloads,
            reboot: p.reboot.into(),
            warnings: p.warnings,
            details: p.details,
        }
    }
}

impl From<wit::InstalledItem> for model::InstalledItem {
    fn from(i: wit::InstalledItem) -> Self {
        model::InstalledItem {
            name: i.name,
            version: i.version,
            update_type: i.update_type,
            details: i.details,
        }
    }
}

impl From<&model::PayloadInfo> for wit::PayloadInfo {
    fn from(p: &model::PayloadInfo) -> Self {
        wit::PayloadInfo {
            name: p.name.clone(),
            size: p.size,
            sha256: p.sha256.clone(),
        }
    }
}

impl From<&model::StepContext> for wit::StepContext {
    fn from(ctx: &model::StepContext) -> Self {
        wit::StepContext {
            job_id: ctx.job_id.clone(),
            step: ctx.step,
            update_type: ctx.update_type.clone(),
            manifest: ctx.manifest.clone(),
            payloads: ctx.payloads.iter().map(Into::into).collect(),
            config: ctx.config.clone(),
            installed_criteria: ctx.installed_criteria.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_crosses_the_edge_and_back() {
        for phase in model::Phase::ALL {
            let there = wit::Phase::from(phase);
            assert_eq!(model::Phase::from(there), phase);
        }
    }
}
