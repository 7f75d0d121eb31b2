//! `otabox:handler/checkpoint`: a durable key/value store per job step,
//! kept as one JSON file written atomically on every change.

use std::collections::BTreeMap;
use std::path::Path;

use crate::bindings::HostError;
use crate::bindings::otabox::handler::checkpoint::Host;
use crate::state::HostState;
use otabox_core::durable;

/// Longest key.
pub const MAX_KEY: usize = 128;
/// Largest value.
pub const MAX_VALUE: usize = 64 << 10;
/// Most keys per step.
pub const MAX_KEYS: usize = 256;

type Entries = BTreeMap<String, String>;

fn check_key(key: &str) -> Result<(), HostError> {
    let ok = !key.is_empty()
        && key.len() <= MAX_KEY
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(HostError::Invalid(format!(
            "checkpoint key {key:?} must be 1..={MAX_KEY} bytes of [A-Za-z0-9._-]"
        )))
    }
}

fn load(file: &Path) -> Result<Entries, HostError> {
    match std::fs::read(file) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            HostError::Failed(format!(
                "checkpoint store {} is corrupt: {e}",
                file.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Entries::new()),
        Err(e) => Err(HostError::Failed(format!(
            "cannot read checkpoint store: {e}"
        ))),
    }
}

fn store(file: &Path, entries: &Entries) -> Result<(), HostError> {
    let bytes = serde_json::to_vec_pretty(entries).map_err(|e| HostError::Failed(e.to_string()))?;
    durable::write_atomic(file, &bytes)
        .map_err(|e| HostError::Failed(format!("cannot write checkpoint: {e:#}")))
}

impl HostState {
    fn checkpoint_file(&self) -> Result<&Path, HostError> {
        self.scope
            .checkpoint_file
            .as_deref()
            .ok_or_else(|| HostError::Denied("checkpoints exist only within a job step".into()))
    }
}

impl Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, HostError>> {
        Ok((|| {
            check_key(&key)?;
            let entries = load(self.checkpoint_file()?)?;
            entries
                .get(&key)
                .map(|v| {
                    hex::decode(v).map_err(|e| HostError::Failed(format!("checkpoint {key}: {e}")))
                })
                .transpose()
        })())
    }

    async fn set(
        &mut self,
        key: String,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<(), HostError>> {
        Ok((|| {
            check_key(&key)?;
            if value.len() > MAX_VALUE {
                return Err(HostError::Invalid(format!(
                    "checkpoint value of {} bytes is over {MAX_VALUE}",
                    value.len()
                )));
            }
            let file = self.checkpoint_file()?;
            let mut entries = load(file)?;
            if !entries.contains_key(&key) && entries.len() >= MAX_KEYS {
                return Err(HostError::Invalid(format!(
                    "more than {MAX_KEYS} checkpoint keys"
                )));
            }
            entries.insert(key, hex::encode(value));
            store(file, &entries)
        })())
    }

    async fn remove(&mut self, key: String) -> wasmtime::Result<Result<(), HostError>> {
        Ok((|| {
            check_key(&key)?;
            let file = self.checkpoint_file()?;
            let mut entries = load(file)?;
            if entries.remove(&key).is_some() {
                store(file, &entries)?;
            }
            Ok(())
        })())
    }
}
