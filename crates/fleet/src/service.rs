//! `otabox replica`: the replica's MQTT side. It publishes each pending
//! delta, records reports and acknowledgements (confirming them on
//! `…/update/accepted`), republishes a delta to a device that comes online
//! without having run it, and answers shadow `get` requests (AWS layout).
//! What the messages look like is the layout's ([`otabox_cloud`]): in the
//! AWS layout it holds each update to the AWS IoT Device Shadow service's
//! rules and refuses one that breaks them with the service's error
//! document on `…/update/rejected`, and it never publishes a desired
//! deployment the service would refuse to store (recorded as rejected,
//! with the service's reason). It records each device's connection from
//! its presence topic (or, in the AWS layout, the lifecycle events).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc::{AsyncClient, Event, Incoming, Publish, QoS};
use serde_json::Value;

use super::Store;
use otabox_cloud::mqtt;
use otabox_cloud::mqtt::MqttSection;
use otabox_cloud::{CloudLayout, Request, Stored, Topics, Verdict};

/// How often pending deltas are looked for.
const DELTA_POLL: Duration = Duration::from_millis(100);

/// The replica's MQTT client id unless `[mqtt] client_id` sets one.
const CLIENT_ID: &str = "otabox-replica";

/// What the replica serves.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// The SQLite database.
    pub db: PathBuf,
    /// The broker connection (TLS and credentials as for the agent).
    pub mqtt: MqttSection,
}

/// Runs the replica until SIGINT or SIGTERM.
pub async fn run(options: ReplicaOptions) -> Result<()> {
    let store = Store::open(&options.db)?;
    let layout = options.mqtt.layout.cloud();
    let (client, mut eventloop) =
        AsyncClient::new(mqtt::service_options(&options.mqtt, CLIENT_ID)?, 256);
    eventloop.set_network_options(mqtt::network_options());
    let mut backoff = mqtt::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut ticker = tokio::time::interval(DELTA_POLL);
    let mut watch = mqtt::ConnectionWatch::new(mqtt::Endpoint::new(&options.mqtt, CLIENT_ID));
    tracing::info!(db = %options.db.display(), "replica started");
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    watch.connected();
                    backoff.reset();
                    for topic in layout.replica_subscriptions() {
                        client.subscribe(*topic, QoS::AtLeastOnce).await.context("cannot subscribe")?;
                    }
                }
                Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                    watch.subscribed(&ack, layout.replica_subscriptions());
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) => {
                    if let Err(e) = handle(&store, &client, layout, &publish).await {
                        tracing::warn!(topic = publish.topic, "cannot handle a message: {e:#}");
                    }
                    client.ack(&publish).await.context("cannot ack")?;
                }
                Ok(_) => watch.alive(),
                Err(e) => {
                    watch.failed(&e, false);
                    let delay = backoff.next_delay();
                    tracing::debug!("retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                }
            },
            _ = ticker.tick() => {
                if watch.is_up() {
                    publish_deltas(&store, &client, layout).await?;
                }
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn publish_deltas(
    store: &Store,
    client: &AsyncClient,
    layout: &dyn CloudLayout,
) -> Result<()> {
    for pending in store.pending_deltas(super::store::now_ms())? {
        let desired: Value = serde_json::from_str(&pending.desired)?;
        if refused_by_cloud(store, layout, &pending, &desired)? {
            continue;
        }
        let topics = Topics::new(layout, &pending.device)?;
        let delta = layout.delta_document(pending.version, &desired);
        client
            .publish(topics.delta, QoS::AtLeastOnce, false, delta)
            .await
            .context("cannot publish a delta")?;
        store.mark_published(&pending.device, pending.version)?;
        tracing::info!(
            device = pending.device,
            version = pending.version,
            "delta published"
        );
    }
    Ok(())
}

/// Checks `desired` as the cloud would when it stores it (in the AWS
/// layout: the shadow service's depth and size limits); a refused one is
/// recorded as rejected with the cloud's reason and a hint, and never
/// published. True when refused.
fn refused_by_cloud(
    store: &Store,
    layout: &dyn CloudLayout,
    pending: &super::store::PendingDelta,
    desired: &Value,
) -> Result<bool> {
    let status = store.status(&pending.device)?;
    let Err(refusal) = layout.check_desired(desired, stored(status.as_ref())) else {
        return Ok(false);
    };
    let reason = format!(
        "the {} cloud refuses this deployment ({} {}); deploy it by reference: fleet deploy --url",
        layout.name(),
        refusal.code,
        refusal.message
    );
    tracing::warn!(
        device = pending.device,
        version = pending.version,
        "not published: {reason}"
    );
    let job = desired.get("jobId").and_then(Value::as_str);
    store.refuse_desired(&pending.device, pending.version, job, &reason)?;
    Ok(true)
}

async fn handle(
    store: &Store,
    client: &AsyncClient,
    layout: &dyn CloudLayout,
    publish: &Publish,
) -> Result<()> {
    let Some((device, request)) = layout.device_request(&publish.topic) else {
        return Ok(());
    };
    let exchange = Exchange {
        store,
        client,
        layout,
        topics: Topics::new(layout, &device)?,
        device: &device,
        publish,
    };
    match request {
        Request::Get => exchange.answer_get().await,
        Request::Update => exchange.update().await,
        Request::Presence => exchange.presence(),
    }
}

/// A device's message, with what answering it needs.
struct Exchange<'a> {
    store: &'a Store,
    client: &'a AsyncClient,
    layout: &'a dyn CloudLayout,
    device: &'a str,
    topics: Topics,
    publish: &'a Publish,
}

impl Exchange<'_> {
    /// A shadow `get`: answered with the desired and reported deployments.
    async fn answer_get(&self) -> Result<()> {
        let _: Value = serde_json::from_slice(&self.publish.payload).context("not JSON")?;
        let status = self.store.status(self.device)?;
        let version = status.as_ref().map_or(0, |s| s.version);
        let answer = self.layout.shadow_answer(version, stored(status.as_ref()));
        if let (Some(topic), Some(answer)) = (&self.topics.get_accepted, answer) {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, answer)
                .await?;
        }
        Ok(())
    }

    /// The device connected or disconnected: recorded (a device the
    /// replica does not know is ignored).
    fn presence(&self) -> Result<()> {
        let event = self
            .layout
            .parse_presence(&self.publish.payload)
            .context("not a presence message")?;
        let at_ms = event.at_ms.unwrap_or_else(super::store::now_ms);
        if self
            .store
            .record_presence(self.device, event.online, at_ms)?
        {
            let state = if event.online { "online" } else { "offline" };
            tracing::info!(device = self.device, "{state}");
        }
        Ok(())
    }

    /// A report or an acknowledgement: judged by the layout (in the AWS
    /// layout checked and merged as the shadow service does), then recorded
    /// and confirmed, or refused with the layout's answer.
    async fn update(&self) -> Result<()> {
        let (store, device) = (self.store, self.device);
        let status = store.status(device)?;
        let verdict = self
            .layout
            .accept_update(&self.publish.payload, stored(status.as_ref()))?;
        let update = match verdict {
            Verdict::Accepted(update) => update,
            Verdict::Refused { refusal, answer } => {
                tracing::warn!(
                    device,
                    code = refusal.code,
                    "rejected an update: {}",
                    refusal.message
                );
                if let Some(rejected) = &self.topics.rejected {
                    self.client
                        .publish(rejected, QoS::AtLeastOnce, false, answer)
                        .await?;
                }
                return Ok(());
            }
        };
        if let Some(ack) = &update.ack
            && store.record_ack(device, ack)?
        {
            tracing::info!(device, job = ack.job_id, status = ?ack.status, "acknowledged");
        }
        if let Some(reported) = &update.reported {
            store.record_report(device, reported)?;
            republish_if_missed(store, device, reported)?;
        }
        let echo = self.publish.payload.to_vec();
        self.client
            .publish(&self.topics.accepted, QoS::AtLeastOnce, false, echo)
            .await?;
        Ok(())
    }
}

