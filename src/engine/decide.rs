//! The install engine's decisions, as pure functions of facts: which
//! strategy to use, and what to do when an interrupted install is found.
//!
//! Keeping these apart from the effects (`install`) means every branch is
//! unit-tested here without a node, and the effectful code reads as a
//! straight line that asks, then acts.

use crate::engine::settings::StrategyRule;
use crate::engine::state::{Journal, Phase, Strategy};
pub(crate) use crate::node::link::Running;
use crate::release::manifest::Manifest;

/// How to install a release on a running node, or why not.
/// `running_down_to`: the versions the running release's own relup (on
/// disk) downgrades to; a release older than the running one is installed
/// hot through that down section.
pub(crate) fn strategy(
    m: &Manifest,
    running: &Running,
    running_down_to: &[String],
    rule: StrategyRule,
) -> Result<Strategy, String> {
    if hot(m, running, running_down_to) {
        return Ok(Strategy::Hot);
    }
    let why = strategy_reason(m, running, running_down_to);
    match rule {
        StrategyRule::Auto => Ok(Strategy::Cold),
        StrategyRule::HotOnly => Err(format!(
            "{why}, so it needs a restart, and [install] strategy is hot-only"
        )),
    }
}

fn hot(m: &Manifest, running: &Running, running_down_to: &[String]) -> bool {
    (m.upgrade_from.contains(&running.current) || hot_down(m, running_down_to))
        && m.erts == running.erts
}

/// release_handler reads the target's own relup first and uses the running
/// release's down section only when the target has none.
fn hot_down(m: &Manifest, running_down_to: &[String]) -> bool {
    m.upgrade_from.is_empty() && running_down_to.contains(&m.release.version)
}

/// Why the install of `m` would be hot or cold, in words.
pub(crate) fn strategy_reason(
    m: &Manifest,
    running: &Running,
    running_down_to: &[String],
) -> String {
    if hot(m, running, running_down_to) {
        if !m.upgrade_from.contains(&running.current) {
            return format!(
                "the relup of the running {} downgrades to {} and ERTS stays {}",
                running.current, m.release.version, running.erts
            );
        }
        return format!(
            "its relup upgrades from the running {} and ERTS stays {}",
            running.current, running.erts
        );
    }
    let relup_covers = m.upgrade_from.contains(&running.current) || hot_down(m, running_down_to);
    if !relup_covers {
        let own = if m.upgrade_from.is_empty() {
            format!("{} {} has no relup", m.release.name, m.release.version)
        } else {
            format!(
                "the relup of {} upgrades from {}, not from the running {}",
                m.release.version,
                m.upgrade_from.join(", "),
                running.current
            )
        };
        // Going back: the running release's down section is the other way
        // it could have been hot.
        let going_back = crate::release::version::is_newer(&running.current, &m.release.version);
        if running_down_to.is_empty() || !going_back {
            own
        } else if running_down_to.contains(&m.release.version) {
            format!(
                "{own}; the relup of the running {} downgrades to {}, but release_handler \
                 reads a target's own relup first",
                running.current, m.release.version
            )
        } else {
            format!(
                "{own}, and the relup of the running {} downgrades to {}, not to {}",
                running.current,
                running_down_to.join(", "),
                m.release.version
            )
        }
    } else {
        format!("it changes ERTS from {} to {}", running.erts, m.erts)
    }
}

/// What the node looks like when recovery runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NodeSeen {
    /// Not reachable (down, or restarting).
    Down,
    Up(Running),
}

/// What to do about an install that was interrupted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Recovery {
    /// Nothing reached the node's running code: remove what was unpacked
    /// (and registered), then report the install as rolled back.
    Cleanup { reason: String },
    /// The new release may be running: go back to the old one, then clean up.
    RollBack { reason: String },
    /// The decision to commit was made and the new release runs: finish it.
    FinishCommit,
    /// The node is down: start it first (it boots the permanent release, or
    /// whatever `bin/REL` points at), then decide again.
    StartNode,
}

