//! The bundle: one file a person can copy to a device, holding a signed
//! manifest and the release tarball byte for byte as the build produced it.
//!
//! The container is a plain POSIX tar archive with exactly two members, in
//! this order:
//!
//! ```text
//! manifest.json    the signed envelope (see `signed.rs`), at most 16 MiB
//! release.tar.gz   the release tarball, exactly as `rebar3 tar` made it
//! ```
//!
//! so that a field engineer can inspect a bundle with `tar -tvf` and get the
//! original tarball back with `tar -xf`. beamup itself does not trust the tar
//! reader with any of this: it reads the two headers itself, bounds every
//! size before allocating, and reads the tarball in a single streaming pass
//! with constant memory. Nothing in a bundle is believed before the manifest's
//! signatures verify against the device's trust root.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::limits::LIMITS;
use crate::release::manifest::Manifest;
use crate::release::policy::{self, DeviceFacts};
use crate::trust::root::Root;
use crate::trust::signed::{DocKind, Envelope};

pub(crate) const MANIFEST_ENTRY: &str = "manifest.json";
pub(crate) const TARBALL_ENTRY: &str = "release.tar.gz";
pub(crate) const BLOCK: u64 = 512;
/// Read size for streaming: large enough for full-speed hashing, small
/// enough that memory stays flat whatever the bundle size.
pub(crate) const IO_BUF: usize = 1 << 20;

pub(crate) fn member_header(name: &str, size: u64, mtime: u64) -> io::Result<[u8; BLOCK as usize]> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name)?;
    h.set_size(size);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    Ok(*h.as_bytes())
}

pub(crate) fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// Where the parts of a bundle lie, from the manifest's length and the
/// tarball's size alone: a transport can lay out a bundle-shaped file and
/// fill in the tarball region piece by piece, in any order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    /// Everything before the tarball: the manifest member (header, envelope,
    /// padding) and the tarball's member header.
    pub(crate) head: Vec<u8>,
    /// Everything after it: its padding and the two end-of-archive blocks.
    pub(crate) tail: Vec<u8>,
    pub(crate) tarball_offset: u64,
    pub(crate) tarball_size: u64,
}

impl Frame {
    pub(crate) fn new(envelope: &[u8], tarball_size: u64, mtime: u64) -> Frame {
        let mut head = Vec::with_capacity(envelope.len() + 3 * BLOCK as usize);
        let len = envelope.len() as u64;
        head.extend_from_slice(&member_header(MANIFEST_ENTRY, len, mtime).expect("short name"));
        head.extend_from_slice(envelope);
        head.resize(head.len() + padding(len) as usize, 0);
        head.extend_from_slice(
            &member_header(TARBALL_ENTRY, tarball_size, mtime).expect("short name"),
        );
        let mut tail = vec![0u8; padding(tarball_size) as usize];
        tail.resize(tail.len() + 2 * BLOCK as usize, 0);
        Frame {
            tarball_offset: head.len() as u64,
            head,
            tail,
            tarball_size,
        }
    }

    /// The length of the whole bundle file.
    pub(crate) fn len(&self) -> u64 {
        self.tarball_offset + self.tarball_size + self.tail.len() as u64
    }
}

/// Reads, bounds and checks a signed manifest envelope given as bytes (an
/// offer received over MQTT, or the first member of a bundle): the size,
/// the envelope's shape, the signatures against `root`, then the manifest.
/// Nothing in the manifest is looked at before its signatures verify.
pub(crate) fn verify_envelope(
    bytes: &[u8],
    root: &Root,
    what: &str,
) -> Result<(Manifest, Vec<String>)> {
    if bytes.len() as u64 > LIMITS.manifest_bytes {
        return Err(Error::TooLarge {
            what: what.to_string(),
            size: bytes.len() as u64,
            limit: LIMITS.manifest_bytes,
        });
    }
    let envelope = Envelope::parse(bytes).map_err(|e| Error::InvalidManifest {
        detail: format!("{what} is not a signed manifest ({e})"),
    })?;
    verify_parsed(&envelope, root, what)
}

fn verify_parsed(envelope: &Envelope, root: &Root, what: &str) -> Result<(Manifest, Vec<String>)> {
    let signed_by = envelope.verify(DocKind::Manifest, &root.trust(), what)?;
    let manifest: Manifest = envelope.body().map_err(|e| Error::InvalidManifest {
        detail: format!("{e} (signed, but not a manifest this beamup understands)"),
    })?;
    manifest.validate()?;
    Ok((manifest, signed_by))
}

