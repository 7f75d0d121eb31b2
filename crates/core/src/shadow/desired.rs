//! The desired state (schema version 1) and the delta message carrying it.
//! The JSON Schema is `crates/core/schema/delta-v1.schema.json`.
//!
//! ```json
//! {"version": 7, "state": {"deployment": {
//!   "schema": 1,
//!   "jobId": "deploy-42",
//!   "version": "1.2.0",
//!   "reboot": "immediate",
//!   "steps": [{
//!     "updateType": "otabox/file:1",
//!     "manifest": {"name": "app-config", "version": "1.2.0",
//!                  "payload": "app.conf", "destination": "/var/lib/otabox/files/app.conf"},
//!     "files": [{"name": "app.conf", "url": "https://cdn.example/app.conf?sig=…",
//!                "size": 37, "sha256": "5c3b…"}],
//!     "installedCriteria": "app-config-1.2.0"
//!   }]
//! }}}
//! ```
//!
//! `version` of the envelope is the shadow version (monotonic per device);
//! `deployment.version` is the version the device runs once the job
//! succeeds, echoed in the acknowledgement. A step carries its manifest
//! inline (`manifest`) or by reference (`manifestUrl` + `manifestSha256`).
//! `"cancel": true` cancels the job `jobId` instead of deploying it.
//!
//! A deployment can also come by reference, so that it stays small and
//! shallow (an AWS IoT shadow holds 8 KB, nested at most 6 levels):
//! `{"schema": 1, "jobId": "deploy-42", "version": "1.2.0",
//!   "deploymentRef": {"url": "https://…/deploy-42.json", "size": 2048, "sha256": "…"}}`.
//! The agent fetches the document (exact size and sha256), which is the
//! whole deployment (steps, and its `signedManifest` and `rootRotations`
//! when signed) with the same `jobId` and `version`, and goes on with it
//! as if it had come inline.

use crate::update_type::UpdateType;
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// The desired-state schema this agent understands.
pub const SCHEMA_VERSION: u32 = 1;
/// Largest message accepted before parsing (256 KiB).
pub const DEFAULT_MAX_MESSAGE: usize = 256 << 10;
/// Deepest JSON nesting accepted.
const MAX_DEPTH: usize = 32;
const MAX_STEPS: usize = 32;
const MAX_FILES: usize = 64;
const MAX_ID: usize = 128;
const MAX_TEXT: usize = 1024;
const MAX_URL: usize = 8192;

/// A delta message: the shadow version and the changed desired state.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaMessage {
    /// Shadow version; a delta at or below the last one seen is stale.
    pub version: u64,
    /// Time the replica produced it (seconds since the epoch), if given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    /// The changed part of the desired state.
    pub state: DeltaState,
    /// Per-field metadata some shadows add; ignored.
    #[serde(default, skip_serializing)]
    pub metadata: Option<serde_json::Value>,
    /// Client token some shadows echo; ignored.
    #[serde(default, rename = "clientToken", skip_serializing)]
    pub client_token: Option<String>,
}

/// The `state` of a delta.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeltaState {
    /// The desired deployment.
    pub deployment: DesiredState,
}

/// What the cloud wants the device to run.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DesiredState {
    /// Schema version; must be [`SCHEMA_VERSION`].
    pub schema: u32,
    /// Deployment/job id: 1..=128 of `[A-Za-z0-9._-]`, not starting with `.`.
    pub job_id: String,
    /// The version the device runs after this job (echoed in the ack).
    pub version: String,
    /// Ordered steps, 1..=32 (none when the deployment is by reference).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepSpec>,
    /// The whole deployment by reference, instead of `steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_ref: Option<DeploymentRef>,
    /// When reboots asked for by the steps happen.
    #[serde(default)]
    pub reboot: RebootPolicy,
    /// A signed update manifest (verified before any download).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signed_manifest: Option<serde_json::Value>,
    /// Root rotations (signed next roots, oldest first) to apply before the
    /// signed manifest is checked; the new root is kept once the deployment
    /// is accepted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub root_rotations: Vec<serde_json::Value>,
    /// Cancels the job `jobId` instead of deploying it: a running job sees
    /// cancel-requested, a queued one ends cancelled without running.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
}

