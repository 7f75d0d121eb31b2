//! Fetching payload files into a job folder, verified against their declared
//! size and sha256 before any handler sees them.
//!
//! This version fetches `file://` URLs (payloads staged on the device);
//! `http`/`https` downloads are refused with a clear error until the
//! resumable downloader lands.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::shadow::FileSpec;
use crate::trust::verify_file;

/// Fetches `file` to `dest` (skipping a complete, verified copy already
/// there); on any mismatch nothing is left at `dest`.
pub fn fetch(file: &FileSpec, dest: &Path) -> Result<()> {
    if dest.exists() && verify_file(dest, file.size, &file.sha256).is_ok() {
        return Ok(());
    }
    let source = local_path(&file.url)?;
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let partial = dest.with_extension("partial");
    std::fs::copy(&source, &partial).with_context(|| format!("cannot fetch {}", file.url))?;
    if let Err(e) = verify_file(&partial, file.size, &file.sha256) {
        let _ = std::fs::remove_file(&partial);
        return Err(e).with_context(|| format!("payload {} from {}", file.name, file.url));
    }
    std::fs::File::open(&partial).and_then(|f| f.sync_all())?;
    std::fs::rename(&partial, dest).with_context(|| format!("cannot move {} into place", partial.display()))?;
    crate::durable::sync_dir(dest.parent().unwrap_or(Path::new(".")))
}

fn local_path(url: &str) -> Result<PathBuf> {
    match url.strip_prefix("file://") {
        Some(path) if path.starts_with('/') && !path.contains('%') && !path.contains('?') => Ok(PathBuf::from(path)),
        Some(_) => bail!("{url}: only plain absolute file:// URLs are supported"),
        None => bail!("{url}: http(s) downloads are not available in this agent version yet; stage the payload and use a file:// URL"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_verified_bytes_and_leaves_nothing_on_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src.bin");
        std::fs::write(&src, b"abc").expect("write");
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        let spec = |sha: &str| FileSpec { name: "p".into(), url: format!("file://{}", src.display()), size: 3, sha256: sha.into() };
        let dest = dir.path().join("job/p");
        fetch(&spec(good), &dest).expect("fetch");
        assert_eq!(std::fs::read(&dest).expect("read"), b"abc");
        let bad_dest = dir.path().join("job/q");
        assert!(fetch(&spec(&"0".repeat(64)), &bad_dest).is_err());
        assert!(!bad_dest.exists() && !bad_dest.with_extension("partial").exists());
        let http = FileSpec { url: "https://h/p".into(), ..spec(good) };
        assert!(format!("{:#}", fetch(&http, &bad_dest).unwrap_err()).contains("not available"));
    }
}
