//! The agent's memory of offers, beside the engine's state: signed offers
//! already decided (`agent.json`, by the SHA-256 of their envelope), the
//! last offer taken up (`last-offer.json`, for a retry command), the newest
//! offer waiting while an install runs, and the topic the offer being
//! looked at came on. What was decided about a *release* is in the
//! engine's state (`DeviceState::settled`); this only short-cuts it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::fsutil;
use crate::limits::LIMITS;

/// Offers remembered as decided.
const DECIDED_MAX: usize = 100;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct AgentFile {
    /// SHA-256 of signed offer envelopes already decided, newest last. Only
    /// offers that verified against the trust root come here (input that
    /// did not is only counted), so junk cannot push one out.
    #[serde(default)]
    decided: Vec<String>,
}

/// How an offer is known: the SHA-256 of its envelope, in hex.
pub(crate) fn digest_hex(envelope: &[u8]) -> String {
    hex::encode(Sha256::digest(envelope))
}

pub(crate) struct OfferMemory {
    /// `STATE_DIR/agent/`.
    dir: PathBuf,
    file: AgentFile,
    /// The newest offer that arrived while the engine was busy.
    pending: Option<Vec<u8>>,
    /// The topic of the offer being looked at, for reports of discarded
    /// ones.
    topic: String,
    /// The offer (digest) whose install found the download incomplete
    /// after all: taken up again, it fetches every chunk, so that a plan
    /// that keeps disagreeing with the engine's cannot loop.
    fetch_everything: Option<String>,
}

impl OfferMemory {
    /// Reads `agent.json` in `dir`; a missing or unreadable one is an empty
    /// memory (it only short-cuts the engine's).
    pub(crate) fn load(dir: PathBuf, topic: String) -> OfferMemory {
        let file: AgentFile = fsutil::read_limited(
            &dir.join("agent.json"),
            LIMITS.state_file_bytes,
            "agent memory",
        )
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
        OfferMemory {
            dir,
            file,
            pending: None,
            topic,
            fetch_everything: None,
        }
    }

    pub(crate) fn is_decided(&self, digest: &str) -> bool {
        self.file.decided.iter().any(|d| d == digest)
    }

    /// Remembers the offer as decided (the oldest beyond `DECIDED_MAX` is
    /// forgotten), durably.
    pub(crate) fn decide(&mut self, digest: &str) -> Result<()> {
        if !self.file.decided.iter().any(|d| d == digest) {
            self.file.decided.push(digest.to_string());
            let excess = self.file.decided.len().saturating_sub(DECIDED_MAX);
            self.file.decided.drain(..excess);
            self.save()?;
        }
        Ok(())
    }

    /// Forgets that the offer was decided (a retry command), durably.
    pub(crate) fn forget(&mut self, digest: &str) -> Result<()> {
        self.file.decided.retain(|d| d != digest);
        self.save()
    }

    /// Keeps the envelope of the offer being taken up, for a retry.
    pub(crate) fn remember_last(&self, envelope: &[u8]) -> Result<()> {
        fsutil::write_atomic(&self.dir.join("last-offer.json"), 0o600, true, envelope)
    }

    /// The last offer taken up, if any.
    pub(crate) fn last(&self) -> Option<Vec<u8>> {
        fsutil::read_limited(
            &self.dir.join("last-offer.json"),
            LIMITS.manifest_bytes,
            "last offer",
        )
        .ok()
    }

    /// The offer waits for the engine; a newer one replaces it.
    pub(crate) fn wait(&mut self, envelope: Vec<u8>) {
        self.pending = Some(envelope);
    }

    pub(crate) fn take_waiting(&mut self) -> Option<Vec<u8>> {
        self.pending.take()
    }

    pub(crate) fn is_waiting(&self) -> bool {
        self.pending.is_some()
    }

    pub(crate) fn topic(&self) -> &str {
        &self.topic
    }

    pub(crate) fn set_topic(&mut self, topic: String) {
        self.topic = topic;
    }

    /// Taken up again, the offer `digest` fetches every chunk.
    pub(crate) fn fetch_everything(&mut self, digest: &str) {
        self.fetch_everything = Some(digest.to_string());
    }

    pub(crate) fn fetches_everything(&self, digest: &str) -> bool {
        self.fetch_everything.as_deref() == Some(digest)
    }

    fn save(&self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.file).expect("json");
        fsutil::write_atomic(&self.dir.join("agent.json"), 0o600, true, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decided_offers_survive_a_restart_and_the_oldest_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = OfferMemory::load(dir.path().to_path_buf(), "t".into());
        for i in 0..=DECIDED_MAX {
            m.decide(&format!("d{i}")).unwrap();
        }
        m.forget("d7").unwrap();
        let m = OfferMemory::load(dir.path().to_path_buf(), "t".into());
        assert!(!m.is_decided("d0"), "the oldest is forgotten");
        assert!(!m.is_decided("d7"), "a retry forgets it");
        assert!(m.is_decided("d1"));
        assert!(m.is_decided(&format!("d{DECIDED_MAX}")));
    }
}
