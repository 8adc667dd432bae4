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
//! This module is the loop and the wiring; each job has its own module
//! and struct: `session` (the connection, reconnecting, packet ids),
//! `report` (retained state, events, outbox), `offers` (offers decided,
//! waiting, the last one), `transfer` (the download and the finished one
//! waiting for the engine), and `intake` (pure: what an arriving offer
//! means).
//!
//! Files, under `STATE_DIR/agent/`: `agent.json` and `last-offer.json`
//! (see `offers`), `download/` (see `transport::transfer`), `outbox/` (see
//! `transport::outbox`), `mqtt.sock` (the connection's guard, see
//! `mqtt::guard`). The install engine's own `state.json` and lock stay
//! where they are; the agent holds the lock while it runs.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::bundle;
use crate::config::Config;
use crate::device::intake;
use crate::device::offers::{self, OfferMemory};
use crate::device::report::{self, Reporter};
use crate::device::session::{MqttSession, Tracked};
use crate::device::transfer::{self, Arrival, Ready, Transfer};
use crate::engine::install::{self, Engine, InstallOptions, Step};
use crate::engine::settings::EngineSettings;
use crate::engine::state::Outcome;
use crate::error::{Error, Result};
use crate::limits::LIMITS;
use crate::release::manifest::Manifest;
use crate::staging;
use crate::transport::mqtt::{self, ConnError};
use crate::transport::outbox::Outbox;
use crate::transport::protocol::{self, CommandKind, Online, PhaseName, Topic, Topics};
use crate::trust::root::Root;

/// The main loop's timer while something is moving (a download, an
/// install, a status or events to send): request timeouts, checkpoints,
/// rate-limited status.
const TICK: Duration = Duration::from_millis(100);
/// ... and while idle, when it only pings the watchdog and polls the node:
/// a device waiting for offers wakes up about once a second, not ten times.
const IDLE_TICK: Duration = Duration::from_secs(1);
const NODE_POLL: Duration = Duration::from_secs(60);
/// ... and while it did not answer: a node its supervisor starts again
/// shows in the fleet's view within seconds, not a minute.
const NODE_POLL_UNANSWERED: Duration = Duration::from_secs(5);

/// Engine progress steps, sent from inside the install to the main loop.
struct ProgressTx(mpsc::UnboundedSender<(Step, String)>);

impl install::Progress for ProgressTx {
    fn phase(&self, step: Step, detail: &str) {
        let _ = self.0.send((step, detail.to_string()));
    }
}

/// The install running beside the loop: it owns the engine and gives it
/// back with the result.
type InstallFuture = Pin<Box<dyn Future<Output = (Engine, Result<Outcome>, String, Manifest)>>>;

