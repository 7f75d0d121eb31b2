//! The effective grants of a handler: what it declares, narrowed by the
//! device's `[handlers.<name>]` section.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::manifest::check_dir_path;
use super::{Capability, CommandRule, DevicePath, HandlerManifest, Limits, PathGrant};

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
    /// Programs whose declared rules are kept (each must be declared).
    #[serde(default)]
    pub commands: Option<Vec<String>>,
    /// Deny patterns (`deny_args`) of the declared rules lifted on this
    /// device, per program: `"/usr/bin/docker" = ["--privileged"]`.
    #[serde(default)]
    pub allow_args: BTreeMap<String, Vec<String>>,
    /// How each command is contained: `auto` (its own cgroup where cgroup2
    /// allows, else the subreaper) or `subreaper`.
    #[serde(default)]
    pub command_isolation: CommandIsolation,
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

/// How the processes of a command are kept together, so that all of them
/// end with it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CommandIsolation {
    /// Its own cgroup v2 (killed with `cgroup.kill`) where one can be made,
    /// else `subreaper`.
    #[default]
    Auto,
    /// A per-command subreaper whose every descendant is found and killed.
    Subreaper,
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
    /// How commands are contained.
    pub command_isolation: CommandIsolation,
}

impl Grants {
    /// Whether the interfaces of `capability` are linked: granted, or
    /// stubbed so that every call is refused.
    pub fn links(&self, capability: Capability) -> bool {
        self.stubbed.contains(&capability)
            || match capability {
                Capability::Baseline => true,
                Capability::Unsupported => false,
                kind => super::unit(kind).is_some_and(|u| u.granted(self)),
            }
    }
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
    /// The declared capabilities of `manifest`, narrowed by `device`. A
    /// narrowing that cannot be enforced, or that names what the handler
    /// does not declare, is an error naming it.
    pub fn narrow(manifest: &HandlerManifest, device: Option<&DeviceGrant>) -> Result<Self> {
        let default = DeviceGrant::default();
        let device = device.unwrap_or(&default);
        let mut grants = Self {
            paths: Vec::new(),
            commands: Vec::new(),
            devices: Vec::new(),
            network: Vec::new(),
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
            command_isolation: device.command_isolation,
        };
        for unit in super::ALL {
            unit.narrow(manifest, device, &mut grants)?;
        }
        Ok(grants)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capabilities::Access;

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
        let g = Grants::narrow(&manifest(), None).expect("narrow");
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
        let g = Grants::narrow(&manifest(), Some(&device)).expect("narrow");
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

    fn with_paths(rules: &str) -> HandlerManifest {
        HandlerManifest::parse(&format!(
            "[handler]\nupdate_types=[\"a/b:1\"]\nsha256=\"{}\"\n{rules}\n\
             [[commands]]\nprogram=\"/bin/true\"\n",
            "a".repeat(64)
        ))
        .expect("valid manifest")
    }

    fn narrowed(manifest: &HandlerManifest, device: &str) -> Result<Vec<String>> {
        let device: DeviceGrant = toml::from_str(device).expect("device grant");
        Ok(Grants::narrow(manifest, Some(&device))?
            .paths
            .iter()
            .map(|p| format!("{:?} {}", p.access, p.guest.display()))
            .collect())
    }

    #[test]
    fn a_read_only_grant_inside_a_read_write_one_is_refused() {
        let nested = with_paths(
            "[[filesystem]]\npath=\"/srv/rw\"\naccess=\"rw\"\n[[filesystem]]\npath=\"/srv/rw/ro\"\naccess=\"ro\"\n",
        );
        let err = Grants::narrow(&nested, None).expect_err("nested ro in rw");
        assert!(
            format!("{err:#}").contains("inside the read-write grant /srv/rw"),
            "{err:#}"
        );
        let rw = with_paths("[[filesystem]]\npath=\"/srv/rw\"\naccess=\"rw\"\n");
        let err = narrowed(&rw, "read_only = [\"/srv/rw/sub\"]\n").expect_err("unenforceable");
        assert!(format!("{err:#}").contains("cannot be enforced"), "{err:#}");
        assert_eq!(
            narrowed(&rw, "read_only = [\"/srv/rw\"]\n").expect("whole grant ro"),
            ["ReadOnly /srv/rw"]
        );
        assert_eq!(
            narrowed(
                &rw,
                "paths = [\"/srv/rw/a\"]\nread_only = [\"/srv/rw/a\"]\n"
            )
            .expect("narrowed ro"),
            ["ReadOnly /srv/rw/a"]
        );
    }

    #[test]
    fn two_device_paths_give_two_grants_and_nothing_else() {
        let m = with_paths(
            "[[filesystem]]\npath=\"/srv\"\naccess=\"rw\"\n[[filesystem]]\npath=\"/srv/a\"\naccess=\"ro\"\n",
        );
        assert_eq!(
            narrowed(&m, "paths = [\"/srv/a\", \"/srv/b\"]\n").expect("narrow"),
            ["ReadOnly /srv/a", "ReadWrite /srv/b"],
            "one grant per path, from the most specific rule"
        );
    }

    #[test]
    fn an_undeclared_program_or_lift_is_refused() {
        let m = with_paths("");
        let err =
            narrowed(&m, "commands = [\"/bin/true\", \"/bin/sh\"]\n").expect_err("undeclared");
        assert!(
            format!("{err:#}").contains("\"/bin/sh\"")
                && format!("{err:#}").contains("does not declare"),
            "{err:#}"
        );
        let err =
            narrowed(&m, "[allow_args]\n\"/bin/true\" = [\"--x\"]\n").expect_err("no such deny");
        assert!(
            format!("{err:#}").contains("none of its rules denies"),
            "{err:#}"
        );
    }
}
