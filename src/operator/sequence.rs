//! Default sequence numbers of `beamup bundle`.
//!
//! A device refuses a bundle whose sequence is not above the last one it
//! committed, so two bundles must never share one. Seconds since the epoch
//! (the old default) collide when a CI job bundles several versions in one
//! second. The default is now milliseconds since the epoch times 1024 plus
//! 10 low bits drawn at random once per bundling user and machine, and
//! never below the last number that user issued plus one (kept in a file
//! under a lock): strictly increasing on one machine even within a
//! millisecond or across a clock step back, distinct across machines in
//! the same millisecond but for a 1 in 1024 chance, above every
//! seconds-based number, and below 2^53 (until the year 2248), so that
//! JSON readers in every language read it exactly.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

/// The largest sequence number JSON readers read exactly (2^53 - 1).
pub const MAX: u64 = (1 << 53) - 1;
const LOW_BITS: u32 = 10;

/// What one user's machine remembers between bundles.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    /// The random low bits of this machine (below 1024).
    pub machine: u64,
    /// The last sequence number issued here.
    pub last: u64,
}

/// The next sequence number at `now_ms` for this machine's low bits and
/// the last number it issued: `None` past [`MAX`].
pub fn next(now_ms: u64, machine: u64, last: Option<u64>) -> Option<u64> {
    let by_clock = now_ms
        .checked_mul(1 << LOW_BITS)?
        .checked_add(machine % (1 << LOW_BITS))?;
    let seq = by_clock.max(last.map_or(0, |l| l.saturating_add(1)));
    (seq <= MAX).then_some(seq)
}

/// Where the last issued number is kept: `$XDG_STATE_HOME/beamup/`, else
/// `$HOME/.local/state/beamup/`.
pub fn state_file() -> Result<PathBuf> {
    let base = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| Path::new(v).is_absolute())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|h| PathBuf::from(h).join(".local/state"))
        })
        .ok_or_else(|| {
            Error::Usage(
                "neither XDG_STATE_HOME nor HOME is set, so the last sequence number cannot be kept; \
                 set one, or give --sequence"
                    .into(),
            )
        })?;
    Ok(base.join("beamup").join("bundle-sequence.json"))
}

/// Issues the next sequence number at `now` and records it, under an
/// exclusive lock so that concurrent `beamup bundle` runs of one user get
/// distinct numbers.
pub fn issue(now: SystemTime) -> Result<u64> {
    let path = state_file()?;
    let dir = path.parent().expect("has a parent");
    fs::create_dir_all(dir).ctx(dir, "create directory")?;
    let lock_path = path.with_extension("lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .ctx(&lock_path, "open")?;
    let _lock: Flock<File> = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| Error::io(&lock_path, "lock", e.into()))?;
    let before: Option<Issued> = match read_record(&path) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| Error::Usage(format!(
            "{}: not a record of the last sequence number ({e}); remove it (the next bundle starts from the clock) or give --sequence",
            path.display()
        )))?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io(&path, "read", e)),
    };
    let machine = match before {
        Some(b) => b.machine % (1 << LOW_BITS),
        None => {
            let mut r = [0u8; 2];
            getrandom::fill(&mut r).map_err(|e| Error::Internal {
                detail: format!("no OS randomness: {e}"),
            })?;
            u64::from(u16::from_le_bytes(r)) % (1 << LOW_BITS)
        }
    };
    let now_ms = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let seq = next(now_ms, machine, before.map(|b| b.last)).ok_or_else(|| {
        Error::Usage(format!(
            "the next sequence number would exceed 2^53 - 1 (last issued: {}, in {}); give --sequence",
            before.map_or(0, |b| b.last),
            path.display()
        ))
    })?;
    let record = serde_json::to_vec(&Issued { machine, last: seq }).expect("json");
    crate::fsutil::write_atomic(&path, 0o644, true, &record)?;
    Ok(seq)
}

/// The record file's bytes, refused above `LIMITS.sequence_record_bytes`.
fn read_record(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let limit = crate::limits::LIMITS.sequence_record_bytes;
    let mut buf = Vec::new();
    File::open(path)?.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(std::io::Error::other(format!(
            "more than {limit} bytes: not a record of the last sequence number"
        )));
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_grow_stay_exact_in_json_and_above_seconds() {
        let ms = 1_780_000_000_123; // 2026
        let a = next(ms, 5, None).unwrap();
        assert_eq!(a, ms * 1024 + 5);
        assert!(a > ms / 1000 * 1000, "above every seconds-based number");
        // The same millisecond, or a clock stepped back: still above.
        assert_eq!(next(ms, 5, Some(a)), Some(a + 1));
        assert_eq!(next(ms - 10_000, 5, Some(a + 1)), Some(a + 2));
        // Another machine in the same millisecond differs.
        assert_ne!(next(ms, 6, None), Some(a));
        // Year 2200 still fits; a last number near the limit does not grow past it.
        assert!(next(7_258_118_400_000, 1023, None).is_some());
        assert_eq!(next(ms, 0, Some(MAX)), None);
        assert_eq!(next(u64::MAX / 2, 0, None), None);
    }
}
