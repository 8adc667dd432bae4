//! A guard between rumqttc and the broker for a device's connection.
//!
//! rumqttc (0.25) ends the connection when the broker sends a packet above
//! its incoming limit (`PayloadSizeLimitExceeded` from the fixed header,
//! MQTT 3.1.1 and 5 alike). MQTT 3.1.1 has no way to tell the broker that
//! limit, so one oversize retained offer or queued command would drop the
//! device's connection on every delivery, for as long as the message
//! stays: the broker sends it again on every subscription (retained) or
//! every session resume (QoS 1 in flight).
//!
//! The guard is a Unix socket in the device's private state directory that
//! rumqttc connects to; for each connection it opens the real one (TCP or
//! TLS) and copies bytes both ways. Coming from the broker, a PUBLISH above
//! the limit is not buffered: its topic and packet id are kept, the rest is
//! skipped as it streams in, and rumqttc gets the same PUBLISH with a short
//! marker as its payload (and, MQTT 5, no properties). rumqttc then
//! acknowledges it as usual, so the broker forgets it, and the connection
//! reports it as [`super::Event::Dropped`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};

/// The payload rumqttc sees in place of a dropped message.
pub(crate) const MARKER: &[u8] = b"\0beamup: oversize message dropped\0";

/// A message the guard dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub(crate) topic: String,
    /// The whole packet as the broker sent it, in bytes.
    pub(crate) size: u64,
}

/// What the guard tells the connection.
#[derive(Default)]
pub(crate) struct Shared {
    /// Dropped messages, in the order their markers reach rumqttc.
    pub(crate) dropped: VecDeque<Dropped>,
    /// Why the last connection to the broker could not be made.
    pub(crate) upstream_error: Option<String>,
}

/// Where the guard connects to.
#[derive(Clone)]
pub(crate) struct Upstream {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

#[derive(Debug)]
enum State {
    /// Reading a fixed header: the bytes so far.
    Header(Vec<u8>),
    /// Passing `left` bytes of a packet through.
    Body { left: usize },
    /// An oversize PUBLISH: collecting its topic (and packet id).
    Head {
        first: u8,
        remaining: usize,
        size: u64,
        collected: Vec<u8>,
    },
    /// Skipping the rest of an oversize PUBLISH.
    Skip { left: usize },
}

/// The broker-to-client byte stream, rewritten: pure, fed any slicing of
/// the stream.
#[derive(Debug)]
pub(crate) struct Filter {
    limit: usize,
    v5: bool,
    state: State,
}

/// Why the stream cannot be followed (the connection is then closed).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Malformed(pub(crate) String);

fn encode_len(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

impl Filter {
    pub(crate) fn new(limit: usize, v5: bool) -> Filter {
        Filter {
            limit,
            v5,
            state: State::Header(Vec::with_capacity(5)),
        }
    }

    /// Feeds bytes from the broker; appends what rumqttc gets to `out` and
    /// the messages dropped to `dropped`.
    pub(crate) fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut Vec<u8>,
        dropped: &mut Vec<Dropped>,
    ) -> Result<(), Malformed> {
        while !input.is_empty() {
            match &mut self.state {
                State::Header(h) => {
                    h.push(input[0]);
                    input = &input[1..];
                    if h.len() < 2 || h[h.len() - 1] & 0x80 != 0 {
                        if h.len() == 5 {
                            return Err(Malformed("remaining length longer than 4 bytes".into()));
                        }
                        continue;
                    }
                    let remaining = h[1..]
                        .iter()
                        .rev()
                        .fold(0usize, |n, b| n * 128 + usize::from(b & 0x7f));
                    let first = h[0];
                    if first >> 4 == 3 && remaining > self.limit {
                        self.state = State::Head {
                            first,
                            remaining,
                            size: (h.len() + remaining) as u64,
                            collected: Vec::new(),
                        };
                    } else {
                        out.extend_from_slice(h);
                        self.state = if remaining == 0 {
                            State::Header(Vec::with_capacity(5))
                        } else {
                            State::Body { left: remaining }
                        };
                    }
                }
                State::Body { left } => {
                    let n = (*left).min(input.len());
                    out.extend_from_slice(&input[..n]);
                    input = &input[n..];
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Header(Vec::with_capacity(5));
                    }
                }
                State::Head {
                    first,
                    remaining,
                    size,
                    collected,
                } => {
                    collected.push(input[0]);
                    input = &input[1..];
                    if collected.len() < 2 {
                        continue;
                    }
                    let topic_len = usize::from(u16::from_be_bytes([collected[0], collected[1]]));
                    let qos = (*first >> 1) & 3;
                    let need = 2 + topic_len + if qos > 0 { 2 } else { 0 };
                    if need > *remaining {
                        return Err(Malformed("PUBLISH shorter than its topic".into()));
                    }
                    if collected.len() < need {
                        continue;
                    }
                    let topic = String::from_utf8_lossy(&collected[2..2 + topic_len]).into_owned();
                    let props = usize::from(self.v5);
                    out.push(*first);
                    encode_len(need + props + MARKER.len(), out);
                    out.extend_from_slice(collected);
                    if self.v5 {
                        out.push(0); // no properties
                    }
                    out.extend_from_slice(MARKER);
                    dropped.push(Dropped { topic, size: *size });
                    let left = *remaining - need;
                    self.state = if left == 0 {
                        State::Header(Vec::with_capacity(5))
                    } else {
                        State::Skip { left }
                    };
                }
                State::Skip { left } => {
                    let n = (*left).min(input.len());
                    input = &input[n..];
                    *left -= n;
                    if *left == 0 {
                        self.state = State::Header(Vec::with_capacity(5));
                    }
                }
            }
        }
        Ok(())
    }
}

trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

async fn connect(up: &Upstream) -> Result<Box<dyn Stream>, String> {
    let addr = format!("{}:{}", up.host, up.port);
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(&addr))
        .await
        .map_err(|_| format!("connecting to {addr}: timed out after 10 s"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    match &up.tls {
        None => Ok(Box::new(tcp)),
        Some(cfg) => {
            let name = rustls::pki_types::ServerName::try_from(up.host.clone())
                .map_err(|e| format!("TLS server name {:?}: {e}", up.host))?;
            let tls = rumqttc::tokio_rustls::TlsConnector::from(cfg.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {addr}: {e}"))?;
            Ok(Box::new(tls))
        }
    }
}

/// Copies one connection both ways until either side ends.
async fn pump(
    client: UnixStream,
    broker: Box<dyn Stream>,
    mut filter: Filter,
    shared: Arc<Mutex<Shared>>,
) {
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut broker_rx, mut broker_tx) = tokio::io::split(broker);
    let up = async {
        let _ = tokio::io::copy(&mut client_rx, &mut broker_tx).await;
        let _ = broker_tx.shutdown().await;
    };
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut out = Vec::with_capacity(buf.len() + 64);
        let mut dropped = Vec::new();
        loop {
            let n = match broker_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            out.clear();
            if let Err(Malformed(why)) = filter.feed(&buf[..n], &mut out, &mut dropped) {
                tracing::warn!("the broker sent a malformed packet ({why}); reconnecting");
                break;
            }
            if !dropped.is_empty() {
                shared
                    .lock()
                    .expect("guard lock")
                    .dropped
                    .extend(dropped.drain(..));
            }
            if client_tx.write_all(&out).await.is_err() {
                break;
            }
        }
        let _ = client_tx.shutdown().await;
    };
    // Either side ending ends the connection.
    tokio::select! {
        _ = up => {}
        _ = down => {}
    }
}

