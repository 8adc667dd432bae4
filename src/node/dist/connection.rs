//! One live distribution connection and its two background tasks.
//!
//! The reader task owns the read half: it answers ticks, routes rpc replies
//! to their callers by reference, and on EOF/error fails every pending call
//! at once. The writer task owns the write half: it serialises frames from
//! all callers and sends our own ticks when we have been quiet. Callers
//! only touch a mutex-protected map of pending calls and a channel, so
//! [`Connection`] is a cheap clone usable from many tasks at once.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::AbortHandle;
use tokio::time::{sleep_until, timeout, timeout_at};

use super::term::{Decoder, Pid, Reference, Term};
use super::{ConnectOptions, DistError, epmd, handshake, split_node_name};

/// Frame type byte for messages without an atom-cache header.
const PASS_THROUGH: u8 = 112;
const REG_SEND: i64 = 6;
const SEND: i64 = 2;
const SEND_TT: i64 = 12;
const SEND_SENDER: i64 = 22;
const SEND_SENDER_TT: i64 = 23;
const TICK: [u8; 4] = [0; 4];

type Reply = Result<Term, String>;

/// A connection to one node. Clones share it; it closes when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Connection {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Vec<u8>>,
    local: Arc<Local>,
    next_ref: AtomicU64,
    tasks: [AbortHandle; 2],
    _slot: NameSlot,
}

/// Our identity on this connection.
struct Local {
    name: String,
    creation: u32,
    pid: Pid,
    /// Third word of every reference we make: tells our refs from stale or
    /// forged ones.
    salt: u32,
}

struct Shared {
    peer: String,
    state: Mutex<State>,
    shutdown: Notify,
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    closed: Option<String>,
}

impl Shared {
    /// Marks the connection dead; every pending call sees its sender dropped
    /// and reports `reason`.
    fn fail(&self, reason: String) {
        let pending = {
            let mut st = self.state.lock().unwrap();
            st.closed.get_or_insert(reason);
            std::mem::take(&mut st.pending)
        };
        drop(pending);
        self.shutdown.notify_one();
    }

    fn closed_reason(&self) -> Option<String> {
        self.state.lock().unwrap().closed.clone()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.tasks.iter().for_each(AbortHandle::abort);
    }
}

/// Removes a pending entry when the call gives up (timeout, cancellation).
struct PendingGuard<'a> {
    shared: &'a Shared,
    key: u64,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.shared.state.lock().unwrap().pending.remove(&self.key);
    }
}

/// Our node name is `beamup-<os pid>-<slot>@localhost`, the slot being the
/// lowest one no live connection of this process uses. The peer turns every
/// name it sees into an atom and atoms are never freed, so a fresh name per
/// connection would slowly fill a long-running node's atom table when the
/// agent reconnects (health checks every few seconds for months). Reusing
/// slots keeps names unique among live connections with a bounded atom
/// count.
struct NameSlot(u32);

static SLOTS: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

impl NameSlot {
    fn take() -> NameSlot {
        let mut used = SLOTS.lock().unwrap();
        let slot = (0..).find(|n| !used.contains(n)).unwrap();
        used.insert(slot);
        NameSlot(slot)
    }
}

impl Drop for NameSlot {
    fn drop(&mut self) {
        SLOTS.lock().unwrap().remove(&self.0);
    }
}

