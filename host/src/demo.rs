//! `otabox demo`: a self-contained walkthrough of an update with the
//! built-in `file` handler, in a scratch directory.
//!
//! Part 1 drives the lifecycle directly: audit, install, a repeat that is
//! already installed, a payload with a wrong hash refused before the
//! handler's download and install see it, a manifest pointing outside the grant stopped by the
//! sandbox and rolled back, and the inventory.
//!
//! Part 2 (when mosquitto is installed) runs the real thing: a broker on a
//! free loopback port, the reference replica, and an agent; a deployment
//! made with the fleet store travels as a delta, the agent reports each
//! state, acknowledges, and the replica confirms.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::audit::{Severity, audit_dirs, render_text};
use crate::builtin;
use crate::config::DeviceConfig;
use crate::runtime::{PayloadFile, ProgressSink, Runtime, sha256_hex};
use crate::step::{StepReport, StepRequest, StepResult, run_step};
use crate::{out, outln};

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
    outln!("otabox demo in {}\n", root.display())?;

    let runtime = Runtime::new(Some(config.cache_dir()))?;
    outln!("== otabox handlers audit\n")?;
    let dirs = config.paths.handlers.as_slice();
    let audits = audit_dirs(&runtime, dirs, &config.handlers).await?;
    out!("{}", render_text(&audits))?;
    anyhow::ensure!(
        audits.iter().all(|a| a.count(Severity::Error) == 0),
        "the built-in handler failed its audit"
    );

    let set = runtime.load_dirs(dirs, &config.handlers).await?;
    let handler = set
        .for_update_type("otabox/file:1")
        .context("the file handler did not load")?;
    let progress: ProgressSink = std::sync::Arc::new(|e| {
        if e.total > 0 && e.done == e.total {
            // A closed stdout stops the demo at its next line.
            let _ = outln!("    progress     {} {}/{} bytes", e.phase, e.done, e.total);
        }
    });

    let files = root.join("device/files");
    let v1 = b"greeting = \"hello\"\nversion = \"1.2.0\"\n".as_slice();
    let v2 = b"greeting = \"hello\"\nversion = \"1.3.0\"\n".as_slice();
    let tampered = b"greeting = \"HELLO\"\nversion = \"1.3.0\"\n".as_slice();
    let mut reports = Vec::new();
    let inside = "/var/lib/otabox/files/app.conf";
    let cases = [
        DemoCase {
            title: "install app.conf 1.2.0",
            job: "demo-1",
            bytes: v1,
            declared: v1,
            destination: inside,
        },
        DemoCase {
            title: "deploy the same again",
            job: "demo-2",
            bytes: v1,
            declared: v1,
            destination: inside,
        },
        DemoCase {
            title: "payload bytes differ from the declared hash",
            job: "demo-3",
            bytes: tampered,
            declared: v2,
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
        outln!("\n== job {job}: {}", case.title)?;
        let request = step_request(root, &config, &case)?;
        let report = run_step(handler.as_ref(), request, Some(progress.clone())).await?;
        for record in &report.phases {
            outln!("    {:<12} {}", record.phase, record.outcome)?;
        }
        outln!("  result: {}", summarize(&report.result))?;
        reports.push((job.to_string(), report));
    }
    let installed = std::fs::read(files.join("app.conf")).context("app.conf was not installed")?;
    anyhow::ensure!(
        installed == v1,
        "app.conf does not hold the installed version"
    );
    anyhow::ensure!(
        !Path::new("/etc/otabox-demo.conf").exists(),
        "the sandbox let the handler write outside its grant"
    );
    let denial = reports
        .iter()
        .find(|(job, _)| job == "demo-4")
        .map(|(_, r)| &r.result);
    anyhow::ensure!(
        matches!(denial, Some(StepResult::Failed { message, .. })
            if message == "denied: /etc/otabox-demo.conf is outside the granted paths (/var/lib/otabox/files)"),
        "job demo-4 does not read as a sandbox denial: {denial:?}"
    );

    outln!("\n== inventory of the file handler")?;
    match handler.inventory().await? {
        Ok(items) => {
            for i in items {
                let details = i.details.iter().map(|(k, v)| format!("{k}={v}"));
                outln!("    {} {}", i.name, details.collect::<Vec<_>>().join(" "))?;
            }
        }
        Err(status) => outln!("    failed: {}", status.message)?,
    }
    outln!(
        "\nThe handler wrote only inside {} (granted as /var/lib/otabox/files).",
        files.display()
    )?;
    mqtt_flow(root).await?;
    Ok(DemoOutcome {
        root: root.to_path_buf(),
        reports,
    })
}

