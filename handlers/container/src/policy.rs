//! What a deployment may reach on the host: the create options that give a
//! module the host (host binds, host namespaces, `Privileged`, added
//! capabilities, devices) are refused unless the device config allows them
//! by path or name ([`Allow`]). Checked at validate, before anything is
//! pulled or stopped, and again before install.

use crate::manifest::{Allow, Deployment, HostConfig, Module};

/// The first create option of `deployment` that reaches the host without
/// the device's consent, as a message naming the module and the field.
pub fn check(deployment: &Deployment, allow: &Allow) -> Result<(), String> {
    for (name, module) in deployment.all() {
        check_module(module, name, allow).map_err(|why| format!("module {name}: {why}"))?;
    }
    Ok(())
}

fn check_module(module: &Module, name: &str, allow: &Allow) -> Result<(), String> {
    let Some(h) = &module.create_options.host_config else {
        return Ok(());
    };
    for bind in &h.binds {
        check_bind(bind, allow)?;
    }
    for mount in &h.mounts {
        check_mount(mount, allow)?;
    }
    check_namespaces(h, allow)?;
    if h.privileged && !allow.privileged.iter().any(|m| m == name) {
        return Err(refused(
            "HostConfig.Privileged",
            "true",
            "gives the module every capability and device of the host",
            "privileged",
        ));
    }
    for cap in &h.cap_add {
        let wanted = capability(cap)?;
        let allowed = allow
            .capabilities
            .iter()
            .any(|a| capability(a).is_ok_and(|a| a == wanted));
        if !allowed {
            return Err(refused(
                "HostConfig.CapAdd",
                cap,
                "adds a capability",
                "capabilities",
            ));
        }
    }
    for device in &h.devices {
        check_device(device, allow)?;
    }
    Ok(())
}

/// The message of a refused option.
fn refused(field: &str, value: &str, what: &str, key: &str) -> String {
    format!(
        "{field} {value:?} {what}, which the device does not allow \
         (`allow.{key}` in the handler's device config)"
    )
}

/// `source:target[:options]`, `target` alone (an anonymous volume), or a
/// named volume: only a host path needs the device's consent, and only the
/// exact paths of `allow.binds`.
fn check_bind(bind: &str, allow: &Allow) -> Result<(), String> {
    let mut parts = bind.split(':');
    let source = parts.next().unwrap_or_default();
    let Some(target) = parts.next() else {
        return container_path("HostConfig.Binds", bind).map(|_| ());
    };
    container_path("HostConfig.Binds", target)?;
    if is_volume_name(source) {
        return Ok(());
    }
    host_path("HostConfig.Binds", bind, source, &allow.binds, "binds")
}

fn check_mount(mount: &crate::manifest::Mount, allow: &Allow) -> Result<(), String> {
    const FIELD: &str = "HostConfig.Mounts";
    container_path(FIELD, &mount.target)?;
    for text in mount.source.iter().chain([&mount.target]) {
        if text.contains([',', '"', '\n']) {
            return Err(format!(
                "{FIELD}: {text:?} may not hold `,` `\"` or a line break"
            ));
        }
    }
    match (mount.kind.as_str(), mount.source.as_deref()) {
        ("bind", Some(source)) => host_path(FIELD, source, source, &allow.binds, "binds"),
        ("bind", None) => Err(format!("{FIELD}: a bind mount needs a `Source`")),
        ("volume", None) | ("tmpfs", None) => Ok(()),
        ("volume", Some(source)) if is_volume_name(source) => Ok(()),
        ("volume", Some(source)) => Err(format!("{FIELD}: {source:?} is not a volume name")),
        ("tmpfs", Some(_)) => Err(format!("{FIELD}: a tmpfs mount has no `Source`")),
        (other, _) => Err(format!(
            "{FIELD}: type {other:?} is not supported (bind, volume or tmpfs)"
        )),
    }
}

/// A host path `path` (from `value`) is allowed when it is one of `allowed`.
fn host_path(
    field: &str,
    value: &str,
    path: &str,
    allowed: &[String],
    key: &str,
) -> Result<(), String> {
    match normal_path(path) {
        Some(p) if allowed.contains(&p) => Ok(()),
        Some(_) => Err(refused(field, value, "mounts a host path", key)),
        None => Err(format!(
            "{field} {value:?}: {path:?} is neither a volume name nor an absolute host path \
             without `..`"
        )),
    }
}

