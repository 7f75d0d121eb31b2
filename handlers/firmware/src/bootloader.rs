//! The A/B boot protocol in the bootloader environment, and reading and
//! writing that environment through `grub-editenv` or `fw_printenv` /
//! `fw_setenv`.
//!
//! Variables (the scheme RAUC uses with U-Boot; `examples/firmware` has the
//! GRUB and U-Boot scripts that honour it):
//! - `BOOT_ORDER`: slot names, first tried first (`"B A"`);
//! - `BOOT_<slot>_LEFT`: boots left for the slot; the bootloader skips a
//!   slot at 0 and decrements the counter of the slot it boots.
//!
//! A new slot is tried once (`LEFT=1`, first in the order); commit gives it
//! the full count; a fall-back puts the old slot first and the new one at 0.

use std::collections::BTreeMap;

use otabox_sdk::prelude::*;

use crate::manifest::Bootloader;
use crate::status;

/// A change to one variable: a value, or `None` to remove it.
pub type Change = (String, Option<String>);

/// The variables of the protocol for `slots`.
pub fn protocol_keys(slots: &[&str]) -> Vec<String> {
    std::iter::once("BOOT_ORDER".to_string())
        .chain(slots.iter().map(|s| left_key(s)))
        .collect()
}

fn left_key(slot: &str) -> String {
    format!("BOOT_{slot}_LEFT")
}

/// Try `target` once, then fall back to `current`.
pub fn try_once(target: &str, current: &str) -> Vec<Change> {
    vec![
        ("BOOT_ORDER".into(), Some(format!("{target} {current}"))),
        (left_key(target), Some("1".into())),
    ]
}

/// `target` is good: first in the order with the full count of boots.
pub fn mark_good(target: &str, other: &str, attempts: u32) -> Vec<Change> {
    vec![
        ("BOOT_ORDER".into(), Some(format!("{target} {other}"))),
        (left_key(target), Some(attempts.to_string())),
    ]
}

/// `target` is bad: `good` first, `target` never tried again.
pub fn fall_back(good: &str, target: &str) -> Vec<Change> {
    vec![
        ("BOOT_ORDER".into(), Some(format!("{good} {target}"))),
        (left_key(target), Some("0".into())),
    ]
}

/// The changes that bring `keys` back to `saved` (absent keys removed).
pub fn restore(saved: &BTreeMap<String, String>, keys: &[String]) -> Vec<Change> {
    keys.iter()
        .map(|k| (k.clone(), saved.get(k).cloned()))
        .collect()
}

/// Parses `name=value` lines.
pub fn parse_env(listing: &str) -> BTreeMap<String, String> {
    listing
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| !k.trim().is_empty())
        .map(|(k, v)| (k.trim().to_string(), v.to_string()))
        .collect()
}

/// Reads the whole environment.
pub fn read(bootloader: &Bootloader) -> Result<BTreeMap<String, String>, Status> {
    let cmd = match bootloader {
        Bootloader::Grub { env } => Command::new(GRUB_EDITENV).args([env.as_str(), "list"]),
        Bootloader::Uboot { config } => Command::new(FW_PRINTENV).args(["-c", config.as_str()]),
    };
    let out = run(cmd, "read the bootloader environment")?;
    Ok(parse_env(&out))
}

/// Applies `changes` in one invocation where the tool allows it.
pub fn write(bootloader: &Bootloader, changes: &[Change]) -> Result<(), Status> {
    match bootloader {
        Bootloader::Grub { env } => {
            let (set, unset): (Vec<&Change>, Vec<&Change>) =
                changes.iter().partition(|(_, v)| v.is_some());
            if !set.is_empty() {
                let pairs = set
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_deref().unwrap_or_default()));
                run(
                    Command::new(GRUB_EDITENV)
                        .args([env.as_str(), "set"])
                        .args(pairs),
                    "set the bootloader environment",
                )?;
            }
            if !unset.is_empty() {
                run(
                    Command::new(GRUB_EDITENV)
                        .args([env.as_str(), "unset"])
                        .args(unset.iter().map(|(k, _)| k.clone())),
                    "unset bootloader variables",
                )?;
            }
            Ok(())
        }
        Bootloader::Uboot { config } => {
            let script: String = changes
                .iter()
                .map(|(k, v)| format!("{k}={}\n", v.as_deref().unwrap_or_default()))
                .collect();
            run(
                Command::new(FW_SETENV)
                    .args(["-c", config.as_str(), "-s", "-"])
                    .stdin(script.into_bytes()),
                "set the bootloader environment",
            )
            .map(|_| ())
        }
    }
}

/// The programs, exactly as `firmware.toml` declares them.
pub const GRUB_EDITENV: &str = "/usr/bin/grub-editenv";
/// See [`GRUB_EDITENV`].
pub const FW_PRINTENV: &str = "/usr/bin/fw_printenv";
/// See [`GRUB_EDITENV`].
pub const FW_SETENV: &str = "/usr/bin/fw_setenv";

fn run(cmd: Command, what: &str) -> Result<String, Status> {
    let out = cmd.run().map_err(|e| {
        Status::new(status::BOOTLOADER, format!("cannot {what}: {e}")).extended(
            Facility::Bootloader,
            0,
            0,
        )
    })?;
    if out.success() {
        return Ok(out.stdout());
    }
    Err(out.failure(
        status::BOOTLOADER,
        format!("cannot {what}: {}", out.stderr().trim()),
        Facility::Bootloader,
        1,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_protocol_tries_commits_and_falls_back() {
        assert_eq!(
            try_once("B", "A"),
            [
                ("BOOT_ORDER".to_string(), Some("B A".to_string())),
                ("BOOT_B_LEFT".to_string(), Some("1".to_string()))
            ]
        );
        assert_eq!(mark_good("B", "A", 3)[1].1.as_deref(), Some("3"));
        assert_eq!(fall_back("A", "B")[0].1.as_deref(), Some("A B"));
        assert_eq!(fall_back("A", "B")[1].1.as_deref(), Some("0"));
        assert_eq!(
            protocol_keys(&["A", "B"]),
            ["BOOT_ORDER", "BOOT_A_LEFT", "BOOT_B_LEFT"]
        );
    }

    #[test]
    fn restore_removes_what_was_absent() {
        let saved = parse_env("BOOT_ORDER=A B\nBOOT_A_LEFT=3\nother=x\n");
        assert_eq!(saved["BOOT_ORDER"], "A B");
        let keys = protocol_keys(&["A", "B"]);
        assert_eq!(
            restore(&saved, &keys),
            [
                ("BOOT_ORDER".to_string(), Some("A B".to_string())),
                ("BOOT_A_LEFT".to_string(), Some("3".to_string())),
                ("BOOT_B_LEFT".to_string(), None)
            ]
        );
    }
}