/// Part 2: broker, replica, agent, and a deployment through them.
async fn mqtt_flow(root: &Path) -> Result<()> {
    outln!("\n== part 2: a deployment through mosquitto, the replica and the agent")?;
    let Some(broker) = start_broker(root)? else {
        outln!(
            "  mosquitto is not installed: run `make setup` (or apt-get install mosquitto) to see this part"
        )?;
        return Ok(());
    };
    let port = broker.port;
    let db = root.join("replica.db");
    let mqtt = crate::config::MqttSection {
        port,
        ..Default::default()
    };
    let replica = crate::replica::service::ReplicaOptions {
        db: db.clone(),
        mqtt: mqtt.clone(),
    };
    background("replica", move || crate::replica::service::run(replica));
    let agent_config = root.join("agent.toml");
    std::fs::write(
        &agent_config,
        format!(
            "[device]\nid = \"demo-device\"\n[paths]\nhandlers = \"handlers\"\nstate = \"agent-state\"\n\
             [mqtt]\nport = {port}\nreconnect_min_ms = 100\n\
             [handlers.file.mounts]\n\"/var/lib/otabox/files\" = \"device/files\"\n"
        ),
    )?;
    let config = DeviceConfig::load(&agent_config)?;
    background("agent", move || crate::agent::run(config));
    let topics = crate::cloud::Topics::new(mqtt.layout.cloud(), "demo-device")?;
    let observer = Observer::connect(port, &topics).await?;
    observer
        .wait(|m| m.contains("\"agent\""))
        .await
        .context("the agent did not come online")?;
    outln!("  agent demo-device is online (broker on 127.0.0.1:{port})")?;

    let payload = root.join("payloads/app-2.0.0.conf");
    let content = b"greeting = \"hello again\"\nversion = \"2.0.0\"\n";
    std::fs::write(&payload, content)?;
    let server = start_payload_server(root)?;
    let url = match &server {
        Some((server, www)) => {
            std::fs::copy(&payload, www.join("app-2.0.0.conf"))?;
            let url = format!("http://127.0.0.1:{}/app-2.0.0.conf", server.port);
            outln!("  payload server (nginx) serves {url}")?;
            url
        }
        None => {
            outln!(
                "  nginx is not installed (make setup installs it): the payload is staged as a file:// URL"
            )?;
            format!("file://{}", payload.display())
        }
    };
    let store = crate::replica::Store::open(&db)?;
    for job in ["mqtt-1", "mqtt-2"] {
        let desired: crate::shadow::DesiredState = serde_json::from_value(serde_json::json!({
            "schema": 1, "jobId": job, "version": "2.0.0",
            "steps": [{"updateType": "otabox/file:1",
                "manifest": {"name": "app-config", "version": "2.0.0", "payload": "app.conf",
                             "destination": "/var/lib/otabox/files/app.conf"},
                "files": [{"name": "app.conf", "url": url,
                           "size": content.len(), "sha256": sha256_hex(content)}]}]
        }))?;
        let version = store.deploy("demo-device", &desired)?;
        outln!("\n  otabox fleet deploy: job {job} -> demo-device (shadow version {version})")?;
        observer
            .wait(|m| {
                m.contains(&format!("\"jobId\":\"{job}\""))
                    && m.contains("\"status\"")
                    && !m.contains("\"state\"")
            })
            .await
            .with_context(|| format!("no acknowledgement for {job}"))?;
        observer
            .wait(|m| m.starts_with("accepted"))
            .await
            .context("the replica did not confirm")?;
    }
    FINISHED.store(true, std::sync::atomic::Ordering::SeqCst);
    drop(server);
    drop(broker);
    Ok(())
}

/// Set when the demo is over: its service threads then stop quietly as the
/// scratch directory goes away.
static FINISHED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Runs a service future on its own thread (the replica's SQLite handle is
/// not shareable across threads), for the demo's lifetime.
fn background<S, F>(name: &'static str, service: S)
where
    S: FnOnce() -> F + Send + 'static,
    F: std::future::Future<Output = Result<()>>,
{
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build();
        match runtime {
            Ok(rt) => {
                if let Err(e) = rt.block_on(service())
                    && !FINISHED.load(std::sync::atomic::Ordering::SeqCst)
                {
                    eprintln!("demo {name} stopped: {e:#}");
                }
            }
            Err(e) => eprintln!("demo {name}: {e}"),
        }
    });
}

/// A program the demo started (mosquitto, nginx), stopped on drop.
struct Service {
    child: std::process::Child,
    port: u16,
}

impl Service {
    /// Starts `program` with `args` and waits until it listens on `port`;
    /// `None` when the program is not installed.
    fn start(program: &str, args: &[&OsStr], port: u16) -> Result<Option<Self>> {
        let spawned = std::process::Command::new(program)
            .args(args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot start {program}")),
        };
        let service = Self { child, port };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Some(service));
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        anyhow::bail!("{program} did not start listening on port {port}")
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// An nginx of the demo's own serving the returned directory.
fn start_payload_server(root: &Path) -> Result<Option<(Service, std::path::PathBuf)>> {
    let dir = root.join("nginx");
    let www = dir.join("www");
    std::fs::create_dir_all(&www)?;
    let port = free_port()?;
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {d}/b; proxy_temp_path {d}/p; fastcgi_temp_path {d}/f;\n\
             uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n\
             server {{ listen 127.0.0.1:{port}; root {www}; }} }}\n",
            www = www.display()
        ),
    )?;
    let args = [
        OsStr::new("-c"),
        conf.as_os_str(),
        OsStr::new("-p"),
        dir.as_os_str(),
    ];
    Ok(Service::start("nginx", &args, port)?.map(|service| (service, www)))
}

