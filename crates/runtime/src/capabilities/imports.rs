//! Which grant each component import needs, and the one check of a
//! component's imports against its manifest and grants, shared by loading
//! (which refuses at the first fault) and `audit` (which lists them all).

use super::{Grants, HandlerManifest};

/// The capability an imported interface belongs to.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Capability {
    /// Grants nothing: logging, progress, payloads, checkpoints, clocks,
    /// random, stdio, environment (empty), exit.
    Baseline,
    /// `wasi:filesystem`: needs declared and granted paths.
    Filesystem,
    /// `otabox:handler/process`: needs declared and granted command rules.
    Process,
    /// `wasi:sockets`: needs declared and granted network hosts.
    Network,
    /// `otabox:handler/devices`: needs declared and granted devices.
    Devices,
    /// Anything else: otabox does not provide it.
    Unsupported,
}

impl Capability {
    /// A short name for reports.
    pub fn label(self) -> &'static str {
        match self {
            Capability::Baseline => "baseline",
            Capability::Filesystem => "filesystem",
            Capability::Process => "process",
            Capability::Network => "network",
            Capability::Devices => "devices",
            Capability::Unsupported => "unsupported",
        }
    }
}

/// Classifies an import name such as `wasi:filesystem/types@0.2.4`.
pub fn classify_import(name: &str) -> Capability {
    let interface = name.split('@').next().unwrap_or(name);
    let (package, _) = interface.split_once('/').unwrap_or((interface, ""));
    if let Some(unit) = super::ALL
        .iter()
        .find(|u| u.owns_import(package, interface))
    {
        return unit.kind();
    }
    match (package, interface) {
        ("otabox:handler", i)
            if ["types", "context", "payloads", "checkpoint"]
                .iter()
                .any(|n| i.ends_with(&format!("/{n}"))) =>
        {
            Capability::Baseline
        }
        ("wasi:io" | "wasi:clocks" | "wasi:random", _) => Capability::Baseline,
        ("wasi:cli", i) if !i.is_empty() => Capability::Baseline,
        _ => Capability::Unsupported,
    }
}

/// Why an import cannot be linked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFault {
    /// otabox provides no such interface.
    Unsupported,
    /// The manifest declares nothing of its capability (and does not stub it).
    Undeclared,
    /// The device grants none of what the manifest declares for it.
    Ungranted,
}

/// One import of a component, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportCheck {
    /// Interface name, such as `wasi:filesystem/types@0.2.4`.
    pub name: String,
    /// The capability it belongs to.
    pub capability: Capability,
    /// Linked to a stub that refuses every call (`[stubs] refuse`).
    pub stubbed: bool,
    /// Why it cannot be linked; `None` when it can.
    pub fault: Option<ImportFault>,
}

/// Checks one import against what `manifest` declares and `grants` give.
pub fn check_import(name: &str, manifest: &HandlerManifest, grants: &Grants) -> ImportCheck {
    let capability = classify_import(name);
    let stubbed = manifest.stubs(capability);
    let fault = match capability {
        Capability::Baseline => None,
        Capability::Unsupported => Some(ImportFault::Unsupported),
        _ if stubbed => None,
        _ if !manifest.declares(capability) => Some(ImportFault::Undeclared),
        _ if !grants.links(capability) => Some(ImportFault::Ungranted),
        _ => None,
    };
    ImportCheck {
        name: name.to_string(),
        capability,
        stubbed,
        fault,
    }
}

/// Checks every import of a component, in order.
pub fn check_imports<'a>(
    imports: impl IntoIterator<Item = &'a str>,
    manifest: &HandlerManifest,
    grants: &Grants,
) -> Vec<ImportCheck> {
    imports
        .into_iter()
        .map(|name| check_import(name, manifest, grants))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imports_map_to_capabilities() {
        assert_eq!(
            classify_import("otabox:handler/process@1.0.0"),
            Capability::Process
        );
        assert_eq!(
            classify_import("otabox:handler/context@1.0.0"),
            Capability::Baseline
        );
        assert_eq!(
            classify_import("wasi:filesystem/preopens@0.2.4"),
            Capability::Filesystem
        );
        assert_eq!(
            classify_import("wasi:sockets/tcp@0.2.0"),
            Capability::Network
        );
        assert_eq!(
            classify_import("wasi:cli/stdout@0.2.0"),
            Capability::Baseline
        );
        assert_eq!(
            classify_import("wasi:http/outgoing-handler@0.2.0"),
            Capability::Unsupported
        );
        assert_eq!(
            classify_import("otabox:handler/secrets@1.1.0"),
            Capability::Unsupported
        );
    }

    #[test]
    fn one_check_decides_every_import() {
        let manifest = HandlerManifest::parse(&format!(
            "[handler]\nupdate_types=[\"a/b:1\"]\nsha256=\"{}\"\n\
             [[commands]]\nprogram=\"/bin/true\"\n[network]\nhosts=[\"a.example\"]\n\
             [stubs]\nrefuse=[\"devices\"]\n",
            "a".repeat(64)
        ))
        .expect("manifest");
        let device: super::super::DeviceGrant = toml::from_str("network = []\n").expect("grant");
        let grants = Grants::narrow(&manifest, Some(&device)).expect("narrow");
        let faults: Vec<_> = check_imports(
            [
                "wasi:cli/stdout@0.2.0",
                "otabox:handler/process@1.1.0",
                "wasi:sockets/tcp@0.2.0",
                "wasi:filesystem/types@0.2.0",
                "otabox:handler/devices@1.1.0",
                "wasi:http/types@0.2.0",
            ],
            &manifest,
            &grants,
        )
        .into_iter()
        .map(|c| (c.capability, c.stubbed, c.fault))
        .collect();
        assert_eq!(
            faults,
            [
                (Capability::Baseline, false, None),
                (Capability::Process, false, None),
                (Capability::Network, false, Some(ImportFault::Ungranted)),
                (Capability::Filesystem, false, Some(ImportFault::Undeclared)),
                (Capability::Devices, true, None),
                (
                    Capability::Unsupported,
                    false,
                    Some(ImportFault::Unsupported)
                ),
            ]
        );
    }
}