/// Where a deployment given by reference is, and what it must be.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentRef {
    /// Where to fetch it (`http`, `https` or `file`).
    pub url: String,
    /// Its exact size in bytes (at most 256 KiB).
    pub size: u64,
    /// Its lowercase hex sha256.
    pub sha256: String,
}

/// When a reboot happens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RebootPolicy {
    /// As soon as every step has reached it.
    #[default]
    Immediate,
    /// When the operator says so.
    Deferred,
}

/// One step of a deployment.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StepSpec {
    /// Update type, such as `otabox/apt:1` or `microsoft/apt:1`.
    pub update_type: UpdateType,
    /// The handler's manifest, inline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<serde_json::Value>,
    /// Or the manifest's URL …
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_url: Option<String>,
    /// … and its sha256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
    /// Payload files.
    #[serde(default)]
    pub files: Vec<FileSpec>,
    /// Installed criteria, when the cloud already knows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_criteria: Option<String>,
}

/// A payload file of a step.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FileSpec {
    /// File name, unique in the step, no `/`.
    pub name: String,
    /// Where to fetch it (`http`, `https` or `file`); kept opaque.
    pub url: String,
    /// Exact size in bytes.
    pub size: u64,
    /// Lowercase hex sha256.
    pub sha256: String,
    /// A bearer token for the URL (temporary credentials); sent only to
    /// this URL and never written to logs or reports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// Where a step's manifest comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ManifestSource<'a> {
    /// Inline JSON.
    Inline(&'a serde_json::Value),
    /// A URL and the manifest's sha256.
    Remote {
        /// URL.
        url: &'a str,
        /// sha256.
        sha256: &'a str,
    },
}

impl StepSpec {
    /// The manifest's source (checked by [`DesiredState::validate`]).
    pub fn manifest_source(&self) -> Option<ManifestSource<'_>> {
        match (&self.manifest, &self.manifest_url, &self.manifest_sha256) {
            (Some(m), None, None) => Some(ManifestSource::Inline(m)),
            (None, Some(url), Some(sha256)) => Some(ManifestSource::Remote { url, sha256 }),
            _ => None,
        }
    }
}

/// Parses a delta: size cap, nesting limit, strict schema, value checks.
pub fn parse_delta(bytes: &[u8], max_size: usize) -> Result<DeltaMessage> {
    if bytes.len() > max_size {
        bail!(
            "message of {} bytes is over the {max_size}-byte limit",
            bytes.len()
        );
    }
    check_depth(bytes)?;
    let delta: DeltaMessage =
        serde_json::from_slice(bytes).map_err(|e| anyhow::anyhow!("invalid delta: {e}"))?;
    delta.state.deployment.validate()?;
    Ok(delta)
}

/// Refuses JSON nested deeper than [`MAX_DEPTH`] before parsing it.
fn check_depth(bytes: &[u8]) -> Result<()> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'{' | b'[') => {
                depth += 1;
                if depth > MAX_DEPTH {
                    bail!("message is nested deeper than {MAX_DEPTH} levels");
                }
            }
            (false, _, b'}' | b']') => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

impl DesiredState {
    /// Checks every value; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.schema != SCHEMA_VERSION {
            bail!(
                "deployment.schema {} is not supported (this agent reads {SCHEMA_VERSION})",
                self.schema
            );
        }
        validate_job_id(&self.job_id)?;
        check_text("deployment.version", &self.version)?;
        if let Some(reference) = &self.deployment_ref {
            return self.validate_reference(reference);
        }
        if self.steps.is_empty() {
            bail!("deployment: missing field `steps` (1..={MAX_STEPS} steps), or `deploymentRef`");
        }
        if self.steps.len() > MAX_STEPS {
            bail!(
                "deployment.steps must hold 1..={MAX_STEPS} steps, found {}",
                self.steps.len()
            );
        }
        for (i, rotation) in self.root_rotations.iter().enumerate() {
            serde_json::from_value::<crate::trust::signed::Signed<crate::trust::signed::Root>>(
                rotation.clone(),
            )
            .map_err(|e| anyhow::anyhow!("deployment.rootRotations[{i}]: {e}"))?;
        }
        if let Some(signed) = &self.signed_manifest {
            serde_json::from_value::<
                crate::trust::signed::Signed<crate::trust::signed::UpdateManifest>,
            >(signed.clone())
            .map_err(|e| anyhow::anyhow!("deployment.signedManifest: {e}"))?;
        }
        for (i, step) in self.steps.iter().enumerate() {
            step.validate()
                .map_err(|e| anyhow::anyhow!("deployment.steps[{i}].{e:#}"))?;
        }
        Ok(())
    }
}

