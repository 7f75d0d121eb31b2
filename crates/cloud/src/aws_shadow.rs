//! The `aws-shadow` layout, in one place: its topics
//! (`$aws/things/<thing>/shadow/…`), what the AWS IoT Device Shadow service
//! accepts, the shape reports take to fit it, and the error documents it
//! answers with. The agent builds its reports and acknowledgements here and
//! reads `…/update/rejected` and the answer to its `…/get` here; the
//! replica in `aws-shadow` mode checks every update here, as the service
//! does.
//!
//! The service refuses (400) an update without a `state` object, with a
//! `desired` or `reported` node that is not an object, with a `clientToken`
//! over 64 bytes, or nested deeper than 6 levels; and (413) a shadow whose
//! desired and reported sections together exceed 8 KB. Nesting is counted
//! here from the document itself (level 1), every object and array one
//! level: the stricter reading, so what passes here passes the service.
//!
//! In this layout the reported deployment differs from the `iot-atlas` one
//! in four ways, all undone by [`from_aws`] (the replica stores the common
//! shape):
//! - `jobId` is `job`: a field present in both desired and reported with
//!   the same value would be left out of the service's deltas;
//! - `lastResult.steps` is `lastSteps`, one level up, so a step sits at
//!   level 6 (`state.reported.deployment.lastSteps[]`);
//! - each update type's inventory is a list of `"name=version"` strings
//!   (the service merges objects key by key, so an item gone from an object
//!   would stay; a list is replaced whole);
//! - every optional field is sent, `null` when absent, so the service's
//!   merge clears what the device no longer reports.
//!
//! The acknowledgement is a partial update of the reported state,
//! `{"state":{"reported":{"deployment":{"ack":{…}}}}}`: the service keeps it
//! with the device's state, where the cloud reads it.
//!
//! The cloud's own write of a desired deployment meets the same rules
//! ([`check_desired`]): an inline deployment with files nests deeper than 6
//! levels, so in this layout deployments go by reference.
//!
//! Presence: a device may not publish under `$aws/`, so it sets no last
//! will here; AWS IoT publishes lifecycle events itself on
//! `$aws/events/presence/connected|disconnected/<clientId>`, and the
//! replica reads a device's connection from those (the client id must be
//! the thing name, the default). A broker that is not AWS publishes no
//! such events: the devices' connection shows as unknown there.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use super::{
    Accepted, CloudLayout, Inbound, PresenceEvent, Refusal, Request, Room, Stored, Topics, Verdict,
};
use otabox_core::shadow::{Ack, ReportedState};

/// Deepest nesting the service accepts (see the module docs for the count).
pub const MAX_DEPTH: usize = 6;
/// Most bytes of the desired and reported sections together.
pub const MAX_STATE_BYTES: usize = 8 * 1024;
/// Longest client token.
pub const MAX_CLIENT_TOKEN: usize = 64;
/// Smallest report budget: a minimal report (agent, job, outcome) fits.
const MIN_REPORT_BYTES: usize = 1024;
/// Room kept for the acknowledgement merged into the reported state,
/// besides its version: the `ack` object with a job id of 128 bytes.
const ACK_ROOM: usize = 200;

/// Top-level optional fields of the reported deployment, sent as `null`
/// when absent.
const CLEARED: &[&str] = &[
    "job",
    "inventory",
    "inventoryOmitted",
    "lastResult",
    "lastSteps",
    "progress",
    "lastRejected",
];

/// An error document, as the service publishes it on `…/update/rejected`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDocument {
    /// HTTP-like status code (400, 413, 429, …).
    pub code: u16,
    /// The service's message.
    pub message: String,
    /// Seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    /// The request's client token, when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_token: Option<String>,
}

impl ErrorDocument {
    fn new(code: u16, message: &str, client_token: Option<String>) -> Self {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Self {
            code,
            message: message.to_string(),
            timestamp: Some(timestamp),
            client_token,
        }
    }

    /// Parses an error document; `None` when the payload is not one.
    pub fn parse(payload: &[u8]) -> Option<Self> {
        serde_json::from_slice(payload).ok()
    }

    /// The update was refused for its size or depth: a smaller report may
    /// pass.
    pub fn asks_for_less(&self) -> bool {
        self.code == 413 || (self.code == 400 && self.message.contains("nesting"))
    }

    /// The refusal this document tells of.
    pub fn refusal(&self) -> Refusal {
        Refusal {
            code: self.code,
            message: self.message.clone(),
            asks_for_less: self.asks_for_less(),
        }
    }
}

