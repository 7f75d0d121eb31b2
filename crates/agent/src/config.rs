//! The device configuration file (`device.toml`).
//!
//! ```toml
//! [device]
//! id = "pump-0042"
//!
//! [paths]
//! handlers = ["/usr/lib/otabox/handlers", "/etc/otabox/handlers.d"]
//!                                     # <name>.toml + <name>.wasm; one
//!                                     # directory may be a plain string
//! state = "/var/lib/otabox"           # journal, checkpoints, payloads
//! cache = "/var/cache/otabox"         # precompiled handlers
//!
//! [handlers.apt]                      # narrows what apt.toml declares
//! commands = ["/usr/bin/apt-get", "/usr/bin/dpkg-query"]
//! read_only = ["/etc/apt"]
//! memory_mb = 128
//! config = { root = "/" }             # handed to the handler as JSON
//! ```
//!
//! Relative paths (under `[paths]` and mount targets) are relative to the
//! directory of the config file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

pub use otabox_cloud::mqtt::{MAX_REPORT_RANGE, MqttSection};
use otabox_runtime::capabilities::DeviceGrant;

/// The whole device configuration.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Identity of the device.
    #[serde(default)]
    pub device: DeviceSection,
    /// Where things live.
    #[serde(default)]
    pub paths: PathsSection,
    /// The MQTT session.
    #[serde(default)]
    pub mqtt: MqttSection,
    /// Payload downloads.
    #[serde(default)]
    pub download: DownloadSection,
    /// Signed deployments.
    #[serde(default)]
    pub trust: TrustSection,
    /// Per-handler grants and configuration, by handler name.
    #[serde(default)]
    pub handlers: BTreeMap<String, DeviceGrant>,
}

/// The `[device]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// The device id used in topics and reports.
    #[serde(default)]
    pub id: Option<String>,
    /// The command that reboots the device when an update asks for an
    /// immediate reboot (program and arguments, no shell).
    #[serde(default = "default_reboot_command")]
    pub reboot_command: Vec<String>,
    /// Finished jobs whose folders (journal record, fetched manifests,
    /// checkpoints) are kept in the state directory; payloads are deleted
    /// as soon as a job ends. The ids of older jobs are remembered (the
    /// last 10,000), so a job id still runs at most once.
    #[serde(default = "default_retained_jobs")]
    pub retained_jobs: usize,
}

fn default_reboot_command() -> Vec<String> {
    vec!["/sbin/reboot".into()]
}

fn default_retained_jobs() -> usize {
    100
}

impl Default for DeviceSection {
    fn default() -> Self {
        Self {
            id: None,
            reboot_command: default_reboot_command(),
            retained_jobs: default_retained_jobs(),
        }
    }
}

/// The `[trust]` table. With a root, every deployment must carry a signed
/// update manifest that verifies against it.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrustSection {
    /// The root of trust (JSON: version, threshold, keys).
    #[serde(default)]
    pub root: Option<PathBuf>,
    /// Groups this device belongs to (manifests may target a group).
    #[serde(default)]
    pub groups: Vec<String>,
}

/// The `[download]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DownloadSection {
    /// Extra CA certificates (PEM) for HTTPS payload servers.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Longest wait for more bytes before a download is resumed, in seconds.
    #[serde(default = "default_stall")]
    pub stall_timeout_secs: u64,
    /// Attempts per file before the job fails.
    #[serde(default = "default_attempts")]
    pub attempts: u32,
    /// A credentials endpoint: the agent `GET`s it with the device's TLS
    /// identity (`[mqtt] cert_file`/`key_file`) and uses the returned
    /// `{"token"}` as the bearer token of payloads that carry none.
    #[serde(default)]
    pub credentials_url: Option<String>,
    /// The hosts (`host` or `host:port`) that may receive that token
    /// (default: the host of `credentials_url` only). Payload URLs of
    /// other hosts get no token, whatever a deployment names.
    #[serde(default)]
    pub credentials_hosts: Option<Vec<String>>,
}

fn default_stall() -> u64 {
    30
}
fn default_attempts() -> u32 {
    8
}

