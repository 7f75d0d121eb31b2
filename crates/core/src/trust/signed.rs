//! Signed update manifests and their root of trust.
//!
//! A signed document is `{"signed": {...}, "signatures": [{"key", "sig"}]}`:
//! ed25519 signatures (hex) by public keys (hex) over
//! `otabox-signed-v1\n` + the canonical JSON of `signed` (object keys
//! sorted, no whitespace). A signature counts when its key is in the root
//! and it verifies strictly; each distinct key counts once, and at least the
//! root's threshold must count.
//!
//! The root (`Root`: version, threshold, keys) rotates to version N+1 only
//! with a document signed by a threshold of root N's keys *and* a threshold
//! of its own keys.
//!
//! An update manifest vouches for one deployment: its job id, the device or
//! group it targets, a sequence that must exceed the last one accepted, a
//! validity window, and per step the update type, the sha256 of the
//! handler manifest and every payload file's name, size and sha256.

use std::collections::BTreeSet;

use anyhow::{Context, Result, bail, ensure};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::shadow::{DesiredState, ManifestSource};

/// Prefix of every signed byte string (domain separation).
const DOMAIN: &[u8] = b"otabox-signed-v1\n";
/// The `type` of an update manifest.
pub const UPDATE_MANIFEST_TYPE: &str = "otabox/update-manifest:1";

/// A signature: the signer's public key and the signature, both hex.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Signature {
    /// Public key (32 bytes, hex).
    pub key: String,
    /// Signature (64 bytes, hex).
    pub sig: String,
}

/// A document and its signatures.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Signed<T> {
    /// What is signed.
    pub signed: T,
    /// Signatures over its canonical bytes.
    pub signatures: Vec<Signature>,
}

/// The root of trust: which keys may sign, and how many must.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Root {
    /// Version, +1 at each rotation.
    pub version: u32,
    /// Signatures needed (k of n).
    pub threshold: u32,
    /// Public keys (hex).
    pub keys: Vec<String>,
}

/// Whom an update manifest is for.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Target {
    /// One device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Or a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl std::fmt::Display for Target {
    /// `device "pump-1"`, `group "pumps"`, both, or `no device or group`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.device, &self.group) {
            (Some(device), Some(group)) => write!(f, "device {device:?} or group {group:?}"),
            (Some(device), None) => write!(f, "device {device:?}"),
            (None, Some(group)) => write!(f, "group {group:?}"),
            (None, None) => f.write_str("no device or group"),
        }
    }
}

/// A payload file as the manifest vouches for it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SignedFile {
    /// File name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256 (hex).
    pub sha256: String,
}

/// A step as the manifest vouches for it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SignedStep {
    /// Update type.
    pub update_type: String,
    /// sha256 of the handler manifest (canonical JSON when inline, the bytes
    /// when by URL).
    pub manifest_sha256: String,
    /// Payload files.
    pub files: Vec<SignedFile>,
}

/// What a signed update manifest says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateManifest {
    /// [`UPDATE_MANIFEST_TYPE`].
    #[serde(rename = "type")]
    pub kind: String,
    /// Monotonic per device; at or below the last accepted is refused.
    pub sequence: u64,
    /// The deployment's job id.
    pub job_id: String,
    /// The device or group.
    pub target: Target,
    /// Not valid before (seconds since the epoch).
    pub not_before: u64,
    /// Not valid from (seconds since the epoch).
    pub expires: u64,
    /// The steps.
    pub steps: Vec<SignedStep>,
}

/// The canonical JSON of `value`: object keys sorted, no whitespace.
pub fn canonical_json<T: Serialize>(value: &T) -> Result<String> {
    fn write(v: &Value, out: &mut String) -> Result<()> {
        match v {
            Value::Object(map) => {
                out.push('{');
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k)?);
                    out.push(':');
                    write(&map[*k], out)?;
                }
                out.push('}');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write(item, out)?;
                }
                out.push(']');
            }
            Value::Number(n) if n.is_f64() => {
                bail!("floating-point numbers are not allowed in signed documents")
            }
            other => out.push_str(&serde_json::to_string(other)?),
        }
        Ok(())
    }
    let mut out = String::new();
    write(&serde_json::to_value(value)?, &mut out)?;
    Ok(out)
}

