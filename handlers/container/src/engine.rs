//! The container engine's CLI (docker, or podman with the same verbs),
//! through the host's process capability.

use std::collections::BTreeMap;

use otabox_sdk::prelude::*;
use serde::{Deserialize, Serialize};

use crate::manifest::{Config, DesiredStatus, EngineKind, ImageRef, Module};
use crate::status;

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

    /// The spec label's value.
    pub fn label(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
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
    /// Its spec label, when managed.
    pub spec: Option<Resolved>,
}

impl Container {
    /// Whether it is in the state `module` asks for.
    pub fn matches(&self, want: &Resolved) -> bool {
        self.spec.as_ref() == Some(want)
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
        Err(
            Status::new(code, format!("cannot {what}: {}", out.stderr().trim())).extended(
                Facility::ContainerEngine,
                0,
                out.code().map_or(0xF_FFFF, |c| c.unsigned_abs() & 0xF_FFFF),
            ),
        )
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
        let names = self.run(
            [
                "ps",
                "-a",
                "--filter",
                &format!("label={MANAGED}=true"),
                "--format",
                "{{.Names}}",
            ],
            "list containers",
            status::ENGINE,
        )?;
        names
            .lines()
            .filter(|n| !n.trim().is_empty())
            .filter_map(|n| self.inspect(n.trim()).transpose())
            .collect()
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
            spec: labels.get(SPEC).and_then(|s| serde_json::from_str(s).ok()),
        }))
    }

    /// Creates (does not start) the container of module `name`.
    pub fn create(&self, name: &str, want: &Resolved) -> Result<(), Status> {
        self.run(
            create_args(name, want),
            &format!("create {name}"),
            status::CREATE_FAILED,
        )
        .map(|_| ())
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

    /// The last lines `name` printed.
    pub fn logs(&self, name: &str) -> String {
        self.command(["logs", "--tail", "5", name])
            .run()
            .map(|o| format!("{}{}", o.stdout(), o.stderr()).trim().to_string())
            .unwrap_or_default()
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

/// The `create` arguments for module `name`.
pub fn create_args(name: &str, want: &Resolved) -> Vec<String> {
    let m = &want.module;
    let mut args = vec![
        "create".to_string(),
        "--name".into(),
        name.into(),
        "--label".into(),
        format!("{MANAGED}=true"),
        "--label".into(),
        format!("{SPEC}={}", want.label()),
        "--restart".into(),
        m.restart_policy.engine_name().into(),
    ];
    for (k, v) in &m.env {
        args.extend(["-e".to_string(), format!("{k}={v}")]);
    }
    let o = &m.create_options;
    if let Some(h) = &o.host_config {
        if let Some(net) = &h.network_mode {
            args.extend(["--network".to_string(), net.clone()]);
        }
        for bind in &h.binds {
            args.extend(["-v".to_string(), bind.clone()]);
        }
        for u in &h.ulimits {
            args.extend([
                "--ulimit".to_string(),
                format!("{}={}:{}", u.name, u.soft, u.hard),
            ]);
        }
    }
    if let Some(dir) = &o.working_dir {
        args.extend(["-w".to_string(), dir.clone()]);
    }
    if let Some(user) = &o.user {
        args.extend(["-u".to_string(), user.clone()]);
    }
    let mut command: Vec<String> = Vec::new();
    if let Some((program, rest)) = o.entrypoint.as_ref().and_then(|e| e.split_first()) {
        args.extend(["--entrypoint".to_string(), program.clone()]);
        command.extend(rest.iter().cloned());
    }
    args.push(want.pinned());
    command.extend(o.cmd.iter().flatten().cloned());
    args.extend(command);
    args
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

    #[test]
    fn create_arguments_pin_the_digest_and_label_the_spec() {
        let d = Deployment::parse(
            r#"{"name":"rt","version":"1","modules":{"temp":{"image":"r/temp:1.0","env":{"A":"1"},
                "restartPolicy":"on-failure",
                "createOptions":{"Entrypoint":["/bin/sh","-c"],"Cmd":["sleep 9"],"HostConfig":{"NetworkMode":"none"}}}}}"#,
        )
        .expect("valid");
        let want = Resolved {
            module: d.modules["temp"].clone(),
            digest: format!("sha256:{}", "b".repeat(64)),
        };
        let args = create_args("temp", &want).join(" ");
        for part in [
            "create --name temp --label otabox.managed=true",
            "--restart on-failure -e A=1 --network none --entrypoint /bin/sh",
            &format!("r/temp@sha256:{} -c sleep 9", "b".repeat(64)),
        ] {
            assert!(args.contains(part), "{part:?} in {args}");
        }
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
        let d = Deployment::parse(
            r#"{"name":"rt","version":"1","modules":{"a":{"image":"r/a:1",
                "createOptions":{"HostConfig":{"Ulimits":[{"Name":"nofile","Soft":1024,"Hard":2048}]}}}}}"#,
        )
        .expect("valid");
        let want = Resolved {
            module: d.modules["a"].clone(),
            digest: format!("sha256:{}", "c".repeat(64)),
        };
        assert!(
            create_args("a", &want)
                .join(" ")
                .contains("--ulimit nofile=1024:2048")
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
