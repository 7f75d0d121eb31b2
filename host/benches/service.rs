//! The installed package under a real systemd (a bookworm container booted
//! with systemd-nspawn, as in tests/systemd_service.rs), in one run:
//!
//! - package size and stripped binary size;
//! - `systemctl start` → READY=1 (subscribed), from systemd's own
//!   timestamps (InactiveExit → ActiveEnter), with the handlers loaded from
//!   the cache postinst filled (goal ≤ 150 ms);
//! - idle resident memory of the service with the four first-party
//!   handlers loaded (goal ≤ 12 MB; tedge-agent 21.4 MB), and where it is
//!   (the binary's code and data, the handlers' code, libraries, anonymous).
//!
//! The package measured is `OTABOX_DEB` when set (`make deb` leaves it in
//! `$CARGO_TARGET_DIR/debian`: the device build), else one made
//! from this bench's own binary. Needs root (skipped otherwise). Run with
//! `make bench`; without `--bench` (as `make test` runs it) it makes a short
//! smoke run.

#[path = "../tests/common/languages.rs"]
#[allow(dead_code)]
mod languages;
#[path = "../tests/common/nspawn.rs"]
#[allow(dead_code)]
mod nspawn;
#[path = "../tests/common/package.rs"]
#[allow(dead_code)]
mod package;
#[path = "../tests/common/services.rs"]
#[allow(dead_code)]
mod services;

#[path = "support/calibration.rs"]
mod calibration;

use std::path::PathBuf;
use std::time::Duration;

use calibration::Calibration;
use nspawn::Container;
use services::Mosquitto;

/// The firmware handler's board description for the bench: a GRUB
/// environment file and the booted-slot directory, so all four handlers load.
const FIRMWARE: &str = "\n[handlers.firmware]\nenabled = true\n\
    config = { compatible = \"bench\", bootloader = { kind = \"grub\", env = \"/var/lib/otabox-bench/grubenv\" } }\n";

fn main() {
    let quick = std::env::var_os("OTABOX_BENCH_QUICK").is_some()
        || !std::env::args().any(|a| a == "--bench");
    let tools: Vec<&str> = [nspawn::TOOLS, package::PACKAGE_TOOLS, &["mosquitto"]].concat();
    if !package::ready("the service benchmark", &tools) {
        return;
    }
    let starts = if quick { 3 } else { 15 };
    let dir = tempfile::tempdir().expect("tempdir");
    let (deb, which) = match std::env::var_os("OTABOX_DEB") {
        Some(deb) => (PathBuf::from(deb), "OTABOX_DEB"),
        None => (
            package::build_deb(dir.path(), "0.1.0-1"),
            "built from this bench's binary, fast compression",
        ),
    };
    let broker = Mosquitto::start(&dir.path().join("broker"));
    let ct = Container::boot(dir.path());
    std::fs::copy(&deb, ct.path("/root/otabox.deb")).expect("copy the package in");
    ct.ok("dpkg -i /root/otabox.deb");
    ct.ok(&format!(
        "sed -i -e 's/^# id = .*/id = \"bench-1\"/' -e 's/^# port = 1883/port = {}/' \
         -e '/^\\[handlers.firmware\\]/,$d' /etc/otabox/device.toml \
         && printf '{FIRMWARE}' >> /etc/otabox/device.toml \
         && mkdir -p /var/lib/otabox-bench /run/otabox && : > /var/lib/otabox-bench/grubenv",
        broker.port
    ));

    let mut ready = Vec::new();
    for _ in 0..=starts {
        // reset-failed: starts in a row would hit the unit's start limit.
        ct.ok("systemctl stop otabox && systemctl reset-failed otabox && systemctl start otabox");
        let since = |name: &str| -> u64 {
            ct.property("otabox", name)
                .parse()
                .unwrap_or_else(|_| panic!("{name} is no number"))
        };
        let micros =
            since("ActiveEnterTimestampMonotonic") - since("InactiveExitTimestampMonotonic");
        ready.push(Duration::from_micros(micros));
    }
    ready.remove(0); // the first start after the install warms the page cache
    ready.sort();
    std::thread::sleep(Duration::from_secs(if quick { 2 } else { 10 }));
    let journal = ct.journal("otabox");
    let loaded = journal
        .lines()
        .rev()
        .find(|l| l.contains(" handler(s), "))
        .unwrap_or("(no start line)")
        .to_string();
    let rss_kib: u64 = ct
        .ok("grep VmRSS /proc/$(systemctl show -p MainPID --value otabox)/status")
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("VmRSS");
    let binary: u64 = ct
        .ok("stat -c %s /usr/bin/otabox")
        .trim()
        .parse()
        .expect("binary size");
    let package = std::fs::metadata(&deb).expect("package").len();

    let mb = |bytes: u64| format!("{:.1} MB", bytes as f64 / 1e6);
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    let median = ready[ready.len() / 2];
    println!("otabox service benchmark (package: {which})");
    println!("{:<58} {:>10}", "package size", mb(package));
    println!("{:<58} {:>10}", "/usr/bin/otabox, stripped", mb(binary));
    println!(
        "{:<58} {:>10} {:>10}",
        format!("systemctl start -> READY=1 (n={})", ready.len()),
        ms(median),
        ms(ready[(ready.len() - 1) * 9 / 10])
    );
    println!(
        "{:<58} {:>10}",
        "idle resident memory of the service",
        format!("{:.1} MiB", rss_kib as f64 / 1024.0)
    );
    println!("{}", memory_breakdown(&ct));
    println!("agent's start line: {}", loaded.trim());
    Calibration::measure(dir.path()).print();
    if quick {
        println!("smoke run: judge the goals with `make bench` (release, full run)");
        return;
    }
    let verdict = |ok: bool| if ok { "goal met" } else { "GOAL MISSED" };
    println!(
        "start -> READY {} (goal <= 150 ms): {}",
        ms(median),
        verdict(median <= Duration::from_millis(150))
    );
    println!(
        "idle RSS {:.1} MiB (goal <= 12 MB; tedge-agent 21.4 MB): {}",
        rss_kib as f64 / 1024.0,
        verdict(rss_kib * 1024 <= 12_000_000)
    );
}

/// Where the idle service's resident memory is, from its smaps: the
/// otabox binary's code and its other pages, the handlers' compiled code
/// (`.cwasm`, mapped from the cache or the package), shared libraries, and
/// anonymous memory (heap, stacks).
fn memory_breakdown(ct: &Container) -> String {
    let smaps = ct.ok("cat /proc/$(systemctl show -p MainPID --value otabox)/smaps");
    let (mut mapping, mut perms) = (String::new(), String::new());
    let mut kib = std::collections::BTreeMap::<&str, u64>::new();
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields
            .first()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            perms = fields.get(1).unwrap_or(&"").to_string();
            mapping = fields.get(5).unwrap_or(&"").to_string();
        } else if fields.first() == Some(&"Rss:") {
            let rss: u64 = fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
            let part = if mapping == "/usr/bin/otabox" && perms.contains('x') {
                "binary code"
            } else if mapping == "/usr/bin/otabox" {
                "binary data"
            } else if mapping.ends_with(".cwasm") {
                "handler code"
            } else if mapping.contains(".so") {
                "libraries"
            } else {
                "anonymous"
            };
            *kib.entry(part).or_default() += rss;
        }
    }
    let parts: Vec<String> = kib
        .iter()
        .map(|(part, k)| format!("{part} {:.1}", *k as f64 / 1024.0))
        .collect();
    format!("  of which (MiB): {}", parts.join(", "))
}