fn signing_bytes<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    let mut bytes = DOMAIN.to_vec();
    bytes.extend_from_slice(canonical_json(value)?.as_bytes());
    Ok(bytes)
}

/// A new signing key: (secret seed hex, public key hex).
pub fn generate_key() -> Result<(String, String)> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .map_err(|e| anyhow::anyhow!("no randomness from the OS: {e}"))?;
    let key = SigningKey::from_bytes(&seed);
    Ok((
        hex::encode(seed),
        hex::encode(key.verifying_key().as_bytes()),
    ))
}

/// A signing key from its secret seed hex.
pub fn signing_key(seed_hex: &str) -> Result<SigningKey> {
    let seed: [u8; 32] = hex::decode(seed_hex.trim())
        .context("a secret key is 64 hex digits")?
        .try_into()
        .map_err(|_| anyhow::anyhow!("a secret key is 32 bytes"))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Signs `value` with every key in `keys`.
pub fn sign<T: Serialize + Clone>(value: &T, keys: &[SigningKey]) -> Result<Signed<T>> {
    let bytes = signing_bytes(value)?;
    let signatures = keys
        .iter()
        .map(|k| Signature {
            key: hex::encode(k.verifying_key().as_bytes()),
            sig: hex::encode(k.sign(&bytes).to_bytes()),
        })
        .collect();
    Ok(Signed {
        signed: value.clone(),
        signatures,
    })
}

fn verifying_key(hex_key: &str) -> Result<VerifyingKey> {
    let bytes: [u8; 32] = hex::decode(hex_key)
        .context("a public key is 64 hex digits")?
        .try_into()
        .map_err(|_| anyhow::anyhow!("a public key is 32 bytes"))?;
    VerifyingKey::from_bytes(&bytes).context("not an ed25519 public key")
}

impl Root {
    /// Checks the root itself: a threshold in 1..=n and n distinct valid keys.
    pub fn check(&self) -> Result<()> {
        let distinct: BTreeSet<&String> = self.keys.iter().collect();
        ensure!(
            distinct.len() == self.keys.len(),
            "root version {}: a key is listed twice",
            self.version
        );
        ensure!(
            self.threshold >= 1 && self.threshold as usize <= self.keys.len(),
            "root version {}: threshold {} of {} keys",
            self.version,
            self.threshold,
            self.keys.len()
        );
        for key in &self.keys {
            verifying_key(key)
                .with_context(|| format!("root version {}: key {key}", self.version))?;
        }
        Ok(())
    }

    /// Verifies that a threshold of this root's distinct keys signed
    /// `signed`; returns how many did.
    pub fn verify<T: Serialize>(&self, signed: &Signed<T>) -> Result<usize> {
        self.check()?;
        let bytes = signing_bytes(&signed.signed)?;
        let mut counted = BTreeSet::new();
        for signature in &signed.signatures {
            if !self.keys.contains(&signature.key) || counted.contains(&signature.key) {
                continue;
            }
            let Ok(sig_bytes) = hex::decode(&signature.sig) else {
                continue;
            };
            let Ok(sig) = ed25519_dalek::Signature::from_slice(&sig_bytes) else {
                continue;
            };
            if verifying_key(&signature.key)?
                .verify_strict(&bytes, &sig)
                .is_ok()
            {
                counted.insert(signature.key.clone());
            }
        }
        ensure!(
            counted.len() >= self.threshold as usize,
            "{} valid signature(s) from distinct root keys, {} needed",
            counted.len(),
            self.threshold
        );
        Ok(counted.len())
    }

    /// Rotates to `next`: version + 1, signed by a threshold of this root and
    /// a threshold of `next` itself.
    pub fn rotate(&self, next: &Signed<Root>) -> Result<Root> {
        ensure!(
            next.signed.version == self.version + 1,
            "root version {} cannot follow version {}",
            next.signed.version,
            self.version
        );
        next.signed.check()?;
        self.verify(next)
            .context("the new root is not signed by a threshold of the current root")?;
        next.signed
            .verify(next)
            .context("the new root is not signed by a threshold of its own keys")?;
        Ok(next.signed.clone())
    }

    /// Applies `rotations` (signed next roots, oldest first, as a
    /// deployment's `rootRotations` carries them) one after the other; a
    /// rotation at or below the version reached so far is skipped, as a
    /// device that already took it would.
    pub fn apply_rotations(&self, rotations: &[Value]) -> Result<Root> {
        let mut root = self.clone();
        for (i, rotation) in rotations.iter().enumerate() {
            let next: Signed<Root> =
                serde_json::from_value(rotation.clone()).context("rootRotations")?;
            if next.signed.version <= root.version {
                continue;
            }
            root = root
                .rotate(&next)
                .with_context(|| format!("rootRotations[{i}]"))?;
        }
        Ok(root)
    }
}

/// The sha256 a signed step records for a step's handler manifest.
pub fn manifest_digest(source: &ManifestSource<'_>) -> Result<String> {
    Ok(match source {
        ManifestSource::Inline(value) => {
            hex::encode(Sha256::digest(canonical_json(value)?.as_bytes()))
        }
        ManifestSource::Remote { sha256, .. } => sha256.to_string(),
    })
}

/// The update manifest that vouches for `desired`.
pub fn describe(
    desired: &DesiredState,
    sequence: u64,
    target: Target,
    not_before: u64,
    expires: u64,
) -> Result<UpdateManifest> {
    let steps = desired
        .steps
        .iter()
        .enumerate()
        .map(|(i, step)| {
            let source = step
                .manifest_source()
                .with_context(|| format!("step {i} has no manifest"))?;
            Ok(SignedStep {
                update_type: step.update_type.to_string(),
                manifest_sha256: manifest_digest(&source)?,
                files: step
                    .files
                    .iter()
                    .map(|f| SignedFile {
                        name: f.name.clone(),
                        size: f.size,
                        sha256: f.sha256.clone(),
                    })
                    .collect(),
            })
        })
        .collect::<Result<_>>()?;
    Ok(UpdateManifest {
        kind: UPDATE_MANIFEST_TYPE.into(),
        sequence,
        job_id: desired.job_id.clone(),
        target,
        not_before,
        expires,
        steps,
    })
}

/// Who is checking, and what it accepted before.
pub struct Verifier<'a> {
    /// The device's root of trust.
    pub root: &'a Root,
    /// This device's id.
    pub device: &'a str,
    /// Groups this device belongs to.
    pub groups: &'a [String],
    /// Highest sequence accepted so far.
    pub last_sequence: u64,
    /// Now, in seconds since the epoch.
    pub now: u64,
}

