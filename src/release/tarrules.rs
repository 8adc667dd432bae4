//! The rules every entry of a release tarball must meet: one set, pure,
//! for the device's unpack (`staging`: the plan and the extraction) and
//! for bundle time (`beamup bundle`), so that a signer is never able to
//! sign what a device then refuses.
//!
//! An entry is checked whether or not the unpack creates it (type, path,
//! link target, running size total); what depends on earlier entries
//! (writing through a symlink, beneath a file, the same path twice, hard
//! links to files of the same unit) is checked for the entries it creates.
//! Bundle time checks as a device that creates everything (provisioning an
//! empty root) does: every other device creates a subset.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::limits::LIMITS;

/// What an entry that passed the rules is.
#[derive(Debug)]
pub(crate) struct Checked {
    /// Its path, relative to the release root.
    pub(crate) rel: PathBuf,
    /// The link target of a symlink or hard link.
    pub(crate) link: Option<String>,
    /// Whether the unpack creates it (its unit is one the unpack creates).
    pub(crate) created: bool,
}

/// What a created path is, for the rules on later entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Made {
    Dir,
    File,
    Symlink,
}

/// The rules' state over one tar stream.
pub(crate) struct Rules {
    unpacked_limit: u64,
    declared: u64,
    entries: u64,
    made: HashMap<PathBuf, Made>,
    /// Paths that the targets of created symlinks pass through on their way
    /// (not their last component): none of them may be a symlink, or the
    /// `..` after it would be taken from where that symlink points.
    traversed: HashSet<PathBuf>,
}

impl Rules {
    /// `unpacked_limit`: the most bytes the entries may declare (the
    /// manifest's unpacked size).
    pub(crate) fn new(unpacked_limit: u64) -> Rules {
        Rules {
            unpacked_limit,
            declared: 0,
            entries: 0,
            made: HashMap::new(),
            traversed: HashSet::new(),
        }
    }