/// SHA-256 of a whole stream and of each fixed-size chunk of it.
#[derive(Debug)]
pub struct Digests {
    pub whole: [u8; 32],
    pub chunks: Vec<[u8; 32]>,
}

/// SHA-256 of each fixed-size chunk of exactly `size` bytes of `r`, each
/// byte hashed once, with a fixed buffer.
pub(crate) fn hash_chunks(
    r: &mut impl Read,
    size: u64,
    chunk_size: u32,
) -> io::Result<Vec<[u8; 32]>> {
    hash_into(r, size, chunk_size, None)
}

/// Hashes exactly `size` bytes of `r`, in one pass with a fixed buffer.
pub fn hash_stream(r: &mut impl Read, size: u64, chunk_size: u32) -> io::Result<Digests> {
    let mut whole = Sha256::new();
    let chunks = hash_into(r, size, chunk_size, Some(&mut whole))?;
    Ok(Digests {
        whole: whole.finalize().into(),
        chunks,
    })
}

/// The chunk digests of exactly `size` bytes of `r`, feeding `whole` too
/// when given.
fn hash_into(
    r: &mut impl Read,
    size: u64,
    chunk_size: u32,
    mut whole: Option<&mut Sha256>,
) -> io::Result<Vec<[u8; 32]>> {
    let chunk_size = u64::from(chunk_size);
    let mut chunk = Sha256::new();
    let mut in_chunk = 0u64;
    let mut chunks = Vec::with_capacity(usize::try_from(size.div_ceil(chunk_size)).unwrap_or(0));
    let mut buf = vec![0u8; IO_BUF];
    let mut left = size;
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = r.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file ended early",
            ));
        }
        let mut rest = &buf[..n];
        if let Some(w) = whole.as_mut() {
            w.update(rest);
        }
        while !rest.is_empty() {
            let take = rest.len().min((chunk_size - in_chunk) as usize);
            chunk.update(&rest[..take]);
            in_chunk += take as u64;
            rest = &rest[take..];
            if in_chunk == chunk_size {
                chunks.push(chunk.finalize_reset().into());
                in_chunk = 0;
            }
        }
        left -= n as u64;
    }
    if in_chunk > 0 {
        chunks.push(chunk.finalize().into());
    }
    Ok(chunks)
}

/// An opened bundle whose manifest envelope has been read but not trusted.
pub struct Bundle {
    path: PathBuf,
    file: File,
    envelope: Envelope,
    envelope_bytes: Vec<u8>,
    tarball_offset: u64,
    tarball_size: u64,
}

/// A bundle whose signatures, manifest, policy and tarball all checked out.
#[derive(Debug)]
pub(crate) struct Verified {
    pub(crate) manifest: Manifest,
    /// Ids of the trusted keys whose signatures verified.
    pub(crate) signed_by: Vec<String>,
    pub(crate) root_version: u64,
}

impl Bundle {
    /// Reads the container structure: both member headers, the manifest
    /// envelope, and where the tarball lies. Classifies garbage as "not a
    /// bundle" and short files as truncated.
    pub fn open(path: &Path) -> Result<Bundle> {
        let file = File::open(path).ctx(path, "open")?;
        let len = file.metadata().ctx(path, "stat")?.len();
        let not_bundle = |detail: String| Error::NotABundle {
            path: path.to_path_buf(),
            detail,
        };
        let truncated = |detail: String| Error::Truncated {
            path: path.to_path_buf(),
            detail,
        };

        let mut header = [0u8; BLOCK as usize];
        let n = read_full_at(&file, &mut header, 0).ctx(path, "read")?;
        if n == 0 {
            return Err(not_bundle("the file is empty".into()));
        }
        if n < header.len() {
            // A short file that starts like a bundle was cut, anything else is not one.
            return if header.starts_with(MANIFEST_ENTRY.as_bytes()) {
                Err(truncated(format!("{len} bytes, not even one tar header")))
            } else {
                Err(not_bundle(format!(
                    "{len} bytes, too short to be a tar archive"
                )))
            };
        }
        let manifest_size = parse_header(&header, MANIFEST_ENTRY).map_err(not_bundle)?;
        if manifest_size > LIMITS.manifest_bytes {
            return Err(Error::TooLarge {
                what: format!("{}: manifest", path.display()),
                size: manifest_size,
                limit: LIMITS.manifest_bytes,
            });
        }
        if len < BLOCK + manifest_size {
            return Err(truncated(format!(
                "the manifest needs {manifest_size} bytes, the file ends {} bytes in",
                len.saturating_sub(BLOCK)
            )));
        }
        let mut envelope_bytes = vec![0u8; manifest_size as usize];
        read_full_at(&file, &mut envelope_bytes, BLOCK).ctx(path, "read")?;
        let envelope = Envelope::parse(&envelope_bytes)
            .map_err(|e| not_bundle(format!("manifest.json is not a signed manifest ({e})")))?;

        let second = BLOCK + manifest_size + padding(manifest_size);
        let n = read_full_at(&file, &mut header, second).ctx(path, "read")?;
        if n < header.len() {
            return Err(truncated(format!(
                "the file ends at byte {len}, before the release tarball"
            )));
        }
        let tarball_size = parse_header(&header, TARBALL_ENTRY).map_err(not_bundle)?;
        let tarball_offset = second + BLOCK;
        if len < tarball_offset.saturating_add(tarball_size) {
            return Err(truncated(format!(
                "the release tarball needs {tarball_size} bytes, the file holds {}",
                len.saturating_sub(tarball_offset)
            )));
        }
        Ok(Bundle {
            path: path.to_path_buf(),
            file,
            envelope,
            envelope_bytes,
            tarball_offset,
            tarball_size,
        })
    }

