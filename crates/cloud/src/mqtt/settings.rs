//! The `[mqtt]` table of the device config: the broker, the identity, the
//! layout and the session's limits (shared by the agent and the replica).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::TopicLayout;

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
    pub layout: TopicLayout,
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
    otabox_core::shadow::DEFAULT_MAX_MESSAGE
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
