//! The files in `releases/` that say which release boots and what each
//! release consists of, read from disk without a node: every
//! `releases/VSN/NAME.rel`, release_handler's `releases/RELEASES`, and
//! `releases/start_erl.data` (`ERTS_VSN REL_VSN`: what a mix start script,
//! and `run_erl`-based scripts, boot).
//!
//! `mix release` ships no RELEASES, and neither does relx without ERTS.
//! release_handler then describes the booted release with no libraries
//! and no ERTS, and anything it decides from that (which files a
//! `remove_release` deletes, how a downgrade reloads code) goes wrong.
//! [`repaired`] says what RELEASES must hold instead, built from the `.rel`
//! files, as `release_handler:create_RELEASES/4` would write it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::limits::LIMITS;
use crate::release::eterm::{self, Term};
use crate::release::metadata::{self, Rel};

/// One release as `releases/RELEASES` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) name: String,
    pub(crate) vsn: String,
    /// `None` where release_handler wrote `undefined` (a release it only
    /// knew from `init:script_id()`).
    pub(crate) erts: Option<String>,
    /// `(app, vsn, dir)`; `dir` as written (relative to the root or not).
    pub(crate) libs: Vec<(String, String, String)>,
    /// `permanent`, `old`, `unpacked` (RELEASES never says `current`).
    pub(crate) status: String,
}

/// What `releases/` says, as read from disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct OnDisk {
    /// Every `releases/VSN/NAME.rel` that names itself (`NAME`, `VSN`).
    pub(crate) rels: Vec<Rel>,
    /// `releases/RELEASES`: `None` when absent.
    pub(crate) releases: Option<Vec<Entry>>,
    /// Set when RELEASES exists but cannot be read as a release list (a
    /// power cut during release_handler's in-place write truncates it).
    pub(crate) releases_unreadable: Option<String>,
    /// `releases/start_erl.data`: (ERTS version, release version).
    pub(crate) start_erl: Option<(String, String)>,
}

impl OnDisk {
    /// Reads `root/releases`. An unreadable `.rel` or `start_erl.data` is
    /// an error (the caller then deletes nothing); an unreadable RELEASES
    /// is recorded, since repairing it is the point.
    pub(crate) fn read(root: &Path, name: &str) -> Result<OnDisk> {
        let dir = root.join("releases");
        let mut out = OnDisk::default();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(Error::io(&dir, "read directory", e)),
        };
        let mut versions = Vec::new();
        for e in entries {
            let e = e.ctx(&dir, "read directory")?;
            if e.file_type().ctx(e.path(), "stat")?.is_dir()
                && let Some(v) = e.file_name().to_str()
            {
                versions.push(v.to_string());
            }
        }
        if versions.len() > LIMITS.release_dirs {
            return Err(invalid(
                &dir,
                format!("{} release directories", versions.len()),
            ));
        }
        versions.sort();
        for v in versions {
            let path = dir.join(&v).join(format!("{name}.rel"));
            let Some(text) = read_text(&path)? else {
                continue;
            };
            let rel = metadata::parse_rel(&text).map_err(|e| invalid(&path, e))?;
            if rel.name == name && rel.version == v {
                out.rels.push(rel);
            }
        }
        let releases = dir.join("RELEASES");
        if let Some(text) = read_text(&releases)? {
            match parse_releases(&text) {
                Ok(r) => out.releases = Some(r),
                Err(e) => out.releases_unreadable = Some(e),
            }
        }
        let start_erl = dir.join("start_erl.data");
        if let Some(text) = read_text(&start_erl)? {
            out.start_erl = Some(parse_start_erl(&text).map_err(|e| invalid(&start_erl, e))?);
        }
        Ok(out)
    }

    /// The `.rel` of version `vsn`, if it is on disk.
    pub(crate) fn rel(&self, vsn: &str) -> Option<&Rel> {
        self.rels.iter().find(|r| r.version == vsn)
    }

    /// The version the start script boots (`start_erl.data`), else the one
    /// RELEASES has as permanent.
    pub(crate) fn boots(&self) -> Option<&str> {
        self.start_erl
            .as_ref()
            .map(|(_, v)| v.as_str())
            .or_else(|| {
                self.releases
                    .iter()
                    .flatten()
                    .find(|e| e.status == "permanent")
                    .map(|e| e.vsn.as_str())
            })
    }
}

fn invalid(path: &Path, detail: String) -> Error {
    Error::InvalidRelease {
        path: path.to_path_buf(),
        detail,
    }
}

fn read_text(path: &Path) -> Result<Option<String>> {
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, "stat", e)),
        Ok(_) => {}
    }
    let bytes = fsutil::read_limited(path, LIMITS.release_file_bytes, "release file")?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| invalid(path, "not UTF-8 text".into()))
}