impl Verifier<'_> {
    /// Verifies a signed update manifest against the deployment it came
    /// with; every check must pass before anything is downloaded.
    pub fn verify(&self, signed: &Signed<UpdateManifest>, desired: &DesiredState) -> Result<()> {
        self.root.verify(signed)?;
        let m = &signed.signed;
        ensure!(
            m.kind == UPDATE_MANIFEST_TYPE,
            "manifest type {:?} is not {UPDATE_MANIFEST_TYPE}",
            m.kind
        );
        ensure!(
            self.now >= m.not_before,
            "the manifest is not valid before {}",
            crate::clock::rfc3339(m.not_before)
        );
        ensure!(
            self.now < m.expires,
            "the manifest expired at {}",
            crate::clock::rfc3339(m.expires)
        );
        ensure!(
            m.sequence > self.last_sequence,
            "sequence {} is not above the last accepted {} (rollback or replay)",
            m.sequence,
            self.last_sequence
        );
        let for_us = m.target.device.as_deref() == Some(self.device)
            || m.target
                .group
                .as_ref()
                .is_some_and(|g| self.groups.contains(g));
        ensure!(for_us, "{}", self.not_ours(&m.target));
        ensure!(
            m.job_id == desired.job_id,
            "the manifest is for job {:?}, not {:?}",
            m.job_id,
            desired.job_id
        );
        let expected = describe(
            desired,
            m.sequence,
            m.target.clone(),
            m.not_before,
            m.expires,
        )?;
        ensure!(
            m.steps == expected.steps,
            "the deployment's steps, manifests or payloads differ from what was signed"
        );
        Ok(())
    }

    /// Why a manifest for `target` is not for this device, with the hint
    /// that a group member lists its group in `[trust] groups`.
    fn not_ours(&self, target: &Target) -> String {
        let groups = if self.groups.is_empty() {
            "no groups".to_string()
        } else {
            format!("groups {:?}", self.groups)
        };
        let mut text = format!(
            "the manifest targets {target}, not this device ({:?}, {groups})",
            self.device
        );
        if let Some(group) = &target.group {
            text.push_str(&format!(
                "; if this device belongs to group {group:?}, list it in `[trust] groups` of device.toml"
            ));
        }
        text
    }

    /// Verifies a deployment as the agent takes it: applies the root
    /// rotations it carries to this verifier's root, then checks its
    /// signed manifest against the root reached. The one check behind both
    /// the agent and `otabox verify`.
    pub fn verify_deployment(&self, desired: &DesiredState) -> Result<VerifiedDeployment> {
        let root = self.root.apply_rotations(&desired.root_rotations)?;
        let manifest = desired
            .signed_manifest
            .clone()
            .context("this device accepts signed deployments only")?;
        let manifest: Signed<UpdateManifest> =
            serde_json::from_value(manifest).context("signedManifest")?;
        Verifier {
            root: &root,
            ..*self
        }
        .verify(&manifest, desired)?;
        let rotated = (root.version > self.root.version).then_some(root);
        Ok(VerifiedDeployment { manifest, rotated })
    }
}

