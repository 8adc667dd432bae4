//! `beamup agent`: the daemon on a device. It takes offers over MQTT,
//! verifies each before fetching a byte of data, downloads what the install
//! will read of the tarball (of an indexed tarball, the parts of the units
//! the release root lacks) in verified chunks (resumable), hands the
//! finished bundle to the install engine, and reports what happened
//! through a retained state and an outbox of events that survives restarts
//! and broker outages.
//!
//! One task runs everything: the MQTT event loop, timers, signals and the
//! install in progress are branches of one `select!`, so that an install
//! keeps going (and its outcome is queued) while the broker is away, and
//! the connection keeps being served while an install soaks.
//!
//! Files, under `STATE_DIR/agent/`: `agent.json` (signed offers already
//! decided, by digest: a short cut; what was decided about a release is
//! in the engine's `state.json`), `last-offer.json` (for a retry command),
//! `download/` (see `transfer`), `outbox/` (see `outbox`), `mqtt.sock`
//! (the connection's guard, see `mqtt::guard`). The install engine's own `state.json` and
//! lock stay where they are; the agent holds the lock while it runs.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use crate::bundle;
use crate::config::{Config, MqttConfig};
use crate::device::intake;
use crate::engine::install::{self, Engine, InstallOptions, Step};
use crate::engine::settings::EngineSettings;
use crate::engine::state::{Outcome, OutcomeKind};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::release::manifest::{self, Manifest};
use crate::staging;
use crate::transport::mqtt::{self, Backoff, Conn, Qos, Session};
use crate::transport::outbox::{Entry, Outbox};
use crate::transport::protocol::{
    self, ChunkRequest, CommandKind, DataReply, DeviceStatus, EventKind, Online, OutcomeReport,
    PhaseName, PhaseReport, Topic, Topics,
};
use crate::transport::transfer::{Download, Received};
use crate::trust::root::Root;

/// Requests of tarball pieces in flight at once.
pub const WINDOW: usize = 64;
/// A piece not answered within this is asked again.
const PIECE_TIMEOUT: Duration = Duration::from_secs(5);
/// Checkpoint the download (fsync data, then the bitmap) this often, or
/// after this many chunks.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
const CHECKPOINT_CHUNKS: usize = 256;
/// The main loop's timer while something is moving (a download, an
/// install, a status or events to send): request timeouts, checkpoints,
/// rate-limited status.
const TICK: Duration = Duration::from_millis(100);
/// ... and while idle, when it only pings the watchdog and polls the node:
/// a device waiting for offers wakes up about once a second, not ten times.
const IDLE_TICK: Duration = Duration::from_secs(1);
/// Tracked QoS 1 publishes in flight (below mosquitto's default receive
/// maximum of 20).
const TRACKED_MAX: usize = 10;
/// Offers remembered as decided.
const DECIDED_MAX: usize = 100;
const STATUS_MIN_INTERVAL: Duration = Duration::from_millis(250);
const NODE_POLL: Duration = Duration::from_secs(60);
/// A connection that lasted this long resets the reconnect backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// The agent's own memory of offers, beside the engine's state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct AgentFile {
    /// SHA-256 of signed offer envelopes already decided, newest last. Only
    /// offers that verified against the trust root come here (input that
    /// did not is only counted), so junk cannot push one out; and what was
    /// decided about a *release* is in the engine's state
    /// (`DeviceState::settled`), which this list only short-cuts.
    #[serde(default)]
    decided: Vec<String>,
}

/// Engine progress steps, sent from inside the install to the main loop.
struct ProgressTx(mpsc::UnboundedSender<(Step, String)>);

impl install::Progress for ProgressTx {
    fn phase(&self, step: Step, detail: &str) {
        let _ = self.0.send((step, detail.to_string()));
    }
}

/// The phase a device reports for an engine step.
fn phase_of(step: Step) -> PhaseName {
    match step {
        Step::Verifying => PhaseName::Verifying,
        Step::Unpacking => PhaseName::Unpacking,
        Step::Installing | Step::Restarting | Step::Committing => PhaseName::Installing,
        Step::Soaking => PhaseName::Soaking,
        Step::RollingBack => PhaseName::RollingBack,
        Step::Recovering => PhaseName::Recovering,
        Step::Finished(kind) => outcome_phase(kind),
    }
}

enum Tracked {
    Outbox(u64),
    Status,
}

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
struct Ready {
    path: PathBuf,
    /// The offer's digest.
    digest: String,
    manifest: Manifest,
    retry: bool,
    /// The chunks the file holds (verified and durable).
    have: Vec<bool>,
}

type InstallFuture = Pin<Box<dyn Future<Output = (Engine, Result<Outcome>, String, Manifest)>>>;

