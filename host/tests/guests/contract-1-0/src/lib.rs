//! A handler built against the frozen `otabox:handler@1.0.0` contract
//! (`wit/handler.wit` here is a copy of that release), with wit-bindgen
//! directly rather than the SDK, which follows the newest contract. The
//! host's tests load it to prove that a 1.x host serves 1.0 handlers.

wit_bindgen::generate!({
    path: "wit",
    world: "update-handler",
});

use exports::otabox::handler::handler::Guest;
use otabox::handler::types::{
    Description, ExtendedCode, InstalledItem, LogLevel, Outcome, Plan, RebootBehaviour,
    RebootExpectation, Status, StepContext,
};

struct Legacy;

impl Guest for Legacy {
    fn describe() -> Description {
        Description {
            name: "contract-1-0".into(),
            version: "1.0.0".into(),
            update_types: vec!["otabox-test/contract-1-0:1".into()],
            contract: "1.0.0".into(),
            supports_rollback: false,
            reboot: RebootBehaviour::Never,
        }
    }

    fn validate(ctx: StepContext) -> Result<Plan, Status> {
        Ok(Plan {
            installed_criteria: format!("legacy-{}", ctx.job_id),
            payloads: Vec::new(),
            reboot: RebootExpectation::None,
            warnings: Vec::new(),
            details: Vec::new(),
        })
    }

    fn is_installed(_ctx: StepContext) -> Result<bool, Status> {
        Ok(otabox::handler::checkpoint::get("installed")
            .map_err(|e| failure(&format!("{e:?}")))?
            .is_some())
    }

    fn download(_ctx: StepContext) -> Outcome {
        Outcome::Success
    }

    fn backup(_ctx: StepContext) -> Outcome {
        Outcome::Skipped("nothing to back up".into())
    }

    fn install(ctx: StepContext) -> Outcome {
        otabox::handler::context::log(LogLevel::Info, &format!("installing {}", ctx.job_id));
        match otabox::handler::checkpoint::set("installed", b"yes") {
            Ok(()) => Outcome::Success,
            Err(e) => Outcome::Failed(failure(&format!("{e:?}"))),
        }
    }

    fn apply(_ctx: StepContext) -> Outcome {
        Outcome::Success
    }

    fn verify(_ctx: StepContext) -> Outcome {
        Outcome::Success
    }

    fn commit(_ctx: StepContext) -> Outcome {
        Outcome::Success
    }

    fn rollback(_ctx: StepContext) -> Outcome {
        Outcome::Failed(failure("no rollback"))
    }

    fn cleanup(_ctx: StepContext) -> Outcome {
        Outcome::Success
    }

    fn inventory(_config: String) -> Result<Vec<InstalledItem>, Status> {
        Ok(Vec::new())
    }
}

fn failure(message: &str) -> Status {
    Status {
        result_code: 1,
        extended_code: ExtendedCode {
            facility: 1,
            component: 0,
            value: 0,
        },
        message: message.into(),
        details: Vec::new(),
    }
}

export!(Legacy);
