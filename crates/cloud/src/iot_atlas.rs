//! The `iot-atlas` layout (the IoT Atlas "Software Update" pattern): the
//! device publishes on `state/<deviceId>/update`, the delta arrives on
//! `…/update/delta`, and the cloud confirms on `…/update/accepted`.
//! Reports are `{"state": {"reported": {"deployment": …}}}` in the common
//! shape; an acknowledgement is the [`Ack`] itself. There is no shadow
//! `get` and no refusal topic. The device announces its connection on
//! `state/<deviceId>/connection`: `online` (retained) at each connect,
//! `offline` (retained) as its MQTT last will.

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Accepted, CloudLayout, Inbound, Request, Stored, Topics, Verdict};
use otabox_core::shadow::{Ack, ReportedState};

/// The `iot-atlas` layout.
#[derive(Debug, Clone, Copy, Default)]
pub struct IotAtlas;

impl CloudLayout for IotAtlas {
    fn name(&self) -> &'static str {
        "iot-atlas"
    }

    fn topics_of(&self, device_id: &str) -> Topics {
        let base = format!("state/{device_id}/update");
        Topics {
            delta: format!("{base}/delta"),
            accepted: format!("{base}/accepted"),
            update: base,
            get: None,
            get_accepted: None,
            rejected: None,
        }
    }

    fn decode<'p>(&self, topics: &Topics, topic: &str, payload: &'p [u8]) -> Inbound<'p> {
        if topic == topics.delta {
            Inbound::Delta(payload.into())
        } else if topic == topics.accepted {
            Inbound::Accepted
        } else {
            Inbound::Other
        }
    }

    fn report_document(&self, reported: &ReportedState, max: usize) -> String {
        reported.bounded_payload(max)
    }

    fn parse_report(&self, payload: &str) -> Option<ReportedState> {
        let value: Value = serde_json::from_str(payload).ok()?;
        serde_json::from_value(value.pointer("/state/reported/deployment")?.clone()).ok()
    }

    fn ack_document(&self, ack: &Ack) -> Result<String> {
        Ok(serde_json::to_string(ack)?)
    }

    fn replica_subscriptions(&self) -> &'static [&'static str] {
        &["state/+/update", "state/+/connection"]
    }

    fn presence_topic(&self, device_id: &str) -> Option<String> {
        Some(format!("state/{device_id}/connection"))
    }

    fn device_request(&self, topic: &str) -> Option<(String, Request)> {
        match topic.split('/').collect::<Vec<_>>().as_slice() {
            ["state", id, "update"] => Some((id.to_string(), Request::Update)),
            ["state", id, "connection"] => Some((id.to_string(), Request::Presence)),
            _ => None,
        }
    }

    fn accept_update(&self, payload: &[u8], _stored: Stored<'_>) -> Result<Verdict> {
        let message: Value = serde_json::from_slice(payload).context("not JSON")?;
        let accepted = if let Ok(ack) = serde_json::from_value::<Ack>(message.clone()) {
            Accepted {
                reported: None,
                ack: Some(ack),
            }
        } else if let Some(reported) = message.pointer("/state/reported/deployment") {
            Accepted {
                reported: Some(reported.clone()),
                ack: None,
            }
        } else {
            bail!("neither an acknowledgement nor a reported state");
        };
        Ok(Verdict::Accepted(accepted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Link, TopicLayout};
    use otabox_core::shadow::{AckStatus, sample_reported};

    fn topics() -> Topics {
        Topics::new(&IotAtlas, "dev-1").expect("valid")
    }

    fn reported() -> ReportedState {
        sample_reported("job-1")
    }

    fn ack() -> Ack {
        Ack {
            job_id: "job-1".into(),
            status: AckStatus::Success,
            version: "1.0.0".into(),
        }
    }

    #[test]
    fn only_its_own_topics_mean_something() {
        let t = topics();
        let payload = br#"{"version":1}"#;
        assert_eq!(
            IotAtlas.decode(&t, "state/dev-1/update/delta", payload),
            Inbound::Delta(payload[..].into())
        );
        assert_eq!(
            IotAtlas.decode(&t, "state/dev-1/update/accepted", payload),
            Inbound::Accepted
        );
        for other in [
            "state/dev-2/update/delta",
            "state/dev-1/update",
            "$aws/things/dev-1/shadow/update/delta",
            "state/dev-1/update/delta/x",
            "",
        ] {
            assert_eq!(
                IotAtlas.decode(&t, other, payload),
                Inbound::Other,
                "{other}"
            );
        }
        assert_eq!(t.subscriptions(), [t.delta.as_str(), t.accepted.as_str()]);
    }

    #[test]
    fn the_device_announces_its_connection_under_its_own_topics() {
        let topic = IotAtlas.presence_topic("dev-1").expect("a presence topic");
        assert_eq!(topic, "state/dev-1/connection");
        assert!(topic.starts_with("state/dev-1/"), "inside state/%u/#");
        assert!(!topics().subscriptions().contains(&topic.as_str()));
        let link = Link::new(TopicLayout::IotAtlas.cloud(), "dev-1", 8192).expect("link");
        assert_eq!(link.presence_topic(), Some(topic.as_str()));
        let event = |p: &[u8]| IotAtlas.parse_presence(p).map(|e| e.online);
        assert_eq!(event(b"online"), Some(true));
        assert_eq!(event(b"offline"), Some(false));
        for bad in [&b""[..], b"Online", b"online\n", b"{}", b"\xff"] {
            assert_eq!(event(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reports_and_acks_are_the_common_shapes() {
        let state = reported();
        let text = IotAtlas.report_document(&state, 4096);
        assert_eq!(text, state.bounded_payload(4096));
        assert_eq!(IotAtlas.parse_report(&text), Some(state));
        let ack_text = IotAtlas.ack_document(&ack()).expect("serialises");
        assert_eq!(serde_json::from_str::<Ack>(&ack_text).ok(), Some(ack()));
        assert_eq!(
            IotAtlas.parse_report(&ack_text),
            None,
            "an ack is no report"
        );
        assert_eq!(IotAtlas.parse_report("{"), None);
        let link = Link::new(TopicLayout::IotAtlas.cloud(), "dev-1", 8192).expect("link");
        let never = || -> String { panic!("iot-atlas reads no running version") };
        assert_eq!(link.report(&reported(), &never), text);
    }

    #[test]
    fn the_replica_takes_reports_and_acks_and_nothing_else() {
        assert_eq!(
            IotAtlas.device_request("state/pump-1/update"),
            Some(("pump-1".into(), Request::Update))
        );
        for other in [
            "state/pump-1/update/delta",
            "state/pump-1",
            "$aws/things/pump-1/shadow/get",
        ] {
            assert_eq!(IotAtlas.device_request(other), None, "{other}");
        }
        let ack_text = IotAtlas.ack_document(&ack()).expect("serialises");
        let verdict = IotAtlas.accept_update(ack_text.as_bytes(), Stored::default());
        assert_eq!(
            verdict.ok(),
            Some(Verdict::Accepted(Accepted {
                reported: None,
                ack: Some(ack())
            }))
        );
        let report = IotAtlas.report_document(&reported(), 4096);
        let Ok(Verdict::Accepted(accepted)) =
            IotAtlas.accept_update(report.as_bytes(), Stored::default())
        else {
            panic!("a report is accepted");
        };
        assert_eq!(accepted.ack, None);
        assert_eq!(
            accepted.reported.and_then(|r| r.get("jobId").cloned()),
            Some(serde_json::json!("job-1"))
        );
        for bad in [&b"{"[..], b"[]", br#"{"state":{}}"#, b"\xff"] {
            assert!(
                IotAtlas.accept_update(bad, Stored::default()).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(IotAtlas.shadow_answer(1, Stored::default()), None);
        assert_eq!(
            IotAtlas.device_request("state/pump-1/connection"),
            Some(("pump-1".into(), Request::Presence))
        );
        let delta: Value =
            serde_json::from_str(&IotAtlas.delta_document(3, &serde_json::json!({"jobId": "j"})))
                .expect("json");
        assert_eq!(delta["version"], 3);
        assert_eq!(delta["state"]["deployment"]["jobId"], "j");
    }
}
