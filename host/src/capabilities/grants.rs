//! The effective grants of a handler: what it declares, narrowed by the
//! device's `[handlers.<name>]` section.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::manifest::check_dir_path;
use super::{Access, Capability, CommandRule, HandlerManifest, Limits};

/// A device's settings for one handler (`[handlers.<name>]` in device.toml).
/// Every list narrows: absent means "as declared", present means "only these".
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceGrant {
    /// Set to false to keep the handler out of the runtime.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Configuration handed to the handler as JSON (its `config`).
    #[serde(default)]
    pub config: Option<toml::Table>,
    /// Directories granted: a declared path inside one of these is kept; a
    /// listed directory inside a declared path narrows it to that directory.
    #[serde(default)]
    pub paths: Option<Vec<PathBuf>>,
    /// Granted directories under these are read-only whatever was declared.
    #[serde(default)]
    pub read_only: Vec<PathBuf>,
    /// Programs whose declared rules are kept.
    #[serde(default)]
    pub commands: Option<Vec<String>>,
    /// Declared devices the device allows (absent: all declared).
    #[serde(default)]
    pub devices: Option<Vec<PathBuf>>,
    /// Declared devices allowed to lie inside a directory the handler may
    /// write (otherwise an audit error).
    #[serde(default)]
    pub devices_in_writable_paths: Vec<PathBuf>,
    /// Network hosts kept.
    #[serde(default)]
    pub network: Option<Vec<String>>,
    /// Lower memory cap, in MiB.
    #[serde(default)]
    pub memory_mb: Option<u64>,
    /// Lower per-call time limit, in milliseconds.
    #[serde(default)]
    pub call_timeout_ms: Option<u64>,
    /// Where a declared directory lives on this device: handler path →
    /// device path (for example to point a handler at a sysroot).
    #[serde(default)]
    pub mounts: BTreeMap<PathBuf, PathBuf>,
}

fn yes() -> bool {
    true
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

/// What a handler may do on this device.
#[derive(Debug, Clone, Serialize)]
pub struct Grants {
    /// Directories it may open.
    pub paths: Vec<PathGrant>,
    /// Programs it may run.
    pub commands: Vec<CommandRule>,
    /// Devices it may write whole images to.
    pub devices: Vec<DevicePath>,
    /// Hosts it may connect to.
    pub network: Vec<String>,
    /// Its limits.
    pub limits: Limits,
    /// Capabilities linked with nothing granted (`[stubs] refuse`).
    pub stubbed: Vec<Capability>,
}

impl Grants {
    /// Whether the interfaces of `capability` are linked: granted, or
    /// stubbed so that every call is refused.
    pub fn links(&self, capability: Capability) -> bool {
        self.stubbed.contains(&capability)
            || match capability {
                Capability::Baseline => true,
                Capability::Filesystem => !self.paths.is_empty(),
                Capability::Process => !self.commands.is_empty(),
                Capability::Network => !self.network.is_empty(),
                Capability::Devices => !self.devices.is_empty(),
                Capability::Unsupported => false,
            }
    }
}

/// A granted device: the path the handler names and the path on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DevicePath {
    /// As declared.
    pub guest: PathBuf,
    /// Where it is on this device (after `mounts`).
    pub host: PathBuf,
}

impl DeviceGrant {
    /// Checks paths and mounts; errors name the field.
    pub fn check(&self) -> Result<()> {
        for p in self.paths.iter().flatten().chain(&self.read_only) {
            check_dir_path(p).context("field `paths`/`read_only`")?;
        }
        for (from, to) in &self.mounts {
            check_dir_path(from).context("field `mounts` (key)")?;
            check_dir_path(to).context("field `mounts` (value)")?;
        }
        Ok(())
    }

    /// The handler's configuration as a JSON object text (`{}` when none).
    pub fn config_json(&self) -> String {
        self.config
            .as_ref()
            .and_then(|c| serde_json::to_string(c).ok())
            .unwrap_or_else(|| "{}".to_string())
    }
}

