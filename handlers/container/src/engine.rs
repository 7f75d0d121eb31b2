//! The container engine's CLI (docker, or podman with the same verbs),
//! through the host's process capability.

use std::collections::BTreeMap;

use otabox_sdk::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::manifest::{Config, DesiredStatus, EngineKind, ImageRef, Module};
use crate::status;

/// Most arguments the host passes to a program, and most bytes in all of
/// them (the host's process limits).
pub const MAX_ARGS: usize = 4096;
/// See [`MAX_ARGS`].
pub const MAX_ARG_BYTES: usize = 1 << 20;
/// Most env entries of a module, and most bytes in all of them: they reach
/// the engine as an env file on standard input, and the container's first
/// process through `execve`, which the kernel bounds.
pub const MAX_ENV: usize = 4096;
/// See [`MAX_ENV`].
pub const MAX_ENV_BYTES: usize = 1 << 20;
/// Most bytes of one `NAME=value` (the engines read env files by lines of
/// at most 64 KiB).
pub const MAX_ENV_ENTRY: usize = 32 << 10;
/// Most lines of a module's output kept in a failure message.
const LOG_LINES: usize = 5;
/// Most bytes of that output in the message.
const LOG_BYTES: usize = 600;

/// Label on every container this handler manages.
pub const MANAGED: &str = "otabox.managed";
/// Label holding the module's resolved spec (JSON).
pub const SPEC: &str = "otabox.spec";
/// Suffix of a replaced container kept until commit.
pub const OLD: &str = ".otabox-old";

/// A module pinned to a digest: what its container is created from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resolved {
    /// The module as the manifest gives it.
    pub module: Module,
    /// The image digest its tag resolved to.
    pub digest: String,
}

impl Resolved {
    /// `repository@digest`.
    pub fn pinned(&self) -> String {
        ImageRef::parse(&self.module.image)
            .map(|r| r.pinned(&self.digest))
            .unwrap_or_else(|_| self.module.image.clone())
    }

    /// What the container's spec label records of it.
    pub fn spec(&self) -> Spec {
        let module = serde_json::to_vec(&self.module).unwrap_or_default();
        Spec {
            image: self.module.image.clone(),
            digest: self.digest.clone(),
            module: hex(&Sha256::digest(&module)),
        }
    }
}

/// A managed container's spec label: the image as deployed, its digest and
/// a hash of the whole module (options and env), so a changed module is
/// recreated — without the env values, which must not travel as an engine
/// argument (arguments reach logs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    /// The image reference as the deployment gave it.
    pub image: String,
    /// The digest it was pinned to.
    pub digest: String,
    /// sha256 (hex) of the module's JSON.
    pub module: String,
}

