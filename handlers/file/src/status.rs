//! Result codes of the file handler. The SDK's own are in
//! [`otabox_sdk::code`] (10: invalid manifest, also a payload the step does
//! not declare; 11: invalid config; 12: payload unavailable). I/O failures
//! carry facility 2 (operating system) and the OS error number, and name
//! the path; a path outside every granted directory reads as the denial.

/// The destination cannot be read to compare it with the payload.
pub const READ_FAILED: u32 = 20;
/// `backup`: the destination cannot be copied aside.
pub const BACKUP_FAILED: u32 = 21;
/// `install`: the staged file cannot be written.
pub const WRITE_FAILED: u32 = 22;
/// `apply`: the staged file cannot be renamed over the destination.
pub const ACTIVATE_FAILED: u32 = 23;
/// `verify`: the destination does not hold the payload's bytes.
pub const MISMATCH: u32 = 24;
/// `commit`: the backup cannot be removed.
pub const DROP_BACKUP_FAILED: u32 = 25;
/// `rollback`: no backup was recorded, or it cannot be restored.
pub const ROLLBACK_FAILED: u32 = 26;
/// `cleanup`: the staged file cannot be removed.
pub const CLEANUP_FAILED: u32 = 27;
/// `inventory`: the configured root cannot be listed or a file hashed.
pub const INVENTORY_FAILED: u32 = 28;
/// A checkpoint cannot be written.
pub const CHECKPOINT_FAILED: u32 = 29;
