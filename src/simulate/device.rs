//! One simulated device: the agent's loop without a node. The session,
//! the reports, the transfer and the offer decisions are the agent's own
//! (`device::{session, report, transfer, intake}`); what stands in for
//! the engine is `Install`, which walks the engine's steps for a hot
//! upgrade and ends in the outcome the device's fate says.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use super::{Fate, Options, OutcomeRecord, Record};
use crate::bundle;
use crate::config::MqttConfig;
use crate::device::intake;
use crate::device::offers;
use crate::device::report::Reporter;
use crate::device::session::{MqttSession, Tracked};
use crate::device::transfer::{Arrival, Transfer};
use crate::engine::install::Step;
use crate::engine::state::{Outcome, OutcomeKind};
use crate::error::{Error, Result};
use crate::release::manifest::{self, Manifest};
use crate::release::policy;
use crate::transport::mqtt::{self, Broker};
use crate::transport::outbox::Outbox;
use crate::transport::protocol::{self, CommandKind, Online, PhaseName, Topic, Topics};
use crate::trust::root::Root;

/// As the agent's: fast while something moves, slow while idle.
const TICK: Duration = Duration::from_millis(100);
const IDLE_TICK: Duration = Duration::from_secs(2);
/// How long a restarting device stays away.
const RESTART_PAUSE: Duration = Duration::from_millis(500);

pub(super) struct Setup {
    pub(super) index: usize,
    pub(super) fate: Fate,
    pub(super) id: String,
    pub(super) opts: std::sync::Arc<Options>,
    pub(super) topics: Rc<Topics>,
    pub(super) broker: Rc<Broker>,
    pub(super) root: Rc<Root>,
    pub(super) records: super::Records,
}

/// The simulated install: the engine's steps, one every `every`.
struct Install {
    steps: VecDeque<(Step, String)>,
    next_at: Instant,
    every: Duration,
    manifest: Manifest,
    digest: String,
    /// `None`: the device goes silent once the steps are done.
    outcome: Option<Outcome>,
}

async fn poll(
    session: &mut Option<MqttSession>,
) -> std::result::Result<mqtt::Event, mqtt::ConnError> {
    session
        .as_mut()
        .expect("polled only with a session")
        .poll()
        .await
}

pub(super) struct SimDevice {
    s: Setup,
    mqtt_config: MqttConfig,
    mqtt_session: mqtt::Session,
    dir: PathBuf,
    session: Option<MqttSession>,
    report: Reporter,
    transfer: Transfer,
    running: String,
    permanent: String,
    last_sequence: Option<u64>,
    /// Signed offers decided (by digest), as `agent.json` keeps them.
    decided: HashSet<String>,
    /// Releases decided (version, sequence), as `state.json` keeps them.
    settled: HashMap<(String, u64), Outcome>,
    last_offer: Option<Vec<u8>>,
    /// An offer that came while installing: taken up after the outcome.
    waiting: Option<Vec<u8>>,
    offer_topic: String,
    install: Option<Install>,
    /// A restart in progress: reconnect at this time.
    back_at: Option<Instant>,
    restarted: bool,
    /// Gone for good (the offline fate).
    gone: bool,
}

