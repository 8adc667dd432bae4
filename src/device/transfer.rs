//! The agent's transfer: the download of the offer being fetched (its
//! window of requests, each reply checked before it is written,
//! checkpoints), and the finished download that waits for the engine. It
//! builds requests and takes replies; the agent sends and receives them.
//!
//! Files: `STATE_DIR/agent/download/` (see `transport::transfer`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::limits::LIMITS;
use crate::release::manifest::Manifest;
use crate::transport::protocol::{self, ChunkRequest, DataReply};
use crate::transport::transfer::{Download, Piece, Received};

/// Requests of tarball pieces in flight at once.
pub(crate) const WINDOW: usize = 64;
/// A piece not answered within this is asked again.
const PIECE_TIMEOUT: Duration = Duration::from_secs(5);
/// Checkpoint the download (fsync data, then the bitmap) this often, or
/// after this many chunks.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
const CHECKPOINT_CHUNKS: usize = 256;

/// An offer that passed every check and is being fetched.
struct Active {
    digest: String,
    manifest: Manifest,
    download: Download,
    retry: bool,
    last_percent_event: u8,
    started: Instant,
}

/// A download that holds every chunk the install reads, waiting for the
/// engine.
pub(crate) struct Ready {
    pub(crate) path: PathBuf,
    /// The offer's digest.
    pub(crate) digest: String,
    pub(crate) manifest: Manifest,
    pub(crate) retry: bool,
    /// The chunks the file holds (verified and durable).
    pub(crate) have: Vec<bool>,
}

/// What a data reply did to the download.
pub(crate) enum Arrival {
    /// Not for this download, or not a reply: nothing changed.
    Ignored,
    /// A piece was taken (or set aside). `percent` is set when it
    /// completed a chunk; `milestone` when the download passed another
    /// quarter, with the manifest to report it on.
    Piece {
        percent: Option<u8>,
        milestone: Option<(u8, Manifest)>,
    },
    /// The download cannot go on (its file cannot be written): it was
    /// discarded.
    Failed {
        digest: String,
        manifest: Manifest,
        error: crate::error::Error,
    },
}

pub(crate) struct Transfer {
    /// `STATE_DIR/agent/download/`.
    dir: PathBuf,
    /// The length of the device's data topic, which each reply carries.
    data_topic_len: usize,
    active: Option<Active>,
    ready: Option<Ready>,
    /// Give the transfer's buffers back to the kernel when it ends: what
    /// keeps a device's idle RSS small.
    trim_memory: bool,
}

impl Transfer {
    pub(crate) fn new(dir: PathBuf, data_topic_len: usize) -> Transfer {
        Transfer {
            dir,
            data_topic_len,
            active: None,
            ready: None,
            trim_memory: true,
        }
    }

    /// For many transfers in one process (the simulator), where trimming
    /// the shared heap after each of them costs more than it saves.
    #[cfg(feature = "operator")]
    pub(crate) fn without_memory_trim(mut self) -> Transfer {
        self.trim_memory = false;
        self
    }

    /// Is a download running or waiting for the engine?
    pub(crate) fn is_busy(&self) -> bool {
        self.active.is_some() || self.ready.is_some()
    }

    pub(crate) fn is_fetching(&self) -> bool {
        self.active.is_some()
    }

    /// The offer being fetched: its digest and manifest.
    pub(crate) fn fetching(&self) -> Option<(&str, &Manifest)> {
        self.active
            .as_ref()
            .map(|a| (a.digest.as_str(), &a.manifest))
    }

    /// The digest of the offer whose download waits for the engine.
    pub(crate) fn ready_digest(&self) -> Option<&str> {
        self.ready.as_ref().map(|r| r.digest.as_str())
    }

    pub(crate) fn has_ready(&self) -> bool {
        self.ready.is_some()
    }

    pub(crate) fn take_ready(&mut self) -> Option<Ready> {
        self.ready.take()
    }

    /// The envelope of the download kept on disk, if there is one.
    pub(crate) fn existing_offer(&self) -> Option<Vec<u8>> {
        Download::existing_offer(&self.dir)
    }

    /// Removes the download kept on disk.
    pub(crate) fn discard(&self) -> Result<()> {
        Download::discard(&self.dir)
    }

    /// Stops fetching (the download stays on disk).
    pub(crate) fn stop(&mut self) {
        self.active = None;
    }

