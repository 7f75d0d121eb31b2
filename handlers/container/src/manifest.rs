//! The deployment manifest (IoT Edge style) and the device configuration.
//!
//! ```json
//! {"name": "edge-runtime", "version": "7",
//!  "allowReleaseCandidates": false,
//!  "systemModules": {"edgeAgent": {"image": "registry.example/edge-agent:1.4"}},
//!  "modules": {
//!    "tempSensor": {"image": "registry.example/temp:1.0.7",
//!                   "env": {"INTERVAL": "5"}, "status": "running",
//!                   "restartPolicy": "always",
//!                   "createOptions": {"Cmd": ["/bin/temp", "--fast"],
//!                                     "HostConfig": {"NetworkMode": "none"}}}}}
//! ```
//! A tag such as `1.0` is rolling (re-resolved on every deployment), `1.0.7`
//! specific; a release candidate (`1.0.7-rc1`) is refused unless
//! `allowReleaseCandidates` is true. Installed criteria: `<name>-<version>`.

use std::collections::BTreeMap;

use otabox_sdk::{FromJson, from_json};
use serde::{Deserialize, Serialize};

/// Whether a module's container should run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DesiredStatus {
    /// Started and kept running.
    #[default]
    Running,
    /// Created but not started.
    Stopped,
}

/// When the engine restarts a module's container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Never.
    Never,
    /// When it exits with an error.
    OnFailure,
    /// Always.
    #[default]
    Always,
    /// Always, unless it was stopped by hand.
    UnlessStopped,
}

impl RestartPolicy {
    /// The engine's name for the policy.
    pub fn engine_name(self) -> &'static str {
        match self {
            RestartPolicy::Never => "no",
            RestartPolicy::OnFailure => "on-failure",
            RestartPolicy::Always => "always",
            RestartPolicy::UnlessStopped => "unless-stopped",
        }
    }
}

/// The supported subset of Docker's create options (its API casing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateOptions {
    /// Command and arguments.
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Entrypoint (program first).
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    /// Working directory.
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    /// User.
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Host options.
    #[serde(
        rename = "HostConfig",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub host_config: Option<HostConfig>,
}

/// The supported subset of `HostConfig`. The options that reach the host
/// (host binds, host namespaces, privileges, devices) are refused unless
/// the device config allows them ([`crate::policy`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostConfig {
    /// Bind mounts and volumes, `source:container[:options]`: a host path
    /// or a named volume as the source, or a container path alone.
    #[serde(rename = "Binds", default, skip_serializing_if = "Vec::is_empty")]
    pub binds: Vec<String>,
    /// Mounts (`bind`, `volume` or `tmpfs`).
    #[serde(rename = "Mounts", default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// Network mode (`none`, a network name, `host`, `container:NAME`).
    #[serde(
        rename = "NetworkMode",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub network_mode: Option<String>,
    /// PID namespace (`private`, `host`, `container:NAME`).
    #[serde(rename = "PidMode", default, skip_serializing_if = "Option::is_none")]
    pub pid_mode: Option<String>,
    /// IPC namespace (`private`, `shareable`, `none`, `host`,
    /// `container:NAME`).
    #[serde(rename = "IpcMode", default, skip_serializing_if = "Option::is_none")]
    pub ipc_mode: Option<String>,
    /// Every capability and every device of the host.
    #[serde(
        rename = "Privileged",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub privileged: bool,
    /// Capabilities added to the engine's default set (`NET_ADMIN`).
    #[serde(rename = "CapAdd", default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Host devices made available in the container.
    #[serde(rename = "Devices", default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<DeviceMapping>,
    /// Resource limits (`--ulimit NAME=SOFT:HARD`).
    #[serde(rename = "Ulimits", default, skip_serializing_if = "Vec::is_empty")]
    pub ulimits: Vec<Ulimit>,
}

