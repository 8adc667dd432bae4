//! Unpacking a release tarball beside the running release, never over it.
//!
//! OTP's own `unpack_release` and a plain `tar -xzf` both write over files
//! the running release owns (`bin/REL`, `releases/start_erl.data`, ...), so
//! an unverified release can end up booting after a power cut. beamup
//! instead decides up front which top-level paths the new release adds
//! (`releases/VSN/`, `bin/REL-VSN`, each missing `lib/APP-VSN/`, a new
//! `erts-VSN/`), records that list in the journal, and then creates only
//! those, with files that must not exist yet.
//!
//! The tarball is hostile until unpacked: every entry is checked before
//! anything is written (type, path, link target, running size total), even
//! entries that are skipped, and the compressed stream is hashed again on the
//! way through, so a bundle swapped after verification is caught.

pub(crate) mod bootset;

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use std::sync::mpsc;

use flate2::read::MultiGzDecoder;

use crate::bundle::Bundle;

use crate::error::{Error, IoContext, Result};
use crate::release::manifest::{Manifest, Part};
use crate::release::tarrules::{Rules, top_of};

/// What an unpack will create, decided before it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Top-level paths, relative to the release root, that do not exist yet
    /// and that the unpack creates. Recovery removes exactly these.
    pub(crate) creates: Vec<PathBuf>,
}

/// Decides which paths the release adds to `root`. Pure apart from looking at
/// which paths exist.
pub fn plan(root: &Path, release_name: &str, m: &Manifest) -> Plan {
    let version = &m.release.version;
    let mut candidates = vec![
        PathBuf::from("releases").join(version),
        PathBuf::from("bin").join(format!("{release_name}-{version}")),
    ];
    candidates.extend(m.apps.iter().map(|a| PathBuf::from("lib").join(a)));
    if m.includes_erts {
        candidates.push(PathBuf::from(format!("erts-{}", m.erts)));
    }
    let creates = candidates
        .into_iter()
        .filter(|p| root.join(p).symlink_metadata().is_err())
        .collect();
    Plan { creates }
}

/// For a root that holds no release yet (provisioning): every top-level
/// unit the tarball holds (see `top_of`: `bin/X`, `releases/X`, `lib/X`,
/// `erts-X`, ...) that does not exist in `root`, start scripts and
/// `releases/RELEASES` included. An indexed tarball's signed index names
/// them; a plain one is read once through the chunk verifier (refusing
/// entry names that [`unpack`] refuses, and stopping once the entries
/// declare more than the manifest's unpacked size).
pub(crate) fn plan_all(root: &Path, m: &Manifest, bundle: &Bundle) -> Result<Plan> {
    let tops: std::collections::BTreeSet<PathBuf> = if m.tarball.parts.is_empty() {
        tops_of_stream(m, bundle.verified_tarball(m))?
    } else {
        m.tarball
            .parts
            .iter()
            .filter(|p| !p.unit.is_empty())
            .map(|p| PathBuf::from(&p.unit))
            .collect()
    };
    let creates = tops
        .into_iter()
        .filter(|p| root.join(p).symlink_metadata().is_err())
        .collect();
    Ok(Plan { creates })
}

fn tops_of_stream(m: &Manifest, tarball: impl Read) -> Result<std::collections::BTreeSet<PathBuf>> {
    let unsafe_tar = |detail: String| Error::UnsafeTarball { detail };
    let mut gz = MultiGzDecoder::new(io::BufReader::with_capacity(PIPE_BLOCK, tarball));
    let mut tops = std::collections::BTreeSet::new();
    let mut rules = Rules::new(m.tarball.unpacked_size);
    {
        let mut archive = tar::Archive::new(&mut gz);
        for entry in archive.entries().map_err(|e| stream_error(&e))? {
            let entry = entry.map_err(|e| stream_error(&e))?;
            let kind = entry.header().entry_type();
            let link = entry.link_name_bytes();
            // As the unpack of all of it will check it.
            let Some(c) = rules
                .check(
                    &entry.path_bytes(),
                    kind,
                    link.as_deref(),
                    entry.size(),
                    &|_| true,
                )
                .map_err(unsafe_tar)?
            else {
                continue;
            };
            tops.extend(top_of(&c.rel));
        }
    }
    // The rest: tar end blocks and the gzip trailer, then whatever follows
    // it, so that every chunk is checked.
    io::copy(&mut gz, &mut io::sink()).map_err(|e| stream_error(&e))?;
    io::copy(&mut gz.into_inner(), &mut io::sink()).map_err(|e| stream_error(&e))?;
    Ok(tops)
}

