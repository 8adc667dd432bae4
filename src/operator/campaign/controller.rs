//! The campaign controller (`beamup campaign run`): the effects around
//! [`decide::step`]. Two MQTT connections, one that reads (a persistent
//! session) and one that publishes (see [`Writer`]); each turn it takes in
//! what the broker said, lets `decide` change the state, saves the state,
//! and only then publishes what was decided.
//!
//! Why it survives kill -9: every decision is on disk before its effect
//! leaves; the truth about devices is on the broker (retained states,
//! online flags, retained offers; events queued for the controller's
//! persistent session), read again at every start and waited for before
//! the first decision. An offer decided but not published is published
//! then (its retained copy is missing), one published is not published
//! again (its retained copy is there), and an outcome is a device's
//! verdict once, whichever of its state and its event shows it first.

use std::collections::VecDeque;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::decide::{self, Effect, Facts};
use super::state::{Campaign, Status, Store};
use crate::error::{Error, Result};
use crate::transport::mqtt::{self, Broker, Conn, Qos, Session};
use crate::transport::protocol::{
    self, CampaignControl, Command, CommandKind, ControllerLease, DeviceStatus, Event, Online,
    Topic, Topics,
};

const TICK: Duration = Duration::from_millis(250);
/// The lease check's retained message is taken to be in once
/// `mqtt::Settle` says so, or this long after connecting.
const SETTLE_MAX: Duration = Duration::from_secs(10);
/// The controller decides on what it has this long after a (re)connection
/// whose retained messages never settled. Long: deciding on half of them
/// sends offers the broker holds again, and after a broker restart under
/// load the subscriptions alone waited seconds behind the session's
/// resent publishes.
const RESUME_MAX: Duration = Duration::from_secs(30);
/// A busy fleet sends thousands of messages a second: they are taken in as
/// they come and decided on together, in turns at most this frequent (and
/// further apart when a turn's save takes long: a large campaign's state
/// is megabytes, rewritten whole).
const TURN_MIN_GAP: Duration = Duration::from_millis(100);

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "?".into())
}

/// Takes one message into the facts (or the campaign, for events and
/// controls). Returns whether anything changed. Nothing in a payload is
/// believed beyond its parse: the device is the one named by the topic.
pub fn ingest(
    c: &mut Campaign,
    facts: &mut Facts,
    topics: &Topics,
    topic: &str,
    payload: &[u8],
    now: u64,
) -> bool {
    match topics.parse(topic) {
        Some(Topic::State(d)) => {
            let state = serde_json::from_slice::<DeviceStatus>(payload)
                .ok()
                .filter(|s| s.device == d);
            facts.devices.entry(d).or_default().state = state;
            true
        }
        Some(Topic::Online(d)) => {
            facts.devices.entry(d).or_default().online = serde_json::from_slice::<Online>(payload)
                .ok()
                .map(|o| o.online);
            true
        }
        Some(Topic::DeviceOffer(d)) => {
            if payload.is_empty() {
                facts.offers.remove(&d);
            } else {
                facts.offers.insert(d, hex::encode(Sha256::digest(payload)));
            }
            true
        }
        Some(Topic::Events(d)) => match serde_json::from_slice::<Event>(payload) {
            Ok(ev) if ev.device == d && ev.v == protocol::VERSION => {
                decide::apply_event(c, &ev, now);
                true
            }
            _ => false,
        },
        Some(Topic::CampaignControl(id)) if id == c.id => {
            match serde_json::from_slice::<CampaignControl>(payload) {
                Ok(ctl) if ctl.v == protocol::VERSION => {
                    decide::control(c, ctl.action, ctl.seq, &ctl.by, now);
                    true
                }
                _ => false,
            }
        }
        _ => false,
    }
}

pub struct RunOptions {
    pub broker: Broker,
    pub store: Store,
}

fn lease(online: bool) -> Vec<u8> {
    serde_json::to_vec(&ControllerLease {
        v: protocol::VERSION,
        online,
        host: hostname(),
        pid: std::process::id(),
        since: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
    })
    .expect("json")
}