/// A deployment whose signed manifest verified.
#[derive(Debug)]
pub struct VerifiedDeployment {
    /// Its signed update manifest.
    pub manifest: Signed<UpdateManifest>,
    /// The root its rotations led to, when it carried one above the
    /// verifier's root: the device keeps it once it accepts the deployment.
    pub rotated: Option<Root>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<(SigningKey, String)> {
        (0..n)
            .map(|_| {
                let (seed, public) = generate_key().expect("key");
                (signing_key(&seed).expect("seed"), public)
            })
            .collect()
    }

    fn root(version: u32, threshold: u32, k: &[(SigningKey, String)]) -> Root {
        Root {
            version,
            threshold,
            keys: k.iter().map(|(_, p)| p.clone()).collect(),
        }
    }

    fn desired() -> DesiredState {
        serde_json::from_value(serde_json::json!({
            "schema": 1, "jobId": "job-1", "version": "1",
            "steps": [{"updateType": "otabox/file:1", "manifest": {"b": 1, "a": "x"},
                       "files": [{"name": "p", "url": "https://h/p?sig=1", "size": 3, "sha256": "a".repeat(64)}]}]
        }))
        .expect("desired")
    }

    fn manifest(sequence: u64) -> UpdateManifest {
        describe(
            &desired(),
            sequence,
            Target {
                device: Some("dev-1".into()),
                group: None,
            },
            100,
            200,
        )
        .expect("describe")
    }

