//! One linker per handler, holding only the interfaces its grants allow (or
//! its manifest stubs, linked with nothing granted): a component that
//! imports anything else cannot be instantiated.

use anyhow::Result;
use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker};
use wasmtime_wasi::cli::WasiCli;
use wasmtime_wasi::cli::WasiCliView;
use wasmtime_wasi::clocks::WasiClocks;
use wasmtime_wasi::clocks::WasiClocksView;
use wasmtime_wasi::filesystem::WasiFilesystem;
use wasmtime_wasi::filesystem::WasiFilesystemView;
use wasmtime_wasi::p2::bindings::{cli, clocks, filesystem, random, sockets};
use wasmtime_wasi::random::{WasiRandom, WasiRandomView};
use wasmtime_wasi::sockets::WasiSockets;
use wasmtime_wasi::sockets::WasiSocketsView;

use super::bindings::otabox::handler::{checkpoint, context, devices, payloads, process, types};
use super::network::GrantedNames;
use super::state::HostState;
use crate::capabilities::{Capability, Grants};

/// Builds the linker for a handler with `grants`.
pub fn build(engine: &Engine, grants: &Grants) -> Result<Linker<HostState>> {
    let mut l = Linker::new(engine);
    add_baseline(&mut l)?;
    if grants.links(Capability::Filesystem) {
        filesystem::types::add_to_linker::<HostState, WasiFilesystem>(
            &mut l,
            HostState::filesystem,
        )?;
        filesystem::preopens::add_to_linker::<HostState, WasiFilesystem>(
            &mut l,
            HostState::filesystem,
        )?;
    }
    if grants.links(Capability::Process) {
        process::add_to_linker::<HostState, HasSelf<HostState>>(&mut l, |s| s)?;
    }
    if grants.links(Capability::Network) {
        add_network(&mut l)?;
    }
    if grants.links(Capability::Devices) {
        devices::add_to_linker::<HostState, HasSelf<HostState>>(&mut l, |s| s)?;
    }
    Ok(l)
}

/// Interfaces that grant nothing: otabox context, payloads, checkpoints;
/// WASI io, clocks, random, stdio, environment and exit.
fn add_baseline(l: &mut Linker<HostState>) -> Result<()> {
    types::add_to_linker::<HostState, HasSelf<HostState>>(l, |s| s)?;
    context::add_to_linker::<HostState, HasSelf<HostState>>(l, |s| s)?;
    payloads::add_to_linker::<HostState, HasSelf<HostState>>(l, |s| s)?;
    checkpoint::add_to_linker::<HostState, HasSelf<HostState>>(l, |s| s)?;
    wasmtime_wasi_io::add_to_linker_async(l)?;
    clocks::wall_clock::add_to_linker::<HostState, WasiClocks>(l, HostState::clocks)?;
    clocks::monotonic_clock::add_to_linker::<HostState, WasiClocks>(l, HostState::clocks)?;
    random::random::add_to_linker::<HostState, WasiRandom>(l, HostState::random)?;
    random::insecure::add_to_linker::<HostState, WasiRandom>(l, HostState::random)?;
    random::insecure_seed::add_to_linker::<HostState, WasiRandom>(l, HostState::random)?;
    cli::exit::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::environment::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stdin::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stdout::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::stderr::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_input::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_output::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdin::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stdout::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    cli::terminal_stderr::add_to_linker::<HostState, WasiCli>(l, HostState::cli)?;
    Ok(())
}

/// `wasi:sockets`, checked per address against the granted hosts. UDP is
/// linked (language runtimes import it wholesale) but refused at run time.
fn add_network(l: &mut Linker<HostState>) -> Result<()> {
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
    sockets::ip_name_lookup::add_to_linker::<HostState, GrantedNames>(l, HostState::name_lookup)?;
    Ok(())
}
