//! The device's persistent state and the install journal, in one file.
//!
//! `STATE_DIR/state.json` holds what the device has accepted (the last
//! sequence number), the install in progress with the phase it reached (the
//! journal), and the last outcome. Every change is made in memory and then
//! written in one explicit step, atomically (temp file, fsync, rename, fsync
//! of the directory), *before* the effect the new phase stands for. After a
//! power cut the file therefore names the last step that may have started,
//! and recovery can make the device consistent from there.
//!
//! An exclusive lock on `STATE_DIR/lock` keeps two beamup processes (say,
//! the agent and a field engineer's `beamup install`) from driving the same
//! release at once.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::limits::LIMITS;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
/// How many past outcomes to keep for `beamup status`.
const HISTORY: usize = 20;
/// Distinct kinds of discarded input remembered (repeats are counted, not
/// stored again).
const DISCARDED: usize = 10;
/// Releases remembered as decided. Only an install adds one (a signed,
/// applicable offer that ran to an outcome), so nothing a device merely
/// receives can push one out; past this many, the oldest whose sequence the
/// anti-rollback check refuses anyway go first.
const DECIDED: usize = 500;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct DeviceState {
    /// The highest sequence number of a committed release.
    pub(crate) last_sequence: Option<u64>,
    /// The install in progress, if any: the journal.
    pub(crate) current: Option<Journal>,
    /// Most recent first: outcomes of releases (installs, and offers whose
    /// signed manifest was read). Never input that could not be verified:
    /// that goes to `discarded`.
    #[serde(default)]
    pub(crate) history: Vec<Outcome>,
    /// For each release beamup installed and committed, the paths its
    /// unpack created: the only files pruning that release may delete.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) installed: BTreeMap<String, Vec<PathBuf>>,
    /// The final word on each release installed (committed, rolled back,
    /// needs attention), oldest first. Kept apart from `history` so that
    /// no number of other outcomes makes the device forget a rollback.
    #[serde(default)]
    pub(crate) decided: Vec<Outcome>,
    /// Input refused before anything in it could be believed (not signed
    /// by the trust root, not a manifest): bounded, repeats coalesced.
    #[serde(default)]
    pub(crate) discarded: Discarded,
}

/// Bounded record of discarded input.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Discarded {
    /// How many inputs were discarded in all.
    pub(crate) count: u64,
    /// Most recent first, at most `DISCARDED`; the same reason again
    /// counts on the newest entry.
    pub(crate) recent: Vec<DiscardedEntry>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DiscardedEntry {
    pub(crate) reason: String,
    /// Consecutive times this reason was seen.
    pub(crate) count: u64,
    pub(crate) first_at: String,
    pub(crate) last_at: String,
}

impl Discarded {
    /// Counts one discarded input: coalesced with the newest entry when the
    /// reason is the same, otherwise a new entry (the oldest falls out).
    pub(crate) fn add(&mut self, reason: &str, at: &str) {
        // A reason quotes the input it refused: bounded, one line.
        let reason = crate::logging::untrusted(reason, crate::transport::protocol::MAX_REASON);
        let reason = reason.as_str();
        self.count += 1;
        if let Some(e) = self.recent.first_mut()
            && e.reason == reason
        {
            e.count += 1;
            e.last_at = at.to_string();
            return;
        }
        self.recent.insert(
            0,
            DiscardedEntry {
                reason: reason.to_string(),
                count: 1,
                first_at: at.to_string(),
                last_at: at.to_string(),
            },
        );
        self.recent.truncate(DISCARDED);
    }
}

/// Is this outcome the final word on its release (version and sequence)?
/// Committed, rolled back for the release's own sake (not because beamup
/// was interrupted), or left needing attention. Rejections are not final:
/// the reason may have been passing (the node was down).
fn is_final(o: &Outcome) -> bool {
    match o.outcome {
        OutcomeKind::Committed | OutcomeKind::NeedsAttention => true,
        OutcomeKind::RolledBack => !o.interrupted,
        OutcomeKind::Rejected => false,
    }
}

/// Was this input refused before a signed manifest could be read from it?
/// Only a verified manifest names a sequence, so such a rejection has none.
fn is_unverified(o: &Outcome) -> bool {
    o.outcome == OutcomeKind::Rejected && o.sequence.is_none()
}

