//! The Debian package without booting it (that is systemd_service.rs):
//! the conffile names every setting and parses, `otabox handlers
//! precompile` fills the cache the agent loads from, and the package holds
//! what it must and passes lintian.

mod common;

use std::path::Path;
use std::process::Command;

use common::package::{
    HANDLERS, PACKAGE_TOOLS, build_deb, copy_built_handlers, lintian_passes, packaging, run_ok,
    tools_ready,
};
use otabox::capabilities::{DeviceGrant, HandlerManifest};
use otabox::config::DeviceConfig;

/// The keys of a serialized default value (a JSON object).
fn keys(value: serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::Object(map) => map.keys().cloned().collect(),
        other => panic!("not an object: {other}"),
    }
}

/// Whether `text` has a line setting `key`, commented or not.
fn sets(text: &str, key: &str) -> bool {
    text.lines().any(|l| {
        l.trim_start_matches('#')
            .trim_start()
            .strip_prefix(key)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
    })
}

/// `text` with every commented-out setting or table header switched on.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if is_table_header(rest)
                    || rest.split_once(" = ").is_some_and(|(k, _)| {
                        k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    }) =>
            {
                rest.to_string()
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether `line` is a table header such as `[handlers.file]`.
fn is_table_header(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|l| l.strip_suffix(']'))
        .is_some_and(|name| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.')
        })
}

#[test]
fn the_conffile_names_every_setting_and_parses_with_all_of_them_on() {
    let path = packaging("device.toml");
    let text = std::fs::read_to_string(&path).expect("packaging/device.toml");

    // As shipped: the packaged handler directory, then the integrator's,
    // firmware off until the board is described, no device id (the service
    // is not started).
    let shipped = DeviceConfig::load(&path).expect("the shipped conffile parses");
    assert_eq!(
        shipped.paths.handlers.as_slice(),
        [
            Path::new("/usr/lib/otabox/handlers"),
            Path::new("/etc/otabox/handlers.d")
        ]
    );
    assert!(shipped.device.id.is_none());
    assert!(!shipped.handlers["firmware"].enabled);

    let defaults = serde_json::to_value(DeviceConfig::default()).expect("defaults");
    let mut missing = Vec::new();
    for section in ["device", "mqtt", "download", "trust", "paths"] {
        for key in keys(defaults[section].clone()) {
            if !sets(&text, &key) {
                missing.push(format!("[{section}] {key}"));
            }
        }
    }
    for key in keys(serde_json::to_value(DeviceGrant::default()).expect("grant")) {
        if !sets(&text, &key) {
            missing.push(format!("[handlers.NAME] {key}"));
        }
    }
    assert!(missing.is_empty(), "device.toml does not name {missing:?}");

    // Every commented example is valid TOML of the right type.
    let dir = tempfile::tempdir().expect("tempdir");
    let all_on = dir.path().join("device.toml");
    std::fs::write(&all_on, uncommented(&text)).expect("write");
    let config = DeviceConfig::load(&all_on)
        .unwrap_or_else(|e| panic!("with every setting on: {e:#}\n{}", uncommented(&text)));
    assert_eq!(config.device.id.as_deref(), Some("pump-0042"));
    assert_eq!(config.mqtt.port, 1883);
    assert!(config.handlers.contains_key("container"));
}

/// A device directory with the built first-party handlers and a config.
fn device_dir(root: &Path) -> std::path::PathBuf {
    copy_built_handlers(&root.join("handlers"));
    let config = root.join("device.toml");
    std::fs::write(
        &config,
        "[device]\nid = \"dev-1\"\n[paths]\nhandlers = \"handlers\"\nstate = \"state\"\n\
         [handlers.firmware]\nenabled = false\n",
    )
    .expect("device.toml");
    config
}