impl Connection {
    /// Looks `node` (`name@host`) up in EPMD, connects and handshakes with
    /// `cookie`, bounded by `opts.connect_timeout`.
    pub async fn connect(
        node: &str,
        cookie: &str,
        opts: &ConnectOptions,
    ) -> Result<Connection, DistError> {
        let (alive, host) = split_node_name(node)?;
        let after = opts.connect_timeout;
        let deadline = super::deadline_after(after);
        let timed_out = |stage: &str| DistError::Timeout {
            what: format!("connecting to {node} ({stage})"),
            after,
        };

        let addrs = epmd::resolve(host, opts.epmd_port, deadline, after).await?;
        let entry = timeout_at(
            deadline,
            epmd::port_please_at(&addrs, host, opts.epmd_port, alive),
        )
        .await
        .map_err(|_| timed_out("EPMD lookup"))??;
        if !(entry.lowest_version..=entry.highest_version).contains(&6) {
            return Err(DistError::HandshakeRejected {
                node: node.to_owned(),
                detail: format!(
                    "it speaks distribution versions {}..={}, we need 6 (OTP 23 or newer)",
                    entry.lowest_version, entry.highest_version
                ),
            });
        }
        let addr = (entry.addr.ip(), entry.port);
        let mut stream = timeout_at(deadline, TcpStream::connect(addr))
            .await
            .map_err(|_| timed_out("TCP connect"))?
            .map_err(|source| DistError::ConnectionRefused {
                node: node.to_owned(),
                port: entry.port,
                source,
            })?;
        // Without this each call waits ~40 ms on Nagle plus delayed ACK.
        stream.set_nodelay(true).map_err(|e| DistError::Protocol {
            node: node.to_owned(),
            what: format!("setting TCP_NODELAY: {e}"),
        })?;

        let slot = NameSlot::take();
        let name = format!("beamup-{}-{}@localhost", std::process::id(), slot.0);
        // Zero is reserved in OTP for "any creation"; a fresh value per
        // connection tells the peer this is a new incarnation of the name.
        let creation = handshake::random_u32().max(1);
        let peer = timeout_at(
            deadline,
            handshake::handshake(&mut stream, node, &name, creation, cookie),
        )
        .await
        .map_err(|_| timed_out("handshake"))??;
        tracing::debug!(node, peer = %peer.name, local = %name, "distribution connection up");

        let local = Arc::new(Local {
            pid: Pid {
                node: name.clone(),
                id: 1,
                serial: 0,
                creation,
            },
            name,
            creation,
            salt: handshake::random_u32(),
        });
        let shared = Arc::new(Shared {
            peer: peer.name,
            state: Mutex::new(State::default()),
            shutdown: Notify::new(),
        });
        let (r, w) = stream.into_split();
        let (tx, rx) = mpsc::channel(256);
        let reader = tokio::spawn(read_loop(
            r,
            shared.clone(),
            local.clone(),
            tx.clone(),
            opts.clone(),
        ));
        let writer = tokio::spawn(write_loop(w, rx, shared.clone(), opts.clone()));
        Ok(Connection {
            inner: Arc::new(Inner {
                shared,
                tx,
                local,
                next_ref: AtomicU64::new(1),
                tasks: [reader.abort_handle(), writer.abort_handle()],
                _slot: slot,
            }),
        })
    }

    /// The peer's full node name, as it announced itself.
    pub fn peer_node(&self) -> &str {
        &self.inner.shared.peer
    }

    /// Our node name on this connection.
    pub fn local_node(&self) -> &str {
        &self.inner.local.name
    }

    /// Why the connection is closed, or `None` while it is up.
    pub fn closed_reason(&self) -> Option<String> {
        self.inner.shared.closed_reason()
    }

