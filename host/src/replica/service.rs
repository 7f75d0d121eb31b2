//! `otabox replica`: the replica's MQTT side. It publishes each pending
//! delta, records reports and acknowledgements (confirming them on
//! `…/update/accepted`), republishes a delta to a device that comes online
//! without having run it, and answers shadow `get` requests (AWS layout).
//! In the AWS layout it holds each update to the AWS IoT Device Shadow
//! service's rules ([`crate::shadow::aws`]) and refuses one that breaks
//! them with the service's error document on `…/update/rejected`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc::{AsyncClient, Event, Incoming, Publish, QoS};
use serde_json::{Value, json};

use super::Store;
use crate::config::MqttSection;
use crate::mqtt;
use crate::shadow::{Ack, TopicLayout, Topics, aws};

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

/// What a device published on.
enum Kind {
    Update,
    Get,
}

/// The device id and kind of a topic the replica subscribes to.
fn parse_topic(layout: TopicLayout, topic: &str) -> Option<(String, Kind)> {
    let parts: Vec<&str> = topic.split('/').collect();
    match (layout, parts.as_slice()) {
        (TopicLayout::IotAtlas, ["state", id, "update"]) => Some((id.to_string(), Kind::Update)),
        (TopicLayout::AwsShadow, ["$aws", "things", id, "shadow", "update"]) => {
            Some((id.to_string(), Kind::Update))
        }
        (TopicLayout::AwsShadow, ["$aws", "things", id, "shadow", "get"]) => {
            Some((id.to_string(), Kind::Get))
        }
        _ => None,
    }
}

fn subscriptions(layout: TopicLayout) -> &'static [&'static str] {
    match layout {
        TopicLayout::IotAtlas => &["state/+/update"],
        TopicLayout::AwsShadow => &["$aws/things/+/shadow/update", "$aws/things/+/shadow/get"],
    }
}

/// Runs the replica until SIGINT or SIGTERM.
pub async fn run(options: ReplicaOptions) -> Result<()> {
    let store = Store::open(&options.db)?;
    let layout = options.mqtt.layout;
    let (client, mut eventloop) = AsyncClient::new(mqtt::options(&options.mqtt, CLIENT_ID)?, 256);
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
                    for topic in subscriptions(layout) {
                        client.subscribe(*topic, QoS::AtLeastOnce).await.context("cannot subscribe")?;
                    }
                }
                Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                    watch.subscribed(&ack, subscriptions(layout));
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

async fn publish_deltas(store: &Store, client: &AsyncClient, layout: TopicLayout) -> Result<()> {
    for pending in store.pending_deltas(super::store::now_ms())? {
        let desired: Value = serde_json::from_str(&pending.desired)?;
        let topics = Topics::new(layout, &pending.device)?;
        let delta = json!({"version": pending.version, "state": {"deployment": desired}});
        client
            .publish(topics.delta, QoS::AtLeastOnce, false, delta.to_string())
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

async fn handle(
    store: &Store,
    client: &AsyncClient,
    layout: TopicLayout,
    publish: &Publish,
) -> Result<()> {
    let Some((device, kind)) = parse_topic(layout, &publish.topic) else {
        return Ok(());
    };
    let topics = Topics::new(layout, &device)?;
    if let (Kind::Update, Some(rejected)) = (&kind, &topics.rejected) {
        return aws_update(store, client, &device, &topics.accepted, rejected, publish).await;
    }
    let message: Value = serde_json::from_slice(&publish.payload).context("not JSON")?;
    match kind {
        Kind::Get => {
            let status = store.status(&device)?;
            let answer = json!({
                "version": status.as_ref().map_or(0, |s| s.version),
                "state": {
                    "desired": {"deployment": status.as_ref().and_then(|s| s.desired.clone())},
                    "reported": {"deployment": status.as_ref().and_then(|s| s.reported.as_ref()).map(aws::to_aws)},
                }
            });
            if let Some(topic) = topics.get_accepted {
                client
                    .publish(topic, QoS::AtLeastOnce, false, answer.to_string())
                    .await?;
            }
        }
        Kind::Update => {
            if let Ok(ack) = serde_json::from_value::<Ack>(message.clone()) {
                if store.record_ack(&device, &ack)? {
                    tracing::info!(device, job = ack.job_id, status = ?ack.status, "acknowledged");
                }
            } else if let Some(reported) = message.pointer("/state/reported/deployment") {
                store.record_report(&device, reported)?;
                republish_if_missed(store, &device, reported)?;
            } else {
                anyhow::bail!("neither an acknowledgement nor a reported state");
            }
            client
                .publish(
                    topics.accepted,
                    QoS::AtLeastOnce,
                    false,
                    publish.payload.to_vec(),
                )
                .await?;
        }
    }
    Ok(())
}

/// An update in the AWS layout: checked and merged as the shadow service
/// does, then recorded and confirmed, or refused with the service's error
/// document.
async fn aws_update(
    store: &Store,
    client: &AsyncClient,
    device: &str,
    accepted: &str,
    rejected: &str,
    publish: &Publish,
) -> Result<()> {
    let status = store.status(device)?;
    let stored = aws::Stored {
        desired: status.as_ref().and_then(|s| s.desired.as_ref()),
        reported: status.as_ref().and_then(|s| s.reported.as_ref()),
        ack: status.as_ref().and_then(|s| s.ack.as_ref()),
    };
    let update = match aws::check_update(&publish.payload, stored) {
        Ok(update) => update,
        Err(error) => {
            tracing::warn!(
                device,
                code = error.code,
                "rejected an update: {}",
                error.message
            );
            let answer = serde_json::to_vec(&error)?;
            client
                .publish(rejected, QoS::AtLeastOnce, false, answer)
                .await?;
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
    client
        .publish(accepted, QoS::AtLeastOnce, false, publish.payload.to_vec())
        .await?;
    Ok(())
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
