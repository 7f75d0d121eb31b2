//! Crash-safe file writes: temp file, fsync, rename, fsync of the directory.
//!
//! State files can hold secrets (bearer tokens of a deployment): every file
//! written here is private to the agent (mode 0600), and the directories of
//! the agent's state are created 0700. [`make_private`] tightens what an
//! older agent left readable by others.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// Mode of the files the agent writes: readable by the agent only.
pub const FILE_MODE: u32 = 0o600;
/// Mode of the directories the agent creates for its state.
pub const DIR_MODE: u32 = 0o700;

/// Replaces `path` with `bytes` so that after a crash it holds either the
/// old or the new content, never a mix. The file is private (mode 0600).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let staged = StagedFile::write(path, bytes, FILE_MODE)?;
    let dir = staged.dir().to_path_buf();
    staged.commit()?;
    sync_dir(&dir)
}

/// Replaces `path` with `bytes` as one step for readers (temp file and
/// rename), without waiting for the disk: for records that only say what
/// is happening now (a crash may leave the old content or none, which the
/// next write replaces). The file is private (mode 0600).
pub fn replace(path: &Path, bytes: &[u8]) -> Result<()> {
    StagedFile::stage(path, bytes, FILE_MODE, false)?.commit()
}

/// The content of a file written and synced under a temporary name beside
/// its destination, invisible to readers of the destination until
/// [`StagedFile::commit`] renames it there; removed when dropped
/// uncommitted.
#[derive(Debug)]
pub struct StagedFile {
    temp: PathBuf,
    destination: PathBuf,
    committed: bool,
}

impl StagedFile {
    /// Writes `bytes` to a new temporary file (`.<name>.tmp-<pid>-<n>`,
    /// created exclusively with `mode`) in the directory of `destination`,
    /// and syncs it.
    pub fn write(destination: &Path, bytes: &[u8], mode: u32) -> Result<Self> {
        Self::stage(destination, bytes, mode, true)
    }

    /// As [`StagedFile::write`], syncing the file only when `sync` is set.
    fn stage(destination: &Path, bytes: &[u8], mode: u32, sync: bool) -> Result<Self> {
        let name = destination
            .file_name()
            .with_context(|| format!("{} names no file", destination.display()))?;
        let dir = parent_dir(destination);
        let staged = Self {
            temp: dir.join(format!(
                ".{}.tmp-{}-{}",
                name.to_string_lossy(),
                std::process::id(),
                SEQUENCE.fetch_add(1, Ordering::Relaxed)
            )),
            destination: destination.to_path_buf(),
            committed: false,
        };
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&staged.temp)
            .and_then(|mut file| {
                file.write_all(bytes)?;
                if sync { file.sync_all() } else { Ok(()) }
            });
        written.with_context(|| format!("cannot write {}", destination.display()))?;
        Ok(staged)
    }

    /// The directory it is staged in (its destination's).
    pub fn dir(&self) -> &Path {
        parent_dir(&self.destination)
    }

    /// Renames it over its destination (the directory still needs a
    /// [`sync_dir`] to make that durable).
    pub fn commit(mut self) -> Result<()> {
        fs::rename(&self.temp, &self.destination)
            .with_context(|| format!("cannot write {}", self.destination.display()))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Flushes a directory's entries (after a rename or create in it).
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync directory {}", dir.display()))
}

/// Creates `dir` and any missing parents with mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))
}

/// Takes every permission of group and others from `path` itself; a
/// symbolic link is neither followed nor changed, and a missing `path` is
/// fine. Returns whether `path` is a directory.
pub fn make_private(path: &Path) -> Result<bool> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    };
    if meta.file_type().is_symlink() {
        return Ok(false);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(mode & !0o077))
            .with_context(|| format!("cannot make {} private", path.display()))?;
        tracing::info!(
            "{} was open to others (mode {mode:o}); now {:o}",
            path.display(),
            mode & !0o077
        );
    }
    Ok(meta.is_dir())
}

/// Like [`make_private`], for `path` and everything below it.
pub fn make_private_tree(path: &Path) -> Result<()> {
    if make_private(path)? {
        let entries =
            fs::read_dir(path).with_context(|| format!("cannot list {}", path.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", path.display()))?;
            make_private_tree(&entry.path())?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_content_and_leaves_no_temp_file() {
        for write in [write_atomic, replace] {
            replaces_content_and_leaves_no_temp_file_with(write);
        }
    }

    fn replaces_content_and_leaves_no_temp_file_with(write: fn(&Path, &[u8]) -> Result<()>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        write(&path, b"one").expect("first write");
        write(&path, b"two").expect("second write");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
        let mode = fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, FILE_MODE, "{mode:o}");
    }

    #[test]
    fn make_private_tightens_a_tree_and_leaves_links_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("state");
        fs::create_dir_all(root.join("jobs/a")).expect("dirs");
        fs::write(root.join("jobs/a/journal.json"), b"{}").expect("file");
        let outside = dir.path().join("outside");
        fs::write(&outside, b"x").expect("outside");
        std::os::unix::fs::symlink(&outside, root.join("jobs/link")).expect("link");
        for p in [&root, &root.join("jobs"), &root.join("jobs/a")] {
            fs::set_permissions(p, fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o644)).expect("chmod");
        make_private_tree(&root).expect("tighten");
        let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("jobs/a")), 0o700);
        assert_eq!(mode(&root.join("jobs/a/journal.json")), 0o600);
        assert_eq!(mode(&outside), 0o644, "a link is not followed");
        make_private_tree(&dir.path().join("missing")).expect("nothing to do");
        create_private_dir(&dir.path().join("new/deeper")).expect("create");
        assert_eq!(mode(&dir.path().join("new")), 0o700);
        assert_eq!(mode(&dir.path().join("new/deeper")), 0o700);
    }
}