/// The memory of decided releases after `o`: `o` added when final (once
/// per version and sequence, the newest word wins), and bounded by
/// dropping first the oldest decisions that anti-rollback (`last_sequence`)
/// refuses anyway, then the oldest.
pub(crate) fn remember(
    mut decided: Vec<Outcome>,
    o: &Outcome,
    last_sequence: Option<u64>,
    cap: usize,
) -> Vec<Outcome> {
    if o.sequence.is_none() || !is_final(o) {
        return decided;
    }
    decided.retain(|d| !(d.version == o.version && d.sequence == o.sequence));
    decided.push(o.clone());
    while decided.len() > cap {
        let shadowed = decided
            .iter()
            .position(|d| matches!((d.sequence, last_sequence), (Some(s), Some(l)) if s < l));
        decided.remove(shadowed.unwrap_or(0));
    }
    decided
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Strategy {
    /// `release_handler:install_release/1` through the relup, no restart.
    Hot,
    /// Restart the node into the new release.
    Cold,
}

impl Strategy {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Strategy::Hot => "hot",
            Strategy::Cold => "cold",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub(crate) enum Phase {
    /// Writing the new release's files beside the running one.
    Unpacking,
    /// Registering the unpacked release with release_handler (`set_unpacked`).
    Registering,
    /// `install_release` (hot).
    Installing,
    /// Stopping the node to boot the new release (cold).
    Restarting,
    /// Health gate running against the new release.
    Soaking,
    /// Health passed: making the release permanent and bootable.
    Committing,
    /// Returning to the previous release.
    RollingBack { reason: String },
}

impl Phase {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Phase::Unpacking => "unpacking",
            Phase::Registering => "registering",
            Phase::Installing => "installing",
            Phase::Restarting => "restarting",
            Phase::Soaking => "soaking",
            Phase::Committing => "committing",
            Phase::RollingBack { .. } => "rolling_back",
        }
    }
}

/// The install in progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Journal {
    pub(crate) release: String,
    pub(crate) from_version: String,
    pub(crate) to_version: String,
    pub(crate) sequence: u64,
    pub(crate) strategy: Strategy,
    /// Paths (relative to the release root) the unpack creates.
    pub(crate) creates: Vec<PathBuf>,
    #[serde(flatten)]
    pub(crate) phase: Phase,
    pub(crate) started_at: String,
    /// `bin/REL` was pointed at the new release (a copy of the old script
    /// is in the state dir); rollback must restore it.
    #[serde(default)]
    pub(crate) swapped_boot: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum OutcomeKind {
    Committed,
    RolledBack,
    Rejected,
    /// Rollback itself failed: a person must look.
    NeedsAttention,
}

impl OutcomeKind {
    /// As JSON and MQTT spell it (`rolled_back`).
    pub(crate) fn wire_name(self) -> &'static str {
        match self {
            OutcomeKind::Committed => "committed",
            OutcomeKind::RolledBack => "rolled_back",
            OutcomeKind::Rejected => "rejected",
            OutcomeKind::NeedsAttention => "needs_attention",
        }
    }

    /// As a person reads it (`rolled back`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            OutcomeKind::Committed => "committed",
            OutcomeKind::RolledBack => "rolled back",
            OutcomeKind::Rejected => "rejected",
            OutcomeKind::NeedsAttention => "failed, needs attention",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Outcome {
    pub(crate) outcome: OutcomeKind,
    pub(crate) release: String,
    pub(crate) version: String,
    pub(crate) from_version: Option<String>,
    pub(crate) sequence: Option<u64>,
    pub(crate) strategy: Option<Strategy>,
    pub(crate) reason: Option<String>,
    pub(crate) at: String,
    /// Rolled back because beamup itself was interrupted (power cut, kill),
    /// not because of the release: such a release may be offered again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(crate) interrupted: bool,
    /// How long each step took (verifying, unpacking, installing or
    /// restarting, soaking, committing, rolling back), in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) steps: Vec<StepTime>,
    /// Rolled back: the step that failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) failed_step: Option<String>,
}

/// One step of an install and its duration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StepTime {
    pub(crate) step: String,
    pub(crate) ms: u64,
}

