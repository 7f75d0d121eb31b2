//! One linker per handler, holding the baseline interfaces and only those
//! of the capabilities its grants allow (or its manifest stubs, linked with
//! nothing granted): a component that imports anything else cannot be
//! instantiated. Each capability links its own interfaces
//! ([`CapabilityUnit::add_to_linker`](crate::capabilities::CapabilityUnit::add_to_linker)).

use anyhow::Result;
use wasmtime::Engine;
use wasmtime::component::{HasSelf, Linker};
use wasmtime_wasi::cli::WasiCli;
use wasmtime_wasi::cli::WasiCliView;
use wasmtime_wasi::clocks::WasiClocks;
use wasmtime_wasi::clocks::WasiClocksView;
use wasmtime_wasi::p2::bindings::{cli, clocks, random};
use wasmtime_wasi::random::{WasiRandom, WasiRandomView};

use super::bindings::otabox::handler::{checkpoint, context, payloads, types};
use super::state::HostState;
use crate::capabilities::{self, Grants};

/// Builds the linker for a handler with `grants`.
pub fn build(engine: &Engine, grants: &Grants) -> Result<Linker<HostState>> {
    let mut l = Linker::new(engine);
    add_baseline(&mut l)?;
    for unit in capabilities::ALL {
        if grants.links(unit.kind()) {
            unit.add_to_linker(&mut l)?;
        }
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
