//! `[handlers.NAME]` tables of the device config that name no installed
//! handler (a typo leaves the meant handler without its grants).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::capabilities::DeviceGrant;

/// A `[handlers.NAME]` table that names no handler of the directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UnknownHandler {
    /// The name the device config gives.
    pub name: String,
    /// The installed handler whose name is closest, when one is close.
    pub closest: Option<String>,
}

impl std::fmt::Display for UnknownHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device config `[handlers.{}]` names no installed handler",
            self.name
        )?;
        match &self.closest {
            Some(closest) => write!(f, " (did you mean `[handlers.{closest}]`?)"),
            None => Ok(()),
        }
    }
}

/// The `[handlers.NAME]` tables of `device` whose NAME has no manifest in
/// `manifests` (`NAME.toml` files), each with the closest installed name
/// (at most a third of its letters apart, and at least 2).
pub fn unknown_handlers(
    device: &BTreeMap<String, DeviceGrant>,
    manifests: &[PathBuf],
) -> Vec<UnknownHandler> {
    let known: Vec<String> = manifests
        .iter()
        .filter_map(|m| super::handler_name(m).ok())
        .collect();
    device
        .keys()
        .filter(|name| !known.contains(name))
        .map(|name| UnknownHandler {
            name: name.clone(),
            closest: known
                .iter()
                .map(|k| (strsim::levenshtein(name, k), k))
                .filter(|(distance, _)| *distance <= (name.chars().count() / 3).max(2))
                .min()
                .map(|(_, k)| k.clone()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_handler_names_get_the_closest_installed_one() {
        let grants: BTreeMap<String, DeviceGrant> = ["frmware", "file", "zzz", "fw"]
            .into_iter()
            .map(|n| (n.to_string(), DeviceGrant::default()))
            .collect();
        let manifests: Vec<PathBuf> = ["firmware", "file", "apt"]
            .into_iter()
            .map(|n| PathBuf::from(format!("/h/{n}.toml")))
            .collect();
        let unknown = unknown_handlers(&grants, &manifests);
        let shown: Vec<String> = unknown.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "device config `[handlers.frmware]` names no installed handler (did you mean `[handlers.firmware]`?)",
                "device config `[handlers.fw]` names no installed handler",
                "device config `[handlers.zzz]` names no installed handler",
            ]
        );
    }
}