    /// Starts (or resumes) fetching the chunks `need` marks of the offer
    /// `envelope`, whose verified manifest is `m`. Returns the percentage
    /// a download left by an earlier run already holds.
    pub(crate) fn start(
        &mut self,
        envelope: &[u8],
        digest: String,
        m: Manifest,
        need: Vec<bool>,
        retry: bool,
        max_packet: Option<u32>,
    ) -> Result<u8> {
        let download = Download::open(
            &self.dir,
            envelope,
            &m,
            need,
            self.piece_size(&m, max_packet),
            WINDOW,
            PIECE_TIMEOUT,
        )?;
        let resumed = download.window.percent();
        let (chunks, bytes) = download.window.needed();
        tracing::info!(
            "fetching {} {} (sequence {}): {}{}",
            m.release.name,
            m.release.version,
            m.sequence,
            if chunks == m.tarball.chunks.len() {
                format!("{} bytes in {chunks} chunks", m.tarball.size)
            } else {
                format!(
                    "{chunks} of {} chunks ({} of {}): units the release already has are not fetched",
                    m.tarball.chunks.len(),
                    size_text(bytes),
                    size_text(m.tarball.size)
                )
            },
            if resumed > 0 {
                format!(", resuming at {resumed}%")
            } else {
                String::new()
            }
        );
        self.active = Some(Active {
            digest,
            manifest: m,
            download,
            retry,
            last_percent_event: resumed / 25 * 25,
            started: Instant::now(),
        });
        Ok(resumed)
    }

    /// A new connection: pieces as large as it carries, and every request
    /// in flight is lost.
    pub(crate) fn on_connected(&mut self, max_packet: Option<u32>) {
        let piece = self
            .active
            .as_ref()
            .map(|a| self.piece_size(&a.manifest, max_packet));
        if let (Some(a), Some(piece)) = (self.active.as_mut(), piece) {
            a.download.window.set_piece(piece);
            a.download.window.reset_in_flight();
        }
    }

    /// The connection is lost: the requests in flight with it.
    pub(crate) fn on_disconnect(&mut self) {
        if let Some(a) = self.active.as_mut() {
            a.download.window.reset_in_flight();
        }
    }

    /// Checkpoints the download when it is time.
    pub(crate) fn maybe_checkpoint(&mut self) -> Result<()> {
        match self.active.as_mut() {
            Some(a) => a
                .download
                .maybe_checkpoint(CHECKPOINT_EVERY, CHECKPOINT_CHUNKS),
            None => Ok(()),
        }
    }

    /// Checkpoints the download now (before the agent stops).
    pub(crate) fn checkpoint(&mut self) -> Result<()> {
        match self.active.as_mut() {
            Some(a) => a.download.checkpoint(),
            None => Ok(()),
        }
    }

    /// The download when every needed chunk is in: checkpointed, and no
    /// longer fetched. The caller decides whether it waits for the engine
    /// ([`Transfer::hold`]).
    pub(crate) fn take_finished(&mut self) -> Result<Option<Ready>> {
        let Some(a) = self.active.as_mut() else {
            return Ok(None);
        };
        if !a.download.window.done() {
            return Ok(None);
        }
        let received = a.started.elapsed();
        a.download.checkpoint()?;
        let a = self.active.take().expect("active");
        if self.trim_memory {
            crate::memory::release_free_memory();
        }
        let took = a.started.elapsed();
        let (chunks, bytes) = a.download.window.needed();
        tracing::info!(
            "fetched {} {}: {} bytes{} in {} ms ({:.1} MiB/s; all verified in {} ms, durable at {} ms), {} requests, {} replies ignored",
            a.manifest.release.name,
            a.manifest.release.version,
            bytes,
            if chunks == a.manifest.tarball.chunks.len() {
                String::new()
            } else {
                format!(
                    " ({chunks} of {} chunks, of a {}-byte tarball)",
                    a.manifest.tarball.chunks.len(),
                    a.manifest.tarball.size
                )
            },
            took.as_millis(),
            bytes as f64 / 1048576.0 / took.as_secs_f64().max(1e-6),
            received.as_millis(),
            took.as_millis(),
            a.download.window.requested,
            a.download.window.ignored
        );
        Ok(Some(Ready {
            path: a.download.path(),
            have: a.download.window.have().to_vec(),
            digest: a.digest,
            manifest: a.manifest,
            retry: a.retry,
        }))
    }

    /// The finished download waits for the engine.
    pub(crate) fn hold(&mut self, ready: Ready) {
        self.ready = Some(ready);
    }

    /// Requests for the pieces to ask for now, in batches (so that adjacent
    /// pieces share a request).
    pub(crate) fn requests(&mut self, now: Instant) -> Vec<ChunkRequest> {
        let Some(a) = self.active.as_mut() else {
            return Vec::new();
        };
        let pieces = a
            .download
            .window
            .next_batch(now, LIMITS.chunk_request_pieces);
        if pieces.is_empty() {
            return Vec::new();
        }
        let wait = a.download.window.timeout();
        group_requests(&hex::encode(a.download.tarball_id()), &pieces, wait)
    }

