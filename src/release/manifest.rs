//! The signed description of one release tarball.
//!
//! Everything a device needs to decide whether to accept a release is here,
//! so that it can refuse a bad offer before fetching a byte of the tarball:
//! what it is (name, version, ERTS), how it installs (the versions its relup
//! covers), who it is for (target scopes), how fresh it is (created, expires,
//! sequence number) and how to check the data (size, SHA-256 of the whole,
//! SHA-256 of each fixed-size chunk so a transport can check each piece as it
//! arrives).

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::limits::LIMITS;

pub const MANIFEST_TYPE: &str = "beamup-manifest";
pub const FORMAT: u32 = 1;

/// 64 KiB chunks fit AWS IoT Core's 128 KB publish limit with room to spare.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(rename = "type")]
    pub kind: String,
    pub format: u32,
    pub release: ReleaseRef,
    pub erts: String,
    pub includes_erts: bool,
    /// The applications of the release (from its `.rel`), as `name-version`
    /// directory names under `lib/`. Unpacking creates only these.
    pub apps: Vec<String>,
    /// Versions this release hot-upgrades from (its relup's up section).
    pub upgrade_from: Vec<String>,
    /// Versions it hot-downgrades to (its relup's down section).
    pub downgrade_to: Vec<String>,
    pub tarball: TarballRef,
    /// Who may install it: `any`, `fleet:F`, `group:G`, `device:ID`.
    pub target: Vec<String>,
    pub created_at: String,
    pub expires_at: String,
    pub sequence: u64,
    pub allow_downgrade: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRef {
    pub name: String,
    pub version: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TarballRef {
    pub size: u64,
    pub sha256: String,
    pub chunk_size: u32,
    /// Total size of the files inside; unpacking more than this is refused
    /// (a gzip bomb), and the device checks it has this much free space.
    pub unpacked_size: u64,
    /// SHA-256 of each `chunk_size` piece, in order; the last may be shorter.
    pub chunks: Vec<String>,
    /// The tarball's index, when it is stored as one gzip member per
    /// top-level unit (see [`Part`]); empty for a single gzip stream.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parts: Vec<Part>,
}

/// One gzip member of an indexed tarball: the whole tar entries of one
/// top-level unit (`lib/APP-VSN`, `releases/VSN`, `bin/NAME`, `erts-VSN`,
/// ...) and nothing else. A device that already has a unit does not read,
/// hash or inflate its part, so an upgrade costs what it adds, not the size
/// of the release. The parts are in order and cover the tarball exactly;
/// the concatenation is still an ordinary `.tar.gz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Part {
    /// The unit, relative to the release root; empty for entries that
    /// belong to no unit (top-level directories, the tar end blocks).
    pub unit: String,
    /// Byte offset of the gzip member in the tarball.
    pub offset: u64,
    /// Length of the gzip member in bytes.
    pub size: u64,
}

/// Parts must tile the tarball in order, each non-empty, each named by a
/// plain unit path (what [`crate::staging`] creates), so that a device can
/// trust the index as much as it trusts the digests.
fn validate_parts(parts: &[Part], size: u64) -> std::result::Result<(), String> {
    if parts.is_empty() {
        return Ok(());
    }
    if parts.len() > LIMITS.manifest_parts {
        return Err(format!(
            "{} parts (at most {})",
            parts.len(),
            LIMITS.manifest_parts
        ));
    }
    let mut at = 0u64;
    for (i, p) in parts.iter().enumerate() {
        if p.offset != at || p.size == 0 {
            return Err(format!(
                "part {i} ({:?}) spans {}+{} bytes; parts must follow each other from 0 without gaps",
                p.unit, p.offset, p.size
            ));
        }
        at = at.saturating_add(p.size);
        if !p.unit.is_empty() && !is_unit_path(&p.unit) {
            return Err(format!(
                "part {i} names {:?}, which is not a top-level unit of a release",
                p.unit
            ));
        }
    }
    if at != size {
        return Err(format!(
            "the parts cover {at} bytes of a {size}-byte tarball"
        ));
    }
    Ok(())
}

/// `lib/X`, `releases/X`, `bin/X` or a single component, each component a
/// safe name.
pub(crate) fn is_unit_path(unit: &str) -> bool {
    let mut parts = unit.split('/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(first), None, None) => {
            is_safe_name(first) && !["lib", "releases", "bin"].contains(&first)
        }
        (Some("lib" | "releases" | "bin"), Some(second), None) => is_safe_name(second),
        _ => false,
    }
}

/// A target scope, as written in a manifest or on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Any,
    Fleet(String),
    Group(String),
    Device(String),
}

impl Scope {
    pub(crate) fn parse(s: &str) -> std::result::Result<Scope, String> {
        if s == "any" {
            return Ok(Scope::Any);
        }
        let (kind, name) = s.split_once(':').ok_or_else(|| {
            format!("target {s:?} must be any, fleet:NAME, group:NAME or device:ID")
        })?;
        if !is_safe_name(name) {
            return Err(format!(
                "target {s:?}: {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ + -"
            ));
        }
        match kind {
            "fleet" => Ok(Scope::Fleet(name.into())),
            "group" => Ok(Scope::Group(name.into())),
            "device" => Ok(Scope::Device(name.into())),
            _ => Err(format!(
                "target {s:?} must be any, fleet:NAME, group:NAME or device:ID"
            )),
        }
    }
}

