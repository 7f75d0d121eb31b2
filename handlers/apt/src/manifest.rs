//! The Device Update apt manifest, parsed strictly.
//!
//! ```json
//! {"name": "contoso-edge", "version": "1.0.0",
//!  "packages": [{"name": "aziot-edge", "version": "1.4.2-1"},
//!               {"name": "aziot-identity-service", "version": "1.4.2-1"},
//!               {"name": "old-tool-"}]}
//! ```
//! Packages are processed in the listed order; no version means the latest
//! available; a name ending in `-` removes the package (and may not carry a
//! version). Installed criteria are `<name>-<version>`.

use std::collections::BTreeMap;

use otabox_sdk::{FromJson, from_json};
use serde::Deserialize;

use crate::version::{Version, spelling_in};

/// The manifest as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    name: String,
    version: String,
    packages: Vec<RawPackage>,
    /// otabox extension: the agent restarts after the install.
    #[serde(default, rename = "agentRestartRequired")]
    agent_restart_required: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPackage {
    name: String,
    #[serde(default)]
    version: Option<String>,
}

/// What to do with one package.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackageAction {
    /// Install `name`, at `version` or the latest available.
    Install {
        /// Package name.
        name: String,
        /// Exact version, or `None` for the latest.
        version: Option<Version>,
    },
    /// Remove `name`.
    Remove {
        /// Package name.
        name: String,
    },
}

impl PackageAction {
    /// The argument for `apt-get install`: `name=version`, `name` or `name-`.
    pub fn apt_argument(&self) -> String {
        match self {
            PackageAction::Install {
                name,
                version: Some(v),
            } => format!("{name}={v}"),
            PackageAction::Install {
                name,
                version: None,
            } => name.clone(),
            PackageAction::Remove { name } => format!("{name}-"),
        }
    }

    /// Like [`apt_argument`](Self::apt_argument), with the version spelled
    /// as `offered` (name → versions in the repositories) spells an equal
    /// one; unchanged when none is equal (apt then says it is missing).
    pub fn apt_argument_in(&self, offered: &BTreeMap<String, Vec<String>>) -> String {
        match self {
            PackageAction::Install {
                name,
                version: Some(v),
            } => {
                let spelled = offered
                    .get(name)
                    .and_then(|o| spelling_in(v, o))
                    .map_or_else(|| v.to_string(), str::to_string);
                format!("{name}={spelled}")
            }
            other => other.apt_argument(),
        }
    }

    /// The package name.
    pub fn name(&self) -> &str {
        match self {
            PackageAction::Install { name, .. } | PackageAction::Remove { name } => name,
        }
    }
}

/// A checked apt manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AptManifest {
    /// Manifest name.
    pub name: String,
    /// Manifest version.
    pub version: String,
    /// Actions, in the listed order.
    pub packages: Vec<PackageAction>,
    /// Whether the manifest asks for an agent restart after the install
    /// (`agentRestartRequired`, an otabox extension).
    pub agent_restart_required: bool,
}

impl FromJson for AptManifest {
    /// Parses and checks `json`; errors name the package at fault.
    fn parse(json: &str) -> Result<Self, String> {
        let raw: RawManifest = from_json(json, "apt manifest")?;
        if raw.name.trim().is_empty() || raw.version.trim().is_empty() {
            return Err("invalid apt manifest: `name` and `version` must not be empty".into());
        }
        if raw.packages.is_empty() {
            return Err("invalid apt manifest: `packages` lists no package".into());
        }
        let packages = raw
            .packages
            .into_iter()
            .map(action)
            .collect::<Result<Vec<_>, _>>()?;
        if let Some(twice) = packages
            .iter()
            .enumerate()
            .find(|(i, p)| packages[..*i].iter().any(|q| q.name() == p.name()))
        {
            return Err(format!(
                "package {:?}: listed more than once; list each package once",
                twice.1.name()
            ));
        }
        Ok(Self {
            name: raw.name,
            version: raw.version,
            packages,
            agent_restart_required: raw.agent_restart_required,
        })
    }
}

impl AptManifest {
    /// Whether the manifest installs any of `names` (or asks for a restart).
    pub fn restarts_agent(&self, names: &[String]) -> bool {
        self.agent_restart_required
            || self.packages.iter().any(|p| {
                matches!(p, PackageAction::Install { .. }) && names.iter().any(|n| n == p.name())
            })
    }

    /// `<name>-<version>`.
    pub fn installed_criteria(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }
}

fn action(p: RawPackage) -> Result<PackageAction, String> {
    let (name, remove) = match p.name.strip_suffix('-') {
        Some(stem) => (stem.to_string(), true),
        None => (p.name.clone(), false),
    };
    check_name(&name).map_err(|why| format!("package {:?}: {why}", p.name))?;
    match (remove, p.version) {
        (true, Some(v)) => Err(format!(
            "package {:?}: a removal (`{name}-`) may not carry a version (found {v:?})",
            p.name
        )),
        (true, None) => Ok(PackageAction::Remove { name }),
        (false, Some(v)) => {
            let version = Version::parse(&v).map_err(|e| format!("package {name:?}: {e}"))?;
            Ok(PackageAction::Install {
                name,
                version: Some(version),
            })
        }
        (false, None) => Ok(PackageAction::Install {
            name,
            version: None,
        }),
    }
}

