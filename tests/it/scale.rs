//! Campaigns at scale: a few hundred simulated devices (`beamup fleet
//! simulate`, each its own MQTT session verifying offers and fetching
//! verified chunks from a real `beamup serve`) driven by the real
//! controller through a real mosquitto. 2% of the devices roll back: a
//! threshold below that pauses the campaign on the right count, one at it
//! lets it complete. Every outcome is counted once, no device is offered
//! twice, and the report is what the devices say they did.

use std::collections::BTreeMap;
use std::time::Duration;

use beamup::error::exit;
use serde_json::Value;

use crate::support::sim::{SimFleet, sim_id};

const DEVICES: usize = 300;
const MIX: &str = "commit=0.98,rollback=0.02";
const CAMPAIGN: Duration = Duration::from_secs(90);
/// 200 KB: four 64 KiB chunks, each fetched and verified by every device.
const PAYLOAD: usize = 200_000;

fn plan_body(id: &str, canary: usize, max_failures: u32) -> String {
    format!(
        "id = \"{id}\"\n\
         [[waves]]\nname = \"canary\"\ndevices = [\"{}\"]\nsoak = \"1s\"\n\
         [[waves]]\nname = \"rest\"\nrest = true\nmax_failures = {max_failures}\n\
         [rollout]\nmax_in_flight = 50\norder = \"id\"\ndevice_timeout = \"60s\"\n",
        sim_id(canary)
    )
}

/// Failures the controller had counted in a view of the campaign (its
/// state document), in wave `wave`.
fn failures_in(view: &Value, wave: u64) -> usize {
    view["devices"]
        .as_object()
        .unwrap()
        .values()
        .filter(|d| d["wave"] == wave)
        .filter(|d| {
            matches!(
                d["update"]["verdict"].as_str(),
                Some("rolled_back" | "rejected" | "needs_attention" | "timed_out")
            )
        })
        .count()
}

/// The report says of each device what the device says it did: one
/// outcome, the one it reported, or none and no offer taken up. Each
/// device that installed fetched and verified every chunk over MQTT.
/// Returns the report's outcomes, counted.
fn check_report_against_devices(
    report: &Value,
    summary: &Value,
    offers: &BTreeMap<String, usize>,
    chunks: u64,
) -> BTreeMap<String, usize> {
    let rows: BTreeMap<String, Value> = report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["device"].as_str().unwrap().to_string(), r.clone()))
        .collect();
    assert_eq!(rows.len(), DEVICES, "every device is in the report once");
    let mut counted = BTreeMap::new();
    for d in summary["devices"].as_array().unwrap() {
        let id = d["device"].as_str().unwrap();
        let row = &rows[id];
        let outcome = row["outcome"].as_str().unwrap();
        *counted.entry(outcome.to_string()).or_insert(0) += 1;
        let said = d["outcomes"].as_array().unwrap();
        assert!(
            said.len() <= 1,
            "{id} reported {} outcomes: {d}",
            said.len()
        );
        // Offered at most once, and only devices the controller offered
        // took an offer up.
        let sent = offers.get(id).copied().unwrap_or(0);
        assert!(sent <= 1, "{id} offered {sent} times");
        assert_eq!(
            d["offers"], sent as u64,
            "{id}: offers taken up vs sent: {d}"
        );
        match said.first() {
            Some(o) => {
                assert_eq!(outcome, o["outcome"], "{id}: report {row} device {d}");
                assert_eq!(o["version"], "1.1.0", "{id}");
                assert_eq!(row["attempts"], 1, "{id}: {row}");
                assert_eq!(d["chunks_verified"], chunks, "{id}: {d}");
                if outcome == "rolled_back" {
                    assert_eq!(d["fate"], "rollback", "{id}");
                    assert_eq!(row["reason"], o["reason"], "{id}");
                } else {
                    assert_eq!(row["after"], "1.1.0", "{id}: {row}");
                }
            }
            None => {
                assert!(
                    matches!(outcome, "not_offered" | "withdrawn"),
                    "{id}: the report says {outcome}, the device reported nothing: {d}"
                );
                assert_eq!(sent, 0, "{id}");
            }
        }
    }
    counted
}

fn canary_of(f: &SimFleet) -> usize {
    SimFleet::with_fate(&f.summary(), "commit")[0]
}

