//! Write otabox update handlers in Rust.
//!
//! A handler is a type that implements [`Handler`]; [`export_handler!`] turns
//! it into the WebAssembly component the otabox host loads. The handler
//! names its manifest and device-config types ([`FromJson`]); the SDK parses
//! them before each call, with the standard result codes ([`code`]). Every
//! lifecycle call but `describe` and `validate` has a default, so a small
//! handler implements only what it needs:
//!
//! ```no_run
//! use otabox_sdk::prelude::*;
//!
//! struct Hello;
//!
//! impl Handler for Hello {
//!     type Manifest = ();
//!     type Config = ();
//!
//!     fn describe() -> Description {
//!         Description::new("hello", env!("CARGO_PKG_VERSION"), ["acme/hello:1"])
//!     }
//!     fn validate(job: &Job<Self>) -> Result<Plan, Status> {
//!         Ok(Plan::new(format!("hello-{}", job.step.job_id())))
//!     }
//!     fn install(_job: &Job<Self>) -> Result<Outcome, Status> {
//!         info!("hello from a sandbox");
//!         Ok(Outcome::Success)
//!     }
//! }
//!
//! export_handler!(Hello);
//! ```
//!
//! Build it with `cargo build --target wasm32-wasip2 --release`; the `.wasm`
//! in `target/wasm32-wasip2/release/` is the component. Ship it with a
//! capability manifest (`<name>.toml`) that declares what it may touch.
//!
//! The helpers wrap the host imports: [`log`] and the [`info!`]-style macros,
//! [`progress`], [`cancel_requested`], [`Payload`] (read-only verified
//! payloads), [`checkpoint`] (durable per-step key/value store) and
//! [`Command`] (run a declared program; [`Output::failure`] turns a failed
//! run into a [`Status`]), and [`devices`] (whole images to declared block
//! devices or slot files). File access uses `std::fs` on the paths the
//! manifest declares.
//!
//! The crate carries its contract: `wit/handler.wit`, the WIT package
//! `otabox:handler` at [`CONTRACT_VERSION`], which other languages generate
//! their bindings from.

mod command;
mod context;
mod handler;
mod job;
mod json;
mod outcome;
mod payload;
mod step;

/// The Rust examples of `docs/authoring.md`, compiled as doctests (only
/// in this repository: the guide is not part of the published crate).
#[cfg(doctest)]
#[doc = include_str!("../../docs/authoring.md")]
mod authoring_guide {}

pub mod checkpoint;
pub mod code;
pub mod devices;
pub mod fs;

#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "update-handler",
        pub_export_macro: true,
        export_macro_name: "__export_update_handler",
        default_bindings_module: "::otabox_sdk::__bindings",
    });
}

pub use command::{Command, Output, tail};
pub use context::{cancel_requested, log, progress};
pub use handler::{Export, Handler};
pub use job::Job;
pub use json::{FromJson, from_json};
pub use outcome::{Facility, StatusExt};
pub use payload::{Payload, PayloadReader};
pub use step::Step;

pub use __bindings::otabox::handler::types::{
    Description, ExtendedCode, HostError, InstalledItem, LogLevel, Outcome, PayloadInfo, Phase,
    Plan, RebootBehaviour, RebootExpectation, RebootMode, Status,
};

/// The version of the WIT contract this SDK implements: the version of the
/// package in `wit/handler.wit` (a test holds them equal), which names the
/// exported interface. The SDK writes it into every `describe`.
pub const CONTRACT_VERSION: &str = "1.1.0";

/// Everything a handler usually needs, for `use otabox_sdk::prelude::*`.
pub mod prelude {
    pub use crate::{
        Command, Description, Facility, FromJson, Handler, HostError, InstalledItem, Job, LogLevel,
        Outcome, Payload, Phase, Plan, RebootBehaviour, RebootExpectation, RebootMode, Status,
        StatusExt, Step, cancel_requested, checkpoint, code, debug, error, export_handler,
        from_json, info, progress, warn,
    };
}

/// Exports a [`Handler`] implementation as the component's `handler`
/// interface. Use it once per crate, at the top level.
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        #[doc(hidden)]
        type __OtaboxExportedHandler = $crate::Export<$handler>;
        $crate::__bindings::__export_update_handler!(__OtaboxExportedHandler with_types_in $crate::__bindings);
    };
}

/// Logs at `info` level with `format!` arguments.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log($crate::LogLevel::Info, &format!($($arg)*)) };
}

/// Logs at `debug` level with `format!` arguments.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log($crate::LogLevel::Debug, &format!($($arg)*)) };
}

/// Logs at `warn` level with `format!` arguments.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log($crate::LogLevel::Warn, &format!($($arg)*)) };
}

/// Logs at `error` level with `format!` arguments.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log($crate::LogLevel::Error, &format!($($arg)*)) };
}

#[cfg(test)]
mod tests {
    use super::CONTRACT_VERSION;

    /// The contract is written once: the WIT package's version, which the
    /// bindings export under; the constant must say the same.
    #[test]
    fn the_contract_version_is_the_wit_package_version() {
        let wit = include_str!("../wit/handler.wit");
        let package = wit
            .lines()
            .find_map(|l| l.trim().strip_prefix("package otabox:handler@"))
            .and_then(|rest| rest.strip_suffix(';'));
        assert_eq!(package, Some(CONTRACT_VERSION));
    }
}
