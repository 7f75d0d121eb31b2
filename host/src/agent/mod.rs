//! The device agent (`otabox run`): the MQTT session with the device
//! shadow, the journal, and a worker that runs jobs one at a time.
//!
//! A delta is acknowledged to the broker only after it is journaled (or
//! found stale, duplicate or malformed), so a crash in between makes the
//! broker deliver it again and the journal makes that redelivery harmless.
//! Every report goes through the durable [`Outbox`] and is published in
//! order, one at a time, each removed only when the broker acknowledged it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc::{AsyncClient, Event, Incoming, Outgoing, QoS};
use tokio::sync::{Notify, mpsc};

use crate::cloud::{Inbound, Link, Refusal, Shrink};
use crate::config::DeviceConfig;
use crate::download;
use crate::journal::{self, Acceptance, JobPhase, JobRecord, Journal, Resume};
use crate::model::{Outcome, Phase, Status, StepContext, StepState, UpdateHandler};
use crate::mqtt::{self, Backoff};
use crate::outbox::{Next as OutboxNext, Outbox};
use crate::runtime::{CallScope, CancelFlag, PayloadFile, Runtime};
use crate::shadow::{
    Ack, AgentInfo, AgentState, DeltaMessage, JobResult, LastResult, ManifestSource, Rejection,
    ReportedState, StepOutcome, parse_delta,
};
use crate::trust::RootStore;
use crate::workflow::{self, StepRequest, StepResult, host_codes};

mod inbox;
#[cfg(test)]
mod job_tests;

/// The agent's version, reported in its state.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// State shared by the session loop and the job worker.
struct Shared {
    config: DeviceConfig,
    /// The cloud layout, the device's topics and the report size.
    cloud: Link,
    journal: Journal,
    /// The loaded handlers.
    handlers: Vec<Arc<dyn UpdateHandler>>,
    outbox: Mutex<Outbox>,
    outbox_changed: Notify,
    downloader: crate::download::Downloader,
    /// The root of trust, when deployments must be signed (the configured
    /// one, or a later one delivered by a rotation).
    trust: RootStore,
    /// The job running now and its cancel flag.
    current: Mutex<Option<(String, CancelFlag)>>,
    /// Jobs cancelled before they started.
    cancelled: Mutex<std::collections::BTreeSet<String>>,
    /// The running job's state and progress, as last reported.
    live: Mutex<Live>,
    /// The broker connection, recorded for `otabox status`.
    connection: crate::local::ConnectionLog,
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(config: DeviceConfig) -> Result<()> {
    let device_id = config.device_id()?.to_string();
    let cloud = Link::new(
        config.mqtt.layout.cloud(),
        &device_id,
        config.mqtt.max_report_bytes,
    )?;
    let (_state_lock, wake) = inbox::own_state(&config.paths.state)?;
    let journal = Journal::open(&config.paths.state)?;
    let runtime = Runtime::new(Some(config.cache_dir()))?;
    let handlers = runtime
        .load_dir(&config.paths.handlers, &config.handlers)
        .await?;
    for refused in &handlers.refused {
        tracing::error!("handler {} refused: {:#}", refused.name, refused.error);
    }
    handlers.require_valid_configs()?;
    let handlers: Vec<Arc<dyn UpdateHandler>> = handlers
        .handlers
        .into_iter()
        .map(|h| h as Arc<dyn UpdateHandler>)
        .collect();
    let outbox = Outbox::open(&config.paths.state.join("outbox"))?;
    let options = mqtt::options(&config.mqtt, &device_id)?;
    let backoff = Backoff::new(
        Duration::from_millis(config.mqtt.reconnect_min_ms),
        Duration::from_millis(
            config
                .mqtt
                .reconnect_max_ms
                .max(config.mqtt.reconnect_min_ms),
        ),
    );
    let downloader = crate::download::Downloader::new(config.download.options(&config.mqtt))?;
    let trust = RootStore::load(config.trust.root.as_deref(), &config.paths.state)?;
    let shared = Arc::new(Shared {
        downloader,
        trust,
        cloud,
        journal,
        handlers,
        outbox: Mutex::new(outbox),
        outbox_changed: Notify::new(),
        current: Mutex::new(None),
        cancelled: Mutex::new(Default::default()),
        live: Mutex::new(Live::default()),
        connection: crate::local::ConnectionLog::new(
            &config.paths.state,
            format!("{}:{}", config.mqtt.host, config.mqtt.port),
        ),
        config,
    });
    release_startup_memory();
    let (jobs_tx, jobs_rx) = mpsc::unbounded_channel();
    refresh_inventory(&shared).await;
    announce(&shared)?;
    resume_jobs(&shared, &jobs_tx).await?;
    if let Err(e) = shared.journal.prune(shared.config.device.retained_jobs) {
        tracing::warn!("cannot clean up finished jobs: {e:#}");
    }
    // A job completed after a restart may have changed what handlers manage.
    report_inventory(&shared, "inventory:resumed").await;
    tokio::spawn(inbox::watch(shared.clone(), jobs_tx.clone(), wake));
    tokio::spawn(worker(shared.clone(), jobs_rx));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    eventloop.set_network_options(mqtt::network_options());
    tracing::info!(
        device = device_id,
        "agent {AGENT_VERSION} started; {} handler(s)",
        shared.handlers.len()
    );
    tokio::select! {
        result = session(shared, client, eventloop, backoff, jobs_tx) => result,
        _ = shutdown_signal() => {
            tracing::info!("stopping on signal");
            Ok(())
        }
    }
}

/// Hands the heap freed after loading (component bytes, cache files,
/// compile scratch) back to the system, so the idle agent stays small.
fn release_startup_memory() {
    // SAFETY: malloc_trim only releases free heap memory; it has no
    // preconditions and touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// The publisher's view of the outbox head in flight.
#[derive(Default)]
struct InFlight {
    seq: Option<u64>,
    pkid: Option<u16>,
    /// Connections lost in a row while this head was in flight.
    losses: u32,
}

/// A connection that lasted this long counts as working: the reconnect
/// backoff starts over after it drops.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// Connections lost in a row while the same report was in flight after
/// which that report is taken for refused by the broker and shrunk.
const LOSSES_BEFORE_SHRINKING: u32 = 2;

/// The MQTT session loop: subscriptions, deltas, and the ordered outbox.
async fn session(
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
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    watch.connected();
                    connected_at = Some(std::time::Instant::now());
                    shared.connection.connected();
                    subscribe(&shared, &client).await?;
                    wake = publish_next(&shared, &client, &mut in_flight).await?;
                }
                Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                    watch.subscribed(&ack, &shared.cloud.topics().subscriptions());
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) => {
                    answers.heard(&publish.topic);
                    if let Some(rejection) = on_publish(&shared, &jobs, &publish).await {
                        // Not queued durably: a rejection changes no state file.
                        client
                            .publish(shared.cloud.topics().update.clone(), QoS::AtLeastOnce, false, rejection.into_bytes())
                            .await
                            .context("cannot report a rejection")?;
                    }
                    client.ack(&publish).await.context("cannot ack a publish")?;
                }
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                    if in_flight.seq.is_some() && in_flight.pkid.is_none() {
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
                    if connected_at.is_some_and(|t| t.elapsed() >= STABLE_CONNECTION) {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    watch.failed(&e, in_flight.seq.is_some());
                    tracing::debug!("retrying in {delay:?}");
                    answers.disarm();
                    connected_at = None;
                    shared.connection.disconnected(&e.to_string());
                    if let Some(pkid) = shrink_if_refused(&shared, &mut in_flight) {
                        // rumqttc would send the refused packet again.
                        eventloop.pending.retain(|r| {
                            !matches!(r, rumqttc::Request::Publish(p) if p.pkid == pkid)
                        });
                    }
                    tokio::time::sleep(delay).await;
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
        }
    }
}