    /// A message on the data topic: checked, and written when it verifies.
    pub(crate) fn on_data(&mut self, payload: &bytes::Bytes) -> Result<Arrival> {
        let Some(a) = self.active.as_mut() else {
            return Ok(Arrival::Ignored);
        };
        let reply = match protocol::decode_data(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("data reply ignored: {e}");
                return Ok(Arrival::Ignored);
            }
        };
        let (offset, received) = match reply {
            DataReply::Data { bundle, offset, .. } if &bundle == a.download.tarball_id() => {
                let data = payload.slice(protocol::DATA_HEADER..);
                (offset, a.download.on_data(offset, data))
            }
            DataReply::Error {
                bundle, message, ..
            } if &bundle == a.download.tarball_id() => {
                // The message is the sender's text: one bounded line.
                tracing::warn!(
                    "the server cannot serve this release: {}",
                    crate::logging::untrusted(&message, 200)
                );
                return Ok(Arrival::Ignored);
            }
            _ => {
                tracing::debug!("data reply for another transfer ignored");
                return Ok(Arrival::Ignored);
            }
        };
        let mut arrival = Arrival::Piece {
            percent: None,
            milestone: None,
        };
        match received {
            Ok(Received::Corrupt(c)) => {
                tracing::warn!("chunk {c} failed its SHA-256; fetching it again")
            }
            Ok(Received::Ignored(why)) => tracing::debug!("piece at {offset} ignored: {why}"),
            Ok(Received::Verified(_)) => {
                let pct = a.download.window.percent();
                a.download
                    .maybe_checkpoint(CHECKPOINT_EVERY, CHECKPOINT_CHUNKS)?;
                let milestone = (pct / 25 * 25 > a.last_percent_event && pct < 100).then(|| {
                    a.last_percent_event = pct / 25 * 25;
                    (pct, a.manifest.clone())
                });
                arrival = Arrival::Piece {
                    percent: Some(pct),
                    milestone,
                };
            }
            Ok(Received::Stored) => {}
            Err(error) => {
                let a = self.active.take().expect("active");
                let _ = Download::discard(&self.dir);
                return Ok(Arrival::Failed {
                    digest: a.digest,
                    manifest: a.manifest,
                    error,
                });
            }
        }
        Ok(arrival)
    }

    /// The largest piece the broker carries for us.
    fn piece_size(&self, m: &Manifest, max_packet: Option<u32>) -> u32 {
        let topic = self.data_topic_len as u32;
        let limit = max_packet.map_or(u32::MAX, |p| {
            p.saturating_sub(protocol::DATA_HEADER as u32 + topic + 64)
        });
        m.tarball.chunk_size.min(limit.max(1024))
    }
}

/// A size for a log line: bytes, KiB or MiB.
pub(crate) fn size_text(bytes: u64) -> String {
    const KIB: u64 = 1024;
    const MIB: u64 = 1024 * 1024;
    if bytes < KIB {
        format!("{bytes} bytes")
    } else if bytes < MIB {
        format!("{} KiB", bytes.div_ceil(KIB))
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

/// Requests for pieces: runs of adjacent pieces of the same size become one
/// request (fewer messages for the broker and the servers), up to
/// `LIMITS.chunk_request_pieces`.
fn group_requests(bundle: &str, pieces: &[Piece], wait: Duration) -> Vec<ChunkRequest> {
    let mut out: Vec<ChunkRequest> = Vec::new();
    for p in pieces {
        if let Some(last) = out.last_mut() {
            let piece = last.piece.unwrap_or(last.len);
            let count = last.len.div_ceil(piece) as usize;
            let full = last.len % piece == 0;
            if full
                && p.len <= piece
                && last.offset + u64::from(last.len) == p.offset
                && count < LIMITS.chunk_request_pieces
            {
                last.len += p.len;
                last.piece = Some(piece);
                continue;
            }
        }
        out.push(ChunkRequest {
            v: protocol::VERSION,
            bundle: bundle.to_string(),
            chunk: p.chunk,
            offset: p.offset,
            len: p.len,
            piece: None,
            wait_ms: Some(wait.as_millis() as u64),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_pieces_share_a_request() {
        let p = |chunk, offset, len| Piece { chunk, offset, len };
        let reqs = group_requests(
            "b",
            &[
                p(0, 0, 100),
                p(1, 100, 100),
                p(2, 200, 40),
                p(3, 240, 100),
                p(7, 700, 100),
            ],
            Duration::from_secs(5),
        );
        let got: Vec<(u64, u32, Option<u32>)> =
            reqs.iter().map(|r| (r.offset, r.len, r.piece)).collect();
        assert_eq!(
            got,
            [(0, 240, Some(100)), (240, 100, None), (700, 100, None)]
        );
        let many: Vec<Piece> = (0..20).map(|i| p(i, u64::from(i) * 10, 10)).collect();
        let reqs = group_requests("b", &many, Duration::from_millis(7500));
        assert_eq!(reqs.len(), 3);
        assert!(reqs.iter().all(|r| r.wait_ms == Some(7500)));
        assert!(reqs.iter().all(|r| r.replies().count() <= 8));
    }
}