/// Names that end up in paths and topics: short, printable, no separators,
/// not starting with a dot (so never `.` or `..`).
pub(crate) fn is_safe_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && !s.starts_with('.')
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'+' | b'-'))
}

impl Manifest {
    /// Checks everything about the manifest that does not depend on the
    /// device: types, sizes, digests, names safe to use in paths.
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |detail: String| Err(Error::InvalidManifest { detail });
        if self.kind != MANIFEST_TYPE {
            return bad(format!(
                "type is {:?}, expected {MANIFEST_TYPE:?}",
                self.kind
            ));
        }
        if self.format != FORMAT {
            return bad(format!(
                "format {} is not supported (this beamup reads format {FORMAT}); upgrade beamup",
                self.format
            ));
        }
        for (what, v) in [
            ("release name", &self.release.name),
            ("release version", &self.release.version),
            ("erts version", &self.erts),
        ] {
            if !is_safe_name(v) {
                return bad(format!(
                    "{what} {v:?} must be 1-64 characters of A-Z a-z 0-9 . _ + -"
                ));
            }
        }
        if self.apps.is_empty() || self.apps.len() > LIMITS.manifest_apps {
            return bad(format!("{} applications listed", self.apps.len()));
        }
        if let Some(a) = self
            .apps
            .iter()
            .find(|a| !is_safe_name(a) || !a.contains('-'))
        {
            return bad(format!(
                "application directory {a:?} is not a plain NAME-VERSION"
            ));
        }
        for v in self.upgrade_from.iter().chain(&self.downgrade_to) {
            if !is_safe_name(v) {
                return bad(format!("relup version {v:?} is not a plain version"));
            }
        }
        let t = &self.tarball;
        if t.size > LIMITS.tarball_bytes {
            return Err(Error::TooLarge {
                what: "release tarball (as claimed by the manifest)".into(),
                size: t.size,
                limit: LIMITS.tarball_bytes,
            });
        }
        if t.unpacked_size > LIMITS.unpacked_bytes {
            return Err(Error::TooLarge {
                what: "unpacked release (as claimed by the manifest)".into(),
                size: t.unpacked_size,
                limit: LIMITS.unpacked_bytes,
            });
        }
        if t.size == 0 {
            return bad("tarball size is 0".into());
        }
        if !(LIMITS.chunk_size_min..=LIMITS.chunk_size_max).contains(&t.chunk_size) {
            return bad(format!(
                "chunk size {} is outside {}..={}",
                t.chunk_size, LIMITS.chunk_size_min, LIMITS.chunk_size_max
            ));
        }
        if t.chunks.len() as u64 != t.size.div_ceil(u64::from(t.chunk_size)) {
            return bad(format!(
                "{} chunk digests for {} bytes in chunks of {}",
                t.chunks.len(),
                t.size,
                t.chunk_size
            ));
        }
        if parse_digest(&t.sha256).is_none() {
            return bad("tarball sha256 is not 64 hex digits".into());
        }
        if let Some(i) = t.chunks.iter().position(|c| parse_digest(c).is_none()) {
            return bad(format!("chunk {i} digest is not 64 hex digits"));
        }
        validate_parts(&t.parts, t.size).map_err(|detail| Error::InvalidManifest { detail })?;
        if self.target.is_empty() {
            return bad("no target scope".into());
        }
        for s in &self.target {
            Scope::parse(s).map_err(|detail| Error::InvalidManifest { detail })?;
        }
        let created = parse_time(&self.created_at, "created_at")?;
        let expires = parse_time(&self.expires_at, "expires_at")?;
        if expires <= created {
            return bad("expires_at is not after created_at".into());
        }
        Ok(())
    }

    pub(crate) fn scopes(&self) -> Vec<Scope> {
        self.target
            .iter()
            .filter_map(|s| Scope::parse(s).ok())
            .collect()
    }

    pub(crate) fn expires(&self) -> Result<SystemTime> {
        parse_time(&self.expires_at, "expires_at")
    }

    /// The chunk digests as bytes. Call after [`Manifest::validate`].
    pub(crate) fn chunk_digests(&self) -> Vec<[u8; 32]> {
        self.tarball
            .chunks
            .iter()
            .map(|c| parse_digest(c).unwrap_or_default())
            .collect()
    }

    pub(crate) fn tarball_digest(&self) -> [u8; 32] {
        parse_digest(&self.tarball.sha256).unwrap_or_default()
    }

    /// Length of chunk `i` (the last one may be short).
    pub(crate) fn chunk_len(&self, i: usize) -> u64 {
        let cs = u64::from(self.tarball.chunk_size);
        let start = i as u64 * cs;
        self.tarball.size.saturating_sub(start).min(cs)
    }
}

pub(crate) fn parse_digest(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    hex::decode(s).ok()?.try_into().ok()
}

