//! Risks of the `[[devices]]` grants that an audit reports.

use std::path::{Path, PathBuf};

use crate::capabilities::{Access, DeviceGrant, Grants};

/// A granted device that lies inside a directory the same handler may
/// write: through that directory the handler could put a link or another
/// file in the device's place (the host refuses such a replacement, but
/// the configuration invites it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInWritablePath {
    /// The device as the handler names it.
    pub device: PathBuf,
    /// Where it is on the device.
    pub host: PathBuf,
    /// The writable directory (on the device) that holds it.
    pub writable: PathBuf,
    /// Whether the device config allows it (`devices_in_writable_paths`).
    pub allowed: bool,
}

/// Every granted device inside a read-write granted directory, compared
/// on the device's paths (resolved where they exist).
pub fn devices_in_writable_paths(
    grants: &Grants,
    device: Option<&DeviceGrant>,
) -> Vec<DeviceInWritablePath> {
    let resolved = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let allowed = |guest: &Path| {
        device.is_some_and(|d| d.devices_in_writable_paths.iter().any(|a| a == guest))
    };
    let mut found = Vec::new();
    for d in &grants.devices {
        let host = resolved(&d.host);
        let writable = grants
            .paths
            .iter()
            .filter(|p| p.access == Access::ReadWrite)
            .find(|p| host.starts_with(resolved(&p.host)) || d.host.starts_with(&p.host));
        if let Some(dir) = writable {
            found.push(DeviceInWritablePath {
                device: d.guest.clone(),
                host: d.host.clone(),
                writable: dir.host.clone(),
                allowed: allowed(&d.guest),
            });
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capabilities::HandlerManifest;

    fn grants(device: Option<&DeviceGrant>) -> Grants {
        let manifest = HandlerManifest::parse(&format!(
            "[handler]\nupdate_types=[\"a/b:1\"]\nsha256=\"{}\"\n\
             [[filesystem]]\npath=\"/srv/slots\"\naccess=\"rw\"\n\
             [[filesystem]]\npath=\"/srv/ro\"\naccess=\"ro\"\n\
             [[devices]]\npath=\"/srv/slots/a.img\"\n\
             [[devices]]\npath=\"/srv/ro/b.img\"\n\
             [[devices]]\npath=\"/dev/otabox/c\"\n",
            "a".repeat(64)
        ))
        .expect("manifest");
        Grants::narrow(&manifest, device).expect("narrow")
    }

    #[test]
    fn a_device_in_a_writable_directory_is_found_unless_allowed() {
        let found = devices_in_writable_paths(&grants(None), None);
        assert_eq!(
            found,
            vec![DeviceInWritablePath {
                device: "/srv/slots/a.img".into(),
                host: "/srv/slots/a.img".into(),
                writable: "/srv/slots".into(),
                allowed: false,
            }]
        );
        let device: DeviceGrant = toml::from_str(
            "devices_in_writable_paths = [\"/srv/slots/a.img\"]\n\
             [mounts]\n\"/dev/otabox\" = \"/srv/slots\"\n",
        )
        .expect("grant");
        let found = devices_in_writable_paths(&grants(Some(&device)), Some(&device));
        let summary: Vec<_> = found
            .iter()
            .map(|f| (f.device.display().to_string(), f.allowed))
            .collect();
        assert_eq!(
            summary,
            [
                ("/srv/slots/a.img".to_string(), true),
                ("/dev/otabox/c".to_string(), false)
            ],
            "a mount that places a device in a writable directory counts"
        );
    }
}
