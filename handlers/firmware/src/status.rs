//! Result codes of the firmware handler. Codes below 20 are the SDK's
//! ([`otabox_sdk::code`]: 10 invalid manifest, 11 invalid config).

/// The image is built for other hardware.
pub const INCOMPATIBLE: u32 = 20;
/// The image is larger than the slot.
pub const TOO_LARGE: u32 = 21;
/// The booted or the target slot cannot be determined or opened.
pub const SLOT: u32 = 22;
/// Writing the image failed.
pub const WRITE_FAILED: u32 = 23;
/// What was read back from the slot is not the image.
pub const READBACK_MISMATCH: u32 = 24;
/// After the reboot the old slot runs: the bootloader fell back.
pub const FELL_BACK: u32 = 25;
/// The health check of the new slot failed.
pub const UNHEALTHY: u32 = 26;
/// The bootloader environment could not be read or written.
pub const BOOTLOADER: u32 = 27;
/// The slot record could not be read or written.
pub const RECORD: u32 = 28;
/// Rollback without a backup.
pub const NO_BACKUP: u32 = 29;
/// A bundle could not be installed by the device's update tool.
pub const BUNDLE: u32 = 30;
