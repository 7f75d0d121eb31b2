//! A durable, ordered queue of messages to publish: reports survive broker
//! outages and agent restarts, and go out in order, each once.
//!
//! Each entry is a file `<seq>.json` written atomically. An entry is removed
//! after the broker acknowledged it; its key is first added to `sent.json`
//! (the last keys sent), so a key is never queued twice, even across a crash
//! between the acknowledgement and the removal.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

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
}

/// The queue in a directory.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    entries: VecDeque<Entry>,
    sent: VecDeque<String>,
    next_seq: u64,
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
        })
    }

    /// Queues a message durably; a key already queued or sent is ignored.
    pub fn push(&mut self, key: &str, topic: &str, payload: String) -> Result<bool> {
        if self.sent.iter().any(|k| k == key) || self.entries.iter().any(|e| e.key == key) {
            return Ok(false);
        }
        let entry = Entry {
            seq: self.next_seq,
            key: key.to_string(),
            topic: topic.to_string(),
            payload,
        };
        durable::write_atomic(&self.path(entry.seq), &serde_json::to_vec(&entry)?)?;
        self.next_seq += 1;
        self.entries.push_back(entry);
        Ok(true)
    }

    /// The oldest message not yet acknowledged.
    pub fn head(&self) -> Option<&Entry> {
        self.entries.front()
    }

    /// Marks the head acknowledged by the broker and removes it.
    pub fn complete_head(&mut self) -> Result<()> {
        let Some(entry) = self.entries.pop_front() else {
            return Ok(());
        };
        self.sent.push_back(entry.key.clone());
        while self.sent.len() > SENT_MEMORY {
            self.sent.pop_front();
        }
        durable::write_atomic(
            &self.dir.join("sent.json"),
            &serde_json::to_vec(&self.sent)?,
        )?;
        std::fs::remove_file(self.path(entry.seq)).context("cannot remove a sent outbox entry")?;
        durable::sync_dir(&self.dir)
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
    fn an_entry_acked_just_before_a_crash_is_dropped_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut outbox = Outbox::open(dir.path()).expect("open");
        outbox.push("a", "t", "1".into()).expect("push");
        durable::write_atomic(&dir.path().join("sent.json"), br#"["a"]"#).expect("simulate");
        assert!(Outbox::open(dir.path()).expect("reopen").is_empty());
    }
}
