//! Running declared programs through the host's `process` capability.

use std::time::Duration;

use crate::__bindings::otabox::handler::process as host;
use crate::HostError;

/// A program to run; the host checks it against the handler's command rules
/// before anything starts. There is no shell.
#[derive(Debug, Clone)]
pub struct Command {
    cmd: host::Command,
}

impl Command {
    /// A command for `program`, named exactly as in the capability manifest.
    pub fn new(program: impl Into<String>) -> Self {
        Self {
            cmd: host::Command {
                program: program.into(),
                args: Vec::new(),
                env: Vec::new(),
                stdin: None,
                timeout_ms: None,
            },
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.cmd.args.push(arg.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.cmd.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable (its name must be allowed by the rule).
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.cmd.env.push((name.into(), value.into()));
        self
    }

    /// Feeds `bytes` to the program's standard input.
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.cmd.stdin = Some(bytes.into());
        self
    }

    /// Kills the program after `limit` (capped by the handler's call limit).
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.cmd.timeout_ms = Some(u32::try_from(limit.as_millis()).unwrap_or(u32::MAX));
        self
    }

    /// Runs the program and waits for it.
    pub fn run(&self) -> Result<Output, HostError> {
        host::run(&self.cmd).map(Output)
    }
}

/// What a finished program produced.
#[derive(Debug, Clone)]
pub struct Output(pub host::Output);

impl Output {
    /// True when the program exited with code 0.
    pub fn success(&self) -> bool {
        self.0.exit_code == Some(0)
    }

    /// The exit code, or `None` when a signal ended it.
    pub fn code(&self) -> Option<i32> {
        self.0.exit_code
    }

    /// Standard output as text (invalid UTF-8 replaced).
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }

    /// Standard error as text (invalid UTF-8 replaced).
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
}
