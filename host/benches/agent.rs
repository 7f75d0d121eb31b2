//! Agent benchmarks through a real mosquitto on loopback, in one run:
//!
//! - start → subscribed, with a warm compiled-handler cache (goal ≤ 100 ms):
//!   from spawning `otabox run` to its online report arriving (it is
//!   published after the subscriptions);
//! - idle resident memory with three handlers loaded (goal ≤ 15 MB);
//! - desired-state delta → acknowledgement for an update that is already
//!   installed (goal: median ≤ 20 ms).
//!
//! Peer figures from a machine of this kind (thin-edge.io 2.0.1): agent idle
//! RSS 21.4 MB; `software_list` request → successful over MQTT 42 ms.
//! Run with `make bench`; without `--bench` (as `make test` runs it) it makes
//! a short smoke run.

#[path = "../tests/common/services.rs"]
#[allow(dead_code)]
mod services;

#[path = "support/calibration.rs"]
mod calibration;

use std::path::Path;
use std::time::{Duration, Instant};

use calibration::Calibration;
use otabox::runtime::sha256_hex;
use services::{AgentProcess, Message, Mosquitto, TestClient};

const WAIT: Duration = Duration::from_secs(30);

fn main() {
    let quick = std::env::var_os("OTABOX_BENCH_QUICK").is_some()
        || !std::env::args().any(|a| a == "--bench");
    let (starts, jobs) = if quick { (3, 10) } else { (15, 200) };
    let dir = std::env::temp_dir().join(format!("otabox-agent-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let broker = Mosquitto::start(&dir.join("broker"));
    let config = lay_out(&dir, broker.port);
    let cloud = TestClient::connect(
        broker.port,
        "bench-cloud",
        &["state/dev-1/update", "bench/echo"],
    );

    let mut start_times = Vec::new();
    let mut rss_kib;
    for i in 0..=starts {
        let started = Instant::now();
        let mut agent = AgentProcess::start(&config);
        cloud.wait_for(WAIT, "the online report", online);
        if i > 0 {
            start_times.push(started.elapsed());
        }
        if i == starts {
            std::thread::sleep(Duration::from_secs(2));
            rss_kib = rss(&agent);
            deploy_latency(&cloud, &dir, jobs, &mut agent, rss_kib, &start_times, quick);
        }
    }
    if std::env::var_os("OTABOX_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

fn deploy_latency(
    cloud: &TestClient,
    dir: &Path,
    jobs: usize,
    agent: &mut AgentProcess,
    rss_kib: u64,
    start_times: &[Duration],
    quick: bool,
) {
    let content = b"installed = true\n";
    let payload = dir.join("payload.conf");
    std::fs::write(&payload, content).expect("payload");
    let delta = |n: usize| {
        serde_json::json!({"version": n + 1, "state": {"deployment": {
            "schema": 1, "jobId": format!("job-{n}"), "version": "1.0",
            "steps": [{"updateType": "otabox/file:1",
                "manifest": {"name": "app", "version": "1", "payload": "app.conf", "destination": "/var/lib/otabox/files/app.conf"},
                "files": [{"name": "app.conf", "url": format!("file://{}", payload.display()), "size": content.len(), "sha256": sha256_hex(content)}]}]
        }}})
        .to_string()
    };
    cloud.publish("state/dev-1/update/delta", delta(0));
    cloud.wait_for(WAIT, "the first install", |m| is_ack(m, "job-0"));
    let mut latencies = Vec::new();
    for n in 1..=jobs {
        let job = format!("job-{n}");
        let sent = Instant::now();
        cloud.publish("state/dev-1/update/delta", delta(n));
        let ack = cloud.wait_for(WAIT, "an ack", |m| is_ack(m, &job));
        latencies.push(sent.elapsed());
        assert_eq!(ack.json["status"], "SUCCESS", "{}", agent.log());
    }
    // The broker's share: the same client publishing to itself through
    // mosquitto (one round trip, no agent).
    let mut echoes = Vec::new();
    for n in 0..jobs {
        let sent = Instant::now();
        cloud.publish("bench/echo", format!("{{\"echo\":{n}}}"));
        cloud.wait_for(WAIT, "the echo", |m| m.json.get("echo") == Some(&n.into()));
        echoes.push(sent.elapsed());
    }
    echoes.sort();
    let calibration = Calibration::measure(dir);
    report(start_times, rss_kib, &mut latencies, quick);
    let median = |v: &[Duration]| v[v.len() / 2];
    let ms = |d: Duration| format!("{:.2} ms", d.as_secs_f64() * 1e3);
    println!(
        "{:<58} {:>10}",
        "broker round trip alone (echo, median)",
        ms(median(&echoes))
    );
    println!(
        "{:<58} {:>10}",
        "delta -> ack, agent's share (median - echo median)",
        ms(median(&latencies).saturating_sub(median(&echoes)))
    );
    calibration.print();
}

fn report(start_times: &[Duration], rss_kib: u64, latencies: &mut [Duration], quick: bool) {
    let mut starts = start_times.to_vec();
    starts.sort();
    latencies.sort();
    let median = |v: &[Duration]| v[v.len() / 2];
    let p90 = |v: &[Duration]| v[(v.len() - 1) * 9 / 10];
    let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
    println!(
        "otabox agent benchmark ({} build, mosquitto on loopback)",
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    println!("{:<58} {:>10} {:>10}", "", "median", "p90");
    println!(
        "{:<58} {:>10} {:>10}",
        format!("start -> subscribed, warm cache (n={})", starts.len()),
        ms(median(&starts)),
        ms(p90(&starts))
    );
    println!(
        "{:<58} {:>10} {:>10}",
        format!("delta -> ack, already installed (n={})", latencies.len()),
        ms(median(latencies)),
        ms(p90(latencies))
    );
    println!(
        "{:<58} {:>10}",
        "idle resident memory, 3 handlers loaded",
        format!("{:.1} MB", rss_kib as f64 / 1024.0)
    );
    if quick || cfg!(debug_assertions) {
        println!("smoke run: judge the goals with `make bench` (release, full run)");
        return;
    }
    let verdict = |ok: bool| if ok { "goal met" } else { "GOAL MISSED" };
    println!();
    println!(
        "start -> subscribed {} (goal <= 100 ms): {}",
        ms(median(&starts)),
        verdict(median(&starts) <= Duration::from_millis(100))
    );
    println!(
        "delta -> ack {} (goal <= 20 ms; thin-edge software_list 42 ms): {}",
        ms(median(latencies)),
        verdict(median(latencies) <= Duration::from_millis(20))
    );
    println!(
        "idle RSS {:.1} MB (goal <= 15 MB; tedge-agent 21.4 MB): {}",
        rss_kib as f64 / 1024.0,
        verdict(rss_kib <= 15 * 1024)
    );
}

fn is_ack(m: &Message, job: &str) -> bool {
    m.json.get("jobId").and_then(|j| j.as_str()) == Some(job) && m.json.get("status").is_some()
}

fn online(m: &Message) -> bool {
    m.json
        .pointer("/state/reported/deployment/agent/state")
        .and_then(|s| s.as_str())
        == Some("idle")
        && m.json
            .pointer("/state/reported/deployment/lastResult")
            .is_none()
}

/// VmRSS of the agent process, in KiB.
fn rss(agent: &AgentProcess) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// A device with three handlers: file, hostile and counter (the hostile
/// guest under a second update type).
fn lay_out(dir: &Path, port: u16) -> std::path::PathBuf {
    let handlers = dir.join("handlers");
    std::fs::create_dir_all(&handlers).expect("handlers");
    let built = Path::new(env!("OTABOX_BUILT_HANDLERS"));
    let guest_caps = format!(
        "[[filesystem]]\npath = \"{}\"\naccess = \"rw\"\n[[commands]]\nprogram = \"/bin/true\"\n[network]\nhosts = [\"127.0.0.1\"]\n",
        dir.display()
    );
    for (name, guest, update_type, caps) in [
        (
            "file",
            "file",
            "otabox/file:1",
            "[[filesystem]]\npath = \"/var/lib/otabox/files\"\naccess = \"rw\"\n".to_string(),
        ),
        (
            "hostile",
            "hostile",
            "otabox-test/hostile:1",
            guest_caps.clone(),
        ),
        ("counter", "hostile", "otabox-test/counter:1", guest_caps),
    ] {
        let wasm = std::fs::read(built.join(format!("{guest}.wasm"))).expect("built guest");
        std::fs::write(handlers.join(format!("{name}.wasm")), &wasm).expect("wasm");
        let toml = format!(
            "[handler]\nupdate_types = [\"{update_type}\"]\nsha256 = \"{}\"\n{caps}",
            sha256_hex(&wasm)
        );
        std::fs::write(handlers.join(format!("{name}.toml")), toml).expect("manifest");
    }
    let config = dir.join("device.toml");
    std::fs::write(
        &config,
        format!(
            "[device]\nid = \"dev-1\"\n[paths]\nhandlers = \"handlers\"\nstate = \"state\"\n\
             [mqtt]\nport = {port}\nreconnect_min_ms = 50\n\
             [handlers.file.mounts]\n\"/var/lib/otabox/files\" = \"files\"\n"
        ),
    )
    .expect("device.toml");
    config
}
