//! Precompiled artifacts (`NAME.cwasm` + `NAME.cwasm.json` beside the wasm):
//! written by `otabox handlers precompile --target`, checked against the
//! manifest's pin and the engine hash before wasmtime sees them, and the
//! only way the runtime-only build (no `compiler` feature) loads a handler.
//!
//! The first group runs in the full build (it compiles artifacts itself);
//! the second in the runtime-only build, which `.ci/test-runtime-only` runs
//! with the full build as `OTABOX_PRECOMPILER`.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use otabox::runtime::precompiled::{ArtifactPaths, ArtifactRecord, read_record};
use otabox::runtime::{CacheUse, EngineTarget};

/// A handler directory with the `file` handler (no artifact yet).
fn file_handler_dir(root: &Path) -> PathBuf {
    let dir = root.join("handlers");
    std::fs::create_dir_all(&dir).expect("handler dir");
    let wasm = built_wasm("file");
    std::fs::write(dir.join("file.wasm"), &wasm).expect("wasm");
    std::fs::write(
        dir.join("file.toml"),
        format!(
            "[handler]\nupdate_types = [\"otabox/file:1\"]\nsha256 = \"{}\"\n\n[[filesystem]]\npath = \"{}\"\naccess = \"rw\"\n",
            otabox::runtime::sha256_hex(&wasm),
            root.join("files").display()
        ),
    )
    .expect("manifest");
    dir
}

/// The error of a load that must fail.
#[cfg(feature = "compiler")]
fn refused<T>(loaded: anyhow::Result<T>) -> String {
    match loaded {
        Ok(_) => panic!("loaded where a refusal was expected"),
        Err(e) => format!("{e:#}"),
    }
}

/// A native target other than this build's engine target.
fn another_target() -> EngineTarget {
    let triple = if EngineTarget::this_host().as_str().starts_with("aarch64") {
        "x86_64-unknown-linux-gnu"
    } else {
        "aarch64-unknown-linux-gnu"
    };
    EngineTarget::for_triple(triple).expect("triple")
}

/// Rewrites the record of `artifact` with `change` applied.
fn edit_record(artifact: &ArtifactPaths, change: impl FnOnce(&mut ArtifactRecord)) {
    let mut record = read_record(&artifact.record).expect("record");
    change(&mut record);
    std::fs::write(
        &artifact.record,
        serde_json::to_vec(&record).expect("encode record"),
    )
    .expect("write record");
}

/// A device config whose only handler directory (the integrator's) is
/// `root/handlers.d`; returns the config's path and that directory.
fn integrator_device(root: &Path) -> (PathBuf, PathBuf) {
    let integrator = root.join("handlers.d");
    std::fs::create_dir_all(&integrator).expect("dir");
    let config = root.join("device.toml");
    std::fs::write(
        &config,
        format!(
            "[paths]\nstate = \"{}\"\nhandlers = [\"{}\"]\n",
            root.join("state").display(),
            integrator.display()
        ),
    )
    .expect("config");
    (config, integrator)
}

/// `otabox handlers install --config CONFIG` of the `file` handler in
/// `source`.
fn install_file_handler(config: &Path, source: &Path) -> std::process::Output {
    otabox(&[
        "handlers",
        "install",
        "--config",
        config.to_str().expect("utf-8"),
        source.join("file.wasm").to_str().expect("utf-8"),
        source.join("file.toml").to_str().expect("utf-8"),
    ])
}