    fn verifier(root: &Root) -> Verifier<'_> {
        Verifier {
            root,
            device: "dev-1",
            groups: &[],
            last_sequence: 4,
            now: 150,
        }
    }

    #[test]
    fn canonical_json_sorts_keys_and_refuses_floats() {
        assert_eq!(
            canonical_json(&serde_json::json!({"b": [1, {"d": 1, "c": 2}], "a": "x"}))
                .expect("json"),
            r#"{"a":"x","b":[1,{"c":2,"d":1}]}"#
        );
        assert!(canonical_json(&serde_json::json!({"x": 1.5})).is_err());
    }

    #[test]
    fn a_threshold_of_distinct_root_keys_is_needed() {
        let k = keys(3);
        let root = root(1, 2, &k);
        let one = sign(&manifest(5), &[k[0].0.clone()]).expect("sign");
        assert!(format!("{:#}", root.verify(&one).unwrap_err()).contains("1 valid signature(s)"));
        let mut twice = one.clone();
        twice.signatures.push(one.signatures[0].clone());
        let reason = format!("{:#}", root.verify(&twice).unwrap_err());
        assert!(
            reason.contains("1 valid signature(s) from distinct root keys"),
            "duplicate signature: {reason}"
        );
        let stranger = keys(1);
        let with_stranger =
            sign(&manifest(5), &[k[0].0.clone(), stranger[0].0.clone()]).expect("sign");
        let reason = format!("{:#}", root.verify(&with_stranger).unwrap_err());
        assert!(
            reason.contains("1 valid signature(s) from distinct root keys, 2 needed"),
            "unknown key: {reason}"
        );
        let two = sign(&manifest(5), &[k[0].0.clone(), k[2].0.clone()]).expect("sign");
        assert_eq!(root.verify(&two).expect("verified"), 2);
        let mut tampered = two.clone();
        tampered.signed.steps[0].files[0].size = 4;
        let reason = format!("{:#}", root.verify(&tampered).unwrap_err());
        assert!(
            reason.contains("0 valid signature(s)"),
            "flipped byte: {reason}"
        );
    }

    #[test]
    fn the_manifest_must_match_the_deployment_and_be_fresh_current_and_ours() {
        let k = keys(2);
        let root = root(1, 2, &k);
        let signers = [k[0].0.clone(), k[1].0.clone()];
        let good = sign(&manifest(5), &signers).expect("sign");
        verifier(&root).verify(&good, &desired()).expect("valid");

        let stale = sign(&manifest(4), &signers).expect("sign");
        assert!(
            format!(
                "{:#}",
                verifier(&root).verify(&stale, &desired()).unwrap_err()
            )
            .contains("rollback or replay")
        );
        let mut late = verifier(&root);
        late.now = 200;
        assert!(format!("{:#}", late.verify(&good, &desired()).unwrap_err()).contains("expired"));
        let mut early = verifier(&root);
        early.now = 99;
        assert!(early.verify(&good, &desired()).is_err());
        let mut other = verifier(&root);
        other.device = "dev-2";
        assert!(
            format!("{:#}", other.verify(&good, &desired()).unwrap_err())
                .contains("not this device")
        );
        let groups = vec!["pumps".to_string()];
        let mut for_group = manifest(5);
        for_group.target = Target {
            device: None,
            group: Some("pumps".into()),
        };
        let group_signed = sign(&for_group, &signers).expect("sign");
        let mut member = verifier(&root);
        member.groups = &groups;
        member
            .verify(&group_signed, &desired())
            .expect("a group member accepts it");

        let mut changed = desired();
        changed.steps[0].files[0].sha256 = "b".repeat(64);
        assert!(
            format!("{:#}", verifier(&root).verify(&good, &changed).unwrap_err())
                .contains("differ from what was signed")
        );
        let mut other_manifest = desired();
        other_manifest.steps[0].manifest = Some(serde_json::json!({"a": "y", "b": 1}));
        assert!(
            verifier(&root).verify(&good, &other_manifest).is_err(),
            "the inline manifest is covered too"
        );
        let mut reordered = desired();
        reordered.steps[0].manifest = Some(serde_json::json!({"a": "x", "b": 1}));
        verifier(&root)
            .verify(&good, &reordered)
            .expect("key order does not matter (canonical JSON)");
    }

    #[test]
    fn rotation_needs_both_the_old_and_the_new_threshold() {
        let old = keys(3);
        let new = keys(2);
        let current = root(1, 2, &old);
        let next_root = root(2, 2, &new);
        let by_both = sign(
            &next_root,
            &[
                old[0].0.clone(),
                old[1].0.clone(),
                new[0].0.clone(),
                new[1].0.clone(),
            ],
        )
        .expect("sign");
        assert_eq!(current.rotate(&by_both).expect("rotated"), next_root);
        let by_old_only = sign(&next_root, &[old[0].0.clone(), old[1].0.clone()]).expect("sign");
        assert!(
            format!("{:#}", current.rotate(&by_old_only).unwrap_err()).contains("its own keys")
        );
        let by_new_only = sign(&next_root, &[new[0].0.clone(), new[1].0.clone()]).expect("sign");
        assert!(
            format!("{:#}", current.rotate(&by_new_only).unwrap_err()).contains("current root")
        );
        let skipping = sign(
            &root(3, 2, &new),
            &[
                old[0].0.clone(),
                old[1].0.clone(),
                new[0].0.clone(),
                new[1].0.clone(),
            ],
        )
        .expect("sign");
        let reason = format!("{:#}", current.rotate(&skipping).unwrap_err());
        assert!(
            reason.contains("root version 3 cannot follow version 1"),
            "root jump: {reason}"
        );
        assert!(
            Root {
                version: 1,
                threshold: 3,
                keys: root(1, 1, &old[..2]).keys
            }
            .check()
            .is_err()
        );
    }
}
