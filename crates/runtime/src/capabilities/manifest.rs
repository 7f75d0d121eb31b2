//! The capability manifest a handler ships beside its wasm.
//!
//! ```toml
//! [handler]
//! update_types = ["otabox/apt:1", "microsoft/apt:1"]
//! sha256 = "…64 hex digits of the .wasm…"
//!
//! [[filesystem]]
//! path = "/var/lib/apt"
//! access = "ro"            # or "rw"
//!
//! [[commands]]
//! program = "/usr/bin/apt-get"
//! args = ["-y", "install", "**"]   # exact | "*" one argument | trailing "**" the rest
//! env = ["DEBIAN_FRONTEND"]
//!
//! [network]
//! hosts = ["deb.example.com:443"]
//!
//! [limits]
//! memory_mb = 64
//! call_timeout_ms = 30000
//!
//! [stubs]                  # imported by the language runtime, never used:
//! refuse = ["network"]     # linked so that every call is refused
//! ```

use std::path::{Component, Path};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::{Capability, CommandRule, DeviceRule, NetworkSection, PathRule};
use otabox_core::update_type::UpdateType;

/// Upper bounds a manifest may ask for.
const MAX_MEMORY_MB: u64 = 4096;
const MAX_CALL_TIMEOUT_MS: u64 = 24 * 3600 * 1000;

/// A handler's capability manifest (`<name>.toml`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerManifest {
    /// Identity of the handler.
    pub handler: HandlerSection,
    /// Directories the handler may open, read-only or read-write.
    #[serde(default)]
    pub filesystem: Vec<PathRule>,
    /// Programs the handler may run, with argument patterns.
    #[serde(default)]
    pub commands: Vec<CommandRule>,
    /// Block devices or slot files the handler may write whole images to
    /// (contract 1.1 `devices`).
    #[serde(default)]
    pub devices: Vec<DeviceRule>,
    /// Hosts the handler may connect to.
    #[serde(default)]
    pub network: NetworkSection,
    /// Resource limits per call.
    #[serde(default)]
    pub limits: Limits,
    /// Capabilities the component imports but never uses.
    #[serde(default)]
    pub stubs: StubsSection,
}

/// The `[stubs]` table: capabilities whose interfaces a language runtime
/// imports although the handler never calls them (Python's and
/// JavaScript's `wasi:sockets`, for instance). They are linked with nothing
/// granted, so the component loads and every call is refused.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StubsSection {
    /// `filesystem`, `process`, `network` or `devices`.
    #[serde(default)]
    pub refuse: Vec<Capability>,
}

/// The `[handler]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerSection {
    /// Update types served, first canonical.
    pub update_types: Vec<UpdateType>,
    /// Lowercase hex sha256 of the `.wasm`; a mismatch refuses the handler.
    pub sha256: String,
    /// A line for humans.
    #[serde(default)]
    pub description: Option<String>,
}

/// The `[limits]` table.
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Linear memory cap, in MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// Wall-clock limit of one lifecycle call, in milliseconds.
    #[serde(default = "default_call_timeout_ms")]
    pub call_timeout_ms: u64,
}

fn default_memory_mb() -> u64 {
    64
}

fn default_call_timeout_ms() -> u64 {
    60_000
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mb: default_memory_mb(),
            call_timeout_ms: default_call_timeout_ms(),
        }
    }
}

impl Limits {
    /// The memory cap in bytes.
    pub fn memory_bytes(&self) -> usize {
        usize::try_from(self.memory_mb.saturating_mul(1 << 20)).unwrap_or(usize::MAX)
    }

    /// The per-call time limit.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }
}