/// One entry of `HostConfig.Mounts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// `bind`, `volume` or `tmpfs`.
    #[serde(rename = "Type")]
    pub kind: String,
    /// The host path (`bind`) or volume name (`volume`; none: anonymous).
    #[serde(rename = "Source", default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The path in the container.
    #[serde(rename = "Target")]
    pub target: String,
    /// Mounted read-only.
    #[serde(
        rename = "ReadOnly",
        default,
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub read_only: bool,
}

/// One entry of `HostConfig.Devices`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceMapping {
    /// The device on the host (`/dev/ttyUSB0`).
    #[serde(rename = "PathOnHost")]
    pub path_on_host: String,
    /// Where it appears in the container (default: the same path).
    #[serde(
        rename = "PathInContainer",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub path_in_container: Option<String>,
    /// Access, a subset of `rwm` (default `rwm`).
    #[serde(
        rename = "CgroupPermissions",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cgroup_permissions: Option<String>,
}

/// One resource limit of `HostConfig.Ulimits`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ulimit {
    /// The limit's name (`nofile`, `nproc`, ...).
    #[serde(rename = "Name")]
    pub name: String,
    /// Soft limit.
    #[serde(rename = "Soft")]
    pub soft: i64,
    /// Hard limit.
    #[serde(rename = "Hard")]
    pub hard: i64,
}

/// One module as written in the manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Module {
    /// Image reference, `registry/repo:tag` (or `@sha256:…`).
    pub image: String,
    /// Environment variables.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Running or stopped.
    #[serde(default)]
    pub status: DesiredStatus,
    /// Restart policy.
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// Create options.
    #[serde(default)]
    pub create_options: CreateOptions,
}

/// The manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Deployment {
    /// Deployment name.
    pub name: String,
    /// Deployment version.
    pub version: String,
    /// Whether release-candidate tags may be installed.
    #[serde(default)]
    pub allow_release_candidates: bool,
    /// Runtime modules, reconciled first.
    #[serde(default)]
    pub system_modules: BTreeMap<String, Module>,
    /// User modules.
    #[serde(default)]
    pub modules: BTreeMap<String, Module>,
}

impl FromJson for Deployment {
    /// Parses and checks `json`; errors name the module at fault.
    fn parse(json: &str) -> Result<Self, String> {
        let d: Self = from_json(json, "container deployment")?;
        if d.name.trim().is_empty() || d.version.trim().is_empty() {
            return Err(
                "invalid container deployment: `name` and `version` must not be empty".into(),
            );
        }
        if d.system_modules.is_empty() && d.modules.is_empty() {
            return Err("invalid container deployment: no modules".into());
        }
        for name in d.system_modules.keys() {
            if d.modules.contains_key(name) {
                return Err(format!(
                    "module {name:?}: listed as a system module and a module"
                ));
            }
        }
        for (name, module) in d.all() {
            check_module_name(name).map_err(|e| format!("module {name:?}: {e}"))?;
            check_env(&module.env).map_err(|e| format!("module {name:?}: {e}"))?;
            let image =
                ImageRef::parse(&module.image).map_err(|e| format!("module {name:?}: {e}"))?;
            if image.is_release_candidate() && !d.allow_release_candidates {
                return Err(format!(
                    "module {name:?}: {} is a release candidate; set \"allowReleaseCandidates\": true to install it",
                    module.image
                ));
            }
        }
        Ok(d)
    }
}

impl Deployment {
    /// Every module, system modules first, each group in name order.
    pub fn all(&self) -> impl Iterator<Item = (&String, &Module)> {
        self.system_modules.iter().chain(self.modules.iter())
    }

    /// `<name>-<version>`.
    pub fn installed_criteria(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }
}

fn check_module_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return Err(
            "a module name is letters, digits and `_ . -`, starting with a letter or digit".into(),
        );
    }
    Ok(())
}

