//! The `otabox` binary: `handlers list`, `handlers audit`, `handlers
//! run-phase` and `demo`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn write_config(dir: &Path, body: &str) -> String {
    let path = dir.join("device.toml");
    std::fs::write(
        &path,
        format!("[paths]\nhandlers = \"handlers\"\nstate = \"state\"\n{body}"),
    )
    .expect("config");
    path.display().to_string()
}

/// The `file` handler in `dir/handlers`, its `/var/lib/otabox/files`
/// mounted at `dir/files` (created); returns the config path.
fn file_handler_config(dir: &Path) -> String {
    let files = dir.join("files");
    std::fs::create_dir_all(&files).expect("files");
    install_handler(
        &dir.join("handlers"),
        "file",
        &built_wasm("file"),
        "otabox/file:1",
        "[[filesystem]]\npath = \"/var/lib/otabox/files\"\naccess = \"rw\"\n",
    );
    write_config(
        dir,
        &format!(
            "[handlers.file.mounts]\n\"/var/lib/otabox/files\" = \"{}\"\n",
            files.display()
        ),
    )
}

const FILE_CAPS: &str = "[[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n";

#[test]
fn audit_passes_a_clean_handler_and_lists_its_real_imports() {
    let dir = tempfile::tempdir().expect("tempdir");
    install_handler(
        &dir.path().join("handlers"),
        "file",
        &built_wasm("file"),
        "otabox/file:1",
        FILE_CAPS,
    );
    let out = otabox(&[
        "handlers",
        "audit",
        "--config",
        &write_config(dir.path(), ""),
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("handler file: ok"), "{t}");
    assert!(t.contains("wasi:filesystem/preopens@0.2"), "{t}");
    assert!(t.contains("otabox:handler/payloads@1.1.0"), "{t}");
    assert!(t.contains("1 handler(s), 0 error(s), 0 warning(s)"), "{t}");
}

#[test]
fn audit_fails_on_an_undeclared_import_and_warns_on_an_unused_declaration() {
    let dir = tempfile::tempdir().expect("tempdir");
    let handlers = dir.path().join("handlers");
    install_handler(
        &handlers,
        "hostile",
        &built_wasm("hostile"),
        "otabox-test/hostile:1",
        FILE_CAPS,
    );
    install_handler(
        &handlers,
        "file",
        &built_wasm("file"),
        "otabox/file:1",
        &format!(
            "{FILE_CAPS}[[commands]]\nprogram = \"/bin/true\"\n[network]\nhosts = [\"updates.example:443\"]\n"
        ),
    );
    let out = otabox(&[
        "handlers",
        "audit",
        "--dir",
        &handlers.display().to_string(),
    ]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains("error: imports `otabox:handler/process@1.1.0` but declares no command rules"),
        "{t}"
    );
    assert!(
        t.contains("warning: declares command rules but imports no process interface"),
        "{t}"
    );
    assert!(
        t.contains("warning: declares network hosts but imports no network interface"),
        "{t}"
    );
    assert!(t.contains("handler file: 0 error(s), 2 warning(s)"), "{t}");

    let json = otabox(&[
        "handlers",
        "audit",
        "--dir",
        &handlers.display().to_string(),
        "--json",
    ]);
    assert_eq!(json.status.code(), Some(1));
    let audits: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    let hostile = audits
        .as_array()
        .expect("array")
        .iter()
        .find(|a| a["name"] == "hostile")
        .expect("hostile");
    assert_eq!(hostile["findings"][0]["severity"], "error");
    assert!(
        hostile["imports"]
            .as_array()
            .expect("imports")
            .iter()
            .any(|i| i["capability"] == "process")
    );
    assert_eq!(hostile["sha256"].as_str().map(str::len), Some(64));
}

#[test]
fn audit_reports_a_grant_the_device_withholds_and_a_tampered_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let handlers = dir.path().join("handlers");
    install_handler(
        &handlers,
        "hostile",
        &built_wasm("hostile"),
        "otabox-test/hostile:1",
        &format!("{FILE_CAPS}[[commands]]\nprogram = \"/bin/true\"\n"),
    );
    let config = write_config(dir.path(), "[handlers.hostile]\ncommands = []\n");
    let t = text(&otabox(&["handlers", "audit", "--config", &config]));
    assert!(
        t.contains("but the device grants none of its command rules"),
        "{t}"
    );
    assert!(
        t.contains("commands:   /bin/true") && t.contains("commands:   none"),
        "declared vs granted: {t}"
    );

    std::fs::write(handlers.join("hostile.wasm"), b"\0asm not really").expect("tamper");
    let out = otabox(&["handlers", "audit", "--config", &config]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("sha256 of the wasm is"),
        "{}",
        text(&out)
    );
}

