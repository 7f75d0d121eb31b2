//! Real services for integration tests: a mosquitto broker on a free
//! loopback port, the agent as a separate process, and an MQTT test client.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A free TCP port on loopback for a service a test starts (and may stop
/// and start again), below the kernel's ephemeral range. A port from that
/// range can be taken while its service is down by any outgoing
/// connection, even by a client connecting to that very port (TCP
/// self-connect): a client retrying against a stopped broker then talks
/// to itself, and the restarted broker cannot bind.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static TAKEN: AtomicU32 = AtomicU32::new(0);
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000, ephemeral_start.clamp(10_000, 65_536));
    // Spread the processes of one test run over the range.
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for _ in low..high {
        let port = low + seed.wrapping_add(TAKEN.fetch_add(1, Ordering::Relaxed)) % (high - low);
        if let Ok(port) = u16::try_from(port)
            && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        {
            return port;
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn wait_for_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A mosquitto broker with its own config, stopped on drop.
pub struct Mosquitto {
    child: Child,
    /// Its port.
    pub port: u16,
    conf: PathBuf,
}

impl Mosquitto {
    /// Starts a plain broker allowing anonymous clients.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, free_port(), "allow_anonymous true\n")
    }

    /// Starts a broker on `port` with extra config lines.
    pub fn start_with(dir: &Path, port: u16, extra: &str) -> Self {
        std::fs::create_dir_all(dir).expect("broker dir");
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "user root\npersistence false\nset_tcp_nodelay true\npid_file {}/mosquitto.pid\nlistener {port} 127.0.0.1\n{extra}",
                dir.display()
            ),
        )
        .expect("write mosquitto.conf");
        let broker = Self {
            child: spawn_mosquitto(&conf, dir),
            port,
            conf,
        };
        wait_for_port(port, "mosquitto");
        broker
    }

    /// Stops the broker with SIGTERM (a persistent broker saves its
    /// sessions) and waits for it.
    pub fn stop_gracefully(&mut self) {
        self.signal("-TERM");
        let _ = self.child.wait();
    }

    /// Sends the broker `signal` (as `kill` spells it).
    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status();
    }

    /// Freezes the broker with SIGSTOP: connections stay open, nothing is
    /// answered. [`Mosquitto::stop`] still kills it.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Starts it again after [`Mosquitto::stop_gracefully`] or
    /// [`Mosquitto::stop`].
    pub fn start_again(&mut self) {
        let dir = self.conf.parent().expect("conf dir").to_path_buf();
        self.child = spawn_mosquitto(&self.conf, &dir);
        wait_for_port(self.port, "mosquitto");
    }

    /// The broker's log so far.
    pub fn log(&self) -> String {
        let dir = self.conf.parent().expect("conf dir");
        std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default()
    }

    /// Stops the broker (the port becomes free).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again with the same config and port.
    pub fn restart(&mut self) {
        self.stop();
        let dir = self.conf.parent().expect("conf dir").to_path_buf();
        self.child = spawn_mosquitto(&self.conf, &dir);
        wait_for_port(self.port, "mosquitto");
    }
}

