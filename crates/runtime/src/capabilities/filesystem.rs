//! The filesystem capability: `[[filesystem]]` directories a handler may
//! open read-only or read-write, narrowed by the device's `paths`,
//! `read_only` and `mounts`, preopened in each call's WASI context, and
//! linked as `wasi:filesystem`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use wasmtime::component::Linker;
use wasmtime_wasi::filesystem::{WasiFilesystem, WasiFilesystemView};
use wasmtime_wasi::p2::bindings::filesystem;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::manifest::check_dir_path;
use super::{Capability, CapabilityUnit, DeviceGrant, Grants, HandlerManifest};
use crate::HostState;

/// One `[[filesystem]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PathRule {
    /// Absolute directory, as the handler sees it.
    pub path: PathBuf,
    /// `ro` or `rw`.
    pub access: Access,
}

/// Access to a directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize, Serialize)]
pub enum Access {
    /// Read only.
    #[serde(rename = "ro")]
    ReadOnly,
    /// Read and write.
    #[serde(rename = "rw")]
    ReadWrite,
}

/// A directory granted to a handler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PathGrant {
    /// The path as the handler sees it.
    pub guest: PathBuf,
    /// The directory on the device.
    pub host: PathBuf,
    /// Read-only or read-write.
    pub access: Access,
}

/// The filesystem capability.
pub struct Filesystem;

impl CapabilityUnit for Filesystem {
    fn kind(&self) -> Capability {
        Capability::Filesystem
    }

    fn owns_import(&self, package: &str, _interface: &str) -> bool {
        package == "wasi:filesystem"
    }

    fn noun(&self) -> &'static str {
        "filesystem paths"
    }

    fn summary_key(&self) -> &'static str {
        "filesystem"
    }

    fn check_manifest(&self, manifest: &HandlerManifest) -> Result<()> {
        for (i, rule) in manifest.filesystem.iter().enumerate() {
            check_dir_path(&rule.path).with_context(|| format!("field `filesystem[{i}].path`"))?;
        }
        Ok(())
    }

    fn declared(&self, manifest: &HandlerManifest) -> bool {
        !manifest.filesystem.is_empty()
    }

    fn narrow(
        &self,
        manifest: &HandlerManifest,
        device: &DeviceGrant,
        grants: &mut Grants,
    ) -> Result<()> {
        grants.paths = narrow_paths(manifest, device)?;
        Ok(())
    }

    fn granted(&self, grants: &Grants) -> bool {
        !grants.paths.is_empty()
    }

    fn summarize(&self, grants: &Grants) -> Vec<String> {
        grants
            .paths
            .iter()
            .map(|p| {
                let access = if p.access == Access::ReadWrite {
                    "rw"
                } else {
                    "ro"
                };
                if p.host == p.guest {
                    format!("{access} {}", p.guest.display())
                } else {
                    format!("{access} {} -> {}", p.guest.display(), p.host.display())
                }
            })
            .collect()
    }

    fn add_to_linker(&self, l: &mut Linker<HostState>) -> Result<()> {
        filesystem::types::add_to_linker::<HostState, WasiFilesystem>(l, HostState::filesystem)?;
        filesystem::preopens::add_to_linker::<HostState, WasiFilesystem>(l, HostState::filesystem)?;
        Ok(())
    }

    /// One preopen per granted directory, with its access.
    fn configure_wasi(&self, grants: &Grants, builder: &mut WasiCtxBuilder) -> Result<()> {
        for grant in &grants.paths {
            let perms = match grant.access {
                Access::ReadOnly => FsPerms::ReadOnly,
                Access::ReadWrite => FsPerms::ReadWrite,
            };
            builder
                .preopened_dir(&grant.host, grant.guest.to_string_lossy(), perms)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("cannot open granted {}", grant.host.display()))?;
        }
        Ok(())
    }
}

/// The granted directories: per guest path the most specific declared rule
/// that covers it, made read-only under `read_only`. A read-only grant
/// inside a read-write one cannot be enforced (the guest writes it through
/// the outer directory) and is refused.
fn narrow_paths(manifest: &HandlerManifest, device: &DeviceGrant) -> Result<Vec<PathGrant>> {
    let mut chosen: Vec<(PathBuf, &PathRule)> = Vec::new();
    for rule in &manifest.filesystem {
        let guests: Vec<PathBuf> = match &device.paths {
            None => vec![rule.path.clone()],
            Some(allowed) if allowed.iter().any(|a| rule.path.starts_with(a)) => {
                vec![rule.path.clone()]
            }
            Some(allowed) => allowed
                .iter()
                .filter(|a| a.starts_with(&rule.path))
                .cloned()
                .collect(),
        };
        for guest in guests {
            match chosen.iter_mut().find(|(g, _)| *g == guest) {
                Some((_, kept))
                    if rule.path.components().count() > kept.path.components().count() =>
                {
                    *kept = rule;
                }
                Some(_) => {}
                None => chosen.push((guest, rule)),
            }
        }
    }
    let granted: Vec<PathGrant> = chosen
        .into_iter()
        .map(|(guest, rule)| {
            let access = if device.read_only.iter().any(|ro| guest.starts_with(ro)) {
                Access::ReadOnly
            } else {
                rule.access
            };
            PathGrant {
                host: mount(&guest, &device.mounts),
                guest,
                access,
            }
        })
        .collect();
    let rw = || granted.iter().filter(|g| g.access == Access::ReadWrite);
    for ro in &device.read_only {
        if let Some(outer) = rw().find(|g| ro.starts_with(&g.guest) && *ro != g.guest) {
            bail!(
                "device config `read_only` {} lies inside the read-write grant {} and cannot be enforced; make {} read-only or narrow `paths`",
                ro.display(),
                outer.guest.display(),
                outer.guest.display()
            );
        }
    }
    for inner in granted.iter().filter(|g| g.access == Access::ReadOnly) {
        if let Some(outer) = rw().find(|g| inner.guest.starts_with(&g.guest)) {
            bail!(
                "read-only {} lies inside the read-write grant {}: the handler could write it through {}",
                inner.guest.display(),
                outer.guest.display(),
                outer.guest.display()
            );
        }
    }
    Ok(granted)
}

/// Maps a handler path to the device path through the longest mount prefix.
pub(crate) fn mount(guest: &Path, mounts: &BTreeMap<PathBuf, PathBuf>) -> PathBuf {
    mounts
        .iter()
        .filter(|(from, _)| guest.starts_with(from))
        .max_by_key(|(from, _)| from.components().count())
        .and_then(|(from, to)| {
            let rest = guest.strip_prefix(from).ok()?;
            Some(if rest.as_os_str().is_empty() {
                to.clone()
            } else {
                to.join(rest)
            })
        })
        .unwrap_or_else(|| guest.to_path_buf())
}
