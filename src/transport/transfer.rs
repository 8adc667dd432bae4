//! Fetching a release tarball in pieces: which pieces to ask for next (a
//! bounded window of requests in flight, re-asked after a timeout that
//! follows the replies' round trip and backs off when they do not come),
//! what to
//! make of a piece that arrives (requested? duplicate? the wrong size?), and
//! the file it all goes into.
//!
//! [`Window`] is the pure state machine; [`Download`] does the I/O. The
//! download is a bundle-shaped file in the state dir (header, manifest,
//! tarball region at its final offsets, trailer), so that once every chunk
//! it needs is in, the file *is* a bundle and goes to the install engine as
//! it is. Which chunks are needed is the caller's decision (the chunks the
//! unpack will read, `staging::chunks_read`), given to the window as a
//! mask: the others are neither requested nor waited for, and the engine
//! never reads them. Beside the file, an atomically written bitmap lists
//! the chunks whose data verified against the manifest's chunk digests and
//! was fsynced before the bitmap named them (never which are needed: that
//! is worked out again on resume): after a power cut, a kill or a broker
//! restart the transfer resumes with exactly what is needed and missing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest, Sha256};

use crate::bundle::{Bundle, Frame};
use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::release::manifest::Manifest;

/// A piece of the tarball to request: never spans two chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Piece {
    pub(crate) chunk: u32,
    pub(crate) offset: u64,
    pub(crate) len: u32,
}

/// What to do with a piece that arrived.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Accept {
    /// Store it; `complete` when it was the last missing piece of its chunk,
    /// which must now be checked against its digest.
    Store { chunk: u32, complete: bool },
    /// Drop it, for the reason given.
    Ignore(&'static str),
}

struct Sent {
    len: u32,
    at: Instant,
    /// Asked before and timed out: its reply may answer either request, so
    /// it is no sample of the round trip.
    again: bool,
}

/// The longest a piece is waited for before it is asked again, however
/// slow the replies were or how often they timed out.
pub(crate) const MAX_PIECE_TIMEOUT: Duration = Duration::from_secs(60);

/// The request window over the pieces of one tarball, or of the chunks of
/// it that are needed (see [`Window::needing`]).
pub(crate) struct Window {
    size: u64,
    chunk_size: u32,
    piece: u32,
    /// Chunks verified (and, once a checkpoint names them, durable).
    have: Vec<bool>,
    /// Chunks the install will read: only these are requested, and the
    /// transfer is done when all of them are verified. Never persisted.
    need: Vec<bool>,
    /// Chunks needed and not verified yet.
    missing: usize,
    /// Pieces received of chunks not yet verified (multi-piece chunks only).
    partial: HashMap<u32, Vec<bool>>,
    /// In flight, by offset.
    inflight: BTreeMap<u64, Sent>,
    /// The lowest chunk that may still be missing.
    cursor: usize,
    window: usize,
    /// The timeout given: the least a piece is waited for.
    base_timeout: Duration,
    /// The current timeout: four smoothed round trips (at least the base),
    /// doubled each time requests time out, at most `MAX_PIECE_TIMEOUT`.
    /// A server or broker that falls behind (a whole fleet fetching at
    /// once) then gets fewer requests again instead of more: with a fixed
    /// timeout every piece queued longer than it was asked and sent twice.
    timeout: Duration,
    /// Smoothed round trip of the pieces answered at their first asking.
    srtt: Option<Duration>,
    /// Offsets whose request timed out and that were not asked again yet.
    timed_out: HashSet<u64>,
    /// How much of the window is open: all of it at first, one piece after
    /// requests time out, and one more with each piece that arrives. What
    /// a timeout asks again is then one piece, not a window's worth of
    /// replies the server may still be sending.
    open: usize,
    /// Complete chunks whose digest is being checked.
    verifying: std::collections::HashSet<u32>,
    /// Digest failures per chunk.
    failures: HashMap<u32, u32>,
    pub(crate) requested: u64,
    pub(crate) ignored: u64,
}

impl Window {
    /// `have` lists the chunks already verified; `piece` is the largest
    /// piece the transport carries (at most the chunk size). Every chunk is
    /// needed.
    pub(crate) fn new(
        size: u64,
        chunk_size: u32,
        piece: u32,
        have: Vec<bool>,
        window: usize,
        timeout: Duration,
    ) -> Window {
        let missing = have.iter().filter(|&&h| !h).count();
        Window {
            size,
            chunk_size,
            piece: piece.clamp(1, chunk_size),
            need: vec![true; have.len()],
            have,
            missing,
            partial: HashMap::new(),
            inflight: BTreeMap::new(),
            cursor: 0,
            window: window.max(1),
            base_timeout: timeout.min(MAX_PIECE_TIMEOUT),
            timeout: timeout.min(MAX_PIECE_TIMEOUT),
            srtt: None,
            timed_out: HashSet::new(),
            open: window.max(1),
            verifying: Default::default(),
            failures: HashMap::new(),
            requested: 0,
            ignored: 0,
        }
    }

    /// Limits the transfer to the chunks `need` marks (one flag per chunk;
    /// a mask of another length is ignored and every chunk stays needed):
    /// the others are neither requested nor waited for. Chunks already
    /// verified stay verified whether needed or not. Requests in flight for
    /// chunks no longer needed are forgotten.
    pub(crate) fn needing(mut self, need: Vec<bool>) -> Window {
        if need.len() == self.have.len() {
            self.need = need;
            self.missing = self
                .need
                .iter()
                .zip(&self.have)
                .filter(|&(&n, &h)| n && !h)
                .count();
            self.cursor = 0;
            let cs = u64::from(self.chunk_size);
            let need = &self.need;
            self.inflight.retain(|off, _| need[(off / cs) as usize]);
            self.timed_out.retain(|off| need[(off / cs) as usize]);
        }
        self
    }

