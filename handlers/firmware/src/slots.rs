//! What each slot holds, in `/var/lib/otabox/firmware/slots.json` (the
//! directory `firmware.toml` declares), and which slot is booted.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The directory of the record.
pub const STATE_DIR: &str = "/var/lib/otabox/firmware";
const RECORD_FILE: &str = "slots.json";

/// Where a slot's content stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SlotState {
    /// An image is being written; the content is not to be trusted.
    Writing,
    /// Written and read back; not booted yet.
    Written,
    /// The bootloader tries it on the next boot.
    Trying,
    /// Booted, healthy and committed.
    Good,
    /// Failed to boot or to pass the health check; never tried again.
    Bad,
}

/// The image a slot holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRecord {
    /// Image name.
    pub name: String,
    /// Image version.
    pub version: String,
    /// sha256 of the image.
    pub sha256: String,
    /// Where it stands.
    pub state: SlotState,
}

/// Slot name → record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots(pub BTreeMap<String, SlotRecord>);

impl Slots {
    /// Reads the record; none yet is an empty one.
    pub fn load(dir: &Path) -> Result<Self, String> {
        otabox_sdk::fs::load_json(&dir.join(RECORD_FILE))
    }

    /// Writes the record atomically.
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        otabox_sdk::fs::save_json(&dir.join(RECORD_FILE), self)
    }

    /// Whether `slot` holds `name` `version` in a usable state.
    pub fn holds(&self, slot: &str, name: &str, version: &str) -> bool {
        self.0.get(slot).is_some_and(|r| {
            r.name == name && r.version == version && matches!(r.state, SlotState::Good)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_only_good_slots_count() {
        let dir = std::env::temp_dir().join(format!("otabox-fw-slots-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut slots = Slots::load(&dir).expect("empty");
        assert!(!slots.holds("A", "rootfs", "1"));
        slots.0.insert(
            "A".into(),
            SlotRecord {
                name: "rootfs".into(),
                version: "1".into(),
                sha256: "00".into(),
                state: SlotState::Good,
            },
        );
        slots.0.insert(
            "B".into(),
            SlotRecord {
                name: "rootfs".into(),
                version: "2".into(),
                sha256: "11".into(),
                state: SlotState::Writing,
            },
        );
        slots.save(&dir).expect("save");
        let back = Slots::load(&dir).expect("load");
        assert_eq!(back, slots);
        assert!(back.holds("A", "rootfs", "1"));
        assert!(
            !back.holds("B", "rootfs", "2"),
            "a half-written slot holds nothing"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
