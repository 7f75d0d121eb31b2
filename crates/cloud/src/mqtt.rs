//! The MQTT connection: options from `[mqtt]` (TCP, TLS with a custom CA,
//! mutual TLS, user name and password), a persistent session, the
//! reconnect backoff, the device's presence (a retained `online` at each
//! connect, `offline` as its last will), and what a failing connection is
//! logged as ([`ConnectionWatch`]).

mod diagnosis;
mod settings;

pub use diagnosis::{ConnectionWatch, Diagnosis, Endpoint, FailureKind};
pub use settings::{MAX_REPORT_RANGE, MqttSection};

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rumqttc::{AsyncClient, LastWill, MqttOptions, QoS, TlsConfiguration, Transport};

use crate::{Link, OFFLINE, ONLINE};

/// Largest MQTT packet the agent reads (16 MiB).
pub const MAX_PACKET: usize = 16 << 20;

/// The client id of a connection: `[mqtt] client_id`, or `default`.
pub fn client_id(cfg: &MqttSection, default: &str) -> String {
    cfg.client_id.clone().unwrap_or_else(|| default.to_string())
}

/// Builds the connection options of the device `device_id`: those of
/// [`service_options`], and in a layout with a presence topic the last
/// will [`OFFLINE`] there (retained), which the broker publishes when the
/// connection ends without an MQTT DISCONNECT (a crash, a lost network,
/// a stopped agent).
pub fn options(cfg: &MqttSection, device_id: &str) -> Result<MqttOptions> {
    let mut opts = service_options(cfg, device_id)?;
    if let Some(topic) = cfg.layout.cloud().presence_topic(device_id) {
        crate::check_device_id(device_id)?;
        opts.set_last_will(LastWill::new(topic, OFFLINE, QoS::AtLeastOnce, true));
    }
    Ok(opts)
}

/// Announces the device [`ONLINE`] (retained) on its presence topic, in a
/// layout that has one: at each ConnAck. At most once: only the outbox's
/// publishes carry a packet id, so none is taken for the report in flight
/// (a lost announcement is made again at the next connection).
pub async fn announce_online(client: &AsyncClient, link: &Link) -> Result<()> {
    if let Some(topic) = link.presence_topic() {
        client
            .publish(topic, QoS::AtMostOnce, true, ONLINE)
            .await
            .context("cannot announce the device online")?;
    }
    Ok(())
}

/// Builds the connection options of a client whose id is `[mqtt]
/// client_id` or `default_id`, without a last will (the replica's).
pub fn service_options(cfg: &MqttSection, default_id: &str) -> Result<MqttOptions> {
    let client_id = client_id(cfg, default_id);
    let mut opts = MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
    opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs.max(5)));
    // A persistent session: QoS 1 deltas sent while we were away arrive on
    // reconnect, and we ack a delta only once it is journaled.
    opts.set_clean_session(false);
    opts.set_manual_acks(true);
    // The transport limit sits far above the delta cap: an oversize delta
    // must reach `parse_delta` to be rejected and reported. A packet over
    // the transport limit would drop the connection, and a persistent
    // session would redeliver it at every reconnect.
    opts.set_max_packet_size(
        MAX_PACKET.max(cfg.max_message_bytes.saturating_mul(4)),
        *MAX_REPORT_RANGE.end(),
    );
    if let Some(user) = &cfg.username {
        let password = match &cfg.password_file {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("cannot read mqtt.password_file {}", file.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            None => String::new(),
        };
        opts.set_credentials(user.clone(), password);
    }
    if cfg.ca_file.is_some() {
        opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_config(cfg)?),
        )));
    } else if cfg.cert_file.is_some() || cfg.key_file.is_some() {
        bail!("mqtt.cert_file/key_file need mqtt.ca_file (mutual TLS runs over TLS)");
    }
    Ok(opts)
}

fn tls_config(cfg: &MqttSection) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = &cfg.ca_file {
        for cert in read_certs(ca)? {
            roots
                .add(cert)
                .with_context(|| format!("mqtt.ca_file {}: unusable certificate", ca.display()))?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots);
    match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            let key_der = rustls_pemfile::private_key(&mut std::io::BufReader::new(
                std::fs::File::open(key)
                    .with_context(|| format!("cannot open mqtt.key_file {}", key.display()))?,
            ))
            .with_context(|| format!("mqtt.key_file {} is not PEM", key.display()))?
            .with_context(|| format!("mqtt.key_file {} holds no private key", key.display()))?;
            builder
                .with_client_auth_cert(read_certs(cert)?, key_der)
                .context("client certificate and key do not match")
        }
        (None, None) => Ok(builder.with_no_client_auth()),
        _ => bail!("mutual TLS needs both mqtt.cert_file and mqtt.key_file"),
    }
}

fn read_certs(path: &std::path::Path) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(file))
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} is not PEM", path.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", path.display());
    }
    Ok(certs)
}

/// Socket options of the session: no Nagle delay, since every exchange is a
/// small request/ack pair (it cost ~80 ms per delta → ack here).
pub fn network_options() -> rumqttc::NetworkOptions {
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    net
}

/// Exponential backoff with full jitter between reconnect attempts.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Starts at `min` and doubles up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            current: min,
        }
    }

    /// The next delay: uniformly random in [current/2, current], then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.current.as_millis() as u64;
        let delay = Duration::from_millis(fastrand::u64(ceiling / 2..=ceiling.max(1)));
        self.current = (self.current * 2).min(self.max);
        delay
    }

    /// Back to the first delay (after a successful connect).
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let delays: Vec<u64> = (0..6).map(|_| b.next_delay().as_millis() as u64).collect();
        for (delay, ceiling) in delays.iter().zip([100, 200, 400, 800, 800, 800]) {
            assert!(*delay >= ceiling / 2 && *delay <= ceiling, "{delays:?}");
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn a_device_leaves_a_retained_offline_will_where_its_layout_has_a_presence_topic() {
        let cfg = MqttSection::default();
        let will = options(&cfg, "dev-1").expect("options").last_will();
        let will = will.expect("a last will");
        assert_eq!(
            (
                will.topic.as_str(),
                &will.message[..],
                will.retain,
                will.qos
            ),
            (
                "state/dev-1/connection",
                OFFLINE.as_bytes(),
                true,
                QoS::AtLeastOnce
            )
        );
        let aws = MqttSection {
            layout: crate::TopicLayout::AwsShadow,
            ..MqttSection::default()
        };
        assert!(
            options(&aws, "dev-1")
                .expect("options")
                .last_will()
                .is_none()
        );
        let replica = service_options(&cfg, "otabox-replica").expect("options");
        assert!(replica.last_will().is_none(), "the replica leaves none");
        assert!(options(&cfg, "a/#").is_err(), "no will on a wildcard topic");
    }

    #[test]
    fn mutual_tls_without_a_ca_is_refused() {
        let cfg = MqttSection {
            cert_file: Some("/c.pem".into()),
            ..MqttSection::default()
        };
        assert!(format!("{:#}", options(&cfg, "dev").unwrap_err()).contains("need mqtt.ca_file"));
    }
}