impl Default for DownloadSection {
    fn default() -> Self {
        Self {
            ca_file: None,
            stall_timeout_secs: default_stall(),
            attempts: default_attempts(),
            credentials_url: None,
            credentials_hosts: None,
        }
    }
}

impl DownloadSection {
    /// The downloader settings; the device's TLS identity comes from `mqtt`.
    pub fn options(&self, mqtt: &MqttSection) -> crate::download::DownloadOptions {
        crate::download::DownloadOptions {
            ca_file: self.ca_file.clone().or_else(|| mqtt.ca_file.clone()),
            credentials_url: self.credentials_url.clone(),
            credentials_hosts: self.credentials_hosts.clone(),
            identity: mqtt.cert_file.clone().zip(mqtt.key_file.clone()),
            stall_timeout: std::time::Duration::from_secs(self.stall_timeout_secs.max(1)),
            attempts: self.attempts.max(1),
            ..Default::default()
        }
    }
}

/// The `[paths]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PathsSection {
    /// Directories of handler manifests and components, packaged first,
    /// the integrator's last.
    #[serde(default)]
    pub handlers: HandlerDirs,
    /// Directory of durable agent state.
    #[serde(default = "default_state_dir")]
    pub state: PathBuf,
    /// Directory of precompiled handlers (default: `<state>/cache`).
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

/// The handler directories of a device, in order: the packaged handlers
/// (`/usr/lib/otabox/handlers`) first, the integrator's
/// (`/etc/otabox/handlers.d`, where `otabox handlers install` writes) last.
/// In the config: a list, or one directory as a plain string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct HandlerDirs(Vec<PathBuf>);

impl HandlerDirs {
    /// The packaged handlers' directory.
    pub const PACKAGED: &str = "/usr/lib/otabox/handlers";
    /// The integrator's directory.
    pub const INTEGRATOR: &str = "/etc/otabox/handlers.d";

    /// Just `dir`.
    pub fn one(dir: PathBuf) -> Self {
        Self(vec![dir])
    }

    /// The directories, in loading order.
    pub fn as_slice(&self) -> &[PathBuf] {
        &self.0
    }

    /// The integrator's directory (the last): `handlers install` and
    /// `remove` work there.
    pub fn integrator(&self) -> &Path {
        self.0
            .last()
            .map_or(Path::new(Self::INTEGRATOR), PathBuf::as_path)
    }
}

impl Default for HandlerDirs {
    fn default() -> Self {
        Self(vec![Self::PACKAGED.into(), Self::INTEGRATOR.into()])
    }
}

impl<'de> Deserialize<'de> for HandlerDirs {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged, expecting = "a directory, or a list of directories")]
        enum OneOrMany {
            One(PathBuf),
            Many(Vec<PathBuf>),
        }
        let dirs = match OneOrMany::deserialize(deserializer)? {
            OneOrMany::One(dir) => vec![dir],
            OneOrMany::Many(dirs) => dirs,
        };
        if dirs.is_empty() {
            return Err(serde::de::Error::custom("lists no handler directory"));
        }
        if let Some(dup) = dirs
            .iter()
            .enumerate()
            .find_map(|(i, d)| dirs[..i].contains(d).then_some(d))
        {
            return Err(serde::de::Error::custom(format!(
                "lists {} twice",
                dup.display()
            )));
        }
        Ok(Self(dirs))
    }
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/otabox")
}

impl Default for PathsSection {
    fn default() -> Self {
        Self {
            handlers: HandlerDirs::default(),
            state: default_state_dir(),
            cache: None,
        }
    }
}