impl Grants {
    /// The declared capabilities of `manifest`, narrowed by `device`.
    pub fn narrow(manifest: &HandlerManifest, device: Option<&DeviceGrant>) -> Self {
        let default = DeviceGrant::default();
        let device = device.unwrap_or(&default);
        Self {
            paths: narrow_paths(manifest, device),
            commands: manifest
                .commands
                .iter()
                .filter(|r| {
                    device
                        .commands
                        .as_ref()
                        .is_none_or(|allowed| allowed.contains(&r.program))
                })
                .cloned()
                .collect(),
            devices: manifest
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
                .collect(),
            network: manifest
                .network
                .hosts
                .iter()
                .filter(|h| {
                    device
                        .network
                        .as_ref()
                        .is_none_or(|allowed| allowed.contains(h))
                })
                .cloned()
                .collect(),
            limits: Limits {
                memory_mb: device.memory_mb.map_or(manifest.limits.memory_mb, |m| {
                    m.min(manifest.limits.memory_mb)
                }),
                call_timeout_ms: device
                    .call_timeout_ms
                    .map_or(manifest.limits.call_timeout_ms, |t| {
                        t.min(manifest.limits.call_timeout_ms)
                    }),
            },
            stubbed: manifest.stubs.refuse.clone(),
        }
    }
}

fn narrow_paths(manifest: &HandlerManifest, device: &DeviceGrant) -> Vec<PathGrant> {
    let mut granted = Vec::new();
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
            let access = if device.read_only.iter().any(|ro| guest.starts_with(ro)) {
                Access::ReadOnly
            } else {
                rule.access
            };
            let host = mount(&guest, &device.mounts);
            granted.push(PathGrant {
                guest,
                host,
                access,
            });
        }
    }
    granted
}

/// Maps a handler path to the device path through the longest mount prefix.
fn mount(guest: &Path, mounts: &BTreeMap<PathBuf, PathBuf>) -> PathBuf {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> HandlerManifest {
        HandlerManifest::parse(&format!(
            "[handler]\nupdate_types=[\"a/b:1\"]\nsha256=\"{}\"\n\
             [[filesystem]]\npath=\"/srv/data\"\naccess=\"rw\"\n\
             [[filesystem]]\npath=\"/etc/app\"\naccess=\"ro\"\n\
             [[commands]]\nprogram=\"/usr/bin/apt-get\"\nargs=[\"**\"]\n\
             [[commands]]\nprogram=\"/usr/bin/dpkg\"\nargs=[\"**\"]\n\
             [network]\nhosts=[\"a.example:443\",\"b.example\"]\n[limits]\nmemory_mb=64\ncall_timeout_ms=1000\n",
            "a".repeat(64)
        ))
        .expect("valid manifest")
    }

    #[test]
    fn no_device_section_grants_what_is_declared() {
        let g = Grants::narrow(&manifest(), None);
        assert_eq!(g.paths.len(), 2);
        assert_eq!(g.commands.len(), 2);
        assert_eq!(g.network.len(), 2);
        assert_eq!(g.paths[0].host, PathBuf::from("/srv/data"));
    }

    #[test]
    fn device_narrows_every_kind_of_grant() {
        let device: DeviceGrant = toml::from_str(
            "paths = [\"/srv/data/sub\"]\nread_only = [\"/srv\"]\ncommands = [\"/usr/bin/dpkg\"]\n\
             network = []\nmemory_mb = 512\ncall_timeout_ms = 10\n[mounts]\n\"/srv/data\" = \"/mnt/x\"\n",
        )
        .expect("device grant");
        let g = Grants::narrow(&manifest(), Some(&device));
        assert_eq!(
            g.paths,
            vec![PathGrant {
                guest: "/srv/data/sub".into(),
                host: "/mnt/x/sub".into(),
                access: Access::ReadOnly
            }]
        );
        assert_eq!(
            g.commands
                .iter()
                .map(|c| c.program.as_str())
                .collect::<Vec<_>>(),
            ["/usr/bin/dpkg"]
        );
        assert!(g.network.is_empty());
        assert_eq!(
            g.limits.memory_mb, 64,
            "a device cannot raise the declared cap"
        );
        assert_eq!(g.limits.call_timeout_ms, 10);
    }
}
