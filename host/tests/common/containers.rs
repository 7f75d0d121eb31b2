//! A real container engine and registry on loopback for the container
//! handler: an isolated dockerd (its own data root, exec root, socket and
//! containerd namespace, no networking), the distribution registry
//! (`docker-registry serve`), and tiny images built from busybox.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::services::free_port;

/// An isolated dockerd.
pub struct Dockerd {
    child: Child,
    /// `unix:///…/docker.sock`.
    pub host: String,
    /// Its folder.
    pub dir: PathBuf,
}

impl Dockerd {
    /// Starts dockerd in `dir` and waits until it answers.
    pub fn start(dir: &Path) -> Self {
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
            child,
            host,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !engine.docker(&["info"]).status.success() {
            assert!(Instant::now() < deadline, "dockerd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        engine
    }

    /// Runs the docker CLI against this engine (with its own CLI config
    /// directory, never the machine's).
    pub fn docker(&self, args: &[&str]) -> std::process::Output {
        Command::new("/usr/bin/docker")
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .args(["-H", &self.host])
            .args(args)
            .output()
            .expect("docker CLI")
    }

    /// Same, asserting success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.docker(args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// The id of container `name`, if it exists.
    pub fn container_id(&self, name: &str) -> Option<String> {
        let out = self.docker(&["container", "inspect", "--format", "{{.Id}}", name]);
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

    /// Like [`Dockerd::publish`], with a health check (`test -e
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
        let out = Command::new("/usr/bin/docker")
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env("DOCKER_BUILDKIT", "0")
            .args(["-H", &self.host, "build", "-q", "-t", reference])
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

impl Dockerd {
    /// Logs the test's own CLI in to `registry`.
    pub fn login(&self, registry: &str, user: &str, password: &str) {
        let mut child = Command::new("/usr/bin/docker")
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .args([
                "-H",
                &self.host,
                "login",
                "--username",
                user,
                "--password-stdin",
                registry,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker login");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(password.as_bytes())
            .expect("password");
        assert!(child.wait().expect("wait").success(), "docker login");
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let ids = self.docker(&["ps", "-aq"]);
        for id in String::from_utf8_lossy(&ids.stdout).split_whitespace() {
            let _ = self.docker(&["rm", "-f", id]);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        Self::start_with(dir, None)
    }

    /// Same, requiring `user` / `password` (htpasswd, bcrypt).
    pub fn start_with_login(dir: &Path, user: &str, password: &str) -> Self {
        Self::start_with(dir, Some((user, password)))
    }

    fn start_with(dir: &Path, login: Option<(&str, &str)>) -> Self {
        std::fs::create_dir_all(dir).expect("registry dir");
        let port = free_port();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{}",
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
