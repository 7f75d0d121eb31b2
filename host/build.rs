//! Builds the first-party handlers and the test guests to `wasm32-wasip2`
//! as part of the normal build, and packages each as `<name>.wasm` plus a
//! `<name>.toml` capability manifest pinned to the wasm's sha256, in
//! `$OUT_DIR/handlers` (exported to the crate as `OTABOX_BUILT_HANDLERS`).
//!
//! The nested cargo uses its own target directory (beside the outer one) so
//! it never waits on the outer build's lock. Set `OTABOX_SKIP_WASM_BUILD=1`
//! to skip it (the embedded handlers are then empty and the tests that need
//! them fail with a clear message).

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// (cargo package, handler name, manifest in the source tree)
const GUESTS: &[(&str, &str, &str)] = &[
    ("otabox-handler-file", "file", "handlers/file/file.toml"),
    ("otabox-handler-apt", "apt", "handlers/apt/apt.toml"),
    (
        "otabox-handler-container",
        "container",
        "handlers/container/container.toml",
    ),
    (
        "otabox-handler-firmware",
        "firmware",
        "handlers/firmware/firmware.toml",
    ),
    (
        "otabox-test-hostile",
        "hostile",
        "host/tests/guests/hostile/hostile.toml",
    ),
    (
        "otabox-test-hostile-devices",
        "hostile-devices",
        "host/tests/guests/hostile-devices/hostile-devices.toml",
    ),
    (
        "otabox-test-contract-1-0",
        "contract-1-0",
        "host/tests/guests/contract-1-0/contract-1-0.toml",
    ),
];

const WASM_TARGET: &str = "wasm32-wasip2";

fn main() {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("host/ has a parent")
        .to_path_buf();
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR")).join("handlers");
    fs::create_dir_all(&out).expect("create $OUT_DIR/handlers");
    println!("cargo:rustc-env=OTABOX_BUILT_HANDLERS={}", out.display());
    println!("cargo:rerun-if-env-changed=OTABOX_SKIP_WASM_BUILD");
    for dir in ["wit", "sdk", "handlers", "host/tests/guests", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    if env::var_os("OTABOX_SKIP_WASM_BUILD").is_some() {
        for (_, name, _) in GUESTS {
            fs::write(out.join(format!("{name}.wasm")), b"").expect("write placeholder");
            fs::write(out.join(format!("{name}.toml")), b"").expect("write placeholder");
        }
        return;
    }
    ensure_wasm_target();
    let wasm_dir = build_guests(&workspace);
    for (package, name, manifest) in GUESTS {
        let wasm = wasm_dir.join(format!("{}.wasm", package.replace('-', "_")));
        package_handler(&wasm, &workspace.join(manifest), &out, name);
    }
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

/// Compiles every guest as a `cdylib` for wasm32-wasip2 (the crates are
/// plain libraries natively, so their unit tests run with the workspace);
/// returns the directory holding the `.wasm` files.
fn build_guests(workspace: &Path) -> PathBuf {
    let target_dir = outer_target_dir().join("wasm-guests");
    for (package, _, _) in GUESTS {
        build_guest(workspace, &target_dir, package);
    }
    target_dir.join(WASM_TARGET).join("release")
}

fn build_guest(workspace: &Path, target_dir: &Path, package: &str) {
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
        .arg(target_dir)
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

fn write_if_changed(path: &Path, bytes: &[u8]) {
    if fs::read(path).ok().as_deref() != Some(bytes) {
        fs::write(path, bytes).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    }
}
