//! `otabox-component`: the two steps a C handler build needs besides the C
//! compiler, with the same crates as `wit-bindgen c` and `wasm-tools
//! component new`:
//!
//! ```sh
//! otabox-component c-bindings --wit examples/handlers/wit --world handler --out gen/
//! zig cc --target=wasm32-wasi -mexec-model=reactor ... -o core.wasm
//! otabox-component new core.wasm --out config-file.wasm
//! ```

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Step,
}

#[derive(Subcommand)]
enum Step {
    /// Generates C bindings (`<world>.c`, `<world>.h` and the
    /// `<world>_component_type.o` that carries the world into the module).
    CBindings {
        /// A WIT directory (its `deps/` are resolved too).
        #[arg(long)]
        wit: PathBuf,
        /// The world to bind, such as `handler`.
        #[arg(long)]
        world: String,
        /// Where to write the files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Wraps a core module built for wasm32-wasi (preview1, reactor) into a
    /// component with the WASI preview1 adapter of the host's wasmtime.
    New {
        /// The core module.
        module: PathBuf,
        /// The component to write.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Step::CBindings { wit, world, out } => c_bindings(&wit, &world, &out),
        Step::New { module, out } => new_component(&module, &out),
    }
}

fn c_bindings(wit: &std::path::Path, world: &str, out: &std::path::Path) -> Result<()> {
    let mut resolve = wit_bindgen_core::wit_parser::Resolve::default();
    let (package, _) = resolve
        .push_dir(wit)
        .with_context(|| format!("cannot read WIT from {}", wit.display()))?;
    let world = resolve
        .select_world(&[package], Some(world))
        .with_context(|| format!("no world {world} in {}", wit.display()))?;
    let mut files = wit_bindgen_core::Files::default();
    wit_bindgen_c::Opts::default()
        .build()
        .generate(&resolve, world, &mut files)
        .context("cannot generate C bindings")?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    for (name, contents) in files.iter() {
        let path = out.join(name);
        std::fs::write(&path, contents)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn new_component(module: &std::path::Path, out: &std::path::Path) -> Result<()> {
    let core =
        std::fs::read(module).with_context(|| format!("cannot read {}", module.display()))?;
    let component = wit_component::ComponentEncoder::default()
        .module(&core)
        .context("the module carries no component type (link the bindings' _component_type.o)")?
        .validate(true)
        .adapter(
            "wasi_snapshot_preview1",
            wasi_preview1_component_adapter_provider::WASI_SNAPSHOT_PREVIEW1_REACTOR_ADAPTER,
        )
        .context("the preview1 adapter")?
        .encode()
        .context("cannot build the component")?;
    std::fs::write(out, component).with_context(|| format!("cannot write {}", out.display()))
}
