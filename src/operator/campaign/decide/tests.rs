use std::path::Path;

use super::*;
use crate::operator::campaign::plan;
use crate::transport::protocol::{DeviceStatus, DiscardedReport, OutcomeReport, PhaseReport};

const SEQ: u64 = 77;

fn target() -> Target {
    Target {
        name: "thermo".into(),
        version: "1.1.0".into(),
        sequence: SEQ,
        digest: "d1".into(),
    }
}

fn state(id: &str, running: &str) -> DeviceStatus {
    DeviceStatus {
        v: 1,
        device: id.into(),
        fleet: "acme".into(),
        groups: vec![],
        agent_version: "0".into(),
        running: Some(running.into()),
        permanent: Some(running.into()),
        phase: PhaseReport::idle(),
        last_outcome: None,
        discarded: None,
        dry_run: None,
        updated_at: String::new(),
    }
}

/// A fleet of `n` online devices on 1.0.0.
fn fleet(n: usize) -> Facts {
    let mut f = Facts::default();
    for i in 1..=n {
        let id = format!("gw-{i}");
        f.devices.insert(
            id.clone(),
            DeviceFacts {
                online: Some(true),
                state: Some(state(&id, "1.0.0")),
            },
        );
    }
    f
}

fn campaign(plan_body: &str, facts: &Facts) -> Campaign {
    let p = plan::parse(
        &format!("bundle = \"b\"\nfleet = \"acme\"\n{plan_body}"),
        Path::new("/"),
    )
    .unwrap();
    create("c".into(), p, target(), None, &facts.devices, 1, 0)
}

const CANARY: &str = "[[waves]]\ndevices = [\"gw-1\"]\nsoak = \"10s\"\n[[waves]]\nrest = true\n[rollout]\norder = \"id\"\nmax_in_flight = 2\n";

fn offers(e: &[Effect]) -> Vec<String> {
    e.iter()
        .filter_map(|e| match e {
            Effect::Offer { device, .. } => Some(device.clone()),
            _ => None,
        })
        .collect()
}

/// The device reports an outcome for the campaign's release.
fn outcome(f: &mut Facts, id: &str, outcome: &str, at: &str) {
    let s = f.devices.get_mut(id).unwrap().state.as_mut().unwrap();
    s.last_outcome = Some(OutcomeReport {
        outcome: outcome.into(),
        release: "thermo".into(),
        version: "1.1.0".into(),
        sequence: Some(SEQ),
        reason: (outcome != "committed").then(|| "status 503".into()),
        at: at.into(),
        steps: vec![],
        failed_step: None,
    });
    if outcome == "committed" {
        s.running = Some("1.1.0".into());
        s.permanent = Some("1.1.0".into());
    }
}

fn verdict(c: &Campaign, id: &str) -> Verdict {
    c.devices[id].update.verdict()
}

#[test]
fn the_canary_alone_first_then_the_soak_then_the_rest_within_the_slots() {
    let mut f = fleet(5);
    let mut c = campaign(CANARY, &f);
    assert_eq!(offers(&step(&mut c, &f, 1_000)), ["gw-1"]);
    assert!(offers(&step(&mut c, &f, 2_000)).is_empty());
    outcome(&mut f, "gw-1", "committed", "2026-01-01T00:00:03Z");
    step(&mut c, &f, 3_000);
    assert_eq!(verdict(&c, "gw-1"), Verdict::Committed);
    // Soaking for 10 s after the commit was learned.
    assert!(offers(&step(&mut c, &f, 12_999)).is_empty());
    let next = offers(&step(&mut c, &f, 13_000));
    assert_eq!(next, ["gw-2", "gw-3"], "two slots");
    outcome(&mut f, "gw-2", "committed", "2026-01-01T00:00:14Z");
    assert_eq!(offers(&step(&mut c, &f, 14_000)), ["gw-4"]);
    for (id, t) in [("gw-3", 15), ("gw-4", 16)] {
        outcome(&mut f, id, "committed", &format!("2026-01-01T00:00:{t}Z"));
    }
    assert_eq!(offers(&step(&mut c, &f, 16_000)), ["gw-5"]);
    outcome(&mut f, "gw-5", "committed", "2026-01-01T00:00:17Z");
    step(&mut c, &f, 17_000);
    assert_eq!(c.status, Status::Completed);
    assert!(c.finished());
}