impl Spec {
    /// The label's value.
    pub fn label(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Reads a label: this format, or the whole resolved module that
    /// earlier versions of the handler wrote.
    pub fn from_label(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok().or_else(|| {
            serde_json::from_str::<Resolved>(text)
                .ok()
                .map(|r| r.spec())
        })
    }

    /// How the inventory reports the version: `tag@digest` (the tag alone
    /// cannot tell which image a rolling tag runs), or the digest when the
    /// deployment gave none.
    pub fn version(&self) -> String {
        match ImageRef::parse(&self.image).ok().and_then(|r| r.tag) {
            Some(tag) => format!("{tag}@{}", self.digest),
            None => self.digest.clone(),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A container as the engine reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// Its name.
    pub name: String,
    /// `running`, `created`, `exited`, ...
    pub state: String,
    /// `healthy`, `unhealthy`, `starting`, or none without a health check.
    pub health: Option<String>,
    /// How often the engine restarted it.
    pub restarts: u64,
    /// The exit code of its last run.
    pub exit_code: i64,
    /// Whether it carries the handler's `otabox.managed=true` label.
    pub managed: bool,
    /// Its spec label, when managed.
    pub spec: Option<Spec>,
}

impl Container {
    /// Whether it was created for `want` and is in the state it asks for.
    pub fn matches(&self, want: &Resolved) -> bool {
        self.spec.as_ref() == Some(&want.spec())
            && match want.module.status {
                DesiredStatus::Running => self.state == "running",
                DesiredStatus::Stopped => self.state != "running",
            }
    }
}

#[derive(Deserialize)]
struct Inspect {
    #[serde(rename = "Name")]
    name: String,
    #[serde(rename = "State")]
    state: InspectState,
    #[serde(rename = "RestartCount", default)]
    restart_count: u64,
    #[serde(rename = "Config")]
    config: InspectConfig,
}

#[derive(Deserialize)]
struct InspectState {
    #[serde(rename = "Status")]
    status: String,
    #[serde(rename = "Health", default)]
    health: Option<InspectHealth>,
    #[serde(rename = "ExitCode", default)]
    exit_code: i64,
}

#[derive(Deserialize)]
struct InspectHealth {
    #[serde(rename = "Status")]
    status: String,
}

#[derive(Deserialize)]
struct InspectConfig {
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
}

/// The engine for one configuration.
pub struct Engine<'a> {
    config: &'a Config,
}

impl<'a> Engine<'a> {
    /// The engine `config` names.
    pub fn new(config: &'a Config) -> Self {
        Self { config }
    }

    fn kind(&self) -> EngineKind {
        self.config.engine().unwrap_or(EngineKind::Docker)
    }

    /// The engine CLI with the device's global options and credentials.
    fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut cmd = Command::new(self.config.cli.clone());
        if let Some(host) = &self.config.host {
            let flag = match self.kind() {
                EngineKind::Docker => "-H",
                EngineKind::Podman => "--url",
            };
            cmd = cmd.args([flag.to_string(), host.clone()]);
        }
        cmd = cmd.args(self.config.engine_args.iter().cloned());
        self.with_credentials(cmd).args(args)
    }

    /// `cmd` with the environment variable naming the kept logins.
    fn with_credentials(&self, cmd: Command) -> Command {
        match (&self.config.credentials_dir, self.kind()) {
            (Some(dir), EngineKind::Docker) => cmd.env("DOCKER_CONFIG", dir.clone()),
            (Some(dir), EngineKind::Podman) => {
                cmd.env("REGISTRY_AUTH_FILE", format!("{dir}/auth.json"))
            }
            (None, _) => cmd,
        }
    }

    /// Podman's and skopeo's TLS options for `registry`.
    fn tls_args(&self, registry: &str) -> Vec<String> {
        let mut args = Vec::new();
        if self.kind() == EngineKind::Docker {
            return args;
        }
        if self.config.is_insecure(registry) {
            args.push("--tls-verify=false".to_string());
        }
        if let Some(dir) = self
            .config
            .registries
            .get(registry)
            .and_then(|r| r.cert_dir.as_ref())
        {
            args.extend(["--cert-dir".to_string(), dir.clone()]);
        }
        args
    }

    /// Runs the CLI; a failure carries the engine's message.
    fn run<I, S>(&self, args: I, what: &str, code: u32) -> Result<String, Status>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let out = self
            .command(args)
            .run()
            .map_err(|e| Status::new(code, format!("cannot {what}: {e}")))?;
        if out.success() {
            return Ok(out.stdout());
        }
        Err(engine_failure(code, what, &out))
    }

    /// Logs in to every configured registry (the password on stdin).
    pub fn login_all(&self) -> Result<(), Status> {
        for (registry, settings) in &self.config.registries {
            let Some((username, password)) = settings.login() else {
                continue;
            };
            let mut args = vec!["login".to_string()];
            args.extend(self.tls_args(registry));
            args.extend([
                "--username".to_string(),
                username.to_string(),
                "--password-stdin".to_string(),
                registry.clone(),
            ]);
            let out = self
                .command(args)
                .stdin(password.as_bytes().to_vec())
                .run()
                .map_err(|e| {
                    Status::new(
                        status::LOGIN_FAILED,
                        format!("cannot log in to {registry}: {e}"),
                    )
                })?;
            if !out.success() {
                let said = out.stderr().replace(password, "<redacted>");
                return Err(Status::new(
                    status::LOGIN_FAILED,
                    format!(
                        "{registry} refused the login of {username}: {}",
                        said.trim()
                    ),
                )
                .extended(Facility::ContainerEngine, 1, 0));
            }
        }
        Ok(())
    }

