//! A real apt repository and a scratch root for the apt handler: `.deb`
//! packages built with dpkg-deb, indexes made by apt-ftparchive, signed
//! with a throwaway gpg key, served by nginx on loopback; a sysroot with
//! its own dpkg database, apt state and apt.conf, so the machine's own
//! packages are never touched.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use otabox::capabilities::DeviceGrant;
use otabox::runtime::{Handler, Runtime};

use super::services::Nginx;

/// Where the handler keeps its record, inside the sandbox.
pub const APT_STATE: &str = "/var/lib/otabox/apt";

/// A package to build.
#[derive(Debug, Clone)]
pub struct Deb {
    name: String,
    version: String,
    depends: Option<String>,
    postinst_exit: Option<i32>,
    files: Vec<(String, String, u32)>,
}

/// A package `name` at `version` holding `/usr/share/<name>/version`.
pub fn deb(name: &str, version: &str) -> Deb {
    Deb {
        name: name.into(),
        version: version.into(),
        depends: None,
        postinst_exit: None,
        files: vec![(
            format!("usr/share/{name}/version"),
            format!("{name} {version}\n"),
            0o644,
        )],
    }
}

impl Deb {
    /// Adds a `Depends:` field.
    pub fn depends(mut self, relation: &str) -> Self {
        self.depends = Some(relation.into());
        self
    }

    /// A postinst that exits with `code`.
    pub fn postinst_exits(mut self, code: i32) -> Self {
        self.postinst_exit = Some(code);
        self
    }

    /// Adds a file (path relative to the root) with `mode`.
    pub fn file(mut self, path: &str, content: &str, mode: u32) -> Self {
        self.files.push((path.into(), content.into(), mode));
        self
    }

    fn build(&self, work: &Path, out: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let tree = work.join(format!("{}_{}", self.name, self.version));
        let _ = std::fs::remove_dir_all(&tree);
        std::fs::create_dir_all(tree.join("DEBIAN")).expect("DEBIAN");
        let mut control = format!(
            "Package: {}\nVersion: {}\nArchitecture: all\nMaintainer: otabox tests <tests@example.invalid>\nDescription: otabox test package {}\n",
            self.name, self.version, self.name
        );
        if let Some(d) = &self.depends {
            control.push_str(&format!("Depends: {d}\n"));
        }
        std::fs::write(tree.join("DEBIAN/control"), control).expect("control");
        if let Some(code) = self.postinst_exit {
            let script = tree.join("DEBIAN/postinst");
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\necho \"postinst of {} exits {code}\" >&2\nexit {code}\n",
                    self.name
                ),
            )
            .expect("postinst");
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        for (path, content, mode) in &self.files {
            let file = tree.join(path);
            std::fs::create_dir_all(file.parent().expect("parent")).expect("dirs");
            std::fs::write(&file, content).expect("file");
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode)).expect("chmod");
        }
        run(Command::new("dpkg-deb")
            .args(["--root-owner-group", "--build"])
            .arg(&tree)
            .arg(out));
    }
}

/// A signed flat repository served over HTTP.
pub struct AptRepo {
    dir: PathBuf,
    gnupg: PathBuf,
    /// The public key, for `signed-by`.
    pub keyring: PathBuf,
    /// The server; its `www` holds the repository.
    pub nginx: Nginx,
}

impl AptRepo {
    /// A repository in `dir/repo` with a fresh key, served by nginx.
    pub fn start(dir: &Path) -> Self {
        let dir = dir.join("repo");
        let gnupg = dir.join("gnupg");
        std::fs::create_dir_all(&gnupg).expect("gnupg dir");
        std::fs::create_dir_all(dir.join("build")).expect("build dir");
        let nginx = Nginx::start(&dir.join("http"));
        let repo = Self {
            keyring: dir.join("key.gpg"),
            dir,
            gnupg,
            nginx,
        };
        repo.gpg(&[
            "--passphrase",
            "",
            "--quick-gen-key",
            "otabox test repository <repo@example.invalid>",
            "ed25519",
            "sign",
            "never",
        ]);
        let key = repo.gpg(&["--export"]);
        std::fs::write(&repo.keyring, key).expect("keyring");
        repo
    }

