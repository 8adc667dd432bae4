//! `beamup campaign` against a real mosquitto, a real `beamup serve` and
//! real devices (thermo nodes with their agents): waves and soaks, a bad
//! canary that pauses the campaign, thresholds, offline devices, device
//! timeouts, pause/resume/abort, and a controller killed with -9 at random
//! points, each checked against what the devices themselves say.

use std::time::{Duration, Instant};

use beamup::error::exit;
use serde_json::Value;

use crate::support::fleet::{Fleet, id};

const CAMPAIGN: Duration = Duration::from_secs(240);
const TIMING: &str = "timeout = \"8s\"\nsoak = \"1s\"";

fn count(report: &Value, outcome: &str) -> usize {
    report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["outcome"] == outcome)
        .count()
}

/// The report agrees with each device's own `beamup status --json`: what
/// it runs, what is permanent, and its last outcome.
fn check_against_devices(f: &Fleet, report: &Value) {
    for (i, d) in f.devices.iter().enumerate() {
        let row = Fleet::row(report, i);
        if row.is_null() {
            continue;
        }
        let st = d.status();
        let last = &st["last_outcome"];
        match row["outcome"].as_str().unwrap() {
            "committed" => {
                assert_eq!(st["node"]["running"], "1.1.0", "{}: {st:#}", id(i));
                assert_eq!(st["node"]["permanent"], "1.1.0", "{}: {st:#}", id(i));
                assert_eq!(last["outcome"], "committed", "{}: {st:#}", id(i));
                assert_eq!(row["after"], "1.1.0");
                // The device's own step times, as its outcome reported them.
                assert_eq!(row["steps"], last["steps"], "{}", id(i));
                assert!(
                    row["steps"].as_array().is_some_and(|s| !s.is_empty()),
                    "{row}"
                );
            }
            "rolled_back" => {
                assert_eq!(st["node"]["permanent"], "1.0.0", "{}: {st:#}", id(i));
                assert_eq!(last["outcome"], "rolled_back", "{}: {st:#}", id(i));
                assert_eq!(row["reason"], last["reason"], "{}", id(i));
            }
            "not_offered" | "unreached" => {
                assert_eq!(st["node"]["permanent"], "1.0.0", "{}: {st:#}", id(i));
                assert!(row["offered_at"].is_null(), "{row}");
            }
            _ => {}
        }
    }
}

