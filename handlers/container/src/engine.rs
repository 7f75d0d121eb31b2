//! The container engine's CLI (docker, or podman with the same verbs),
//! through the host's process capability.

use std::collections::BTreeMap;

use otabox_sdk::prelude::*;
use serde::{Deserialize, Serialize};

use crate::manifest::{Config, DesiredStatus, ImageRef, Module};
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

    fn command<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut cmd = Command::new(self.config.cli.clone());
        if let Some(host) = &self.config.host {
            cmd = cmd.args(["-H".to_string(), host.clone()]);
        }
        if let Some(dir) = &self.config.credentials_dir {
            cmd = cmd.env("DOCKER_CONFIG", dir.clone());
        }
        cmd.args(args)
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
        for (registry, login) in &self.config.registries {
            let out = self
                .command([
                    "login",
                    "--username",
                    &login.username,
                    "--password-stdin",
                    registry,
                ])
                .stdin(login.password.clone().into_bytes())
                .run()
                .map_err(|e| {
                    Status::new(
                        status::LOGIN_FAILED,
                        format!("cannot log in to {registry}: {e}"),
                    )
                })?;
            if !out.success() {
                let said = out.stderr().replace(&login.password, "<redacted>");
                return Err(Status::new(
                    status::LOGIN_FAILED,
                    format!(
                        "{registry} refused the login of {}: {}",
                        login.username,
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
        let mut args = vec!["manifest".to_string(), "inspect".into(), "-v".into()];
        if self.config.is_insecure(&image.repository) {
            args.push("--insecure".into());
        }
        args.push(text.to_string());
        let out = self.run(
            args,
            &format!("find {text} in its registry"),
            status::UNKNOWN_IMAGE,
        )?;
        digest_of(&out, &self.config.architecture).ok_or_else(|| {
            Status::new(
                status::UNKNOWN_IMAGE,
                format!("the registry's answer for {text} holds no linux digest"),
            )
        })
    }

    /// Whether the engine has the image `pinned`.
    pub fn has_image(&self, pinned: &str) -> bool {
        self.command(["image", "inspect", "--format", "{{.Id}}", pinned])
            .run()
            .is_ok_and(|o| o.success())
    }

    /// Pulls `pinned`.
    pub fn pull(&self, pinned: &str) -> Result<(), Status> {
        self.run(
            ["pull", "-q", pinned],
            &format!("pull {pinned}"),
            status::PULL_FAILED,
        )
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
        let raw: Inspect = serde_json::from_str(out.stdout().trim())
            .map_err(|e| Status::new(status::ENGINE, format!("inspect {name}: {e}")))?;
        let labels = raw.config.labels.unwrap_or_default();
        Ok(Some(Container {
            name: raw.name.trim_start_matches('/').to_string(),
            state: raw.state.status,
            health: raw.state.health.map(|h| h.status),
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
