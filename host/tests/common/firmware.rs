//! A/B slots as plain files, a real GRUB (`grub-editenv`) or U-Boot
//! (`fw_setenv`/`fw_printenv` on an image made by `mkenvimage`) environment,
//! a booted-slot marker, and a bootloader that follows the boot script of
//! `examples/firmware`, so a reboot can be simulated faithfully.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use otabox::capabilities::DeviceGrant;
use otabox::runtime::{Handler, Runtime};

/// Slot size in the tests.
pub const SLOT_BYTES: usize = 4 << 20;
/// The device's compatibility string.
pub const COMPATIBLE: &str = "otabox,test-board";

/// Which bootloader environment a rig uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loader {
    /// `grub-editenv` on a grubenv file.
    Grub,
    /// `fw_setenv` on a U-Boot environment image.
    Uboot,
}

/// A device with two slot files booted from slot A.
pub struct Board {
    /// The test folder.
    pub root: PathBuf,
    /// The bootloader kind.
    pub loader: Loader,
}

impl Board {
    /// Slots filled with their own byte, the environment set to boot A with
    /// three attempts, the marker saying A.
    pub fn new(root: &Path, loader: Loader) -> Self {
        let board = Self {
            root: root.to_path_buf(),
            loader,
        };
        std::fs::create_dir_all(root.join("slots")).expect("slots");
        std::fs::create_dir_all(root.join("run")).expect("run");
        std::fs::write(board.slot("A"), vec![b'a'; SLOT_BYTES]).expect("slot A");
        std::fs::write(board.slot("B"), vec![b'b'; SLOT_BYTES]).expect("slot B");
        match loader {
            Loader::Grub => run(Command::new("grub-editenv")
                .arg(root.join("grubenv"))
                .arg("create")),
            Loader::Uboot => {
                std::fs::write(root.join("env.txt"), "").expect("env source");
                run(Command::new("mkenvimage")
                    .args(["-s", "0x4000", "-o"])
                    .arg(root.join("uboot.env"))
                    .arg(root.join("env.txt")));
                std::fs::write(
                    root.join("fw_env.config"),
                    format!("{} 0x0 0x4000\n", root.join("uboot.env").display()),
                )
                .expect("fw_env.config");
            }
        }
        board.set_env(&[
            ("BOOT_ORDER", "A B"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "0"),
        ]);
        board.mark_booted("A");
        board
    }

    /// The file of `slot`.
    pub fn slot(&self, slot: &str) -> PathBuf {
        self.root
            .join("slots")
            .join(format!("slot-{}", slot.to_lowercase()))
    }

    /// The booted-slot marker as the boot scripts would leave it.
    pub fn mark_booted(&self, slot: &str) {
        std::fs::write(self.root.join("run/booted-slot"), format!("{slot}\n")).expect("marker");
    }

    /// The handler config for this board.
    pub fn config(&self, health: Option<&Path>) -> serde_json::Value {
        let bootloader = match self.loader {
            Loader::Grub => {
                serde_json::json!({"kind": "grub", "env": self.root.join("grubenv").display().to_string()})
            }
            Loader::Uboot => {
                serde_json::json!({"kind": "uboot", "config": self.root.join("fw_env.config").display().to_string()})
            }
        };
        let mut config = serde_json::json!({"compatible": COMPATIBLE, "bootloader": bootloader});
        if let Some(h) = health {
            config["health_command"] = serde_json::json!([h.display().to_string()]);
        }
        config
    }

    /// The grant: state, marker directory and slots mounted in the folder.
    pub fn grant(&self, health: Option<&Path>) -> DeviceGrant {
        self.grant_with(self.config(health))
    }

    /// The same grant with another handler `config`.
    pub fn grant_with(&self, config: serde_json::Value) -> DeviceGrant {
        let mut grant = DeviceGrant::default();
        for (guest, host) in [
            ("/var/lib/otabox/firmware", "fw-state"),
            ("/run/otabox", "run"),
            ("/dev/otabox", "slots"),
        ] {
            grant.mounts.insert(guest.into(), self.root.join(host));
        }
        grant.config = Some(toml::Table::try_from(config).expect("config as toml"));
        grant
    }

