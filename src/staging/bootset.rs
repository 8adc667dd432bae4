//! What a release on the device may boot from, and the one function that
//! deletes anything from a release root.
//!
//! The invariant: cleanup, rollback, recovery and pruning never delete a
//! path that a release on the device may boot from, whatever
//! release_handler reports. That set (the *boot set*) is computed from
//! disk, not from the node: release_handler's view of a root without
//! RELEASES (every `mix release`, relx without ERTS) lists no libraries and
//! no ERTS, and a `remove_release` trusting it deletes the running
//! release's kernel, stdlib and ERTS. So beamup never calls
//! `remove_release`; it tells release_handler to forget a release
//! (`set_removed`) and deletes, through [`remove`], only paths it created
//! itself and named in its journal first, less the boot set.
//!
//! The boot set, for a release root of release `NAME`:
//! - `bin/` (start scripts, `nodetool`, ...), except `bin/NAME-VSN` of the
//!   release being removed;
//! - `releases/COOKIE`, `releases/start_erl.data`, `releases/RELEASES`,
//!   `releases/NAME.rel`;
//! - for every release kept (every `releases/VSN/NAME.rel` on disk and
//!   every RELEASES entry, less the one being removed unless it is the
//!   one that boots, the permanent or the running one): `releases/VSN/`,
//!   each `lib/APP-VSN` its `.rel` or RELEASES entry names, its ERTS;
//! - the ERTS `start_erl.data` names and the one the node runs.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::node::link::Running;
use crate::release::releases_file::OnDisk;

/// Paths of a release root that must not be deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Protected {
    /// Relative to the root: protected with everything inside them.
    paths: BTreeSet<PathBuf>,
    /// The one path under `bin/` that may go: the removed release's own
    /// start script (`bin/NAME-VSN`).
    bin_removable: Option<PathBuf>,
}

/// The boot set of a root (see the module doc). `removing` is the version
/// whose files are about to be deleted; `node` what the node reports, when
/// it answers.
pub(crate) fn protected(
    disk: &OnDisk,
    name: &str,
    removing: Option<&str>,
    node: Option<&Running>,
) -> Protected {
    // Trees: each protected with everything inside it. `lib/` and
    // `releases/` themselves are protected as the parents of trees.
    let mut paths: BTreeSet<PathBuf> = [PathBuf::from("bin")].into();
    for f in ["COOKIE", "start_erl.data", "RELEASES"] {
        paths.insert(Path::new("releases").join(f));
    }
    paths.insert(Path::new("releases").join(format!("{name}.rel")));

    let in_use: BTreeSet<&str> = disk
        .boots()
        .into_iter()
        .chain(
            disk.releases
                .iter()
                .flatten()
                .filter(|e| e.status == "permanent")
                .map(|e| e.vsn.as_str()),
        )
        .chain(
            node.iter()
                .flat_map(|r| [r.permanent.as_str(), r.current.as_str()]),
        )
        .collect();
    let kept = |vsn: &str| removing != Some(vsn) || in_use.contains(vsn);

    let mut erts: BTreeSet<String> = BTreeSet::new();
    for rel in disk.rels.iter().filter(|r| kept(&r.version)) {
        paths.insert(Path::new("releases").join(&rel.version));
        for (app, vsn) in &rel.apps {
            paths.insert(Path::new("lib").join(format!("{app}-{vsn}")));
        }
        erts.insert(rel.erts.clone());
    }
    for e in disk.releases.iter().flatten().filter(|e| kept(&e.vsn)) {
        paths.insert(Path::new("releases").join(&e.vsn));
        for (app, vsn, _dir) in &e.libs {
            // The directory a release boots from is ROOT/lib/APP-VSN
            // whatever RELEASES spells (relative or absolute).
            paths.insert(Path::new("lib").join(format!("{app}-{vsn}")));
        }
        erts.extend(e.erts.clone());
    }
    for v in &in_use {
        paths.insert(Path::new("releases").join(v));
    }
    erts.extend(disk.start_erl.as_ref().map(|(e, _)| e.clone()));
    erts.extend(node.map(|r| r.erts.clone()));
    paths.extend(erts.iter().map(|e| PathBuf::from(format!("erts-{e}"))));

    let bin_removable = removing
        .filter(|v| !in_use.contains(v))
        .map(|v| Path::new("bin").join(format!("{name}-{v}")));
    Protected {
        paths,
        bin_removable,
    }
}

