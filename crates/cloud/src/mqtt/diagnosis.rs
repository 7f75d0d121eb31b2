//! Why an MQTT connection fails, in words an integrator understands, and a
//! watch that logs each change of the connection's state once: a warning
//! when it cannot connect or drops (host, port and the likely cause), an
//! info line when it is back, and one warning when the broker keeps closing
//! the connection soon after accepting it (another client with the same
//! client id).

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rumqttc::{ConnectReturnCode, ConnectionError, StateError, SubAck, TlsError};
use rustls::{AlertDescription, CertificateError};

use crate::mqtt::MqttSection;

/// A connection the broker closes this soon after accepting it counts
/// towards the duplicate-client-id pattern.
const QUICK_CLOSE: Duration = Duration::from_secs(10);

/// Quick closes in a row taken for another client using the same id.
const DUPLICATE_AFTER: u32 = 3;

/// The broker end of a connection and what this side presents to it: what
/// a diagnosis names.
#[derive(Debug, Clone)]
pub struct Endpoint {
    host: String,
    port: u16,
    client_id: String,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    username: Option<String>,
}

/// The class of a connection failure: a new class is a new state, worth a
/// new warning; the same class again is a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Nothing listens on the port.
    Refused,
    /// The host name does not resolve.
    Unresolved,
    /// No route to the host, or no answer in time.
    Unreachable,
    /// The broker's certificate is not trusted.
    ServerCertificate,
    /// The broker refused this client's certificate.
    ClientCertificate,
    /// One side speaks TLS, the other does not.
    TlsMismatch,
    /// Another TLS failure.
    Tls,
    /// The broker refused the CONNECT (credentials, client id).
    Rejected,
    /// The broker closed the connection.
    Closed,
    /// The broker stopped answering.
    Silent,
    /// Anything else.
    Other,
}

/// A connection failure and its likely cause.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnosis {
    /// The class of failure.
    pub kind: FailureKind,
    /// The likely cause, in words, naming the setting to check.
    pub cause: String,
}

fn diagnosis(kind: FailureKind, cause: String) -> Diagnosis {
    Diagnosis { kind, cause }
}

impl Endpoint {
    /// The endpoint of `[mqtt]` for a client whose id defaults to
    /// `default_client_id`.
    pub fn new(cfg: &MqttSection, default_client_id: &str) -> Self {
        Self {
            host: cfg.host.clone(),
            port: cfg.port,
            client_id: super::client_id(cfg, default_client_id),
            ca_file: cfg.ca_file.clone(),
            cert_file: cfg.cert_file.clone(),
            username: cfg.username.clone(),
        }
    }

    /// The likely cause of `error`; `accepted` when the broker had accepted
    /// the connection (a CONNACK came) before it failed.
    pub fn diagnose(&self, error: &ConnectionError, accepted: bool) -> Diagnosis {
        use FailureKind::*;
        match error {
            ConnectionError::Io(e)
            | ConnectionError::MqttState(StateError::Io(e))
            | ConnectionError::Tls(TlsError::Io(e)) => self.io(e, accepted),
            ConnectionError::Tls(TlsError::TLS(e)) => self.tls(e),
            ConnectionError::Tls(TlsError::DNSName(_)) => diagnosis(
                Tls,
                format!(
                    "{:?} is not a name a TLS certificate can carry ([mqtt] host)",
                    self.host
                ),
            ),
            ConnectionError::Tls(e) => diagnosis(Tls, format!("TLS setup failed: {e}")),
            ConnectionError::MqttState(StateError::ConnectionAborted) => self.closed(accepted),
            ConnectionError::MqttState(StateError::AwaitPingResp) => diagnosis(
                Silent,
                "the broker stopped answering (a keep-alive ping went unanswered)".into(),
            ),
            ConnectionError::NetworkTimeout | ConnectionError::FlushTimeout => diagnosis(
                Unreachable,
                "no answer in time: a firewall drops the packets, or [mqtt] host and port are wrong"
                    .into(),
            ),
            ConnectionError::ConnectionRefused(code) => self.rejected(*code),
            other => diagnosis(Other, other.to_string()),
        }
    }

