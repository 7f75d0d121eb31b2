//! Debian versions: `[epoch:]upstream[-revision]`, compared as dpkg does.
//!
//! The epoch is an unsigned integer (default 0); the upstream version
//! starts with a digit and holds alphanumerics and `. + ~` (and `-` when a
//! revision follows); the revision holds alphanumerics and `. + ~`. A
//! missing revision compares equal to `0`, so `1.0.8` equals `1.0.8-0`.
//! In comparisons `~` sorts before everything, even the end of the string.

use std::cmp::Ordering;
use std::fmt;

/// A parsed Debian version.
#[derive(Debug, Clone, Eq)]
pub struct Version {
    epoch: u64,
    upstream: String,
    revision: String,
}

/// Why a version string is not a Debian version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionError(pub String);

impl fmt::Display for VersionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for VersionError {}

impl Version {
    /// Parses `text`, refusing anything dpkg would not accept (and `=`).
    pub fn parse(text: &str) -> Result<Self, VersionError> {
        let bad = |why: &str| {
            Err(VersionError(format!(
                "{text:?} is not a Debian version: {why}"
            )))
        };
        if text.is_empty() {
            return bad("it is empty");
        }
        if text.contains('=') {
            return bad("`=` is not allowed (give the version alone)");
        }
        let (epoch, rest) = match text.split_once(':') {
            Some((e, rest)) => match e.parse::<u64>() {
                Ok(n) if !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) => (n, rest),
                _ => return bad("the epoch must be an unsigned integer"),
            },
            None => (0, text),
        };
        let (upstream, revision) = match rest.rsplit_once('-') {
            Some((u, r)) => (u, r),
            None => (rest, ""),
        };
        if !upstream.starts_with(|c: char| c.is_ascii_digit()) {
            return bad("the upstream version must start with a digit");
        }
        let upstream_ok = |c: char| c.is_ascii_alphanumeric() || ".+~-".contains(c);
        if !upstream.chars().all(upstream_ok) || upstream.contains(':') {
            return bad("the upstream version may hold only alphanumerics and `. + ~ -`");
        }
        if rest.contains('-') && revision.is_empty() {
            return bad("the revision after `-` is empty");
        }
        if !revision
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".+~".contains(c))
        {
            return bad("the revision may hold only alphanumerics and `. + ~`");
        }
        Ok(Self {
            epoch,
            upstream: upstream.to_string(),
            revision: revision.to_string(),
        })
    }

    /// The version with an explicit revision, as installed criteria show it.
    pub fn canonical(&self) -> String {
        let revision = if self.revision.is_empty() {
            "0"
        } else {
            &self.revision
        };
        match self.epoch {
            0 => format!("{}-{revision}", self.upstream),
            e => format!("{e}:{}-{revision}", self.upstream),
        }
    }
}

/// The spelling among `offered` of a version equal to `want` (Debian
/// comparison): `want`'s own text when offered, else the first equal one.
/// apt pins by exact text, so `foo=1.0.8` misses a published `1.0.8-0`.
pub fn spelling_in<'a>(want: &Version, offered: &'a [String]) -> Option<&'a str> {
    let text = want.to_string();
    offered
        .iter()
        .find(|o| **o == text)
        .or_else(|| {
            offered
                .iter()
                .find(|o| Version::parse(o).is_ok_and(|v| v == *want))
        })
        .map(String::as_str)
}

impl PartialEq for Version {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Self) -> Ordering {
        self.epoch
            .cmp(&other.epoch)
            .then_with(|| verrevcmp(&self.upstream, &other.upstream))
            .then_with(|| {
                verrevcmp(
                    revision_or_zero(&self.revision),
                    revision_or_zero(&other.revision),
                )
            })
    }
}

fn revision_or_zero(r: &str) -> &str {
    if r.is_empty() { "0" } else { r }
}

