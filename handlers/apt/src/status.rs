//! Result codes of the apt handler, and failures built from apt's output.
//!
//! Codes below 20 are the SDK's ([`otabox_sdk::code`]: 10 invalid
//! manifest, 11 invalid config). The
//! extended code of a failed apt-get or dpkg-query run is facility 4
//! (package manager), component 1 (apt-get) or 2 (dpkg-query), value = the
//! program's exit code.

use otabox_sdk::Output;
use otabox_sdk::prelude::*;

use crate::diagnose::{self, Problem};
use crate::manifest::PackageAction;

/// `apt-get update` failed.
pub const UPDATE_FAILED: u32 = 30;
/// `apt-get --download-only install` failed for another reason.
pub const DOWNLOAD_FAILED: u32 = 31;
/// apt could not resolve the dependencies.
pub const DEPENDENCIES: u32 = 32;
/// A package or a version is not in any configured repository.
pub const NOT_AVAILABLE: u32 = 33;
/// `apt-get install` failed for another reason.
pub const INSTALL_FAILED: u32 = 34;
/// A maintainer script (or dpkg) failed for a package.
pub const SCRIPT_FAILED: u32 = 35;
/// apt refused a repository (signature, hashes) or could not reach it.
pub const REPOSITORY_REFUSED: u32 = 36;
/// After the install the packages are not at the manifest's versions.
pub const NOT_AS_EXPECTED: u32 = 37;
/// Rollback: the previous versions are no longer available.
pub const ROLLBACK_UNAVAILABLE: u32 = 38;
/// Rollback: apt-get failed.
pub const ROLLBACK_FAILED: u32 = 39;
/// The handler's record of installed manifests could not be read or written.
pub const RECORD_FAILED: u32 = 40;
/// dpkg-query failed.
pub const QUERY_FAILED: u32 = 41;
/// The host refused to run a program.
pub const DENIED: u32 = 42;
/// A program ran past its time limit, or the job was cancelled.
pub const TIMED_OUT: u32 = 43;
/// A program could not be started.
pub const NOT_RUN: u32 = 44;
/// Rollback was asked for without a backup.
pub const NO_BACKUP: u32 = 45;

/// Most bytes of apt's output kept in a report detail.
const OUTPUT_DETAIL: usize = 1000;

/// A failure of an apt-get run, explained from its output. An unmet
/// dependency or a missing version or package is headlined by that cause,
/// with `headline` (what failed) after it; other failures start with
/// `headline`. `manifest` is the step's package list, used to name the
/// dependencies the manifest should pin.
pub fn apt_failure(code: u32, headline: &str, out: &Output, manifest: &[PackageAction]) -> Status {
    let (stdout, stderr) = (out.stdout(), out.stderr());
    let said = diagnose::messages(&stderr).join("; ");
    let (code, message, extra) = match diagnose::diagnose(&stdout, &stderr) {
        Problem::UnmetDependencies(unmet) => unmet_dependencies(&unmet, headline, manifest),
        Problem::VersionNotFound { package, version } => (
            NOT_AVAILABLE,
            format!(
                "version not available: version {version} of {package} is not in any \
                 configured repository ({headline})"
            ),
            vec![("package".to_string(), package)],
        ),
        Problem::UnknownPackage(package) => (
            NOT_AVAILABLE,
            format!(
                "package not available: package {package} is not in any configured \
                 repository ({headline})"
            ),
            vec![("package".to_string(), package)],
        ),
        Problem::PackageScripts(failures) => {
            let text: Vec<String> = failures
                .iter()
                .map(|f| format!("{} ({}): {}", f.package, f.action, f.reason))
                .collect();
            let names: Vec<&str> = failures.iter().map(|f| f.package.as_str()).collect();
            (
                SCRIPT_FAILED,
                format!("{headline}: dpkg failed for {}", text.join("; ")),
                vec![("packages".to_string(), names.join(", "))],
            )
        }
        Problem::Repository => (
            REPOSITORY_REFUSED,
            format!("{headline}: apt refused a repository: {said}"),
            Vec::new(),
        ),
        Problem::Other => {
            let said = if said.is_empty() {
                diagnose::tail(&stderr, 3)
            } else {
                said
            };
            (code, format!("{headline}: {said}"), Vec::new())
        }
    };
    let mut status = out.failure(code, message, Facility::PackageManager, 1);
    for (key, value) in extra {
        status = status.detail(key, value);
    }
    status.detail("apt-output", output_tail(&stdout, &stderr))
}