    /// Calls `module:function(args...)` on the node through its `rex`
    /// server, as `rpc:call/5` does: a `$gen_call` of
    /// `{call, M, F, A, user}` (`user` as group leader, so output of the
    /// call goes to the node's own stdout), reply `{Ref, Result}`.
    ///
    /// `{badrpc, Reason}` (the function raised, or does not exist) becomes
    /// [`DistError::BadRpc`]; a function that *returns* such a tuple cannot
    /// be told apart, just as with `rpc:call`. After a timeout the call may
    /// still run to completion on the node; its late reply is dropped and
    /// the connection stays usable.
    pub async fn rpc(
        &self,
        module: &str,
        function: &str,
        args: Vec<Term>,
        timeout: Duration,
    ) -> Result<Term, DistError> {
        let call = format!("rpc {module}:{function}/{}", args.len());
        let deadline = super::deadline_after(timeout);
        let inner = &*self.inner;
        let shared = &*inner.shared;
        let lost = |during: &str, reason: Option<String>| DistError::ConnectionLost {
            node: shared.peer.clone(),
            during: format!("{during} {call}"),
            reason: reason.unwrap_or_else(|| "connection closed".into()),
        };
        let timed_out = || DistError::Timeout {
            what: format!("{call} on {}", shared.peer),
            after: timeout,
        };

        // The node drops the connection on an atom over 255 characters.
        if module.chars().count() > 255 || function.chars().count() > 255 {
            return Err(DistError::Protocol {
                node: shared.peer.clone(),
                what: format!("{call}: module or function name longer than 255 characters"),
            });
        }
        let key = inner.next_ref.fetch_add(1, Ordering::Relaxed);
        let local = &inner.local;
        // The first word of a reference carries only 18 significant bits.
        let reference = Reference {
            node: local.name.clone(),
            creation: local.creation,
            ids: vec![(key & 0x3_FFFF) as u32, (key >> 18) as u32, local.salt],
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        {
            let mut st = shared.state.lock().unwrap();
            if let Some(reason) = &st.closed {
                return Err(lost("before", Some(reason.clone())));
            }
            st.pending.insert(key, reply_tx);
        }
        let _guard = PendingGuard { shared, key };

        let request = Term::tuple(vec![
            Term::atom("$gen_call"),
            Term::tuple(vec![
                Term::Pid(Box::new(local.pid.clone())),
                Term::Ref(Box::new(reference)),
            ]),
            Term::tuple(vec![
                Term::atom("call"),
                Term::atom(module),
                Term::atom(function),
                Term::List(args),
                Term::atom("user"),
            ]),
        ]);
        let control = Term::tuple(vec![
            Term::Int(REG_SEND),
            Term::Pid(Box::new(local.pid.clone())),
            Term::atom(""),
            Term::atom("rex"),
        ]);
        let frame = frame(&control, &request);
        if u32::try_from(frame.len()).is_err() {
            return Err(DistError::Protocol {
                node: shared.peer.clone(),
                what: format!("{call}: request of {} bytes is too large", frame.len()),
            });
        }
        match timeout_at(deadline, inner.tx.send(frame)).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(_)) => return Err(lost("sending", shared.closed_reason())),
            Ok(Ok(())) => {}
        }
        let result = match timeout_at(deadline, reply_rx).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(_)) => return Err(lost("waiting for the reply to", shared.closed_reason())),
            Ok(Ok(Err(what))) => {
                return Err(DistError::Protocol {
                    node: shared.peer.clone(),
                    what: format!("reply to {call}: {what}"),
                });
            }
            Ok(Ok(Ok(result))) => result,
        };
        match result {
            Term::Tuple(mut t) if t.len() == 2 && t[0].is_atom("badrpc") => {
                Err(DistError::BadRpc {
                    node: shared.peer.clone(),
                    call,
                    reason: t.pop().unwrap(),
                })
            }
            other => Ok(other),
        }
    }
}

/// Length-prefixed pass-through frame: control message, then payload.
fn frame(control: &Term, message: &Term) -> Vec<u8> {
    let mut buf = vec![0, 0, 0, 0, PASS_THROUGH];
    buf.extend(control.encode());
    buf.extend(message.encode());
    let len = (buf.len() - 4) as u32;
    buf[..4].copy_from_slice(&len.to_be_bytes());
    buf
}

