//! What a grant really gives: the effective privilege of command rules from
//! a table of known programs and patterns, and the system directories a
//! handler must not be able to write. `docs/audit.md` lists the same.

use std::path::Path;

use serde::Serialize;

pub use crate::capabilities::process::runs_as;
use crate::capabilities::{ArgPattern, CommandRule};

/// The effective privilege of a grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    /// Can do anything root can (run any command as root, load any code
    /// into a privileged context).
    RootEquivalent,
    /// Runs any command line the guest chooses.
    RunsAnyCommand,
    /// Can write (create, overwrite) files at paths the guest chooses.
    WritesAnywhere,
    /// Changes what the device boots.
    Bootloader,
    /// Talks to hosts on the network.
    Network,
}

impl Effect {
    /// The stable id of the finding this effect raises, if any.
    pub fn finding(self) -> Option<&'static str> {
        match self {
            Effect::RootEquivalent => Some("root-equivalent"),
            Effect::RunsAnyCommand => Some("shell-wildcard"),
            Effect::WritesAnywhere => Some("writes-anywhere"),
            Effect::Bootloader | Effect::Network => None,
        }
    }

    /// A short label.
    pub fn label(self) -> &'static str {
        match self {
            Effect::RootEquivalent => "root-equivalent",
            Effect::RunsAnyCommand => "runs any command",
            Effect::WritesAnywhere => "writes anywhere",
            Effect::Bootloader => "bootloader",
            Effect::Network => "network",
        }
    }
}

/// Shells and interpreters: with an open argument they run any code.
const INTERPRETERS: &[&str] = &[
    "sh",
    "bash",
    "dash",
    "ash",
    "zsh",
    "ksh",
    "mksh",
    "fish",
    "csh",
    "tcsh",
    "busybox",
    "env",
    "perl",
    "ruby",
    "node",
    "nodejs",
    "php",
    "lua",
    "tclsh",
    "expect",
    "awk",
    "gawk",
    "mawk",
    "sed",
    "xargs",
    "find",
    "nice",
    "nohup",
    "timeout",
    "setsid",
    "sudo",
    "su",
    "runuser",
    "chroot",
    "nsenter",
    "unshare",
    "systemd-run",
    "ssh",
    "flock",
    "watch",
    "script",
    "strace",
    "gdb",
    "make",
    "git",
    "vi",
    "vim",
];
/// Interpreter name prefixes (`python3.11`, `perl5.36`, `lua5.4`).
const INTERPRETER_PREFIXES: &[&str] = &["python", "perl", "ruby", "lua", "php", "pypy"];
/// Package managers: package maintainer scripts run as root.
const PACKAGE_MANAGERS: &[&str] = &[
    "apt-get", "apt", "aptitude", "dpkg", "rpm", "dnf", "yum", "zypper", "opkg", "apk", "pacman",
    "snap", "flatpak", "pip", "pip3", "npm", "gem",
];
/// Container engines: `--privileged`, host mounts and host namespaces give
/// the host away.
const CONTAINER_ENGINES: &[&str] = &["docker", "podman", "nerdctl", "ctr", "crictl", "lxc"];
/// Image installers whose bundles may carry scripts run as root.
const IMAGE_INSTALLERS: &[&str] = &["swupdate", "rauc", "mender", "mender-update"];
/// Bootloader environment editors: the first argument names the file.
const BOOTLOADER_EDITORS: &[&str] = &["grub-editenv", "fw_setenv", "fw_printenv"];
/// Programs that write the files their arguments name.
const FILE_WRITERS: &[&str] = &[
    "cp",
    "mv",
    "dd",
    "tee",
    "install",
    "rm",
    "ln",
    "chmod",
    "chown",
    "chgrp",
    "touch",
    "truncate",
    "rsync",
    "tar",
    "cpio",
    "unzip",
    "mkdir",
    "rmdir",
    "mount",
    "umount",
    "sfdisk",
    "mkfs",
    "wipefs",
    "flash_erase",
    "nandwrite",
];
/// Network clients.
const NETWORK_CLIENTS: &[&str] = &["curl", "wget", "skopeo", "nc", "ncat", "scp", "sftp", "ftp"];

