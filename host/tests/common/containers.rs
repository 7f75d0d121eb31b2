//! A real container engine and registry on loopback for the container
//! handler: an isolated dockerd (its own data root, exec root, socket and
//! containerd namespace, no networking) or podman (its own storage, run
//! and temporary directories), the distribution registry (`docker-registry
//! serve`, over HTTP or over TLS with a certificate from a throwaway CA),
//! and tiny images built from busybox.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::pki::Pki;
use super::services::free_port;

/// Which engine an [`Engine`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// dockerd, driven by the docker CLI.
    Docker,
    /// podman, daemonless.
    Podman,
}

/// An isolated container engine.
pub struct Engine {
    kind: Kind,
    daemon: Option<Child>,
    /// Options before every CLI verb (`-H …` or podman's storage options).
    global: Vec<String>,
    /// TLS options for the test's own pushes and logins (podman).
    registry_args: Vec<String>,
    /// Its folder.
    pub dir: PathBuf,
}

impl Engine {
    /// Starts dockerd in `dir` and waits until it answers.
    pub fn dockerd(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).expect("dockerd dir");
        let host = format!("unix://{}", dir.join("docker.sock").display());
        let log = std::fs::File::create(dir.join("dockerd.log")).expect("log");
        let namespace = format!(
            "otabox-test-{}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("x")
        );
        let child = Command::new("dockerd")
            .arg(format!("--data-root={}", dir.join("data").display()))
            .arg(format!("--exec-root={}", dir.join("exec").display()))
            .arg(format!("--pidfile={}", dir.join("pid").display()))
            .args(["-H", &host])
            .args([
                "--bridge=none",
                "--iptables=false",
                "--ip6tables=false",
                "--ip-masq=false",
            ])
            .args(["--containerd-namespace", &namespace])
            .args([
                "--default-ulimit",
                "nofile=1024:1024",
                "--default-ulimit",
                "nproc=4096:4096",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("dockerd is installed (make setup)");
        let engine = Self {
            kind: Kind::Docker,
            daemon: Some(child),
            global: vec!["-H".into(), host],
            registry_args: Vec::new(),
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !engine.cli(&["info"]).status.success() {
            assert!(Instant::now() < deadline, "dockerd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        engine
    }

    /// Podman with its storage in `dir` (vfs, so nothing stays mounted);
    /// `certs` is the `--cert-dir` of the test's own pushes, if any.
    pub fn podman(dir: &Path, certs: Option<&Path>) -> Self {
        std::fs::create_dir_all(dir.join("tmp")).expect("podman dir");
        let global = [
            ("--root", dir.join("root").display().to_string()),
            ("--runroot", dir.join("run").display().to_string()),
            ("--tmpdir", dir.join("tmp").display().to_string()),
            ("--storage-driver", "vfs".into()),
            ("--runtime", "/usr/sbin/runc".into()),
            ("--cgroup-manager", "cgroupfs".into()),
            ("--events-backend", "file".into()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_string(), v])
        .collect();
        let registry_args = match certs {
            Some(d) => vec!["--cert-dir".into(), d.display().to_string()],
            None => vec!["--tls-verify=false".into()],
        };
        Self {
            kind: Kind::Podman,
            daemon: None,
            global,
            registry_args,
            dir: dir.to_path_buf(),
        }
    }

    /// The handler's device config naming this engine.
    pub fn handler_config(&self) -> Value {
        match self.kind {
            Kind::Docker => json!({"host": self.global[1]}),
            Kind::Podman => json!({"cli": "/usr/bin/podman", "engine_args": self.global}),
        }
    }

    /// Create options every module needs on this machine: podman has no
    /// daemon-wide default limits, and the sandbox refuses the engine's own.
    pub fn host_config(&self) -> Value {
        match self.kind {
            Kind::Docker => json!({"NetworkMode": "none"}),
            Kind::Podman => json!({"NetworkMode": "none", "Ulimits": [
                {"Name": "nofile", "Soft": 1024, "Hard": 1024},
                {"Name": "nproc", "Soft": 4096, "Hard": 4096}]}),
        }
    }

    /// The engine's CLI with its global options and the test's own
    /// credentials (never the machine's).
    fn command(&self) -> Command {
        let mut cmd = match self.kind {
            Kind::Docker => {
                let mut c = Command::new("/usr/bin/docker");
                c.env("DOCKER_CONFIG", self.dir.join("cli"));
                c
            }
            Kind::Podman => {
                let mut c = Command::new("/usr/bin/podman");
                c.env("REGISTRY_AUTH_FILE", self.dir.join("cli-auth.json"));
                c
            }
        };
        cmd.args(&self.global);
        cmd
    }

    /// Runs the engine's CLI.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.command().args(args).output().expect("engine CLI")
    }

    /// Same, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{:?} {args:?}: {}",
            self.kind,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs a container the handler does not manage; returns its id.
    pub fn run_unmanaged(&self, name: &str, image: &str) -> String {
        let mut args = vec!["run", "-d", "--network", "none", "--name", name];
        if self.kind == Kind::Podman {
            args.extend([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=4096:4096",
            ]);
        }
        args.push(image);
        self.ok(&args);
        self.container_id(name).expect("the container just run")
    }

    /// The id of container `name`, if it exists.
    pub fn container_id(&self, name: &str) -> Option<String> {
        let out = self.cli(&["container", "inspect", "--format", "{{.Id}}", name]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// `state` of container `name`.
    pub fn state(&self, name: &str) -> String {
        self.ok(&[
            "container",
            "inspect",
            "--format",
            "{{.State.Status}}",
            name,
        ])
    }

    /// The image digest a container was created from (its spec label).
    pub fn digest_of(&self, name: &str) -> String {
        let label = self.ok(&[
            "container",
            "inspect",
            "--format",
            "{{index .Config.Labels \"otabox.spec\"}}",
            name,
        ]);
        let spec: serde_json::Value = serde_json::from_str(&label).expect("spec label");
        spec["digest"].as_str().unwrap_or_default().to_string()
    }

    /// Builds a busybox image whose `/version` says `version` and whose
    /// command is `cmd`, tags it `reference` and pushes it; returns the
    /// pushed digest.
    pub fn publish(&self, reference: &str, version: &str, cmd: &str) -> String {
        self.import(reference, version, cmd);
        self.push(reference)
    }

    /// Like [`Engine::publish`] (docker only), with a health check (`test -e
    /// /tmp/ready`, every second) on an image whose command creates that
    /// file after two seconds — or never, when `healthy` is false.
    pub fn publish_with_health(&self, reference: &str, version: &str, healthy: bool) -> String {
        let base = format!("{reference}-base");
        self.import(&base, version, r#"["/bin/sleep","3600"]"#);
        let context = self
            .dir
            .join(format!("ctx-{}", version.replace(['/', ' '], "_")));
        std::fs::create_dir_all(&context).expect("build context");
        let start = if healthy {
            "sleep 2; touch /tmp/ready; sleep 3600"
        } else {
            "sleep 3600"
        };
        std::fs::write(
            context.join("Dockerfile"),
            format!(
                "FROM {base}\nHEALTHCHECK --interval=1s --timeout=1s --retries=2 CMD [\"/bin/test\",\"-e\",\"/tmp/ready\"]\n\
                 CMD [\"/bin/sh\",\"-c\",\"{start}\"]\n"
            ),
        )
        .expect("Dockerfile");
        assert_eq!(self.kind, Kind::Docker, "images with health checks");
        let out = self
            .command()
            .env("DOCKER_BUILDKIT", "0")
            .args(["build", "-q", "-t", reference])
            .arg(&context)
            .output()
            .expect("docker build");
        assert!(
            out.status.success(),
            "docker build: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.push(reference)
    }

    fn import(&self, reference: &str, version: &str, cmd: &str) {
        let root = self
            .dir
            .join(format!("rootfs-{}", version.replace('/', "_")));
        std::fs::create_dir_all(root.join("bin")).expect("rootfs");
        std::fs::copy("/usr/bin/busybox", root.join("bin/busybox"))
            .expect("busybox-static (make setup)");
        for tool in ["sh", "sleep", "cat", "false", "true", "test", "touch"] {
            let link = root.join("bin").join(tool);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", &link).expect("symlink");
            }
        }
        std::fs::create_dir_all(root.join("tmp")).expect("tmp");
        std::fs::write(root.join("version"), format!("{version}\n")).expect("version");
        let tar = self.dir.join(format!("{}.tar", version.replace('/', "_")));
        let status = Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()
            .expect("tar");
        assert!(status.success());
        self.ok(&[
            "import",
            "-c",
            &format!("CMD {cmd}"),
            &tar.display().to_string(),
            reference,
        ]);
    }

    /// Pushes `reference`; returns the digest the registry stored.
    fn push(&self, reference: &str) -> String {
        if self.kind == Kind::Podman {
            let file = self.dir.join("pushed-digest");
            let file_arg = file.display().to_string();
            let mut args = vec!["push", "-q", "--digestfile", &file_arg];
            args.extend(self.registry_args.iter().map(String::as_str));
            args.push(reference);
            self.ok(&args);
            return std::fs::read_to_string(&file).expect("digest file");
        }
        self.ok(&["push", "-q", reference]);
        let digests = self.ok(&[
            "image",
            "inspect",
            "--format",
            "{{json .RepoDigests}}",
            reference,
        ]);
        let list: Vec<String> = serde_json::from_str(&digests).expect("digests");
        let repo = reference.rsplit_once(':').map_or(reference, |(r, _)| r);
        list.iter()
            .find(|d| d.starts_with(&format!("{repo}@")))
            .and_then(|d| d.split_once('@'))
            .map(|(_, d)| d.to_string())
            .expect("a repo digest after the push")
    }
}

impl Engine {
    /// Logs the test's own CLI in to `registry`.
    pub fn login(&self, registry: &str, user: &str, password: &str) {
        let mut args = vec!["login"];
        args.extend(self.registry_args.iter().map(String::as_str));
        args.extend(["--username", user, "--password-stdin", registry]);
        let mut child = self
            .command()
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("engine login");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(password.as_bytes())
            .expect("password");
        assert!(child.wait().expect("wait").success(), "engine login");
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let ids = self.cli(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.cli(&["rm", "-f", id]);
        }
        let Some(child) = self.daemon.as_mut() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The distribution registry on a free loopback port.
pub struct Registry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub address: String,
}

impl Registry {
    /// Starts the registry with filesystem storage in `dir`.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, None, None)
    }

    /// Same, requiring `user` / `password` (htpasswd, bcrypt).
    pub fn start_with_login(dir: &Path, user: &str, password: &str) -> Self {
        Self::start_with(dir, Some((user, password)), None)
    }

    /// Starts the registry, with a login when `login` is given, and over
    /// TLS with `pki`'s server certificate when that is given.
    pub fn start_with(dir: &Path, login: Option<(&str, &str)>, pki: Option<&Pki>) -> Self {
        std::fs::create_dir_all(dir).expect("registry dir");
        let port = free_port();
        let config = dir.join("config.yml");
        let tls = pki.map_or(String::new(), |p| {
            format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                p.dir.join("server.pem").display(),
                p.dir.join("server.key").display()
            )
        });
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls}{}",
                dir.join("data").display(),
                login.map_or(String::new(), |(user, password)| {
                    let out = Command::new("htpasswd")
                        .args(["-Bbn", user, password])
                        .output()
                        .expect("htpasswd is installed (make setup)");
                    std::fs::write(dir.join("htpasswd"), out.stdout).expect("htpasswd file");
                    format!(
                        "auth:\n  htpasswd:\n    realm: otabox-test\n    path: {}\n",
                        dir.join("htpasswd").display()
                    )
                })
            ),
        )
        .expect("registry config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry is installed (make setup)");
        let address = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(&address).is_err() {
            assert!(Instant::now() < deadline, "the registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, address }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
