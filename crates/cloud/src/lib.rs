//! Cloud layouts: how the device shadow travels over MQTT in one cloud's
//! convention — the topics, what a message on them means, and the shape of
//! reports and acknowledgements. The agent and the replica speak through a
//! [`CloudLayout`] and never name a layout; each layout lives in one file
//! ([`iot_atlas`], [`aws_shadow`]) and is registered once, in
//! [`TopicLayout::cloud`].
//!
//! Everything outside a layout works on the common shapes: a delta
//! document `{"version": N, "state": {"deployment": …}}` (parsed by
//! [`otabox_core::shadow::parse_delta`]), a [`ReportedState`], an [`Ack`].
//!
//! Adding a layout: a file implementing [`CloudLayout`], a variant of
//! [`TopicLayout`] and its line in [`TopicLayout::cloud`], and tests.
//!
//! The MQTT session both sides open (options, TLS, presence, reconnect
//! backoff, the diagnosis of a failing connection) is in [`mqtt`].

pub mod aws_shadow;
pub mod iot_atlas;
mod link;
#[cfg(any(test, feature = "testing"))]
pub mod memory;
pub mod mqtt;
mod topics;

use std::borrow::Cow;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use otabox_core::shadow::{Ack, ReportedState};

pub use link::{Link, Shrink};
pub use topics::{Topics, check_device_id};

/// Which layout a device or the replica uses (`[mqtt] layout` in
/// device.toml, `--layout` on the command line).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TopicLayout {
    /// `state/<deviceId>/update`, `…/update/delta`, `…/update/accepted`.
    #[default]
    IotAtlas,
    /// `$aws/things/<thing>/shadow/update`, `…/update/delta`,
    /// `…/update/accepted`, `…/get`.
    AwsShadow,
}

impl TopicLayout {
    /// Every layout, in the order the command line lists them.
    pub const ALL: &'static [TopicLayout] = &[TopicLayout::IotAtlas, TopicLayout::AwsShadow];

    /// The layout's implementation: the one place that maps a name to it.
    pub fn cloud(self) -> &'static dyn CloudLayout {
        match self {
            TopicLayout::IotAtlas => &iot_atlas::IotAtlas,
            TopicLayout::AwsShadow => &aws_shadow::AwsShadow,
        }
    }

    /// The layouts' names, for help and error texts (`a or b`).
    pub fn names() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|l| l.cloud().name()).collect();
        names.join(" or ")
    }
}

/// What a message the device received means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<'p> {
    /// A delta document in the common shape, still to be parsed (a cancel
    /// is a delta whose deployment says so).
    Delta(Cow<'p, [u8]>),
    /// The answer to the device's shadow `get`: the delta document it
    /// implies, or `None` when the shadow holds no desired deployment.
    ShadowAnswer(Option<Vec<u8>>),
    /// The cloud confirmed a report or an acknowledgement.
    Accepted,
    /// The cloud refused an update; `None` when its answer cannot be read.
    Refused(Option<Refusal>),
    /// Not a message of this layout.
    Other,
}

/// The cloud's refusal of an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP-like status code (400, 413, 429, …).
    pub code: u16,
    /// The cloud's message.
    pub message: String,
    /// The update was refused for its size or depth: a smaller report may
    /// pass.
    pub asks_for_less: bool,
}

/// What the cloud keeps beside the device's reports, for a layout whose
/// reports share one size limit with it.
#[derive(Clone, Copy)]
pub struct Room<'a> {
    /// Bytes the desired deployment takes.
    pub desired_bytes: usize,
    /// The version of the job running, kept in its acknowledgement (read
    /// only by layouts that need it: it may cost a file read).
    pub version: &'a dyn Fn() -> String,
}

impl Room<'_> {
    /// Nothing beside the reports.
    pub const NONE: Room<'static> = Room {
        desired_bytes: 0,
        version: &String::new,
    };
}

/// What a device published to the replica (or the cloud published about
/// it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// A report or an acknowledgement.
    Update,
    /// A request for the whole shadow.
    Get,
    /// The device connected or disconnected.
    Presence,
}

/// The payload a device publishes (retained) on its presence topic once
/// connected.
pub const ONLINE: &str = "online";
/// The payload of the device's MQTT last will on its presence topic: the
/// broker publishes it (retained) when the connection ends without an
/// MQTT DISCONNECT — a crash, a lost network, or the agent stopping.
pub const OFFLINE: &str = "offline";

/// A device connected or disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceEvent {
    /// Connected.
    pub online: bool,
    /// When (milliseconds since the epoch), if the message says; else the
    /// time it arrived counts.
    pub at_ms: Option<i64>,
}