    pub(crate) fn have(&self) -> &[bool] {
        &self.have
    }

    /// How many chunks are needed, and their total size in bytes.
    pub(crate) fn needed(&self) -> (usize, u64) {
        self.need
            .iter()
            .enumerate()
            .filter(|&(_, &n)| n)
            .fold((0, 0), |(c, b), (i, _)| {
                (c + 1, b + u64::from(self.chunk_len(i as u32)))
            })
    }

    /// Every needed chunk is verified.
    pub(crate) fn done(&self) -> bool {
        self.missing == 0
    }

    /// Pieces the window has room for: requested and not answered, or
    /// answered and still being checked, count against it (so memory for
    /// chunks waiting to be hashed is bounded too).
    pub(crate) fn room(&self) -> usize {
        self.window
            .min(self.open)
            .saturating_sub(self.inflight.len() + self.verifying.len())
    }

    /// Percent of the needed chunks verified, 0..=100.
    pub(crate) fn percent(&self) -> u8 {
        let needed = self.need.iter().filter(|&&n| n).count();
        if needed == 0 {
            return 100;
        }
        ((needed - self.missing) * 100 / needed) as u8
    }

    fn chunk_len(&self, chunk: u32) -> u32 {
        let start = u64::from(chunk) * u64::from(self.chunk_size);
        (self.size - start).min(u64::from(self.chunk_size)) as u32
    }

    fn pieces_of(&self, chunk: u32) -> u32 {
        self.chunk_len(chunk).div_ceil(self.piece)
    }

    /// A new largest piece size (another broker limit after a reconnect):
    /// partial chunks and requests in flight are dropped.
    pub(crate) fn set_piece(&mut self, piece: u32) {
        let piece = piece.clamp(1, self.chunk_size);
        if piece != self.piece {
            self.piece = piece;
            self.partial.clear();
            self.inflight.clear();
            self.timed_out.clear();
        }
    }

    /// Forgets every request in flight (the connection was lost: replies
    /// to them may never come); they are asked again.
    pub(crate) fn reset_in_flight(&mut self) {
        self.inflight.clear();
    }

    /// Requests to send now, in batches of at least `batch` pieces (so that
    /// adjacent pieces can share a request) unless nothing is in flight:
    /// timed-out ones again, then missing pieces in order. Timeouts are
    /// looked at first: a window whose every request went unanswered (no
    /// server holds the bundle yet, or none was listening) has no room
    /// until they expire, and must still be asked again.
    pub(crate) fn next_batch(&mut self, now: Instant, batch: usize) -> Vec<Piece> {
        self.expire(now);
        if !self.inflight.is_empty() && self.room() < batch {
            return Vec::new();
        }
        self.next_requests(now)
    }

    /// Forgets the requests in flight for longer than the timeout, which
    /// doubles if any did.
    fn expire(&mut self, now: Instant) {
        let timeout = self.timeout;
        let before = self.inflight.len();
        let timed_out = &mut self.timed_out;
        self.inflight.retain(|&offset, s| {
            let waiting = now.saturating_duration_since(s.at) < timeout;
            if !waiting {
                timed_out.insert(offset);
            }
            waiting
        });
        if self.inflight.len() < before {
            self.timeout = (self.timeout * 2).min(MAX_PIECE_TIMEOUT);
            self.open = 1;
        }
    }

    /// How long a piece asked now is waited for.
    pub(crate) fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Requests to send now: timed-out ones again, then missing pieces in
    /// order, up to the window.
    pub(crate) fn next_requests(&mut self, now: Instant) -> Vec<Piece> {
        self.expire(now);
        let mut out = Vec::new();
        while self.cursor < self.have.len() && (self.have[self.cursor] || !self.need[self.cursor]) {
            self.cursor += 1;
        }
        let mut chunk = self.cursor;
        while self.room() > 0 && chunk < self.have.len() {
            if self.need[chunk] && !self.have[chunk] && !self.verifying.contains(&(chunk as u32)) {
                let c = chunk as u32;
                let base = u64::from(c) * u64::from(self.chunk_size);
                let clen = self.chunk_len(c);
                for p in 0..self.pieces_of(c) {
                    if self.room() == 0 {
                        break;
                    }
                    let received = self
                        .partial
                        .get(&c)
                        .is_some_and(|r| r.get(p as usize) == Some(&true));
                    let offset = base + u64::from(p) * u64::from(self.piece);
                    if received || self.inflight.contains_key(&offset) {
                        continue;
                    }
                    let len = (clen - p * self.piece).min(self.piece);
                    let again = self.timed_out.remove(&offset);
                    self.inflight.insert(
                        offset,
                        Sent {
                            len,
                            at: now,
                            again,
                        },
                    );
                    self.requested += 1;
                    out.push(Piece {
                        chunk: c,
                        offset,
                        len,
                    });
                }
            }
            chunk += 1;
        }
        out
    }

