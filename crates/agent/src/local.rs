//! What the device's own tools share with a running agent through its state
//! directory: the lock by which the agent owns it, the inbox of local
//! deployments (`otabox install`), and the broker connection as the agent
//! last recorded it (`otabox status`).
//!
//! - `agent.lock`: the agent holds an exclusive `flock` on it for as long
//!   as it runs and writes its process id into it once it listens for
//!   local deployments; `handlers run-phase` holds a shared lock, so it is
//!   refused while an agent runs and an agent does not start under it.
//! - `inbox/<job-id>.json`: a local deployment (a desired state, schema 1),
//!   written atomically (temp file, fsync, rename), mode 0600; the agent
//!   takes it on `SIGUSR1` and every [`INBOX_POLL`], through the same checks
//!   as a delta, journals it, then removes it. A refused one is answered in
//!   `inbox/<job-id>.rejected` (`{"jobId", "reason"}`).
//! - `connection.json`: the broker, whether the agent is connected, since
//!   when, and the last connection error; written on a change only.

use std::fs::{File, OpenOptions, TryLockError};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use otabox_core::durable;
use otabox_core::shadow::{DesiredState, parse_delta};

/// The lock file the agent holds (in the state directory).
pub const LOCK_FILE: &str = "agent.lock";
/// The folder of local deployments (in the state directory).
pub const INBOX: &str = "inbox";
/// The broker connection as last recorded (in the state directory).
pub const CONNECTION_FILE: &str = "connection.json";
/// How often the agent looks into its inbox without being woken.
pub const INBOX_POLL: Duration = Duration::from_secs(10);
/// How long an agent starting up waits for a lock held for a moment (a
/// status probe) before it gives up.
pub const LOCK_PATIENCE: Duration = Duration::from_secs(2);

/// A lock on a state directory, held until dropped.
#[derive(Debug)]
pub struct StateLock {
    file: File,
}

impl StateLock {
    /// The agent's exclusive lock on `state_dir` (created 0700 when
    /// missing); refused while another agent or a `handlers run-phase`
    /// uses it.
    pub fn own(state_dir: &Path) -> Result<Self> {
        durable::create_private_dir(state_dir)?;
        let (file, path) = open_lock_file(state_dir)?;
        let deadline = std::time::Instant::now() + LOCK_PATIENCE;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(TryLockError::WouldBlock) => bail!(
                    "the state directory {} is in use by another otabox process{} (an agent, or handlers run-phase); one agent per state directory",
                    state_dir.display(),
                    read_pid(&path)
                        .map(|p| format!(" (pid {p})"))
                        .unwrap_or_default()
                ),
                Err(TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("cannot lock {}", path.display()));
                }
            }
        }
        file.set_len(0)
            .with_context(|| format!("cannot clear {}", path.display()))?;
        Ok(Self { file })
    }

    /// Writes this process's id into the lock file: from now on `otabox
    /// install` wakes this process with `SIGUSR1` (it must listen for it).
    pub fn announce(&mut self) -> Result<()> {
        self.file.set_len(0)?;
        std::os::unix::fs::FileExt::write_all_at(
            &self.file,
            format!("{}\n", std::process::id()).as_bytes(),
            0,
        )
        .context("cannot write the agent's pid into its lock file")
    }

    /// A shared lock on `state_dir` for a tool that changes the device
    /// (`handlers run-phase`): refused while an agent runs. `None` when the
    /// directory does not exist (no agent ever ran there).
    pub fn share(state_dir: &Path, tool: &str) -> Result<Option<Self>> {
        if !state_dir.is_dir() {
            return Ok(None);
        }
        let (file, path) = open_lock_file(state_dir)?;
        match file.try_lock_shared() {
            Ok(()) => Ok(Some(Self { file })),
            Err(TryLockError::WouldBlock) => bail!(
                "an agent{} owns the state directory {}: {tool} would change the device behind its back (the agent would keep reporting the old state); install through the agent with `otabox install DEPLOYMENT.json`, or stop the agent first",
                read_pid(&path)
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default(),
                state_dir.display()
            ),
            Err(TryLockError::Error(e)) => {
                Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
    }
}

/// The lock file of `state_dir`, opened (created 0600 when missing, never
/// truncated: it holds the owner's pid), and its path.
fn open_lock_file(state_dir: &Path) -> Result<(File, PathBuf)> {
    let path = state_dir.join(LOCK_FILE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(durable::FILE_MODE)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    Ok((file, path))
}

/// Who owns a state directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// No agent runs on it.
    Nobody,
    /// An agent runs on it; its pid once it listens for local deployments.
    Agent {
        /// Its process id, when it wrote it.
        pid: Option<u32>,
    },
}

/// Whether an agent runs on `state_dir`. Reads only: a shared lock is
/// tried and dropped at once (an agent starting in that instant waits
/// [`LOCK_PATIENCE`] for it).
pub fn owner(state_dir: &Path) -> Result<Owner> {
    let path = state_dir.join(LOCK_FILE);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Owner::Nobody),
        Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
    };
    match file.try_lock_shared() {
        Ok(()) => Ok(Owner::Nobody),
        Err(TryLockError::WouldBlock) => Ok(Owner::Agent {
            pid: read_pid(&path),
        }),
        Err(TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot probe {}", path.display()))
        }
    }
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Wakes the agent `pid` to look into its inbox.
pub fn wake(pid: u32) -> Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    // SAFETY: kill(2) has no memory effects; the pid comes from the lock
    // file of a live agent (its lock is held), and SIGUSR1 is only sent
    // once that agent wrote its pid, after it started listening for it.
    let rc = unsafe { libc::kill(pid, libc::SIGUSR1) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot wake the agent (pid {pid})"));
    }
    Ok(())
}

