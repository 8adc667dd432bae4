//! One error type for the whole crate, each variant carrying the context a
//! person needs at 3 a.m.: what went wrong, where, and what to do about it.
//!
//! Every variant maps to a distinct process exit code (see [`Error::exit_code`])
//! so that scripts and fleet tooling can react without parsing messages. The
//! codes are part of the CLI contract and documented in README.md; never
//! renumber one.

use std::io;
use std::path::{Path, PathBuf};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Exit codes. `0` is success; clap uses `2` for usage errors.
pub mod exit {
    pub const INTERNAL: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const IO: u8 = 3;
    pub const CONFIG: u8 = 4;
    pub const EXISTS: u8 = 5;
    pub const INVALID_KEY: u8 = 6;
    pub const INVALID_ROOT: u8 = 7;
    pub const INVALID_RELEASE: u8 = 8;
    pub const BUSY: u8 = 9;

    // 10..=29: a bundle was rejected. Nothing was written or changed.
    pub const NOT_A_BUNDLE: u8 = 10;
    pub const TRUNCATED: u8 = 11;
    pub const TARBALL_MISMATCH: u8 = 12;
    pub const BAD_SIGNATURE: u8 = 13;
    pub const UNKNOWN_KEY: u8 = 14;
    pub const REVOKED_KEY: u8 = 15;
    pub const THRESHOLD: u8 = 16;
    pub const EXPIRED: u8 = 17;
    pub const DOWNGRADE: u8 = 18;
    pub const REPLAYED: u8 = 19;
    pub const TOO_LARGE: u8 = 20;
    pub const WRONG_TARGET: u8 = 21;
    pub const INVALID_MANIFEST: u8 = 22;
    pub const UNSAFE_TARBALL: u8 = 23;
    pub const REFUSED: u8 = 24;
    pub const NO_SPACE: u8 = 25;
    pub const NODE: u8 = 26;
    /// A download (the agent's) lacks chunks the install would read: the
    /// release root changed after the offer's plan was made.
    pub const INCOMPLETE: u8 = 27;

    /// The MQTT broker could not be reached, refused us, or did not
    /// acknowledge in time.
    pub const MQTT: u8 = 30;
    /// The MQTT broker refused our credentials (username and password,
    /// client certificate, or none given where it wants some).
    pub const MQTT_AUTH: u8 = 31;
    /// `beamup relup` could not make a relup or the tarball holding it.
    pub const RELUP: u8 = 32;
    /// `beamup rehearse`: a step of the rehearsal failed for at least one
    /// from-version (the report says which and why).
    pub const REHEARSAL_FAILED: u8 = 33;
    /// A campaign ended aborted (a threshold, or an operator).
    pub const CAMPAIGN_ABORTED: u8 = 42;

