//! `otabox demo`: a self-contained walkthrough of an update with the
//! built-in `file` handler, in a scratch directory: audit, install, a
//! repeat that is already installed, a payload with a wrong hash refused
//! before any handler runs, a manifest pointing outside the grant stopped
//! by the sandbox and rolled back, and the inventory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::audit::{Severity, audit_dir, render_text};
use crate::builtin;
use crate::config::DeviceConfig;
use crate::runtime::{PayloadFile, ProgressSink, Runtime, sha256_hex};
use crate::workflow::{StepReport, StepRequest, StepResult, run_step};

/// Where the demo lives and what it left behind.
pub struct DemoOutcome {
    /// Scratch directory used.
    pub root: PathBuf,
    /// Report of each step, in order.
    pub reports: Vec<(String, StepReport)>,
}

/// Runs the demo in `root` (created, and expected empty or absent).
pub async fn run(root: &Path) -> Result<DemoOutcome> {
    let config_path = lay_out(root)?;
    let config = DeviceConfig::load(&config_path)?;
    println!("otabox demo in {}\n", root.display());

    let runtime = Runtime::new(Some(config.cache_dir()))?;
    println!("== otabox handlers audit\n");
    let audits = audit_dir(&runtime, &config.paths.handlers, &config.handlers).await?;
    print!("{}", render_text(&audits));
    anyhow::ensure!(audits.iter().all(|a| a.count(Severity::Error) == 0), "the built-in handler failed its audit");

    let set = runtime.load_dir(&config.paths.handlers, &config.handlers).await?;
    let handler = set.for_update_type("otabox/file:1").context("the file handler did not load")?;
    let progress: ProgressSink = std::sync::Arc::new(|e| {
        if e.total > 0 && e.done == e.total {
            println!("    progress     {} {}/{} bytes", crate::workflow::phase_name(e.phase), e.done, e.total);
        }
    });

    let files = root.join("device/files");
    let v1 = b"greeting = \"hello\"\nversion = \"1.2.0\"\n".as_slice();
    let tampered = b"greeting = \"HELLO\"\nversion = \"1.2.0\"\n".as_slice();
    let mut reports = Vec::new();
    let inside = "/var/lib/otabox/files/app.conf";
    let cases = [
        DemoCase { title: "install app.conf 1.2.0", job: "demo-1", bytes: v1, declared: v1, destination: inside },
        DemoCase { title: "deploy the same again", job: "demo-2", bytes: v1, declared: v1, destination: inside },
        DemoCase {
            title: "payload bytes differ from the declared hash",
            job: "demo-3",
            bytes: tampered,
            declared: v1,
            destination: inside,
        },
        DemoCase {
            title: "manifest points outside the granted directory",
            job: "demo-4",
            bytes: v1,
            declared: v1,
            destination: "/etc/otabox-demo.conf",
        },
    ];
    for case in cases {
        let job = case.job;
        println!("\n== job {job}: {}", case.title);
        let request = step_request(root, &config, &case)?;
        let report = run_step(handler, request, Some(progress.clone())).await?;
        for record in &report.phases {
            println!("    {:<12} {}", record.phase, record.outcome);
        }
        println!("  result: {}", summarize(&report.result));
        reports.push((job.to_string(), report));
    }
    let installed = std::fs::read(files.join("app.conf")).context("app.conf was not installed")?;
    anyhow::ensure!(installed == v1, "app.conf does not hold the installed version");
    anyhow::ensure!(!Path::new("/etc/otabox-demo.conf").exists(), "the sandbox let the handler write outside its grant");

    println!("\n== inventory of the file handler");
    match handler.inventory().await? {
        Ok(items) => items.iter().for_each(|i| println!("    {} {}", i.name, i.details.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" "))),
        Err(status) => println!("    failed: {}", status.message),
    }
    println!("\nThe handler wrote only inside {} (granted as /var/lib/otabox/files).", files.display());
    Ok(DemoOutcome { root: root.to_path_buf(), reports })
}

/// Writes the handler directory, device config and payloads; returns the
/// config path.
fn lay_out(root: &Path) -> Result<PathBuf> {
    let handlers = root.join("handlers");
    std::fs::create_dir_all(&handlers).with_context(|| format!("cannot create {}", handlers.display()))?;
    anyhow::ensure!(!builtin::FILE_WASM.is_empty(), "this build has no embedded handlers (OTABOX_SKIP_WASM_BUILD was set)");
    std::fs::write(handlers.join("file.wasm"), builtin::FILE_WASM)?;
    std::fs::write(handlers.join("file.toml"), builtin::FILE_TOML)?;
    let config = root.join("device.toml");
    std::fs::write(
        &config,
        "[device]\nid = \"demo-device\"\n\n[paths]\nhandlers = \"handlers\"\nstate = \"state\"\n\n\
         [handlers.file]\nconfig = { root = \"/var/lib/otabox/files\" }\n\n\
         [handlers.file.mounts]\n\"/var/lib/otabox/files\" = \"device/files\"\n",
    )?;
    Ok(config)
}

/// One job of the walkthrough.
struct DemoCase {
    title: &'static str,
    job: &'static str,
    /// The payload bytes on disk.
    bytes: &'static [u8],
    /// The bytes the desired state declares (size and sha256).
    declared: &'static [u8],
    destination: &'static str,
}

fn step_request(root: &Path, config: &DeviceConfig, case: &DemoCase) -> Result<StepRequest> {
    let DemoCase { job, bytes, declared, destination, .. } = *case;
    let payload_dir = root.join("payloads").join(job);
    std::fs::create_dir_all(&payload_dir)?;
    let path = payload_dir.join("app.conf");
    std::fs::write(&path, bytes)?;
    let payload = PayloadFile {
        name: "app.conf".into(),
        size: declared.len() as u64,
        sha256: sha256_hex(declared),
        verified: None,
    };
    Ok(StepRequest {
        job_id: job.into(),
        step: 0,
        update_type: "otabox/file:1".into(),
        manifest: serde_json::json!({
            "name": "app-config", "version": "1.2.0", "payload": "app.conf", "destination": destination
        })
        .to_string(),
        payloads: vec![(payload, path)],
        job_dir: config.paths.state.join("jobs").join(job),
        cancel: Default::default(),
    })
}

fn summarize(result: &StepResult) -> String {
    match result {
        StepResult::Installed { criteria } => format!("SUCCESS, installed {criteria}"),
        StepResult::AlreadyInstalled { criteria } => format!("SUCCESS, {criteria} was already installed"),
        StepResult::Failed { phase, message, rolled_back, .. } => {
            format!("FAILURE in {phase}{}: {message}", if *rolled_back { " (rolled back)" } else { "" })
        }
        other => format!("{other:?}"),
    }
}