fn chunks_of(bundle: &std::path::Path) -> u64 {
    beamup::bundle::Bundle::open(bundle)
        .unwrap()
        .manifest_unverified()
        .unwrap()
        .tarball
        .chunks
        .len() as u64
}

#[test]
fn three_hundred_simulated_devices_two_percent_rolling_back_trip_a_threshold_of_three() {
    let mut f = SimFleet::new(DEVICES, MIX, "200ms");
    let rollbacks = SimFleet::with_fate(&f.summary(), "rollback");
    assert_eq!(rollbacks.len(), 6, "2% of {DEVICES}");
    let bundle = f.bundle("1.1.0", PAYLOAD);
    let plan = f.plan("trip.toml", &bundle, &plan_body("trip", canary_of(&f), 3));
    let mut ctl = f.start_campaign(&plan, "controller.log");
    f.wait_campaign("trip", "paused", CAMPAIGN, |c| c["status"] == "paused");
    // The view published by the turn that paused (later ones count the
    // devices in flight that finished since).
    let view = f
        .watch
        .messages()
        .into_iter()
        .filter(|m| m.topic == "beamup/acme/campaign/trip/status" && !m.payload.is_empty())
        .map(|m| m.json())
        .find(|c| c["status"] == "paused")
        .unwrap();
    let reason = view["reason"].as_str().unwrap().to_string();
    // The decision was taken on the failures counted then: the count it
    // names is the state's own, above the limit, and no more than exist.
    let named: usize = reason
        .strip_prefix("wave rest: ")
        .and_then(|r| r.split_once(" device(s) failed, more than the 3 allowed"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("reason: {reason}"));
    assert_eq!(named, failures_in(&view, 1), "{reason}");
    assert!((4..=6).contains(&named), "{reason}");
    // Paused: the devices in flight finish, nobody new is offered.
    let offered_at_pause = f.offers_sent();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        f.offers_sent(),
        offered_at_pause,
        "offers sent while paused"
    );
    f.beamup(&["campaign", "abort", "trip", "--fleet", "acme"])
        .ok();
    assert_eq!(
        ctl.wait_exit(CAMPAIGN),
        Some(i32::from(exit::CAMPAIGN_ABORTED)),
        "{}",
        ctl.log()
    );
    let report = f.report("trip");
    let summary = f.stop_devices();
    let offers = f.offers_sent();
    let counted = check_report_against_devices(&report, &summary, &offers, chunks_of(&bundle));
    let rolled_back = counted.get("rolled_back").copied().unwrap_or(0);
    assert!(rolled_back >= named, "{counted:?}");
    assert_eq!(report["total"]["failed"], rolled_back as u64, "{counted:?}");
    assert_eq!(
        report["total"]["committed"],
        counted.get("committed").copied().unwrap_or(0) as u64
    );
    assert!(
        counted.get("not_offered").copied().unwrap_or(0) > 0,
        "the pause left no device unoffered: {counted:?}"
    );
}

#[test]
fn three_hundred_simulated_devices_two_percent_rolling_back_complete_under_a_threshold_of_six() {
    let mut f = SimFleet::new(DEVICES, MIX, "200ms");
    let bundle = f.bundle("1.1.0", PAYLOAD);
    let plan = f.plan("pass.toml", &bundle, &plan_body("pass", canary_of(&f), 6));
    let mut ctl = f.start_campaign(&plan, "controller.log");
    assert_eq!(ctl.wait_exit(CAMPAIGN), Some(0), "{}", ctl.log());
    let report = f.report("pass");
    assert_eq!(report["status"], "completed", "{}", report["reason"]);
    // `fleet status` reads every device's retained state, not the part of
    // it that came before the broker's marker or a pause. (A device's
    // outcome event may reach the controller before its new state reaches
    // the broker: the states catch up.)
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = f.beamup(&["fleet", "status", "--fleet", "acme", "--json"]);
        let rows: Vec<Value> = serde_json::from_str(&status.ok().stdout).unwrap();
        assert_eq!(
            rows.len(),
            DEVICES,
            "every device, each time: {}",
            status.stderr
        );
        let on_new = rows
            .iter()
            .filter(|r| r["online"] == true && r["state"]["running"] == "1.1.0")
            .count();
        if on_new == DEVICES - 6 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{on_new} devices online and on 1.1.0, not {}",
            DEVICES - 6
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let summary = f.stop_devices();
    let offers = f.offers_sent();
    assert_eq!(offers.len(), DEVICES, "every device was offered");
    let counted = check_report_against_devices(&report, &summary, &offers, chunks_of(&bundle));
    assert_eq!(counted.get("committed"), Some(&294), "{counted:?}");
    assert_eq!(counted.get("rolled_back"), Some(&6), "{counted:?}");
    assert_eq!(report["total"]["failed"], 6);
    assert_eq!(report["waves"][1]["failed"], 6);
    // The canary wave went first: its commit came before any other offer.
    let canary = canary_of(&f);
    let first_other = f
        .watch
        .messages()
        .iter()
        .position(|m| {
            m.topic.ends_with("/offer")
                && !m.payload.is_empty()
                && !m.topic.contains(&sim_id(canary))
        })
        .unwrap();
    let canary_commit = f
        .watch
        .messages()
        .iter()
        .position(|m| {
            m.topic == format!("beamup/acme/device/{}/state", sim_id(canary))
                && m.json()["last_outcome"]["outcome"] == "committed"
        })
        .unwrap();
    assert!(
        canary_commit < first_other,
        "offered before the canary committed"
    );
}