/// Sleeps until `at`, or forever when there is no `at`.
async fn sleep_until(at: Option<std::time::Instant>) {
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
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Watches for the first answer to the device's reports: a broker whose
/// ACL drops a device's topics accepts its connection and its publishes
/// and then delivers nothing, silently. Costs no message: it waits for the
/// answers the healthy path brings anyway.
#[derive(Debug, Default)]
struct Answers {
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
        topics: &crate::cloud::Topics,
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

/// The connection dropped with the outbox head unacknowledged (rumqttc
/// sends it again after the reconnect). When the broker keeps dropping the
/// connection over it, the head is shrunk, or dropped when it cannot be;
/// returns the packet id rumqttc must then forget.
fn shrink_if_refused(shared: &Shared, in_flight: &mut InFlight) -> Option<u16> {
    let seq = in_flight.seq?;
    in_flight.losses += 1;
    if in_flight.losses < LOSSES_BEFORE_SHRINKING {
        return None;
    }
    let (losses, pkid) = (in_flight.losses, in_flight.pkid);
    *in_flight = InFlight::default();
    let mut outbox = lock(&shared.outbox);
    outbox.requeue();
    let head = outbox.head().filter(|e| e.seq == seq).cloned()?;
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
fn shrunk(shared: &Shared, payload: &str, limit: usize) -> Option<String> {
    let smaller = shared
        .cloud
        .bounded(&shared.cloud.parse_report(payload)?, limit);
    (smaller.len() < payload.len()).then_some(smaller)
}

/// Subscribes, and in the AWS layout asks for the whole shadow, so a delta
/// published while the agent was away is not missed.
async fn subscribe(shared: &Shared, client: &AsyncClient) -> Result<()> {
    let topics = shared.cloud.topics();
    for topic in topics.subscriptions() {
        client
            .subscribe(topic, QoS::AtLeastOnce)
            .await
            .context("cannot subscribe")?;
    }
    if let Some(get) = &topics.get {
        client
            .publish(get.clone(), QoS::AtLeastOnce, false, "{}")
            .await
            .context("cannot ask for the shadow")?;
    }
    Ok(())
}

/// Publishes the outbox head unless one is already in flight; returns when
/// to look again if the head is a progress report not yet due. A queued
/// report over the size limit (one queued by an older agent) is trimmed
/// first.
async fn publish_next(
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
fn fit_head(
    shared: &Shared,
    outbox: &mut Outbox,
    head: &crate::outbox::Entry,
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

/// Handles a message; returns the report of a rejected delta, if any. A
/// deployment by reference is fetched here, before it is journaled (the
/// session waits for it: the document is small and the fetch bounded).
async fn on_publish(
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
    let delta = match parse_delta(payload, shared.config.mqtt.max_message_bytes) {
        Ok(delta) => delta,
        Err(e) => return rejection(shared, payload, &format!("{e:#}")),
    };
    shared.cloud.note_desired(&delta.state.deployment);
    let delta = match resolve_reference(shared, delta).await {
        Ok(delta) => delta,
        Err(e) => return rejection(shared, payload, &format!("{e:#}")),
    };
    let (sequence, new_root) = match verify_signature(shared, &delta.state.deployment) {
        Ok(verified) => verified,
        Err(e) => {
            return rejection(shared, payload, &format!("untrusted deployment: {e:#}"));
        }
    };
    if delta.state.deployment.cancel {
        cancel_job(shared, delta.version, &delta.state.deployment.job_id);
        return None;
    }
    match shared
        .journal
        .accept_signed(delta.version, &delta.state.deployment, sequence)
    {
        Ok(Acceptance::Accepted(record)) => {
            if let Some(root) = new_root {
                shared.trust.keep(root);
            }
            tracing::info!(job = record.job_id, version = delta.version, "accepted");
            if let Some((running, cancel)) = lock(&shared.current).as_ref() {
                tracing::info!(job = running, "cancelling: a new deployment arrived");
                cancel.cancel();
            }
            let _ = jobs.send(*record);
        }
        Ok(Acceptance::Stale { last }) => {
            tracing::info!(version = delta.version, last, "ignored a stale delta")
        }
        Ok(Acceptance::Duplicate(record)) => {
            tracing::info!(
                job = record.job_id,
                "ignored a duplicate delta (the job runs at most once)"
            )
        }
        Ok(Acceptance::Finished(job)) => {
            tracing::info!(job, "ignored a delta of a job that ran long ago")
        }
        Err(e) => tracing::error!("cannot journal a delta: {e:#}"),
    }
    None
}

/// Longest wait for a referenced deployment document.
const REFERENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// A deployment given by reference, fetched (exact size and sha256) and
/// put in the delta in its place; other deltas, and cancels, pass as they
/// are.
async fn resolve_reference(shared: &Shared, mut delta: DeltaMessage) -> Result<DeltaMessage> {
    let desired = &delta.state.deployment;
    let Some(reference) = desired.deployment_ref.as_ref().filter(|_| !desired.cancel) else {
        return Ok(delta);
    };
    let dir = shared.config.paths.state.join("references");
    crate::durable::create_private_dir(&dir)?;
    let path = dir.join(format!("{}.json", desired.job_id));
    let fetch =
        shared
            .downloader
            .fetch_document(&reference.url, &reference.sha256, reference.size, &path);
    let fetched = tokio::time::timeout(REFERENCE_TIMEOUT, fetch).await;
    let bytes = std::fs::read(&path);
    let _ = std::fs::remove_file(&path);
    match fetched {
        Err(_) => {
            anyhow::bail!("the referenced deployment did not arrive within {REFERENCE_TIMEOUT:?}")
        }
        Ok(Err(e)) => anyhow::bail!("cannot fetch the referenced deployment: {e}"),
        Ok(Ok(())) => {}
    }
    let bytes = bytes.context("the referenced deployment was not stored")?;
    anyhow::ensure!(
        bytes.len() as u64 == reference.size,
        "the referenced deployment has {} bytes, not {}",
        bytes.len(),
        reference.size
    );
    delta.state.deployment = desired.resolve(&bytes)?;
    Ok(delta)
}

/// The shadow service refused an update (a layout with refusals, such as
/// AWS's): logged with its code and message. The message is not sent again
/// (the outbox moved on when the broker took it); when it was too large or
/// too deep, reports get a smaller budget and the current state goes out
/// once more, trimmed, until the smallest budget is reached.
fn on_refused(shared: &Shared, refusal: Option<&Refusal>, len: usize) {
    let Some(refusal) = refusal else {
        tracing::warn!(
            "the shadow service rejected an update; its answer is no error document ({len} bytes)"
        );
        return;
    };
    tracing::warn!(
        code = refusal.code,
        "the shadow service rejected an update: {}",
        crate::runtime::bounds::text(refusal.message.clone(), MAX_REASON_BYTES)
    );
    if !refusal.asks_for_less {
        return;
    }
    let smaller = match shared.cloud.shrink(&|| running_version(shared)) {
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
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    enqueue(
        shared,
        &format!("refused:{stamp}"),
        reported_payload(shared, &stored_reported(shared)),
    );
}

/// With a trust root, the deployment's signed manifest must verify (before
/// anything is journaled or fetched), after the root rotations it carries;
/// returns its sequence and the rotated root, if any.
fn verify_signature(
    shared: &Shared,
    desired: &crate::shadow::DesiredState,
) -> Result<(Option<u64>, Option<crate::trust::signed::Root>)> {
    let Some(current) = shared.trust.current() else {
        anyhow::ensure!(
            desired.signed_manifest.is_none(),
            "this device has no [trust] root to verify the signed manifest"
        );
        return Ok((None, None));
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let verified = crate::trust::signed::Verifier {
        root: &current,
        device: shared.config.device_id()?,
        groups: &shared.config.trust.groups,
        last_sequence: shared.journal.shadow()?.last_sequence,
        now,
    }
    .verify_deployment(desired)?;
    Ok((Some(verified.manifest.signed.sequence), verified.rotated))
}

/// Queues the current reported state at start: its arrival tells the
/// cloud the agent is online and subscribed.
fn announce(shared: &Shared) -> Result<()> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let shadow = shared.journal.update_shadow(|s| {
        let mut reported = s.reported.clone().unwrap_or_else(idle_state);
        reported.agent = AgentInfo {
            state: AgentState::Idle,
            version: AGENT_VERSION.into(),
        };
        s.reported = Some(reported);
    })?;
    if let Some(reported) = &shadow.reported {
        enqueue(
            shared,
            &format!("online:{stamp}"),
            reported_payload(shared, reported),
        );
    }
    Ok(())
}

/// Asks every handler for what it manages (`inventory`: canonical update
/// type → item → version).
async fn collect_inventory(shared: &Shared) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut inventory = BTreeMap::new();
    for handler in &shared.handlers {
        let Some(update_type) = handler.update_types().into_iter().next() else {
            continue;
        };
        match handler.inventory().await {
            Ok(Ok(items)) if !items.is_empty() => {
                inventory.insert(
                    update_type,
                    items.into_iter().map(|i| (i.name, i.version)).collect(),
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(status)) => tracing::warn!(
                handler = handler.name(),
                "inventory failed: {}",
                status.message
            ),
            Err(e) => tracing::warn!(handler = handler.name(), "inventory failed: {e:#}"),
        }
    }
    inventory
}

/// Stores the handlers' inventory in the reported state; true when it
/// changed.
async fn refresh_inventory(shared: &Shared) -> bool {
    let inventory = collect_inventory(shared).await;
    let mut changed = false;
    let updated = shared.journal.update_shadow(|s| {
        let mut reported = s.reported.clone().unwrap_or_else(idle_state);
        changed = reported.inventory != inventory;
        reported.inventory = inventory;
        s.reported = Some(reported);
    });
    if let Err(e) = updated {
        tracing::error!("cannot store the inventory: {e:#}");
    }
    changed
}

/// A progress sink for `job`: stores the progress in the reported state
/// and reports it at most once a second, and when a phase completes.
fn progress_reporter(shared: &Arc<Shared>, job: &str) -> crate::runtime::ProgressSink {
    let (shared, job) = (shared.clone(), job.to_string());
    let last = Mutex::new(None::<std::time::Instant>);
    let sequence = std::sync::atomic::AtomicU64::new(0);
    Arc::new(move |event: crate::runtime::ProgressEvent| {
        let complete = event.total > 0 && event.done >= event.total;
        let mut last = lock(&last);
        if !complete && last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(std::time::Instant::now());
        let progress = crate::shadow::Progress {
            step: event.step,
            phase: event.phase.as_str().into(),
            done: event.done,
            total: event.total,
        };
        let report = live_report(&shared, |live| {
            live.job_id = Some(job.clone());
            live.state = agent_state_of(event.phase).or(live.state);
            live.progress = Some(progress);
        });
        let n = sequence.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = format!("progress:{job}:{n}");
        lock(&shared.outbox).push_volatile(
            &key,
            &shared.cloud.topics().update,
            report,
            std::time::Instant::now(),
        );
        shared.outbox_changed.notify_one();
    })
}

/// What a running job adds to the stored reported state: held in memory
/// and sent as progress reports, never written (the terminal report
/// replaces it).
#[derive(Debug, Clone, Default)]
struct Live {
    job_id: Option<String>,
    state: Option<AgentState>,
    progress: Option<crate::shadow::Progress>,
}

/// A report of the stored reported state with the running job's live
/// state, after `change` to it.
fn live_report(shared: &Shared, change: impl FnOnce(&mut Live)) -> String {
    let live = {
        let mut live = lock(&shared.live);
        change(&mut live);
        live.clone()
    };
    let mut reported = stored_reported(shared);
    if let Some(state) = live.state {
        reported.agent.state = state;
    }
    if live.job_id.is_some() {
        reported.job_id = live.job_id;
    }
    reported.progress = live.progress;
    reported_payload(shared, &reported)
}

/// The reported state as last stored (idle when none is).
fn stored_reported(shared: &Shared) -> ReportedState {
    shared
        .journal
        .shadow()
        .ok()
        .and_then(|s| s.reported)
        .unwrap_or_else(idle_state)
}

/// How long a state change waits before it is reported: a job that ends
/// within it sends only its result.
const STATE_REPORT_DELAY: Duration = Duration::from_millis(100);

/// An explicit cancel: signals the running job, or marks a queued one.
fn cancel_job(shared: &Shared, version: u64, job_id: &str) {
    match shared.journal.advance(version) {
        Ok(true) => {}
        Ok(false) => return tracing::info!(version, "ignored a stale cancel"),
        Err(e) => return tracing::error!("cannot journal a cancel: {e:#}"),
    }
    if let Some((running, cancel)) = lock(&shared.current).as_ref()
        && running == job_id
    {
        tracing::info!(job = job_id, "cancel requested");
        cancel.cancel();
        return;
    }
    match shared.journal.record(job_id) {
        Ok(Some(record)) if !matches!(record.phase, JobPhase::Done { .. }) => {
            tracing::info!(job = job_id, "cancelled before it started");
            lock(&shared.cancelled).insert(job_id.to_string());
        }
        Ok(_) => tracing::info!(job = job_id, "nothing to cancel"),
        Err(e) => tracing::error!("cannot read job {job_id}: {e:#}"),
    }
}

/// The report of a rejected delta: the current reported state with
/// `lastRejected` (the delta's shadow version and job id as far as they
/// can be read, and the reason). Nothing is written: a rejection leaves
/// every state file as it was.
fn rejection(shared: &Shared, payload: &[u8], reason: &str) -> Option<String> {
    tracing::warn!("rejected delta: {reason}");
    let mut reported = stored_reported(shared);
    reported.last_rejected = Some(rejected_delta(
        payload,
        shared.config.mqtt.max_message_bytes,
        reason,
    ));
    Some(reported_payload(shared, &reported))
}

/// Which delta was rejected: its version and job id when the message is
/// JSON within the size cap and they are well-formed.
fn rejected_delta(payload: &[u8], max_bytes: usize, reason: &str) -> Rejection {
    let value: Option<serde_json::Value> = (payload.len() <= max_bytes)
        .then(|| serde_json::from_slice(payload).ok())
        .flatten();
    let field = |pointer: &str| value.as_ref().and_then(|v| v.pointer(pointer)).cloned();
    Rejection {
        shadow_version: field("/version").and_then(|v| v.as_u64()),
        job_id: field("/state/deployment/jobId")
            .and_then(|v| v.as_str().map(str::to_string))
            .filter(|id| crate::shadow::validate_job_id(id).is_ok()),
        reason: crate::runtime::bounds::text(reason.to_string(), MAX_REASON_BYTES),
    }
}

/// Longest reason of a rejection, as the contract bounds status messages.
const MAX_REASON_BYTES: usize = 1024;

/// The state of this agent, idle, before it ran anything.
fn idle_state() -> ReportedState {
    ReportedState::idle(AGENT_VERSION)
}

/// The report document of `reported`, within `[mqtt] max_report_bytes`
/// and the layout's budget (in the AWS layout, the shadow's room beside
/// the desired deployment).
fn reported_payload(shared: &Shared, reported: &ReportedState) -> String {
    shared.cloud.report(reported, &|| running_version(shared))
}

/// The version of the job running, as journaled (empty when none is).
fn running_version(shared: &Shared) -> String {
    shared
        .journal
        .shadow()
        .ok()
        .and_then(|s| s.running_version)
        .unwrap_or_default()
}

/// The layout's acknowledgement document.
fn ack_payload(shared: &Shared, ack: &Ack) -> Result<String> {
    shared.cloud.ack(ack)
}

/// Queues a message on the update topic and wakes the publisher.
fn enqueue(shared: &Shared, key: &str, payload: String) {
    match lock(&shared.outbox).push(key, &shared.cloud.topics().update, payload) {
        Ok(_) => shared.outbox_changed.notify_one(),
        Err(e) => tracing::error!("cannot queue report {key}: {e:#}"),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Resumes what the journal holds, before any new delta is taken.
async fn resume_jobs(shared: &Arc<Shared>, jobs: &mpsc::UnboundedSender<JobRecord>) -> Result<()> {
    let boot_id = journal::boot_id().unwrap_or_default();
    for mut record in shared.journal.unfinished()? {
        shared.journal.count_attempt(&mut record)?;
        let decision = journal::decide(&record, &boot_id, journal::DEFAULT_MAX_ATTEMPTS);
        tracing::info!(
            job = record.job_id,
            phase = journal::phase_name(&record.phase),
            ?decision,
            "resuming"
        );
        match decision {
            Resume::Restart | Resume::ResumeDownload => {
                let _ = jobs.send(record);
            }
            Resume::AskHandler { step } => ask_handler(shared, record, step as usize, jobs).await?,
            Resume::Report(result) => finish(shared, record, result, None).await?,
            Resume::GiveUp(message) => {
                let status = workflow::host_status(host_codes::LOOP_BREAKER, message);
                finish(shared, record, JobResult::Failed, Some(status)).await?
            }
            Resume::Nothing => {}
            Resume::AwaitReboot => {
                tracing::info!(
                    job = record.job_id,
                    "still waiting for the device to reboot"
                );
                report_progress(shared, &record, AgentState::RebootPending)?;
            }
            Resume::VerifyAfterReboot | Resume::VerifyAfterRestart | Resume::ContinueVerify => {
                let job = record.job_id.clone();
                if let Err(e) = continue_pending(shared, record).await {
                    tracing::error!(job, "cannot finish after the reboot or restart: {e:#}");
                }
            }
            Resume::ContinueRollback => {
                let status = workflow::host_status(
                    host_codes::JOURNAL,
                    "the agent stopped during a rollback".into(),
                );
                finish(shared, record, JobResult::FailedInconsistent, Some(status)).await?
            }
        }
    }
    Ok(())
}

/// A job stopped while step `step` changed the system: ask the handler
/// whether the change took effect; if so continue, if not roll back.
async fn ask_handler(
    shared: &Arc<Shared>,
    record: JobRecord,
    step: usize,
    jobs: &mpsc::UnboundedSender<JobRecord>,
) -> Result<()> {
    let handler = match pinned_handler(&shared.handlers, &record, step) {
        Ok(handler) => handler,
        Err(status) => {
            return finish(shared, record, JobResult::FailedInconsistent, status).await;
        }
    };
    let (scope, ctx) = match step_call(shared, &record, step, handler.as_ref()) {
        Ok(call) => call,
        Err(e) => {
            let status = workflow::host_status(host_codes::DOWNLOAD, format!("{e:#}"));
            return finish(shared, record, JobResult::FailedInconsistent, Some(status)).await;
        }
    };
    match settle_interrupted(handler.as_ref(), scope, &ctx).await {
        Interrupted::TookEffect => {
            tracing::info!(
                job = record.job_id,
                step,
                "the interrupted step took effect; continuing"
            );
            let mut record = record;
            record.steps.truncate(step);
            record.steps.push(step_outcome(
                &ctx.update_type,
                StepState::Installed,
                ctx.installed_criteria.clone(),
            ));
            let _ = jobs.send(record);
            Ok(())
        }
        Interrupted::Ended { result, status } => finish(shared, record, result, Some(status)).await,
    }
}

/// What became of a step the agent stopped in while it changed the system.
#[derive(Debug, Clone, PartialEq)]
enum Interrupted {
    /// The handler says the change is in place: the job goes on after it.
    TookEffect,
    /// It is not, or the handler could not say: the job ends, rolled back
    /// where the handler could.
    Ended {
        /// The job's result.
        result: JobResult,
        /// Why.
        status: Status,
    },
}

/// Asks the handler whether an interrupted step took effect and, unless it
/// did, rolls back where supported, then cleans up. Only a plain "yes"
/// continues the job: a fault of `is-installed` (a trap, a time or memory
/// limit) or its failure status is no answer, and the job's status says
/// which it was instead of taking it for "not installed".
async fn settle_interrupted(
    handler: &dyn UpdateHandler,
    scope: CallScope,
    ctx: &StepContext,
) -> Interrupted {
    let unanswered = match handler.is_installed(scope.clone(), ctx).await {
        Ok(Ok(true)) => return Interrupted::TookEffect,
        Ok(Ok(false)) => None,
        Ok(Err(status)) => Some(Status {
            message: format!(
                "{INTERRUPTED}, and is-installed could not tell whether it took effect: {}",
                status.message
            ),
            ..status
        }),
        Err(fault) => {
            tracing::error!(
                handler = handler.name(),
                job = ctx.job_id,
                "is-installed after the interruption: {fault:#}"
            );
            Some(workflow::host_status(
                host_codes::HANDLER_FAULT,
                format!(
                    "{INTERRUPTED}, and is-installed could not tell whether it took effect: {fault:#}"
                ),
            ))
        }
    };
    let rolled_back = handler.description().supports_rollback
        && matches!(
            handler.run_phase(Phase::Rollback, scope.clone(), ctx).await,
            Ok(Outcome::Success | Outcome::Skipped(_))
        );
    let _ = handler.run_phase(Phase::Cleanup, scope, ctx).await;
    Interrupted::Ended {
        result: if rolled_back {
            JobResult::FailedRolledBack
        } else {
            JobResult::FailedInconsistent
        },
        status: unanswered
            .unwrap_or_else(|| workflow::host_status(host_codes::JOURNAL, INTERRUPTED.into())),
    }
}

/// The status message of a job the agent stopped in while a step changed
/// the system.
const INTERRUPTED: &str = "the agent stopped while the step was changing the system";

/// The handler serving `update_type`, canonical name or alias.
fn serving<'a>(
    handlers: &'a [Arc<dyn UpdateHandler>],
    update_type: &str,
) -> Option<&'a Arc<dyn UpdateHandler>> {
    handlers.iter().find(|h| h.serves(update_type))
}

/// The handler that may continue `step` of a job: the one serving its
/// update type, with the code the job pinned when it started. A step the
/// deployment does not have fails with no status.
fn pinned_handler(
    handlers: &[Arc<dyn UpdateHandler>],
    record: &JobRecord,
    step: usize,
) -> Result<Arc<dyn UpdateHandler>, Option<Status>> {
    let update_type = &record.desired.steps.get(step).ok_or(None)?.update_type;
    let Some(handler) = serving(handlers, update_type).cloned() else {
        return Err(Some(workflow::host_status(
            host_codes::NO_HANDLER,
            format!("no handler serves {update_type}"),
        )));
    };
    match handler_changed(record, step, handler.as_ref()) {
        Some(changed) => Err(Some(workflow::host_status(
            host_codes::HANDLER_CHANGED,
            changed,
        ))),
        None => Ok(handler),
    }
}

/// Why `handler` may not continue `step`: its code is not the one the job
/// pinned when it started.
fn handler_changed(record: &JobRecord, step: usize, handler: &dyn UpdateHandler) -> Option<String> {
    let pinned = record.handler_sha256.get(step)?;
    let now = handler.fingerprint();
    (pinned != now).then(|| {
        format!(
            "handler {} changed while the job was in progress (pinned sha256 {pinned}, now {now}); not continuing with another handler",
            handler.name()
        )
    })
}

/// The scope and context of a direct call for `step` (payloads as fetched).
fn step_call(
    shared: &Shared,
    record: &JobRecord,
    step: usize,
    handler: &dyn UpdateHandler,
) -> Result<(CallScope, StepContext)> {
    let job_dir = shared.journal.job_dir(&record.job_id)?;
    let request = step_request(record, step, &job_dir)?;
    let criteria = record.desired.steps[step].installed_criteria.clone();
    Ok(workflow::resumed_call(handler, &request, criteria))
}

/// Runs accepted jobs one at a time.
async fn worker(shared: Arc<Shared>, mut jobs: mpsc::UnboundedReceiver<JobRecord>) {
    while let Some(record) = jobs.recv().await {
        let job_id = record.job_id.clone();
        if let Err(e) = execute(&shared, record).await {
            tracing::error!(job = job_id, "job stopped: {e:#}");
        }
        *lock(&shared.current) = None;
        report_inventory(&shared, &format!("inventory:{job_id}")).await;
    }
}

/// Refreshes the inventory and, when it changed, queues the reported state
/// under the outbox key `key`.
async fn report_inventory(shared: &Shared, key: &str) {
    if refresh_inventory(shared).await
        && let Ok(shadow) = shared.journal.shadow()
        && let Some(reported) = &shadow.reported
    {
        enqueue(shared, key, reported_payload(shared, reported));
    }
}

/// Runs a job from its first unfinished step to a terminal state.
async fn execute(shared: &Arc<Shared>, mut record: JobRecord) -> Result<()> {
    if lock(&shared.cancelled).remove(&record.job_id) {
        return finish(shared, record, JobResult::Cancelled, None).await;
    }
    let cancel = CancelFlag::default();
    *lock(&shared.current) = Some((record.job_id.clone(), cancel.clone()));
    report_progress(shared, &record, AgentState::Validating)?;
    shared
        .journal
        .transition(&mut record, JobPhase::Validating)?;
    let pins = match pin_handlers(&shared.handlers, &record) {
        Ok(pins) => pins,
        Err(status) => return finish(shared, record, JobResult::Failed, Some(status)).await,
    };
    if !record.handler_sha256.is_empty() && record.handler_sha256 != pins {
        // Nothing was changed yet in this job: run it with the new handler.
        tracing::info!(
            job = record.job_id,
            "a handler changed since the job started; re-pinned before any change"
        );
    }
    record.handler_sha256 = pins;
    let (record, end) = run_steps(&job_env(shared), record, Mode::Fresh, &cancel).await?;
    conclude(shared, record, end).await
}

/// The code each step of `record` runs with: the fingerprint of the
/// handler serving its update type; fails when one has none.
fn pin_handlers(
    handlers: &[Arc<dyn UpdateHandler>],
    record: &JobRecord,
) -> Result<Vec<String>, Status> {
    record
        .desired
        .steps
        .iter()
        .map(|spec| {
            serving(handlers, &spec.update_type)
                .map(|h| h.fingerprint().to_string())
                .ok_or_else(|| {
                    workflow::host_status(
                        host_codes::NO_HANDLER,
                        format!(
                            "no loaded handler serves update type {:?}",
                            spec.update_type
                        ),
                    )
                })
        })
        .collect()
}

/// What the steps of a job need from the agent around them: state reports
/// and downloads (a test gives its own).
#[async_trait::async_trait]
trait JobHost: Send + Sync {
    /// Reports the agent's state for a running job.
    fn report_state(&self, record: &JobRecord, state: AgentState) -> Result<()>;

    /// Where the progress of `job`'s handler calls goes.
    fn progress(&self, job: &str) -> Option<crate::runtime::ProgressSink>;

    /// Fetches the manifest of `step` when the deployment gives it by URL.
    async fn fetch_manifest(
        &self,
        record: &JobRecord,
        step: usize,
        job_dir: &std::path::Path,
    ) -> Result<(), Status>;

    /// Fetches the payloads of `step` named by its plan into the job folder.
    async fn fetch_payloads(
        &self,
        record: &JobRecord,
        step: usize,
        job_dir: &std::path::Path,
        names: &[String],
    ) -> Result<(), Status>;
}

#[async_trait::async_trait]
impl JobHost for Arc<Shared> {
    fn report_state(&self, record: &JobRecord, state: AgentState) -> Result<()> {
        report_progress(self, record, state)
    }

    fn progress(&self, job: &str) -> Option<crate::runtime::ProgressSink> {
        Some(progress_reporter(self, job))
    }

    async fn fetch_manifest(
        &self,
        record: &JobRecord,
        step: usize,
        job_dir: &std::path::Path,
    ) -> Result<(), Status> {
        fetch_manifest(self, record, step, job_dir)
            .await
            .map_err(|e| download_status(&e))
    }

    async fn fetch_payloads(
        &self,
        record: &JobRecord,
        step: usize,
        job_dir: &std::path::Path,
        names: &[String],
    ) -> Result<(), Status> {
        fetch_payloads(self, record, step, job_dir, names)
            .await
            .map_err(|e| download_status(&e))
    }
}

/// What the steps of a job run with.
struct JobEnv<'a> {
    journal: &'a Journal,
    handlers: &'a [Arc<dyn UpdateHandler>],
    host: &'a dyn JobHost,
}

/// The agent's [`JobEnv`].
fn job_env(shared: &Arc<Shared>) -> JobEnv<'_> {
    JobEnv {
        journal: &shared.journal,
        handlers: &shared.handlers,
        host: shared,
    }
}

/// Which steps [`run_steps`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// From the first step without a result, each through its whole
    /// lifecycle.
    Fresh,
    /// The steps waiting for a reboot or restart: verify, commit, cleanup.
    Resumed,
}

/// How the steps of a job ended.
#[derive(Debug, Clone, PartialEq)]
enum StepsEnd {
    /// The job ends with `result`.
    Finished {
        /// The job's result.
        result: JobResult,
        /// The host's status, when the host ended it.
        status: Option<Status>,
        /// A rollback restored the previous version for the next boot.
        reboot_after_rollback: bool,
    },
    /// Steps wait for a reboot or agent restart
    /// ([`StepResult::RebootRequired`] or [`StepResult::RestartAgent`]).
    Pending(StepResult),
}

impl StepsEnd {
    /// The job ends with `result` (and the host's `status`), without a
    /// reboot.
    fn ended(result: JobResult, status: Option<Status>) -> Self {
        StepsEnd::Finished {
            result,
            status,
            reboot_after_rollback: false,
        }
    }
}

/// Runs the steps of a job that `mode` names, journaling each phase that
/// changes the system before it runs and each step's result after it, the
/// same for fresh and resumed jobs.
async fn run_steps(
    env: &JobEnv<'_>,
    mut record: JobRecord,
    mode: Mode,
    cancel: &CancelFlag,
) -> Result<(JobRecord, StepsEnd)> {
    let job_dir = env.journal.job_dir(&record.job_id)?;
    let steps: Vec<usize> = match mode {
        Mode::Fresh => (record.steps.len()..record.desired.steps.len()).collect(),
        Mode::Resumed => (0..record.steps.len())
            .filter(|&i| record.steps[i].result.pending())
            .collect(),
    };
    let mut pending = None;
    for step in steps {
        let handler = match pinned_handler(env.handlers, &record, step) {
            Ok(handler) => handler,
            Err(status) => {
                let end = StepsEnd::ended(JobResult::FailedInconsistent, status);
                return Ok((record, end));
            }
        };
        if mode == Mode::Fresh
            && let Err(status) = env.host.fetch_manifest(&record, step, &job_dir).await
        {
            return Ok((record, StepsEnd::ended(JobResult::Failed, Some(status))));
        }
        let mut request = step_request(&record, step, &job_dir)?;
        request.cancel = cancel.clone();
        let (next, report) = run_one(env, record, step, handler.as_ref(), request, mode).await?;
        record = next;
        let update_type = record.desired.steps[step].update_type.clone();
        let (mut outcome, terminal) = classify(&update_type, &report.result, &record.steps[..step]);
        if matches!(
            report.result,
            StepResult::RebootRequired { .. } | StepResult::RestartAgent
        ) {
            // Verify and commit after the reboot or restart need the plan's
            // criteria; they count as installed only once committed.
            outcome.installed_criteria = report.planned_criteria.clone();
            pending = Some(workflow::merge(pending, report.result.clone()));
        }
        match record.steps.get_mut(step) {
            Some(line) => *line = outcome,
            None => record.steps.push(outcome),
        }
        if let Some(result) = terminal {
            let end = StepsEnd::Finished {
                result,
                status: None,
                reboot_after_rollback: report.reboot_after_rollback,
            };
            return Ok((record, end));
        }
        env.journal.write(&record)?;
    }
    let end = match pending {
        Some(pending) => StepsEnd::Pending(pending),
        None if record
            .steps
            .iter()
            .all(|s| s.result == StepState::AlreadyInstalled) =>
        {
            StepsEnd::ended(JobResult::AlreadyInstalled, None)
        }
        None => StepsEnd::ended(JobResult::Succeeded, None),
    };
    Ok((record, end))
}

/// Runs `step` through `handler`: its whole lifecycle (fresh) or verify and
/// commit (resumed). Before each phase the agent reports its state and,
/// for a phase that changes the system, journals it; the record comes back
/// with those transitions.
async fn run_one(
    env: &JobEnv<'_>,
    record: JobRecord,
    step: usize,
    handler: &dyn UpdateHandler,
    request: StepRequest,
    mode: Mode,
) -> Result<(JobRecord, workflow::StepReport)> {
    let snapshot = Mutex::new(record.clone());
    let before = |phase: Phase| -> Result<()> {
        if let Some(state) = agent_state_of(phase) {
            env.host.report_state(&record, state)?;
        }
        if phase.changes_system() {
            let stage = phase.as_str().to_string();
            let step = step as u32;
            env.journal
                .transition(&mut lock(&snapshot), JobPhase::Installing { step, stage })?;
        }
        Ok(())
    };
    let fetch = |names: Vec<String>| -> futures_util::future::BoxFuture<'_, Result<(), Status>> {
        let (record, job_dir, snapshot) = (&record, &request.job_dir, &snapshot);
        Box::pin(async move {
            let journaled = env
                .journal
                .transition(&mut lock(snapshot), JobPhase::Downloading);
            journaled.map_err(|e| {
                workflow::host_status(
                    host_codes::JOURNAL,
                    format!("cannot journal the download: {e:#}"),
                )
            })?;
            env.host
                .report_state(record, AgentState::Downloading)
                .map_err(|e| workflow::host_status(host_codes::JOURNAL, format!("{e:#}")))?;
            env.host.fetch_payloads(record, step, job_dir, &names).await
        })
    };
    let report = match mode {
        Mode::Fresh => {
            let progress = env.host.progress(&record.job_id);
            workflow::run_step_with(handler, request.clone(), progress, &before, Some(&fetch))
                .await?
        }
        Mode::Resumed => {
            let criteria = record.steps[step].installed_criteria.clone();
            workflow::continue_step(handler, request.clone(), criteria, &before).await?
        }
    };
    let record = snapshot
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    Ok((record, report))
}

/// Acts on how the steps of a job ended: ends it, or waits for the reboot
/// or restart its steps asked for.
async fn conclude(shared: &Shared, record: JobRecord, end: StepsEnd) -> Result<()> {
    match end {
        StepsEnd::Finished {
            result,
            status,
            reboot_after_rollback,
        } => finish_then_reboot(shared, record, result, status, reboot_after_rollback).await,
        StepsEnd::Pending(StepResult::RebootRequired { deferred }) => {
            await_reboot(shared, record, deferred)
        }
        StepsEnd::Pending(_) => restart_agent(shared, record),
    }
}

/// Journals the wait for a reboot (with the current boot id) and, unless
/// deferred, runs the reboot command.
fn await_reboot(shared: &Shared, mut record: JobRecord, deferred: bool) -> Result<()> {
    let boot_id = journal::boot_id()?;
    shared
        .journal
        .transition(&mut record, JobPhase::AwaitingReboot { boot_id, deferred })?;
    report_progress(shared, &record, AgentState::RebootPending)?;
    if deferred {
        tracing::info!(
            job = record.job_id,
            "reboot deferred: waiting for the device to reboot"
        );
        return Ok(());
    }
    reboot_now(shared, &record.job_id)
}

/// Ends the job as [`finish`] does; then, when a rollback restored the
/// previous version for the next boot only, reboots into it.
async fn finish_then_reboot(
    shared: &Shared,
    record: JobRecord,
    result: JobResult,
    status: Option<Status>,
    reboot: bool,
) -> Result<()> {
    let job = record.job_id.clone();
    finish(shared, record, result, status).await?;
    if reboot {
        tracing::warn!(job, "the rollback takes effect after a reboot");
        reboot_now(shared, &job)?;
    }
    Ok(())
}

/// Runs the device's reboot command.
fn reboot_now(shared: &Shared, job: &str) -> Result<()> {
    let command = &shared.config.device.reboot_command;
    let (program, args) = command
        .split_first()
        .context("[device] reboot_command is empty")?;
    tracing::info!(job, "rebooting: {}", command.join(" "));
    let status = std::process::Command::new(program).args(args).status();
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => {
            anyhow::bail!("the reboot command {command:?} failed ({s}); the job waits for a reboot")
        }
        Err(e) => anyhow::bail!(
            "cannot run the reboot command {command:?}: {e}; the job waits for a reboot"
        ),
    }
}

/// Journals the wait for the agent's restart, then replaces this process
/// with a fresh start of the same command line.
fn restart_agent(shared: &Shared, mut record: JobRecord) -> Result<()> {
    shared
        .journal
        .transition(&mut record, JobPhase::AwaitingRestart)?;
    tracing::info!(
        job = record.job_id,
        "restarting the agent as the update asked"
    );
    let mut argv = std::env::args_os();
    let program = argv.next().context("no argv[0] to restart with")?;
    let error =
        std::os::unix::process::CommandExt::exec(std::process::Command::new(&program).args(argv));
    anyhow::bail!(
        "cannot restart the agent ({}): {error}",
        program.to_string_lossy()
    )
}

/// Verifies and commits the steps that waited for a reboot or restart,
/// then ends the job.
async fn continue_pending(shared: &Arc<Shared>, mut record: JobRecord) -> Result<()> {
    shared
        .journal
        .transition(&mut record, JobPhase::Verifying)?;
    report_progress(shared, &record, AgentState::Verifying)?;
    let cancel = CancelFlag::default();
    let (record, end) = run_steps(&job_env(shared), record, Mode::Resumed, &cancel).await?;
    conclude(shared, record, end).await
}

/// Maps a step's result to its report line and, when the job ends there,
/// the job's result.
fn classify(
    update_type: &str,
    result: &StepResult,
    earlier: &[StepOutcome],
) -> (StepOutcome, Option<JobResult>) {
    let changed_before = earlier.iter().any(|s| s.result == StepState::Installed);
    match result {
        StepResult::Installed { criteria } => (
            step_outcome(update_type, StepState::Installed, Some(criteria.clone())),
            None,
        ),
        StepResult::AlreadyInstalled { criteria } => (
            step_outcome(
                update_type,
                StepState::AlreadyInstalled,
                Some(criteria.clone()),
            ),
            None,
        ),
        StepResult::Failed {
            phase,
            result_code,
            extended_code,
            message,
            rolled_back,
        } => {
            let job = match (
                changed_before,
                *rolled_back,
                phase.leaves_system_untouched(),
            ) {
                (false, _, true) => JobResult::Failed,
                (false, true, false) => JobResult::FailedRolledBack,
                _ => JobResult::FailedInconsistent,
            };
            let line = StepOutcome {
                update_type: update_type.into(),
                result: StepState::Failed(*phase),
                result_code: *result_code,
                extended_code: *extended_code,
                message: message.clone(),
                installed_criteria: None,
            };
            (line, Some(job))
        }
        StepResult::Cancelled => (
            step_outcome(update_type, StepState::Cancelled, None),
            Some(JobResult::Cancelled),
        ),
        StepResult::RebootRequired { .. } => (
            step_outcome(update_type, StepState::PendingReboot, None),
            None,
        ),
        StepResult::RestartAgent => (
            step_outcome(update_type, StepState::PendingRestart, None),
            None,
        ),
    }
}

/// The report line of a step that did not fail.
fn step_outcome(update_type: &str, result: StepState, criteria: Option<String>) -> StepOutcome {
    StepOutcome {
        update_type: update_type.into(),
        result,
        result_code: 0,
        extended_code: 0,
        message: String::new(),
        installed_criteria: criteria,
    }
}

/// Largest manifest fetched by URL.
const MAX_MANIFEST: u64 = 1 << 20;

fn manifest_path(job_dir: &std::path::Path, step: usize) -> PathBuf {
    job_dir.join("manifests").join(format!("{step}.json"))
}

/// Fetches the manifest of `step` when the deployment gives it by URL
/// (before validate: the handler needs it to plan).
async fn fetch_manifest(
    shared: &Shared,
    record: &JobRecord,
    step: usize,
    job_dir: &std::path::Path,
) -> Result<(), download::DownloadError> {
    if let Some(ManifestSource::Remote { url, sha256 }) =
        record.desired.steps[step].manifest_source()
    {
        shared
            .downloader
            .fetch_document(url, sha256, MAX_MANIFEST, &manifest_path(job_dir, step))
            .await?;
    }
    Ok(())
}

/// Fetches the payload files of `step` named by its plan into the job
/// folder, each verified (size and sha256) as it comes in.
async fn fetch_payloads(
    shared: &Arc<Shared>,
    record: &JobRecord,
    step: usize,
    job_dir: &std::path::Path,
    names: &[String],
) -> Result<(), download::DownloadError> {
    let sink = progress_reporter(shared, &record.job_id);
    let files = record.desired.steps[step]
        .files
        .iter()
        .filter(|f| names.contains(&f.name));
    for file in files {
        let report = |done: u64, total: u64| {
            sink(crate::runtime::ProgressEvent {
                handler: "host".into(),
                job_id: record.job_id.clone(),
                step: step as u32,
                phase: Phase::Download,
                done,
                total,
            })
        };
        shared
            .downloader
            .fetch_with_progress(
                file,
                &payload_path(job_dir, step, &file.name),
                None,
                &report,
            )
            .await?;
    }
    Ok(())
}

/// The host status of a failed download.
fn download_status(e: &download::DownloadError) -> Status {
    let code = match e.kind {
        download::FailureKind::UrlExpired | download::FailureKind::Unauthorized => {
            host_codes::URL_EXPIRED
        }
        download::FailureKind::DiskFull => host_codes::DISK_FULL,
        _ => host_codes::DOWNLOAD,
    };
    let kind = serde_json::to_value(e.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    workflow::host_status(code, format!("{kind}: {}", e.message))
}

/// The agent state a handler phase stands for, as reported.
fn agent_state_of(phase: Phase) -> Option<AgentState> {
    match phase {
        Phase::Validate | Phase::IsInstalled => Some(AgentState::Validating),
        Phase::Download => Some(AgentState::Downloading),
        Phase::Backup | Phase::Install | Phase::Apply => Some(AgentState::Installing),
        Phase::Verify | Phase::Commit => Some(AgentState::Verifying),
        Phase::Rollback => Some(AgentState::RollingBack),
        Phase::Describe | Phase::Cleanup | Phase::Inventory => None,
    }
}

fn payload_path(job_dir: &std::path::Path, step: usize, name: &str) -> PathBuf {
    job_dir.join("payloads").join(step.to_string()).join(name)
}

/// The workflow request of `step`.
fn step_request(record: &JobRecord, step: usize, job_dir: &std::path::Path) -> Result<StepRequest> {
    let spec = &record.desired.steps[step];
    let manifest = match spec.manifest_source() {
        Some(ManifestSource::Inline(value)) => value.to_string(),
        Some(ManifestSource::Remote { .. }) => {
            let path = manifest_path(job_dir, step);
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("step {step}: manifest not fetched"))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .filter(serde_json::Value::is_object)
                .with_context(|| {
                    format!("step {step}: the manifest at its URL is not a JSON object")
                })?;
            text
        }
        None => anyhow::bail!("step {step}: no manifest"),
    };
    Ok(StepRequest {
        job_id: record.job_id.clone(),
        step: step as u32,
        update_type: spec.update_type.to_string(),
        manifest,
        payloads: spec
            .files
            .iter()
            .map(|f| {
                let declared = PayloadFile {
                    name: f.name.clone(),
                    size: f.size,
                    sha256: f.sha256.clone(),
                    verified: None,
                };
                (declared, payload_path(job_dir, step, &f.name))
            })
            .collect(),
        job_dir: job_dir.to_path_buf(),
        cancel: CancelFlag::default(),
    })
}

/// Reports the agent's state for a running job.
fn report_progress(shared: &Shared, record: &JobRecord, state: AgentState) -> Result<()> {
    if state == AgentState::RebootPending {
        // The device is about to reboot: this one is stored and queued
        // durably.
        *lock(&shared.live) = Live::default();
        let shadow = shared.journal.update_shadow(|s| {
            let mut reported = s.reported.clone().unwrap_or_else(idle_state);
            reported.agent.state = state;
            reported.job_id = Some(record.job_id.clone());
            s.reported = Some(reported);
        })?;
        if let Some(reported) = &shadow.reported {
            enqueue(
                shared,
                &format!("state:{}:{state:?}", record.job_id),
                reported_payload(shared, reported),
            );
        }
        return Ok(());
    }
    if lock(&shared.live).state == Some(state) {
        return Ok(());
    }
    let report = live_report(shared, |live| {
        live.job_id = Some(record.job_id.clone());
        live.state = Some(state);
        // Progress belongs to the phase that reported it.
        live.progress = None;
    });
    lock(&shared.outbox).push_volatile(
        &format!("state:{}:{state:?}", record.job_id),
        &shared.cloud.topics().update,
        report,
        std::time::Instant::now() + STATE_REPORT_DELAY,
    );
    shared.outbox_changed.notify_one();
    Ok(())
}

/// Ends a job: journals the result, updates the reported state, queues the
/// report and the acknowledgement, then marks the job reported.
async fn finish(
    shared: &Shared,
    mut record: JobRecord,
    result: JobResult,
    status: Option<Status>,
) -> Result<()> {
    if !matches!(record.phase, JobPhase::Done { .. }) {
        shared
            .journal
            .transition(&mut record, JobPhase::Done { result })?;
    }
    let failing = record.steps.iter().find(|s| s.result_code != 0);
    let (code, extended, message) = match (&status, failing) {
        (Some(s), _) => (s.result_code, s.extended_code.pack(), s.message.clone()),
        (None, Some(step)) => (step.result_code, step.extended_code, step.message.clone()),
        (None, None) => (0, 0, String::new()),
    };
    // Payloads go before the cloud hears of the end (a crash before the
    // report repeats this on restart).
    if let Err(e) = shared
        .journal
        .retire(&record.job_id, shared.config.device.retained_jobs)
    {
        tracing::warn!(
            job = record.job_id,
            "cannot clean up the job's files: {e:#}"
        );
    }
    *lock(&shared.live) = Live::default();
    let ack_status = result.ack_status();
    // The terminal report carries what the handlers manage after the job.
    let inventory = collect_inventory(shared).await;
    let shadow = shared.journal.update_shadow(|s| {
        if ack_status == crate::shadow::AckStatus::Success {
            s.running_version = Some(record.desired.version.clone());
        }
        let mut reported = s.reported.clone().unwrap_or_else(idle_state);
        for (update_type, criteria) in committed_criteria(shared, &record.steps) {
            reported.installed.insert(update_type, criteria);
        }
        reported.inventory = inventory;
        reported.agent.state = AgentState::Idle;
        reported.job_id = Some(record.job_id.clone());
        reported.progress = None;
        reported.last_result = Some(LastResult {
            job_id: record.job_id.clone(),
            status: ack_status,
            result,
            result_code: code,
            extended_code: extended,
            message: message.clone(),
            steps: record.steps.clone(),
            local: record.local,
        });
        s.reported = Some(reported);
    })?;
    let version = shadow.running_version.clone().unwrap_or_default();
    let ack = Ack {
        job_id: record.job_id.clone(),
        status: ack_status,
        version,
    };
    let ack = ack_payload(shared, &ack)?;
    // The result and the ack go out only once the journal says they are
    // queued: a crash in between sends them once, after the restart.
    lock(&shared.outbox).hold();
    if let Some(reported) = &shadow.reported {
        enqueue(
            shared,
            &format!("result:{}", record.job_id),
            reported_payload(shared, reported),
        );
    }
    if !record.local {
        // A local job answers no desired deployment of the cloud: reported
        // (above), not acknowledged.
        enqueue(shared, &format!("ack:{}", record.job_id), ack);
    }
    record.reported = true;
    let journaled = shared.journal.write(&record);
    lock(&shared.outbox).release();
    shared.outbox_changed.notify_one();
    journaled?;
    match failure_context(&record.steps) {
        Some(step) if message.is_empty() => {
            tracing::warn!(job = record.job_id, ?result, "job finished: {step}")
        }
        Some(step) => tracing::warn!(
            job = record.job_id,
            ?result,
            "job finished: {step}: {message}"
        ),
        None if message.is_empty() => tracing::info!(job = record.job_id, ?result, "job finished"),
        None => tracing::warn!(job = record.job_id, ?result, "job finished: {message}"),
    }
    Ok(())
}

/// Which step failed and in which phase, for the log line of a job that
/// ends: `step 0 (otabox/file:1) failed in download`.
fn failure_context(steps: &[StepOutcome]) -> Option<String> {
    steps
        .iter()
        .enumerate()
        .find(|(_, s)| matches!(s.result, StepState::Failed(_)) || s.result_code != 0)
        .map(|(i, s)| format!("step {i} ({}) {}", s.update_type, s.result))
}

/// The installed criteria of the steps that committed (installed, or found
/// already installed), keyed by the canonical update type of the handler
/// that served each (the first of its manifest's `update_types`, as the
/// inventory is): a failed, pending or rolled-back step changes nothing.
fn committed_criteria(shared: &Shared, steps: &[StepOutcome]) -> Vec<(String, String)> {
    steps
        .iter()
        .filter(|s| s.result.committed())
        .filter_map(|s| {
            let criteria = s.installed_criteria.clone()?;
            Some((canonical_update_type(shared, &s.update_type), criteria))
        })
        .collect()
}

/// The update type a report keys `update_type` under: the first update type
/// of the handler serving it (aliases such as `microsoft/apt:1` map to
/// `otabox/apt:1`), or itself when no handler serves it.
fn canonical_update_type(shared: &Shared, update_type: &str) -> String {
    serving(&shared.handlers, update_type)
        .and_then(|h| h.update_types().into_iter().next())
        .unwrap_or_else(|| update_type.to_string())
}
