//! What a handler may do: the capability manifest it ships (`<name>.toml`),
//! the device's narrowing of it, and the checks host functions apply.

mod commands;
mod devices;
mod grants;
mod identity;
mod imports;
mod manifest;

pub use commands::{ArgPattern, CommandRule, Denial, authorize as commands_authorize};
pub use devices::{DeviceInWritablePath, devices_in_writable_paths};
pub use grants::{CommandIsolation, DeviceGrant, Grants, PathGrant};
pub use identity::{CapSet, RunAs};
pub use imports::{
    Capability, ImportCheck, ImportFault, check_import, check_imports, classify_import,
};
pub use manifest::{
    Access, HandlerManifest, HandlerSection, Limits, NetworkSection, PathRule, PinMismatch,
};
