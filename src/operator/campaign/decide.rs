//! The campaign's decisions, as pure functions of its state, the fleet's
//! facts and the time: [`step`] changes the state in memory and returns
//! the effects for the controller to carry out (after it saved the
//! state). Nothing here does I/O, so every rule is unit-tested, and a
//! controller started again after kill -9 decides the same from the same
//! facts.
//!
//! The rules, in the order `step` applies them:
//!
//! 1. Observe each device with an open track (offered, updating, retry
//!    due, withdrawn): its retained state and the events applied so far
//!    say whether it took the offer up, and its outcome for exactly this
//!    release and sequence.
//! 2. Time out devices without an outcome `device_timeout` after the
//!    offer (or the retry).
//! 3. Judge the current wave's failure limits (devices, not attempts);
//!    a threshold pauses the campaign or, if the plan says so, aborts it.
//! 4. While running, inside the start time and window: fill the free
//!    slots with the wave's online devices in the wave's order; mark
//!    devices still offline after `offline_wait` unreached; send due
//!    retries.
//! 5. A wave whose devices are all decided must meet its `success`
//!    fraction, then soak, then the next wave starts.
//! 6. Aborted: offers not taken up are withdrawn, the revert (if any) is
//!    offered to devices that committed, and the campaign finishes when
//!    nothing is in flight.
//! 7. Keep the broker true: an offer is published again if its retained
//!    copy is missing (a controller killed before publishing, a broker
//!    restarted without persistence), and cleared once the device took
//!    it up (the device keeps its own copy), so the broker holds at most
//!    one offer per device in flight.

use std::collections::BTreeMap;

use super::plan::{LateJoiners, OnThreshold};
use super::roster::{self, DeviceFacts};
use super::state::{Campaign, DeviceRecord, LogLine, Status, Target, Track, Verdict, Wave};
use crate::transport::protocol::{ControlAction, Event, EventKind, PhaseName};

/// What the broker says: per device its retained state and online flag,
/// and the digest of the retained offer on its offer topic (if any).
#[derive(Clone, Debug, Default)]
pub struct Facts {
    pub devices: BTreeMap<String, DeviceFacts>,
    pub offers: BTreeMap<String, String>,
    /// When the controller's current publishing connection began (its
    /// clock): what it published since then the broker holds, QoS 1 on a
    /// live connection; what it published before may be lost.
    pub connected_at: u64,
}

/// What the controller must do, after saving the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Publish the offer (retained) on the device's offer topic.
    Offer { device: String, revert: bool },
    /// Clear the device's retained offer.
    Clear { device: String },
    /// Send the device a `retry` command.
    Retry { device: String },
}

/// Counts over some devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub total: usize,
    pub committed: usize,
    pub already: usize,
    pub failed: usize,
    pub unreached: usize,
    pub in_flight: usize,
    pub waiting: usize,
    pub withdrawn: usize,
}

impl Counts {
    pub fn decided(&self) -> usize {
        self.committed + self.already + self.failed
    }
}

pub fn counts<'a>(tracks: impl Iterator<Item = &'a Track>) -> Counts {
    let mut c = Counts::default();
    for t in tracks {
        c.total += 1;
        match t.verdict() {
            Verdict::Committed => c.committed += 1,
            Verdict::AlreadyCurrent => c.already += 1,
            v if v.is_failure() => c.failed += 1,
            Verdict::Unreached => c.unreached += 1,
            Verdict::Offered | Verdict::Updating | Verdict::RetryWait => c.in_flight += 1,
            Verdict::Withdrawn | Verdict::NotOffered => c.withdrawn += 1,
            _ => c.waiting += 1,
        }
    }
    c
}

pub fn wave_counts(c: &Campaign, w: usize) -> Counts {
    counts(
        c.waves[w]
            .devices
            .iter()
            .filter_map(|d| c.devices.get(d))
            .map(|r| &r.update),
    )
}

