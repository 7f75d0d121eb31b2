//! Whole-image writes to the block devices or slot files a handler's
//! manifest declares (`[[devices]]`), done by the host (contract 1.1).
//!
//! ```ignore
//! let image = step.open_payload("rootfs.img")?;
//! let info = devices::info("/dev/otabox/slot-b")?;
//! if image.size() > info.size { /* refuse */ }
//! let written = devices::write_image("/dev/otabox/slot-b", &image)?;
//! assert_eq!(written, image.sha256());
//! ```

use crate::__bindings::otabox::handler::devices as host;
use crate::{HostError, Payload};

pub use host::DeviceInfo;

/// Size and kind of the declared device `path`.
pub fn info(path: &str) -> Result<DeviceInfo, HostError> {
    host::info(path)
}

/// Streams `image` to the start of `path`, syncs, reads it back and returns
/// the sha256 of what was read. Nothing is written when the image is
/// larger than the device.
pub fn write_image(path: &str, image: &Payload) -> Result<String, HostError> {
    host::write_image(path, image.resource())
}

/// The sha256 of the first `length` bytes of `path`.
pub fn hash(path: &str, length: u64) -> Result<String, HostError> {
    host::hash(path, length)
}