/// `ERTS_VSN REL_VSN` (one line, as relx, mix and `make_permanent` write it).
pub(crate) fn parse_start_erl(text: &str) -> std::result::Result<(String, String), String> {
    let mut words = text.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(erts), Some(vsn), None) if is_plain(erts) && is_plain(vsn) => {
            Ok((erts.to_string(), vsn.to_string()))
        }
        _ => Err(format!(
            "expected \"ERTS_VSN REL_VSN\", found {:?}",
            text.chars().take(100).collect::<String>()
        )),
    }
}

/// The text of `start_erl.data` that boots `vsn` on ERTS `erts`.
pub(crate) fn format_start_erl(erts: &str, vsn: &str) -> String {
    format!("{erts} {vsn}\n")
}

fn is_plain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '+'))
}

/// Parses RELEASES: `[{release, Name, Vsn, ErtsVsn, [{App, Vsn, Dir}], Status}]`.
pub(crate) fn parse_releases(text: &str) -> std::result::Result<Vec<Entry>, String> {
    let terms = eterm::parse_terms(text)?;
    let bad = |what: &str| format!("not a RELEASES list ({what})");
    let [list] = terms.as_slice() else {
        return Err(bad("expected one term"));
    };
    let list = list.as_list().ok_or_else(|| bad("expected a list"))?;
    list.iter()
        .map(|t| {
            let Some([tag, name, vsn, erts, libs, status]) = t.as_tuple() else {
                return Err(bad("expected {release, Name, Vsn, Erts, Libs, Status}"));
            };
            if tag.as_atom() != Some("release") {
                return Err(bad("expected the atom release"));
            }
            let s = |t: &Term, what: &str| t.as_str().map(str::to_string).ok_or_else(|| bad(what));
            let erts = match erts {
                Term::Atom(a) if a == "undefined" => None,
                t => Some(s(t, "ERTS version")?),
            };
            let libs = libs
                .as_list()
                .ok_or_else(|| bad("libs"))?
                .iter()
                .map(|l| match l.as_tuple() {
                    Some([app, v, dir]) => Ok((
                        app.as_atom().ok_or_else(|| bad("lib name"))?.to_string(),
                        s(v, "lib version")?,
                        s(dir, "lib dir")?,
                    )),
                    _ => Err(bad("expected {App, Vsn, Dir}")),
                })
                .collect::<std::result::Result<_, _>>()?;
            Ok(Entry {
                name: s(name, "release name")?,
                vsn: s(vsn, "release version")?,
                erts,
                libs,
                status: status.as_atom().ok_or_else(|| bad("status"))?.to_string(),
            })
        })
        .collect()
}

/// RELEASES text as release_handler writes it (and reads it back).
pub(crate) fn format_releases(entries: &[Entry]) -> String {
    let q = |s: &str| {
        let mut o = String::from("\"");
        for c in s.chars() {
            if c == '"' || c == '\\' {
                o.push('\\');
            }
            o.push(c);
        }
        o.push('"');
        o
    };
    let items: Vec<String> = entries
        .iter()
        .map(|e| {
            let libs: Vec<String> = e
                .libs
                .iter()
                .map(|(a, v, d)| format!("{{{a},{},{}}}", q(v), q(d)))
                .collect();
            format!(
                "{{release,{},{},{},[{}],{}}}",
                q(&e.name),
                q(&e.vsn),
                e.erts.as_deref().map_or("undefined".to_string(), q),
                libs.join(","),
                e.status
            )
        })
        .collect();
    format!("%% coding: utf-8\n[{}].\n", items.join(",\n "))
}

/// The entry `create_RELEASES` makes of a `.rel`, with lib dirs relative to
/// the release root (as relx writes them: the root may be mounted
/// elsewhere, as in a container).
pub(crate) fn entry_of(rel: &Rel, status: &str) -> Entry {
    Entry {
        name: rel.name.clone(),
        vsn: rel.version.clone(),
        erts: Some(rel.erts.clone()),
        libs: rel
            .apps
            .iter()
            .map(|(a, v)| (a.clone(), v.clone(), format!("./lib/{a}-{v}")))
            .collect(),
        status: status.to_string(),
    }
}

/// What RELEASES must hold so that release_handler knows what each
/// release on the device consists of, or `None` when it already does.
///
/// `permanent` is the version the node (or the start script) boots. Kept
/// as they are: entries that name their ERTS and libraries. Rebuilt from
/// their `.rel`: entries release_handler made up from `init:script_id()`
/// (no ERTS, no libraries), and the permanent release when RELEASES is
/// missing or unreadable. Dropped: made-up entries with no `.rel` on disk.
pub(crate) fn repaired(disk: &OnDisk, permanent: &str) -> Option<Vec<Entry>> {
    let complete = |e: &Entry| e.erts.is_some() && !e.libs.is_empty();
    let current = disk.releases.clone().unwrap_or_default();
    let permanent_listed = current
        .iter()
        .any(|e| e.vsn == permanent && e.status == "permanent");
    if disk.releases_unreadable.is_none() && permanent_listed && current.iter().all(complete) {
        return None;
    }
    let mut out: Vec<Entry> = Vec::new();
    for e in current {
        if complete(&e) {
            out.push(e);
        } else if let Some(rel) = disk.rel(&e.vsn) {
            out.push(entry_of(rel, &e.status));
        }
    }
    if !out.iter().any(|e| e.vsn == permanent) {
        let rel = disk.rel(permanent)?;
        out.insert(0, entry_of(rel, "permanent"));
    }
    for e in &mut out {
        if e.vsn == permanent {
            e.status = "permanent".into();
        } else if e.status == "permanent" {
            e.status = "old".into();
        }
    }
    Some(out)
}

