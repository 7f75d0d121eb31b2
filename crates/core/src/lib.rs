//! otabox's domain, with no wasm, no network and no database: what the
//! cloud asks and the device reports, how a job survives a crash, one step
//! of a job, and the model between the agent and its update handlers.
//!
//! - [`model`]: the values and the [`model::UpdateHandler`] trait between
//!   the agent and its handlers (the wasm implementation is in
//!   `otabox-runtime`);
//! - [`step`]: one step's lifecycle, phase by phase;
//! - [`shadow`]: the desired and reported state, parsed strictly;
//! - [`journal`]: the crash-safe job journal;
//! - [`outbox`]: durable, ordered publishing;
//! - [`trust`]: payload verification and signed manifests;
//! - [`update_type`]: the type joining a step to its handler;
//! - [`host_codes`]: result codes of failures the host detects;
//! - [`durable`]: crash-safe file writes;
//! - [`escape`]: text from outside made safe to log and report;
//! - [`failpoint`]: fault injection for the crash tests;
//! - [`clock`]: wall-clock time;
//! - [`console`]: stdout and log colours of the command line.

pub mod clock;
pub mod console;
pub mod durable;
pub mod escape;
pub mod failpoint;
pub mod host_codes;
pub mod journal;
pub mod model;
pub mod outbox;
pub mod shadow;
pub mod step;
pub mod trust;
pub mod update_type;
