//! Shared by the build scripts of `otabox` (the handlers the binary embeds)
//! and `otabox-test-guests` (the other handlers and the test guests, a
//! dev-dependency, so `cargo run -p otabox` does not build them): compiles
//! guest crates to `wasm32-wasip2` and packages each as `<name>.wasm` plus a
//! `<name>.toml` capability manifest pinned to the wasm's sha256, in one
//! directory per target directory (see [`packaged_dir`]).
//!
//! The nested cargo uses its own target directory (beside the outer one) so
//! it never waits on the outer build's lock. Set `OTABOX_SKIP_WASM_BUILD=1`
//! to skip it (the handlers are then empty files and the tests that need
//! them fail with a clear message).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// A guest: (cargo package, handler name, manifest in the source tree).
pub type Guest = (&'static str, &'static str, &'static str);

const WASM_TARGET: &str = "wasm32-wasip2";

/// Builds and packages `guests` of `workspace`; `sources` are the paths
/// (relative to the workspace) whose changes rebuild them. Returns the
/// directory of the packaged handlers.
pub fn build_and_package(workspace: &Path, guests: &[Guest], sources: &[&str]) -> PathBuf {
    let out = packaged_dir();
    fs::create_dir_all(&out).expect("create the packaged handlers directory");
    println!("cargo:rerun-if-env-changed=OTABOX_SKIP_WASM_BUILD");
    for path in sources.iter().chain(&["sdk", "Cargo.lock"]) {
        println!("cargo:rerun-if-changed={}", workspace.join(path).display());
    }
    if env::var_os("OTABOX_SKIP_WASM_BUILD").is_some() {
        for (_, name, _) in guests {
            write_if_changed(&out.join(format!("{name}.wasm")), b"");
            write_if_changed(&out.join(format!("{name}.toml")), b"");
        }
        return out;
    }
    ensure_wasm_target();
    let wasm_dir = guest_target_dir().join(WASM_TARGET).join("release");
    for (package, name, manifest) in guests {
        build_guest(workspace, package);
        let wasm = wasm_dir.join(format!("{}.wasm", package.replace('-', "_")));
        package_handler(&wasm, &workspace.join(manifest), &out, name);
    }
    out
}

/// Where the packaged handlers of this target directory live:
/// `<target>/wasm-guests/handlers` (shared by both build scripts, so the
/// tests find every handler in one place).
fn packaged_dir() -> PathBuf {
    guest_target_dir().join("handlers")
}

/// The nested cargo's target directory, beside the outer build's.
fn guest_target_dir() -> PathBuf {
    outer_target_dir().join("wasm-guests")
}

/// Installs the wasm32-wasip2 standard library through rustup when missing.
fn ensure_wasm_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .expect("run rustc --print sysroot");
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(WASM_TARGET).exists() {
        return;
    }
    println!("cargo:warning=installing the {WASM_TARGET} target with rustup");
    let status = Command::new("rustup")
        .args(["target", "add", WASM_TARGET])
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        panic!(
            "the {WASM_TARGET} target is missing and `rustup target add {WASM_TARGET}` failed; install it and rebuild"
        );
    }
}

/// Compiles `package` as a `cdylib` for wasm32-wasip2 (the crates are plain
/// libraries natively, so their unit tests run with the workspace).
fn build_guest(workspace: &Path, package: &str) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args([
            "rustc",
            "--lib",
            "--crate-type",
            "cdylib",
            "--release",
            "--target",
            WASM_TARGET,
            "-p",
            package,
        ])
        .arg("--target-dir")
        .arg(guest_target_dir())
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"));
    // Nothing of the outer build's configuration may leak into the guests'.
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        let outer = key.starts_with("CARGO_")
            && !matches!(&*key, "CARGO_HOME" | "CARGO_NET_OFFLINE")
            || matches!(
                &*key,
                "RUSTFLAGS"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "OPT_LEVEL"
                    | "PROFILE"
                    | "DEBUG"
                    | "NUM_JOBS"
                    | "RUSTDOC"
            );
        if outer {
            cmd.env_remove(&*key);
        }
    }
    let status = cmd.status().expect("run cargo for the wasm guests");
    if !status.success() {
        panic!("building the wasm handler {package} failed ({status}); see the cargo output above");
    }
}

/// The outer build's target directory: `CARGO_TARGET_DIR`, or derived from
/// `OUT_DIR` (`<target>/<profile>/build/<pkg>/out`).
fn outer_target_dir() -> PathBuf {
    if let Some(dir) = env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir);
    }
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    out.ancestors()
        .nth(4)
        .expect("OUT_DIR has the usual depth")
        .to_path_buf()
}

/// Copies `wasm` to `out/<name>.wasm` and writes `out/<name>.toml`: the
/// source manifest with `sha256` set in its `[handler]` table.
fn package_handler(wasm: &Path, manifest: &Path, out: &Path, name: &str) {
    let bytes = fs::read(wasm).unwrap_or_else(|e| panic!("read {}: {e}", wasm.display()));
    let sha256 = hex::encode(Sha256::digest(&bytes));
    let source =
        fs::read_to_string(manifest).unwrap_or_else(|e| panic!("read {}: {e}", manifest.display()));
    let pinned = source.replacen(
        "[handler]\n",
        &format!("[handler]\nsha256 = \"{sha256}\"\n"),
        1,
    );
    assert!(
        pinned != source,
        "{} has no `[handler]` table",
        manifest.display()
    );
    write_if_changed(&out.join(format!("{name}.wasm")), &bytes);
    write_if_changed(&out.join(format!("{name}.toml")), pinned.as_bytes());
}

/// Writes `bytes` to `path` unless it holds them already; through a
/// temporary file and a rename, so a concurrent build never reads half.
fn write_if_changed(path: &Path, bytes: &[u8]) {
    if fs::read(path).ok().as_deref() == Some(bytes) {
        return;
    }
    let temp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&temp, bytes).unwrap_or_else(|e| panic!("write {}: {e}", temp.display()));
    fs::rename(&temp, path).unwrap_or_else(|e| panic!("rename to {}: {e}", path.display()));
}