struct Agent {
    /// The trust root file offers are verified against.
    trust_root: PathBuf,
    release_name: String,
    mq: MqttConfig,
    topics: Topics,
    dir: PathBuf,
    conn: Conn,
    connected: bool,
    backoff: Backoff,
    /// When the current connection was made.
    connected_at: Option<Instant>,
    reconnect_at: Option<Instant>,
    max_packet: Option<u32>,
    outbox: Outbox,
    tracked: HashMap<u16, Tracked>,
    sent: std::collections::HashSet<u64>,
    status: DeviceStatus,
    status_dirty: bool,
    status_sent_at: Option<Instant>,
    file: AgentFile,
    active: Option<Active>,
    /// A download that finished and waits for the engine.
    ready: Option<Ready>,
    pending_offer: Option<Vec<u8>>,
    /// The topic of the offer being looked at, for reports of discarded
    /// ones.
    offer_topic: String,
    last_event_id: u64,
    shutting_down: bool,
    /// The broker refused our credentials: the agent stops (exit code 31)
    /// once no install is running, unless a connection succeeds first.
    refused: Option<Error>,
    node_polled_at: Instant,
    /// `BEAMUP_AGENT_FETCH_ONLY=1` (benches, tests): skip the node's checks,
    /// fetch the first offer, exit. Never installs.
    fetch_only: bool,
    /// The offer (digest) whose install found the download incomplete
    /// after all: taken up again, it fetches every chunk, so that a plan
    /// that keeps disagreeing with the engine's cannot loop.
    fetch_everything: Option<String>,
}

fn digest_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn now_text() -> String {
    manifest::format_time(SystemTime::now())
}

fn outcome_phase(k: OutcomeKind) -> PhaseName {
    match k {
        OutcomeKind::Committed => PhaseName::Committed,
        OutcomeKind::RolledBack => PhaseName::RolledBack,
        OutcomeKind::Rejected => PhaseName::Rejected,
        OutcomeKind::NeedsAttention => PhaseName::NeedsAttention,
    }
}

fn report(o: &Outcome) -> OutcomeReport {
    OutcomeReport {
        outcome: o.outcome.wire_name().into(),
        release: o.release.clone(),
        version: o.version.clone(),
        sequence: o.sequence,
        reason: o.reason.clone(),
        at: o.at.clone(),
    }
}