    /// Checks the next entry of the stream: its raw path, type, raw link
    /// target and declared size. `creates` says whether the unpack creates
    /// a unit (see [`top_of`]). `Ok(None)` for the archive's own `./`
    /// entry; the error names the entry and the rule it breaks.
    pub(crate) fn check(
        &mut self,
        raw: &[u8],
        kind: tar::EntryType,
        link: Option<&[u8]>,
        size: u64,
        creates: &dyn Fn(&Path) -> bool,
    ) -> Result<Option<Checked>, String> {
        self.entries += 1;
        if self.entries > LIMITS.tar_entries {
            return Err(format!("more than {} entries", LIMITS.tar_entries));
        }
        let Some(rel) = safe_relative_path(raw)? else {
            return Ok(None);
        };
        let shown = rel.display().to_string();
        self.declared = self.declared.saturating_add(size);
        if self.declared > self.unpacked_limit {
            return Err(format!(
                "it unpacks to more than the {} bytes its manifest declares (at {shown})",
                self.unpacked_limit
            ));
        }
        let link = if kind.is_symlink() || kind.is_hard_link() {
            let t = link.ok_or_else(|| format!("{shown}: link without a target"))?;
            Some(
                String::from_utf8(t.to_vec())
                    .map_err(|_| format!("{shown}: link target is not UTF-8"))?,
            )
        } else {
            None
        };
        let t = link.as_deref().unwrap_or_default();
        let top = top_of(&rel);
        let mut hard_target = None;
        match kind {
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::Directory => {}
            tar::EntryType::Symlink => {
                check_symlink_target(&rel, t).map_err(|e| format!("symlink {shown} -> {t} {e}"))?;
            }
            tar::EntryType::Link => {
                let target = safe_relative_path(t.as_bytes())
                    .ok()
                    .flatten()
                    .ok_or_else(|| {
                        format!("hard link {shown} -> {t} points outside the release")
                    })?;
                // Its own unit: created exactly when the link is, so the
                // target is always a file this unpack wrote.
                if top.is_none() || top_of(&target) != top {
                    return Err(format!(
                        "hard link {shown} -> {t} points outside what this release adds \
                         (a hard link must point to a file of its own unit)"
                    ));
                }
                hard_target = Some(target);
            }
            other => {
                return Err(format!(
                    "{shown} is a {} (only files, directories and links inside the release are allowed)",
                    describe(other)
                ));
            }
        }
        let created = top.as_deref().is_some_and(creates);
        if !created {
            return Ok(Some(Checked { rel, link, created }));
        }
        if let Some((above, what)) = rel.ancestors().skip(1).find_map(|a| {
            self.made
                .get(a)
                .filter(|m| **m != Made::Dir)
                .map(|m| (a, *m))
        }) {
            return Err(match what {
                Made::Symlink => format!(
                    "{shown} would be written through the symlink {}",
                    above.display()
                ),
                _ => format!(
                    "{shown} would be written beneath the file {}",
                    above.display()
                ),
            });
        }
        if let Some(target) = &hard_target {
            match self.made.get(target) {
                Some(Made::File) => {}
                Some(Made::Symlink) => {
                    return Err(format!(
                        "hard link {shown} -> {t} points to a symlink (whose target would then be read from another directory)"
                    ));
                }
                _ => {
                    return Err(format!(
                        "hard link {shown} -> {t} points to no file before it in the tarball"
                    ));
                }
            }
        }
        if kind == tar::EntryType::Symlink {
            // The lexical check above holds only if nothing the target
            // walks through is itself a symlink: `l1 -> ..` then
            // `l2 -> l1/..` climbs one more level than it reads.
            let through = traversed(&rel, t);
            if let Some(p) = through
                .iter()
                .find(|p| self.made.get(*p) == Some(&Made::Symlink))
            {
                return Err(format!(
                    "symlink {shown} -> {t} goes through the symlink {} (its target would be \
                     resolved from wherever that one points)",
                    p.display()
                ));
            }
            if self.traversed.contains(&rel) {
                return Err(format!(
                    "symlink {shown} is on the way of an earlier symlink's target (that \
                     target would then be resolved from wherever this one points)"
                ));
            }
            self.traversed.extend(through);
        }
        let now = match kind {
            tar::EntryType::Directory => Made::Dir,
            tar::EntryType::Symlink => Made::Symlink,
            _ => Made::File,
        };
        match self.made.get(&rel) {
            None => {}
            Some(Made::Dir) if now == Made::Dir => {}
            Some(_) => {
                return Err(format!(
                    "{shown} appears twice or would overwrite an existing file"
                ));
            }
        }
        self.made.insert(rel.clone(), now);
        Ok(Some(Checked { rel, link, created }))
    }
}

#[cfg(feature = "operator")]
/// Reads a whole gzip tar stream (every member, as a device does) and
/// checks every entry as a device that creates all of it would. For bundle
/// time; the error names the entry and the rule.
pub(crate) fn check_stream(gz: impl std::io::Read) -> Result<(), String> {
    let stream =
        |e: std::io::Error| format!("the compressed tar stream is truncated or corrupt ({e})");
    let mut gz = flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(1 << 20, gz));
    let mut rules = Rules::new(u64::MAX);
    let mut archive = tar::Archive::new(&mut gz);
    for entry in archive.entries().map_err(stream)? {
        let entry = entry.map_err(stream)?;
        let kind = entry.header().entry_type();
        let link = entry.link_name_bytes();
        rules.check(
            &entry.path_bytes(),
            kind,
            link.as_deref(),
            entry.size(),
            &|_| true,
        )?;
    }
    Ok(())
}

fn describe(t: tar::EntryType) -> &'static str {
    match t {
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "FIFO",
        _ => "special entry",
    }
}

