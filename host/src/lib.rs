//! otabox: an over-the-air update agent whose update types are sandboxed
//! WebAssembly components. This crate is the `otabox` command line; the
//! work is done by the crates below it, re-exported here under the module
//! names the command line, the tests and the benchmarks use.
//!
//! A job flows delta → job → step → handler → report: [`agent`] takes a
//! delta from the [`cloud`] layout, journals it as a job ([`journal`]),
//! runs each of its steps through [`step`] against a
//! [`model::UpdateHandler`] (the wasm one lives in [`runtime`]) and
//! reports through the layout. `docs/architecture.md` draws the crates and
//! walks through adding an update type, a cloud layout and a capability.
//!
//! The crates, from the bottom:
//! - `otabox-core` (`crates/core`): the domain, no wasm, no network:
//!   [`model`], [`step`], [`shadow`], [`journal`], [`outbox`], [`trust`],
//!   [`update_type`], [`host_codes`], [`durable`], [`escape`],
//!   [`failpoint`], [`clock`], [`console`];
//! - `otabox-runtime` (`crates/runtime`): the handler runtime
//!   ([`runtime`]), [`capabilities`], [`audit`], [`run_phase`];
//! - `otabox-cloud` (`crates/cloud`): the cloud layouts ([`cloud`]) and the
//!   MQTT session ([`mqtt`]), shared by the agent and the replica;
//! - `otabox-agent` (`crates/agent`): the device agent ([`agent`]) and what
//!   the device's tools share with it: [`config`], [`download`],
//!   [`local`], [`install`], [`status`];
//! - `otabox-fleet` (`crates/fleet`, only with the `fleet` feature): the
//!   reference device-state replica ([`replica`]) on SQLite;
//! - here: [`builtin`] (the first-party handlers embedded in the binary),
//!   [`demo`] (the self-contained walkthrough, `fleet` feature) and the
//!   command line (`src/main.rs`, `src/cli/`).

pub use otabox_agent as agent;
pub use otabox_agent::{config, download, install, local, status};
pub use otabox_cloud as cloud;
pub use otabox_cloud::mqtt;
pub use otabox_core::{
    clock, console, durable, escape, failpoint, host_codes, journal, model, out, outbox, outln,
    shadow, step, trust, update_type,
};
#[cfg(feature = "fleet")]
pub use otabox_fleet as replica;
pub use otabox_runtime as runtime;
pub use otabox_runtime::{audit, capabilities, run_phase};

#[cfg(feature = "fleet")]
pub mod demo;

/// The first-party handlers built into this binary, packaged by the build.
pub mod builtin {
    /// The `file` handler component.
    pub const FILE_WASM: &[u8] =
        include_bytes!(concat!(env!("OTABOX_BUILT_HANDLERS"), "/file.wasm"));
    /// The `file` handler's capability manifest, pinned to [`FILE_WASM`].
    pub const FILE_TOML: &str = include_str!(concat!(env!("OTABOX_BUILT_HANDLERS"), "/file.toml"));
}