impl DesiredState {
    /// A deployment by reference carries nothing but the reference (and
    /// its reboot policy or a cancel).
    fn validate_reference(&self, reference: &DeploymentRef) -> Result<()> {
        if !self.steps.is_empty()
            || self.signed_manifest.is_some()
            || !self.root_rotations.is_empty()
        {
            bail!(
                "deployment.deploymentRef: give either `deploymentRef` or `steps` (with `signedManifest` and `rootRotations` inside the referenced document)"
            );
        }
        check_url("deployment.deploymentRef.url", &reference.url)?;
        check_sha256("deployment.deploymentRef.sha256", &reference.sha256)?;
        if reference.size == 0 || reference.size > DEFAULT_MAX_MESSAGE as u64 {
            bail!("deployment.deploymentRef.size must be 1..={DEFAULT_MAX_MESSAGE} bytes");
        }
        Ok(())
    }

    /// The deployment `document` (fetched from [`DesiredState::deployment_ref`])
    /// stands for: parsed as a delta's deployment is, and of the same job
    /// and version.
    pub fn resolve(&self, document: &[u8]) -> Result<DesiredState> {
        check_depth(document)?;
        let resolved: DesiredState = serde_json::from_slice(document)
            .map_err(|e| anyhow::anyhow!("the referenced deployment: {e}"))?;
        if resolved.deployment_ref.is_some() {
            bail!("the referenced deployment refers to another one");
        }
        if resolved.job_id != self.job_id || resolved.version != self.version {
            bail!(
                "the referenced deployment is job {:?} version {:?}, not {:?} version {:?}",
                resolved.job_id,
                resolved.version,
                self.job_id,
                self.version
            );
        }
        resolved
            .validate()
            .map_err(|e| anyhow::anyhow!("the referenced deployment: {e:#}"))?;
        Ok(resolved)
    }
}

impl StepSpec {
    fn validate(&self) -> Result<()> {
        match self.manifest_source() {
            Some(ManifestSource::Inline(m)) if !m.is_object() => {
                bail!("manifest must be a JSON object")
            }
            Some(ManifestSource::Remote { url, sha256 }) => {
                check_url("manifestUrl", url)?;
                check_sha256("manifestSha256", sha256)?;
            }
            Some(ManifestSource::Inline(_)) => {}
            None => {
                bail!("manifest: give either `manifest`, or `manifestUrl` with `manifestSha256`")
            }
        }
        if self.files.len() > MAX_FILES {
            bail!("files: at most {MAX_FILES} files per step");
        }
        for (i, file) in self.files.iter().enumerate() {
            file.validate()
                .map_err(|e| anyhow::anyhow!("files[{i}].{e:#}"))?;
            if self.files[..i].iter().any(|f| f.name == file.name) {
                bail!("files[{i}].name {:?} appears twice", file.name);
            }
        }
        if let Some(criteria) = &self.installed_criteria {
            check_text("installedCriteria", criteria)?;
        }
        Ok(())
    }
}

impl FileSpec {
    fn validate(&self) -> Result<()> {
        let n = &self.name;
        if n.is_empty() || n.len() > 255 || n.contains(['/', '\\', '\0']) || n == "." || n == ".." {
            bail!("name {n:?} must be a plain file name");
        }
        check_url("url", &self.url)?;
        check_sha256("sha256", &self.sha256)
    }
}