#[test]
fn list_shows_loaded_and_refused_handlers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let handlers = dir.path().join("handlers");
    install_handler(
        &handlers,
        "file",
        &built_wasm("file"),
        "otabox/file:1",
        FILE_CAPS,
    );
    install_handler(
        &handlers,
        "hostile",
        &built_wasm("hostile"),
        "otabox-test/hostile:1",
        FILE_CAPS,
    );
    let out = otabox(&[
        "handlers",
        "list",
        "--dir",
        &handlers.display().to_string(),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let by_name = |n: &str| {
        list.as_array()
            .expect("array")
            .iter()
            .find(|h| h["name"] == n)
            .cloned()
            .expect(n)
    };
    assert_eq!(by_name("file")["status"], "loaded");
    assert_eq!(by_name("file")["contract"], "1.1.0");
    assert_eq!(by_name("hostile")["status"], "refused");
    assert!(
        by_name("hostile")["error"]
            .as_str()
            .expect("error")
            .contains("otabox:handler/process@1.1.0")
    );
}

#[test]
fn a_missing_config_gives_a_clear_error() {
    let out = otabox(&["handlers", "list", "--config", "/nonexistent/device.toml"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("cannot read device config /nonexistent/device.toml"),
        "{}",
        text(&out)
    );
}

#[test]
fn the_demo_runs_a_whole_update() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("demo");
    let out = otabox(&["demo", "--dir", &root.display().to_string(), "--keep"]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(t.contains("SUCCESS, installed app-config-1.2.0"), "{t}");
    assert!(t.contains("was already installed"), "{t}");
    assert!(
        t.contains("FAILURE in download") && t.contains("sha256"),
        "{t}"
    );
    assert!(t.contains("FAILURE in install (rolled back)"), "{t}");
    assert!(t.contains("replica  accepted ack {\"jobId\":\"mqtt-1\",\"status\":\"SUCCESS\",\"version\":\"2.0.0\"}"), "{t}");
    assert!(t.contains("job mqtt-2 already-installed"), "{t}");
    assert!(
        t.contains("payload server (nginx) serves http://127.0.0.1:"),
        "{t}"
    );
    assert!(!t.contains("stopped:"), "{t}");
    assert!(root.join("device/files/app.conf").is_file());
}

#[test]
fn operators_keygen_sign_and_verify_deployments_and_root_rotations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let run = |args: &[&str]| otabox(args);
    let mut public = Vec::new();
    for name in ["a", "b", "c", "n1", "n2"] {
        let out = run(&["keygen", "--out", &d.display().to_string(), "--name", name]);
        assert!(out.status.success(), "{}", text(&out));
        public.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    let key = |name: &str| d.join(format!("{name}.key")).display().to_string();
    let root = d.join("root.json");
    std::fs::write(
        &root,
        serde_json::json!({"version": 1, "threshold": 2, "keys": &public[..3]}).to_string(),
    )
    .expect("root");
    let deployment = d.join("deployment.json");
    std::fs::write(
        &deployment,
        serde_json::json!({"schema": 1, "jobId": "signed-1", "version": "2.0",
            "steps": [{"updateType": "otabox/file:1", "manifest": {"name": "app"},
                       "files": [{"name": "p", "url": "https://cdn/p?sig=x", "size": 3, "sha256": "a".repeat(64)}]}]})
        .to_string(),
    )
    .expect("deployment");
    let dep = deployment.display().to_string();
    let signed_out = run(&[
        "sign",
        "--key",
        &key("a"),
        "--key",
        &key("c"),
        "--sequence",
        "5",
        "--device",
        "dev-1",
        &dep,
    ]);
    assert!(signed_out.status.success(), "{}", text(&signed_out));
    let signed = d.join("signed.json");
    std::fs::write(&signed, &signed_out.stdout).expect("signed");
    let s = signed.display().to_string();
    let r = root.display().to_string();

    let ok = run(&["verify", "--root", &r, "--device", "dev-1", &s]);
    assert!(
        ok.status.success() && text(&ok).contains("valid: job signed-1 sequence 5"),
        "{}",
        text(&ok)
    );
    let replay = run(&[
        "verify",
        "--root",
        &r,
        "--device",
        "dev-1",
        "--last-sequence",
        "5",
        &s,
    ]);
    assert!(
        !replay.status.success() && text(&replay).contains("rollback or replay"),
        "{}",
        text(&replay)
    );
    let other = run(&["verify", "--root", &r, "--device", "dev-2", &s]);
    assert!(
        !other.status.success() && text(&other).contains("not this device"),
        "{}",
        text(&other)
    );
    let tampered_text =
        std::fs::read_to_string(&signed)
            .expect("signed")
            .replacen("\"size\": 3", "\"size\": 4", 1);
    std::fs::write(d.join("tampered.json"), tampered_text).expect("tampered");
    let tampered = run(&[
        "verify",
        "--root",
        &r,
        "--device",
        "dev-1",
        &d.join("tampered.json").display().to_string(),
    ]);
    assert!(!tampered.status.success(), "{}", text(&tampered));
    let single = run(&[
        "sign",
        "--key",
        &key("a"),
        "--sequence",
        "6",
        "--device",
        "dev-1",
        &dep,
    ]);
    std::fs::write(d.join("single.json"), &single.stdout).expect("single");
    let weak = run(&[
        "verify",
        "--root",
        &r,
        "--device",
        "dev-1",
        &d.join("single.json").display().to_string(),
    ]);
    assert!(
        !weak.status.success() && text(&weak).contains("1 valid signature(s)"),
        "{}",
        text(&weak)
    );

    let next = d.join("next.json");
    std::fs::write(
        &next,
        serde_json::json!({"version": 2, "threshold": 2, "keys": &public[3..]}).to_string(),
    )
    .expect("next");
    let n = next.display().to_string();
    let both = run(&[
        "sign",
        "--root-next",
        "--key",
        &key("a"),
        "--key",
        &key("b"),
        "--key",
        &key("n1"),
        "--key",
        &key("n2"),
        &n,
    ]);
    std::fs::write(d.join("rotation.json"), &both.stdout).expect("rotation");
    let rotated = run(&[
        "verify",
        "--root",
        &r,
        "--rotation",
        &d.join("rotation.json").display().to_string(),
    ]);
    assert!(
        rotated.status.success() && text(&rotated).contains("root version 2"),
        "{}",
        text(&rotated)
    );
    let new_only = run(&[
        "sign",
        "--root-next",
        "--key",
        &key("n1"),
        "--key",
        &key("n2"),
        &n,
    ]);
    std::fs::write(d.join("rotation-bad.json"), &new_only.stdout).expect("rotation");
    let refused = run(&[
        "verify",
        "--root",
        &r,
        "--rotation",
        &d.join("rotation-bad.json").display().to_string(),
    ]);
    assert!(
        !refused.status.success() && text(&refused).contains("current root"),
        "{}",
        text(&refused)
    );
}

/// `handlers run-phase` drives single phases against a manifest on the
/// command line; calls of one job share checkpoints, so a rollback after
/// an install restores what the backup kept.
#[test]
fn run_phase_drives_single_phases_that_share_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = dir.path().join("files");
    let config = file_handler_config(dir.path());
    std::fs::write(files.join("app.conf"), "v1\n").expect("previous");
    std::fs::write(dir.path().join("app.conf"), "v2\n").expect("payload");
    let payload = format!("app.conf={}", dir.path().join("app.conf").display());
    let manifest = r#"{"name":"cfg","version":"2","payload":"app.conf","destination":"/var/lib/otabox/files/app.conf"}"#;
    let run_phase = |phase: &str, manifest: &str, extra: &[&str]| {
        let mut args = vec![
            "handlers",
            "run-phase",
            "--config",
            &config,
            "--handler",
            "file",
            "--phase",
            phase,
            "--manifest",
            manifest,
        ];
        args.extend_from_slice(extra);
        otabox(&args)
    };
    let phase =
        |phase: &str| run_phase(phase, manifest, &["--payload", &payload, "--job", "try-1"]);
    let validate = phase("validate");
    assert!(validate.status.success(), "{}", text(&validate));
    let plan: serde_json::Value = serde_json::from_slice(&validate.stdout).expect("json");
    assert_eq!(plan["installed_criteria"], "cfg-2");
    assert_eq!(plan["reboot"], "none");
    for step in ["backup", "install", "apply"] {
        let out = phase(step);
        assert!(out.status.success(), "{step}: {}", text(&out));
    }
    assert_eq!(
        std::fs::read_to_string(files.join("app.conf")).expect("read"),
        "v2\n"
    );
    let rollback = phase("rollback");
    assert!(rollback.status.success(), "{}", text(&rollback));
    assert_eq!(
        std::fs::read_to_string(files.join("app.conf")).expect("read"),
        "v1\n",
        "the backup taken by an earlier call was restored"
    );

    let bad = run_phase("validate", r#"{"name":"cfg"}"#, &[]);
    assert_eq!(bad.status.code(), Some(1), "{}", text(&bad));
    let failure: serde_json::Value = serde_json::from_slice(&bad.stdout).expect("json");
    assert_eq!(failure["failed"]["result_code"], 10);
    assert!(
        failure["failed"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("missing field")),
        "{failure}"
    );
}

/// The risk findings of `docs/audit.md`, by id, in `--json`.
fn finding_ids(out: &Output, handler: &str) -> Vec<String> {
    let audits: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    audits
        .as_array()
        .expect("array")
        .iter()
        .find(|a| a["name"] == handler)
        .expect("handler")["findings"]
        .as_array()
        .expect("findings")
        .iter()
        .map(|f| f["id"].as_str().expect("id").to_string())
        .collect()
}

#[test]
fn audit_warns_on_risky_grants_by_stable_id_and_strict_makes_them_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let handlers = dir.path().join("handlers");
    install_handler(
        &handlers,
        "hostile",
        &built_wasm("hostile"),
        "otabox-test/hostile:1",
        "[[filesystem]]\npath = \"/etc\"\naccess = \"rw\"\n\
         [[commands]]\nprogram = \"/bin/sh\"\nargs = [\"**\"]\n\
         [[commands]]\nprogram = \"/usr/bin/python3\"\nargs = [\"-c\", \"*\"]\n\
         [network]\nhosts = [\"127.0.0.1\"]\n",
    );
    let dir_arg = handlers.display().to_string();
    let out = otabox(&["handlers", "audit", "--dir", &dir_arg]);
    let t = text(&out);
    assert!(out.status.success(), "risks warn by default: {t}");
    assert!(
        t.contains("warning: `/bin/sh **` is runs any command") && t.contains("[shell-wildcard]"),
        "{t}"
    );
    assert!(t.contains("`/usr/bin/python3 -c *`"), "{t}");
    assert!(
        t.contains(
            "warning: `rw /etc` lets the handler change the system's own files [system-path-rw]"
        ),
        "{t}"
    );
    assert!(t.contains("effective /bin/sh **: runs any command"), "{t}");

    let json = otabox(&["handlers", "audit", "--dir", &dir_arg, "--json"]);
    let ids = finding_ids(&json, "hostile");
    assert_eq!(
        ids,
        ["shell-wildcard", "shell-wildcard", "system-path-rw"],
        "{}",
        text(&json)
    );

    let strict = otabox(&["handlers", "audit", "--dir", &dir_arg, "--strict"]);
    assert_eq!(strict.status.code(), Some(1), "{}", text(&strict));
    assert!(
        text(&strict).contains("error: `rw /etc`"),
        "{}",
        text(&strict)
    );
    let deny = otabox(&[
        "handlers",
        "audit",
        "--dir",
        &dir_arg,
        "--deny",
        "system-path-rw",
    ]);
    assert_eq!(deny.status.code(), Some(1), "{}", text(&deny));
    assert!(
        text(&deny).contains("1 error(s), 2 warning(s)"),
        "{}",
        text(&deny)
    );
}

#[test]
fn audit_and_load_refuse_narrowing_that_cannot_be_enforced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().display().to_string();
    let handlers = dir.path().join("handlers");
    let hostile_caps = |fs: &str| {
        format!("{fs}[[commands]]\nprogram = \"/bin/true\"\n[network]\nhosts = [\"127.0.0.1\"]\n")
    };
    install_handler(
        &handlers,
        "hostile",
        &built_wasm("hostile"),
        "otabox-test/hostile:1",
        &hostile_caps(&format!(
            "[[filesystem]]\npath = \"{root}/rw\"\naccess = \"rw\"\n\
             [[filesystem]]\npath = \"{root}/rw/ro\"\naccess = \"ro\"\n"
        )),
    );
    let out = otabox(&[
        "handlers",
        "audit",
        "--dir",
        &handlers.display().to_string(),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(
        finding_ids(&out, "hostile"),
        ["grant-refused"],
        "{}",
        text(&out)
    );
    assert!(
        text(&out).contains("inside the read-write grant"),
        "{}",
        text(&out)
    );

    install_handler(
        &handlers,
        "hostile",
        &built_wasm("hostile"),
        "otabox-test/hostile:1",
        &hostile_caps(&format!(
            "[[filesystem]]\npath = \"{root}/rw\"\naccess = \"rw\"\n"
        )),
    );
    for (device, why) in [
        (
            format!("[handlers.hostile]\nread_only = [\"{root}/rw/sub\"]\n"),
            "cannot be enforced",
        ),
        (
            "[handlers.hostile]\ncommands = [\"/bin/true\", \"/bin/sh\"]\n".to_string(),
            "\"/bin/sh\"",
        ),
    ] {
        let config = write_config(dir.path(), &device);
        let out = otabox(&["handlers", "audit", "--config", &config]);
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{device}: {t}");
        assert!(
            t.contains("[grant-refused]") && t.contains(why),
            "{device}: {t}"
        );
        let list = text(&otabox(&["handlers", "list", "--config", &config]));
        assert!(
            list.contains(why),
            "{device}: the handler must be refused: {list}"
        );
    }
}

#[test]
fn audit_states_what_the_first_party_grants_really_give() {
    let dir = tempfile::tempdir().expect("tempdir");
    for name in ["apt", "container", "firmware"] {
        copy_built_handler(dir.path(), name);
    }
    let config = write_config(
        dir.path(),
        "[handlers.firmware]\nenabled = false\n\
         [handlers.firmware.config]\nbootloader = { kind = \"grub\", env = \"/boot/grub/grubenv\" }\n",
    );
    let t = text(&otabox(&["handlers", "audit", "--config", &config]));
    assert!(
        t.contains("effective /usr/bin/apt-get **: root-equivalent")
            && t.contains("runs as root, all capabilities, no_new_privs"),
        "{t}"
    );
    assert!(
        t.contains("effective /usr/bin/docker **: network (runs containers; --privileged"),
        "{t}"
    );
    assert!(
        t.contains("effective /usr/bin/grub-editenv /boot/grub/grubenv set **: bootloader"),
        "{t}"
    );
    assert!(!t.contains("writes anywhere"), "{t}");
    assert!(t.contains("[root-equivalent]"), "{t}");
}

/// A device whose broker port is closed: the agent logs its start and keeps
/// retrying.
fn idle_agent_config(dir: &Path) -> std::path::PathBuf {
    file_device(
        dir,
        "dev-colour",
        &format!("port = {}", common::services::free_port()),
    )
}

/// Runs `otabox run` for a moment with `env`, stderr to `log`; returns the log.
fn agent_log_to_file(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = idle_agent_config(dir.path());
    let log = dir.path().join("agent.log");
    let mut agent = Command::new(env!("CARGO_BIN_EXE_otabox"))
        .args(["run", "--config"])
        .arg(&config)
        .env("OTABOX_LOG", "debug")
        .env_remove("NO_COLOR")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("start the agent");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut text = String::new();
    while std::time::Instant::now() < deadline && !text.contains("started") {
        std::thread::sleep(std::time::Duration::from_millis(50));
        text = std::fs::read_to_string(&log).unwrap_or_default();
    }
    let _ = agent.kill();
    let _ = agent.wait();
    std::fs::read_to_string(&log).expect("read log")
}

#[test]
fn logs_redirected_to_a_file_carry_no_colour_escapes() {
    let log = agent_log_to_file(&[]);
    assert!(log.contains("started"), "{log}");
    assert!(
        !log.contains("\x1b["),
        "colour escapes in a log file: {log:?}"
    );
    // Not even when the terminal type says it could show them.
    let log = agent_log_to_file(&[("TERM", "xterm-256color"), ("NO_COLOR", "")]);
    assert!(log.contains("started") && !log.contains("\x1b["), "{log:?}");
}

/// `otabox handlers list` with debug logs on a pseudo-terminal (through
/// `script`), with `env`; returns what the terminal showed.
fn on_a_terminal(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = idle_agent_config(dir.path());
    // The inner timeout ends the agent itself: killing `script` leaves its
    // child running.
    let command = format!(
        "timeout -s KILL 2 {} --log debug run --config {}",
        env!("CARGO_BIN_EXE_otabox"),
        config.display()
    );
    let mut child = Command::new("timeout")
        .args(["-s", "KILL", "3", "script", "-qfec", &command, "/dev/null"])
        .env_remove("NO_COLOR")
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("script (util-linux) is installed");
    let mut shown = Vec::new();
    std::io::Read::read_to_end(child.stdout.as_mut().expect("stdout"), &mut shown)
        .expect("read the terminal");
    let _ = child.wait();
    String::from_utf8_lossy(&shown).into_owned()
}

#[test]
fn logs_on_a_terminal_are_coloured_unless_no_color_is_set() {
    let shown = on_a_terminal(&[]);
    assert!(shown.contains("started"), "{shown:?}");
    assert!(
        shown.contains("\x1b["),
        "no colour on a terminal: {shown:?}"
    );
    for value in ["1", "0", "false"] {
        let shown = on_a_terminal(&[("NO_COLOR", value)]);
        assert!(shown.contains("started"), "{shown:?}");
        assert!(!shown.contains("\x1b["), "NO_COLOR={value}: {shown:?}");
    }
    let shown = on_a_terminal(&[("NO_COLOR", "")]);
    assert!(
        shown.contains("\x1b["),
        "an empty NO_COLOR is unset: {shown:?}"
    );
}

#[test]
fn a_log_filter_selects_targets_and_a_bad_one_is_refused_before_anything_runs() {
    // Only the agent's own target, at info: its start line, and no line of
    // any other target (the MQTT client's, the runtime's).
    let log = agent_log_to_file(&[("OTABOX_LOG", "off,otabox_agent=info")]);
    assert!(log.contains("started"), "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.starts_with("20")).collect();
    assert!(!lines.is_empty(), "{log}");
    for line in &lines {
        assert!(
            line.contains(" otabox_agent"),
            "a line of another target: {line}"
        );
        assert!(!line.contains("DEBUG"), "a debug line at info: {line}");
    }
    // A misspelt level (which a plain target filter would take for a target
    // and so log nothing), a level that does not exist, a directive with
    // two '=', from the flag or the environment: a usage error naming the
    // filter, not a silent fallback to the default.
    for bad in ["debgu", "info,wran", "otabox=loud", "otabox=debug=trace"] {
        let flag = otabox(&["--log", bad, "version"]);
        assert_eq!(flag.status.code(), Some(2), "--log {bad}: {}", text(&flag));
        assert!(text(&flag).contains("--log"), "{}", text(&flag));
        assert!(text(&flag).contains("target=level"), "{}", text(&flag));
        assert!(flag.stdout.is_empty(), "ran anyway: {}", text(&flag));
        let env = Command::new(env!("CARGO_BIN_EXE_otabox"))
            .arg("version")
            .env("OTABOX_LOG", bad)
            .output()
            .expect("run otabox");
        assert_eq!(
            env.status.code(),
            Some(2),
            "OTABOX_LOG={bad}: {}",
            text(&env)
        );
    }
}

#[test]
fn help_documents_no_color() {
    let out = otabox(&["--help"]);
    assert!(text(&out).contains("NO_COLOR"), "{}", text(&out));
}

/// Runs `otabox args` with a stdout pipe whose reader is closed before the
/// command writes anything (`otabox … | head -c 0`); returns its status and
/// stderr.
fn with_stdout_closed(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_otabox"))
        .args(args)
        .env("OTABOX_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run otabox");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_printing_command_exits_quietly_when_its_reader_goes_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = file_handler_config(dir.path());
    let db = dir.path().join("fleet.db").display().to_string();
    assert!(
        otabox(&["fleet", "--db", &db, "register", "pump-1"])
            .status
            .success()
    );
    let keys = dir.path().join("keys").display().to_string();
    let manifest = r#"{"name":"cfg","version":"2","payload":"app.conf","destination":"/var/lib/otabox/files/app.conf"}"#;
    let demo = dir.path().join("demo").display().to_string();
    let commands: &[&[&str]] = &[
        &["handlers", "list", "--config", &config],
        &["handlers", "list", "--config", &config, "--json"],
        &["handlers", "audit", "--config", &config],
        &[
            "handlers",
            "run-phase",
            "--config",
            &config,
            "--handler",
            "file",
            "--phase",
            "validate",
            "--manifest",
            manifest,
        ],
        &["fleet", "--db", &db, "status"],
        &["fleet", "--db", &db, "status", "--json"],
        &["fleet", "--db", &db, "watch"],
        &["keygen", "--out", &keys, "--name", "k"],
        &["demo", "--dir", &demo],
    ];
    for args in commands {
        let (status, stderr) = with_stdout_closed(args);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr, "", "{args:?} wrote to stderr");
        assert_eq!(status.code(), Some(141), "{args:?}: {status}");
    }
    assert!(
        !Path::new(&demo).exists(),
        "the demo cleaned up its directory as it stopped"
    );
}

#[test]
fn run_phase_with_a_bare_dir_keeps_state_and_cache_private_to_the_user_not_in_tmp() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (home, tmp, files) = (
        dir.path().join("home"),
        dir.path().join("tmp"),
        dir.path().join("files"),
    );
    for d in [&home, &tmp, &files] {
        std::fs::create_dir_all(d).expect("dir");
    }
    let handlers = dir.path().join("handlers");
    install_handler(
        &handlers,
        "file",
        &built_wasm("file"),
        "otabox/file:1",
        "[[filesystem]]\npath = \"/var/lib/otabox/files\"\naccess = \"rw\"\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_otabox"))
        .args(["handlers", "run-phase", "--config", "/nonexistent/device.toml", "--dir"])
        .arg(&handlers)
        .args(["--handler", "file", "--phase", "backup", "--job", "try-7", "--manifest"])
        .arg(r#"{"name":"cfg","version":"2","payload":"app.conf","destination":"/var/lib/otabox/files/app.conf"}"#)
        .env("HOME", &home)
        .env_remove("XDG_STATE_HOME")
        .env("TMPDIR", &tmp)
        .env("OTABOX_LOG", "error")
        .output()
        .expect("run otabox");
    // The file handler's backup of a missing mount fails or succeeds; what
    // matters is where the checkpoint store and the compiled cache went.
    let _ = out.status;
    assert_eq!(
        std::fs::read_dir(&tmp).expect("tmp").count(),
        0,
        "another user can plant checkpoints and native code in a shared temporary directory: {}",
        text(&out)
    );
    let state = home.join(".local/state/otabox");
    assert!(state.join("tryout/try-7").is_dir(), "{}", text(&out));
    assert!(state.join("cache").is_dir(), "{}", text(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&state)
        .expect("state")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700, "the state directory is the user's alone");

    let xdg = dir.path().join("xdg");
    let out = Command::new(env!("CARGO_BIN_EXE_otabox"))
        .args([
            "handlers",
            "run-phase",
            "--config",
            "/nonexistent/device.toml",
            "--dir",
        ])
        .arg(&handlers)
        .args(["--handler", "file", "--phase", "describe"])
        .env("HOME", &home)
        .env("XDG_STATE_HOME", &xdg)
        .env("TMPDIR", &tmp)
        .env("OTABOX_LOG", "error")
        .output()
        .expect("run otabox");
    assert!(out.status.success(), "{}", text(&out));
    assert!(xdg.join("otabox/cache").is_dir(), "{}", text(&out));
}

/// A folder for the firmware handler: its slots, marker and state
/// directory, mounted by the returned `[handlers.firmware.mounts]` table.
fn firmware_mounts(dir: &Path) -> String {
    for sub in ["slots", "run", "fw-state"] {
        std::fs::create_dir_all(dir.join(sub)).expect("firmware dirs");
    }
    for slot in ["slot-a", "slot-b"] {
        std::fs::write(dir.join("slots").join(slot), vec![0u8; 4096]).expect("slot");
    }
    std::fs::write(dir.join("run/booted-slot"), "A\n").expect("marker");
    format!(
        "[handlers.firmware.mounts]\n\"/var/lib/otabox/firmware\" = \"{0}/fw-state\"\n\
         \"/run/otabox\" = \"{0}/run\"\n\"/dev/otabox\" = \"{0}/slots\"\n",
        dir.display()
    )
}

/// A firmware config table with `bootloader`, and the mounts.
fn firmware_config(dir: &Path, bootloader: &str) -> String {
    format!(
        "[handlers.firmware.config]\ncompatible = \"acme,pump-v2\"\nbootloader = {bootloader}\n{}",
        firmware_mounts(dir)
    )
}

/// Runs `otabox ARGS` for at most 60 s (an agent that starts would run on).
fn otabox_bounded(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_otabox"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run otabox");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!("otabox {args:?} did not stop: {}", text(&out));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn the_agent_refuses_to_start_on_a_handler_config_the_handler_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    copy_built_handler(&root, "firmware");
    let config = write_config(
        &root,
        &format!(
            "[device]\nid = \"pump-1\"\n[mqtt]\nport = {}\n{}",
            common::services::free_port(),
            firmware_config(&root, "{ kind = \"grubb\", env = \"/boot/grub/grubenv\" }")
        ),
    );
    let started = std::time::Instant::now();
    let out = otabox_bounded(&["run", "--config", &config]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(
            "error: handler firmware refuses its device config (`[handlers.firmware] config` in device.toml): \
             invalid firmware handler config: `bootloader.kind` = \"grubb\" is not a bootloader otabox drives: \
             expected one of grub, uboot"
        ),
        "{t}"
    );
    assert!(
        t.contains("set `enabled = false` in `[handlers.firmware]`"),
        "{t}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "refused at once"
    );

    let audit = otabox(&["handlers", "audit", "--config", &config]);
    assert_eq!(audit.status.code(), Some(1), "{}", text(&audit));
    assert!(
        text(&audit).contains("`bootloader.kind` = \"grubb\"")
            && text(&audit).contains("[invalid-config]"),
        "{}",
        text(&audit)
    );
}

