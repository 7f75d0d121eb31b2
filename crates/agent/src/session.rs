//! The MQTT session over the cloud [`Link`]: connecting and subscribing,
//! the ordered outbox publisher (one report in flight, shrunk when the
//! broker keeps refusing it), dispatching what arrives, and the watch on
//! the connection and on the answers to the device's reports.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc::{AsyncClient, Event, Incoming, Outgoing, QoS};
use tokio::sync::mpsc;

use super::intake::{MAX_REASON_BYTES, on_delta};
use super::report::unique_key;
use super::{Shared, lock};
use otabox_cloud::mqtt::{self, Backoff};
use otabox_cloud::{Inbound, Refusal, Shrink};
use otabox_core::journal::JobRecord;
use otabox_core::outbox::{Next as OutboxNext, Outbox};

/// The publisher's view of the outbox head in flight.
#[derive(Default)]
pub(super) struct InFlight {
    seq: Option<u64>,
    pkid: Option<u16>,
    /// Connections lost in a row while this head was in flight.
    losses: u32,
}

/// A connection that lasted this long counts as working: the reconnect
/// backoff starts over after it drops.
pub(super) const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// Connections lost in a row while the same report was in flight after
/// which that report is taken for refused by the broker and shrunk.
pub(super) const LOSSES_BEFORE_SHRINKING: u32 = 2;

/// The same for a message within the smallest report limit, which every
/// supported broker takes: a few drops over it are bad luck, not a
/// refusal. A broker that keeps refusing it all the same gets it dropped
/// in the end, so later reports never wait behind it for good.
pub(super) const LOSSES_BEFORE_DROPPING_SMALL: u32 = 6;

/// The MQTT session loop: subscriptions, deltas, and the ordered outbox.
pub(super) async fn session(
    shared: Arc<Shared>,
    client: AsyncClient,
    mut eventloop: rumqttc::EventLoop,
    mut backoff: Backoff,
    jobs: mpsc::UnboundedSender<JobRecord>,
) -> Result<()> {
    let mut in_flight = InFlight::default();
    let mut connected_at: Option<std::time::Instant> = None;
    let mut wake: Option<std::time::Instant> = None;
    let device_id = shared.config.device_id()?;
    let mut watch = mqtt::ConnectionWatch::new(mqtt::Endpoint::new(&shared.config.mqtt, device_id));
    let mut answers = Answers::default();
    let mut notifier = super::notify::Notifier::new(format!(
        "{}:{}",
        shared.config.mqtt.host, shared.config.mqtt.port
    ));
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    watch.connected();
                    connected_at = Some(std::time::Instant::now());
                    notifier.connected(shared.cloud.topics().subscriptions().len());
                    subscribe(&shared, &client).await?;
                    wake = publish_next(&shared, &client, &mut in_flight).await?;
                    mqtt::announce_online(&client, &shared.cloud).await?;
                    // After the subscriptions are on their way: for
                    // `otabox status`, not on the path to a delta.
                    shared.connection.connected();
                }
                Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                    watch.subscribed(&ack, &shared.cloud.topics().subscriptions());
                    notifier.subscribed();
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) => {
                    otabox_core::failpoint::hang("session:hang").await;
                    answers.heard(&publish.topic);
                    if let Some(rejection) = on_publish(&shared, &jobs, &publish).await {
                        // Not queued durably: a rejection changes no state file.
                        // At most once, like every publish beside the outbox's:
                        // only the outbox's publishes get a packet id, so the
                        // report in flight is never confused with another.
                        client
                            .publish(shared.cloud.topics().update.clone(), QoS::AtMostOnce, false, rejection.into_bytes())
                            .await
                            .context("cannot report a rejection")?;
                    }
                    client.ack(&publish).await.context("cannot ack a publish")?;
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    // Packet id 0: an at-most-once publish, not the report.
                    if pkid != 0 && in_flight.seq.is_some() && in_flight.pkid.is_none() {
                        in_flight.pkid = Some(pkid);
                    }
                }
                Ok(Event::Incoming(Incoming::PubAck(ack))) => {
                    if in_flight.pkid == Some(ack.pkid) {
                        answers.expect();
                        lock(&shared.outbox).complete_head()?;
                        in_flight = InFlight::default();
                        wake = publish_next(&shared, &client, &mut in_flight).await?;
                    }
                }
                Ok(_) => watch.alive(),
                Err(e) => {
                    let was_up = connected_at.take();
                    if was_up.is_some_and(|t| t.elapsed() >= STABLE_CONNECTION) {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    watch.failed(&e, in_flight.seq.is_some());
                    tracing::debug!("retrying in {delay:?}");
                    answers.disarm();
                    shared.connection.disconnected(&e.to_string());
                    notifier.offline(&e.to_string());
                    // Only a connection that was up can have been dropped
                    // over the head: a failed attempt to connect (the
                    // broker down or restarting) says nothing about it.
                    let dropped = was_up.and_then(|_| shrink_if_refused(&shared, &mut in_flight));
                    if let Some(pkid) = dropped {
                        // rumqttc would send the refused packet again.
                        eventloop.pending.retain(|r| {
                            !matches!(r, rumqttc::Request::Publish(p) if p.pkid == pkid)
                        });
                    }
                    notifier.sleep(delay).await;
                }
            },
            _ = shared.outbox_changed.notified() => {
                if connected_at.is_some() {
                    wake = publish_next(&shared, &client, &mut in_flight).await?;
                }
            }
            _ = sleep_until(wake) => {
                wake = None;
                if connected_at.is_some() {
                    wake = publish_next(&shared, &client, &mut in_flight).await?;
                }
            }
            _ = sleep_until(answers.deadline) => answers.overdue(shared.cloud.topics(), device_id, &watch),
            _ = notifier.tick() => notifier.ping(),
        }
    }
}

