//! `beamup campaign` against a real mosquitto, a real `beamup serve` and
//! real devices (thermo nodes with their agents): waves and soaks, a bad
//! canary that pauses the campaign, thresholds, offline devices, device
//! timeouts, pause/resume/abort, a controller killed with -9 at random
//! points, a broker restarted without persistence, each checked against
//! what the devices themselves say; the dry run of an offer, which
//! changes nothing on them.

use std::time::{Duration, Instant};

use beamup::error::exit;
use serde_json::Value;

use crate::support::cli::sign_bundle;
use crate::support::fleet::{Fleet, id};
use crate::support::otp::{Flavor, releases_for};

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
fn check_against_devices(f: &Fleet, report: &Value, version: &str) {
    for (i, d) in f.devices.iter().enumerate() {
        let row = Fleet::row(report, i);
        if row.is_null() {
            continue;
        }
        let st = d.status();
        let last = &st["last_outcome"];
        match row["outcome"].as_str().unwrap() {
            "committed" => {
                assert_eq!(st["node"]["running"], version, "{}: {st:#}", id(i));
                assert_eq!(st["node"]["permanent"], version, "{}: {st:#}", id(i));
                assert_eq!(last["outcome"], "committed", "{}: {st:#}", id(i));
                assert_eq!(row["after"], version);
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
    check_against_devices(&f, &report, "1.1.0");
    // The broker keeps no offer once the devices took theirs up.
    let retained = crate::support::mqtt::Sub::new(&f.broker, &["beamup/acme/device/+/offer"]);
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        retained.messages().iter().all(|m| m.payload.is_empty()),
        "offers left on the broker"
    );
    // Nor the finished controller's session, for which it would queue
    // every state and event of the fleet.
    assert!(
        !crate::support::mqtt::session_present(&f.broker, "beamup-campaign-acme-good"),
        "the finished controller's MQTT session is still on the broker"
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
    check_against_devices(&f, &report, "1.1.0");
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
    check_against_devices(&f, &report, "1.1.0");
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
    check_against_devices(&f, &report, "1.1.0");
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
    // A second controller is refused: on this machine by the lock, and
    // from a copy of the campaign elsewhere by the live one's lease.
    f.beamup(&["campaign", "run", "ctl", "--campaigns", "campaigns"])
        .fails(
            i32::from(exit::BUSY),
            "a controller for this campaign is running",
        );
    let copy = f.dir().join("elsewhere");
    std::fs::create_dir(&copy).unwrap();
    let out = std::process::Command::new("cp")
        .args(["-a", "campaigns/ctl", copy.to_str().unwrap()])
        .current_dir(f.dir())
        .output()
        .unwrap();
    assert!(out.status.success());
    f.beamup(&[
        "campaign",
        "run",
        "ctl",
        "--campaigns",
        copy.to_str().unwrap(),
    ])
    .fails(i32::from(exit::BUSY), "has a controller online");
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
    check_against_devices(&f, &report, "1.1.0");
}

/// Runs campaign `cid` of `plan`, killing its controller with -9 after
/// random delays (at most 10 times) and starting it again each time, until
/// it finishes. Returns its report and the number of kills.
fn run_with_kills(
    f: &Fleet,
    plan: &std::path::Path,
    cid: &str,
    next: &mut impl FnMut(u64) -> u64,
) -> (Value, u32) {
    let state = f.dir().join(format!("campaigns/{cid}/campaign.json"));
    let mut ctl = f.start_campaign(plan, &format!("{cid}-0.log"));
    let started = Instant::now();
    let mut kills = 0;
    loop {
        let deadline = Instant::now() + Duration::from_millis(300 + next(3000));
        while Instant::now() < deadline && ctl.running_pid().is_some() {
            std::thread::sleep(Duration::from_millis(10));
        }
        if ctl.running_pid().is_none() || kills == 10 {
            // Finished by itself, or killed enough: let it finish.
            break;
        }
        ctl.kill9();
        kills += 1;
        assert!(
            started.elapsed() < CAMPAIGN,
            "campaign {cid} did not finish"
        );
        // Killed before it created the campaign: start it again.
        ctl = if state.exists() {
            f.run_campaign(cid, &format!("{cid}-{kills}.log"))
        } else {
            f.start_campaign(plan, &format!("{cid}-{kills}.log"))
        };
    }
    let deadline = Instant::now() + CAMPAIGN;
    while ctl.running_pid().is_some() {
        assert!(
            Instant::now() < deadline,
            "campaign {cid} did not finish: {}\n{}",
            std::fs::read_to_string(&state).unwrap_or_default(),
            ctl.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ctl.wait_exit(CAMPAIGN), Some(0), "{}", ctl.log());
    eprintln!("campaign {cid}: {kills} kills");
    (f.report(cid), kills)
}

/// kill -9 of the controller at random moments, again and again, over two
/// campaigns (a hot one with a rollback, then a cold one): no device offered
/// twice, none skipped, every outcome counted once, and the report each
/// campaign must end in whatever the kills did.
#[test]
fn a_controller_killed_at_random_points_ends_in_the_same_report() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("kill schedule seed {seed}");
    let mut rng = seed | 1;
    let mut next = move |max_ms: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % max_ms
    };
    // gw-3 rolls 1.1.0 back; the threshold allows one failure.
    let mut f = Fleet::new(5, TIMING, &[2]);
    f.start_agents(0..5);
    let waves = "[[waves]]\ndevices = [\"gw-1\"]\n[[waves]]\nrest = true\nmax_failures = 1\n[rollout]\nmax_in_flight = 2\norder = \"id\"\n";
    let hot = f.plan(
        "hot.toml",
        &f.bundle("1.1.0", &[]),
        &format!("id = \"k9-hot\"\n{waves}"),
    );
    let (report, kills_hot) = run_with_kills(&f, &hot, "k9-hot", &mut next);
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
    check_against_devices(&f, &report, "1.1.0");

    // 2.0.0 has no relup: cold upgrades, from 1.1.0 and (gw-3) from 1.0.0.
    let cold = f.plan(
        "cold.toml",
        &f.bundle("2.0.0", &[]),
        &format!("id = \"k9-cold\"\n{waves}"),
    );
    let (report, kills_cold) = run_with_kills(&f, &cold, "k9-cold", &mut next);
    assert_eq!(report["status"], "completed", "{report:#}");
    for i in 0..5 {
        assert_eq!(Fleet::row(&report, i)["outcome"], "committed", "{report:#}");
        assert_eq!(Fleet::row(&report, i)["attempts"], 1, "{report:#}");
        assert_eq!(
            f.offers_to(i),
            2,
            "{} offered {} times in all",
            id(i),
            f.offers_to(i)
        );
    }
    assert_eq!(report["total"]["committed"], 5);
    check_against_devices(&f, &report, "2.0.0");
    assert!(
        kills_hot + kills_cold >= 3,
        "only {} kills: the schedule missed the campaigns",
        kills_hot + kills_cold
    );
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

/// mosquitto killed mid-campaign and started again without persistence:
/// every retained offer, state and campaign document is gone. Devices
/// publish theirs again, the controller reads the broker afresh, and the
/// campaign completes with every device counted once.
#[test]
fn a_broker_restarted_without_persistence_mid_campaign_loses_no_device() {
    let mut f = Fleet::new(3, "timeout = \"12s\"\nsoak = \"3s\"", &[]);
    f.start_agents(0..3);
    let bundle = f.bundle("1.1.0", &[]);
    let plan = f.plan(
        "plan.toml",
        &bundle,
        "id = \"lost\"\n[[waves]]\nrest = true\n[rollout]\norder = \"id\"\nmax_in_flight = 1\n",
    );
    let mut ctl = f.start_campaign(&plan, "controller.log");
    f.wait_state(0, "soaking", |s| s["phase"]["name"] == "soaking");
    f.broker.kill();
    std::thread::sleep(Duration::from_secs(1));
    f.broker.restart();
    assert_eq!(ctl.wait_exit(CAMPAIGN), Some(0), "{}", ctl.log());
    let report = f.report("lost");
    assert_eq!(count(&report, "committed"), 3, "{report:#}");
    for i in 0..3 {
        assert_eq!(Fleet::row(&report, i)["attempts"], 1, "{report:#}");
    }
    check_against_devices(&f, &report, "1.1.0");
    // The campaign's view is on the broker again.
    let remote = f.beamup(&["campaign", "status", "lost", "--fleet", "acme", "--json"]);
    remote.ok();
    assert!(remote.stdout.contains("\"completed\""), "{}", remote.stdout);
}

/// What an agent would lose or change if a dry run touched anything: the
/// release root's files, the engine's state file, the node's OS process,
/// and the agent's download directory.
fn device_fingerprint(f: &Fleet, i: usize) -> (String, Vec<u8>, String, Vec<String>) {
    let d = &f.devices[i];
    let root = format!("{:?}", d.snapshot());
    let state = std::fs::read(d.path().join("state/state.json")).unwrap_or_default();
    let pid = d.health().1["os_pid"].as_str().unwrap().to_string();
    let downloads = std::fs::read_dir(d.path().join("state/agent/download"))
        .map(|r| {
            r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    (root, state, pid, downloads)
}

#[test]
fn a_dry_run_of_an_offer_says_hot_cold_or_why_not_and_changes_nothing() {
    let mut f = Fleet::new(3, TIMING, &[]);
    // gw-2 takes hot upgrades only; gw-3's agent never runs: it cannot
    // answer.
    let config = f.devices[1].path().join("agent.toml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("\n[install]\nstrategy = \"hot-only\"\n");
    std::fs::write(&config, text).unwrap();
    f.start_agents(0..2);
    let before: Vec<_> = (0..2).map(|i| device_fingerprint(&f, i)).collect();

    // A campaign plan of 2.0.0 (no relup): gw-1 would take it cold, gw-2
    // refuses it, gw-3 does not answer.
    let cold = f.bundle("2.0.0", &[]);
    let plan = f.plan(
        "plan.toml",
        &cold,
        "id = \"dry\"\n[[waves]]\nname = \"all\"\ndevices = [\"gw-1\", \"gw-2\", \"gw-3\"]\n",
    );
    let run = f.beamup(&[
        "campaign",
        "plan",
        plan.to_str().unwrap(),
        "--dry-run",
        "--wait",
        "4s",
        "--json",
    ]);
    run.ok();
    let out: Value = serde_json::from_str(&run.stdout).unwrap();
    let wave = &out["dry_run"]["waves"][0];
    assert_eq!(wave["name"], "all", "{out:#}");
    assert_eq!(
        (wave["hot"].as_u64(), wave["cold"].as_u64()),
        (Some(0), Some(1)),
        "{wave:#}"
    );
    let refused = wave["refused"].as_array().unwrap();
    assert_eq!(refused.len(), 1, "{wave:#}");
    assert_eq!(refused[0]["device"], "gw-2");
    assert_eq!(refused[0]["verdict"], "would_refuse");
    assert_eq!(
        refused[0]["reason"],
        "refused: thermo 2.0.0 has no relup, so it needs a restart, and [install] strategy is hot-only",
        "{wave:#}"
    );
    assert_eq!(wave["no_answer"], serde_json::json!(["gw-3"]), "{wave:#}");
    assert_eq!(wave["answers"][0][0], "gw-1", "{wave:#}");
    let a = &wave["answers"][0][1];
    assert_eq!(a["strategy"], "cold", "{a}");
    assert_eq!(a["why"], "thermo 2.0.0 has no relup", "{a}");
    assert_eq!(wave["download_bytes"], a["bytes"], "{wave:#}");
    assert!(a["bytes"].as_u64().unwrap() > 0, "{a}");
    assert_eq!(out["dry_run"]["no_answer"], 1);

    // The same as text.
    let run = f.beamup(&[
        "campaign",
        "plan",
        plan.to_str().unwrap(),
        "--dry-run",
        "--wait",
        "3s",
    ]);
    run.ok();
    for needle in [
        "wave all: 0 hot, 1 cold, download ",
        "1 would refuse, 1 no answer",
        "gw-2                     would refuse: refused: thermo 2.0.0 has no relup",
        "gw-3                     no answer",
    ] {
        assert!(
            run.stdout.contains(needle),
            "no {needle:?} in:\n{}",
            run.stdout
        );
    }

    // Hot: of the tarball only what an upgrade of one app reads.
    let hot = f.bundle("1.1.0", &[]);
    let ask = |bundle: &std::path::Path, device: &str| -> Value {
        let run = f.beamup(&[
            "offer",
            bundle.to_str().unwrap(),
            "--fleet",
            "acme",
            "--device",
            device,
            "--dry-run",
            "--json",
        ]);
        run.ok();
        serde_json::from_str::<Value>(&run.stdout).unwrap()[device].clone()
    };
    let a = ask(&hot, "gw-1");
    assert_eq!(a["verdict"], "would_install", "{a:#}");
    assert_eq!(a["strategy"], "hot", "{a:#}");
    assert!(
        a["why"]
            .as_str()
            .unwrap()
            .contains("its relup upgrades from the running 1.0.0"),
        "{a}"
    );
    let (chunks, total) = (
        a["chunks"].as_u64().unwrap(),
        a["chunks_total"].as_u64().unwrap(),
    );
    assert!(chunks > 0 && chunks < total / 4, "{a}");

    // Policy: a bundle for gw-1 only.
    let only_gw1 = f.dir().join("bundles/thermo-1.1.0-gw-1.bundle");
    let tarball = releases_for(Flavor::Rebar3).tarball("1.1.0");
    sign_bundle(f.dir(), tarball, &only_gw1, &["--target", "device:gw-1"]);
    let a = ask(&only_gw1, "gw-2");
    assert_eq!(a["verdict"], "would_refuse", "{a:#}");
    assert_eq!(a["code"], exit::WRONG_TARGET, "{a:#}");
    assert!(
        a["reason"]
            .as_str()
            .unwrap()
            .contains("bundle targets device:gw-1, which does not include this device"),
        "{a:#}"
    );

    // Signed by a key gw-2 does not trust, as text.
    let foreign = f.devices[1].bundle("1.1.0");
    let run = f.beamup(&[
        "offer",
        foreign.to_str().unwrap(),
        "--fleet",
        "acme",
        "--device",
        "gw-2",
        "--dry-run",
    ]);
    run.ok();
    assert!(
        run.stdout.contains(
            "gw-2  would refuse: offered manifest: signed only by keys this device does not trust"
        ),
        "{}",
        run.stdout
    );

    // `fleet status` shows each device's last answer.
    let run = f.beamup(&["fleet", "status", "--fleet", "acme"]);
    run.ok();
    let line = |d: &str| {
        run.stdout
            .lines()
            .skip_while(|l| !l.starts_with("last dry run of each device"))
            .find(|l| l.starts_with(d))
            .unwrap_or_else(|| panic!("no dry-run line of {d}:\n{}", run.stdout))
            .to_string()
    };
    assert!(
        line("gw-1").contains("would install thermo 1.1.0: hot, fetches "),
        "{}",
        run.stdout
    );
    assert!(
        line("gw-2").contains("would refuse: offered manifest: signed only by keys"),
        "{}",
        run.stdout
    );
    let run = f.beamup(&["fleet", "status", "--fleet", "acme", "--json"]);
    let rows: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(
        rows[1]["state"]["dry_run"]["code"],
        exit::UNKNOWN_KEY,
        "{rows:#}"
    );

    // Nothing changed: the roots byte for byte, the state files, the
    // nodes' OS processes, no download; nothing was offered.
    for (i, b) in before.iter().enumerate() {
        assert_eq!(&device_fingerprint(&f, i), b, "{} changed", id(i));
        assert_eq!(f.offers_to(i), 0, "{}", id(i));
        let st = f.devices[i].status();
        assert_eq!(st["node"]["permanent"], "1.0.0", "{st:#}");
    }
}