    #[cfg(test)]
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Checks the signatures against `root`, then parses and validates the
    /// manifest. Nothing from the manifest is looked at before this.
    pub fn verify_manifest(&self, root: &Root) -> Result<(Manifest, Vec<String>)> {
        let what = format!("manifest in {}", self.path.display());
        let (manifest, signed_by) = verify_parsed(&self.envelope, root, &what)?;
        if manifest.tarball.size != self.tarball_size {
            return Err(Error::TarballMismatch {
                path: self.path.clone(),
                detail: format!(
                    "the manifest says {} bytes, the bundle holds {}",
                    manifest.tarball.size, self.tarball_size
                ),
            });
        }
        Ok((manifest, signed_by))
    }

    /// The `manifest.json` member exactly as stored: what an MQTT offer
    /// carries.
    pub(crate) fn manifest_bytes(&self) -> &[u8] {
        &self.envelope_bytes
    }

    /// The manifest as the bundle claims it, NOT verified: for the operator
    /// side (indexing the bundles a server holds), never for a decision on
    /// a device.
    pub fn manifest_unverified(&self) -> Result<Manifest> {
        let m: Manifest = self.envelope.body().map_err(|e| Error::InvalidManifest {
            detail: format!("{}: {e}", self.path.display()),
        })?;
        m.validate()?;
        Ok(m)
    }

    pub fn tarball_size(&self) -> u64 {
        self.tarball_size
    }

    /// Reads tarball bytes `offset..offset + buf.len()` (relative to the
    /// tarball), as far as the tarball goes.
    pub fn read_tarball_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let want = buf
            .len()
            .min(self.tarball_size.saturating_sub(offset) as usize);
        read_full_at(&self.file, &mut buf[..want], self.tarball_offset + offset)
    }

    /// A reader over exactly the tarball's bytes.
    pub fn tarball(&self) -> impl Read + '_ {
        TarballReader {
            file: &self.file,
            pos: self.tarball_offset,
            end: self.tarball_offset + self.tarball_size,
        }
    }

    /// A reader over the tarball that checks each chunk against the
    /// manifest's digest before handing out any of its bytes: a single pass
    /// that never lets an unverified byte through. A mismatch is an
    /// `io::Error` carrying a [`ChunkMismatch`].
    pub(crate) fn verified_tarball<'a>(&'a self, m: &Manifest) -> ChunkVerifier<impl Read + 'a> {
        ChunkVerifier::new(self.tarball(), m, self.path.clone())
    }

    /// Like [`Bundle::verified_tarball`], for `len` bytes at `offset` (one
    /// part of an indexed tarball): the chunks the range touches are read
    /// and checked in full, nothing outside them is read.
    pub(crate) fn verified_range<'a>(
        &'a self,
        m: &Manifest,
        offset: u64,
        len: u64,
    ) -> ChunkVerifier<impl Read + 'a> {
        let chunk_start =
            offset / u64::from(m.tarball.chunk_size) * u64::from(m.tarball.chunk_size);
        let reader = TarballReader {
            file: &self.file,
            pos: self.tarball_offset + chunk_start,
            end: self.tarball_offset + self.tarball_size,
        };
        ChunkVerifier::range(
            reader,
            m,
            self.path.clone(),
            offset,
            offset.saturating_add(len),
        )
    }

    /// Streams the tarball once and compares every chunk's digest with the
    /// (verified) manifest. That is the whole check: the signed manifest
    /// names the size, the chunk size and each chunk's SHA-256 in order,
    /// and every byte lies in exactly one chunk, so a tarball whose chunks
    /// all match is the signed one. Hashing it whole as well would hash
    /// every byte twice and prove nothing more; the whole digest stays the
    /// tarball's name (downloads, `serve`).
    pub(crate) fn verify_tarball(&self, m: &Manifest) -> Result<()> {
        let digests = hash_chunks(&mut self.tarball(), self.tarball_size, m.tarball.chunk_size)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => Error::Truncated {
                    path: self.path.clone(),
                    detail: "the file shrank while it was being read".into(),
                },
                _ => Error::io(&self.path, "read", e),
            })?;
        if let Some(i) = m
            .chunk_digests()
            .iter()
            .zip(&digests)
            .position(|(want, got)| want != got)
        {
            return Err(Error::TarballMismatch {
                path: self.path.clone(),
                detail: format!(
                    "chunk {i} (bytes {}..{}) has the wrong SHA-256",
                    i as u64 * u64::from(m.tarball.chunk_size),
                    i as u64 * u64::from(m.tarball.chunk_size) + m.chunk_len(i)
                ),
            });
        }
        // `validate` makes the list cover the size exactly; a list that did
        // not would leave bytes unchecked.
        debug_assert_eq!(digests.len(), m.chunk_digests().len());
        if digests.len() != m.chunk_digests().len() {
            return Err(Error::TarballMismatch {
                path: self.path.clone(),
                detail: format!(
                    "{} chunks, the manifest names {}",
                    digests.len(),
                    m.chunk_digests().len()
                ),
            });
        }
        Ok(())
    }
}