fn container_path(field: &str, path: &str) -> Result<(), String> {
    if path.starts_with('/') {
        Ok(())
    } else {
        Err(format!(
            "{field}: {path:?} is not an absolute path in the container"
        ))
    }
}

/// A volume's or network's name: `[A-Za-z0-9][A-Za-z0-9_.-]*`.
fn is_name(text: &str) -> bool {
    let mut chars = text.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
}

/// Docker's volume names: a name of at least two characters.
fn is_volume_name(text: &str) -> bool {
    text.len() >= 2 && is_name(text)
}

/// `path` without `.` components, repeated or trailing `/`; `None` when it
/// is not absolute or has a `..` component.
pub fn normal_path(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let mut parts = Vec::new();
    for part in path.split('/').filter(|p| !p.is_empty() && *p != ".") {
        if part == ".." {
            return None;
        }
        parts.push(part);
    }
    Some(format!("/{}", parts.join("/")))
}

fn check_namespaces(h: &HostConfig, allow: &Allow) -> Result<(), String> {
    let modes = [
        ("NetworkMode", "network", &h.network_mode),
        ("PidMode", "pid", &h.pid_mode),
        ("IpcMode", "ipc", &h.ipc_mode),
    ];
    for (field, kind, mode) in modes {
        let Some(mode) = mode.as_deref() else {
            continue;
        };
        let field = format!("HostConfig.{field}");
        if mode == "host" {
            if !allow.host_namespaces.iter().any(|n| n == kind) {
                let what = format!("shares the host's {kind} namespace");
                return Err(refused(&field, mode, &what, "host_namespaces"));
            }
        } else if let Some(other) = mode.strip_prefix("container:") {
            if !allow.join_containers.iter().any(|c| c == other) {
                let what = format!("joins the {kind} namespace of another container");
                return Err(refused(&field, mode, &what, "join_containers"));
            }
        } else if !plain_mode(kind, mode) {
            return Err(format!(
                "{field} {mode:?} is not supported (a network name, `host` or `container:NAME`)"
            ));
        }
    }
    Ok(())
}

/// A mode that stays inside the container: a network's name, or the pid
/// and ipc modes that create or share nothing of the host.
fn plain_mode(kind: &str, mode: &str) -> bool {
    match kind {
        "network" => is_name(mode),
        "pid" => matches!(mode, "" | "private"),
        _ => matches!(mode, "" | "private" | "shareable" | "none"),
    }
}

/// A capability's name without `CAP_`, upper case; an error for anything
/// that is not a name.
fn capability(text: &str) -> Result<String, String> {
    let upper = text.to_ascii_uppercase();
    let name = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
        return Err(format!("HostConfig.CapAdd: {text:?} is not a capability"));
    }
    Ok(name.to_string())
}

fn check_device(device: &crate::manifest::DeviceMapping, allow: &Allow) -> Result<(), String> {
    const FIELD: &str = "HostConfig.Devices";
    let host = &device.path_on_host;
    let inside = device.path_in_container.as_deref().unwrap_or(host);
    if host.contains(':') || inside.contains(':') {
        return Err(format!("{FIELD}: {host:?} and {inside:?} may not hold `:`"));
    }
    container_path(FIELD, inside)?;
    if let Some(p) = &device.cgroup_permissions {
        let ok = !p.is_empty() && p.chars().all(|c| "rwm".contains(c));
        if !ok {
            return Err(format!(
                "{FIELD}: CgroupPermissions {p:?} is not a subset of `rwm`"
            ));
        }
    }
    host_path(FIELD, host, host, &allow.devices, "devices")
}

#[cfg(test)]
mod tests {
    use super::*;
    use otabox_sdk::FromJson;

