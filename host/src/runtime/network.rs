//! Socket access for handlers that declare network hosts: outgoing TCP to
//! the granted hosts only (by name or address, any port when none is given).
//! Listening, explicit binds and UDP are refused.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::sockets::SocketAddrUse;

/// A granted `host` or `host:port`.
#[derive(Debug, Clone)]
struct AllowedHost {
    host: String,
    port: Option<u16>,
}

fn parse(entry: &str) -> AllowedHost {
    match entry
        .rsplit_once(':')
        .and_then(|(h, p)| p.parse().ok().map(|p| (h, p)))
    {
        Some((host, port)) => AllowedHost {
            host: host.to_string(),
            port: Some(port),
        },
        None => AllowedHost {
            host: entry.to_string(),
            port: None,
        },
    }
}

/// Refuses every socket and name lookup (no network granted; the sockets
/// interfaces are linked only when stubbed).
pub fn refuse_all(builder: &mut WasiCtxBuilder) {
    builder.allow_ip_name_lookup(false);
    builder.allow_tcp(false);
    builder.allow_udp(false);
}

/// Lets the guest resolve names and connect over TCP to `hosts` only.
pub fn allow_hosts(builder: &mut WasiCtxBuilder, hosts: &[String]) {
    let allowed: Arc<Vec<AllowedHost>> = Arc::new(hosts.iter().map(|h| parse(h)).collect());
    builder.allow_ip_name_lookup(true);
    builder.allow_tcp(true);
    builder.allow_udp(false);
    builder.socket_addr_check(move |addr, usage| {
        let allowed = allowed.clone();
        Box::pin(async move {
            match usage {
                SocketAddrUse::TcpConnect => permitted(&allowed, addr).await,
                // A connect first binds implicitly to an ephemeral port.
                SocketAddrUse::TcpBind => addr.ip().is_unspecified() && addr.port() == 0,
                _ => false,
            }
        })
    });
}

async fn permitted(allowed: &[AllowedHost], addr: SocketAddr) -> bool {
    for entry in allowed
        .iter()
        .filter(|e| e.port.is_none_or(|p| p == addr.port()))
    {
        let matches = match entry.host.parse::<IpAddr>() {
            Ok(ip) => ip == addr.ip(),
            Err(_) => tokio::net::lookup_host((entry.host.as_str(), addr.port()))
                .await
                .map(|mut resolved| resolved.any(|r| r.ip() == addr.ip()))
                .unwrap_or(false),
        };
        if matches {
            return true;
        }
    }
    false
}
