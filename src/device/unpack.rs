//! `beamup unpack`: a verified bundle's release unpacked into a directory
//! without a node to ask: provisioning a fresh device, or staging a new
//! version beside an installed release (from a USB stick, say).
//!
//! The bundle is verified as `beamup install` verifies it (structure,
//! signatures against the trust root, manifest, expiry and, when an identity
//! is given, target scopes), except for the device's anti-rollback: that
//! needs the node's permanent release and the state directory's last
//! sequence, and is checked when the release is installed. Every chunk is
//! checked against its signed digest on its way to the decompressor, and
//! every tar entry goes through `staging`'s validation and its "create
//! only, never overwrite" rule.
//!
//! What lands in the directory depends on what it holds:
//! - nothing (missing, empty, or only `lost+found`): the whole release, start
//!   scripts, `releases/RELEASES` and ERTS (when the tarball has it)
//!   included, so that `bin/REL` boots it;
//! - an installed release of the same name: only what the new version adds
//!   ([`staging::plan`], exactly what `beamup install` unpacks), beside it;
//!   nothing the installed release owns is touched or made to run.
//!
//! Anything else is refused, and so is a version that is already there. On
//! any failure everything created is removed again.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use crate::bundle::Bundle;
use crate::error::{Error, IoContext, Result};
use crate::release::manifest::Manifest;
use crate::release::policy::{self, DeviceFacts, Identity};
use crate::release::releases_file::{self, OnDisk};
use crate::staging::{self, Plan};
use crate::trust::root::Root;

/// What to unpack where.
#[derive(Clone, Debug)]
pub(crate) struct Request<'a> {
    pub(crate) bundle: &'a Path,
    /// The trust root file the bundle's signatures are checked against.
    pub(crate) trust_root: &'a Path,
    /// The release root to unpack into.
    pub(crate) dir: &'a Path,
    /// Checked against the bundle's target scopes when given.
    pub(crate) identity: Option<Identity>,
    pub(crate) now: SystemTime,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// The directory held no release: the whole release was unpacked.
    Provision,
    /// The directory holds a release of the same name: the new version was
    /// unpacked beside it.
    Stage,
}

impl Mode {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Mode::Provision => "provision",
            Mode::Stage => "stage",
        }
    }
}

/// What an unpack verified and wrote.
#[derive(Debug)]
pub(crate) struct Report {
    pub(crate) mode: Mode,
    pub(crate) manifest: Manifest,
    pub(crate) signed_by: Vec<String>,
    pub(crate) root_version: u64,
    /// Top-level paths created (and there), relative to the directory,
    /// sorted.
    pub(crate) created: Vec<PathBuf>,
    /// Units of the release that were there already and were left as they
    /// are (staging only: shared libraries, the same ERTS).
    pub(crate) present: Vec<PathBuf>,
    pub(crate) files: u64,
    pub(crate) bytes: u64,
}

/// Top-level directories that units live in; created by the unpack when
/// missing, and removed again on failure only then.
const CONTAINERS: [&str; 3] = ["bin", "lib", "releases"];

/// Verifies the bundle, then unpacks its release into `req.dir` (see the
/// module doc). Returns what was written; on error nothing is left behind.
pub(crate) fn unpack(req: &Request) -> Result<Report> {
    let root = Root::load(req.trust_root)?;
    let bundle = Bundle::open(req.bundle)?;
    let (m, signed_by) = bundle.verify_manifest(&root)?;
    let facts = DeviceFacts {
        installed_version: None,
        last_sequence: None,
        identity: req.identity.clone(),
    };
    policy::check(&m, req.now, &facts)?;

    let dir = req.dir;
    let (mode, exists) = inspect(dir, &m)?;
    // The outermost directory this creates, to remove on failure.
    let made = (!exists).then(|| {
        let mut top = dir;
        for a in dir.ancestors().skip(1) {
            if a.as_os_str().is_empty() || a.symlink_metadata().is_ok() {
                break;
            }
            top = a;
        }
        top.to_path_buf()
    });
    if let Some(top) = &made
        && let Err(e) = fs::create_dir_all(dir)
    {
        let _ = fs::remove_dir_all(top); // what it made before failing
        return Err(Error::io(dir, "create directory", e));
    }
    let had: Vec<bool> = CONTAINERS
        .iter()
        .map(|c| dir.join(c).symlink_metadata().is_ok())
        .collect();
    let mut plan = Plan {
        creates: Vec::new(),
    };
    match place(dir, made.as_deref(), mode, &bundle, &m, &mut plan) {
        Ok(u) => {
            // The plan lists what the release may add; a mix release has
            // no bin/REL-VSN, so report what is there now (nothing of the
            // plan existed before).
            let mut created: Vec<PathBuf> = plan
                .creates
                .into_iter()
                .filter(|p| dir.join(p).symlink_metadata().is_ok())
                .collect();
            created.sort();
            let mut present: Vec<PathBuf> = units(&m)
                .into_iter()
                .filter(|p| !created.contains(p) && dir.join(p).symlink_metadata().is_ok())
                .collect();
            present.sort();
            Ok(Report {
                mode,
                manifest: m,
                signed_by,
                root_version: root.version,
                created,
                present,
                files: u.files,
                bytes: u.bytes,
            })
        }
        Err(e) => {
            undo(dir, &plan, made.as_deref(), &had);
            Err(e)
        }
    }
}