/// Nesting depth of `value`: every object and array one level.
pub fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// The bytes a desired deployment takes in the shadow's desired section.
pub fn desired_bytes(deployment: &Value) -> usize {
    json!({ "deployment": deployment }).to_string().len()
}

/// The size reports are built within, so that desired (`desired_bytes`),
/// reported and the acknowledgement of `version` fit the service's 8 KB.
pub fn report_budget(limit: usize, desired_bytes: usize, version: &str) -> usize {
    let room = MAX_STATE_BYTES.saturating_sub(desired_bytes + ACK_ROOM + version.len());
    limit.min(room).max(MIN_REPORT_BYTES)
}

/// The report document of `reported` in this layout, within `max` bytes
/// (trimmed as [`ReportedState::bounded_payload`] trims).
pub fn report_document(reported: &ReportedState, max: usize) -> String {
    reported.bounded_with(max, render)
}

fn render(state: &ReportedState) -> String {
    let value = serde_json::to_value(state).unwrap_or(Value::Null);
    json!({"state": {"reported": {"deployment": to_aws(&value)}}}).to_string()
}

/// The acknowledgement as a partial update of the reported state.
pub fn ack_document(ack: &Ack) -> String {
    json!({"state": {"reported": {"deployment": {"ack": ack}}}}).to_string()
}

/// The reported state a report document of this layout carries, if it is
/// one (an acknowledgement is not).
pub fn parse_report(payload: &str) -> Option<ReportedState> {
    let value: Value = serde_json::from_str(payload).ok()?;
    let deployment = value.pointer("/state/reported/deployment")?;
    deployment.get("agent")?;
    serde_json::from_value(from_aws(deployment)).ok()
}

/// A reported deployment (common shape) in this layout's shape.
pub fn to_aws(common: &Value) -> Value {
    let mut doc = common.as_object().cloned().unwrap_or_default();
    let job = doc.remove("jobId").unwrap_or(Value::Null);
    doc.insert("job".into(), job);
    let steps = doc
        .get_mut("lastResult")
        .and_then(Value::as_object_mut)
        .and_then(|result| result.remove("steps"));
    doc.insert("lastSteps".into(), steps.unwrap_or(Value::Null));
    if let Some(Value::Object(inventory)) = doc.get_mut("inventory") {
        for items in inventory.values_mut() {
            let list = items.as_object().map_or_else(Vec::new, |items| {
                items
                    .iter()
                    .map(|(name, version)| {
                        json!(format!("{name}={}", version.as_str().unwrap_or("")))
                    })
                    .collect()
            });
            *items = Value::Array(list);
        }
    }
    if let Some(Value::Object(rejected)) = doc.get_mut("lastRejected") {
        for key in ["shadowVersion", "jobId"] {
            rejected.entry(key).or_insert(Value::Null);
        }
    }
    for key in CLEARED {
        doc.entry(*key).or_insert(Value::Null);
    }
    Value::Object(doc)
}

/// A reported deployment of this layout in the common shape (nulls and
/// the acknowledgement left out).
pub fn from_aws(aws: &Value) -> Value {
    let mut doc = without_nulls(aws).as_object().cloned().unwrap_or_default();
    doc.remove("ack");
    if let Some(job) = doc.remove("job") {
        doc.insert("jobId".into(), job);
    }
    let steps = doc.remove("lastSteps");
    if let (Some(steps), Some(Value::Object(result))) = (steps, doc.get_mut("lastResult")) {
        result.insert("steps".into(), steps);
    }
    if let Some(Value::Object(result)) = doc.get_mut("lastResult") {
        result.entry("steps").or_insert_with(|| json!([]));
    }
    if let Some(Value::Object(inventory)) = doc.get_mut("inventory") {
        for items in inventory.values_mut() {
            let map: Map<String, Value> = items
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .filter_map(|item| item.rsplit_once('='))
                .map(|(name, version)| (name.to_string(), json!(version)))
                .collect();
            *items = Value::Object(map);
        }
    }
    Value::Object(doc)
}

fn without_nulls(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_nulls(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Merges `patch` into `target` as the service does: objects key by key,
/// `null` deletes, anything else (arrays too) replaces.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(target), Some(patch)) => {
            for (key, value) in patch {
                if value.is_null() {
                    target.remove(key);
                } else {
                    merge(target.entry(key.clone()).or_insert(Value::Null), value);
                }
            }
        }
        _ => *target = without_nulls(patch),
    }
}