/// What the replica holds for a device before an update: the desired
/// deployment, the reported one (common shape) and the acknowledgement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Stored<'a> {
    /// Desired deployment.
    pub desired: Option<&'a Value>,
    /// Reported deployment, common shape.
    pub reported: Option<&'a Value>,
    /// The acknowledgement of the desired job.
    pub ack: Option<&'a Ack>,
}

/// What an accepted update changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The device's reported deployment (common shape) when the update
    /// carried a whole report.
    pub reported: Option<Value>,
    /// The acknowledgement it carried.
    pub ack: Option<Ack>,
}

/// The replica's verdict on a device's update.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Recorded, and confirmed on `…/accepted`.
    Accepted(Accepted),
    /// Refused as the cloud would, with the answer for the device's
    /// `rejected` topic.
    Refused {
        /// Why.
        refusal: Refusal,
        /// The document published to the device.
        answer: Vec<u8>,
    },
}

/// One cloud's conventions, for the device (topics, inbound messages,
/// report and acknowledgement documents, their size budget) and for the
/// replica that plays that cloud (its subscriptions, a device's requests,
/// the deltas and answers it sends).
pub trait CloudLayout: Send + Sync + std::fmt::Debug {
    /// The layout's name in device.toml and on the command line.
    fn name(&self) -> &'static str;

    /// The topics of a device whose id [`Topics::new`] checked.
    fn topics_of(&self, device_id: &str) -> Topics;

    /// What a message on `topic` means to the device of `topics`.
    fn decode<'p>(&self, topics: &Topics, topic: &str, payload: &'p [u8]) -> Inbound<'p>;

    /// The report document of `reported` within `max` bytes (trimmed as
    /// [`ReportedState::bounded_payload`] trims).
    fn report_document(&self, reported: &ReportedState, max: usize) -> String;

    /// The reported state a report document carries, if it is one (an
    /// acknowledgement is not).
    fn parse_report(&self, payload: &str) -> Option<ReportedState>;

    /// The acknowledgement document.
    fn ack_document(&self, ack: &Ack) -> Result<String>;

    /// Bytes a desired deployment takes in the cloud's copy of the shadow
    /// (0 where it does not limit reports).
    fn desired_bytes(&self, _desired: &Value) -> usize {
        0
    }

    /// The size reports are built within, given the device's `limit` and
    /// what the cloud keeps beside them.
    fn report_budget(&self, limit: usize, _room: Room<'_>) -> usize {
        limit
    }

    /// The topic where the device announces its connection: [`ONLINE`]
    /// (retained) at each connect, [`OFFLINE`] as its last will; `None`
    /// where the cloud announces it itself.
    fn presence_topic(&self, _device_id: &str) -> Option<String> {
        None
    }

    /// The event a presence message (see [`Request::Presence`]) tells;
    /// `None` when it tells none.
    fn parse_presence(&self, payload: &[u8]) -> Option<PresenceEvent> {
        let online = match payload {
            p if p == ONLINE.as_bytes() => true,
            p if p == OFFLINE.as_bytes() => false,
            _ => return None,
        };
        Some(PresenceEvent {
            online,
            at_ms: None,
        })
    }

    /// Whether the cloud would store `desired` as the device's desired
    /// deployment, beside what `stored` holds (its desired deployment is
    /// the one `desired` replaces); the cloud's refusal when not.
    fn check_desired(&self, _desired: &Value, _stored: Stored<'_>) -> Result<(), Refusal> {
        Ok(())
    }

    /// The topic filters the replica subscribes to.
    fn replica_subscriptions(&self) -> &'static [&'static str];

    /// The device and request of a topic the replica subscribed to.
    fn device_request(&self, topic: &str) -> Option<(String, Request)>;

    /// The delta document the replica publishes for `desired`.
    fn delta_document(&self, version: u64, desired: &Value) -> String {
        json!({"version": version, "state": {"deployment": desired}}).to_string()
    }

    /// The replica's verdict on an update a device published; an error
    /// when the message is none the layout knows (logged, not answered).
    fn accept_update(&self, payload: &[u8], stored: Stored<'_>) -> Result<Verdict>;

    /// The answer to a device's shadow `get` (`None` in a layout without
    /// one).
    fn shadow_answer(&self, _version: u64, _stored: Stored<'_>) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layout_is_registered_under_its_config_name() {
        for layout in TopicLayout::ALL {
            let name = serde_json::to_value(layout).expect("a name");
            assert_eq!(name, json!(layout.cloud().name()));
            let back: TopicLayout = serde_json::from_value(name).expect("parses");
            assert_eq!(back, *layout);
        }
        assert_eq!(TopicLayout::names(), "iot-atlas or aws-shadow");
    }
}