/// Decides how to make the device consistent after an interruption in
/// `journal`'s phase, given what the node reports now.
pub(crate) fn recovery(journal: &Journal, node: &NodeSeen) -> Recovery {
    let phase = journal.phase.name();
    let interrupted = |what: &str| format!("interrupted while {what} {}", journal.to_version);
    let running = match node {
        NodeSeen::Down => return Recovery::StartNode,
        NodeSeen::Up(r) => r,
    };
    let new_runs = running.current == journal.to_version;
    let new_permanent = running.permanent == journal.to_version;
    match &journal.phase {
        Phase::Unpacking | Phase::Registering => Recovery::Cleanup {
            reason: interrupted(if phase == "unpacking" {
                "unpacking"
            } else {
                "registering"
            }),
        },
        Phase::Installing | Phase::Restarting | Phase::Soaking => {
            if new_runs || new_permanent {
                Recovery::RollBack {
                    reason: interrupted("installing and health-checking"),
                }
            } else {
                Recovery::Cleanup {
                    reason: interrupted("installing"),
                }
            }
        }
        Phase::Committing => {
            if new_runs || new_permanent {
                Recovery::FinishCommit
            } else {
                // The node went back to the old release before the commit
                // completed (it restarted): it never became permanent.
                Recovery::Cleanup {
                    reason: interrupted("committing (the node restarted on the old release)"),
                }
            }
        }
        Phase::RollingBack { reason } => {
            if new_runs || new_permanent {
                Recovery::RollBack {
                    reason: reason.clone(),
                }
            } else {
                Recovery::Cleanup {
                    reason: reason.clone(),
                }
            }
        }
    }
}

