//! What the agent tells the fleet: the retained device state (phase,
//! running and permanent release, last outcome, discarded input), the
//! online flag, and events, which go through the durable outbox: written
//! before they are sent, removed only after the PUBACK of exactly that
//! publish.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use crate::config::MqttConfig;
use crate::device::session::{MqttSession, Tracked};
use crate::engine::install::{DryRun, Step};
use crate::engine::state::{Outcome, OutcomeKind};
use crate::error::Result;
use crate::release::manifest::{self, Manifest};
use crate::transport::outbox::{Entry, Outbox};
use crate::transport::protocol::{
    self, DeviceStatus, EventKind, Online, OutcomeReport, PhaseName, PhaseReport, Topics,
};

/// The retained state is published at most this often while it changes,
/// unless asked for at once.
const STATUS_MIN_INTERVAL: Duration = Duration::from_millis(250);

pub(crate) struct Reporter {
    outbox: Outbox,
    /// Outbox entries handed to the connection and not acknowledged yet.
    sent: HashSet<u64>,
    status: DeviceStatus,
    status_dirty: bool,
    status_sent_at: Option<Instant>,
    last_event_id: u64,
    state_topic: String,
    online_topic: String,
    events_topic: String,
}

fn now_text() -> String {
    manifest::format_time(SystemTime::now())
}

