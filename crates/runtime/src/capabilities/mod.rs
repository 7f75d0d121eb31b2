//! What a handler may do: the capability manifest it ships (`<name>.toml`),
//! the device's narrowing of it, and the host functions that enforce it.
//!
//! Each capability lives in its own module and implements
//! [`CapabilityUnit`]: what the manifest declares and how it is checked,
//! how the device narrows it, how `audit` summarises it, which WIT imports
//! it owns and links, and how a call's WASI context carries it:
//! [`filesystem`] (`wasi:filesystem`, preopened directories), [`process`]
//! (`otabox:handler/process`, command rules), [`network`]
//! (`wasi:sockets`, granted hosts) and [`devices`]
//! (`otabox:handler/devices`, whole-image writes). [`ALL`] registers them.
//!
//! Around them: [`HandlerManifest`] (the manifest file), [`Grants`] and
//! [`DeviceGrant`] (device.toml's narrowing), and [`check_imports`], the
//! one check of a component's imports shared by loading and `audit`.

pub mod devices;
pub mod filesystem;
mod grants;
mod imports;
mod manifest;
pub mod network;
pub mod process;

use anyhow::Result;
use wasmtime::component::Linker;
use wasmtime_wasi::WasiCtxBuilder;

use crate::HostState;

pub use devices::{DeviceInWritablePath, devices_in_writable_paths};
pub use devices::{DevicePath, DeviceRule};
pub use filesystem::{Access, PathGrant, PathRule};
pub use grants::{CommandIsolation, DeviceGrant, Grants};
pub use imports::{
    Capability, ImportCheck, ImportFault, check_import, check_imports, classify_import,
};
pub use manifest::{HandlerManifest, HandlerSection, Limits, PinMismatch};
pub use network::NetworkSection;
pub use process::{
    ArgPattern, CapSet, CommandRule, Denial, RunAs, authorize as commands_authorize,
};

/// One capability, whole: a handler gets none of it unless its manifest
/// declares it and the device grants it (or the manifest stubs it).
pub trait CapabilityUnit: Sync {
    /// Which capability this is.
    fn kind(&self) -> Capability;
    /// Whether an imported interface (`package`, `package/interface`, no
    /// version) belongs to this capability.
    fn owns_import(&self, package: &str, interface: &str) -> bool;
    /// What its declarations are called in audit findings.
    fn noun(&self) -> &'static str;
    /// The key of its lines in an audit summary (`commands`).
    fn summary_key(&self) -> &'static str;
    /// Checks its sections of the manifest; errors name the field.
    fn check_manifest(&self, manifest: &HandlerManifest) -> Result<()>;
    /// Whether the manifest declares any of it.
    fn declared(&self, manifest: &HandlerManifest) -> bool;
    /// Narrows what the manifest declares by the device's grant, into
    /// `grants`; a narrowing that cannot be enforced is an error.
    fn narrow(
        &self,
        manifest: &HandlerManifest,
        device: &DeviceGrant,
        grants: &mut Grants,
    ) -> Result<()>;
    /// Whether `grants` give any of it.
    fn granted(&self, grants: &Grants) -> bool;
    /// Its grants for `audit`, one line each.
    fn summarize(&self, grants: &Grants) -> Vec<String>;
    /// Links the interfaces it owns.
    fn add_to_linker(&self, linker: &mut Linker<HostState>) -> Result<()>;
    /// Puts its grants into a call's WASI context.
    fn configure_wasi(&self, grants: &Grants, builder: &mut WasiCtxBuilder) -> Result<()> {
        let _ = (grants, builder);
        Ok(())
    }
}

/// Every capability, in the order checks, summaries and linking use.
pub const ALL: &[&dyn CapabilityUnit] = &[
    &filesystem::Filesystem,
    &process::Process,
    &network::Network,
    &devices::Devices,
];

/// The unit of `kind` (none for baseline and unsupported imports).
pub fn unit(kind: Capability) -> Option<&'static dyn CapabilityUnit> {
    ALL.iter().copied().find(|u| u.kind() == kind)
}
