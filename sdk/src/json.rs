//! Manifests and device configurations: JSON the SDK parses for a handler.

use serde::de::DeserializeOwned;

/// A type the SDK parses from a step's JSON: the handler's manifest or its
/// device configuration (see [`crate::Handler::Manifest`]).
///
/// The error is the whole message of the failed status, so it should say
/// what is invalid and name the key at fault; [`from_json`] gives serde's
/// part of it.
///
/// ```
/// use otabox_sdk::{FromJson, from_json};
///
/// #[derive(serde::Deserialize)]
/// #[serde(deny_unknown_fields)]
/// struct Manifest {
///     name: String,
/// }
///
/// impl FromJson for Manifest {
///     fn parse(json: &str) -> Result<Self, String> {
///         let m: Self = from_json(json, "hello manifest")?;
///         if m.name.is_empty() {
///             return Err("invalid hello manifest: `name` must not be empty".into());
///         }
///         Ok(m)
///     }
/// }
///
/// let err = Manifest::parse(r#"{"name":"a","size":1}"#).err().unwrap_or_default();
/// assert!(err.starts_with("invalid hello manifest: unknown field `size`"), "{err}");
/// ```
pub trait FromJson: Sized {
    /// Parses and checks `json`; the error is a complete message.
    fn parse(json: &str) -> Result<Self, String>;
}

/// Nothing to parse: the handler reads no manifest (or no config); any text
/// is accepted.
impl FromJson for () {
    fn parse(_json: &str) -> Result<Self, String> {
        Ok(())
    }
}

/// Any JSON value, unchecked.
impl FromJson for serde_json::Value {
    fn parse(json: &str) -> Result<Self, String> {
        from_json(json, "JSON")
    }
}

/// `json` deserialised as `T`; the error reads `invalid WHAT: <serde's
/// message>` (`invalid apt manifest: missing field `name` at line 1 …`).
pub fn from_json<T: DeserializeOwned>(json: &str, what: &str) -> Result<T, String> {
    serde_json::from_str(json).map_err(|e| format!("invalid {what}: {e}"))
}