/// The parts of an indexed tarball that [`unpack`] reads for `plan`: those
/// whose unit the plan creates. Nothing for a plain tarball (which is read
/// whole).
pub(crate) fn parts_read<'m>(m: &'m Manifest, plan: &Plan) -> impl Iterator<Item = &'m Part> {
    let wanted: HashSet<PathBuf> = plan.creates.iter().cloned().collect();
    m.tarball
        .parts
        .iter()
        .filter(move |p| !p.unit.is_empty() && wanted.contains(Path::new(&p.unit)))
}

/// The chunks of the tarball that [`unpack`] reads for `plan`, one flag per
/// chunk: every chunk of a plain tarball; of an indexed one, the chunks
/// that hold a byte of a part it reads (see [`parts_read`]). An unpack
/// reads nothing else of the bundle's tarball, so a bundle file holding
/// only these chunks unpacks as well as a whole one.
pub(crate) fn chunks_read(m: &Manifest, plan: &Plan) -> Vec<bool> {
    let n = m.tarball.chunks.len();
    if m.tarball.parts.is_empty() {
        return vec![true; n];
    }
    let mut need = vec![false; n];
    for p in parts_read(m, plan) {
        for c in part_chunks(m, p) {
            need[c] = true;
        }
    }
    need
}

/// The chunks holding a byte of part `p` (parts are non-empty and inside
/// the tarball: validated with the manifest).
fn part_chunks(m: &Manifest, p: &Part) -> std::ops::RangeInclusive<usize> {
    let cs = u64::from(m.tarball.chunk_size);
    (p.offset / cs) as usize..=((p.offset + p.size - 1) / cs) as usize
}

/// Refuses a bundle file that lacks a chunk the unpack of `plan` reads
/// (`have`: the chunks it holds): rather than a digest mismatch half-way
/// through the unpack, a clear error before anything is changed.
pub(crate) fn check_available(path: &Path, m: &Manifest, plan: &Plan, have: &[bool]) -> Result<()> {
    let need = chunks_read(m, plan);
    let missing: Vec<usize> = need
        .iter()
        .enumerate()
        .filter(|&(i, &n)| n && !have.get(i).copied().unwrap_or(false))
        .map(|(i, _)| i)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let units: Vec<&str> = parts_read(m, plan)
        .filter(|p| missing.iter().any(|c| part_chunks(m, p).contains(c)))
        .map(|p| p.unit.as_str())
        .collect();
    Err(Error::Incomplete {
        path: path.to_path_buf(),
        detail: format!(
            "{} of the {} chunks the unpack reads were not fetched (first: chunk {}; units: {})",
            missing.len(),
            need.iter().filter(|&&n| n).count(),
            missing[0],
            if units.is_empty() {
                "the whole tarball".to_string()
            } else {
                units.join(", ")
            }
        ),
    })
}

/// Removes what a plan created (or may have started to create). Idempotent;
/// used on failure and by recovery.
pub(crate) fn remove(root: &Path, plan: &Plan) -> Result<()> {
    for p in &plan.creates {
        let full = root.join(p);
        match full.symlink_metadata() {
            Err(_) => {}
            Ok(meta) if meta.is_dir() => {
                fs::remove_dir_all(&full).ctx(&full, "remove")?;
            }
            Ok(_) => fs::remove_file(&full).ctx(&full, "remove")?,
        }
    }
    Ok(())
}

/// Facts about a finished unpack.
#[derive(Debug, Default)]
pub struct Unpacked {
    pub(crate) files: u64,
    pub(crate) bytes: u64,
}

/// Unpacks the bundle's release tarball into `root`, creating only the
/// paths in `plan`. Every byte is checked against the manifest's chunk
/// digests before it reaches the decompressor. A plain tarball is read to
/// its end; an indexed one (see [`crate::release::manifest::Part`]) only in the parts
/// whose unit the plan creates: the rest is neither read nor inflated. On
/// error, whatever was created is left for the caller to `remove` (the
/// journal lists it).
///
/// On a machine with more than one core two threads share the work, as
/// `gzip -d | tar -x` does: one reads, verifies and inflates, the other
/// checks entries and writes files. On one core (or a container limited
/// to one) a pipeline only adds switches between them: one thread does it
/// all.
pub fn unpack(root: &Path, plan: &Plan, m: &Manifest, bundle: &Bundle) -> Result<Unpacked> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    unpack_on(root, plan, m, bundle, threads)
}

