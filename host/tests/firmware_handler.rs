//! The firmware handler through the step workflow on A/B slot files with
//! real `grub-editenv` and `fw_setenv` environments; reboots are simulated
//! by a bootloader that follows the boot script, and a new booted-slot
//! marker.

mod common;

use std::path::{Path, PathBuf};

use common::firmware::{
    Board, COMPATIBLE, Loader, RaucService, SLOT_BYTES, firmware_handler_with, health_script,
    swupdate_bundle,
};
use common::{failed, inventory_of, runtime};
use otabox::runtime::{Handler, PayloadFile, Runtime, sha256_hex};
use otabox::step::{StepReport, StepRequest, StepResult, continue_step, run_step};
use serde_json::{Value, json};

struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    board: Board,
    handler: Handler,
    _rt: Runtime,
}

async fn rig(loader: Loader, health_exit: Option<i32>) -> Rig {
    rig_with(loader, health_exit, |_, _, _| ()).await.0
}

/// A rig whose handler config `setup` may extend (it gets the test folder,
/// the board and the config, and returns what the test keeps alongside).
async fn rig_with<T>(
    loader: Loader,
    health_exit: Option<i32>,
    setup: impl FnOnce(&Path, &Board, &mut Value) -> T,
) -> (Rig, T) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().canonicalize().expect("canonical");
    let board = Board::new(&root, loader);
    let health = health_exit.map(|code| health_script(&root, code));
    let mut config = board.config(health.as_deref());
    let kept = setup(&root, &board, &mut config);
    let rt = runtime(&root);
    let handler = firmware_handler_with(&rt, &root, &board, health.as_deref(), config).await;
    let rig = Rig {
        _dir: dir,
        root,
        board,
        handler,
        _rt: rt,
    };
    (rig, kept)
}

/// An image of `len` bytes that names its version.
fn image_bytes(version: &str, len: usize) -> Vec<u8> {
    let seed = format!("image {version} ");
    seed.bytes().cycle().take(len).collect()
}

impl Rig {
    fn request(
        &self,
        job: &str,
        version: &str,
        bytes: &[u8],
        declared_sha: Option<String>,
    ) -> StepRequest {
        self.request_for(job, version, COMPATIBLE, bytes, declared_sha)
    }

    fn request_for(
        &self,
        job: &str,
        version: &str,
        compatible: &str,
        bytes: &[u8],
        declared_sha: Option<String>,
    ) -> StepRequest {
        let path = self.root.join("payloads").join(format!("{job}.img"));
        std::fs::create_dir_all(path.parent().expect("parent")).expect("payloads");
        std::fs::write(&path, bytes).expect("image");
        StepRequest {
            job_id: job.into(),
            step: 0,
            update_type: "otabox/firmware:1".into(),
            manifest: json!({"name": "rootfs", "version": version, "compatible": compatible, "image": "rootfs.img"})
                .to_string(),
            payloads: vec![(
                PayloadFile {
                    name: "rootfs.img".into(),
                    size: bytes.len() as u64,
                    sha256: declared_sha.unwrap_or_else(|| sha256_hex(bytes)),
                    verified: None,
                },
                path,
            )],
            job_dir: self.root.join("jobs").join(job),
            cancel: Default::default(),
        }
    }

    async fn run(&self, request: StepRequest) -> StepReport {
        run_step(&self.handler, request, None).await.expect("step")
    }

    /// After the reboot: verify and commit.
    async fn after_reboot(&self, request: StepRequest, criteria: &str) -> StepReport {
        continue_step(&self.handler, request, Some(criteria.into()), &|_| Ok(()))
            .await
            .expect("continue")
    }

    fn slot_holds(&self, slot: &str, bytes: &[u8]) -> bool {
        let content = std::fs::read(self.board.slot(slot)).expect("slot");
        content.len() == SLOT_BYTES && content.starts_with(bytes)
    }
}

/// Installs `version` into the inactive slot, up to the reboot request.
async fn install_until_reboot(r: &Rig, job: &str, version: &str, bytes: &[u8]) -> StepRequest {
    let report = r.run(r.request(job, version, bytes, None)).await;
    assert_eq!(
        report.result,
        StepResult::RebootRequired { deferred: false },
        "{:?}",
        report.phases
    );
    r.request(job, version, bytes, None)
}