    /// The digest `image`'s tag points at in its registry (no pull).
    pub fn resolve(&self, image: &ImageRef, text: &str) -> Result<String, Status> {
        if let Some(d) = &image.digest {
            return Ok(d.clone());
        }
        let what = format!("find {text} in its registry");
        match self.kind() {
            EngineKind::Docker => {
                let mut args = vec!["manifest".to_string(), "inspect".into(), "-v".into()];
                if self.config.is_insecure(image.registry()) {
                    args.push("--insecure".into());
                }
                args.push(text.to_string());
                let out = self.run(args, &what, status::UNKNOWN_IMAGE)?;
                digest_of(&out, &self.config.architecture).ok_or_else(|| {
                    Status::new(
                        status::UNKNOWN_IMAGE,
                        format!("the registry's answer for {text} holds no linux digest"),
                    )
                })
            }
            EngineKind::Podman => self.resolve_with_skopeo(image, text, &what),
        }
    }

    /// `skopeo inspect`: the digest of the tag's manifest (or list).
    fn resolve_with_skopeo(
        &self,
        image: &ImageRef,
        text: &str,
        what: &str,
    ) -> Result<String, Status> {
        let mut args = vec![
            "inspect".to_string(),
            "--no-tags".into(),
            "--format".into(),
            "{{.Digest}}".into(),
        ];
        args.extend(self.tls_args(image.registry()));
        args.push(format!("docker://{text}"));
        let out = self
            .with_credentials(Command::new(self.config.resolver.clone()).args(args))
            .run()
            .map_err(|e| Status::new(status::UNKNOWN_IMAGE, format!("cannot {what}: {e}")))?;
        let digest = out.stdout().trim().to_string();
        if out.success() && digest.starts_with("sha256:") {
            return Ok(digest);
        }
        Err(Status::new(
            status::UNKNOWN_IMAGE,
            format!("cannot {what}: {}", skopeo_message(&out.stderr())),
        )
        .extended(Facility::ContainerEngine, 2, 0))
    }

    /// Whether the engine has the image `pinned`.
    pub fn has_image(&self, pinned: &str) -> bool {
        self.command(["image", "inspect", "--format", "{{.Id}}", pinned])
            .run()
            .is_ok_and(|o| o.success())
    }

    /// Pulls the image `want` is pinned to.
    pub fn pull(&self, want: &Resolved) -> Result<(), Status> {
        let pinned = want.pinned();
        let mut args = vec!["pull".to_string(), "-q".into()];
        if let Ok(image) = ImageRef::parse(&want.module.image) {
            args.extend(self.tls_args(image.registry()));
        }
        args.push(pinned.clone());
        self.run(args, &format!("pull {pinned}"), status::PULL_FAILED)
            .map(|_| ())
    }

    /// Every container this handler manages (replaced ones included).
    pub fn managed(&self) -> Result<Vec<Container>, Status> {
        self.names(true)?
            .iter()
            .filter_map(|n| self.inspect(n).transpose())
            .collect()
    }

    /// The names of every container, or of the managed ones only.
    fn names(&self, managed_only: bool) -> Result<Vec<String>, Status> {
        let mut args = vec!["ps".to_string(), "-a".into()];
        if managed_only {
            args.extend(["--filter".to_string(), format!("label={MANAGED}=true")]);
        }
        args.extend(["--format".to_string(), "{{.Names}}".into()]);
        let names = self.run(args, "list containers", status::ENGINE)?;
        Ok(names
            .lines()
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .map(str::to_string)
            .collect())
    }

    /// The names of the containers this handler does not manage.
    pub fn unmanaged_names(&self) -> Result<Vec<String>, Status> {
        let managed = self.names(true)?;
        Ok(self
            .names(false)?
            .into_iter()
            .filter(|n| !managed.contains(n))
            .collect())
    }

    /// The container `name`, if it exists.
    pub fn inspect(&self, name: &str) -> Result<Option<Container>, Status> {
        let out = self
            .command(["container", "inspect", "--format", "{{json .}}", name])
            .run()
            .map_err(|e| Status::new(status::ENGINE, format!("cannot inspect {name}: {e}")))?;
        if !out.success() {
            return Ok(None);
        }
        let raw = parse_inspect(&out.stdout())
            .map_err(|e| Status::new(status::ENGINE, format!("inspect {name}: {e}")))?;
        let labels = raw.config.labels.unwrap_or_default();
        Ok(Some(Container {
            name: raw.name.trim_start_matches('/').to_string(),
            state: raw.state.status,
            health: raw.state.health.map(|h| h.status).filter(|h| !h.is_empty()),
            restarts: raw.restart_count,
            exit_code: raw.state.exit_code,
            managed: labels.get(MANAGED).is_some_and(|v| v == "true"),
            spec: labels.get(SPEC).and_then(|s| Spec::from_label(s)),
        }))
    }

