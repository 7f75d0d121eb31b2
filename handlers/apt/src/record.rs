//! The handler's record of the manifests it installed, by manifest name, in
//! `/var/lib/otabox/apt/installed.json` (the directory `apt.toml` declares).
//!
//! `is-installed` compares a step's installed criteria with it, `validate`
//! compares a new manifest with the previous one of the same name (the
//! "not cumulative" warning), and `inventory` lists the packages it names.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::manifest::{AptManifest, PackageAction};

/// The directory the handler keeps its record in (declared in `apt.toml`).
pub const STATE_DIR: &str = "/var/lib/otabox/apt";
const RECORD_FILE: &str = "installed.json";

/// One installed manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The manifest's version.
    pub version: String,
    /// Its installed criteria.
    pub criteria: String,
    /// The packages it installs (removals are not listed).
    pub packages: Vec<String>,
}

impl Record {
    /// The record of `manifest`.
    pub fn of(manifest: &AptManifest) -> Self {
        Self {
            version: manifest.version.clone(),
            criteria: manifest.installed_criteria(),
            packages: manifest
                .packages
                .iter()
                .filter(|p| matches!(p, PackageAction::Install { .. }))
                .map(|p| p.name().to_string())
                .collect(),
        }
    }
}

/// All records, by manifest name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Records {
    /// Manifest name → record.
    pub manifests: BTreeMap<String, Record>,
}

impl Records {
    /// Reads the records in `dir`; none yet is an empty set.
    pub fn load(dir: &Path) -> Result<Self, String> {
        otabox_sdk::fs::load_json(&dir.join(RECORD_FILE))
    }

    /// Writes the records to `dir` atomically (temporary file, fsync, rename).
    pub fn save(&self, dir: &Path) -> Result<(), String> {
        otabox_sdk::fs::save_json(&dir.join(RECORD_FILE), self)
    }

    /// Packages the previous manifest named `manifest.name` installed that
    /// `manifest` no longer lists (neither installs nor removes).
    pub fn dropped_by(&self, manifest: &AptManifest) -> Vec<String> {
        let Some(previous) = self.manifests.get(&manifest.name) else {
            return Vec::new();
        };
        previous
            .packages
            .iter()
            .filter(|name| !manifest.packages.iter().any(|p| p.name() == name.as_str()))
            .cloned()
            .collect()
    }

    /// Every package named by an installed manifest, once.
    pub fn package_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .manifests
            .values()
            .flat_map(|r| r.packages.iter().cloned())
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use otabox_sdk::FromJson;
    use std::fs;

    fn manifest(json: &str) -> AptManifest {
        AptManifest::parse(json).expect("valid manifest")
    }

    #[test]
    fn records_round_trip_atomically() {
        let dir = std::env::temp_dir().join(format!("otabox-apt-record-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(Records::load(&dir).expect("empty"), Records::default());
        let mut records = Records::default();
        let m =
            manifest(r#"{"name":"edge","version":"1","packages":[{"name":"a1"},{"name":"b1-"}]}"#);
        records.manifests.insert(m.name.clone(), Record::of(&m));
        records.save(&dir).expect("save");
        let back = Records::load(&dir).expect("load");
        assert_eq!(back, records);
        assert_eq!(back.manifests["edge"].packages, ["a1"]);
        assert!(!dir.join("installed.json.new").exists());
        fs::write(dir.join(RECORD_FILE), b"{oops").expect("damage");
        assert!(Records::load(&dir).unwrap_err().contains("damaged"));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_manifest_that_drops_a_package_is_noticed() {
        let base = manifest(
            r#"{"name":"contoso-iot-edge","version":"1.0.0.0","packages":[{"name":"thermocontrol","version":"1.0.1"},{"name":"tempreport","version":"2.0.0"}]}"#,
        );
        let mut records = Records::default();
        records
            .manifests
            .insert(base.name.clone(), Record::of(&base));
        let incorrect = manifest(
            r#"{"name":"contoso-iot-edge","version":"1.0.0.1","packages":[{"name":"tempreport","version":"2.0.1"}]}"#,
        );
        assert_eq!(records.dropped_by(&incorrect), ["thermocontrol"]);
        let correct = manifest(
            r#"{"name":"contoso-iot-edge","version":"1.0.0.1","packages":[{"name":"thermocontrol","version":"1.0.1"},{"name":"tempreport","version":"2.0.1"}]}"#,
        );
        assert!(records.dropped_by(&correct).is_empty());
        let other = manifest(r#"{"name":"other","version":"1","packages":[{"name":"x1"}]}"#);
        assert!(records.dropped_by(&other).is_empty());
    }
}
