//! Desired and reported state per device, in SQLite.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use super::outcome::{self, Outcome};
use otabox_core::shadow::{Ack, DesiredState, Rejection};

/// The first schema (databases made before migrations existed have it
/// with `user_version` 0).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS devices (
    id          TEXT PRIMARY KEY,
    grp         TEXT,
    version     INTEGER NOT NULL DEFAULT 0,
    desired     TEXT,
    published   INTEGER NOT NULL DEFAULT 0,
    reported    TEXT,
    reported_at INTEGER
);
CREATE TABLE IF NOT EXISTS acks (
    device  TEXT NOT NULL,
    job_id  TEXT NOT NULL,
    status  TEXT NOT NULL,
    version TEXT NOT NULL,
    at      INTEGER NOT NULL,
    PRIMARY KEY (device, job_id)
);";

/// Schema changes after [`SCHEMA`], in order; `PRAGMA user_version` counts
/// those applied, so a database of any earlier release keeps working.
const MIGRATIONS: &[&str] = &[
    // 1: when the device was last heard from, its last rejected delta, the
    // backoff of republishing to a device that missed its delta, and the
    // job withdrawn after the device rejected it.
    "ALTER TABLE devices ADD COLUMN last_seen INTEGER;
     UPDATE devices SET last_seen = reported_at;
     ALTER TABLE devices ADD COLUMN rejected TEXT;
     ALTER TABLE devices ADD COLUMN republishes INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE devices ADD COLUMN republish_at INTEGER;
     ALTER TABLE devices ADD COLUMN withdrawn TEXT;",
    // 2: whether the device is connected and since when (milliseconds),
    // and the shadow version whose desired deployment the cloud refused.
    "ALTER TABLE devices ADD COLUMN online INTEGER;
     ALTER TABLE devices ADD COLUMN online_since INTEGER;
     ALTER TABLE devices ADD COLUMN cloud_refused INTEGER;",
];

/// The first republish of a missed delta goes out at once, the next after
/// this long, each later one after twice the previous wait…
const REPUBLISH_FIRST_WAIT_MS: i64 = 1_000;
/// …up to this.
const REPUBLISH_MAX_WAIT_MS: i64 = 300_000;

/// One device as the replica knows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceStatus {
    /// Device id.
    pub id: String,
    /// Group, if any.
    pub group: Option<String>,
    /// Shadow version of the desired state.
    pub version: u64,
    /// Desired deployment.
    pub desired: Option<serde_json::Value>,
    /// Last reported deployment state.
    pub reported: Option<serde_json::Value>,
    /// The acknowledgement of the desired job, if it came.
    pub ack: Option<Ack>,
    /// When the device last reported or acknowledged (seconds since the
    /// epoch).
    pub last_seen: Option<i64>,
    /// The last delta the device rejected (of any shadow version).
    pub rejected: Option<Rejection>,
    /// The job `fleet cancel` withdrew after the device rejected it (there
    /// is no desired deployment then), until the next deploy.
    pub withdrawn: Option<String>,
    /// Whether the device is connected, and since when; `None` until its
    /// presence topic (or the cloud's lifecycle event) told.
    pub presence: Option<Presence>,
    /// The shadow version whose desired deployment the cloud refused to
    /// store (it never reached the device; the reason is in `rejected`).
    pub cloud_refused: Option<u64>,
    /// What became of the desired deployment, and why.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// Whether a device is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Presence {
    /// Connected.
    pub online: bool,
    /// Since when (seconds since the epoch).
    pub since: i64,
}

impl DeviceStatus {
    /// The desired job's id.
    pub fn job(&self) -> Option<&str> {
        self.desired.as_ref()?.get("jobId")?.as_str()
    }

    /// Whether the desired state is a cancel of its job.
    pub fn is_cancel(&self) -> bool {
        self.desired.as_ref().and_then(|d| d.get("cancel")) == Some(&serde_json::Value::Bool(true))
    }

    /// The device's rejection of the current desired state, if it rejected
    /// it (final for this shadow version until the next deploy).
    pub fn rejection(&self) -> Option<&Rejection> {
        self.rejected
            .as_ref()
            .filter(|r| r.shadow_version == Some(self.version))
    }
}

