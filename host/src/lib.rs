//! otabox: an over-the-air update agent whose update types are sandboxed
//! WebAssembly components.
//!
//! A job flows delta → job → step → handler → report: [`agent`] takes a
//! delta from the [`cloud`] layout, journals it as a job ([`journal`]),
//! runs each of its steps through [`step`] against a
//! [`model::UpdateHandler`] (the wasm one lives in [`runtime`]) and
//! reports through the layout. `docs/architecture.md` draws the map and
//! walks through adding an update type, a cloud layout and a capability.
//!
//! Modules, one per concern:
//! - the agent:
//!   - [`agent`]: the daemon: the session, jobs one at a time, recovery
//!     after a restart, reports;
//!   - [`step`]: one step's lifecycle, phase by phase;
//!   - [`journal`]: the crash-safe job journal;
//!   - [`outbox`]: durable, ordered publishing;
//!   - [`mqtt`]: the broker connection and its diagnosis;
//!   - [`cloud`]: the cloud layouts (topics and documents), one module per
//!     layout;
//!   - [`shadow`]: the desired and reported state;
//!   - [`update_type`]: the type joining a step to its handler;
//!   - [`host_codes`]: result codes of failures the host detects;
//!   - [`download`]: payload fetching;
//!   - [`trust`]: payload verification and signed manifests;
//!   - [`durable`]: crash-safe file writes;
//!   - [`failpoint`]: fault injection for the crash tests;
//!   - [`clock`]: wall-clock time;
//! - the handler runtime:
//!   - [`model`]: the values and the [`model::UpdateHandler`] trait between
//!     the agent and its handlers;
//!   - [`capabilities`]: what a handler may do, one module per capability;
//!   - [`runtime`]: loading and calling handlers, the wasm implementation;
//!   - [`audit`]: declared vs granted vs real imports of a handler;
//!   - [`run_phase`]: one phase of a handler from the command line;
//!   - [`builtin`]: the first-party handlers embedded in the binary;
//! - the device's tools:
//!   - [`config`]: the device configuration, `device.toml`;
//!   - [`local`]: what the tools share with a running agent;
//!   - [`install`]: a local deployment;
//!   - [`status`]: what the agent is doing;
//!   - [`console`]: stdout and log colours;
//! - the cloud side and the walkthrough:
//!   - [`replica`]: the reference device-state replica;
//!   - [`demo`]: the self-contained demo.

pub mod agent;
pub mod audit;
pub mod capabilities;
pub mod clock;
pub mod cloud;
pub mod config;
pub mod console;
#[cfg(feature = "fleet")]
pub mod demo;
pub mod download;
pub mod durable;
pub mod escape;
pub mod failpoint;
pub mod host_codes;
pub mod install;
pub mod journal;
pub mod local;
pub mod model;
pub mod mqtt;
pub mod outbox;
#[cfg(feature = "fleet")]
pub mod replica;
pub mod run_phase;
pub mod runtime;
pub mod shadow;
pub mod status;
pub mod step;
pub mod trust;
pub mod update_type;

/// The first-party handlers built into this binary, packaged by the build.
pub mod builtin {
    /// The `file` handler component.
    pub const FILE_WASM: &[u8] =
        include_bytes!(concat!(env!("OTABOX_BUILT_HANDLERS"), "/file.wasm"));
    /// The `file` handler's capability manifest, pinned to [`FILE_WASM`].
    pub const FILE_TOML: &str = include_str!(concat!(env!("OTABOX_BUILT_HANDLERS"), "/file.toml"));
}