    /// The boot variables.
    pub fn env(&self) -> BTreeMap<String, String> {
        let out = match self.loader {
            Loader::Grub => output(
                Command::new("grub-editenv")
                    .arg(self.root.join("grubenv"))
                    .arg("list"),
            ),
            Loader::Uboot => output(
                Command::new("fw_printenv")
                    .arg("-c")
                    .arg(self.root.join("fw_env.config")),
            ),
        };
        out.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn set_env(&self, vars: &[(&str, &str)]) {
        match self.loader {
            Loader::Grub => run(Command::new("grub-editenv")
                .arg(self.root.join("grubenv"))
                .arg("set")
                .args(vars.iter().map(|(k, v)| format!("{k}={v}")))),
            Loader::Uboot => {
                for (k, v) in vars {
                    run(Command::new("fw_setenv")
                        .arg("-c")
                        .arg(self.root.join("fw_env.config"))
                        .args([k, v]));
                }
            }
        }
    }

    /// One boot as the boot script does it: the first slot of `BOOT_ORDER`
    /// with boots left is booted and its counter decremented. Returns the
    /// slot and leaves the marker.
    pub fn boot(&self) -> String {
        let env = self.env();
        let order = env
            .get("BOOT_ORDER")
            .cloned()
            .unwrap_or_else(|| "A B".into());
        for slot in order.split_whitespace() {
            let key = format!("BOOT_{slot}_LEFT");
            let left: u32 = env.get(&key).and_then(|v| v.parse().ok()).unwrap_or(0);
            if left > 0 {
                self.set_env(&[(&key, &(left - 1).to_string())]);
                self.mark_booted(slot);
                return slot.to_string();
            }
        }
        panic!("no bootable slot in {env:?}");
    }

    /// Both slots' hashes and the boot variables, to show nothing changed.
    pub fn snapshot(&self) -> (String, String, BTreeMap<String, String>) {
        (self.slot_sha256("A"), self.slot_sha256("B"), self.env())
    }

    /// sha256 of a slot file.
    pub fn slot_sha256(&self, slot: &str) -> String {
        otabox::runtime::sha256_hex(&std::fs::read(self.slot(slot)).expect("slot"))
    }
}

/// The built firmware handler with its packaged manifest (plus a command
/// rule for the health script), granted `board`.
pub async fn firmware_handler(
    rt: &Runtime,
    dir: &Path,
    board: &Board,
    health: Option<&Path>,
) -> Handler {
    firmware_handler_with(rt, dir, board, health, board.config(health)).await
}

/// Same, with another handler `config`.
pub async fn firmware_handler_with(
    rt: &Runtime,
    dir: &Path,
    board: &Board,
    health: Option<&Path>,
    config: serde_json::Value,
) -> Handler {
    let handlers = dir.join("handlers");
    std::fs::create_dir_all(&handlers).expect("handlers");
    let built = Path::new(env!("OTABOX_BUILT_HANDLERS"));
    std::fs::copy(built.join("firmware.wasm"), handlers.join("firmware.wasm")).expect("wasm");
    let mut manifest = std::fs::read_to_string(built.join("firmware.toml")).expect("toml");
    if let Some(h) = health {
        manifest.push_str(&format!(
            "\n[[commands]]\nprogram = \"{}\"\nargs = [\"**\"]\n",
            h.display()
        ));
    }
    std::fs::write(handlers.join("firmware.toml"), manifest).expect("manifest");
    rt.load_handler(
        &handlers.join("firmware.toml"),
        Some(&board.grant_with(config)),
    )
    .await
    .expect("load the firmware handler")
}

/// A signed SWUpdate bundle (`.swu`) whose selections `stable,copy1` and
/// `stable,copy2` write `image` raw to slot A and slot B; returns the
/// bundle and the certificate that verifies it.
pub fn swupdate_bundle(
    board: &Board,
    dir: &Path,
    version: &str,
    image: &[u8],
) -> (Vec<u8>, PathBuf) {
    std::fs::create_dir_all(dir).expect("bundle dir");
    std::fs::write(dir.join("rootfs.img"), image).expect("image");
    let sha = otabox::runtime::sha256_hex(image);
    let copy = |slot: &str| {
        format!(
            "{{ images: ( {{ filename = \"rootfs.img\"; device = \"{}\"; type = \"raw\"; sha256 = \"{sha}\"; }} ); }}",
            board.slot(slot).display()
        )
    };
    std::fs::write(
        dir.join("sw-description"),
        format!(
            "software = {{ version = \"{version}\"; hardware-compatibility = [ \"1.0\" ];\n\
             stable = {{ copy1 = {}; copy2 = {}; }}; }}\n",
            copy("A"),
            copy("B")
        ),
    )
    .expect("sw-description");
    run(Command::new("openssl")
        .current_dir(dir)
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem", "-out",
            "cert.pem",
        ])
        .args(["-days", "2", "-subj", "/CN=otabox test bundles"])
        .args([
            "-addext",
            "keyUsage=digitalSignature",
            "-addext",
            "extendedKeyUsage=emailProtection",
        ]));
    run(Command::new("openssl").current_dir(dir).args([
        "cms",
        "-sign",
        "-in",
        "sw-description",
        "-out",
        "sw-description.sig",
        "-signer",
        "cert.pem",
        "-inkey",
        "key.pem",
        "-outform",
        "DER",
        "-nosmimecap",
        "-binary",
    ]));
    let mut cpio = Command::new("cpio")
        .current_dir(dir)
        .args(["-o", "--quiet", "-H", "crc"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("cpio is installed (make setup)");
    use std::io::Write;
    cpio.stdin
        .take()
        .expect("stdin")
        .write_all(b"sw-description\nsw-description.sig\nrootfs.img\n")
        .expect("file list");
    let out = cpio.wait_with_output().expect("cpio");
    assert!(out.status.success(), "cpio failed");
    (out.stdout, dir.join("cert.pem"))
}

/// A health check script that exits with `code`.
pub fn health_script(dir: &Path, code: i32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("health.sh");
    std::fs::write(
        &path,
        format!("#!/bin/sh\necho \"health: exit {code}\"\nexit {code}\n"),
    )
    .expect("health script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().expect("start");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn run(cmd: &mut Command) {
    output(cmd);
}

/// RAUC's service on a private D-Bus for a U-Boot board: slots are the
/// board's slot files, the bootloader is a custom backend script over the
/// board's `BOOT_ORDER` / `BOOT_<slot>_LEFT` variables, bundles are signed
/// with a throwaway certificate.
pub struct RaucService {
    dbus: std::process::Child,
    service: Option<std::process::Child>,
    /// The private bus address, for `DBUS_SYSTEM_BUS_ADDRESS`.
    pub bus: String,
    dir: PathBuf,
}

impl RaucService {
    /// Starts the bus and the service, booted from the board's slot.
    pub fn start(board: &Board, booted: &str) -> Self {
        use std::io::BufRead;
        assert_eq!(board.loader, Loader::Uboot, "the backend drives fw_setenv");
        let dir = board.root.join("rauc");
        std::fs::create_dir_all(dir.join("mnt")).expect("rauc dir");
        std::fs::create_dir_all(dir.join("data")).expect("rauc data");
        run(Command::new("openssl")
            .current_dir(&dir)
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "key.pem",
            ])
            .args([
                "-out",
                "cert.pem",
                "-days",
                "2",
                "-subj",
                "/CN=otabox rauc test",
            ]));
        let cfg = board.root.join("fw_env.config");
        let backend = dir.join("backend.sh");
        std::fs::write(
            &backend,
            format!(
                "#!/bin/sh\nCFG={cfg}\n\
                 case \"$1\" in\n\
                 get-primary) for s in $(fw_printenv -c \"$CFG\" -n BOOT_ORDER); do\n\
                   left=$(fw_printenv -c \"$CFG\" -n \"BOOT_${{s}}_LEFT\"); if [ \"${{left:-0}}\" -gt 0 ]; then echo \"$s\"; exit 0; fi; done; exit 1 ;;\n\
                 set-primary) other=A; [ \"$2\" = A ] && other=B\n\
                   printf 'BOOT_ORDER=%s %s\\nBOOT_%s_LEFT=3\\n' \"$2\" \"$other\" \"$2\" | fw_setenv -c \"$CFG\" -s - ;;\n\
                 get-state) left=$(fw_printenv -c \"$CFG\" -n \"BOOT_$2_LEFT\"); if [ \"${{left:-0}}\" -gt 0 ]; then echo good; else echo bad; fi ;;\n\
                 set-state) if [ \"$3\" = good ]; then n=3; else n=0; fi; fw_setenv -c \"$CFG\" \"BOOT_$2_LEFT\" \"$n\" ;;\n\
                 get-current) cat {booted} ;;\n\
                 *) exit 1 ;;\nesac\n",
                cfg = cfg.display(),
                booted = board.root.join("run/booted-slot").display(),
            ),
        )
        .expect("backend");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&backend, std::fs::Permissions::from_mode(0o755))
                .expect("chmod");
        }
        std::fs::write(
            dir.join("system.conf"),
            format!(
                "[system]\ncompatible=otabox-test\nbootloader=custom\ndata-directory={data}\n\n\
                 [handlers]\nbootloader-custom-backend={backend}\n\n\
                 [keyring]\npath={cert}\n\n\
                 [slot.rootfs.0]\ndevice={a}\ntype=raw\nbootname=A\n\n\
                 [slot.rootfs.1]\ndevice={b}\ntype=raw\nbootname=B\n",
                data = dir.join("data").display(),
                backend = backend.display(),
                cert = dir.join("cert.pem").display(),
                a = board.slot("A").display(),
                b = board.slot("B").display(),
            ),
        )
        .expect("system.conf");
        let mut dbus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .arg(format!("--address=unix:path={}", dir.join("bus").display()))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dbus-daemon is installed (make setup)");
        let mut line = String::new();
        std::io::BufReader::new(dbus.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("bus address");
        let mut rauc = Self {
            dbus,
            service: None,
            bus: line.trim().to_string(),
            dir,
        };
        rauc.restart(booted);
        rauc
    }

    /// (Re)starts the service as after a boot from `booted`.
    pub fn restart(&mut self, booted: &str) {
        if let Some(mut old) = self.service.take() {
            let _ = old.kill();
            let _ = old.wait();
        }
        let child = Command::new("rauc")
            .arg(format!("--conf={}", self.dir.join("system.conf").display()))
            .arg(format!("--mount={}", self.dir.join("mnt").display()))
            .arg("service")
            .arg(format!("--override-boot-slot={booted}"))
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("rauc is installed (make setup)");
        self.service = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let status = Command::new("rauc")
                .arg("status")
                .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status()
                .expect("rauc status");
            if status.success() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rauc service did not come up"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// A signed bundle holding `image` for the `rootfs` slot class.
    pub fn bundle(&self, version: &str, image: &[u8]) -> Vec<u8> {
        let content = self.dir.join(format!("bundle-{version}"));
        std::fs::create_dir_all(&content).expect("bundle dir");
        std::fs::write(content.join("rootfs.img"), image).expect("image");
        std::fs::write(
            content.join("manifest.raucm"),
            format!("[update]\ncompatible=otabox-test\nversion={version}\n\n[image.rootfs]\nfilename=rootfs.img\n"),
        )
        .expect("manifest");
        let out = self.dir.join(format!("{version}.raucb"));
        let _ = std::fs::remove_file(&out);
        run(Command::new("rauc")
            .arg(format!("--cert={}", self.dir.join("cert.pem").display()))
            .arg(format!("--key={}", self.dir.join("key.pem").display()))
            .arg("bundle")
            .arg(&content)
            .arg(&out));
        std::fs::read(&out).expect("bundle")
    }
}

impl Drop for RaucService {
    fn drop(&mut self) {
        if let Some(mut s) = self.service.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = self.dbus.kill();
        let _ = self.dbus.wait();
    }
}
