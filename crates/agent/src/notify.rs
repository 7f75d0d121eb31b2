//! The agent's side of systemd's service protocol (`Type=notify`, see
//! `packaging/otabox.service`): `READY=1` once the session is subscribed
//! (or, offline, once the first attempt to reach the broker failed, so the
//! start does not hang on the network), a `STATUS=` line on every change of
//! the connection, and `WATCHDOG=1` from the session loop itself: a loop
//! that hangs stops pinging and systemd restarts the agent. Without
//! `NOTIFY_SOCKET` (not under systemd) nothing is sent.

use std::time::Duration;

use sd_notify::NotifyState;
use tokio::time::{Instant, Interval, MissedTickBehavior};

/// What the session loop tells systemd.
pub(super) struct Notifier {
    /// The broker, as `host:port`, for the status line.
    endpoint: String,
    /// Subscription acknowledgements still awaited since the last ConnAck.
    awaiting: usize,
    /// `READY=1` was sent.
    ready: bool,
    /// Ping times (a quarter of `WatchdogSec`), when systemd asked for pings.
    watchdog: Option<Interval>,
}

impl Notifier {
    /// A notifier for a session with the broker at `endpoint`.
    pub(super) fn new(endpoint: String) -> Self {
        let watchdog = sd_notify::watchdog_enabled().map(|period| {
            let mut interval = tokio::time::interval((period / 4).max(Duration::from_millis(100)));
            interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
            interval
        });
        Self {
            endpoint,
            awaiting: 0,
            ready: false,
            watchdog,
        }
    }

    /// The broker accepted the connection; `subscriptions` acknowledgements
    /// are to come.
    pub(super) fn connected(&mut self, subscriptions: usize) {
        self.awaiting = subscriptions;
    }

    /// The broker answered one subscription: once all are answered the
    /// agent is ready.
    pub(super) fn subscribed(&mut self) {
        self.awaiting = self.awaiting.saturating_sub(1);
        if self.awaiting == 0 {
            self.announce(&format!("subscribed at {}", self.endpoint));
        }
    }

    /// The connection failed or dropped: the agent runs offline and retries.
    pub(super) fn offline(&mut self, error: &str) {
        self.announce(&format!(
            "cannot reach the broker at {} ({error}); retrying",
            self.endpoint
        ));
    }

    /// Sends `status`, with `READY=1` the first time.
    fn announce(&mut self, status: &str) {
        let status = NotifyState::Status(status);
        if self.ready {
            send(&[status]);
        } else {
            self.ready = true;
            send(&[NotifyState::Ready, status]);
        }
    }

    /// Waits for the next watchdog ping (forever when systemd asked for
    /// none); the session loop then calls [`Notifier::ping`].
    pub(super) async fn tick(&mut self) {
        match &mut self.watchdog {
            Some(interval) => {
                interval.tick().await;
            }
            None => std::future::pending().await,
        }
    }

    /// Tells systemd the loop is alive.
    pub(super) fn ping(&self) {
        send(&[NotifyState::Watchdog]);
    }

    /// Sleeps `delay` (the reconnect backoff, part of the loop), pinging
    /// the watchdog meanwhile.
    pub(super) async fn sleep(&mut self, delay: Duration) {
        let until = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => return,
                _ = self.tick() => self.ping(),
            }
        }
    }
}

/// Sends `states`; a failure (systemd gone) is only logged.
fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!("cannot notify systemd: {e}");
    }
}