/// Errors that say nothing about the offer itself: it is looked at again
/// on its next delivery rather than remembered as decided.
fn is_passing(e: &Error) -> bool {
    matches!(
        e,
        Error::Node { .. } | Error::Io { .. } | Error::Busy { .. } | Error::NoSpace { .. }
    )
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(cfg: Config) -> Result<()> {
    crate::memory::tune_allocator();
    let mq = cfg.mqtt.clone().ok_or_else(|| {
        Error::Usage("the agent needs an [mqtt] table in agent.toml (url, device_id, fleet)".into())
    })?;
    let broker = mq.broker()?;
    let (ptx, mut prx) = mpsc::unbounded_channel();
    let mut engine = Engine::open(
        EngineSettings::from_config(&cfg)?,
        Box::new(ProgressTx(ptx)),
    )?;
    let dir = engine.state_dir().join("agent");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create", e))?;
    let outbox = Outbox::open(&dir.join("outbox"))?;
    let file: AgentFile = std::fs::read(dir.join("agent.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let topics = Topics::new(&mq.prefix, &mq.fleet);
    let will = serde_json::to_vec(&Online {
        v: protocol::VERSION,
        online: false,
    })
    .expect("json");
    let session = Session {
        client_id: format!("beamup-{}-{}", mq.fleet, mq.device_id),
        persistent: true,
        keep_alive: Duration::from_secs(30),
        will: Some((topics.online(&mq.device_id), will)),
    };
    // Through the guard, so that an oversize message is dropped instead of
    // ending the connection on every delivery (mqtt::guard).
    let socket = dir.join("mqtt.sock");
    let conn = match Conn::guarded(&broker, &session, &socket) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(
                "{e}; connecting directly (a message above the packet limit will then end the connection)"
            );
            Conn::new(&broker, &session)?
        }
    };
    let mut agent = Agent {
        trust_root: cfg.trust.root.clone(),
        release_name: cfg.release.name.clone(),
        dir,
        conn,
        connected: false,
        backoff: Backoff::new(Duration::from_millis(250), Duration::from_secs(5)),
        connected_at: None,
        reconnect_at: None,
        max_packet: None,
        outbox,
        tracked: HashMap::new(),
        sent: Default::default(),
        status: DeviceStatus {
            v: protocol::VERSION,
            device: mq.device_id.clone(),
            fleet: mq.fleet.clone(),
            groups: mq.groups.clone(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
            running: None,
            permanent: None,
            phase: PhaseReport::idle(),
            last_outcome: engine.state().last_outcome().map(report),
            discarded: None,
            updated_at: now_text(),
        },
        status_dirty: true,
        status_sent_at: None,
        file,
        active: None,
        ready: None,
        pending_offer: None,
        offer_topic: topics.device_offer(&mq.device_id),
        last_event_id: 0,
        shutting_down: false,
        refused: None,
        node_polled_at: Instant::now(),
        fetch_only: std::env::var("BEAMUP_AGENT_FETCH_ONLY").is_ok_and(|v| v == "1"),
        fetch_everything: None,
        topics,
        mq,
    };
    if agent.fetch_only {
        tracing::warn!("BEAMUP_AGENT_FETCH_ONLY=1: fetching one offer without installing it");
    }

    // Recover an interrupted install before anything else.
    match engine.recover().await {
        Ok(Some(o)) => {
            tracing::info!(
                "recovered an interrupted install: {} {} {}",
                o.outcome.name(),
                o.release,
                o.version
            );
            agent.outcome_event(&o, None)?;
        }
        Ok(None) => {}
        Err(e) => tracing::error!("recovery failed: {e}"),
    }
    while let Ok((step, detail)) = prx.try_recv() {
        agent.on_progress(step, &detail)?;
    }
    agent.status.phase = PhaseReport::idle();
    agent.refresh_node(&mut engine).await;
    // A download left by an earlier run is an offer received again.
    if let Some(envelope) = Download::existing_offer(&agent.download_dir()) {
        agent.handle_offer(&envelope, &mut engine, false).await?;
    }

    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("running"),
    ]);
    let watchdog = sd_notify::watchdog_enabled();
    let mut last_ping = Instant::now();
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Internal {
            detail: format!("cannot handle SIGTERM: {e}"),
        })?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| Error::Internal {
            detail: format!("cannot handle SIGINT: {e}"),
        })?;
    let mut last_tick = Instant::now();
    let mut engine: Option<Engine> = Some(engine);
    let mut installing: Option<InstallFuture> = None;

    loop {
        if installing.is_none()
            && let Some(e) = engine.as_mut()
        {
            // Refused credentials end the agent once no install runs: the
            // same ones will not be accepted on the next attempt either.
            if agent.shutting_down || agent.refused.is_some() {
                break;
            }
            if let Some(r) = agent.ready.take() {
                if agent.fetch_more(e, &r).await? {
                    continue;
                }
                let mut e = engine.take().expect("engine idle");
                installing = Some(Box::pin(async move {
                    let opts = InstallOptions {
                        retry: r.retry,
                        available: Some(r.have),
                    };
                    let result = e.install(&r.path, &opts).await;
                    (e, result, r.digest, r.manifest)
                }));
            } else if let Some(bytes) = agent.pending_offer.take() {
                agent.handle_offer(&bytes, e, false).await?;
            }
        }
        let can_poll = agent.reconnect_at.is_none();
        let reconnect_at = agent.reconnect_at.unwrap_or_else(Instant::now);
        let next_tick = last_tick
            + if installing.is_some() || agent.busy() {
                TICK
            } else {
                IDLE_TICK
            };
        tokio::select! {
            ev = agent.conn.poll(), if can_poll => match ev {
                Ok(ev) => agent.on_mqtt(ev, engine.as_mut()).await?,
                Err(why) => agent.on_disconnect(why),
            },
            _ = tokio::time::sleep_until(reconnect_at.into()), if !can_poll => {
                agent.reconnect_at = None;
            }
            Some((step, detail)) = prx.recv() => agent.on_progress(step, &detail)?,
            (e, result, digest, m) = async { installing.as_mut().expect("guarded").await }, if installing.is_some() => {
                installing = None;
                let mut e = e;
                agent.on_install_done(result, &digest, &m, &mut e).await?;
                engine = Some(e);
            }
            _ = tokio::time::sleep_until(next_tick.into()) => {
                last_tick = Instant::now();
                if let Some(w) = watchdog
                    && last_ping.elapsed() >= w / 3
                {
                    let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
                    last_ping = Instant::now();
                }
                agent.on_tick(engine.as_mut()).await?;
            }
            _ = sigterm.recv() => agent.begin_shutdown(installing.is_some()),
            _ = sigint.recv() => agent.begin_shutdown(installing.is_some()),
        }
    }

    // Shutting down with no install running: keep what was downloaded,
    // say goodbye, give queued messages a moment to go out.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if let Some(a) = agent.active.as_mut()
        && let Err(e) = a.download.checkpoint()
    {
        tracing::warn!("checkpointing the download: {e}");
    }
    if agent.connected {
        agent.flush_outbox();
        agent.publish_status(true);
        let online = serde_json::to_vec(&Online {
            v: protocol::VERSION,
            online: false,
        })
        .expect("json");
        let topic = agent.topics.online(&agent.mq.device_id);
        if let Some(pkid) = agent.free_pkid() {
            agent.conn.publish_tracked(&topic, true, online, pkid);
            agent.tracked.insert(pkid, Tracked::Status);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !agent.tracked.is_empty() && Instant::now() < deadline {
            match tokio::time::timeout_at(deadline.into(), agent.conn.poll()).await {
                Ok(Ok(ev)) => agent.on_mqtt(ev, None).await?,
                _ => break,
            }
        }
        agent.conn.disconnect().await;
    }
    tracing::info!("agent stopped");
    match agent.refused.take() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Agent {
    /// Is anything in motion that the timer drives (see [`TICK`])?
    fn busy(&self) -> bool {
        self.active.is_some()
            || self.ready.is_some()
            || self.pending_offer.is_some()
            || (self.connected
                && (self.status_dirty
                    || self.outbox.iter().any(|(id, _)| !self.sent.contains(&id))))
    }

    fn download_dir(&self) -> PathBuf {
        self.dir.join("download")
    }

    fn save_file(&self) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.file).expect("json");
        fsutil::write_atomic(&self.dir.join("agent.json"), 0o600, true, &bytes)
    }

    fn decide(&mut self, digest: &str) -> Result<()> {
        if !self.file.decided.iter().any(|d| d == digest) {
            self.file.decided.push(digest.to_string());
            let excess = self.file.decided.len().saturating_sub(DECIDED_MAX);
            self.file.decided.drain(..excess);
            self.save_file()?;
        }
        Ok(())
    }

    fn begin_shutdown(&mut self, installing: bool) {
        if !self.shutting_down {
            if installing {
                tracing::info!(
                    "stopping: no new offers; letting the install in progress reach its outcome"
                );
            } else {
                tracing::info!("stopping");
            }
        }
        self.shutting_down = true;
    }

    fn set_phase(&mut self, name: PhaseName, m: Option<&Manifest>, detail: &str) {
        self.status.phase = PhaseReport {
            name,
            percent: None,
            release: m.map(|m| m.release.name.clone()),
            version: m.map(|m| m.release.version.clone()),
            detail: detail.to_string(),
        };
        self.status_dirty = true;
    }

    fn next_event_id(&mut self) -> u64 {
        let ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.last_event_id = ms.max(self.last_event_id + 1);
        self.last_event_id
    }

    /// Queues an event durably, then tries to send it.
    #[allow(clippy::too_many_arguments)]
    fn event(
        &mut self,
        kind: EventKind,
        phase: PhaseName,
        release: Option<String>,
        version: Option<String>,
        sequence: Option<u64>,
        percent: Option<u8>,
        reason: Option<String>,
    ) -> Result<()> {
        let e = protocol::Event {
            v: protocol::VERSION,
            id: self.next_event_id(),
            device: self.mq.device_id.clone(),
            kind,
            phase,
            release,
            version,
            sequence,
            percent,
            reason,
            at: now_text(),
        };
        self.outbox.push(Entry {
            topic: self.topics.events(&self.mq.device_id),
            payload: serde_json::to_string(&e).expect("json"),
            retain: false,
            keep: kind == EventKind::Outcome,
        })?;
        self.flush_outbox();
        Ok(())
    }

    fn progress_event(
        &mut self,
        phase: PhaseName,
        m: &Manifest,
        percent: Option<u8>,
    ) -> Result<()> {
        self.event(
            EventKind::Progress,
            phase,
            Some(m.release.name.clone()),
            Some(m.release.version.clone()),
            Some(m.sequence),
            percent,
            None,
        )
    }

    /// Reports an outcome of the engine: retained state and an event.
    fn outcome_event(&mut self, o: &Outcome, m: Option<&Manifest>) -> Result<()> {
        self.status.last_outcome = Some(report(o));
        self.status.phase = PhaseReport {
            name: outcome_phase(o.outcome),
            percent: None,
            release: Some(o.release.clone()),
            version: Some(o.version.clone()),
            detail: o.reason.clone().unwrap_or_default(),
        };
        self.status_dirty = true;
        self.event(
            EventKind::Outcome,
            outcome_phase(o.outcome),
            Some(o.release.clone()),
            Some(o.version.clone()),
            o.sequence.or(m.map(|m| m.sequence)),
            None,
            o.reason.clone(),
        )
    }

    /// A rejection decided by the agent (before or instead of an install).
    /// Without a verified manifest (`m` is `None`) there is no release to
    /// report on: the input is counted as discarded, and the last outcome
    /// stays what it was.
    fn rejected(
        &mut self,
        engine: Option<&mut Engine>,
        m: Option<&Manifest>,
        e: &Error,
    ) -> Result<()> {
        if let Some(engine) = engine
            && let Err(err) = engine.record_rejection(m, e)
        {
            tracing::warn!("recording the rejection: {err}");
        }
        if m.is_none() {
            let topic = self.offer_topic.clone();
            self.discarded(&topic, &format!("offer refused: {e}"));
            return Ok(());
        }
        tracing::warn!("offer rejected: {e}");
        let o = Outcome::rejected(m, &self.release_name, e.to_string());
        self.outcome_event(&o, m)
    }

    /// Counts a message dropped before anything in it was believed, in the
    /// retained state (its `discarded` field, not `last_outcome`). No event
    /// per message: a flood of junk must not fill the outbox.
    fn discarded(&mut self, topic: &str, reason: &str) {
        tracing::warn!("message on {topic} discarded: {reason}");
        let count = self.status.discarded.as_ref().map_or(0, |d| d.count) + 1;
        self.status.discarded = Some(protocol::DiscardedReport {
            count,
            topic: topic.to_string(),
            reason: reason.to_string(),
            at: now_text(),
        });
        self.status_dirty = true;
    }

    /// Verifies an offer before fetching anything, then starts (or resumes)
    /// its download.
    async fn handle_offer(
        &mut self,
        envelope: &[u8],
        engine: &mut Engine,
        retry: bool,
    ) -> Result<()> {
        let digest = digest_hex(envelope);
        let seen = intake::by_digest(&intake::DigestFacts {
            digest: &digest,
            empty: envelope.is_empty(),
            decided: self.file.decided.contains(&digest),
            active: self.active.as_ref().map(|a| a.digest.as_str()),
            ready: self.ready.as_ref().map(|r| r.digest.as_str()),
        });
        match seen {
            intake::Seen::Cleared | intake::Seen::InProgress => return Ok(()),
            intake::Seen::DecidedBefore => {
                tracing::debug!("offer {digest} was decided before; ignored");
                if self.active.as_ref().is_none_or(|a| a.digest != digest)
                    && Download::existing_offer(&self.download_dir()).as_deref() == Some(envelope)
                {
                    Download::discard(&self.download_dir())?;
                }
                return Ok(());
            }
            intake::Seen::New => {}
        }
        let root = match Root::load(&self.trust_root) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("cannot load the trust root: {e}");
                return Ok(());
            }
        };
        let (m, _) = match bundle::verify_envelope(envelope, &root, "offered manifest") {
            Ok(v) => v,
            Err(e) => {
                // Not remembered by digest: only signed offers are, so that
                // junk cannot push them out.
                return self.rejected(Some(engine), None, &e);
            }
        };
        let verdict = intake::by_manifest(&intake::ManifestFacts {
            sequence: m.sequence,
            settled: engine
                .state()
                .settled(&m.release.version, m.sequence)
                .map(|o| o.outcome),
            retry,
            fetching: self.active.as_ref().map(|a| a.manifest.sequence),
        });
        match verdict {
            intake::Verdict::Settled(kind) => {
                tracing::info!(
                    "offer of {} {} (sequence {}) was already {}; ignored",
                    m.release.name,
                    m.release.version,
                    m.sequence,
                    kind.name()
                );
                if self.active.as_ref().is_none_or(|a| a.digest != digest) {
                    let _ = Download::discard(&self.download_dir());
                }
                return self.decide(&digest);
            }
            intake::Verdict::Older { fetching } => {
                let a = self.active.as_ref().expect("an offer is being fetched");
                tracing::info!(
                    "offer of {} {} ignored: {} {} (sequence {fetching}) is being fetched",
                    m.release.name,
                    m.release.version,
                    a.manifest.release.name,
                    a.manifest.release.version,
                );
                return Ok(());
            }
            intake::Verdict::Take { replaces: true } => {
                let a = self.active.as_ref().expect("an offer is being fetched");
                tracing::info!(
                    "a newer offer ({} {}) replaces the download of {}",
                    m.release.name,
                    m.release.version,
                    a.manifest.release.version
                );
            }
            intake::Verdict::Take { replaces: false } => {}
        }
        self.set_phase(PhaseName::Verifying, Some(&m), "checking the offer");
        // What the install will unpack decides what is fetched: of an
        // indexed tarball, only the chunks of the units the release root
        // lacks. Fetch-only runs have no node to ask and fetch everything.
        let checked = if self.fetch_only {
            Ok(None)
        } else {
            match engine.check_offer(&m, retry).await {
                Ok(_) => engine.plan_for(&m).await.map(Some),
                Err(e) => Err(e),
            }
        };
        let need = match checked {
            Ok(Some(_)) if self.fetch_everything.as_deref() == Some(digest.as_str()) => {
                vec![true; m.tarball.chunks.len()]
            }
            Ok(Some(plan)) => staging::chunks_read(&m, &plan),
            Ok(None) => vec![true; m.tarball.chunks.len()],
            Err(e) => {
                self.rejected(Some(engine), Some(&m), &e)?;
                if !is_passing(&e) {
                    self.decide(&digest)?;
                }
                return Ok(());
            }
        };
        // Accepted: fetch it.
        self.active = None;
        fsutil::write_atomic(&self.dir.join("last-offer.json"), 0o600, true, envelope)?;
        let download = match Download::open(
            &self.download_dir(),
            envelope,
            &m,
            need,
            self.piece_size(&m),
            WINDOW,
            PIECE_TIMEOUT,
        ) {
            Ok(d) => d,
            Err(e) => {
                self.rejected(Some(engine), Some(&m), &e)?;
                return Ok(());
            }
        };
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
        self.set_phase(PhaseName::Downloading, Some(&m), "");
        self.status.phase.percent = Some(resumed);
        self.progress_event(PhaseName::Downloading, &m, Some(resumed))?;
        self.active = Some(Active {
            digest,
            manifest: m,
            download,
            retry,
            last_percent_event: resumed / 25 * 25,
            started: Instant::now(),
        });
        self.after_progress()?;
        Ok(())
    }

    /// Just before the install: the plan again, as the release root may
    /// have changed since the offer was taken up. When the install would
    /// read chunks the download lacks, the offer is taken up again (its
    /// download resumes with what it has and fetches the rest) and `true`
    /// is returned; the install waits until that is done.
    async fn fetch_more(&mut self, engine: &mut Engine, r: &Ready) -> Result<bool> {
        if r.have.iter().all(|&h| h) {
            return Ok(false);
        }
        let plan = match engine.plan_for(&r.manifest).await {
            Ok(p) => p,
            // The install meets the same error and reports it.
            Err(e) => {
                tracing::debug!("planning before the install: {e}");
                return Ok(false);
            }
        };
        let need = staging::chunks_read(&r.manifest, &plan);
        let more = need.iter().zip(&r.have).filter(|&(&n, &h)| n && !h).count();
        if more == 0 {
            return Ok(false);
        }
        let Some(envelope) = Download::existing_offer(&self.download_dir()) else {
            return Ok(false);
        };
        tracing::warn!(
            "the release root changed since the download was planned: {more} more chunks are needed; fetching them"
        );
        self.handle_offer(&envelope, engine, r.retry).await?;
        Ok(true)
    }

    /// The largest piece the broker carries for us.
    fn piece_size(&self, m: &Manifest) -> u32 {
        let topic = self.topics.data(&self.mq.device_id).len() as u32;
        let limit = self.max_packet.map_or(u32::MAX, |p| {
            p.saturating_sub(protocol::DATA_HEADER as u32 + topic + 64)
        });
        m.tarball.chunk_size.min(limit.max(1024))
    }

    /// Sends requests for missing pieces; finishes the download when done.
    fn after_progress(&mut self) -> Result<()> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        if a.download.window.done() {
            let received = a.started.elapsed();
            a.download.checkpoint()?;
            let a = self.active.take().expect("active");
            crate::memory::release_free_memory();
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
            if self.fetch_only {
                self.shutting_down = true;
                return Ok(());
            }
            self.set_phase(PhaseName::Verifying, Some(&a.manifest), "download complete");
            self.ready = Some(Ready {
                path: a.download.path(),
                have: a.download.window.have().to_vec(),
                digest: a.digest,
                manifest: a.manifest,
                retry: a.retry,
            });
            return Ok(());
        }
        if !self.connected || self.shutting_down {
            return Ok(());
        }
        // Refill in batches, so that adjacent pieces share a request.
        let w = &a.download.window;
        if w.in_flight() > 0 && w.room() < protocol::MAX_PIECES_PER_REQUEST {
            return Ok(());
        }
        let pieces = a.download.window.next_requests(Instant::now());
        if pieces.is_empty() {
            return Ok(());
        }
        let topic = self.topics.request(&self.mq.device_id);
        let bundle = hex::encode(a.download.tarball_id());
        for req in group_requests(&bundle, &pieces) {
            let payload = serde_json::to_vec(&req).expect("json");
            if let Err(e) = self.conn.publish(&topic, Qos::AtMostOnce, false, payload) {
                // Re-asked after the timeout.
                tracing::debug!("{e}");
            }
        }
        Ok(())
    }

    fn on_data(&mut self, payload: &bytes::Bytes) -> Result<()> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        let reply = match protocol::decode_data(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("data reply ignored: {e}");
                return Ok(());
            }
        };
        let r = match reply {
            DataReply::Data { bundle, offset, .. } if &bundle == a.download.tarball_id() => {
                let data = payload.slice(protocol::DATA_HEADER..);
                (offset, a.download.on_data(offset, data))
            }
            DataReply::Error {
                bundle, message, ..
            } if &bundle == a.download.tarball_id() => {
                tracing::warn!("the server cannot serve this release: {message}");
                return Ok(());
            }
            _ => {
                tracing::debug!("data reply for another transfer ignored");
                return Ok(());
            }
        };
        self.on_received(r.0, r.1)
    }

    fn on_received(&mut self, offset: u64, r: Result<Received>) -> Result<()> {
        let Some(a) = self.active.as_mut() else {
            return Ok(());
        };
        match r {
            Ok(Received::Corrupt(c)) => {
                tracing::warn!("chunk {c} failed its SHA-256; fetching it again")
            }
            Ok(Received::Ignored(why)) => tracing::debug!("piece at {offset} ignored: {why}"),
            Ok(Received::Verified(_)) => {
                let pct = a.download.window.percent();
                if self.status.phase.percent != Some(pct) {
                    self.status.phase.percent = Some(pct);
                    self.status_dirty = true;
                }
                a.download
                    .maybe_checkpoint(CHECKPOINT_EVERY, CHECKPOINT_CHUNKS)?;
                if pct / 25 * 25 > a.last_percent_event && pct < 100 {
                    a.last_percent_event = pct / 25 * 25;
                    let m = a.manifest.clone();
                    self.progress_event(PhaseName::Downloading, &m, Some(pct))?;
                }
            }
            Ok(Received::Stored) => {}
            Err(e) => {
                let a = self.active.take().expect("active");
                let _ = Download::discard(&self.download_dir());
                self.rejected(None, Some(&a.manifest), &e)?;
                return self.decide(&a.digest);
            }
        }
        self.after_progress()
    }

    async fn on_mqtt(&mut self, ev: mqtt::Event, engine: Option<&mut Engine>) -> Result<()> {
        match ev {
            mqtt::Event::Connected {
                session_present,
                max_packet,
            } => {
                tracing::info!(
                    "connected to {} (session {})",
                    self.mq.url,
                    if session_present { "resumed" } else { "new" }
                );
                self.connected = true;
                self.connected_at = Some(Instant::now());
                self.refused = None;
                self.max_packet = max_packet;
                if !session_present {
                    self.tracked.clear();
                    self.sent.clear();
                }
                for f in self
                    .topics
                    .device_subscriptions(&self.mq.device_id, &self.mq.groups)
                {
                    if let Err(e) = self.conn.subscribe(&f, Qos::AtLeastOnce) {
                        tracing::warn!("{e}");
                    }
                }
                let online = serde_json::to_vec(&Online {
                    v: protocol::VERSION,
                    online: true,
                })
                .expect("json");
                let topic = self.topics.online(&self.mq.device_id);
                if let Some(pkid) = self.free_pkid() {
                    self.conn.publish_tracked(&topic, true, online, pkid);
                    self.tracked.insert(pkid, Tracked::Status);
                }
                self.status_dirty = true;
                self.publish_status(true);
                self.flush_outbox();
                let piece = self.active.as_ref().map(|a| self.piece_size(&a.manifest));
                if let (Some(a), Some(piece)) = (self.active.as_mut(), piece) {
                    a.download.window.set_piece(piece);
                    a.download.window.reset_in_flight();
                }
                self.after_progress()?;
            }
            mqtt::Event::PubAck(pkid) => match self.tracked.remove(&pkid) {
                Some(Tracked::Outbox(id)) => {
                    self.sent.remove(&id);
                    self.outbox.remove(id)?;
                    self.flush_outbox();
                }
                Some(Tracked::Status) => {}
                None => {}
            },
            mqtt::Event::Message { topic, payload, .. } => match self.topics.parse(&topic) {
                Some(Topic::Data(id)) if id == self.mq.device_id => self.on_data(&payload)?,
                Some(Topic::DeviceOffer(id)) if id == self.mq.device_id => {
                    self.offer_topic = topic;
                    self.offer_received(payload.to_vec(), engine).await?
                }
                Some(Topic::GroupOffer(g)) if self.mq.groups.contains(&g) => {
                    self.offer_topic = topic;
                    self.offer_received(payload.to_vec(), engine).await?
                }
                Some(Topic::Command(id)) if id == self.mq.device_id => {
                    self.on_command(&payload, engine).await?
                }
                _ => tracing::debug!("message on {topic} ignored"),
            },
            mqtt::Event::Dropped { topic, size } => self.discarded(
                &topic,
                &format!(
                    "a message of {} is larger than the {} this device accepts; dropped unread",
                    size_text(size),
                    size_text(u64::from(mqtt::MAX_INCOMING))
                ),
            ),
            mqtt::Event::Other => {}
        }
        Ok(())
    }

    async fn offer_received(&mut self, bytes: Vec<u8>, engine: Option<&mut Engine>) -> Result<()> {
        if self.shutting_down {
            return Ok(());
        }
        match engine {
            Some(e) if self.ready.is_none() => self.handle_offer(&bytes, e, false).await,
            _ => {
                // Busy installing: the newest offer waits.
                self.pending_offer = Some(bytes);
                Ok(())
            }
        }
    }

    async fn on_command(&mut self, payload: &[u8], engine: Option<&mut Engine>) -> Result<()> {
        let cmd: protocol::Command = match serde_json::from_slice(payload) {
            Ok(c) => c,
            Err(e) => {
                let topic = self.topics.command(&self.mq.device_id);
                self.discarded(&topic, &format!("not a command: {e}"));
                return Ok(());
            }
        };
        if cmd.v != protocol::VERSION || cmd.cmd != CommandKind::Retry {
            let topic = self.topics.command(&self.mq.device_id);
            let why = format!("command {:?} (v{}) not understood", cmd.cmd, cmd.v);
            self.discarded(&topic, &why);
            return Ok(());
        }
        let Some(engine) = engine else {
            tracing::warn!("retry ignored: an install is in progress");
            return Ok(());
        };
        let Ok(envelope) = std::fs::read(self.dir.join("last-offer.json")) else {
            tracing::warn!("retry ignored: no offer was received yet");
            return Ok(());
        };
        let digest = digest_hex(&envelope);
        tracing::info!("retry requested for the last offer");
        self.file.decided.retain(|d| d != &digest);
        self.save_file()?;
        self.handle_offer(&envelope, engine, true).await
    }

    fn on_disconnect(&mut self, why: mqtt::ConnError) {
        // The backoff starts over only after a connection that lasted: one
        // the broker drops right after CONNACK again and again keeps
        // growing the delay instead of looping at the shortest one.
        if self
            .connected_at
            .take()
            .is_some_and(|t| t.elapsed() >= STABLE_CONNECTION)
        {
            self.backoff.reset();
        }
        let delay = self.backoff.next_delay();
        if let mqtt::ConnError::Auth(_) = &why {
            tracing::warn!("the broker refused our credentials; stopping once no install runs");
            self.refused = Some(why.clone().into_error(&self.mq.url));
        } else if self.connected {
            tracing::warn!("lost the broker connection ({why}); reconnecting");
        } else {
            tracing::info!("cannot reach the broker ({why}); retrying in {delay:?}");
        }
        self.connected = false;
        self.reconnect_at = Some(Instant::now() + delay);
        if let Some(a) = self.active.as_mut() {
            a.download.window.reset_in_flight();
        }
    }

    fn on_progress(&mut self, step: Step, detail: &str) -> Result<()> {
        let phase = phase_of(step);
        tracing::info!("{}: {detail}", step.name());
        let keep = (
            self.status.phase.release.clone(),
            self.status.phase.version.clone(),
        );
        self.status.phase = PhaseReport {
            name: phase,
            percent: None,
            release: keep.0.clone(),
            version: keep.1.clone(),
            detail: detail.to_string(),
        };
        self.status_dirty = true;
        // Outcomes are reported once the engine returns them.
        if !matches!(
            phase,
            PhaseName::Committed
                | PhaseName::RolledBack
                | PhaseName::Rejected
                | PhaseName::NeedsAttention
        ) {
            self.event(
                EventKind::Progress,
                phase,
                keep.0,
                keep.1,
                None,
                None,
                (!detail.is_empty()).then(|| detail.to_string()),
            )?;
        }
        Ok(())
    }

    async fn on_install_done(
        &mut self,
        result: Result<Outcome>,
        digest: &str,
        m: &Manifest,
        engine: &mut Engine,
    ) -> Result<()> {
        match result {
            Ok(o) => {
                tracing::info!(
                    "{} {} {}{}",
                    o.outcome.name(),
                    o.release,
                    o.version,
                    o.reason
                        .as_deref()
                        .map(|r| format!(": {r}"))
                        .unwrap_or_default()
                );
                self.outcome_event(&o, Some(m))?;
                // An install undone because beamup was cut off may run again.
                if !o.interrupted {
                    self.decide(digest)?;
                }
            }
            Err(e @ Error::Incomplete { .. }) => {
                // The release root changed between the last check and the
                // install: the offer is taken up again, and its download
                // resumes and fetches every chunk it lacks, needed or not,
                // so this happens at most once per offer (unless a newer
                // offer came in meanwhile: that one goes first).
                tracing::warn!("{e}; fetching the rest of the tarball");
                self.fetch_everything = Some(digest.to_string());
                if self.pending_offer.is_none() {
                    self.pending_offer = Download::existing_offer(&self.download_dir());
                }
                self.refresh_node(engine).await;
                return Ok(());
            }
            Err(e) => {
                // The engine recorded the rejection in its state already.
                self.rejected(None, Some(m), &e)?;
                if !is_passing(&e) {
                    self.decide(digest)?;
                }
            }
        }
        Download::discard(&self.download_dir())?;
        crate::memory::release_free_memory();
        self.refresh_node(engine).await;
        Ok(())
    }

    async fn refresh_node(&mut self, engine: &mut Engine) {
        self.node_polled_at = Instant::now();
        match tokio::time::timeout(Duration::from_secs(5), engine.running()).await {
            Ok(Ok(r)) => {
                let changed = self.status.running.as_deref() != Some(r.current.as_str())
                    || self.status.permanent.as_deref() != Some(r.permanent.as_str());
                if changed {
                    self.status.running = Some(r.current);
                    self.status.permanent = Some(r.permanent);
                    self.status_dirty = true;
                }
            }
            Ok(Err(e)) => {
                tracing::warn!("{e}");
                if self.status.running.is_some() {
                    self.status.running = None;
                    self.status_dirty = true;
                }
            }
            Err(_) => tracing::warn!("the node did not answer within 5 s"),
        }
    }

    async fn on_tick(&mut self, engine: Option<&mut Engine>) -> Result<()> {
        if let Some(a) = self.active.as_mut() {
            a.download
                .maybe_checkpoint(CHECKPOINT_EVERY, CHECKPOINT_CHUNKS)?;
        }
        self.after_progress()?;
        self.publish_status(false);
        self.flush_outbox();
        if let Some(e) = engine
            && self.active.is_none()
            && self.node_polled_at.elapsed() >= NODE_POLL
        {
            self.refresh_node(e).await;
        }
        Ok(())
    }

    fn free_pkid(&self) -> Option<u16> {
        if self.tracked.len() >= TRACKED_MAX {
            return None;
        }
        (1..=mqtt::INFLIGHT).find(|p| !self.tracked.contains_key(p))
    }

    /// Hands outbox entries to the connection, oldest first, a bounded
    /// number in flight.
    fn flush_outbox(&mut self) {
        if !self.connected {
            return;
        }
        let todo: Vec<(u64, Entry)> = self
            .outbox
            .iter()
            .filter(|(id, _)| !self.sent.contains(id))
            .map(|(id, e)| (id, e.clone()))
            .collect();
        for (id, e) in todo {
            let Some(pkid) = self.free_pkid() else {
                break;
            };
            self.conn
                .publish_tracked(&e.topic, e.retain, e.payload.into_bytes(), pkid);
            self.tracked.insert(pkid, Tracked::Outbox(id));
            self.sent.insert(id);
        }
    }

    /// Publishes the retained state when it changed (rate-limited unless
    /// `now`).
    fn publish_status(&mut self, now: bool) {
        if !self.status_dirty || !self.connected {
            return;
        }
        if !now
            && self
                .status_sent_at
                .is_some_and(|t| t.elapsed() < STATUS_MIN_INTERVAL)
        {
            return;
        }
        let Some(pkid) = self.free_pkid() else {
            return;
        };
        self.status.updated_at = now_text();
        let payload = serde_json::to_vec(&self.status).expect("json");
        let topic = self.topics.state(&self.mq.device_id);
        self.conn.publish_tracked(&topic, true, payload, pkid);
        self.tracked.insert(pkid, Tracked::Status);
        self.status_dirty = false;
        self.status_sent_at = Some(Instant::now());
    }
}