/// Sleeps until `at`, or forever when there is no `at`.
pub(super) async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// How long the device waits for the first message on its subscriptions
/// after the broker acknowledged one of its reports. The replica (in the
/// `iot-atlas` layout) and AWS answer every report on `…/update/accepted`
/// within milliseconds; silence means the broker drops this device's
/// topics.
pub(super) const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Watches for the first answer to the device's reports: a broker whose
/// ACL drops a device's topics accepts its connection and its publishes
/// and then delivers nothing, silently. Costs no message: it waits for the
/// answers the healthy path brings anyway.
#[derive(Debug, Default)]
pub(super) struct Answers {
    /// When the answer is overdue, while one is awaited.
    deadline: Option<std::time::Instant>,
    /// Something arrived on a subscription since the agent started.
    heard: bool,
    /// The silence was reported.
    warned: bool,
}

impl Answers {
    /// The broker acknowledged a report: an answer is due, unless one came
    /// already.
    fn expect(&mut self) {
        if !self.heard && self.deadline.is_none() {
            self.deadline = Some(std::time::Instant::now() + ANSWER_TIMEOUT);
        }
    }

    /// The connection dropped: the silence it causes says nothing of the
    /// broker's ACL.
    fn disarm(&mut self) {
        self.deadline = None;
    }

    /// A message arrived on `topic`.
    fn heard(&mut self, topic: &str) {
        if self.warned && !self.heard {
            tracing::info!("a first message arrived on {topic}: this device's topics work");
        }
        self.heard = true;
        self.deadline = None;
    }

    /// No answer came in time: says so, once.
    fn overdue(
        &mut self,
        topics: &otabox_cloud::Topics,
        device_id: &str,
        watch: &mqtt::ConnectionWatch,
    ) {
        self.deadline = None;
        if self.warned || self.heard || !watch.is_up() {
            return;
        }
        self.warned = true;
        tracing::warn!(
            "nothing arrived on {} within {} s of this device's report on {}: either the broker's ACL drops this device's topics (is the device id {device_id:?} what the ACL allows? {}), or no replica answers reports",
            topics.subscriptions().join(", "),
            ANSWER_TIMEOUT.as_secs(),
            topics.update,
            watch.identity_hint()
        );
    }
}