#[test]
fn a_rollback_on_the_canary_pauses_before_anyone_else_is_offered() {
    let mut f = fleet(3);
    let mut c = campaign(CANARY, &f);
    step(&mut c, &f, 0);
    outcome(&mut f, "gw-1", "rolled_back", "2026-01-01T00:00:01Z");
    let e = step(&mut c, &f, 1_000);
    assert!(offers(&e).is_empty());
    assert_eq!(c.status, Status::Paused);
    let why = c.reason.clone().unwrap();
    assert!(why.contains("gw-1 rolled_back: status 503"), "{why}");
    for t in [2_000, 100_000] {
        assert!(offers(&step(&mut c, &f, t)).is_empty());
    }
    // Abort: the rest are never offered.
    control(&mut c, ControlAction::Abort, 1, "op", 200_000);
    step(&mut c, &f, 200_000);
    assert!(c.finished());
    assert_eq!(verdict(&c, "gw-2"), Verdict::NotOffered);
}

#[test]
fn the_same_outcome_from_state_and_event_counts_once() {
    let mut f = fleet(2);
    let mut c = campaign(
        "[[waves]]\nrest = true\nmax_failures = 5\n[rollout]\norder = \"id\"\n",
        &f,
    );
    step(&mut c, &f, 0);
    let ev = Event {
        v: 1,
        id: 10,
        device: "gw-1".into(),
        kind: EventKind::Outcome,
        phase: PhaseName::RolledBack,
        release: Some("thermo".into()),
        version: Some("1.1.0".into()),
        sequence: Some(SEQ),
        percent: None,
        reason: Some("status 503".into()),
        at: "2026-01-01T00:00:01Z".into(),
        steps: vec![],
    };
    apply_event(&mut c, &ev, 1_000);
    apply_event(&mut c, &ev, 1_001);
    outcome(&mut f, "gw-1", "rolled_back", "2026-01-01T00:00:01Z");
    step(&mut c, &f, 2_000);
    assert_eq!(verdict(&c, "gw-1"), Verdict::RolledBack);
    assert_eq!(wave_counts(&c, 0).failed, 1);
    // An event of another release or sequence is not this campaign's.
    let mut other = ev.clone();
    other.id = 11;
    other.device = "gw-2".into();
    other.sequence = Some(SEQ - 1);
    apply_event(&mut c, &other, 3_000);
    assert_eq!(verdict(&c, "gw-2"), Verdict::Offered);
}

#[test]
fn an_offer_missing_from_the_broker_is_published_again_and_one_present_is_not() {
    let f = fleet(1);
    let mut c = campaign("[[waves]]\nrest = true\n", &f);
    assert_eq!(offers(&step(&mut c, &f, 0)), ["gw-1"]);
    // Its echo has not come yet, however late: sent on this connection,
    // the broker has it; not sent again.
    assert!(offers(&step(&mut c, &f, 1)).is_empty());
    assert!(offers(&step(&mut c, &f, 60_000)).is_empty());
    // A new connection (the controller killed before publishing, or a
    // broker that lost it) whose retained offers settled without it.
    let mut reconnected = f.clone();
    reconnected.connected_at = 60_001;
    assert_eq!(offers(&step(&mut c, &reconnected, 60_500)), ["gw-1"]);
    assert!(offers(&step(&mut c, &reconnected, 61_000)).is_empty());
    let mut f = reconnected;
    f.connected_at = 0;
    let mut on_broker = f.clone();
    on_broker.offers.insert("gw-1".into(), "d1".into());
    assert!(offers(&step(&mut c, &on_broker, 61_500)).is_empty());
    // The same decision is taken again from the saved state.
    let saved: Campaign = serde_json::from_slice(&serde_json::to_vec(&c).unwrap()).unwrap();
    let (mut a, mut b) = (saved.clone(), saved);
    assert_eq!(
        step(&mut a, &on_broker, 62_000),
        step(&mut b, &on_broker, 62_000)
    );
    assert_eq!(c.devices["gw-1"].update.attempts, 1);
}

#[test]
fn a_device_that_took_its_offer_up_has_it_cleared_from_the_broker() {
    let mut f = fleet(1);
    f.offers.insert("gw-1".into(), "d1".into());
    let mut c = campaign("[[waves]]\nrest = true\n", &f);
    step(&mut c, &f, 0);
    let s = f.devices.get_mut("gw-1").unwrap().state.as_mut().unwrap();
    s.phase = PhaseReport {
        name: PhaseName::Downloading,
        percent: Some(10),
        release: Some("thermo".into()),
        version: Some("1.1.0".into()),
        detail: String::new(),
    };
    let e = step(&mut c, &f, 1_000);
    assert_eq!(verdict(&c, "gw-1"), Verdict::Updating);
    assert_eq!(
        e,
        [Effect::Clear {
            device: "gw-1".into()
        }]
    );
    // Not again until its echo had time to come back.
    assert!(step(&mut c, &f, 2_000).is_empty());
}