/// Refuses to run beside a live controller of the same campaign on
/// another machine: its lease is retained with `online: true` until its
/// last will (or its goodbye) says otherwise.
async fn check_lease(b: &Broker, topics: &Topics, id: &str) -> Result<()> {
    let session = crate::operator::fleet::session("campaign-check")?;
    let mut conn = Conn::new(b, &session)?;
    let topic = topics.campaign_controller(id);
    let deadline = Instant::now() + SETTLE_MAX;
    let mut settle: Option<mqtt::Settle> = None;
    let mut lease: Option<ControllerLease> = None;
    loop {
        let until = settle
            .as_ref()
            .and_then(mqtt::Settle::deadline)
            .map_or(deadline, |d| d.min(deadline));
        match tokio::time::timeout_at(until.into(), conn.poll()).await {
            Err(_) if settle.is_some() => break,
            Err(_) => {
                return Err(Error::Mqtt {
                    url: b.url.clone(),
                    detail: "no connection in time".into(),
                });
            }
            Ok(Err(e)) => return Err(e.into_error(&b.url)),
            Ok(Ok(mqtt::Event::Connected { .. })) => {
                conn.subscribe(&topic, Qos::AtLeastOnce)?;
                settle = Some(conn.begin_settle(topics.sync(&session.client_id))?);
            }
            Ok(Ok(mqtt::Event::SubAck)) => {
                if let Some(s) = settle.as_mut() {
                    s.observe_suback(Instant::now());
                }
            }
            Ok(Ok(mqtt::Event::Message {
                topic: t, payload, ..
            })) if t == topic => {
                lease = serde_json::from_slice(&payload).ok();
                break;
            }
            Ok(Ok(mqtt::Event::Message {
                topic: t,
                payload,
                retain,
            })) => {
                if let Some(s) = settle.as_mut() {
                    s.observe(&t, &payload, retain, Instant::now());
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    conn.disconnect().await;
    match lease {
        Some(l) if l.online => {
            let here = l.host == hostname();
            // A controller of this machine that is gone (kill -9 and
            // reboot both end its process): its lease is stale.
            let alive = !here
                || nix::sys::signal::kill(nix::unistd::Pid::from_raw(l.pid as i32), None).is_ok();
            if alive {
                return Err(Error::Busy {
                    path: topic.into(),
                    detail: format!(
                        "campaign {id} has a controller online on {} (pid {}) since {}; if that machine lost power, the broker marks it offline within 45 s",
                        l.host, l.pid, l.since
                    ),
                });
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Hands queued publishes to the writer, oldest first, until its request
/// queue is full (the rest wait for the next call).
fn publish_queued(client: &mqtt::Client, outgoing: &mut VecDeque<(String, Bytes, bool)>) {
    while let Some((topic, payload, retain)) = outgoing.pop_front() {
        if let Err(e) = client.try_publish(&topic, Qos::AtLeastOnce, retain, payload.clone()) {
            tracing::debug!("publish to {topic}: {e}; sending it later");
            outgoing.push_front((topic, payload, retain));
            break;
        }
    }
}

/// What the writer's connection reports to the controller.
enum WriterEvent {
    /// A new connection (a clean session: whatever the last one had not
    /// delivered is gone).
    Up,
    Down,
    /// A PUBACK: room for more.
    Acked,
    /// Credentials refused: trying again will not help.
    Refused(Error),
}

/// The controller publishes through a connection of its own, polled by a
/// task of its own, so that the broker's PUBACKs to its offers never wait
/// in a socket behind the fleet's messages (a controller that reconnects
/// is sent thousands at once, and a busy one reads them slowly): its
/// offers go out at the broker's pace, not the reading's. It carries the
/// lease's last will.
struct Writer {
    client: mqtt::Client,
    events: tokio::sync::mpsc::UnboundedReceiver<WriterEvent>,
    closing: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(broker: &Broker, session: &Session) -> Result<Writer> {
        let mut conn = Conn::new(broker, session)?;
        let client = conn.client();
        let (tx, events) = tokio::sync::mpsc::unbounded_channel();
        let closing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let url = broker.url.clone();
        let task = tokio::spawn({
            let closing = closing.clone();
            // Polled here and nowhere else: never cancelled halfway.
            async move {
                let mut backoff =
                    mqtt::Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
                loop {
                    let report = match conn.poll().await {
                        Ok(mqtt::Event::Connected { .. }) => {
                            backoff.reset();
                            Some(WriterEvent::Up)
                        }
                        Ok(mqtt::Event::PubAck(_)) => Some(WriterEvent::Acked),
                        Ok(_) => None,
                        Err(_) if closing.load(std::sync::atomic::Ordering::Relaxed) => return,
                        Err(mqtt::ConnError::Auth(why)) => {
                            let _ = tx.send(WriterEvent::Refused(
                                mqtt::ConnError::Auth(why).into_error(&url),
                            ));
                            return;
                        }
                        Err(why) => {
                            let d = backoff.next_delay();
                            tracing::warn!(
                                "broker {url} (publishing): {why}; reconnecting in {d:?}"
                            );
                            let _ = tx.send(WriterEvent::Down);
                            tokio::time::sleep(d).await;
                            None
                        }
                    };
                    if let Some(r) = report
                        && tx.send(r).is_err()
                    {
                        return;
                    }
                }
            }
        });
        Ok(Writer {
            client,
            events,
            closing,
            task,
        })
    }

    /// What was handed to it goes out, then a DISCONNECT (no last will).
    async fn close(self) {
        self.closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.client.try_disconnect();
        let mut task = self.task;
        if tokio::time::timeout(Duration::from_secs(3), &mut task)
            .await
            .is_err()
        {
            task.abort();
        }
    }
}

/// Runs the campaign until it finishes or `shutdown` resolves. Returns the
/// campaign as saved.
pub async fn run(
    opts: RunOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Campaign> {
    // Megabyte-sized buffers (the state of a large campaign) go back to
    // the kernel when freed instead of fragmenting the heap.
    crate::memory::tune_allocator();
    opts.store.load()?;
    let _lock = opts.store.lock()?;
    // Read again under the lock: a controller that held it may have
    // moved the campaign on.
    let mut c = opts.store.load()?;
    if c.finished() {
        return Ok(c);
    }
    // Shared, not copied, by every queued offer: a wave of thousands
    // would otherwise hold a copy of the manifest per device.
    let offer = Bytes::from(opts.store.offer(false)?);
    let revert = if c.revert.is_some() {
        Some(Bytes::from(opts.store.offer(true)?))
    } else {
        None
    };
    let topics = Topics::new(&c.prefix, &c.fleet);
    check_lease(&opts.broker, &topics, &c.id).await?;

    // Reads: persistent, so the broker queues device events while the
    // controller is down.
    let session = Session {
        client_id: format!("beamup-campaign-{}-{}", c.fleet, c.id),
        persistent: true,
        keep_alive: Duration::from_secs(30),
        will: None,
    };
    let marker = topics.sync(&session.client_id);
    let mut conn = Conn::new(&opts.broker, &session)?;
    // Writes: a clean session. What a broken connection had not delivered
    // is decided again (see `WriterEvent::Up`), never resent behind the
    // controller's back.
    let mut writer = Writer::start(
        &opts.broker,
        &Session {
            client_id: format!("{}-out", session.client_id),
            persistent: false,
            keep_alive: Duration::from_secs(30),
            will: Some((topics.campaign_controller(&c.id), lease(false))),
        },
    )?;
    let mut facts = Facts::default();
    let mut backoff = mqtt::Backoff::new(Duration::from_millis(250), Duration::from_secs(5));
    let mut outgoing: VecDeque<(String, Bytes, bool)> = VecDeque::new();
    // Retained messages (or, after the writer reconnected, the echoes of
    // what the broker took from its last connection) still coming in; no
    // decision until they are all in (or `RESUME_MAX` passed).
    let mut settling: Option<(Instant, mqtt::Settle)> = None;
    let mut settled = false;
    let mut reading = false;
    // Publishes wait in `outgoing` while the writer has no connection:
    // handed to its client then, they would be dropped with the session.
    let mut writing = false;
    // What is on disk, by digest: a large campaign's state is megabytes,
    // and one copy of it in memory at a time is enough.
    let mut saved: [u8; 32] = Sha256::digest(serde_json::to_vec(&c).expect("json")).into();
    let mut published_at: Option<Instant> = None;
    let mut published_status = None;
    let mut status_dirty = true;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(shutdown);
    let mut stopping = false;
    let mut done_at: Option<Instant> = None;
    let mut last_turn: Option<Instant> = None;
    let mut turn_gap = TURN_MIN_GAP;
    c.log(
        now_ms(),
        format!(
            "controller started on {} (pid {})",
            hostname(),
            std::process::id()
        ),
    );

    loop {
        tokio::select! {
            ev = conn.poll() => match ev {
                Ok(mqtt::Event::Connected { session_present, .. }) => {
                    backoff.reset();
                    reading = true;
                    if !session_present {
                        tracing::info!("new MQTT session: reading the fleet's retained messages again");
                    }
                    // Retained offers come again with the subscription:
                    // what the broker holds now is the truth.
                    facts.offers.clear();
                    for f in [
                        topics.state_filter(),
                        topics.online_filter(),
                        topics.events_filter(),
                        topics.device_offer_filter(),
                        topics.campaign_control(&c.id),
                    ] {
                        conn.subscribe(&f, Qos::AtLeastOnce)?;
                    }
                    settling = Some((Instant::now(), conn.begin_settle(marker.clone())?));
                    settled = false;
                    status_dirty = true;
                }
                Ok(mqtt::Event::SubAck) => {
                    if let Some((_, s)) = settling.as_mut() {
                        s.observe_suback(Instant::now());
                    }
                }
                Ok(mqtt::Event::Message { topic, payload, retain }) => {
                    let marker = settling
                        .as_mut()
                        .is_some_and(|(_, s)| s.observe(&topic, &payload, retain, Instant::now()));
                    if !marker && ingest(&mut c, &mut facts, &topics, &topic, &payload, now_ms()) {
                        status_dirty = true;
                    }
                }
                Ok(_) => {}
                Err(why) => {
                    if let mqtt::ConnError::Auth(_) = why {
                        return Err(why.into_error(&opts.broker.url));
                    }
                    let d = backoff.next_delay();
                    tracing::warn!("broker {}: {why}; reconnecting in {d:?}", opts.broker.url);
                    settled = false;
                    settling = None;
                    reading = false;
                    tokio::time::sleep(d).await;
                }
            },
            ev = writer.events.recv() => match ev {
                Some(WriterEvent::Up) => {
                    writing = true;
                    // What went out before now may be lost with the last
                    // connection's session: once the reader's fresh marker
                    // is back (after the echoes of all the broker took),
                    // decide sends again the offers and clears the broker
                    // lacks. Those not handed over yet are decided again
                    // then too: sent now, their echoes would race that
                    // reading and be sent twice.
                    facts.connected_at = now_ms();
                    outgoing.retain(|(t, _, _)| !matches!(topics.parse(t), Some(Topic::DeviceOffer(_))));
                    outgoing.push_front((topics.campaign_controller(&c.id), lease(true).into(), true));
                    status_dirty = true;
                    settled = false;
                    if reading {
                        let at = settling.as_ref().map_or_else(Instant::now, |(at, _)| *at);
                        let s = conn.remark(settling.take().map(|(_, s)| s), marker.clone())?;
                        settling = Some((at, s));
                    }
                }
                Some(WriterEvent::Down) => writing = false,
                Some(WriterEvent::Acked) => {}
                Some(WriterEvent::Refused(e)) => return Err(e),
                None => {
                    return Err(Error::Internal {
                        detail: "the campaign's publishing connection ended".into(),
                    });
                }
            },
            _ = tick.tick() => {}
            // Not a tick later than the retained messages settle.
            _ = tokio::time::sleep_until(
                settling
                    .as_ref()
                    .map_or_else(Instant::now, |(at, s)| s.deadline().unwrap_or(*at + RESUME_MAX))
                    .into()
            ), if settling.is_some() => {}
            _ = &mut shutdown, if !stopping => {
                stopping = true;
            }
        }
        if let Some((at, s)) = &settling
            && (s.settled(Instant::now()) || at.elapsed() >= RESUME_MAX)
        {
            settling = None;
            settled = true;
        }
        if stopping {
            // What was decided and saved but not sent yet goes out now if
            // it can; the next run sends again whatever the broker lacks.
            if writing {
                publish_queued(&writer.client, &mut outgoing);
            }
            break;
        }
        // What was decided (and saved) goes out as fast as the connection
        // takes it, not a queue's worth per turn: an offer that waited here
        // for its turn would be offered again once its echo is overdue.
        if writing {
            publish_queued(&writer.client, &mut outgoing);
        }
        // Decisions need both: the facts read, and a way to send them.
        if !settled || !writing || last_turn.is_some_and(|t| t.elapsed() < turn_gap) {
            continue;
        }
        let turn_started = Instant::now();
        last_turn = Some(turn_started);
        let now = now_ms();
        let effects = decide::step(&mut c, &facts, now);
        let bytes = Bytes::from(serde_json::to_vec(&c).expect("json"));
        let digest: [u8; 32] = Sha256::digest(&bytes).into();
        if digest != saved {
            opts.store.save_bytes(&bytes)?;
            saved = digest;
            status_dirty = true;
        }
        // At most about a quarter of the time goes to deciding and saving.
        turn_gap = TURN_MIN_GAP.max(turn_started.elapsed() * 3);
        for e in effects {
            let (topic, payload, retain) = match e {
                Effect::Offer { device, revert: r } => (
                    topics.device_offer(&device),
                    if r {
                        revert.clone().unwrap_or_default()
                    } else {
                        offer.clone()
                    },
                    true,
                ),
                Effect::Clear { device } => (topics.device_offer(&device), Bytes::new(), true),
                Effect::Retry { device } => (
                    topics.command(&device),
                    serde_json::to_vec(&Command {
                        v: protocol::VERSION,
                        cmd: CommandKind::Retry,
                    })
                    .expect("json")
                    .into(),
                    false,
                ),
            };
            outgoing.push_back((topic, payload, retain));
        }
        // The campaign's view, for every operator: at most once a second
        // (more rarely for a large one), at once when its status changes.
        let status_now = (c.status, c.finished());
        let interval = Duration::from_millis(1000 + bytes.len() as u64 / 256);
        if status_dirty
            && (published_status != Some(status_now)
                || published_at.is_none_or(|t| t.elapsed() >= interval))
        {
            outgoing.push_back((topics.campaign_status(&c.id), bytes, true));
            published_at = Some(Instant::now());
            published_status = Some(status_now);
            status_dirty = false;
        }
        publish_queued(&writer.client, &mut outgoing);
        // Finished: once the broker holds none of its offers (or a few
        // seconds passed), so that no device finds one later.
        if c.finished() && outgoing.is_empty() {
            let ours = |d: &String| {
                *d == c.target.digest || c.revert.as_ref().is_some_and(|r| *d == r.digest)
            };
            let finished_at = *done_at.get_or_insert_with(Instant::now);
            if !facts.offers.values().any(ours) || finished_at.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
    }

    // Goodbye: the last view and the lease, then a clean disconnect.
    let bytes = serde_json::to_vec(&c).expect("json");
    opts.store.save(&c)?;
    for (topic, payload) in [
        (topics.campaign_status(&c.id), bytes),
        (topics.campaign_controller(&c.id), lease(false)),
    ] {
        let _ = writer
            .client
            .try_publish(&topic, Qos::AtLeastOnce, true, payload.into());
    }
    // Queued publishes go out before the DISCONNECT queued after them.
    writer.close().await;
    conn.disconnect().await;
    if c.finished() {
        // Nothing will resume this session: left, the broker would queue
        // every state and event of the fleet for it until it expired.
        if let Err(e) = Conn::end_session(&opts.broker, &session.client_id).await {
            tracing::warn!("could not end the controller's MQTT session: {e}");
        }
    }
    if c.status == Status::Aborted {
        tracing::info!(
            "campaign {} aborted: {}",
            c.id,
            c.reason.clone().unwrap_or_default()
        );
    }
    Ok(c)
}