/// A new campaign: the roster frozen from the facts at its start.
pub fn create(
    id: String,
    plan: super::plan::Plan,
    target: Target,
    revert: Option<Target>,
    facts: &BTreeMap<String, DeviceFacts>,
    seed: u64,
    now: u64,
) -> Campaign {
    let r = roster::roster(&plan, facts, seed);
    let mut devices = BTreeMap::new();
    let waves: Vec<Wave> = plan
        .waves
        .iter()
        .zip(&r.waves)
        .enumerate()
        .map(|(i, (w, ids))| {
            for d in ids {
                devices.insert(
                    d.clone(),
                    DeviceRecord {
                        wave: i,
                        before: facts.get(d).and_then(|f| f.running().map(str::to_string)),
                        after: None,
                        update: Track::default(),
                        revert: None,
                    },
                );
            }
            Wave {
                name: w.name.clone(),
                gate: w.gate.clone(),
                devices: ids.clone(),
                started_at: None,
                done_at: None,
                soak_until: None,
                accepted_failures: 0,
                success_waived: false,
            }
        })
        .collect();
    let status = match plan.start_at {
        Some(t) if t > now => Status::Scheduled,
        _ => Status::Running,
    };
    let n = devices.len();
    Campaign {
        format: super::state::FORMAT,
        fleet: plan.fleet.clone(),
        prefix: plan.prefix.clone(),
        target,
        revert,
        seed,
        created_at: now,
        status,
        reason: None,
        finished_at: None,
        wave: 0,
        waves,
        devices,
        left_out: r.left_out,
        late_joiners: Default::default(),
        control_seq: 0,
        log: vec![LogLine {
            at: now,
            text: format!("created: {n} devices in {} waves", plan.waves.len()),
        }],
        id,
        plan,
    }
}