/// dpkg's character weight: `~` lowest, then the end, then letters, then
/// everything else.
fn order(c: Option<u8>) -> i32 {
    match c {
        Some(b'~') => -1,
        None => 0,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

/// dpkg's `verrevcmp`: alternating non-digit and digit runs.
fn verrevcmp(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let (ac, bc) = (order(a.get(i).copied()), order(b.get(j).copied()));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while i < a.len() && a[i].is_ascii_digit() && j < b.len() && b[j].is_ascii_digit() {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if i < a.len() && a[i].is_ascii_digit() {
            return Ordering::Greater;
        }
        if j < b.len() && b[j].is_ascii_digit() {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.epoch != 0 {
            write!(f, "{}:", self.epoch)?;
        }
        f.write_str(&self.upstream)?;
        if !self.revision.is_empty() {
            write!(f, "-{}", self.revision)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_missing_revision_equals_revision_zero() {
        assert_eq!(v("1.0.8"), v("1.0.8-0"));
        assert_eq!(v("1.0.8").canonical(), "1.0.8-0");
        assert_eq!(v("2:1.0").canonical(), "2:1.0-0");
    }

    #[test]
    fn the_offered_spelling_of_an_equal_version_is_found() {
        let offered: Vec<String> = ["1.0.8-0", "1.0.9", "1:2.5-1", "1.0.9-0"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(spelling_in(&v("1.0.8"), &offered), Some("1.0.8-0"));
        assert_eq!(
            spelling_in(&v("1.0.9-0"), &offered),
            Some("1.0.9-0"),
            "exact first"
        );
        assert_eq!(
            spelling_in(&v("1:2.05"), &offered),
            None,
            "revision 0 is not 1"
        );
        assert_eq!(spelling_in(&v("1:2.05-1"), &offered), Some("1:2.5-1"));
        assert_eq!(spelling_in(&v("1.0.8-1"), &offered), None);
        assert_eq!(spelling_in(&v("1.0.8"), &[]), None);
    }

    #[test]
    fn ordering_follows_dpkg() {
        // Pairs checked against `dpkg --compare-versions A lt B`.
        let ascending = [
            ("1.0~rc1", "1.0"),
            ("1.0~~", "1.0~"),
            ("1.0", "1.0a"),
            ("1.0a", "1.0+b1"),
            ("1.0", "1.0.1"),
            ("1.9", "1.10"),
            ("1.0-1", "1.0-1.1"),
            ("1.0-1", "1.0-2"),
            ("1.0-9", "1.0-10"),
            ("9.9", "1:0.1"),
            ("1.0.7", "1.0.8"),
            ("1.0.7-rc1", "1.0.7-rc2"),
            ("0.9", "1.0~beta"),
        ];
        for (lo, hi) in ascending {
            assert!(v(lo) < v(hi), "{lo} < {hi}");
            assert!(v(hi) > v(lo), "{hi} > {lo}");
        }
        assert_eq!(v("1.01"), v("1.1"), "leading zeros do not count");
        assert_eq!(v("0:1.0"), v("1.0"));
    }

    #[test]
    fn malformed_versions_say_why() {
        for (text, why) in [
            ("", "empty"),
            ("=1.0", "`=`"),
            ("a1.0", "start with a digit"),
            ("x:1.0", "epoch"),
            ("-1:1.0", "epoch"),
            ("1.0_1", "upstream version may hold"),
            ("1.0-", "revision after `-` is empty"),
            ("1.0-a_b", "revision may hold"),
            ("1:2:3", "upstream version may hold"),
        ] {
            let err = Version::parse(text).expect_err(text);
            assert!(err.0.contains(why), "{text:?}: {err}");
        }
        assert!(Version::parse("1.2.3-4ubuntu0.1").is_ok());
        assert!(Version::parse("1:2.3.4-1+deb12u1").is_ok());
        assert!(
            Version::parse("1.0-2-3").is_ok(),
            "hyphens in upstream when a revision follows"
        );
    }
}