/// What the store holds for a device, as a layout reads it (a desired
/// deployment the cloud refused is none: the cloud never stored it).
fn stored(status: Option<&super::store::DeviceStatus>) -> Stored<'_> {
    Stored {
        desired: status
            .filter(|s| s.cloud_refused != Some(s.version))
            .and_then(|s| s.desired.as_ref()),
        reported: status.and_then(|s| s.reported.as_ref()),
        ack: status.and_then(|s| s.ack.as_ref()),
    }
}

/// A device idle with neither a result nor an ack for the desired job
/// missed its delta (it was offline): publish it again, with a backoff per
/// device that starts over once the device reports or acknowledges the job.
/// The device ignores a delta it has already journaled. Never republished:
/// a deployment the device rejected (final for that shadow version until
/// the next deploy) and a cancel (it matters only to a device running the
/// job, which is not idle).
fn republish_if_missed(store: &Store, device: &str, reported: &Value) -> Result<()> {
    let Some(status) = store.status(device)? else {
        return Ok(());
    };
    let Some(job) = status.job() else {
        return Ok(());
    };
    let ran = reported
        .pointer("/lastResult/jobId")
        .and_then(Value::as_str)
        == Some(job)
        || reported.pointer("/jobId").and_then(Value::as_str) == Some(job);
    if ran || status.ack.is_some() {
        return store.reset_republish(device);
    }
    let idle = reported.pointer("/agent/state").and_then(Value::as_str) == Some("idle");
    if idle && !status.is_cancel() && status.rejection().is_none() {
        store.request_republish(device, super::store::now_ms())?;
    }
    Ok(())
}
