//! Trust: payload verification (a file must have exactly its declared size
//! and sha256 before any handler sees it) and signed update manifests
//! ([`signed`]), and the root of trust the agent holds ([`RootStore`]).

mod root_store;
pub mod signed;

pub use root_store::RootStore;

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};

/// The size and lowercase hex sha256 of the file at `path`.
pub fn hash_file(path: &Path) -> Result<(u64, String)> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    hash_reader(&mut file).with_context(|| format!("cannot read {}", path.display()))
}

/// The length and lowercase hex sha256 of what `reader` yields to its end
/// (an open file that must not be opened again by name).
pub fn hash_reader(reader: &mut impl Read) -> std::io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let size = std::io::copy(reader, &mut hasher)?;
    Ok((size, hex::encode(hasher.finalize())))
}

/// Checks `path` against `size` and lowercase hex `sha256`, reading it once.
pub fn verify_file(path: &Path, size: u64, sha256: &str) -> Result<()> {
    let mut file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > size {
            bail!(
                "{} is larger than the declared {size} bytes",
                path.display()
            );
        }
        hasher.update(&buf[..n]);
    }
    if total != size {
        bail!("{} has {total} bytes, {size} declared", path.display());
    }
    let actual = hex::encode(hasher.finalize());
    if actual != sha256 {
        bail!("{} has sha256 {actual}, {sha256} declared", path.display());
    }
    Ok(())
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_and_hash_must_both_match() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("p");
        std::fs::write(&path, b"abc").expect("write");
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify_file(&path, 3, good).expect("matches");
        assert!(format!("{:#}", verify_file(&path, 2, good).unwrap_err()).contains("larger"));
        assert!(format!("{:#}", verify_file(&path, 4, good).unwrap_err()).contains("3 bytes"));
        assert!(
            format!("{:#}", verify_file(&path, 3, &"0".repeat(64)).unwrap_err()).contains("sha256")
        );
    }
}