/// [`unpack`] on `threads` threads (1, or 2 for the pipeline).
pub fn unpack_on(
    root: &Path,
    plan: &Plan,
    m: &Manifest,
    bundle: &Bundle,
    threads: usize,
) -> Result<Unpacked> {
    if threads <= 1 {
        return extract(
            root,
            plan,
            m,
            Inflated {
                sources: sources(m, plan, bundle),
                current: None,
            },
        );
    }
    let (tx, rx) = mpsc::sync_channel::<io::Result<Vec<u8>>>(PIPE_DEPTH);
    std::thread::scope(|s| {
        s.spawn(move || {
            for source in sources(m, plan, bundle) {
                if !inflate_into(source, &tx) {
                    return;
                }
            }
        });
        extract(
            root,
            plan,
            m,
            ChannelReader {
                rx,
                cur: Vec::new(),
                pos: 0,
            },
        )
    })
}

/// Blocks in flight between the two threads, and their size.
const PIPE_DEPTH: usize = 4;
const PIPE_BLOCK: usize = 256 * 1024;

type Source<'a> = Box<dyn Read + 'a>;

/// The compressed bytes to inflate, each checked against the manifest as
/// it is read: the whole tarball, or the parts the plan creates, in order.
fn sources<'a>(
    m: &'a Manifest,
    plan: &'a Plan,
    bundle: &'a Bundle,
) -> Box<dyn Iterator<Item = Source<'a>> + 'a> {
    if m.tarball.parts.is_empty() {
        Box::new(std::iter::once(
            Box::new(bundle.verified_tarball(m)) as Source<'a>
        ))
    } else {
        Box::new(parts_read(m, plan).map(move |part| {
            Box::new(bundle.verified_range(m, part.offset, part.size)) as Source<'a>
        }))
    }
}

/// Inflates one gzip stream (all its members) from `tarball` into `tx`,
/// then reads `tarball` to its end (so its verification covers every
/// chunk). An error goes down the channel as the last message; a closed
/// channel (the extractor gave up) stops it. `false` when it stopped.
fn inflate_into<R: Read>(tarball: R, tx: &mpsc::SyncSender<io::Result<Vec<u8>>>) -> bool {
    let mut gz = MultiGzDecoder::new(io::BufReader::with_capacity(PIPE_BLOCK, tarball));
    loop {
        let mut buf = vec![0u8; PIPE_BLOCK];
        match gz.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                buf.truncate(n);
                if tx.send(Ok(buf)).is_err() {
                    return false;
                }
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return false;
            }
        }
    }
    if let Err(e) = io::copy(&mut gz.into_inner(), &mut io::sink()) {
        let _ = tx.send(Err(e));
        return false;
    }
    true
}

/// The sources inflated one after the other on the calling thread, each
/// read to its end once its gzip stream ended (as [`inflate_into`] does).
struct Inflated<'a> {
    sources: Box<dyn Iterator<Item = Source<'a>> + 'a>,
    current: Option<MultiGzDecoder<io::BufReader<Source<'a>>>>,
}

impl Read for Inflated<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(gz) = self.current.as_mut() else {
                match self.sources.next() {
                    Some(source) => {
                        self.current = Some(MultiGzDecoder::new(io::BufReader::with_capacity(
                            PIPE_BLOCK, source,
                        )));
                        continue;
                    }
                    None => return Ok(0),
                }
            };
            let n = gz.read(out)?;
            if n > 0 || out.is_empty() {
                return Ok(n);
            }
            if let Some(gz) = self.current.take() {
                io::copy(&mut gz.into_inner(), &mut io::sink())?;
            }
        }
    }
}

