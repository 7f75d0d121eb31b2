//! Host functions of the baseline `otabox:handler` imports, one module per
//! interface: [`context`] (logging, progress, cancellation), [`payloads`]
//! (the step's verified files) and [`checkpoint`] (state kept across
//! calls). They grant nothing; the imports a capability grants live with
//! their capability (`capabilities::process::host`,
//! `capabilities::devices::host`, `capabilities::network`). Each checks
//! its arguments against the call's scope before any side effect; a
//! refusal is a `host-error` returned to the guest.

pub mod checkpoint;
pub mod context;
pub mod payloads;

use super::bindings::otabox::handler::types;
use super::state::HostState;

impl types::Host for HostState {}