impl Protected {
    /// Whether deleting `p` (relative to the root) would delete or reach
    /// into something a release may boot from.
    pub(crate) fn covers(&self, p: &Path) -> bool {
        if !is_plain_relative(p) {
            return true;
        }
        if self.bin_removable.as_deref() == Some(p) {
            return false;
        }
        if p == Path::new("lib") || p == Path::new("releases") {
            return true;
        }
        self.paths
            .iter()
            .any(|q| q.starts_with(p) || p.starts_with(q))
    }
}

fn is_plain_relative(p: &Path) -> bool {
    p.components().next().is_some() && p.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Deletes the top-level paths `created` (relative to `root`, from the
/// journal) that exist, except those the boot set covers. Returns the ones
/// it kept for that reason; each is logged. Idempotent.
pub(crate) fn remove(root: &Path, created: &[PathBuf], keep: &Protected) -> Result<Vec<PathBuf>> {
    let mut kept = Vec::new();
    for p in created {
        if keep.covers(p) {
            tracing::warn!(
                "not deleting {}: a release on this device may boot from it",
                p.display()
            );
            kept.push(p.clone());
            continue;
        }
        let full = root.join(p);
        match full.symlink_metadata() {
            Err(_) => {}
            Ok(meta) if meta.is_dir() => fs::remove_dir_all(&full).ctx(&full, "remove")?,
            Ok(_) => fs::remove_file(&full).ctx(&full, "remove")?,
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::release::metadata::Rel;
    use crate::release::releases_file::{Entry, entry_of};

    fn rel(vsn: &str, erts: &str, apps: &[(&str, &str)]) -> Rel {
        Rel {
            name: "thermex".into(),
            version: vsn.into(),
            erts: erts.into(),
            apps: apps
                .iter()
                .map(|(a, v)| (a.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn base() -> Rel {
        rel(
            "1.0.0",
            "13.1.5",
            &[
                ("kernel", "8.5.3"),
                ("stdlib", "4.2"),
                ("elixir", "1.14.0"),
                ("thermex", "1.0.0"),
            ],
        )
    }

    fn next() -> Rel {
        rel(
            "1.1.0",
            "13.1.5",
            &[
                ("kernel", "8.5.3"),
                ("stdlib", "4.2"),
                ("elixir", "1.14.0"),
                ("thermex", "1.1.0"),
            ],
        )
    }

    /// A freshly deployed mix root with 1.1.0 unpacked beside it.
    fn mix_root() -> OnDisk {
        OnDisk {
            rels: vec![base(), next()],
            releases: None,
            releases_unreadable: None,
            start_erl: Some(("13.1.5".into(), "1.0.0".into())),
        }
    }

    fn p(s: &str) -> PathBuf {
        PathBuf::from(s)
    }

    #[test]
    fn removing_a_new_release_keeps_everything_the_base_boots_from() {
        let keep = protected(&mix_root(), "thermex", Some("1.1.0"), None);
        for kept in [
            "lib/kernel-8.5.3",
            "lib/stdlib-4.2",
            "lib/elixir-1.14.0",
            "lib/thermex-1.0.0",
            "erts-13.1.5",
            "releases/1.0.0",
            "releases/1.0.0/thermex.rel",
            "releases/COOKIE",
            "releases/start_erl.data",
            "releases/RELEASES",
            "bin/thermex",
            "bin",
            "lib",
            "releases",
        ] {
            assert!(keep.covers(&p(kept)), "{kept} must be kept");
        }
        for gone in ["lib/thermex-1.1.0", "releases/1.1.0", "bin/thermex-1.1.0"] {
            assert!(!keep.covers(&p(gone)), "{gone} may go");
        }
    }

    #[test]
    fn a_new_erts_goes_only_when_nothing_else_uses_it() {
        let mut disk = mix_root();
        disk.rels[1].erts = "14.0".into();
        let keep = protected(&disk, "thermex", Some("1.1.0"), None);
        assert!(!keep.covers(&p("erts-14.0")));
        assert!(keep.covers(&p("erts-13.1.5")));
        // The node runs on it: kept.
        let running = Running {
            permanent: "1.0.0".into(),
            current: "1.0.0".into(),
            erts: "14.0".into(),
        };
        assert!(protected(&disk, "thermex", Some("1.1.0"), Some(&running)).covers(&p("erts-14.0")));
    }

    #[test]
    fn the_release_that_boots_or_runs_is_never_removable() {
        let mut disk = mix_root();
        disk.start_erl = Some(("13.1.5".into(), "1.1.0".into()));
        let keep = protected(&disk, "thermex", Some("1.1.0"), None);
        assert!(keep.covers(&p("lib/thermex-1.1.0")));
        assert!(keep.covers(&p("releases/1.1.0")));
        assert!(keep.covers(&p("bin/thermex-1.1.0")));
        let running = Running {
            permanent: "1.0.0".into(),
            current: "1.1.0".into(),
            erts: "13.1.5".into(),
        };
        let keep = protected(&mix_root(), "thermex", Some("1.1.0"), Some(&running));
        assert!(keep.covers(&p("lib/thermex-1.1.0")));
    }

    #[test]
    fn releases_entries_protect_their_libs_even_without_a_rel_on_disk() {
        let disk = OnDisk {
            rels: vec![next()],
            releases: Some(vec![
                entry_of(&base(), "permanent"),
                Entry {
                    libs: vec![(
                        "extra".into(),
                        "2.0".into(),
                        "/somewhere/lib/extra-2.0".into(),
                    )],
                    ..entry_of(&rel("0.9.0", "12.0", &[]), "old")
                },
            ]),
            releases_unreadable: None,
            start_erl: None,
        };
        let keep = protected(&disk, "thermex", Some("1.1.0"), None);
        assert!(keep.covers(&p("lib/kernel-8.5.3")));
        assert!(keep.covers(&p("lib/extra-2.0")));
        assert!(keep.covers(&p("erts-12.0")));
        assert!(!keep.covers(&p("lib/thermex-1.1.0")));
    }

    #[test]
    fn paths_that_are_not_plain_are_never_deleted() {
        let keep = protected(&mix_root(), "thermex", Some("1.1.0"), None);
        for bad in ["", "/etc", "../x", "lib/../bin", "./lib/thermex-1.1.0"] {
            assert!(keep.covers(&p(bad)), "{bad:?}");
        }
    }

    #[test]
    fn remove_deletes_only_what_is_not_covered() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        for d in [
            "lib/kernel-8.5.3",
            "lib/thermex-1.1.0/ebin",
            "releases/1.1.0",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        fs::write(root.join("lib/thermex-1.1.0/ebin/x.beam"), b"x").unwrap();
        let keep = protected(&mix_root(), "thermex", Some("1.1.0"), None);
        let created = [
            p("lib/kernel-8.5.3"),
            p("lib/thermex-1.1.0"),
            p("releases/1.1.0"),
            p("erts-13.1.5"),
        ];
        let kept = remove(root, &created, &keep).unwrap();
        assert_eq!(kept, vec![p("lib/kernel-8.5.3"), p("erts-13.1.5")]);
        assert!(root.join("lib/kernel-8.5.3").is_dir());
        assert!(!root.join("lib/thermex-1.1.0").exists());
        assert!(!root.join("releases/1.1.0").exists());
        // Again: nothing left to do, nothing fails.
        assert_eq!(remove(root, &created, &keep).unwrap().len(), 2);
    }
}