/// The receiving end of the inflate pipe as a `Read`; the sender hanging up
/// is the end of the stream.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    cur: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(Ok(buf)) => {
                    self.cur = buf;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                Err(mpsc::RecvError) => return Ok(0),
            }
        }
        let n = out.len().min(self.cur.len() - self.pos);
        out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn extract(root: &Path, plan: &Plan, m: &Manifest, mut tarball: impl Read) -> Result<Unpacked> {
    let unsafe_tar = |detail: String| Error::UnsafeTarball { detail };
    let tops: HashSet<&Path> = plan.creates.iter().map(PathBuf::as_path).collect();
    let creates = |top: &Path| tops.contains(top);
    let mut rules = Rules::new(m.tarball.unpacked_size);
    let mut stats = Unpacked::default();
    {
        let mut archive = tar::Archive::new(&mut tarball);
        let entries = archive.entries().map_err(|e| stream_error(&e))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| stream_error(&e))?;
            let kind = entry.header().entry_type();
            let raw = entry.path_bytes().into_owned();
            let link = entry.link_name_bytes().map(|l| l.into_owned());
            // Every entry is checked, extracted or not.
            let Some(checked) = rules
                .check(&raw, kind, link.as_deref(), entry.size(), &creates)
                .map_err(unsafe_tar)?
            else {
                continue; // the archive's own "./" entry
            };
            if !checked.created {
                continue;
            }
            let rel = checked.rel;
            let link_target = checked.link;
            let shown = rel.display().to_string();
            let dest = root.join(&rel);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent).ctx(parent, "create directory")?;
            }
            match kind {
                tar::EntryType::Directory => match fs::create_dir(&dest) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dest.is_dir() => {}
                    Err(e) => return Err(Error::io(&dest, "create directory", e)),
                },
                tar::EntryType::Symlink => {
                    let t = link_target.as_deref().unwrap_or_default();
                    std::os::unix::fs::symlink(t, &dest)
                        .map_err(|e| exists_or_io(e, &dest, &shown))?;
                }
                tar::EntryType::Link => {
                    let t = link_target.as_deref().unwrap_or_default();
                    let src = root.join(t.trim_start_matches("./"));
                    fs::hard_link(&src, &dest).map_err(|e| exists_or_io(e, &dest, &shown))?;
                }
                _ => {
                    let mode = entry.header().mode().unwrap_or(0o644);
                    let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                    let mut out = OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(mode)
                        .open(&dest)
                        .map_err(|e| exists_or_io(e, &dest, &shown))?;
                    let n = io::copy(&mut entry, &mut out).map_err(|e| match e.kind() {
                        io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::InvalidInput
                        | io::ErrorKind::InvalidData => stream_error(&e),
                        _ => Error::io(&dest, "write", e),
                    })?;
                    stats.files += 1;
                    stats.bytes += n;
                }
            }
        }
        // Read to the end of the compressed stream (the tar end blocks, the
        // gzip trailer), so that its checks run to the end too.
        let mut rest = archive.into_inner();
        io::copy(&mut rest, &mut io::sink()).map_err(|e| stream_error(&e))?;
    }
    io::copy(&mut tarball, &mut io::sink()).map_err(|e| stream_error(&e))?;
    let missing: Vec<String> = plan
        .creates
        .iter()
        .filter(|p| root.join(p).symlink_metadata().is_err())
        .filter(|p| !p.starts_with("bin")) // mix releases have no bin/REL-VSN
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        return Err(Error::UnsafeTarball {
            detail: format!("it lacks {} that its manifest lists", missing.join(", ")),
        });
    }
    Ok(stats)
}

fn exists_or_io(e: io::Error, dest: &Path, shown: &str) -> Error {
    if e.kind() == io::ErrorKind::AlreadyExists {
        Error::UnsafeTarball {
            detail: format!("{shown} appears twice or would overwrite an existing file"),
        }
    } else {
        Error::io(dest, "create", e)
    }
}

