//! The first-party `file` handler through the whole step workflow, on real
//! files in a granted directory mounted from a scratch folder.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use otabox::capabilities::DeviceGrant;
use otabox::runtime::{Handler, PayloadFile, Runtime, sha256_hex};
use otabox::step::{StepRequest, StepResult, run_step};

const GUEST_DIR: &str = "/var/lib/otabox/files";

struct Bench {
    _dir: tempfile::TempDir,
    root: PathBuf,
    files: PathBuf,
    handler: Handler,
    _rt: Runtime,
}

async fn setup() -> Bench {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let files = root.join("files");
    let rt = runtime(&root);
    let manifest = install_handler(
        &root.join("handlers"),
        "file",
        &built_wasm("file"),
        "otabox/file:1",
        &format!("[[filesystem]]\npath = \"{GUEST_DIR}\"\naccess = \"rw\"\n"),
    );
    let mut grant = DeviceGrant::default();
    grant.mounts.insert(GUEST_DIR.into(), files.clone());
    grant.config = Some(toml::from_str(&format!("root = \"{GUEST_DIR}\"")).expect("config"));
    let handler = rt
        .load_handler(&manifest, Some(&grant))
        .await
        .expect("load file handler");
    Bench {
        _dir: dir,
        root,
        files,
        handler,
        _rt: rt,
    }
}

impl Bench {
    fn request(
        &self,
        job: &str,
        content: &[u8],
        declared: &[u8],
        destination: &str,
    ) -> StepRequest {
        let payload_path = self.root.join("payloads").join(job);
        std::fs::create_dir_all(payload_path.parent().expect("parent")).expect("payload dir");
        std::fs::write(&payload_path, content).expect("payload");
        StepRequest {
            job_id: job.into(),
            step: 0,
            update_type: "otabox/file:1".into(),
            manifest: serde_json::json!({"name": "cfg", "version": "2", "payload": "cfg.txt", "destination": destination}).to_string(),
            payloads: vec![(
                PayloadFile { name: "cfg.txt".into(), size: declared.len() as u64, sha256: sha256_hex(declared), verified: None },
                payload_path,
            )],
            job_dir: self.root.join("jobs").join(job),
            cancel: Default::default(),
        }
    }

    fn dest(&self) -> String {
        format!("{GUEST_DIR}/app.conf")
    }

    fn leftovers(&self) -> Vec<String> {
        list(&self.files)
            .into_iter()
            .filter(|n| n.contains(".otabox-"))
            .collect()
    }
}

fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn phases(report: &otabox::step::StepReport) -> Vec<&str> {
    report.phases.iter().map(|p| p.phase.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installs_then_recognises_the_installed_file() {
    let b = setup().await;
    let report = run_step(&b.handler, b.request("j1", b"v2", b"v2", &b.dest()), None)
        .await
        .expect("run");
    assert_eq!(
        report.result,
        StepResult::Installed {
            criteria: "cfg-2".into()
        }
    );
    assert_eq!(
        phases(&report),
        [
            "validate",
            "is-installed",
            "payloads",
            "download",
            "backup",
            "install",
            "apply",
            "verify",
            "commit",
            "cleanup"
        ]
    );
    assert_eq!(
        std::fs::read(b.files.join("app.conf")).expect("installed"),
        b"v2"
    );
    assert!(b.leftovers().is_empty(), "{:?}", b.leftovers());

    let again = run_step(&b.handler, b.request("j2", b"v2", b"v2", &b.dest()), None)
        .await
        .expect("run");
    assert_eq!(
        again.result,
        StepResult::AlreadyInstalled {
            criteria: "cfg-2".into()
        }
    );
    assert_eq!(phases(&again), ["validate", "is-installed", "cleanup"]);

    std::fs::write(b.files.join("app.conf"), b"edited by hand").expect("edit");
    let repaired = run_step(&b.handler, b.request("j3", b"v2", b"v2", &b.dest()), None)
        .await
        .expect("run");
    assert_eq!(
        repaired.result,
        StepResult::Installed {
            criteria: "cfg-2".into()
        },
        "a hand edit must be noticed"
    );
    assert_eq!(
        std::fs::read(b.files.join("app.conf")).expect("installed"),
        b"v2"
    );

    let inventory = b
        .handler
        .inventory()
        .await
        .expect("call")
        .expect("inventory");
    assert_eq!(inventory.len(), 1);
    assert_eq!(inventory[0].name, format!("{GUEST_DIR}/app.conf"));
    assert_eq!(
        inventory[0].details,
        vec![("sha256".to_string(), sha256_hex(b"v2"))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_with_the_wrong_hash_never_reaches_the_handler() {
    let b = setup().await;
    std::fs::create_dir_all(&b.files).expect("files");
    std::fs::write(b.files.join("app.conf"), b"v1").expect("previous");
    let report = run_step(&b.handler, b.request("j1", b"v3", b"v2", &b.dest()), None)
        .await
        .expect("run");
    let StepResult::Failed {
        phase,
        message,
        rolled_back,
        extended_code,
        ..
    } = &report.result
    else {
        panic!("{:?}", report.result)
    };
    assert_eq!((phase.as_str(), *rolled_back), ("download", false));
    assert!(message.contains("sha256"), "{message}");
    assert_eq!(extended_code >> 28, 0, "host facility");
    assert_eq!(
        phases(&report),
        ["validate", "is-installed", "payloads", "cleanup"]
    );
    assert_eq!(
        std::fs::read(b.files.join("app.conf")).expect("kept"),
        b"v1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_install_is_rolled_back_to_the_previous_file() {
    let b = setup().await;
    std::fs::create_dir_all(b.files.join("app.conf.otabox-new"))
        .expect("block the staging file with a directory");
    std::fs::write(b.files.join("app.conf"), b"v1").expect("previous");
    let report = run_step(&b.handler, b.request("j1", b"v2", b"v2", &b.dest()), None)
        .await
        .expect("run");
    let StepResult::Failed {
        phase,
        rolled_back,
        message,
        ..
    } = &report.result
    else {
        panic!("{:?}", report.result)
    };
    assert_eq!(
        (phase.as_str(), *rolled_back),
        ("install", true),
        "{message}"
    );
    assert!(
        phases(&report).ends_with(&["install", "rollback", "cleanup"]),
        "{:?}",
        phases(&report)
    );
    assert_eq!(
        std::fs::read(b.files.join("app.conf")).expect("restored"),
        b"v1"
    );
    assert!(!b.files.join("app.conf.otabox-backup").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_outside_the_grant_is_stopped_by_the_sandbox() {
    let b = setup().await;
    let outside = b.root.join("outside.conf");
    let report = run_step(
        &b.handler,
        b.request("j1", b"v2", b"v2", &outside.display().to_string()),
        None,
    )
    .await
    .expect("run");
    let StepResult::Failed {
        phase,
        rolled_back,
        message,
        ..
    } = &report.result
    else {
        panic!("{:?}", report.result)
    };
    assert_eq!((phase.as_str(), *rolled_back), ("install", true));
    // The sandbox's refusal reads as one, naming the destination and the
    // granted directory as the handler sees it.
    assert_eq!(
        message,
        &format!(
            "denied: {} is outside the granted paths ({GUEST_DIR})",
            outside.display()
        )
    );
    assert!(!outside.exists());
    assert!(
        list(&b.root).iter().all(|n| !n.starts_with("outside")),
        "{:?}",
        list(&b.root)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_manifests_fail_validation_before_anything_runs() {
    let b = setup().await;
    for manifest in [
        "not json",
        r#"{"name":"cfg","version":"2","payload":"cfg.txt"}"#,
        r#"{"name":"cfg","version":"2","payload":"cfg.txt","destination":"/var/lib/otabox/files/../x"}"#,
        r#"{"name":"cfg","version":"2","payload":"nope","destination":"/var/lib/otabox/files/a"}"#,
    ] {
        let mut request = b.request("j1", b"v2", b"v2", &b.dest());
        request.manifest = manifest.into();
        let report = run_step(&b.handler, request, None).await.expect("run");
        let StepResult::Failed { phase, message, .. } = &report.result else {
            panic!("{manifest}: {:?}", report.result)
        };
        assert_eq!(phase, "validate", "{manifest}: {message}");
        assert!(
            message.contains("invalid manifest"),
            "{manifest}: {message}"
        );
    }
    assert!(list(&b.files).is_empty());
}