/// The inbox folder of `state_dir`.
pub fn inbox_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(INBOX)
}

/// Parses a local deployment exactly as a delta carrying it would be
/// parsed (size cap of `max_bytes`, nesting limit, unknown fields, every
/// value checked). A local deployment cannot cancel.
pub fn parse_local(bytes: &[u8], max_bytes: usize) -> Result<DesiredState> {
    // One JSON value, checked before it is wrapped as a delta's content.
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes)
        .map_err(|e| anyhow::anyhow!("not a JSON deployment: {e}"))?;
    let mut delta = br#"{"version":0,"state":{"deployment":"#.to_vec();
    delta.extend_from_slice(bytes);
    delta.extend_from_slice(b"}}");
    let desired = parse_delta(&delta, max_bytes)?.state.deployment;
    if desired.cancel {
        bail!("a local deployment cannot cancel (\"cancel\": true)");
    }
    Ok(desired)
}

/// The request file of `job_id` in the inbox.
pub fn request_path(state_dir: &Path, job_id: &str) -> Result<PathBuf> {
    otabox_core::shadow::validate_job_id(job_id)?;
    Ok(inbox_dir(state_dir).join(format!("{job_id}.json")))
}

/// The answer to a refused request of `job_id`.
pub fn rejection_path(state_dir: &Path, job_id: &str) -> Result<PathBuf> {
    otabox_core::shadow::validate_job_id(job_id)?;
    Ok(inbox_dir(state_dir).join(format!("{job_id}.rejected")))
}

/// Why the agent refused a local deployment.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalRejection {
    /// The job id, as far as it could be read.
    pub job_id: Option<String>,
    /// Why.
    pub reason: String,
}

/// Queues `bytes` (a deployment already checked with [`parse_local`]) for
/// the agent: written atomically, private, under its job id. Refused when
/// a request of that job id waits already.
pub fn queue(state_dir: &Path, job_id: &str, bytes: &[u8]) -> Result<PathBuf> {
    let inbox = inbox_dir(state_dir);
    durable::create_private_dir(&inbox)?;
    let path = request_path(state_dir, job_id)?;
    if path.exists() {
        bail!(
            "a local deployment of job {job_id} waits in {} already",
            inbox.display()
        );
    }
    let _ = std::fs::remove_file(rejection_path(state_dir, job_id)?);
    durable::write_atomic(&path, bytes)?;
    Ok(path)
}