    // Outcomes of an install that got past verification.
    pub const ROLLED_BACK: u8 = 40;
    pub const NEEDS_ATTENTION: u8 = 50;
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },

    #[error("{}: another beamup process holds the lock ({detail}); wait for it to finish", path.display())]
    Busy { path: PathBuf, detail: String },

    #[error("{}: unreadable state file: {detail}; inspect it, then move it away to start afresh", path.display())]
    State { path: PathBuf, detail: String },

    #[error("{}: invalid configuration: {detail}", path.display())]
    Config { path: PathBuf, detail: String },

    #[error("{}: already exists; refusing to overwrite it (move it away or choose another output)", path.display())]
    Exists { path: PathBuf },

    #[error("{}: not a usable key file: {detail}", path.display())]
    InvalidKey { path: PathBuf, detail: String },

    #[error("{}: not a valid trust root: {detail}", path.display())]
    InvalidRoot { path: PathBuf, detail: String },

    #[error("{}: not a usable release tarball: {detail}", path.display())]
    InvalidRelease { path: PathBuf, detail: String },

    #[error("{}: not a beamup bundle: {detail}", path.display())]
    NotABundle { path: PathBuf, detail: String },

    #[error("{}: truncated: {detail}; the copy is incomplete, copy the bundle again", path.display())]
    Truncated { path: PathBuf, detail: String },

    #[error("{}: release tarball does not match the signed manifest: {detail}; the file was altered or corrupted after signing, get a fresh copy", path.display())]
    TarballMismatch { path: PathBuf, detail: String },

    #[error("{}: incomplete download: {detail}; the release root changed since the download was planned, the missing chunks must be fetched first", path.display())]
    Incomplete { path: PathBuf, detail: String },

    #[error(
        "{what}: signature by key {keyid} does not verify; it was altered after signing, or the signature was made over other content"
    )]
    BadSignature { what: String, keyid: String },

    #[error("{what}: signed only by keys this device does not trust ({}); sign with keys listed in the trust root", keyids.join(", "))]
    UnknownKey { what: String, keyids: Vec<String> },

    #[error(
        "{what}: signed by revoked key {keyid}; it was removed from the trust root, re-sign with a current key"
    )]
    RevokedKey { what: String, keyid: String },

    #[error(
        "{what}: {valid} valid signature(s), the trust root requires {needed}; add signatures from more trusted keys"
    )]
    Threshold {
        what: String,
        valid: usize,
        needed: usize,
    },

    #[error("{what}: expired at {expired_at}; re-sign it with a later --expires")]
    Expired { what: String, expired_at: String },

    #[error(
        "release {version} is not newer than the installed release {installed}; refusing a downgrade (bundle it with --allow-downgrade if this is intended)"
    )]
    Downgrade { version: String, installed: String },

    #[error(
        "sequence number {sequence} is not greater than the last accepted {last}; this bundle is a replay of an older one (re-bundle it to get a new sequence number)"
    )]
    Replayed { sequence: u64, last: u64 },

    #[error("{what}: {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { what: String, size: u64, limit: u64 },

    #[error("bundle targets {target}, which does not include this device ({device})")]
    WrongTarget { target: String, device: String },

    #[error("invalid manifest: {detail}")]
    InvalidManifest { detail: String },

    #[error(
        "release tarball refused: {detail}; nothing was installed (the release must be rebuilt by its build tool)"
    )]
    UnsafeTarball { detail: String },

    /// Bundle time: an entry breaks a rule every device applies
    /// (`tarrules`), so the release is not signed.
    #[error(
        "{}: release tarball refused: {detail}; every device would refuse it, so it was not signed (rebuild the release without that entry: only files, directories and links, link targets relative and inside the release, hard links to an earlier file of their own unit)",
        path.display()
    )]
    UnsafeRelease { path: PathBuf, detail: String },

    #[error("refused: {reason}")]
    Refused { reason: String },

    #[error("{}: not enough free space: need {need} bytes, {have} available; free some space and retry", path.display())]
    NoSpace { path: PathBuf, need: u64, have: u64 },

    #[error("node {node}: {doing}: {detail}")]
    Node {
        node: String,
        doing: String,
        detail: String,
    },

    #[error("MQTT broker {url}: {detail}")]
    Mqtt { url: String, detail: String },

    #[error("MQTT broker {url} refused our credentials: {detail}")]
    MqttAuth { url: String, detail: String },

    #[error("{}: cannot make a relup: {detail}", path.display())]
    Relup { path: PathBuf, detail: String },

    #[error("rehearsal failed: {detail}")]
    RehearsalFailed { detail: String },

    #[error("campaign {id} aborted: {reason}")]
    CampaignAborted { id: String, reason: String },

    #[error("{0}")]
    Usage(String),

    /// Something that should not happen did (a task panicked, the OS
    /// refused a thread): a bug or a broken system, not the user's input.
    #[error("internal error: {detail}")]
    Internal { detail: String },
}

