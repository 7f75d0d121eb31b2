//! Read-only, verified payload files.

use std::io;

use crate::__bindings::otabox::handler::payloads as host;
use crate::HostError;

/// Bytes per host read: large enough to amortise the call, small enough to
/// keep guest memory flat.
const READ_CHUNK: u32 = 1 << 20;

/// An open payload file whose sha256 the host has verified.
pub struct Payload {
    inner: host::Payload,
}

impl Payload {
    /// Opens the payload named `name` of the current step.
    pub fn open(name: &str) -> Result<Self, HostError> {
        host::open(name).map(|inner| Self { inner })
    }

    /// The host resource, for host calls that take a payload.
    pub(crate) fn resource(&self) -> &host::Payload {
        &self.inner
    }

    /// The payload's file name.
    pub fn name(&self) -> String {
        self.inner.name()
    }

    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.size()
    }

    /// Its verified lowercase hex sha256.
    pub fn sha256(&self) -> String {
        self.inner.sha256()
    }

    /// Reads up to `len` bytes at `offset`.
    pub fn read_at(&self, offset: u64, len: u32) -> Result<Vec<u8>, HostError> {
        self.inner.read(offset, len)
    }

    /// A sequential [`io::Read`] over the whole payload, for `io::copy`.
    pub fn reader(&self) -> PayloadReader<'_> {
        PayloadReader {
            payload: self,
            offset: 0,
            buffer: Vec::new(),
            pos: 0,
        }
    }
}

/// Sequential reader over a [`Payload`].
pub struct PayloadReader<'a> {
    payload: &'a Payload,
    offset: u64,
    buffer: Vec<u8>,
    pos: usize,
}

impl io::Read for PayloadReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buffer.len() {
            self.buffer = self
                .payload
                .read_at(self.offset, READ_CHUNK)
                .map_err(|e| io::Error::other(e.to_string()))?;
            self.pos = 0;
            self.offset += self.buffer.len() as u64;
        }
        let n = out.len().min(self.buffer.len() - self.pos);
        out[..n].copy_from_slice(&self.buffer[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}
