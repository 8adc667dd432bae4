//! What a release tarball says about itself: name, version, ERTS version,
//! applications, and which versions its relup upgrades from and downgrades
//! to. Read at bundle time to fill the manifest, so that a device can decide
//! hot versus cold before it downloads anything.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use flate2::read::MultiGzDecoder;

use crate::error::{Error, IoContext, Result};
use crate::limits::LIMITS;
use crate::release::eterm::{self, Term};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReleaseInfo {
    pub name: String,
    pub version: String,
    pub erts: String,
    /// (application, version) as listed in the `.rel` file.
    pub apps: Vec<(String, String)>,
    /// Versions the relup's up section covers (empty: no relup, cold only).
    pub upgrade_from: Vec<String>,
    /// Versions the relup's down section covers.
    pub downgrade_to: Vec<String>,
    /// Whether the tarball carries an ERTS (`erts-VSN/`).
    pub includes_erts: bool,
    /// Sum of the sizes of all members, i.e. the disk space unpacking needs.
    pub unpacked_size: u64,
}

/// Reads the release's metadata from a gzip-compressed release tarball, as
/// `rebar3 tar` or `mix release` produce it, or as a bundle carries it
/// (one gzip member per unit: every member is read).
pub fn inspect(path: &Path) -> Result<ReleaseInfo> {
    let file = File::open(path).ctx(path, "open")?;
    let invalid = |detail: String| Error::InvalidRelease {
        path: path.to_path_buf(),
        detail,
    };
    let mut archive = tar::Archive::new(MultiGzDecoder::new(BufReader::new(file)));
    let mut files: BTreeMap<String, String> = BTreeMap::new();
    let mut includes_erts = false;
    let mut unpacked_size = 0u64;
    let entries = archive
        .entries()
        .map_err(|e| invalid(format!("not a gzip-compressed tar archive ({e})")))?;
    for entry in entries {
        let mut entry =
            entry.map_err(|e| invalid(format!("not a gzip-compressed tar archive ({e})")))?;
        let name = entry.path_bytes();
        let name = String::from_utf8_lossy(&name);
        let name = name.trim_start_matches("./").to_string();
        unpacked_size = unpacked_size.saturating_add(entry.size());
        if name.starts_with("erts-") {
            includes_erts = true;
        }
        if name.ends_with("/start.boot") && is_metadata(&name) {
            // Binary; only its presence matters.
            files.insert(name, String::new());
        } else if is_metadata(&name) {
            if entry.size() > LIMITS.tar_metadata_bytes {
                return Err(invalid(format!("{name} is {} bytes", entry.size())));
            }
            let mut text = String::new();
            entry
                .read_to_string(&mut text)
                .map_err(|e| invalid(format!("reading {name}: {e}")))?;
            files.insert(name, text);
        }
    }
    let mut info = from_files(&files, includes_erts).map_err(invalid)?;
    info.unpacked_size = unpacked_size;
    Ok(info)
}

/// `releases/*.rel`, `releases/VSN/*.rel`, `releases/VSN/relup`,
/// `releases/VSN/start.boot` (only its presence matters).
fn is_metadata(name: &str) -> bool {
    let parts: Vec<&str> = name.split('/').collect();
    match parts.as_slice() {
        ["releases", f] => f.ends_with(".rel"),
        ["releases", _, f] => f.ends_with(".rel") || *f == "relup" || *f == "start.boot",
        _ => false,
    }
}

fn from_files(
    files: &BTreeMap<String, String>,
    includes_erts: bool,
) -> std::result::Result<ReleaseInfo, String> {
    // Every releases/VSN/NAME.rel that names itself consistently.
    let mut candidates = Vec::new();
    for (path, text) in files {
        let parts: Vec<&str> = path.split('/').collect();
        if let ["releases", dir, file] = parts.as_slice()
            && let Some(stem) = file.strip_suffix(".rel")
        {
            let rel = parse_rel(text).map_err(|e| format!("{path}: {e}"))?;
            if rel.name == stem && rel.version == *dir {
                candidates.push(rel);
            }
        }
    }
    let rel = match candidates.len() {
        0 => {
            return Err(
                "no releases/VSN/NAME.rel found; is this a release tarball from `rebar3 tar` or `mix release`?"
                    .into(),
            );
        }
        1 => candidates.remove(0),
        _ => {
            // Several versions inside: releases/NAME.rel names the one this tarball is for.
            let top = files
                .iter()
                .find(|(p, _)| p.matches('/').count() == 1 && p.ends_with(".rel"))
                .map(|(p, t)| parse_rel(t).map_err(|e| format!("{p}: {e}")))
                .transpose()?
                .ok_or("several releases/VSN/ directories and no releases/NAME.rel to tell which is new")?;
            candidates
                .into_iter()
                .find(|c| c.name == top.name && c.version == top.version)
                .ok_or("releases/NAME.rel names a version that has no releases/VSN/ directory")?
        }
    };
    let dir = format!("releases/{}", rel.version);
    if !files.contains_key(&format!("{dir}/start.boot")) {
        return Err(format!(
            "{dir}/start.boot is missing; release_handler cannot install a release without it"
        ));
    }
    let (upgrade_from, downgrade_to) = match files.get(&format!("{dir}/relup")) {
        None => (Vec::new(), Vec::new()),
        Some(text) => parse_relup(text, &rel.version).map_err(|e| format!("{dir}/relup: {e}"))?,
    };
    Ok(ReleaseInfo {
        name: rel.name,
        version: rel.version,
        erts: rel.erts,
        apps: rel.apps,
        upgrade_from,
        downgrade_to,
        includes_erts,
        unpacked_size: 0,
    })
}

