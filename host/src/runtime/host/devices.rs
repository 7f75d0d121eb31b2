//! `otabox:handler/devices`: whole-image writes to declared block devices
//! and slot files, streamed from a verified payload, synced, read back and
//! hashed by the host.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use wasmtime::component::Resource;

use crate::runtime::bindings::otabox::handler::devices::{DeviceInfo, Host};
use crate::runtime::bindings::{HostError, Phase};
use crate::runtime::host::payloads::PayloadHandle;
use crate::runtime::state::{CancelFlag, HostState, ProgressEvent, ProgressSink};

/// Bytes copied or hashed per read.
const CHUNK: usize = 4 << 20;

impl Host for HostState {
    async fn info(&mut self, path: String) -> wasmtime::Result<Result<DeviceInfo, HostError>> {
        let Some(host) = self.device(&path) else {
            return Ok(Err(undeclared(&path)));
        };
        Ok(blocking(move || device_info(&host)).await)
    }

    async fn write_image(
        &mut self,
        path: String,
        image: Resource<PayloadHandle>,
    ) -> wasmtime::Result<Result<String, HostError>> {
        let Some(host) = self.device(&path) else {
            return Ok(Err(undeclared(&path)));
        };
        let payload = self.table.get(&image)?;
        let source = match payload.file().try_clone() {
            Ok(file) => file,
            Err(e) => return Ok(Err(HostError::Failed(format!("payload: {e}")))),
        };
        let size = payload.size();
        let report = self.progress_reporter();
        let cancel = self.scope.cancel.clone();
        tracing::info!(handler = &*self.handler, device = path, host = %host.display(), size, "writing image");
        Ok(blocking(move || write_image(&host, source, size, &report, &cancel)).await)
    }

    async fn hash(
        &mut self,
        path: String,
        length: u64,
    ) -> wasmtime::Result<Result<String, HostError>> {
        let Some(host) = self.device(&path) else {
            return Ok(Err(undeclared(&path)));
        };
        Ok(blocking(move || {
            let mut file = File::open(&host).map_err(|e| io_error(&host, "open", e))?;
            let available = device_size(&mut file).map_err(|e| io_error(&host, "size", e))?;
            if length > available {
                return Err(HostError::Invalid(format!(
                    "cannot hash {length} bytes of a {available}-byte device"
                )));
            }
            sha256_prefix(&mut file, length).map_err(|e| io_error(&host, "read", e))
        })
        .await)
    }
}

impl HostState {
    /// The host path of the declared device `path`, if it is granted.
    fn device(&self, path: &str) -> Option<PathBuf> {
        self.grants
            .devices
            .iter()
            .find(|d| d.guest == Path::new(path))
            .map(|d| d.host.clone())
    }

    /// Install progress for the current call, as bytes done of total.
    fn progress_reporter(&self) -> impl Fn(u64, u64) + Send + 'static {
        let sink: Option<ProgressSink> = self.scope.progress.clone();
        let (handler, job_id, step) = (
            self.handler.to_string(),
            self.scope.job_id.clone(),
            self.scope.step,
        );
        move |done, total| {
            if let Some(sink) = &sink {
                sink(ProgressEvent {
                    handler: handler.clone(),
                    job_id: job_id.clone(),
                    step,
                    phase: Phase::Install,
                    done,
                    total,
                });
            }
        }
    }
}

fn undeclared(path: &str) -> HostError {
    HostError::Denied(format!(
        "device {path:?} is not among the handler's declared and granted devices"
    ))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, HostError> + Send + 'static,
) -> Result<T, HostError> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(HostError::Failed(format!("device worker: {e}"))))
}

fn io_error(path: &Path, what: &str, e: io::Error) -> HostError {
    HostError::Failed(format!("{what} {}: {e}", path.display()))
}

fn device_info(path: &Path) -> Result<DeviceInfo, HostError> {
    let mut file = File::open(path).map_err(|e| io_error(path, "open", e))?;
    let block = file
        .metadata()
        .map_err(|e| io_error(path, "stat", e))?
        .file_type()
        .is_block_device();
    let size = device_size(&mut file).map_err(|e| io_error(path, "size", e))?;
    Ok(DeviceInfo { size, block })
}

/// The capacity: the end of a block device, or a file's length.
fn device_size(file: &mut File) -> io::Result<u64> {
    let end = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(end)
}

