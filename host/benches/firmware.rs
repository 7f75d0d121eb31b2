//! Firmware benchmark, in one run: a 512 MiB image into a slot file
//!
//! - through the firmware handler: the step workflow up to the reboot
//!   request (validate, is-installed, backup of the GRUB environment,
//!   install = the host's `devices.write-image`: stream, fsync, read back,
//!   sha256; apply = `grub-editenv set`), with the payload already verified
//!   as the downloader leaves it;
//! - against `dd if=IMAGE of=SLOT bs=1M conv=fsync,notrunc` + `sha256sum
//!   IMAGE` of the same image into a slot of the same size;
//!
//! with the goal: the handler's throughput ≥ 0.9× the pair's. Rounds
//! alternate the order. `make bench` runs 3 rounds of 512 MiB; without
//! `--bench` it is a one-round 32 MiB smoke run.

#[path = "../tests/common/mod.rs"]
mod common;

#[path = "support/calibration.rs"]
mod calibration;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::firmware::{Board, COMPATIBLE, Loader, firmware_handler};
use common::{median, noise};
use otabox::runtime::{PayloadFile, Runtime, sha256_hex};
use otabox::step::{StepRequest, StepResult, run_step};

fn main() {
    let quick = std::env::var_os("OTABOX_BENCH_QUICK").is_some()
        || !std::env::args().any(|a| a == "--bench");
    let (size, rounds) = if quick {
        (32usize << 20, 1)
    } else {
        (512 << 20, 3)
    };
    let dir = std::env::temp_dir().join(format!("otabox-firmware-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    let image = dir.join("rootfs.img");
    let sha256 = write_image(&image, size);

    let (rt, runtime) = common::bench_runtimes(&dir);

    let mut ours = Vec::new();
    let mut peer = Vec::new();
    for round in 0..rounds {
        let handler_first = round % 2 == 0;
        for handler_turn in [handler_first, !handler_first] {
            let base = dir.join(format!("r{round}-{}", if handler_turn { "h" } else { "d" }));
            std::fs::create_dir_all(&base).expect("round dir");
            if handler_turn {
                ours.push(through_handler(&rt, &runtime, &base, &image, size, &sha256));
            } else {
                peer.push(dd_and_sha256sum(&base, &image, size, &sha256));
            }
            let _ = std::fs::remove_dir_all(&base);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    let mib = size as f64 / f64::from(1 << 20);
    let (t_ours, t_peer) = (median(&ours), median(&peer));
    let rate = |d: Duration| mib / d.as_secs_f64();
    println!(
        "otabox firmware benchmark ({} MiB image into a slot file, {rounds} round(s), medians)",
        mib as u64
    );
    println!("{:<72} {:>9} {:>12}", "", "time", "throughput");
    println!(
        "{:<72} {:>7.2} s {:>8.0} MiB/s",
        "dd bs=1M conv=fsync + sha256sum",
        t_peer.as_secs_f64(),
        rate(t_peer)
    );
    println!(
        "{:<72} {:>7.2} s {:>8.0} MiB/s",
        "firmware handler, validate to apply (write, fsync, read back, sha256)",
        t_ours.as_secs_f64(),
        rate(t_ours)
    );
    println!(
        "{:<72} {:>8.2}x  (goal >= 0.9x)",
        "ratio",
        t_peer.as_secs_f64() / t_ours.as_secs_f64()
    );
    calibration::Calibration::measure(&std::env::temp_dir()).print();
}

fn through_handler(
    rt: &tokio::runtime::Runtime,
    runtime: &Runtime,
    base: &Path,
    image: &Path,
    size: usize,
    sha256: &str,
) -> Duration {
    let board = Board::new(base, Loader::Grub);
    for slot in ["A", "B"] {
        let file = std::fs::File::options()
            .write(true)
            .open(board.slot(slot))
            .expect("slot");
        file.set_len(slot_len(size)).expect("slot size");
    }
    let handler = rt.block_on(firmware_handler(runtime, base, &board, None));
    let request = StepRequest {
        job_id: "bench".into(),
        step: 0,
        update_type: "otabox/firmware:1".into(),
        manifest: serde_json::json!({"name": "rootfs", "version": "2", "compatible": COMPATIBLE, "image": "rootfs.img"})
            .to_string(),
        payloads: vec![(
            PayloadFile {
                name: "rootfs.img".into(),
                size: size as u64,
                sha256: sha256.into(),
                verified: Some(image.to_path_buf()),
            },
            image.to_path_buf(),
        )],
        job_dir: base.join("job"),
        cancel: Default::default(),
    };
    let started = Instant::now();
    let report = rt
        .block_on(run_step(&handler, request, None))
        .expect("step");
    let elapsed = started.elapsed();
    assert_eq!(
        report.result,
        StepResult::RebootRequired { deferred: false },
        "{:?}",
        report.phases
    );
    elapsed
}

fn dd_and_sha256sum(base: &Path, image: &Path, size: usize, sha256: &str) -> Duration {
    let slot = base.join("slot-b");
    std::fs::File::create(&slot)
        .and_then(|f| f.set_len(slot_len(size)))
        .expect("slot");
    let started = Instant::now();
    let dd = Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", slot.display()))
        .args(["bs=1M", "conv=fsync,notrunc", "status=none"])
        .status()
        .expect("dd");
    assert!(dd.success());
    let sum = Command::new("sha256sum")
        .arg(image)
        .output()
        .expect("sha256sum");
    let elapsed = started.elapsed();
    assert!(String::from_utf8_lossy(&sum.stdout).starts_with(sha256));
    elapsed
}

/// A slot 1 MiB larger than the image.
fn slot_len(size: usize) -> u64 {
    size as u64 + (1 << 20)
}

/// Writes `size` bytes that do not compress to nothing; returns their sha256.
fn write_image(path: &Path, size: usize) -> String {
    let bytes = noise(size, 0x9E37_79B9_7F4A_7C15);
    std::fs::write(path, &bytes).expect("image");
    sha256_hex(&bytes)
}