impl Outcome {
    /// A bundle or offer refused before anything changed; `m` when its
    /// manifest was read far enough to name the release.
    pub(crate) fn rejected(
        m: Option<&crate::release::manifest::Manifest>,
        release: &str,
        reason: String,
    ) -> Outcome {
        Outcome {
            outcome: OutcomeKind::Rejected,
            release: m.map_or(release.to_string(), |m| m.release.name.clone()),
            version: m.map_or("unknown".into(), |m| m.release.version.clone()),
            from_version: None,
            sequence: m.map(|m| m.sequence),
            strategy: None,
            reason: Some(reason),
            at: crate::release::manifest::format_time(std::time::SystemTime::now()),
            interrupted: false,
            steps: Vec::new(),
            failed_step: None,
        }
    }
}

/// The state directory, locked for this process.
pub(crate) struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl Store {
    /// Opens (creating, mode 0700) the state directory and takes its lock.
    pub(crate) fn open(dir: &Path) -> Result<(Store, DeviceState)> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .ctx(dir, "create state directory")?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .mode(0o600)
            .open(&lock_path)
            .ctx(&lock_path, "open")?;
        // Held until the Store is dropped; the kernel releases it if the
        // process dies, so a kill -9 never leaves a stale lock behind.
        let lock =
            Flock::lock(lock, FlockArg::LockExclusiveNonblock).map_err(|(_, e)| Error::Busy {
                path: lock_path.clone(),
                detail: e.to_string(),
            })?;
        let store = Store {
            dir: dir.to_path_buf(),
            _lock: lock,
        };
        let state = store.load()?;
        Ok((store, state))
    }

    fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    fn load(&self) -> Result<DeviceState> {
        Self::peek(&self.dir)
    }

    /// Reads the state without taking the lock (for `beamup status`).
    pub(crate) fn peek(dir: &Path) -> Result<DeviceState> {
        let path = dir.join(STATE_FILE);
        if !path.exists() {
            return Ok(DeviceState::default());
        }
        let bytes = fsutil::read_limited(&path, LIMITS.state_file_bytes, "state file")?;
        serde_json::from_slice(&bytes).map_err(|e| Error::State {
            path: path.clone(),
            detail: e.to_string(),
        })
    }

    /// Writes the whole state atomically and durably.
    pub(crate) fn save(&self, state: &DeviceState) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        bytes.push(b'\n');
        fsutil::write_atomic(&self.path(), 0o600, true, &bytes)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl DeviceState {
    /// Records an outcome: clears the journal, keeps a bounded history, and
    /// on commit remembers the sequence number; a final outcome is
    /// remembered in `decided` for good. A rejection of input that could not
    /// be verified is only counted in `discarded`: it says nothing about a
    /// release and must not push real outcomes out of the history.
    pub(crate) fn finish(&mut self, outcome: Outcome) {
        if outcome.outcome != OutcomeKind::NeedsAttention {
            self.current = None;
        }
        self.record(outcome);
    }

    /// Records a refusal decided outside an install (an offer refused
    /// before any data was fetched, or input that never verified). The
    /// journal stays as it is: it may hold an install that needs attention,
    /// which `beamup recover` must still find.
    pub(crate) fn refused(&mut self, outcome: Outcome) {
        self.record(outcome);
    }

    fn record(&mut self, outcome: Outcome) {
        if is_unverified(&outcome) {
            self.discarded
                .add(outcome.reason.as_deref().unwrap_or("unknown"), &outcome.at);
            return;
        }
        if outcome.outcome == OutcomeKind::Committed
            && let Some(seq) = outcome.sequence
        {
            self.last_sequence = Some(self.last_sequence.map_or(seq, |s| s.max(seq)));
        }
        self.forget_interrupted();
        self.decided = remember(
            std::mem::take(&mut self.decided),
            &outcome,
            self.last_sequence,
            DECIDED,
        );
        self.history.insert(0, outcome);
        self.history.truncate(HISTORY);
    }

    /// A rollback recorded as final and then marked `interrupted` in the
    /// history (recovery learns that only after `finish`) is no verdict on
    /// its release: drop it from `decided`.
    fn forget_interrupted(&mut self) {
        let history = &self.history;
        self.decided
            .retain(|d| !history.iter().any(|h| h.interrupted && same_outcome(h, d)));
    }

    pub(crate) fn last_outcome(&self) -> Option<&Outcome> {
        self.history.first()
    }

    /// The final word on this exact bundle (version and sequence), if there
    /// is one: from the memory of decided releases (which nothing else
    /// arriving can push out), else from the history (state files written
    /// before that memory existed).
    pub(crate) fn settled(&self, version: &str, sequence: u64) -> Option<&Outcome> {
        self.final_word(version, sequence, |_| true)
    }

    /// Whether this exact bundle (version and sequence) was rolled back
    /// before; such a bundle is not retried without an explicit request.
    pub(crate) fn rolled_back_before(&self, version: &str, sequence: u64) -> Option<&Outcome> {
        self.final_word(version, sequence, |k| k == OutcomeKind::RolledBack)
    }

    fn final_word(
        &self,
        version: &str,
        sequence: u64,
        kind: impl Fn(OutcomeKind) -> bool,
    ) -> Option<&Outcome> {
        let matches = |o: &&Outcome| {
            o.version == version && o.sequence == Some(sequence) && is_final(o) && kind(o.outcome)
        };
        self.decided
            .iter()
            .rev()
            .filter(|d| {
                !self
                    .history
                    .iter()
                    .any(|h| h.interrupted && same_outcome(h, d))
            })
            .find(matches)
            .or_else(|| self.history.iter().find(matches))
    }
}

