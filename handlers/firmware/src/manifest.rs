//! The step manifest and the device configuration of the firmware handler.
//!
//! Manifest:
//! ```json
//! {"name": "rootfs", "version": "2.1.0", "compatible": "acme,pump-v2",
//!  "image": "rootfs.img", "reboot": "immediate"}
//! ```
//! Device configuration (`[handlers.firmware] config = {...}`):
//! ```toml
//! compatible = "acme,pump-v2"
//! bootloader = { kind = "grub", env = "/boot/grub/grubenv" }
//! # or { kind = "uboot", config = "/etc/fw_env.config" }
//! slots = { A = "/dev/otabox/slot-a", B = "/dev/otabox/slot-b" }
//! booted_slot_file = "/run/otabox/booted-slot"
//! boot_attempts = 3
//! health_command = ["/usr/libexec/otabox/firmware-health"]
//! ```

use std::collections::BTreeMap;

use otabox_sdk::{FromJson, from_json};
use serde::Deserialize;

/// When the reboot into the new slot happens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RebootWhen {
    /// As soon as the job's steps are installed.
    #[default]
    Immediate,
    /// When the operator or the deployment says so.
    Deferred,
}

/// The step manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// What the image is (`rootfs`, `firmware`).
    pub name: String,
    /// Its version.
    pub version: String,
    /// The hardware it is built for; must equal the device's.
    pub compatible: String,
    /// The payload holding the image.
    pub image: String,
    /// When to reboot into it.
    #[serde(default)]
    pub reboot: RebootWhen,
    /// The payload is a signed bundle for the device's update tool, which
    /// writes the slot itself, instead of a raw slot image.
    #[serde(default)]
    pub bundle: Option<BundleKind>,
}

/// Bundle formats the handler can pass on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BundleKind {
    /// An SWUpdate `.swu`, installed with `swupdate -i`.
    Swupdate,
    /// A RAUC `.raucb`, installed with `rauc install`; RAUC's bootloader
    /// backend switches the slot, and `rauc status` marks it good or bad.
    Rauc,
}

/// How this device reaches RAUC's service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RaucConfig {
    /// The D-Bus address of the bus RAUC's service is on
    /// (`DBUS_SYSTEM_BUS_ADDRESS`), when not the system bus.
    #[serde(default)]
    pub bus: Option<String>,
}

/// How this device runs SWUpdate.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwupdateConfig {
    /// Further arguments, such as `-k /etc/swupdate/signing.pem` (the
    /// bundle's signature is checked against it) and `-H board:revision`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Slot → the software selection (`-e`) that writes that slot, such as
    /// `{ A = "stable,copy1", B = "stable,copy2" }`.
    #[serde(default)]
    pub select: BTreeMap<String, String>,
    /// Directory for SWUpdate's control sockets (`TMPDIR`).
    #[serde(default)]
    pub tmpdir: Option<String>,
}

impl FromJson for Manifest {
    /// Parses and checks `json`.
    fn parse(json: &str) -> Result<Self, String> {
        let m: Self = from_json(json, "firmware manifest")?;
        for (field, value) in [
            ("name", &m.name),
            ("version", &m.version),
            ("compatible", &m.compatible),
            ("image", &m.image),
        ] {
            if value.trim().is_empty() {
                return Err(format!(
                    "invalid firmware manifest: `{field}` must not be empty"
                ));
            }
        }
        Ok(m)
    }
}

impl Manifest {
    /// `<name>-<version>`.
    pub fn installed_criteria(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }
}

/// Which bootloader environment holds the boot order.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum Bootloader {
    /// A GRUB environment block, edited with `grub-editenv`.
    Grub {
        /// The environment file (`/boot/grub/grubenv`).
        env: String,
    },
    /// A U-Boot environment, edited with `fw_setenv` / `fw_printenv`.
    Uboot {
        /// The `fw_env.config` describing where the environment lives.
        config: String,
    },
}

