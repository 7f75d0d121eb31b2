//! The [`Handler`] trait and the glue that exports it.

use std::marker::PhantomData;

use crate::__bindings::exports::otabox::handler::handler::Guest;
use crate::__bindings::otabox::handler::types::{
    Description, InstalledItem, Outcome, Plan, Status, StepContext,
};
use crate::job::parse_config;
use crate::{CONTRACT_VERSION, FromJson, Job, StatusExt, code};

/// One kind of update, implemented as lifecycle calls.
///
/// The handler declares its manifest and device-config types; the SDK
/// parses both before every call that gets a [`Job`] (an error fails the
/// call with [`code::INVALID_MANIFEST`] or [`code::INVALID_CONFIG`]) and
/// before `inventory` (the config). A call that returns `Err(status)`
/// fails with that status, so `?` works throughout.
///
/// Each call runs in a fresh instance of the component: keep state that must
/// survive between calls in [`crate::checkpoint`], never in statics. Defaults
/// describe a handler with nothing to fetch, nothing to back up and no
/// rollback.
pub trait Handler {
    /// The step manifest (`()`: the handler reads none).
    type Manifest: FromJson;
    /// The handler's device configuration (`()`: it reads none).
    type Config: FromJson;

    /// What this handler is and which update types it serves. The SDK
    /// sets `contract` to [`CONTRACT_VERSION`].
    fn describe() -> Description;

    /// Checks the parsed manifest against the config and the step (a
    /// declared payload, a compatible device) before every call that gets
    /// a [`Job`]. Default: nothing more to check.
    fn check(_job: &Job<Self>) -> Result<(), Status> {
        Ok(())
    }

    /// Checks the manifest before anything is fetched; returns the plan.
    /// Must not change the system.
    fn validate(job: &Job<Self>) -> Result<Plan, Status>;

    /// Whether the step is already installed. Default: never.
    fn is_installed(_job: &Job<Self>) -> Result<bool, Status> {
        Ok(false)
    }

    /// Handler-specific fetching. Default: nothing to fetch.
    fn download(_job: &Job<Self>) -> Result<Outcome, Status> {
        Ok(Outcome::Success)
    }

    /// Records what rollback needs. Default: nothing recorded.
    fn backup(_job: &Job<Self>) -> Result<Outcome, Status> {
        Ok(Outcome::Skipped("handler keeps no backup".into()))
    }

    /// Puts the new version in place. Default: fails, as a handler that
    /// installs nothing is a mistake.
    fn install(_job: &Job<Self>) -> Result<Outcome, Status> {
        Err(Status::new(
            code::NOT_IMPLEMENTED,
            "install is not implemented by this handler",
        ))
    }

    /// Activates the new version. Default: nothing to activate.
    fn apply(_job: &Job<Self>) -> Result<Outcome, Status> {
        Ok(Outcome::Success)
    }

    /// Checks the new version after a reboot or restart. Default: success.
    fn verify(_job: &Job<Self>) -> Result<Outcome, Status> {
        Ok(Outcome::Success)
    }

    /// Makes the update permanent. Default: nothing to do.
    fn commit(_job: &Job<Self>) -> Result<Outcome, Status> {
        Ok(Outcome::Success)
    }

    /// Restores the backup. Default: not supported.
    fn rollback(_job: &Job<Self>) -> Result<Outcome, Status> {
        Err(Status::new(
            code::ROLLBACK_UNSUPPORTED,
            "rollback is not supported by this handler",
        ))
    }

    /// Removes temporary files; always called. Default: nothing to remove.
    fn cleanup(_job: &Job<Self>) -> Result<Outcome, Status> {
        Ok(Outcome::Success)
    }

    /// Lists what the handler manages. Default: nothing.
    ///
    /// The host also calls it when it loads the handler, to check the
    /// device config: the SDK parses it first and fails with
    /// [`code::INVALID_CONFIG`] when [`Handler::Config`] refuses it (name
    /// the key and what it accepts); the host then refuses the handler and
    /// the agent does not start.
    fn inventory(_config: &Self::Config) -> Result<Vec<InstalledItem>, Status> {
        Ok(Vec::new())
    }
}

/// Adapts a [`Handler`] to the generated bindings; used by
/// [`crate::export_handler!`].
#[doc(hidden)]
pub struct Export<H>(PhantomData<H>);

/// Runs `phase` on the parsed step; a parse error or an `Err` is `failed`.
fn run<H: Handler>(ctx: StepContext, phase: fn(&Job<H>) -> Result<Outcome, Status>) -> Outcome {
    Job::of(ctx)
        .and_then(|job| phase(&job))
        .unwrap_or_else(Outcome::Failed)
}