impl HandlerManifest {
    /// Reads and checks a manifest file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read handler manifest {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid handler manifest {}", path.display()))
    }

    /// Parses and checks manifest text.
    pub fn parse(text: &str) -> Result<Self> {
        let manifest: Self =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))?;
        manifest.check()?;
        Ok(manifest)
    }

    fn check(&self) -> Result<()> {
        let h = &self.handler;
        if h.update_types.is_empty() {
            bail!("field `handler.update_types` must list at least one update type");
        }
        if h.sha256.len() != 64
            || !h
                .sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            bail!(
                "field `handler.sha256` must be 64 lowercase hex digits, found {:?}",
                h.sha256
            );
        }
        for unit in super::ALL {
            unit.check_manifest(self)?;
        }
        self.check_stubs()?;
        let l = &self.limits;
        if l.memory_mb == 0 || l.memory_mb > MAX_MEMORY_MB {
            bail!(
                "field `limits.memory_mb` must be 1..={MAX_MEMORY_MB}, found {}",
                l.memory_mb
            );
        }
        if l.call_timeout_ms == 0 || l.call_timeout_ms > MAX_CALL_TIMEOUT_MS {
            bail!(
                "field `limits.call_timeout_ms` must be 1..={MAX_CALL_TIMEOUT_MS}, found {}",
                l.call_timeout_ms
            );
        }
        Ok(())
    }
}

impl HandlerManifest {
    /// Whether the manifest declares anything of `capability`.
    pub fn declares(&self, capability: Capability) -> bool {
        match capability {
            Capability::Baseline => true,
            Capability::Unsupported => false,
            kind => super::unit(kind).is_some_and(|u| u.declared(self)),
        }
    }

    /// The sha256 of `wasm` when it is the one the manifest pins; else a
    /// [`PinMismatch`] naming both.
    pub fn check_pin(&self, wasm: &[u8]) -> Result<String, PinMismatch> {
        let actual = otabox_core::trust::sha256_hex(wasm);
        if actual == self.handler.sha256 {
            Ok(actual)
        } else {
            Err(PinMismatch {
                actual,
                pinned: self.handler.sha256.clone(),
            })
        }
    }

    /// Whether `capability` is listed in `[stubs] refuse`.
    pub fn stubs(&self, capability: Capability) -> bool {
        self.stubs.refuse.contains(&capability)
    }

    fn check_stubs(&self) -> Result<()> {
        for (i, &cap) in self.stubs.refuse.iter().enumerate() {
            let what = cap.label();
            if matches!(cap, Capability::Baseline | Capability::Unsupported) {
                bail!(
                    "field `stubs.refuse[{i}]`: {what} cannot be stubbed; use filesystem, process, network or devices"
                );
            }
            if self.declares(cap) {
                bail!("field `stubs.refuse[{i}]`: the manifest both declares and stubs {what}");
            }
        }
        Ok(())
    }
}

/// A component whose sha256 is not the one its manifest pins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PinMismatch {
    /// The component's sha256.
    pub actual: String,
    /// The sha256 the manifest pins.
    pub pinned: String,
}

