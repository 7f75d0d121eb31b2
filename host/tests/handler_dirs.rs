//! Two handler directories (packaged, then the integrator's) read as one
//! set, and `otabox handlers install` / `remove` on the integrator's: every
//! refusal leaves the directory exactly as it was.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use otabox::runtime::sha256_hex;

/// Capabilities the hostile guest outgrows: its process import is
/// undeclared (an audit error).
const TMP_ONLY: &str = "[[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n";

const FILE_CAPS: &str = "[[filesystem]]\npath = \"/var/lib/otabox/files\"\naccess = \"rw\"\n";

/// A device in `root`: `packaged/` holding the `file` handler, the
/// integrator's `local/` (empty), the hostile guest's grants; returns
/// the config path.
fn two_dir_device(root: &Path) -> PathBuf {
    install_handler(
        &root.join("packaged"),
        "file",
        &built_wasm("file"),
        "otabox/file:1",
        FILE_CAPS,
    );
    std::fs::create_dir_all(root.join("local")).expect("local dir");
    std::fs::create_dir_all(root.join("files")).expect("files");
    let config = root.join("device.toml");
    std::fs::write(
        &config,
        "[paths]\nhandlers = [\"packaged\", \"local\"]\nstate = \"state\"\n\
         [handlers.file.mounts]\n\"/var/lib/otabox/files\" = \"files\"\n",
    )
    .expect("device.toml");
    config
}

/// The hostile guest's files as an integrator hands them over, in `src/`:
/// `NAME.wasm` and `NAME.toml` serving `update_type` with `caps`.
fn source(root: &Path, name: &str, wasm: &[u8], update_type: &str, caps: &str) -> (String, String) {
    let manifest = install_handler(&root.join("src"), name, wasm, update_type, caps);
    (
        manifest.with_extension("wasm").display().to_string(),
        manifest.display().to_string(),
    )
}

/// The hostile guest's files (`wasm`) serving `otabox-test/hostile:1`
/// with `caps`, as [`source`] writes them.
fn hostile_source(root: &Path, wasm: &[u8], caps: &str) -> (String, String) {
    source(root, "hostile", wasm, "otabox-test/hostile:1", caps)
}

/// `handlers install --config CONFIG WASM TOML`, which must succeed; its
/// output.
fn install_ok(config: &str, wasm: &str, toml: &str) -> String {
    let (out, t) = cli(&["handlers", "install", "--config", config, wasm, toml]);
    assert!(out.status.success(), "{t}");
    t
}

