//! What the command line writes to the terminal: stdout through
//! [`outln!`](crate::outln) and [`out!`](crate::out), so that a reader that
//! goes away (`otabox handlers list | head`) ends the command quietly instead
//! of a panic, and whether the logs on stderr are coloured.

use std::ffi::OsStr;
use std::fmt;
use std::io::Write;

/// Exit status of a command whose stdout reader went away: 128 + SIGPIPE,
/// what a shell shows for a Unix tool ended by that signal.
pub const STDOUT_CLOSED_STATUS: u8 = 141;

/// The reader of stdout has gone (EPIPE): the command stops without a
/// message.
#[derive(Debug)]
pub struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the reader of stdout has gone")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes `args` to stdout and flushes it. A closed pipe is
/// [`StdoutClosed`]; any other failure says that stdout could not be written.
pub fn write(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.flush())
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::BrokenPipe => anyhow::Error::new(StdoutClosed),
            _ => anyhow::Error::new(e).context("cannot write to stdout"),
        })
}

/// Whether `error`, or an error it wraps, is [`StdoutClosed`].
pub fn is_stdout_closed(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| cause.is::<StdoutClosed>())
}

/// Whether logs get ANSI colours: only on a terminal, and never when
/// `NO_COLOR` is set to a non-empty value (<https://no-color.org>).
pub fn use_color(on_terminal: bool, no_color: Option<&OsStr>) -> bool {
    on_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// Writes to stdout like `print!`, but returns an `anyhow::Result` (see
/// [`console::write`](crate::console::write)) instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::console::write(format_args!($($arg)*))
    };
}

/// Writes a line to stdout like `println!`, but returns an
/// `anyhow::Result` (see [`console::write`](crate::console::write)) instead
/// of panicking.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::console::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::console::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(use_color(true, None));
        assert!(use_color(true, Some(OsStr::new(""))));
        assert!(!use_color(true, Some(OsStr::new("1"))));
        assert!(!use_color(true, Some(OsStr::new("0"))));
        assert!(!use_color(false, None));
    }

    #[test]
    fn a_closed_stdout_is_found_through_context() {
        let e = anyhow::Error::new(StdoutClosed).context("printing the list");
        assert!(is_stdout_closed(&e));
        let other = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(!is_stdout_closed(&other), "only stdout's EPIPE is quiet");
    }
}
