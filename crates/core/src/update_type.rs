//! The update type that joins a deployment step to the handler serving it:
//! `vendor/name:major`, such as `otabox/apt:1`.
//!
//! One type, validated in one place ([`UpdateType::parse`]), used by the
//! handler manifest (`[handler] update_types`), the desired state
//! (`updateType` of a step) and the agent. An [`UpdateType`] that exists
//! is valid: deserializing checks it.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Most bytes of an update type.
pub const MAX_LEN: usize = 128;

/// A valid update type: `vendor/name:major`, where vendor and name are
/// lowercase ASCII letters, digits, `-`, `_` and `.`, major is a `u32`, and the whole is at most [`MAX_LEN`] bytes.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UpdateType(String);

/// Shown as its text (`"otabox/apt:1"`), as messages quoted it when it
/// was a string.
impl fmt::Debug for UpdateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

/// Why a text is not an update type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidUpdateType(String);

impl fmt::Display for InvalidUpdateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "update type {:?} must be `vendor/name:major` in lowercase ASCII (letters, digits, `-`, `_`, `.`), at most {MAX_LEN} bytes",
            self.0
        )
    }
}

impl std::error::Error for InvalidUpdateType {}

impl UpdateType {
    /// Checks `text` and makes it an update type.
    pub fn parse(text: &str) -> Result<Self, InvalidUpdateType> {
        let part = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        };
        let valid = text.len() <= MAX_LEN
            && text.split_once('/').is_some_and(|(vendor, rest)| {
                rest.split_once(':').is_some_and(|(name, major)| {
                    part(vendor) && part(name) && major.parse::<u32>().is_ok()
                })
            });
        if valid {
            Ok(Self(text.to_string()))
        } else {
            Err(InvalidUpdateType(text.to_string()))
        }
    }

    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for UpdateType {
    type Error = InvalidUpdateType;

    fn try_from(text: String) -> Result<Self, Self::Error> {
        Self::parse(&text)
    }
}

impl From<UpdateType> for String {
    fn from(t: UpdateType) -> Self {
        t.0
    }
}

impl std::ops::Deref for UpdateType {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for UpdateType {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for UpdateType {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UpdateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for UpdateType {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for UpdateType {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_manifests_and_deployments() {
        for ok in [
            "otabox/apt:1",
            "microsoft/swupdate:2",
            "a.b-c_d/x.y:0",
            "v/n:4294967295",
        ] {
            assert_eq!(UpdateType::parse(ok).expect(ok).as_str(), ok);
        }
        let long = format!("{}/n:1", "v".repeat(MAX_LEN));
        for bad in [
            "",
            "Apt",
            "Otabox/apt:1",
            "otabox/APT:1",
            "otabox/apt",
            "otabox/apt:",
            "otabox/apt:x",
            "otabox/apt:-1",
            "otabox/apt:1:2",
            "otabox/a/b:1",
            "/apt:1",
            "otabox/:1",
            "otabox/apt:4294967296",
            "otabox/ap t:1",
            long.as_str(),
        ] {
            let err = UpdateType::parse(bad).expect_err(bad);
            assert!(err.to_string().contains("vendor/name:major"), "{err}");
        }
    }

    #[test]
    fn deserializing_checks_it() {
        let t: UpdateType = serde_json::from_str("\"otabox/file:1\"").expect("valid");
        assert_eq!(t, "otabox/file:1");
        let err = serde_json::from_str::<UpdateType>("\"Otabox/File:1\"").expect_err("upper");
        assert!(err.to_string().contains("lowercase"), "{err}");
        assert_eq!(
            serde_json::to_string(&t).expect("json"),
            "\"otabox/file:1\""
        );
    }
}