    /// Creates (does not start) the container of module `name`; its env
    /// goes to the engine as an env file on standard input, never as an
    /// argument.
    pub fn create(&self, name: &str, want: &Resolved) -> Result<(), Status> {
        let what = format!("create {name}");
        let mut cmd = self.command(create_args(name, want));
        if let Some(file) = env_file(&want.module) {
            cmd = cmd.stdin(file.into_bytes());
        }
        let out = cmd
            .run()
            .map_err(|e| Status::new(status::CREATE_FAILED, format!("cannot {what}: {e}")))?;
        if out.success() {
            return Ok(());
        }
        Err(engine_failure(status::CREATE_FAILED, &what, &out))
    }

    /// Starts `name`.
    pub fn start(&self, name: &str) -> Result<(), Status> {
        self.run(
            ["start", name],
            &format!("start {name}"),
            status::START_FAILED,
        )
        .map(|_| ())
    }

    /// Stops `name` (no error when it is not running).
    pub fn stop(&self, name: &str) -> Result<(), Status> {
        self.run(
            ["stop", "-t", "10", name],
            &format!("stop {name}"),
            status::ENGINE,
        )
        .map(|_| ())
    }

    /// Removes `name` (no error when it does not exist).
    pub fn remove(&self, name: &str) -> Result<(), Status> {
        if self.inspect(name)?.is_none() {
            return Ok(());
        }
        self.run(
            ["rm", "-f", name],
            &format!("remove {name}"),
            status::ENGINE,
        )
        .map(|_| ())
    }

    /// Renames `from` to `to`.
    pub fn rename(&self, from: &str, to: &str) -> Result<(), Status> {
        self.run(
            ["rename", from, to],
            &format!("rename {from}"),
            status::ENGINE,
        )
        .map(|_| ())
    }

    /// The last lines `name` printed (standard output, then standard
    /// error), control characters escaped, at most [`LOG_BYTES`] of them.
    pub fn logs(&self, name: &str) -> String {
        let tail = LOG_LINES.to_string();
        let said = self
            .command(["logs", "--tail", tail.as_str(), name])
            .run()
            .map(|o| format!("{}\n{}", o.stdout(), o.stderr()))
            .unwrap_or_default();
        last_lines(&said)
    }
}

/// A failed engine run: the engine's message, facility 5, its exit code.
fn engine_failure(code: u32, what: &str, out: &otabox_sdk::Output) -> Status {
    out.failure(
        code,
        format!("cannot {what}: {}", out.stderr().trim()),
        Facility::ContainerEngine,
        0,
    )
}

/// The last [`LOG_LINES`] non-empty lines of `text` joined with ` | `,
/// control characters escaped, cut to the last [`LOG_BYTES`] bytes.
fn last_lines(text: &str) -> String {
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.trim().escape_debug().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    let joined = lines[lines.len().saturating_sub(LOG_LINES)..].join(" | ");
    match joined.char_indices().rev().nth(LOG_BYTES) {
        Some((cut, _)) => format!("…{}", &joined[cut..]),
        None => joined,
    }
}

/// One container from `container inspect --format '{{json .}}'`: docker
/// prints the object, podman a list of one.
fn parse_inspect(out: &str) -> Result<Inspect, serde_json::Error> {
    let value: serde_json::Value = serde_json::from_str(out.trim())?;
    match value {
        serde_json::Value::Array(mut items) if items.len() == 1 => {
            serde_json::from_value(items.remove(0))
        }
        other => serde_json::from_value(other),
    }
}

/// skopeo's last `msg="…"` (its fatal error), or everything it said.
fn skopeo_message(stderr: &str) -> String {
    stderr
        .lines()
        .rev()
        .find_map(|l| l.split_once("msg=\"").map(|(_, m)| m.trim_end_matches('"')))
        .map(|m| m.replace("\\\"", "\""))
        .unwrap_or_else(|| stderr.trim().to_string())
}

