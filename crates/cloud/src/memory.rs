//! A layout for unit tests: plain JSON documents of the common types on
//! `mem/<device>/…` topics, a refusal topic, no shadow `get`, and reports
//! sharing a budget with the desired deployment. Unregistered: it shows
//! what a third layout needs, and lets tests of the agent's session and
//! the replica run against a layout that is neither real one.

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::{Accepted, CloudLayout, Inbound, Refusal, Request, Room, Stored, Topics, Verdict};
use otabox_core::shadow::{Ack, ReportedState};

/// Smallest report budget.
pub const MIN_BUDGET: usize = 512;
/// Largest update the memory "cloud" takes.
pub const MAX_UPDATE: usize = 4096;

/// The test layout.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory;

impl CloudLayout for Memory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn topics_of(&self, device_id: &str) -> Topics {
        let base = format!("mem/{device_id}");
        Topics {
            update: format!("{base}/update"),
            delta: format!("{base}/delta"),
            accepted: format!("{base}/accepted"),
            get: None,
            get_accepted: None,
            rejected: Some(format!("{base}/refused")),
        }
    }

    fn decode<'p>(&self, topics: &Topics, topic: &str, payload: &'p [u8]) -> Inbound<'p> {
        if topic == topics.delta {
            Inbound::Delta(payload.into())
        } else if topic == topics.accepted {
            Inbound::Accepted
        } else if topics.rejected.as_deref() == Some(topic) {
            Inbound::Refused(refusal_of(payload))
        } else {
            Inbound::Other
        }
    }

    fn report_document(&self, reported: &ReportedState, max: usize) -> String {
        reported.bounded_with(max, |state| json!(state).to_string())
    }

    fn parse_report(&self, payload: &str) -> Option<ReportedState> {
        serde_json::from_str(payload).ok()
    }

    fn ack_document(&self, ack: &Ack) -> Result<String> {
        Ok(serde_json::to_string(ack)?)
    }

    fn desired_bytes(&self, desired: &Value) -> usize {
        desired.to_string().len()
    }

    fn report_budget(&self, limit: usize, room: Room<'_>) -> usize {
        limit
            .min(MAX_UPDATE.saturating_sub(room.desired_bytes))
            .max(MIN_BUDGET)
    }

    fn replica_subscriptions(&self) -> &'static [&'static str] {
        &["mem/+/update"]
    }

    fn device_request(&self, topic: &str) -> Option<(String, Request)> {
        match topic.split('/').collect::<Vec<_>>().as_slice() {
            ["mem", id, "update"] => Some((id.to_string(), Request::Update)),
            _ => None,
        }
    }

    fn accept_update(&self, payload: &[u8], _stored: Stored<'_>) -> Result<Verdict> {
        if payload.len() > MAX_UPDATE {
            let refusal = Refusal {
                code: 413,
                message: "too large".into(),
                asks_for_less: true,
            };
            let answer = json!({"code": refusal.code, "message": refusal.message});
            return Ok(Verdict::Refused {
                refusal,
                answer: answer.to_string().into_bytes(),
            });
        }
        let message: Value = serde_json::from_slice(payload).context("not JSON")?;
        let accepted = match serde_json::from_value::<Ack>(message.clone()) {
            Ok(ack) => Accepted {
                reported: None,
                ack: Some(ack),
            },
            Err(_) if message.get("agent").is_some() => Accepted {
                reported: Some(message),
                ack: None,
            },
            Err(_) => bail!("neither an acknowledgement nor a reported state"),
        };
        Ok(Verdict::Accepted(accepted))
    }
}

/// The refusal a `{"code", "message"}` document tells of.
fn refusal_of(payload: &[u8]) -> Option<Refusal> {
    let value: Value = serde_json::from_slice(payload).ok()?;
    let code = u16::try_from(value.get("code")?.as_u64()?).ok()?;
    Some(Refusal {
        code,
        message: value.get("message")?.as_str()?.to_string(),
        asks_for_less: code == 413,
    })
}