    fn gpg(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("gpg")
            .env("GNUPGHOME", &self.gnupg)
            .args(["--batch", "--yes", "--quiet", "--pinentry-mode", "loopback"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("gpg is installed (make setup)");
        assert!(
            out.status.success(),
            "gpg {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Builds `packages` into the repository (call [`publish`] after).
    ///
    /// [`publish`]: AptRepo::publish
    pub fn add(&self, packages: &[Deb]) {
        for p in packages {
            p.build(&self.dir.join("build"), &self.nginx.www);
        }
    }

    /// Writes Packages, Release and a signed InRelease. Each publication
    /// gets a later modification time than the one before, so apt's
    /// `If-Modified-Since` (one-second resolution) never mistakes a quick
    /// republication for the old index.
    pub fn publish(&self) {
        let www = &self.nginx.www;
        let previous = std::fs::metadata(www.join("InRelease"))
            .and_then(|m| m.modified())
            .ok();
        let packages = output(
            Command::new("apt-ftparchive")
                .current_dir(www)
                .args(["packages", "."]),
        );
        std::fs::write(www.join("Packages"), packages).expect("Packages");
        let release = output(Command::new("apt-ftparchive").current_dir(www).args([
            "-o",
            "APT::FTPArchive::Release::Origin=otabox-tests",
            "release",
            ".",
        ]));
        std::fs::write(www.join("Release"), release).expect("Release");
        let _ = std::fs::remove_file(www.join("InRelease"));
        self.gpg(&[
            "--clearsign",
            "-o",
            &www.join("InRelease").display().to_string(),
            &www.join("Release").display().to_string(),
        ]);
        if let Some(previous) = previous {
            let stamp =
                std::time::SystemTime::now().max(previous + std::time::Duration::from_secs(2));
            for name in ["InRelease", "Release", "Packages"] {
                std::fs::File::options()
                    .write(true)
                    .open(www.join(name))
                    .and_then(|f| f.set_modified(stamp))
                    .expect("set the index time");
            }
        }
    }

    /// The `deb` line for a sources list.
    pub fn source_line(&self) -> String {
        format!(
            "deb [signed-by={}] http://127.0.0.1:{}/ ./\n",
            self.keyring.display(),
            self.nginx.port
        )
    }

    /// Requests the server answered so far.
    pub fn request_count(&self) -> usize {
        self.nginx.requests().len()
    }
}

impl Drop for AptRepo {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .env("GNUPGHOME", &self.gnupg)
            .args(["--kill", "gpg-agent"])
            .status();
    }
}

/// A scratch root for apt and dpkg, and the handler's record directory.
pub struct Sysroot {
    /// The root apt and dpkg work on.
    pub root: PathBuf,
    /// Where the handler's `/var/lib/otabox/apt` is mounted.
    pub state: PathBuf,
}

impl Sysroot {
    /// A fresh root in `dir/sysroot` using `repo`.
    pub fn new(dir: &Path, repo: &AptRepo) -> Self {
        let root = dir.join("sysroot");
        for sub in [
            "var/lib/dpkg/info",
            "var/lib/dpkg/updates",
            "etc/apt/sources.list.d",
            "etc/apt/preferences.d",
            "etc/apt/apt.conf.d",
            "etc/apt/trusted.gpg.d",
            "var/lib/apt/lists/partial",
            "var/cache/apt/archives/partial",
            "var/log/apt",
        ] {
            std::fs::create_dir_all(root.join(sub)).expect("sysroot dirs");
        }
        std::fs::write(root.join("var/lib/dpkg/status"), "").expect("status");
        std::fs::write(root.join("etc/apt/sources.list"), "").expect("sources.list");
        std::fs::write(
            root.join("etc/apt/sources.list.d/otabox-test.list"),
            repo.source_line(),
        )
        .expect("source");
        // The machine's apt.conf.d hooks stay out; apt may read the
        // scratch folders without dropping to `_apt`.
        std::fs::write(
            root.join("etc/apt/apt.conf"),
            format!(
                "Dir::Etc::Parts \"{}/etc/apt/apt.conf.d\";\nAPT::Sandbox::User \"root\";\n",
                root.display()
            ),
        )
        .expect("apt.conf");
        let state = dir.join("apt-state");
        std::fs::create_dir_all(&state).expect("state");
        Self { root, state }
    }

    /// The handler's device config for this root.
    pub fn config(&self) -> serde_json::Value {
        serde_json::json!({
            "root": self.root.display().to_string(),
            "apt_config": self.root.join("etc/apt/apt.conf").display().to_string(),
        })
    }

    /// The same as `device.toml` lines for `[handlers.apt]`.
    pub fn device_toml(&self, extra: &str) -> String {
        format!(
            "[handlers.apt]\nconfig = {{ root = \"{}\", apt_config = \"{}\"{extra} }}\n\
             [handlers.apt.mounts]\n\"{APT_STATE}\" = \"{}\"\n",
            self.root.display(),
            self.root.join("etc/apt/apt.conf").display(),
            self.state.display()
        )
    }

    /// Name → (version, status) of every package dpkg records in the root.
    pub fn packages(&self) -> BTreeMap<String, (String, String)> {
        let out = output(
            Command::new("dpkg-query")
                .arg(format!(
                    "--admindir={}",
                    self.root.join("var/lib/dpkg").display()
                ))
                .args(["-W", "-f=${Package}\t${Version}\t${db:Status-Abbrev}\n"]),
        );
        String::from_utf8_lossy(&out)
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                Some((
                    f.next()?.to_string(),
                    (f.next()?.to_string(), f.next()?.trim().to_string()),
                ))
            })
            .collect()
    }

    /// The installed (`ii`) version of `name`.
    pub fn version_of(&self, name: &str) -> Option<String> {
        self.packages()
            .remove(name)
            .filter(|(_, status)| status == "ii")
            .map(|(v, _)| v)
    }

    /// The dpkg database and apt's history, to show nothing changed.
    pub fn snapshot(&self) -> (String, String) {
        let read = |p: &str| std::fs::read_to_string(self.root.join(p)).unwrap_or_default();
        (read("var/lib/dpkg/status"), read("var/log/apt/history.log"))
    }

    /// Installs a `.deb` file directly with dpkg, as the image builder would.
    pub fn install_file(&self, deb: &Path) {
        run(self.dpkg().arg("--install").arg(deb));
    }

    fn dpkg(&self) -> Command {
        let mut cmd = Command::new("dpkg");
        cmd.arg(format!("--root={}", self.root.display()))
            .arg(format!(
                "--admindir={}",
                self.root.join("var/lib/dpkg").display()
            ))
            .arg("--force-script-chrootless");
        cmd
    }

    /// Removes `name` behind the handler's back, as an operator would.
    pub fn remove_by_hand(&self, name: &str) {
        run(self.dpkg().args(["--remove", name]));
    }
}

/// The built apt handler with its packaged manifest, granted `sysroot`.
pub async fn apt_handler(rt: &Runtime, dir: &Path, sysroot: &Sysroot) -> Handler {
    let manifest = super::copy_built_handler(dir, "apt");
    let mut grant = DeviceGrant::default();
    grant.mounts.insert(APT_STATE.into(), sysroot.state.clone());
    grant.config = Some(toml::Table::try_from(sysroot.config()).expect("config as toml"));
    rt.load_handler(&manifest, Some(&grant))
        .await
        .expect("load the apt handler")
}

fn output(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().expect("start");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn run(cmd: &mut Command) {
    output(cmd);
}