/// Every entry of `dir` with its bytes (`None` for a non-file).
fn snapshot(dir: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    std::fs::read_dir(dir)
        .expect("list")
        .flatten()
        .map(|e| {
            let bytes = e
                .path()
                .is_file()
                .then(|| std::fs::read(e.path()).expect("read"));
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

fn cli(args: &[&str]) -> (Output, String) {
    let out = otabox(args);
    let t = text(&out);
    (out, t)
}

/// Runs `otabox` with `args`, killed after 20 s: a hang fails the test.
fn cli_bounded(args: &[&str]) -> (Output, String) {
    let mut child = spawn_otabox(args);
    if !exits_within(&mut child, Duration::from_secs(20)) {
        let _ = child.kill();
        panic!("otabox {args:?} hung");
    }
    let out = child.wait_with_output().expect("output");
    let t = text(&out);
    (out, t)
}

/// The hostile guest with a custom section appended: the same code, a
/// different sha256 (a new build).
fn rebuilt_hostile() -> Vec<u8> {
    let mut wasm = built_wasm("hostile");
    wasm.extend_from_slice(&[0x00, 13, 11]);
    wasm.extend_from_slice(b"otabox-testx");
    wasm
}

fn hostile_grants(root: &Path) -> String {
    hostile_caps(&root.join("sandbox"))
}

fn list_json(config: &str) -> Vec<serde_json::Value> {
    let (out, t) = cli(&["handlers", "list", "--config", config, "--json"]);
    assert!(out.status.success(), "{t}");
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .expect("json")
        .as_array()
        .expect("array")
        .clone()
}

#[test]
fn both_directories_load_and_a_second_claim_of_a_name_or_update_type_names_both_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let config = two_dir_device(root);
    let config = config.display().to_string();
    let caps = hostile_grants(root);
    let packaged_file = root.join("packaged/file.toml");
    // The integrator's: one handler of its own, one claiming the packaged
    // handler's update type, one with the packaged handler's name.
    install_handler(
        &root.join("local"),
        "hostile",
        &built_wasm("hostile"),
        "otabox-test/hostile:1",
        &caps,
    );
    let thief = install_handler(
        &root.join("local"),
        "thief",
        &built_wasm("hostile"),
        "otabox/file:1",
        &caps,
    );
    let list = list_json(&config);
    let entry = |name: &str| {
        list.iter()
            .find(|h| h["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("{name}: {list:?}"))
    };
    assert_eq!(entry("file")["status"], "loaded");
    assert_eq!(
        entry("file")["dir"],
        root.join("packaged").display().to_string()
    );
    assert_eq!(entry("hostile")["status"], "loaded");
    assert_eq!(
        entry("hostile")["dir"],
        root.join("local").display().to_string()
    );
    let error = entry("thief")["error"].as_str().expect("error").to_string();
    assert_eq!(entry("thief")["status"], "refused");
    for file in [&thief, &packaged_file] {
        assert!(error.contains(&file.display().to_string()), "{error}");
    }
    let (audit, t) = cli(&["handlers", "audit", "--config", &config]);
    assert_eq!(audit.status.code(), Some(1), "{t}");
    assert!(
        t.contains("update type \"otabox/file:1\" is already claimed by"),
        "{t}"
    );

    std::fs::remove_file(&thief).expect("remove thief");
    let shadow = install_handler(
        &root.join("local"),
        "file",
        &built_wasm("file"),
        "otabox/file:2",
        FILE_CAPS,
    );
    let (out, t) = cli(&["handlers", "list", "--config", &config]);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&shadow.display().to_string())
            && t.contains(&packaged_file.display().to_string())
            && t.contains("names are unique across the handler directories"),
        "{t}"
    );
    assert!(
        t.contains(&root.join("packaged/file.wasm").display().to_string()),
        "the packaged one stays loaded: {t}"
    );
    let (audit, t) = cli(&["handlers", "audit", "--config", &config]);
    assert_eq!(audit.status.code(), Some(1), "{t}");
    assert!(
        t.contains("a handler named file is already installed as"),
        "{t}"
    );

    // run-phase finds a handler by name in the same list, and a path is
    // no name (it once reached `local/../packaged/file.toml`).
    let run_phase = |handler: &str| {
        cli(&[
            "handlers",
            "run-phase",
            "--config",
            &config,
            "--handler",
            handler,
            "--phase",
            "is-installed",
            "--manifest",
            "{\"path\": \"app.conf\"}",
        ])
    };
    let (out, t) = run_phase("hostile");
    let called: serde_json::Value = serde_json::from_slice(&out.stdout).expect(&t);
    assert!(
        called.get("failed").is_some(),
        "the handler was called: {t}"
    );
    let (out, t) = run_phase("../packaged/file");
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("no handler ../packaged/file in"), "{t}");
}

#[test]
fn install_audits_precompiles_and_places_both_files_and_list_shows_the_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let config = two_dir_device(root).display().to_string();
    let (wasm, toml) = hostile_source(root, &built_wasm("hostile"), &hostile_grants(root));
    let t = install_ok(&config, &wasm, &toml);
    assert!(
        t.contains("handler hostile: ok"),
        "the audit is printed: {t}"
    );
    assert!(t.contains("installed handler hostile into"), "{t}");
    let local = root.join("local");
    let placed = snapshot(&local);
    assert_eq!(
        placed.keys().collect::<Vec<_>>(),
        ["hostile.toml", "hostile.wasm"],
        "no temporary file is left"
    );
    assert_eq!(
        placed["hostile.wasm"].as_deref(),
        Some(&built_wasm("hostile")[..])
    );
    for file in ["hostile.toml", "hostile.wasm"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(local.join(file))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644, "{file}");
    }
    let sha = sha256_hex(&built_wasm("hostile"));
    let cached: Vec<String> = std::fs::read_dir(root.join("state/cache"))
        .expect("the cache exists: precompiled")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(cached.iter().any(|c| c.starts_with(&sha)), "{cached:?}");

    let (out, t) = cli(&["handlers", "list", "--config", &config]);
    assert!(out.status.success(), "{t}");
    let line = t
        .lines()
        .find(|l| l.starts_with("hostile"))
        .expect("listed");
    assert!(
        line.contains("loaded") && line.contains(&local.join("hostile.wasm").display().to_string()),
        "{t}"
    );

    let (_, help) = cli(&["handlers", "install", "--help"]);
    assert!(
        help.contains("SIGHUP") && help.contains("reloads between jobs"),
        "the reload rule is in --help: {help}"
    );

    // A new build replaces it in place.
    let (wasm, toml) = hostile_source(root, &rebuilt_hostile(), &hostile_grants(root));
    install_ok(&config, &wasm, &toml);
    assert_eq!(
        snapshot(&local)["hostile.wasm"].as_deref(),
        Some(&rebuilt_hostile()[..])
    );
}