/// The other fates, as a controller sees them: a device restarted in the
/// middle of its transfer resumes it and commits, one that goes silent
/// while soaking and one that drops off the broker as it takes the offer
/// up time out. Each is offered once.
#[test]
fn restarted_silent_and_vanished_simulated_devices_are_judged_like_real_ones() {
    let n = 40;
    let mut f = SimFleet::new(n, "commit=0.7,restart=0.1,silent=0.1,offline=0.1", "200ms");
    let fates = f.summary();
    // Large enough that the restart comes with chunks still to fetch.
    let bundle = f.bundle("1.1.0", 1_000_000);
    let plan = f.plan(
        "fates.toml",
        &bundle,
        // Longer than a data reply lost and asked for again (the agent's
        // 5 s piece timeout): data replies are QoS 0, and a broker drops
        // some for a client that falls behind on a busy machine.
        "id = \"fates\"\n[[waves]]\nrest = true\nmax_failures = 100\n[rollout]\nmax_in_flight = 40\ndevice_timeout = \"15s\"\n",
    );
    let mut ctl = f.start_campaign(&plan, "controller.log");
    assert_eq!(ctl.wait_exit(CAMPAIGN), Some(0), "{}", ctl.log());
    let report = f.report("fates");
    let summary = f.stop_devices();
    let offers = f.offers_sent();
    let rows: BTreeMap<String, Value> = report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["device"].as_str().unwrap().to_string(), r.clone()))
        .collect();
    let chunks = chunks_of(&bundle);
    for (i, d) in summary["devices"].as_array().unwrap().iter().enumerate() {
        let id = sim_id(i);
        let row = &rows[&id];
        assert_eq!(
            offers.get(&id),
            Some(&1),
            "{id} offered {:?} times",
            offers.get(&id)
        );
        assert_eq!(d["fate"], fates["devices"][i]["fate"]);
        match d["fate"].as_str().unwrap() {
            "commit" => assert_eq!(row["outcome"], "committed", "{id}: {row}"),
            "restart" => {
                assert_eq!(row["outcome"], "committed", "{id}: {row}");
                assert_eq!(d["restarts"], 1, "{id}: {d}");
                assert_eq!(d["connections"], 2, "{id}: {d}");
                // Resumed from its bitmap: no chunk verified twice.
                assert_eq!(d["chunks_verified"], chunks, "{id}: {d}");
            }
            "silent" => {
                assert_eq!(row["outcome"], "timed_out", "{id}: {row}");
                assert!(
                    row["reason"].as_str().unwrap().contains("soaking"),
                    "{id}: {row}"
                );
                assert_eq!(d["chunks_verified"], chunks, "{id}: {d}");
            }
            "offline" => {
                assert_eq!(row["outcome"], "timed_out", "{id}: {row}");
                assert_eq!(d["chunks_verified"], 0, "{id}: {d}");
            }
            other => panic!("{id}: fate {other}"),
        }
    }
    assert_eq!(report["total"]["committed"], 32, "{}", report["total"]);
    assert_eq!(report["total"]["failed"], 8, "{}", report["total"]);
}
