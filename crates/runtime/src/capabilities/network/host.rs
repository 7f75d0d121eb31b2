//! Socket access for handlers that declare network hosts: outgoing TCP to
//! the granted hosts only (by name or address, any port when none is given).
//! Listening, explicit binds and UDP are refused. Name lookups answer only
//! the names the grants list: any other name fails without the host asking
//! the resolver, so a guest cannot leak data through DNS queries.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p2::bindings::sockets::ip_name_lookup::{
    Host as NameLookupHost, HostResolveAddressStream, ResolveAddressStream,
};
use wasmtime_wasi::p2::bindings::sockets::network::{self, ErrorCode, IpAddress, Network};
use wasmtime_wasi::p2::{DynPollable, SocketError};
use wasmtime_wasi::sockets::{SocketAddrUse, WasiSocketsCtxView, WasiSocketsView};

use crate::HostState;
use crate::capabilities::Grants;

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

/// Whether `name` is an address literal (no lookup needed): `127.0.0.1`,
/// `::1` or `[::1]`.
fn is_address(name: &str) -> bool {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    bare.parse::<IpAddr>().is_ok()
}

/// The grants' spelling of `name` when it is one of their host names
/// (compared case-insensitively, a trailing dot ignored).
fn granted_name(grants: &Grants, name: &str) -> Option<String> {
    let wanted = name.strip_suffix('.').unwrap_or(name);
    grants
        .network
        .iter()
        .map(|entry| parse(entry).host)
        .find(|host| host.eq_ignore_ascii_case(wanted))
}

/// `wasi:sockets/ip-name-lookup` limited to the granted names.
pub struct GrantedNames;

impl HasData for GrantedNames {
    type Data<'a> = NameLookup<'a>;
}

/// The sockets of a call and the grants its lookups are checked against.
pub struct NameLookup<'a> {
    sockets: WasiSocketsCtxView<'a>,
    grants: Arc<Grants>,
}

impl HostState {
    /// The name-lookup view of this call.
    pub(crate) fn name_lookup(&mut self) -> NameLookup<'_> {
        let grants = self.grants.clone();
        NameLookup {
            sockets: self.sockets(),
            grants,
        }
    }
}

impl NameLookupHost for NameLookup<'_> {
    fn resolve_addresses(
        &mut self,
        network: Resource<Network>,
        name: String,
    ) -> Result<Resource<ResolveAddressStream>, SocketError> {
        if is_address(&name) {
            return self.sockets.resolve_addresses(network, name);
        }
        // Only the grants' own spelling ever reaches the resolver.
        match granted_name(&self.grants, &name) {
            Some(granted) => self.sockets.resolve_addresses(network, granted),
            None => {
                tracing::warn!("denied a lookup of {name:?}: not a granted host name");
                Err(ErrorCode::PermanentResolverFailure.into())
            }
        }
    }
}

impl network::Host for NameLookup<'_> {
    fn convert_error_code(&mut self, error: SocketError) -> wasmtime::Result<ErrorCode> {
        network::Host::convert_error_code(&mut self.sockets, error)
    }

    fn network_error_code(
        &mut self,
        err: Resource<wasmtime_wasi_io::bindings::wasi::io::error::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        network::Host::network_error_code(&mut self.sockets, err)
    }
}

impl network::HostNetwork for NameLookup<'_> {
    fn drop(&mut self, this: Resource<Network>) -> wasmtime::Result<()> {
        network::HostNetwork::drop(&mut self.sockets, this)
    }
}

impl HostResolveAddressStream for NameLookup<'_> {
    fn resolve_next_address(
        &mut self,
        stream: Resource<ResolveAddressStream>,
    ) -> Result<Option<IpAddress>, SocketError> {
        self.sockets.resolve_next_address(stream)
    }

    fn subscribe(
        &mut self,
        stream: Resource<ResolveAddressStream>,
    ) -> wasmtime::Result<Resource<DynPollable>> {
        HostResolveAddressStream::subscribe(&mut self.sockets, stream)
    }

    fn drop(&mut self, stream: Resource<ResolveAddressStream>) -> wasmtime::Result<()> {
        HostResolveAddressStream::drop(&mut self.sockets, stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_granted_names_and_literal_addresses_pass() {
        let grants = Grants {
            paths: vec![],
            commands: vec![],
            devices: vec![],
            network: vec!["updates.example:443".into(), "10.0.0.1".into()],
            limits: crate::capabilities::Limits::default(),
            stubbed: vec![],
            command_isolation: Default::default(),
        };
        for name in ["updates.example", "UPDATES.example", "updates.example."] {
            assert_eq!(
                granted_name(&grants, name).as_deref(),
                Some("updates.example"),
                "{name}"
            );
        }
        for name in [
            "localhost",
            "x.updates.example",
            "updates.example..",
            "443",
            "",
        ] {
            assert_eq!(granted_name(&grants, name), None, "{name}");
        }
        for name in ["127.0.0.1", "::1", "[::1]"] {
            assert!(is_address(name), "{name}");
        }
        for name in ["2130706433", "0x7f.1", "localhost", "[localhost]"] {
            assert!(!is_address(name), "{name}");
        }
    }
}
