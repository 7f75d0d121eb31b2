//! Result codes of the failures the host itself detects, rather than a
//! handler: a step's status carries [`HOST_FAILURE`] as its result code
//! and one of these as the component value of its extended code.

/// Result code of failures the host itself detects (facility 0).
pub const HOST_FAILURE: u32 = 0x8000_0000;

/// A handler call trapped, ran out of time or memory.
pub const HANDLER_FAULT: u32 = 1;
/// A payload file does not match its declared size or sha256.
pub const PAYLOAD_MISMATCH: u32 = 2;
/// The plan names a payload the step does not have.
pub const UNKNOWN_PAYLOAD: u32 = 3;
/// The journal could not record a transition.
pub const JOURNAL: u32 = 4;
/// No handler serves the step's update type.
pub const NO_HANDLER: u32 = 5;
/// A payload could not be fetched.
pub const DOWNLOAD: u32 = 6;
/// The agent stopped repeatedly during the job (loop breaker).
pub const LOOP_BREAKER: u32 = 7;
/// A payload URL (or its credentials) expired: the cloud should issue a
/// new one.
pub const URL_EXPIRED: u32 = 8;
/// Not enough space for the payloads.
pub const DISK_FULL: u32 = 9;
/// The handler's wasm changed while the job was in progress.
pub const HANDLER_CHANGED: u32 = 10;
