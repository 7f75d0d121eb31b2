//! The devices capability: `[[devices]]` block devices and slot files a
//! handler may write whole images to, narrowed by the device's `devices`
//! and `mounts`, linked as `otabox:handler/devices` ([`host`]), and the
//! audit's check that none lies in a writable directory (`risks`).

pub mod host;
mod risks;

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use wasmtime::component::{HasSelf, Linker};

use super::filesystem::mount;
use super::manifest::check_dir_path;
use super::{Capability, CapabilityUnit, DeviceGrant, Grants, HandlerManifest};
use crate::HostState;
use crate::bindings::otabox::handler::devices;

pub use risks::{DeviceInWritablePath, devices_in_writable_paths};

/// One `[[devices]]` entry: a block device or slot file, by absolute path.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRule {
    /// The device's path as the handler names it; the device config may
    /// place it elsewhere with `mounts`.
    pub path: PathBuf,
}

/// A granted device: the path the handler names and the path on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DevicePath {
    /// As declared.
    pub guest: PathBuf,
    /// Where it is on this device (after `mounts`).
    pub host: PathBuf,
}

/// The devices capability.
pub struct Devices;

impl CapabilityUnit for Devices {
    fn kind(&self) -> Capability {
        Capability::Devices
    }

    fn owns_import(&self, _package: &str, interface: &str) -> bool {
        interface == "otabox:handler/devices"
    }

    fn noun(&self) -> &'static str {
        "devices"
    }

    fn summary_key(&self) -> &'static str {
        "devices"
    }

    fn check_manifest(&self, manifest: &HandlerManifest) -> Result<()> {
        for (i, rule) in manifest.devices.iter().enumerate() {
            check_dir_path(&rule.path).with_context(|| format!("field `devices[{i}].path`"))?;
        }
        Ok(())
    }

    fn declared(&self, manifest: &HandlerManifest) -> bool {
        !manifest.devices.is_empty()
    }

    fn narrow(
        &self,
        manifest: &HandlerManifest,
        device: &DeviceGrant,
        grants: &mut Grants,
    ) -> Result<()> {
        grants.devices = manifest
            .devices
            .iter()
            .filter(|d| {
                device
                    .devices
                    .as_ref()
                    .is_none_or(|allowed| allowed.contains(&d.path))
            })
            .map(|d| DevicePath {
                guest: d.path.clone(),
                host: mount(&d.path, &device.mounts),
            })
            .collect();
        Ok(())
    }

    fn granted(&self, grants: &Grants) -> bool {
        !grants.devices.is_empty()
    }

    fn summarize(&self, grants: &Grants) -> Vec<String> {
        grants
            .devices
            .iter()
            .map(|d| {
                if d.host == d.guest {
                    d.guest.display().to_string()
                } else {
                    format!("{} -> {}", d.guest.display(), d.host.display())
                }
            })
            .collect()
    }

    fn add_to_linker(&self, l: &mut Linker<HostState>) -> Result<()> {
        devices::add_to_linker::<HostState, HasSelf<HostState>>(l, |s| s)?;
        Ok(())
    }
}
