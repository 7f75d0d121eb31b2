//! Builds the handlers this binary embeds (the `file` handler) to
//! `wasm32-wasip2` as part of the normal build and exports their directory
//! to the crate as `OTABOX_BUILT_HANDLERS`. The other first-party handlers
//! and the test guests are built by the `otabox-test-guests`
//! dev-dependency into the same directory, so only builds of the tests and
//! benchmarks pay for them (see `build/guests.rs`).

#[path = "build/guests.rs"]
mod guests;

use std::path::PathBuf;

/// The guests the binary embeds (see `builtin` in `src/lib.rs`).
const EMBEDDED: &[guests::Guest] = &[("otabox-handler-file", "file", "handlers/file/file.toml")];

fn main() {
    let manifest_dir =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().expect("host/ has a parent");
    let dir = guests::build_and_package(workspace, EMBEDDED, &["handlers/file"]);
    println!("cargo:rustc-env=OTABOX_BUILT_HANDLERS={}", dir.display());
    pack_relative_relocations();
    // The packaged binary's link reads these (`make deb`, see
    // packaging/link-ordered): a new list links it anew.
    for file in ["packaging/idle-functions.txt", "packaging/link-ordered"] {
        println!("cargo:rerun-if-changed={}", workspace.join(file).display());
    }
}

/// Links the binary with its relative relocations packed (DT_RELR, glibc
/// 2.36+, binutils 2.38+): the table the loader reads at every start shrinks
/// from half a megabyte to a few kilobytes, on disk and in resident memory.
/// The package's libc dependency follows from the symbol version it adds.
fn pack_relative_relocations() {
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu" {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}