#[test]
fn offline_devices_wait_then_are_unreached_and_silent_ones_time_out() {
    let mut f = fleet(3);
    f.devices.get_mut("gw-3").unwrap().online = Some(false);
    let mut c = campaign(
        "[[waves]]\nrest = true\nmax_failures = 1\n[rollout]\norder = \"id\"\noffline_wait = \"30s\"\ndevice_timeout = \"60s\"\n",
        &f,
    );
    assert_eq!(offers(&step(&mut c, &f, 0)), ["gw-1", "gw-2"]);
    outcome(&mut f, "gw-1", "committed", "2026-01-01T00:00:05Z");
    step(&mut c, &f, 5_000);
    assert_eq!(verdict(&c, "gw-3"), Verdict::Waiting);
    step(&mut c, &f, 30_000);
    assert_eq!(verdict(&c, "gw-3"), Verdict::Unreached);
    step(&mut c, &f, 59_999);
    assert_eq!(verdict(&c, "gw-2"), Verdict::Offered);
    step(&mut c, &f, 60_000);
    assert_eq!(verdict(&c, "gw-2"), Verdict::TimedOut);
    // One failure allowed, one commit: done.
    assert_eq!(c.status, Status::Completed, "{:?}", c.reason);
    // A late outcome is kept apart; the count does not change.
    outcome(&mut f, "gw-2", "committed", "2026-01-01T00:02:00Z");
    let mut c2 = c.clone();
    c2.finished_at = None;
    step(&mut c2, &f, 120_000);
    assert_eq!(verdict(&c2, "gw-2"), Verdict::TimedOut);
    assert!(c2.devices["gw-2"].update.late.is_some());
}

#[test]
fn a_failure_percentage_counts_only_once_enough_devices_decided() {
    let mut f = fleet(10);
    let mut c = campaign(
        "[[waves]]\nrest = true\nmax_failure_percent = 20.0\nmin_decided = 5\n[rollout]\norder = \"id\"\nmax_in_flight = 10\n",
        &f,
    );
    step(&mut c, &f, 0);
    outcome(&mut f, "gw-1", "rolled_back", "2026-01-01T00:00:01Z");
    outcome(&mut f, "gw-2", "rolled_back", "2026-01-01T00:00:01Z");
    step(&mut c, &f, 1_000);
    assert_eq!(c.status, Status::Running, "2 decided: not judged yet");
    for i in 3..=5 {
        outcome(
            &mut f,
            &format!("gw-{i}"),
            "committed",
            "2026-01-01T00:00:02Z",
        );
    }
    step(&mut c, &f, 2_000);
    // 2 of 5 = 40% > 20%.
    assert_eq!(c.status, Status::Paused);
    assert!(
        c.reason
            .as_ref()
            .unwrap()
            .contains("2 of 5 decided devices failed (40.0%)")
    );
    // Resumed: those two are accepted; the rest may go on.
    control(&mut c, ControlAction::Resume, 5, "op", 3_000);
    assert_eq!(c.status, Status::Running);
    for i in 6..=10 {
        outcome(
            &mut f,
            &format!("gw-{i}"),
            "committed",
            "2026-01-01T00:00:04Z",
        );
    }
    step(&mut c, &f, 4_000);
    assert_eq!(c.status, Status::Completed, "{:?}", c.reason);
    // A control is applied once: the same seq again changes nothing.
    let before = c.clone();
    control(&mut c, ControlAction::Pause, 5, "op", 5_000);
    assert_eq!(c, before);
}

#[test]
fn abort_withdraws_unstarted_offers_and_waits_for_devices_in_flight() {
    let mut f = fleet(3);
    let mut c = campaign(
        "[[waves]]\nrest = true\n[rollout]\norder = \"id\"\nmax_in_flight = 2\n",
        &f,
    );
    step(&mut c, &f, 0);
    f.offers.insert("gw-2".into(), "d1".into());
    let s = f.devices.get_mut("gw-1").unwrap().state.as_mut().unwrap();
    s.phase.name = PhaseName::Installing;
    s.phase.version = Some("1.1.0".into());
    step(&mut c, &f, 1_000);
    control(&mut c, ControlAction::Abort, 9, "op", 2_000);
    let e = step(&mut c, &f, 2_000);
    assert_eq!(verdict(&c, "gw-2"), Verdict::Withdrawn);
    assert_eq!(verdict(&c, "gw-3"), Verdict::NotOffered);
    assert!(
        e.contains(&Effect::Clear {
            device: "gw-2".into()
        }),
        "{e:?}"
    );
    assert!(!c.finished(), "gw-1 is installing");
    outcome(&mut f, "gw-1", "committed", "2026-01-01T00:00:03Z");
    step(&mut c, &f, 3_000);
    assert_eq!(verdict(&c, "gw-1"), Verdict::Committed);
    assert!(c.finished());
    assert_eq!(c.status, Status::Aborted);
}