#[test]
fn a_valid_config_loads_every_first_party_handler_and_a_bad_field_refuses_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    for name in ["apt", "container", "file", "firmware"] {
        copy_built_handler(&root, name);
    }
    std::fs::create_dir_all(root.join("files")).expect("files");
    let valid = format!(
        "[handlers.apt.config]\ninventory = \"managed\"\n\
         [handlers.container.config]\ncli = \"/usr/bin/docker\"\n\
         [handlers.file.config]\nroot = \"/var/lib/otabox/files\"\n\
         [handlers.file.mounts]\n\"/var/lib/otabox/files\" = \"{}\"\n{}",
        root.join("files").display(),
        firmware_config(
            &root,
            "{ kind = \"uboot\", config = \"/etc/fw_env.config\" }"
        )
    );
    let config = write_config(&root, &valid);
    let list = otabox(&["handlers", "list", "--config", &config, "--json"]);
    let listed: serde_json::Value = serde_json::from_slice(&list.stdout).expect("json");
    for name in ["apt", "container", "file", "firmware"] {
        let entry = listed
            .as_array()
            .expect("array")
            .iter()
            .find(|h| h["name"] == name)
            .unwrap_or_else(|| panic!("{name}: {}", text(&list)));
        assert_eq!(entry["status"], "loaded", "{name}: {entry}");
    }

    for (bad, handler, why) in [
        (
            valid.replace("inventory = \"managed\"", "inventroy = \"managed\""),
            "apt",
            "invalid apt handler config: unknown field `inventroy`",
        ),
        (
            valid.replace("cli = \"/usr/bin/docker\"", "cli = \"docker\""),
            "container",
            "`cli` must be /usr/bin/docker or /usr/bin/podman, found \"docker\"",
        ),
        (
            valid.replace("root = \"/var/lib/otabox/files\"", "root = \"files\""),
            "file",
            "`root` = \"files\" must be an absolute path",
        ),
        (
            valid.replace("compatible = ", "compatibel = "),
            "firmware",
            "unknown field `compatibel`",
        ),
        (
            valid.replace(
                "compatible = \"acme,pump-v2\"",
                "compatible = \"acme,pump-v2\"\nbooted_slot_file = \"booted\"",
            ),
            "firmware",
            "`booted_slot_file` = \"booted\" must be an absolute path",
        ),
    ] {
        let config = write_config(&root, &bad);
        let listed: serde_json::Value = serde_json::from_slice(
            &otabox(&["handlers", "list", "--config", &config, "--json"]).stdout,
        )
        .expect("json");
        let entry = listed
            .as_array()
            .expect("array")
            .iter()
            .find(|h| h["name"] == handler)
            .expect("listed");
        assert_eq!(entry["status"], "refused", "{handler}: {entry}");
        let error = entry["error"].as_str().expect("error");
        assert!(
            error.contains(&format!("handler {handler} refuses its device config"))
                && error.contains(why),
            "{handler}: {error}"
        );
    }
}

