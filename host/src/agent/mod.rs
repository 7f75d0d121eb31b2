//! The device agent (`otabox run`): the MQTT session with the device
//! shadow, the journal, and a worker that runs jobs one at a time.
//!
//! A delta is acknowledged to the broker only after it is journaled (or
//! found stale, duplicate or malformed), so a crash in between makes the
//! broker deliver it again and the journal makes that redelivery harmless.
//! Every report goes through the durable [`Outbox`] and is published in
//! order, one at a time, each removed only when the broker acknowledged it.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Result;
use rumqttc::AsyncClient;
use tokio::sync::{Notify, mpsc};

use crate::cloud::Link;
use crate::config::DeviceConfig;
use crate::journal::Journal;
use crate::model::UpdateHandler;
use crate::mqtt::{self, Backoff};
use crate::outbox::Outbox;
use crate::runtime::{CacheUse, CancelFlag, Runtime};
use crate::trust::RootStore;

mod inbox;
mod intake;
#[cfg(test)]
mod job_tests;
mod jobs;
mod notify;
mod recovery;
mod report;
mod session;
mod staging;

use jobs::worker;
use recovery::resume_jobs;
use report::Live;
use session::session;

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
    let compiled = handlers
        .handlers
        .iter()
        .filter(|h| h.cache != CacheUse::Hit)
        .count();
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
    shared.reporter().refresh_inventory().await;
    shared.reporter().announce()?;
    resume_jobs(&shared, &jobs_tx).await?;
    if let Err(e) = shared.journal.prune(shared.config.device.retained_jobs) {
        tracing::warn!("cannot clean up finished jobs: {e:#}");
    }
    // A job completed after a restart may have changed what handlers manage.
    shared
        .reporter()
        .report_inventory("inventory:resumed")
        .await;
    tokio::spawn(inbox::watch(shared.clone(), jobs_tx.clone(), wake));
    tokio::spawn(worker(shared.clone(), jobs_rx));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    eventloop.set_network_options(mqtt::network_options());
    tracing::info!(
        device = device_id,
        "agent {AGENT_VERSION} started; {} handler(s), {compiled} compiled at start (the others precompiled)",
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

/// Returns on SIGTERM or SIGINT (only SIGINT when SIGTERM cannot be
/// listened for).
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

/// Locks `mutex`, taking over a poisoned one (a panicked holder leaves
/// plain data, never half-written state files).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
