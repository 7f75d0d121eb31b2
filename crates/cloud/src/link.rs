//! The device's side of its cloud: the layout, the device's topics, and
//! the size its reports are built within. Holds no connection: the agent's
//! session feeds it what arrives and publishes what it renders, so all of
//! it can be tested without a broker.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Result;

use super::{CloudLayout, Inbound, Room, Topics};
use otabox_core::shadow::{Ack, DesiredState, ReportedState};

/// Before any delta is seen, the room reports leave for the desired
/// deployment (in a layout where they share a limit).
const DESIRED_BYTES_UNSEEN: usize = 2048;

/// The device's link to its cloud.
#[derive(Debug)]
pub struct Link {
    layout: &'static dyn CloudLayout,
    topics: Topics,
    /// Where the device announces its connection, in layouts where it does.
    presence: Option<String>,
    /// `[mqtt] max_report_bytes`, or less once the broker or the cloud
    /// refused a report of that size.
    report_limit: AtomicUsize,
    /// Bytes the desired deployment takes in the cloud's shadow, as last
    /// seen.
    desired_bytes: AtomicUsize,
}

/// What a refusal asking for a smaller report did to the report budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shrink {
    /// Reports are limited to this many bytes from now on.
    Lowered(usize),
    /// Reports were at their smallest (this many bytes) already.
    Smallest(usize),
}

impl Link {
    /// The link of `device_id` in `layout`, its reports within
    /// `max_report_bytes`.
    pub fn new(
        layout: &'static dyn CloudLayout,
        device_id: &str,
        max_report_bytes: usize,
    ) -> Result<Self> {
        Ok(Self {
            layout,
            topics: Topics::new(layout, device_id)?,
            presence: layout.presence_topic(device_id),
            report_limit: AtomicUsize::new(max_report_bytes),
            desired_bytes: AtomicUsize::new(DESIRED_BYTES_UNSEEN),
        })
    }

    /// The device's topics.
    pub fn topics(&self) -> &Topics {
        &self.topics
    }

    /// Where the device announces its connection (`None` where the cloud
    /// announces it itself).
    pub fn presence_topic(&self) -> Option<&str> {
        self.presence.as_deref()
    }

