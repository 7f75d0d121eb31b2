//! apt handler benchmark, in one run against a real signed repository
//! served by nginx on loopback, installing into fresh scratch roots:
//!
//! 1. a 10-package manifest's install phase through the handler (a fresh
//!    component instance, the manifest parsed, `apt-get install` through the
//!    process capability) against the same `apt-get install` command run
//!    directly — goal: overhead ≤ 5%;
//! 2. the whole step through the workflow (validate, is-installed,
//!    `apt-get update`, `--download-only`, the backup's simulation, install,
//!    verify, commit) against `apt-get update`, `--download-only` and
//!    `install` run directly, for the cost of the extra checks.
//!
//! Each round prepares both roots the same way (untimed), and the order of
//! the two alternates. `make bench` runs 15 rounds; without `--bench` it is a
//! one-round smoke run.

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "support/calibration.rs"]
mod calibration;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::apt::{self as apt, AptRepo, Sysroot, apt_handler, deb};
use otabox::runtime::{CallScope, Outcome, Phase, StepContext};
use otabox::step::{StepRequest, StepResult, run_step};
use otabox_sdk::FromJson;

const PACKAGES: usize = 10;
/// Files per package and bytes per file: a small daemon's worth.
const FILES: usize = 20;
const FILE_BYTES: usize = 16 << 10;