/// Environment variables as the engine's env file carries them (one
/// `NAME=value` per line): names without `=`, whitespace or control
/// characters, not starting with `#`; values without line breaks or NUL.
fn check_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    for (key, value) in env {
        let bad_name = key.is_empty()
            || key.starts_with('#')
            || key
                .chars()
                .any(|c| c == '=' || c.is_whitespace() || c.is_control());
        if bad_name {
            return Err(format!(
                "env {key:?} is not a variable name (no `=`, whitespace or control characters, not starting with `#`)"
            ));
        }
        if value.contains(['\n', '\r', '\0']) {
            return Err(format!(
                "env {key}: the value holds a line break or NUL, which the engine's env file cannot carry"
            ));
        }
    }
    Ok(())
}

/// An image reference split into repository and tag or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `registry/path/repo`.
    pub repository: String,
    /// The tag, when given.
    pub tag: Option<String>,
    /// The digest, when given.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `repo[:tag][@digest]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty()
            || text.starts_with('-')
            || text.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!("{text:?} is not an image reference"));
        }
        let (name, digest) = match text.split_once('@') {
            Some((n, d)) if d.starts_with("sha256:") && d.len() == 71 => (n, Some(d.to_string())),
            Some(_) => return Err(format!("{text:?}: a digest is `sha256:` and 64 hex digits")),
            None => (text, None),
        };
        let last_slash = name.rfind('/').map_or(0, |i| i + 1);
        let (repository, tag) = match name[last_slash..].rfind(':') {
            Some(i) => (
                name[..last_slash + i].to_string(),
                Some(name[last_slash + i + 1..].to_string()),
            ),
            None => (name.to_string(), None),
        };
        if repository.is_empty() || tag.as_deref() == Some("") {
            return Err(format!("{text:?} is not an image reference"));
        }
        if tag.is_none() && digest.is_none() {
            return Err(format!(
                "{text:?} names no tag: give a tag (rolling like `1.0` or specific like `1.0.7`)"
            ));
        }
        Ok(Self {
            repository,
            tag,
            digest,
        })
    }

    /// `1.0.7-rc1`, `2.0-RC.3`: a release candidate.
    pub fn is_release_candidate(&self) -> bool {
        let Some(tag) = &self.tag else {
            return false;
        };
        let lower = tag.to_ascii_lowercase();
        lower.match_indices("-rc").any(|(i, _)| {
            lower[i + 3..]
                .chars()
                .all(|c| c.is_ascii_digit() || c == '.')
        })
    }

    /// The registry the repository lives in (`host[:port]`; Docker Hub for
    /// a bare name).
    pub fn registry(&self) -> &str {
        match self.repository.split_once('/') {
            Some((first, _))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                first
            }
            _ => "docker.io",
        }
    }

    /// The reference pinned to `digest`: `repository@digest`.
    pub fn pinned(&self, digest: &str) -> String {
        format!("{}@{digest}", self.repository)
    }
}

/// The container engine a [`Config`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// `/usr/bin/docker`, talking to dockerd.
    Docker,
    /// `/usr/bin/podman`, daemonless; tags are resolved with skopeo.
    Podman,
}

/// The device configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The engine CLI: `/usr/bin/docker` or `/usr/bin/podman`.
    pub cli: String,
    /// The engine's socket: docker's `-H`, podman's `--url`, when not the
    /// default.
    pub host: Option<String>,
    /// Global options put before every engine command, such as podman's
    /// `--root`, `--runroot` or `--runtime`.
    pub engine_args: Vec<String>,
    /// The program that resolves tags to digests with podman (docker uses
    /// `docker manifest inspect`).
    pub resolver: String,
    /// Registries reached over plain HTTP or with a certificate the engine
    /// does not check (`--insecure` for docker's manifest lookups,
    /// `--tls-verify=false` for podman and skopeo), such as a registry on
    /// loopback.
    pub insecure_registries: Vec<String>,
    /// A directory where logins to `registries` are kept: docker's
    /// `DOCKER_CONFIG`, or podman's `auth.json` (`REGISTRY_AUTH_FILE`).
    pub credentials_dir: Option<String>,
    /// Registry (`host[:port]`) → login and certificates. Passwords reach
    /// the CLI on its standard input only; they are never in arguments,
    /// logs or reports.
    pub registries: BTreeMap<String, Registry>,
    /// How long a started module may take to be running (and healthy).
    pub start_timeout_ms: u64,
    /// How long a module must then keep running, without a restart, to
    /// count as started.
    pub settle_ms: u64,
    /// The device's architecture as registries name it (`amd64`, `arm64`),
    /// to pick from multi-platform images.
    pub architecture: String,
    /// What deployments may reach on the host; nothing by default.
    pub allow: Allow,
}

