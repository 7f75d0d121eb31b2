//! apt-get and dpkg-query, run through the host's process capability with
//! the options of the configured root.

use std::collections::BTreeMap;

use otabox_sdk::Output;
use otabox_sdk::prelude::*;

use crate::config::AptConfig;
use crate::diagnose::{self, Change};
use crate::status;

/// The programs, exactly as `apt.toml` declares them.
pub const APT_GET: &str = "/usr/bin/apt-get";
/// See [`APT_GET`].
pub const DPKG_QUERY: &str = "/usr/bin/dpkg-query";
/// See [`APT_GET`].
pub const APT_CACHE: &str = "/usr/bin/apt-cache";

/// Options of every install: downgrades allowed, existing configuration
/// files kept without asking.
pub const INSTALL_OPTIONS: &[&str] = &[
    "-y",
    "--allow-downgrades",
    "-o",
    "Dpkg::Options::=--force-confdef",
    "-o",
    "Dpkg::Options::=--force-confold",
];

/// A package as dpkg knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// The version dpkg records.
    pub version: String,
    /// dpkg's abbreviated status (`ii `, `iF `, `rc `...).
    pub status: String,
}

impl Installed {
    /// Unpacked and configured (`?i?`).
    pub fn is_installed(&self) -> bool {
        self.status.chars().nth(1) == Some('i')
    }

    /// The status in words, for reports.
    pub fn describe(&self) -> String {
        let state = match self.status.chars().nth(1) {
            Some('n') => "not-installed",
            Some('c') => "config-files",
            Some('H') => "half-installed",
            Some('U') => "unpacked",
            Some('F') => "half-configured",
            Some('W') => "triggers-awaited",
            Some('t') => "triggers-pending",
            Some('i') => "installed",
            _ => "unknown",
        };
        format!("{} ({state})", self.status.trim_end())
    }
}

/// apt and dpkg for one configuration.
pub struct Apt<'a> {
    config: &'a AptConfig,
}

impl<'a> Apt<'a> {
    /// apt for `config`'s root.
    pub fn new(config: &'a AptConfig) -> Self {
        Self { config }
    }

    /// Runs apt-get with the root's options before `args`.
    fn apt_get<I, S>(&self, args: I) -> Result<Output, Status>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.apt_program(APT_GET, args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()
            .map_err(|e| host_failure(APT_GET, e))
    }

    /// `program` (apt-get or apt-cache) with the root's options before
    /// `args` and the configured `APT_CONFIG`.
    fn apt_program<I, S>(&self, program: &str, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let cmd = Command::new(program)
            .args(self.config.apt_options())
            .args(args);
        match &self.config.apt_config {
            Some(file) => cmd.env("APT_CONFIG", file.clone()),
            None => cmd,
        }
    }

    /// Every version of `names` the configured repositories offer, as they
    /// spell them (`apt-cache madison`, from the indexes `update` fetched).
    pub fn available(&self, names: &[&str]) -> Result<BTreeMap<String, Vec<String>>, Status> {
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        let out = self
            .apt_program(
                APT_CACHE,
                ["madison"].into_iter().chain(names.iter().copied()),
            )
            .run()
            .map_err(|e| host_failure(APT_CACHE, e))?;
        if !out.success() {
            return Err(status::apt_failure(
                status::QUERY_FAILED,
                "apt-cache cannot list the available versions",
                &out,
                &[],
            ));
        }
        Ok(parse_madison(&out.stdout()))
    }

    /// `apt-get update`; any failure to fetch or verify an index fails.
    pub fn update(&self) -> Result<(), Status> {
        let out = self.apt_get(["-q", "-o", "APT::Update::Error-Mode=any", "update"])?;
        if out.success() {
            return Ok(());
        }
        Err(status::apt_failure(
            status::UPDATE_FAILED,
            "apt-get update failed",
            &out,
            &[],
        ))
    }

    /// `apt-get --download-only install targets`.
    pub fn download(
        &self,
        targets: &[String],
        manifest: &[crate::PackageAction],
    ) -> Result<(), Status> {
        let out = self.apt_get(install_arguments(&["--download-only"], targets))?;
        if out.success() {
            return Ok(());
        }
        Err(status::apt_failure(
            status::DOWNLOAD_FAILED,
            "apt-get could not download the packages",
            &out,
            manifest,
        ))
    }

    /// `apt-get -s install targets`: the changes a real run would make.
    pub fn simulate(&self, targets: &[String]) -> Result<Result<Vec<Change>, Output>, Status> {
        let out = self.apt_get(install_arguments(&["-s"], targets))?;
        Ok(if out.success() {
            Ok(diagnose::simulated_changes(&out.stdout()))
        } else {
            Err(out)
        })
    }

    /// `apt-get install targets` (pins, latest and removals at once).
    pub fn install(&self, targets: &[String]) -> Result<Output, Status> {
        self.apt_get(install_arguments(&[], targets))
    }