    /// `host:port`.
    fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    fn io(&self, e: &io::Error, accepted: bool) -> Diagnosis {
        use FailureKind::*;
        if let Some(tls) = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return self.tls(tls);
        }
        match e.kind() {
            io::ErrorKind::ConnectionRefused => diagnosis(
                Refused,
                format!(
                    "nothing listens on that port: is the broker running, and are [mqtt] host and port right? ({e})"
                ),
            ),
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe => self.closed(accepted),
            io::ErrorKind::TimedOut => diagnosis(
                Unreachable,
                format!("no answer: a firewall drops the packets, or [mqtt] host is wrong ({e})"),
            ),
            io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::NetworkDown
            | io::ErrorKind::AddrNotAvailable => diagnosis(
                Unreachable,
                format!("no route to the host: is the network up, and is [mqtt] host right? ({e})"),
            ),
            _ if e.to_string().contains("lookup address") => diagnosis(
                Unresolved,
                format!(
                    "the host name does not resolve: is [mqtt] host right, and DNS reachable? ({e})"
                ),
            ),
            _ => diagnosis(Other, e.to_string()),
        }
    }

    fn tls(&self, e: &rustls::Error) -> Diagnosis {
        use FailureKind::*;
        let ca = self
            .ca_file
            .as_ref()
            .map_or_else(|| "-".into(), |p| p.display().to_string());
        match e {
            // A bad signature: a CA of the same name, not the one that
            // issued the broker's certificate.
            rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            ) => diagnosis(
                ServerCertificate,
                format!(
                    "the broker's certificate is not signed by [mqtt] ca_file = {ca}: set ca_file to the CA that issued the broker's certificate ({e})"
                ),
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => diagnosis(
                ServerCertificate,
                format!(
                    "the broker's certificate is not issued for {:?}: set [mqtt] host to a name or address the certificate lists ({e})",
                    self.host
                ),
            ),
            rustls::Error::InvalidCertificate(
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. },
            ) => diagnosis(
                ServerCertificate,
                format!(
                    "the broker's certificate has expired or is not valid yet: is the device's clock right? ({e})"
                ),
            ),
            rustls::Error::InvalidCertificate(_) => diagnosis(
                ServerCertificate,
                format!("the broker's certificate is refused ({e})"),
            ),
            rustls::Error::AlertReceived(alert) if is_certificate_alert(*alert) => {
                let cause = match &self.cert_file {
                    Some(cert) => format!(
                        "the broker refused this device's certificate [mqtt] cert_file = {}: is it signed by a CA the broker trusts, and still valid? ({e})",
                        cert.display()
                    ),
                    None => format!(
                        "the broker wants a client certificate: set [mqtt] cert_file and key_file ({e})"
                    ),
                };
                diagnosis(ClientCertificate, cause)
            }
            rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
                diagnosis(
                    TlsMismatch,
                    format!(
                        "the port does not speak TLS: is [mqtt] port the broker's TLS listener? ({e})"
                    ),
                )
            }
            other => diagnosis(Tls, format!("the TLS handshake failed ({other})")),
        }
    }

    /// The connection was closed by the other end.
    fn closed(&self, accepted: bool) -> Diagnosis {
        let cause = if accepted {
            format!(
                "the broker closed the connection (a broker restart, or another client with the client id {:?} connected?)",
                self.client_id
            )
        } else if self.ca_file.is_some() {
            format!(
                "the broker closed the connection before accepting this client: is the port its TLS listener, and does it accept this device's certificate and client id {:?}?",
                self.client_id
            )
        } else {
            format!(
                "the broker closed the connection before accepting this client: does it expect TLS (set [mqtt] ca_file), or refuse the client id {:?}?",
                self.client_id
            )
        };
        diagnosis(FailureKind::Closed, cause)
    }

    fn rejected(&self, code: ConnectReturnCode) -> Diagnosis {
        let user = self.username.as_deref().unwrap_or("-");
        let cause = match code {
            ConnectReturnCode::BadUserNamePassword => format!(
                "the broker refused the user name or password ([mqtt] username = {user:?}, password_file)"
            ),
            ConnectReturnCode::NotAuthorized => format!(
                "the broker does not authorize this client (client id {:?}, user name {user:?}, or its certificate)",
                self.client_id
            ),
            ConnectReturnCode::BadClientId => {
                format!("the broker refused the client id {:?}", self.client_id)
            }
            ConnectReturnCode::ServiceUnavailable => "the broker says it is unavailable".into(),
            ConnectReturnCode::RefusedProtocolVersion => {
                "the broker does not accept MQTT 3.1.1".into()
            }
            ConnectReturnCode::Success => "the broker refused the connection".into(),
        };
        diagnosis(FailureKind::Rejected, cause)
    }
}

/// TLS alerts a server sends when it refuses the client's certificate.
fn is_certificate_alert(alert: AlertDescription) -> bool {
    matches!(
        alert,
        AlertDescription::BadCertificate
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::CertificateRevoked
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnknownCA
            | AlertDescription::AccessDenied
            | AlertDescription::CertificateRequired
    )
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Not connected yet.
    Starting,
    /// Accepted by the broker at `since`.
    Up { since: Instant },
    /// Failing with `kind` since `since`, `attempts` times.
    Down {
        kind: FailureKind,
        since: Instant,
        attempts: u32,
    },
}