/// The top-level unit an entry belongs to: `lib/X`, `releases/X`, `bin/X`
/// or, for anything else, its first component (e.g. `erts-13.1.5`).
pub(crate) fn top_of(rel: &Path) -> Option<PathBuf> {
    let mut c = rel.components();
    let first = c.next()?.as_os_str();
    if first == "lib" || first == "releases" || first == "bin" {
        let second = c.next()?.as_os_str();
        Some(Path::new(first).join(second))
    } else {
        Some(PathBuf::from(first))
    }
}

/// A tar path as a plain relative path: no leading `/`, no `..`, no `.`
/// components other than leading `./`. `Ok(None)` for the archive root.
pub(crate) fn safe_relative_path(raw: &[u8]) -> Result<Option<PathBuf>, String> {
    let s = std::str::from_utf8(raw).map_err(|_| "an entry name is not UTF-8".to_string())?;
    let shown = || s.chars().take(200).collect::<String>();
    if s.len() > LIMITS.tar_path_bytes {
        return Err(format!("entry name of {} bytes", s.len()));
    }
    if s.starts_with('/') {
        return Err(format!("{} is an absolute path", shown()));
    }
    let mut s = s;
    while let Some(rest) = s.strip_prefix("./") {
        s = rest;
    }
    let mut out = PathBuf::new();
    for part in s.split('/') {
        match part {
            "" => {}
            "." => return Err(format!("{} has a '.' component", shown())),
            ".." => return Err(format!("{} climbs out with '..'", shown())),
            p if p.contains('\0') => return Err("an entry name contains NUL".into()),
            p => out.push(p),
        }
    }
    Ok((!out.as_os_str().is_empty() && s != ".").then_some(out))
}

/// The paths, relative to the root, that a symlink at `link` with target
/// `target` walks through before its last component (lexically; the
/// target has passed [`check_symlink_target`]).
fn traversed(link: &Path, target: &str) -> Vec<PathBuf> {
    let mut at: Vec<&str> = link
        .parent()
        .map(|d| d.iter().filter_map(|c| c.to_str()).collect())
        .unwrap_or_default();
    let parts: Vec<&str> = target
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    let mut out = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if *part == ".." {
            at.pop();
        } else {
            at.push(part);
            if i + 1 < parts.len() {
                out.push(at.iter().collect());
            }
        }
    }
    out
}

