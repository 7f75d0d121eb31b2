//! Desired and reported state per device, in SQLite.

use std::path::Path;

use anyhow::{Context, Result, bail};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::shadow::{Ack, DesiredState};

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
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Store {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let db = Connection::open(path)
            .with_context(|| format!("cannot open replica database {}", path.display()))?;
        db.busy_timeout(std::time::Duration::from_secs(5))?;
        db.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")?;
        db.execute_batch(SCHEMA)
            .context("cannot create the replica schema")?;
        Ok(Self { db })
    }

    /// Adds a device (or moves it to `group`).
    pub fn register(&self, device: &str, group: Option<&str>) -> Result<()> {
        crate::shadow::Topics::new(Default::default(), device)?;
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
        crate::shadow::Topics::new(Default::default(), device)?;
        let json = serde_json::to_string(desired)?;
        let version: i64 = self.db.query_row(
            "INSERT INTO devices (id, version, desired) VALUES (?1, 1, ?2)
             ON CONFLICT(id) DO UPDATE SET version = version + 1, desired = excluded.desired
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
    /// into a cancel of that job; returns the devices.
    pub fn cancel(&self, device: Option<&str>, group: Option<&str>) -> Result<Vec<String>> {
        let devices = match (device, group) {
            (Some(d), _) => vec![d.to_string()],
            (None, Some(g)) => self.group(g)?,
            (None, None) => bail!("give a device or a group"),
        };
        for id in &devices {
            let status = self
                .status(id)?
                .with_context(|| format!("unknown device {id}"))?;
            let desired = status
                .desired
                .with_context(|| format!("{id} has no deployment to cancel"))?;
            let mut desired: DesiredState = serde_json::from_value(desired)?;
            desired.cancel = true;
            self.deploy(id, &desired)?;
        }
        Ok(devices)
    }

    fn group(&self, group: &str) -> Result<Vec<String>> {
        let mut stmt = self
            .db
            .prepare("SELECT id FROM devices WHERE grp = ?1 ORDER BY id")?;
        let rows = stmt.query_map(params![group], |row| row.get(0))?;
        rows.collect::<rusqlite::Result<_>>().map_err(Into::into)
    }

    /// Desired states not yet published as a delta.
    pub fn pending_deltas(&self) -> Result<Vec<PendingDelta>> {
        let mut stmt =
            self.db.prepare("SELECT id, version, desired FROM devices WHERE desired IS NOT NULL AND version > published")?;
        let rows = stmt.query_map([], |row| {
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
            "UPDATE devices SET published = MAX(published, ?2) WHERE id = ?1",
            params![device, version as i64],
        )?;
        Ok(())
    }

    /// Asks for the current delta of `device` to be published again (it
    /// came online without having seen it).
    pub fn republish(&self, device: &str) -> Result<()> {
        self.db.execute(
            "UPDATE devices SET published = 0 WHERE id = ?1",
            params![device],
        )?;
        Ok(())
    }

    /// Stores a reported deployment state.
    pub fn record_report(&self, device: &str, reported: &serde_json::Value) -> Result<()> {
        self.db.execute(
            "INSERT INTO devices (id, reported, reported_at) VALUES (?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET reported = excluded.reported, reported_at = excluded.reported_at",
            params![device, reported.to_string(), now()],
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
                "SELECT id, grp, version, desired, reported FROM devices WHERE id = ?1",
                params![device],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, Option<String>>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, Option<String>>(3)?,
                        row.get::<_, Option<String>>(4)?,
                    ))
                },
            )
            .optional()?;
        let Some((id, group, version, desired, reported)) = row else {
            return Ok(None);
        };
        let desired: Option<serde_json::Value> =
            desired.map(|d| serde_json::from_str(&d)).transpose()?;
        let job = desired
            .as_ref()
            .and_then(|d| d.get("jobId"))
            .and_then(|j| j.as_str())
            .map(str::to_string);
        let ack = match job {
            Some(job) => self.acks(&id)?.into_iter().find(|a| a.job_id == job),
            None => None,
        };
        Ok(Some(DeviceStatus {
            id,
            group,
            version: version as u64,
            desired,
            reported: reported.map(|r| serde_json::from_str(&r)).transpose()?,
            ack,
        }))
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
    use crate::shadow::AckStatus;

    use crate::shadow::sample_desired as desired;

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
        let pending = store.pending_deltas().expect("pending");
        assert_eq!(pending.len(), 2);
        for p in &pending {
            store
                .mark_published(&p.device, p.version)
                .expect("published");
        }
        assert!(store.pending_deltas().expect("pending").is_empty());
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
            ["a", "b"]
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
}