/// The phase a device reports for an engine step.
pub(crate) fn phase_of(step: Step) -> PhaseName {
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

fn outcome_phase(k: OutcomeKind) -> PhaseName {
    match k {
        OutcomeKind::Committed => PhaseName::Committed,
        OutcomeKind::RolledBack => PhaseName::RolledBack,
        OutcomeKind::Rejected => PhaseName::Rejected,
        OutcomeKind::NeedsAttention => PhaseName::NeedsAttention,
    }
}

fn outcome_report(o: &Outcome) -> OutcomeReport {
    OutcomeReport {
        outcome: o.outcome.wire_name().into(),
        release: o.release.clone(),
        version: o.version.clone(),
        sequence: o.sequence,
        reason: o.reason.clone(),
        at: o.at.clone(),
        steps: step_reports(o),
        failed_step: o.failed_step.clone(),
    }
}

fn step_reports(o: &Outcome) -> Vec<protocol::StepReport> {
    o.steps
        .iter()
        .map(|t| protocol::StepReport {
            step: t.step.clone(),
            ms: t.ms,
        })
        .collect()
}

/// A dry run's answer when the install would go ahead.
pub(crate) fn would_install(id: &str, d: &DryRun) -> protocol::DryRunAnswer {
    protocol::DryRunAnswer {
        id: id.to_string(),
        verdict: "would_install".into(),
        release: Some(d.release.clone()),
        version: Some(d.version.clone()),
        sequence: Some(d.sequence),
        strategy: Some(d.strategy.into()),
        why: Some(d.why.clone()),
        chunks: Some(d.chunks_read as u64),
        chunks_total: Some(d.chunks_total as u64),
        bytes: Some(d.bytes_read),
        space_needed: Some(d.space_needed),
        space_free: Some(d.space_free),
        creates: d.creates.clone(),
        removes: d.prunes_after_commit.clone(),
        at: now_text(),
        ..Default::default()
    }
}

/// A dry run's answer when the offer would not be installed: `verdict`
/// says how (would_refuse, would_ignore, busy), `reason` why.
pub(crate) fn would_not(
    id: &str,
    verdict: &str,
    m: Option<&Manifest>,
    reason: String,
    code: Option<u8>,
) -> protocol::DryRunAnswer {
    protocol::DryRunAnswer {
        id: id.to_string(),
        verdict: verdict.into(),
        release: m.map(|m| m.release.name.clone()),
        version: m.map(|m| m.release.version.clone()),
        sequence: m.map(|m| m.sequence),
        reason: Some(reason),
        code,
        at: now_text(),
        ..Default::default()
    }
}

impl Reporter {
    /// Starts from the engine's last outcome, idle, with the state to be
    /// published on the first connection.
    pub(crate) fn new(
        outbox: Outbox,
        topics: &Topics,
        mq: &MqttConfig,
        last_outcome: Option<&Outcome>,
    ) -> Reporter {
        Reporter {
            outbox,
            sent: HashSet::new(),
            status: DeviceStatus {
                v: protocol::VERSION,
                device: mq.device_id.clone(),
                fleet: mq.fleet.clone(),
                groups: mq.groups.clone(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
                running: None,
                permanent: None,
                phase: PhaseReport::idle(),
                last_outcome: last_outcome.map(outcome_report),
                discarded: None,
                dry_run: None,
                updated_at: now_text(),
            },
            status_dirty: true,
            status_sent_at: None,
            last_event_id: 0,
            state_topic: topics.state(&mq.device_id),
            online_topic: topics.online(&mq.device_id),
            events_topic: topics.events(&mq.device_id),
        }
    }

    /// Is there something to send (see the agent's tick)?
    pub(crate) fn has_unsent(&self) -> bool {
        self.status_dirty || self.outbox.iter().any(|(id, _)| !self.sent.contains(&id))
    }

    /// A new connection: the state goes out again (and, without a session
    /// on the broker, every outbox entry not acknowledged).
    pub(crate) fn on_connected(&mut self, session: &mut MqttSession, session_present: bool) {
        if !session_present {
            self.sent.clear();
        }
        self.announce(session, true);
        self.status_dirty = true;
        self.publish_status(session, true);
        self.flush(session);
    }

    /// The online flag (retained; the will says `false` when the agent
    /// vanishes).
    pub(crate) fn announce(&mut self, session: &mut MqttSession, online: bool) {
        session.publish_tracked(&self.online_topic, true, Tracked::Status, || {
            serde_json::to_vec(&Online {
                v: protocol::VERSION,
                online,
            })
            .expect("json")
        });
    }

    /// The broker acknowledged outbox entry `id`: it is removed, and the
    /// next one can go.
    pub(crate) fn acked(&mut self, session: &mut MqttSession, id: u64) -> Result<()> {
        self.sent.remove(&id);
        self.outbox.remove(id)?;
        self.flush(session);
        Ok(())
    }

    /// Hands outbox entries to the connection, oldest first, a bounded
    /// number in flight.
    pub(crate) fn flush(&mut self, session: &mut MqttSession) {
        if !session.is_connected() {
            return;
        }
        let todo: Vec<(u64, Entry)> = self
            .outbox
            .iter()
            .filter(|(id, _)| !self.sent.contains(id))
            .map(|(id, e)| (id, e.clone()))
            .collect();
        for (id, e) in todo {
            if !session.publish_tracked(&e.topic, e.retain, Tracked::Outbox(id), || {
                e.payload.into_bytes()
            }) {
                break;
            }
            self.sent.insert(id);
        }
    }

    /// Publishes the retained state when it changed (rate-limited unless
    /// `now`).
    pub(crate) fn publish_status(&mut self, session: &mut MqttSession, now: bool) {
        if !self.status_dirty || !session.is_connected() {
            return;
        }
        if !now
            && self
                .status_sent_at
                .is_some_and(|t| t.elapsed() < STATUS_MIN_INTERVAL)
        {
            return;
        }
        if !session.has_room() {
            return;
        }
        self.status.updated_at = now_text();
        let payload = serde_json::to_vec(&self.status).expect("json");
        session.publish_tracked(&self.state_topic, true, Tracked::Status, || payload);
        self.status_dirty = false;
        self.status_sent_at = Some(Instant::now());
    }

    pub(crate) fn set_idle(&mut self) {
        self.status.phase = PhaseReport::idle();
    }

    /// The phase of an offer (or none) the agent is working on.
    pub(crate) fn set_phase(&mut self, name: PhaseName, m: Option<&Manifest>, detail: &str) {
        self.status.phase = PhaseReport {
            name,
            percent: None,
            release: m.map(|m| m.release.name.clone()),
            version: m.map(|m| m.release.version.clone()),
            detail: detail.to_string(),
        };
        self.status_dirty = true;
    }

    /// How far the download is.
    pub(crate) fn set_percent(&mut self, percent: u8) {
        if self.status.phase.percent != Some(percent) {
            self.status.phase.percent = Some(percent);
            self.status_dirty = true;
        }
    }

    /// What the node said it runs and boots.
    pub(crate) fn node_seen(&mut self, current: String, permanent: String) {
        let changed = self.status.running.as_deref() != Some(current.as_str())
            || self.status.permanent.as_deref() != Some(permanent.as_str());
        if changed {
            self.status.running = Some(current);
            self.status.permanent = Some(permanent);
            self.status_dirty = true;
        }
    }

    /// Did the node answer the last time it was asked?
    pub(crate) fn node_answered(&self) -> bool {
        self.status.running.is_some()
    }

    /// The node did not answer.
    pub(crate) fn node_unreachable(&mut self) {
        if self.status.running.is_some() {
            self.status.running = None;
            self.status_dirty = true;
        }
    }

    /// A step the engine reports while it installs: the phase, and an
    /// event for every step but the outcome (reported once the engine
    /// returns it, see `outcome`).
    pub(crate) fn on_progress(
        &mut self,
        session: &mut MqttSession,
        step: Step,
        detail: &str,
    ) -> Result<()> {
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
        if !matches!(
            phase,
            PhaseName::Committed
                | PhaseName::RolledBack
                | PhaseName::Rejected
                | PhaseName::NeedsAttention
        ) {
            self.event(
                session,
                EventKind::Progress,
                phase,
                keep.0,
                keep.1,
                None,
                None,
                (!detail.is_empty()).then(|| detail.to_string()),
                vec![],
            )?;
        }
        Ok(())
    }

    /// A progress event about the release of `m`.
    pub(crate) fn progress(
        &mut self,
        session: &mut MqttSession,
        phase: PhaseName,
        m: &Manifest,
        percent: Option<u8>,
    ) -> Result<()> {
        self.event(
            session,
            EventKind::Progress,
            phase,
            Some(m.release.name.clone()),
            Some(m.release.version.clone()),
            Some(m.sequence),
            percent,
            None,
            vec![],
        )
    }

    /// An outcome of the engine: the retained state's last outcome and
    /// phase, and an event.
    pub(crate) fn outcome(
        &mut self,
        session: &mut MqttSession,
        o: &Outcome,
        m: Option<&Manifest>,
    ) -> Result<()> {
        self.status.last_outcome = Some(outcome_report(o));
        self.status.phase = PhaseReport {
            name: outcome_phase(o.outcome),
            percent: None,
            release: Some(o.release.clone()),
            version: Some(o.version.clone()),
            detail: o.reason.clone().unwrap_or_default(),
        };
        self.status_dirty = true;
        self.event(
            session,
            EventKind::Outcome,
            outcome_phase(o.outcome),
            Some(o.release.clone()),
            Some(o.version.clone()),
            o.sequence.or(m.map(|m| m.sequence)),
            None,
            o.reason.clone(),
            step_reports(o),
        )
    }

    /// Counts a message dropped before anything in it was believed, in the
    /// retained state (its `discarded` field, not `last_outcome`). No event
    /// per message: a flood of junk must not fill the outbox.
    /// The answer to a dry-run command goes out at once, with the state.
    pub(crate) fn dry_run(&mut self, session: &mut MqttSession, answer: protocol::DryRunAnswer) {
        tracing::info!(
            "dry run {}: {} {}",
            answer.id,
            answer.verdict,
            answer
                .reason
                .as_deref()
                .or(answer.why.as_deref())
                .unwrap_or("")
        );
        self.status.dry_run = Some(answer);
        self.status_dirty = true;
        self.publish_status(session, true);
    }

    pub(crate) fn discarded(&mut self, topic: &str, reason: &str) {
        // Reasons quote what arrived (serde names the unknown variant): one
        // bounded line, in the log and in the retained state alike.
        let reason = crate::logging::untrusted(reason, protocol::MAX_REASON);
        tracing::warn!("message on {topic} discarded: {reason}");
        let count = self.status.discarded.as_ref().map_or(0, |d| d.count) + 1;
        self.status.discarded = Some(protocol::DiscardedReport {
            count,
            topic: topic.to_string(),
            reason,
            at: now_text(),
        });
        self.status_dirty = true;
    }

    /// Event ids grow with the clock and never repeat within a run.
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
        session: &mut MqttSession,
        kind: EventKind,
        phase: PhaseName,
        release: Option<String>,
        version: Option<String>,
        sequence: Option<u64>,
        percent: Option<u8>,
        reason: Option<String>,
        steps: Vec<protocol::StepReport>,
    ) -> Result<()> {
        let e = protocol::Event {
            v: protocol::VERSION,
            id: self.next_event_id(),
            device: self.status.device.clone(),
            kind,
            phase,
            release,
            version,
            sequence,
            percent,
            reason,
            at: now_text(),
            steps,
        };
        self.outbox.push(Entry {
            topic: self.events_topic.clone(),
            payload: serde_json::to_string(&e).expect("json"),
            retain: false,
            keep: kind == EventKind::Outcome,
        })?;
        self.flush(session);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