fn stream_error(e: &io::Error) -> Error {
    if let Some(m) = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<crate::bundle::ChunkMismatch>())
    {
        return m.to_error();
    }
    Error::UnsafeTarball {
        detail: format!("the compressed tar stream is truncated or corrupt ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes that do not compress.
    fn noise(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// An indexed tarball of these entries in 4 KiB chunks, its manifest,
    /// and a bundle file holding only the chunks `keep` marks (the others
    /// zero, as in a download that did not fetch them).
    fn indexed_bundle(
        dir: &Path,
        entries: &[(&str, Vec<u8>)],
        keep: impl Fn(&Manifest) -> Vec<bool>,
    ) -> (Manifest, Bundle, Vec<u8>) {
        let entries: Vec<(&str, &[u8])> = entries.iter().map(|(p, d)| (*p, &d[..])).collect();
        let (_, gz) = crate::operator::tarindex::test_tarball(&entries);
        let mut tarball = Vec::new();
        let parts = crate::operator::tarindex::index(&gz[..], &mut tarball, "t").unwrap();
        let mut m = crate::release::manifest::for_tests(&tarball, 4096);
        m.release.version = "2".into();
        m.apps = vec!["a-1".into(), "b-1".into()];
        m.tarball.unpacked_size = 1 << 30;
        m.tarball.parts = parts;
        m.validate().unwrap();
        let keep = keep(&m);
        let mut masked = tarball.clone();
        for (i, c) in masked.chunks_mut(4096).enumerate() {
            if !keep[i] {
                c.fill(0);
            }
        }
        let key = crate::trust::keys::SecretKey::generate().unwrap();
        let envelope = crate::trust::signed::Envelope::sign(
            crate::trust::signed::DocKind::Manifest,
            &m,
            &[key],
        )
        .to_bytes();
        let frame = crate::bundle::Frame::new(&envelope, masked.len() as u64, 0);
        let path = dir.join("partial.bundle");
        fs::write(&path, [&frame.head[..], &masked, &frame.tail].concat()).unwrap();
        (m, Bundle::open(&path).unwrap(), tarball)
    }

    #[test]
    fn an_unpack_reads_only_the_chunks_chunks_read_names() {
        let dir = tempfile::tempdir().unwrap();
        let entries = [
            ("releases/2/x.rel", b"{release, x}.".to_vec()),
            ("lib/a-1/ebin/a.beam", noise(1, 30_000)),
            ("lib/b-1/ebin/b.beam", noise(2, 9_000)),
            ("bin/x-2", b"#!/bin/sh".to_vec()),
        ];
        // The device has lib/a-1: the plan leaves it out.
        let plan = Plan {
            creates: ["releases/2", "lib/b-1", "bin/x-2"]
                .map(PathBuf::from)
                .to_vec(),
        };
        let (m, bundle, _) = indexed_bundle(dir.path(), &entries, |m| chunks_read(m, &plan));
        let need = chunks_read(&m, &plan);
        let needed = need.iter().filter(|&&n| n).count();
        assert!(
            needed >= 3 && needed + 5 <= need.len(),
            "{needed} of {} chunks",
            need.len()
        );
        // The bundle holds only those chunks, and unpacks all the same, on
        // one thread as on two.
        for threads in [1, 2] {
            let root = dir.path().join(format!("root-{threads}"));
            fs::create_dir(&root).unwrap();
            let done = unpack_on(&root, &plan, &m, &bundle, threads).unwrap();
            assert_eq!((done.files, done.bytes), (3, 13 + 9_000 + 9), "{threads}");
            assert_eq!(
                fs::read(root.join("lib/b-1/ebin/b.beam")).unwrap(),
                entries[2].1
            );
            assert_eq!(fs::read(root.join("bin/x-2")).unwrap(), entries[3].1);
            assert!(!root.join("lib/a-1").exists());
        }
        check_available(bundle.path(), &m, &plan, &need).unwrap();

        // A plan that also creates lib/a-1 reads chunks the file lacks: the
        // check says so before anything is unpacked (the unpack itself
        // would only see a digest mismatch).
        let more = Plan {
            creates: ["releases/2", "lib/a-1", "lib/b-1", "bin/x-2"]
                .map(PathBuf::from)
                .to_vec(),
        };
        let e = check_available(bundle.path(), &m, &more, &need).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::INCOMPLETE, "{e}");
        assert!(e.to_string().contains("units: lib/a-1"), "{e}");
        assert!(!e.to_string().contains("lib/b-1"), "{e}");
        for threads in [1, 2] {
            let root2 = dir.path().join(format!("more-{threads}"));
            fs::create_dir(&root2).unwrap();
            let e = unpack_on(&root2, &more, &m, &bundle, threads).unwrap_err();
            assert!(e.to_string().contains("wrong SHA-256"), "{threads}: {e}");
        }

        // A plain tarball is read whole: every chunk is needed.
        let mut plain = m.clone();
        plain.tarball.parts.clear();
        assert!(chunks_read(&plain, &plan).iter().all(|&n| n));
    }
}