async fn a_to_b_and_back(loader: Loader) {
    let r = rig(loader, None).await;
    let slot_a_before = r.board.slot_sha256("A");
    let v2 = image_bytes("2.0", 3 << 20);
    let request = install_until_reboot(&r, "j-v2", "2.0", &v2).await;
    assert!(r.slot_holds("B", &v2), "the image is in the inactive slot");
    assert_eq!(
        r.board.slot_sha256("A"),
        slot_a_before,
        "the booted slot is never touched"
    );
    let env = r.board.env();
    assert_eq!(env["BOOT_ORDER"], "B A");
    assert_eq!(env["BOOT_B_LEFT"], "1", "the new slot is tried once");

    assert_eq!(r.board.boot(), "B");
    let done = r.after_reboot(request, "rootfs-2.0").await;
    assert_eq!(
        done.result,
        StepResult::Installed {
            criteria: "rootfs-2.0".into()
        },
        "{:?}",
        done.phases
    );
    let env = r.board.env();
    assert_eq!(env["BOOT_ORDER"], "B A");
    assert_eq!(env["BOOT_B_LEFT"], "3", "commit resets the boot counter");

    let again = r.run(r.request("j-v2-again", "2.0", &v2, None)).await;
    assert_eq!(
        again.result,
        StepResult::AlreadyInstalled {
            criteria: "rootfs-2.0".into()
        }
    );

    // B -> A next time.
    let slot_b_before = r.board.slot_sha256("B");
    let v3 = image_bytes("3.0", 2 << 20);
    let request = install_until_reboot(&r, "j-v3", "3.0", &v3).await;
    assert!(r.slot_holds("A", &v3));
    assert_eq!(r.board.slot_sha256("B"), slot_b_before);
    assert_eq!(r.board.boot(), "A");
    let done = r.after_reboot(request, "rootfs-3.0").await;
    assert!(
        matches!(done.result, StepResult::Installed { .. }),
        "{:?}",
        done.phases
    );
    assert_eq!(r.board.env()["BOOT_ORDER"], "A B");

    let items = inventory_of(&r.handler).await;
    let seen: Vec<(&str, &str)> = items
        .iter()
        .map(|i| (i.name.as_str(), i.version.as_str()))
        .collect();
    assert_eq!(seen, [("slot-A", "3.0"), ("slot-B", "2.0")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grub_a_to_b_commit_then_b_to_a() {
    a_to_b_and_back(Loader::Grub).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uboot_a_to_b_commit_then_b_to_a() {
    a_to_b_and_back(Loader::Uboot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_health_check_rolls_back_to_a_and_asks_for_a_reboot() {
    let r = rig(Loader::Uboot, Some(1)).await;
    let v2 = image_bytes("2.0", 1 << 20);
    let request = install_until_reboot(&r, "j1", "2.0", &v2).await;
    assert_eq!(r.board.boot(), "B");
    let report = r.after_reboot(request, "rootfs-2.0").await;
    let (phase, code, message, rolled_back) = failed(&report);
    assert_eq!(
        (phase, code, rolled_back),
        ("verify", 26, true),
        "{message}"
    );
    assert!(message.contains("health: exit 1"), "{message}");
    assert!(report.reboot_after_rollback, "the device still runs B");
    let env = r.board.env();
    assert_eq!(
        (env["BOOT_ORDER"].as_str(), env["BOOT_B_LEFT"].as_str()),
        ("A B", "0")
    );
    assert_eq!(r.board.boot(), "A", "the next boot is the old slot");
    let rollbacks = report
        .phases
        .iter()
        .filter(|p| p.phase == "rollback")
        .count();
    assert_eq!(rollbacks, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootloader_fall_back_is_rolled_back() {
    let r = rig(Loader::Grub, None).await;
    let v2 = image_bytes("2.0", 1 << 20);
    let request = install_until_reboot(&r, "j1", "2.0", &v2).await;
    assert_eq!(r.board.boot(), "B", "first try of the new slot");
    // The new slot dies before userspace; the bootloader has no try left.
    assert_eq!(r.board.boot(), "A", "the bootloader falls back");
    let report = r.after_reboot(request, "rootfs-2.0").await;
    let (phase, code, message, rolled_back) = failed(&report);
    assert_eq!(
        (phase, code, rolled_back),
        ("verify", 25, true),
        "{message}"
    );
    assert!(message.contains("fell back"), "{message}");
    assert!(!report.reboot_after_rollback, "A already runs");
    let env = r.board.env();
    assert_eq!(
        (env["BOOT_ORDER"].as_str(), env["BOOT_B_LEFT"].as_str()),
        ("A B", "0")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_larger_than_the_slot_is_refused_before_writing() {
    let r = rig(Loader::Grub, None).await;
    let before = r.board.snapshot();
    let big = image_bytes("9", SLOT_BYTES + 1);
    let report = r.run(r.request("j1", "9", &big, None)).await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 21), "{message}");
    assert!(message.contains("larger than slot B"), "{message}");
    assert_eq!(r.board.snapshot(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_mismatch_writes_nothing_to_the_slot() {
    let r = rig(Loader::Uboot, None).await;
    let before = r.board.snapshot();
    let v2 = image_bytes("2.0", 1 << 20);
    let report = r
        .run(r.request("j1", "2.0", &v2, Some(sha256_hex(b"other"))))
        .await;
    let (phase, _, message, _) = failed(&report);
    assert_eq!(phase, "download", "{message}");
    assert!(message.contains("sha256"), "{message}");
    assert!(!report.phases.iter().any(|p| p.phase == "install"));
    assert_eq!(r.board.snapshot(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_for_other_hardware_is_refused() {
    let r = rig(Loader::Grub, None).await;
    let before = (r.board.slot_sha256("B"), r.board.env());
    let v2 = image_bytes("2.0", 1 << 20);
    let report = r
        .run(r.request_for("j1", "2.0", "acme,other-board", &v2, None))
        .await;
    let (phase, code, message, _) = failed(&report);
    assert_eq!((phase, code), ("validate", 20), "{message}");
    assert!(
        message.contains("acme,other-board") && message.contains(COMPATIBLE),
        "{message}"
    );
    assert_eq!((r.board.slot_sha256("B"), r.board.env()), before);
}

/// A rig whose device runs SWUpdate for signed bundles; the bundle's
/// signing certificate will be `root/bundle/cert.pem`.
async fn swupdate_rig() -> Rig {
    rig_with(Loader::Grub, None, |root, _, config| {
        std::fs::create_dir_all(root.join("swu-tmp")).expect("tmpdir");
        config["swupdate"] = json!({
            "args": ["-k", root.join("bundle/cert.pem").display().to_string(), "-H", "otabox-test:1.0", "-m", "-M"],
            "select": {"A": "stable,copy1", "B": "stable,copy2"},
            "tmpdir": root.join("swu-tmp").display().to_string(),
        });
    })
    .await
    .0
}

impl Rig {
    /// A step whose payload is a `kind` bundle (`swupdate` or `rauc`).
    fn bundle_request(&self, job: &str, bundle: &[u8], kind: &str) -> StepRequest {
        let mut request = self.request(job, "2.0", bundle, None);
        request.manifest = json!({"name": "rootfs", "version": "2.0", "compatible": COMPATIBLE,
                                  "image": "rootfs.img", "bundle": kind})
        .to_string();
        request
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_swupdate_bundle_goes_to_the_inactive_slot() {
    let r = swupdate_rig().await;
    let slot_a = r.board.slot_sha256("A");
    let image = image_bytes("2.0", 1 << 20);
    let (bundle, _) = swupdate_bundle(&r.board, &r.root.join("bundle"), "2.0", &image);
    let report = r.run(r.bundle_request("j1", &bundle, "swupdate")).await;
    assert_eq!(
        report.result,
        StepResult::RebootRequired { deferred: false },
        "{:?}",
        report.phases
    );
    assert!(
        r.slot_holds("B", &image),
        "swupdate wrote the inactive slot"
    );
    assert_eq!(r.board.slot_sha256("A"), slot_a);
    assert_eq!(r.board.boot(), "B");
    let done = r
        .after_reboot(r.bundle_request("j1", &bundle, "swupdate"), "rootfs-2.0")
        .await;
    assert!(
        matches!(done.result, StepResult::Installed { .. }),
        "{:?}",
        done.phases
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_swupdate_bundle_is_refused_and_rolled_back() {
    let r = swupdate_rig().await;
    let slot_a = r.board.slot_sha256("A");
    let image = image_bytes("2.0", 1 << 20);
    let (mut bundle, _) = swupdate_bundle(&r.board, &r.root.join("bundle"), "2.0", &image);
    let middle = bundle.len() / 2;
    bundle[middle] ^= 0xFF;
    let report = r.run(r.bundle_request("j1", &bundle, "swupdate")).await;
    let (phase, code, message, rolled_back) = failed(&report);
    assert_eq!(
        (phase, code, rolled_back),
        ("install", 30, true),
        "{message}"
    );
    assert!(message.contains("swupdate refused the bundle"), "{message}");
    assert!(
        message.to_lowercase().contains("hash mismatch"),
        "{message}"
    );
    assert_eq!(
        r.board.slot_sha256("A"),
        slot_a,
        "the booted slot is never touched"
    );
    let env = r.board.env();
    assert_eq!(
        (env["BOOT_ORDER"].as_str(), env["BOOT_B_LEFT"].as_str()),
        ("A B", "0")
    );
}

/// A U-Boot device with RAUC's service (custom backend over the board's
/// boot variables) and the firmware handler configured for its bus.
async fn rauc_rig(health_exit: Option<i32>) -> (Rig, RaucService) {
    rig_with(Loader::Uboot, health_exit, |_, board, config| {
        let rauc = RaucService::start(board, "A");
        config["rauc"] = json!({"bus": rauc.bus});
        rauc
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rauc_bundle_is_installed_booted_and_marked_good() {
    let (r, mut rauc) = rauc_rig(None).await;
    let slot_a = r.board.slot_sha256("A");
    let image = image_bytes("2.0", 1 << 20);
    let bundle = rauc.bundle("2.0", &image);
    let report = r.run(r.bundle_request("j1", &bundle, "rauc")).await;
    assert_eq!(
        report.result,
        StepResult::RebootRequired { deferred: false },
        "{:?}",
        report.phases
    );
    assert!(r.slot_holds("B", &image), "RAUC wrote the inactive slot");
    assert_eq!(r.board.slot_sha256("A"), slot_a);
    assert_eq!(r.board.env()["BOOT_ORDER"], "B A", "RAUC made B primary");
    assert_eq!(r.board.boot(), "B");
    rauc.restart("B");
    let done = r
        .after_reboot(r.bundle_request("j1", &bundle, "rauc"), "rootfs-2.0")
        .await;
    assert!(
        matches!(done.result, StepResult::Installed { .. }),
        "{:?}",
        done.phases
    );
    assert_eq!(
        r.board.env()["BOOT_B_LEFT"],
        "3",
        "marked good: the full count"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_health_check_under_rauc_marks_b_bad_and_reactivates_a() {
    let (r, mut rauc) = rauc_rig(Some(1)).await;
    let image = image_bytes("2.0", 1 << 20);
    let bundle = rauc.bundle("2.0", &image);
    let report = r.run(r.bundle_request("j1", &bundle, "rauc")).await;
    assert_eq!(
        report.result,
        StepResult::RebootRequired { deferred: false }
    );
    assert_eq!(r.board.boot(), "B");
    rauc.restart("B");
    let report = r
        .after_reboot(r.bundle_request("j1", &bundle, "rauc"), "rootfs-2.0")
        .await;
    let (phase, code, message, rolled_back) = failed(&report);
    assert_eq!(
        (phase, code, rolled_back),
        ("verify", 26, true),
        "{message}"
    );
    assert!(report.reboot_after_rollback);
    let env = r.board.env();
    assert_eq!(
        (env["BOOT_ORDER"].as_str(), env["BOOT_B_LEFT"].as_str()),
        ("A B", "0")
    );
    assert_eq!(r.board.boot(), "A");
}