/// The create options that reach the host which the device allows
/// (`[handlers.container.config.allow]`). Each is refused by default: a
/// module with a host bind, a host namespace, `Privileged`, an added
/// capability or a device controls the host as root.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Allow {
    /// Host paths a module may bind (`Binds`, `Mounts` of type `bind`),
    /// exactly: not the paths under them, where a module given one of them
    /// could plant a symlink that a later bind would follow.
    pub binds: Vec<String>,
    /// Host devices (`Devices[].PathOnHost`) a module may use.
    pub devices: Vec<String>,
    /// Capabilities `CapAdd` may name (`NET_ADMIN`, without `CAP_`).
    pub capabilities: Vec<String>,
    /// Host namespaces a module may share: `network`, `pid`, `ipc`
    /// (`NetworkMode`, `PidMode`, `IpcMode` = `host`).
    pub host_namespaces: Vec<String>,
    /// Containers whose namespaces a module may join (`container:NAME`).
    pub join_containers: Vec<String>,
    /// Modules that may run `Privileged`.
    pub privileged: Vec<String>,
}

impl Allow {
    fn check(&self) -> Result<(), String> {
        for (key, paths) in [("binds", &self.binds), ("devices", &self.devices)] {
            for path in paths {
                if crate::policy::normal_path(path).as_deref() != Some(path.as_str()) {
                    return Err(format!(
                        "allow.{key}: {path:?} must be an absolute path without `.`, `..`, `//` or a trailing `/`"
                    ));
                }
            }
        }
        if let Some(bad) = self
            .host_namespaces
            .iter()
            .find(|n| !["network", "pid", "ipc"].contains(&n.as_str()))
        {
            return Err(format!(
                "allow.host_namespaces: {bad:?} is not one of network, pid, ipc"
            ));
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cli: "/usr/bin/docker".into(),
            host: None,
            engine_args: Vec::new(),
            resolver: "/usr/bin/skopeo".into(),
            insecure_registries: Vec::new(),
            credentials_dir: None,
            registries: BTreeMap::new(),
            start_timeout_ms: 30_000,
            settle_ms: 1_000,
            architecture: "amd64".into(),
            allow: Allow::default(),
        }
    }
}

/// How to reach one registry.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Registry {
    /// User name (with `password`).
    pub username: Option<String>,
    /// Password or token (with `username`).
    pub password: Option<String>,
    /// A directory with the CA certificate (`*.crt`) that signed the
    /// registry's certificate, and a client certificate (`*.cert`, `*.key`)
    /// when the registry asks for one: podman's and skopeo's `--cert-dir`.
    /// Docker reads the same files from `/etc/docker/certs.d/<registry>/`.
    pub cert_dir: Option<String>,
}

impl Registry {
    /// The login, when one is configured.
    pub fn login(&self) -> Option<(&str, &str)> {
        Some((self.username.as_deref()?, self.password.as_deref()?))
    }
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("cert_dir", &self.cert_dir)
            .finish()
    }
}

