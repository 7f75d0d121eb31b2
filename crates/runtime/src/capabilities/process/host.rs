//! `otabox:handler/process`: runs a program only when a command rule of
//! the handler allows the program, every argument and every variable.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::confine::{self, Privileges};
use crate::HostState;
use crate::bindings::HostError;
use crate::bindings::otabox::handler::process::{Command, Host, Output};
use crate::capabilities::{CommandIsolation, commands_authorize};

/// The only `PATH` a handler's program sees.
pub const FIXED_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Most bytes kept of stdout and of stderr.
pub const MAX_OUTPUT: usize = 1 << 20;
/// Most bytes of stdin a guest may pass.
pub const MAX_STDIN: usize = 16 << 20;
/// Most arguments, and most bytes in all of them.
const MAX_ARGS: usize = 4096;
const MAX_ARG_BYTES: usize = 1 << 20;

impl Host for HostState {
    async fn run(&mut self, cmd: Command) -> wasmtime::Result<Result<Output, HostError>> {
        let privileges = match self.authorize(&cmd) {
            Ok(privileges) => privileges,
            Err(error) => {
                tracing::warn!(handler = &*self.handler, program = cmd.program, args = ?cmd.args, "denied: {error:?}");
                return Ok(Err(error));
            }
        };
        let limit = command_limit(
            self.deadline,
            self.grants.limits.call_timeout(),
            cmd.timeout_ms,
        );
        tracing::debug!(handler = &*self.handler, program = cmd.program, args = ?cmd.args, "running");
        let (cmd, payloads) = match self.with_payload_paths(cmd, &privileges) {
            Ok(substituted) => substituted,
            Err(error) => return Ok(Err(error)),
        };
        let isolation = self.grants.command_isolation;
        Ok(execute(cmd, &payloads, limit, &privileges, isolation).await)
    }
}

/// How long a command may run: its own `timeout_ms`, if any, but never
/// past the call's deadline less a tenth of the call's time limit, which
/// the handler keeps to clean up and report the time-out (the engine
/// stops a guest one epoch tick after the deadline: too little on a slow
/// board or in the Pulley interpreter).
fn command_limit(deadline: Instant, call_limit: Duration, own_ms: Option<u32>) -> Duration {
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(call_limit / 10);
    own_ms.map_or(remaining, |ms| {
        remaining.min(Duration::from_millis(ms.into()))
    })
}

/// The placeholder of a payload's path in an argument: `{payload:NAME}`.
fn payload_placeholder(arg: &str) -> Option<&str> {
    arg.strip_prefix("{payload:")?.strip_suffix('}')
}

/// `CAP_SYS_PTRACE`: what a process needs to open another one's
/// `/proc/<pid>/fd/N` when that process holds more capabilities.
const CAP_SYS_PTRACE: u64 = 1 << 19;

impl HostState {
    /// Replaces each `{payload:NAME}` argument with a path to N, a
    /// read-only descriptor of the step's verified payload `NAME`, open in
    /// the agent until the program ends; the path reveals nothing of where
    /// the host keeps the payload. A program that keeps `CAP_SYS_PTRACE`
    /// as root (root-equivalent rules, such as `rauc install`, which hands
    /// the path to a service of its own) gets `/proc/<agent>/fd/N`; any
    /// other gets `/proc/self/fd/N`, N being inherited by it (it could not
    /// open the agent's). An unknown or unverified payload is refused.
    fn with_payload_paths(
        &self,
        mut cmd: Command,
        privileges: &Privileges,
    ) -> Result<(Command, Vec<File>), HostError> {
        let owner = if privileges.keep.0 & CAP_SYS_PTRACE != 0
            && privileges
                .run_as
                .as_ref()
                .is_none_or(|r| r.uid.is_none_or(|uid| uid == 0))
        {
            std::process::id().to_string()
        } else {
            "self".to_string()
        };
        let mut opened = Vec::new();
        for arg in &mut cmd.args {
            let Some(name) = payload_placeholder(arg) else {
                continue;
            };
            let payload = self
                .scope
                .payloads
                .iter()
                .find(|p| p.name == name)
                .ok_or_else(|| {
                    HostError::NotFound(format!("the step has no payload named {name:?}"))
                })?;
            let path = payload.verified.as_ref().ok_or_else(|| {
                HostError::Denied(format!(
                    "payload {name:?} is not downloaded and verified yet"
                ))
            })?;
            let file = File::open(path)
                .map_err(|e| HostError::Failed(format!("payload {name:?}: {e}")))?;
            *arg = format!("/proc/{owner}/fd/{}", file.as_raw_fd());
            opened.push(file);
        }
        Ok((cmd, opened))
    }