/// Whether recovery, finding the node down, puts back what booted before
/// the install (see `Engine::switch_boot`) before starting it: always,
/// unless the commit had begun (then the new release is the one to boot
/// and finish committing).
pub(crate) fn restore_boot_before_start(journal: &Journal) -> bool {
    journal.swapped_boot && journal.phase != Phase::Committing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(version: &str, from: &[&str], erts: &str) -> Manifest {
        let mut m = crate::release::manifest::for_tests(b"x", 4096);
        m.release.name = "thermo".into();
        m.release.version = version.into();
        m.erts = erts.into();
        m.apps = vec![format!("thermo-{version}")];
        m.upgrade_from = from.iter().map(|s| s.to_string()).collect();
        m.downgrade_to = m.upgrade_from.clone();
        m
    }

    fn running(v: &str) -> Running {
        Running {
            permanent: v.into(),
            current: v.into(),
            erts: "13.1.5".into(),
        }
    }

    #[test]
    fn hot_when_relup_covers_and_erts_is_the_same() {
        let m = manifest("1.1.0", &["1.0.0"], "13.1.5");
        assert_eq!(
            strategy(&m, &running("1.0.0"), &[], StrategyRule::Auto),
            Ok(Strategy::Hot)
        );
        assert_eq!(
            strategy(&m, &running("1.0.0"), &[], StrategyRule::HotOnly),
            Ok(Strategy::Hot)
        );
    }

    #[test]
    fn cold_or_refused_otherwise() {
        let no_relup = manifest("2.0.0", &[], "13.1.5");
        assert_eq!(
            strategy(&no_relup, &running("1.0.0"), &[], StrategyRule::Auto),
            Ok(Strategy::Cold)
        );
        let e = strategy(&no_relup, &running("1.0.0"), &[], StrategyRule::HotOnly).unwrap_err();
        assert!(e.contains("has no relup") && e.contains("hot-only"), "{e}");
        let other_from = manifest("1.2.0", &["1.1.0"], "13.1.5");
        let e = strategy(&other_from, &running("1.0.0"), &[], StrategyRule::HotOnly).unwrap_err();
        assert!(
            e.contains("upgrades from 1.1.0, not from the running 1.0.0"),
            "{e}"
        );
        let new_erts = manifest("1.1.0", &["1.0.0"], "14.0");
        assert_eq!(
            strategy(&new_erts, &running("1.0.0"), &[], StrategyRule::Auto),
            Ok(Strategy::Cold)
        );
        let e = strategy(&new_erts, &running("1.0.0"), &[], StrategyRule::HotOnly).unwrap_err();
        assert!(e.contains("changes ERTS from 13.1.5 to 14.0"), "{e}");
    }

    #[test]
    fn hot_downgrade_through_the_running_release_down_section() {
        let old = manifest("1.0.0", &[], "13.1.5");
        let down = vec!["1.0.0".to_string()];
        assert_eq!(
            strategy(&old, &running("1.1.0"), &down, StrategyRule::HotOnly),
            Ok(Strategy::Hot)
        );
        let why = strategy_reason(&old, &running("1.1.0"), &down);
        assert!(
            why.contains("relup of the running 1.1.0 downgrades to 1.0.0"),
            "{why}"
        );
        // Not named in the down section: a restart.
        assert_eq!(
            strategy(&old, &running("1.1.0"), &[], StrategyRule::Auto),
            Ok(Strategy::Cold)
        );
        // A target with a relup of its own: release_handler reads only that.
        let staged = manifest("1.0.0", &["0.9.0"], "13.1.5");
        assert_eq!(
            strategy(&staged, &running("1.1.0"), &down, StrategyRule::Auto),
            Ok(Strategy::Cold)
        );
        let why = strategy_reason(&staged, &running("1.1.0"), &down);
        assert!(why.contains("reads a target's own relup first"), "{why}");
        // Back to a version the down section does not name: both relups
        // are named in the reason.
        let middle = manifest("1.1.0", &["1.0.0"], "13.1.5");
        let why = strategy_reason(&manifest("2.0.0", &[], "13.1.5"), &running("1.1.0"), &down);
        assert_eq!(
            why, "thermo 2.0.0 has no relup",
            "going up: no word of down"
        );
        let why = strategy_reason(&middle, &running("1.6.0"), &down);
        assert_eq!(
            why,
            "the relup of 1.1.0 upgrades from 1.0.0, not from the running 1.6.0, \
             and the relup of the running 1.6.0 downgrades to 1.0.0, not to 1.1.0"
        );
    }

    fn journal(phase: Phase) -> Journal {
        Journal {
            release: "thermo".into(),
            from_version: "1.0.0".into(),
            to_version: "1.1.0".into(),
            sequence: 1,
            strategy: Strategy::Hot,
            creates: vec![],
            phase,
            started_at: String::new(),
            swapped_boot: false,
        }
    }

    #[test]
    fn recovery_by_phase_and_node() {
        let old = NodeSeen::Up(running("1.0.0"));
        let mut new_current = running("1.0.0");
        new_current.current = "1.1.0".into();
        let new_current = NodeSeen::Up(new_current);
        let new_perm = NodeSeen::Up(running("1.1.0"));

        for p in [Phase::Unpacking, Phase::Registering] {
            assert!(matches!(
                recovery(&journal(p.clone()), &old),
                Recovery::Cleanup { .. }
            ));
            assert_eq!(recovery(&journal(p), &NodeSeen::Down), Recovery::StartNode);
        }
        for p in [Phase::Installing, Phase::Restarting, Phase::Soaking] {
            assert!(matches!(
                recovery(&journal(p.clone()), &old),
                Recovery::Cleanup { .. }
            ));
            assert!(matches!(
                recovery(&journal(p), &new_current),
                Recovery::RollBack { .. }
            ));
        }
        assert_eq!(
            recovery(&journal(Phase::Committing), &new_current),
            Recovery::FinishCommit
        );
        assert_eq!(
            recovery(&journal(Phase::Committing), &new_perm),
            Recovery::FinishCommit
        );
        assert!(matches!(
            recovery(&journal(Phase::Committing), &old),
            Recovery::Cleanup { .. }
        ));
        let rb = journal(Phase::RollingBack {
            reason: "unhealthy".into(),
        });
        assert_eq!(
            recovery(&rb, &new_current),
            Recovery::RollBack {
                reason: "unhealthy".into()
            }
        );
        assert_eq!(
            recovery(&rb, &old),
            Recovery::Cleanup {
                reason: "unhealthy".into()
            }
        );
    }

    #[test]
    fn a_switched_boot_is_restored_before_starting_unless_committing() {
        let switched = |phase: Phase| Journal {
            swapped_boot: true,
            ..journal(phase)
        };
        for p in [Phase::Restarting, Phase::Soaking, Phase::Installing] {
            assert!(restore_boot_before_start(&switched(p)));
        }
        assert!(restore_boot_before_start(&switched(Phase::RollingBack {
            reason: "unhealthy".into()
        })));
        assert!(!restore_boot_before_start(&switched(Phase::Committing)));
        assert!(!restore_boot_before_start(&journal(Phase::Restarting)));
    }
}