/// Everything `beamup verify` and the installer check before trusting a
/// bundle, cheapest first: structure, signatures, manifest, policy (expiry,
/// target, anti-rollback), and last the tarball's digests.
pub(crate) fn verify(
    path: &Path,
    root: &Root,
    now: SystemTime,
    device: &DeviceFacts,
) -> Result<Verified> {
    let bundle = Bundle::open(path)?;
    let (manifest, signed_by) = bundle.verify_manifest(root)?;
    policy::check(&manifest, now, device)?;
    bundle.verify_tarball(&manifest)?;
    Ok(Verified {
        manifest,
        signed_by,
        root_version: root.version,
    })
}

/// A chunk that did not match its signed digest.
#[derive(Debug)]
pub(crate) struct ChunkMismatch {
    pub(crate) path: PathBuf,
    pub(crate) index: usize,
    pub(crate) start: u64,
    pub(crate) end: u64,
}

impl std::fmt::Display for ChunkMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "chunk {} (bytes {}..{}) has the wrong SHA-256",
            self.index, self.start, self.end
        )
    }
}

impl std::error::Error for ChunkMismatch {}

impl ChunkMismatch {
    pub(crate) fn to_error(&self) -> Error {
        Error::TarballMismatch {
            path: self.path.clone(),
            detail: self.to_string(),
        }
    }
}

/// Hands out a tarball's bytes (or a range of them) one verified chunk at a
/// time (see [`Bundle::verified_tarball`]). Memory: one chunk.
pub(crate) struct ChunkVerifier<R> {
    inner: R,
    path: PathBuf,
    digests: Vec<[u8; 32]>,
    chunk_size: u64,
    size: u64,
    /// The next chunk to read from `inner`.
    next: usize,
    /// Where the handed-out range starts and ends, in tarball bytes.
    start: u64,
    end: u64,
    buf: Vec<u8>,
    pos: usize,
}

impl<R: Read> ChunkVerifier<R> {
    /// Verifies the whole tarball read from `inner`.
    pub(crate) fn new(inner: R, m: &Manifest, path: PathBuf) -> Self {
        Self::range(inner, m, path, 0, m.tarball.size)
    }

