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

/// Cuts `text` to at most `max` bytes on a character boundary.
pub(crate) fn truncate_utf8(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}