/// `otabox ARGS`: (exit status, stdout + stderr).
fn otabox(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_otabox"))
        .args(args)
        .output()
        .expect("otabox");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn precompile_fills_the_cache_the_agent_loads_from_and_prunes_only_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = device_dir(dir.path());
    let config = config.to_str().expect("utf-8");
    let cache = dir.path().join("state/cache");

    let (ok, out) = otabox(&["handlers", "precompile", "--config", config]);
    assert!(ok, "{out}");
    for name in HANDLERS {
        assert!(out.contains(&format!("{name}: compiled in ")), "{out}");
    }
    let (ok, out) = otabox(&["handlers", "precompile", "--config", config]);
    assert!(ok, "{out}");
    assert_eq!(out.matches(": already precompiled").count(), 4, "{out}");

    // What the agent loads comes from that cache: nothing is compiled.
    let (ok, out) = otabox(&["handlers", "list", "--json", "--config", config]);
    assert!(ok, "{out}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("list json");
    let loaded: Vec<&serde_json::Value> = listed
        .as_array()
        .expect("array")
        .iter()
        .filter(|h| h["status"] == "loaded")
        .collect();
    assert_eq!(loaded.len(), 3, "{out}");
    assert!(loaded.iter().all(|h| h["cache"] == "hit"), "{out}");

    // Stale entries go with --prune only; other files stay.
    std::fs::write(cache.join("0000-old-engine.cwasm"), b"old").expect("stale");
    std::fs::write(cache.join("notes.txt"), b"keep").expect("other");
    let (ok, out) = otabox(&["handlers", "precompile", "--config", config]);
    assert!(ok && cache.join("0000-old-engine.cwasm").exists(), "{out}");
    let (ok, out) = otabox(&["handlers", "precompile", "--prune", "--config", config]);
    assert!(ok, "{out}");
    assert!(out.contains("removed stale cache entry"), "{out}");
    assert!(!cache.join("0000-old-engine.cwasm").exists());
    assert!(cache.join("notes.txt").exists());
    let entries = std::fs::read_dir(&cache).expect("cache").count();

    // A wasm that is not the one its manifest pins is not compiled, and
    // says why; the others still are; the exit status is 1.
    let mut tampered = std::fs::read(dir.path().join("handlers/apt.wasm")).expect("apt");
    tampered.extend_from_slice(b"\0tampered");
    std::fs::write(dir.path().join("handlers/apt.wasm"), &tampered).expect("tamper");
    let (ok, out) = otabox(&["handlers", "precompile", "--prune", "--config", config]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("apt: not precompiled") && out.contains("pins"),
        "{out}"
    );
    assert!(out.contains("file: already precompiled"), "{out}");
    let pruned = std::fs::read_dir(&cache).expect("cache").count();
    assert_eq!(pruned, entries - 1, "the apt entry is stale now: {out}");
}

#[test]
fn the_package_holds_the_agent_handlers_unit_and_conffile_and_passes_lintian() {
    let test = "the_package_holds_the_agent_handlers_unit_and_conffile_and_passes_lintian";
    if !tools_ready(test, PACKAGE_TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let deb = build_deb(dir.path(), "0.1.0-1");
    let deb = deb.to_str().expect("utf-8");

    let listing = run_ok("dpkg-deb", &["-c", deb]);
    for (mode, path) in [
        ("-rwxr-xr-x", "./usr/bin/otabox"),
        ("-rw-r--r--", "./lib/systemd/system/otabox.service"),
        ("-rw-r--r--", "./etc/otabox/device.toml"),
        ("-rw-r--r--", "./usr/share/man/man1/otabox.1.gz"),
        ("-rw-r--r--", "./usr/share/doc/otabox/copyright"),
        ("-rw-r--r--", "./usr/share/doc/otabox/changelog.Debian.gz"),
    ] {
        assert!(
            listing
                .lines()
                .any(|l| l.starts_with(mode) && l.ends_with(path)),
            "{path} ({mode}) is not in the package:\n{listing}"
        );
    }
    assert_eq!(
        run_ok("dpkg-deb", &["-I", deb, "conffiles"]).trim(),
        "/etc/otabox/device.toml"
    );
    for script in ["postinst", "prerm", "postrm"] {
        assert!(run_ok("dpkg-deb", &["-I", deb, script]).starts_with("#!/bin/sh"));
    }

    // The handlers inside are the built ones, each pinned by its manifest.
    let unpacked = dir.path().join("unpacked");
    run_ok("dpkg-deb", &["-x", deb, unpacked.to_str().expect("utf-8")]);
    let installed = unpacked.join("usr/lib/otabox/handlers");
    let mut names: Vec<String> = std::fs::read_dir(&installed)
        .expect("handlers in the package")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let expected: Vec<String> = HANDLERS
        .iter()
        .flat_map(|n| [format!("{n}.toml"), format!("{n}.wasm")])
        .collect();
    assert_eq!(names, expected);
    for name in HANDLERS {
        let manifest = HandlerManifest::load(&installed.join(format!("{name}.toml")))
            .expect("a packaged manifest");
        let wasm = std::fs::read(installed.join(format!("{name}.wasm"))).expect("wasm");
        manifest.check_pin(&wasm).unwrap_or_else(|m| {
            panic!("{name}: packaged wasm is {}, pinned {}", m.actual, m.pinned)
        });
    }

    lintian_passes(deb);
}

/// The addresses of `names` in the linked program `exe`, in that order.
fn addresses(exe: &Path, names: &[&str]) -> Vec<u64> {
    let out = Command::new("nm")
        .arg("--defined-only")
        .arg(exe)
        .output()
        .expect("run nm");
    let text = String::from_utf8_lossy(&out.stdout);
    names
        .iter()
        .map(|name| {
            text.lines()
                .find_map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    (f.len() == 3 && f[2] == *name).then(|| u64::from_str_radix(f[0], 16).ok())?
                })
                .unwrap_or_else(|| panic!("{name} not in {}:\n{text}", exe.display()))
        })
        .collect()
}

