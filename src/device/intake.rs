//! Offer intake, as pure decisions: what an offer that arrives means given
//! what the device already knows. The agent does the effects (verifying
//! the signature, discarding a stale download, starting a transfer).
//!
//! Two steps, cheapest first: by the envelope's digest before anything in
//! it is believed, then by the verified manifest. Then, for an offer taken
//! up, which chunks are fetched (`chunks_to_fetch`), and before its
//! install, whether the plan now reads chunks the download lacks
//! (`chunks_missing`). And after a restart, whether what recovery found is
//! the offer's outcome (`reports_recovered`).

use crate::engine::state::{Outcome, OutcomeKind};
use crate::release::manifest::Manifest;

/// What the envelope's digest alone says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seen {
    /// An empty payload: a retained offer was cleared.
    Cleared,
    /// This exact signed offer was decided before: ignored (and a leftover
    /// download of it discarded).
    DecidedBefore,
    /// This exact offer is being fetched or is about to be installed (a
    /// retained offer delivered again, or to the device and its group).
    InProgress,
    /// Not seen: verify it.
    New,
}

/// Facts about the digest of an arriving offer.
pub(crate) struct DigestFacts<'a> {
    pub(crate) digest: &'a str,
    pub(crate) empty: bool,
    /// Among the signed offers remembered as decided.
    pub(crate) decided: bool,
    /// The digest of the offer being fetched, if any.
    pub(crate) active: Option<&'a str>,
    /// The digest of the offer fetched and waiting for the engine, if any.
    pub(crate) ready: Option<&'a str>,
}

pub(crate) fn by_digest(f: &DigestFacts) -> Seen {
    if f.empty {
        Seen::Cleared
    } else if f.decided {
        Seen::DecidedBefore
    } else if f.active == Some(f.digest) || f.ready == Some(f.digest) {
        Seen::InProgress
    } else {
        Seen::New
    }
}

/// What the verified manifest says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The release (version and sequence) was decided before: ignored and
    /// remembered, unless a retry asks for a rolled-back one again.
    Settled(OutcomeKind),
    /// An offer of this or a higher sequence is being fetched: this one
    /// waits its turn (ignored now).
    Older { fetching: u64 },
    /// Take it up: check it against the node, then fetch it; `replaces`
    /// when a lower sequence's download gives way to it.
    Take { replaces: bool },
}

/// Facts about a verified offer.
pub(crate) struct ManifestFacts {
    pub(crate) sequence: u64,
    /// The device's final word on this release, if any (committed, rolled
    /// back for its own sake, needs attention).
    pub(crate) settled: Option<OutcomeKind>,
    /// An explicit retry command for the last offer.
    pub(crate) retry: bool,
    /// The sequence of the offer being fetched, if any.
    pub(crate) fetching: Option<u64>,
}

pub(crate) fn by_manifest(f: &ManifestFacts) -> Verdict {
    if let Some(kind) = f.settled
        && !(f.retry && kind == OutcomeKind::RolledBack)
    {
        return Verdict::Settled(kind);
    }
    match f.fetching {
        Some(s) if s >= f.sequence => Verdict::Older { fetching: s },
        Some(_) => Verdict::Take { replaces: true },
        None => Verdict::Take { replaces: false },
    }
}

/// Whether the outcome recovery returned after a restart is reported as
/// an outcome. An install undone only because beamup was cut off is no
/// verdict on its release: when the download it installed from is still
/// there (`leftover`, verified) and names the same release and sequence,
/// and the device has no final word on it (`settled`), that offer is taken
/// up again, and what that install ends in is the offer's one outcome.
/// Reporting the undo as well would give one offer two outcomes (rolled
/// back, then committed). Everything else recovery returns is reported.
pub(crate) fn reports_recovered(o: &Outcome, leftover: Option<&Manifest>, settled: bool) -> bool {
    let taken_again = o.interrupted
        && o.outcome == OutcomeKind::RolledBack
        && !settled
        && leftover.is_some_and(|m| {
            m.release.name == o.release
                && m.release.version == o.version
                && Some(m.sequence) == o.sequence
        });
    !taken_again
}

/// The chunks to fetch of an offer taken up, one flag per chunk: what the
/// install's plan reads (`planned`, from the release root as it is now),
/// or every chunk when there is no plan (no node to ask) or the offer's
/// install found a download of planned chunks incomplete before (`everything`:
/// a plan that keeps disagreeing with the engine's cannot loop).
pub(crate) fn chunks_to_fetch(
    chunks: usize,
    planned: Option<Vec<bool>>,
    everything: bool,
) -> Vec<bool> {
    match planned {
        Some(need) if !everything => need,
        _ => vec![true; chunks],
    }
}

