//! Commands a handler runs: nothing they start outlives them (their own
//! cgroup, or the subreaper where no cgroup can be made), and they run with
//! no more privilege than their rule grants.

mod common;

use std::time::{Duration, Instant};

use common::*;
use otabox::capabilities::{DeviceGrant, Grants, HandlerManifest, commands_authorize};
use otabox::runtime::Outcome;
use serde_json::json;

/// A hostile guest allowed `/bin/sh -c SCRIPT` and `/bin/cat FILE`.
fn shell_caps(timeout_ms: u64) -> String {
    format!(
        "[network]\nhosts = [\"127.0.0.1\"]\n[[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n\
         [[commands]]\nprogram = \"/bin/sh\"\nargs = [\"-c\", \"*\"]\n\
         [[commands]]\nprogram = \"/bin/cat\"\nargs = [\"*\"]\n\
         [limits]\ncall_timeout_ms = {timeout_ms}\n"
    )
}

/// The hostile guest with `caps`, under `grant` if any.
async fn load(
    rt: &otabox::runtime::Runtime,
    dir: &std::path::Path,
    caps: &str,
    grant: Option<&DeviceGrant>,
) -> otabox::runtime::Handler {
    match grant {
        Some(g) => hostile_with(rt, dir, caps, g).await,
        None => hostile(rt, dir, caps).await,
    }
    .expect("load")
}

fn subreaper() -> DeviceGrant {
    toml::from_str("command_isolation = \"subreaper\"\n").expect("grant")
}

/// A `sleep` duration no other test uses: how survivors are found.
fn marker(case: u64) -> u64 {
    9_000_000 + u64::from(std::process::id() % 10_000) * 100 + case
}

/// Live (not zombie) processes running `sleep <n>`.
fn sleepers(n: u64) -> Vec<i32> {
    let want = format!("sleep\0{n}\0");
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want.as_bytes())
                && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    !s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
        })
        .collect()
}