impl FromJson for Config {
    /// Parses the configuration JSON the host passes.
    fn parse(json: &str) -> Result<Self, String> {
        let c: Self = from_json(json, "container handler config")?;
        c.check()
            .map_err(|e| format!("invalid container handler config: {e}"))?;
        Ok(c)
    }
}

impl Config {
    fn check(&self) -> Result<(), String> {
        let kind = self.engine()?;
        self.allow.check()?;
        for (name, registry) in &self.registries {
            if registry.username.is_some() != registry.password.is_some() {
                return Err(format!(
                    "registry {name}: give both `username` and `password`, or neither"
                ));
            }
            if registry.login().is_some() && self.credentials_dir.is_none() {
                return Err(format!(
                    "registry {name}: logins need a `credentials_dir` to be kept in"
                ));
            }
            if registry.cert_dir.is_some() && kind == EngineKind::Docker {
                return Err(format!(
                    "registry {name}: docker takes a registry's CA from /etc/docker/certs.d/{name}/ca.crt, not from `cert_dir` (which is for podman)"
                ));
            }
        }
        Ok(())
    }

    /// The engine `cli` names.
    pub fn engine(&self) -> Result<EngineKind, String> {
        match self.cli.as_str() {
            "/usr/bin/docker" => Ok(EngineKind::Docker),
            "/usr/bin/podman" => Ok(EngineKind::Podman),
            other => Err(format!(
                "`cli` must be /usr/bin/docker or /usr/bin/podman, found {other:?}"
            )),
        }
    }