impl DeviceConfig {
    /// Reads `path`; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read device config {}", path.display()))?;
        let mut config: Self = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}", e.to_string().trim_end()))
            .with_context(|| format!("invalid device config {}", path.display()))?;
        anyhow::ensure!(
            MAX_REPORT_RANGE.contains(&config.mqtt.max_report_bytes),
            "invalid device config {}: [mqtt] max_report_bytes = {} is outside {}..={}",
            path.display(),
            config.mqtt.max_report_bytes,
            MAX_REPORT_RANGE.start(),
            MAX_REPORT_RANGE.end()
        );
        let base = path.parent().unwrap_or(Path::new("."));
        config.paths.resolve_against(base);
        let mqtt = &mut config.mqtt;
        let files = [
            &mut mqtt.password_file,
            &mut mqtt.ca_file,
            &mut mqtt.cert_file,
            &mut mqtt.key_file,
            &mut config.trust.root,
            &mut config.download.ca_file,
        ];
        for file in files.into_iter().flatten() {
            if file.is_relative() {
                *file = base.join(&*file);
            }
        }
        for (name, grant) in &mut config.handlers {
            for target in grant.mounts.values_mut() {
                if target.is_relative() {
                    *target = base.join(&*target);
                }
            }
            grant.check().with_context(|| {
                format!(
                    "invalid device config {}: [handlers.{name}]",
                    path.display()
                )
            })?;
        }
        Ok(config)
    }

    /// The device id (`[device] id`), required to run.
    pub fn device_id(&self) -> Result<&str> {
        self.device
            .id
            .as_deref()
            .context("device.toml has no `[device] id`")
    }

    /// The directory of precompiled handlers.
    pub fn cache_dir(&self) -> PathBuf {
        self.paths
            .cache
            .clone()
            .unwrap_or_else(|| self.paths.state.join("cache"))
    }
}

impl PathsSection {
    fn resolve_against(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        self.handlers.0.iter_mut().for_each(fix);
        fix(&mut self.state);
        if let Some(cache) = &mut self.cache {
            fix(cache);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_follow_the_config_file_and_unknown_fields_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("device.toml");
        std::fs::write(
            &path,
            "[paths]\nhandlers = \"h\"\n[handlers.file]\nmemory_mb = 8\n",
        )
        .expect("write");
        let config = DeviceConfig::load(&path).expect("valid config");
        assert_eq!(config.paths.handlers.as_slice(), [dir.path().join("h")]);
        assert_eq!(config.cache_dir(), PathBuf::from("/var/lib/otabox/cache"));
        assert_eq!(config.handlers["file"].memory_mb, Some(8));

        std::fs::write(&path, "[handlers.file]\nmemroy_mb = 8\n").expect("write");
        let err = format!("{:#}", DeviceConfig::load(&path).unwrap_err());
        assert!(
            err.contains("device.toml") && err.contains("unknown field `memroy_mb`"),
            "{err}"
        );
    }

    #[test]
    fn handler_directories_are_a_list_or_one_string_and_default_to_packaged_then_integrator() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("device.toml");
        let load = |text: &str| {
            std::fs::write(&path, text).expect("write");
            DeviceConfig::load(&path).map_err(|e| format!("{e:#}"))
        };
        let list = load("[paths]\nhandlers = [\"/usr/lib/otabox/handlers\", \"local\"]\n")
            .expect("a list");
        assert_eq!(
            list.paths.handlers.as_slice(),
            [
                PathBuf::from("/usr/lib/otabox/handlers"),
                dir.path().join("local")
            ]
        );
        assert_eq!(list.paths.handlers.integrator(), dir.path().join("local"));
        let one = load("[paths]\nhandlers = \"/srv/h\"\n").expect("one string");
        assert_eq!(one.paths.handlers.as_slice(), [PathBuf::from("/srv/h")]);
        assert_eq!(one.paths.handlers.integrator(), Path::new("/srv/h"));
        let default = load("").expect("no [paths]");
        assert_eq!(
            default.paths.handlers.as_slice(),
            [
                PathBuf::from("/usr/lib/otabox/handlers"),
                PathBuf::from("/etc/otabox/handlers.d")
            ]
        );
        for (text, expected) in [
            ("[paths]\nhandlers = []\n", "lists no handler directory"),
            ("[paths]\nhandlers = [\"a\", \"a\"]\n", "lists a twice"),
            (
                "[paths]\nhandlers = 7\n",
                "a directory, or a list of directories",
            ),
        ] {
            let err = load(text).expect_err(text);
            assert!(
                err.contains("device.toml") && err.contains(expected),
                "{text}: {err}"
            );
        }
    }
}