/// Follows one connection and logs each change of its state once (a retry
/// failing the same way logs at debug only).
#[derive(Debug)]
pub struct ConnectionWatch {
    endpoint: Endpoint,
    state: State,
    /// Connections the broker closed soon after accepting them, in a row.
    quick_closes: u32,
    /// The duplicate-client-id warning was given for the current run of
    /// quick closes.
    duplicate_warned: bool,
    /// A refused subscription was reported.
    refusal_warned: bool,
}

impl ConnectionWatch {
    /// A watch of a connection to `endpoint`, not connected yet.
    pub fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            state: State::Starting,
            quick_closes: 0,
            duplicate_warned: false,
            refusal_warned: false,
        }
    }

    /// Whether the broker accepted the connection and it has not failed
    /// since.
    pub fn is_up(&self) -> bool {
        matches!(self.state, State::Up { .. })
    }

    /// The broker accepted the connection.
    pub fn connected(&mut self) {
        let at = self.endpoint.address();
        match self.state {
            State::Starting => tracing::info!("connected to {at}"),
            State::Down { .. } if self.duplicate_warned => {
                tracing::debug!("connected to {at} again")
            }
            State::Down {
                since, attempts, ..
            } => tracing::info!(
                "connected to {at} again after {:.1} s ({attempts} failed attempt(s))",
                since.elapsed().as_secs_f32()
            ),
            State::Up { .. } => {}
        }
        self.state = State::Up {
            since: Instant::now(),
        };
    }

    /// The connection shows signs of life (any event, keep-alive pings
    /// included): once it has held for a while after a reported run of
    /// quick closes, says it holds again (the reconnects of that run are
    /// logged at debug only).
    pub fn alive(&mut self) {
        if let State::Up { since } = self.state
            && self.duplicate_warned
            && since.elapsed() >= QUICK_CLOSE
        {
            self.duplicate_warned = false;
            self.quick_closes = 0;
            tracing::info!(
                "connected to {} again; the connection has held for {} s",
                self.endpoint.address(),
                since.elapsed().as_secs()
            );
        }
    }

    /// The connection failed or dropped with `error`; `sending` when a
    /// message was awaiting its acknowledgement (a broker that closes the
    /// connection over a message it refuses explains the close, so it does
    /// not count towards the duplicate-client-id pattern). Returns the
    /// diagnosis.
    pub fn failed(&mut self, error: &ConnectionError, sending: bool) -> Diagnosis {
        let found = self.endpoint.diagnose(error, self.is_up());
        let at = self.endpoint.address();
        match self.state {
            State::Up { since } => {
                self.count_close(found.kind, since.elapsed(), sending);
                if self.quick_closes >= DUPLICATE_AFTER && !self.duplicate_warned {
                    self.duplicate_warned = true;
                    tracing::warn!(
                        "the broker at {at} closed the connection {} times in a row within {} s of accepting it: another client probably uses the client id {:?} (duplicate client id); give each device its own id",
                        self.quick_closes,
                        QUICK_CLOSE.as_secs(),
                        self.endpoint.client_id
                    );
                } else if self.duplicate_warned {
                    tracing::debug!("connection lost ({at}): {}", found.cause);
                } else {
                    tracing::warn!("connection lost ({at}): {}; reconnecting", found.cause);
                }
                self.state = State::Down {
                    kind: found.kind,
                    since: Instant::now(),
                    attempts: 1,
                };
            }
            State::Down {
                kind,
                since,
                attempts,
            } => {
                if kind == found.kind {
                    tracing::debug!("still cannot connect to {at}: {}", found.cause);
                } else {
                    tracing::warn!("cannot connect to {at}: {}", found.cause);
                }
                self.state = State::Down {
                    kind: found.kind,
                    since,
                    attempts: attempts.saturating_add(1),
                };
            }
            State::Starting => {
                tracing::warn!("cannot connect to {at}: {}", found.cause);
                self.state = State::Down {
                    kind: found.kind,
                    since: Instant::now(),
                    attempts: 1,
                };
            }
        }
        found
    }

    /// Counts a close `after` the broker accepted the connection towards
    /// the duplicate-client-id pattern, or starts the count over.
    fn count_close(&mut self, kind: FailureKind, after: Duration, sending: bool) {
        if kind == FailureKind::Closed && after < QUICK_CLOSE && !sending {
            self.quick_closes = self.quick_closes.saturating_add(1);
        } else if after >= QUICK_CLOSE {
            self.quick_closes = 0;
            self.duplicate_warned = false;
        }
    }

    /// Checks a subscription acknowledgement: a refused subscription is
    /// reported once (the broker's ACL does not let this client read
    /// `topics`).
    pub fn subscribed(&mut self, ack: &SubAck, topics: &[&str]) {
        let refused = ack
            .return_codes
            .iter()
            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
        if !refused || self.refusal_warned {
            return;
        }
        self.refusal_warned = true;
        tracing::warn!(
            "the broker at {} refused a subscription of client {:?} (one of {}): its ACL does not let this client read them; {}",
            self.endpoint.address(),
            self.endpoint.client_id,
            topics.join(", "),
            self.endpoint.identity_hint()
        );
    }

    /// How the broker knows this client, for an ACL hint.
    pub fn identity_hint(&self) -> String {
        self.endpoint.identity_hint()
    }
}