/// Provision or stage, and whether `dir` exists.
fn inspect(dir: &Path, m: &Manifest) -> Result<(Mode, bool)> {
    match fs::metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((Mode::Provision, false)),
        Err(e) => return Err(Error::io(dir, "stat", e)),
        Ok(meta) if !meta.is_dir() => {
            return Err(Error::Exists {
                path: dir.to_path_buf(),
            });
        }
        Ok(_) => {}
    }
    let empty = fs::read_dir(dir)
        .ctx(dir, "read directory")?
        .all(|e| e.is_ok_and(|e| e.file_name() == "lost+found"));
    if empty {
        return Ok((Mode::Provision, true));
    }
    let name = &m.release.name;
    let rel_file = format!("{name}.rel");
    let holds_release = fs::read_dir(dir.join("releases"))
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.path().join(&rel_file).is_file())
        })
        .unwrap_or(false);
    if !holds_release {
        return Err(Error::Refused {
            reason: format!(
                "{} is neither empty nor the root of a release {name} (no releases/VSN/{rel_file} in it); \
                 unpack provisions an empty directory, or adds a version beside an installed release of the same name",
                dir.display()
            ),
        });
    }
    let version_dir = dir.join("releases").join(&m.release.version);
    if version_dir.symlink_metadata().is_ok() {
        return Err(Error::Exists { path: version_dir });
    }
    Ok((Mode::Stage, true))
}

/// Plans (into `plan`, so that a failure can be undone) and unpacks.
fn place(
    dir: &Path,
    made: Option<&Path>,
    mode: Mode,
    bundle: &Bundle,
    m: &Manifest,
    plan: &mut Plan,
) -> Result<staging::Unpacked> {
    crate::engine::install::check_space(dir, m.tarball.unpacked_size)?;
    let own = staging::plan(dir, &m.release.name, m);
    *plan = match mode {
        Mode::Stage => own,
        Mode::Provision => {
            // Everything the tarball holds, and the units its manifest
            // names, which the unpack then requires to be there.
            let mut all = staging::plan_all(dir, m, bundle)?;
            for p in own.creates {
                if !all.creates.contains(&p) {
                    all.creates.push(p);
                }
            }
            all
        }
    };
    let unpacked = staging::unpack(dir, plan, m, bundle)?;
    if mode == Mode::Provision {
        write_missing_releases_file(dir, m, plan)?;
    }
    // "Unpacked" must mean on disk: the next step may be a power cut.
    crate::engine::install::sync_new(dir, &plan.creates)?;
    // And the directories that gained `bin/`, `lib/`, `releases/` or `dir`
    // itself.
    crate::fsutil::sync_dir(dir)?;
    if let Some(parent) = made
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
    {
        crate::fsutil::sync_dir(parent)?;
    }
    Ok(unpacked)
}

/// `mix release` and relx without ERTS ship no `releases/RELEASES`;
/// without one, release_handler on the provisioned device would describe
/// the booted release with no libraries (see `releases_file`). Written
/// from the `.rel` of the version that boots, as
/// `release_handler:create_RELEASES` would, and listed as created.
fn write_missing_releases_file(dir: &Path, m: &Manifest, plan: &mut Plan) -> Result<()> {
    let path = Path::new("releases").join("RELEASES");
    if dir.join(&path).symlink_metadata().is_ok() {
        return Ok(());
    }
    let disk = OnDisk::read(dir, &m.release.name)?;
    let boots = disk.boots().unwrap_or(&m.release.version).to_string();
    if let Some(entries) = releases_file::repaired(&disk, &boots) {
        plan.creates.push(path);
        releases_file::write_releases(dir, &entries)?;
    }
    Ok(())
}

/// The units the manifest names (libraries and ERTS).
fn units(m: &Manifest) -> Vec<PathBuf> {
    let mut u: Vec<PathBuf> = m.apps.iter().map(|a| Path::new("lib").join(a)).collect();
    if m.includes_erts {
        u.push(PathBuf::from(format!("erts-{}", m.erts)));
    }
    u
}

/// Removes what a failed unpack created: the directories it made for
/// `dir` (`made`: the outermost), otherwise the planned paths and the
/// containers it had to create.
fn undo(dir: &Path, plan: &Plan, made: Option<&Path>, had: &[bool]) {
    let result = if let Some(top) = made {
        fs::remove_dir_all(top).ctx(top, "remove")
    } else {
        staging::remove(dir, plan).map(|()| {
            for (c, had) in CONTAINERS.iter().zip(had) {
                if !had {
                    let _ = fs::remove_dir(dir.join(c)); // only if empty
                }
            }
        })
    };
    if let Err(e) = result {
        tracing::warn!("could not remove what the failed unpack created: {e}");
    }
}
