//! A campaign's state: what the controller decided and what it learned,
//! changed in memory by `decide` and written in one explicit step
//! ([`Store::save`]: a whole new `campaign.json`, fsynced, renamed into
//! place) before any effect of those decisions goes out.
//!
//! ```text
//! CAMPAIGNS/ID/campaign.json   this state (also published, retained, as the campaign's view)
//! CAMPAIGNS/ID/offer           the signed offer (the bundle's manifest envelope)
//! CAMPAIGNS/ID/revert          the revert bundle's envelope, if the plan has one
//! CAMPAIGNS/ID/lock            held (flock) by the running controller
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use super::plan::{Gate, Plan};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::limits::LIMITS;

pub const FORMAT: u32 = 1;

/// The release a campaign offers (or reverts to).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub name: String,
    pub version: String,
    pub sequence: u64,
    /// SHA-256 (hex) of the signed offer: how a retained offer is
    /// recognised as this campaign's.
    pub digest: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for its start time.
    Scheduled,
    Running,
    /// No new offers until resumed.
    Paused,
    /// No new offers ever; finished once nothing is in flight.
    Aborted,
    Completed,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Scheduled => "scheduled",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Aborted => "aborted",
            Status::Completed => "completed",
        }
    }
}

/// Where one device is with one release (the update, or the revert).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// In a wave not reached yet, or waiting for a slot or to come online.
    Waiting,
    /// Offered; the device has not taken it up yet.
    Offered,
    /// The device is downloading, installing or soaking it.
    Updating,
    /// Rolled back; a retry is due at `retry_at`.
    RetryWait,
    Committed,
    /// Already ran the release: done without an offer.
    AlreadyCurrent,
    RolledBack,
    Rejected,
    NeedsAttention,
    /// No outcome within the plan's `device_timeout`.
    TimedOut,
    /// Not online within the plan's `offline_wait`: never offered.
    Unreached,
    /// Offered, not taken up, and withdrawn by an abort.
    Withdrawn,
    /// The campaign stopped before it was offered.
    NotOffered,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Waiting => "waiting",
            Verdict::Offered => "offered",
            Verdict::Updating => "updating",
            Verdict::RetryWait => "retry_wait",
            Verdict::Committed => "committed",
            Verdict::AlreadyCurrent => "already_current",
            Verdict::RolledBack => "rolled_back",
            Verdict::Rejected => "rejected",
            Verdict::NeedsAttention => "needs_attention",
            Verdict::TimedOut => "timed_out",
            Verdict::Unreached => "unreached",
            Verdict::Withdrawn => "withdrawn",
            Verdict::NotOffered => "not_offered",
        }
    }

    /// Holds one of the `max_in_flight` slots.
    pub fn in_flight(self) -> bool {
        matches!(self, Verdict::Offered | Verdict::Updating)
    }

    pub fn is_failure(self) -> bool {
        matches!(
            self,
            Verdict::RolledBack | Verdict::Rejected | Verdict::NeedsAttention | Verdict::TimedOut
        )
    }
}

/// One device and one release: every time is milliseconds since the
/// epoch. `offered_at` and the deadlines are the controller's clock; the
/// others are the device's own (from its events and state).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Track {
    pub verdict: Option<Verdict>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Offers and retries sent (1 + retries).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offered_at: Option<u64>,
    /// When the current attempt began (the offer, or the last retry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downloaded_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome_at: Option<u64>,
    /// When the controller learned the outcome (soaks count from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled_at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<u64>,
    /// The device-reported time of an outcome already counted (a retry
    /// waits for a newer one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counted_outcome_at: Option<String>,
    /// The device's count of discarded input when offered: a rise names a
    /// device that threw the offer away unread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discarded_before: Option<u64>,
    /// Last time the offer was published, so that its echo from the
    /// broker is awaited before it is published again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_at: Option<u64>,
    /// Last time the retained offer was cleared, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cleared_at: Option<u64>,
    /// Highest event id applied (events come at least once).
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub last_event: u64,
    /// How long each step of the device's install took (its outcome says).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<crate::transport::protocol::StepReport>,
    /// An outcome that came after the device was counted as timed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late: Option<String>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}
fn is_zero_u64(n: &u64) -> bool {
    *n == 0
}

impl Track {
    pub fn verdict(&self) -> Verdict {
        self.verdict.unwrap_or(Verdict::Waiting)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub wave: usize,
    /// What it ran when the campaign started.
    pub before: Option<String>,
    /// What it runs now, as last reported.
    pub after: Option<String>,
    pub update: Track,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revert: Option<Track>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub name: String,
    pub gate: Gate,
    pub devices: Vec<String>,
    pub started_at: Option<u64>,
    /// Every device of it decided.
    pub done_at: Option<u64>,
    /// The next wave starts then.
    pub soak_until: Option<u64>,
    /// Failures an operator accepted by resuming: thresholds count those
    /// after them.
    #[serde(default)]
    pub accepted_failures: u32,
    /// Resumed after falling short of `success`: advances anyway.
    #[serde(default)]
    pub success_waived: bool,
}

/// One line of the campaign's history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    pub at: u64,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Campaign {
    pub format: u32,
    pub id: String,
    pub fleet: String,
    pub prefix: String,
    pub plan: Plan,
    pub target: Target,
    pub revert: Option<Target>,
    pub seed: u64,
    pub created_at: u64,
    pub status: Status,
    #[serde(default)]
    pub reason: Option<String>,
    pub finished_at: Option<u64>,
    /// The wave being rolled out (`waves.len()` when all are done).
    pub wave: usize,
    pub waves: Vec<Wave>,
    pub devices: BTreeMap<String, DeviceRecord>,
    /// Selected devices no wave takes.
    #[serde(default)]
    pub left_out: Vec<String>,
    /// Devices that matched the selection after the start: never added
    /// silently.
    #[serde(default)]
    pub late_joiners: BTreeSet<String>,
    /// The last operator control applied.
    #[serde(default)]
    pub control_seq: u64,
    #[serde(default)]
    pub log: Vec<LogLine>,
}