/// A running guard; stops (and removes its socket) when dropped.
pub(crate) struct Guard {
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Guard {
    /// Listens on `path` (a stale socket there is replaced) and serves
    /// connections to `up`, one at a time.
    pub(crate) fn start(
        path: &Path,
        up: Upstream,
        limit: usize,
        v5: bool,
        shared: Arc<Mutex<Shared>>,
    ) -> std::io::Result<Guard> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let task = tokio::spawn(async move {
            let mut current: Option<tokio::task::JoinHandle<()>> = None;
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                // rumqttc connects again only after giving the last one up.
                if let Some(c) = current.take() {
                    c.abort();
                }
                match connect(&up).await {
                    Ok(broker) => {
                        shared.lock().expect("guard lock").upstream_error = None;
                        let filter = Filter::new(limit, v5);
                        current = Some(tokio::spawn(pump(client, broker, filter, shared.clone())));
                    }
                    Err(why) => {
                        shared.lock().expect("guard lock").upstream_error = Some(why);
                        drop(client);
                    }
                }
            }
        });
        Ok(Guard {
            task,
            path: path.to_path_buf(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish(qos: u8, topic: &str, payload_len: usize, v5: bool) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
        body.extend_from_slice(topic.as_bytes());
        if qos > 0 {
            body.extend_from_slice(&7u16.to_be_bytes());
        }
        if v5 {
            body.extend_from_slice(&[3, 0x01, 0x01, 0x00]); // props: payload format
        }
        body.extend(std::iter::repeat_n(b'p', payload_len));
        let mut p = vec![0x30 | (qos << 1) | 1];
        encode_len(body.len(), &mut p);
        p.extend_from_slice(&body);
        p
    }

    fn run(filter: &mut Filter, stream: &[u8], slice: usize) -> (Vec<u8>, Vec<Dropped>) {
        let (mut out, mut dropped) = (Vec::new(), Vec::new());
        for part in stream.chunks(slice) {
            filter.feed(part, &mut out, &mut dropped).unwrap();
        }
        (out, dropped)
    }

    #[test]
    fn oversize_publishes_become_markers_and_the_rest_passes_unchanged() {
        for v5 in [false, true] {
            let small = publish(1, "a/offer", 100, v5);
            let huge = publish(1, "a/cmd", 5000, v5);
            let qos0 = publish(0, "a/data", 3000, v5);
            let ping = [0xd0, 0x00];
            let stream = [
                small.clone(),
                huge.clone(),
                ping.to_vec(),
                qos0,
                small.clone(),
            ]
            .concat();
            for slice in [1, 3, 7, 1000, stream.len()] {
                let mut f = Filter::new(1000, v5);
                let (out, dropped) = run(&mut f, &stream, slice);
                assert_eq!(
                    dropped,
                    [
                        Dropped {
                            topic: "a/cmd".into(),
                            size: huge.len() as u64
                        },
                        Dropped {
                            topic: "a/data".into(),
                            size: 3003 + 2 + 6 + if v5 { 4 } else { 0 }
                        },
                    ],
                    "v5 {v5}, slices of {slice}"
                );
                let mut want = small.clone();
                // The oversize QoS 1 one keeps its flags, topic and packet id.
                let mut marker = vec![huge[0]];
                let head = 2 + 5 + 2;
                encode_len(head + usize::from(v5) + MARKER.len(), &mut marker);
                marker.extend_from_slice(&huge[3..3 + head]);
                if v5 {
                    marker.push(0);
                }
                marker.extend_from_slice(MARKER);
                want.extend_from_slice(&marker);
                want.extend_from_slice(&ping);
                let mut q0 = vec![0x31];
                encode_len(2 + 6 + usize::from(v5) + MARKER.len(), &mut q0);
                q0.extend_from_slice(&[0, 6]);
                q0.extend_from_slice(b"a/data");
                if v5 {
                    q0.push(0);
                }
                q0.extend_from_slice(MARKER);
                want.extend_from_slice(&q0);
                want.extend_from_slice(&small);
                assert_eq!(out, want, "v5 {v5}, slices of {slice}");
            }
        }
    }

    #[test]
    fn a_stream_that_cannot_be_followed_is_refused() {
        let mut f = Filter::new(10, false);
        let (mut out, mut d) = (Vec::new(), Vec::new());
        let e = f.feed(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01], &mut out, &mut d);
        assert!(e.is_err());
        let mut f = Filter::new(10, false);
        // Remaining length 20, topic length 300.
        let e = f.feed(&[0x30, 20, 0x01, 0x2c], &mut out, &mut d);
        assert!(e.is_err());
    }
}