/// Checks a job id: it names directories and files, so it is restricted.
pub fn validate_job_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        bail!(
            "deployment.jobId {id:?} must be 1..={MAX_ID} characters of [A-Za-z0-9._-], not starting with `.`"
        );
    }
    Ok(())
}

fn check_text(field: &str, text: &str) -> Result<()> {
    if text.is_empty() || text.len() > MAX_TEXT || text.chars().any(char::is_control) {
        bail!("{field} must be 1..={MAX_TEXT} bytes of printable text");
    }
    Ok(())
}

fn check_url(field: &str, url: &str) -> Result<()> {
    let scheme_ok = ["https://", "http://", "file:///"]
        .iter()
        .any(|s| url.starts_with(s));
    if !scheme_ok || url.len() > MAX_URL || url.chars().any(|c| c.is_control() || c == ' ') {
        bail!("{field} must be an http, https or file URL of at most {MAX_URL} bytes");
    }
    Ok(())
}

fn check_sha256(field: &str, hash: &str) -> Result<()> {
    if hash.len() != 64
        || !hash
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        bail!("{field} must be 64 lowercase hex digits");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn delta() -> serde_json::Value {
        json!({"version": 3, "state": {"deployment": {
            "schema": 1, "jobId": "deploy-1", "version": "1.2.0",
            "steps": [{"updateType": "otabox/file:1",
                       "manifest": {"name": "a", "version": "1", "payload": "a", "destination": "/x/a"},
                       "files": [{"name": "a", "url": "https://h/a?sig=x", "size": 3, "sha256": "a".repeat(64)}]}]}}})
    }

    fn parse(v: &serde_json::Value) -> Result<DeltaMessage> {
        parse_delta(v.to_string().as_bytes(), DEFAULT_MAX_MESSAGE)
    }

    fn error(v: &serde_json::Value) -> String {
        format!("{:#}", parse(v).expect_err("must be rejected"))
    }

    #[test]
    fn a_well_formed_delta_parses() {
        let d = parse(&delta()).expect("valid");
        assert_eq!(d.version, 3);
        assert_eq!(d.state.deployment.steps[0].files[0].size, 3);
        assert_eq!(d.state.deployment.reboot, RebootPolicy::Immediate);
    }

    #[test]
    fn bad_input_is_rejected_with_the_reason() {
        assert!(parse_delta(b"not json", DEFAULT_MAX_MESSAGE).is_err());
        let big = vec![b' '; DEFAULT_MAX_MESSAGE + 1];
        assert!(
            format!("{:#}", parse_delta(&big, DEFAULT_MAX_MESSAGE).unwrap_err())
                .contains("over the")
        );
        let deep = format!("{}{}", "[".repeat(1000), "]".repeat(1000));
        assert!(
            format!(
                "{:#}",
                parse_delta(deep.as_bytes(), DEFAULT_MAX_MESSAGE).unwrap_err()
            )
            .contains("nested")
        );

        let mut v = delta();
        v["state"]["deployment"]["surprise"] = json!(1);
        assert!(error(&v).contains("unknown field `surprise`"));
        let mut v = delta();
        v["state"]["deployment"]["steps"][0]["files"][0]["size"] = json!("3");
        assert!(error(&v).contains("invalid type"));
        let mut v = delta();
        v["state"]["deployment"]
            .as_object_mut()
            .expect("object")
            .remove("jobId");
        assert!(error(&v).contains("missing field `jobId`"));
        let mut v = delta();
        v["state"]["deployment"]["jobId"] = json!("../../etc");
        assert!(error(&v).contains("jobId"));
        let mut v = delta();
        v["state"]["deployment"]["steps"][0]["files"][0]["name"] = json!("../a");
        assert!(error(&v).contains("steps[0].files[0].name"));
        let mut v = delta();
        v["state"]["deployment"]["steps"][0]["files"][0]["sha256"] = json!("ABC");
        assert!(error(&v).contains("sha256"));
        let mut v = delta();
        v["state"]["deployment"]["steps"][0]["manifestUrl"] = json!("https://h/m");
        assert!(error(&v).contains("either `manifest`"));
        let mut v = delta();
        v["state"]["deployment"]["schema"] = json!(2);
        assert!(error(&v).contains("schema 2 is not supported"));
        let mut v = delta();
        v["state"]["deployment"]["steps"] = json!([]);
        assert!(error(&v).contains("1..=32 steps"));
        let step = delta()["state"]["deployment"]["steps"][0].clone();
        v["state"]["deployment"]["steps"] = json!(vec![step; 33]);
        assert!(error(&v).contains("1..=32 steps, found 33"));
    }

    #[test]
    fn an_update_type_follows_the_manifests_rule() {
        for bad in ["Otabox/file:1", "otabox/file", "otabox/file:x"] {
            let mut v = delta();
            v["state"]["deployment"]["steps"][0]["updateType"] = json!(bad);
            let e = error(&v);
            assert!(
                e.contains("vendor/name:major") && e.contains(bad),
                "{bad}: {e}"
            );
        }
        let mut v = delta();
        v["state"]["deployment"]["steps"][0]["updateType"] =
            json!(format!("{}/f:1", "o".repeat(200)));
        assert!(error(&v).contains("at most 128 bytes"));
    }

    #[test]
    fn the_published_json_schema_example_parses() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../schema/delta-v1.schema.json"))
                .expect("the schema is JSON");
        for example in schema["examples"].as_array().expect("examples") {
            parse(example).expect("every example in the schema is a valid delta");
        }
        let fields: Vec<&str> = schema["$defs"]["deployment"]["properties"]
            .as_object()
            .expect("deployment properties")
            .keys()
            .map(String::as_str)
            .collect();
        let sample = serde_json::to_value(crate::shadow::sample_desired("x")).expect("json");
        for field in sample.as_object().expect("object").keys() {
            assert!(
                fields.contains(&field.as_str()),
                "the schema does not document `{field}`"
            );
        }
    }

    #[test]
    fn a_deployment_by_reference_resolves_strictly() {
        let full = delta()["state"]["deployment"].clone();
        let text = full.to_string();
        let by_ref = json!({"schema": 1, "jobId": "deploy-1", "version": "1.2.0",
            "deploymentRef": {"url": format!("https://cdn.example/{}?X-Amz-Signature={}", "d".repeat(200), "s".repeat(64)),
                              "size": text.len(), "sha256": crate::trust::sha256_hex(text.as_bytes())}});
        let delta = json!({"version": 4, "state": {"deployment": by_ref}});
        let parsed = parse(&delta).expect("a reference parses");
        let desired = &parsed.state.deployment;
        let resolved = desired.resolve(text.as_bytes()).expect("resolves");
        assert_eq!(resolved.steps.len(), 1);
        let mut other = full.clone();
        other["jobId"] = json!("deploy-2");
        assert!(
            format!(
                "{:#}",
                desired.resolve(other.to_string().as_bytes()).unwrap_err()
            )
            .contains("not \"deploy-1\"")
        );
        assert!(
            desired.resolve(by_ref.to_string().as_bytes()).is_err(),
            "no chains"
        );
        let mut mixed = by_ref.clone();
        mixed["steps"] = full["steps"].clone();
        assert!(
            error(&json!({"version": 4, "state": {"deployment": mixed}}))
                .contains("either `deploymentRef`")
        );
        let mut huge = by_ref.clone();
        huge["deploymentRef"]["size"] = json!(DEFAULT_MAX_MESSAGE + 1);
        assert!(error(&json!({"version": 4, "state": {"deployment": huge}})).contains("size"));
        let mut cancel = by_ref;
        cancel["cancel"] = json!(true);
        parse(&json!({"version": 5, "state": {"deployment": cancel}}))
            .expect("a cancel by reference");
    }

    #[test]
    fn depth_counting_ignores_brackets_inside_strings() {
        let s = format!("{{\"a\": \"{}\"}}", "[{".repeat(100));
        check_depth(s.as_bytes()).expect("brackets in strings do not nest");
    }
}
