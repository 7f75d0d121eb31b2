//! Host functions of the `otabox:handler` imports. Each checks its
//! arguments against the handler's grants and the call's scope before any
//! side effect; a refusal is a `host-error` returned to the guest.

pub mod checkpoint;
pub mod confine;
pub mod context;
pub mod devices;
pub mod payloads;
pub mod process;

use super::bindings::otabox::handler::types;
use super::state::HostState;

impl types::Host for HostState {}
