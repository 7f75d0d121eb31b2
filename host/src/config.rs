//! The device configuration file (`device.toml`).
//!
//! ```toml
//! [device]
//! id = "pump-0042"
//!
//! [paths]
//! handlers = "/etc/otabox/handlers"   # <name>.toml + <name>.wasm
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

use crate::capabilities::DeviceGrant;

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

/// The `[mqtt]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSection {
    /// Broker host name or address.
    #[serde(default = "default_host")]
    pub host: String,
    /// Broker port (1883 plain, 8883 TLS by convention).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Topic layout: `iot-atlas` or `aws-shadow`.
    #[serde(default)]
    pub layout: crate::cloud::TopicLayout,
    /// MQTT client id (default: the device id).
    #[serde(default)]
    pub client_id: Option<String>,
    /// User name, when the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password (never the password itself in this file).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA certificate (PEM) of the broker: setting it turns TLS on.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Keep-alive interval in seconds.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    /// Largest delta accepted, in bytes.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
    /// Largest report the agent publishes, in bytes; a larger reported
    /// state is trimmed to fit (see `ReportedState::bounded_payload`).
    /// Keep it below the broker's maximum packet size.
    #[serde(default = "default_max_report")]
    pub max_report_bytes: usize,
    /// First reconnect delay in milliseconds (doubles up to the maximum).
    #[serde(default = "default_backoff_min")]
    pub reconnect_min_ms: u64,
    /// Longest reconnect delay in milliseconds.
    #[serde(default = "default_backoff_max")]
    pub reconnect_max_ms: u64,
}

fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_port() -> u16 {
    1883
}
fn default_keep_alive() -> u64 {
    30
}
fn default_max_message() -> usize {
    crate::shadow::DEFAULT_MAX_MESSAGE
}
/// Default report limit: half of AWS IoT's 128 KiB message limit.
fn default_max_report() -> usize {
    64 << 10
}
/// Bounds of `max_report_bytes`: a minimal report always fits the lower
/// one; the upper one is the agent's own outgoing packet limit.
pub const MAX_REPORT_RANGE: std::ops::RangeInclusive<usize> = 4096..=(1 << 20);
fn default_backoff_min() -> u64 {
    500
}
fn default_backoff_max() -> u64 {
    30_000
}

impl Default for MqttSection {
    fn default() -> Self {
        Self {
            host: default_host(),
            port: default_port(),
            layout: Default::default(),
            client_id: None,
            username: None,
            password_file: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            keep_alive_secs: default_keep_alive(),
            max_message_bytes: default_max_message(),
            max_report_bytes: default_max_report(),
            reconnect_min_ms: default_backoff_min(),
            reconnect_max_ms: default_backoff_max(),
        }
    }
}

/// The `[paths]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PathsSection {
    /// Directory of handler manifests and components.
    #[serde(default = "default_handlers_dir")]
    pub handlers: PathBuf,
    /// Directory of durable agent state.
    #[serde(default = "default_state_dir")]
    pub state: PathBuf,
    /// Directory of precompiled handlers (default: `<state>/cache`).
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

fn default_handlers_dir() -> PathBuf {
    PathBuf::from("/etc/otabox/handlers")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/otabox")
}

impl Default for PathsSection {
    fn default() -> Self {
        Self {
            handlers: default_handlers_dir(),
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

/// A `[handlers.NAME]` table that names no handler of the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnknownHandler {
    /// The name the device config gives.
    pub name: String,
    /// The installed handler whose name is closest, when one is close.
    pub closest: Option<String>,
}

impl std::fmt::Display for UnknownHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device config `[handlers.{}]` names no installed handler",
            self.name
        )?;
        match &self.closest {
            Some(closest) => write!(f, " (did you mean `[handlers.{closest}]`?)"),
            None => Ok(()),
        }
    }
}

/// The `[handlers.NAME]` tables of `device` whose NAME has no manifest in
/// `manifests` (`NAME.toml` files), each with the closest installed name
/// (at most a third of its letters apart, and at least 2).
pub fn unknown_handlers(
    device: &BTreeMap<String, DeviceGrant>,
    manifests: &[PathBuf],
) -> Vec<UnknownHandler> {
    let known: Vec<String> = manifests
        .iter()
        .filter_map(|m| crate::runtime::handler_name(m).ok())
        .collect();
    device
        .keys()
        .filter(|name| !known.contains(name))
        .map(|name| UnknownHandler {
            name: name.clone(),
            closest: known
                .iter()
                .map(|k| (strsim::levenshtein(name, k), k))
                .filter(|(distance, _)| *distance <= (name.chars().count() / 3).max(2))
                .min()
                .map(|(_, k)| k.clone()),
        })
        .collect()
}

impl PathsSection {
    fn resolve_against(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.handlers);
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
    fn unknown_handler_names_get_the_closest_installed_one() {
        let grants: BTreeMap<String, DeviceGrant> = ["frmware", "file", "zzz", "fw"]
            .into_iter()
            .map(|n| (n.to_string(), DeviceGrant::default()))
            .collect();
        let manifests: Vec<PathBuf> = ["firmware", "file", "apt"]
            .into_iter()
            .map(|n| PathBuf::from(format!("/h/{n}.toml")))
            .collect();
        let unknown = unknown_handlers(&grants, &manifests);
        let shown: Vec<String> = unknown.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "device config `[handlers.frmware]` names no installed handler (did you mean `[handlers.firmware]`?)",
                "device config `[handlers.fw]` names no installed handler",
                "device config `[handlers.zzz]` names no installed handler",
            ]
        );
    }

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
        assert_eq!(config.paths.handlers, dir.path().join("h"));
        assert_eq!(config.cache_dir(), PathBuf::from("/var/lib/otabox/cache"));
        assert_eq!(config.handlers["file"].memory_mb, Some(8));

        std::fs::write(&path, "[handlers.file]\nmemroy_mb = 8\n").expect("write");
        let err = format!("{:#}", DeviceConfig::load(&path).unwrap_err());
        assert!(
            err.contains("device.toml") && err.contains("unknown field `memroy_mb`"),
            "{err}"
        );
    }
}