    /// Verifies bytes `start..end` of the tarball; `inner` must read from
    /// the start of the chunk holding `start`. Whole chunks are read and
    /// checked, only the range is handed out.
    fn range(inner: R, m: &Manifest, path: PathBuf, start: u64, end: u64) -> Self {
        let chunk_size = u64::from(m.tarball.chunk_size);
        ChunkVerifier {
            inner,
            path,
            digests: m.chunk_digests(),
            chunk_size,
            size: m.tarball.size,
            next: (start / chunk_size) as usize,
            start,
            end: end.min(m.tarball.size),
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl<R: Read> Read for ChunkVerifier<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.buf.len() {
            let chunk_start = self.next as u64 * self.chunk_size;
            if self.next == self.digests.len() || chunk_start >= self.end {
                return Ok(0);
            }
            let len = self.size.saturating_sub(chunk_start).min(self.chunk_size) as usize;
            self.buf.resize(len, 0);
            self.inner.read_exact(&mut self.buf)?;
            if <[u8; 32]>::from(Sha256::digest(&self.buf)) != self.digests[self.next] {
                self.buf.clear();
                self.pos = 0;
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    ChunkMismatch {
                        path: self.path.clone(),
                        index: self.next,
                        start: chunk_start,
                        end: chunk_start + len as u64,
                    },
                ));
            }
            self.next += 1;
            // Only the range leaves: trim the chunk to it.
            self.buf
                .truncate((self.end - chunk_start).min(len as u64) as usize);
            self.pos = self.start.saturating_sub(chunk_start) as usize;
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

struct TarballReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl Read for TarballReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.end - self.pos;
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// A tar header's checksum as tar computes it: the byte sum with the
/// checksum field itself counted as spaces.
pub(crate) fn header_checksum(block: &[u8; BLOCK as usize]) -> u32 {
    block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                u32::from(b)
            }
        })
        .sum()
}

/// Validates one member header: checksum, regular file, the expected name.
fn parse_header(block: &[u8; BLOCK as usize], want: &str) -> std::result::Result<u64, String> {
    let h = tar::Header::from_byte_slice(block);
    let stored = h.cksum().map_err(|_| "no valid tar header".to_string())?;
    if stored != header_checksum(block) {
        return Err("no valid tar header (bad checksum)".into());
    }
    let name = h.path_bytes();
    if &*name != want.as_bytes() {
        return Err(format!(
            "expected member {want:?}, found {:?}",
            String::from_utf8_lossy(&name)
        ));
    }
    if h.entry_type() != tar::EntryType::Regular {
        return Err(format!("member {want:?} is not a regular file"));
    }
    h.size()
        .map_err(|_| format!("member {want:?} has an unreadable size"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_digests_match_independent_hashing() {
        let data: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let d = hash_stream(&mut &data[..], data.len() as u64, 4096).unwrap();
        assert_eq!(d.chunks.len(), data.len().div_ceil(4096));
        for (i, c) in data.chunks(4096).enumerate() {
            assert_eq!(d.chunks[i], <[u8; 32]>::from(Sha256::digest(c)));
        }
        assert_eq!(d.whole, <[u8; 32]>::from(Sha256::digest(&data)));
    }

    #[test]
    fn chunk_verifier_hands_out_nothing_of_a_bad_chunk() {
        let data: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        let m = crate::release::manifest::for_tests(&data, 4096);
        let mut out = Vec::new();
        ChunkVerifier::new(&data[..], &m, "b".into())
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, data);

        let mut bad = data.clone();
        bad[3 * 4096 + 7] ^= 1;
        let mut v = ChunkVerifier::new(&bad[..], &m, "b".into());
        let mut out = Vec::new();
        let e = v.read_to_end(&mut out).unwrap_err();
        // Chunks 0..3 came through; nothing of chunk 3 did.
        assert_eq!(out.len(), 3 * 4096);
        let mismatch = e
            .get_ref()
            .unwrap()
            .downcast_ref::<ChunkMismatch>()
            .unwrap();
        assert_eq!(
            (mismatch.index, mismatch.start, mismatch.end),
            (3, 12288, 16384)
        );

        // A range hands out exactly its bytes, checks the chunks it touches
        // whole, and never reads the others (a bad chunk there is not seen).
        let range = |bytes: &[u8], start: u64, end: u64| {
            let first = (start / 4096 * 4096) as usize;
            let mut out = Vec::new();
            ChunkVerifier::range(&bytes[first..], &m, "b".into(), start, end)
                .read_to_end(&mut out)
                .map(|_| out)
        };
        assert_eq!(range(&data, 5000, 13_000).unwrap(), data[5000..13_000]);
        assert_eq!(range(&data, 19_000, 20_000).unwrap(), data[19_000..]);
        assert_eq!(range(&bad, 0, 12_288).unwrap(), data[..12_288]);
        assert_eq!(range(&bad, 16_384, 20_000).unwrap(), data[16_384..]);
        let e = range(&bad, 16_000, 16_500).unwrap_err();
        assert!(e.to_string().contains("chunk 3"), "{e}");
    }

    #[test]
    fn short_stream_is_eof() {
        let e = hash_stream(&mut &[1u8, 2, 3][..], 10, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