    fn deployment(host_config: &str) -> Deployment {
        Deployment::parse(&format!(
            r#"{{"name":"rt","version":"1","modules":{{"app":{{"image":"r/a:1",
                "createOptions":{{"HostConfig":{host_config}}}}}}}}}"#
        ))
        .expect("valid")
    }

    fn allow(json: &str) -> Allow {
        serde_json::from_str(json).expect("allow")
    }

    #[test]
    fn host_reaching_options_are_refused_by_default_naming_module_and_field() {
        let none = Allow::default();
        for (options, field) in [
            (r#"{"Binds":["/:/host"]}"#, "HostConfig.Binds \"/:/host\""),
            (r#"{"Binds":["/srv/data/../..:/host:rw"]}"#, "without `..`"),
            (r#"{"Binds":["./data:/data"]}"#, "neither a volume name"),
            (r#"{"Binds":["data:relative"]}"#, "not an absolute path"),
            (
                r#"{"Mounts":[{"Type":"bind","Source":"/etc","Target":"/x"}]}"#,
                "HostConfig.Mounts \"/etc\" mounts a host path",
            ),
            (
                r#"{"Mounts":[{"Type":"volume","Source":"v1","Target":"/x,source=/"}]}"#,
                "may not hold",
            ),
            (
                r#"{"Mounts":[{"Type":"npipe","Source":"x","Target":"/x"}]}"#,
                "not supported",
            ),
            (r#"{"NetworkMode":"host"}"#, "host's network namespace"),
            (r#"{"PidMode":"host"}"#, "host's pid namespace"),
            (r#"{"IpcMode":"host"}"#, "host's ipc namespace"),
            (r#"{"NetworkMode":"container:other"}"#, "join_containers"),
            (r#"{"NetworkMode":"ns:/proc/1/ns/net"}"#, "not supported"),
            (r#"{"PidMode":"ns:/proc/1/ns/pid"}"#, "not supported"),
            (r#"{"Privileged":true}"#, "HostConfig.Privileged"),
            (
                r#"{"CapAdd":["SYS_ADMIN"]}"#,
                "HostConfig.CapAdd \"SYS_ADMIN\"",
            ),
            (r#"{"CapAdd":["all"]}"#, "HostConfig.CapAdd \"all\""),
            (
                r#"{"Devices":[{"PathOnHost":"/dev/mem"}]}"#,
                "HostConfig.Devices \"/dev/mem\"",
            ),
        ] {
            let err = check(&deployment(options), &none).expect_err(options);
            assert!(err.starts_with("module app: "), "{options}: {err}");
            assert!(err.contains(field), "{options}: {err}");
        }
    }

    #[test]
    fn what_stays_inside_the_container_needs_no_consent() {
        for options in [
            r#"{"NetworkMode":"none"}"#,
            r#"{"NetworkMode":"edge-net"}"#,
            r#"{"Binds":["edge-data:/data:ro","/scratch"]}"#,
            r#"{"Mounts":[{"Type":"volume","Target":"/v"},{"Type":"tmpfs","Target":"/t"}]}"#,
            r#"{"IpcMode":"shareable","PidMode":"private"}"#,
        ] {
            check(&deployment(options), &Allow::default()).expect(options);
        }
    }

    #[test]
    fn the_device_allows_by_exact_path_and_name() {
        let consent = allow(
            r#"{"binds":["/srv/edge"],"devices":["/dev/ttyUSB0"],"capabilities":["CAP_NET_ADMIN"],
                "host_namespaces":["network"],"join_containers":["hub"],"privileged":["app"]}"#,
        );
        for options in [
            r#"{"Binds":["/srv/edge:/data","/srv//edge/:/again:ro"]}"#,
            r#"{"Mounts":[{"Type":"bind","Source":"/srv/edge","Target":"/d","ReadOnly":true}]}"#,
            r#"{"Devices":[{"PathOnHost":"/dev/ttyUSB0","CgroupPermissions":"rw"}]}"#,
            r#"{"CapAdd":["net_admin"],"NetworkMode":"host","Privileged":true}"#,
            r#"{"IpcMode":"container:hub"}"#,
        ] {
            check(&deployment(options), &consent).expect(options);
        }
        for options in [
            r#"{"Binds":["/srv/edge/sub:/data"]}"#,
            r#"{"Binds":["/srv:/data"]}"#,
            r#"{"PidMode":"host"}"#,
            r#"{"CapAdd":["SYS_ADMIN"]}"#,
            r#"{"Devices":[{"PathOnHost":"/dev/ttyUSB0","CgroupPermissions":"rwx"}]}"#,
        ] {
            check(&deployment(options), &consent).expect_err(options);
        }
    }

    #[test]
    fn paths_are_normalised_or_refused() {
        assert_eq!(
            normal_path("/srv//edge/./x/").as_deref(),
            Some("/srv/edge/x")
        );
        assert_eq!(normal_path("/").as_deref(), Some("/"));
        assert_eq!(normal_path("/srv/../etc"), None);
        assert_eq!(normal_path("srv"), None);
    }
}
