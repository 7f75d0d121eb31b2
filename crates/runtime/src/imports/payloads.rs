//! `otabox:handler/payloads`: read-only handles to verified payload files.

use std::fs::File;
use std::os::unix::fs::FileExt;

use wasmtime::component::Resource;

use crate::bindings::HostError;
use crate::bindings::otabox::handler::payloads::{Host, HostPayload};
use crate::state::HostState;

/// Largest read the guest may ask for in one call.
pub const MAX_READ: u32 = 4 << 20;
/// Most payload handles a guest may hold open at once.
const MAX_OPEN: usize = 64;

/// An open verified payload: the host holds the file; the guest a handle.
pub struct PayloadHandle {
    name: String,
    size: u64,
    sha256: String,
    file: File,
}

impl PayloadHandle {
    /// The open verified file.
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Its verified size.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }
}

impl Host for HostState {
    async fn open(
        &mut self,
        name: String,
    ) -> wasmtime::Result<Result<Resource<PayloadHandle>, HostError>> {
        let Some(payload) = self.scope.payloads.iter().find(|p| p.name == name) else {
            return Ok(Err(HostError::NotFound(format!(
                "the step has no payload named {name:?}"
            ))));
        };
        let Some(path) = &payload.verified else {
            return Ok(Err(HostError::Denied(format!(
                "payload {name:?} is not downloaded and verified yet"
            ))));
        };
        if self.open_payloads >= MAX_OPEN {
            return Ok(Err(HostError::Invalid(format!(
                "more than {MAX_OPEN} open handles"
            ))));
        }
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) => {
                return Ok(Err(HostError::Failed(format!(
                    "cannot open payload {name:?}: {e}"
                ))));
            }
        };
        let handle = PayloadHandle {
            name,
            size: payload.size,
            sha256: payload.sha256.clone(),
            file,
        };
        let resource = self.table.push(handle)?;
        self.open_payloads += 1;
        Ok(Ok(resource))
    }
}

impl HostPayload for HostState {
    async fn name(&mut self, this: Resource<PayloadHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.name.clone())
    }

    async fn size(&mut self, this: Resource<PayloadHandle>) -> wasmtime::Result<u64> {
        Ok(self.table.get(&this)?.size)
    }

    async fn sha256(&mut self, this: Resource<PayloadHandle>) -> wasmtime::Result<String> {
        Ok(self.table.get(&this)?.sha256.clone())
    }

    async fn read(
        &mut self,
        this: Resource<PayloadHandle>,
        offset: u64,
        len: u32,
    ) -> wasmtime::Result<Result<Vec<u8>, HostError>> {
        if len > MAX_READ {
            return Ok(Err(HostError::Invalid(format!(
                "read of {len} bytes is over the {MAX_READ}-byte limit"
            ))));
        }
        let handle = self.table.get(&this)?;
        let want = u64::from(len).min(handle.size.saturating_sub(offset)) as usize;
        let mut buf = vec![0u8; want];
        let mut filled = 0;
        while filled < want {
            match handle
                .file
                .read_at(&mut buf[filled..], offset + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Ok(Err(HostError::Failed(format!(
                        "reading {}: {e}",
                        handle.name
                    ))));
                }
            }
        }
        buf.truncate(filled);
        Ok(Ok(buf))
    }

    async fn drop(&mut self, this: Resource<PayloadHandle>) -> wasmtime::Result<()> {
        self.table.delete(this)?;
        self.open_payloads = self.open_payloads.saturating_sub(1);
        Ok(())
    }
}