/// Debian package names: lowercase alphanumerics and `+ - .`, at least two
/// characters, starting with an alphanumeric.
fn check_name(name: &str) -> Result<(), String> {
    let starts_ok = name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
    let chars_ok = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    if name.len() < 2 || !starts_ok || !chars_ok {
        return Err("not a Debian package name (lowercase alphanumerics and `+ - .`, starting with one of the first)".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_installs_pins_and_removals_in_order() {
        let m = AptManifest::parse(
            r#"{"name":"contoso-edge","version":"1.0.0","packages":[
                {"name":"aziot-edge","version":"1.4.2-1"},{"name":"moby-engine"},{"name":"old-tool-"}]}"#,
        )
        .expect("valid");
        let args: Vec<String> = m.packages.iter().map(PackageAction::apt_argument).collect();
        assert_eq!(args, ["aziot-edge=1.4.2-1", "moby-engine", "old-tool-"]);
        assert_eq!(m.installed_criteria(), "contoso-edge-1.0.0");
        assert!(!m.agent_restart_required);
    }

    #[test]
    fn pins_take_the_repository_spelling_of_an_equal_version() {
        let m = AptManifest::parse(
            r#"{"name":"m","version":"1","packages":[{"name":"a1","version":"1.0.8"},
                {"name":"b1","version":"2.0-0"},{"name":"c1","version":"3"},{"name":"d1"},{"name":"e1-"}]}"#,
        )
        .expect("valid");
        let offered: BTreeMap<String, Vec<String>> = [
            ("a1", vec!["1.0.8-0"]),
            ("b1", vec!["1.9", "2.0"]),
            ("c1", vec!["3-1"]),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
        .collect();
        let args: Vec<String> = m
            .packages
            .iter()
            .map(|p| p.apt_argument_in(&offered))
            .collect();
        assert_eq!(args, ["a1=1.0.8-0", "b1=2.0", "c1=3", "d1", "e1-"]);
    }

    #[test]
    fn the_agent_package_or_the_flag_asks_for_a_restart() {
        let agent = ["otabox".to_string()];
        let lists = |pkgs: &str, flag: &str| {
            AptManifest::parse(&format!(
                r#"{{"name":"m","version":"1","packages":[{pkgs}]{flag}}}"#
            ))
            .expect("valid")
            .restarts_agent(&agent)
        };
        assert!(lists(r#"{"name":"otabox","version":"2.0"}"#, ""));
        assert!(!lists(r#"{"name":"otabox-"}"#, ""));
        assert!(!lists(r#"{"name":"curl"}"#, ""));
        assert!(lists(
            r#"{"name":"curl"}"#,
            r#","agentRestartRequired":true"#
        ));
    }

    #[test]
    fn every_malformed_manifest_is_refused_naming_the_problem() {
        for (json, why) in [
            ("not json", "invalid apt manifest"),
            (
                r#"{"version":"1","packages":[{"name":"a1"}]}"#,
                "missing field `name`",
            ),
            (
                r#"{"name":"m","packages":[{"name":"a1"}]}"#,
                "missing field `version`",
            ),
            (
                r#"{"name":"m","version":"1","packages":[{"name":"a1"}],"extra":1}"#,
                "unknown field `extra`",
            ),
            (
                r#"{"name":"m","version":"1","packages":[{"name":"a1","arch":"arm64"}]}"#,
                "unknown field `arch`",
            ),
            (
                r#"{"name":"m","version":"1","packages":[]}"#,
                "lists no package",
            ),
            (
                r#"{"name":"m","version":"1","packages":[{"name":"curl","version":"=7.88"}]}"#,
                "package \"curl\"",
            ),
            (
                r#"{"name":"m","version":"1","packages":[{"name":"curl","version":"latest"}]}"#,
                "start with a digit",
            ),
            (
                r#"{"name":"m","version":"1","packages":[{"name":"curl-","version":"7.88"}]}"#,
                "removal",
            ),
            (
                r#"{"name":"m","version":"1","packages":[{"name":"Curl"}]}"#,
                "not a Debian package name",
            ),
            (
                r#"{"name":"","version":"1","packages":[{"name":"curl"}]}"#,
                "must not be empty",
            ),
            (
                r#"{"name":"m","version":"1","packages":[{"name":"curl"},{"name":"curl-"}]}"#,
                "\"curl\": listed more than once",
            ),
            (
                r#"{"name":"m","version":"1","packages":[{"name":"curl"}],"agentRestartRequired":"yes"}"#,
                "invalid type",
            ),
        ] {
            let err = AptManifest::parse(json).expect_err(json);
            assert!(err.contains(why), "{json}: {err}");
        }
    }
}