/// A request found in the inbox.
#[derive(Debug)]
pub struct Request {
    /// Its file.
    pub path: PathBuf,
    /// Its job id (from the file name).
    pub name: String,
    /// Its content, or why it cannot be read.
    pub bytes: Result<Vec<u8>, String>,
}

/// The requests waiting in the inbox, oldest name first. Each is read
/// without following a symbolic link or blocking on a special file, and
/// at most `max_bytes + 1` bytes of it.
pub fn requests(state_dir: &Path, max_bytes: usize) -> Result<Vec<Request>> {
    let inbox = inbox_dir(state_dir);
    let entries = match std::fs::read_dir(&inbox) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", inbox.display())),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", inbox.display()))?
            .path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.starts_with('.'))
            .and_then(|n| n.strip_suffix(".json"))
            .map(str::to_string)
        else {
            continue;
        };
        let bytes = read_request(&path, max_bytes);
        found.push(Request { path, name, bytes });
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(found)
}

/// A regular file's bytes (no link followed, no blocking open of a FIFO).
fn read_request(path: &Path, max_bytes: usize) -> Result<Vec<u8>, String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("cannot open the request: {e}"))?;
    let kind = file
        .metadata()
        .map_err(|e| format!("cannot inspect the request: {e}"))?
        .file_type();
    if !kind.is_file() || kind.is_fifo() {
        return Err("the request is not a regular file".into());
    }
    let mut bytes = Vec::new();
    file.take(max_bytes as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read the request: {e}"))?;
    Ok(bytes)
}

/// Answers a refused request (for `otabox install`) and removes it.
pub fn refuse(state_dir: &Path, request: &Request, rejection: &LocalRejection) -> Result<()> {
    let answer = rejection_path(state_dir, &request.name)
        .unwrap_or_else(|_| inbox_dir(state_dir).join(".invalid.rejected"));
    durable::write_atomic(&answer, &serde_json::to_vec(rejection)?)?;
    remove_request(request)
}

/// Removes a request the journal holds now (or that was refused).
pub fn remove_request(request: &Request) -> Result<()> {
    match std::fs::remove_file(&request.path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", request.path.display()))
        }
        _ => Ok(()),
    }
}

/// The broker connection as last recorded by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Connection {
    /// `host:port`.
    pub broker: String,
    /// Whether the agent was connected.
    pub connected: bool,
    /// Since when (seconds since the epoch).
    pub since: u64,
    /// The last connection error, while not connected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Records the connection state in `connection.json` on a change only.
#[derive(Debug)]
pub struct ConnectionLog {
    path: PathBuf,
    broker: String,
    last: Mutex<Option<(bool, Option<String>)>>,
}

/// Longest connection error kept.
const MAX_ERROR_BYTES: usize = 512;

impl ConnectionLog {
    /// A log for the agent of `state_dir` connecting to `broker`.
    pub fn new(state_dir: &Path, broker: String) -> Self {
        Self {
            path: state_dir.join(CONNECTION_FILE),
            broker,
            last: Mutex::new(None),
        }
    }

    /// The agent is connected.
    pub fn connected(&self) {
        self.record(true, None);
    }

    /// The agent is not connected, because of `error`.
    pub fn disconnected(&self, error: &str) {
        let error = otabox_core::escape::text(error.to_string(), MAX_ERROR_BYTES);
        self.record(false, Some(error));
    }

    fn record(&self, connected: bool, error: Option<String>) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let state = (connected, error);
        if last.as_ref() == Some(&state) {
            return;
        }
        let record = Connection {
            broker: self.broker.clone(),
            connected,
            since: otabox_core::clock::now_secs(),
            error: state.1.clone(),
        };
        let written = serde_json::to_vec(&record)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| durable::replace(&self.path, &bytes));
        match written {
            Ok(()) => *last = Some(state),
            Err(e) => tracing::debug!("cannot record the connection state: {e:#}"),
        }
    }
}

