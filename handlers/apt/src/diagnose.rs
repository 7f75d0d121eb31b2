//! Reading apt's and dpkg's output: the changes a simulation announces, and
//! what went wrong when a run failed, in words an operator can act on.

/// A package whose installed version a run changes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    /// Package name.
    pub name: String,
    /// Installed version before the run (`None`: not installed).
    pub before: Option<String>,
    /// Version after the run (`None`: removed).
    pub after: Option<String>,
}

/// The changes `apt-get -s` announces (`Inst` and `Remv` lines), in order.
pub fn simulated_changes(stdout: &str) -> Vec<Change> {
    stdout.lines().filter_map(simulated_change).collect()
}

fn simulated_change(line: &str) -> Option<Change> {
    let (verb, rest) = line.split_once(' ')?;
    let (name, rest) = rest.split_once(' ').unwrap_or((rest, ""));
    let name = name.split(':').next().unwrap_or(name).to_string();
    let before = bracketed(rest, '[', ']').filter(|_| rest.starts_with('['));
    match verb {
        "Inst" => {
            let after = bracketed(rest, '(', ')')
                .and_then(|inner| inner.split_whitespace().next().map(str::to_string));
            Some(Change {
                name,
                before,
                after,
            })
        }
        "Remv" | "Purg" => Some(Change {
            name,
            before,
            after: None,
        }),
        _ => None,
    }
}

fn bracketed(text: &str, open: char, close: char) -> Option<String> {
    let start = text.find(open)? + open.len_utf8();
    let end = start + text[start..].find(close)?;
    Some(text[start..end].to_string())
}

/// A dependency apt could not satisfy: `package : Depends: relation`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmet {
    /// The package that has the dependency.
    pub package: String,
    /// The dependency as apt printed it, such as
    /// `libfoo (= 1.0.1) but 1.0.2 is to be installed`.
    pub relation: String,
}

impl Unmet {
    /// The name of the package depended on.
    pub fn dependency(&self) -> &str {
        self.relation
            .split([' ', '('])
            .next()
            .unwrap_or(&self.relation)
    }

    /// The version the dependency asks for with `=`, if it does.
    pub fn pinned_version(&self) -> Option<&str> {
        let start = self.relation.find("(= ")? + 3;
        let end = start + self.relation[start..].find(')')?;
        Some(self.relation[start..end].trim())
    }
}

/// What a failed apt-get run says went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The resolver could not satisfy these dependencies.
    UnmetDependencies(Vec<Unmet>),
    /// A pinned version is not in any configured repository.
    VersionNotFound {
        /// Package name.
        package: String,
        /// The version asked for.
        version: String,
    },
    /// A package is not in any configured repository.
    UnknownPackage(String),
    /// A maintainer script (or dpkg) failed for these packages.
    PackageScripts(Vec<ScriptFailure>),
    /// apt refused or could not read a repository (signature, hashes,
    /// unreachable source).
    Repository,
    /// Something else; apt's messages tell.
    Other,
}

/// One package dpkg could not process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptFailure {
    /// Package name.
    pub package: String,
    /// What dpkg was doing (`--configure`, `--unpack`, ...).
    pub action: String,
    /// dpkg's explanation, such as `installed foo package post-installation
    /// script subprocess returned error exit status 1`.
    pub reason: String,
}

/// Classifies a failed run from its output.
pub fn diagnose(stdout: &str, stderr: &str) -> Problem {
    let unmet = unmet_dependencies(stdout);
    if !unmet.is_empty() {
        return Problem::UnmetDependencies(unmet);
    }
    for message in errors(stderr) {
        if let Some((package, version)) = version_not_found(&message) {
            return Problem::VersionNotFound { package, version };
        }
        if let Some(package) = message.strip_prefix("Unable to locate package ") {
            return Problem::UnknownPackage(package.trim().to_string());
        }
    }
    let scripts = script_failures(stdout, stderr);
    if !scripts.is_empty() {
        return Problem::PackageScripts(scripts);
    }
    if is_repository_problem(stdout, stderr) {
        return Problem::Repository;
    }
    Problem::Other
}

/// apt's `E:` and `W:` lines, without the prefix (notices left out).
pub fn messages(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("E: ").or_else(|| l.strip_prefix("W: ")))
        .map(str::to_string)
        .collect()
}

fn errors(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("E: "))
        .map(str::to_string)
        .collect()
}

fn version_not_found(message: &str) -> Option<(String, String)> {
    // E: Version '9.9' for 'foo' was not found
    let rest = message.strip_prefix("Version '")?;
    let (version, rest) = rest.split_once("' for '")?;
    let (package, _) = rest.split_once("' was not found")?;
    Some((package.to_string(), version.to_string()))
}

fn unmet_dependencies(stdout: &str) -> Vec<Unmet> {
    let Some((_, section)) = stdout.split_once("The following packages have unmet dependencies:")
    else {
        return Vec::new();
    };
    let mut found = Vec::new();
    let mut current = String::new();
    for line in section.lines().skip(1) {
        if !line.starts_with(' ') {
            break;
        }
        let relation_part = match line.split_once(" : ") {
            Some((package, rest)) => {
                current = package.trim().to_string();
                rest
            }
            None => line,
        };
        let relation_part = relation_part.trim();
        let relation = ["Depends:", "PreDepends:", "Pre-Depends:"]
            .iter()
            .find_map(|kind| relation_part.strip_prefix(kind));
        if let Some(relation) = relation {
            found.push(Unmet {
                package: current.clone(),
                relation: relation.trim().to_string(),
            });
        }
    }
    found
}

