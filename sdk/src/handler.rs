//! The [`Handler`] trait and the glue that exports it.

use std::marker::PhantomData;

use crate::__bindings::exports::otabox::handler::handler::Guest;
use crate::__bindings::otabox::handler::types::{
    Description, InstalledItem, Outcome, Plan, Status, StepContext,
};
use crate::{StatusExt, Step};

/// One kind of update, implemented as lifecycle calls.
///
/// Each call runs in a fresh instance of the component: keep state that must
/// survive between calls in [`crate::checkpoint`], never in statics. Defaults
/// describe a handler with nothing to fetch, nothing to back up and no
/// rollback.
pub trait Handler {
    /// What this handler is and which update types it serves.
    fn describe() -> Description;

    /// Parses and checks the manifest before anything is fetched; returns
    /// the plan. Must not change the system.
    fn validate(step: &Step) -> Result<Plan, Status>;

    /// Whether the step is already installed. Default: never.
    fn is_installed(_step: &Step) -> Result<bool, Status> {
        Ok(false)
    }

    /// Handler-specific fetching. Default: nothing to fetch.
    fn download(_step: &Step) -> Outcome {
        Outcome::Success
    }

    /// Records what rollback needs. Default: nothing recorded.
    fn backup(_step: &Step) -> Outcome {
        Outcome::Skipped("handler keeps no backup".into())
    }

    /// Puts the new version in place. Default: fails, as a handler that
    /// installs nothing is a mistake.
    fn install(_step: &Step) -> Outcome {
        Outcome::Failed(Status::new(1, "install is not implemented by this handler"))
    }

    /// Activates the new version. Default: nothing to activate.
    fn apply(_step: &Step) -> Outcome {
        Outcome::Success
    }

    /// Checks the new version after a reboot or restart. Default: success.
    fn verify(_step: &Step) -> Outcome {
        Outcome::Success
    }

    /// Makes the update permanent. Default: nothing to do.
    fn commit(_step: &Step) -> Outcome {
        Outcome::Success
    }

    /// Restores the backup. Default: not supported.
    fn rollback(_step: &Step) -> Outcome {
        Outcome::Failed(Status::new(2, "rollback is not supported by this handler"))
    }

    /// Removes temporary files; always called. Default: nothing to remove.
    fn cleanup(_step: &Step) -> Outcome {
        Outcome::Success
    }

    /// Lists what the handler manages. Default: nothing.
    ///
    /// The host also calls it when it loads the handler, to check the
    /// device `config`: parse it first and fail with result code 11 when it
    /// is invalid (naming the key and what it accepts); the host then
    /// refuses the handler and the agent does not start.
    fn inventory(_config: &str) -> Result<Vec<InstalledItem>, Status> {
        Ok(Vec::new())
    }
}

/// Adapts a [`Handler`] to the generated bindings; used by
/// [`crate::export_handler!`].
#[doc(hidden)]
pub struct Export<H>(PhantomData<H>);

impl<H: Handler> Guest for Export<H> {
    fn describe() -> Description {
        H::describe()
    }
    fn validate(ctx: StepContext) -> Result<Plan, Status> {
        H::validate(&Step::new(ctx))
    }
    fn is_installed(ctx: StepContext) -> Result<bool, Status> {
        H::is_installed(&Step::new(ctx))
    }
    fn download(ctx: StepContext) -> Outcome {
        H::download(&Step::new(ctx))
    }
    fn backup(ctx: StepContext) -> Outcome {
        H::backup(&Step::new(ctx))
    }
    fn install(ctx: StepContext) -> Outcome {
        H::install(&Step::new(ctx))
    }
    fn apply(ctx: StepContext) -> Outcome {
        H::apply(&Step::new(ctx))
    }
    fn verify(ctx: StepContext) -> Outcome {
        H::verify(&Step::new(ctx))
    }
    fn commit(ctx: StepContext) -> Outcome {
        H::commit(&Step::new(ctx))
    }
    fn rollback(ctx: StepContext) -> Outcome {
        H::rollback(&Step::new(ctx))
    }
    fn cleanup(ctx: StepContext) -> Outcome {
        H::cleanup(&Step::new(ctx))
    }
    fn inventory(config: String) -> Result<Vec<InstalledItem>, Status> {
        H::inventory(&config)
    }
}
