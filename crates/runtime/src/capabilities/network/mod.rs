//! The network capability: `[network] hosts` a handler may connect to
//! over TCP, narrowed by the device's `network`, linked as `wasi:sockets`
//! with name lookups limited to the granted names (`host`).

mod host;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use wasmtime::component::Linker;
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p2::bindings::sockets;
use wasmtime_wasi::sockets::{WasiSockets, WasiSocketsView};

use super::{Capability, CapabilityUnit, DeviceGrant, Grants, HandlerManifest};
use crate::HostState;

/// The `[network]` table.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// `host` or `host:port` entries.
    #[serde(default)]
    pub hosts: Vec<String>,
}

/// The network capability.
pub struct Network;

impl CapabilityUnit for Network {
    fn kind(&self) -> Capability {
        Capability::Network
    }

    fn owns_import(&self, package: &str, _interface: &str) -> bool {
        package == "wasi:sockets"
    }

    fn noun(&self) -> &'static str {
        "network hosts"
    }

    fn summary_key(&self) -> &'static str {
        "network"
    }

    fn check_manifest(&self, manifest: &HandlerManifest) -> Result<()> {
        for (i, host) in manifest.network.hosts.iter().enumerate() {
            check_host(host).with_context(|| format!("field `network.hosts[{i}]`"))?;
        }
        Ok(())
    }

    fn declared(&self, manifest: &HandlerManifest) -> bool {
        !manifest.network.hosts.is_empty()
    }

    fn narrow(
        &self,
        manifest: &HandlerManifest,
        device: &DeviceGrant,
        grants: &mut Grants,
    ) -> Result<()> {
        grants.network = manifest
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
            .collect();
        Ok(())
    }

    fn granted(&self, grants: &Grants) -> bool {
        !grants.network.is_empty()
    }

    fn summarize(&self, grants: &Grants) -> Vec<String> {
        grants.network.clone()
    }

    /// `wasi:sockets`, checked per address against the granted hosts. UDP
    /// is linked (language runtimes import it wholesale) but refused at
    /// run time.
    fn add_to_linker(&self, l: &mut Linker<HostState>) -> Result<()> {
        sockets::tcp::add_to_linker::<HostState, WasiSockets>(l, HostState::sockets)?;
        sockets::udp::add_to_linker::<HostState, WasiSockets>(l, HostState::sockets)?;
        sockets::udp_create_socket::add_to_linker::<HostState, WasiSockets>(l, HostState::sockets)?;
        sockets::tcp_create_socket::add_to_linker::<HostState, WasiSockets>(l, HostState::sockets)?;
        sockets::instance_network::add_to_linker::<HostState, WasiSockets>(l, HostState::sockets)?;
        sockets::network::add_to_linker::<HostState, WasiSockets>(
            l,
            &Default::default(),
            HostState::sockets,
        )?;
        sockets::ip_name_lookup::add_to_linker::<HostState, host::GrantedNames>(
            l,
            HostState::name_lookup,
        )?;
        Ok(())
    }

    /// Sockets to the granted hosts only; none at all when none is granted.
    fn configure_wasi(&self, grants: &Grants, builder: &mut WasiCtxBuilder) -> Result<()> {
        if grants.network.is_empty() {
            host::refuse_all(builder);
        } else {
            host::allow_hosts(builder, &grants.network);
        }
        Ok(())
    }
}

fn check_host(host: &str) -> Result<()> {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
    {
        bail!("{host:?} is not `host` or `host:port`");
    }
    if let Some(p) = port {
        p.parse::<u16>()
            .with_context(|| format!("{host:?} has a bad port"))?;
    }
    Ok(())
}
