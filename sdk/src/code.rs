//! Result codes the SDK returns on a handler's behalf.
//!
//! A status's `result-code` is the handler's own number; the SDK keeps
//! 1..=19 for the failures it raises itself (listed here), so a handler
//! numbers its own codes from [`FIRST_HANDLER_CODE`] and lists them in its
//! `status.rs`. 0 is never a failure.

/// The handler does not implement `install` (the trait's default).
pub const NOT_IMPLEMENTED: u32 = 1;
/// The handler does not support `rollback` (the trait's default).
pub const ROLLBACK_UNSUPPORTED: u32 = 2;
/// The step's manifest does not parse or fails the handler's checks.
pub const INVALID_MANIFEST: u32 = 10;
/// The handler's device configuration does not parse or fails its checks.
/// At load the host refuses a handler whose `inventory` fails with it.
pub const INVALID_CONFIG: u32 = 11;
/// A payload of the step cannot be opened (not declared, not yet verified).
pub const PAYLOAD_UNAVAILABLE: u32 = 12;
/// The first code a handler numbers its own failures from.
pub const FIRST_HANDLER_CODE: u32 = 20;
