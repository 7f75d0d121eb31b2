//! Download benchmark, in one run against nginx on loopback:
//!
//! - `curl -s URL | sha256sum` (the pipeline to match);
//! - the agent's downloader: stream to the job folder, hash on the fly,
//!   fsync, rename;
//!
//! with the goal: throughput ≥ 1.0× the pipeline, and the process's peak
//! resident memory at most 32 MB above its level before the download.
//! `make bench` runs it on 1 GiB; without `--bench` it is a 64 MiB smoke run.

#[path = "../tests/common/services.rs"]
#[allow(dead_code)]
mod services;

#[path = "support/calibration.rs"]
mod calibration;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use otabox::download::{DownloadOptions, Downloader};
use otabox::shadow::FileSpec;
use services::Nginx;
use sha2::{Digest, Sha256};

fn main() {
    let quick = std::env::var_os("OTABOX_BENCH_QUICK").is_some()
        || !std::env::args().any(|a| a == "--bench");
    let size: u64 = if quick { 64 << 20 } else { 1 << 30 };
    let dir = std::env::temp_dir().join(format!("otabox-download-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let nginx = Nginx::start(&dir.join("nginx"));
    let sha256 = write_payload(&nginx.www.join("big.bin"), size);
    let url = nginx.url("big.bin");

    let started = Instant::now();
    let pipeline = Command::new("sh")
        .arg("-c")
        .arg(format!("curl -s {url} | sha256sum"))
        .stdout(Stdio::piped())
        .output()
        .expect("curl | sha256sum");
    let curl_time = started.elapsed();
    let curl_hash = String::from_utf8_lossy(&pipeline.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(curl_hash, sha256, "the pipeline saw other bytes");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio");
    let downloader = Downloader::new(DownloadOptions::default()).expect("client");
    let file = FileSpec {
        name: "big.bin".into(),
        url,
        size,
        sha256,
        token: None,
    };
    let dest = dir.join("job/big.bin");
    let before = rss_kib("VmRSS");
    let started = Instant::now();
    rt.block_on(downloader.fetch(&file, &dest, None))
        .expect("download");
    let ours = started.elapsed();
    let peak = rss_kib("VmHWM");
    let _ = std::fs::remove_dir_all(&dir);

    let mib = size as f64 / (1 << 20) as f64;
    let rate = |d: Duration| mib / d.as_secs_f64();
    println!(
        "otabox download benchmark ({} MiB over loopback from nginx)",
        mib as u64
    );
    println!("{:<52} {:>10} {:>12}", "", "time", "throughput");
    println!(
        "{:<52} {:>8.2} s {:>8.0} MiB/s",
        "curl -s URL | sha256sum",
        curl_time.as_secs_f64(),
        rate(curl_time)
    );
    println!(
        "{:<52} {:>8.2} s {:>8.0} MiB/s",
        "otabox downloader (stream, sha256, fsync, rename)",
        ours.as_secs_f64(),
        rate(ours)
    );
    println!(
        "{:<52} {:>10}",
        "peak resident memory above the level before",
        format!("{:.1} MB", peak.saturating_sub(before) as f64 / 1024.0)
    );
    calibration::Calibration::measure(&std::env::temp_dir()).print();
    if quick || cfg!(debug_assertions) {
        println!("smoke run: judge the goals with `make bench` (release, 1 GiB)");
        return;
    }
    let ratio = rate(ours) / rate(curl_time);
    let verdict = |ok: bool| if ok { "goal met" } else { "GOAL MISSED" };
    println!();
    println!(
        "throughput {ratio:.2}x the pipeline (goal >= 1.0x): {}",
        verdict(ratio >= 1.0)
    );
    println!(
        "peak memory +{:.1} MB (goal <= 32 MB): {}",
        peak.saturating_sub(before) as f64 / 1024.0,
        verdict(peak.saturating_sub(before) <= 32 * 1024)
    );
}

/// Writes `size` pseudo-random bytes to `path`; returns their sha256.
fn write_payload(path: &std::path::Path, size: u64) -> String {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).expect("payload"));
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    for i in 0..size >> 20 {
        block[0..8].copy_from_slice(&i.to_le_bytes());
        hasher.update(&block);
        file.write_all(&block).expect("write");
    }
    file.flush().expect("flush");
    hex::encode(hasher.finalize())
}

/// A memory figure of this process from /proc/self/status, in KiB.
fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(&format!("{field}:"))
                    .map(|v| v.trim().trim_end_matches(" kB").trim().to_string())
            })
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