impl<H: Handler> Guest for Export<H> {
    fn describe() -> Description {
        Description {
            contract: CONTRACT_VERSION.into(),
            ..H::describe()
        }
    }
    fn validate(ctx: StepContext) -> Result<Plan, Status> {
        H::validate(&Job::of(ctx)?)
    }
    fn is_installed(ctx: StepContext) -> Result<bool, Status> {
        H::is_installed(&Job::of(ctx)?)
    }
    fn download(ctx: StepContext) -> Outcome {
        run(ctx, H::download)
    }
    fn backup(ctx: StepContext) -> Outcome {
        run(ctx, H::backup)
    }
    fn install(ctx: StepContext) -> Outcome {
        run(ctx, H::install)
    }
    fn apply(ctx: StepContext) -> Outcome {
        run(ctx, H::apply)
    }
    fn verify(ctx: StepContext) -> Outcome {
        run(ctx, H::verify)
    }
    fn commit(ctx: StepContext) -> Outcome {
        run(ctx, H::commit)
    }
    fn rollback(ctx: StepContext) -> Outcome {
        run(ctx, H::rollback)
    }
    fn cleanup(ctx: StepContext) -> Outcome {
        run(ctx, H::cleanup)
    }
    fn inventory(config: String) -> Result<Vec<InstalledItem>, Status> {
        H::inventory(&parse_config(&config)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{RebootBehaviour, from_json};

    /// A manifest that must name something.
    #[derive(serde::Deserialize)]
    struct Named {
        name: String,
    }

    impl FromJson for Named {
        fn parse(json: &str) -> Result<Self, String> {
            let n: Self = from_json(json, "test manifest")?;
            match n.name.is_empty() {
                true => Err("invalid test manifest: `name` is empty".into()),
                false => Ok(n),
            }
        }
    }

    /// A handler that types its contract wrongly by hand and refuses the
    /// name `other` in its check.
    struct Fake;

    impl Handler for Fake {
        type Manifest = Named;
        type Config = serde_json::Value;

        fn describe() -> Description {
            Description {
                name: "fake".into(),
                version: "1".into(),
                update_types: vec!["test/fake:1".into()],
                contract: "0.9.0".into(),
                supports_rollback: false,
                reboot: RebootBehaviour::Never,
            }
        }
        fn check(job: &Job<Self>) -> Result<(), Status> {
            match job.manifest.name.as_str() {
                "other" => Err(Status::new(30, "not for this device")),
                _ => Ok(()),
            }
        }
        fn validate(job: &Job<Self>) -> Result<Plan, Status> {
            Ok(Plan::new(job.manifest.name.clone()))
        }
        fn apply(_job: &Job<Self>) -> Result<Outcome, Status> {
            Err(Status::new(31, "apply failed"))
        }
    }

    type Fakes = Export<Fake>;

    fn ctx(manifest: &str, config: &str) -> StepContext {
        StepContext {
            job_id: "j".into(),
            step: 0,
            update_type: "test/fake:1".into(),
            manifest: manifest.into(),
            payloads: Vec::new(),
            config: config.into(),
            installed_criteria: None,
        }
    }

    fn failure(outcome: Outcome) -> (u32, String) {
        match outcome {
            Outcome::Failed(s) => (s.result_code, s.message),
            _ => (0, String::new()),
        }
    }

    #[test]
    fn the_sdk_writes_the_contract_version() {
        assert_eq!(Fakes::describe().contract, CONTRACT_VERSION);
        assert_eq!(Fakes::describe().name, "fake");
    }

    #[test]
    fn manifest_and_config_are_parsed_with_the_standard_codes() {
        let plan = Fakes::validate(ctx(r#"{"name":"a"}"#, "{}")).map(|p| p.installed_criteria);
        assert_eq!(plan.ok().as_deref(), Some("a"));
        let bad = |manifest: &str, config: &str| {
            Fakes::validate(ctx(manifest, config))
                .err()
                .map(|s| (s.result_code, s.message))
        };
        let (code, message) = bad("not json", "{}").unwrap_or_default();
        assert_eq!(code, code::INVALID_MANIFEST);
        assert!(message.starts_with("invalid test manifest: "), "{message}");
        assert_eq!(
            bad(r#"{"name":""}"#, "{}"),
            Some((
                code::INVALID_MANIFEST,
                "invalid test manifest: `name` is empty".into()
            ))
        );
        assert_eq!(
            bad(r#"{"name":"a"}"#, "{").map(|(c, _)| c),
            Some(code::INVALID_CONFIG)
        );
        assert_eq!(
            bad(r#"{"name":"other"}"#, "{}"),
            Some((30, "not for this device".into()))
        );
        let inventory = Fakes::inventory("[".into()).err().map(|s| s.result_code);
        assert_eq!(inventory, Some(code::INVALID_CONFIG));
    }

    #[test]
    fn phases_fail_with_their_error_and_defaults_keep_their_codes() {
        assert_eq!(
            failure(Fakes::apply(ctx(r#"{"name":"a"}"#, "{}"))),
            (31, "apply failed".into())
        );
        assert_eq!(
            failure(Fakes::install(ctx(r#"{"name":"a"}"#, "{}"))).0,
            code::NOT_IMPLEMENTED
        );
        assert_eq!(
            failure(Fakes::rollback(ctx(r#"{"name":"a"}"#, "{}"))).0,
            code::ROLLBACK_UNSUPPORTED
        );
        assert_eq!(
            failure(Fakes::cleanup(ctx("{}", "{}"))).0,
            code::INVALID_MANIFEST
        );
        assert!(matches!(
            Fakes::commit(ctx(r#"{"name":"a"}"#, "{}")),
            Outcome::Success
        ));
    }
}