#[test]
fn retries_have_a_budget_and_a_backoff() {
    let mut f = fleet(1);
    let mut c = campaign(
        "[[waves]]\nrest = true\n[rollout]\nretries = 1\nretry_backoff = \"10s\"\n",
        &f,
    );
    step(&mut c, &f, 0);
    outcome(&mut f, "gw-1", "rolled_back", "2026-01-01T00:00:01Z");
    step(&mut c, &f, 1_000);
    assert_eq!(verdict(&c, "gw-1"), Verdict::RetryWait);
    assert_eq!(
        c.status,
        Status::Running,
        "not a failure while a retry is due"
    );
    assert!(step(&mut c, &f, 10_999).is_empty());
    assert_eq!(
        step(&mut c, &f, 11_000),
        [Effect::Retry {
            device: "gw-1".into()
        }]
    );
    // The old outcome is not taken for the retry's.
    step(&mut c, &f, 12_000);
    assert_eq!(verdict(&c, "gw-1"), Verdict::Updating);
    outcome(&mut f, "gw-1", "rolled_back", "2026-01-01T00:00:20Z");
    step(&mut c, &f, 20_000);
    assert_eq!(verdict(&c, "gw-1"), Verdict::RolledBack);
    assert_eq!(c.devices["gw-1"].update.attempts, 2);
    assert_eq!(c.status, Status::Paused);
}

#[test]
fn devices_already_running_it_are_done_and_late_joiners_are_only_listed() {
    let mut f = fleet(2);
    let s = f.devices.get_mut("gw-2").unwrap().state.as_mut().unwrap();
    s.running = Some("1.1.0".into());
    s.permanent = Some("1.1.0".into());
    let mut c = campaign("[[waves]]\nrest = true\n", &f);
    assert_eq!(offers(&step(&mut c, &f, 0)), ["gw-1"]);
    assert_eq!(verdict(&c, "gw-2"), Verdict::AlreadyCurrent);
    let mut later = f.clone();
    later.devices.insert(
        "gw-9".into(),
        DeviceFacts {
            online: Some(true),
            state: Some(state("gw-9", "1.0.0")),
        },
    );
    assert!(offers(&step(&mut c, &later, 1_000)).is_empty());
    assert!(c.late_joiners.contains("gw-9"));
    assert!(!c.devices.contains_key("gw-9"));
}

#[test]
fn a_device_that_discards_the_offer_is_rejected_with_its_reason() {
    let mut f = fleet(1);
    let mut c = campaign("[[waves]]\nrest = true\nmax_failures = 1\n", &f);
    step(&mut c, &f, 0);
    f.devices
        .get_mut("gw-1")
        .unwrap()
        .state
        .as_mut()
        .unwrap()
        .discarded = Some(DiscardedReport {
        count: 1,
        topic: "beamup/acme/device/gw-1/offer".into(),
        reason: "signed only by keys this device does not trust".into(),
        at: String::new(),
    });
    step(&mut c, &f, 1_000);
    assert_eq!(verdict(&c, "gw-1"), Verdict::Rejected);
    assert!(
        c.devices["gw-1"]
            .update
            .reason
            .as_ref()
            .unwrap()
            .contains("does not trust")
    );
}

#[test]
fn a_wave_where_nobody_committed_does_not_advance() {
    let mut f = fleet(2);
    for d in f.devices.values_mut() {
        d.online = Some(false);
    }
    let mut c = campaign(
        "[[waves]]\ndevices = [\"gw-1\"]\n[[waves]]\nrest = true\n[rollout]\noffline_wait = \"1s\"\n",
        &f,
    );
    step(&mut c, &f, 0);
    step(&mut c, &f, 1_000);
    assert_eq!(c.status, Status::Paused);
    assert!(c.reason.as_ref().unwrap().contains("no device was reached"));
}

