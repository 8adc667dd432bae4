//! Messages that must reach the broker even if the agent restarts or the
//! broker is down when they are produced: one file per message in
//! `STATE_DIR/outbox/`, written atomically before anything is sent, and
//! removed only after the broker acknowledged it (QoS 1 PUBACK).
//!
//! Outcomes are fsynced before they are sent; progress messages are written
//! atomically but not synced (after a power cut some may be missing).
//!
//! Delivery is at least once: a message sent, acknowledged and then cut off
//! by a power loss before its file was removed is sent again. Events carry
//! an increasing id so that consumers can drop repeats.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::limits::LIMITS;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) topic: String,
    pub(crate) payload: String,
    pub(crate) retain: bool,
    /// Outcomes are never dropped to make room.
    pub(crate) keep: bool,
}

pub(crate) struct Outbox {
    dir: PathBuf,
    entries: BTreeMap<u64, Entry>,
    next: u64,
    limit: usize,
}

impl Outbox {
    /// Opens (creating) the outbox and loads what an earlier run left.
    pub(crate) fn open(dir: &Path) -> Result<Outbox> {
        Self::open_with_limit(dir, LIMITS.outbox_entries)
    }

    pub(crate) fn open_with_limit(dir: &Path, limit: usize) -> Result<Outbox> {
        fs::create_dir_all(dir).ctx(dir, "create")?;
        let mut entries = BTreeMap::new();
        for e in fs::read_dir(dir).ctx(dir, "read")? {
            let e = e.ctx(dir, "read")?;
            let name = e.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue; // temp files of an interrupted write
            };
            let bytes = fsutil::read_limited(&e.path(), LIMITS.outbox_entry_bytes, "outbox entry")?;
            match serde_json::from_slice::<Entry>(&bytes) {
                Ok(entry) => {
                    entries.insert(id, entry);
                }
                Err(err) => {
                    tracing::warn!("outbox: dropping unreadable {}: {err}", e.path().display());
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        let next = entries.keys().next_back().map_or(1, |k| k + 1);
        Ok(Outbox {
            dir: dir.to_path_buf(),
            entries,
            next,
            limit: limit.max(1),
        })
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}.json"))
    }

    /// Stores a message durably; returns its id.
    pub(crate) fn push(&mut self, entry: Entry) -> Result<u64> {
        while self.entries.len() >= self.limit {
            let Some(victim) = self
                .entries
                .iter()
                .find(|(_, e)| !e.keep)
                .map(|(id, _)| *id)
            else {
                return Err(Error::Usage(format!(
                    "outbox {} is full of undelivered outcomes",
                    self.dir.display()
                )));
            };
            tracing::warn!("outbox full: dropping progress message {victim}");
            self.remove(victim)?;
        }
        let id = self.next;
        self.next += 1;
        let bytes = serde_json::to_vec(&entry).expect("entry serializes");
        if entry.keep {
            fsutil::write_atomic(&self.path(id), 0o600, true, &bytes)?;
        } else {
            // Progress: atomic but not synced; a power cut may lose it,
            // and it costs the transfer no fsync.
            let tmp = self.dir.join(format!(".{id}.tmp"));
            fs::write(&tmp, &bytes).ctx(&tmp, "write")?;
            fs::rename(&tmp, self.path(id)).ctx(self.path(id), "rename into place")?;
        }
        self.entries.insert(id, entry);
        Ok(id)
    }

    /// The broker has it: forget it.
    pub(crate) fn remove(&mut self, id: u64) -> Result<()> {
        if self.entries.remove(&id).is_some() {
            let p = self.path(id);
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(&p, "remove", e)),
            }
        }
        Ok(())
    }

    /// Oldest first.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &Entry)> {
        self.entries.iter().map(|(k, v)| (*k, v))
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(keep: bool) -> Entry {
        Entry {
            topic: "t".into(),
            payload: "{}".into(),
            retain: false,
            keep,
        }
    }

    #[test]
    fn entries_survive_a_restart_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path()).unwrap();
        let a = o.push(entry(true)).unwrap();
        let b = o.push(entry(false)).unwrap();
        assert!(b > a);
        drop(o);
        let mut o = Outbox::open(dir.path()).unwrap();
        assert_eq!(o.iter().map(|(id, _)| id).collect::<Vec<_>>(), [a, b]);
        o.remove(a).unwrap();
        let c = o.push(entry(false)).unwrap();
        assert!(c > b, "ids keep increasing");
        drop(o);
        let o = Outbox::open(dir.path()).unwrap();
        assert_eq!(o.iter().map(|(id, _)| id).collect::<Vec<_>>(), [b, c]);
    }

    #[test]
    fn a_full_outbox_drops_progress_not_outcomes() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open_with_limit(dir.path(), 5).unwrap();
        let first = o.push(entry(true)).unwrap();
        for _ in 1..5 {
            o.push(entry(false)).unwrap();
        }
        o.push(entry(true)).unwrap();
        assert_eq!(o.len(), 5);
        assert!(o.iter().any(|(id, _)| id == first));
    }
}