/// A connection dropped with the outbox head unacknowledged (rumqttc
/// sends it again after the reconnect). When the broker keeps dropping
/// connections over it, a head larger than the smallest report limit is
/// shrunk, or dropped when it cannot be; returns the packet id rumqttc
/// must then forget.
pub(super) fn shrink_if_refused(shared: &Shared, in_flight: &mut InFlight) -> Option<u16> {
    let seq = in_flight.seq?;
    in_flight.losses += 1;
    if in_flight.losses < LOSSES_BEFORE_SHRINKING {
        return None;
    }
    let mut outbox = lock(&shared.outbox);
    let head = outbox.head().filter(|e| e.seq == seq).cloned();
    let small = head
        .as_ref()
        .is_some_and(|h| h.payload.len() <= *crate::config::MAX_REPORT_RANGE.start());
    if small && in_flight.losses < LOSSES_BEFORE_DROPPING_SMALL {
        // The drops more likely have another cause: it goes out again whole.
        return None;
    }
    let (losses, pkid) = (in_flight.losses, in_flight.pkid);
    *in_flight = InFlight::default();
    outbox.requeue();
    let head = head?;
    let limit = (head.payload.len() / 2).max(*crate::config::MAX_REPORT_RANGE.start());
    if shared.cloud.lower_limit(limit) {
        tracing::warn!(
            "the broker refuses reports of {} bytes: reports are limited to {limit} bytes from now on (lower [mqtt] max_report_bytes to match the broker)",
            head.payload.len()
        );
    }
    match shrunk(shared, &head.payload, limit) {
        Some(smaller) => {
            tracing::warn!(
                key = head.key,
                "the broker dropped the connection {losses} times over a report of {} bytes; sending it trimmed to {} bytes",
                head.payload.len(),
                smaller.len()
            );
            if let Err(e) = outbox.replace_head(smaller) {
                tracing::error!("cannot store the trimmed report: {e:#}");
            }
        }
        None => {
            tracing::error!(
                key = head.key,
                "the broker dropped the connection {losses} times over a message of {} bytes that cannot be trimmed; dropped it",
                head.payload.len()
            );
            if let Err(e) = outbox.complete_head() {
                tracing::error!("cannot drop the refused message: {e:#}");
            }
        }
    }
    pkid
}

/// A report document trimmed to `limit` bytes; `None` when it is not a
/// report or cannot get smaller.
pub(super) fn shrunk(shared: &Shared, payload: &str, limit: usize) -> Option<String> {
    let smaller = shared
        .cloud
        .bounded(&shared.cloud.parse_report(payload)?, limit);
    (smaller.len() < payload.len()).then_some(smaller)
}

/// Subscribes, and in the AWS layout asks for the whole shadow, so a delta
/// published while the agent was away is not missed.
pub(super) async fn subscribe(shared: &Shared, client: &AsyncClient) -> Result<()> {
    let topics = shared.cloud.topics();
    for topic in topics.subscriptions() {
        client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .context("cannot subscribe")?;
    }
    if let Some(get) = &topics.get {
        client
            .publish(get.clone(), QoS::AtMostOnce, false, "{}")
            .await
            .context("cannot ask for the shadow")?;
    }
    Ok(())
}

