//! Which grant each component import needs.

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
    match (package, interface) {
        (_, "otabox:handler/process") => Capability::Process,
        (_, "otabox:handler/devices") => Capability::Devices,
        ("otabox:handler", i)
            if ["types", "context", "payloads", "checkpoint"]
                .iter()
                .any(|n| i.ends_with(&format!("/{n}"))) =>
        {
            Capability::Baseline
        }
        ("wasi:io" | "wasi:clocks" | "wasi:random", _) => Capability::Baseline,
        ("wasi:cli", i) if !i.is_empty() => Capability::Baseline,
        ("wasi:filesystem", _) => Capability::Filesystem,
        ("wasi:sockets", _) => Capability::Network,
        _ => Capability::Unsupported,
    }
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
}
