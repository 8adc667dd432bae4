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
use crate::transport::mqtt::{self, Backoff, Broker, Client, Conn, Qos, Session};
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
            if !path.is_file() {
                continue;
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

pub async fn run(opts: ServeOptions) -> Result<()> {
    if !opts.bundles.is_dir() {
        return Err(Error::Usage(format!(
            "--bundles {}: not a directory",
            opts.bundles.display()
        )));
    }
    crate::memory::tune_allocator();
    let topics = Topics::new(&opts.prefix, &opts.fleet);
    let mut id = [0u8; 6];
    getrandom::fill(&mut id).map_err(|e| Error::Internal {
        detail: format!("no OS randomness: {e}"),
    })?;
    let session = Session {
        client_id: format!("beamup-serve-{}", hex::encode(id)),
        persistent: false,
        keep_alive: Duration::from_secs(30),
        will: None,
    };
    let mut conn = Conn::new(&opts.broker, &session)?;
    let client = conn.client();
    let mut index = Index {
        dir: opts.bundles.clone(),
        bundles: HashMap::new(),
        scanned_at: None,
    };
    index.scan();
    let (tx, rx) = mpsc::channel::<(String, bytes::Bytes)>(1024);
    let worker = tokio::spawn(worker(rx, client, topics.clone(), index, opts.max_piece));

    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Internal {
            detail: format!("cannot handle SIGTERM: {e}"),
        })?;
    let filter = topics.request_filter(true);
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
                    if tx.try_send((topic, payload)).is_err() {
                        tracing::warn!("request queue full; a request was dropped (the device asks again)");
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

/// Whether a request is refused ("bad range"): empty, pieces of 0 or
/// above `max_piece`, more pieces than a request may ask for, or a range
/// that wraps or ends beyond the tarball (of `tarball_size` bytes, when
/// this server holds it).
pub(crate) fn refused(req: &ChunkRequest, tarball_size: Option<u64>, max_piece: u32) -> bool {
    req.len == 0
        || req.piece.is_some_and(|p| p == 0 || p > max_piece)
        || (req.piece.is_none() && req.len > max_piece)
        || req.len.div_ceil(req.piece.unwrap_or(req.len).max(1)) as usize
            > protocol::MAX_PIECES_PER_REQUEST
        || req
            .offset
            .checked_add(u64::from(req.len))
            .is_none_or(|e| tarball_size.is_some_and(|size| e > size))
}

async fn worker(
    mut rx: mpsc::Receiver<(String, bytes::Bytes)>,
    client: Client,
    topics: Topics,
    mut index: Index,
    max_piece: u32,
) {
    let faults = Faults::from_env();
    let mut corrupted = Vec::new();
    let mut served: u64 = 0;
    while let Some((topic, payload)) = rx.recv().await {
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
        let reply_to = topics.data(&device);
        let bundle = index.get(&id);
        let bad = refused(
            &req,
            bundle.as_ref().map(|(b, _)| b.tarball_size()),
            max_piece,
        );
        let replies: Vec<Vec<u8>> = match (&bundle, bad) {
            (None, _) => vec![protocol::encode_error(
                &id,
                req.offset,
                "no bundle with this tarball here",
            )],
            (Some(_), true) => vec![protocol::encode_error(&id, req.offset, "bad range")],
            (Some((b, _)), false) => req
                .replies()
                .map(|(offset, len)| {
                    let mut data = Vec::with_capacity(protocol::DATA_HEADER + len as usize);
                    data.extend_from_slice(&protocol::encode_data(&id, offset, &[]));
                    data.resize(protocol::DATA_HEADER + len as usize, 0);
                    match b.read_tarball_at(&mut data[protocol::DATA_HEADER..], offset) {
                        Ok(n) if n == len as usize => data,
                        _ => protocol::encode_error(&id, offset, "read error"),
                    }
                })
                .collect(),
        };
        for (mut reply, (offset, len)) in replies.into_iter().zip(req.replies()) {
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