/// The device configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This device's hardware compatibility string.
    pub compatible: String,
    /// The bootloader environment.
    pub bootloader: Bootloader,
    /// Slot name → declared device path.
    #[serde(default = "default_slots")]
    pub slots: BTreeMap<String, String>,
    /// A file naming the booted slot (`A`), or holding a kernel command line
    /// with `otabox.slot=A` or `rauc.slot=A`.
    #[serde(default = "default_booted_slot_file")]
    pub booted_slot_file: String,
    /// How many boots a committed slot gets before the bootloader falls back.
    #[serde(default = "default_boot_attempts")]
    pub boot_attempts: u32,
    /// Program and arguments run by `verify` in the new slot; exit 0 is
    /// healthy. It must be declared in the handler's command rules.
    #[serde(default)]
    pub health_command: Vec<String>,
    /// SWUpdate on this device, for manifests with `"bundle": "swupdate"`.
    #[serde(default)]
    pub swupdate: Option<SwupdateConfig>,
    /// RAUC on this device, for manifests with `"bundle": "rauc"`.
    #[serde(default)]
    pub rauc: Option<RaucConfig>,
}

fn default_slots() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("A".to_string(), "/dev/otabox/slot-a".to_string()),
        ("B".to_string(), "/dev/otabox/slot-b".to_string()),
    ])
}

fn default_booted_slot_file() -> String {
    "/run/otabox/booted-slot".into()
}

fn default_boot_attempts() -> u32 {
    3
}

/// The bootloaders `bootloader.kind` may name.
pub const BOOTLOADER_KINDS: [&str; 2] = ["grub", "uboot"];

/// Prefix of every config error.
const INVALID: &str = "invalid firmware handler config";

impl FromJson for Config {
    /// Parses and checks the configuration JSON the host passes (also at
    /// load, through `inventory`): every error names the key and what it
    /// accepts.
    fn parse(json: &str) -> Result<Self, String> {
        let value: serde_json::Value = from_json(json, "firmware handler config")?;
        check_bootloader_kind(&value)?;
        let c: Self = serde_json::from_value(value).map_err(|e| format!("{INVALID}: {e}"))?;
        c.check().map_err(|e| format!("{INVALID}: {e}"))?;
        Ok(c)
    }
}

impl Config {
    fn check(&self) -> Result<(), String> {
        if self.slots.len() != 2 {
            return Err(format!(
                "`slots` must name exactly two slots, found {}",
                self.slots.len()
            ));
        }
        for (slot, device) in &self.slots {
            if slot.is_empty() || !slot.chars().all(|ch| ch.is_ascii_alphanumeric()) {
                return Err(format!(
                    "`slots`: slot name {slot:?} must be letters and digits (A, B)"
                ));
            }
            absolute(&format!("slots.{slot}"), device)?;
        }
        absolute("booted_slot_file", &self.booted_slot_file)?;
        if let Some(program) = self.health_command.first() {
            absolute("health_command", program)?;
        }
        if self.boot_attempts == 0 || self.boot_attempts > 100 {
            return Err(format!(
                "`boot_attempts` = {} must be 1..=100",
                self.boot_attempts
            ));
        }
        Ok(())
    }

    /// The slot other than `booted`.
    pub fn other_slot(&self, booted: &str) -> Option<&str> {
        self.slots
            .keys()
            .find(|s| s.as_str() != booted)
            .map(String::as_str)
    }

    /// The declared device of `slot`.
    pub fn device(&self, slot: &str) -> Option<&str> {
        self.slots.get(slot).map(String::as_str)
    }
}

/// `bootloader.kind`, when given, must be one of [`BOOTLOADER_KINDS`]
/// (serde alone would not name the key).
fn check_bootloader_kind(config: &serde_json::Value) -> Result<(), String> {
    match config.pointer("/bootloader/kind") {
        Some(kind) if !kind.as_str().is_some_and(|k| BOOTLOADER_KINDS.contains(&k)) => {
            Err(format!(
                "{INVALID}: `bootloader.kind` = {kind} is not a bootloader otabox drives: expected one of {}",
                BOOTLOADER_KINDS.join(", ")
            ))
        }
        _ => Ok(()),
    }
}

/// `value` of `key` must be an absolute path without `..`.
fn absolute(key: &str, value: &str) -> Result<(), String> {
    let path = std::path::Path::new(value);
    if !path.is_absolute()
        || path
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(format!(
            "`{key}` = {value:?} must be an absolute path without `..`"
        ));
    }
    Ok(())
}