/// A size for a log line: bytes, KiB or MiB.
fn size_text(bytes: u64) -> String {
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
/// `MAX_PIECES_PER_REQUEST`.
fn group_requests(bundle: &str, pieces: &[crate::transport::transfer::Piece]) -> Vec<ChunkRequest> {
    let mut out: Vec<ChunkRequest> = Vec::new();
    for p in pieces {
        if let Some(last) = out.last_mut() {
            let piece = last.piece.unwrap_or(last.len);
            let count = last.len.div_ceil(piece) as usize;
            let full = last.len % piece == 0;
            if full
                && p.len <= piece
                && last.offset + u64::from(last.len) == p.offset
                && count < protocol::MAX_PIECES_PER_REQUEST
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
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::transfer::Piece;

    #[test]
    fn engine_steps_are_reported_as_the_protocol_s_phases() {
        assert_eq!(phase_of(Step::Soaking), PhaseName::Soaking);
        assert_eq!(phase_of(Step::Restarting), PhaseName::Installing);
        assert_eq!(
            phase_of(Step::Finished(OutcomeKind::RolledBack)),
            PhaseName::RolledBack
        );
        assert_eq!(
            phase_of(Step::Finished(OutcomeKind::NeedsAttention)),
            PhaseName::NeedsAttention
        );
    }

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
        );
        let got: Vec<(u64, u32, Option<u32>)> =
            reqs.iter().map(|r| (r.offset, r.len, r.piece)).collect();
        assert_eq!(
            got,
            [(0, 240, Some(100)), (240, 100, None), (700, 100, None)]
        );
        let many: Vec<Piece> = (0..20).map(|i| p(i, u64::from(i) * 10, 10)).collect();
        let reqs = group_requests("b", &many);
        assert_eq!(reqs.len(), 3);
        assert!(reqs.iter().all(|r| r.replies().count() <= 8));
    }
}