    /// Whether `registry` (`host[:port]`) is reached without TLS checks.
    pub fn is_insecure(&self, registry: &str) -> bool {
        self.insecure_registries.iter().any(|r| r == registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_repository_tag_and_digest() {
        let r = ImageRef::parse("127.0.0.1:5000/edge/agent:1.4").expect("valid");
        assert_eq!(r.repository, "127.0.0.1:5000/edge/agent");
        assert_eq!(r.tag.as_deref(), Some("1.4"));
        let d = format!("sha256:{}", "a".repeat(64));
        let pinned = ImageRef::parse(&format!("reg/app:1.0@{d}")).expect("valid");
        assert_eq!(pinned.digest.as_deref(), Some(d.as_str()));
        assert_eq!(pinned.pinned(&d), format!("reg/app@{d}"));
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(pinned.registry(), "docker.io");
        let hub = ImageRef::parse("library/busybox:1").expect("valid");
        assert_eq!(hub.registry(), "docker.io");
        for bad in ["", "reg/app", "reg/app:", "reg/app@sha256:12", "a b:1"] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn release_candidates_are_recognised() {
        let rc = |t: &str| {
            ImageRef::parse(&format!("r/app:{t}"))
                .expect("valid")
                .is_release_candidate()
        };
        assert!(rc("1.0.7-rc1"));
        assert!(rc("2.0-RC.3"));
        assert!(rc("1.0-rc"));
        assert!(!rc("1.0.7"));
        assert!(!rc("1.0-rcfoo"));
        assert!(!rc("1.0"));
    }

    #[test]
    fn deployments_are_strict_and_refuse_unasked_release_candidates() {
        let ok = r#"{"name":"rt","version":"1","modules":{"temp":{"image":"r/temp:1.0","env":{"A":"1"},
            "createOptions":{"Cmd":["/bin/sleep","9"],"HostConfig":{"NetworkMode":"none"}}}}}"#;
        let d = Deployment::parse(ok).expect("valid");
        assert_eq!(d.installed_criteria(), "rt-1");
        assert_eq!(d.modules["temp"].restart_policy, RestartPolicy::Always);
        for (json, why) in [
            (r#"{"name":"rt","version":"1","modules":{}}"#, "no modules"),
            (
                r#"{"name":"rt","version":"1","modules":{"a":{"image":"r/a:1","ports":[]}}}"#,
                "unknown field `ports`",
            ),
            (
                r#"{"name":"rt","version":"1","modules":{"a":{"image":"r/a:1","createOptions":{"Privileged":true}}}}"#,
                "unknown field `Privileged`",
            ),
            (
                r#"{"name":"rt","version":"1","modules":{"-a":{"image":"r/a:1"}}}"#,
                "module \"-a\"",
            ),
            (
                r#"{"name":"rt","version":"1","modules":{"a":{"image":"--privileged:1"}}}"#,
                "not an image reference",
            ),
            (
                r#"{"name":"rt","version":"1","modules":{"a":{"image":"r/a:1","env":{"A=B":"1"}}}}"#,
                "not a variable name",
            ),
            (
                r#"{"name":"rt","version":"1","modules":{"a":{"image":"r/a:1","env":{"A":"1\nB=2"}}}}"#,
                "line break",
            ),
            (
                r#"{"name":"rt","version":"1","modules":{"a":{"image":"r/a"}}}"#,
                "names no tag",
            ),
            (
                r#"{"name":"rt","version":"1","modules":{"a":{"image":"r/a:1.0.7-rc1"}}}"#,
                "release candidate",
            ),
            (
                r#"{"name":"rt","version":"1","systemModules":{"a":{"image":"r/a:1"}},"modules":{"a":{"image":"r/a:1"}}}"#,
                "system module and a module",
            ),
        ] {
            let err = Deployment::parse(json).expect_err(json);
            assert!(err.contains(why), "{json}: {err}");
        }
        let asked = r#"{"name":"rt","version":"1","allowReleaseCandidates":true,"modules":{"a":{"image":"r/a:1.0.7-rc1"}}}"#;
        assert!(Deployment::parse(asked).is_ok());
    }

    #[test]
    fn configs_pick_an_engine_and_insecure_registries() {
        let c = Config::parse(
            r#"{"host":"unix:///run/d.sock","insecure_registries":["127.0.0.1:5000"]}"#,
        )
        .expect("valid");
        assert!(c.is_insecure("127.0.0.1:5000"));
        assert!(!c.is_insecure("registry.example"));
        assert!(Config::parse(r#"{"cli":"/bin/sh"}"#).is_err());
        let err = Config::parse(r#"{"registries":{"r.example":{"username":"u","password":"p"}}}"#)
            .expect_err("no credentials_dir");
        assert!(err.contains("credentials_dir"), "{err}");
        let err = Config::parse(r#"{"registries":{"r.example":{"username":"u"}}}"#)
            .expect_err("no password");
        assert!(err.contains("both"), "{err}");
        let err = Config::parse(r#"{"registries":{"r.example":{"cert_dir":"/etc/ca"}}}"#)
            .expect_err("cert_dir with docker");
        assert!(
            err.contains("/etc/docker/certs.d/r.example/ca.crt"),
            "{err}"
        );
        let c = Config::parse(
            r#"{"cli":"/usr/bin/podman","registries":{"r.example":{"cert_dir":"/etc/ca"}}}"#,
        )
        .expect("podman with a CA");
        assert_eq!(c.engine(), Ok(EngineKind::Podman));
        for (json, why) in [
            (r#"{"allow":{"binds":["data"]}}"#, "allow.binds"),
            (r#"{"allow":{"binds":["/srv/../etc"]}}"#, "allow.binds"),
            (r#"{"allow":{"devices":["/dev/tty0/"]}}"#, "allow.devices"),
            (r#"{"allow":{"host_namespaces":["uts"]}}"#, "not one of"),
            (r#"{"allow":{"everything":true}}"#, "unknown field"),
        ] {
            let err = Config::parse(json).expect_err(json);
            assert!(err.contains(why), "{json}: {err}");
        }
        let c = Config::parse(
            r#"{"credentials_dir":"/var/lib/otabox/docker","registries":{"r.example":{"username":"u","password":"hunter2"}}}"#,
        )
        .expect("valid");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("hunter2") && shown.contains("<redacted>"),
            "{shown}"
        );
    }
}