/// Every file of `dir` with its bytes, to show a refusal changed nothing.
fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .expect("dir")
        .map(|e| {
            let e = e.expect("entry");
            let bytes = std::fs::read(e.path()).unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect();
    files.sort();
    files
}

#[cfg(feature = "compiler")]
mod full_build {
    use super::*;
    use otabox::runtime::precompiled;

    /// `precompile --target` for this machine's engine: the artifact and its
    /// record beside the wasm, with the pin, target and engine hash.
    fn precompile_here(dir: &Path) -> ArtifactPaths {
        let target = EngineTarget::this_host();
        let out = otabox(&[
            "handlers",
            "precompile",
            "--dir",
            dir.to_str().expect("utf-8 path"),
            "--target",
            target.as_str(),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains(&format!("file: compiled for {target} in")),
            "{}",
            text(&out)
        );
        ArtifactPaths::in_dir(dir, "file")
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_artifact_written_for_this_target_loads_and_nothing_is_compiled() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = file_handler_dir(root.path());
        let artifact = precompile_here(&dir);
        let record = read_record(&artifact.record).expect("record");
        let wasm = std::fs::read(dir.join("file.wasm")).expect("wasm");
        assert_eq!(record.wasm_sha256, otabox::runtime::sha256_hex(&wasm));
        assert_eq!(record.target, EngineTarget::this_host().as_str());
        assert_eq!(record.engine_hash, EngineTarget::this_host().engine_hash());
        let cwasm = std::fs::read(&artifact.cwasm).expect("cwasm");
        assert_eq!(record.cwasm_size, cwasm.len() as u64);
        assert_eq!(record.cwasm_sha256, otabox::runtime::sha256_hex(&cwasm));

        let rt = runtime(root.path());
        let handler = rt
            .load_handler(&dir.join("file.toml"), None)
            .await
            .expect("load from the artifact");
        assert_eq!(handler.cache, CacheUse::Artifact);
        assert!(
            !root.path().join("cache").exists(),
            "nothing compiled into the cache"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn precompile_out_writes_only_the_artifacts_and_checks_the_pin() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = file_handler_dir(root.path());
        let out_dir = root.path().join("out");
        let out = otabox(&[
            "handlers",
            "precompile",
            "--dir",
            dir.to_str().expect("utf-8"),
            "--out",
            out_dir.to_str().expect("utf-8"),
        ]);
        assert!(out.status.success(), "{}", text(&out));
        let mut names: Vec<String> = std::fs::read_dir(&out_dir)
            .expect("out dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["file.cwasm", "file.cwasm.json"]);
        assert!(!ArtifactPaths::in_dir(&dir, "file").present());

        // A wasm its pin does not match gets no artifact, and exit 1.
        std::fs::write(dir.join("file.wasm"), b"\0asm not this one").expect("wasm");
        let out = otabox(&[
            "handlers",
            "precompile",
            "--dir",
            dir.to_str().expect("utf-8"),
            "--target",
            EngineTarget::this_host().as_str(),
        ]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            text(&out).contains("but its manifest pins"),
            "{}",
            text(&out)
        );
        assert!(!ArtifactPaths::in_dir(&dir, "file").present());
    }

    #[test]
    fn unknown_and_malformed_targets_are_refused_clearly() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = file_handler_dir(root.path());
        for (target, expected) in [
            ("sparc-unknown-nowhere", "target"),
            ("../../etc", "is not a target triple"),
            ("", "is not a target triple"),
        ] {
            let out = otabox(&[
                "handlers",
                "precompile",
                "--dir",
                dir.to_str().expect("utf-8"),
                "--target",
                target,
            ]);
            assert!(!out.status.success(), "{target}: {}", text(&out));
            assert!(text(&out).contains(expected), "{target}: {}", text(&out));
            assert!(!ArtifactPaths::in_dir(&dir, "file").present(), "{target}");
        }
        // --prune belongs to the cache, not to artifacts.
        let out = otabox(&["handlers", "precompile", "--prune", "--target", "pulley32"]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    }

    /// Each way an artifact can be wrong: refused by `precompiled::load`,
    /// naming what differs, and the full build compiles instead.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_wrong_artifact_is_refused_and_the_full_build_compiles_instead() {
        type Spoil = fn(&Path, &ArtifactPaths);
        let cases: [(&str, Spoil, &str); 8] = [
            (
                "altered",
                |_, a| {
                    let mut bytes = std::fs::read(&a.cwasm).expect("cwasm");
                    let middle = bytes.len() / 2;
                    bytes[middle] ^= 0x40;
                    std::fs::write(&a.cwasm, bytes).expect("write");
                },
                "the artifact was altered",
            ),
            (
                "truncated",
                |_, a| {
                    let bytes = std::fs::read(&a.cwasm).expect("cwasm");
                    std::fs::write(&a.cwasm, &bytes[..bytes.len() / 3]).expect("write");
                },
                "truncated or altered",
            ),
            (
                "symlinked",
                |root, a| {
                    let elsewhere = root.join("elsewhere.cwasm");
                    std::fs::rename(&a.cwasm, &elsewhere).expect("move");
                    std::os::unix::fs::symlink(&elsewhere, &a.cwasm).expect("symlink");
                },
                "is a symlink: refused",
            ),
            (
                "record symlinked",
                |root, a| {
                    let elsewhere = root.join("elsewhere.json");
                    std::fs::rename(&a.record, &elsewhere).expect("move");
                    std::os::unix::fs::symlink(&elsewhere, &a.record).expect("symlink");
                },
                "is a symlink: refused",
            ),
            (
                "another target",
                |_, a| {
                    let other = another_target();
                    edit_record(a, |r| {
                        r.target = other.to_string();
                        r.engine_hash = other.engine_hash();
                    })
                },
                "but this agent's engine hash is",
            ),
            (
                "another wasm",
                |_, a| edit_record(a, |r| r.wasm_sha256 = "ab".repeat(32)),
                "compiled from a wasm with sha256 abab",
            ),
            (
                "no record",
                |_, a| std::fs::remove_file(&a.record).expect("remove"),
                "cannot open",
            ),
            (
                "garbage record",
                |_, a| {
                    std::fs::write(&a.record, b"{\"format\": 1, \"cwasm-size\": -1}")
                        .expect("write")
                },
                "is not an artifact record",
            ),
        ];
        for (case, spoil, expected) in cases {
            let root = tempfile::tempdir().expect("tempdir");
            let dir = file_handler_dir(root.path());
            let artifact = precompile_here(&dir);
            spoil(root.path(), &artifact);
            let rt = runtime(root.path());
            let wasm = std::fs::read(dir.join("file.wasm")).expect("wasm");
            let error = refused(precompiled::load(
                rt.engine(),
                &artifact,
                &otabox::runtime::sha256_hex(&wasm),
            ));
            assert!(error.contains(expected), "{case}: {error}");
            let handler = rt
                .load_handler(&dir.join("file.toml"), None)
                .await
                .unwrap_or_else(|e| panic!("{case}: {e:#}"));
            assert_eq!(handler.cache, CacheUse::Miss, "{case}: compiled instead");
        }
    }

    /// Handlers run in an engine without a compiler, even in this build:
    /// it cannot compile (so an idle agent never runs Cranelift); a load
    /// with an empty cache compiles apart, stores the entry and loads it;
    /// the next runtime loads the entry; a spoiled entry is compiled anew.
    #[tokio::test(flavor = "multi_thread")]
    async fn handlers_run_in_an_engine_without_a_compiler_and_misses_compile_apart() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = file_handler_dir(root.path());
        let wasm = std::fs::read(dir.join("file.wasm")).expect("wasm");
        let rt = runtime(root.path());
        let error = match wasmtime::component::Component::new(rt.engine(), &wasm) {
            Ok(_) => panic!("the handlers' engine compiled a component"),
            Err(e) => format!("{e:#}"),
        };
        assert!(error.contains("compil"), "{error}");

        let first = rt
            .load_handler(&dir.join("file.toml"), None)
            .await
            .expect("load");
        assert_eq!(first.cache, CacheUse::Miss);
        let entries = || -> Vec<PathBuf> {
            std::fs::read_dir(root.path().join("cache"))
                .expect("cache dir")
                .map(|e| e.expect("entry").path())
                .collect()
        };
        let stored = entries();
        assert_eq!(stored.len(), 1, "one entry: {stored:?}");
        assert!(first.describe().await.is_ok(), "the compiled handler runs");

        let again = runtime(root.path());
        let second = again
            .load_handler(&dir.join("file.toml"), None)
            .await
            .expect("load");
        assert_eq!(second.cache, CacheUse::Hit);
        assert!(second.describe().await.is_ok());

        // Replaced, as entries only ever are (the live handlers above map
        // the old file; rewriting it in place would pull it from under them).
        let spoiled = root.path().join("spoiled");
        std::fs::write(&spoiled, b"not compiled code").expect("spoil");
        std::fs::rename(&spoiled, &stored[0]).expect("replace the entry");
        let third = runtime(root.path())
            .load_handler(&dir.join("file.toml"), None)
            .await
            .expect("load past a spoiled entry");
        assert_eq!(third.cache, CacheUse::Miss);
        assert!(third.describe().await.is_ok());
        assert_ne!(
            std::fs::read(&stored[0]).expect("entry"),
            b"not compiled code"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn the_refusal_of_another_engine_names_both_hashes_and_the_fix() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = file_handler_dir(root.path());
        let artifact = precompile_here(&dir);
        let other = EngineTarget::for_triple("armv7-unknown-linux-gnueabihf").expect("triple");
        assert_eq!(other.as_str(), "pulley32", "32-bit ARM devices run Pulley");
        edit_record(&artifact, |r| {
            r.target = other.to_string();
            r.engine_hash = other.engine_hash();
        });
        let rt = runtime(root.path());
        let wasm = std::fs::read(dir.join("file.wasm")).expect("wasm");
        let error = refused(precompiled::load(
            rt.engine(),
            &artifact,
            &otabox::runtime::sha256_hex(&wasm),
        ));
        let own = EngineTarget::this_host();
        for part in [
            other.engine_hash(),
            own.engine_hash(),
            format!("target {other}"),
            format!("`otabox handlers precompile --target {own}`"),
        ] {
            assert!(error.contains(&part), "{part} missing from: {error}");
        }
        assert_ne!(other.engine_hash(), own.engine_hash());
    }

    /// An artifact compiled under other engine settings (no epoch
    /// interruption, so a runaway guest could not be stopped) whose record
    /// claims this engine: wasmtime's own check refuses it.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_artifact_of_other_engine_settings_is_refused_by_wasmtime() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = file_handler_dir(root.path());
        let artifact = precompile_here(&dir);
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(false);
        let engine = wasmtime::Engine::new(&config).expect("engine");
        let wasm = std::fs::read(dir.join("file.wasm")).expect("wasm");
        let cwasm = engine.precompile_component(&wasm).expect("compile");
        std::fs::write(&artifact.cwasm, &cwasm).expect("write");
        edit_record(&artifact, |r| {
            r.cwasm_size = cwasm.len() as u64;
            r.cwasm_sha256 = otabox::runtime::sha256_hex(&cwasm);
        });
        let rt = runtime(root.path());
        let error = refused(precompiled::load(
            rt.engine(),
            &artifact,
            &otabox::runtime::sha256_hex(&wasm),
        ));
        assert!(
            error.contains("wasmtime refuses the precompiled artifact"),
            "{error}"
        );
        assert!(error.contains("epoch"), "names the setting: {error}");
    }

    #[test]
    fn install_drops_a_stale_artifact_and_remove_deletes_the_artifact() {
        let root = tempfile::tempdir().expect("tempdir");
        let (config, integrator) = integrator_device(root.path());
        let source = file_handler_dir(&root.path().join("src"));
        let out = install_file_handler(&config, &source);
        assert!(out.status.success(), "{}", text(&out));
        precompile_here(&integrator);
        let artifact = ArtifactPaths::in_dir(&integrator, "file");
        assert!(artifact.cwasm.is_file() && artifact.record.is_file());
        let out = install_file_handler(&config, &source);
        assert!(out.status.success(), "{}", text(&out));
        assert!(!artifact.present(), "a reinstall leaves no stale artifact");

        precompile_here(&integrator);
        let out = otabox(&[
            "handlers",
            "remove",
            "--config",
            config.to_str().expect("utf-8"),
            "file",
        ]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(!artifact.present(), "remove deletes the artifact");
        assert!(!integrator.join("file.wasm").exists());
    }

    /// `install` takes the artifact beside the source wasm along, after the
    /// checks a load makes; a bad one is refused and the directory (here
    /// holding an earlier install with its artifact) stays as it was.
    #[tokio::test(flavor = "multi_thread")]
    async fn install_takes_an_artifact_along_and_refuses_a_bad_one_changing_nothing() {
        let root = tempfile::tempdir().expect("tempdir");
        let (config, integrator) = integrator_device(root.path());
        let source = file_handler_dir(&root.path().join("src"));
        let shipped = precompile_here(&source);
        let out = install_file_handler(&config, &source);
        assert!(out.status.success(), "{}", text(&out));
        let own = EngineTarget::this_host();
        assert!(
            text(&out).contains(&format!("with its precompiled artifact for {own}")),
            "{}",
            text(&out)
        );
        let placed = ArtifactPaths::in_dir(&integrator, "file");
        for (from, to) in [
            (&shipped.cwasm, &placed.cwasm),
            (&shipped.record, &placed.record),
        ] {
            assert_eq!(
                std::fs::read(from).ok(),
                std::fs::read(to).ok(),
                "{}",
                to.display()
            );
        }
        let handler = runtime(root.path())
            .load_handler(&integrator.join("file.toml"), None)
            .await
            .expect("load the installed handler");
        assert_eq!(handler.cache, CacheUse::Artifact);
        drop(handler);
        let before = snapshot(&integrator);

        let pristine = std::fs::read(&shipped.cwasm).expect("cwasm");
        let pristine_record = std::fs::read(&shipped.record).expect("record");
        let reset = || {
            std::fs::write(&shipped.cwasm, &pristine).expect("cwasm");
            std::fs::write(&shipped.record, &pristine_record).expect("record");
        };
        let other = another_target();
        // What is done to the shipped artifact, and what the refusal says.
        type Case<'a> = (&'static str, Box<dyn Fn() + 'a>, &'static str);
        let cases: Vec<Case> = vec![
            (
                "a record without its .cwasm",
                Box::new(|| std::fs::remove_file(&shipped.cwasm).expect("rm")),
                "is there but",
            ),
            (
                "a .cwasm without its record",
                Box::new(|| std::fs::remove_file(&shipped.record).expect("rm")),
                "is there but",
            ),
            (
                "altered code",
                Box::new(|| {
                    let mut bytes = pristine.clone();
                    let middle = bytes.len() / 2;
                    bytes[middle] ^= 1;
                    std::fs::write(&shipped.cwasm, bytes).expect("write");
                }),
                "the artifact was altered",
            ),
            (
                "truncated code",
                Box::new(|| std::fs::write(&shipped.cwasm, &pristine[..100]).expect("write")),
                "truncated or altered",
            ),
            (
                "another engine's artifact",
                Box::new(|| {
                    edit_record(&shipped, |r| {
                        r.target = other.to_string();
                        r.engine_hash = other.engine_hash();
                    })
                }),
                "otabox handlers precompile --target",
            ),
            (
                "another wasm's artifact",
                Box::new(|| edit_record(&shipped, |r| r.wasm_sha256 = "ab".repeat(32))),
                "but the manifest pins",
            ),
            (
                "a record that is no record",
                Box::new(|| std::fs::write(&shipped.record, b"{\"format\": 1}").expect("write")),
                "is not an artifact record",
            ),
            (
                "a huge record",
                Box::new(|| std::fs::write(&shipped.record, vec![b' '; 1 << 20]).expect("write")),
                "bytes, more than",
            ),
        ];
        for (case, spoil, reason) in cases {
            reset();
            spoil();
            let out = install_file_handler(&config, &source);
            assert_eq!(out.status.code(), Some(1), "{case}: {}", text(&out));
            assert!(text(&out).contains(reason), "{case}: {}", text(&out));
            assert!(
                snapshot(&integrator) == before,
                "{case}: the directory changed"
            );
        }
    }
}

#[cfg(not(feature = "compiler"))]
mod runtime_only {
    use super::*;
    use otabox::runtime::Runtime;

    /// The error of loading the `file` handler of `dir`, which must fail.
    async fn refusal(rt: &Runtime, dir: &Path) -> String {
        match rt.load_handler(&dir.join("file.toml"), None).await {
            Ok(h) => panic!("loaded (from {:?}) where a refusal was expected", h.cache),
            Err(e) => format!("{e:#}"),
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn without_an_artifact_the_handler_is_refused_with_the_fix() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = file_handler_dir(root.path());
        let rt = runtime(root.path());
        let error = refusal(&rt, &dir).await;
        let own = EngineTarget::this_host();
        assert!(
            error.contains("this build runs only precompiled handlers"),
            "{error}"
        );
        assert!(
            error.contains(&format!("otabox handlers precompile --target {own}")),
            "{error}"
        );
        assert!(!root.path().join("cache").exists(), "nothing cached");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_artifact_loads_and_one_of_another_engine_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = file_handler_dir(root.path());
        precompile_beside(&dir);
        let rt = runtime(root.path());
        let handler = rt
            .load_handler(&dir.join("file.toml"), None)
            .await
            .expect("load from the artifact");
        assert_eq!(handler.cache, CacheUse::Artifact);
        assert_eq!(handler.description.update_types, ["otabox/file:1"]);
        drop(handler);

        let artifact = ArtifactPaths::in_dir(&dir, "file");
        let other = another_target();
        edit_record(&artifact, |r| {
            r.target = other.to_string();
            r.engine_hash = other.engine_hash();
        });
        let error = refusal(&rt, &dir).await;
        assert!(error.contains(&other.engine_hash()), "{error}");
        assert!(
            error.contains(&EngineTarget::this_host().engine_hash()),
            "{error}"
        );

        // Altered code is never loaded either.
        precompile_beside(&dir);
        let mut bytes = std::fs::read(&artifact.cwasm).expect("cwasm");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        std::fs::write(&artifact.cwasm, bytes).expect("write");
        let error = refusal(&rt, &dir).await;
        assert!(error.contains("the artifact was altered"), "{error}");
    }

    /// On a runtime-only device `handlers install` needs the artifact: the
    /// audit cannot test-load the handler without it; with it, the handler
    /// is placed with its artifact and loads.
    #[tokio::test(flavor = "multi_thread")]
    async fn install_places_a_handler_only_with_its_artifact() {
        let root = tempfile::tempdir().expect("tempdir");
        let (config, integrator) = integrator_device(root.path());
        let source = file_handler_dir(&root.path().join("src"));
        let out = install_file_handler(&config, &source);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            text(&out).contains("this build runs only precompiled handlers"),
            "{}",
            text(&out)
        );
        assert!(snapshot(&integrator).is_empty(), "nothing placed");

        precompile_beside(&source);
        let out = install_file_handler(&config, &source);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains("with its precompiled artifact for"),
            "{}",
            text(&out)
        );
        let handler = runtime(root.path())
            .load_handler(&integrator.join("file.toml"), None)
            .await
            .expect("load the installed handler");
        assert_eq!(handler.cache, CacheUse::Artifact);
    }

    #[test]
    fn precompile_checks_the_shipped_artifacts_and_cannot_compile() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = file_handler_dir(root.path());
        let dir_arg = dir.to_str().expect("utf-8");
        let out = otabox(&["handlers", "precompile", "--dir", dir_arg]);
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        assert!(
            text(&out).contains("this build runs only precompiled handlers"),
            "{}",
            text(&out)
        );
        let out = otabox(&[
            "handlers",
            "precompile",
            "--dir",
            dir_arg,
            "--target",
            "pulley32",
        ]);
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("has no compiler"), "{}", text(&out));
        assert!(!ArtifactPaths::in_dir(&dir, "file").present());

        precompile_beside(&dir);
        let out = otabox(&["handlers", "precompile", "--dir", dir_arg]);
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains("file: its precompiled artifact loads"),
            "{}",
            text(&out)
        );
    }

    /// `make deb VARIANT=runtime-only`'s package, from this build: the
    /// four handlers with their artifacts (precompiled by the full build
    /// for this machine), lintian-clean, and its agent loads every one.
    #[test]
    fn the_runtime_only_package_ships_artifacts_its_agent_loads() {
        use common::package::{
            HANDLERS, PACKAGE_TOOLS, build_variant, copy_built_handlers, lintian_passes, run_ok,
            tools_ready,
        };
        let test = "the_runtime_only_package_ships_artifacts_its_agent_loads";
        if !tools_ready(test, PACKAGE_TOOLS) {
            return;
        }
        let root = tempfile::tempdir().expect("tempdir");
        let staged = root.path().join("handlers");
        copy_built_handlers(&staged);
        precompile_beside(&staged);
        let deb = build_variant(root.path(), "0.1.0-1", &staged, Some("runtime-only"));
        let deb = deb.to_str().expect("utf-8");
        let info = run_ok("dpkg-deb", &["-f", deb, "Package", "Conflicts", "Replaces"]);
        assert!(info.contains("Package: otabox-runtime-only"), "{info}");
        assert!(info.contains("Conflicts: otabox"), "{info}");
        lintian_passes(deb);

        let unpacked = root.path().join("unpacked");
        run_ok("dpkg-deb", &["-x", deb, unpacked.to_str().expect("utf-8")]);
        let installed = unpacked.join("usr/lib/otabox/handlers");
        let mut names: Vec<String> = std::fs::read_dir(&installed)
            .expect("handlers in the package")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        names.sort();
        let mut expected: Vec<String> = HANDLERS
            .iter()
            .flat_map(|n| ["cwasm", "cwasm.json", "toml", "wasm"].map(|e| format!("{n}.{e}")))
            .collect();
        expected.sort();
        assert_eq!(names, expected);
        let packaged_agent = unpacked.join("usr/bin/otabox");
        let out = std::process::Command::new(&packaged_agent)
            .args(["handlers", "precompile", "--dir"])
            .arg(&installed)
            .env("OTABOX_LOG", "error")
            .output()
            .expect("run the packaged agent");
        assert!(out.status.success(), "{}", text(&out));
        for name in HANDLERS {
            assert!(
                text(&out).contains(&format!("{name}: its precompiled artifact loads")),
                "{}",
                text(&out)
            );
        }
    }
}