/// Copies `size` bytes of `source` to the start of the device, syncs,
/// reads them back and returns their sha256.
fn write_image(
    path: &Path,
    mut source: File,
    size: u64,
    report: &(dyn Fn(u64, u64) + Send),
    cancel: &CancelFlag,
) -> Result<String, HostError> {
    // Never create or grow: a slot is allocated ahead.
    let mut device = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io_error(path, "open", e))?;
    let capacity = device_size(&mut device).map_err(|e| io_error(path, "size", e))?;
    if size > capacity {
        return Err(HostError::Invalid(format!(
            "the image ({size} bytes) is larger than {} ({capacity} bytes); nothing was written",
            path.display()
        )));
    }
    source
        .seek(SeekFrom::Start(0))
        .map_err(|e| HostError::Failed(format!("payload: {e}")))?;
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < size {
        if cancel.is_cancelled() {
            return Err(HostError::TimedOut(format!(
                "the job was cancelled after {done} of {size} bytes"
            )));
        }
        let want = usize::try_from((size - done).min(CHUNK as u64)).unwrap_or(CHUNK);
        source
            .read_exact(&mut buf[..want])
            .map_err(|e| HostError::Failed(format!("payload: {e}")))?;
        device
            .write_all(&buf[..want])
            .map_err(|e| io_error(path, "write", e))?;
        done += want as u64;
        report(done, size);
    }
    device.sync_all().map_err(|e| io_error(path, "sync", e))?;
    device
        .seek(SeekFrom::Start(0))
        .map_err(|e| io_error(path, "seek", e))?;
    sha256_prefix(&mut device, size).map_err(|e| io_error(path, "read back", e))
}

/// The sha256 of the first `length` bytes of `file` (from its start).
fn sha256_prefix(file: &mut File, length: u64) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut done = 0u64;
    while done < length {
        let want = usize::try_from((length - done).min(CHUNK as u64)).unwrap_or(CHUNK);
        file.read_exact(&mut buf[..want])?;
        hasher.update(&buf[..want]);
        done += want as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_verifies_and_refuses_to_grow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let slot = dir.path().join("slot");
        std::fs::write(&slot, vec![0xAAu8; 10 << 20]).expect("slot");
        let image = dir.path().join("image");
        let content: Vec<u8> = (0..(5 << 20) + 7).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, &content).expect("image");
        let seen = std::sync::Mutex::new(Vec::new());
        let report = |done, total| seen.lock().expect("lock").push((done, total));
        let hash = write_image(
            &slot,
            File::open(&image).expect("open"),
            content.len() as u64,
            &report,
            &CancelFlag::default(),
        )
        .expect("write");
        assert_eq!(hash, hex::encode(Sha256::digest(&content)));
        let written = std::fs::read(&slot).expect("read");
        assert_eq!(written.len(), 10 << 20, "the slot is never resized");
        assert_eq!(&written[..content.len()], &content[..]);
        assert!(written[content.len()..].iter().all(|b| *b == 0xAA));
        assert_eq!(
            seen.lock().expect("lock").last(),
            Some(&(content.len() as u64, content.len() as u64))
        );

        let small = dir.path().join("small");
        std::fs::write(&small, vec![1u8; 1024]).expect("small slot");
        let err = write_image(
            &small,
            File::open(&image).expect("open"),
            content.len() as u64,
            &report,
            &CancelFlag::default(),
        )
        .expect_err("too large");
        assert!(
            matches!(err, HostError::Invalid(ref m) if m.contains("larger")),
            "{err:?}"
        );
        assert_eq!(std::fs::read(&small).expect("read"), vec![1u8; 1024]);
    }

    #[test]
    fn a_cancelled_write_stops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let slot = dir.path().join("slot");
        std::fs::write(&slot, vec![0u8; 1 << 20]).expect("slot");
        let image = dir.path().join("image");
        std::fs::write(&image, vec![7u8; 1 << 20]).expect("image");
        let cancel = CancelFlag::default();
        cancel.cancel();
        let err = write_image(
            &slot,
            File::open(&image).expect("open"),
            1 << 20,
            &|_, _| {},
            &cancel,
        )
        .expect_err("cancelled");
        assert!(matches!(err, HostError::TimedOut(_)), "{err:?}");
    }
}