#[test]
fn audit_reports_a_handler_table_that_names_no_handler_and_suggests_the_closest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    copy_built_handler(&root, "firmware");
    let config = write_config(
        &root,
        &format!(
            "[handlers.frmware.config]\ncompatible = \"acme,pump-v2\"\n{}",
            firmware_mounts(&root)
        ),
    );
    let out = otabox(&["handlers", "audit", "--config", &config]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(
            "error: device config `[handlers.frmware]` names no installed handler \
             (did you mean `[handlers.firmware]`?) [unknown-handler]"
        ),
        "{t}"
    );
    assert!(
        t.contains("missing field `compatible`") && t.contains("[invalid-config]"),
        "the meant handler went without its config: {t}"
    );
    let json = otabox(&["handlers", "audit", "--config", &config, "--json"]);
    assert_eq!(finding_ids(&json, "frmware"), ["unknown-handler"]);
}

#[test]
fn the_firmware_inventory_marks_a_rolled_back_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    copy_built_handler(&root, "firmware");
    let config = write_config(
        &root,
        &firmware_config(&root, "{ kind = \"grub\", env = \"/boot/grub/grubenv\" }"),
    );
    let record = |version: &str, state: &str| serde_json::json!({"name": "rootfs", "version": version, "sha256": "00", "state": state});
    std::fs::write(
        root.join("fw-state/slots.json"),
        serde_json::json!({"A": record("2.0.0", "good"), "B": record("2.1.0", "bad")}).to_string(),
    )
    .expect("slots.json");
    let out = otabox(&[
        "handlers",
        "run-phase",
        "--config",
        &config,
        "--handler",
        "firmware",
        "--phase",
        "inventory",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let items: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let versions: Vec<(&str, &str)> = items
        .as_array()
        .expect("items")
        .iter()
        .map(|i| {
            (
                i["name"].as_str().unwrap_or_default(),
                i["version"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        versions,
        [("slot-A", "2.0.0"), ("slot-B", "2.1.0 (rolled back)")]
    );
}

/// A root of two keys in `dir/root.json` and a deployment signed by both
/// for `target`, in `dir/deployment.json`; returns its expiry.
fn signed_deployment(dir: &Path, target: otabox::trust::signed::Target) -> u64 {
    use otabox::trust::signed;
    let keys: Vec<(String, String)> = (0..2)
        .map(|_| signed::generate_key().expect("key"))
        .collect();
    let root = signed::Root {
        version: 1,
        threshold: 2,
        keys: keys.iter().map(|(_, p)| p.clone()).collect(),
    };
    std::fs::write(
        dir.join("root.json"),
        serde_json::to_string(&root).expect("root"),
    )
    .expect("root.json");
    let mut desired: otabox::shadow::DesiredState = serde_json::from_value(serde_json::json!({
        "schema": 1, "jobId": "job-1", "version": "1",
        "steps": [{"updateType": "otabox/file:1", "manifest": {"a": 1},
                   "files": [{"name": "p", "url": "https://h/p", "size": 3, "sha256": "a".repeat(64)}]}]
    }))
    .expect("desired");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let expires = now + 3600;
    let manifest = signed::describe(&desired, 1, target, now - 60, expires).expect("describe");
    let signers: Vec<_> = keys
        .iter()
        .map(|(s, _)| signed::signing_key(s).expect("key"))
        .collect();
    desired.signed_manifest =
        Some(serde_json::to_value(signed::sign(&manifest, &signers).expect("sign")).expect("json"));
    std::fs::write(
        dir.join("deployment.json"),
        serde_json::to_string(&desired).expect("json"),
    )
    .expect("deployment.json");
    expires
}

#[test]
fn verify_names_a_group_target_in_words_with_the_groups_hint_and_expiry_in_rfc3339() {
    let dir = tempfile::tempdir().expect("tempdir");
    let expires = signed_deployment(
        dir.path(),
        otabox::trust::signed::Target {
            device: None,
            group: Some("pumps".into()),
        },
    );
    let root = dir.path().join("root.json").display().to_string();
    let file = dir.path().join("deployment.json").display().to_string();
    let out = otabox(&["verify", "--root", &root, "--device", "pump-1", &file]);
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(
        t.contains(
            "refused: the manifest targets group \"pumps\", not this device (\"pump-1\", no groups); \
             if this device belongs to group \"pumps\", list it in `[trust] groups` of device.toml"
        ),
        "{t}"
    );
    assert!(!t.contains("Target {"), "no Rust debug output: {t}");

    let out = otabox(&[
        "verify", "--root", &root, "--device", "pump-1", "--group", "pumps", &file,
    ]);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let stamp = otabox::clock::rfc3339(expires);
    assert!(t.contains(&format!("expires {stamp}")), "{t}");
    let b = stamp.as_bytes();
    assert!(
        stamp.len() == 20 && b[4] == b'-' && b[10] == b'T' && b[19] == b'Z',
        "{stamp}"
    );
}

#[test]
fn version_is_a_subcommand_as_well_as_a_flag() {
    let flag = otabox(&["--version"]);
    let sub = otabox(&["version"]);
    assert!(sub.status.success(), "{}", text(&sub));
    assert_eq!(
        String::from_utf8_lossy(&sub.stdout),
        String::from_utf8_lossy(&flag.stdout)
    );
    assert_eq!(
        String::from_utf8_lossy(&sub.stdout).trim(),
        format!("otabox {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn fleet_commands_refuse_a_database_that_does_not_exist_and_create_none() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("flet.db");
    let db_arg = db.display().to_string();
    let deployment = dir.path().join("deployment.json");
    std::fs::write(&deployment, "{}").expect("deployment");
    let deployment = deployment.display().to_string();
    let commands: &[&[&str]] = &[
        &["status"],
        &["status", "--json"],
        &["deploy", &deployment, "--device", "pump-1"],
        &["cancel", "--device", "pump-1"],
        &["watch"],
        &["unregister", "pump-1"],
    ];
    for args in commands {
        let out = otabox(&[&["fleet", "--db", &db_arg][..], args].concat());
        let text = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {text}");
        assert!(
            text.contains(&format!("no replica database at {db_arg}"))
                && text.contains("register DEVICE")
                && text.contains("otabox replica"),
            "{args:?}: {text}"
        );
        assert!(!db.exists(), "{args:?} created {db_arg}");
    }
    // A file that is no replica database is refused and left as it was.
    std::fs::write(&db, "notes, not a database\n").expect("file");
    let out = otabox(&["fleet", "--db", &db_arg, "status"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("is not a replica database"),
        "{}",
        text(&out)
    );
    assert_eq!(
        std::fs::read_to_string(&db).expect("kept"),
        "notes, not a database\n"
    );
    // `register` creates it, as before.
    std::fs::remove_file(&db).expect("remove");
    let out = otabox(&["fleet", "--db", &db_arg, "register", "pump-1"]);
    assert!(out.status.success(), "{}", text(&out));
    let out = otabox(&["fleet", "--db", &db_arg, "status"]);
    assert!(out.status.success(), "{}", text(&out));
}

#[test]
fn fleet_unregister_removes_a_device_and_refuses_an_unknown_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("fleet.db").display().to_string();
    let fleet = |args: &[&str]| otabox(&[&["fleet", "--db", &db][..], args].concat());
    assert!(
        fleet(&["register", "pump-1", "--group", "pumps"])
            .status
            .success()
    );
    assert!(fleet(&["register", "pump-2"]).status.success());
    let out = fleet(&["unregister", "pump-1"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "unregistered pump-1\n"
    );
    let table = text(&fleet(&["status"]));
    assert!(
        !table.contains("pump-1") && table.contains("pump-2"),
        "{table}"
    );
    let out = fleet(&["unregister", "pump-1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out).contains("unknown device pump-1"),
        "{}",
        text(&out)
    );
}

#[test]
fn fleet_status_names_its_columns_and_watch_prints_a_header_and_timestamps() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("fleet.db").display().to_string();
    let out = otabox(&[
        "fleet", "--db", &db, "register", "pump-1", "--group", "pumps",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let table =
        String::from_utf8_lossy(&otabox(&["fleet", "--db", &db, "status"]).stdout).into_owned();
    let header = table.lines().next().unwrap_or_default();
    for column in [
        "DEVICE",
        "GROUP",
        "SHADOW",
        "JOB",
        "OUTCOME",
        "SOFTWARE",
        "LAST SEEN",
        "CONNECTION",
        "REASON",
    ] {
        assert!(header.contains(column), "{header}");
    }
    assert!(
        !header.contains("VERSION"),
        "the shadow counter is named so: {header}"
    );
    assert!(
        table.lines().nth(1).is_some_and(|l| l.contains("never")),
        "{table}"
    );

    let mut watch = Command::new(env!("CARGO_BIN_EXE_otabox"))
        .args(["fleet", "--db", &db, "watch"])
        .env("OTABOX_LOG", "error")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let _ = watch.kill();
    let out = watch.wait_with_output().expect("wait");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default();
    assert!(
        header.starts_with("TIME") && header.contains("OUTCOME"),
        "{text}"
    );
    let row = lines.next().unwrap_or_default();
    let (time, rest) = row.split_once(' ').unwrap_or_default();
    assert!(
        time.len() >= 20
            && time.ends_with('Z')
            && time.as_bytes()[4] == b'-'
            && time.as_bytes()[10] == b'T',
        "an RFC 3339 time leads each line: {row}"
    );
    assert!(rest.trim_start().starts_with("pump-1"), "{row}");
    assert!(
        lines.next().is_none(),
        "an unchanged device is printed once: {text}"
    );
}
