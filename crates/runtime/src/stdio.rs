//! Guest stdout and stderr: captured (up to [`MAX_CAPTURE`] bytes per call,
//! the rest dropped, never an error to the guest) and written to the agent
//! log after the call, tagged with the handler and phase.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{OutputStream, StreamResult};

/// Most bytes kept per stream and call.
pub const MAX_CAPTURE: usize = 64 << 10;

/// A capped in-memory capture of one guest output stream.
#[derive(Clone, Default)]
pub struct GuestOutput(Arc<Mutex<Captured>>);

#[derive(Default)]
struct Captured {
    bytes: Vec<u8>,
    dropped: usize,
}

impl GuestOutput {
    fn append(&self, data: &[u8]) {
        let mut c = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let room = MAX_CAPTURE.saturating_sub(c.bytes.len());
        c.bytes.extend_from_slice(&data[..data.len().min(room)]);
        c.dropped += data.len().saturating_sub(room);
    }

    /// The captured text (lossy UTF-8) and how many bytes were dropped.
    pub fn take(&self) -> (String, usize) {
        let mut c = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let text = String::from_utf8_lossy(&c.bytes).into_owned();
        let dropped = c.dropped;
        *c = Captured::default();
        (text, dropped)
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }

    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(MAX_CAPTURE)
    }
}

impl AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_is_capped_and_counts_what_it_drops() {
        let out = GuestOutput::default();
        out.append(&vec![b'a'; MAX_CAPTURE - 1]);
        out.append(b"bcd");
        let (text, dropped) = out.take();
        assert_eq!(text.len(), MAX_CAPTURE);
        assert!(text.ends_with('b'));
        assert_eq!(dropped, 2);
        assert_eq!(out.take(), (String::new(), 0));
    }
}