fn spawn_mosquitto(conf: &Path, dir: &Path) -> Child {
    // Appended: a restarted broker's log follows the first one's.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("mosquitto.log"))
        .expect("broker log");
    Command::new("mosquitto")
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("mosquitto is installed (make setup)")
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The agent as a process, killed on drop.
pub struct AgentProcess {
    child: Child,
    /// Its config file.
    pub config: PathBuf,
}

impl AgentProcess {
    /// Starts `otabox run --config <config>`, logging to `<config dir>/agent.log`.
    pub fn start(config: &Path) -> Self {
        Self::start_with_env(config, &[])
    }

    /// Same, with extra environment variables.
    pub fn start_with_env(config: &Path, env: &[(&str, &str)]) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(config.with_file_name("agent.log"))
            .expect("agent log");
        let child = Command::new(env!("CARGO_BIN_EXE_otabox"))
            .args(["run", "--config"])
            .arg(config)
            .env("OTABOX_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the agent");
        Self {
            child,
            config: config.to_path_buf(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the agent to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Kills the agent with SIGKILL.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_file_name("agent.log")).unwrap_or_default()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A message seen by the test client.
#[derive(Debug, Clone)]
pub struct Message {
    /// Topic.
    pub topic: String,
    /// Payload as JSON (or a string for non-JSON).
    pub json: serde_json::Value,
}

impl Message {
    /// The agent's state in a report (`installing`, `idle`, ...), if it
    /// is one.
    pub fn agent_state(&self) -> Option<&str> {
        self.json
            .pointer("/state/reported/deployment/agent/state")
            .and_then(|s| s.as_str())
    }
}

/// An MQTT client for tests: publishes and collects what arrives on its
/// subscriptions.
pub struct TestClient {
    client: rumqttc::Client,
    received: mpsc::Receiver<Message>,
}

impl TestClient {
    /// Connects to `port` and subscribes to `topics`.
    pub fn connect(port: u16, id: &str, topics: &[&str]) -> Self {
        let mut opts = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        opts.set_clean_session(true);
        Self::connect_with(opts, topics)
    }

    /// Connects with `opts` (TLS, credentials) and subscribes to `topics`,
    /// again after every reconnect.
    pub fn connect_with(mut opts: rumqttc::MqttOptions, topics: &[&str]) -> Self {
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        opts.set_manual_acks(false);
        let (client, mut connection) = rumqttc::Client::new(opts, 64);
        connection
            .eventloop
            .set_network_options(otabox::mqtt::network_options());
        let (tx, received) = mpsc::channel();
        let resubscribe = client.clone();
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::ConnAck(_))) => {
                        for t in &topics {
                            let _ = resubscribe.subscribe(t.as_str(), rumqttc::QoS::AtLeastOnce);
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Incoming::Publish(p))) => {
                        let json = serde_json::from_slice(&p.payload).unwrap_or_else(|_| {
                            serde_json::Value::String(String::from_utf8_lossy(&p.payload).into())
                        });
                        if tx
                            .send(Message {
                                topic: p.topic,
                                json,
                            })
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        Self { client, received }
    }

    /// Publishes `payload` with QoS 1.
    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .expect("publish");
    }

    /// Waits until the broker confirmed the subscriptions (a message to
    /// `probe`, which this client must be subscribed to, comes back).
    pub fn ready(&self, probe: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            self.publish(probe, "\"probe\"");
            if self
                .wait_for_or(Duration::from_millis(300), |m| m.topic == probe)
                .is_some()
            {
                return;
            }
        }
        panic!("the test client never saw its own probe on {probe}");
    }

    /// Waits for the first message that satisfies `want`.
    pub fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        want: impl Fn(&Message) -> bool,
    ) -> Message {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.received.recv_timeout(left) {
                Ok(m) if want(&m) => return m,
                Ok(_) => {}
                Err(_) => panic!("timed out waiting for {what}"),
            }
        }
    }

    /// Every message up to and including the first that satisfies `last`.
    pub fn collect_until(
        &self,
        timeout: Duration,
        what: &str,
        last: impl Fn(&Message) -> bool,
    ) -> Vec<Message> {
        self.try_collect_until(timeout, last)
            .unwrap_or_else(|out| panic!("timed out waiting for {what}; saw {out:?}"))
    }

    /// Like [`TestClient::collect_until`]; on timeout, `Err` with what
    /// arrived (so the caller can add its own logs to the failure).
    pub fn try_collect_until(
        &self,
        timeout: Duration,
        last: impl Fn(&Message) -> bool,
    ) -> Result<Vec<Message>, Vec<Message>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            match self
                .received
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(m) => {
                    let done = last(&m);
                    out.push(m);
                    if done {
                        return Ok(out);
                    }
                }
                Err(_) => return Err(out),
            }
        }
    }

    /// Like [`TestClient::wait_for`], returning `None` on timeout.
    pub fn wait_for_or(
        &self,
        timeout: Duration,
        want: impl Fn(&Message) -> bool,
    ) -> Option<Message> {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .received
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(m) if want(&m) => return Some(m),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Everything that arrives within `window`.
    pub fn drain(&self, window: Duration) -> Vec<Message> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Ok(m) = self
            .received
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            out.push(m);
        }
        out
    }
}

/// Runs `otabox fleet --db DB ARGS`; its output (stdout, then stderr), or a
/// panic with it when the command fails.
pub fn fleet(db: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_otabox"))
        .arg("fleet")
        .arg("--db")
        .arg(db)
        .args(args)
        .output()
        .expect("fleet");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "fleet {args:?}: {text}");
    text
}

/// `otabox replica` as a process, killed on drop.
pub struct ReplicaProcess {
    child: Child,
    log: PathBuf,
}

impl ReplicaProcess {
    /// Starts the replica on `db` against the broker on `port`.
    pub fn start(db: &Path, port: u16) -> Self {
        Self::start_with(db, port, &[])
    }