/// `packaging/link-ordered` (the linker of `make deb`) links a program as
/// `cc` does, with the functions its list names first, in the objects'
/// order, whatever their order in the source; names the program lacks
/// and comments are ignored; an unreadable list stops the link. With each
/// C compiler driver `make deb` uses that is installed: this machine's,
/// and the ARM cross compilers (rust-lld links for them too).
#[test]
fn the_ordered_link_places_the_listed_functions_first() {
    if !tools_ready("the ordered link", &["cc", "nm", "rustc"]) {
        return;
    }
    let drivers = ["cc", "aarch64-linux-gnu-gcc", "arm-linux-gnueabihf-gcc"];
    for cc in drivers
        .into_iter()
        .filter(|cc| common::package::on_path(cc))
    {
        ordered_link_with(cc);
    }
}

fn ordered_link_with(cc: &str) {
    let native = cc == "cc";
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("prog.c");
    std::fs::write(
        &source,
        "int cold_a(int x) { return x * 3 + 1; }\n\
         int cold_b(int x) { return x * 5 + 2; }\n\
         int hot_one(int x) { return x * 7 + 3; }\n\
         int cold_c(int x) { return x * 9 + 4; }\n\
         int hot_two(int x) { return x * 11 + 5; }\n\
         int main(int argc, char **argv) { (void)argv; return cold_a(argc) + cold_b(argc)\n\
           + hot_one(argc) + cold_c(argc) + hot_two(argc) == 42; }\n",
    )
    .unwrap();
    let object = dir.path().join("prog.o");
    run_ok(
        cc,
        &[
            "-c",
            "-O1",
            "-ffunction-sections",
            "-o",
            object.to_str().unwrap(),
            source.to_str().unwrap(),
        ],
    );
    let list = dir.path().join("idle.txt");
    std::fs::write(
        &list,
        "# comment line\nhot_two\nnot_in_this_program\nhot_one\n",
    )
    .unwrap();
    let link = |out: &Path, list: &Path| {
        Command::new(packaging("link-ordered"))
            .env("OTABOX_IDLE_FUNCTIONS", list)
            .env("OTABOX_LINK_CC", cc)
            .arg("-o")
            .arg(out)
            .arg(&object)
            .output()
            .expect("run link-ordered")
    };

    let ordered = dir.path().join("ordered");
    let out = link(&ordered, &list);
    assert!(
        out.status.success(),
        "{cc}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if native {
        let ran = Command::new(&ordered).status().expect("run the program");
        assert!(ran.code().is_some(), "the linked program runs");
    }
    let at = addresses(
        &ordered,
        &["hot_one", "hot_two", "cold_a", "cold_b", "cold_c"],
    );
    let (hot, cold) = (&at[..2], &at[2..]);
    assert!(
        hot.iter().max() < cold.iter().min(),
        "{cc}: listed functions first: {at:?}"
    );
    assert!(
        at[0] < at[1],
        "{cc}: in the object's order, not the list's: {at:?}"
    );

    // An empty list links as cc would: the source's order.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let plain = dir.path().join("plain");
    assert!(link(&plain, &empty).status.success());
    let at = addresses(
        &plain,
        &["cold_a", "cold_b", "hot_one", "cold_c", "hot_two"],
    );
    assert!(
        at.windows(2).all(|w| w[0] < w[1]),
        "{cc}: source order: {at:?}"
    );

    let out = link(&dir.path().join("none"), &dir.path().join("missing.txt"));
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot read the function list"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path().join("none").exists());
}