#[test]
fn a_canary_commits_soaks_then_the_rest_commit_with_state_and_pid_kept() {
    let mut f = Fleet::new(5, TIMING, &[]);
    f.start_agents(0..5);
    for d in &f.devices {
        d.node.incr().unwrap();
    }
    let pids: Vec<String> = f
        .devices
        .iter()
        .map(|d| d.health().1["os_pid"].as_str().unwrap().to_string())
        .collect();
    let bundle = f.bundle("1.1.0", &[]);
    let plan = f.plan(
        "plan.toml",
        &bundle,
        "id = \"good\"\n[[waves]]\nname = \"canary\"\ndevices = [\"gw-1\"]\nsoak = \"3s\"\n[[waves]]\nrest = true\n[rollout]\nmax_in_flight = 2\n",
    );
    // The plan changes nothing and says what would happen.
    let p = f.beamup(&["campaign", "plan", plan.to_str().unwrap(), "--json"]);
    p.ok();
    let preview: Value = serde_json::from_str(&p.stdout).unwrap();
    assert_eq!(preview["waves"][0]["devices"][0]["device"], "gw-1");
    assert_eq!(preview["waves"][1]["devices"].as_array().unwrap().len(), 4);
    assert_eq!(preview["waves"][1]["devices"][0]["action"], "offer");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!((0..5).map(|i| f.offers_to(i)).sum::<usize>(), 0);

    let mut ctl = f.start_campaign(&plan, "controller.log");
    assert_eq!(ctl.wait_exit(CAMPAIGN), Some(0), "{}", ctl.log());
    let report = f.report("good");
    assert_eq!(report["status"], "completed", "{report:#}");
    assert_eq!(count(&report, "committed"), 5, "{report:#}");
    // Each device was offered once; the others only after the canary's
    // commit and its soak.
    for i in 0..5 {
        assert_eq!(f.offers_to(i), 1, "{}", id(i));
    }
    let canary_commit = f.outcome_index(0, "committed", "1.1.0").unwrap();
    for i in 1..5 {
        assert!(
            f.first_offer_index(i).unwrap() > canary_commit,
            "{} offered before the canary committed",
            id(i)
        );
    }
    let canary_at = Fleet::row(&report, 0)["outcome_at"]
        .as_str()
        .unwrap()
        .to_string();
    for i in 1..5 {
        let offered = Fleet::row(&report, i)["offered_at"]
            .as_str()
            .unwrap()
            .to_string();
        let gap = humantime::parse_rfc3339(&offered)
            .unwrap()
            .duration_since(humantime::parse_rfc3339(&canary_at).unwrap())
            .unwrap_or_default();
        assert!(
            gap >= Duration::from_secs(2),
            "{}: soak not kept ({gap:?})",
            id(i)
        );
    }
    // Hot: same OS process, state kept.
    for (i, d) in f.devices.iter().enumerate() {
        let (_, h) = d.health();
        assert_eq!(h["version"], "1.1.0");
        assert_eq!(h["os_pid"], pids[i].as_str(), "{}", id(i));
        assert_eq!(h["counter"], 1, "{}", id(i));
    }
    check_against_devices(&f, &report);
    // The broker keeps no offer once the devices took theirs up.
    let retained = crate::support::mqtt::Sub::new(&f.broker, &["beamup/acme/device/+/offer"]);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        retained.messages().iter().all(|m| m.payload.is_empty()),
        "offers left on the broker"
    );
    // The same view from the broker, for any operator.
    let remote = f.beamup(&[
        "campaign",
        "report",
        "good",
        "--json",
        "--fleet",
        "acme",
        "--campaigns",
        "/nonexistent",
    ]);
    remote.ok();
    let remote: Value = serde_json::from_str(&remote.stdout).unwrap();
    assert_eq!(remote["devices"], report["devices"]);
    let csv = f.beamup(&["campaign", "report", "good", "--csv", "--fleet", "acme"]);
    csv.ok();
    assert_eq!(csv.stdout.lines().count(), 6, "{}", csv.stdout);
    for mut d in f.devices.drain(..) {
        d.assert_boots_permanent();
    }
}

#[test]
fn a_release_failing_its_health_check_on_the_canary_pauses_the_campaign_before_any_other_offer() {
    let mut f = Fleet::new(4, TIMING, &[]);
    f.start_agents(0..4);
    let bad = f.bundle("1.2.0", &[]);
    let plan = f.plan(
        "bad.toml",
        &bad,
        "id = \"bad\"\n[[waves]]\ndevices = [\"gw-1\"]\n[[waves]]\nrest = true\n",
    );
    let mut ctl = f.start_campaign(&plan, "controller.log");
    let view = f.wait_campaign("bad", "paused", CAMPAIGN, |c| c["status"] == "paused");
    let reason = view["reason"].as_str().unwrap();
    assert!(reason.contains("wave canary"), "{reason}");
    assert!(reason.contains("gw-1 rolled_back"), "{reason}");
    assert!(reason.contains("503"), "{reason}");
    // Paused: nothing more is offered, however long we wait.
    std::thread::sleep(Duration::from_secs(3));
    for i in 1..4 {
        assert_eq!(f.offers_to(i), 0, "{} was offered", id(i));
    }
    let st = f.beamup(&["campaign", "status", "bad", "--fleet", "acme"]);
    st.ok();
    assert!(st.stdout.contains("paused"), "{}", st.stdout);
    // Abort from "another operator machine" (the broker alone).
    let a = f.beamup(&["campaign", "abort", "bad", "--fleet", "acme"]);
    a.ok();
    assert!(a.stdout.contains("abort applied"), "{}", a.stdout);
    assert_eq!(
        ctl.wait_exit(Duration::from_secs(30)),
        Some(i32::from(exit::CAMPAIGN_ABORTED)),
        "{}",
        ctl.log()
    );
    let report = f.report("bad");
    assert_eq!(Fleet::row(&report, 0)["outcome"], "rolled_back");
    assert_eq!(count(&report, "not_offered"), 3, "{report:#}");
    check_against_devices(&f, &report);
    for mut d in f.devices.drain(..) {
        d.assert_boots_permanent();
    }
}