/// The `create` arguments for module `name`, each option as one
/// `--flag=value` argument (a value can never be read as another option).
/// The env is not among them: see [`env_file`].
pub fn create_args(name: &str, want: &Resolved) -> Vec<String> {
    let m = &want.module;
    let mut args = vec![
        "create".to_string(),
        format!("--name={name}"),
        format!("--label={MANAGED}=true"),
        format!("--label={SPEC}={}", want.spec().label()),
        format!("--restart={}", m.restart_policy.engine_name()),
    ];
    if !m.env.is_empty() {
        args.push("--env-file=/dev/stdin".into());
    }
    let o = &m.create_options;
    if let Some(h) = &o.host_config {
        args.extend(host_args(h));
    }
    if let Some(dir) = &o.working_dir {
        args.push(format!("--workdir={dir}"));
    }
    if let Some(user) = &o.user {
        args.push(format!("--user={user}"));
    }
    let mut command: Vec<String> = Vec::new();
    if let Some((program, rest)) = o.entrypoint.as_ref().and_then(|e| e.split_first()) {
        args.push(format!("--entrypoint={program}"));
        command.extend(rest.iter().cloned());
    }
    args.push(want.pinned());
    command.extend(o.cmd.iter().flatten().cloned());
    args.extend(command);
    args
}

/// The engine options of `HostConfig` (checked by [`crate::policy`]).
fn host_args(h: &crate::manifest::HostConfig) -> Vec<String> {
    let mut args = Vec::new();
    for (flag, mode) in [
        ("network", &h.network_mode),
        ("pid", &h.pid_mode),
        ("ipc", &h.ipc_mode),
    ] {
        if let Some(mode) = mode {
            args.push(format!("--{flag}={mode}"));
        }
    }
    args.extend(h.binds.iter().map(|b| format!("--volume={b}")));
    for mount in &h.mounts {
        let mut spec = format!("type={}", mount.kind);
        if let Some(source) = &mount.source {
            spec.push_str(&format!(",source={source}"));
        }
        spec.push_str(&format!(",target={}", mount.target));
        if mount.read_only {
            spec.push_str(",readonly");
        }
        args.push(format!("--mount={spec}"));
    }
    if h.privileged {
        args.push("--privileged".into());
    }
    args.extend(h.cap_add.iter().map(|c| format!("--cap-add={c}")));
    for d in &h.devices {
        let inside = d.path_in_container.as_deref().unwrap_or(&d.path_on_host);
        let permissions = d.cgroup_permissions.as_deref().unwrap_or("rwm");
        args.push(format!(
            "--device={}:{inside}:{permissions}",
            d.path_on_host
        ));
    }
    for u in &h.ulimits {
        args.push(format!("--ulimit={}={}:{}", u.name, u.soft, u.hard));
    }
    args
}

/// The module's env as an env file (`NAME=value` lines), fed to `create`
/// on standard input; none without env.
pub fn env_file(module: &Module) -> Option<String> {
    (!module.env.is_empty()).then(|| {
        module
            .env
            .iter()
            .map(|(k, v)| format!("{k}={v}\n"))
            .collect()
    })
}

/// Whether module `name`'s container can be created within the host's
/// process limits and the handler's env limits; found at validate, before
/// anything is stopped.
pub fn check_limits(name: &str, want: &Resolved) -> Result<(), String> {
    let args = create_args(name, want);
    let arg_bytes: usize = args.iter().map(String::len).sum();
    // The engine's global options and credentials come on top.
    if args.len() + 16 > MAX_ARGS || arg_bytes + 4096 > MAX_ARG_BYTES {
        return Err(format!(
            "its create command has {} arguments of {arg_bytes} bytes; the host runs at most \
             {MAX_ARGS} arguments of {MAX_ARG_BYTES} bytes",
            args.len()
        ));
    }
    let env = &want.module.env;
    let env_bytes: usize = env.iter().map(|(k, v)| k.len() + v.len() + 1).sum();
    if env.len() > MAX_ENV || env_bytes > MAX_ENV_BYTES {
        return Err(format!(
            "it has {} env entries of {env_bytes} bytes; at most {MAX_ENV} entries of \
             {MAX_ENV_BYTES} bytes are allowed",
            env.len()
        ));
    }
    if let Some((key, value)) = env
        .iter()
        .find(|(k, v)| k.len() + v.len() + 1 > MAX_ENV_ENTRY)
    {
        return Err(format!(
            "env {key} is {} bytes; one entry may have at most {MAX_ENV_ENTRY}",
            key.len() + value.len() + 1
        ));
    }
    Ok(())
}