/// The code, message and details of unmet dependencies: each relation,
/// then the manifest entries that would pin the dependencies apt did not
/// carry a pin over to.
fn unmet_dependencies(
    unmet: &[diagnose::Unmet],
    headline: &str,
    manifest: &[PackageAction],
) -> (u32, String, Vec<(String, String)>) {
    let relations: Vec<String> = unmet
        .iter()
        .map(|u| format!("{} depends on {}", u.package, u.relation))
        .collect();
    let missing = missing_pins(unmet, manifest);
    let advice = if missing.is_empty() {
        String::new()
    } else {
        format!(
            ". apt does not carry a package's `=` version over to its dependencies: \
             add {} to the manifest's packages",
            missing.join(", ")
        )
    };
    let cause = if unmet.len() == 1 {
        "unmet dependency"
    } else {
        "unmet dependencies"
    };
    (
        DEPENDENCIES,
        format!("{cause}: {} ({headline}){advice}", relations.join("; ")),
        vec![("missing-pins".to_string(), missing.join(", "))],
    )
}

/// The dependencies apt could not satisfy that the manifest does not pin,
/// each as the manifest entry that would list it:
/// `{"name":"libfoo","version":"1.0.1"}` when the dependent asks for an
/// exact version, `{"name":"libfoo"}` otherwise.
fn missing_pins(unmet: &[diagnose::Unmet], manifest: &[PackageAction]) -> Vec<String> {
    let pinned = |name: &str| {
        manifest
            .iter()
            .any(|p| matches!(p, PackageAction::Install { name: n, version: Some(_) } if n == name))
    };
    let mut missing: Vec<String> = Vec::new();
    for u in unmet {
        let dep = u.dependency();
        if pinned(dep) {
            continue;
        }
        let entry = match u.pinned_version() {
            Some(v) => serde_json::json!({"name": dep, "version": v}),
            None => serde_json::json!({"name": dep}),
        };
        let entry = entry.to_string();
        if !missing.contains(&entry) {
            missing.push(entry);
        }
    }
    missing
}

fn output_tail(stdout: &str, stderr: &str) -> String {
    let both = format!(
        "{}\n{}",
        diagnose::tail(stdout, 12),
        diagnose::tail(stderr, 6)
    );
    let trimmed = both.trim();
    match trimmed.char_indices().rev().nth(OUTPUT_DETAIL) {
        Some((cut, _)) => format!("...{}", &trimmed[cut..]),
        None => trimmed.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::AptManifest;

    #[test]
    fn only_dependencies_without_a_pin_are_named() {
        let m = AptManifest::parse(
            r#"{"name":"m","version":"1","packages":[{"name":"foo","version":"1.0.1"},{"name":"bar","version":"2"}]}"#,
        )
        .expect("valid");
        let unmet = [
            diagnose::Unmet {
                package: "foo".into(),
                relation: "libfoo (= 1.0.1) but 1.0.2 is to be installed".into(),
            },
            diagnose::Unmet {
                package: "foo".into(),
                relation: "bar (= 2) but 3 is to be installed".into(),
            },
        ];
        assert_eq!(
            missing_pins(&unmet, &m.packages),
            [r#"{"name":"libfoo","version":"1.0.1"}"#]
        );
    }

    #[test]
    fn the_output_detail_is_bounded() {
        let long = "x".repeat(5000);
        let tail = output_tail(&long, "E: boom");
        assert!(tail.len() <= OUTPUT_DETAIL + 8, "{}", tail.len());
        assert!(tail.ends_with("E: boom"));
    }
}