async fn write_loop(
    mut w: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Vec<u8>>,
    shared: Arc<Shared>,
    opts: ConnectOptions,
) {
    let mut next_tick = super::deadline_after(opts.tick_interval);
    loop {
        let buf = tokio::select! {
            biased;
            _ = shared.shutdown.notified() => return,
            m = rx.recv() => match m {
                Some(b) => b,
                None => return,
            },
            _ = sleep_until(next_tick) => TICK.to_vec(),
        };
        match timeout(opts.write_timeout, w.write_all(&buf)).await {
            Ok(Ok(())) => next_tick = super::deadline_after(opts.tick_interval),
            Ok(Err(e)) => return shared.fail(format!("write failed: {e}")),
            Err(_) => {
                return shared.fail(format!(
                    "the node did not read our data for {:?}",
                    opts.write_timeout
                ));
            }
        }
    }
}

async fn read_loop(
    r: OwnedReadHalf,
    shared: Arc<Shared>,
    local: Arc<Local>,
    tx: mpsc::Sender<Vec<u8>>,
    opts: ConnectOptions,
) {
    let mut r = BufReader::new(r);
    let idle = opts.idle_timeout;
    let silent = || format!("nothing received from the node for {idle:?} (not even a tick)");
    let reason = loop {
        let len = match timeout(idle, r.read_u32()).await {
            Err(_) => break silent(),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break "the node closed the connection".to_owned();
            }
            Ok(Err(e)) => break format!("read failed: {e}"),
            Ok(Ok(len)) => len,
        };
        if len == 0 {
            // A tick: answer it so the peer's net_ticktime sees us alive,
            // whatever its value. A full queue means data is on its way,
            // which counts as well.
            let _ = tx.try_send(TICK.to_vec());
            continue;
        }
        if len > opts.max_frame_len {
            break format!(
                "the node sent a {len}-byte frame, over the {}-byte limit",
                opts.max_frame_len
            );
        }
        let mut buf = vec![0; len as usize];
        match timeout(idle, r.read_exact(&mut buf)).await {
            Err(_) => break silent(),
            Ok(Err(e)) => break format!("connection broke inside a frame: {e}"),
            Ok(Ok(_)) => {}
        }
        if let Err(e) = handle_frame(&buf, &shared, &local) {
            break format!("protocol error: {e}");
        }
    };
    tracing::debug!(peer = %shared.peer, %reason, "distribution connection closed");
    shared.fail(reason);
}

/// Handles one non-tick frame. Only messages to our pid matter; anything
/// else the node may send a hidden node (links, exits, monitors) is
/// ignored. An `Err` is a framing violation that ends the connection.
fn handle_frame(buf: &[u8], shared: &Shared, local: &Local) -> Result<(), String> {
    if buf[0] != PASS_THROUGH {
        return Err(format!(
            "frame type {} without negotiated atom cache or fragments",
            buf[0]
        ));
    }
    let mut d = Decoder::new(&buf[1..]);
    let control = d.versioned().map_err(|e| format!("control message: {e}"))?;
    let payload = &buf[1 + d.position()..];
    let fields = control.as_tuple().unwrap_or_default();
    let to = match (fields.first().and_then(Term::as_int), fields) {
        (Some(SEND | SEND_TT), [_, _, to, ..]) => to,
        (Some(SEND_SENDER | SEND_SENDER_TT), [_, _, to, ..]) => to,
        _ => {
            tracing::trace!(%control, "ignoring control message");
            return Ok(());
        }
    };
    if !matches!(to, Term::Pid(p) if **p == local.pid) {
        tracing::trace!(%control, "ignoring message to another pid");
        return Ok(());
    }
    if let Some((key, reply)) = decode_reply(payload, local) {
        let waiter = shared.state.lock().unwrap().pending.remove(&key);
        match waiter {
            Some(w) => {
                let _ = w.send(reply);
            }
            None => tracing::debug!(key, "dropping reply to an abandoned call"),
        }
    } else {
        tracing::debug!("ignoring message that is not a reply of ours");
    }
    Ok(())
}