/// The digest in `manifest inspect -v` output: one descriptor, or the
/// linux/`arch` one of a list.
fn digest_of(json: &str, arch: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(json).ok()?;
    let pick = |v: &serde_json::Value| {
        v.pointer("/Descriptor/digest")
            .and_then(|d| d.as_str())
            .map(str::to_string)
    };
    match &value {
        serde_json::Value::Array(items) => items
            .iter()
            .find(|i| {
                i.pointer("/Descriptor/platform/os")
                    .and_then(|o| o.as_str())
                    == Some("linux")
                    && i.pointer("/Descriptor/platform/architecture")
                        .and_then(|a| a.as_str())
                        == Some(arch)
            })
            .or_else(|| items.first())
            .and_then(pick),
        other => pick(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::Deployment;

    fn resolved(json: &str, module: &str) -> Resolved {
        let d = Deployment::parse(json).expect("valid");
        Resolved {
            module: d.modules[module].clone(),
            digest: format!("sha256:{}", "b".repeat(64)),
        }
    }

    #[test]
    fn create_arguments_pin_the_digest_and_label_the_spec_without_env_values() {
        let want = resolved(
            r#"{"name":"rt","version":"1","modules":{"temp":{"image":"r/temp:1.0","env":{"A":"1","TOKEN":"s3cret"},
                "restartPolicy":"on-failure",
                "createOptions":{"Entrypoint":["/bin/sh","-c"],"Cmd":["sleep 9"],"HostConfig":{"NetworkMode":"none"}}}}}"#,
            "temp",
        );
        let args = create_args("temp", &want);
        let joined = args.join(" ");
        for part in [
            "create --name=temp --label=otabox.managed=true",
            "--restart=on-failure --env-file=/dev/stdin --network=none --entrypoint=/bin/sh",
            &format!("r/temp@sha256:{} -c sleep 9", "b".repeat(64)),
        ] {
            assert!(joined.contains(part), "{part:?} in {joined}");
        }
        assert!(!joined.contains("s3cret"), "{joined}");
        assert_eq!(
            env_file(&want.module).as_deref(),
            Some("A=1\nTOKEN=s3cret\n")
        );
        let label = args
            .iter()
            .find_map(|a| a.strip_prefix("--label=otabox.spec="))
            .expect("spec label");
        let spec = Spec::from_label(label).expect("label reads back");
        assert_eq!(spec, want.spec());
        assert_eq!(spec.version(), format!("1.0@sha256:{}", "b".repeat(64)));
    }

    #[test]
    fn a_changed_env_value_changes_the_spec_and_old_labels_still_read() {
        let json = |v: &str| {
            format!(
                r#"{{"name":"rt","version":"1","modules":{{"a":{{"image":"r/a:1","env":{{"K":"{v}"}}}}}}}}"#
            )
        };
        let (one, two) = (resolved(&json("1"), "a"), resolved(&json("2"), "a"));
        assert_ne!(one.spec(), two.spec());
        let legacy = serde_json::to_string(&one).expect("legacy label");
        assert_eq!(Spec::from_label(&legacy), Some(one.spec()));
        assert_eq!(Spec::from_label("{oops"), None);
    }

    #[test]
    fn host_options_become_single_arguments() {
        let want = resolved(
            r#"{"name":"rt","version":"1","modules":{"a":{"image":"r/a:1","createOptions":{"HostConfig":{
                "Binds":["/srv/edge:/data:ro"],"Mounts":[{"Type":"tmpfs","Target":"/t","ReadOnly":true}],
                "PidMode":"host","IpcMode":"private","Privileged":true,"CapAdd":["NET_ADMIN"],
                "Devices":[{"PathOnHost":"/dev/ttyUSB0","PathInContainer":"/dev/tty0"}]}}}}}"#,
            "a",
        );
        let args = create_args("a", &want);
        for part in [
            "--volume=/srv/edge:/data:ro",
            "--mount=type=tmpfs,target=/t,readonly",
            "--pid=host",
            "--ipc=private",
            "--privileged",
            "--cap-add=NET_ADMIN",
            "--device=/dev/ttyUSB0:/dev/tty0:rwm",
        ] {
            assert!(args.iter().any(|a| a == part), "{part:?} in {args:?}");
        }
    }

    #[test]
    fn limits_are_known_before_the_engine_runs() {
        let with_env = |n: usize, len: usize| {
            let env: serde_json::Map<String, serde_json::Value> = (0..n)
                .map(|i| (format!("V{i}"), serde_json::Value::String("x".repeat(len))))
                .collect();
            let json = serde_json::json!({"name": "rt", "version": "1",
                "modules": {"a": {"image": "r/a:1", "env": env}}});
            resolved(&json.to_string(), "a")
        };
        check_limits("a", &with_env(100, 10)).expect("small");
        let err = check_limits("a", &with_env(10_000, 1)).expect_err("many");
        assert!(err.contains("10000 env entries"), "{err}");
        let err = check_limits("a", &with_env(1, 40_000)).expect_err("long");
        assert!(err.contains("env V0 is 40003 bytes"), "{err}");
        let cmd: Vec<String> = (0..5000).map(|i| i.to_string()).collect();
        let json = serde_json::json!({"name": "rt", "version": "1",
            "modules": {"a": {"image": "r/a:1", "createOptions": {"Cmd": cmd}}}});
        let err = check_limits("a", &resolved(&json.to_string(), "a")).expect_err("args");
        assert!(
            err.contains("the host runs at most 4096 arguments"),
            "{err}"
        );
    }

    #[test]
    fn the_last_lines_are_escaped_and_bounded() {
        assert_eq!(last_lines("a\n\nb\x1b[31m\n"), "a | b\\u{1b}[31m");
        assert_eq!(last_lines("\n"), "");
        let many: String = (0..9).map(|i| format!("line {i}\n")).collect();
        assert_eq!(
            last_lines(&many),
            "line 4 | line 5 | line 6 | line 7 | line 8"
        );
        let long = last_lines(&"y".repeat(5000));
        assert!(
            long.len() <= LOG_BYTES + 4 && long.starts_with('…'),
            "{}",
            long.len()
        );
    }

    #[test]
    fn inspect_output_of_docker_and_podman_reads_alike() {
        let docker = r#"{"Name":"/app","State":{"Status":"running"},"RestartCount":2,
            "Config":{"Labels":{"otabox.managed":"true"}}}"#;
        let d = parse_inspect(docker).expect("docker");
        assert_eq!((d.name.as_str(), d.restart_count), ("/app", 2));
        let podman = r#"[{"Name":"app","State":{"Status":"created","Health":{"Status":""}},
            "RestartCount":0,"Config":{"Labels":null}}]"#;
        let p = parse_inspect(podman).expect("podman");
        assert_eq!(p.state.status, "created");
        assert_eq!(p.state.health.map(|h| h.status).as_deref(), Some(""));
        assert!(parse_inspect("[]").is_err());
    }

    #[test]
    fn skopeo_errors_keep_only_its_message() {
        let said = "time=\"2026-11-23T19:14:05Z\" level=fatal msg=\"Error parsing image name \\\"docker://r/app:1\\\": x509: certificate signed by unknown authority\"\n";
        assert_eq!(
            skopeo_message(said),
            "Error parsing image name \"docker://r/app:1\": x509: certificate signed by unknown authority"
        );
        assert_eq!(skopeo_message("plain words\n"), "plain words");
    }

    #[test]
    fn ulimits_become_engine_options() {
        let want = resolved(
            r#"{"name":"rt","version":"1","modules":{"a":{"image":"r/a:1",
                "createOptions":{"HostConfig":{"Ulimits":[{"Name":"nofile","Soft":1024,"Hard":2048}]}}}}}"#,
            "a",
        );
        assert!(
            create_args("a", &want)
                .iter()
                .any(|a| a == "--ulimit=nofile=1024:2048")
        );
    }

    #[test]
    fn digests_come_from_a_descriptor_or_a_list() {
        let one = r#"{"Ref":"r/a:1","Descriptor":{"digest":"sha256:11","platform":{"os":"linux","architecture":"amd64"}}}"#;
        assert_eq!(digest_of(one, "amd64").as_deref(), Some("sha256:11"));
        let list = r#"[{"Descriptor":{"digest":"sha256:22","platform":{"os":"windows","architecture":"amd64"}}},
                       {"Descriptor":{"digest":"sha256:33","platform":{"os":"linux","architecture":"amd64"}}}]"#;
        assert_eq!(digest_of(list, "amd64").as_deref(), Some("sha256:33"));
        assert_eq!(
            digest_of(list, "riscv64").as_deref(),
            Some("sha256:22"),
            "the first"
        );
        assert_eq!(digest_of("no json", "amd64"), None);
    }
}