#[test]
fn a_failure_percentage_pauses_a_wave_and_a_looser_one_lets_it_complete() {
    // gw-2 and gw-4 fail their health check on 1.1.0: 2 of 5 (40%).
    let mut f = Fleet::new(5, TIMING, &[1, 3]);
    f.start_agents(0..5);
    let bundle = f.bundle("1.1.0", &[]);
    let strict = f.plan(
        "strict.toml",
        &bundle,
        "id = \"strict\"\n[[waves]]\nrest = true\nsuccess = 0.0\nmax_failure_percent = 30.0\nmin_decided = 5\n[rollout]\nmax_in_flight = 5\norder = \"id\"\n",
    );
    let mut ctl = f.start_campaign(&strict, "strict.log");
    let view = f.wait_campaign("strict", "paused", CAMPAIGN, |c| c["status"] == "paused");
    let reason = view["reason"].as_str().unwrap();
    assert!(
        reason.contains("2 of 5 decided devices failed (40.0%), more than 30%"),
        "{reason}"
    );
    ctl.kill9();
    let report = f.report("strict");
    assert_eq!(count(&report, "committed"), 3, "{report:#}");
    assert_eq!(count(&report, "rolled_back"), 2, "{report:#}");
    assert_eq!(Fleet::row(&report, 1)["outcome"], "rolled_back");
    check_against_devices(&f, &report);
}

#[test]
fn offline_devices_are_waited_for_then_unreached_and_a_silent_one_times_out() {
    let mut f = Fleet::new(4, "timeout = \"8s\"\nsoak = \"6s\"", &[]);
    // Known to the fleet, then offline: gw-3 comes back in time, gw-4
    // never does.
    f.start_agents(0..4);
    for i in [2, 3] {
        f.agents[i].as_mut().unwrap().term(Duration::from_secs(20));
    }
    let bundle = f.bundle("1.1.0", &[]);
    let plan = f.plan(
        "plan.toml",
        &bundle,
        "id = \"off\"\n[[waves]]\nrest = true\nmax_failures = 1\nsuccess = 0.5\n[rollout]\norder = \"id\"\nmax_in_flight = 4\noffline_wait = \"20s\"\ndevice_timeout = \"12s\"\n",
    );
    let mut ctl = f.start_campaign(&plan, "controller.log");
    // gw-2's agent is killed while it soaks: no outcome ever comes.
    f.wait_state(1, "soaking", |s| s["phase"]["name"] == "soaking");
    f.agents[1].as_mut().unwrap().kill9();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(f.offers_to(2), 0, "gw-3 offered while offline");
    f.start_agent(2);
    assert_eq!(ctl.wait_exit(CAMPAIGN), Some(0), "{}", ctl.log());
    let report = f.report("off");
    let row = |i| Fleet::row(&report, i);
    assert_eq!(row(0)["outcome"], "committed", "{report:#}");
    assert_eq!(row(1)["outcome"], "timed_out", "{report:#}");
    assert!(
        row(1)["reason"]
            .as_str()
            .unwrap()
            .contains("no outcome within 12s"),
        "{report:#}"
    );
    assert_eq!(row(2)["outcome"], "committed", "{report:#}");
    assert_eq!(row(3)["outcome"], "unreached", "{report:#}");
    assert!(row(3)["offered_at"].is_null());
    assert_eq!(f.offers_to(3), 0);
    check_against_devices(&f, &report);
}

