//! The handler's device configuration (`[handlers.apt] config = {...}` in
//! `device.toml`), and the apt and dpkg options it implies.
//!
//! ```toml
//! [handlers.apt.config]
//! root = "/mnt/sysroot"                      # default "/": the device itself
//! apt_config = "/mnt/sysroot/etc/apt/apt.conf"  # APT_CONFIG for apt-get
//! agent_packages = ["otabox"]                # installing one restarts the agent
//! inventory = "managed"                      # or "all"
//! ```

use std::path::{Component, Path};

use otabox_sdk::{FromJson, from_json};
use serde::Deserialize;

/// What `inventory` lists.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InventoryScope {
    /// The packages named by the manifests this handler installed.
    #[default]
    Managed,
    /// Every installed package.
    All,
}

/// The handler's device configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AptConfig {
    /// The root apt and dpkg work on. `/` is the running system; another
    /// absolute path is a sysroot holding `etc/apt`, `var/lib/apt`,
    /// `var/lib/dpkg`, `var/cache/apt` and `var/log/apt`.
    pub root: String,
    /// An apt configuration file (a path on the device) passed as
    /// `APT_CONFIG`. Set it for a sysroot whose file sets `Dir::Etc::Parts`,
    /// so the running system's `apt.conf.d` hooks stay out of the sysroot.
    pub apt_config: Option<String>,
    /// Maintainer scripts of a sysroot run without a chroot, with `DPKG_ROOT`
    /// set (dpkg `--force-script-chrootless`); `false` runs them chrooted,
    /// which needs a shell inside the root.
    pub chrootless_scripts: bool,
    /// Packages whose installation means the agent updated itself: a
    /// manifest that installs one ends its apply with an agent restart.
    pub agent_packages: Vec<String>,
    /// What `inventory` lists.
    pub inventory: InventoryScope,
}

impl Default for AptConfig {
    fn default() -> Self {
        Self {
            root: "/".into(),
            apt_config: None,
            chrootless_scripts: true,
            agent_packages: vec!["otabox".into()],
            inventory: InventoryScope::Managed,
        }
    }
}

impl FromJson for AptConfig {
    /// Parses and checks the configuration JSON the host passes.
    fn parse(json: &str) -> Result<Self, String> {
        let config: Self = from_json(json, "apt handler config")?;
        config.check()?;
        Ok(config)
    }
}

impl AptConfig {
    fn check(&self) -> Result<(), String> {
        for (key, path) in [
            ("root", Some(&self.root)),
            ("apt_config", self.apt_config.as_ref()),
        ] {
            let Some(path) = path else { continue };
            let p = Path::new(path);
            if !p.is_absolute() || p.components().any(|c| c == Component::ParentDir) {
                return Err(format!(
                    "invalid apt handler config: `{key}` {path:?} must be an absolute path without `..`"
                ));
            }
        }
        Ok(())
    }

    fn is_sysroot(&self) -> bool {
        Path::new(&self.root) != Path::new("/")
    }

    fn under_root(&self, rel: &str) -> String {
        format!("{}/{rel}", self.root.trim_end_matches('/'))
    }

    /// The dpkg database directory.
    pub fn admindir(&self) -> String {
        self.under_root("var/lib/dpkg")
    }

    /// `-o` options that point apt at the root (none for `/`).
    pub fn apt_options(&self) -> Vec<String> {
        if !self.is_sysroot() {
            return Vec::new();
        }
        let mut settings = vec![
            format!("Dir::Etc={}", self.under_root("etc/apt")),
            format!("Dir::State={}", self.under_root("var/lib/apt")),
            format!("Dir::State::status={}/status", self.admindir()),
            format!("Dir::Cache={}", self.under_root("var/cache/apt")),
            format!("Dir::Log={}", self.under_root("var/log/apt")),
            format!("DPkg::Options::=--root={}", self.root),
            format!("DPkg::Options::=--admindir={}", self.admindir()),
        ];
        if self.chrootless_scripts {
            settings.push("DPkg::Options::=--force-script-chrootless".into());
        }
        settings
            .into_iter()
            .flat_map(|s| ["-o".to_string(), s])
            .collect()
    }

    /// Arguments that point dpkg-query at the root (none for `/`).
    pub fn dpkg_query_options(&self) -> Vec<String> {
        if self.is_sysroot() {
            vec![format!("--admindir={}", self.admindir())]
        } else {
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_system_needs_no_options() {
        let config = AptConfig::parse("{}").expect("defaults");
        assert!(config.apt_options().is_empty());
        assert!(config.dpkg_query_options().is_empty());
        assert_eq!(config.agent_packages, ["otabox"]);
        assert_eq!(config.inventory, InventoryScope::Managed);
    }

    #[test]
    fn a_sysroot_redirects_apt_and_dpkg() {
        let config = AptConfig::parse(r#"{"root": "/srv/root/"}"#).expect("valid");
        let options = config.apt_options().join(" ");
        for want in [
            "-o Dir::Etc=/srv/root/etc/apt",
            "-o Dir::State::status=/srv/root/var/lib/dpkg/status",
            "-o DPkg::Options::=--root=/srv/root/",
            "-o DPkg::Options::=--admindir=/srv/root/var/lib/dpkg",
            "--force-script-chrootless",
        ] {
            assert!(options.contains(want), "{want} in {options}");
        }
        assert_eq!(
            config.dpkg_query_options(),
            ["--admindir=/srv/root/var/lib/dpkg"]
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        for (json, why) in [
            (r#"{"root": "relative"}"#, "absolute"),
            (r#"{"root": "/a/../b"}"#, "absolute"),
            (r#"{"apt_config": "apt.conf"}"#, "apt_config"),
            (r#"{"rooot": "/"}"#, "unknown field"),
            (r#"{"inventory": "some"}"#, "unknown variant"),
        ] {
            let err = AptConfig::parse(json).expect_err(json);
            assert!(err.contains(why), "{json}: {err}");
        }
    }
}