/// The reported section of the shadow `stored` stands for (this layout's
/// shape, the acknowledgement merged in).
fn reported_section(stored: Stored<'_>) -> Value {
    let mut deployment = stored.reported.map(to_aws).unwrap_or_else(|| json!({}));
    if let (Value::Object(doc), Some(ack)) = (&mut deployment, stored.ack) {
        doc.insert("ack".into(), json!(ack));
    }
    json!({ "deployment": without_nulls(&deployment) })
}

/// The service's limits on an update `doc`, the shadow's desired section
/// taking `desired_bytes` and its `reported` section after it: at most
/// [`MAX_DEPTH`] levels (400), at most [`MAX_STATE_BYTES`] together (413).
fn check_limits(
    doc: &Value,
    desired_bytes: usize,
    reported: &Value,
) -> Result<(), (u16, &'static str)> {
    if depth(doc) > MAX_DEPTH {
        return Err((
            400,
            "JSON contains too many levels of nesting; maximum is 6",
        ));
    }
    if desired_bytes + reported.to_string().len() > MAX_STATE_BYTES {
        return Err((413, "The payload exceeds the maximum size allowed"));
    }
    Ok(())
}

/// Checks the cloud's write of `desired` as the desired deployment
/// (`{"state": {"desired": {"deployment": …}}}`) as the service does,
/// beside the reported section `stored` holds.
pub fn check_desired(desired: &Value, stored: Stored<'_>) -> Result<(), Refusal> {
    let doc = json!({"state": {"desired": {"deployment": desired}}});
    check_limits(&doc, desired_bytes(desired), &reported_section(stored)).map_err(
        |(code, message)| Refusal {
            code,
            message: message.to_string(),
            asks_for_less: true,
        },
    )
}

/// The event of an AWS IoT lifecycle message
/// (`$aws/events/presence/connected|disconnected/<clientId>`):
/// `{"eventType": "connected", "timestamp": <ms>, …}`.
pub fn parse_lifecycle(payload: &[u8]) -> Option<PresenceEvent> {
    let event: Value = serde_json::from_slice(payload).ok()?;
    let online = match event.get("eventType")?.as_str()? {
        "connected" => true,
        "disconnected" => false,
        _ => return None,
    };
    Some(PresenceEvent {
        online,
        at_ms: event.get("timestamp").and_then(Value::as_i64),
    })
}

/// Checks a device's update against the service's rules and merges it into
/// what is stored; the error document is what the service would publish
/// on `…/update/rejected`.
pub fn check_update(request: &[u8], stored: Stored<'_>) -> Result<Accepted, ErrorDocument> {
    let doc: Value = serde_json::from_slice(request)
        .map_err(|_| ErrorDocument::new(400, "Invalid JSON", None))?;
    let token = match doc.get("clientToken") {
        None => None,
        Some(Value::String(t)) if t.len() <= MAX_CLIENT_TOKEN => Some(t.clone()),
        Some(_) => return Err(ErrorDocument::new(400, "Invalid clientToken", None)),
    };
    let fail = |code, message: &str| ErrorDocument::new(code, message, token.clone());
    let state = doc
        .get("state")
        .ok_or_else(|| fail(400, "Missing required node: state"))?
        .as_object()
        .ok_or_else(|| fail(400, "State node must be an object"))?;
    for (key, node) in state {
        let name = match key.as_str() {
            "desired" => "Desired",
            "reported" => "Reported",
            _ => return Err(fail(400, "State contains an invalid node")),
        };
        if !(node.is_object() || node.is_null()) {
            return Err(fail(400, &format!("{name} node must be an object")));
        }
    }
    let patch = state.get("reported").cloned().unwrap_or(Value::Null);
    let mut reported = reported_section(stored);
    merge(&mut reported, &patch);
    let desired = stored.desired.map_or(0, desired_bytes);
    check_limits(&doc, desired, &reported).map_err(|(code, message)| fail(code, message))?;
    let sent = patch.get("deployment");
    let ack = sent
        .and_then(|d| d.get("ack"))
        .and_then(|a| serde_json::from_value(a.clone()).ok());
    let whole = sent.and_then(|d| d.get("agent")).is_some();
    Ok(Accepted {
        reported: whole.then(|| from_aws(&reported["deployment"])),
        ack,
    })
}

/// The `aws-shadow` layout.
#[derive(Debug, Clone, Copy, Default)]
pub struct AwsShadow;