fn script_failures(stdout: &str, stderr: &str) -> Vec<ScriptFailure> {
    let mut found: Vec<ScriptFailure> = Vec::new();
    for text in [stdout, stderr] {
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            // dpkg: error processing package bad (--configure):
            let Some(rest) = line.strip_prefix("dpkg: error processing package ") else {
                continue;
            };
            let (package, action) = rest.split_once(" (").unwrap_or((rest, ""));
            let action = action.trim_end_matches(':').trim_end_matches(')');
            let reason = lines.next().unwrap_or_default().trim().to_string();
            if !found.iter().any(|f| f.package == package) {
                found.push(ScriptFailure {
                    package: package.to_string(),
                    action: action.to_string(),
                    reason,
                });
            }
        }
    }
    found
}

fn is_repository_problem(stdout: &str, stderr: &str) -> bool {
    const SIGNS: &[&str] = &[
        "is not signed",
        "no longer signed",
        "signatures were invalid",
        "NO_PUBKEY",
        "GPG error",
        "Hash Sum mismatch",
        "Failed to fetch",
        "failed to download",
        "Release' does not have a Release file",
    ];
    SIGNS
        .iter()
        .any(|sign| stderr.contains(sign) || stdout.contains(sign))
}

/// The last non-empty lines of a text, for a report detail.
pub use otabox_sdk::tail;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simulation_lines_give_before_and_after() {
        let out = "Reading package lists...\n\
                   Remv bad [1.0]\n\
                   Inst foo [1.0.2] (1.0.1 127.0.0.1 [all]) []\n\
                   Inst libfoo (1.0.1 127.0.0.1 [all])\n\
                   Inst lib:amd64 [2] (3 Debian:12/stable [amd64])\n\
                   Conf foo (1.0.1 127.0.0.1 [all])\n";
        let change = |name: &str, before: Option<&str>, after: Option<&str>| Change {
            name: name.into(),
            before: before.map(Into::into),
            after: after.map(Into::into),
        };
        assert_eq!(
            simulated_changes(out),
            [
                change("bad", Some("1.0"), None),
                change("foo", Some("1.0.2"), Some("1.0.1")),
                change("libfoo", None, Some("1.0.1")),
                change("lib", Some("2"), Some("3")),
            ]
        );
    }

    #[test]
    fn unmet_dependencies_name_the_dependency_and_its_pin() {
        let out = "Some packages could not be installed.\n\
                   The following packages have unmet dependencies:\n \
                   foo : Depends: libfoo (= 1.0.1) but 1.0.2 is to be installed\n       \
                         Depends: bar but it is not going to be installed\n \
                   baz : PreDepends: qux (>= 2)\n\
                   E: Unable to correct problems, you have held broken packages.\n";
        let Problem::UnmetDependencies(unmet) = diagnose(out, "") else {
            panic!("not a dependency problem");
        };
        let seen: Vec<(&str, &str, Option<&str>)> = unmet
            .iter()
            .map(|u| (u.package.as_str(), u.dependency(), u.pinned_version()))
            .collect();
        assert_eq!(
            seen,
            [
                ("foo", "libfoo", Some("1.0.1")),
                ("foo", "bar", None),
                ("baz", "qux", None)
            ]
        );
    }

    #[test]
    fn missing_versions_and_packages_are_named() {
        let err = "E: Version '9.9' for 'foo' was not found\nE: Unable to locate package nopkg\n";
        assert_eq!(
            diagnose("", err),
            Problem::VersionNotFound {
                package: "foo".into(),
                version: "9.9".into()
            }
        );
        assert_eq!(
            diagnose("", "E: Unable to locate package nopkg\n"),
            Problem::UnknownPackage("nopkg".into())
        );
    }

    #[test]
    fn a_failed_postinst_names_the_package() {
        let out = "Setting up bad (1.0) ...\n\
                   dpkg: error processing package bad (--configure):\n \
                   installed bad package post-installation script subprocess returned error exit status 1\n\
                   Errors were encountered while processing:\n bad\n";
        let err = "E: Sub-process /usr/bin/dpkg returned an error code (1)\n";
        assert_eq!(
            diagnose(out, err),
            Problem::PackageScripts(vec![ScriptFailure {
                package: "bad".into(),
                action: "--configure".into(),
                reason: "installed bad package post-installation script subprocess returned error exit status 1".into(),
            }])
        );
    }

    #[test]
    fn signature_failures_are_repository_problems() {
        let err = "W: GPG error: http://127.0.0.1 ./ InRelease: The following signatures were invalid: BADSIG 2B3E\n\
                   E: The repository 'http://127.0.0.1 ./ Release' is not signed.\n";
        assert_eq!(diagnose("", err), Problem::Repository);
        assert_eq!(messages(err).len(), 2);
        assert_eq!(diagnose("", "E: something new\n"), Problem::Other);
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\n\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 3), "");
    }
}