    /// What a message the device received means.
    pub fn decode<'p>(&self, topic: &str, payload: &'p [u8]) -> Inbound<'p> {
        self.layout.decode(&self.topics, topic, payload)
    }

    /// The size reports are built within, before the layout's budget.
    pub fn report_limit(&self) -> usize {
        self.report_limit.load(Ordering::Relaxed)
    }

    /// Lowers the report limit to `limit`; true when it was higher.
    pub fn lower_limit(&self, limit: usize) -> bool {
        self.report_limit.fetch_min(limit, Ordering::Relaxed) > limit
    }

    /// Remembers how much room the desired deployment takes in the shadow.
    pub fn note_desired(&self, desired: &DesiredState) {
        if let Ok(desired) = serde_json::to_value(desired) {
            let bytes = self.layout.desired_bytes(&desired);
            self.desired_bytes.store(bytes, Ordering::Relaxed);
        }
    }

    /// The report document of `reported`, within the report limit and the
    /// layout's budget; `version` gives the running job's version, should
    /// the layout need it.
    pub fn report(&self, reported: &ReportedState, version: &dyn Fn() -> String) -> String {
        let budget = self.budget(self.report_limit(), version);
        self.bounded(reported, budget)
    }

    /// The report document of `reported` within `max` bytes.
    pub fn bounded(&self, reported: &ReportedState, max: usize) -> String {
        self.layout.report_document(reported, max)
    }

    /// The reported state a report document carries, if it is one.
    pub fn parse_report(&self, payload: &str) -> Option<ReportedState> {
        self.layout.parse_report(payload)
    }

    /// The acknowledgement document.
    pub fn ack(&self, ack: &Ack) -> Result<String> {
        self.layout.ack_document(ack)
    }

    /// The cloud refused a report for its size: halves the budget, down to
    /// the layout's smallest (a layout that refuses updates sets a floor
    /// in its [`CloudLayout::report_budget`]).
    pub fn shrink(&self, version: &dyn Fn() -> String) -> Shrink {
        let budget = self.budget(self.report_limit(), version);
        let smaller = self.layout.report_budget(budget / 2, Room::NONE);
        if smaller >= budget {
            return Shrink::Smallest(budget);
        }
        self.report_limit.store(smaller, Ordering::Relaxed);
        Shrink::Lowered(smaller)
    }

    /// The layout's budget for `limit`.
    fn budget(&self, limit: usize, version: &dyn Fn() -> String) -> usize {
        let room = Room {
            desired_bytes: self.desired_bytes.load(Ordering::Relaxed),
            version,
        };
        self.layout.report_budget(limit, room)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{MAX_UPDATE, MIN_BUDGET, Memory};
    use crate::{Refusal, TopicLayout};
    use otabox_core::shadow::{sample_desired, sample_reported};

    fn reported(items: usize) -> ReportedState {
        let mut state = sample_reported("job-1");
        state.inventory.insert(
            "otabox/apt:1".into(),
            (0..items)
                .map(|i| (format!("package-{i:05}"), "1.0".to_string()))
                .collect(),
        );
        state
    }

    fn no_version() -> String {
        String::new()
    }

    #[test]
    fn a_link_needs_a_device_id_that_is_a_topic_level() {
        for layout in TopicLayout::ALL {
            for bad in ["", "a/b", "+", "#", "a b", &"x".repeat(129)] {
                assert!(Link::new(layout.cloud(), bad, 8192).is_err(), "{bad:?}");
            }
        }
        let link = Link::new(&Memory, "dev-1", 8192).expect("valid");
        assert_eq!(link.topics().update, "mem/dev-1/update");
    }

    #[test]
    fn messages_decode_through_the_layout() {
        let link = Link::new(&Memory, "dev-1", 8192).expect("link");
        assert_eq!(
            link.decode("mem/dev-1/delta", b"{}"),
            Inbound::Delta(b"{}"[..].into())
        );
        assert_eq!(
            link.decode(
                "mem/dev-1/refused",
                br#"{"code": 413, "message": "too large"}"#
            ),
            Inbound::Refused(Some(Refusal {
                code: 413,
                message: "too large".into(),
                asks_for_less: true
            }))
        );
        assert_eq!(
            link.decode("mem/dev-1/refused", b"{}"),
            Inbound::Refused(None)
        );
        assert_eq!(link.decode("mem/dev-2/delta", b"{}"), Inbound::Other);
    }

    #[test]
    fn reports_keep_to_the_limit_and_the_room_beside_the_desired_deployment() {
        let link = Link::new(&Memory, "dev-1", 64 << 10).expect("link");
        let big = reported(1000);
        let unseen = link.report(&big, &no_version);
        assert!(unseen.len() <= MAX_UPDATE - DESIRED_BYTES_UNSEEN);
        let desired = sample_desired("job-1");
        link.note_desired(&desired);
        let room = serde_json::to_string(&desired).expect("json").len();
        let text = link.report(&big, &no_version);
        assert!(text.len() <= MAX_UPDATE - room, "{}", text.len());
        let back = link.parse_report(&text).expect("a report");
        assert!(back.inventory_omitted.is_some(), "trimmed, and says so");
        let small = reported(2);
        assert_eq!(
            link.parse_report(&link.report(&small, &no_version)),
            Some(small)
        );
    }

    #[test]
    fn the_limit_only_goes_down() {
        let link = Link::new(&Memory, "dev-1", 8192).expect("link");
        assert!(!link.lower_limit(9000));
        assert_eq!(link.report_limit(), 8192);
        assert!(link.lower_limit(5000));
        assert!(!link.lower_limit(5000));
        assert_eq!(link.report_limit(), 5000);
    }

    #[test]
    fn refusals_halve_the_budget_down_to_the_layouts_smallest() {
        let link = Link::new(&Memory, "dev-1", 64 << 10).expect("link");
        let mut lowered = Vec::new();
        let floor = loop {
            match link.shrink(&no_version) {
                Shrink::Lowered(limit) => lowered.push(limit),
                Shrink::Smallest(at) => break at,
            }
            assert!(lowered.len() < 32, "it ends");
        };
        assert_eq!(floor, MIN_BUDGET);
        assert_eq!(
            lowered.first(),
            Some(&((MAX_UPDATE - DESIRED_BYTES_UNSEEN) / 2))
        );
        assert!(lowered.windows(2).all(|w| w[1] < w[0]));
        assert_eq!(link.report_limit(), floor);
        assert!(link.report(&reported(1000), &no_version).len() <= floor);
    }
}