/// What `cancel` did for one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    /// A cancel of the job goes to the device.
    Sent,
    /// The device had rejected the deployment, so nothing runs there: the
    /// deployment is withdrawn (no desired deployment is left, so a `get`
    /// finds none) and nothing is sent.
    Withdrawn,
    /// The desired state was a cancel already.
    Already,
}

/// The replica's database.
pub struct Store {
    db: Connection,
}

/// A delta waiting to be published.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingDelta {
    /// Device id.
    pub device: String,
    /// Shadow version.
    pub version: u64,
    /// Desired deployment JSON.
    pub desired: String,
}

fn now() -> i64 {
    now_ms() / 1000
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// How long the `n`th republish of a missed delta waits (0 for the first).
fn republish_wait_ms(n: i64) -> i64 {
    match n {
        ..=0 => 0,
        n => REPUBLISH_FIRST_WAIT_MS
            .saturating_mul(1_i64 << (n - 1).min(30))
            .min(REPUBLISH_MAX_WAIT_MS),
    }
}

/// Applies the [`MIGRATIONS`] `db` lacks, in one transaction.
fn migrate(db: &mut Connection, path: &Path) -> Result<()> {
    let known = MIGRATIONS.len() as i64;
    let applied: i64 = db.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if applied == known {
        return Ok(());
    }
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let applied: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if !(0..=known).contains(&applied) {
        bail!(
            "replica database {} has schema version {applied}; this otabox knows 0 to {known} (a newer otabox made it?)",
            path.display()
        );
    }
    for (i, migration) in MIGRATIONS.iter().enumerate().skip(applied as usize) {
        tx.execute_batch(migration)
            .with_context(|| format!("cannot migrate {} to schema {}", path.display(), i + 1))?;
    }
    tx.pragma_update(None, "user_version", known)?;
    tx.commit()?;
    Ok(())
}

impl Store {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Connection::open(path)
            .with_context(|| format!("cannot open replica database {}", path.display()))?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch(SCHEMA)
            .with_context(|| format!("cannot create the replica schema in {}", path.display()))?;
        Self::ready(db, path)
    }

    /// Opens the replica database at `path`, which must exist and be one:
    /// a mistyped path is refused (naming it and how to create one), and
    /// neither a missing nor a foreign file is changed.
    pub fn open_existing(path: &Path) -> Result<Self> {
        let missing = || {
            format!(
                "no replica database at {}: `otabox fleet --db {0} register DEVICE` or `otabox replica --db {0}` creates one",
                path.display()
            )
        };
        if !path.exists() {
            bail!(missing());
        }
        let db = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .with_context(missing)?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        let tables: i64 = db
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name IN ('devices', 'acks')",
                [],
                |row| row.get(0),
            )
            .with_context(|| format!("{} is not a replica database", path.display()))?;
        if tables != 2 {
            bail!(
                "{} is not a replica database (no devices and acks tables)",
                path.display()
            );
        }
        Self::ready(db, path)
    }

    /// Sets the journal mode and brings the schema up to date.
    fn ready(mut db: Connection, path: &Path) -> Result<Self> {
        db.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
            .with_context(|| format!("cannot set up replica database {}", path.display()))?;
        migrate(&mut db, path)?;
        Ok(Self { db })
    }

    /// Adds a device (or moves it to `group`).
    pub fn register(&self, device: &str, group: Option<&str>) -> Result<()> {
        otabox_cloud::check_device_id(device)?;
        self.db.execute(
            "INSERT INTO devices (id, grp) VALUES (?1, ?2) ON CONFLICT(id) DO UPDATE SET grp = excluded.grp",
            params![device, group],
        )?;
        Ok(())
    }

    /// Sets the desired deployment of `device` (registering it) and bumps
    /// its shadow version; returns the new version.
    pub fn deploy(&self, device: &str, desired: &DesiredState) -> Result<u64> {
        desired.validate().context("invalid deployment")?;
        otabox_cloud::check_device_id(device)?;
        let json = serde_json::to_string(desired)?;
        let version: i64 = self.db.query_row(
            "INSERT INTO devices (id, version, desired) VALUES (?1, 1, ?2)
             ON CONFLICT(id) DO UPDATE SET version = version + 1, desired = excluded.desired,
                 republishes = 0, republish_at = NULL, withdrawn = NULL
             RETURNING version",
            params![device, json],
            |row| row.get(0),
        )?;
        Ok(version as u64)
    }

    /// Deploys to every device of `group`; returns the devices.
    pub fn deploy_group(&self, group: &str, desired: &DesiredState) -> Result<Vec<String>> {
        let devices = self.group(group)?;
        if devices.is_empty() {
            bail!("group {group:?} has no devices (register them first)");
        }
        for device in &devices {
            self.deploy(device, desired)?;
        }
        Ok(devices)
    }

    /// Turns the desired job of a device (or of every device of a group)
    /// into a cancel of that job; returns what was done per device. A
    /// deployment the device rejected is withdrawn without sending anything
    /// (it never ran there, and the device would reject its cancel too).
    pub fn cancel(
        &self,
        device: Option<&str>,
        group: Option<&str>,
    ) -> Result<Vec<(String, Cancelled)>> {
        let devices = match (device, group) {
            (Some(d), _) => vec![d.to_string()],
            (None, Some(g)) => self.group(g)?,
            (None, None) => bail!("give a device or a group"),
        };
        devices
            .into_iter()
            .map(|id| {
                let done = self.cancel_one(&id)?;
                Ok((id, done))
            })
            .collect()
    }

    fn cancel_one(&self, id: &str) -> Result<Cancelled> {
        let status = self
            .status(id)?
            .with_context(|| format!("unknown device {id}"))?;
        if status.withdrawn.is_some() {
            return Ok(Cancelled::Already);
        }
        let rejected = status.rejection().is_some();
        let desired = status
            .desired
            .with_context(|| format!("{id} has no deployment to cancel"))?;
        let mut desired: DesiredState = serde_json::from_value(desired)?;
        if desired.cancel {
            return Ok(Cancelled::Already);
        }
        if rejected {
            self.withdraw(id, &desired.job_id)?;
            return Ok(Cancelled::Withdrawn);
        }
        desired.cancel = true;
        self.deploy(id, &desired)?;
        Ok(Cancelled::Sent)
    }

    /// Withdraws the desired deployment (job `job`) in a new shadow version
    /// with none, marked published: nothing is sent.
    fn withdraw(&self, id: &str, job: &str) -> Result<()> {
        self.db.execute(
            "UPDATE devices SET desired = NULL, version = version + 1, published = version + 1,
                 withdrawn = ?2, republish_at = NULL WHERE id = ?1",
            params![id, job],
        )?;
        Ok(())
    }

    /// Removes a device and its acknowledgements.
    pub fn unregister(&mut self, device: &str) -> Result<()> {
        let tx = self.db.transaction()?;
        if tx.execute("DELETE FROM devices WHERE id = ?1", params![device])? == 0 {
            bail!("unknown device {device}");
        }
        tx.execute("DELETE FROM acks WHERE device = ?1", params![device])?;
        tx.commit()?;
        Ok(())
    }

    fn group(&self, group: &str) -> Result<Vec<String>> {
        let mut stmt = self
            .db
            .prepare("SELECT id FROM devices WHERE grp = ?1 ORDER BY id")?;
        let rows = stmt.query_map(params![group], |row| row.get(0))?;
        rows.collect::<rusqlite::Result<_>>().map_err(Into::into)
    }

    /// Desired states not yet published as a delta, and the republishes
    /// due at `now_ms`.
    pub fn pending_deltas(&self, now_ms: i64) -> Result<Vec<PendingDelta>> {
        let mut stmt = self.db.prepare(
            "SELECT id, version, desired FROM devices WHERE desired IS NOT NULL
             AND (version > published OR republish_at <= ?1)",
        )?;
        let rows = stmt.query_map(params![now_ms], |row| {
            Ok(PendingDelta {
                device: row.get(0)?,
                version: row.get::<_, i64>(1)? as u64,
                desired: row.get(2)?,
            })
        })?;
        rows.collect::<rusqlite::Result<_>>().map_err(Into::into)
    }

    /// Records that `version` of `device` was published.
    pub fn mark_published(&self, device: &str, version: u64) -> Result<()> {
        self.db.execute(
            "UPDATE devices SET published = MAX(published, ?2), republish_at = NULL WHERE id = ?1",
            params![device, version as i64],
        )?;
        Ok(())
    }

    /// Asks for the current delta of `device` to be published again (it
    /// came online without having seen it): at once the first time, then
    /// after a wait that doubles with each republish until
    /// [`Store::reset_republish`]. A request while one is due is merged
    /// into it.
    pub fn request_republish(&self, device: &str, now_ms: i64) -> Result<()> {
        let done: i64 = self
            .db
            .query_row(
                "SELECT republishes FROM devices WHERE id = ?1 AND republish_at IS NULL",
                params![device],
                |row| row.get(0),
            )
            .optional()?
            .unwrap_or(-1);
        if done >= 0 {
            self.db.execute(
                "UPDATE devices SET republishes = ?2, republish_at = ?3 WHERE id = ?1",
                params![
                    device,
                    done + 1,
                    now_ms.saturating_add(republish_wait_ms(done))
                ],
            )?;
        }
        Ok(())
    }

    /// The device ran or acknowledged its job: the republish wait starts
    /// over.
    pub fn reset_republish(&self, device: &str) -> Result<()> {
        self.db.execute(
            "UPDATE devices SET republishes = 0, republish_at = NULL WHERE id = ?1",
            params![device],
        )?;
        Ok(())
    }

    /// Stores a reported deployment state, and the rejection it carries
    /// (`lastRejected`, kept until the next one: later reports omit it).
    /// A rejection cancels a republish that was due.
    pub fn record_report(&self, device: &str, reported: &serde_json::Value) -> Result<()> {
        self.db.execute(
            "INSERT INTO devices (id, reported, reported_at, last_seen) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT(id) DO UPDATE SET reported = excluded.reported,
                 reported_at = excluded.reported_at, last_seen = excluded.last_seen",
            params![device, reported.to_string(), now()],
        )?;
        let Some(rejected) = reported.get("lastRejected") else {
            return Ok(());
        };
        match serde_json::from_value::<Rejection>(rejected.clone()) {
            Ok(rejected) => self.record_rejection(device, rejected),
            Err(e) => {
                tracing::warn!(device, "ignored a lastRejected that is no rejection: {e}");
                Ok(())
            }
        }
    }

    /// Keeps `rejected` as the device's last rejection. One without a
    /// shadow version (the delta did not parse, or was over the device's
    /// size limit) is of what was sent last: the current version, unless
    /// it names another job.
    fn record_rejection(&self, device: &str, mut rejected: Rejection) -> Result<()> {
        if rejected.shadow_version.is_none()
            && let Some(status) = self.status(device)?
            && rejected
                .job_id
                .as_deref()
                .is_none_or(|j| Some(j) == status.job())
        {
            rejected.shadow_version = Some(status.version);
        }
        self.db.execute(
            "UPDATE devices SET rejected = ?2, republish_at = NULL WHERE id = ?1",
            params![device, serde_json::to_string(&rejected)?],
        )?;
        Ok(())
    }

    /// Records that `device` (a registered one) connected or disconnected
    /// at `at_ms`; true when that changed what is known. The same state
    /// again keeps its first time (a retained message delivered anew), and
    /// an event older than the known one is ignored (the cloud may deliver
    /// them out of order).
    pub fn record_presence(&self, device: &str, online: bool, at_ms: i64) -> Result<bool> {
        let changed = self.db.execute(
            "UPDATE devices SET online = ?2, online_since = ?3 WHERE id = ?1
             AND (online IS NULL OR (online != ?2 AND online_since <= ?3))",
            params![device, online, at_ms],
        )?;
        Ok(changed == 1)
    }

    /// The cloud refused to store `version`'s desired deployment (job
    /// `job`) for `reason`: kept as its rejection, and never published.
    pub fn refuse_desired(
        &self,
        device: &str,
        version: u64,
        job: Option<&str>,
        reason: &str,
    ) -> Result<()> {
        let rejection = Rejection {
            shadow_version: Some(version),
            job_id: job.map(str::to_string),
            reason: reason.to_string(),
        };
        self.db.execute(
            "UPDATE devices SET rejected = ?3, cloud_refused = ?2,
                 published = MAX(published, ?2), republish_at = NULL WHERE id = ?1",
            params![device, version as i64, serde_json::to_string(&rejection)?],
        )?;
        Ok(())
    }

    /// Stores an acknowledgement; false when this job was acknowledged before.
    pub fn record_ack(&self, device: &str, ack: &Ack) -> Result<bool> {
        let status = serde_json::to_value(ack.status)?
            .as_str()
            .unwrap_or_default()
            .to_string();
        let inserted = self.db.execute(
            "INSERT OR IGNORE INTO acks (device, job_id, status, version, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![device, ack.job_id, status, ack.version, now()],
        )?;
        self.db.execute(
            "UPDATE devices SET last_seen = ?2 WHERE id = ?1",
            params![device, now()],
        )?;
        self.db.execute(
            "UPDATE devices SET republishes = 0, republish_at = NULL
             WHERE id = ?1 AND json_extract(desired, '$.jobId') = ?2",
            params![device, ack.job_id],
        )?;
        Ok(inserted == 1)
    }

    /// Acknowledgements received for `device`, oldest first.
    pub fn acks(&self, device: &str) -> Result<Vec<Ack>> {
        let mut stmt = self.db.prepare(
            "SELECT job_id, status, version FROM acks WHERE device = ?1 ORDER BY at, rowid",
        )?;
        let rows = stmt.query_map(params![device], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
            ))
        })?;
        rows.map(|r| {
            let (job_id, status, version) = r?;
            let status = serde_json::from_value(serde_json::Value::String(status))?;
            Ok(Ack {
                job_id,
                status,
                version,
            })
        })
        .collect()
    }

    /// One device's status.
    pub fn status(&self, device: &str) -> Result<Option<DeviceStatus>> {
        let row = self
            .db
            .query_row(
                "SELECT id, grp, version, desired, reported, last_seen, rejected, withdrawn,
                     online, online_since, cloud_refused
                 FROM devices WHERE id = ?1",
                params![device],
                |row| {
                    Ok((
                        (
                            row.get::<_, String>(0)?,
                            row.get::<_, Option<String>>(1)?,
                            row.get::<_, i64>(2)?,
                        ),
                        row.get::<_, Option<String>>(3)?,
                        row.get::<_, Option<String>>(4)?,
                        row.get::<_, Option<i64>>(5)?,
                        (
                            row.get::<_, Option<String>>(6)?,
                            row.get::<_, Option<String>>(7)?,
                        ),
                        (
                            row.get::<_, Option<bool>>(8)?,
                            row.get::<_, Option<i64>>(9)?,
                            row.get::<_, Option<i64>>(10)?,
                        ),
                    ))
                },
            )
            .optional()?;
        let Some((
            (id, group, version),
            desired,
            reported,
            last_seen,
            (rejected, withdrawn),
            (online, online_since, cloud_refused),
        )) = row
        else {
            return Ok(None);
        };
        let desired: Option<serde_json::Value> =
            desired.map(|d| serde_json::from_str(&d)).transpose()?;
        let job = desired
            .as_ref()
            .and_then(|d| d.get("jobId"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_string);
        let ack = match job {
            Some(job) => self.acks(&id)?.into_iter().find(|a| a.job_id == job),
            None => None,
        };
        let mut status = DeviceStatus {
            id,
            group,
            version: version as u64,
            desired,
            reported: reported.map(|r| serde_json::from_str(&r)).transpose()?,
            ack,
            last_seen,
            rejected: rejected.map(|r| serde_json::from_str(&r)).transpose()?,
            withdrawn,
            presence: online.zip(online_since).map(|(online, since)| Presence {
                online,
                since: since / 1000,
            }),
            cloud_refused: cloud_refused.map(|v| v as u64),
            outcome: Outcome::default(),
        };
        status.outcome = outcome::of(&status);
        Ok(Some(status))
    }

    /// Every device, by id.
    pub fn fleet(&self) -> Result<Vec<DeviceStatus>> {
        let mut stmt = self.db.prepare("SELECT id FROM devices ORDER BY id")?;
        let ids: Vec<String> = stmt
            .query_map([], |row| row.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        ids.iter()
            .filter_map(|id| self.status(id).transpose())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OutcomeKind;
    use otabox_core::shadow::AckStatus;

    use otabox_core::shadow::sample_desired as desired;

    #[test]
    fn deploys_publish_once_and_acks_are_recorded_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("replica.db")).expect("open");
        store.register("a", Some("pumps")).expect("register");
        store.register("b", Some("pumps")).expect("register");
        assert_eq!(
            store.deploy_group("pumps", &desired("j1")).expect("deploy"),
            ["a", "b"]
        );
        assert_eq!(store.deploy("a", &desired("j2")).expect("deploy"), 2);
        let pending = store.pending_deltas(0).expect("pending");
        assert_eq!(pending.len(), 2);
        for p in &pending {
            store
                .mark_published(&p.device, p.version)
                .expect("published");
        }
        assert!(store.pending_deltas(0).expect("pending").is_empty());
        let ack = Ack {
            job_id: "j2".into(),
            status: AckStatus::Success,
            version: "1".into(),
        };
        assert!(store.record_ack("a", &ack).expect("ack"));
        assert!(
            !store.record_ack("a", &ack).expect("ack"),
            "a repeated ack is recorded once"
        );
        let status = store.status("a").expect("status").expect("known");
        assert_eq!(status.ack, Some(ack));
        assert_eq!(status.version, 2);
        assert_eq!(store.fleet().expect("fleet").len(), 2);
        assert!(store.deploy_group("nobody", &desired("j3")).is_err());
        assert_eq!(
            store.cancel(None, Some("pumps")).expect("cancel"),
            [("a".into(), Cancelled::Sent), ("b".into(), Cancelled::Sent)]
        );
        let cancelled = store.status("b").expect("status").expect("known");
        assert_eq!(
            cancelled.desired.as_ref().and_then(|d| d.get("cancel")),
            Some(&serde_json::json!(true))
        );
        assert_eq!(cancelled.version, 2, "a cancel is a new shadow version");
        assert!(
            store.deploy("a/b", &desired("j3")).is_err(),
            "ids with topic separators are refused"
        );
    }

    fn open(dir: &tempfile::TempDir) -> Store {
        Store::open(&dir.path().join("replica.db")).expect("open")
    }

    fn report(store: &Store, device: &str, reported: serde_json::Value) {
        store.record_report(device, &reported).expect("report");
    }

    #[test]
    fn a_republish_backs_off_per_device_and_starts_over_when_the_device_runs_the_job() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        store.deploy("a", &desired("j1")).expect("deploy");
        store.deploy("b", &desired("j1")).expect("deploy");
        for p in store.pending_deltas(0).expect("pending") {
            store
                .mark_published(&p.device, p.version)
                .expect("published");
        }
        let due = |now: i64| {
            let pending = store.pending_deltas(now).expect("pending");
            for p in &pending {
                store
                    .mark_published(&p.device, p.version)
                    .expect("published");
            }
            pending.into_iter().map(|p| p.device).collect::<Vec<_>>()
        };
        // `a` asks again and again: at once, then after 1 s, 2 s, 4 s.
        let mut now = 1_000_000;
        let mut sent = Vec::new();
        for _ in 0..80 {
            store.request_republish("a", now).expect("republish");
            if !due(now).is_empty() {
                sent.push(now - 1_000_000);
            }
            now += 100;
        }
        assert_eq!(sent, [0, 1_100, 3_200, 7_300], "republished at (ms)");
        // `b` has its own backoff.
        store.request_republish("b", now).expect("republish");
        assert_eq!(due(now), ["b"]);
        // `a` ran the job: the wait starts over.
        store.reset_republish("a").expect("reset");
        store.request_republish("a", now).expect("republish");
        assert_eq!(due(now), ["a"]);
        assert_eq!(republish_wait_ms(40), REPUBLISH_MAX_WAIT_MS);
        assert_eq!(republish_wait_ms(i64::MAX), REPUBLISH_MAX_WAIT_MS);
    }

    #[test]
    fn a_rejection_is_final_for_its_shadow_version_and_cancel_withdraws_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        assert_eq!(store.deploy("a", &desired("j1")).expect("deploy"), 1);
        let rejected = |version: serde_json::Value| {
            serde_json::json!({"agent": {"state": "idle", "version": "0"},
                "lastRejected": {"shadowVersion": version, "jobId": "j1", "reason": "untrusted"}})
        };
        report(&store, "a", rejected(serde_json::json!(0)));
        let status = store.status("a").expect("status").expect("known");
        assert!(
            status.rejection().is_none(),
            "a rejection of another version"
        );
        assert_eq!(status.outcome.kind, OutcomeKind::Pending);
        report(&store, "a", rejected(serde_json::json!(1)));
        report(
            &store,
            "a",
            serde_json::json!({"agent": {"state": "idle", "version": "0"}}),
        );
        let status = store.status("a").expect("status").expect("known");
        assert!(status.rejection().is_some(), "kept past later reports");
        assert_eq!(
            status.outcome,
            Outcome {
                kind: OutcomeKind::Rejected,
                reason: Some("untrusted".into())
            }
        );
        assert!(status.last_seen.is_some());
        assert_eq!(
            store.cancel(Some("a"), None).expect("cancel"),
            [("a".into(), Cancelled::Withdrawn)]
        );
        assert!(
            store.pending_deltas(i64::MAX).expect("pending").is_empty(),
            "nothing is sent for a withdrawn deployment"
        );
        let status = store.status("a").expect("status").expect("known");
        assert_eq!(status.outcome.kind, OutcomeKind::Cancelled);
        assert_eq!(
            (status.desired, status.withdrawn.as_deref(), status.version),
            (None, Some("j1"), 2),
            "a get finds no deployment"
        );
        assert_eq!(
            store.cancel(Some("a"), None).expect("cancel"),
            [("a".into(), Cancelled::Already)]
        );
        assert_eq!(store.deploy("a", &desired("j2")).expect("deploy"), 3);
        let status = store.status("a").expect("status").expect("known");
        assert!(status.rejection().is_none(), "a new deploy is sent again");
        assert_eq!(status.withdrawn, None);
        assert_eq!(store.pending_deltas(0).expect("pending").len(), 1);
        let garbage =
            serde_json::json!({"agent": {"state": "idle"}, "lastRejected": {"reason": 5}});
        store.record_report("a", &garbage).expect("ignored");
        let status = store.status("a").expect("status").expect("known");
        assert_eq!(status.rejected.map(|r| r.shadow_version), Some(Some(1)));
    }

    #[test]
    fn a_rejection_without_a_version_is_of_what_was_sent_last_and_no_later_deploy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        store.deploy("a", &desired("j1")).expect("deploy");
        let unattributed = serde_json::json!({"agent": {"state": "idle"},
            "lastRejected": {"reason": "a message of 300000 bytes exceeds the limit"}});
        report(&store, "a", unattributed);
        let status = store.status("a").expect("status").expect("known");
        assert_eq!(status.outcome.kind, OutcomeKind::Rejected);
        store.deploy("a", &desired("j2")).expect("deploy");
        let status = store.status("a").expect("status").expect("known");
        assert_eq!(
            status.outcome.kind,
            OutcomeKind::Pending,
            "not carried over"
        );
        let other_job = serde_json::json!({"agent": {"state": "idle"},
            "lastRejected": {"jobId": "j1", "reason": "late"}});
        report(&store, "a", other_job);
        let status = store.status("a").expect("status").expect("known");
        assert!(status.rejection().is_none(), "a rejection of another job");
    }

    #[test]
    fn presence_keeps_the_time_of_each_change_and_ignores_older_events_and_strangers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        store.register("a", None).expect("register");
        let presence = || store.status("a").expect("status").expect("known").presence;
        assert_eq!(presence(), None, "not known yet");
        assert!(store.record_presence("a", true, 10_000).expect("online"));
        assert!(
            !store.record_presence("a", true, 50_000).expect("again"),
            "a retained message delivered anew keeps the first time"
        );
        assert_eq!(
            presence(),
            Some(Presence {
                online: true,
                since: 10
            })
        );
        assert!(
            !store.record_presence("a", false, 9_000).expect("late"),
            "an event older than the known one"
        );
        assert!(store.record_presence("a", false, 20_000).expect("offline"));
        assert_eq!(
            presence(),
            Some(Presence {
                online: false,
                since: 20
            })
        );
        assert!(!store.record_presence("stranger", true, 1).expect("ignored"));
        assert!(store.status("stranger").expect("status").is_none());
    }

    #[test]
    fn a_desired_deployment_the_cloud_refuses_is_rejected_and_never_published() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(&dir);
        let version = store.deploy("a", &desired("j1")).expect("deploy");
        store
            .refuse_desired("a", version, Some("j1"), "too deep; deploy it by reference")
            .expect("refused");
        assert!(store.pending_deltas(i64::MAX).expect("pending").is_empty());
        let status = store.status("a").expect("status").expect("known");
        assert_eq!(status.cloud_refused, Some(version));
        assert_eq!(
            status.outcome,
            Outcome {
                kind: OutcomeKind::Rejected,
                reason: Some("too deep; deploy it by reference".into())
            }
        );
        store.request_republish("a", 0).expect("republish");
        assert_eq!(
            store.cancel(Some("a"), None).expect("cancel"),
            [("a".into(), Cancelled::Withdrawn)],
            "nothing reached the device: withdrawn"
        );
        store.deploy("a", &desired("j2")).expect("deploy");
        let status = store.status("a").expect("status").expect("known");
        assert_eq!(status.outcome.kind, OutcomeKind::Pending);
        assert_eq!(store.pending_deltas(0).expect("pending").len(), 1);
    }

    #[test]
    fn a_database_of_the_first_schema_is_migrated_and_keeps_its_devices() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("old.db");
        {
            let db = Connection::open(&path).expect("old db");
            db.execute_batch(SCHEMA).expect("first schema");
            db.execute(
                "INSERT INTO devices (id, grp, version, desired, published, reported, reported_at)
                 VALUES ('old', 'g', 4, ?1, 4, '{\"agent\":{\"state\":\"idle\"}}', 1700000000)",
                params![serde_json::to_string(&desired("j")).expect("json")],
            )
            .expect("old row");
        }
        let store = Store::open_existing(&path).expect("migrated");
        let status = store.status("old").expect("status").expect("kept");
        assert_eq!((status.version, status.last_seen), (4, Some(1_700_000_000)));
        assert_eq!(status.outcome.kind, OutcomeKind::Pending);
        drop(store);
        let again = Store::open_existing(&path).expect("reopened");
        assert_eq!(again.fleet().expect("fleet").len(), 1);
        drop(again);
        let db = Connection::open(&path).expect("db");
        db.pragma_update(None, "user_version", 99).expect("newer");
        drop(db);
        let newer = Store::open_existing(&path)
            .err()
            .expect("newer schema refused");
        assert!(
            format!("{newer:#}").contains("schema version 99"),
            "{newer:#}"
        );
        let db = Connection::open(&path).expect("db");
        db.pragma_update(None, "user_version", -1)
            .expect("negative");
        drop(db);
        let odd = Store::open_existing(&path)
            .err()
            .expect("negative schema refused");
        assert!(format!("{odd:#}").contains("schema version -1"), "{odd:#}");
    }

    #[test]
    fn open_existing_refuses_a_missing_or_foreign_file_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("typo.db");
        let error = Store::open_existing(&missing).err().expect("refused");
        let text = format!("{error:#}");
        assert!(
            text.contains("typo.db") && text.contains("register"),
            "{text}"
        );
        assert!(!missing.exists(), "nothing created");
        for (name, bytes) in [
            ("empty.db", &b""[..]),
            (
                "text.db",
                &b"not a database at all, but long enough to have a header"[..],
            ),
        ] {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).expect("file");
            let error = Store::open_existing(&path).err().expect("refused");
            assert!(
                format!("{error:#}").contains("not a replica database"),
                "{error:#}"
            );
            assert_eq!(
                std::fs::read(&path).expect("kept"),
                bytes,
                "{name} unchanged"
            );
        }
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .expect("db")
            .execute_batch("CREATE TABLE devices (x);")
            .expect("foreign table");
        let before = std::fs::read(&other).expect("bytes");
        assert!(Store::open_existing(&other).is_err());
        assert_eq!(std::fs::read(&other).expect("kept"), before);
    }

    #[test]
    fn unregister_removes_a_device_and_refuses_an_unknown_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = open(&dir);
        store.deploy("a", &desired("j")).expect("deploy");
        let ack = Ack {
            job_id: "j".into(),
            status: AckStatus::Success,
            version: "1".into(),
        };
        store.record_ack("a", &ack).expect("ack");
        store.unregister("a").expect("unregister");
        assert!(store.status("a").expect("status").is_none());
        assert!(store.acks("a").expect("acks").is_empty());
        assert!(store.unregister("a").is_err());
    }
}
