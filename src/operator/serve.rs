//! `beamup serve`: answers devices' requests for tarball pieces from the
//! bundles in a directory. Several servers can serve one fleet: they
//! subscribe through one MQTT 5 shared subscription, and the broker hands
//! each request to one of them.
//!
//! A server holds no state beyond open bundle files; devices drive the
//! transfer (what to ask for, how many requests in flight, what to ask
//! again) and verify every piece against the signed manifest, so a server
//! is trusted with nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::bundle::Bundle;
use crate::error::{Error, Result};
use crate::limits::LIMITS;
use crate::transport::mqtt::{self, Backoff, Broker, Client, Conn, Qos};
use crate::transport::protocol::{self, ChunkRequest, Topic, Topics};

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub broker: Broker,
    pub prefix: String,
    pub fleet: String,
    pub bundles: PathBuf,
    /// Largest piece served (a device never asks for more than a chunk).
    pub max_piece: u32,
}

/// Fault injection for tests, from `BEAMUP_SERVE_FAULTS`, a comma-separated
/// list of `corrupt:N` (the first reply for chunk N has a flipped byte),
/// `dup:N` (chunk N's reply is sent twice), `stray:N` (with chunk N, also
/// an unrequested reply for chunk N+1), `delay:MS` (wait before each reply).
#[derive(Clone, Debug, Default)]
struct Faults {
    corrupt: Vec<u32>,
    dup: Vec<u32>,
    stray: Vec<u32>,
    delay: Option<Duration>,
}

impl Faults {
    fn from_env() -> Faults {
        let mut f = Faults::default();
        let Ok(spec) = std::env::var("BEAMUP_SERVE_FAULTS") else {
            return f;
        };
        for item in spec.split(',').filter(|s| !s.is_empty()) {
            let Some((k, v)) = item.split_once(':') else {
                continue;
            };
            let Ok(n) = v.parse::<u32>() else { continue };
            match k {
                "corrupt" => f.corrupt.push(n),
                "dup" => f.dup.push(n),
                "stray" => f.stray.push(n),
                "delay" => f.delay = Some(Duration::from_millis(u64::from(n))),
                _ => {}
            }
        }
        tracing::warn!("BEAMUP_SERVE_FAULTS in effect: {f:?}");
        f
    }
}

/// The bundles of a directory, by tarball SHA-256.
struct Index {
    dir: PathBuf,
    /// The bundle and its chunk size.
    bundles: HashMap<[u8; 32], (Arc<Bundle>, u32)>,
    scanned_at: Option<Instant>,
}

impl Index {
    fn scan(&mut self) {
        self.scanned_at = Some(Instant::now());
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            tracing::warn!("cannot read {}", self.dir.display());
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            // Only regular files of the directory itself: a symbolic link
            // could make the server read anything it can reach.
            match e.file_type() {
                Ok(t) if t.is_file() => {}
                Ok(t) if t.is_symlink() => {
                    tracing::debug!(
                        "{}: not served: a symbolic link (copy or move the bundle into {})",
                        path.display(),
                        self.dir.display()
                    );
                    continue;
                }
                _ => continue,
            }
            match Bundle::open(&path).and_then(|b| Ok((b.manifest_unverified()?, b))) {
                Ok((m, b)) => {
                    let id = m.tarball_digest();
                    if let std::collections::hash_map::Entry::Vacant(slot) = self.bundles.entry(id)
                    {
                        tracing::info!(
                            "serving {} {} (sequence {}) from {}",
                            m.release.name,
                            m.release.version,
                            m.sequence,
                            path.display()
                        );
                        slot.insert((Arc::new(b), m.tarball.chunk_size));
                    }
                }
                Err(e) => tracing::debug!("{}: not served ({e})", path.display()),
            }
        }
    }

    fn get(&mut self, id: &[u8; 32]) -> Option<(Arc<Bundle>, u32)> {
        if !self.bundles.contains_key(id)
            && self
                .scanned_at
                .is_none_or(|t| t.elapsed() > Duration::from_secs(2))
        {
            self.scan();
        }
        self.bundles.get(id).cloned()
    }
}

/// The replies (offset, length) that answer `req`, given the size and
/// chunk size of the tarball it names if it is held here; or why it is
/// refused (the error reply's text). Pure. A piece is at most a chunk (a
/// device never asks for more), so one request costs at most
/// `LIMITS.chunk_request_pieces` chunks of memory, whatever it claims.
pub(crate) fn plan_replies(
    req: &ChunkRequest,
    held: Option<(u64, u32)>,
    max_piece: u32,
) -> std::result::Result<Vec<(u64, u32)>, &'static str> {
    let Some((size, chunk_size)) = held else {
        return Err("no bundle with this tarball here");
    };
    let piece = req.piece.unwrap_or(req.len);
    let bad = req.len == 0
        || piece == 0
        || piece > chunk_size.min(max_piece)
        || req.len.div_ceil(piece) as usize > LIMITS.chunk_request_pieces
        || req
            .offset
            .checked_add(u64::from(req.len))
            .is_none_or(|end| end > size);
    if bad {
        return Err("bad range");
    }
    Ok(req.replies().collect())
}