    /// What dpkg records for `names` (absent names are left out).
    pub fn query(&self, names: &[&str]) -> Result<BTreeMap<String, Installed>, Status> {
        if names.is_empty() {
            return Ok(BTreeMap::new());
        }
        self.dpkg_query(names.iter().map(|n| n.to_string()).collect())
    }

    /// Every package dpkg records.
    pub fn query_all(&self) -> Result<BTreeMap<String, Installed>, Status> {
        self.dpkg_query(Vec::new())
    }

    fn dpkg_query(&self, names: Vec<String>) -> Result<BTreeMap<String, Installed>, Status> {
        let out = Command::new(DPKG_QUERY)
            .args(self.config.dpkg_query_options())
            .args(["-W", "-f=${Package}\\t${Version}\\t${db:Status-Abbrev}\\n"])
            .args(names)
            .run()
            .map_err(|e| host_failure(DPKG_QUERY, e))?;
        // Exit 1: some names are unknown to dpkg, which is an answer too.
        if !matches!(out.code(), Some(0 | 1)) {
            return Err(out.failure(
                status::QUERY_FAILED,
                format!("dpkg-query failed: {}", out.stderr_tail(5)),
                Facility::PackageManager,
                2,
            ));
        }
        Ok(parse_query(&out.stdout()))
    }
}

/// The arguments of an `apt-get install` after the root's options:
/// `-q`, `extra` (`--download-only`, `-s`), [`INSTALL_OPTIONS`], `install`
/// and the targets.
pub fn install_arguments(extra: &[&str], targets: &[String]) -> Vec<String> {
    ["-q"]
        .iter()
        .chain(extra)
        .chain(INSTALL_OPTIONS)
        .chain(&["install"])
        .map(|s| s.to_string())
        .chain(targets.iter().cloned())
        .collect()
}

/// Parses `Package\tVersion\tStatus` lines.
pub fn parse_query(stdout: &str) -> BTreeMap<String, Installed> {
    stdout
        .lines()
        .filter_map(|line| {
            let mut fields = line.splitn(3, '\t');
            let name = fields.next()?.trim();
            let version = fields.next()?.trim();
            let status = fields.next()?;
            (!name.is_empty()).then(|| {
                (
                    name.to_string(),
                    Installed {
                        version: version.to_string(),
                        status: status.to_string(),
                    },
                )
            })
        })
        .collect()
}

/// Parses `apt-cache madison` lines (`name | version | source Packages`)
/// into name → versions; source-package lines are left out.
pub fn parse_madison(stdout: &str) -> BTreeMap<String, Vec<String>> {
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in stdout.lines() {
        let mut fields = line.split('|').map(str::trim);
        let (Some(name), Some(version), Some(source)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if name.is_empty() || version.is_empty() || source.ends_with("Sources") {
            continue;
        }
        let versions = found.entry(name.to_string()).or_default();
        if !versions.iter().any(|v| v == version) {
            versions.push(version.to_string());
        }
    }
    found
}

fn host_failure(program: &str, e: HostError) -> Status {
    let (code, text) = match &e {
        HostError::Denied(t) => (
            status::DENIED,
            format!("the host refused to run {program}: {t}"),
        ),
        HostError::TimedOut(t) => (status::TIMED_OUT, format!("{program} was stopped: {t}")),
        HostError::Invalid(t) | HostError::NotFound(t) | HostError::Failed(t) => {
            (status::NOT_RUN, format!("cannot run {program}: {t}"))
        }
    };
    Status::new(code, text).extended(Facility::Os, 0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_lines_are_parsed() {
        let parsed = parse_query("foo\t1.0.1\tii \nbad\t1.0\tiF \nold\t2\trc \n\n");
        assert!(parsed["foo"].is_installed());
        assert!(!parsed["bad"].is_installed());
        assert_eq!(parsed["bad"].describe(), "iF (half-configured)");
        assert_eq!(parsed["old"].describe(), "rc (config-files)");
        assert_eq!(parsed.len(), 3);
    }

    #[test]
    fn madison_lines_give_every_spelling() {
        let out = "  thermo |   1.0.1 | http://127.0.0.1:8080 ./ Packages\n\
                   \x20 thermo | 1.0.2-0 | http://127.0.0.1:8080 ./ Packages\n\
                   \x20 thermo |   1.0.1 | http://mirror ./ Packages\n\
                   \x20 thermo |   1.0.1 | http://mirror ./ Sources\n\
                   N: Unable to locate package nopkg\n";
        let parsed = parse_madison(out);
        assert_eq!(parsed.len(), 1, "{parsed:?}");
        assert_eq!(parsed["thermo"], ["1.0.1", "1.0.2-0"]);
    }

    #[test]
    fn install_arguments_put_the_targets_last() {
        let args = install_arguments(&["-s"], &["a=1".into(), "b-".into()]);
        assert_eq!(args[..2], ["-q", "-s"]);
        assert_eq!(args[args.len() - 3..], ["install", "a=1", "b-"]);
        assert!(args.contains(&"--allow-downgrades".to_string()));
    }
}