/// Waits up to a second for every `sleep <n>` to be gone; kills and
/// returns the survivors.
fn survivors(n: u64) -> Vec<i32> {
    let until = Instant::now() + Duration::from_secs(1);
    loop {
        let alive = sleepers(n);
        if alive.is_empty() || Instant::now() > until {
            for &pid in &alive {
                // SAFETY: kills a test sleeper that escaped.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            return alive;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The scripts that try to leave something running: in its own session,
/// through a double fork, with nohup; each keeping the output pipes open
/// or not.
fn escapes(n: u64) -> Vec<(&'static str, String)> {
    vec![
        ("setsid", format!("setsid sleep {n} & echo started")),
        (
            "setsid, quiet",
            format!("setsid sleep {n} >/dev/null 2>&1 & echo started"),
        ),
        ("double fork", format!("(sleep {n} &) ; echo started")),
        (
            "double fork into a new session",
            format!("(setsid sleep {n} >/dev/null 2>&1 &) ; echo started"),
        ),
        (
            "nohup",
            format!("nohup sleep {n} >/dev/null 2>&1 & echo started"),
        ),
    ]
}

async fn nothing_outlives_a_command(grant: Option<&DeviceGrant>, base: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let caps = shell_caps(20_000);
    let h = load(&rt, dir.path(), &caps, grant).await;
    for (i, (what, script)) in escapes(marker(base)).into_iter().enumerate() {
        let n = marker(base + i as u64);
        let script = script.replace(&marker(base).to_string(), &n.to_string());
        let started = Instant::now();
        let out = success(
            act(
                &h,
                json!({"action": "exec", "program": "/bin/sh", "args": ["-c", script]}),
            )
            .await
            .expect("the call"),
        );
        assert!(
            out.contains("exit=Some(0)") && out.contains("started"),
            "{what}: {out}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what}: the call waited for the leftover ({:?})",
            started.elapsed()
        );
        assert_eq!(
            survivors(n),
            Vec::<i32>::new(),
            "{what}: a process outlived its command"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_command_leaves_nothing_behind_in_its_cgroup() {
    nothing_outlives_a_command(None, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_command_leaves_nothing_behind_under_the_subreaper() {
    nothing_outlives_a_command(Some(&subreaper()), 10).await;
}

async fn nothing_outlives_the_time_limit(grant: Option<&DeviceGrant>, base: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let caps = shell_caps(1_500);
    let h = load(&rt, dir.path(), &caps, grant).await;
    for (i, (what, script)) in escapes(marker(base)).into_iter().enumerate() {
        let n = marker(base + i as u64);
        let script = format!(
            "{}; sleep 30",
            script.replace(&marker(base).to_string(), &n.to_string())
        );
        let started = Instant::now();
        // The command is killed at the deadline; the guest then reports the
        // timeout or the call itself ends at its limit.
        let outcome = act(
            &h,
            json!({"action": "exec", "program": "/bin/sh", "args": ["-c", script]}),
        )
        .await;
        if let Ok(outcome) = outcome {
            let text = failure(outcome);
            assert!(text.contains("killed with its children"), "{what}: {text}");
        }
        assert!(started.elapsed() < Duration::from_secs(3), "{what}");
        assert_eq!(
            survivors(n),
            Vec::<i32>::new(),
            "{what}: a process outlived the kill"
        );
        still_serves(&h).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_limit_kills_every_process_of_the_cgroup() {
    nothing_outlives_the_time_limit(None, 20).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_time_limit_kills_every_descendant_of_the_subreaper() {
    nothing_outlives_the_time_limit(Some(&subreaper()), 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_call_kills_its_command_whole() {
    for (mode, grant, case) in [("cgroup", None, 40), ("subreaper", Some(subreaper()), 41)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime(dir.path());
        let caps = shell_caps(20_000);
        let h = load(&rt, dir.path(), &caps, grant.as_ref()).await;
        let n = marker(case);
        let script = format!("setsid sleep {n} & sleep 30");
        let call = act(
            &h,
            json!({"action": "exec", "program": "/bin/sh", "args": ["-c", script]}),
        );
        let dropped = tokio::time::timeout(Duration::from_millis(500), call).await;
        assert!(dropped.is_err(), "{mode}: the call should still run");
        assert_eq!(
            survivors(n),
            Vec::<i32>::new(),
            "{mode}: the dropped call left a process"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_command_has_its_own_cgroup_removed_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let h = hostile(&rt, dir.path(), &shell_caps(10_000))
        .await
        .expect("load");
    let out = success(
        act(
            &h,
            json!({"action": "exec", "program": "/bin/cat", "args": ["/proc/self/cgroup"]}),
        )
        .await
        .expect("cat"),
    );
    let path = out
        .lines()
        .find_map(|l| l.split("0::").nth(1))
        .unwrap_or_else(|| panic!("no cgroup2 line: {out}"));
    assert!(path.starts_with("/otabox-cmd-"), "{out}");
    let mount = "/sys/fs/cgroup/unified";
    let leftover = std::path::Path::new(mount).join(path.trim_start_matches('/'));
    assert!(!leftover.exists(), "{} was not removed", leftover.display());

    let h = hostile_with(&rt, dir.path(), &shell_caps(10_000), &subreaper())
        .await
        .expect("load");
    let out = success(
        act(
            &h,
            json!({"action": "exec", "program": "/bin/cat", "args": ["/proc/self/cgroup"]}),
        )
        .await
        .expect("cat"),
    );
    assert!(
        !out.contains("otabox-cmd-"),
        "the subreaper mode makes no cgroup: {out}"
    );
}

/// `/proc/self/status` of a command run under `rule_extra`.
async fn status_under(rule_extra: &str) -> anyhow::Result<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let body = format!(
        "[network]\nhosts = [\"127.0.0.1\"]\n[[filesystem]]\npath = \"/tmp\"\naccess = \"ro\"\n\
         [[commands]]\nprogram = \"/bin/grep\"\nargs = [\"**\"]\n{rule_extra}\n"
    );
    let h = hostile(&rt, dir.path(), &body).await?;
    let text = success(
        act(
            &h,
            json!({"action": "exec", "program": "/bin/grep",
                   "args": ["-E", "^(Cap|Uid|Gid|Groups|NoNewPrivs)", "/proc/self/status"]}),
        )
        .await?,
    );
    // The host escapes control characters in what a guest returns.
    let text = text.replace("\\n", "\n").replace("\\t", "\t");
    Ok(text.replacen("stdout=", "\n", 1))
}

fn field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_run_with_no_new_privs_and_no_capabilities() {
    let status = status_under("").await.expect("status");
    assert_eq!(field(&status, "NoNewPrivs"), "1", "{status}");
    for caps in ["CapBnd", "CapEff", "CapPrm", "CapInh", "CapAmb"] {
        assert_eq!(field(&status, caps), "0000000000000000", "{caps}: {status}");
    }
    assert!(field(&status, "Uid").starts_with("0\t"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_keeps_only_the_capabilities_it_names() {
    let status = status_under("capabilities = [\"chown\", \"CAP_NET_ADMIN\"]")
        .await
        .expect("status");
    let kept = format!("{:016x}", 1u64 | 1 << 12);
    assert_eq!(field(&status, "CapBnd"), kept, "{status}");
    assert_eq!(field(&status, "CapEff"), kept, "{status}");
    assert_eq!(field(&status, "NoNewPrivs"), "1", "{status}");

    let own = std::fs::read_to_string("/proc/self/status").expect("own status");
    let status = status_under("capabilities = [\"all\"]")
        .await
        .expect("status");
    assert_eq!(field(&status, "CapBnd"), field(&own, "CapBnd"), "{status}");
    assert_eq!(field(&status, "CapEff"), field(&own, "CapEff"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_runs_its_program_as_the_user_it_names() {
    let status = status_under("user = \"nobody\"").await.expect("status");
    assert!(field(&status, "Uid").starts_with("65534\t"), "{status}");
    assert!(field(&status, "Gid").starts_with("65534\t"), "{status}");
    assert_eq!(field(&status, "Groups"), "65534", "{status}");
    assert_eq!(field(&status, "CapEff"), "0000000000000000", "{status}");

    let status = status_under("user = \"nobody\"\ncapabilities = [\"net_bind_service\"]")
        .await
        .expect("status");
    assert!(field(&status, "Uid").starts_with("65534\t"), "{status}");
    assert_eq!(field(&status, "CapEff"), "0000000000000400", "{status}");
    assert_eq!(field(&status, "CapAmb"), "0000000000000400", "{status}");
    assert_eq!(field(&status, "CapBnd"), "0000000000000400", "{status}");

    let status = status_under("group = \"nogroup\"").await.expect("status");
    assert!(field(&status, "Gid").starts_with("65534\t"), "{status}");
    assert!(field(&status, "Uid").starts_with("0\t"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_naming_an_unknown_user_or_capability_is_refused_at_load() {
    for (extra, why) in [
        (
            "user = \"no-such-user-otabox\"",
            "unknown user \"no-such-user-otabox\"",
        ),
        ("group = \"no-such-group-otabox\"", "unknown group"),
        ("capabilities = [\"cap_everything\"]", "unknown capability"),
    ] {
        let err = status_under(extra).await.expect_err(extra);
        assert!(format!("{err:#}").contains(why), "{extra}: {err:#}");
    }
}

/// The granted rules of a first-party handler of this build, with `config`
/// as its device config.
fn first_party(name: &str, config: &str, extra: &str) -> Grants {
    let path = std::path::Path::new(env!("OTABOX_BUILT_HANDLERS")).join(format!("{name}.toml"));
    let manifest = HandlerManifest::load(&path).expect("built manifest");
    let grant: DeviceGrant =
        toml::from_str(&format!("{extra}\n[config]\n{config}")).expect("grant");
    Grants::narrow(&manifest, Some(&grant)).expect("narrow")
}

fn allowed(grants: &Grants, program: &str, args: &[&str], env: &[(&str, &str)]) -> bool {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    commands_authorize(&grants.commands, program, &args, &env).is_ok()
}

#[test]
fn apt_get_refuses_options_that_run_commands() {
    let g = first_party("apt", "apt_config = \"/etc/otabox/apt.conf\"", "");
    let apt = "/usr/bin/apt-get";
    assert!(allowed(
        &g,
        apt,
        &["-q", "-o", "APT::Update::Error-Mode=any", "update"],
        &[]
    ));
    assert!(allowed(
        &g,
        apt,
        &["update"],
        &[("APT_CONFIG", "/etc/otabox/apt.conf")]
    ));
    for attack in [
        &["-o", "APT::Update::Pre-Invoke::=touch /pwned", "update"][..],
        &["-oDPkg::Post-Invoke::=sh -c id", "install", "x"],
        &["--option=dpkg::pre-install-pkgs::=/tmp/x", "install", "x"],
        &[
            "-o",
            "Dir::Bin::dpkg=/var/lib/otabox/apt/dpkg",
            "install",
            "x",
        ],
        &["-c", "/var/lib/otabox/apt/evil.conf", "update"],
        &["-o", "Acquire::http::ProxyAutoDetect=/tmp/x", "update"],
    ] {
        assert!(!allowed(&g, apt, attack, &[]), "{attack:?}");
    }
    assert!(
        !allowed(
            &g,
            apt,
            &["update"],
            &[("APT_CONFIG", "/var/lib/otabox/apt/evil.conf")]
        ),
        "APT_CONFIG other than the device's"
    );
    let g = first_party("apt", "", "");
    assert!(
        !allowed(
            &g,
            apt,
            &["update"],
            &[("APT_CONFIG", "/etc/otabox/apt.conf")]
        ),
        "no apt_config: no APT_CONFIG"
    );
}

#[test]
fn container_engines_refuse_host_access_unless_the_device_allows() {
    let g = first_party("container", "", "");
    let docker = "/usr/bin/docker";
    assert!(allowed(
        &g,
        docker,
        &[
            "create",
            "--name",
            "m",
            "--network",
            "none",
            "-v",
            "data:/data",
            "img"
        ],
        &[]
    ));
    for attack in [
        &["run", "--privileged", "img"][..],
        &["create", "-v", "/:/host", "img"],
        &["create", "--volume=/etc:/etc", "img"],
        &["create", "--network=host", "img"],
        &["create", "--network", "HOST", "img"],
        &["create", "--pid", "host", "img"],
        &["create", "--cap-add=SYS_ADMIN", "img"],
        &["create", "--device=/dev/sda", "img"],
        &["create", "--mount", "type=bind,src=/,dst=/host", "img"],
    ] {
        assert!(!allowed(&g, docker, attack, &[]), "{attack:?}");
        assert!(
            !allowed(&g, "/usr/bin/podman", attack, &[]),
            "podman {attack:?}"
        );
    }
    let g = first_party(
        "container",
        "",
        "[allow_args]\n\"/usr/bin/docker\" = [\"--network=host\"]\n",
    );
    assert!(allowed(
        &g,
        docker,
        &["create", "--network=host", "img"],
        &[]
    ));
    assert!(!allowed(
        &g,
        docker,
        &["create", "--privileged", "img"],
        &[]
    ));
}

#[test]
fn bootloader_tools_write_only_the_configured_environment() {
    let g = first_party(
        "firmware",
        "bootloader = { kind = \"grub\", env = \"/boot/grub/grubenv\" }",
        "",
    );
    let grub = "/usr/bin/grub-editenv";
    assert!(allowed(
        &g,
        grub,
        &["/boot/grub/grubenv", "set", "BOOT_ORDER=A B"],
        &[]
    ));
    assert!(!allowed(&g, grub, &["/etc/cron.d/x", "create"], &[]));
    assert!(!allowed(&g, grub, &["/etc/passwd", "set", "x=y"], &[]));
    assert!(
        !g.commands.iter().any(|r| r.program == "/usr/bin/fw_setenv"),
        "no U-Boot config: no fw_setenv"
    );
    let swupdate = "/usr/bin/swupdate";
    assert!(!allowed(&g, swupdate, &["-i", "/etc/shadow"], &[]));
    let g = first_party(
        "firmware",
        "bootloader = { kind = \"uboot\", config = \"/etc/fw_env.config\" }",
        "",
    );
    assert!(allowed(
        &g,
        "/usr/bin/fw_setenv",
        &["-c", "/etc/fw_env.config", "-s", "-"],
        &[]
    ));
    assert!(!allowed(
        &g,
        "/usr/bin/fw_setenv",
        &["-c", "/tmp/evil.config", "-s", "-"],
        &[]
    ));
    assert!(allowed(
        &g,
        swupdate,
        &["-i", "{payload:b.swu}", "-e", "stable,copy1"],
        &[]
    ));
    assert!(!allowed(
        &g,
        swupdate,
        &["-i", "{payload:b.swu}", "-P", "touch /x"],
        &[]
    ));
    assert!(!allowed(
        &g,
        swupdate,
        &["-i", "{payload:b.swu}", "--postupdate=touch /x"],
        &[]
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_still_reports_its_output_and_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = runtime(dir.path());
    let h = hostile(&rt, dir.path(), &shell_caps(10_000))
        .await
        .expect("load");
    let out = act(
        &h,
        json!({"action": "exec", "program": "/bin/sh", "args": ["-c", "echo hi; exit 3"]}),
    )
    .await
    .expect("call");
    assert!(
        matches!(&out, Outcome::Skipped(t) if t.contains("exit=Some(3)") && t.contains("hi")),
        "{out:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_that_cannot_start_is_an_error_in_both_modes() {
    for grant in [None, Some(subreaper())] {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime(dir.path());
        let caps = format!(
            "{}[[commands]]\nprogram = \"/nonexistent/otabox-program\"\n",
            shell_caps(5_000)
        );
        let h = load(&rt, dir.path(), &caps, grant.as_ref()).await;
        let started = Instant::now();
        let text = failure(
            act(
                &h,
                json!({"action": "exec", "program": "/nonexistent/otabox-program", "args": []}),
            )
            .await
            .expect("a start failure is not a fault"),
        );
        assert!(
            text.contains("cannot start /nonexistent/otabox-program"),
            "{text}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        still_serves(&h).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_running_lets_a_daemon_outlive_a_normal_exit_only() {
    for (mode, grant, case) in [("cgroup", None, 50), ("subreaper", Some(subreaper()), 52)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime(dir.path());
        let caps = shell_caps(1_500).replace(
            "args = [\"-c\", \"*\"]\n",
            "args = [\"-c\", \"*\"]\nkeep_running = true\n",
        );
        let h = load(&rt, dir.path(), &caps, grant.as_ref()).await;
        let n = marker(case);
        let script = format!("setsid sleep {n} >/dev/null 2>&1 & echo started");
        let out = success(
            act(
                &h,
                json!({"action": "exec", "program": "/bin/sh", "args": ["-c", script]}),
            )
            .await
            .expect("call"),
        );
        assert!(out.contains("exit=Some(0)"), "{mode}: {out}");
        std::thread::sleep(Duration::from_millis(200));
        let alive = sleepers(n);
        assert_eq!(alive.len(), 1, "{mode}: the daemon must keep running");
        let cgroup = std::fs::read_to_string(format!("/proc/{}/cgroup", alive[0])).expect("cgroup");
        assert!(
            !cgroup.contains("otabox-cmd-"),
            "{mode}: moved out of its cgroup: {cgroup}"
        );
        survivors(n);

        let n = marker(case + 1);
        let script = format!("setsid sleep {n} >/dev/null 2>&1 & sleep 30");
        let _ = act(
            &h,
            json!({"action": "exec", "program": "/bin/sh", "args": ["-c", script]}),
        )
        .await;
        assert_eq!(
            survivors(n),
            Vec::<i32>::new(),
            "{mode}: the time limit kills it"
        );
    }
}