/// How many chunks the plan reads that the download lacks: more than none,
/// and the download is taken up again before the install.
pub(crate) fn chunks_missing(need: &[bool], have: &[bool]) -> usize {
    need.iter().zip(have).filter(|&(&n, &h)| n && !h).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest<'a>(d: &'a str) -> DigestFacts<'a> {
        DigestFacts {
            digest: d,
            empty: false,
            decided: false,
            active: None,
            ready: None,
        }
    }

    #[test]
    fn the_digest_says_cleared_decided_in_progress_or_new() {
        assert_eq!(
            by_digest(&DigestFacts {
                empty: true,
                ..digest("")
            }),
            Seen::Cleared
        );
        assert_eq!(
            by_digest(&DigestFacts {
                decided: true,
                active: Some("a"),
                ..digest("a")
            }),
            Seen::DecidedBefore
        );
        assert_eq!(
            by_digest(&DigestFacts {
                active: Some("a"),
                ..digest("a")
            }),
            Seen::InProgress
        );
        assert_eq!(
            by_digest(&DigestFacts {
                ready: Some("a"),
                ..digest("a")
            }),
            Seen::InProgress
        );
        assert_eq!(
            by_digest(&DigestFacts {
                active: Some("b"),
                ..digest("a")
            }),
            Seen::New
        );
    }

    fn offer(sequence: u64) -> ManifestFacts {
        ManifestFacts {
            sequence,
            settled: None,
            retry: false,
            fetching: None,
        }
    }

    #[test]
    fn a_decided_release_is_never_taken_again_unless_a_retry_asks_for_a_rolled_back_one() {
        for kind in [
            OutcomeKind::Committed,
            OutcomeKind::RolledBack,
            OutcomeKind::NeedsAttention,
        ] {
            let f = ManifestFacts {
                settled: Some(kind),
                ..offer(7)
            };
            assert_eq!(by_manifest(&f), Verdict::Settled(kind));
        }
        let retry = ManifestFacts {
            settled: Some(OutcomeKind::RolledBack),
            retry: true,
            ..offer(7)
        };
        assert_eq!(by_manifest(&retry), Verdict::Take { replaces: false });
        let committed = ManifestFacts {
            settled: Some(OutcomeKind::Committed),
            retry: true,
            ..offer(7)
        };
        assert_eq!(
            by_manifest(&committed),
            Verdict::Settled(OutcomeKind::Committed)
        );
    }

    #[test]
    fn newer_replaces_older_and_older_waits() {
        let newer = ManifestFacts {
            fetching: Some(5),
            ..offer(7)
        };
        assert_eq!(by_manifest(&newer), Verdict::Take { replaces: true });
        for fetching in [7, 9] {
            let older = ManifestFacts {
                fetching: Some(fetching),
                ..offer(7)
            };
            assert_eq!(by_manifest(&older), Verdict::Older { fetching });
        }
        assert_eq!(by_manifest(&offer(1)), Verdict::Take { replaces: false });
    }

    #[test]
    fn an_interrupted_undo_is_no_outcome_when_its_download_is_taken_up_again() {
        let mut m = crate::release::manifest::for_tests(b"x", 4096);
        m.release.name = "thermo".into();
        m.release.version = "1.1.0".into();
        m.sequence = 7;
        let mut undo = Outcome::rejected(Some(&m), "thermo", "interrupted while soaking".into());
        undo.outcome = OutcomeKind::RolledBack;
        undo.interrupted = true;
        assert!(!reports_recovered(&undo, Some(&m), false));
        // No download, another release's, or one the device will not take
        // again (a rollback of its own before): the undo is the outcome.
        assert!(reports_recovered(&undo, None, false));
        assert!(reports_recovered(&undo, Some(&m), true));
        let mut other = m.clone();
        other.sequence = 8;
        assert!(reports_recovered(&undo, Some(&other), false));
        // A rollback for the release's own sake, or a finished commit.
        let own = Outcome {
            interrupted: false,
            ..undo.clone()
        };
        assert!(reports_recovered(&own, Some(&m), false));
        let committed = Outcome {
            outcome: OutcomeKind::Committed,
            interrupted: false,
            ..undo
        };
        assert!(reports_recovered(&committed, Some(&m), false));
    }

    #[test]
    fn the_plan_decides_what_is_fetched_unless_everything_is_asked_for() {
        let plan = vec![true, false, true];
        assert_eq!(chunks_to_fetch(3, Some(plan.clone()), false), plan);
        assert_eq!(chunks_to_fetch(3, Some(plan), true), [true; 3]);
        assert_eq!(chunks_to_fetch(3, None, false), [true; 3]);
    }

    #[test]
    fn only_needed_chunks_the_download_lacks_are_missing() {
        let need = [true, true, false, true];
        assert_eq!(chunks_missing(&need, &[true, true, false, true]), 0);
        assert_eq!(chunks_missing(&need, &[true, false, true, false]), 2);
        assert_eq!(chunks_missing(&need, &[false; 4]), 3);
    }
}
