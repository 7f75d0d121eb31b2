//! `otabox:handler/devices`: whole-image writes to declared block devices
//! and slot files, streamed from a verified payload, synced, read back and
//! hashed by the host.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, Mode, OFlags, ResolveFlags, openat, openat2};
use rustix::io::Errno;
use sha2::{Digest, Sha256};
use wasmtime::component::Resource;

use crate::capabilities::Grants;

use crate::bindings::HostError;
use crate::bindings::otabox::handler::devices::{DeviceInfo, Host};
use crate::imports::payloads::PayloadHandle;
use crate::{CancelFlag, HostState, ProgressEvent, ProgressSink};

/// Bytes copied or hashed per read.
const CHUNK: usize = 4 << 20;

impl Host for HostState {
    async fn info(&mut self, path: String) -> wasmtime::Result<Result<DeviceInfo, HostError>> {
        let Some(device) = self.device(&path) else {
            return Ok(Err(undeclared(&path)));
        };
        Ok(blocking(move || {
            let (mut file, block) = device.open(false)?;
            let size = device_size(&mut file).map_err(|e| device.error("size", e))?;
            Ok(DeviceInfo { size, block })
        })
        .await)
    }

    async fn write_image(
        &mut self,
        path: String,
        image: Resource<PayloadHandle>,
    ) -> wasmtime::Result<Result<String, HostError>> {
        let Some(device) = self.device(&path) else {
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
        tracing::info!(handler = &*self.handler, device = path, host = %device.host.display(), size, "writing image");
        Ok(blocking(move || {
            let (target, _) = device.open(true)?;
            write_image(target, &device.host, source, size, &report, &cancel)
        })
        .await)
    }

    async fn hash(
        &mut self,
        path: String,
        length: u64,
    ) -> wasmtime::Result<Result<String, HostError>> {
        let Some(device) = self.device(&path) else {
            return Ok(Err(undeclared(&path)));
        };
        Ok(blocking(move || {
            let (mut file, _) = device.open(false)?;
            let available = device_size(&mut file).map_err(|e| device.error("size", e))?;
            if length > available {
                return Err(HostError::Invalid(format!(
                    "cannot hash {length} bytes of a {available}-byte device"
                )));
            }
            sha256_prefix(&mut file, length).map_err(|e| device.error("read", e))
        })
        .await)
    }
}

impl HostState {
    /// The declared device `path`, if it is granted.
    fn device(&self, path: &str) -> Option<PinnedDevice> {
        self.devices
            .iter()
            .find(|d| d.guest == Path::new(path))
            .cloned()
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
                    phase: otabox_core::model::Phase::Install,
                    done,
                    total,
                });
            }
        }
    }
}

/// A granted device as found when its handler was loaded: the path with
/// every link resolved then, its kind and identity (device and inode).
/// Each call opens that path refusing any symbolic link in it, and goes on
/// only when it reaches the very same block device or slot file, so a
/// link or file planted since (through a writable grant, say) is refused.
#[derive(Debug, Clone)]
pub struct PinnedDevice {
    /// The path the handler names.
    pub guest: PathBuf,
    /// Where the device config places it.
    pub host: PathBuf,
    /// What was found at load, or why the device cannot be used.
    found: Result<Identity, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    resolved: PathBuf,
    dev: u64,
    ino: u64,
    block: bool,
}

impl PinnedDevice {
    /// Finds each granted device of `grants` now (at load).
    pub fn pin_all(grants: &Grants) -> Vec<PinnedDevice> {
        grants
            .devices
            .iter()
            .map(|d| {
                let found = identify(&d.host);
                if let Err(why) = &found {
                    tracing::warn!("device {} cannot be used: {why}", d.guest.display());
                }
                PinnedDevice {
                    guest: d.guest.clone(),
                    host: d.host.clone(),
                    found,
                }
            })
            .collect()
    }

    /// Opens the device, read-only or for writing, with no symbolic link
    /// on the way, and checks it is the one found at load; also says
    /// whether it is a block device.
    fn open(&self, write: bool) -> Result<(File, bool), HostError> {
        let id = self.found.as_ref().map_err(|why| {
            HostError::Denied(format!(
                "device {} was not usable when the handler was loaded: {why}",
                self.guest.display()
            ))
        })?;
        let access = if write { OFlags::RDWR } else { OFlags::RDONLY };
        let flags = access | OFlags::CLOEXEC | OFlags::NOCTTY;
        let opened = match openat2(
            CWD,
            &id.resolved,
            flags,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
        ) {
            // Before Linux 5.6: the identity check below still holds.
            Err(Errno::NOSYS) => openat(CWD, &id.resolved, flags | OFlags::NOFOLLOW, Mode::empty()),
            other => other,
        };
        let file = File::from(opened.map_err(|e| match e {
            Errno::LOOP => self.replaced("a symbolic link was planted in its path"),
            e => self.error("open", e.into()),
        })?);
        let meta = file.metadata().map_err(|e| self.error("stat", e))?;
        if meta.dev() != id.dev
            || meta.ino() != id.ino
            || meta.file_type().is_block_device() != id.block
        {
            return Err(self.replaced("another file is in its place"));
        }
        Ok((file, id.block))
    }

    fn replaced(&self, how: &str) -> HostError {
        tracing::warn!(device = %self.guest.display(), host = %self.host.display(), "refused: {how} since the handler was loaded");
        HostError::Denied(format!(
            "device {}: {how} since the handler was loaded; refusing",
            self.guest.display()
        ))
    }

    fn error(&self, what: &str, e: io::Error) -> HostError {
        io_error(&self.host, what, e)
    }
}

/// The device at `host` as found now: a block device (possibly named
/// through links, such as `/dev/disk/by-partlabel/…`), or a regular slot
/// file named by its own path (no link on the way).
fn identify(host: &Path) -> Result<Identity, String> {
    let resolved = std::fs::canonicalize(host).map_err(|e| format!("{}: {e}", host.display()))?;
    let meta = std::fs::metadata(&resolved).map_err(|e| format!("{}: {e}", resolved.display()))?;
    let block = meta.file_type().is_block_device();
    if !block && !meta.is_file() {
        return Err(format!(
            "{} is neither a block device nor a regular file",
            resolved.display()
        ));
    }
    if !block && resolved != host {
        return Err(format!(
            "slot file {} leads through a symbolic link to {}; name it by its own path",
            host.display(),
            resolved.display()
        ));
    }
    Ok(Identity {
        resolved,
        dev: meta.dev(),
        ino: meta.ino(),
        block,
    })
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

/// The capacity: the end of a block device, or a file's length.
fn device_size(file: &mut File) -> io::Result<u64> {
    let end = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(end)
}

/// Copies `size` bytes of `source` to the start of `device` (opened
/// read-write, named `path` in errors), syncs, reads them back and returns
/// their sha256. Never creates or grows: a slot is allocated ahead.
fn write_image(
    mut device: File,
    path: &Path,
    mut source: File,
    size: u64,
    report: &(dyn Fn(u64, u64) + Send),
    cancel: &CancelFlag,
) -> Result<String, HostError> {
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
        let rw = |p: &Path| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .expect("open device")
        };
        let hash = write_image(
            rw(&slot),
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
            rw(&small),
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
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&slot)
            .expect("open device");
        let err = write_image(
            device,
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