struct Agent {
    /// The trust root file offers are verified against.
    trust_root: PathBuf,
    release_name: String,
    device_id: String,
    groups: Vec<String>,
    topics: Topics,
    session: MqttSession,
    report: Reporter,
    offers: OfferMemory,
    transfer: Transfer,
    shutting_down: bool,
    node_polled_at: Instant,
    /// `BEAMUP_AGENT_FETCH_ONLY=1` (benches, tests): skip the node's checks,
    /// fetch the first offer, exit. Never installs.
    fetch_only: bool,
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
pub(crate) async fn run(cfg: Config) -> Result<()> {
    crate::memory::tune_allocator();
    // Before recovery: a SIGTERM that comes while it runs waits for the
    // loop below (which stops cleanly) instead of killing the agent.
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Internal {
            detail: format!("cannot handle SIGTERM: {e}"),
        })?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| Error::Internal {
            detail: format!("cannot handle SIGINT: {e}"),
        })?;
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
    let topics = Topics::new(&mq.prefix, &mq.fleet);
    let will = serde_json::to_vec(&Online {
        v: protocol::VERSION,
        online: false,
    })
    .expect("json");
    let mqtt_session = mqtt::Session {
        client_id: format!("beamup-{}-{}", mq.fleet, mq.device_id),
        persistent: true,
        keep_alive: Duration::from_secs(30),
        will: Some((topics.online(&mq.device_id), will)),
    };
    let session = MqttSession::open(&broker, &mqtt_session, &dir.join("mqtt.sock"))?;
    let mut agent = Agent {
        trust_root: cfg.trust.root.clone(),
        release_name: cfg.release.name.clone(),
        device_id: mq.device_id.clone(),
        groups: mq.groups.clone(),
        session,
        report: Reporter::new(outbox, &topics, &mq, engine.state().last_outcome()),
        offers: OfferMemory::load(dir.clone(), topics.device_offer(&mq.device_id)),
        transfer: Transfer::new(dir.join("download"), topics.data(&mq.device_id).len()),
        shutting_down: false,
        node_polled_at: Instant::now(),
        fetch_only: std::env::var("BEAMUP_AGENT_FETCH_ONLY").is_ok_and(|v| v == "1"),
        topics,
    };
    if agent.fetch_only {
        tracing::warn!("BEAMUP_AGENT_FETCH_ONLY=1: fetching one offer without installing it");
    }

    // Recover an interrupted install before anything else.
    let leftover = agent.transfer.existing_offer();
    match engine.recover().await {
        Ok(Some(o)) => {
            tracing::info!(
                "recovered an interrupted install: {} {} {}",
                o.outcome.name(),
                o.release,
                o.version
            );
            let again = leftover.as_deref().and_then(|e| agent.verified(e));
            let settled = engine
                .state()
                .settled(&o.version, o.sequence.unwrap_or(0))
                .is_some();
            if intake::reports_recovered(&o, again.as_ref(), settled) {
                agent.report.outcome(&mut agent.session, &o, None)?;
            } else {
                tracing::info!(
                    "{} {} (sequence {}) is taken up again from its download: that install's outcome is the offer's",
                    o.release,
                    o.version,
                    o.sequence.unwrap_or(0)
                );
            }
        }
        Ok(None) => {}
        Err(e) => tracing::error!("recovery failed: {e}"),
    }
    while let Ok((step, detail)) = prx.try_recv() {
        agent
            .report
            .on_progress(&mut agent.session, step, &detail)?;
    }
    agent.report.set_idle();
    agent.refresh_node(&mut engine).await;
    // A download left by an earlier run is an offer received again.
    if let Some(envelope) = leftover {
        agent.handle_offer(&envelope, &mut engine, false).await?;
    }

    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status("running"),
    ]);
    let watchdog = sd_notify::watchdog_enabled();
    let mut last_ping = Instant::now();
    let mut last_tick = Instant::now();
    // The engine is here while idle, inside `installing` while it installs.
    let mut engine: Option<Engine> = Some(engine);
    let mut installing: Option<InstallFuture> = None;

    loop {
        if installing.is_none()
            && let Some(e) = engine.as_mut()
        {
            // Refused credentials end the agent once no install runs: the
            // same ones will not be accepted on the next attempt either.
            if agent.shutting_down || agent.session.refused() {
                break;
            }
            if let Some(r) = agent.transfer.take_ready() {
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
            } else if let Some(bytes) = agent.offers.take_waiting() {
                agent.handle_offer(&bytes, e, false).await?;
            }
        }
        let reconnect_at = agent.session.reconnect_at();
        let can_poll = reconnect_at.is_none();
        let reconnect_at = reconnect_at.unwrap_or_else(Instant::now);
        let next_tick = last_tick
            + if installing.is_some() || agent.busy() {
                TICK
            } else {
                IDLE_TICK
            };
        tokio::select! {
            ev = agent.session.poll(), if can_poll => match ev {
                Ok(ev) => agent.on_mqtt(ev, engine.as_mut()).await?,
                Err(why) => agent.on_disconnect(why),
            },
            _ = tokio::time::sleep_until(reconnect_at.into()), if !can_poll => {
                agent.session.reconnect_now();
            }
            Some((step, detail)) = prx.recv() => {
                agent.report.on_progress(&mut agent.session, step, &detail)?;
            }
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
    if let Err(e) = agent.transfer.checkpoint() {
        tracing::warn!("checkpointing the download: {e}");
    }
    if agent.session.is_connected() {
        agent.report.flush(&mut agent.session);
        agent.report.publish_status(&mut agent.session, true);
        agent.report.announce(&mut agent.session, false);
        let deadline = Instant::now() + Duration::from_secs(2);
        while !agent.session.all_acked() && Instant::now() < deadline {
            match tokio::time::timeout_at(deadline.into(), agent.session.poll()).await {
                Ok(Ok(ev)) => agent.on_mqtt(ev, None).await?,
                _ => break,
            }
        }
        agent.session.disconnect().await;
    }
    tracing::info!("agent stopped");
    match agent.session.take_refused() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

impl Agent {
    /// Is anything in motion that the timer drives (see [`TICK`])?
    fn busy(&self) -> bool {
        self.transfer.is_busy()
            || self.offers.is_waiting()
            || (self.session.is_connected() && self.report.has_unsent())
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
            let topic = self.offers.topic().to_string();
            self.report
                .discarded(&topic, &format!("offer refused: {e}"));
            return Ok(());
        }
        tracing::warn!("offer rejected: {e}");
        let o = Outcome::rejected(m, &self.release_name, e.to_string());
        self.report.outcome(&mut self.session, &o, m)
    }

    /// The manifest of a signed offer, if it verifies against the trust
    /// root (errors are `handle_offer`'s to report).
    fn verified(&self, envelope: &[u8]) -> Option<Manifest> {
        let root = Root::load(&self.trust_root).ok()?;
        bundle::verify_envelope(envelope, &root, "offered manifest")
            .ok()
            .map(|(m, _)| m)
    }

    /// Verifies an offer before fetching anything, then starts (or resumes)
    /// its download.
    async fn handle_offer(
        &mut self,
        envelope: &[u8],
        engine: &mut Engine,
        retry: bool,
    ) -> Result<()> {
        let digest = offers::digest_hex(envelope);
        let fetching = self.transfer.fetching();
        let seen = intake::by_digest(&intake::DigestFacts {
            digest: &digest,
            empty: envelope.is_empty(),
            decided: self.offers.is_decided(&digest),
            active: fetching.map(|(d, _)| d),
            ready: self.transfer.ready_digest(),
        });
        let fetching_other = fetching.is_none_or(|(d, _)| d != digest);
        match seen {
            intake::Seen::Cleared | intake::Seen::InProgress => return Ok(()),
            intake::Seen::DecidedBefore => {
                tracing::debug!("offer {digest} was decided before; ignored");
                if fetching_other && self.transfer.existing_offer().as_deref() == Some(envelope) {
                    self.transfer.discard()?;
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
        let fetching = self.transfer.fetching().map(|(_, m)| m);
        let verdict = intake::by_manifest(&intake::ManifestFacts {
            sequence: m.sequence,
            settled: engine
                .state()
                .settled(&m.release.version, m.sequence)
                .map(|o| o.outcome),
            retry,
            fetching: fetching.map(|f| f.sequence),
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
                if fetching_other {
                    let _ = self.transfer.discard();
                }
                return self.offers.decide(&digest);
            }
            intake::Verdict::Older { fetching: sequence } => {
                let f = fetching.expect("an offer is being fetched");
                tracing::info!(
                    "offer of {} {} ignored: {} {} (sequence {sequence}) is being fetched",
                    m.release.name,
                    m.release.version,
                    f.release.name,
                    f.release.version,
                );
                return Ok(());
            }
            intake::Verdict::Take { replaces: true } => {
                let f = fetching.expect("an offer is being fetched");
                tracing::info!(
                    "a newer offer ({} {}) replaces the download of {}",
                    m.release.name,
                    m.release.version,
                    f.release.version
                );
            }
            intake::Verdict::Take { replaces: false } => {}
        }
        self.report
            .set_phase(PhaseName::Verifying, Some(&m), "checking the offer");
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
            Ok(plan) => intake::chunks_to_fetch(
                m.tarball.chunks.len(),
                plan.map(|p| staging::chunks_read(&m, &p)),
                self.offers.fetches_everything(&digest),
            ),
            Err(e) => {
                self.rejected(Some(engine), Some(&m), &e)?;
                if !is_passing(&e) {
                    self.offers.decide(&digest)?;
                }
                return Ok(());
            }
        };
        // Accepted: fetch it.
        self.transfer.stop();
        self.offers.remember_last(envelope)?;
        let max_packet = self.session.max_packet();
        let resumed =
            match self
                .transfer
                .start(envelope, digest, m.clone(), need, retry, max_packet)
            {
                Ok(s) => s,
                Err(e) => {
                    self.rejected(Some(engine), Some(&m), &e)?;
                    return Ok(());
                }
            };
        self.report.set_phase(PhaseName::Downloading, Some(&m), "");
        self.report.set_percent(resumed);
        self.report
            .progress(&mut self.session, PhaseName::Downloading, &m, Some(resumed))?;
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
        let more = intake::chunks_missing(&staging::chunks_read(&r.manifest, &plan), &r.have);
        if more == 0 {
            return Ok(false);
        }
        let Some(envelope) = self.transfer.existing_offer() else {
            return Ok(false);
        };
        tracing::warn!(
            "the release root changed since the download was planned: {more} more chunks are needed; fetching them"
        );
        self.handle_offer(&envelope, engine, r.retry).await?;
        Ok(true)
    }

    /// Sends requests for missing pieces; when the download is complete,
    /// it waits for the engine.
    fn after_progress(&mut self) -> Result<()> {
        if let Some(ready) = self.transfer.take_finished()? {
            if self.fetch_only {
                self.shutting_down = true;
                return Ok(());
            }
            self.report.set_phase(
                PhaseName::Verifying,
                Some(&ready.manifest),
                "download complete",
            );
            self.transfer.hold(ready);
            return Ok(());
        }
        if !self.session.is_connected() || self.shutting_down {
            return Ok(());
        }
        let topic = self.topics.request(&self.device_id);
        for req in self.transfer.requests(Instant::now()) {
            // Re-asked after the timeout when it is lost.
            let payload = serde_json::to_vec(&req).expect("json");
            self.session.publish_once(&topic, payload);
        }
        Ok(())
    }

    fn on_data(&mut self, payload: &bytes::Bytes) -> Result<()> {
        match self.transfer.on_data(payload)? {
            Arrival::Ignored => Ok(()),
            Arrival::Piece { percent, milestone } => {
                if let Some(pct) = percent {
                    self.report.set_percent(pct);
                }
                if let Some((pct, m)) = milestone {
                    self.report.progress(
                        &mut self.session,
                        PhaseName::Downloading,
                        &m,
                        Some(pct),
                    )?;
                }
                self.after_progress()
            }
            Arrival::Failed {
                digest,
                manifest,
                error,
            } => {
                self.rejected(None, Some(&manifest), &error)?;
                self.offers.decide(&digest)
            }
        }
    }

    async fn on_mqtt(&mut self, ev: mqtt::Event, engine: Option<&mut Engine>) -> Result<()> {
        match ev {
            mqtt::Event::Connected {
                session_present,
                max_packet,
            } => {
                self.session.on_connected(session_present, max_packet);
                self.session.subscribe(
                    &self
                        .topics
                        .device_subscriptions(&self.device_id, &self.groups),
                );
                self.report.on_connected(&mut self.session, session_present);
                self.transfer.on_connected(max_packet);
                self.after_progress()?;
            }
            mqtt::Event::PubAck(pkid) => match self.session.acked(pkid) {
                Some(Tracked::Outbox(id)) => self.report.acked(&mut self.session, id)?,
                Some(Tracked::Status) | None => {}
            },
            mqtt::Event::Message { topic, payload, .. } => match self.topics.parse(&topic) {
                Some(Topic::Data(id)) if id == self.device_id => self.on_data(&payload)?,
                Some(Topic::DeviceOffer(id)) if id == self.device_id => {
                    self.offers.set_topic(topic);
                    self.offer_received(payload.to_vec(), engine).await?
                }
                Some(Topic::GroupOffer(g)) if self.groups.contains(&g) => {
                    self.offers.set_topic(topic);
                    self.offer_received(payload.to_vec(), engine).await?
                }
                Some(Topic::Command(id)) if id == self.device_id => {
                    self.on_command(&payload, engine).await?
                }
                _ => tracing::debug!("message on {topic} ignored"),
            },
            mqtt::Event::Dropped { topic, size } => self.report.discarded(
                &topic,
                &format!(
                    "a message of {} is larger than the {} this device accepts; dropped unread",
                    transfer::size_text(size),
                    transfer::size_text(u64::from(LIMITS.mqtt_packet_bytes))
                ),
            ),
            mqtt::Event::Other | mqtt::Event::SubAck => {}
        }
        Ok(())
    }

    async fn offer_received(&mut self, bytes: Vec<u8>, engine: Option<&mut Engine>) -> Result<()> {
        if self.shutting_down {
            return Ok(());
        }
        match engine {
            Some(e) if !self.transfer.has_ready() => self.handle_offer(&bytes, e, false).await,
            _ => {
                // Busy installing: the newest offer waits.
                self.offers.wait(bytes);
                Ok(())
            }
        }
    }

    async fn on_command(&mut self, payload: &[u8], engine: Option<&mut Engine>) -> Result<()> {
        let cmd: protocol::Command = match serde_json::from_slice(payload) {
            Ok(c) => c,
            Err(e) => {
                let topic = self.topics.command(&self.device_id);
                self.report
                    .discarded(&topic, &format!("not a command: {e}"));
                return Ok(());
            }
        };
        if cmd.v == protocol::VERSION && cmd.cmd == CommandKind::DryRun {
            return self.on_dry_run(payload, engine).await;
        }
        if cmd.v != protocol::VERSION || cmd.cmd != CommandKind::Retry {
            let topic = self.topics.command(&self.device_id);
            let why = format!("command {:?} (v{}) not understood", cmd.cmd, cmd.v);
            self.report.discarded(&topic, &why);
            return Ok(());
        }
        let Some(engine) = engine else {
            tracing::warn!("retry ignored: an install is in progress");
            return Ok(());
        };
        let Some(envelope) = self.offers.last() else {
            tracing::warn!("retry ignored: no offer was received yet");
            return Ok(());
        };
        let digest = offers::digest_hex(&envelope);
        tracing::info!("retry requested for the last offer");
        self.offers.forget(&digest)?;
        self.handle_offer(&envelope, engine, true).await
    }

    /// A `dry_run` command: the offer it carries is checked as
    /// [`handle_offer`](Self::handle_offer) would check it, and the answer
    /// goes out with the retained state. Nothing is recorded, fetched or
    /// written: no outcome, no decided offer, no download.
    async fn on_dry_run(&mut self, payload: &[u8], engine: Option<&mut Engine>) -> Result<()> {
        let req = match serde_json::from_slice::<protocol::DryRunRequest>(payload) {
            Ok(r) if crate::release::manifest::is_safe_name(&r.id) => r,
            Ok(_) => {
                let topic = self.topics.command(&self.device_id);
                self.report
                    .discarded(&topic, "dry_run: id must be 1-64 of A-Z a-z 0-9 . _ + -");
                return Ok(());
            }
            Err(e) => {
                let topic = self.topics.command(&self.device_id);
                self.report
                    .discarded(&topic, &format!("not a dry_run command: {e}"));
                return Ok(());
            }
        };
        let answer = match engine {
            None => report::would_not(
                &req.id,
                "busy",
                None,
                "an install is in progress; ask again once it has an outcome".into(),
                None,
            ),
            Some(engine) => self.dry_run_answer(&req, engine).await,
        };
        self.report.dry_run(&mut self.session, answer);
        Ok(())
    }

    async fn dry_run_answer(
        &mut self,
        req: &protocol::DryRunRequest,
        engine: &mut Engine,
    ) -> protocol::DryRunAnswer {
        let id = &req.id;
        let envelope = req.offer.as_bytes();
        let refuse = |m: Option<&Manifest>, e: &Error| {
            report::would_not(id, "would_refuse", m, e.to_string(), Some(e.exit_code()))
        };
        let ignore =
            |m: Option<&Manifest>, why: String| report::would_not(id, "would_ignore", m, why, None);
        let digest = offers::digest_hex(envelope);
        match intake::by_digest(&intake::DigestFacts {
            digest: &digest,
            empty: envelope.is_empty(),
            decided: self.offers.is_decided(&digest),
            active: self.transfer.fetching().map(|(d, _)| d),
            ready: self.transfer.ready_digest(),
        }) {
            intake::Seen::Cleared => return ignore(None, "the offer is empty".into()),
            intake::Seen::InProgress => {
                return ignore(
                    None,
                    "this offer is being fetched or installed already".into(),
                );
            }
            intake::Seen::DecidedBefore => {
                return ignore(None, "this signed offer was decided before".into());
            }
            intake::Seen::New => {}
        }
        let root = match Root::load(&self.trust_root) {
            Ok(r) => r,
            Err(e) => return refuse(None, &e),
        };
        let m = match bundle::verify_envelope(envelope, &root, "offered manifest") {
            Ok((m, _)) => m,
            Err(e) => return refuse(None, &e),
        };
        let fetching = self.transfer.fetching().map(|(_, f)| f.sequence);
        match intake::by_manifest(&intake::ManifestFacts {
            sequence: m.sequence,
            settled: engine
                .state()
                .settled(&m.release.version, m.sequence)
                .map(|o| o.outcome),
            retry: false,
            fetching,
        }) {
            intake::Verdict::Settled(kind) => {
                return ignore(
                    Some(&m),
                    format!("this release and sequence was {} before", kind.name()),
                );
            }
            intake::Verdict::Older { fetching } => {
                return ignore(
                    Some(&m),
                    format!("an offer of sequence {fetching} is being fetched"),
                );
            }
            intake::Verdict::Take { .. } => {}
        }
        match engine.dry_run_offer(&m, false).await {
            Ok(d) => report::would_install(id, &d),
            Err(e) => refuse(Some(&m), &e),
        }
    }

    fn on_disconnect(&mut self, why: ConnError) {
        self.session.on_disconnect(why);
        self.transfer.on_disconnect();
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
                self.report.outcome(&mut self.session, &o, Some(m))?;
                // An install undone because beamup was cut off may run again.
                if !o.interrupted {
                    self.offers.decide(digest)?;
                }
            }
            Err(e @ Error::Incomplete { .. }) => {
                // The release root changed between the last check and the
                // install: the offer is taken up again, and its download
                // resumes and fetches every chunk it lacks, needed or not,
                // so this happens at most once per offer (unless a newer
                // offer came in meanwhile: that one goes first).
                tracing::warn!("{e}; fetching the rest of the tarball");
                self.offers.fetch_everything(digest);
                if !self.offers.is_waiting()
                    && let Some(envelope) = self.transfer.existing_offer()
                {
                    self.offers.wait(envelope);
                }
                self.refresh_node(engine).await;
                return Ok(());
            }
            Err(e) => {
                // The engine recorded the rejection in its state already.
                self.rejected(None, Some(m), &e)?;
                if !is_passing(&e) {
                    self.offers.decide(digest)?;
                }
            }
        }
        self.transfer.discard()?;
        crate::memory::release_free_memory();
        self.refresh_node(engine).await;
        Ok(())
    }

    async fn refresh_node(&mut self, engine: &mut Engine) {
        self.node_polled_at = Instant::now();
        match tokio::time::timeout(Duration::from_secs(5), engine.running()).await {
            Ok(Ok(r)) => self.report.node_seen(r.current, r.permanent),
            Ok(Err(e)) => {
                tracing::warn!("{e}");
                self.report.node_unreachable();
            }
            Err(_) => tracing::warn!("the node did not answer within 5 s"),
        }
    }

    async fn on_tick(&mut self, engine: Option<&mut Engine>) -> Result<()> {
        self.transfer.maybe_checkpoint()?;
        self.after_progress()?;
        self.report.publish_status(&mut self.session, false);
        self.report.flush(&mut self.session);
        if let Some(e) = engine
            && !self.transfer.is_fetching()
            && self.node_polled_at.elapsed()
                >= if self.report.node_answered() {
                    NODE_POLL
                } else {
                    NODE_POLL_UNANSWERED
                }
        {
            self.refresh_node(e).await;
        }
        Ok(())
    }
}