    /// Same, with extra arguments (layout, TLS).
    pub fn start_with(db: &Path, port: u16, extra: &[String]) -> Self {
        let log = db.with_extension("log");
        let child = Command::new(env!("CARGO_BIN_EXE_otabox"))
            .args(["replica", "--db"])
            .arg(db)
            .args(["--port", &port.to_string()])
            .args(extra)
            .env("OTABOX_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("replica log"))
            .spawn()
            .expect("start the replica");
        let replica = Self { child, log };
        replica.wait_started();
        replica
    }

    /// Waits until the replica has opened (created) its database, so that
    /// `fleet` commands find it.
    fn wait_started(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains("replica started") {
            assert!(
                Instant::now() < deadline,
                "the replica did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The replica's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ReplicaProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An nginx serving `root/www` on a free loopback port; `/private/` answers
/// 403 (an expired pre-signed URL), `/slow/` sends 256 KiB/s and `/auth/`
/// wants `Authorization: Bearer t0ken`. Requests are logged as
/// `<status> <range header>` in `root/access.log`.
pub struct Nginx {
    child: Child,
    /// Its port.
    pub port: u16,
    /// The directory it serves.
    pub www: PathBuf,
    log: PathBuf,
}

impl Nginx {
    /// Starts nginx with its own config and folders.
    pub fn start(root: &Path) -> Self {
        Self::start_with(root, "")
    }

    /// Same, with `extra` config inside the `http` block (more servers).
    pub fn start_with(root: &Path, extra: &str) -> Self {
        let port = free_port();
        let www = root.join("www");
        std::fs::create_dir_all(&www).expect("www");
        let r = root.display();
        let conf = root.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {r}/nginx.pid;\nerror_log {r}/error.log;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n  log_format ranges '$status \"$http_range\"';\n  access_log {r}/access.log ranges;\n\
                   client_body_temp_path {r}/tmp-body;\n  proxy_temp_path {r}/tmp-proxy;\n  fastcgi_temp_path {r}/tmp-fcgi;\n\
                   uwsgi_temp_path {r}/tmp-uwsgi;\n  scgi_temp_path {r}/tmp-scgi;\n\
                   {extra}\n  server {{\n    listen 127.0.0.1:{port};\n    root {www};\n    location /private/ {{ return 403; }}\n    location /slow/ {{ limit_rate 256k; }}\n    location /auth/ {{ if ($http_authorization != \"Bearer t0ken\") {{ return 401; }} }}\n  }}\n}}\n",
                www = www.display()
            ),
        )
        .expect("nginx.conf");
        let child = Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx is installed (make setup)");
        wait_for_port(port, "nginx");
        Self {
            child,
            port,
            www,
            log: root.join("access.log"),
        }
    }

    /// The URL of `name` under the served directory.
    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// The access log: one `(status, range header)` per request.
    pub fn requests(&self) -> Vec<(u16, String)> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (status, range) = l.split_once(' ')?;
                Some((status.parse().ok()?, range.trim_matches('"').to_string()))
            })
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP proxy that forwards to `upstream` but cuts each of the first
/// responses after a number of bytes taken from `cuts` (then passes the
/// rest untouched). Stops with the test process.
pub fn cutting_proxy(upstream: u16, cuts: Vec<usize>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("proxy listener");
    let port = listener.local_addr().expect("addr").port();
    let cuts = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::from(
        cuts,
    )));
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            let cut = cuts.lock().ok().and_then(|mut c| c.pop_front());
            std::thread::spawn(move || proxy_one(client, upstream, cut));
        }
    });
    port
}

fn proxy_one(mut client: std::net::TcpStream, upstream: u16, cut: Option<usize>) {
    use std::io::{Read, Write};
    let Ok(mut server) = std::net::TcpStream::connect(("127.0.0.1", upstream)) else {
        return;
    };
    let (Ok(mut client_in), Ok(mut server_out)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut client_in, &mut server_out);
    });
    let mut left = cut.unwrap_or(usize::MAX);
    let mut buf = [0u8; 8192];
    while left > 0 {
        let Ok(n) = server.read(&mut buf[..left.min(8192)]) else {
            break;
        };
        if n == 0 || client.write_all(&buf[..n]).is_err() {
            break;
        }
        left = left.saturating_sub(n);
    }
    let _ = client.shutdown(std::net::Shutdown::Both);
    let _ = server.shutdown(std::net::Shutdown::Both);
}
