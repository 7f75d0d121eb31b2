//! A CPU and disk calibration printed beside every benchmark's figures: this
//! machine's speed varies from day to day, and the figures scale with it.

use std::path::Path;
use std::time::{Duration, Instant};

/// This machine's speed today: the figures scale with both.
pub struct Calibration {
    /// sha256 throughput of one core, MB/s.
    pub sha256_mb_s: f64,
    /// One write + fsync of a small file in the state directory's
    /// filesystem, median.
    pub fsync: Duration,
}

impl Calibration {
    /// Measures both figures, probing fsync in `dir`.
    pub fn measure(dir: &Path) -> Self {
        use sha2::Digest;
        let data = vec![0x5au8; 64 << 20];
        let start = Instant::now();
        std::hint::black_box(sha2::Sha256::digest(&data));
        let sha256_mb_s = 64.0 * 1.048_576 / start.elapsed().as_secs_f64();
        let path = dir.join("fsync-probe");
        let mut times: Vec<Duration> = (0..50)
            .map(|i| {
                use std::io::Write;
                let start = Instant::now();
                let mut f = std::fs::File::create(&path).expect("probe");
                f.write_all(format!("{i}").as_bytes()).expect("write");
                f.sync_all().expect("fsync");
                start.elapsed()
            })
            .collect();
        times.sort();
        Self {
            sha256_mb_s,
            fsync: times[times.len() / 2],
        }
    }

    /// Prints the one calibration line.
    pub fn print(&self) {
        println!(
            "calibration: sha256 {:.0} MB/s on one core; write + fsync of a small file {:.2} ms (median)",
            self.sha256_mb_s,
            self.fsync.as_secs_f64() * 1e3
        );
    }
}
