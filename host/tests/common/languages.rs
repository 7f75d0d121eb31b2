//! The example handlers of `examples/handlers/<language>`, built from
//! source by their own `build.sh` when the language's toolchain is present
//! (`.ci/setup` installs them). Builds are kept under the target directory,
//! keyed by a hash of the sources, so a second run reuses them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use sha2::{Digest, Sha256};

/// A language with an example handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// componentize-py.
    Python,
    /// componentize-js (StarlingMonkey).
    JavaScript,
    /// jco's QuickJS backend (componentize-qjs), same source.
    JavaScriptQuickJs,
    /// wit-bindgen's C generator, zig, the preview1 adapter.
    C,
}

/// Set to 1 (as `make test` does) to fail instead of skipping when a
/// toolchain is missing.
pub const REQUIRE: &str = "OTABOX_REQUIRE_TOOLCHAINS";

impl Language {
    /// Every language, in table order.
    pub const ALL: [Language; 4] = [
        Language::Python,
        Language::JavaScript,
        Language::JavaScriptQuickJs,
        Language::C,
    ];

    /// Its name in reports and directories.
    pub fn name(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::JavaScript => "javascript",
            Language::JavaScriptQuickJs => "javascript-quickjs",
            Language::C => "c",
        }
    }

    /// The example's source directory.
    pub fn source(self) -> PathBuf {
        let dir = match self {
            Language::JavaScript | Language::JavaScriptQuickJs => "javascript",
            other => other.name(),
        };
        examples().join(dir)
    }

    /// The command that says whether the toolchain is there.
    fn probe(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Language::Python => ("componentize-py", &["--version"]),
            Language::JavaScript | Language::JavaScriptQuickJs => ("npm", &["--version"]),
            Language::C => ("python3", &["-m", "ziglang", "version"]),
        }
    }

    /// The built handler directory (`config-file.wasm` and its manifest),
    /// or `None` when the toolchain is missing and not required.
    pub fn build(self) -> Option<PathBuf> {
        static LOCKS: OnceLock<Vec<Mutex<()>>> = OnceLock::new();
        let locks = LOCKS.get_or_init(|| Self::ALL.iter().map(|_| Mutex::new(())).collect());
        let index = Self::ALL.iter().position(|l| *l == self).unwrap_or(0);
        let _one_build_at_a_time = locks[index].lock().unwrap_or_else(|e| e.into_inner());
        let (program, args) = self.probe();
        let present = Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success());
        if !present {
            assert!(
                std::env::var(REQUIRE).as_deref() != Ok("1"),
                "the {} toolchain is missing (run .ci/setup)",
                self.name()
            );
            eprintln!("skipped: no {} toolchain", self.name());
            return None;
        }
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("example-handlers")
            .join(format!("{}-{}", self.name(), source_hash(&self.source())));
        if out.join("config-file.toml").exists() {
            return Some(out);
        }
        let mut cmd = Command::new("sh");
        cmd.arg(self.source().join("build.sh")).arg(&out);
        if self == Language::JavaScriptQuickJs {
            cmd.env("ENGINE", "quickjs");
        }
        let built = cmd.output().expect("sh");
        assert!(
            built.status.success(),
            "{} build failed:\n{}{}",
            self.name(),
            String::from_utf8_lossy(&built.stdout),
            String::from_utf8_lossy(&built.stderr)
        );
        Some(out)
    }
}

/// A compiled-component cache shared by the tests of the example handlers
/// (entries are keyed by the wasm's sha256 and written by rename), so each
/// build is compiled once rather than once per test.
pub fn compiled_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("example-handlers/compiled")
}

/// `examples/handlers`.
pub fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/handlers")
}

/// A hash of the example's sources, the shared WIT and the contract.
fn source_hash(dir: &Path) -> String {
    let mut files = Vec::new();
    for root in [
        dir.to_path_buf(),
        examples().join("wit"),
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../sdk/wit"),
    ] {
        collect(&root, &mut files);
    }
    files.sort();
    let mut hasher = Sha256::new();
    for f in files {
        hasher.update(f.to_string_lossy().as_bytes());
        hasher.update(std::fs::read(&f).unwrap_or_default());
    }
    format!("{:x}", hasher.finalize())[..16].to_string()
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if ["out", "node_modules", "deps", "__pycache__"].contains(&name.to_string_lossy().as_ref())
        {
            continue;
        }
        if path.is_dir() {
            collect(&path, files);
        } else {
            files.push(path);
        }
    }
}