pub(crate) fn parse_time(s: &str, field: &str) -> Result<SystemTime> {
    humantime::parse_rfc3339(s).map_err(|e| Error::InvalidManifest {
        detail: format!("{field} {s:?} is not an RFC 3339 UTC time ({e})"),
    })
}

pub fn format_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

#[cfg(feature = "operator")]
/// Parses `--expires` values such as `30d`, `12h`, `90min`.
pub(crate) fn parse_duration(s: &str) -> std::result::Result<std::time::Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration like 30d or 12h ({e})"))
}

/// A manifest of release `x` 1 for the tarball bytes `tarball`, with
/// their digests, for unit tests elsewhere in the crate and the fuzzers.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn for_tests(tarball: &[u8], chunk_size: u32) -> Manifest {
    use sha2::{Digest, Sha256};
    let chunks: Vec<String> = tarball
        .chunks(chunk_size as usize)
        .map(|c| hex::encode(Sha256::digest(c)))
        .collect();
    Manifest {
        kind: MANIFEST_TYPE.into(),
        format: FORMAT,
        release: ReleaseRef {
            name: "x".into(),
            version: "1".into(),
        },
        erts: "13".into(),
        includes_erts: false,
        apps: vec!["x-1".into()],
        upgrade_from: vec![],
        downgrade_to: vec![],
        tarball: TarballRef {
            size: tarball.len() as u64,
            sha256: hex::encode(Sha256::digest(tarball)),
            chunk_size,
            unpacked_size: 1,
            chunks,
            parts: Vec::new(),
        },
        target: vec!["any".into()],
        created_at: "2026-01-01T00:00:00Z".into(),
        expires_at: "2026-02-01T00:00:00Z".into(),
        sequence: 1,
        allow_downgrade: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            kind: MANIFEST_TYPE.into(),
            format: FORMAT,
            release: ReleaseRef {
                name: "thermo".into(),
                version: "1.1.0".into(),
            },
            erts: "13.1.5".into(),
            includes_erts: false,
            apps: vec!["thermo-1.1.0".into()],
            upgrade_from: vec!["1.0.0".into()],
            downgrade_to: vec!["1.0.0".into()],
            tarball: TarballRef {
                size: 100_000,
                sha256: "ab".repeat(32),
                chunk_size: 65536,
                unpacked_size: 200_000,
                chunks: vec!["cd".repeat(32), "ef".repeat(32)],
                parts: Vec::new(),
            },
            target: vec!["any".into()],
            created_at: "2026-01-01T00:00:00Z".into(),
            expires_at: "2026-02-01T00:00:00Z".into(),
            sequence: 1,
            allow_downgrade: false,
        }
    }

    #[test]
    fn valid_sample_passes() {
        sample().validate().unwrap();
        assert_eq!(sample().chunk_len(0), 65536);
        assert_eq!(sample().chunk_len(1), 100_000 - 65536);
    }

    #[test]
    fn absurd_size_is_refused_before_anything_else() {
        let mut m = sample();
        m.tarball.size = 1 << 40;
        assert!(matches!(m.validate(), Err(Error::TooLarge { .. })));
    }

    #[test]
    fn chunk_list_must_match_size() {
        let mut m = sample();
        m.tarball.chunks.pop();
        let e = m.validate().unwrap_err().to_string();
        assert!(e.contains("1 chunk digests for 100000 bytes"), "{e}");
    }

    #[test]
    fn path_like_versions_are_refused() {
        for v in ["../../etc", "1.0/evil", ".hidden", ""] {
            let mut m = sample();
            m.release.version = v.into();
            assert!(m.validate().is_err(), "{v:?}");
        }
    }

    #[test]
    fn parts_must_tile_the_tarball_with_unit_names() {
        let part = |unit: &str, offset, size| Part {
            unit: unit.into(),
            offset,
            size,
        };
        let with = |parts: Vec<Part>| {
            let mut m = sample();
            m.tarball.parts = parts;
            m.validate().map_err(|e| e.to_string())
        };
        with(vec![
            part("lib/thermo-1.1.0", 0, 60_000),
            part("releases/1.1.0", 60_000, 39_000),
            part("", 99_000, 1_000),
        ])
        .unwrap();
        for (parts, needle) in [
            (vec![part("lib/a-1", 0, 50_000)], "cover 50000 bytes"),
            (
                vec![part("lib/a-1", 0, 60_000), part("", 50_000, 50_000)],
                "without gaps",
            ),
            (
                vec![part("lib/a-1", 0, 0), part("", 0, 100_000)],
                "without gaps",
            ),
            (vec![part("lib/../etc", 0, 100_000)], "not a top-level unit"),
            (vec![part("lib", 0, 100_000)], "not a top-level unit"),
            (vec![part("lib/a/b", 0, 100_000)], "not a top-level unit"),
        ] {
            let e = with(parts).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn scopes_parse() {
        assert_eq!(Scope::parse("any").unwrap(), Scope::Any);
        assert_eq!(
            Scope::parse("group:canary").unwrap(),
            Scope::Group("canary".into())
        );
        assert!(Scope::parse("planet:earth").is_err());
        assert!(Scope::parse("device:../x").is_err());
    }
}