    /// Checks the command against the rules; the privileges of the rule
    /// that allows it.
    fn authorize(&self, cmd: &Command) -> Result<Privileges, HostError> {
        let arg_bytes: usize = cmd.args.iter().map(String::len).sum();
        if cmd.args.len() > MAX_ARGS || arg_bytes > MAX_ARG_BYTES {
            return Err(HostError::Invalid(format!(
                "more than {MAX_ARGS} arguments or {MAX_ARG_BYTES} bytes of them"
            )));
        }
        if cmd.stdin.as_ref().is_some_and(|s| s.len() > MAX_STDIN) {
            return Err(HostError::Invalid(format!("stdin over {MAX_STDIN} bytes")));
        }
        let has_nul = |s: &str| s.contains('\0');
        if has_nul(&cmd.program)
            || cmd.args.iter().any(|a| has_nul(a))
            || cmd.env.iter().any(|(k, v)| has_nul(k) || has_nul(v))
        {
            return Err(HostError::Invalid(
                "NUL byte in program, argument or environment".into(),
            ));
        }
        let rule = commands_authorize(&self.grants.commands, &cmd.program, &cmd.args, &cmd.env)
            .map_err(|denial| HostError::Denied(denial.0))?;
        if self.scope.cancel.is_cancelled() {
            return Err(HostError::TimedOut("the job was cancelled".into()));
        }
        Ok(Privileges {
            run_as: rule.run_as.clone(),
            keep: rule.keeps(),
            keep_running: rule.keep_running,
        })
    }
}

/// Runs `cmd` confined (see [`confine`](super::confine)) with
/// `privileges`: when the program exits, whatever it left running is killed;
/// at `limit`, or when the call is dropped, everything it started is. The
/// `payloads` stay open until it ends and are inherited by it.
async fn execute(
    cmd: Command,
    payloads: &[File],
    limit: Duration,
    privileges: &Privileges,
    isolation: CommandIsolation,
) -> Result<Output, HostError> {
    let mut command = tokio::process::Command::new(&cmd.program);
    inherit(&mut command, payloads);
    command
        .args(&cmd.args)
        .env_clear()
        .env("PATH", FIXED_PATH)
        .env("LANG", "C.UTF-8")
        .envs(cmd.env.iter().map(|(k, v)| (k, v)))
        .current_dir("/")
        .process_group(0)
        .stdin(if cmd.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let (mut child, mut confined) = confine::spawn(&mut command, privileges, isolation)
        .map_err(|e| HostError::Failed(format!("cannot start {}: {e}", cmd.program)))?;
    let stdin = child.stdin.take().zip(cmd.stdin);
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let feed = async move {
        if let Some((mut pipe, bytes)) = stdin {
            // A program that exits without reading its input is not an error.
            let _ = pipe.write_all(&bytes).await;
        }
    };
    let run = async {
        let ((), out, err, status) = tokio::join!(
            feed,
            read_capped(stdout),
            read_capped(stderr),
            confined.wait(&mut child)
        );
        (out, err, status)
    };
    match tokio::time::timeout(limit, run).await {
        Err(_) => {
            let _ = confined.kill_all();
            Err(HostError::TimedOut(format!(
                "{} ran longer than {} ms and was killed with its children",
                cmd.program,
                limit.as_millis()
            )))
        }
        Ok((_, _, Err(e))) => Err(HostError::Failed(format!(
            "waiting for {}: {e}",
            cmd.program
        ))),
        Ok(((stdout, cut_out), (stderr, cut_err), Ok(status))) => Ok(Output {
            exit_code: status.code(),
            stdout,
            stderr,
            truncated: cut_out || cut_err,
        }),
    }
}

/// Lets the program inherit `files` at their numbers (the agent opens
/// them close-on-exec).
fn inherit(command: &mut tokio::process::Command, files: &[File]) {
    let fds: Vec<i32> = files.iter().map(|f| f.as_raw_fd()).collect();
    if fds.is_empty() {
        return;
    }
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls fcntl, which is async-signal-safe, on descriptors the child
    // inherited from the agent.
    unsafe {
        command.pre_exec(move || {
            for &fd in &fds {
                if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Reads a pipe to its end, keeping at most [`MAX_OUTPUT`] bytes.
async fn read_capped(pipe: Option<impl AsyncRead + Unpin>) -> (Vec<u8>, bool) {
    let Some(mut pipe) = pipe else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 16 << 10];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, truncated),
            Ok(n) => {
                let room = MAX_OUTPUT - kept.len();
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
}