impl Campaign {
    pub fn finished(&self) -> bool {
        self.finished_at.is_some()
    }

    pub fn log(&mut self, at: u64, text: impl Into<String>) {
        let text = text.into();
        tracing::info!("campaign {}: {text}", self.id);
        self.log.push(LogLine { at, text });
    }
}

/// Where campaigns are kept on the operator's machine: `--campaigns`,
/// else `$BEAMUP_CAMPAIGNS`, else `$XDG_STATE_HOME/beamup/campaigns`, else
/// `~/.local/state/beamup/campaigns`.
pub fn default_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("BEAMUP_CAMPAIGNS").filter(|v| !v.is_empty()) {
        return Ok(PathBuf::from(d));
    }
    let state = crate::operator::sequence::state_file()?;
    Ok(state
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
        .join("campaigns"))
}

/// A campaign's directory.
pub struct Store {
    pub dir: PathBuf,
}

impl Store {
    pub fn new(campaigns: &Path, id: &str) -> Store {
        Store {
            dir: campaigns.join(id),
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("campaign.json")
    }

    pub fn exists(&self) -> bool {
        self.file().exists()
    }

    /// Creates the directory with the offers; refuses an existing one.
    /// Made beside it and renamed into place, so that a campaign either
    /// exists whole or not at all (kill -9 during `campaign start`).
    pub fn create(&self, c: &Campaign, offer: &[u8], revert: Option<&[u8]>) -> Result<()> {
        if self.dir.exists() {
            return Err(Error::Exists {
                path: self.dir.clone(),
            });
        }
        let parent = self.dir.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, "create", e))?;
        let tmp = parent.join(format!(".{}.new-{}", c.id, std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, "create", e))?;
        let staged = Store { dir: tmp.clone() };
        fsutil::write_atomic(&tmp.join("offer"), 0o644, false, offer)?;
        if let Some(r) = revert {
            fsutil::write_atomic(&tmp.join("revert"), 0o644, false, r)?;
        }
        staged.save(c)?;
        std::fs::rename(&tmp, &self.dir).map_err(|e| {
            let _ = std::fs::remove_dir_all(&tmp);
            Error::io(&self.dir, "create", e)
        })?;
        fsutil::sync_dir(parent)
    }

    pub fn offer(&self, revert: bool) -> Result<Vec<u8>> {
        let p = self.dir.join(if revert { "revert" } else { "offer" });
        fsutil::read_limited(&p, LIMITS.manifest_bytes, "campaign offer")
    }

    /// Writes the whole state: a new file, fsynced, renamed into place.
    pub fn save(&self, c: &Campaign) -> Result<()> {
        let bytes = serde_json::to_vec(c).map_err(|e| Error::Internal {
            detail: format!("campaign state: {e}"),
        })?;
        self.save_bytes(&bytes)
    }

    /// Saves a state already serialized (the controller has the bytes).
    pub fn save_bytes(&self, bytes: &[u8]) -> Result<()> {
        fsutil::write_atomic(&self.file(), 0o644, true, bytes)
    }

    pub fn load(&self) -> Result<Campaign> {
        let p = self.file();
        if !p.exists() {
            return Err(Error::Usage(format!(
                "no campaign {} in {} (see `beamup campaign list`, or --campaigns DIR)",
                self.dir
                    .file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
                self.dir
                    .parent()
                    .map_or(String::new(), |d| d.display().to_string())
            )));
        }
        let bytes = fsutil::read_limited(&p, LIMITS.campaign_state_bytes, "campaign state")?;
        let c: Campaign = serde_json::from_slice(&bytes).map_err(|e| Error::State {
            path: p.clone(),
            detail: e.to_string(),
        })?;
        if c.format != FORMAT {
            return Err(Error::State {
                path: p,
                detail: format!("format {} (this beamup reads {FORMAT})", c.format),
            });
        }
        Ok(c)
    }

    /// The controller's lock: a second controller for this campaign on
    /// this machine is refused.
    pub fn lock(&self) -> Result<Flock<File>> {
        let p = self.dir.join("lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| Error::io(&p, "open", e))?;
        Flock::lock(f, FlockArg::LockExclusiveNonblock).map_err(|_| Error::Busy {
            path: p,
            detail: "a controller for this campaign is running on this machine".into(),
        })
    }
}