/// The same outcome (of the same install), seen in two places.
fn same_outcome(a: &Outcome, b: &Outcome) -> bool {
    a.version == b.version && a.sequence == b.sequence && a.at == b.at
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hot install of thermo 1.1.0 (sequence `seq`) rolling back.
    fn rolling_back(seq: u64) -> Journal {
        Journal {
            release: "thermo".into(),
            from_version: "1.0.0".into(),
            to_version: "1.1.0".into(),
            sequence: seq,
            strategy: Strategy::Hot,
            creates: vec!["releases/1.1.0".into()],
            phase: Phase::RollingBack {
                reason: "unhealthy".into(),
            },
            started_at: "2026-01-01T00:00:00Z".into(),
            swapped_boot: false,
        }
    }

    fn outcome(kind: OutcomeKind, seq: u64) -> Outcome {
        Outcome {
            outcome: kind,
            release: "thermo".into(),
            version: "1.1.0".into(),
            from_version: Some("1.0.0".into()),
            sequence: Some(seq),
            strategy: Some(Strategy::Hot),
            reason: None,
            at: "2026-01-01T00:00:00Z".into(),
            interrupted: false,
            steps: vec![],
            failed_step: None,
        }
    }

    #[test]
    fn only_commits_advance_the_sequence() {
        let mut s = DeviceState::default();
        s.finish(outcome(OutcomeKind::RolledBack, 7));
        assert_eq!(s.last_sequence, None);
        assert!(s.rolled_back_before("1.1.0", 7).is_some());
        assert!(s.rolled_back_before("1.1.0", 8).is_none());
        s.finish(outcome(OutcomeKind::Committed, 9));
        assert_eq!(s.last_sequence, Some(9));
        s.finish(outcome(OutcomeKind::Committed, 3)); // an allowed downgrade
        assert_eq!(s.last_sequence, Some(9));
        assert!(s.settled("1.1.0", 7).is_some());
        s.finish(outcome(OutcomeKind::Rejected, 11));
        assert!(s.settled("1.1.0", 11).is_none(), "a rejection is not final");
    }

    #[test]
    fn no_number_of_later_outcomes_makes_a_device_forget_a_rollback() {
        let mut s = DeviceState::default();
        s.finish(outcome(OutcomeKind::Committed, 5));
        s.finish(outcome(OutcomeKind::RolledBack, 7));
        for i in 0..1000 {
            // Signed offers refused by policy, and input that verified not at all.
            s.finish(outcome(OutcomeKind::Rejected, 100 + i));
            s.finish(Outcome::rejected(None, "thermo", format!("junk {}", i % 3)));
        }
        assert_eq!(s.history.len(), HISTORY);
        assert!(s.history.iter().all(|o| o.sequence.is_some()));
        let o = s.rolled_back_before("1.1.0", 7).expect("remembered");
        assert_eq!(o.outcome, OutcomeKind::RolledBack);
        assert!(s.settled("1.1.0", 7).is_some());
        assert_eq!(
            s.settled("1.1.0", 5).map(|o| o.outcome),
            Some(OutcomeKind::Committed)
        );
        // Junk is counted apart, bounded, and never becomes the last outcome.
        assert_eq!(s.discarded.count, 1000);
        assert_eq!(s.discarded.recent.len(), DISCARDED);
        let only_junk = {
            let mut t = DeviceState::default();
            t.finish(outcome(OutcomeKind::RolledBack, 7));
            for _ in 0..50 {
                t.finish(Outcome::rejected(None, "thermo", "not signed".into()));
            }
            t
        };
        assert_eq!(
            only_junk.last_outcome().map(|o| o.outcome),
            Some(OutcomeKind::RolledBack)
        );
        assert_eq!(only_junk.discarded.recent.len(), 1, "repeats coalesce");
        assert_eq!(only_junk.discarded.recent[0].count, 50);
    }

    #[test]
    fn refusals_outside_an_install_keep_the_journal_of_one_that_needs_attention() {
        let mut s = DeviceState {
            current: Some(rolling_back(7)),
            ..Default::default()
        };
        s.finish(outcome(OutcomeKind::NeedsAttention, 7));
        assert!(s.current.is_some(), "needs attention keeps the journal");
        s.refused(Outcome::rejected(None, "thermo", "not signed".into()));
        s.refused(outcome(OutcomeKind::Rejected, 8));
        assert!(s.current.is_some(), "a refused offer dropped the journal");
        assert_eq!(s.discarded.count, 1);
        assert_eq!(s.last_outcome().map(|o| o.sequence), Some(Some(8)));
    }

    #[test]
    fn a_rollback_because_beamup_was_interrupted_is_not_remembered() {
        let mut s = DeviceState::default();
        s.finish(outcome(OutcomeKind::RolledBack, 7));
        // What recovery does after `finish`: the rollback was beamup's.
        s.history[0].interrupted = true;
        assert!(s.rolled_back_before("1.1.0", 7).is_none());
        assert!(s.settled("1.1.0", 7).is_none());
        s.finish(outcome(OutcomeKind::Rejected, 8));
        assert!(s.decided.is_empty(), "{:?}", s.decided);
        assert!(s.rolled_back_before("1.1.0", 7).is_none());
    }

    #[test]
    fn the_memory_is_bounded_dropping_what_anti_rollback_refuses_anyway() {
        let mut decided = Vec::new();
        decided = remember(decided, &outcome(OutcomeKind::RolledBack, 50), None, 3);
        for seq in [10, 20, 30] {
            decided = remember(decided, &outcome(OutcomeKind::Committed, seq), Some(seq), 3);
        }
        let seqs: Vec<_> = decided.iter().map(|d| d.sequence.unwrap()).collect();
        assert_eq!(seqs, [50, 20, 30], "the rollback above every commit stays");
        // The same release again: one entry, the newest word.
        decided = remember(decided, &outcome(OutcomeKind::Committed, 50), Some(50), 3);
        let seqs: Vec<_> = decided.iter().map(|d| d.sequence.unwrap()).collect();
        assert_eq!(seqs, [20, 30, 50]);
        // Rejections and interrupted rollbacks are no decision.
        let before = decided.clone();
        decided = remember(decided, &outcome(OutcomeKind::Rejected, 60), Some(50), 3);
        let mut interrupted = outcome(OutcomeKind::RolledBack, 61);
        interrupted.interrupted = true;
        decided = remember(decided, &interrupted, Some(50), 3);
        assert_eq!(decided, before);
    }

    #[test]
    fn state_files_without_the_memory_still_answer_from_the_history() {
        let old = r#"{"last_sequence":null,"current":null,"history":[
            {"outcome":"rolled_back","release":"thermo","version":"1.1.0","from_version":"1.0.0",
             "sequence":7,"strategy":"hot","reason":"unhealthy","at":"2026-01-01T00:00:00Z"}]}"#;
        let s: DeviceState = serde_json::from_str(old).unwrap();
        assert!(s.rolled_back_before("1.1.0", 7).is_some());
    }

    #[test]
    fn journal_round_trips_through_json() {
        let s = DeviceState {
            current: Some(rolling_back(5)),
            ..Default::default()
        };
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains(r#""phase":"rolling_back""#), "{text}");
        assert_eq!(serde_json::from_str::<DeviceState>(&text).unwrap(), s);
    }

    #[test]
    fn second_store_on_the_same_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let (_a, _) = Store::open(tmp.path()).unwrap();
        let err = Store::open(tmp.path()).err().expect("locked");
        assert!(matches!(err, Error::Busy { .. }), "{err}");
    }
}