/// The connection as recorded in `state_dir`, if it was.
pub fn connection(state_dir: &Path) -> Option<Connection> {
    serde_json::from_slice(&std::fs::read(state_dir.join(CONNECTION_FILE)).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_lock_excludes_a_second_agent_and_run_phase_but_not_a_probe() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        assert_eq!(owner(&state).expect("probe"), Owner::Nobody);
        assert!(StateLock::share(&state, "x").expect("no dir").is_none());
        let mut agent = StateLock::own(&state).expect("first agent");
        assert_eq!(owner(&state).expect("probe"), Owner::Agent { pid: None });
        agent.announce().expect("announce");
        let me = Some(std::process::id());
        assert_eq!(owner(&state).expect("probe"), Owner::Agent { pid: me });
        let refused = StateLock::share(&state, "handlers run-phase").unwrap_err();
        assert!(
            format!("{refused:#}").contains("otabox install"),
            "{refused:#}"
        );
        let second = StateLock::own(&state).unwrap_err();
        assert!(format!("{second:#}").contains("in use"), "{second:#}");
        drop(agent);
        let tool = StateLock::share(&state, "x").expect("free").expect("lock");
        assert!(StateLock::own(&state).is_err(), "no agent under a tool");
        drop(tool);
        assert_eq!(owner(&state).expect("probe"), Owner::Nobody);
    }

    #[test]
    fn a_local_deployment_is_parsed_as_a_delta_would_be() {
        let ok = br#"{"schema": 1, "jobId": "local-1", "version": "1",
                      "steps": [{"updateType": "otabox/file:1", "manifest": {}}]}"#;
        assert_eq!(parse_local(ok, 1 << 16).expect("valid").job_id, "local-1");
        let smuggled = br#"{"schema": 1}}, "version": 99, "state": {"deployment": {}"#;
        assert!(parse_local(smuggled, 1 << 16).is_err());
        let unknown = br#"{"schema": 1, "jobId": "a", "version": "1", "steps": [], "x": 1}"#;
        assert!(parse_local(unknown, 1 << 16).is_err());
        let cancel = br#"{"schema": 1, "jobId": "a", "version": "1", "cancel": true,
                         "steps": [{"updateType": "otabox/file:1", "manifest": {}}]}"#;
        assert!(format!("{:#}", parse_local(cancel, 1 << 16).unwrap_err()).contains("cancel"));
        assert!(parse_local(ok, 64).is_err(), "the size cap applies");
    }

    #[test]
    fn the_inbox_reads_neither_links_nor_fifos_and_caps_the_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path();
        queue(state, "a", b"{}").expect("queue");
        assert!(queue(state, "a", b"{}").is_err(), "one request per job id");
        let inbox = inbox_dir(state);
        std::os::unix::fs::symlink("/etc/passwd", inbox.join("b.json")).expect("link");
        let fifo =
            std::ffi::CString::new(inbox.join("c.json").to_str().expect("utf-8")).expect("cstring");
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::fs::write(inbox.join("d.json"), vec![b' '; 100]).expect("big");
        std::fs::write(inbox.join(".e.json.tmp-1"), b"{}").expect("temp");
        let found = requests(state, 10).expect("list");
        let names: Vec<&str> = found.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "d"]);
        assert_eq!(found[0].bytes.as_deref(), Ok(&b"{}"[..]));
        assert!(found[1].bytes.is_err(), "a link is not followed");
        assert!(found[2].bytes.is_err(), "a FIFO is not read");
        assert_eq!(found[3].bytes.as_ref().map(Vec::len), Ok(11));
        let mode = std::fs::metadata(inbox.join("a.json")).expect("stat");
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
    }
}