impl SimDevice {
    pub(super) fn new(s: Setup) -> Result<SimDevice> {
        let dir = s.opts.state_dir.join(&s.id);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, "create", e))?;
        let mqtt_config = MqttConfig {
            url: s.broker.url.clone(),
            device_id: s.id.clone(),
            fleet: s.opts.fleet.clone(),
            groups: s.opts.groups.clone(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            username: None,
            password_file: None,
            prefix: s.opts.prefix.clone(),
            version: None,
        };
        // The agent's session: its client id, persistent, its last will.
        let will = serde_json::to_vec(&Online {
            v: protocol::VERSION,
            online: false,
        })
        .expect("json");
        let mqtt_session = mqtt::Session {
            client_id: format!("beamup-{}-{}", s.opts.fleet, s.id),
            persistent: true,
            keep_alive: Duration::from_secs(30),
            will: Some((s.topics.online(&s.id), will)),
        };
        let report = Reporter::new(
            Outbox::open(&dir.join("outbox"))?,
            &s.topics,
            &mqtt_config,
            None,
        );
        let transfer =
            Transfer::new(dir.join("download"), s.topics.data(&s.id).len()).without_memory_trim();
        let offer_topic = s.topics.device_offer(&s.id);
        let running = s.opts.running.clone();
        let mut d = SimDevice {
            session: Some(MqttSession::direct(&s.broker, &mqtt_session)?),
            s,
            mqtt_config,
            mqtt_session,
            dir,
            report,
            transfer,
            permanent: running.clone(),
            running,
            last_sequence: None,
            decided: HashSet::new(),
            settled: HashMap::new(),
            last_offer: None,
            waiting: None,
            offer_topic,
            install: None,
            back_at: None,
            restarted: false,
            gone: false,
        };
        d.report.set_idle();
        d.report.node_seen(d.running.clone(), d.permanent.clone());
        Ok(d)
    }

    fn record(&self, f: impl FnOnce(&mut Record)) {
        f(&mut super::lock(&self.s.records)[self.s.index]);
    }

    fn busy(&self) -> bool {
        self.transfer.is_busy()
            || self.install.is_some()
            || self.waiting.is_some()
            || self
                .session
                .as_ref()
                .is_some_and(|s| s.is_connected() && self.report.has_unsent())
    }

    pub(super) async fn run(mut self, mut stop: tokio::sync::watch::Receiver<bool>) {
        if let Err(e) = self.serve(&mut stop).await {
            tracing::error!("simulated device {} stopped: {e}", self.s.id);
        }
    }

    async fn serve(&mut self, stop: &mut tokio::sync::watch::Receiver<bool>) -> Result<()> {
        let mut last_tick = Instant::now();
        loop {
            if *stop.borrow() {
                return Ok(());
            }
            let next_tick = last_tick + if self.busy() { TICK } else { IDLE_TICK };
            // An install's next step is due on time, not at the next tick:
            // the install takes the time it was given, as a node's would.
            let wake = self
                .install
                .as_ref()
                .filter(|i| !i.steps.is_empty() || i.outcome.is_some())
                .map_or(next_tick, |i| i.next_at.min(next_tick));
            let reconnect_at = self.session.as_ref().and_then(|s| s.reconnect_at());
            let can_poll = self.session.is_some() && reconnect_at.is_none();
            let wake_at = reconnect_at.unwrap_or_else(Instant::now);
            tokio::select! {
                ev = poll(&mut self.session), if can_poll => match ev {
                    Ok(ev) => self.on_mqtt(ev)?,
                    Err(why) => {
                        if let Some(s) = self.session.as_mut() {
                            s.on_disconnect(why);
                        }
                        self.transfer.on_disconnect();
                    }
                },
                _ = tokio::time::sleep_until(wake_at.into()), if reconnect_at.is_some() => {
                    if let Some(s) = self.session.as_mut() {
                        s.reconnect_now();
                    }
                }
                _ = tokio::time::sleep_until(wake.into()) => {
                    if Instant::now() >= next_tick {
                        last_tick = Instant::now();
                    }
                    self.on_tick()?;
                }
                _ = stop.changed() => {}
            }
        }
    }

    fn on_tick(&mut self) -> Result<()> {
        if self.gone {
            return Ok(());
        }
        if let Some(at) = self.back_at
            && Instant::now() >= at
        {
            self.come_back()?;
        }
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        self.transfer.maybe_checkpoint()?;
        self.report.publish_status(session, false);
        self.report.flush(session);
        self.advance_install()?;
        self.after_progress()?;
        if self.install.is_none()
            && !self.transfer.is_busy()
            && let Some(envelope) = self.waiting.take()
        {
            self.handle_offer(&envelope, false)?;
        }
        Ok(())
    }

    fn on_mqtt(&mut self, ev: mqtt::Event) -> Result<()> {
        let session = self.session.as_mut().expect("polled");
        match ev {
            mqtt::Event::Connected {
                session_present,
                max_packet,
            } => {
                session.on_connected(session_present, max_packet);
                session.subscribe(
                    &self
                        .s
                        .topics
                        .device_subscriptions(&self.s.id, &self.s.opts.groups),
                );
                self.report.on_connected(session, session_present);
                self.transfer.on_connected(max_packet);
                self.record(|r| r.connections += 1);
                self.after_progress()?;
            }
            mqtt::Event::PubAck(pkid) => match session.acked(pkid) {
                Some(Tracked::Outbox(id)) => self.report.acked(session, id)?,
                Some(Tracked::Status) | None => {}
            },
            mqtt::Event::Message { topic, payload, .. } => match self.s.topics.parse(&topic) {
                Some(Topic::Data(id)) if id == self.s.id => self.on_data(&payload)?,
                Some(Topic::DeviceOffer(id)) if id == self.s.id => {
                    self.offer_topic = topic;
                    self.offer_received(payload.to_vec())?
                }
                Some(Topic::GroupOffer(g)) if self.s.opts.groups.contains(&g) => {
                    self.offer_topic = topic;
                    self.offer_received(payload.to_vec())?
                }
                Some(Topic::Command(id)) if id == self.s.id => self.on_command(&payload)?,
                _ => {}
            },
            mqtt::Event::Dropped { topic, size } => self.report.discarded(
                &topic,
                &format!("a message of {size} bytes is larger than this device accepts"),
            ),
            mqtt::Event::Other | mqtt::Event::SubAck => {}
        }
        Ok(())
    }

    fn offer_received(&mut self, bytes: Vec<u8>) -> Result<()> {
        if self.install.is_some() || self.transfer.has_ready() {
            self.waiting = Some(bytes);
            return Ok(());
        }
        self.handle_offer(&bytes, false)
    }

    /// The agent's `handle_offer`, with the node's checks answered by the
    /// simulated release.
    fn handle_offer(&mut self, envelope: &[u8], retry: bool) -> Result<()> {
        let digest = offers::digest_hex(envelope);
        let fetching = self.transfer.fetching();
        let seen = intake::by_digest(&intake::DigestFacts {
            digest: &digest,
            empty: envelope.is_empty(),
            decided: self.decided.contains(&digest),
            active: fetching.map(|(d, _)| d),
            ready: self.transfer.ready_digest(),
        });
        let fetching_other = fetching.is_none_or(|(d, _)| d != digest);
        let resumed_offer = self.transfer.existing_offer().as_deref() == Some(envelope);
        match seen {
            intake::Seen::Cleared | intake::Seen::InProgress => return Ok(()),
            intake::Seen::DecidedBefore => {
                if fetching_other && resumed_offer {
                    self.transfer.discard()?;
                }
                return Ok(());
            }
            intake::Seen::New => {}
        }
        let m = match bundle::verify_envelope(envelope, &self.s.root, "offered manifest") {
            Ok((m, _)) => m,
            Err(e) => {
                let topic = self.offer_topic.clone();
                self.report
                    .discarded(&topic, &format!("offer refused: {e}"));
                return Ok(());
            }
        };
        let fetching = self.transfer.fetching().map(|(_, m)| m.sequence);
        let settled = self
            .settled
            .get(&(m.release.version.clone(), m.sequence))
            .map(|o| o.outcome);
        match intake::by_manifest(&intake::ManifestFacts {
            sequence: m.sequence,
            settled,
            retry,
            fetching,
        }) {
            intake::Verdict::Settled(_) => {
                if fetching_other {
                    let _ = self.transfer.discard();
                }
                self.decided.insert(digest);
                return Ok(());
            }
            intake::Verdict::Older { .. } => return Ok(()),
            intake::Verdict::Take { .. } => {}
        }
        self.report
            .set_phase(PhaseName::Verifying, Some(&m), "checking the offer");
        if let Err(e) = self.check_offer(&m, retry) {
            self.record(|r| r.rejected.push(e.to_string()));
            let o = Outcome::rejected(Some(&m), &self.s.opts.release, e.to_string());
            self.outcome(&o, &m)?;
            self.decided.insert(digest);
            return Ok(());
        }
        if self.s.fate == Fate::Offline {
            // Its network goes away as it takes the offer up: no
            // DISCONNECT, so the broker publishes its last will.
            self.session = None;
            self.gone = true;
            self.record(|r| r.offers += 1);
            return Ok(());
        }
        // A device with a node plans the chunks its unpack reads; the
        // simulated one has no release root, so it fetches them all.
        let need = intake::chunks_to_fetch(m.tarball.chunks.len(), None, true);
        self.transfer.stop();
        self.last_offer = Some(envelope.to_vec());
        let max_packet = self.session.as_ref().and_then(|s| s.max_packet());
        let resumed = self
            .transfer
            .start(envelope, digest, m.clone(), need, retry, max_packet)?;
        if !resumed_offer || resumed == 0 {
            self.record(|r| {
                r.offers += 1;
                r.fetch_started_ms = Some(super::now_ms());
            });
        }
        self.report.set_phase(PhaseName::Downloading, Some(&m), "");
        self.report.set_percent(resumed);
        if let Some(session) = self.session.as_mut() {
            self.report
                .progress(session, PhaseName::Downloading, &m, Some(resumed))?;
        }
        self.after_progress()
    }

    /// What `Engine::check_offer` asks, of the simulated node.
    fn check_offer(&self, m: &Manifest, retry: bool) -> Result<()> {
        if m.release.name != self.s.opts.release {
            return Err(Error::Refused {
                reason: format!(
                    "the bundle holds release {:?}, this device runs {:?}",
                    m.release.name, self.s.opts.release
                ),
            });
        }
        policy::check(
            m,
            SystemTime::now(),
            &policy::DeviceFacts {
                installed_version: Some(self.permanent.clone()),
                last_sequence: self.last_sequence,
                identity: Some(policy::Identity {
                    fleet: Some(self.s.opts.fleet.clone()),
                    device: Some(self.s.id.clone()),
                    groups: self.s.opts.groups.clone(),
                }),
            },
        )?;
        if !retry
            && let Some(o) = self
                .settled
                .get(&(m.release.version.clone(), m.sequence))
                .filter(|o| o.outcome == OutcomeKind::RolledBack)
        {
            return Err(Error::Refused {
                reason: format!(
                    "{} {} (sequence {}) was rolled back at {}; it is not retried automatically",
                    m.release.name, m.release.version, m.sequence, o.at
                ),
            });
        }
        Ok(())
    }

    fn after_progress(&mut self) -> Result<()> {
        if let Some(ready) = self.transfer.take_finished()? {
            self.record(|r| r.fetch_done_ms = Some(super::now_ms()));
            self.report.set_phase(
                PhaseName::Verifying,
                Some(&ready.manifest),
                "download complete",
            );
            self.start_install(ready.manifest, ready.digest);
            return Ok(());
        }
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        if !session.is_connected() {
            return Ok(());
        }
        let topic = self.s.topics.request(&self.s.id);
        let reqs = self.transfer.requests(Instant::now());
        let n = reqs.len() as u64;
        for req in reqs {
            session.publish_once(&topic, serde_json::to_vec(&req).expect("json"));
        }
        if n > 0 {
            self.record(|r| r.requests += n);
        }
        Ok(())
    }

    fn on_data(&mut self, payload: &bytes::Bytes) -> Result<()> {
        match self.transfer.on_data(payload)? {
            Arrival::Ignored => Ok(()),
            Arrival::Piece { percent, milestone } => {
                if let Some(pct) = percent {
                    self.record(|r| r.chunks_verified += 1);
                    self.report.set_percent(pct);
                    if pct >= 50 && self.s.fate == Fate::Restart && !self.restarted {
                        return self.restart();
                    }
                }
                if let Some((pct, m)) = milestone
                    && let Some(session) = self.session.as_mut()
                {
                    self.report
                        .progress(session, PhaseName::Downloading, &m, Some(pct))?;
                }
                self.after_progress()
            }
            Arrival::Failed {
                digest,
                manifest,
                error,
            } => {
                let o = Outcome::rejected(Some(&manifest), &self.s.opts.release, error.to_string());
                self.outcome(&o, &manifest)?;
                self.decided.insert(digest);
                Ok(())
            }
        }
    }

    /// Like an agent killed and started again: the connection is cut (the
    /// broker publishes the last will), and after a pause everything is
    /// opened again from disk: the outbox, and the download, which resumes
    /// from its bitmap.
    fn restart(&mut self) -> Result<()> {
        self.restarted = true;
        self.record(|r| r.restarts += 1);
        self.transfer.checkpoint()?;
        self.session = None;
        self.back_at = Some(Instant::now() + RESTART_PAUSE);
        Ok(())
    }

    fn come_back(&mut self) -> Result<()> {
        self.back_at = None;
        let last = self.report_last_outcome();
        self.report = Reporter::new(
            Outbox::open(&self.dir.join("outbox"))?,
            &self.s.topics,
            &self.mqtt_config,
            last.as_ref(),
        );
        self.report.set_idle();
        self.report
            .node_seen(self.running.clone(), self.permanent.clone());
        self.transfer = Transfer::new(
            self.dir.join("download"),
            self.s.topics.data(&self.s.id).len(),
        );
        self.session = Some(MqttSession::direct(&self.s.broker, &self.mqtt_session)?);
        if let Some(envelope) = self.transfer.existing_offer() {
            self.handle_offer(&envelope, false)?;
        }
        Ok(())
    }

    fn report_last_outcome(&self) -> Option<Outcome> {
        self.settled
            .values()
            .max_by(|a, b| a.at.cmp(&b.at))
            .cloned()
    }

    /// The engine's steps of a hot upgrade, spread over the install time.
    fn start_install(&mut self, m: Manifest, digest: String) {
        let name_version = format!("{} {}", m.release.name, m.release.version);
        let mut steps: VecDeque<(Step, String)> = VecDeque::from([
            (Step::Verifying, "download".to_string()),
            (Step::Unpacking, name_version),
            (
                Step::Installing,
                "hot upgrade through the relup".to_string(),
            ),
            (Step::Soaking, "simulated health check".to_string()),
        ]);
        let outcome = |kind: OutcomeKind, reason: Option<String>| Outcome {
            outcome: kind,
            release: m.release.name.clone(),
            version: m.release.version.clone(),
            from_version: Some(self.running.clone()),
            sequence: Some(m.sequence),
            strategy: None,
            reason,
            at: manifest::format_time(SystemTime::now()),
            interrupted: false,
            // No engine ran: no step times; a simulated rollback fails
            // its health check.
            steps: vec![],
            failed_step: (kind == OutcomeKind::RolledBack).then(|| "soaking".to_string()),
        };
        let outcome = match self.s.fate {
            Fate::Commit | Fate::Restart => {
                steps.push_back((Step::Committing, m.release.version.clone()));
                Some(outcome(OutcomeKind::Committed, None))
            }
            Fate::Rollback => {
                let reason = "health check: simulated failure (the device's fate)".to_string();
                steps.push_back((Step::RollingBack, reason.clone()));
                Some(outcome(OutcomeKind::RolledBack, Some(reason)))
            }
            Fate::Silent | Fate::Offline => None,
        };
        if let Some(o) = &outcome {
            steps.push_back((
                Step::Finished(o.outcome),
                o.reason.clone().unwrap_or_default(),
            ));
        }
        let every = self.s.opts.install_time / steps.len().max(1) as u32;
        self.install = Some(Install {
            steps,
            next_at: Instant::now(),
            every,
            manifest: m,
            digest,
            outcome,
        });
    }

    fn advance_install(&mut self) -> Result<()> {
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        let Some(inst) = self.install.as_mut() else {
            return Ok(());
        };
        while Instant::now() >= inst.next_at {
            let Some((step, detail)) = inst.steps.pop_front() else {
                break;
            };
            self.report.on_progress(session, step, &detail)?;
            inst.next_at += inst.every;
        }
        // Silent: stuck soaking, never an outcome; the install stays, so
        // the device takes no other offer either.
        if !inst.steps.is_empty() || Instant::now() < inst.next_at || inst.outcome.is_none() {
            return Ok(());
        }
        let inst = self.install.take().expect("installing");
        let mut o = inst.outcome.expect("an outcome");
        o.at = manifest::format_time(SystemTime::now());
        if o.outcome == OutcomeKind::Committed {
            self.running = o.version.clone();
            self.permanent = o.version.clone();
            self.last_sequence = o.sequence.max(self.last_sequence);
        }
        self.outcome(&o, &inst.manifest)?;
        self.decided.insert(inst.digest);
        self.transfer.discard()?;
        self.report
            .node_seen(self.running.clone(), self.permanent.clone());
        Ok(())
    }

    fn outcome(&mut self, o: &Outcome, m: &Manifest) -> Result<()> {
        self.record(|r| {
            r.outcomes.push(OutcomeRecord {
                outcome: o.outcome.wire_name().into(),
                version: o.version.clone(),
                sequence: o.sequence,
                reason: o.reason.clone(),
            })
        });
        if o.outcome != OutcomeKind::Rejected {
            self.settled.insert(
                (o.version.clone(), o.sequence.unwrap_or(m.sequence)),
                o.clone(),
            );
        }
        match self.session.as_mut() {
            Some(session) => self.report.outcome(session, o, Some(m)),
            None => Ok(()),
        }
    }

    fn on_command(&mut self, payload: &[u8]) -> Result<()> {
        let topic = self.s.topics.command(&self.s.id);
        let cmd: protocol::Command = match serde_json::from_slice(payload) {
            Ok(c) => c,
            Err(e) => {
                self.report
                    .discarded(&topic, &format!("not a command: {e}"));
                return Ok(());
            }
        };
        if cmd.v != protocol::VERSION || cmd.cmd != CommandKind::Retry {
            self.report.discarded(
                &topic,
                &format!("command {:?} (v{}) not understood", cmd.cmd, cmd.v),
            );
            return Ok(());
        }
        if self.install.is_some() {
            return Ok(());
        }
        let Some(envelope) = self.last_offer.clone() else {
            return Ok(());
        };
        self.decided.remove(&offers::digest_hex(&envelope));
        self.handle_offer(&envelope, true)
    }
}
