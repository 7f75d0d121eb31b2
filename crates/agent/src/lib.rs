//! The device agent (`otabox run`): the MQTT session with the device
//! shadow, the journal, and a worker that runs jobs one at a time.
//!
//! A delta is acknowledged to the broker only after it is journaled (or
//! found stale, duplicate or malformed), so a crash in between makes the
//! broker deliver it again and the journal makes that redelivery harmless.
//! Every report goes through the durable [`Outbox`] and is published in
//! order, one at a time, each removed only when the broker acknowledged it.
//!
//! The handlers are loaded from the handler directories at start and again
//! on SIGHUP, between jobs: a reload waits for the running job to end, and
//! each job runs with the set it pinned when it started.
//!
//! Beside the agent, what the device's tools share with it: [`config`]
//! (`device.toml`), [`download`] (payload fetching), [`local`] (the agent's
//! lock, inbox and state files), [`install`] (a local deployment) and
//! [`status`] (what the agent is doing).

pub mod config;
pub mod download;
pub mod install;
pub mod local;
pub mod status;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Result;
use rumqttc::AsyncClient;
use tokio::sync::{Notify, mpsc};

use crate::config::DeviceConfig;
use otabox_cloud::Link;
use otabox_cloud::mqtt::{self, Backoff};
use otabox_core::journal::Journal;
use otabox_core::model::UpdateHandler;
use otabox_core::outbox::Outbox;
use otabox_core::trust::RootStore;
use otabox_runtime::{CancelFlag, Runtime};

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
use report::{Live, unique_key};
use session::session;

/// A loaded handler set; each job pins the one current when it starts.
type Handlers = Arc<[Arc<dyn UpdateHandler>]>;

/// The agent's version, reported in its state.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// State shared by the session loop and the job worker.
struct Shared {
    config: DeviceConfig,
    /// The cloud layout, the device's topics and the report size.
    cloud: Link,
    journal: Journal,
    /// The loaded handlers (replaced by a reload, see [`Shared::handlers`]).
    handlers: Mutex<Handlers>,
    /// The runtime that loads them.
    runtime: Runtime,
    /// Held while a job runs and while the handlers reload, so a reload
    /// happens between jobs.
    between_jobs: tokio::sync::Mutex<()>,
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

impl Shared {
    /// The current handler set (a job keeps the one it started with).
    fn handlers(&self) -> Handlers {
        lock(&self.handlers).clone()
    }
}

/// Runs the agent until SIGINT or SIGTERM; SIGHUP reloads the handlers.
pub async fn run(config: DeviceConfig) -> Result<()> {
    // First, so that a SIGHUP while starting does not end the agent.
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    let device_id = config.device_id()?.to_string();
    let cloud = Link::new(
        config.mqtt.layout.cloud(),
        &device_id,
        config.mqtt.max_report_bytes,
    )?;
    let (_state_lock, wake) = inbox::own_state(&config.paths.state)?;
    let journal = Journal::open(&config.paths.state)?;
    let runtime = Runtime::new(Some(config.cache_dir()))?;
    let (handlers, compiled) = load_handlers(&runtime, &config).await?;
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
        handlers: Mutex::new(handlers),
        runtime,
        between_jobs: tokio::sync::Mutex::new(()),
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
    let resumed = resume_jobs(&shared, &jobs_tx).await?;
    if let Err(e) = shared.journal.prune(shared.config.device.retained_jobs) {
        tracing::warn!("cannot clean up finished jobs: {e:#}");
    }
    if resumed > 0 {
        // A job completed after a restart may have changed what handlers
        // manage (with none, the inventory just taken stands).
        shared
            .reporter()
            .report_inventory("inventory:resumed")
            .await;
    }
    tokio::spawn(inbox::watch(shared.clone(), jobs_tx.clone(), wake));
    tokio::spawn(worker(shared.clone(), jobs_rx));
    tokio::spawn(reload_on_hangup(shared.clone(), hangup));
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    eventloop.set_network_options(mqtt::network_options());
    tracing::info!(
        device = device_id,
        "agent {AGENT_VERSION} started; {} handler(s), {} compiled at start (the others precompiled)",
        shared.handlers().len(),
        compiled
    );
    tokio::select! {
        result = session(shared, client, eventloop, backoff, jobs_tx) => result,
        _ = shutdown_signal() => {
            tracing::info!("stopping on signal");
            Ok(())
        }
    }
}

/// Loads the handlers of the configured directories; fails when one
/// refused its device config.
async fn load_handlers(runtime: &Runtime, config: &DeviceConfig) -> Result<(Handlers, usize)> {
    let dirs = config.paths.handlers.as_slice();
    let set = runtime.load_dirs(dirs, &config.handlers).await?;
    for refused in &set.refused {
        tracing::error!("handler {} refused: {:#}", refused.name, refused.error);
    }
    set.require_valid_configs()?;
    let compiled = set.handlers.iter().filter(|h| h.cache.compiled()).count();
    let handlers = set
        .handlers
        .into_iter()
        .map(|h| h as Arc<dyn UpdateHandler>)
        .collect();
    Ok((handlers, compiled))
}

/// Reloads the handlers on each SIGHUP once no job runs; a reload that
/// fails keeps the current handlers.
async fn reload_on_hangup(shared: Arc<Shared>, mut hangup: tokio::signal::unix::Signal) {
    while hangup.recv().await.is_some() {
        let _between = shared.between_jobs.lock().await;
        match load_handlers(&shared.runtime, &shared.config).await {
            Ok((handlers, _)) => {
                let names: Vec<&str> = handlers.iter().map(|h| h.name()).collect();
                tracing::info!(
                    "handlers reloaded on SIGHUP: {} handler(s) ({})",
                    names.len(),
                    names.join(", ")
                );
                *lock(&shared.handlers) = handlers.clone();
                release_startup_memory();
                shared
                    .reporter()
                    .report_inventory(&unique_key("inventory:reload"))
                    .await;
            }
            Err(e) => tracing::error!("handlers not reloaded, the current ones stay: {e:#}"),
        }
    }
}

/// Hands the heap freed after loading (component bytes, cache files,
/// compile scratch) back to the system, so the idle agent stays small (at
/// start and after a reload).
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
