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

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";
const STATE_LIMIT: u64 = 16 * 1024 * 1024;
/// How many past outcomes to keep for `beamup status`.
const HISTORY: usize = 20;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceState {
    /// The highest sequence number of a committed release.
    pub last_sequence: Option<u64>,
    /// The install in progress, if any: the journal.
    pub current: Option<Journal>,
    /// Most recent first.
    #[serde(default)]
    pub history: Vec<Outcome>,
    /// For each release beamup installed and committed, the paths its
    /// unpack created: the only files pruning that release may delete.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub installed: BTreeMap<String, Vec<PathBuf>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// `release_handler:install_release/1` through the relup, no restart.
    Hot,
    /// Restart the node into the new release.
    Cold,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase")]
pub enum Phase {
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
    pub fn name(&self) -> &'static str {
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
pub struct Journal {
    pub release: String,
    pub from_version: String,
    pub to_version: String,
    pub sequence: u64,
    pub strategy: Strategy,
    /// Paths (relative to the release root) the unpack creates.
    pub creates: Vec<PathBuf>,
    #[serde(flatten)]
    pub phase: Phase,
    pub started_at: String,
    /// `bin/REL` was pointed at the new release (a copy of the old script
    /// is in the state dir); rollback must restore it.
    #[serde(default)]
    pub swapped_boot: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    Committed,
    RolledBack,
    Rejected,
    /// Rollback itself failed: a person must look.
    NeedsAttention,
}

impl OutcomeKind {
    pub fn name(self) -> &'static str {
        match self {
            OutcomeKind::Committed => "committed",
            OutcomeKind::RolledBack => "rolled back",
            OutcomeKind::Rejected => "rejected",
            OutcomeKind::NeedsAttention => "failed, needs attention",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub outcome: OutcomeKind,
    pub release: String,
    pub version: String,
    pub from_version: Option<String>,
    pub sequence: Option<u64>,
    pub strategy: Option<Strategy>,
    pub reason: Option<String>,
    pub at: String,
    /// Rolled back because beamup itself was interrupted (power cut, kill),
    /// not because of the release: such a release may be offered again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub interrupted: bool,
}

impl Outcome {
    /// A bundle or offer refused before anything changed; `m` when its
    /// manifest was read far enough to name the release.
    pub fn rejected(
        m: Option<&crate::manifest::Manifest>,
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
            at: crate::manifest::format_time(std::time::SystemTime::now()),
            interrupted: false,
        }
    }
}

/// The state directory, locked for this process.
pub struct Store {
    dir: PathBuf,
    _lock: Flock<File>,
}

impl Store {
    /// Opens (creating, mode 0700) the state directory and takes its lock.
    pub fn open(dir: &Path) -> Result<(Store, DeviceState)> {
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
    pub fn peek(dir: &Path) -> Result<DeviceState> {
        let path = dir.join(STATE_FILE);
        if !path.exists() {
            return Ok(DeviceState::default());
        }
        let bytes = fsutil::read_limited(&path, STATE_LIMIT, "state file")?;
        serde_json::from_slice(&bytes).map_err(|e| Error::State {
            path: path.clone(),
            detail: e.to_string(),
        })
    }

    /// Writes the whole state atomically and durably.
    pub fn save(&self, state: &DeviceState) -> Result<()> {
        let mut bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        bytes.push(b'\n');
        fsutil::write_atomic(&self.path(), 0o600, true, &bytes)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl DeviceState {
    /// Records an outcome: clears the journal, keeps a bounded history, and
    /// on commit remembers the sequence number.
    pub fn finish(&mut self, outcome: Outcome) {
        if outcome.outcome == OutcomeKind::Committed
            && let Some(seq) = outcome.sequence
        {
            self.last_sequence = Some(self.last_sequence.map_or(seq, |s| s.max(seq)));
        }
        if outcome.outcome != OutcomeKind::NeedsAttention {
            self.current = None;
        }
        self.history.insert(0, outcome);
        self.history.truncate(HISTORY);
    }

    pub fn last_outcome(&self) -> Option<&Outcome> {
        self.history.first()
    }

    /// The final word on this exact bundle (version and sequence), if there
    /// is one: committed, rolled back for its own sake (not because beamup
    /// was interrupted), or left needing attention. Rejections are not
    /// final: the reason may have been passing (the node was down).
    pub fn settled(&self, version: &str, sequence: u64) -> Option<&Outcome> {
        self.history.iter().find(|o| {
            o.version == version
                && o.sequence == Some(sequence)
                && match o.outcome {
                    OutcomeKind::Committed | OutcomeKind::NeedsAttention => true,
                    OutcomeKind::RolledBack => !o.interrupted,
                    OutcomeKind::Rejected => false,
                }
        })
    }

    /// Whether this exact bundle (version and sequence) was rolled back
    /// before; such a bundle is not retried without an explicit request.
    pub fn rolled_back_before(&self, version: &str, sequence: u64) -> Option<&Outcome> {
        self.history.iter().find(|o| {
            o.outcome == OutcomeKind::RolledBack
                && !o.interrupted
                && o.version == version
                && o.sequence == Some(sequence)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn journal_round_trips_through_json() {
        let s = DeviceState {
            current: Some(Journal {
                release: "thermo".into(),
                from_version: "1.0.0".into(),
                to_version: "1.1.0".into(),
                sequence: 5,
                strategy: Strategy::Hot,
                creates: vec!["releases/1.1.0".into()],
                phase: Phase::RollingBack {
                    reason: "unhealthy".into(),
                },
                started_at: "2026-01-01T00:00:00Z".into(),
                swapped_boot: false,
            }),
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