fn parse_time(s: &str) -> Option<u64> {
    humantime::parse_rfc3339_weak(s)
        .ok()?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

fn outcome_verdict(outcome: &str) -> Option<Verdict> {
    Some(match outcome {
        "committed" => Verdict::Committed,
        "rolled_back" => Verdict::RolledBack,
        "rejected" => Verdict::Rejected,
        "needs_attention" => Verdict::NeedsAttention,
        _ => return None,
    })
}

/// Records an outcome of the device for `target` in `t`: final, or a
/// retry due if the plan allows one more.
fn settle(
    t: &mut Track,
    verdict: Verdict,
    reason: Option<String>,
    device_at: Option<String>,
    steps: &[crate::transport::protocol::StepReport],
    retries: (u32, u64),
    now: u64,
) {
    let (budget, backoff_ms) = retries;
    if t.verdict() == Verdict::TimedOut {
        t.late = Some(format!(
            "{} at {}",
            verdict.name(),
            device_at.as_deref().unwrap_or("?")
        ));
        return;
    }
    t.outcome_at = device_at.as_deref().and_then(parse_time).or(Some(now));
    if !steps.is_empty() {
        t.steps = steps.to_vec();
    }
    t.counted_outcome_at = device_at;
    t.settled_at = Some(now);
    t.reason = reason;
    let used = t.attempts.saturating_sub(1);
    if verdict == Verdict::RolledBack && used < budget {
        t.verdict = Some(Verdict::RetryWait);
        t.retry_at = Some(now + backoff_ms.saturating_mul(1 << used.min(16)));
    } else {
        t.verdict = Some(verdict);
    }
}

/// What the device runs now: a commit names it (a state published just
/// before may still say otherwise); else its latest report.
fn refresh_after(
    rec: &mut DeviceRecord,
    f: Option<&DeviceFacts>,
    c_target: &Target,
    revert: Option<&Target>,
) {
    let committed = |t: Option<&Track>| t.is_some_and(|t| t.verdict() == Verdict::Committed);
    if let Some(rt) = revert
        && committed(rec.revert.as_ref())
    {
        rec.after = Some(rt.version.clone());
    } else if committed(Some(&rec.update)) && rec.revert.is_none() {
        rec.after = Some(c_target.version.clone());
    } else if let Some(r) = f.and_then(DeviceFacts::running) {
        rec.after = Some(r.to_string());
    }
}

/// What a device's retained state says about its track for `target`.
fn observe(
    rec: &mut DeviceRecord,
    revert: bool,
    f: &DeviceFacts,
    target: &Target,
    offer_topic: &str,
    retries: (u32, u64),
    now: u64,
) {
    let t = if revert {
        match rec.revert.as_mut() {
            Some(t) => t,
            None => return,
        }
    } else {
        &mut rec.update
    };
    let v = t.verdict();
    if !(v.in_flight() || v == Verdict::Withdrawn || v == Verdict::TimedOut) {
        return;
    }
    let Some(s) = f.state.as_ref() else { return };
    if let Some(o) = &s.last_outcome
        && o.release == target.name
        && o.version == target.version
        && o.sequence == Some(target.sequence)
        && t.counted_outcome_at.as_deref() != Some(o.at.as_str())
        && let Some(verdict) = outcome_verdict(&o.outcome)
    {
        if t.verdict() == Verdict::TimedOut && t.late.is_some() {
            return;
        }
        if t.started_at.is_none() {
            t.started_at = Some(now);
        }
        settle(
            t,
            verdict,
            o.reason.clone(),
            Some(o.at.clone()),
            &o.steps,
            retries,
            now,
        );
        return;
    }
    if !v.in_flight() {
        return;
    }
    let working = s.phase.version.as_deref() == Some(target.version.as_str())
        && !matches!(
            s.phase.name,
            PhaseName::Idle | PhaseName::Committed | PhaseName::RolledBack | PhaseName::Rejected
        );
    if working && v == Verdict::Offered {
        t.verdict = Some(Verdict::Updating);
        t.started_at.get_or_insert(now);
    }
    if working && matches!(s.phase.name, PhaseName::Installing | PhaseName::Soaking) {
        t.downloaded_at.get_or_insert(now);
        t.installed_at.get_or_insert(now);
    }
    if v == Verdict::Offered
        && let (Some(before), Some(d)) = (t.discarded_before, &s.discarded)
        && d.count > before
        && d.topic == offer_topic
    {
        t.verdict = Some(Verdict::Rejected);
        t.reason = Some(format!(
            "the device discarded the offer unread: {}",
            d.reason
        ));
        t.settled_at = Some(now);
    }
}

/// Applies one of a device's events (repeats are dropped by id).
pub fn apply_event(c: &mut Campaign, ev: &Event, now: u64) {
    let retries = (c.plan.retries, c.plan.retry_backoff.as_millis() as u64);
    let (target, revert_target) = (c.target.clone(), c.revert.clone());
    let Some(rec) = c.devices.get_mut(&ev.device) else {
        return;
    };
    let is = |t: &Target| {
        ev.version.as_deref() == Some(t.version.as_str()) && ev.sequence == Some(t.sequence)
    };
    let track = if is(&target) {
        &mut rec.update
    } else if let (Some(rt), Some(t)) = (&revert_target, rec.revert.as_mut())
        && is(rt)
    {
        t
    } else {
        return;
    };
    if ev.id <= track.last_event {
        return;
    }
    track.last_event = ev.id;
    let at = parse_time(&ev.at).unwrap_or(now);
    let v = track.verdict();
    match ev.kind {
        EventKind::Progress => {
            if !v.in_flight() {
                return;
            }
            if v == Verdict::Offered {
                track.verdict = Some(Verdict::Updating);
            }
            track.started_at.get_or_insert(at);
            match ev.phase {
                PhaseName::Unpacking | PhaseName::Verifying if track.started_at != Some(at) => {
                    track.downloaded_at.get_or_insert(at);
                }
                PhaseName::Installing | PhaseName::Soaking => {
                    track.downloaded_at.get_or_insert(at);
                    track.installed_at.get_or_insert(at);
                }
                _ => {}
            }
        }
        EventKind::Outcome => {
            if !(v.in_flight() || v == Verdict::Withdrawn || v == Verdict::TimedOut) {
                return;
            }
            if track.counted_outcome_at.as_deref() == Some(ev.at.as_str()) {
                return;
            }
            let Some(verdict) = outcome_verdict(ev.phase.name()) else {
                return;
            };
            track.started_at.get_or_insert(at);
            settle(
                track,
                verdict,
                ev.reason.clone(),
                Some(ev.at.clone()),
                &ev.steps,
                retries,
                now,
            );
            refresh_after(rec, None, &target, revert_target.as_ref());
        }
    }
}

/// Applies an operator's control (once per `seq`).
pub fn control(c: &mut Campaign, action: ControlAction, seq: u64, by: &str, now: u64) {
    if seq <= c.control_seq || c.finished() {
        return;
    }
    c.control_seq = seq;
    let by = if by.is_empty() { "an operator" } else { by };
    match (action, c.status) {
        (ControlAction::Pause, Status::Running | Status::Scheduled) => {
            c.status = Status::Paused;
            c.reason = Some(format!("paused by {by}"));
            c.log(now, format!("paused by {by}"));
        }
        (ControlAction::Resume, Status::Paused) => {
            c.status = if c.plan.start_at.is_some_and(|t| t > now) {
                Status::Scheduled
            } else {
                Status::Running
            };
            c.reason = None;
            if c.wave < c.waves.len() {
                let counts = wave_counts(c, c.wave);
                let w = &mut c.waves[c.wave];
                w.accepted_failures = counts.failed as u32;
                // Resumed after the wave fell short of its success
                // fraction: the operator lets it advance.
                w.success_waived = w.done_at.is_some();
            }
            c.log(
                now,
                format!("resumed by {by}; the failures so far are accepted"),
            );
        }
        (ControlAction::Abort, s) if s != Status::Aborted => {
            abort(c, format!("aborted by {by}"), now);
        }
        (a, s) => c.log(
            now,
            format!(
                "{} from {by} ignored: the campaign is {}",
                a.name(),
                s.name()
            ),
        ),
    }
}

fn abort(c: &mut Campaign, reason: String, now: u64) {
    c.status = Status::Aborted;
    c.log(now, reason.clone());
    c.reason = Some(reason);
    for rec in c.devices.values_mut() {
        let t = &mut rec.update;
        match t.verdict() {
            Verdict::Waiting => t.verdict = Some(Verdict::NotOffered),
            Verdict::Offered => {
                t.verdict = Some(Verdict::Withdrawn);
                t.reason = Some("offer withdrawn by the abort before the device took it up".into());
            }
            Verdict::RetryWait => t.verdict = Some(Verdict::RolledBack),
            _ => {}
        }
    }
}

fn trip(c: &mut Campaign, reason: String, now: u64) {
    match c.plan.on_threshold {
        OnThreshold::Pause => {
            c.status = Status::Paused;
            c.log(now, format!("paused: {reason}"));
            c.reason = Some(reason);
        }
        OnThreshold::Abort => abort(c, reason, now),
    }
}

/// A threshold the current wave crossed, in words.
fn failure_limit(c: &Campaign) -> Option<String> {
    let w = c.waves.get(c.wave)?;
    let n = wave_counts(c, c.wave);
    let failed = (n.failed as u32).saturating_sub(w.accepted_failures);
    if failed == 0 {
        return None;
    }
    let g = &w.gate;
    let max = g
        .max_failures
        .unwrap_or(if g.max_failure_percent.is_some() {
            u32::MAX
        } else {
            0
        });
    if failed > max {
        return Some(format!(
            "wave {}: {failed} device(s) failed, more than the {max} allowed{}",
            w.name,
            first_failure(c, c.wave)
        ));
    }
    if let Some(pct) = g.max_failure_percent {
        let decided = n.decided();
        let share = 100.0 * f64::from(failed) / decided.max(1) as f64;
        if decided >= g.min_decided as usize && share > pct {
            return Some(format!(
                "wave {}: {failed} of {decided} decided devices failed ({share:.1}%), more than {pct}%{}",
                w.name,
                first_failure(c, c.wave)
            ));
        }
    }
    None
}

fn first_failure(c: &Campaign, w: usize) -> String {
    c.waves[w]
        .devices
        .iter()
        .filter_map(|d| c.devices.get(d).map(|r| (d, r)))
        .filter(|(_, r)| r.update.verdict().is_failure())
        .min_by_key(|(_, r)| r.update.settled_at)
        .map_or(String::new(), |(d, r)| {
            format!(
                " (first: {d} {}{})",
                r.update.verdict().name(),
                r.update
                    .reason
                    .as_ref()
                    .map_or(String::new(), |why| format!(": {why}"))
            )
        })
}

fn slots_used(c: &Campaign) -> usize {
    c.devices
        .values()
        .filter(|r| {
            r.update.verdict().in_flight()
                || r.revert.as_ref().is_some_and(|t| t.verdict().in_flight())
        })
        .count()
}

fn offer_to(t: &mut Track, f: Option<&DeviceFacts>, now: u64) {
    t.verdict = Some(Verdict::Offered);
    t.attempts += 1;
    t.offered_at.get_or_insert(now);
    t.attempt_at = Some(now);
    t.sent_at = Some(now);
    t.discarded_before = Some(
        f.and_then(|f| f.state.as_ref())
            .and_then(|s| s.discarded.as_ref())
            .map_or(0, |d| d.count),
    );
}

/// One decision step at `now` (milliseconds since the epoch).
pub fn step(c: &mut Campaign, facts: &Facts, now: u64) -> Vec<Effect> {
    let mut effects = Vec::new();
    if c.finished() {
        return effects;
    }
    let topics = crate::transport::protocol::Topics::new(&c.prefix, &c.fleet);
    let retries = (c.plan.retries, c.plan.retry_backoff.as_millis() as u64);
    let unknown = DeviceFacts::default();

    // 1. Observe.
    for (id, rec) in c.devices.iter_mut() {
        let f = facts.devices.get(id).unwrap_or(&unknown);
        let topic = topics.device_offer(id);
        observe(rec, false, f, &c.target, &topic, retries, now);
        if let Some(rt) = &c.revert {
            observe(rec, true, f, rt, &topic, (0, 0), now);
        }
        refresh_after(rec, Some(f), &c.target, c.revert.as_ref());
    }
    // Late joiners: selected by what they report, not in the roster.
    for (id, f) in &facts.devices {
        if !c.devices.contains_key(id)
            && !c.left_out.contains(id)
            && roster::selects(&c.plan.select, id, f)
            && c.late_joiners.insert(id.clone())
        {
            c.log.push(LogLine {
                at: now,
                text: format!("{id} joined the fleet after the start: not in the campaign"),
            });
        }
    }

    // 2. Time out.
    let timeout = c.plan.device_timeout.as_millis() as u64;
    for (id, rec) in c.devices.iter_mut() {
        for t in std::iter::once(&mut rec.update).chain(rec.revert.as_mut()) {
            if t.verdict().in_flight() && t.attempt_at.is_some_and(|a| now >= a + timeout) {
                let phase = facts.devices.get(id).and_then(|f| f.state.as_ref()).map_or(
                    "no state".to_string(),
                    |s| {
                        let mut p = s.phase.name.name().to_string();
                        if let Some(pct) = s.phase.percent {
                            p.push_str(&format!(" {pct}%"));
                        }
                        p
                    },
                );
                t.verdict = Some(Verdict::TimedOut);
                t.reason = Some(format!(
                    "no outcome within {} of the {} (last phase seen: {phase})",
                    humantime::format_duration(c.plan.device_timeout),
                    if t.attempts > 1 { "retry" } else { "offer" }
                ));
                t.settled_at = Some(now);
            }
        }
    }

    // 3. Failure limits of the current wave.
    if matches!(c.status, Status::Running | Status::Scheduled)
        && let Some(why) = failure_limit(c)
    {
        trip(c, why, now);
    }

    if c.status == Status::Scheduled && c.plan.start_at.is_none_or(|t| now >= t) {
        c.status = Status::Running;
        c.log(now, "start time reached");
    }

    // 4 and 5. Roll the current wave out; advance.
    let offering_time = c.plan.window.is_none_or(|w| w.contains(now));
    while c.status == Status::Running && c.wave < c.waves.len() {
        let wi = c.wave;
        if c.waves[wi].started_at.is_none() {
            c.waves[wi].started_at = Some(now);
            let (name, n) = (c.waves[wi].name.clone(), c.waves[wi].devices.len());
            c.log(now, format!("wave {name} started ({n} devices)"));
        }
        let started = c.waves[wi].started_at.unwrap_or(now);
        let wait = c.plan.offline_wait.as_millis() as u64;
        let mut free = c.plan.max_in_flight.saturating_sub(slots_used(c));
        let ids = c.waves[wi].devices.clone();
        for id in &ids {
            let f = facts.devices.get(id);
            let rec = c.devices.get_mut(id).expect("roster member");
            let t = &mut rec.update;
            match t.verdict() {
                Verdict::Waiting => {
                    let f = f.unwrap_or(&unknown);
                    if f.running() == Some(c.target.version.as_str())
                        && f.permanent() == Some(c.target.version.as_str())
                    {
                        t.verdict = Some(Verdict::AlreadyCurrent);
                        t.settled_at = Some(now);
                        continue;
                    }
                    if let Some(o) = f.state.as_ref().and_then(|s| s.last_outcome.as_ref())
                        && o.release == c.target.name
                        && o.version == c.target.version
                        && o.sequence == Some(c.target.sequence)
                        && let Some(v) = outcome_verdict(&o.outcome)
                        && v != Verdict::Committed
                    {
                        // The device decided this very release before
                        // (another campaign, a manual offer): it will
                        // not take it again unless told to retry.
                        t.attempts = 1;
                        t.offered_at = Some(now);
                        t.attempt_at = Some(now);
                        settle(
                            t,
                            v,
                            Some(format!(
                                "decided before this campaign: {}",
                                o.reason.clone().unwrap_or_else(|| o.outcome.clone())
                            )),
                            Some(o.at.clone()),
                            &[],
                            retries,
                            now,
                        );
                        continue;
                    }
                    if f.online != Some(true) {
                        if now >= started + wait {
                            t.verdict = Some(Verdict::Unreached);
                            t.reason = Some(format!(
                                "not online within {} of the wave's start",
                                humantime::format_duration(c.plan.offline_wait)
                            ));
                            t.settled_at = Some(now);
                        }
                        continue;
                    }
                    if free > 0 && offering_time {
                        offer_to(t, Some(f), now);
                        free -= 1;
                        effects.push(Effect::Offer {
                            device: id.clone(),
                            revert: false,
                        });
                    }
                }
                Verdict::RetryWait
                    if free > 0 && offering_time && t.retry_at.is_some_and(|r| now >= r) =>
                {
                    t.verdict = Some(Verdict::Updating);
                    t.attempts += 1;
                    t.attempt_at = Some(now);
                    t.retry_at = None;
                    free -= 1;
                    effects.push(Effect::Retry { device: id.clone() });
                }
                _ => {}
            }
        }
        // Thresholds again: devices decided just now count.
        if let Some(why) = failure_limit(c) {
            trip(c, why, now);
            break;
        }
        let n = wave_counts(c, wi);
        if n.waiting + n.in_flight > 0 {
            break;
        }
        let w = &c.waves[wi];
        // Failures an operator accepted by resuming count for nothing.
        let reached = (n.total - n.unreached).saturating_sub(w.accepted_failures as usize);
        let ok = n.committed + n.already;
        let share = if reached == 0 {
            0.0
        } else {
            ok as f64 / reached as f64
        };
        if w.done_at.is_none() {
            let name = w.name.clone();
            c.waves[wi].done_at = Some(now);
            let soak = c.waves[wi].gate.soak.as_millis() as u64;
            let last_commit = c.waves[wi]
                .devices
                .iter()
                .filter_map(|d| c.devices.get(d))
                .filter(|r| r.update.verdict() == Verdict::Committed)
                .filter_map(|r| r.update.settled_at)
                .max();
            c.waves[wi].soak_until = last_commit.map(|t| t + soak);
            c.log(
                now,
                format!(
                    "wave {name} done: {} committed, {} already current, {} failed, {} unreached",
                    n.committed, n.already, n.failed, n.unreached
                ),
            );
        }
        let w = &c.waves[wi];
        let short = match w.gate.success {
            Some(needed) => share + 1e-9 < needed,
            None => ok == 0 && n.total > 0,
        };
        if short && !w.success_waived {
            let why = if reached == 0 {
                format!("wave {}: no device was reached", w.name)
            } else if let Some(needed) = w.gate.success {
                format!(
                    "wave {}: {ok} of {reached} reached devices committed ({:.0}%), {:.0}% needed",
                    w.name,
                    share * 100.0,
                    needed * 100.0
                )
            } else {
                format!("wave {}: no device committed", w.name)
            };
            trip(c, why, now);
            break;
        }
        if w.soak_until.is_some_and(|t| now < t) {
            break;
        }
        c.wave += 1;
        if c.wave == c.waves.len()
            && c.plan.late_joiners == LateJoiners::Tail
            && !c.late_joiners.is_empty()
            && !c.waves.iter().any(|w| w.name == "late-joiners")
        {
            let ids: Vec<String> = std::mem::take(&mut c.late_joiners).into_iter().collect();
            let gate = c.waves[wi].gate.clone();
            for d in &ids {
                c.devices.insert(
                    d.clone(),
                    DeviceRecord {
                        wave: c.wave,
                        before: facts
                            .devices
                            .get(d)
                            .and_then(|f| f.running().map(str::to_string)),
                        ..Default::default()
                    },
                );
            }
            c.waves.push(Wave {
                name: "late-joiners".into(),
                gate,
                devices: ids,
                started_at: None,
                done_at: None,
                soak_until: None,
                accepted_failures: 0,
                success_waived: false,
            });
        }
        if c.wave == c.waves.len() {
            c.status = Status::Completed;
            c.finished_at = Some(now);
            c.log(now, "completed");
        }
    }

    // 6. Aborted: revert, then finish.
    if c.status == Status::Aborted {
        if c.revert.is_some() {
            let mut free = c.plan.max_in_flight.saturating_sub(slots_used(c));
            for (id, rec) in c.devices.iter_mut() {
                if rec.update.verdict() == Verdict::Committed && rec.revert.is_none() && free > 0 {
                    let mut t = Track::default();
                    offer_to(&mut t, facts.devices.get(id), now);
                    rec.revert = Some(t);
                    free -= 1;
                    effects.push(Effect::Offer {
                        device: id.clone(),
                        revert: true,
                    });
                }
            }
        }
        let open = c.devices.values().any(|r| {
            r.update.verdict().in_flight()
                || r.revert.as_ref().is_some_and(|t| t.verdict().in_flight())
                || (c.revert.is_some()
                    && r.update.verdict() == Verdict::Committed
                    && r.revert.is_none())
        });
        if !open {
            c.finished_at = Some(now);
            c.log(now, "finished: nothing in flight");
        }
    }

    // 7. Keep the broker's retained offers true.
    for (id, rec) in c.devices.iter_mut() {
        let on_broker = facts.offers.get(id);
        let tracks = [(&mut rec.update, &c.target, false)];
        let mut all: Vec<(&mut Track, &Target, bool)> = tracks.into_iter().collect();
        if let (Some(t), Some(rt)) = (rec.revert.as_mut(), c.revert.as_ref()) {
            all.push((t, rt, true));
        }
        for (t, target, revert) in all {
            let ours = on_broker == Some(&target.digest);
            // Sent again only when sent before this connection, whose
            // retained offers have settled: an echo that is merely late
            // (a busy broker, a long queue) is not a lost offer.
            let lost = |at: Option<u64>| at.is_none_or(|s| s < facts.connected_at);
            let v = t.verdict();
            if v == Verdict::Offered && !ours && lost(t.sent_at) {
                t.sent_at = Some(now);
                effects.push(Effect::Offer {
                    device: id.clone(),
                    revert,
                });
            } else if v != Verdict::Offered && ours && t.offered_at.is_some() && lost(t.cleared_at)
            {
                t.cleared_at = Some(now);
                effects.push(Effect::Clear { device: id.clone() });
            }
        }
    }
    effects.dedup();
    effects
}

#[cfg(test)]
mod tests;
