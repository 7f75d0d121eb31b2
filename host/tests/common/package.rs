//! The Debian package as `make deb` makes it (`packaging/build-deb`,
//! cargo-deb with the metadata of host/Cargo.toml), from this build's
//! binary and first-party handlers, and the checks that decide whether the
//! package tests can run here.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::languages::REQUIRE;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
        .to_path_buf()
}

/// `packaging/<name>` in the source tree.
pub fn packaging(name: &str) -> PathBuf {
    workspace().join("packaging").join(name)
}

/// Whether `test` can run here: it needs root (say so loudly and skip when
/// not root) and every program of `tools` (a missing one fails the test
/// under `OTABOX_REQUIRE_TOOLCHAINS=1`, as `make test` sets it, and skips
/// it loudly otherwise).
pub fn ready(test: &str, tools: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {test}: it needs root (systemd-nspawn, dpkg)");
        return false;
    }
    tools_ready(test, tools)
}

/// Whether every program of `tools` is there for `test` (see [`ready`]).
pub fn tools_ready(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var(REQUIRE).as_deref() != Ok("1"),
        "{test}: {} missing (run .ci/setup)",
        missing.join(", ")
    );
    eprintln!(
        "SKIPPED {test}: {} missing (run .ci/setup)",
        missing.join(", ")
    );
    false
}

/// Whether `program` is an executable on `PATH` (`cargo-deb` for `cargo deb`).
pub fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(program)).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
    })
}

/// The first-party handlers a package holds.
pub const HANDLERS: [&str; 4] = ["apt", "container", "file", "firmware"];

/// Copies the built first-party handlers (wasm and manifest) into `dir`.
pub fn copy_built_handlers(dir: &Path) {
    std::fs::create_dir_all(dir).expect("handlers dir");
    for name in HANDLERS {
        for ext in ["wasm", "toml"] {
            std::fs::copy(
                Path::new(env!("OTABOX_BUILT_HANDLERS")).join(format!("{name}.{ext}")),
                dir.join(format!("{name}.{ext}")),
            )
            .expect("copy a built handler");
        }
    }
}

/// Lintian warnings the packages keep, each explained in the README
/// ("Packages").
pub const ACCEPTED_WARNINGS: &[&str] = &["initial-upload-closes-no-bugs"];

/// Runs lintian on `deb`: no error, and no warning but the accepted ones.
pub fn lintian_passes(deb: &str) {
    let lint = Command::new("lintian")
        .args(["--fail-on", "error", deb])
        .output()
        .expect("lintian");
    let report = String::from_utf8_lossy(&lint.stdout);
    assert!(lint.status.success(), "lintian found errors:\n{report}");
    let warnings: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("W: "))
        .filter(|l| {
            !ACCEPTED_WARNINGS
                .iter()
                .any(|tag| l.contains(&format!(": {tag}")))
        })
        .collect();
    assert!(
        warnings.is_empty(),
        "lintian warnings neither fixed nor listed in the README: {warnings:?}"
    );
    assert!(!report.lines().any(|l| l.starts_with("E: ")), "{report}");
}

/// The programs the package tests drive.
pub const PACKAGE_TOOLS: &[&str] = &["cargo-deb", "dpkg-deb", "lintian"];

/// Builds the `otabox` package at `version` (such as `0.1.0-1`) from this
/// build's binary and handlers into `dir`; returns the `.deb`.
pub fn build_deb(dir: &Path, version: &str) -> PathBuf {
    build_variant(dir, version, Path::new(env!("OTABOX_BUILT_HANDLERS")), None)
}

/// Builds the package at `version` from this build's binary and the
/// handlers of `handlers` into `dir`, as `variant` (None: `otabox`;
/// `runtime-only`: `otabox-runtime-only`, whose handlers carry their
/// artifacts); returns the `.deb`.
pub fn build_variant(dir: &Path, version: &str, handlers: &Path, variant: Option<&str>) -> PathBuf {
    let out = dir.join(format!("deb-{version}"));
    let built = Command::new("bash")
        .arg(packaging("build-deb"))
        .arg(env!("CARGO_BIN_EXE_otabox"))
        .arg(handlers)
        .arg(&out)
        .args(["--fast", "--quiet", "--deb-version", version])
        .env_remove("TARGET")
        .env("VARIANT", variant.unwrap_or_default())
        .output()
        .expect("run packaging/build-deb");
    assert!(
        built.status.success(),
        "packaging/build-deb failed:\n{}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let debs: Vec<PathBuf> = std::fs::read_dir(&out)
        .expect("the package directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    assert_eq!(debs.len(), 1, "one package in {}: {debs:?}", out.display());
    debs[0].clone()
}

/// Runs `program` with `args`; its stdout, or a panic with everything it
/// printed.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