/// A symlink's target must be relative and, resolved from the link's
/// directory, stay inside the release root.
fn check_symlink_target(link: &Path, target: &str) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("has an empty target");
    }
    if target.starts_with('/') {
        return Err("points outside the release (absolute target)");
    }
    let mut depth: i64 = link.components().count() as i64 - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err("points outside the release");
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tar::EntryType::{Directory, Link, Regular, Symlink};

    fn run(entries: &[(&str, tar::EntryType, &str)]) -> Result<(), String> {
        let mut rules = Rules::new(u64::MAX);
        for (p, k, l) in entries {
            let link = (!l.is_empty()).then_some(l.as_bytes());
            rules.check(p.as_bytes(), *k, link, 0, &|_| true)?;
        }
        Ok(())
    }

    #[test]
    fn what_earlier_entries_made_constrains_later_ones() {
        let ok = [
            ("lib/a-1/", Directory, ""),
            ("lib/a-1/", Directory, ""),
            ("lib/a-1/x", Regular, ""),
            ("lib/a-1/h", Link, "lib/a-1/x"),
            ("lib/a-1/s", Symlink, "x"),
            // Through directories, and to a symlink as the last component.
            ("lib/a-1/d/", Directory, ""),
            ("lib/a-1/d/t", Symlink, "../s"),
            ("lib/a-1/u", Symlink, "d/../d/t"),
        ];
        run(&ok).unwrap();
        for (bad, needle) in [
            (
                vec![("lib/a-1/x", Regular, ""), ("lib/a-1/x", Regular, "")],
                "appears twice",
            ),
            (
                vec![("lib/a-1/x", Regular, ""), ("lib/a-1/x", Directory, "")],
                "appears twice",
            ),
            (
                vec![("lib/a-1/x", Regular, ""), ("lib/a-1/x/y", Regular, "")],
                "beneath the file lib/a-1/x",
            ),
            (
                vec![("lib/a-1/s", Symlink, "."), ("lib/a-1/s/y", Regular, "")],
                "through the symlink lib/a-1/s",
            ),
            (
                vec![("lib/a-1/h", Link, "lib/a-1/x"), ("lib/a-1/x", Regular, "")],
                "no file before it",
            ),
            (
                vec![
                    ("lib/a-1/s", Symlink, "x"),
                    ("lib/a-1/h", Link, "lib/a-1/s"),
                ],
                "points to a symlink",
            ),
            (
                vec![("lib/b-1/x", Regular, ""), ("lib/a-1/h", Link, "lib/b-1/x")],
                "outside what this release adds",
            ),
            // Each link alone stays inside lexically, but l1 is lib/, so
            // l2 is the root and l3 its parent: outside the release.
            (
                vec![
                    ("lib/a-1/l1", Symlink, ".."),
                    ("lib/a-1/l2", Symlink, "l1/.."),
                    ("lib/a-1/l3", Symlink, "l2/.."),
                ],
                "goes through the symlink lib/a-1/l1",
            ),
            // The same, the link walked through made after the one that
            // walks through it.
            (
                vec![
                    ("lib/a-1/l2", Symlink, "l1/../.."),
                    ("lib/a-1/l1", Symlink, ".."),
                ],
                "on the way of an earlier symlink's target",
            ),
        ] {
            let e = run(&bad).unwrap_err();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn entries_of_units_not_created_are_checked_alone() {
        let mut rules = Rules::new(10);
        let none = |_: &Path| false;
        // Twice, but never written: nothing to collide with.
        for _ in 0..2 {
            let c = rules
                .check(b"lib/a-1/x", Regular, None, 4, &none)
                .unwrap()
                .unwrap();
            assert!(!c.created);
        }
        let e = rules
            .check(b"lib/a-1/s", Symlink, Some(b"/etc"), 0, &none)
            .unwrap_err();
        assert!(e.contains("absolute target"), "{e}");
        let e = rules
            .check(b"lib/a-1/y", Regular, None, 3, &none)
            .unwrap_err();
        assert!(e.contains("more than the 10 bytes"), "{e}");
    }

    #[test]
    fn relative_paths() {
        let ok = |s: &str| safe_relative_path(s.as_bytes()).unwrap();
        assert_eq!(
            ok("./lib/a-1/ebin/a.beam"),
            Some(PathBuf::from("lib/a-1/ebin/a.beam"))
        );
        assert_eq!(ok("lib/a-1/"), Some(PathBuf::from("lib/a-1")));
        assert_eq!(ok("./"), None);
        for bad in ["/etc/passwd", "../x", "lib/../../x", "lib/./x", "a/../../b"] {
            assert!(safe_relative_path(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn symlink_targets() {
        let link = Path::new("lib/a-1/priv/link");
        assert!(check_symlink_target(link, "../ebin/a.beam").is_ok());
        assert!(check_symlink_target(link, "../../../bin/x").is_ok()); // root level
        assert!(check_symlink_target(link, "../../../../etc/passwd").is_err());
        assert!(check_symlink_target(link, "/etc/passwd").is_err());
        assert!(check_symlink_target(Path::new("x"), "..").is_err());
    }

    #[test]
    fn tops() {
        assert_eq!(
            top_of(Path::new("lib/a-1/ebin/x")),
            Some(PathBuf::from("lib/a-1"))
        );
        assert_eq!(
            top_of(Path::new("releases/1.1.0/relup")),
            Some(PathBuf::from("releases/1.1.0"))
        );
        assert_eq!(
            top_of(Path::new("erts-13.1.5/bin/beam.smp")),
            Some(PathBuf::from("erts-13.1.5"))
        );
        assert_eq!(top_of(Path::new("releases")), None);
    }
}