/// The effective privilege of `rule`, and why, when the table knows it.
pub fn command_effect(rule: &CommandRule) -> Option<(Effect, &'static str)> {
    let name = Path::new(&rule.program)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(&rule.program);
    let open = rule
        .patterns()
        .any(|p| matches!(p, ArgPattern::One | ArgPattern::Rest));
    let is = |list: &[&str]| list.contains(&name);
    if (is(INTERPRETERS) || INTERPRETER_PREFIXES.iter().any(|p| name.starts_with(p))) && open {
        return Some((
            Effect::RunsAnyCommand,
            "a shell or interpreter with open arguments runs any code the guest passes",
        ));
    }
    if is(PACKAGE_MANAGERS) && open {
        return Some((
            Effect::RootEquivalent,
            "installs packages whose maintainer scripts run as root (and options such as `-o …::Pre-Invoke` run commands unless refused by deny_args)",
        ));
    }
    if is(CONTAINER_ENGINES) && open {
        let guarded = [
            &["--privileged"][..],
            &["--pid=host"],
            &["--network=host"],
            &["-v", "/:/host"],
        ]
        .iter()
        .all(|probe| {
            let args: Vec<String> = probe.iter().map(|a| a.to_string()).collect();
            rule.denied_by(&args).is_some()
        });
        return Some(if guarded {
            (
                Effect::Network,
                "runs containers; --privileged, host namespaces and host mounts are refused by deny_args (images still run as root inside their container)",
            )
        } else {
            (
                Effect::RootEquivalent,
                "runs containers that may be --privileged, mount the host (`-v /:/host`) or share its namespaces",
            )
        });
    }
    if is(IMAGE_INSTALLERS) && rule.args.first().is_some_and(|a| a == "status") {
        return Some((Effect::Bootloader, "marks slots good, bad or active"));
    }
    if is(IMAGE_INSTALLERS) {
        return Some((
            Effect::RootEquivalent,
            "installs signed bundles that may carry scripts run as root; the signing key decides what runs",
        ));
    }
    if is(BOOTLOADER_EDITORS) {
        let file_open = matches!(
            rule.patterns()
                .find(|p| !matches!(p, ArgPattern::Exact(a) if a.starts_with('-'))),
            Some(ArgPattern::One | ArgPattern::Rest)
        );
        return Some(if file_open {
            (
                Effect::WritesAnywhere,
                "the environment file is any path the guest names (pin it with {config:…})",
            )
        } else {
            (
                Effect::Bootloader,
                "edits the pinned bootloader environment",
            )
        });
    }
    if is(FILE_WRITERS) && open {
        return Some((Effect::WritesAnywhere, "writes the paths the guest passes"));
    }
    if is(NETWORK_CLIENTS) {
        return Some((Effect::Network, "connects to hosts the guest names"));
    }
    None
}

/// Directories nothing may grant read-write: the directory itself or
/// anything below it.
const SYSTEM_TREES: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/boot",
    "/root",
    "/dev",
    "/proc",
    "/sys",
    "/etc/systemd",
    "/etc/init.d",
    "/etc/cron.d",
    "/etc/sudoers.d",
    "/etc/ssh",
    "/etc/apt",
    "/etc/pam.d",
    "/etc/security",
    "/etc/profile.d",
    "/etc/ld.so.conf.d",
    "/var/spool/cron",
];
/// Directories that may not be granted read-write whole (a subdirectory
/// of them may).
const SYSTEM_DIRS: &[&str] = &[
    "/etc", "/var", "/var/lib", "/home", "/run", "/opt", "/srv", "/tmp",
];

/// Whether granting `path` read-write lets a handler change the system.
pub fn is_system_path(path: &Path) -> bool {
    SYSTEM_DIRS.iter().any(|d| path == Path::new(d))
        || SYSTEM_TREES.iter().any(|d| path.starts_with(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(program: &str, args: &[&str]) -> CommandRule {
        let text = format!(
            "program = {program:?}\nargs = {:?}\n",
            args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
        );
        toml::from_str(&text).expect("rule")
    }

    #[test]
    fn known_programs_have_their_effect() {
        let effect = |p, a: &[&str]| command_effect(&rule(p, a)).map(|(e, _)| e);
        assert_eq!(effect("/bin/sh", &["**"]), Some(Effect::RunsAnyCommand));
        assert_eq!(
            effect("/usr/bin/python3.11", &["-c", "*"]),
            Some(Effect::RunsAnyCommand)
        );
        assert_eq!(effect("/bin/sh", &["/opt/x.sh"]), None);
        assert_eq!(
            effect("/usr/bin/apt-get", &["**"]),
            Some(Effect::RootEquivalent)
        );
        assert_eq!(
            effect("/usr/bin/docker", &["**"]),
            Some(Effect::RootEquivalent)
        );
        assert_eq!(
            effect("/usr/bin/grub-editenv", &["*", "set", "**"]),
            Some(Effect::WritesAnywhere)
        );
        assert_eq!(
            effect("/usr/bin/grub-editenv", &["/boot/env", "set", "**"]),
            Some(Effect::Bootloader)
        );
        assert_eq!(
            effect("/usr/bin/fw_setenv", &["-c", "*", "-s", "-"]),
            Some(Effect::WritesAnywhere)
        );
        assert_eq!(
            effect(
                "/usr/bin/fw_setenv",
                &["-c", "/etc/fw_env.config", "-s", "-"]
            ),
            Some(Effect::Bootloader)
        );
        assert_eq!(effect("/bin/cp", &["*", "*"]), Some(Effect::WritesAnywhere));
        assert_eq!(effect("/usr/bin/systemctl", &["reload", "*"]), None);
    }

    #[test]
    fn system_paths_are_recognised() {
        for p in [
            "/etc",
            "/usr/local/bin",
            "/var/lib",
            "/boot/efi",
            "/root",
            "/dev",
            "/lib64",
        ] {
            assert!(is_system_path(Path::new(p)), "{p}");
        }
        for p in [
            "/etc/example",
            "/var/lib/otabox/files",
            "/srv/data",
            "/tmp/x",
        ] {
            assert!(!is_system_path(Path::new(p)), "{p}");
        }
    }
}