impl Endpoint {
    /// How the broker likely names this client in its ACL.
    fn identity_hint(&self) -> String {
        match (&self.username, &self.cert_file) {
            (Some(user), _) => format!("the broker knows this client as user {user:?}"),
            (None, Some(cert)) => format!(
                "with a certificate the broker knows this client by the certificate's name (CN of [mqtt] cert_file = {})",
                cert.display()
            ),
            (None, None) => format!(
                "the broker knows this client by its client id {:?}",
                self.client_id
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint() -> Endpoint {
        Endpoint::new(
            &MqttSection {
                host: "broker.example".into(),
                port: 8883,
                ca_file: Some("/etc/otabox/ca.pem".into()),
                ..MqttSection::default()
            },
            "pump-1",
        )
    }

    /// An I/O error carrying a TLS error, as tokio-rustls reports them.
    fn tls_io(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn each_failure_names_the_likely_cause_and_the_setting_to_check() {
        use ConnectionError as E;
        let cases = [
            (
                E::Io(io::ErrorKind::ConnectionRefused.into()),
                FailureKind::Refused,
                "nothing listens on that port",
            ),
            (
                E::Tls(TlsError::Io(tls_io(rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer,
                )))),
                FailureKind::ServerCertificate,
                "not signed by [mqtt] ca_file = /etc/otabox/ca.pem",
            ),
            (
                E::MqttState(StateError::Io(tls_io(rustls::Error::AlertReceived(
                    AlertDescription::UnknownCA,
                )))),
                FailureKind::ClientCertificate,
                "set [mqtt] cert_file",
            ),
            (
                E::MqttState(StateError::ConnectionAborted),
                FailureKind::Closed,
                "client id \"pump-1\" connected?",
            ),
            (
                E::ConnectionRefused(ConnectReturnCode::BadUserNamePassword),
                FailureKind::Rejected,
                "user name or password",
            ),
            (
                E::Io(io::Error::other(
                    "failed to lookup address information: Name or service not known",
                )),
                FailureKind::Unresolved,
                "does not resolve",
            ),
        ];
        let ep = endpoint();
        for (error, kind, needle) in cases {
            let found = ep.diagnose(&error, true);
            assert_eq!(found.kind, kind, "{error}");
            assert!(found.cause.contains(needle), "{error}: {found:?}");
        }
    }

    #[test]
    fn a_refused_subscription_is_reported_once() {
        use rumqttc::SubscribeReasonCode::{Failure, Success};
        let mut watch = ConnectionWatch::new(endpoint());
        watch.subscribed(
            &SubAck::new(1, vec![Success(rumqttc::QoS::AtLeastOnce)]),
            &["a"],
        );
        assert!(!watch.refusal_warned);
        watch.subscribed(&SubAck::new(2, vec![Failure]), &["a"]);
        assert!(watch.refusal_warned);
    }

    #[test]
    fn quick_closes_in_a_row_are_counted_and_a_long_connection_starts_over() {
        let mut watch = ConnectionWatch::new(endpoint());
        let closed = ConnectionError::MqttState(StateError::ConnectionAborted);
        for _ in 0..DUPLICATE_AFTER {
            watch.connected();
            watch.failed(&closed, false);
        }
        assert!(watch.duplicate_warned);
        watch.count_close(FailureKind::Closed, QUICK_CLOSE, false);
        assert_eq!((watch.quick_closes, watch.duplicate_warned), (0, false));
        // A connection that holds after the warning ends the run.
        watch.duplicate_warned = true;
        watch.connected();
        watch.alive();
        assert!(watch.duplicate_warned, "not held long enough yet");
        watch.state = State::Up {
            since: Instant::now() - QUICK_CLOSE,
        };
        watch.alive();
        assert!(!watch.duplicate_warned);
        // A close over a message in flight is explained by that message.
        watch.connected();
        watch.failed(&closed, true);
        assert_eq!(watch.quick_closes, 0);
    }
}