/// Has the device given up on a request that waited `waited` in the queue
/// (it waits `wait_ms` for the replies, then asks again)? Pure.
pub(crate) fn given_up(waited: Duration, wait_ms: Option<u64>) -> bool {
    wait_ms.is_some_and(|w| waited > Duration::from_millis(w))
}

pub async fn run(opts: ServeOptions) -> Result<()> {
    if !opts.bundles.is_dir() {
        return Err(Error::Usage(format!(
            "--bundles {}: not a directory",
            opts.bundles.display()
        )));
    }
    crate::memory::tune_allocator();
    let topics = Topics::new(&opts.prefix, &opts.fleet);
    let session = crate::operator::fleet::session("serve")?;
    let mut conn = Conn::new(&opts.broker, &session)?;
    let client = conn.client();
    let mut index = Index {
        dir: opts.bundles.clone(),
        bundles: HashMap::new(),
        scanned_at: None,
    };
    index.scan();
    let (tx, rx) = mpsc::channel::<(String, bytes::Bytes, Instant)>(LIMITS.queued_chunk_requests);
    let worker = tokio::spawn(worker(rx, client, topics.clone(), index, opts.max_piece));

    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Internal {
            detail: format!("cannot handle SIGTERM: {e}"),
        })?;
    let filter = topics.request_filter(true);
    // Dropped requests are counted and told at most once a second.
    let (mut dropped, mut dropped_said) = (0u64, None::<Instant>);
    loop {
        tokio::select! {
            ev = conn.poll() => match ev {
                Ok(mqtt::Event::Connected { .. }) => {
                    backoff.reset();
                    if let Err(e) = conn.subscribe(&filter, Qos::AtMostOnce) {
                        tracing::warn!("{e}");
                    }
                    tracing::info!("connected to {}; serving requests on {filter}", opts.broker.url);
                }
                Ok(mqtt::Event::Message { topic, payload, .. }) => {
                    if payload.len() > LIMITS.chunk_request_bytes {
                        tracing::debug!("request of {} bytes on {topic} dropped unread", payload.len());
                    } else if tx
                        // A copy: a slice would hold the whole read buffer
                        // it came in while it waits.
                        .try_send((topic, bytes::Bytes::copy_from_slice(&payload), Instant::now()))
                        .is_err()
                    {
                        dropped += 1;
                        if dropped_said.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                            tracing::warn!(
                                "request queue full ({} waiting): {dropped} request(s) dropped since the last warning (the devices ask again)",
                                LIMITS.queued_chunk_requests
                            );
                            dropped = 0;
                            dropped_said = Some(Instant::now());
                        }
                    }
                }
                Ok(_) => {}
                Err(mqtt::ConnError::Auth(why)) => {
                    worker.abort();
                    return Err(Error::MqttAuth { url: opts.broker.url.clone(), detail: why });
                }
                Err(why) => {
                    let d = backoff.next_delay();
                    tracing::warn!("broker connection: {why}; retrying in {d:?}");
                    tokio::time::sleep(d).await;
                }
            },
            _ = sigterm.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    drop(tx);
    worker.abort();
    conn.disconnect().await;
    Ok(())
}

