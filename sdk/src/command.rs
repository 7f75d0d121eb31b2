//! Running declared programs through the host's `process` capability.

use std::time::Duration;

use crate::__bindings::otabox::handler::process as host;
use crate::{Facility, HostError, Status, StatusExt};

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

/// The largest value of an extended code (20 bits); a program a signal
/// ended reports it as its exit value.
const EXIT_VALUE_MAX: u32 = 0xF_FFFF;

impl Output {
    /// The exit code as an extended-code value: its magnitude within 20
    /// bits, or `0xFFFFF` when a signal ended the program.
    pub fn exit_value(&self) -> u32 {
        self.code()
            .map_or(EXIT_VALUE_MAX, |c| c.unsigned_abs() & EXIT_VALUE_MAX)
    }

    /// How the program ended, for messages: `exit 3`, or `killed`.
    pub fn ended(&self) -> String {
        self.code()
            .map_or("killed".to_string(), |c| format!("exit {c}"))
    }

    /// The last `lines` non-empty lines of standard error, joined with
    /// newlines.
    pub fn stderr_tail(&self, lines: usize) -> String {
        tail(&self.stderr(), lines)
    }

    /// The failure of this run: `result_code` and `message`, extended code
    /// `facility`/`component` with [`Output::exit_value`] as its value.
    pub fn failure(
        &self,
        result_code: u32,
        message: impl Into<String>,
        facility: Facility,
        component: u8,
    ) -> Status {
        Status::new(result_code, message).extended(facility, component, self.exit_value())
    }
}

/// The last `lines` non-empty lines of `text`, joined with newlines.
pub fn tail(text: &str, lines: usize) -> String {
    let kept: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    kept[kept.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(exit_code: Option<i32>, stderr: &str) -> Output {
        Output(host::Output {
            exit_code,
            stdout: Vec::new(),
            stderr: stderr.as_bytes().to_vec(),
            truncated: false,
        })
    }

    #[test]
    fn exit_codes_become_extended_values() {
        assert_eq!(output(Some(3), "").exit_value(), 3);
        assert_eq!(output(Some(-2), "").exit_value(), 2);
        assert_eq!(output(Some(i32::MIN), "").exit_value(), 0);
        assert_eq!(output(None, "").exit_value(), 0xF_FFFF);
        assert_eq!(output(Some(0x10_0001), "").exit_value(), 1);
        assert_eq!(output(Some(3), "").ended(), "exit 3");
        assert_eq!(output(None, "").ended(), "killed");
    }

    #[test]
    fn a_failed_run_is_a_status_with_its_exit_value() {
        let out = output(Some(100), "warning\n\nE: one\nE: two\n");
        assert_eq!(out.stderr_tail(2), "E: one\nE: two");
        assert_eq!(out.stderr_tail(9), "warning\nE: one\nE: two");
        let status = out.failure(30, "apt-get update failed", Facility::PackageManager, 1);
        assert_eq!(status.result_code, 30);
        assert_eq!(status.message, "apt-get update failed");
        assert_eq!(
            (
                status.extended_code.facility,
                status.extended_code.component,
                status.extended_code.value
            ),
            (Facility::PackageManager as u8, 1, 100)
        );
    }
}