/// The booted slot named by the contents of the booted-slot file: the name
/// alone, or `otabox.slot=` / `rauc.slot=` in a kernel command line.
pub fn booted_slot_from(text: &str) -> Option<String> {
    let text = text.trim();
    if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric()) {
        return Some(text.to_string());
    }
    text.split_whitespace().find_map(|word| {
        ["otabox.slot=", "rauc.slot="]
            .iter()
            .find_map(|key| word.strip_prefix(key))
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_strict() {
        let m = Manifest::parse(
            r#"{"name":"rootfs","version":"2","compatible":"acme,x","image":"r.img"}"#,
        )
        .expect("valid");
        assert_eq!(m.reboot, RebootWhen::Immediate);
        assert_eq!(m.installed_criteria(), "rootfs-2");
        for (json, why) in [
            (
                r#"{"name":"r","version":"2","compatible":"c"}"#,
                "missing field `image`",
            ),
            (
                r#"{"name":"r","version":"2","compatible":"c","image":"i","size":1}"#,
                "unknown field `size`",
            ),
            (
                r#"{"name":"r","version":" ","compatible":"c","image":"i"}"#,
                "`version` must not be empty",
            ),
            (
                r#"{"name":"r","version":"2","compatible":"c","image":"i","reboot":"later"}"#,
                "unknown variant",
            ),
        ] {
            let err = Manifest::parse(json).expect_err(json);
            assert!(err.contains(why), "{json}: {err}");
        }
    }

    #[test]
    fn configs_name_two_slots_and_a_bootloader() {
        let c = Config::parse(
            r#"{"compatible":"acme,x","bootloader":{"kind":"uboot","config":"/etc/fw_env.config"}}"#,
        )
        .expect("valid");
        assert_eq!(c.other_slot("A"), Some("B"));
        assert_eq!(c.device("B"), Some("/dev/otabox/slot-b"));
        assert_eq!(c.boot_attempts, 3);
        for (json, why) in [
            (
                r#"{"compatible":"x","bootloader":{"kind":"lilo"}}"#,
                "`bootloader.kind` = \"lilo\" is not a bootloader otabox drives: expected one of grub, uboot",
            ),
            (
                r#"{"compatible":"x","bootloader":{"kind":"grub","env":"/e","config":"/c"}}"#,
                "unknown field `config`",
            ),
            (
                r#"{"compatible":"x","bootloader":{"kind":"grub","env":"/e"},"slotz":{}}"#,
                "unknown field `slotz`",
            ),
            (
                r#"{"compatible":"x","bootloader":{"kind":"grub","env":"/e"},"slots":{"A":"/a","B":"dev/b"}}"#,
                "`slots.B` = \"dev/b\" must be an absolute path",
            ),
            (
                r#"{"compatible":"x","bootloader":{"kind":"grub","env":"/e"},"booted_slot_file":"run/slot"}"#,
                "`booted_slot_file` = \"run/slot\" must be an absolute path",
            ),
            (
                r#"{"compatible":"x","bootloader":{"kind":"grub","env":"/e"},"booted_slot_file":"/run/../etc/x"}"#,
                "without `..`",
            ),
            (
                r#"{"compatible":"x","bootloader":{"kind":"grub","env":"/e"},"slots":{"A":"/a","B-":"/b"}}"#,
                "letters and digits",
            ),
            (
                r#"{"compatible":"x","bootloader":{"kind":"grub","env":"/e"},"health_command":["health"]}"#,
                "`health_command`",
            ),
            (r#"{"compatible":"x"}"#, "missing field `bootloader`"),
            (
                r#"{"compatible":"x","bootloader":{"kind":1}}"#,
                "`bootloader.kind` = 1",
            ),
            (
                r#"{"compatible":"x","bootloader":{"kind":"grub","env":"/e"},"slots":{"A":"/a"}}"#,
                "exactly two slots",
            ),
            (
                r#"{"compatible":"x","bootloader":{"kind":"grub","env":"/e"},"boot_attempts":0}"#,
                "boot_attempts",
            ),
        ] {
            let err = Config::parse(json).expect_err(json);
            assert!(err.contains(why), "{json}: {err}");
        }
    }

    #[test]
    fn the_booted_slot_comes_from_a_name_or_a_command_line() {
        assert_eq!(booted_slot_from("B\n").as_deref(), Some("B"));
        assert_eq!(
            booted_slot_from("root=/dev/vda2 ro rauc.slot=A quiet").as_deref(),
            Some("A")
        );
        assert_eq!(
            booted_slot_from("console=ttyS0 otabox.slot=B").as_deref(),
            Some("B")
        );
        assert_eq!(booted_slot_from("root=/dev/vda2 ro"), None);
        assert_eq!(booted_slot_from(""), None);
    }
}