/// One refused install: its error text, with the directory unchanged.
fn refused(root: &Path, args: &[&str], expected: &str) {
    let local = root.join("local");
    let before = snapshot(&local);
    let (out, t) = cli_bounded(args);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {t}");
    assert!(
        t.contains(expected),
        "{args:?}: expected {expected:?} in {t}"
    );
    assert_eq!(snapshot(&local), before, "{args:?} changed the directory");
}

#[test]
fn install_refuses_bad_input_and_leaves_the_directory_as_it_was() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let config = two_dir_device(root).display().to_string();
    let caps = hostile_grants(root);
    // Something already installed, so "unchanged" is not just "empty".
    install_handler(
        &root.join("local"),
        "counter",
        &built_wasm("hostile"),
        "otabox-test/counter:1",
        &caps,
    );
    let install = |wasm: &str, toml: &str| -> Vec<String> {
        ["handlers", "install", "--config", &config, wasm, toml]
            .map(String::from)
            .to_vec()
    };
    let run = |args: Vec<String>, expected: &str| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(root, &args, expected);
    };

    // A tampered component.
    let (wasm, toml) = hostile_source(root, &built_wasm("hostile"), &caps);
    let mut tampered = built_wasm("hostile");
    tampered[100] ^= 1;
    std::fs::write(&wasm, &tampered).expect("tamper");
    run(
        install(&wasm, &toml),
        "refusing a modified or mismatched component",
    );

    // An audit error (an import no declaration allows), without --force.
    let (wasm, toml) = hostile_source(root, &built_wasm("hostile"), TMP_ONLY);
    run(
        install(&wasm, &toml),
        "error(s) (above); nothing was installed",
    );
    let (_, t) = cli(&install(&wasm, &toml)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(
        t.contains("error: imports `otabox:handler/process@1.1.0` but declares no command rules"),
        "the findings are printed as audit prints them: {t}"
    );

    // An update type another handler owns (packaged, or the integrator's).
    let (wasm, toml) = source(
        root,
        "thief",
        &built_wasm("hostile"),
        "otabox/file:1",
        &caps,
    );
    run(
        install(&wasm, &toml),
        "update type \"otabox/file:1\" is already claimed by",
    );
    let (wasm, toml) = source(
        root,
        "thief",
        &built_wasm("hostile"),
        "otabox-test/counter:1",
        &caps,
    );
    run(install(&wasm, &toml), "local/counter.toml");

    // The name of a packaged handler.
    let (wasm, toml) = source(
        root,
        "file",
        &built_wasm("file"),
        "otabox/file:9",
        FILE_CAPS,
    );
    run(
        install(&wasm, &toml),
        "a handler named file is already installed as",
    );

    // A name smuggled into the manifest, or a file name that is no name.
    let (wasm, toml) = hostile_source(root, &built_wasm("hostile"), &caps);
    let text = std::fs::read_to_string(&toml).expect("read");
    std::fs::write(
        &toml,
        text.replace("[handler]\n", "[handler]\nname = \"../../evil\"\n"),
    )
    .expect("write");
    run(install(&wasm, &toml), "unknown field `name`");
    let odd = root.join("src/Evil..toml");
    std::fs::write(&odd, text).expect("write");
    run(
        install(&wasm, &odd.display().to_string()),
        "a handler name must be lowercase",
    );

    // Unreadable sources: missing, a directory, a FIFO (must not hang), a
    // link to a FIFO, and one far too big (refused before reading).
    let (wasm, toml) = hostile_source(root, &built_wasm("hostile"), &caps);
    run(
        install(&root.join("nope.wasm").display().to_string(), &toml),
        "cannot read",
    );
    run(
        install(&root.join("src").display().to_string(), &toml),
        "is not a regular file",
    );
    let fifo = root.join("src/fifo.wasm");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    run(
        install(&fifo.display().to_string(), &toml),
        "is not a regular file",
    );
    let link = root.join("src/link.wasm");
    std::os::unix::fs::symlink(&fifo, &link).expect("link");
    run(
        install(&link.display().to_string(), &toml),
        "is not a regular file",
    );
    let huge = root.join("src/huge.wasm");
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len(300 << 20))
        .expect("sparse file");
    run(install(&huge.display().to_string(), &toml), "more than the");
    let fat_toml = root.join("src/fat.toml");
    std::fs::File::create(&fat_toml)
        .and_then(|f| f.set_len(2 << 20))
        .expect("sparse file");
    run(
        install(&wasm, &fat_toml.display().to_string()),
        "more than the",
    );

    // Still installable after all that, and nothing but the pair appeared.
    let (out, t) = cli(&install(&wasm, &toml)
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>());
    assert!(out.status.success(), "{t}");
    let names: Vec<String> = snapshot(&root.join("local")).into_keys().collect();
    assert_eq!(
        names,
        [
            "counter.toml",
            "counter.wasm",
            "hostile.toml",
            "hostile.wasm"
        ]
    );
}