impl CloudLayout for AwsShadow {
    fn name(&self) -> &'static str {
        "aws-shadow"
    }

    fn topics_of(&self, device_id: &str) -> Topics {
        let base = format!("$aws/things/{device_id}/shadow");
        Topics {
            update: format!("{base}/update"),
            delta: format!("{base}/update/delta"),
            accepted: format!("{base}/update/accepted"),
            get: Some(format!("{base}/get")),
            get_accepted: Some(format!("{base}/get/accepted")),
            rejected: Some(format!("{base}/update/rejected")),
        }
    }

    fn decode<'p>(&self, topics: &Topics, topic: &str, payload: &'p [u8]) -> Inbound<'p> {
        if topics.rejected.as_deref() == Some(topic) {
            Inbound::Refused(ErrorDocument::parse(payload).map(|e| e.refusal()))
        } else if topic == topics.delta {
            Inbound::Delta(payload.into())
        } else if topics.get_accepted.as_deref() == Some(topic) {
            Inbound::ShadowAnswer(delta_from_shadow(payload))
        } else if topic == topics.accepted {
            Inbound::Accepted
        } else {
            Inbound::Other
        }
    }

    fn report_document(&self, reported: &ReportedState, max: usize) -> String {
        report_document(reported, max)
    }

    fn parse_report(&self, payload: &str) -> Option<ReportedState> {
        parse_report(payload)
    }

    fn ack_document(&self, ack: &Ack) -> anyhow::Result<String> {
        Ok(ack_document(ack))
    }

    fn desired_bytes(&self, desired: &Value) -> usize {
        desired_bytes(desired)
    }

    fn report_budget(&self, limit: usize, room: Room<'_>) -> usize {
        report_budget(limit, room.desired_bytes, &(room.version)())
    }

    fn replica_subscriptions(&self) -> &'static [&'static str] {
        &[
            "$aws/things/+/shadow/update",
            "$aws/things/+/shadow/get",
            "$aws/events/presence/+/+",
        ]
    }

    fn parse_presence(&self, payload: &[u8]) -> Option<PresenceEvent> {
        parse_lifecycle(payload)
    }

    fn check_desired(&self, desired: &Value, stored: Stored<'_>) -> Result<(), Refusal> {
        check_desired(desired, stored)
    }

    fn device_request(&self, topic: &str) -> Option<(String, Request)> {
        let parts: Vec<&str> = topic.split('/').collect();
        match parts.as_slice() {
            ["$aws", "things", id, "shadow", "update"] => Some((id.to_string(), Request::Update)),
            ["$aws", "things", id, "shadow", "get"] => Some((id.to_string(), Request::Get)),
            [
                "$aws",
                "events",
                "presence",
                "connected" | "disconnected",
                id,
            ] => Some((id.to_string(), Request::Presence)),
            _ => None,
        }
    }

    fn accept_update(&self, payload: &[u8], stored: Stored<'_>) -> anyhow::Result<Verdict> {
        Ok(match check_update(payload, stored) {
            Ok(accepted) => Verdict::Accepted(accepted),
            Err(error) => Verdict::Refused {
                refusal: error.refusal(),
                answer: serde_json::to_vec(&error)?,
            },
        })
    }

    fn shadow_answer(&self, version: u64, stored: Stored<'_>) -> Option<String> {
        let answer = json!({
            "version": version,
            "state": {
                "desired": {"deployment": stored.desired},
                "reported": {"deployment": stored.reported.map(to_aws)},
            }
        });
        Some(answer.to_string())
    }
}

