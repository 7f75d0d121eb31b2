//! A Debian system with a real systemd as PID 1: a throwaway copy of the
//! cached bookworm root file system (`packaging/test-rootfs`, built once
//! with mmdebstrap) booted with `systemd-nspawn --boot`. It shares the
//! host's network, so the broker, replica and payload server the test
//! starts on the host's loopback are reachable from inside.
//!
//! Commands run inside through `nsenter` into every namespace of the
//! container's PID 1 (`systemd-run --machine` needs machined, which
//! `--register=no` leaves out), with a clean environment. The container is
//! halted and its copy deleted on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use super::package::packaging;

/// The programs a container needs on the host.
pub const TOOLS: &[&str] = &["systemd-nspawn", "nsenter", "mmdebstrap", "pgrep"];

/// A booted container.
pub struct Container {
    nspawn: Child,
    /// PID (in the host's namespace) of the container's systemd.
    leader: u32,
    /// The container's root directory on the host.
    root: PathBuf,
}

impl Container {
    /// Boots a copy of the cached root file system in `dir/root` and waits
    /// until systemd has started the system.
    pub fn boot(dir: &Path) -> Self {
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let cached = cached_rootfs();
        let root = dir.join("root");
        let copied = Command::new("cp")
            .args(["-a", "--reflink=auto"])
            .arg(&cached)
            .arg(&root)
            .status()
            .expect("cp");
        assert!(copied.success(), "cannot copy {}", cached.display());
        let name = format!(
            "otabox-test-{}-{}",
            std::process::id(),
            SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        let log = std::fs::File::create(dir.join("nspawn.log")).expect("nspawn log");
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(&root)
            .args(["--boot", "--register=no", "--keep-unit", "--console=pipe"])
            .arg(format!("--machine={name}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("systemd-nspawn is installed (make setup)");
        let leader = wait_for_leader(nspawn.id());
        let container = Self {
            nspawn,
            leader,
            root,
        };
        container.wait_for(Duration::from_secs(60), "the container's boot", |ct| {
            // Fails until systemd listens on its bus, then waits for the boot.
            let state = ct.sh_text("timeout 60 systemctl is-system-running --wait");
            matches!(state.trim(), "running" | "degraded")
        });
        container
    }

    /// Runs `script` with `sh -c` inside, as root with a clean environment.
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a"])
            .args([
                "env",
                "-i",
                "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG=C.UTF-8",
            ])
            .args(["DEBIAN_FRONTEND=noninteractive", "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("nsenter")
    }

    /// Everything `script` printed (stdout, then stderr), whatever its status.
    pub fn sh_text(&self, script: &str) -> String {
        let out = self.sh(script);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// Runs `script` inside; its stdout, or a panic with its output and the
    /// agent's journal.
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "`{script}` failed ({}) in the container:\n{}{}\njournal of otabox.service:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.journal("otabox.service")
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The host path of `path` inside the container.
    pub fn path(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// The journal of `unit` (messages only).
    pub fn journal(&self, unit: &str) -> String {
        self.sh_text(&format!("journalctl -u {unit} --no-pager -o cat"))
    }

    /// A property of `unit` (`systemctl show -p NAME --value`).
    pub fn property(&self, unit: &str, name: &str) -> String {
        self.sh_text(&format!("systemctl show -p {name} --value {unit}"))
            .trim()
            .to_string()
    }

    /// Waits up to `timeout` for `done` to hold; panics naming `what`, with
    /// the agent's journal.
    pub fn wait_for(&self, timeout: Duration, what: &str, done: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !done(self) {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; failed units:\n{}\njournal of otabox.service:\n{}",
                self.sh_text("systemctl --failed --no-pager"),
                self.journal("otabox.service")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM asks systemd-nspawn to halt the container; a second
        // signal, or SIGKILL after 20 s, ends it at once.
        // SAFETY: kill only signals the systemd-nspawn this value started.
        unsafe { libc::kill(self.nspawn.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.nspawn.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// The cached root file system, built on first use by
/// `packaging/test-rootfs` (about a minute).
fn cached_rootfs() -> PathBuf {
    let out = Command::new("bash")
        .arg(packaging("test-rootfs"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run packaging/test-rootfs");
    assert!(out.status.success(), "packaging/test-rootfs failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// The PID of the container's init: the child of `nspawn` that runs
/// systemd (not a helper it forks on the way).
fn wait_for_leader(nspawn: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = Command::new("pgrep")
            .args(["-P", &nspawn.to_string()])
            .output()
            .expect("pgrep");
        let init = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse::<u32>().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .is_ok_and(|comm| comm.trim() == "systemd")
            });
        if let Some(pid) = init {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "systemd-nspawn {nspawn} started no container"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