async fn worker(
    mut rx: mpsc::Receiver<(String, bytes::Bytes, Instant)>,
    client: Client,
    topics: Topics,
    mut index: Index,
    max_piece: u32,
) {
    let faults = Faults::from_env();
    let mut corrupted = Vec::new();
    let mut served: u64 = 0;
    let mut too_late: u64 = 0;
    while let Some((topic, payload, queued_at)) = rx.recv().await {
        let Some(Topic::Request(device)) = topics.parse(&topic) else {
            tracing::debug!("request on {topic} ignored");
            continue;
        };
        let req: ChunkRequest = match serde_json::from_slice(&payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("bad request from {device}: {e}");
                continue;
            }
        };
        let Some(id) = crate::release::manifest::parse_digest(&req.bundle) else {
            continue;
        };
        if req.v != protocol::VERSION {
            tracing::debug!("request v{} from {device} ignored", req.v);
            continue;
        }
        if given_up(queued_at.elapsed(), req.wait_ms) {
            too_late += 1;
            if too_late % 1000 == 1 {
                tracing::info!(
                    "{too_late} request(s) dropped unanswered so far: they waited here longer than their device waits for the replies (it has asked again)"
                );
            }
            continue;
        }
        let reply_to = topics.data(&device);
        let bundle = index.get(&id);
        let held = bundle.as_ref().map(|(b, cs)| (b.tarball_size(), *cs));
        // Each reply with what it answers; a refusal is one error reply.
        let replies: Vec<(Vec<u8>, u64, u32)> = match plan_replies(&req, held, max_piece) {
            Err(why) => vec![(protocol::encode_error(&id, req.offset, why), req.offset, 0)],
            Ok(pieces) => {
                let (b, _) = bundle.as_ref().expect("held");
                pieces
                    .into_iter()
                    .map(|(offset, len)| {
                        let mut data = Vec::with_capacity(protocol::DATA_HEADER + len as usize);
                        data.extend_from_slice(&protocol::encode_data(&id, offset, &[]));
                        data.resize(protocol::DATA_HEADER + len as usize, 0);
                        let reply =
                            match b.read_tarball_at(&mut data[protocol::DATA_HEADER..], offset) {
                                Ok(n) if n == len as usize => data,
                                _ => protocol::encode_error(&id, offset, "read error"),
                            };
                        (reply, offset, len)
                    })
                    .collect()
            }
        };
        for (mut reply, offset, len) in replies {
            let chunk = bundle
                .as_ref()
                .map_or(req.chunk, |(_, cs)| (offset / u64::from(*cs)) as u32);
            if faults.corrupt.contains(&chunk) && !corrupted.contains(&chunk) {
                corrupted.push(chunk);
                let last = reply.len() - 1;
                reply[last] ^= 0x5a;
                tracing::warn!("fault injection: corrupting chunk {chunk}");
            }
            if let Some(d) = faults.delay {
                tokio::time::sleep(d).await;
            }
            tracing::debug!("served device={device} chunk={chunk} offset={offset} len={len}");
            served += 1;
            if served % 1000 == 0 {
                tracing::info!("{served} replies served");
            }
            if faults.dup.contains(&chunk) {
                let _ =
                    Conn::publish_wait(&client, &reply_to, Qos::AtMostOnce, false, reply.clone())
                        .await;
            }
            if faults.stray.contains(&chunk) {
                let stray = protocol::encode_data(
                    &id,
                    offset + u64::from(len),
                    &reply[protocol::DATA_HEADER.min(reply.len())..],
                );
                let _ = Conn::publish_wait(&client, &reply_to, Qos::AtMostOnce, false, stray).await;
            }
            if let Err(e) =
                Conn::publish_wait(&client, &reply_to, Qos::AtMostOnce, false, reply).await
            {
                tracing::warn!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(offset: u64, len: u32, piece: Option<u32>) -> ChunkRequest {
        ChunkRequest {
            v: protocol::VERSION,
            bundle: "00".repeat(32),
            chunk: 0,
            offset,
            len,
            piece,
            wait_ms: None,
        }
    }

    #[test]
    fn a_request_its_device_gave_up_on_is_not_answered() {
        let s = Duration::from_secs;
        assert!(!given_up(s(60), None), "no wait given: always answered");
        assert!(!given_up(s(4), Some(5000)));
        assert!(given_up(s(6), Some(5000)));
    }

    #[test]
    fn requests_beyond_the_tarball_or_above_a_chunk_are_refused() {
        const CHUNK: u32 = 65536;
        let held = Some((1_000_000, CHUNK));
        let max = LIMITS.chunk_size_max;
        let plan = |r: ChunkRequest| plan_replies(&r, held, max);
        assert_eq!(
            plan(req(0, 2 * CHUNK, Some(CHUNK))),
            Ok(vec![(0, CHUNK), (65536, CHUNK)])
        );
        assert_eq!(plan(req(999_990, 10, None)), Ok(vec![(999_990, 10)]));
        for bad in [
            req(999_990, 11, None),
            req(1_000_000, 1, None),
            req(u64::MAX - 5, 10, None),
            req(0, u32::MAX, None),
            req(0, 0, None),
            req(0, 10, Some(0)),
            // Pieces above the chunk size: a device never asks for them,
            // and each would be a large allocation.
            req(0, 2 * CHUNK, Some(2 * CHUNK)),
            req(0, CHUNK + 1, None),
            req(0, 9 * CHUNK, Some(CHUNK)),
        ] {
            assert_eq!(plan(bad.clone()), Err("bad range"), "{bad:?}");
        }
        assert_eq!(
            plan_replies(&req(0, 10, None), None, max),
            Err("no bundle with this tarball here")
        );
    }
}