/// Turns a shadow `get` answer into the delta it implies, if it holds a
/// desired deployment.
fn delta_from_shadow(payload: &[u8]) -> Option<Vec<u8>> {
    let shadow: Value = serde_json::from_slice(payload).ok()?;
    let desired = shadow
        .pointer("/state/desired/deployment")
        .filter(|d| d.is_object())?;
    let version = shadow.get("version")?.as_u64()?;
    serde_json::to_vec(&json!({"version": version, "state": {"deployment": desired}})).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use otabox_core::shadow::{
        AckStatus, AgentInfo, AgentState, JobResult, LastResult, StepOutcome,
    };
    use std::collections::BTreeMap;

    /// A deployment by reference fits the service's bounds; the same
    /// deployment inline is too deep (its check on resolving is in `shadow`).
    #[test]
    fn a_deployment_by_reference_fits_an_aws_shadow_and_an_inline_one_does_not() {
        let full = serde_json::json!({
            "schema": 1, "jobId": "deploy-1", "version": "1.2.0",
            "steps": [{"updateType": "otabox/file:1",
                       "manifest": {"name": "a", "version": "1", "payload": "a", "destination": "/x/a"},
                       "files": [{"name": "a", "url": "https://h/a?sig=x", "size": 3, "sha256": "a".repeat(64)}]}]});
        let text = full.to_string();
        let by_ref = serde_json::json!({"schema": 1, "jobId": "deploy-1", "version": "1.2.0",
            "deploymentRef": {"url": format!("https://cdn.example/{}?X-Amz-Signature={}", "d".repeat(200), "s".repeat(64)),
                              "size": text.len(), "sha256": otabox_core::trust::sha256_hex(text.as_bytes())}});
        let delta = serde_json::json!({"version": 4, "state": {"deployment": by_ref}});
        otabox_core::shadow::parse_delta(
            delta.to_string().as_bytes(),
            otabox_core::shadow::DEFAULT_MAX_MESSAGE,
        )
        .expect("a reference parses");
        let update = serde_json::json!({"state": {"desired": {"deployment": by_ref}}});
        assert!(depth(&update) <= MAX_DEPTH);
        assert!(update.to_string().len() < 1024, "{update}");
        check_update(update.to_string().as_bytes(), Default::default())
            .expect("the shadow service takes it");
        let inline = serde_json::json!({"state": {"desired": {"deployment": full}}});
        assert!(
            check_update(inline.to_string().as_bytes(), Default::default()).is_err(),
            "an inline deployment with files is too deep for the service"
        );
    }

    fn state(items: usize, steps: usize) -> ReportedState {
        let step = StepOutcome {
            update_type: "otabox/file:1".into(),
            result: "installed".into(),
            result_code: 0,
            extended_code: 0,
            message: String::new(),
            installed_criteria: Some("app-1".into()),
        };
        ReportedState {
            agent: AgentInfo {
                state: AgentState::Idle,
                version: "0.1.0".into(),
            },
            job_id: Some("job-1".into()),
            installed: BTreeMap::from([("otabox/file:1".into(), "app-1".into())]),
            inventory: BTreeMap::from([(
                "otabox/apt:1".into(),
                (0..items)
                    .map(|i| (format!("package-{i:05}"), "1.0.0-1".to_string()))
                    .collect(),
            )]),
            inventory_omitted: None,
            last_result: Some(LastResult {
                job_id: "job-1".into(),
                status: AckStatus::Success,
                result: JobResult::Succeeded,
                result_code: 0,
                extended_code: 0,
                message: String::new(),
                steps: vec![step; steps],
                local: false,
            }),
            progress: None,
            last_rejected: None,
        }
    }

    fn update(doc: &Value) -> Result<Accepted, ErrorDocument> {
        check_update(doc.to_string().as_bytes(), Stored::default())
    }

    #[test]
    fn the_service_rules_are_enforced_with_its_error_documents() {
        let e = update(&json!({"jobId": "j", "status": "SUCCESS", "version": "1"})).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (400, "Missing required node: state")
        );
        assert!(e.timestamp.is_some());
        let e = update(&json!({"state": 1})).unwrap_err();
        assert_eq!(e.message, "State node must be an object");
        let e = update(&json!({"state": {"reported": []}})).unwrap_err();
        assert_eq!(e.message, "Reported node must be an object");
        let e = update(&json!({"state": {"other": {}}})).unwrap_err();
        assert_eq!(e.message, "State contains an invalid node");
        let seven = json!({"state": {"reported": {"a": {"b": {"c": {"d": [1]}}}}}});
        let e = update(&seven).unwrap_err();
        assert_eq!(
            (e.code, e.message.as_str()),
            (
                400,
                "JSON contains too many levels of nesting; maximum is 6"
            )
        );
        let six = json!({"state": {"reported": {"a": {"b": {"c": {"d": 1}}}}}});
        update(&six).expect("six levels pass");
        let token = "t".repeat(65);
        let e = update(&json!({"state": {}, "clientToken": token})).unwrap_err();
        assert_eq!(e.message, "Invalid clientToken");
        let e = update(&json!({"state": {"reported": {"x": 1}}, "clientToken": "abc"}))
            .map(|_| ())
            .and_then(|()| {
                update(
                    &json!({"state": {"reported": {"x": "y".repeat(9000)}}, "clientToken": "abc"}),
                )
            })
            .unwrap_err();
        assert_eq!((e.code, e.client_token.as_deref()), (413, Some("abc")));
        assert!(e.asks_for_less());
        assert!(update(&json!({"state": "x"})).unwrap_err().code == 400);
        assert_eq!(
            check_update(b"{", Stored::default()).unwrap_err().message,
            "Invalid JSON"
        );
    }

    #[test]
    fn the_cloud_cannot_store_an_inline_deployment_with_files_but_one_by_reference() {
        let inline = json!({"schema": 1, "jobId": "j", "version": "1",
            "steps": [{"updateType": "otabox/file:1", "manifest": {"name": "a"},
                "files": [{"name": "a", "url": "http://x/a", "size": 1, "sha256": "00"}]}]});
        let refusal = check_desired(&inline, Stored::default()).unwrap_err();
        assert_eq!(
            (refusal.code, refusal.message.as_str()),
            (
                400,
                "JSON contains too many levels of nesting; maximum is 6"
            )
        );
        let by_reference = json!({"schema": 1, "jobId": "j", "version": "1",
            "deploymentRef": {"url": "http://x/d.json", "size": 10, "sha256": "00"}});
        check_desired(&by_reference, Stored::default()).expect("six levels");
        let big = json!({"schema": 1, "jobId": "j", "version": "x".repeat(8200),
            "deploymentRef": {"url": "http://x/d.json", "size": 10, "sha256": "00"}});
        assert_eq!(
            check_desired(&big, Stored::default()).unwrap_err().code,
            413
        );
        let filler = json!({"agent": {"state": "idle", "version": "1"}, "note": "n".repeat(8100)});
        let beside = Stored {
            reported: Some(&filler),
            ..Stored::default()
        };
        assert_eq!(
            check_desired(&by_reference, beside).unwrap_err().code,
            413,
            "desired and reported share 8 KB"
        );
        assert_eq!(
            AwsShadow.check_desired(&inline, Stored::default()),
            Err(refusal)
        );
    }

    #[test]
    fn lifecycle_events_tell_the_connection_and_its_time() {
        let event = |e: Value| parse_lifecycle(e.to_string().as_bytes());
        assert_eq!(
            event(
                json!({"clientId": "d", "eventType": "connected", "timestamp": 1_700_000_000_123_i64})
            ),
            Some(PresenceEvent {
                online: true,
                at_ms: Some(1_700_000_000_123)
            })
        );
        assert_eq!(
            event(
                json!({"eventType": "disconnected", "disconnectReason": "MQTT_KEEP_ALIVE_TIMEOUT"})
            ),
            Some(PresenceEvent {
                online: false,
                at_ms: None
            })
        );
        for bad in [
            json!({"eventType": "subscribed"}),
            json!({"eventType": 1}),
            json!({}),
            json!("connected"),
        ] {
            assert_eq!(event(bad.clone()), None, "{bad}");
        }
        assert_eq!(parse_lifecycle(b"online"), None);
        assert_eq!(
            AwsShadow.device_request("$aws/events/presence/disconnected/pump-1"),
            Some(("pump-1".into(), Request::Presence))
        );
        for other in [
            "$aws/events/presence/other/pump-1",
            "$aws/events/subscriptions/subscribed/pump-1",
            "$aws/events/presence/connected",
        ] {
            assert_eq!(AwsShadow.device_request(other), None, "{other}");
        }
        assert_eq!(
            AwsShadow.presence_topic("pump-1"),
            None,
            "AWS tells it itself"
        );
    }

    #[test]
    fn the_stored_desired_counts_toward_the_8_kb() {
        let desired = json!({"jobId": "x".repeat(5000)});
        let report = json!({"state": {"reported": {"deployment": {"agent": {"state": "idle", "version": "1"}, "note": "n".repeat(3500)}}}});
        check_update(report.to_string().as_bytes(), Stored::default()).expect("alone it fits");
        let stored = Stored {
            desired: Some(&desired),
            ..Stored::default()
        };
        let e = check_update(report.to_string().as_bytes(), stored).unwrap_err();
        assert_eq!(e.code, 413);
    }

    #[test]
    fn reports_fit_six_levels_and_the_budget_and_read_back() {
        for (items, steps) in [(0, 1), (3, 4), (5000, 64)] {
            let reported = state(items, steps);
            let budget = report_budget(64 << 10, 600, "1.2.3");
            let text = report_document(&reported, budget);
            assert!(text.len() <= budget, "{} > {budget}", text.len());
            let doc: Value = serde_json::from_str(&text).expect("json");
            assert!(depth(&doc) <= MAX_DEPTH, "depth {} of {text}", depth(&doc));
            let desired = json!({"pad": "p".repeat(600 - 20)});
            let stored = Stored {
                desired: Some(&desired),
                ..Stored::default()
            };
            let accepted = check_update(text.as_bytes(), stored).expect("the service accepts it");
            let back: ReportedState =
                serde_json::from_value(accepted.reported.expect("a whole report"))
                    .expect("common shape");
            assert_eq!(back.last_result.map(|r| r.status), Some(AckStatus::Success));
            assert_eq!(
                parse_report(&text).map(|r| r.job_id),
                Some(Some("job-1".into()))
            );
        }
        let small = state(3, 2);
        let text = report_document(&small, 8192);
        let back = parse_report(&text).expect("a report");
        assert_eq!(back, small, "nothing lost when it fits");
    }

    #[test]
    fn the_ack_is_kept_in_the_reported_state_and_cleared_fields_go() {
        let ack = Ack {
            job_id: "job-1".into(),
            status: AckStatus::Success,
            version: "1.2.0".into(),
        };
        let doc: Value = serde_json::from_str(&ack_document(&ack)).expect("json");
        assert!(depth(&doc) <= MAX_DEPTH);
        let accepted = update(&doc).expect("accepted");
        assert_eq!(accepted.ack, Some(ack.clone()));
        assert_eq!(accepted.reported, None, "an ack is no whole report");
        let mut running = state(2, 1);
        running.progress = Some(otabox_core::shadow::Progress {
            step: 0,
            phase: "download".into(),
            done: 1,
            total: 2,
        });
        let old = serde_json::to_value(&running).expect("json");
        let stored = Stored {
            reported: Some(&old),
            ack: Some(&ack),
            ..Stored::default()
        };
        let idle = report_document(&state(1, 1), 8192);
        let merged = check_update(idle.as_bytes(), stored)
            .expect("accepted")
            .reported
            .expect("whole");
        assert!(
            merged.get("progress").is_none(),
            "null cleared it: {merged}"
        );
        assert_eq!(
            merged["inventory"]["otabox/apt:1"]
                .as_object()
                .map(Map::len),
            Some(1)
        );
    }
}

