//! otabox: an over-the-air update agent whose update types are sandboxed
//! WebAssembly components.
//!
//! Modules, one per concern: [`config`] (device.toml), [`cloud`] (the
//! cloud layouts: topics and documents), [`capabilities`]
//! (what a handler may do), [`runtime`] (loading and calling handlers),
//! [`audit`] (declared vs real imports), [`console`] (the command line's
//! stdout and log colours), [`trust`] (payload verification),
//! [`workflow`] (a step's lifecycle), [`durable`] (crash-safe writes),
//! [`demo`] (the self-contained walkthrough).

pub mod agent;
pub mod audit;
pub mod capabilities;
pub mod clock;
pub mod cloud;
pub mod config;
pub mod console;
pub mod demo;
pub mod download;
pub mod durable;
pub mod failpoint;
pub mod install;
pub mod journal;
pub mod local;
pub mod mqtt;
pub mod outbox;
pub mod replica;
pub mod runtime;
pub mod shadow;
pub mod status;
pub mod trust;
pub mod tryout;
pub mod workflow;

/// The first-party handlers built into this binary, packaged by the build.
pub mod builtin {
    /// The `file` handler component.
    pub const FILE_WASM: &[u8] =
        include_bytes!(concat!(env!("OTABOX_BUILT_HANDLERS"), "/file.wasm"));
    /// The `file` handler's capability manifest, pinned to [`FILE_WASM`].
    pub const FILE_TOML: &str = include_str!(concat!(env!("OTABOX_BUILT_HANDLERS"), "/file.toml"));
    /// Directory of the packaged handlers of this target directory: the
    /// embedded ones, and the other handlers and the test guests once the
    /// tests were built (by the `otabox-test-guests` dev-dependency).
    pub const BUILT_DIR: &str = env!("OTABOX_BUILT_HANDLERS");
}