/// The contents of a `NAME.rel` file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Rel {
    pub(crate) name: String,
    pub(crate) version: String,
    pub(crate) erts: String,
    /// (application, version), in boot order.
    pub(crate) apps: Vec<(String, String)>,
}

/// Parses the text of a `NAME.rel` file.
pub(crate) fn parse_rel(text: &str) -> std::result::Result<Rel, String> {
    let terms = eterm::parse_terms(text)?;
    let bad = || "expected {release, {Name, Vsn}, {erts, ErtsVsn}, [Apps]}".to_string();
    let t = terms.first().and_then(Term::as_tuple).ok_or_else(bad)?;
    let [tag, id, erts, apps] = t else {
        return Err(bad());
    };
    if tag.as_atom() != Some("release") {
        return Err(bad());
    }
    let id = id.as_tuple().ok_or_else(bad)?;
    let (name, version) = match id {
        [n, v] => (n.as_str().ok_or_else(bad)?, v.as_str().ok_or_else(bad)?),
        _ => return Err(bad()),
    };
    let erts = match erts.as_tuple() {
        Some([tag, v]) if tag.as_atom() == Some("erts") => v.as_str().ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    let apps = apps
        .as_list()
        .ok_or_else(bad)?
        .iter()
        .map(|a| {
            let t = a.as_tuple().ok_or_else(bad)?;
            match t {
                [n, v, ..] => Ok((
                    n.as_atom().ok_or_else(bad)?.to_string(),
                    v.as_str().ok_or_else(bad)?.to_string(),
                )),
                _ => Err(bad()),
            }
        })
        .collect::<std::result::Result<_, String>>()?;
    Ok(Rel {
        name: name.into(),
        version: version.into(),
        erts: erts.into(),
        apps,
    })
}

/// `{Vsn, [{UpFromVsn, Descr, Instructions}], [{DownToVsn, Descr, Instructions}]}`:
/// the versions it upgrades from and downgrades to.
pub(crate) fn parse_relup(
    text: &str,
    version: &str,
) -> std::result::Result<(Vec<String>, Vec<String>), String> {
    let terms = eterm::parse_terms(text)?;
    let bad =
        || "expected {Vsn, [{UpFromVsn, Descr, Instrs}], [{DownToVsn, Descr, Instrs}]}".to_string();
    let t = terms.first().and_then(Term::as_tuple).ok_or_else(bad)?;
    let [vsn, up, down] = t else {
        return Err(bad());
    };
    if vsn.as_str() != Some(version) {
        return Err(format!(
            "relup is for version {vsn}, but the release is {version}"
        ));
    }
    let versions = |section: &Term| -> std::result::Result<Vec<String>, String> {
        section
            .as_list()
            .ok_or_else(bad)?
            .iter()
            .map(|e| match e.as_tuple() {
                Some([v, _, _]) => v.as_str().map(str::to_string).ok_or_else(bad),
                _ => Err(bad()),
            })
            .collect()
    };
    Ok((versions(up)?, versions(down)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(p, t)| (p.to_string(), t.to_string()))
            .collect()
    }

    const REL: &str =
        r#"{release,{"thermo","1.1.0"},{erts,"13.1.5"},[{kernel,"8.5.3"},{thermo,"1.1.0"}]}."#;

    #[test]
    fn reads_versions_from_rel_and_relup() {
        let f = files(&[
            ("releases/1.1.0/thermo.rel", REL),
            ("releases/1.1.0/start.boot", ""),
            (
                "releases/1.1.0/relup",
                r#"{"1.1.0",[{"1.0.0",[],[]},{"1.0.1",[],[]}],[{"1.0.0",[],[]}]}."#,
            ),
        ]);
        let info = from_files(&f, false).unwrap();
        assert_eq!(info.name, "thermo");
        assert_eq!(info.version, "1.1.0");
        assert_eq!(info.erts, "13.1.5");
        assert_eq!(info.upgrade_from, ["1.0.0", "1.0.1"]);
        assert_eq!(info.downgrade_to, ["1.0.0"]);
        assert_eq!(info.apps[1], ("thermo".into(), "1.1.0".into()));
    }

    #[test]
    fn no_relup_means_cold_only() {
        let f = files(&[
            ("releases/1.1.0/thermo.rel", REL),
            ("releases/1.1.0/start.boot", ""),
        ]);
        assert!(from_files(&f, false).unwrap().upgrade_from.is_empty());
    }

    #[test]
    fn mismatched_relup_and_missing_boot_are_errors() {
        let f = files(&[
            ("releases/1.1.0/thermo.rel", REL),
            ("releases/1.1.0/start.boot", ""),
            ("releases/1.1.0/relup", r#"{"9.9.9",[],[]}."#),
        ]);
        assert!(from_files(&f, false).unwrap_err().contains("9.9.9"));
        let f = files(&[("releases/1.1.0/thermo.rel", REL)]);
        assert!(from_files(&f, false).unwrap_err().contains("start.boot"));
        assert!(
            from_files(&files(&[]), false)
                .unwrap_err()
                .contains("no releases")
        );
    }
}