#[test]
fn install_with_force_places_a_handler_despite_audit_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let config = two_dir_device(root).display().to_string();
    let (wasm, toml) = hostile_source(root, &built_wasm("hostile"), TMP_ONLY);
    let (out, t) = cli(&[
        "handlers", "install", "--force", "--config", &config, &wasm, &toml,
    ]);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains("error: imports `otabox:handler/process@1.1.0`"),
        "{t}"
    );
    assert!(root.join("local/hostile.toml").is_file());
}

#[test]
fn install_refuses_a_target_directory_that_is_a_link_or_not_writable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let config = two_dir_device(root);
    let (wasm, toml) = hostile_source(root, &built_wasm("hostile"), &hostile_grants(root));
    // The integrator's directory a link to elsewhere.
    let elsewhere = root.join("elsewhere");
    std::fs::create_dir(&elsewhere).expect("elsewhere");
    std::fs::remove_dir(root.join("local")).expect("rmdir");
    std::os::unix::fs::symlink(&elsewhere, root.join("local")).expect("link");
    let config_arg = config.display().to_string();
    let (out, t) = cli(&["handlers", "install", "--config", &config_arg, &wasm, &toml]);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("is a symbolic link (to"), "{t}");
    assert!(snapshot(&elsewhere).is_empty());

    // Not writable for the installer: a directory it does not own, mode
    // 0555, and the installer without root's override of permissions.
    std::fs::remove_file(root.join("local")).expect("unlink");
    let local = root.join("local");
    std::fs::create_dir(&local).expect("local");
    install_handler(
        &local,
        "counter",
        &built_wasm("hostile"),
        "otabox-test/counter:1",
        &hostile_grants(root),
    );
    let chowned = Command::new("chown")
        .args(["65534:65534"])
        .arg(&local)
        .status()
        .expect("chown");
    assert!(chowned.success());
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o555)).expect("chmod");
    let before = snapshot(&local);
    let out = Command::new("setpriv")
        .args([
            "--bounding-set",
            "-dac_override,-dac_read_search,-fowner",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_otabox"))
        .args(["handlers", "install", "--config", &config_arg, &wasm, &toml])
        .env("OTABOX_LOG", "error")
        .output()
        .expect("setpriv");
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("cannot write") && t.contains("Permission denied"),
        "{t}"
    );
    assert_eq!(snapshot(&local), before);
}

#[test]
fn concurrent_installs_of_one_name_leave_one_consistent_pair_while_loaders_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let config = two_dir_device(root).display().to_string();
    let caps = hostile_grants(root);
    let builds = [built_wasm("hostile"), rebuilt_hostile()];
    let sources: Vec<(String, String)> = builds
        .iter()
        .enumerate()
        .map(|(i, wasm)| {
            let manifest = install_handler(
                &root.join(format!("src{i}")),
                "hostile",
                wasm,
                "otabox-test/hostile:1",
                &caps,
            );
            (
                manifest.with_extension("wasm").display().to_string(),
                manifest.display().to_string(),
            )
        })
        .collect();
    let install = |i: usize| {
        let (wasm, toml) = &sources[i];
        spawn_otabox(&["handlers", "install", "--config", &config, wasm, toml])
    };
    let first = install(0).wait_with_output().expect("first install");
    assert!(first.status.success(), "{}", text(&first));
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let list = list_json(&config);
                let hostile = list
                    .iter()
                    .find(|h| h["name"] == "hostile")
                    .expect("listed");
                assert_eq!(
                    hostile["status"], "loaded",
                    "a loader saw half a pair: {hostile}"
                );
                reads += 1;
            }
            reads
        });
        for _ in 0..6 {
            let (a, b) = (install(0), install(1));
            for child in [a, b] {
                let out = child.wait_with_output().expect("install");
                assert!(out.status.success(), "{}", text(&out));
            }
            let placed = snapshot(&root.join("local"));
            assert_eq!(placed.len(), 2, "{:?}", placed.keys());
            let wasm = placed["hostile.wasm"].as_deref().expect("wasm");
            let toml =
                String::from_utf8(placed["hostile.toml"].clone().expect("toml")).expect("utf8");
            assert!(toml.contains(&sha256_hex(wasm)), "the pair does not match");
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let reads = reader.join().expect("reader");
        assert!(reads > 0);
    });
}