#[test]
fn pause_stops_new_offers_resume_goes_on_and_abort_lets_the_device_in_flight_finish() {
    let mut f = Fleet::new(4, "timeout = \"12s\"\nsoak = \"4s\"", &[]);
    f.start_agents(0..4);
    let bundle = f.bundle("1.1.0", &[]);
    let plan = f.plan(
        "plan.toml",
        &bundle,
        "id = \"ctl\"\n[[waves]]\nrest = true\n[rollout]\norder = \"id\"\nmax_in_flight = 1\n",
    );
    let mut ctl = f.start_campaign(&plan, "controller.log");
    f.wait_state(0, "soaking", |s| s["phase"]["name"] == "soaking");
    let p = f.beamup(&["campaign", "pause", "ctl", "--fleet", "acme"]);
    p.ok();
    assert!(p.stdout.contains("pause applied"), "{}", p.stdout);
    // gw-1 finishes; nobody else is offered while paused.
    f.wait_state(0, "committed", |s| {
        s["last_outcome"]["outcome"] == "committed"
    });
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(f.offers_to(1), 0, "offered while paused");
    f.beamup(&["campaign", "resume", "ctl", "--fleet", "acme"])
        .ok();
    f.wait_state(1, "soaking", |s| s["phase"]["name"] == "soaking");
    let a = f.beamup(&["campaign", "abort", "ctl", "--fleet", "acme"]);
    a.ok();
    assert_eq!(
        ctl.wait_exit(CAMPAIGN),
        Some(i32::from(exit::CAMPAIGN_ABORTED)),
        "{}",
        ctl.log()
    );
    let report = f.report("ctl");
    let row = |i| Fleet::row(&report, i);
    assert_eq!(row(0)["outcome"], "committed", "{report:#}");
    // In flight at the abort: it finished, and is reported.
    assert_eq!(row(1)["outcome"], "committed", "{report:#}");
    assert_eq!(row(2)["outcome"], "not_offered", "{report:#}");
    assert_eq!(row(3)["outcome"], "not_offered", "{report:#}");
    assert_eq!(f.offers_to(2) + f.offers_to(3), 0);
    check_against_devices(&f, &report);
}

/// kill -9 of the controller at random moments, again and again, until
/// the campaign finishes: no device offered twice, none skipped, every
/// outcome counted once, and the same report as a run left alone.
#[test]
fn a_controller_killed_at_random_points_ends_in_the_same_report() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill schedule seed {seed}");
    let mut rng = seed;
    let mut next = move |max_ms: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % max_ms
    };
    // gw-3 rolls back; the threshold allows one failure.
    let mut f = Fleet::new(5, TIMING, &[2]);
    f.start_agents(0..5);
    let bundle = f.bundle("1.1.0", &[]);
    let plan = f.plan(
        "plan.toml",
        &bundle,
        "id = \"k9\"\n[[waves]]\ndevices = [\"gw-1\"]\n[[waves]]\nrest = true\nmax_failures = 1\n[rollout]\nmax_in_flight = 2\norder = \"id\"\n",
    );
    let mut ctl = f.start_campaign(&plan, "controller-0.log");
    let started = Instant::now();
    let mut kills = 0;
    loop {
        let wait = Duration::from_millis(300 + next(3000));
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline && ctl.running_pid().is_some() {
            std::thread::sleep(Duration::from_millis(10));
        }
        if ctl.running_pid().is_none() || kills == 10 {
            // Finished by itself, or killed enough: let it finish.
            break;
        }
        ctl.kill9();
        kills += 1;
        assert!(started.elapsed() < CAMPAIGN, "campaign did not finish");
        // Killed before it created the campaign: start it again.
        ctl = if f.dir().join("campaigns/k9/campaign.json").exists() {
            f.run_campaign("k9", &format!("controller-{kills}.log"))
        } else {
            f.start_campaign(&plan, &format!("controller-{kills}.log"))
        };
    }
    let deadline = Instant::now() + CAMPAIGN;
    while ctl.running_pid().is_some() {
        assert!(
            Instant::now() < deadline,
            "campaign did not finish: {}\n{}",
            std::fs::read_to_string(f.dir().join("campaigns/k9/campaign.json")).unwrap_or_default(),
            ctl.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ctl.wait_exit(CAMPAIGN), Some(0), "{}", ctl.log());
    eprintln!("{kills} kills");
    assert!(
        kills >= 2,
        "only {kills} kills: the schedule missed the campaign"
    );
    let report = f.report("k9");
    assert_eq!(report["status"], "completed", "{report:#}");
    for i in 0..5 {
        let want = if i == 2 { "rolled_back" } else { "committed" };
        assert_eq!(Fleet::row(&report, i)["outcome"], want, "{report:#}");
        assert_eq!(Fleet::row(&report, i)["attempts"], 1, "{report:#}");
        assert_eq!(
            f.offers_to(i),
            1,
            "{} offered {} times",
            id(i),
            f.offers_to(i)
        );
    }
    assert_eq!(report["total"]["committed"], 4);
    assert_eq!(report["total"]["failed"], 1);
    check_against_devices(&f, &report);
}

