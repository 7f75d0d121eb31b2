//! A durable key/value store scoped to the current job and step.
//!
//! Use it to carry state from one lifecycle call to the next (each call runs
//! in a fresh instance) and across agent restarts. Keys are 1..=128 bytes of
//! `[A-Za-z0-9._-]`; values at most 64 KiB.

use serde::{Serialize, de::DeserializeOwned};

use crate::__bindings::otabox::handler::checkpoint as host;
use crate::HostError;

/// The raw bytes stored under `key`.
pub fn get(key: &str) -> Result<Option<Vec<u8>>, HostError> {
    host::get(key)
}

/// Stores `value` under `key`; durable when this returns.
pub fn set(key: &str, value: &[u8]) -> Result<(), HostError> {
    host::set(key, value)
}

/// Removes `key` (no error when missing).
pub fn remove(key: &str) -> Result<(), HostError> {
    host::remove(key)
}

/// Reads a JSON value stored with [`set_json`].
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, HostError> {
    match get(key)? {
        None => Ok(None),
        Some(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| HostError::Invalid(format!("checkpoint {key}: {e}"))),
    }
}

/// Stores `value` as JSON under `key`.
pub fn set_json<T: Serialize>(key: &str, value: &T) -> Result<(), HostError> {
    let bytes = serde_json::to_vec(value)
        .map_err(|e| HostError::Invalid(format!("checkpoint {key}: {e}")))?;
    set(key, &bytes)
}