#[test]
fn remove_takes_out_an_integrators_handler_and_its_cache_entry_but_refuses_a_packaged_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let config = two_dir_device(root).display().to_string();
    let (wasm, toml) = hostile_source(root, &built_wasm("hostile"), &hostile_grants(root));
    install_ok(&config, &wasm, &toml);
    let sha = sha256_hex(&built_wasm("hostile"));
    let cached = || {
        std::fs::read_dir(root.join("state/cache"))
            .expect("cache")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(&sha))
    };
    assert!(cached());

    let packaged = snapshot(&root.join("packaged"));
    let (out, t) = cli(&["handlers", "remove", "--config", &config, "file"]);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("is packaged with otabox") && t.contains("[handlers.file] enabled = false"),
        "{t}"
    );
    assert_eq!(snapshot(&root.join("packaged")), packaged);
    for bad in ["../packaged/file", "nope"] {
        let (out, t) = cli(&["handlers", "remove", "--config", &config, bad]);
        assert_eq!(out.status.code(), Some(1), "{t}");
        assert_eq!(snapshot(&root.join("packaged")), packaged);
    }

    let (out, t) = cli(&["handlers", "remove", "--config", &config, "hostile"]);
    assert!(out.status.success(), "{t}");
    assert!(snapshot(&root.join("local")).is_empty());
    assert!(!cached(), "the cache entry goes with it");
    assert!(t.contains("on SIGHUP"), "{t}");
}

/// Waits up to `wait` for `child` to exit; whether it did.
fn exits_within(child: &mut std::process::Child, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        if child.try_wait().expect("wait").is_some() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn spawn_otabox(args: &[&str]) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_otabox"))
        .args(args)
        .env("OTABOX_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

#[test]
fn loaders_wait_for_a_placement_in_progress_and_installs_wait_for_loaders() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let config = two_dir_device(root).display().to_string();
    let local = root.join("local");
    let (wasm, toml) = hostile_source(root, &built_wasm("hostile"), &hostile_grants(root));
    install_ok(&config, &wasm, &toml);

    // Half a replacement, as an install between its two renames, under
    // the installer's exclusive lock: a loader waits, then sees it whole.
    let held = std::fs::File::open(&local).expect("open dir");
    held.lock().expect("exclusive lock");
    let placed = local.join("hostile.wasm");
    std::fs::write(&placed, rebuilt_hostile()).expect("new wasm");
    let mut list = spawn_otabox(&["handlers", "list", "--config", &config, "--json"]);
    assert!(
        !exits_within(&mut list, Duration::from_secs(2)),
        "list read the directory during a placement"
    );
    let rebuilt = install_handler(
        &root.join("src-next"),
        "hostile",
        &rebuilt_hostile(),
        "otabox-test/hostile:1",
        &hostile_grants(root),
    );
    std::fs::copy(&rebuilt, local.join("hostile.toml")).expect("new toml");
    held.unlock().expect("unlock");
    let out = list.wait_with_output().expect("list");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let hostile = listed
        .as_array()
        .and_then(|l| l.iter().find(|h| h["name"] == "hostile"))
        .expect("listed");
    assert_eq!(hostile["status"], "loaded", "{hostile}");
    assert_eq!(hostile["sha256"], sha256_hex(&rebuilt_hostile()));

    // A loader's shared lock holds an install back.
    held.lock_shared().expect("shared lock");
    let before = snapshot(&local);
    let mut install = spawn_otabox(&["handlers", "install", "--config", &config, &wasm, &toml]);
    assert!(!exits_within(&mut install, Duration::from_secs(2)));
    assert_eq!(snapshot(&local), before, "placed while a loader read");
    held.unlock().expect("unlock");
    let out = install.wait_with_output().expect("install");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        snapshot(&local)["hostile.wasm"].as_deref(),
        Some(&built_wasm("hostile")[..])
    );
}
