//! A durable, ordered queue of messages to publish: reports survive broker
//! outages and agent restarts, and go out in order, each once.
//!
//! Each entry is a file `<seq>.json` written atomically. An entry is removed
//! after the broker acknowledged it; its key is first added to `sent.json`
//! (the last keys sent), so a key is never queued twice, even across a crash
//! between the acknowledgement and the removal.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::durable;

/// Keys remembered after sending.
const SENT_MEMORY: usize = 1024;

/// One queued message.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct Entry {
    /// Position in the queue.
    pub seq: u64,
    /// Identity, such as `ack:<job>`; queued at most once.
    pub key: String,
    /// Topic.
    pub topic: String,
    /// Payload (JSON text).
    pub payload: String,
    /// A progress report held in memory only (see [`Outbox::push_volatile`]).
    #[serde(skip)]
    pub volatile: bool,
    /// A volatile entry is published no earlier than this.
    #[serde(skip)]
    pub due: Option<Instant>,
}

/// What the publisher should do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Publish this entry (the head, now marked in flight).
    Publish(Entry),
    /// The head is a progress report not yet due: look again then.
    WaitUntil(Instant),
    /// Nothing to publish (empty, or the head is in flight).
    Idle,
}

/// The queue in a directory.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    entries: VecDeque<Entry>,
    sent: VecDeque<String>,
    next_seq: u64,
    /// The head was handed out by [`Outbox::next`] and awaits the broker.
    in_flight: bool,
    /// Entries from this sequence number on wait for [`Outbox::release`].
    held_from: Option<u64>,
}