#[cfg(test)]
mod layout_tests {
    use super::*;
    use crate::{Link, Shrink, TopicLayout};
    use otabox_core::shadow::{AckStatus, parse_delta, sample_reported};
    use std::cell::Cell;

    fn topics() -> Topics {
        Topics::new(&AwsShadow, "dev-1").expect("valid")
    }

    fn reported() -> ReportedState {
        sample_reported("job-1")
    }

    #[test]
    fn the_device_reads_deltas_shadow_answers_and_refusals() {
        let t = topics();
        let d = b"{}";
        assert_eq!(
            AwsShadow.decode(&t, "$aws/things/dev-1/shadow/update/delta", d),
            Inbound::Delta(d[..].into())
        );
        assert_eq!(
            AwsShadow.decode(&t, "$aws/things/dev-1/shadow/update/accepted", d),
            Inbound::Accepted
        );
        let refused =
            json!({"code": 413, "message": "The payload exceeds the maximum size allowed"});
        let Inbound::Refused(Some(refusal)) = AwsShadow.decode(
            &t,
            "$aws/things/dev-1/shadow/update/rejected",
            refused.to_string().as_bytes(),
        ) else {
            panic!("a refusal");
        };
        assert_eq!((refusal.code, refusal.asks_for_less), (413, true));
        let unreadable = AwsShadow.decode(&t, "$aws/things/dev-1/shadow/update/rejected", b"\xff");
        assert_eq!(unreadable, Inbound::Refused(None));
        for other in [
            "$aws/things/dev-2/shadow/update/delta",
            "$aws/things/dev-1/shadow/update",
            "$aws/things/dev-1/shadow/get",
            "state/dev-1/update/delta",
        ] {
            assert_eq!(AwsShadow.decode(&t, other, d), Inbound::Other, "{other}");
        }
        assert_eq!(t.subscriptions().len(), 4);
    }

