//! The device's root of trust for signed deployments, as the agent holds
//! it: the configured root, or a later one a rotation delivered (kept in
//! the state directory as `trust-root.json`, so it survives restarts).

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use anyhow::{Context, Result};

use super::signed::Root;

/// The file in the state directory holding the latest rotated root.
const ROTATED_FILE: &str = "trust-root.json";

/// The current root of trust (none when deployments need no signature),
/// shared by every path that admits a deployment.
#[derive(Debug)]
pub struct RootStore {
    /// Where a rotated root is kept.
    rotated: PathBuf,
    /// The root deployments verify against now.
    current: Mutex<Option<Root>>,
}

impl RootStore {
    /// The root configured at `configured` (`[trust] root`), or the rotated
    /// one kept in `state` when it is newer and well-formed; no root when
    /// none is configured. A configured root that cannot be read, parsed
    /// or checked is an error.
    pub fn load(configured: Option<&Path>, state: &Path) -> Result<Self> {
        let rotated = state.join(ROTATED_FILE);
        let current = match configured {
            Some(path) => Some(newest(read_root(path)?, &rotated)),
            None => None,
        };
        Ok(RootStore {
            rotated,
            current: Mutex::new(current),
        })
    }

    /// The root deployments verify against now, if any.
    pub fn current(&self) -> Option<Root> {
        self.lock().clone()
    }

    /// Keeps a rotated root for later deployments and restarts: written
    /// durably first, and used only once written (an error is logged).
    pub fn keep(&self, root: Root) {
        match serde_json::to_vec_pretty(&root)
            .map_err(anyhow::Error::from)
            .and_then(|b| crate::durable::write_atomic(&self.rotated, &b))
        {
            Ok(()) => {
                tracing::info!(version = root.version, "trust root rotated");
                *self.lock() = Some(root);
            }
            Err(e) => tracing::error!("cannot keep the rotated trust root: {e:#}"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Root>> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The configured root at `path`, read, parsed and checked.
fn read_root(path: &Path) -> Result<Root> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read trust root {}", path.display()))?;
    let root: Root = serde_json::from_str(&text)
        .with_context(|| format!("trust root {} does not parse", path.display()))?;
    root.check()?;
    Ok(root)
}

/// `configured`, or the root kept at `rotated` when that one is a later
/// version and checks out (an unreadable or older one is ignored).
fn newest(configured: Root, rotated: &Path) -> Root {
    std::fs::read(rotated)
        .ok()
        .and_then(|b| serde_json::from_slice::<Root>(&b).ok())
        .filter(|r| r.version > configured.version && r.check().is_ok())
        .unwrap_or(configured)
}