/// An absolute, normalised directory path (no `.`/`..`, not `/`).
pub(crate) fn check_dir_path(path: &Path) -> Result<()> {
    if !path.is_absolute() {
        bail!("{} must be an absolute path", path.display());
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        bail!("{} must not contain `.` or `..`", path.display());
    }
    if path.parent().is_none() {
        bail!("granting the whole filesystem (`/`) is not allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capabilities::Access;

    #[test]
    fn stubs_name_capabilities_that_are_not_declared() {
        let head = format!(
            "[handler]\nupdate_types = [\"a/b:1\"]\nsha256 = \"{}\"\n",
            "0".repeat(64)
        );
        let m = HandlerManifest::parse(&format!(
            "{head}[stubs]\nrefuse = [\"network\", \"devices\"]\n"
        ))
        .expect("valid");
        assert!(m.stubs(Capability::Network) && !m.stubs(Capability::Process));
        for (tail, why) in [
            (
                "[network]\nhosts = [\"a.example\"]\n[stubs]\nrefuse = [\"network\"]\n",
                "both declares and stubs network",
            ),
            (
                "[stubs]\nrefuse = [\"baseline\"]\n",
                "baseline cannot be stubbed",
            ),
            (
                "[stubs]\nrefuse = [\"sockets\"]\n",
                "unknown variant `sockets`",
            ),
        ] {
            let err = HandlerManifest::parse(&format!("{head}{tail}")).expect_err(tail);
            assert!(format!("{err:#}").contains(why), "{tail}: {err:#}");
        }
    }

    const HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    fn manifest(extra: &str) -> String {
        format!("[handler]\nupdate_types = [\"otabox/file:1\"]\nsha256 = \"{HASH}\"\n{extra}")
    }

    #[test]
    fn parses_a_full_manifest() {
        let m = HandlerManifest::parse(&manifest(
            "[[filesystem]]\npath = \"/srv/a\"\naccess = \"rw\"\n\
             [[commands]]\nprogram = \"/usr/bin/apt-get\"\nargs = [\"install\", \"*\", \"**\"]\nenv = [\"DEBIAN_FRONTEND\"]\n\
             [network]\nhosts = [\"deb.example.com:443\"]\n[limits]\nmemory_mb = 32\ncall_timeout_ms = 500\n",
        ))
        .expect("valid");
        assert_eq!(m.filesystem[0].access, Access::ReadWrite);
        assert_eq!(m.limits.memory_bytes(), 32 << 20);
        assert_eq!(m.commands[0].env, vec!["DEBIAN_FRONTEND".to_string()]);
    }

    #[test]
    fn unknown_field_is_named() {
        let err = HandlerManifest::parse(&manifest(
            "[[commands]]\nprogram = \"/bin/true\"\nargz = []\n",
        ))
        .expect_err("unknown field");
        let text = format!("{err:#}");
        assert!(text.contains("unknown field `argz`"), "{text}");
        assert!(text.contains("line"), "{text}");
    }

    #[test]
    fn missing_and_malformed_fields_are_named() {
        let err = HandlerManifest::parse("[handler]\nupdate_types = [\"a/b:1\"]\n").unwrap_err();
        assert!(
            format!("{err:#}").contains("missing field `sha256`"),
            "{err:#}"
        );
        let err = HandlerManifest::parse(&manifest("[limits]\nmemory_mb = 0\n")).unwrap_err();
        assert!(format!("{err:#}").contains("limits.memory_mb"), "{err:#}");
        let err = HandlerManifest::parse(&manifest(
            "[[filesystem]]\npath = \"/srv/../etc\"\naccess = \"ro\"\n",
        ))
        .unwrap_err();
        assert!(format!("{err:#}").contains("filesystem[0].path"), "{err:#}");
        let err = HandlerManifest::parse(&manifest(
            "[[filesystem]]\npath = \"/srv\"\naccess = \"rwx\"\n",
        ))
        .unwrap_err();
        assert!(
            format!("{err:#}").contains("unknown variant `rwx`"),
            "{err:#}"
        );
        let bad_type =
            "[handler]\nupdate_types = [\"Apt\"]\nsha256 = \"".to_string() + HASH + "\"\n";
        assert!(
            format!("{:#}", HandlerManifest::parse(&bad_type).unwrap_err())
                .contains("update_types")
        );
        let long = format!("{}/b:1", "a".repeat(200));
        let long_type = format!("[handler]\nupdate_types = [\"{long}\"]\nsha256 = \"{HASH}\"\n");
        assert!(
            format!("{:#}", HandlerManifest::parse(&long_type).unwrap_err())
                .contains("at most 128 bytes"),
            "the same rule as a deployment's updateType"
        );
    }

    #[test]
    fn the_root_directory_cannot_be_granted() {
        let err =
            HandlerManifest::parse(&manifest("[[filesystem]]\npath = \"/\"\naccess = \"ro\"\n"))
                .unwrap_err();
        assert!(format!("{err:#}").contains("whole filesystem"), "{err:#}");
    }
}