    /// A piece arrived at `now`: only what was asked for, in the size asked
    /// for, and not yet held, is stored.
    pub(crate) fn on_piece(&mut self, offset: u64, len: usize, now: Instant) -> Accept {
        let Some(sent) = self.inflight.get(&offset) else {
            self.ignored += 1;
            return Accept::Ignore("not requested (or a duplicate)");
        };
        if sent.len as usize != len {
            self.ignored += 1;
            return Accept::Ignore("not the length requested");
        }
        if !sent.again {
            let sample = now.saturating_duration_since(sent.at);
            let srtt = self.srtt.map_or(sample, |s| (s * 7 + sample) / 8);
            self.srtt = Some(srtt);
            self.timeout = (srtt * 4).clamp(self.base_timeout, MAX_PIECE_TIMEOUT);
        }
        self.open = (self.open + 1).min(self.window);
        self.inflight.remove(&offset);
        let chunk = (offset / u64::from(self.chunk_size)) as u32;
        if self.have[chunk as usize] {
            self.ignored += 1;
            return Accept::Ignore("chunk already verified");
        }
        let pieces = self.pieces_of(chunk) as usize;
        let complete = if pieces == 1 {
            true
        } else {
            let base = u64::from(chunk) * u64::from(self.chunk_size);
            let p = ((offset - base) / u64::from(self.piece)) as usize;
            let got = self
                .partial
                .entry(chunk)
                .or_insert_with(|| vec![false; pieces]);
            got[p] = true;
            got.iter().all(|&g| g)
        };
        if complete {
            self.verifying.insert(chunk);
        }
        Accept::Store { chunk, complete }
    }

    /// The chunk's data matched its digest (and is stored).
    pub(crate) fn chunk_verified(&mut self, chunk: u32) {
        self.partial.remove(&chunk);
        self.verifying.remove(&chunk);
        if !self.have[chunk as usize] {
            self.have[chunk as usize] = true;
            if self.need[chunk as usize] {
                self.missing -= 1;
            }
        }
    }

    /// The chunk's data did not match: all of it is asked again. Returns how
    /// often this chunk failed so far.
    pub(crate) fn chunk_failed(&mut self, chunk: u32) -> u32 {
        self.partial.remove(&chunk);
        self.verifying.remove(&chunk);
        let n = self.failures.entry(chunk).or_insert(0);
        *n += 1;
        *n
    }
}

const PART_FILE: &str = "bundle.part";
const BITMAP_FILE: &str = "chunks.bitmap";
const BITMAP_MAGIC: &[u8; 4] = b"BUBM";
/// A chunk that fails its digest this often stops the transfer: the
/// server's copy is bad, re-asking will not help.
pub(crate) const MAX_CHUNK_FAILURES: u32 = 10;

/// What [`Download::on_data`] did with a piece.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Received {
    Ignored(&'static str),
    Stored,
    Verified(u32),
    /// The chunk failed its digest and will be fetched again.
    Corrupt(u32),
}

/// Verified chunks are written to the file in batches of adjacent chunks
/// of up to this many bytes (one write): the page cache takes large
/// writes for about 40% less CPU than 64 KiB ones at offsets that are not
/// page-aligned (the tarball starts wherever the manifest ends).
const WRITE_BATCH: usize = 1024 * 1024;

/// Verified chunks waiting to be written, adjacent in the file.
///
/// The data is copied into one buffer that lives as long as the download,
/// rather than kept as the received messages: one write from one buffer,
/// and each message freed as soon as it is verified, so that the allocator
/// hands its memory to the next one. In benches/transfer.rs the copy cost
/// less than it saved: the agent's CPU per 50 MiB went from 76-80 ms
/// (messages kept, one writev) to 63 ms.
#[derive(Default)]
struct Batch {
    /// File offset of the first.
    at: u64,
    data: Vec<u8>,
}