/// Publishes the outbox head unless one is already in flight; returns when
/// to look again if the head is a progress report not yet due. A queued
/// report over the size limit (one queued by an older agent) is trimmed
/// first.
pub(super) async fn publish_next(
    shared: &Shared,
    client: &AsyncClient,
    in_flight: &mut InFlight,
) -> Result<Option<std::time::Instant>> {
    if in_flight.seq.is_some() {
        return Ok(None);
    }
    let max = shared.cloud.report_limit();
    let next = {
        let mut outbox = lock(&shared.outbox);
        if let Some(head) = outbox.head().filter(|e| e.payload.len() > max).cloned() {
            fit_head(shared, &mut outbox, &head, max)?;
        }
        outbox.next(std::time::Instant::now())
    };
    let entry = match next {
        OutboxNext::Publish(entry) => entry,
        OutboxNext::WaitUntil(at) => return Ok(Some(at)),
        OutboxNext::Idle => return Ok(None),
    };
    let losses = in_flight.losses;
    *in_flight = InFlight {
        seq: Some(entry.seq),
        pkid: None,
        losses,
    };
    client
        .publish(
            entry.topic.clone(),
            QoS::AtLeastOnce,
            false,
            entry.payload.into_bytes(),
        )
        .await
        .context("cannot queue a publish")?;
    Ok(None)
}

/// Makes an oversized outbox head fit `max`: a report is trimmed, anything
/// else is dropped with a logged reason.
pub(super) fn fit_head(
    shared: &Shared,
    outbox: &mut Outbox,
    head: &otabox_core::outbox::Entry,
    max: usize,
) -> Result<()> {
    match shared.cloud.parse_report(&head.payload) {
        Some(reported) => {
            tracing::warn!(
                key = head.key,
                "a queued report of {} bytes exceeds the report limit ({max}); trimmed",
                head.payload.len()
            );
            outbox.replace_head(shared.cloud.bounded(&reported, max))
        }
        None => {
            tracing::error!(
                key = head.key,
                "a queued message of {} bytes exceeds the report limit ({max}) and is no report; dropped",
                head.payload.len()
            );
            outbox.complete_head()
        }
    }
}

/// Handles a message: a delta goes to [`on_delta`], a refusal of a report
/// to [`on_refused`]; returns the report of a rejected delta, if any.
pub(super) async fn on_publish(
    shared: &Shared,
    jobs: &mpsc::UnboundedSender<JobRecord>,
    publish: &rumqttc::Publish,
) -> Option<String> {
    let inbound = shared.cloud.decode(&publish.topic, &publish.payload);
    let payload: &[u8] = match &inbound {
        Inbound::Delta(delta) => delta,
        Inbound::ShadowAnswer(Some(delta)) => delta,
        Inbound::ShadowAnswer(None) => {
            tracing::debug!("the shadow holds no desired deployment");
            return None;
        }
        Inbound::Refused(refusal) => {
            on_refused(shared, refusal.as_ref(), publish.payload.len());
            return None;
        }
        Inbound::Accepted | Inbound::Other => {
            tracing::debug!(topic = publish.topic, "{} bytes", publish.payload.len());
            return None;
        }
    };
    on_delta(shared, jobs, payload).await
}

/// The shadow service refused an update (a layout with refusals, such as
/// AWS's): logged with its code and message. The message is not sent again
/// (the outbox moved on when the broker took it); when it was too large or
/// too deep, reports get a smaller budget and the current state goes out
/// once more, trimmed, until the smallest budget is reached.
pub(super) fn on_refused(shared: &Shared, refusal: Option<&Refusal>, len: usize) {
    let Some(refusal) = refusal else {
        tracing::warn!(
            "the shadow service rejected an update; its answer is no error document ({len} bytes)"
        );
        return;
    };
    tracing::warn!(
        code = refusal.code,
        "the shadow service rejected an update: {}",
        otabox_runtime::bounds::text(refusal.message.clone(), MAX_REASON_BYTES)
    );
    if !refusal.asks_for_less {
        return;
    }
    let smaller = match shared.cloud.shrink(&|| shared.reporter().running_version()) {
        Shrink::Lowered(smaller) => smaller,
        Shrink::Smallest(budget) => {
            return tracing::warn!(
                "reports are at their smallest ({budget} bytes) already; the refused one is dropped"
            );
        }
    };
    tracing::warn!(
        "reports are limited to {smaller} bytes from now on; the current state is sent again, trimmed"
    );
    let reporter = shared.reporter();
    reporter.enqueue(
        &unique_key("refused"),
        reporter.reported_payload(&reporter.stored_reported()),
    );
}