fn main() {
    let quick = std::env::var_os("OTABOX_BENCH_QUICK").is_some()
        || !std::env::args().any(|a| a == "--bench");
    let rounds = if quick { 1 } else { 15 };
    let dir = std::env::temp_dir().join(format!("otabox-apt-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let repo = AptRepo::start(&dir);
    repo.add(&packages());
    repo.publish();
    let names: Vec<String> = (0..PACKAGES).map(|i| format!("bench-pkg{i}")).collect();
    let targets: Vec<String> = names.iter().map(|n| format!("{n}=1.0")).collect();
    let manifest = serde_json::json!({
        "name": "bench", "version": "1",
        "packages": names.iter().map(|n| serde_json::json!({"name": n, "version": "1.0"})).collect::<Vec<_>>(),
    })
    .to_string();

    let (rt, runtime) = common::bench_runtimes(&dir);

    let mut install = Timings::default();
    let mut step = Timings::default();
    for round in 0..rounds {
        let handler_first = round % 2 == 0;
        for handler_turn in [handler_first, !handler_first] {
            let base = dir.join(format!("r{round}-{}", if handler_turn { "h" } else { "d" }));
            // 1. the install phase against the same command.
            let sys = fresh_root(&base.join("install"), &repo);
            prepare(&sys, &targets);
            let elapsed = if handler_turn {
                let handler = rt.block_on(apt_handler(&runtime, &base.join("install"), &sys));
                // A step's scope: the handler keeps the targets it spelled
                // in a checkpoint (none yet: install spells them itself).
                let job_dir = base.join("install-job");
                let _ = std::fs::remove_dir_all(&job_dir);
                let scope = CallScope::for_step("bench", 0, &job_dir, Vec::new());
                let ctx = StepContext {
                    job_id: "bench".into(),
                    step: 0,
                    update_type: "otabox/apt:1".into(),
                    manifest: manifest.clone(),
                    payloads: Vec::new(),
                    config: sys.config().to_string(),
                    installed_criteria: None,
                };
                let started = Instant::now();
                let outcome = rt
                    .block_on(handler.run_phase(Phase::Install, scope.clone(), &ctx))
                    .expect("install call");
                let elapsed = started.elapsed();
                assert!(matches!(outcome, Outcome::Success), "{outcome:?}");
                elapsed
            } else {
                let started = Instant::now();
                apt_get(&sys, &install_args(&targets));
                started.elapsed()
            };
            assert_eq!(sys.version_of("bench-pkg9").as_deref(), Some("1.0"));
            install.push(handler_turn, elapsed);

            // 2. the whole step against update + download + install.
            let sys = fresh_root(&base.join("step"), &repo);
            let elapsed = if handler_turn {
                let handler = rt.block_on(apt_handler(&runtime, &base.join("step"), &sys));
                let request = StepRequest {
                    job_id: "bench".into(),
                    step: 0,
                    update_type: "otabox/apt:1".into(),
                    manifest: manifest.clone(),
                    payloads: Vec::new(),
                    job_dir: base.join("step/job"),
                    cancel: Default::default(),
                };
                let started = Instant::now();
                let report = rt
                    .block_on(run_step(&handler, request, None))
                    .expect("step");
                let elapsed = started.elapsed();
                assert!(
                    matches!(report.result, StepResult::Installed { .. }),
                    "{:?}",
                    report.result
                );
                elapsed
            } else {
                let started = Instant::now();
                apt_get(
                    &sys,
                    &["-q", "-o", "APT::Update::Error-Mode=any", "update"].map(String::from),
                );
                apt_get(
                    &sys,
                    &otabox_handler_apt::apt::install_arguments(&["--download-only"], &targets),
                );
                apt_get(&sys, &install_args(&targets));
                started.elapsed()
            };
            assert_eq!(sys.version_of("bench-pkg9").as_deref(), Some("1.0"));
            step.push(handler_turn, elapsed);
            let _ = std::fs::remove_dir_all(&base);
        }
    }
    drop(repo);
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "otabox apt benchmark ({PACKAGES} packages of {FILES} x {} KiB, {rounds} round(s))",
        FILE_BYTES >> 10
    );
    println!(
        "{:<52} {:>9} {:>9} {:>9} {:>9}",
        "", "direct", "handler", "overhead", "paired"
    );
    install.print("install phase vs the same apt-get install", Some(5.0));
    step.print("whole step vs apt-get update + download + install", None);
    calibration::Calibration::measure(&std::env::temp_dir()).print();
}

/// Ten packages, each with its own files.
fn packages() -> Vec<apt::Deb> {
    (0..PACKAGES)
        .map(|i| {
            let mut p = deb(&format!("bench-pkg{i}"), "1.0");
            for f in 0..FILES {
                let content: String =
                    std::iter::repeat_n(char::from(b'a' + (f % 26) as u8), FILE_BYTES).collect();
                p = p.file(&format!("usr/share/bench-pkg{i}/data{f}"), &content, 0o644);
            }
            p
        })
        .collect()
}

fn fresh_root(dir: &Path, repo: &AptRepo) -> Sysroot {
    std::fs::create_dir_all(dir).expect("round dir");
    Sysroot::new(dir, repo)
}

/// Lists and archives in place, as after the handler's download phase.
fn prepare(sys: &Sysroot, targets: &[String]) {
    apt_get(
        sys,
        &["-q", "-o", "APT::Update::Error-Mode=any", "update"].map(String::from),
    );
    apt_get(
        sys,
        &otabox_handler_apt::apt::install_arguments(&["--download-only"], targets),
    );
}

/// The install arguments the handler uses.
fn install_args(targets: &[String]) -> Vec<String> {
    otabox_handler_apt::apt::install_arguments(&[], targets)
}

/// apt-get on `sys`'s root with the options the handler derives.
fn apt_get(sys: &Sysroot, args: &[String]) {
    let config =
        otabox_handler_apt::config::AptConfig::parse(&sys.config().to_string()).expect("config");
    let out = Command::new("/usr/bin/apt-get")
        .args(config.apt_options())
        .args(args)
        .env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("LANG", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .env("APT_CONFIG", sys.root.join("etc/apt/apt.conf"))
        .output()
        .expect("apt-get");
    assert!(
        out.status.success(),
        "apt-get {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Default)]
struct Timings {
    direct: Vec<Duration>,
    handler: Vec<Duration>,
}

impl Timings {
    fn push(&mut self, handler: bool, d: Duration) {
        if handler {
            self.handler.push(d);
        } else {
            self.direct.push(d);
        }
    }

    /// Medians of each side, their ratio, and the median of the per-round
    /// ratios (each round's two runs share the machine's state of the
    /// moment, so the paired figure cancels drift between rounds).
    fn print(&self, what: &str, goal: Option<f64>) {
        let (direct, handler) = (common::median(&self.direct), common::median(&self.handler));
        let overhead = |d: f64, h: f64| (h / d - 1.0) * 100.0;
        let mut paired: Vec<f64> = self
            .direct
            .iter()
            .zip(&self.handler)
            .map(|(d, h)| overhead(d.as_secs_f64(), h.as_secs_f64()))
            .collect();
        paired.sort_by(f64::total_cmp);
        println!(
            "{what:<52} {:>6.0} ms {:>6.0} ms {:>+8.1}% {:>+8.1}%{}",
            direct.as_secs_f64() * 1e3,
            handler.as_secs_f64() * 1e3,
            overhead(direct.as_secs_f64(), handler.as_secs_f64()),
            paired[paired.len() / 2],
            goal.map_or(String::new(), |g| format!("  (goal <= {g}%)"))
        );
        let ms = |d: &[Duration]| {
            d.iter()
                .map(|x| format!("{:.0}", x.as_secs_f64() * 1e3))
                .collect::<Vec<_>>()
                .join(" ")
        };
        println!(
            "    samples, ms: direct [{}] handler [{}]",
            ms(&self.direct),
            ms(&self.handler)
        );
    }
}