impl Error {
    /// The process exit code for this error; stable, see README.md.
    pub fn exit_code(&self) -> u8 {
        use exit::*;
        match self {
            Error::Io { .. } => IO,
            Error::Internal { .. } => INTERNAL,
            Error::Config { .. } => CONFIG,
            Error::Busy { .. } => BUSY,
            Error::State { .. } => NEEDS_ATTENTION,
            Error::Exists { .. } => EXISTS,
            Error::InvalidKey { .. } => INVALID_KEY,
            Error::InvalidRoot { .. } => INVALID_ROOT,
            Error::InvalidRelease { .. } => INVALID_RELEASE,
            Error::NotABundle { .. } => NOT_A_BUNDLE,
            Error::Truncated { .. } => TRUNCATED,
            Error::TarballMismatch { .. } => TARBALL_MISMATCH,
            Error::Incomplete { .. } => INCOMPLETE,
            Error::BadSignature { .. } => BAD_SIGNATURE,
            Error::UnknownKey { .. } => UNKNOWN_KEY,
            Error::RevokedKey { .. } => REVOKED_KEY,
            Error::Threshold { .. } => THRESHOLD,
            Error::Expired { .. } => EXPIRED,
            Error::Downgrade { .. } => DOWNGRADE,
            Error::Replayed { .. } => REPLAYED,
            Error::TooLarge { .. } => TOO_LARGE,
            Error::WrongTarget { .. } => WRONG_TARGET,
            Error::InvalidManifest { .. } => INVALID_MANIFEST,
            Error::UnsafeTarball { .. } | Error::UnsafeRelease { .. } => UNSAFE_TARBALL,
            Error::Refused { .. } => REFUSED,
            Error::NoSpace { .. } => NO_SPACE,
            Error::Node { .. } => NODE,
            Error::Mqtt { .. } => MQTT,
            Error::MqttAuth { .. } => MQTT_AUTH,
            Error::Relup { .. } => RELUP,
            Error::RehearsalFailed { .. } => REHEARSAL_FAILED,
            Error::CampaignAborted { .. } => CAMPAIGN_ABORTED,
            Error::Usage(_) => USAGE,
        }
    }

    /// A short stable name for the error class, for `--json` output.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::Config { .. } => "config",
            Error::Busy { .. } => "busy",
            Error::State { .. } => "state",
            Error::Exists { .. } => "exists",
            Error::InvalidKey { .. } => "invalid_key",
            Error::InvalidRoot { .. } => "invalid_root",
            Error::InvalidRelease { .. } => "invalid_release",
            Error::NotABundle { .. } => "not_a_bundle",
            Error::Truncated { .. } => "truncated",
            Error::TarballMismatch { .. } => "tarball_mismatch",
            Error::Incomplete { .. } => "incomplete",
            Error::BadSignature { .. } => "bad_signature",
            Error::UnknownKey { .. } => "unknown_key",
            Error::RevokedKey { .. } => "revoked_key",
            Error::Threshold { .. } => "threshold",
            Error::Expired { .. } => "expired",
            Error::Downgrade { .. } => "downgrade",
            Error::Replayed { .. } => "replayed",
            Error::TooLarge { .. } => "too_large",
            Error::WrongTarget { .. } => "wrong_target",
            Error::InvalidManifest { .. } => "invalid_manifest",
            Error::UnsafeTarball { .. } | Error::UnsafeRelease { .. } => "unsafe_tarball",
            Error::Refused { .. } => "refused",
            Error::NoSpace { .. } => "no_space",
            Error::Node { .. } => "node",
            Error::Mqtt { .. } => "mqtt",
            Error::MqttAuth { .. } => "mqtt_auth",
            Error::Relup { .. } => "relup",
            Error::RehearsalFailed { .. } => "rehearsal_failed",
            Error::CampaignAborted { .. } => "campaign_aborted",
            Error::Usage(_) => "usage",
            Error::Internal { .. } => "internal",
        }
    }

    pub(crate) fn io(path: impl AsRef<Path>, action: &'static str, source: io::Error) -> Self {
        Error::Io {
            path: path.as_ref().to_path_buf(),
            action,
            source,
        }
    }
}

/// Attach a path and an action to an `io::Result`.
pub(crate) trait IoContext<T> {
    fn ctx(self, path: impl AsRef<Path>, action: &'static str) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, path: impl AsRef<Path>, action: &'static str) -> Result<T> {
        self.map_err(|e| Error::io(path, action, e))
    }
}
