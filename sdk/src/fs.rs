//! File helpers for handlers that keep state in a declared directory.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};

use serde::{Serialize, de::DeserializeOwned};

/// Reads a JSON file written by [`save_json`]; a missing file is
/// `T::default()`. Errors name the file.
pub fn load_json<T: DeserializeOwned + Default>(path: &Path) -> Result<T, String> {
    match fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| format!("{} is damaged: {e}", path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// Writes `value` as pretty JSON with [`write_atomic`]. Errors name the file.
pub fn save_json<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    write_atomic(path, &bytes).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Writes `bytes` to `path` atomically: a temporary sibling, fsync, rename,
/// then a sync of the directory where the platform allows it. A reader sees
/// the old content or the new, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"))?;
    let mut staged_name = path.file_name().unwrap_or_default().to_os_string();
    staged_name.push(".new");
    let staged = dir.join(staged_name);
    fs::create_dir_all(dir)?;
    let mut file = File::create(&staged)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&staged, path)?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// The environment variable in which the host lists the directories it
/// grants the handler (as the handler sees them), separated by `:`.
pub const GRANTED_PATHS_ENV: &str = "OTABOX_GRANTED_PATHS";

/// The directories the device grants this handler.
pub fn granted_paths() -> Vec<PathBuf> {
    std::env::var(GRANTED_PATHS_ENV)
        .unwrap_or_default()
        .split(':')
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// When `path` lies outside every granted directory, the sandbox's
/// refusal in words: `denied: PATH is outside the granted paths (A, B)`.
/// The guest's own libc refuses such a path (as "not found") before the
/// host sees it; use this to report the real cause of an I/O error.
pub fn denial(path: &Path) -> Option<String> {
    denial_within(path, &granted_paths())
}

fn denial_within(path: &Path, granted: &[PathBuf]) -> Option<String> {
    let mut normal = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                normal.pop();
            }
            Component::CurDir => {}
            other => normal.push(other),
        }
    }
    if path.is_absolute() && granted.iter().any(|g| normal.starts_with(g)) {
        return None;
    }
    let list: Vec<String> = granted.iter().map(|g| g.display().to_string()).collect();
    Some(format!(
        "denied: {} is outside the granted paths ({})",
        path.display(),
        if list.is_empty() {
            "none".to_string()
        } else {
            list.join(", ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("otabox-sdk-fs-{}", std::process::id()));
        let path = dir.join("state.json");
        write_atomic(&path, b"one").expect("first");
        write_atomic(&path, b"two").expect("second");
        assert_eq!(fs::read(&path).expect("read"), b"two");
        assert!(!dir.join("state.json.new").exists());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_path_outside_every_grant_is_a_denial() {
        let granted = [
            PathBuf::from("/var/lib/otabox/files"),
            PathBuf::from("/run/x"),
        ];
        assert_eq!(
            denial_within(Path::new("/var/lib/otabox/files/a.conf"), &granted),
            None
        );
        assert_eq!(
            denial_within(Path::new("/etc/otabox-demo.conf"), &granted).as_deref(),
            Some(
                "denied: /etc/otabox-demo.conf is outside the granted paths (/var/lib/otabox/files, /run/x)"
            )
        );
        for escape in [
            "/var/lib/otabox/files/../x",
            "/var/lib/otabox/filesx/a",
            "relative/a",
        ] {
            assert!(
                denial_within(Path::new(escape), &granted).is_some(),
                "{escape}"
            );
        }
        assert!(denial_within(Path::new("/a"), &[]).is_some_and(|d| d.ends_with("(none)")));
    }
}