#[test]
fn offers_wait_for_the_start_time_and_stay_inside_the_window() {
    let f = fleet(2);
    // Starts at 02:00 UTC on day 1; offers only 02:00-03:00.
    let day = 86_400_000;
    let at = |h: u64, m: u64| day + (h * 60 + m) * 60_000;
    let mut c = campaign(
        "[[waves]]\nrest = true\n[rollout]\norder = \"id\"\nmax_in_flight = 1\nstart_at = \"1970-01-02T02:00:00Z\"\nwindow = \"02:00-03:00\"\n",
        &f,
    );
    assert_eq!(c.status, Status::Scheduled);
    assert!(offers(&step(&mut c, &f, at(1, 59))).is_empty());
    assert_eq!(c.status, Status::Scheduled);
    assert_eq!(offers(&step(&mut c, &f, at(2, 0))), ["gw-1"]);
    assert_eq!(c.status, Status::Running);
    let mut f2 = f.clone();
    outcome(&mut f2, "gw-1", "committed", "1970-01-02T03:00:30Z");
    // Outside the window: gw-1's outcome is taken, gw-2 is not offered.
    assert!(offers(&step(&mut c, &f2, at(3, 1))).is_empty());
    assert_eq!(verdict(&c, "gw-1"), Verdict::Committed);
    assert_eq!(verdict(&c, "gw-2"), Verdict::Waiting);
    // The next day's window.
    assert_eq!(offers(&step(&mut c, &f2, at(26, 0))), ["gw-2"]);
}

#[test]
fn an_abort_offers_the_revert_to_the_devices_that_committed() {
    let mut f = fleet(3);
    let p = plan::parse(
        "bundle = \"b\"\nfleet = \"acme\"\n[[waves]]\nrest = true\nmax_failures = 5\n[rollout]\norder = \"id\"\nmax_in_flight = 3\n[revert]\nbundle = \"r\"\n",
        Path::new("/"),
    )
    .unwrap();
    let revert = Target {
        name: "thermo".into(),
        version: "1.0.0".into(),
        sequence: SEQ + 1,
        digest: "r1".into(),
    };
    let mut c = create("c".into(), p, target(), Some(revert), &f.devices, 1, 0);
    step(&mut c, &f, 0);
    outcome(&mut f, "gw-1", "committed", "2026-01-01T00:00:01Z");
    outcome(&mut f, "gw-2", "rolled_back", "2026-01-01T00:00:01Z");
    step(&mut c, &f, 1_000);
    control(&mut c, ControlAction::Abort, 1, "op", 2_000);
    let e = step(&mut c, &f, 2_000);
    assert!(
        e.contains(&Effect::Offer {
            device: "gw-1".into(),
            revert: true
        }),
        "{e:?}"
    );
    assert!(
        !e.iter()
            .any(|e| matches!(e, Effect::Offer { device, .. } if device == "gw-2"))
    );
    assert!(!c.finished(), "the revert is in flight");
    // gw-1 reports the revert committed: 1.0.0 again.
    let s = f.devices.get_mut("gw-1").unwrap().state.as_mut().unwrap();
    s.last_outcome = Some(OutcomeReport {
        outcome: "committed".into(),
        release: "thermo".into(),
        version: "1.0.0".into(),
        sequence: Some(SEQ + 1),
        reason: None,
        at: "2026-01-01T00:00:05Z".into(),
        steps: vec![],
        failed_step: None,
    });
    s.running = Some("1.0.0".into());
    // gw-3 was withdrawn (offered, not taken up).
    step(&mut c, &f, 5_000);
    assert_eq!(
        c.devices["gw-1"].revert.as_ref().unwrap().verdict(),
        Verdict::Committed
    );
    assert_eq!(c.devices["gw-1"].after.as_deref(), Some("1.0.0"));
    assert_eq!(verdict(&c, "gw-3"), Verdict::Withdrawn);
    assert!(c.finished());
}

#[test]
fn late_joiners_make_a_last_wave_when_the_plan_says_tail() {
    let f = fleet(1);
    let mut c = campaign(
        "[[waves]]\nrest = true\n[rollout]\nlate_joiners = \"tail\"\n",
        &f,
    );
    assert_eq!(offers(&step(&mut c, &f, 0)), ["gw-1"]);
    let mut later = f.clone();
    later.devices.insert(
        "gw-9".into(),
        DeviceFacts {
            online: Some(true),
            state: Some(state("gw-9", "1.0.0")),
        },
    );
    assert!(offers(&step(&mut c, &later, 1_000)).is_empty());
    outcome(&mut later, "gw-1", "committed", "2026-01-01T00:00:02Z");
    // The last wave done: the late joiner gets a wave of its own.
    assert_eq!(offers(&step(&mut c, &later, 2_000)), ["gw-9"]);
    assert_eq!(c.waves.last().unwrap().name, "late-joiners");
    outcome(&mut later, "gw-9", "committed", "2026-01-01T00:00:03Z");
    step(&mut c, &later, 3_000);
    assert_eq!(c.status, Status::Completed);
}