impl Outbox {
    /// Opens (creating, private to the agent) the outbox in `dir`, dropping
    /// entries already sent.
    pub fn open(dir: &Path) -> Result<Self> {
        durable::create_private_dir(dir)?;
        durable::make_private_tree(dir)?;
        let sent: VecDeque<String> = match std::fs::read(dir.join("sent.json")) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).context("outbox sent.json does not parse")?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => VecDeque::new(),
            Err(e) => return Err(e).context("cannot read outbox sent.json"),
        };
        let mut entries = Vec::new();
        for item in
            std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?
        {
            let path = item?.path();
            if path
                .file_stem()
                .and_then(|s| s.to_str())
                .is_some_and(|s| s.parse::<u64>().is_ok())
            {
                let entry: Entry = serde_json::from_slice(&std::fs::read(&path)?)
                    .with_context(|| format!("outbox entry {} does not parse", path.display()))?;
                if sent.contains(&entry.key) {
                    std::fs::remove_file(&path)?;
                } else {
                    entries.push(entry);
                }
            }
        }
        entries.sort_by_key(|e| e.seq);
        let next_seq = entries.last().map_or(0, |e| e.seq) + 1;
        Ok(Self {
            dir: dir.to_path_buf(),
            entries: entries.into(),
            sent,
            next_seq,
            in_flight: false,
            held_from: None,
        })
    }

    /// Entries queued from now on are not published until
    /// [`Outbox::release`] (they are durable already).
    pub fn hold(&mut self) {
        self.held_from.get_or_insert(self.next_seq);
    }

    /// Publishes held entries again.
    pub fn release(&mut self) {
        self.held_from = None;
    }

    /// Queues a message durably; a key already queued or sent is ignored.
    /// Unsent progress reports queued before it are dropped: every durable
    /// message is a full report, or an acknowledgement that follows one.
    pub fn push(&mut self, key: &str, topic: &str, payload: String) -> Result<bool> {
        if self.sent.iter().any(|k| k == key) || self.entries.iter().any(|e| e.key == key) {
            return Ok(false);
        }
        let entry = Entry {
            seq: self.next_seq,
            key: key.to_string(),
            topic: topic.to_string(),
            payload,
            volatile: false,
            due: None,
        };
        durable::write_atomic(&self.path(entry.seq), &serde_json::to_vec(&entry)?)?;
        self.drop_unsent_volatile();
        self.next_seq += 1;
        self.entries.push_back(entry);
        Ok(true)
    }

    /// Queues a progress report in memory only (a crash loses it, as it
    /// may: the agent reports its whole state when it starts again). It
    /// replaces an unsent progress report, and goes out no earlier than
    /// `due` (or the replaced one's due time, if sooner), so a job that
    /// ends at once sends only its result.
    pub fn push_volatile(&mut self, key: &str, topic: &str, payload: String, due: Instant) {
        let earlier = self
            .entries
            .iter()
            .enumerate()
            .filter(|(i, e)| e.volatile && !(*i == 0 && self.in_flight))
            .filter_map(|(_, e)| e.due)
            .min();
        self.drop_unsent_volatile();
        self.entries.push_back(Entry {
            seq: self.next_seq,
            key: key.to_string(),
            topic: topic.to_string(),
            payload,
            volatile: true,
            due: Some(earlier.map_or(due, |e| e.min(due))),
        });
        self.next_seq += 1;
    }

    fn drop_unsent_volatile(&mut self) {
        let keep_head = self.in_flight;
        let mut index = 0;
        self.entries.retain(|e| {
            let sent = index == 0 && keep_head;
            index += 1;
            !e.volatile || sent
        });
    }

    /// The oldest message not yet acknowledged.
    pub fn head(&self) -> Option<&Entry> {
        self.entries.front()
    }

    /// What to publish at `now`; a head handed out is in flight until
    /// [`Outbox::complete_head`] or [`Outbox::requeue`].
    pub fn next(&mut self, now: Instant) -> Next {
        if self.in_flight {
            return Next::Idle;
        }
        match self.entries.front() {
            None => Next::Idle,
            Some(e) if self.held_from.is_some_and(|from| e.seq >= from) => Next::Idle,
            Some(e) if e.due.is_some_and(|due| due > now) => Next::WaitUntil(e.due.unwrap_or(now)),
            Some(e) => {
                self.in_flight = true;
                Next::Publish(e.clone())
            }
        }
    }

    /// The connection dropped before the broker acknowledged the head: it
    /// goes out again.
    pub fn requeue(&mut self) {
        self.in_flight = false;
    }

    /// Replaces the payload of the head (not in flight), durably.
    pub fn replace_head(&mut self, payload: String) -> Result<()> {
        if self.in_flight {
            return Ok(());
        }
        let Some(entry) = self.entries.front_mut() else {
            return Ok(());
        };
        entry.payload = payload;
        if entry.volatile {
            return Ok(());
        }
        let (seq, bytes) = (entry.seq, serde_json::to_vec(&*entry)?);
        durable::write_atomic(&self.path(seq), &bytes)
    }

    /// Marks the head acknowledged by the broker (or given up) and removes
    /// it.
    pub fn complete_head(&mut self) -> Result<()> {
        self.in_flight = false;
        let Some(entry) = self.entries.pop_front() else {
            return Ok(());
        };
        if entry.volatile {
            return Ok(());
        }
        self.sent.push_back(entry.key.clone());
        while self.sent.len() > SENT_MEMORY {
            self.sent.pop_front();
        }
        durable::write_atomic(
            &self.dir.join("sent.json"),
            &serde_json::to_vec(&self.sent)?,
        )?;
        // No sync of the removal: an entry found again after a crash is
        // dropped on open, its key being in sent.json.
        std::fs::remove_file(self.path(entry.seq)).context("cannot remove a sent outbox entry")
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{seq:020}.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_reopen_in_order_and_keys_go_out_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut outbox = Outbox::open(dir.path()).expect("open");
        assert!(outbox.push("a", "t", "1".into()).expect("push"));
        assert!(outbox.push("b", "t", "2".into()).expect("push"));
        assert!(
            !outbox.push("a", "t", "again".into()).expect("push"),
            "a queued key is not queued twice"
        );
        let mut reopened = Outbox::open(dir.path()).expect("reopen");
        assert_eq!(reopened.head().map(|e| e.payload.as_str()), Some("1"));
        reopened.complete_head().expect("ack");
        assert!(
            !reopened.push("a", "t", "late".into()).expect("push"),
            "a sent key is not queued again"
        );
        let reopened = Outbox::open(dir.path()).expect("reopen");
        assert_eq!(reopened.len(), 1);
        assert_eq!(reopened.head().map(|e| e.key.as_str()), Some("b"));
    }

    #[test]
    fn progress_reports_coalesce_and_never_outlive_a_durable_report() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut outbox = Outbox::open(dir.path()).expect("open");
        let now = Instant::now();
        let later = now + std::time::Duration::from_millis(50);
        outbox.push_volatile("p1", "t", "validating".into(), later);
        assert_eq!(outbox.next(now), Next::WaitUntil(later));
        outbox.push_volatile("p2", "t", "installing".into(), later);
        assert_eq!(outbox.len(), 1, "an unsent progress report is replaced");
        let Next::Publish(head) = outbox.next(later) else {
            panic!("due now")
        };
        assert_eq!(head.payload, "installing");
        outbox.push_volatile("p3", "t", "verifying".into(), now);
        outbox.push("result", "t", "done".into()).expect("push");
        assert_eq!(
            outbox
                .entries
                .iter()
                .map(|e| e.key.as_str())
                .collect::<Vec<_>>(),
            ["p2", "result"],
            "the in-flight report stays, the unsent one goes"
        );
        outbox.complete_head().expect("ack");
        assert_eq!(outbox.head().map(|e| e.key.as_str()), Some("result"));
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "progress reports never touch the disk"
        );
        let reopened = Outbox::open(dir.path()).expect("reopen");
        assert_eq!(reopened.len(), 1);
    }

    #[test]
    fn held_entries_wait_for_release() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut outbox = Outbox::open(dir.path()).expect("open");
        outbox.push("before", "t", "1".into()).expect("push");
        outbox.hold();
        outbox.push("held", "t", "2".into()).expect("push");
        let now = Instant::now();
        assert!(matches!(outbox.next(now), Next::Publish(e) if e.key == "before"));
        outbox.complete_head().expect("ack");
        assert_eq!(outbox.next(now), Next::Idle, "held");
        outbox.release();
        assert!(matches!(outbox.next(now), Next::Publish(e) if e.key == "held"));
    }

    #[test]
    fn a_requeued_head_goes_out_again_and_a_replaced_one_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut outbox = Outbox::open(dir.path()).expect("open");
        outbox.push("a", "t", "big".into()).expect("push");
        let now = Instant::now();
        assert!(matches!(outbox.next(now), Next::Publish(_)));
        assert_eq!(outbox.next(now), Next::Idle, "in flight");
        outbox.requeue();
        outbox.replace_head("small".into()).expect("replace");
        let Next::Publish(head) = outbox.next(now) else {
            panic!("requeued")
        };
        assert_eq!(head.payload, "small");
        let reopened = Outbox::open(dir.path()).expect("reopen");
        assert_eq!(reopened.head().map(|e| e.payload.as_str()), Some("small"));
    }

    #[test]
    fn an_entry_acked_just_before_a_crash_is_dropped_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut outbox = Outbox::open(dir.path()).expect("open");
        outbox.push("a", "t", "1".into()).expect("push");
        durable::write_atomic(&dir.path().join("sent.json"), br#"["a"]"#).expect("simulate");
        assert!(Outbox::open(dir.path()).expect("reopen").is_empty());
    }
}