    #[test]
    fn a_shadow_answer_is_the_delta_it_implies_or_nothing() {
        let t = topics();
        let get = "$aws/things/dev-1/shadow/get/accepted";
        let deployment = json!({"schema": 1, "jobId": "job-7", "version": "1",
            "steps": [{"updateType": "otabox/file:1", "manifest": {}}]});
        let answer = json!({"version": 9, "state": {"desired": {"deployment": deployment}}});
        let Inbound::ShadowAnswer(Some(delta)) =
            AwsShadow.decode(&t, get, answer.to_string().as_bytes())
        else {
            panic!("a delta");
        };
        let delta = parse_delta(&delta, 1 << 16).expect("the common delta shape");
        assert_eq!(
            (delta.version, delta.state.deployment.job_id.as_str()),
            (9, "job-7")
        );
        for empty in [
            json!({"version": 9, "state": {"reported": {}}}),
            json!({"version": 9, "state": {"desired": {"deployment": null}}}),
            json!({"version": 9, "state": {"desired": {"deployment": "x"}}}),
            json!({"version": -1, "state": {"desired": {"deployment": {}}}}),
            json!({"state": {"desired": {"deployment": {}}}}),
        ] {
            assert_eq!(
                AwsShadow.decode(&t, get, empty.to_string().as_bytes()),
                Inbound::ShadowAnswer(None),
                "{empty}"
            );
        }
        assert_eq!(AwsShadow.decode(&t, get, b"{"), Inbound::ShadowAnswer(None));
    }