/// A mosquitto of the demo's own.
fn start_broker(root: &Path) -> Result<Option<Service>> {
    let port = free_port()?;
    let conf = root.join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "user root\npersistence false\nset_tcp_nodelay true\npid_file {}/mosquitto.pid\n\
             listener {port} 127.0.0.1\nallow_anonymous true\n",
            root.display()
        ),
    )?;
    Service::start("mosquitto", &[OsStr::new("-c"), conf.as_os_str()], port)
}

/// Watches the device's topics and prints what travels on them.
struct Observer {
    lines: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<String>>,
}

impl Observer {
    async fn connect(port: u16, topics: &crate::cloud::Topics) -> Result<Self> {
        let mut opts = rumqttc::MqttOptions::new("demo-observer", "127.0.0.1", port);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 64);
        eventloop.set_network_options(crate::mqtt::network_options());
        for topic in [&topics.update, &topics.accepted] {
            client.subscribe(topic, rumqttc::QoS::AtLeastOnce).await?;
        }
        let accepted = topics.accepted.clone();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let _client = client;
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p))) => {
                        let text = String::from_utf8_lossy(&p.payload).into_owned();
                        let line = if p.topic == accepted {
                            format!("accepted {text}")
                        } else {
                            text
                        };
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
                }
            }
        });
        Ok(Self {
            lines: tokio::sync::Mutex::new(rx),
        })
    }

    /// Prints messages until one satisfies `want` (30 s at most).
    async fn wait(&self, want: impl Fn(&str) -> bool) -> Result<()> {
        let mut lines = self.lines.lock().await;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let line = tokio::time::timeout_at(deadline, lines.recv())
                .await
                .context("timed out")?
                .context("closed")?;
            print_message(&line)?;
            if want(&line) {
                return Ok(());
            }
        }
    }
}

/// One line per message: the agent's state, its result, or the ack.
fn print_message(line: &str) -> Result<()> {
    let (prefix, text) = match line.strip_prefix("accepted ") {
        Some(rest) => ("    replica  accepted", rest),
        None => ("    device  ", line),
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else {
        return Ok(());
    };
    if let Some(d) = json.pointer("/state/reported/deployment") {
        let state = d
            .pointer("/agent/state")
            .and_then(|s| s.as_str())
            .unwrap_or("?");
        let result = d.pointer("/lastResult/result").and_then(|s| s.as_str());
        let job = d.pointer("/jobId").and_then(|s| s.as_str()).unwrap_or("-");
        let progress = d.get("progress").filter(|p| p.is_object());
        match result {
            _ if progress.is_some() && prefix.starts_with("    device") => {
                let p = progress.unwrap_or(&serde_json::Value::Null);
                outln!(
                    "{prefix} report: {state}, progress {} {}/{} bytes (job {job})",
                    p["phase"].as_str().unwrap_or("?"),
                    p["done"],
                    p["total"]
                )?;
            }
            Some(r) if state == "idle" && prefix.starts_with("    device") => {
                outln!("{prefix} report: idle, job {job} {r}")?
            }
            _ if prefix.starts_with("    device") => {
                outln!("{prefix} report: {state} (job {job})")?
            }
            _ => {}
        }
    } else if json.get("status").is_some() {
        outln!("{prefix} ack {text}")?;
    }
    Ok(())
}

/// Writes the handler directory, device config and payloads; returns the
/// config path.
fn lay_out(root: &Path) -> Result<PathBuf> {
    let handlers = root.join("handlers");
    std::fs::create_dir_all(&handlers)
        .with_context(|| format!("cannot create {}", handlers.display()))?;
    anyhow::ensure!(
        !builtin::FILE_WASM.is_empty(),
        "this build has no embedded handlers (OTABOX_SKIP_WASM_BUILD was set)"
    );
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
    let DemoCase {
        job,
        bytes,
        declared,
        destination,
        ..
    } = *case;
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
        StepResult::AlreadyInstalled { criteria } => {
            format!("SUCCESS, {criteria} was already installed")
        }
        StepResult::Failed {
            phase,
            message,
            rolled_back,
            ..
        } => {
            format!(
                "FAILURE in {phase}{}: {message}",
                if *rolled_back { " (rolled back)" } else { "" }
            )
        }
        other => format!("{other:?}"),
    }
}
