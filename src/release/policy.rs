//! Whether a device accepts a verified manifest: pure decisions over the
//! manifest, the clock and what the device knows about itself. No I/O here,
//! so every rule is unit-tested directly.
//!
//! The order of checks is the order of their usefulness to an operator:
//! an expired manifest (freeze attack, or a stale bundle on a USB stick) is
//! reported before a wrong target, which is reported before anti-rollback.

use std::time::SystemTime;

use crate::error::{Error, Result};
use crate::release::manifest::{Manifest, Scope};
use crate::release::version;

/// Who this device is, for target scopes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Identity {
    pub(crate) fleet: Option<String>,
    pub(crate) device: Option<String>,
    pub(crate) groups: Vec<String>,
}

/// What the device knows that a manifest is checked against.
#[derive(Clone, Debug, Default)]
pub(crate) struct DeviceFacts {
    /// The permanent release's version; `None` when unknown (e.g. `beamup
    /// verify` on an operator's machine without `--installed`).
    pub(crate) installed_version: Option<String>,
    /// The highest sequence number accepted so far.
    pub(crate) last_sequence: Option<u64>,
    /// `None` skips the target check.
    pub(crate) identity: Option<Identity>,
}

pub(crate) fn check(m: &Manifest, now: SystemTime, device: &DeviceFacts) -> Result<()> {
    let expires = m.expires()?;
    if now >= expires {
        return Err(Error::Expired {
            what: format!("manifest for {} {}", m.release.name, m.release.version),
            expired_at: m.expires_at.clone(),
        });
    }
    if let Some(id) = &device.identity
        && !m.scopes().iter().any(|s| matches(s, id))
    {
        return Err(Error::WrongTarget {
            target: m.target.join(", "),
            device: describe(id),
        });
    }
    // A signed allow_downgrade is the operator's explicit word that going
    // back is intended; the expiry bounds how long that word can be replayed.
    if m.allow_downgrade {
        return Ok(());
    }
    if let Some(last) = device.last_sequence
        && m.sequence <= last
    {
        return Err(Error::Replayed {
            sequence: m.sequence,
            last,
        });
    }
    if let Some(installed) = &device.installed_version
        && !version::is_newer(&m.release.version, installed)
    {
        return Err(Error::Downgrade {
            version: m.release.version.clone(),
            installed: installed.clone(),
        });
    }
    Ok(())
}

#[cfg(feature = "operator")]
/// Whether a manifest's target list admits this identity, as the device
/// itself judges it (for an operator's check before offering).
pub fn admits(targets: &[String], id: &Identity) -> bool {
    targets
        .iter()
        .filter_map(|t| Scope::parse(t).ok())
        .any(|s| matches(&s, id))
}

fn matches(scope: &Scope, id: &Identity) -> bool {
    match scope {
        Scope::Any => true,
        Scope::Fleet(f) => id.fleet.as_deref() == Some(f),
        Scope::Group(g) => id.groups.iter().any(|x| x == g),
        Scope::Device(d) => id.device.as_deref() == Some(d),
    }
}

fn describe(id: &Identity) -> String {
    let mut parts = Vec::new();
    if let Some(d) = &id.device {
        parts.push(format!("device:{d}"));
    }
    if let Some(f) = &id.fleet {
        parts.push(format!("fleet:{f}"));
    }
    parts.extend(id.groups.iter().map(|g| format!("group:{g}")));
    if parts.is_empty() {
        "no identity configured".into()
    } else {
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn manifest(version: &str, sequence: u64, target: &[&str]) -> Manifest {
        let mut m = crate::release::manifest::for_tests(b"x", 4096);
        m.release.name = "thermo".into();
        m.release.version = version.into();
        m.erts = "13.1.5".into();
        m.apps = vec!["thermo-1.0.0".into()];
        m.target = target.iter().map(|s| s.to_string()).collect();
        m.sequence = sequence;
        m
    }

    fn at(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    fn device(installed: &str, last: u64) -> DeviceFacts {
        DeviceFacts {
            installed_version: Some(installed.into()),
            last_sequence: Some(last),
            identity: Some(Identity {
                fleet: Some("acme".into()),
                device: Some("gw-1".into()),
                groups: vec!["canary".into()],
            }),
        }
    }

    #[test]
    fn accepts_newer_version_and_sequence() {
        let m = manifest("1.1.0", 10, &["any"]);
        check(&m, at("2026-01-15T00:00:00Z"), &device("1.0.0", 9)).unwrap();
    }

    #[test]
    fn expiry_is_checked_first_and_exactly() {
        let m = manifest("0.1.0", 1, &["device:other"]);
        let err = check(&m, at("2026-02-01T00:00:00Z"), &device("1.0.0", 9)).unwrap_err();
        assert!(matches!(err, Error::Expired { .. }), "{err}");
        let just_before = at("2026-02-01T00:00:00Z") - Duration::from_secs(1);
        let err = check(&m, just_before, &device("1.0.0", 9)).unwrap_err();
        assert!(matches!(err, Error::WrongTarget { .. }), "{err}");
    }

    #[test]
    fn downgrade_and_replay_are_refused_unless_allowed() {
        let now = at("2026-01-15T00:00:00Z");
        let err = check(&manifest("1.0.0", 10, &["any"]), now, &device("1.0.0", 9)).unwrap_err();
        assert!(matches!(err, Error::Downgrade { .. }), "{err}");
        let err = check(&manifest("2.0.0", 9, &["any"]), now, &device("1.0.0", 9)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::Replayed {
                    sequence: 9,
                    last: 9
                }
            ),
            "{err}"
        );
        let mut m = manifest("0.9.0", 3, &["any"]);
        m.allow_downgrade = true;
        check(&m, now, &device("1.0.0", 9)).unwrap();
    }

    #[test]
    fn target_scopes() {
        let now = at("2026-01-15T00:00:00Z");
        let d = device("1.0.0", 1);
        for ok in [
            &["fleet:acme"][..],
            &["group:canary"],
            &["device:gw-1"],
            &["group:x", "device:gw-1"],
        ] {
            check(&manifest("1.1.0", 2, ok), now, &d).unwrap();
        }
        for bad in [&["fleet:other"][..], &["group:eu"], &["device:gw-2"]] {
            let err = check(&manifest("1.1.0", 2, bad), now, &d).unwrap_err();
            assert!(err.to_string().contains("device:gw-1"), "{err}");
        }
        // No identity given: targets are not checked.
        let anon = DeviceFacts::default();
        check(&manifest("1.1.0", 2, &["device:gw-2"]), now, &anon).unwrap();
    }
}