    #[test]
    fn reports_leave_the_desired_deployment_and_the_ack_their_room() {
        let link = Link::new(TopicLayout::AwsShadow.cloud(), "dev-1", 64 << 10).expect("link");
        let reads = Cell::new(0);
        let version = || {
            reads.set(reads.get() + 1);
            "1.2.3".to_string()
        };
        let mut big = reported();
        big.inventory.insert(
            "otabox/apt:1".into(),
            (0..2000)
                .map(|i| (format!("p{i:05}"), "1".to_string()))
                .collect(),
        );
        let text = link.report(&big, &version);
        assert_eq!(reads.get(), 1, "the running version is read");
        let budget = report_budget(64 << 10, 2048, "1.2.3");
        assert!(text.len() <= budget, "{} > {budget}", text.len());
        assert_eq!(text, report_document(&big, budget));
        assert_eq!(
            link.parse_report(&text).map(|r| r.job_id),
            Some(Some("job-1".into()))
        );
        let ack = Ack {
            job_id: "job-1".into(),
            status: AckStatus::Success,
            version: "1.2.3".into(),
        };
        assert_eq!(link.ack(&ack).ok(), Some(ack_document(&ack)));
        let mut floor = 0;
        for _ in 0..16 {
            match link.shrink(&version) {
                Shrink::Lowered(smaller) => assert!(smaller < budget),
                Shrink::Smallest(at) => {
                    floor = at;
                    break;
                }
            }
        }
        assert_eq!(floor, MIN_REPORT_BYTES, "halved down to the smallest");
    }

    #[test]
    fn the_replica_answers_gets_and_refuses_what_the_service_refuses() {
        assert_eq!(
            AwsShadow.device_request("$aws/things/pump-1/shadow/update"),
            Some(("pump-1".into(), Request::Update))
        );
        assert_eq!(
            AwsShadow.device_request("$aws/things/pump-1/shadow/get"),
            Some(("pump-1".into(), Request::Get))
        );
        for other in [
            "$aws/things/pump-1/shadow/update/delta",
            "$aws/things/pump-1/shadow/get/accepted",
            "state/pump-1/update",
        ] {
            assert_eq!(AwsShadow.device_request(other), None, "{other}");
        }
        let Ok(Verdict::Refused { refusal, answer }) =
            AwsShadow.accept_update(br#"{"jobId": "j"}"#, Stored::default())
        else {
            panic!("refused");
        };
        assert_eq!(refusal.code, 400);
        let document = ErrorDocument::parse(&answer).expect("an error document");
        assert_eq!(document.message, "Missing required node: state");
        assert_eq!(document.refusal(), refusal);
        let report = report_document(&reported(), 8192);
        let Ok(Verdict::Accepted(accepted)) =
            AwsShadow.accept_update(report.as_bytes(), Stored::default())
        else {
            panic!("accepted");
        };
        let common = accepted.reported.expect("a whole report");
        assert_eq!(common["jobId"], "job-1");
        let desired = json!({"jobId": "job-1"});
        let stored = Stored {
            desired: Some(&desired),
            reported: Some(&common),
            ack: None,
        };
        let answer: Value =
            serde_json::from_str(&AwsShadow.shadow_answer(4, stored).expect("an answer"))
                .expect("json");
        assert_eq!(answer["version"], 4);
        assert_eq!(answer["state"]["desired"]["deployment"], desired);
        assert_eq!(answer["state"]["reported"]["deployment"]["job"], "job-1");
        let none: Value = serde_json::from_str(
            &AwsShadow
                .shadow_answer(0, Stored::default())
                .expect("answer"),
        )
        .expect("json");
        assert_eq!(none["state"]["desired"]["deployment"], Value::Null);
    }
}