#[test]
fn plan_errors_name_the_key_and_the_file() {
    let f = tempfile::tempdir().unwrap();
    let plan = f.path().join("p.toml");
    std::fs::write(
        &plan,
        "bundle = \"x.bundle\"\nfleet = \"acme\"\n[[waves]]\nrest = true\n[rollout]\nmax_in_flight = 0\n",
    )
    .unwrap();
    let r = crate::support::cli::beamup(
        f.path(),
        &[
            "campaign",
            "plan",
            plan.to_str().unwrap(),
            "--broker",
            "mqtt://127.0.0.1:1",
        ],
    );
    r.fails(i32::from(exit::CONFIG), "rollout.max_in_flight");
    assert!(r.stderr.contains("p.toml"), "{}", r.stderr);
}

/// docs/mosquitto/beamup.acl, as shipped: a device can neither write nor
/// read campaign topics; an operator can.
#[test]
fn the_shipped_acl_keeps_devices_off_campaign_topics() {
    use crate::support::mqtt::{Broker, Sub, password_file};
    let dir = tempfile::tempdir().unwrap();
    let passwords = dir.path().join("passwords");
    password_file(
        &passwords,
        &[("gw-1", "device-secret"), ("operator", "operator-secret")],
    );
    let acl = crate::support::repo().join("docs/mosquitto/beamup.acl");
    let broker = Broker::start_with(&format!(
        "password_file {}\nacl_file {}\n",
        passwords.display(),
        acl.display()
    ));
    let op = Sub::login(
        &broker,
        &["beamup/acme/campaign/#"],
        "operator",
        "operator-secret",
    );
    let device = Sub::login(
        &broker,
        &["beamup/acme/campaign/#"],
        "gw-1",
        "device-secret",
    );
    let control = |by: &str| {
        format!(r#"{{"v":1,"seq":1,"action":"abort","by":"{by}","at":""}}"#).into_bytes()
    };
    device.publish("beamup/acme/campaign/c1/control", control("gw-1"), true);
    device.publish("beamup/acme/campaign/c1/status", b"{}".to_vec(), true);
    op.publish("beamup/acme/campaign/c1/control", control("operator"), true);
    op.wait_for("the operator's own control", Duration::from_secs(10), |m| {
        m.topic.ends_with("/control") && m.json()["by"] == "operator"
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        op.messages()
            .iter()
            .all(|m| m.json()["by"] != "gw-1" && m.payload != b"{}"),
        "a device wrote a campaign topic"
    );
    assert!(
        device.messages().is_empty(),
        "a device read a campaign topic"
    );
}
