//! Per-language benchmark of the example config-file handlers (Python,
//! JavaScript with StarlingMonkey and with QuickJS, C), with the Rust `file`
//! handler as the reference row, in one run:
//!
//! - component size;
//! - cold compile: load with an empty compiled-component cache;
//! - cached load: load from that cache in a fresh runtime;
//! - one `is-installed` call (fresh instance, file present and equal).
//!
//! Run with `make bench` (or `cargo bench -p otabox --bench languages`).
//! Without cargo's `--bench` flag (as `make test` runs it) or with
//! `OTABOX_BENCH_QUICK=1` it makes a short smoke run; `OTABOX_BENCH_COLDS=N`
//! sets the number of cold compiles per subject (default 3).

#[path = "../tests/common/languages.rs"]
#[allow(dead_code)]
mod languages;

#[path = "support/calibration.rs"]
mod calibration;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use languages::Language;
use otabox::capabilities::DeviceGrant;
use otabox::model::PayloadInfo;
use otabox::runtime::{CallScope, Handler, Runtime, StepContext, sha256_hex};

/// The file every subject finds installed.
const CONTENT: &str = "port = 8080\n";

/// One row of the table: what to load and how to ask it.
struct Subject {
    name: &'static str,
    manifest: PathBuf,
    guest_dir: &'static str,
    update_type: &'static str,
    context: String,
    payloads: Vec<PayloadInfo>,
}

struct Row {
    name: &'static str,
    size: u64,
    cold: Duration,
    cached: Duration,
    call: Duration,
}

fn main() {
    let quick = std::env::var_os("OTABOX_BENCH_QUICK").is_some()
        || !std::env::args().any(|a| a == "--bench");
    // Enough loads and calls that the medians settle to a few per cent
    // (printed to 10 us and 0.1 us), so two revisions can be compared.
    let (colds, loads, calls) = if quick { (1, 2, 20) } else { (3, 30, 1000) };
    // OTABOX_BENCH_COLDS=1: one cold compile per subject (it fills the cache
    // for the rest), for comparisons of the cached load and the call only.
    let colds = std::env::var("OTABOX_BENCH_COLDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|&n: &usize| n >= 1)
        .unwrap_or(colds);
    let scratch =
        std::env::temp_dir().join(format!("otabox-bench-languages-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).expect("scratch");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio");
    let rows = rt.block_on(async {
        let mut rows = Vec::new();
        for subject in subjects(&scratch) {
            rows.push(measure(&scratch, &subject, colds, loads, calls).await);
        }
        rows
    });
    print_table(&rows);
    calibration::Calibration::measure(&std::env::temp_dir()).print();
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The Rust `file` handler and every language whose toolchain is here.
fn subjects(scratch: &Path) -> Vec<Subject> {
    let file_dir = scratch.join("rust");
    std::fs::create_dir_all(&file_dir).expect("dir");
    for ext in ["wasm", "toml"] {
        std::fs::copy(
            Path::new(env!("OTABOX_BUILT_HANDLERS")).join(format!("file.{ext}")),
            file_dir.join(format!("file.{ext}")),
        )
        .expect("the built file handler");
    }
    let mut subjects = vec![Subject {
        name: "Rust (file handler, reference)",
        manifest: file_dir.join("file.toml"),
        guest_dir: "/var/lib/otabox/files",
        update_type: "otabox/file:1",
        context: serde_json::json!({"name": "app", "version": "1", "payload": "app.conf",
            "destination": "/var/lib/otabox/files/app.conf"})
        .to_string(),
        payloads: vec![PayloadInfo {
            name: "app.conf".into(),
            size: CONTENT.len() as u64,
            sha256: sha256_hex(CONTENT.as_bytes()),
        }],
    }];
    for language in Language::ALL {
        let Some(built) = language.build() else {
            continue;
        };
        subjects.push(Subject {
            name: match language {
                Language::Python => "Python (componentize-py)",
                Language::JavaScript => "JavaScript (componentize-js)",
                Language::JavaScriptQuickJs => "JavaScript (QuickJS)",
                Language::C => "C (wit-bindgen, zig)",
            },
            manifest: built.join("config-file.toml"),
            guest_dir: "/etc/example",
            update_type: "example/config-file:1",
            context: serde_json::json!({"path": "/etc/example/app.conf", "version": "1",
                "content": CONTENT})
            .to_string(),
            payloads: Vec::new(),
        });
    }
    subjects
}

async fn measure(scratch: &Path, s: &Subject, colds: usize, loads: usize, calls: usize) -> Row {
    let size = std::fs::metadata(s.manifest.with_extension("wasm"))
        .expect("wasm")
        .len();
    let files = scratch.join(format!("files-{}", s.name.len()));
    std::fs::create_dir_all(&files).expect("files");
    std::fs::write(files.join("app.conf"), CONTENT).expect("installed file");
    let mut grant = DeviceGrant::default();
    grant.mounts.insert(s.guest_dir.into(), files);

    let mut cold = Vec::new();
    let cache = scratch.join("cache");
    for _ in 0..colds {
        let _ = std::fs::remove_dir_all(&cache);
        let runtime = Runtime::new(Some(cache.clone())).expect("runtime");
        let started = Instant::now();
        runtime
            .load_handler(&s.manifest, Some(&grant))
            .await
            .unwrap_or_else(|e| panic!("{}: {e:#}", s.name));
        cold.push(started.elapsed());
    }
    let mut cached = Vec::new();
    let mut handler: Option<Handler> = None;
    for _ in 0..loads {
        let runtime = Runtime::new(Some(cache.clone())).expect("runtime");
        let started = Instant::now();
        let h = runtime
            .load_handler(&s.manifest, Some(&grant))
            .await
            .expect("cached load");
        cached.push(started.elapsed());
        handler = Some(h);
    }
    let handler = handler.expect("loaded");
    let ctx = StepContext {
        job_id: "bench".into(),
        step: 0,
        update_type: s.update_type.into(),
        manifest: s.context.clone(),
        payloads: s.payloads.clone(),
        config: "{}".into(),
        installed_criteria: None,
    };
    let mut call = Vec::new();
    for _ in 0..calls {
        let started = Instant::now();
        let answer = handler
            .is_installed(CallScope::default(), &ctx)
            .await
            .expect("call");
        call.push(started.elapsed());
        assert_eq!(answer.ok(), Some(true), "{}", s.name);
    }
    Row {
        name: s.name,
        size,
        cold: median(&cold),
        cached: median(&cached),
        call: median(&call),
    }
}

fn median(samples: &[Duration]) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn print_table(rows: &[Row]) {
    println!("| handler | component size | cold compile | cached load | is-installed call |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {:.0} ms | {:.2} ms | {:.1} us |",
            r.name,
            size(r.size),
            r.cold.as_secs_f64() * 1e3,
            r.cached.as_secs_f64() * 1e3,
            r.call.as_secs_f64() * 1e6
        );
    }
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{} KiB", bytes / 1024)
    }
}