/// A transfer in progress, in `STATE_DIR/download/`.
pub(crate) struct Download {
    dir: PathBuf,
    file: File,
    /// Verified chunks not written yet (always written before a checkpoint
    /// names them).
    batch: Batch,
    frame: Frame,
    digests: Vec<[u8; 32]>,
    tarball: [u8; 32],
    chunk_size: u32,
    pub(crate) window: Window,
    unsynced: usize,
    last_checkpoint: Instant,
    /// A checkpoint running in the background: fdatasync, then the bitmap
    /// as it was when the sync started.
    syncing: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Download {
    /// The envelope bytes of the download kept in `dir`, if there is one.
    pub(crate) fn existing_offer(dir: &Path) -> Option<Vec<u8>> {
        let b = Bundle::open(&dir.join(PART_FILE)).ok()?;
        Some(b.manifest_bytes().to_vec())
    }

    /// Removes whatever download `dir` holds.
    pub(crate) fn discard(dir: &Path) -> Result<()> {
        match fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(dir, "remove", e)),
        }
    }

    /// Starts, or resumes, the download of `m`'s tarball (whose signed
    /// envelope is `envelope`) into `dir`, fetching only the chunks `need`
    /// marks (one flag per chunk, see [`Window::needing`]). A resumed
    /// download re-checks the chunks its bitmap lists and keeps only the
    /// good ones.
    pub(crate) fn open(
        dir: &Path,
        envelope: &[u8],
        m: &Manifest,
        need: Vec<bool>,
        piece: u32,
        window: usize,
        timeout: Duration,
    ) -> Result<Download> {
        let mtime = humantime::parse_rfc3339(&m.created_at)
            .ok()
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_secs());
        let frame = Frame::new(envelope, m.tarball.size, mtime);
        let digests = m.chunk_digests();
        let tarball = m.tarball_digest();
        let path = dir.join(PART_FILE);
        let resumed = Self::existing_offer(dir).is_some_and(|e| e == envelope)
            && fs::metadata(&path).is_ok_and(|md| md.len() == frame.len());
        let (file, have) = if resumed {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .ctx(&path, "open")?;
            let listed = read_bitmap(&dir.join(BITMAP_FILE), &tarball, digests.len());
            let mut have = vec![false; digests.len()];
            let mut buf = vec![0u8; m.tarball.chunk_size as usize];
            for (i, listed) in listed.into_iter().enumerate() {
                if !listed {
                    continue;
                }
                let len = m.chunk_len(i) as usize;
                let off = frame.tarball_offset + i as u64 * u64::from(m.tarball.chunk_size);
                if file.read_exact_at(&mut buf[..len], off).is_ok()
                    && <[u8; 32]>::from(Sha256::digest(&buf[..len])) == digests[i]
                {
                    have[i] = true;
                } else {
                    tracing::warn!("download: chunk {i} listed as verified did not verify again");
                }
            }
            (file, have)
        } else {
            Self::discard(dir)?;
            fs::DirBuilder::new()
                .recursive(true)
                .create(dir)
                .ctx(dir, "create")?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .ctx(&path, "create")?;
            // Allocated when all of it will be written; sparse when only
            // some chunks are needed (no disk for the rest).
            if need.iter().all(|&n| n) {
                allocate(&file, frame.len()).ctx(&path, "allocate")?;
            } else {
                file.set_len(frame.len()).ctx(&path, "allocate")?;
            }
            file.write_all_at(&frame.head, 0).ctx(&path, "write")?;
            file.write_all_at(&frame.tail, frame.tarball_offset + frame.tarball_size)
                .ctx(&path, "write")?;
            file.sync_all().ctx(&path, "fsync")?;
            fsutil::sync_dir(dir)?;
            (file, vec![false; digests.len()])
        };
        let window = Window::new(
            m.tarball.size,
            m.tarball.chunk_size,
            piece,
            have,
            window,
            timeout,
        )
        .needing(need);
        let d = Download {
            dir: dir.to_path_buf(),
            file,
            batch: Batch::default(),
            frame,
            digests,
            tarball,
            chunk_size: m.tarball.chunk_size,
            window,
            unsynced: 0,
            last_checkpoint: Instant::now(),
            syncing: None,
        };
        d.write_bitmap()?;
        Ok(d)
    }

    pub(crate) fn path(&self) -> PathBuf {
        self.dir.join(PART_FILE)
    }

    /// The tarball's SHA-256: what requests name.
    pub(crate) fn tarball_id(&self) -> &[u8; 32] {
        &self.tarball
    }

    /// Takes a piece that arrived. A whole chunk is hashed before it
    /// touches the disk (and written with the adjacent ones, see
    /// [`WRITE_BATCH`]); pieces of a larger chunk are written, and the chunk
    /// is checked once all are in.
    pub(crate) fn on_data(&mut self, offset: u64, data: bytes::Bytes) -> Result<Received> {
        let (chunk, complete) = match self.window.on_piece(offset, data.len(), Instant::now()) {
            Accept::Ignore(why) => return Ok(Received::Ignored(why)),
            Accept::Store { chunk, complete } => (chunk, complete),
        };
        let path = self.path();
        let at = self.frame.tarball_offset + offset;
        let whole = data.len() as u64
            == (self.frame.tarball_size - u64::from(chunk) * u64::from(self.chunk_size))
                .min(u64::from(self.chunk_size));
        let digest_ok = if whole {
            let ok = <[u8; 32]>::from(Sha256::digest(&data)) == self.digests[chunk as usize];
            if ok {
                self.write_later(at, data)?;
            }
            ok
        } else {
            self.file.write_all_at(&data, at).ctx(&path, "write")?;
            if !complete {
                return Ok(Received::Stored);
            }
            let start = u64::from(chunk) * u64::from(self.chunk_size);
            let len = (self.frame.tarball_size - start).min(u64::from(self.chunk_size)) as usize;
            let mut buf = vec![0u8; len];
            self.file
                .read_exact_at(&mut buf, self.frame.tarball_offset + start)
                .ctx(&path, "read")?;
            <[u8; 32]>::from(Sha256::digest(&buf)) == self.digests[chunk as usize]
        };
        if digest_ok {
            self.window.chunk_verified(chunk);
            self.unsynced += 1;
            Ok(Received::Verified(chunk))
        } else {
            let n = self.window.chunk_failed(chunk);
            if n >= MAX_CHUNK_FAILURES {
                return Err(Error::TarballMismatch {
                    path,
                    detail: format!(
                        "chunk {chunk} arrived with the wrong SHA-256 {n} times; the server's copy differs from the signed manifest"
                    ),
                });
            }
            Ok(Received::Corrupt(chunk))
        }
    }

    /// Adds verified data at file offset `at` to the batch, writing the
    /// batch first if `at` does not continue it, and after if it is full.
    fn write_later(&mut self, at: u64, data: bytes::Bytes) -> Result<()> {
        if !self.batch.data.is_empty() && self.batch.at + self.batch.data.len() as u64 != at {
            self.write_batch()?;
        }
        if self.batch.data.is_empty() {
            self.batch.at = at;
            if self.batch.data.capacity() == 0 {
                self.batch
                    .data
                    .reserve_exact(WRITE_BATCH + self.chunk_size as usize);
            }
        }
        self.batch.data.extend_from_slice(&data);
        drop(data); // the client's read buffer is free again
        if self.batch.data.len() >= WRITE_BATCH {
            self.write_batch()?;
        }
        Ok(())
    }

    /// Writes the batch at its offset and empties it (keeping the buffer).
    fn write_batch(&mut self) -> Result<()> {
        if self.batch.data.is_empty() {
            return Ok(());
        }
        let result = self.file.write_all_at(&self.batch.data, self.batch.at);
        self.batch.data.clear();
        result.ctx(self.path(), "write")
    }

    /// Makes the verified chunks durable: data first, then the bitmap that
    /// names them. Waits for a background checkpoint first.
    pub(crate) fn checkpoint(&mut self) -> Result<()> {
        if let Some(h) = self.syncing.take() {
            h.join().expect("checkpoint thread")?;
        }
        if self.unsynced == 0 {
            return Ok(());
        }
        self.write_batch()?;
        self.file.sync_data().ctx(self.path(), "fsync")?;
        self.write_bitmap()?;
        self.unsynced = 0;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Checkpoints in the background when enough was received, or enough
    /// time passed, so that the transfer does not wait for the disk. The
    /// bitmap written names only chunks written before its fdatasync began.
    pub(crate) fn maybe_checkpoint(&mut self, every: Duration, chunks: usize) -> Result<()> {
        if let Some(h) = &self.syncing {
            if !h.is_finished() {
                return Ok(());
            }
            self.syncing
                .take()
                .expect("some")
                .join()
                .expect("checkpoint thread")?;
        }
        if self.unsynced >= chunks || (self.unsynced > 0 && self.last_checkpoint.elapsed() >= every)
        {
            self.write_batch()?;
            let file = self.file.try_clone().ctx(self.path(), "dup")?;
            let path = self.path();
            let bitmap = self.bitmap_bytes();
            let bitmap_path = self.dir.join(BITMAP_FILE);
            self.unsynced = 0;
            self.last_checkpoint = Instant::now();
            self.syncing = Some(std::thread::spawn(move || {
                file.sync_data().ctx(&path, "fsync")?;
                fsutil::write_atomic(&bitmap_path, 0o600, true, &bitmap)
            }));
        }
        Ok(())
    }

    fn write_bitmap(&self) -> Result<()> {
        fsutil::write_atomic(
            &self.dir.join(BITMAP_FILE),
            0o600,
            true,
            &self.bitmap_bytes(),
        )
    }

    fn bitmap_bytes(&self) -> Vec<u8> {
        let have = self.window.have();
        let mut bytes = Vec::with_capacity(40 + have.len() / 8 + 1);
        bytes.extend_from_slice(BITMAP_MAGIC);
        bytes.extend_from_slice(&self.tarball);
        bytes.extend_from_slice(&(have.len() as u32).to_be_bytes());
        let mut bits = vec![0u8; have.len().div_ceil(8)];
        for (i, &h) in have.iter().enumerate() {
            if h {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        bytes.extend_from_slice(&bits);
        bytes
    }
}

/// Gives the download file its final length with its blocks allocated
/// (no hole): a full disk shows now rather than half-way, and the page
/// cache takes the chunks' writes for less CPU than into a hole (ext4's
/// delayed allocation, benches/transfer.rs). A sparse file where the file
/// system cannot allocate ahead.
fn allocate(file: &File, len: u64) -> std::io::Result<()> {
    use nix::errno::Errno;
    // `off_t` is 32 bits on 32-bit glibc targets (armv7): a larger file
    // stays sparse there.
    let Ok(n) = nix::libc::off_t::try_from(len) else {
        return file.set_len(len);
    };
    match nix::fcntl::fallocate(file, nix::fcntl::FallocateFlags::empty(), 0, n) {
        Ok(()) => Ok(()),
        Err(Errno::EOPNOTSUPP | Errno::ENOSYS | Errno::EINVAL) => file.set_len(len),
        Err(e) => Err(e.into()),
    }
}

/// The chunks a bitmap file lists; nothing when it is missing, damaged or
/// belongs to another tarball.
pub(crate) fn read_bitmap(path: &Path, tarball: &[u8; 32], chunks: usize) -> Vec<bool> {
    let none = vec![false; chunks];
    let size = 40 + chunks.div_ceil(8);
    let Ok(bytes) = fsutil::read_limited(path, size as u64, "chunk bitmap") else {
        return none;
    };
    if bytes.len() != size
        || &bytes[..4] != BITMAP_MAGIC
        || &bytes[4..36] != tarball
        || bytes[36..40] != (chunks as u32).to_be_bytes()
    {
        return none;
    }
    (0..chunks)
        .map(|i| bytes[40 + i / 8] & (1 << (i % 8)) != 0)
        .collect()
}

#[cfg(test)]
/// The bitmap file of the download in `dir` (for tests and `status`).
pub(crate) fn bitmap_path(dir: &Path) -> PathBuf {
    dir.join(BITMAP_FILE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A window over one 4 KiB chunk (and piece) per entry of `have`,
    /// `inflight` pieces at most in flight, a 5 s timeout.
    fn window(have: Vec<bool>, inflight: usize) -> Window {
        Window::new(
            have.len() as u64 * 4096,
            4096,
            4096,
            have,
            inflight,
            Duration::from_secs(5),
        )
    }

    fn t0() -> Instant {
        Instant::now()
    }

    #[test]
    fn window_is_bounded_and_fills_in_order() {
        let mut w = window(vec![false; 10], 3);
        let now = t0();
        let r = w.next_requests(now);
        assert_eq!(r.iter().map(|p| p.chunk).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(w.next_requests(now).is_empty(), "window full");
        assert_eq!(
            w.on_piece(4096, 4096, t0()),
            Accept::Store {
                chunk: 1,
                complete: true
            }
        );
        w.chunk_verified(1);
        let r = w.next_requests(now);
        assert_eq!(r.iter().map(|p| p.chunk).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn chunks_being_checked_hold_their_place_in_the_window() {
        let mut w = window(vec![false; 4], 2);
        let now = t0();
        assert_eq!(w.next_requests(now).len(), 2);
        assert!(matches!(
            w.on_piece(0, 4096, t0()),
            Accept::Store { complete: true, .. }
        ));
        assert_eq!(w.room(), 0, "chunk 0 is being checked");
        assert!(w.next_requests(now).is_empty());
        w.chunk_verified(0);
        let r = w.next_requests(now);
        assert_eq!(r.iter().map(|p| p.chunk).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn duplicates_unrequested_and_wrong_sizes_are_ignored() {
        let mut w = window(vec![false; 4], 2);
        w.next_requests(t0());
        assert!(
            matches!(w.on_piece(3 * 4096, 4096, t0()), Accept::Ignore(_)),
            "unrequested"
        );
        assert!(
            matches!(w.on_piece(0, 100, t0()), Accept::Ignore(_)),
            "short"
        );
        assert!(matches!(w.on_piece(0, 4096, t0()), Accept::Store { .. }));
        w.chunk_verified(0);
        assert!(
            matches!(w.on_piece(0, 4096, t0()), Accept::Ignore(_)),
            "duplicate"
        );
        assert!(
            matches!(w.on_piece(17, 4096, t0()), Accept::Ignore(_)),
            "misaligned"
        );
        assert_eq!(w.ignored, 4);
    }

    #[test]
    fn reordered_pieces_complete_a_chunk_and_failures_refetch_it() {
        // 2 chunks of 8192, pieces of 4096, the last chunk short.
        let size = 8192 + 5000;
        let mut w = Window::new(size, 8192, 4096, vec![false; 2], 8, Duration::from_secs(5));
        let r = w.next_requests(t0());
        assert_eq!(
            r.iter()
                .map(|p| (p.chunk, p.offset, p.len))
                .collect::<Vec<_>>(),
            [
                (0, 0, 4096),
                (0, 4096, 4096),
                (1, 8192, 4096),
                (1, 12288, 904)
            ]
        );
        assert_eq!(
            w.on_piece(12288, 904, t0()),
            Accept::Store {
                chunk: 1,
                complete: false
            }
        );
        assert_eq!(
            w.on_piece(8192, 4096, t0()),
            Accept::Store {
                chunk: 1,
                complete: true
            }
        );
        assert_eq!(w.chunk_failed(1), 1);
        let again = w.next_requests(t0());
        assert_eq!(again.iter().map(|p| p.chunk).collect::<Vec<_>>(), [1, 1]);
    }

    #[test]
    fn timeouts_and_reconnects_re_request() {
        let mut w = window(vec![false; 2], 1);
        let now = t0();
        assert_eq!(w.next_requests(now).len(), 1);
        assert!(w.next_requests(now + Duration::from_secs(1)).is_empty());
        let r = w.next_requests(now + Duration::from_secs(6));
        assert_eq!(r[0].chunk, 0, "timed out: asked again");
        w.reset_in_flight();
        assert_eq!(w.next_requests(now).len(), 1);
        assert_eq!(w.requested, 3);
    }

    #[test]
    fn the_timeout_doubles_while_requests_go_unanswered_up_to_a_minute() {
        let mut w = window(vec![false; 1], 1);
        let now = t0();
        let at = |s: u64| now + Duration::from_secs(s);
        assert_eq!(w.next_requests(now).len(), 1);
        // 5 s, then 10, 20, 40, and never more than 60.
        let mut asked = vec![];
        for s in 1..400 {
            if !w.next_requests(at(s)).is_empty() {
                asked.push(s);
            }
        }
        assert_eq!(asked, [5, 15, 35, 75, 135, 195, 255, 315, 375]);
        assert_eq!(w.timeout(), MAX_PIECE_TIMEOUT);
    }

    #[test]
    fn the_timeout_follows_slow_replies_so_a_queued_piece_is_not_asked_twice() {
        let mut w = window(vec![false; 400], 4);
        let now = t0();
        let at = |ms: u64| now + Duration::from_millis(ms);
        // Replies come 4 s after their request: a broker or server behind
        // a fleet's worth of requests.
        let mut clock = 0;
        for _ in 0..8 {
            let asked = w.next_requests(at(clock));
            for p in &asked {
                assert!(matches!(
                    w.on_piece(p.offset, 4096, at(clock + 4000)),
                    Accept::Store { .. }
                ));
                w.chunk_verified(p.chunk);
            }
            clock += 4000;
        }
        assert!(w.timeout() >= Duration::from_secs(12), "{:?}", w.timeout());
        // A piece 6 s late now is still waited for, not asked again.
        let asked = w.next_requests(at(clock));
        assert_eq!(asked.len(), 4);
        assert!(w.next_requests(at(clock + 6000)).is_empty());
        // Fast replies bring it back down to the 5 s floor.
        for p in &asked {
            w.on_piece(p.offset, 4096, at(clock + 6010));
            w.chunk_verified(p.chunk);
        }
        clock += 6010;
        for _ in 0..30 {
            for p in w.next_requests(at(clock)) {
                w.on_piece(p.offset, 4096, at(clock + 10));
                w.chunk_verified(p.chunk);
            }
            clock += 10;
        }
        assert_eq!(w.timeout(), Duration::from_secs(5));
    }

    #[test]
    fn a_reply_to_a_piece_asked_twice_is_no_round_trip_sample() {
        let mut w = window(vec![false; 2], 1);
        let now = t0();
        let at = |s: u64| now + Duration::from_secs(s);
        w.next_requests(now);
        let again = w.next_requests(at(5));
        assert_eq!(again.len(), 1);
        assert_eq!(w.timeout(), Duration::from_secs(10));
        // Answered 30 s after the first asking: which request it answers
        // is unknown, so the timeout stays as the backoff left it.
        w.on_piece(again[0].offset, 4096, at(30));
        assert_eq!(w.timeout(), Duration::from_secs(10));
    }

    #[test]
    fn a_window_with_every_request_unanswered_asks_again_after_the_timeout() {
        let mut w = window(vec![false; 40], 8);
        let now = t0();
        let at = |ms: u64| now + Duration::from_millis(ms);
        assert_eq!(w.next_batch(now, 4).len(), 8);
        assert!(w.next_batch(at(1000), 4).is_empty());
        // Not one answer came (no server was listening): asked again, one
        // piece first, the lowest.
        let again = w.next_batch(at(6000), 4);
        assert_eq!(again.iter().map(|p| p.offset).collect::<Vec<_>>(), [0]);
        assert!(w.next_batch(at(6100), 4).is_empty());
        // Each answer opens the window by one more piece: 2, then 4, then
        // the eight it had, the timed-out pieces first.
        let mut batch = again;
        let (mut sizes, mut offsets) = (vec![], vec![]);
        for round in 0..4 {
            sizes.push(batch.len());
            offsets.extend(batch.iter().map(|p| p.offset));
            let t = at(6100 + 10 * round);
            for p in &batch {
                assert!(matches!(
                    w.on_piece(p.offset, 4096, t),
                    Accept::Store { .. }
                ));
                w.chunk_verified(p.chunk);
            }
            batch = w.next_batch(t, 1);
        }
        assert_eq!(sizes, [1, 2, 4, 8]);
        assert_eq!(offsets, (0..15).map(|i| i * 4096).collect::<Vec<_>>());
    }

    #[test]
    fn resumed_window_asks_only_for_what_is_missing() {
        let mut w = window(vec![true, false, true, false], 8);
        assert_eq!(w.percent(), 50);
        let r = w.next_requests(t0());
        assert_eq!(r.iter().map(|p| p.chunk).collect::<Vec<_>>(), [1, 3]);
    }

    fn mask(n: usize, needed: &[usize]) -> Vec<bool> {
        (0..n).map(|i| needed.contains(&i)).collect()
    }

    #[test]
    fn only_needed_chunks_are_requested_counted_and_waited_for() {
        let mut w = Window::new(
            8 * 4096 + 100,
            4096,
            4096,
            vec![false; 9],
            16,
            Duration::from_secs(5),
        )
        .needing(mask(9, &[2, 3, 8]));
        assert_eq!(w.needed(), (3, 2 * 4096 + 100));
        assert_eq!(w.percent(), 0);
        assert!(!w.done());
        let now = t0();
        let r = w.next_requests(now);
        assert_eq!(
            r.iter().map(|p| (p.chunk, p.len)).collect::<Vec<_>>(),
            [(2, 4096), (3, 4096), (8, 100)]
        );
        assert!(w.next_requests(now).is_empty(), "nothing else is asked");
        // A reply for a chunk that is not needed was never asked for.
        assert!(matches!(w.on_piece(0, 4096, t0()), Accept::Ignore(_)));
        for (c, len) in [(2u32, 4096), (8, 100)] {
            assert!(matches!(
                w.on_piece(u64::from(c) * 4096, len, t0()),
                Accept::Store { complete: true, .. }
            ));
            w.chunk_verified(c);
        }
        assert_eq!(w.percent(), 66);
        assert!(!w.done());
        assert!(matches!(
            w.on_piece(3 * 4096, 4096, t0()),
            Accept::Store { complete: true, .. }
        ));
        w.chunk_verified(3);
        assert_eq!(w.percent(), 100);
        assert!(w.done(), "done with 3 of 9 chunks");
        assert!(w.next_requests(now + Duration::from_secs(60)).is_empty());
        // Verified means verified: the chunks not needed are not.
        assert_eq!(w.have(), &mask(9, &[2, 3, 8])[..]);
    }

    #[test]
    fn timed_out_needed_chunks_are_asked_again_and_only_those() {
        let mut w = window(vec![false; 6], 8).needing(mask(6, &[1, 4]));
        let now = t0();
        assert_eq!(w.next_requests(now).len(), 2);
        let at = |ms: u64| now + Duration::from_millis(ms);
        // One at a time after a timeout, and only needed ones.
        let again = w.next_requests(at(6000));
        assert_eq!(again.iter().map(|p| p.chunk).collect::<Vec<_>>(), [1]);
        w.on_piece(again[0].offset, 4096, at(6010));
        w.chunk_verified(1);
        let then = w.next_requests(at(6020));
        assert_eq!(then.iter().map(|p| p.chunk).collect::<Vec<_>>(), [4]);
    }

    #[test]
    fn resume_with_bitmap_and_mask_asks_for_what_is_needed_and_missing() {
        // The bitmap lists 0, 1 and 5 (5 from an earlier, larger mask); the
        // plan now needs 1, 2 and 3.
        let mut w = window(mask(6, &[0, 1, 5]), 8).needing(mask(6, &[1, 2, 3]));
        assert_eq!(w.percent(), 33, "1 of the 3 needed chunks is there");
        let r = w.next_requests(t0());
        assert_eq!(r.iter().map(|p| p.chunk).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(
            w.have(),
            &mask(6, &[0, 1, 5])[..],
            "chunks not needed stay verified"
        );
        // Everything needed already there: done at once.
        let w = window(mask(6, &[0, 1, 5]), 8).needing(mask(6, &[0, 5]));
        assert!(w.done());
        assert_eq!(w.percent(), 100);
        // No chunk needed at all: done, 100%.
        let w = window(vec![false; 2], 8).needing(vec![false; 2]);
        assert!(w.done());
        assert_eq!(w.percent(), 100);
        // A mask of the wrong length is no mask: everything is needed.
        let w = window(vec![false; 2], 8).needing(vec![false; 3]);
        assert_eq!(w.needed().0, 2);
        assert!(!w.done());
    }

    #[test]
    fn a_download_with_a_mask_writes_only_verified_chunks_to_its_bitmap() {
        let (m, envelope, data) = test_manifest(5 * 4096 + 10, 4096);
        let dir = tempfile::tempdir().unwrap();
        let dl = dir.path().join("download");
        let need = mask(6, &[1, 5]);
        let mut d = Download::open(
            &dl,
            &envelope,
            &m,
            need.clone(),
            4096,
            8,
            Duration::from_secs(5),
        )
        .unwrap();
        let r = d.window.next_requests(t0());
        assert_eq!(r.iter().map(|p| p.chunk).collect::<Vec<_>>(), [1, 5]);
        let piece = |c: usize| {
            bytes::Bytes::copy_from_slice(&data[c * 4096..((c + 1) * 4096).min(data.len())])
        };
        assert_eq!(d.on_data(4096, piece(1)).unwrap(), Received::Verified(1));
        d.checkpoint().unwrap();
        let listed = read_bitmap(&bitmap_path(&dl), d.tarball_id(), 6);
        assert_eq!(listed, mask(6, &[1]), "needed is not verified");
        assert!(!d.window.done());
        drop(d);

        // Resumed with the same mask: only chunk 5 is asked for.
        let mut d =
            Download::open(&dl, &envelope, &m, need, 4096, 8, Duration::from_secs(5)).unwrap();
        assert_eq!(d.window.percent(), 50);
        let r = d.window.next_requests(t0());
        assert_eq!(r.iter().map(|p| p.chunk).collect::<Vec<_>>(), [5]);
        assert_eq!(
            d.on_data(5 * 4096, piece(5)).unwrap(),
            Received::Verified(5)
        );
        assert!(d.window.done());
        d.checkpoint().unwrap();
        // The file is a bundle; the chunks fetched are where they belong.
        let b = Bundle::open(&d.path()).unwrap();
        let mut buf = vec![0u8; 4096];
        b.read_tarball_at(&mut buf, 4096).unwrap();
        assert_eq!(buf, data[4096..8192]);
        assert_eq!(
            read_bitmap(&bitmap_path(&dl), d.tarball_id(), 6),
            mask(6, &[1, 5])
        );
    }

    /// A manifest for `size` bytes of data, its signed envelope (by a key
    /// nothing trusts: `Download` does not look at signatures), and the
    /// data.
    fn test_manifest(size: usize, chunk_size: u32) -> (Manifest, Vec<u8>, Vec<u8>) {
        let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        let m = crate::release::manifest::for_tests(&data, chunk_size);
        let key = crate::trust::keys::SecretKey::generate().unwrap();
        let envelope = crate::trust::signed::Envelope::sign(
            crate::trust::signed::DocKind::Manifest,
            &m,
            &[key],
        )
        .to_bytes();
        (m, envelope, data)
    }

    #[test]
    fn bitmap_round_trips_and_refuses_other_tarballs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b");
        let id = [1u8; 32];
        let mut bytes = BITMAP_MAGIC.to_vec();
        bytes.extend_from_slice(&id);
        bytes.extend_from_slice(&10u32.to_be_bytes());
        bytes.extend_from_slice(&[0b0000_0101, 0b10]);
        fs::write(&p, &bytes).unwrap();
        let have = read_bitmap(&p, &id, 10);
        assert_eq!(
            have.iter().positions(),
            vec![0, 2, 9],
            "bits 0, 2 and 9 are set"
        );
        assert!(!read_bitmap(&p, &[2u8; 32], 10).iter().any(|&h| h));
        assert!(!read_bitmap(&p, &id, 11).iter().any(|&h| h));
    }

    trait Positions {
        fn positions(self) -> Vec<usize>;
    }
    impl<'a, I: Iterator<Item = &'a bool>> Positions for I {
        fn positions(self) -> Vec<usize> {
            self.enumerate()
                .filter(|(_, b)| **b)
                .map(|(i, _)| i)
                .collect()
        }
    }
}