/// Writes RELEASES atomically and durably (release_handler itself writes
/// it in place).
pub(crate) fn write_releases(root: &Path, entries: &[Entry]) -> Result<PathBuf> {
    let path = root.join("releases").join("RELEASES");
    fsutil::write_atomic(&path, 0o644, true, format_releases(entries).as_bytes())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(vsn: &str) -> Rel {
        Rel {
            name: "thermex".into(),
            version: vsn.into(),
            erts: "13.1.5".into(),
            apps: vec![
                ("kernel".into(), "8.5.3".into()),
                ("thermex".into(), vsn.into()),
            ],
        }
    }

    #[test]
    fn releases_round_trips_through_its_text() {
        let e = vec![entry_of(&rel("1.0.0"), "permanent"), {
            let mut e = entry_of(&rel("0.9.0"), "old");
            e.erts = None;
            e
        }];
        let text = format_releases(&e);
        assert!(text.starts_with("%% coding: utf-8\n[{release,\"thermex\",\"1.0.0\",\"13.1.5\",[{kernel,\"8.5.3\",\"./lib/kernel-8.5.3\"}"), "{text}");
        assert_eq!(parse_releases(&text).unwrap(), e);
    }

    #[test]
    fn reads_what_relx_writes() {
        let text = "%% coding: utf-8\n[{release,\"thermo\",\"1.0.0\",\"13.1.5\",\n  [{kernel,\"8.5.3\",\"./lib/kernel-8.5.3\"}],\n  permanent}].\n";
        let e = parse_releases(text).unwrap();
        assert_eq!(e[0].vsn, "1.0.0");
        assert_eq!(e[0].libs[0].2, "./lib/kernel-8.5.3");
        assert!(parse_releases("[{release,\"thermo\"").is_err());
        assert!(parse_releases("[{other,1}].").is_err());
    }

    #[test]
    fn start_erl_data() {
        assert_eq!(
            parse_start_erl("13.1.5 1.0.0").unwrap(),
            ("13.1.5".into(), "1.0.0".into())
        );
        assert_eq!(parse_start_erl("13.1.5 1.0.0\n").unwrap().1, "1.0.0");
        assert!(parse_start_erl("13.1.5").is_err());
        assert!(parse_start_erl("13.1.5 1.0.0 x").is_err());
        assert!(parse_start_erl("13.1.5 ../../etc").is_err());
    }

    #[test]
    fn a_mix_root_gets_a_releases_file_describing_the_permanent_release() {
        let disk = OnDisk {
            rels: vec![rel("1.0.0")],
            start_erl: Some(("13.1.5".into(), "1.0.0".into())),
            ..Default::default()
        };
        let r = repaired(&disk, "1.0.0").unwrap();
        assert_eq!(r, vec![entry_of(&rel("1.0.0"), "permanent")]);
        // Once written, nothing more to repair.
        let fixed = OnDisk {
            releases: Some(r),
            ..disk.clone()
        };
        assert_eq!(repaired(&fixed, "1.0.0"), None);
    }

    #[test]
    fn made_up_entries_are_rebuilt_or_dropped() {
        // What make_permanent writes on a root whose base entry release_handler made up.
        let made_up = |vsn: &str, status: &str| Entry {
            name: "thermex".into(),
            vsn: vsn.into(),
            erts: None,
            libs: vec![],
            status: status.into(),
        };
        let disk = OnDisk {
            rels: vec![rel("1.0.0"), rel("1.1.0")],
            releases: Some(vec![
                entry_of(&rel("1.1.0"), "permanent"),
                made_up("1.0.0", "old"),
                made_up("0.1.0", "old"),
            ]),
            start_erl: Some(("13.1.5".into(), "1.1.0".into())),
            ..Default::default()
        };
        let r = repaired(&disk, "1.1.0").unwrap();
        assert_eq!(
            r,
            vec![
                entry_of(&rel("1.1.0"), "permanent"),
                entry_of(&rel("1.0.0"), "old")
            ]
        );
    }

    #[test]
    fn an_unreadable_releases_file_is_rebuilt_and_no_rel_means_no_guess() {
        let disk = OnDisk {
            rels: vec![rel("1.0.0")],
            releases_unreadable: Some("truncated".into()),
            ..Default::default()
        };
        assert_eq!(
            repaired(&disk, "1.0.0").unwrap(),
            vec![entry_of(&rel("1.0.0"), "permanent")]
        );
        assert_eq!(repaired(&disk, "2.0.0"), None, "no .rel of 2.0.0 on disk");
    }
}