/// Picks `{Ref, Result}` apart. The reference is decoded first so that a
/// result we cannot decode still fails the right call instead of leaving
/// it to time out.
fn decode_reply(payload: &[u8], local: &Local) -> Option<(u64, Reply)> {
    let mut d = Decoder::new(payload);
    if d.take(3).ok()? != [super::term::VERSION, 104, 2] {
        return None;
    }
    let key = match d.term().ok()? {
        Term::Ref(r)
            if r.node == local.name
                && r.creation == local.creation
                && r.ids.len() == 3
                && r.ids[2] == local.salt =>
        {
            u64::from(r.ids[0]) | (u64::from(r.ids[1]) << 18)
        }
        _ => return None,
    };
    let result = d.term().map_err(|e| e.to_string()).and_then(|t| {
        if d.remaining() == 0 {
            Ok(t)
        } else {
            Err("trailing bytes after the reply".to_owned())
        }
    });
    Some((key, result))
}

/// The frame reader with one call pending, for the fuzz targets (see
/// `crate::fuzzing::dist_frame`).
#[cfg(feature = "fuzzing")]
pub(crate) mod fuzzing {
    use super::*;

    const KEY: u64 = 3 | (5 << 18);

    fn local() -> Local {
        Local {
            name: "fuzz@localhost".into(),
            creation: 1,
            pid: Pid {
                node: "fuzz@localhost".into(),
                id: 1,
                serial: 0,
                creation: 1,
            },
            salt: 99,
        }
    }

    /// A frame body (the bytes after the length; a tick has none).
    pub(crate) fn frame(buf: &[u8]) -> Result<Option<Reply>, String> {
        if buf.is_empty() {
            return Ok(None);
        }
        let shared = Shared {
            peer: "peer@localhost".into(),
            state: Mutex::new(State::default()),
            shutdown: Notify::new(),
        };
        let (tx, mut rx) = oneshot::channel();
        shared.state.lock().unwrap().pending.insert(KEY, tx);
        handle_frame(buf, &shared, &local())?;
        Ok(rx.try_recv().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Local {
        Local {
            name: "me@localhost".into(),
            creation: 7,
            pid: Pid {
                node: "me@localhost".into(),
                id: 1,
                serial: 0,
                creation: 7,
            },
            salt: 99,
        }
    }

    fn reply(ids: Vec<u32>, result: Term) -> Vec<u8> {
        Term::tuple(vec![
            Term::Ref(Box::new(Reference {
                node: "me@localhost".into(),
                creation: 7,
                ids,
            })),
            result,
        ])
        .encode()
    }

    #[test]
    fn reply_key_roundtrips_the_reference_words() {
        let key = (5u64 << 18) | 3;
        let bytes = reply(vec![3, 5, 99], Term::atom("ok"));
        let (k, r) = decode_reply(&bytes, &local()).unwrap();
        assert_eq!(k, key);
        assert_eq!(r.unwrap(), Term::atom("ok"));
    }

    #[test]
    fn foreign_or_malformed_replies_are_not_ours() {
        let l = local();
        assert!(decode_reply(&reply(vec![3, 5, 98], Term::nil()), &l).is_none());
        assert!(decode_reply(&Term::atom("x").encode(), &l).is_none());
        // Right reference, undecodable result: reported to that caller.
        let mut bytes = reply(vec![1, 0, 99], Term::nil());
        *bytes.last_mut().unwrap() = 82;
        assert!(decode_reply(&bytes, &l).unwrap().1.is_err());
    }

    #[test]
    fn frame_is_length_prefixed_pass_through() {
        let f = frame(&Term::Int(1), &Term::nil());
        assert_eq!(f, vec![0, 0, 0, 6, 112, 131, 97, 1, 131, 106]);
    }

    #[test]
    fn name_slots_are_reused() {
        let a = NameSlot::take();
        let b = NameSlot::take();
        assert_ne!(a.0, b.0);
        let freed = a.0;
        drop(a);
        assert_eq!(NameSlot::take().0, freed);
    }
}
