//! `beamup agent`, `serve`, `offer` and `fleet` against a real mosquitto on
//! loopback and real nodes of the thermo release: offers verified before
//! any data moves, chunked transfer with corruption, broker and agent
//! crashes, outcomes reported across a broker outage, shared serving, TLS.
//! Hostile input (oversize messages among it) is in `hostile`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use beamup::error::exit;
use serde_json::Value;

use crate::support::cli::{Run, beamup};
use crate::support::device::{Device, envelope_of};
use crate::support::mqtt::{Broker, Daemon, Msg, Sub, make_certs};
use crate::support::otp::Flavor;

const OUTCOME: Duration = Duration::from_secs(90);

/// A broker, a device with an agent.toml that names it, a directory of
/// bundles, and the daemons the test starts.
struct Setup {
    broker: Broker,
    d: Device,
    serves: Vec<Daemon>,
    agent: Option<Daemon>,
    /// States, online flags and events of the fleet.
    watch: Sub,
    /// Extra `beamup` arguments naming the broker (TLS).
    broker_args: Vec<String>,
}

impl Setup {
    fn new(broker: Broker, health: &str, mqtt_extra: &str) -> Setup {
        let url = broker.url();
        Self::with(broker, &url, health, mqtt_extra, vec![])
    }

    fn with(
        broker: Broker,
        url: &str,
        health: &str,
        mqtt_extra: &str,
        broker_args: Vec<String>,
    ) -> Setup {
        Self::with_flavor(Flavor::Rebar3, broker, url, health, mqtt_extra, broker_args)
    }

    fn with_flavor(
        flavor: Flavor,
        broker: Broker,
        url: &str,
        health: &str,
        mqtt_extra: &str,
        broker_args: Vec<String>,
    ) -> Setup {
        let d = Device::with_health_flavor(flavor, health);
        d.add_mqtt(url, "gw-1", &["canary"], mqtt_extra);
        fs::create_dir(d.path().join("bundles")).unwrap();
        let watch = if broker_args.is_empty() {
            Sub::new(
                &broker,
                &[
                    "beamup/acme/device/+/state",
                    "beamup/acme/device/+/online",
                    "beamup/acme/device/+/events",
                ],
            )
        } else {
            Sub::new(&broker, &[]) // TLS: watched through `fleet status`
        };
        Setup {
            broker,
            d,
            serves: vec![],
            agent: None,
            watch,
            broker_args,
        }
    }

    fn url_args(&self) -> Vec<String> {
        if self.broker_args.is_empty() {
            vec!["--broker".into(), self.broker.url()]
        } else {
            self.broker_args.clone()
        }
    }

    /// A bundle in the served directory.
    fn bundle(&self, vsn: &str, extra: &[&str]) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("bundles/thermo-{vsn}-{n}.bundle");
        self.d.bundle_with(vsn, &name, extra)
    }

    fn serve(&mut self, env: &[(&str, &str)]) {
        let n = self.serves.len();
        let mut args = vec!["serve".to_string()];
        args.extend(self.url_args());
        args.extend(["--fleet", "acme", "--bundles", "bundles"].map(String::from));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let s = Daemon::start(self.d.path(), &format!("serve-{n}.log"), &args, env);
        s.wait_log("serving requests on", Duration::from_secs(20));
        self.serves.push(s);
    }

    fn start_agent(&mut self) {
        self.start_agent_env(&[]);
    }

    fn start_agent_env(&mut self, env: &[(&str, &str)]) {
        let a = Daemon::start(
            self.d.path(),
            "agent.log",
            &["agent", "--config", "agent.toml"],
            env,
        );
        self.agent = Some(a);
    }

    fn agent(&self) -> &Daemon {
        self.agent.as_ref().expect("agent started")
    }

    fn beamup(&self, args: &[&str]) -> Run {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend(self.url_args());
        all.extend(["--fleet".into(), "acme".into()]);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        beamup(self.d.path(), &all)
    }

    fn offer(&self, bundle: &Path) {
        self.beamup(&["offer", bundle.to_str().unwrap(), "--device", "gw-1"])
            .ok();
    }

    fn offer_group(&self, bundle: &Path, group: &str) {
        self.beamup(&["offer", bundle.to_str().unwrap(), "--group", group])
            .ok();
    }

    /// The first retained state of gw-1 in `phase` (and `version`).
    #[track_caller]
    fn wait_phase(&self, phase: &str, version: &str) -> Value {
        self.watch
            .wait_for(&format!("state {phase} {version}"), OUTCOME, |m| {
                m.topic == "beamup/acme/device/gw-1/state"
                    && m.json()["phase"]["name"] == phase
                    && m.json()["phase"]["version"] == version
            })
            .json()
    }

    fn events(&self) -> Vec<Value> {
        self.watch
            .messages()
            .iter()
            .filter(|m| m.topic == "beamup/acme/device/gw-1/events")
            .map(Msg::json)
            .collect()
    }

    fn outcomes(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["kind"] == "outcome")
            .collect()
    }

    /// Until the agent's journal (state.json) shows the install in
    /// progress at `phase`.
    #[track_caller]
    fn wait_journal_phase(&self, phase: &str) {
        let deadline = Instant::now() + OUTCOME;
        while self.state_file()["current"]["phase"] != phase {
            assert!(Instant::now() < deadline, "{}", self.agent().log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn state_file(&self) -> Value {
        let text = fs::read_to_string(self.d.path().join("state/state.json")).unwrap_or_default();
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// Verified chunks in the download's bitmap: (indexes, total).
    fn bitmap(&self) -> (Vec<usize>, usize) {
        let Ok(b) = fs::read(self.d.path().join("state/agent/download/chunks.bitmap")) else {
            return (vec![], 0);
        };
        if b.len() < 40 {
            return (vec![], 0);
        }
        let n = u32::from_be_bytes(b[36..40].try_into().unwrap()) as usize;
        let set = (0..n)
            .filter(|i| b[40 + i / 8] & (1 << (i % 8)) != 0)
            .collect();
        (set, n)
    }

    #[track_caller]
    fn wait_bitmap(&self, percent: usize) -> (Vec<usize>, usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (set, n) = self.bitmap();
            if n > 0 && set.len() * 100 >= n * percent {
                assert!(
                    set.len() < n,
                    "the transfer finished too fast to interrupt it"
                );
                return (set, n);
            }
            assert!(
                Instant::now() < deadline,
                "download never reached {percent}%\n{}",
                self.agent().log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The chunks of every reply asked for (a request may ask for several
/// adjacent pieces).
fn requested_chunks(sub: &Sub, chunk_size: u64) -> Vec<u64> {
    requested_pieces(sub)
        .iter()
        .map(|(offset, _)| offset / chunk_size)
        .collect()
}

/// (offset, len) of every reply asked for.
fn requested_pieces(sub: &Sub) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for m in sub.messages() {
        if m.topic != "beamup/acme/req/gw-1" {
            continue;
        }
        let r = m.json();
        let (offset, len) = (r["offset"].as_u64().unwrap(), r["len"].as_u64().unwrap());
        let piece = r["piece"].as_u64().unwrap_or(len);
        let mut at = 0;
        while at < len {
            out.push((offset + at, piece.min(len - at)));
            at += piece;
        }
    }
    out
}

#[test]
fn offer_downloads_hot_upgrades_and_reports_committed() {
    let mut s = Setup::new(Broker::start(), "timeout = \"8s\"\nsoak = \"1s\"", "");
    s.d.node.incr().unwrap();
    s.d.node.incr().unwrap();
    let pid = s.d.node.os_pid();
    let bundle = s.bundle("1.1.0", &[]);
    s.serve(&[]);
    s.start_agent();
    s.offer(&bundle);

    let st = s.wait_phase("committed", "1.1.0");
    assert_eq!(st["running"], "1.1.0", "{st:#}");
    assert_eq!(st["permanent"], "1.1.0", "{st:#}");
    assert_eq!(st["last_outcome"]["outcome"], "committed", "{st:#}");
    assert_eq!(st["agent_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s.d.version_and_counter(), ("1.1.0".into(), 2));
    let (_, body) = s.d.health();
    assert_eq!(body["os_pid"].as_str().unwrap(), pid.to_string(), "hot");
    s.d.assert_settled_on("1.1.0", &[]);

    // The events tell the story in order, and committed comes last.
    let events = s.events();
    let phases: Vec<&str> = events.iter().filter_map(|e| e["phase"].as_str()).collect();
    let pos = |p: &str| {
        phases
            .iter()
            .position(|x| *x == p)
            .unwrap_or_else(|| panic!("no {p} event: {phases:?}"))
    };
    assert!(pos("downloading") < pos("unpacking"), "{phases:?}");
    assert!(pos("unpacking") < pos("soaking"), "{phases:?}");
    assert!(pos("soaking") < pos("committed"), "{phases:?}");
    let o = s.outcomes();
    assert_eq!(o.len(), 1, "{o:#?}");
    assert_eq!(o[0]["version"], "1.1.0");
    // The transfer's data never touched the broker as a retained message.
    assert!(
        s.watch
            .messages()
            .iter()
            .all(|m| !m.topic.ends_with("/data"))
    );

    // The operator's view.
    let run = s.beamup(&["fleet", "status", "--json"]);
    run.ok();
    let rows: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(rows[0]["device"], "gw-1", "{rows:#}");
    assert_eq!(rows[0]["online"], true, "{rows:#}");
    assert_eq!(rows[0]["state"]["running"], "1.1.0", "{rows:#}");
    let run = s.beamup(&["fleet", "status"]);
    run.ok();
    assert!(run.stdout.contains("gw-1"), "{}", run.stdout);
    assert!(run.stdout.contains("committed 1.1.0"), "{}", run.stdout);
    // beamup status works beside the running agent (no lock needed).
    assert_eq!(s.d.status()["last_outcome"]["outcome"], "committed");

    // Idle, the agent sleeps: its timer wakes it about once a second, not
    // ten times (a cost in power on a device, for nothing).
    std::thread::sleep(Duration::from_secs(1));
    let before = s.agent().wakeups();
    std::thread::sleep(Duration::from_secs(4));
    let woke = s.agent().wakeups() - before;
    assert!(woke <= 20, "{woke} wake-ups in 4 s while idle");

    // A graceful stop says the device went offline.
    let code = s.agent.as_mut().unwrap().term(Duration::from_secs(20));
    assert_eq!(code, Some(0), "{}", s.agent().log());
    s.watch.wait_for("offline", Duration::from_secs(10), |m| {
        m.topic == "beamup/acme/device/gw-1/online" && m.json()["online"] == false
    });
}

/// The chunks holding a byte of the parts of `units` in `bundle`'s
/// (indexed) tarball, and how many chunks it has in all.
fn chunks_of_units(bundle: &Path, units: &[&str]) -> (std::collections::BTreeSet<u64>, usize) {
    let m = beamup::bundle::Bundle::open(bundle)
        .unwrap()
        .manifest_unverified()
        .unwrap();
    assert!(!m.tarball.parts.is_empty(), "not an indexed bundle");
    let cs = u64::from(m.tarball.chunk_size);
    let mut out = std::collections::BTreeSet::new();
    for u in units {
        let part = m
            .tarball
            .parts
            .iter()
            .find(|p| p.unit == *u)
            .unwrap_or_else(|| panic!("no part for {u}"));
        out.extend(part.offset / cs..=(part.offset + part.size - 1) / cs);
    }
    (out, m.tarball.chunks.len())
}

/// The units a hot upgrade of thermo from 1.0.0 to 1.1.0 adds: everything
/// else (kernel, stdlib, sasl, ERTS) the device has.
const UNITS_1_1_0: [&str; 3] = ["lib/thermo-1.1.0", "releases/1.1.0", "bin/thermo-1.1.0"];

#[test]
fn indexed_offer_fetches_only_the_units_the_device_lacks() {
    let mut s = Setup::new(Broker::start(), "timeout = \"8s\"\nsoak = \"1s\"", "");
    let requests = Sub::new(&s.broker, &["beamup/acme/req/#"]);
    s.d.node.incr().unwrap();
    let pid = s.d.node.os_pid();
    let bundle = s.bundle("1.1.0", &[]);
    let (want, total) = chunks_of_units(&bundle, &UNITS_1_1_0);
    s.serve(&[]);
    s.start_agent();
    s.offer(&bundle);

    let st = s.wait_phase("committed", "1.1.0");
    assert_eq!(st["running"], "1.1.0", "{st:#}");
    let (_, body) = s.d.health();
    assert_eq!(body["os_pid"].as_str().unwrap(), pid.to_string(), "hot");
    assert_eq!(s.d.version_and_counter(), ("1.1.0".into(), 1));
    s.d.assert_settled_on("1.1.0", &[]);

    // Exactly the chunks of the new units were asked for: a small part of
    // the tarball.
    let asked: std::collections::BTreeSet<u64> =
        requested_chunks(&requests, 65536).into_iter().collect();
    assert_eq!(asked, want, "of {total} chunks");
    assert!(
        want.len() * 10 <= total,
        "{} of {total} chunks needed",
        want.len()
    );
    let log = s.agent().log();
    assert!(
        log.contains(&format!("{} of {total} chunks (", want.len()))
            && log.contains("units the release already has are not fetched"),
        "{log}"
    );

    // Progress counts the needed chunks: every percent reported is a
    // share of them (over the whole tarball it would stay near 0).
    let n = want.len();
    let shares: Vec<u64> = (0..=n).map(|k| (k * 100 / n) as u64).collect();
    let mut reported: Vec<u64> = s
        .events()
        .iter()
        .filter(|e| e["phase"] == "downloading")
        .filter_map(|e| e["percent"].as_u64())
        .collect();
    reported.extend(
        s.watch
            .messages()
            .iter()
            .filter(|m| m.topic == "beamup/acme/device/gw-1/state")
            .map(Msg::json)
            .filter(|j| j["phase"]["name"] == "downloading")
            .filter_map(|j| j["phase"]["percent"].as_u64()),
    );
    assert!(
        reported.iter().all(|p| shares.contains(p) || p % 25 == 0),
        "{reported:?} (shares of {n}: {shares:?})"
    );
    if n >= 2 {
        assert!(reported.iter().any(|&p| p >= 25), "{reported:?}");
    }
}

#[test]
fn agent_killed_mid_partial_transfer_resumes_with_the_same_needed_chunks() {
    let mut s = Setup::new(Broker::start(), "timeout = \"8s\"\nsoak = \"1s\"", "");
    let requests = Sub::new(&s.broker, &["beamup/acme/req/#"]);
    // A leftover of an install beamup did not journal: the install removes
    // it before unpacking, so its unit is fetched all the same.
    let leftover = s.d.node.root().join("lib/thermo-1.1.0");
    fs::create_dir_all(leftover.join("ebin")).unwrap();
    fs::write(leftover.join("ebin/thermo.app"), "junk").unwrap();
    // Small chunks: most of lib/thermo-1.1.0 has chunks of its own.
    let bundle = s.bundle("1.1.0", &["--chunk-size", "4096"]);
    let (want, total) = chunks_of_units(&bundle, &UNITS_1_1_0);
    let (others, _) = chunks_of_units(&bundle, &UNITS_1_1_0[1..]);
    assert!(want.len() >= 8, "{} chunks needed", want.len());
    assert!(want.len() >= others.len() + 3, "{want:?} {others:?}");
    s.serve(&[("BEAMUP_SERVE_FAULTS", "delay:300")]);
    s.start_agent();
    s.offer(&bundle);
    // Some of the needed chunks are in (and named by the bitmap), not all.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (set, n) = s.bitmap();
        if !set.is_empty() {
            assert_eq!(n, total);
            assert!(
                set.len() < want.len(),
                "the transfer finished too fast to interrupt it"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{}", s.agent().log());
        std::thread::sleep(Duration::from_millis(10));
    }
    s.agent.as_mut().unwrap().kill9();
    let have: std::collections::BTreeSet<u64> =
        s.bitmap().0.into_iter().map(|c| c as u64).collect();
    assert!(
        !have.is_empty() && have.is_subset(&want),
        "{have:?} {want:?}"
    );
    let before: std::collections::BTreeSet<u64> =
        requested_chunks(&requests, 4096).into_iter().collect();
    assert!(before.is_subset(&want), "{before:?}");

    let again = Sub::new(&s.broker, &["beamup/acme/req/#"]);
    s.start_agent();
    s.wait_phase("committed", "1.1.0");
    s.agent().wait_log("resuming at", Duration::from_secs(1));
    let after: std::collections::BTreeSet<u64> =
        requested_chunks(&again, 4096).into_iter().collect();
    let missing: std::collections::BTreeSet<u64> = want.difference(&have).copied().collect();
    assert_eq!(after, missing, "asked after the restart");
    s.d.assert_settled_on("1.1.0", &[]);
    assert_ne!(
        fs::read_to_string(leftover.join("ebin/thermo.app")).unwrap(),
        "junk"
    );
    // The plan was right the first time: the install found every chunk it
    // reads.
    let log = s.agent().log();
    assert!(!log.contains("incomplete download"), "{log}");
    assert!(!log.contains("more chunks are needed"), "{log}");
}

#[test]
fn sigterm_during_an_install_lets_it_reach_its_outcome() {
    let mut s = Setup::new(Broker::start(), "timeout = \"20s\"\nsoak = \"3s\"", "");
    let bundle = s.bundle("1.1.0", &[]);
    s.serve(&[]);
    s.start_agent();
    s.offer(&bundle);
    s.wait_journal_phase("soaking");
    let code = s.agent.as_mut().unwrap().term(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", s.agent().log());
    assert!(
        s.agent()
            .log()
            .contains("letting the install in progress reach its outcome"),
        "{}",
        s.agent().log()
    );
    assert_eq!(s.state_file()["history"][0]["outcome"], "committed");
    assert!(s.state_file()["current"].is_null());
    // The outcome went out before the agent left.
    s.watch
        .wait_for("committed event", Duration::from_secs(5), |m| {
            m.topic.ends_with("/events") && m.json()["phase"] == "committed"
        });
    s.d.assert_settled_on("1.1.0", &[]);
}

/// The agent killed with -9 in the middle of a hot install (`crash`: the
/// journal point it dies at), started again, stopped with SIGTERM while it
/// deals with what it found, and started once more, as systemd would. The
/// offer gets exactly one outcome event, and that outcome is what the node
/// runs and has permanent.
fn agent_killed_mid_install_then_stopped_reports_one_outcome(crash: &str) {
    let mut s = Setup::new(Broker::start(), "timeout = \"20s\"\nsoak = \"2s\"", "");
    let bundle = s.bundle("1.1.0", &[]);
    s.serve(&[]);
    s.start_agent_env(&[("BEAMUP_CRASH", crash)]);
    s.offer(&bundle);
    assert_eq!(
        s.agent.as_mut().unwrap().wait_exit(OUTCOME),
        None,
        "the agent was to kill itself at {crash}"
    );
    assert!(
        s.agent().log().contains(&format!("BEAMUP_CRASH={crash}")),
        "{}",
        s.agent().log()
    );

    // Started again, it undoes the interrupted install and takes the
    // download it left up again; SIGTERM comes during that second soak.
    s.start_agent();
    s.agent()
        .wait_log("recovered an interrupted install", Duration::from_secs(60));
    s.wait_journal_phase("soaking");
    let code = s.agent.as_mut().unwrap().term(Duration::from_secs(60));
    assert_eq!(code, Some(0), "{}", s.agent().log());
    s.start_agent();

    // Quiet: no install in progress, an outcome on record, and time for
    // any further event to arrive.
    let deadline = Instant::now() + OUTCOME;
    loop {
        let st = s.state_file();
        let last = st["history"][0]["outcome"].as_str().unwrap_or("");
        if st["current"].is_null() && (last == "committed" || last == "rolled_back") {
            break;
        }
        assert!(Instant::now() < deadline, "{st:#}\n{}", s.agent().log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(3));

    let outcomes = s.outcomes();
    assert_eq!(
        outcomes.len(),
        1,
        "one offer, one outcome: {outcomes:#?}\n{}",
        s.agent().log()
    );
    let o = &outcomes[0];
    let on = match o["phase"].as_str() {
        Some("committed") => "1.1.0",
        Some("rolled_back") => "1.0.0",
        other => panic!("outcome {other:?}: {o:#}"),
    };
    assert_eq!(o["version"], "1.1.0", "{o:#}");
    s.d.assert_settled_on(on, &[]);
    let st = s.d.status();
    assert_eq!(st["last_outcome"]["outcome"], o["phase"], "{st:#}");
    assert_eq!(st["last_outcome"]["sequence"], o["sequence"], "{st:#}");
}

#[test]
fn agent_killed_before_install_release_then_stopped_reports_one_outcome() {
    agent_killed_mid_install_then_stopped_reports_one_outcome("installing");
}

#[test]
fn agent_killed_after_install_release_then_stopped_reports_one_outcome() {
    agent_killed_mid_install_then_stopped_reports_one_outcome("installing+");
}

#[test]
fn agent_killed_while_soaking_then_stopped_reports_one_outcome() {
    agent_killed_mid_install_then_stopped_reports_one_outcome("soaking");
}

#[test]
fn unhealthy_release_is_rolled_back_reported_and_not_retried_until_asked() {
    let mut s = Setup::new(Broker::start(), "timeout = \"6s\"\nsoak = \"1s\"", "");
    s.d.node.incr().unwrap();
    let bundle = s.bundle("1.2.0", &[]);
    s.serve(&[]);
    s.start_agent();
    s.offer_group(&bundle, "canary");

    let st = s.wait_phase("rolled_back", "1.2.0");
    let reason = st["last_outcome"]["reason"].as_str().unwrap();
    assert!(reason.contains("status 503"), "{reason}");
    assert_eq!(st["running"], "1.0.0", "{st:#}");
    s.d.assert_settled_on("1.0.0", &["1.2.0"]);
    assert_eq!(s.d.version_and_counter(), ("1.0.0".into(), 1));

    // Restarted, the agent gets the retained offer again and leaves it be.
    s.agent.as_mut().unwrap().kill9();
    s.start_agent();
    s.agent()
        .wait_log("was decided before; ignored", Duration::from_secs(30));
    let downloads = |s: &Setup| {
        s.events()
            .iter()
            .filter(|e| e["phase"] == "downloading" && e["percent"] == 0)
            .count()
    };
    assert_eq!(downloads(&s), 1);

    // An explicit retry installs it once more (and it fails again).
    s.beamup(&["fleet", "retry", "--device", "gw-1"]).ok();
    s.watch.wait_for("a second rollback", OUTCOME, |_| {
        s.outcomes()
            .iter()
            .filter(|o| o["phase"] == "rolled_back")
            .count()
            == 2
    });
    assert_eq!(downloads(&s), 2);
    s.d.assert_settled_on("1.0.0", &["1.2.0"]);
}

/// The agent on an Elixir root exactly as `mix release` leaves it: an
/// unhealthy release offered over MQTT is rolled back hot (same OS
/// process, state kept), then a cold-only release commits through the
/// start_erl.data switch, and the root boots it from disk.
#[test]
fn the_agent_on_a_mix_root_rolls_back_hot_then_commits_a_cold_upgrade() {
    let broker = Broker::start();
    let url = broker.url();
    let mut s = Setup::with_flavor(
        Flavor::Mix,
        broker,
        &url,
        "timeout = \"6s\"\nsoak = \"1s\"",
        "",
        vec![],
    );
    s.d.node.incr().unwrap();
    let pid = s.d.node.os_pid();
    let unhealthy = s.bundle("1.2.0", &[]);
    s.serve(&[]);
    s.start_agent();
    s.offer(&unhealthy);
    let st = s.wait_phase("rolled_back", "1.2.0");
    assert_eq!(st["running"], "1.0.0", "{st:#}");
    assert_eq!(s.d.version_and_counter(), ("1.0.0".into(), 1));
    let (_, body) = s.d.health();
    assert_eq!(body["os_pid"].as_str().unwrap(), pid.to_string(), "hot");
    s.d.assert_settled_on("1.0.0", &["1.2.0"]);

    let cold = s.bundle("2.0.0", &[]);
    s.offer(&cold);
    let st = s.wait_phase("committed", "2.0.0");
    assert_eq!(st["permanent"], "2.0.0", "{st:#}");
    let (_, body) = s.d.health();
    assert_ne!(body["os_pid"].as_str().unwrap(), pid.to_string(), "cold");
    s.d.assert_settled_on("2.0.0", &[]);
    s.d.assert_boots_permanent();
    assert_eq!(s.d.version_and_counter().0, "2.0.0");
}

#[test]
fn bad_offers_are_rejected_before_any_data_is_requested() {
    let mut s = Setup::new(Broker::start(), "timeout = \"8s\"\nsoak = \"1s\"", "");
    let requests = Sub::new(&s.broker, &["beamup/acme/req/#"]);
    let before = s.d.snapshot();
    s.start_agent();

    beamup(s.d.path(), &["keygen", "--out", "other", "--name", "x"]).ok();
    let forged = s.bundle("1.1.0", &["--key", "other/x.key"]);
    let expired = s.bundle("1.1.0", &["--expires", "1s"]);
    let wrong_target = s.bundle("1.1.0", &["--target", "device:gw-2"]);
    let downgrade = s.bundle("1.0.0", &[]);
    std::thread::sleep(Duration::from_millis(1100)); // let `expired` expire
    // Forged: nothing in it can be believed, so it names no release; it is
    // discarded (counted in the state), not an outcome.
    s.offer(&forged);
    let st = s
        .watch
        .wait_for("forged offer discarded", Duration::from_secs(30), |m| {
            m.topic == "beamup/acme/device/gw-1/state" && m.json()["discarded"]["count"] == 1
        });
    let st = st.json();
    assert!(
        st["discarded"]["reason"]
            .as_str()
            .unwrap()
            .contains("does not trust"),
        "{st:#}"
    );
    assert!(st["last_outcome"].is_null(), "{st:#}");
    // Nor is it a phase: the device is as idle as before.
    assert_eq!(st["phase"]["name"], "idle", "{st:#}");
    assert!(s.outcomes().is_empty());
    let cases = [
        (expired, "expired at"),
        (wrong_target, "does not include this device (device:gw-1"),
        (downgrade, "not newer than the installed release 1.0.0"),
    ];
    for (i, (bundle, needle)) in cases.iter().enumerate() {
        if i % 2 == 0 {
            s.offer(bundle);
        } else {
            s.offer_group(bundle, "canary");
        }
        s.watch
            .wait_for(needle, Duration::from_secs(30), |_| s.outcomes().len() > i);
        let o = &s.outcomes()[i];
        assert_eq!(o["phase"], "rejected", "{o:#}");
        assert!(o["reason"].as_str().unwrap().contains(needle), "{o:#}");
    }
    let st = s.wait_phase("rejected", "1.0.0");
    assert!(
        st["last_outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("not newer"),
        "{st:#}"
    );
    // Not a single data request left the device, nothing was downloaded.
    std::thread::sleep(Duration::from_millis(300));
    assert!(requested_pieces(&requests).is_empty());
    assert!(!s.d.path().join("state/agent/download").exists());
    assert_eq!(s.d.snapshot(), before, "the release root changed");
    assert_eq!(s.d.status()["last_outcome"]["outcome"], "rejected");
    assert_eq!(s.d.version_and_counter().0, "1.0.0");
}

#[test]
fn corrupt_duplicated_and_stray_chunks_are_handled_over_mqtt_3_1_1() {
    let mut s = Setup::new(
        Broker::start(),
        "timeout = \"8s\"\nsoak = \"1s\"",
        "version = \"3.1.1\"",
    );
    let requests = Sub::new(&s.broker, &["beamup/acme/req/#"]);
    // One gzip stream: every chunk is needed, chunks 2, 3 and 5 included.
    let bundle = s.bundle("1.1.0", &["--chunk-size", "65536", "--keep-tarball"]);
    s.serve(&[("BEAMUP_SERVE_FAULTS", "corrupt:2,dup:3,stray:5")]);
    s.start_agent();
    s.offer(&bundle);
    let st = s.wait_phase("committed", "1.1.0");
    assert_eq!(st["running"], "1.1.0");
    let log = s.agent().log();
    assert!(
        log.contains("chunk 2 failed its SHA-256; fetching it again"),
        "{log}"
    );
    let chunks = requested_chunks(&requests, 65536);
    assert_eq!(chunks.iter().filter(|&&c| c == 2).count(), 2, "{chunks:?}");
    assert!(log.contains("ignored: not requested"), "{log}");
    s.d.assert_settled_on("1.1.0", &[]);
}

#[test]
fn broker_killed_mid_transfer_then_the_transfer_resumes() {
    let mut s = Setup::new(Broker::start(), "timeout = \"8s\"\nsoak = \"1s\"", "");
    // One gzip stream: every chunk is needed, a transfer long enough to
    // interrupt.
    let bundle = s.bundle("1.1.0", &["--chunk-size", "16384", "--keep-tarball"]);
    s.serve(&[("BEAMUP_SERVE_FAULTS", "delay:8")]);
    s.start_agent();
    s.offer(&bundle);
    s.wait_bitmap(15);
    s.broker.kill();
    std::thread::sleep(Duration::from_millis(1500));
    s.broker.restart();
    let watch = Sub::new(&s.broker, &["beamup/acme/device/+/state"]);
    watch.wait_for("committed after the broker restart", OUTCOME, |m| {
        m.json()["phase"]["name"] == "committed"
    });
    let log = s.agent().log();
    assert!(log.contains("lost the broker connection"), "{log}");
    assert!(log.matches("connected to").count() >= 2, "{log}");
    s.d.assert_settled_on("1.1.0", &[]);
}

#[test]
fn agent_killed_mid_transfer_resumes_without_fetching_chunks_again() {
    let mut s = Setup::new(Broker::start(), "timeout = \"8s\"\nsoak = \"1s\"", "");
    // One gzip stream: every chunk is needed, a transfer long enough to
    // interrupt.
    let bundle = s.bundle("1.1.0", &["--chunk-size", "16384", "--keep-tarball"]);
    s.serve(&[("BEAMUP_SERVE_FAULTS", "delay:8")]);
    s.start_agent();
    s.offer(&bundle);
    s.wait_bitmap(20);
    s.agent.as_mut().unwrap().kill9();
    let (have, total) = s.bitmap();
    assert!(!have.is_empty() && have.len() < total);

    let requests = Sub::new(&s.broker, &["beamup/acme/req/#"]);
    s.start_agent();
    s.wait_phase("committed", "1.1.0");
    s.agent().wait_log("resuming at", Duration::from_secs(1));
    let again: Vec<u64> = requested_chunks(&requests, 16384);
    assert!(!again.is_empty());
    let refetched: Vec<&u64> = again
        .iter()
        .filter(|c| have.contains(&(**c as usize)))
        .collect();
    assert!(
        refetched.is_empty(),
        "chunks verified before the kill were requested again: {refetched:?}"
    );
    s.d.assert_settled_on("1.1.0", &[]);
}

#[test]
fn outcome_is_reported_after_the_broker_was_down_at_commit() {
    let mut s = Setup::new(Broker::persistent(), "timeout = \"20s\"\nsoak = \"3s\"", "");
    let events = Sub::with_session(
        &s.broker,
        &["beamup/acme/device/gw-1/events"],
        Some("test-events-listener"),
    );
    let bundle = s.bundle("1.1.0", &[]);
    s.serve(&[]);
    s.start_agent();
    s.offer(&bundle);
    // Soaking: the broker goes away, the install goes on.
    let deadline = Instant::now() + OUTCOME;
    s.wait_journal_phase("soaking");
    s.broker.stop();
    while s.state_file()["history"][0]["outcome"] != "committed" {
        assert!(Instant::now() < deadline, "{}", s.agent().log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // Committed while the broker was away: the outcome waits in the outbox.
    // (The engine records the commit in state.json first; the agent queues
    // the event when the engine returns, a moment later.)
    let outbox = s.d.path().join("state/agent/outbox");
    let queued = || -> Vec<String> {
        fs::read_dir(&outbox)
            .unwrap()
            .map(|e| fs::read_to_string(e.unwrap().path()).unwrap_or_default())
            .collect()
    };
    while !queued().iter().any(|e| e.contains("committed")) {
        assert!(Instant::now() < deadline, "{:?}", queued());
        std::thread::sleep(Duration::from_millis(20));
    }
    s.broker.restart();
    let o = events.wait_for("the committed outcome", OUTCOME, |m| {
        m.json()["kind"] == "outcome"
    });
    assert_eq!(o.json()["phase"], "committed", "{:#}", o.json());
    let deadline = Instant::now() + Duration::from_secs(20);
    while fs::read_dir(&outbox).unwrap().count() > 0 {
        assert!(Instant::now() < deadline, "the outbox was not emptied");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.d.assert_settled_on("1.1.0", &[]);
}

#[test]
fn two_servers_share_the_load_within_the_brokers_packet_size() {
    // MQTT 5: the broker announces a Maximum Packet Size smaller than a
    // 64 KiB chunk, so the device asks for each chunk in pieces.
    let mut s = Setup::new(
        Broker::start_with("max_packet_size 30000\n"),
        "timeout = \"8s\"\nsoak = \"1s\"",
        "",
    );
    let requests = Sub::new(&s.broker, &["beamup/acme/req/#"]);
    // One gzip stream: every chunk is needed.
    let bundle = s.bundle("1.1.0", &["--chunk-size", "65536", "--keep-tarball"]);
    s.serve(&[("BEAMUP_SERVE_FAULTS", "delay:1")]);
    s.serve(&[("BEAMUP_SERVE_FAULTS", "delay:1")]);
    s.start_agent();
    s.offer(&bundle);
    s.wait_phase("committed", "1.1.0");
    let counts: Vec<usize> = s
        .serves
        .iter()
        .map(|d| d.log().matches("served device=gw-1").count())
        .collect();
    assert!(counts.iter().all(|&c| c > 20), "{counts:?}");
    // 97 full chunks in 3 pieces each, and a short last one.
    assert!(counts.iter().sum::<usize>() > 97 * 3, "{counts:?}");
    let lens: Vec<u64> = requested_pieces(&requests).iter().map(|p| p.1).collect();
    assert!(lens.iter().all(|&l| l < 30000), "{lens:?}");
    s.d.assert_settled_on("1.1.0", &[]);
}

#[test]
fn tls_with_client_certificates() {
    let certs = tempfile::tempdir().unwrap();
    let (tls, cert, key) = make_certs(certs.path(), "gw-1");
    let broker = Broker::tls(&tls);
    let url = broker.tls_url();
    let mqtt_extra = format!(
        "ca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"",
        tls.ca.display(),
        cert.display(),
        key.display()
    );
    let args: Vec<String> = [
        "--broker",
        &url,
        "--ca-file",
        tls.ca.to_str().unwrap(),
        "--cert-file",
        cert.to_str().unwrap(),
        "--key-file",
        key.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    let mut s = Setup::with(
        broker,
        &url,
        "timeout = \"8s\"\nsoak = \"1s\"",
        &mqtt_extra,
        args,
    );
    let bundle = s.bundle("1.1.0", &[]);
    s.serve(&[]);
    s.start_agent();
    s.offer(&bundle);
    let deadline = Instant::now() + OUTCOME;
    loop {
        let run = s.beamup(&["fleet", "status", "--json"]);
        run.ok();
        let rows: Value = serde_json::from_str(&run.stdout).unwrap();
        if rows[0]["state"]["phase"]["name"] == "committed" {
            assert_eq!(rows[0]["state"]["running"], "1.1.0");
            break;
        }
        assert!(Instant::now() < deadline, "{rows:#}\n{}", s.agent().log());
        std::thread::sleep(Duration::from_millis(500));
    }
    s.d.assert_settled_on("1.1.0", &[]);
    // Without a client certificate the broker lets nobody in.
    let run = beamup(
        s.d.path(),
        &[
            "fleet",
            "status",
            "--broker",
            &url,
            "--ca-file",
            tls.ca.to_str().unwrap(),
            "--fleet",
            "acme",
        ],
    );
    assert_ne!(run.code, 0, "{}", run.stdout);
}

#[test]
fn username_and_password_login() {
    let auth = tempfile::tempdir().unwrap();
    let passwd = auth.path().join("passwd");
    crate::support::mqtt::password_file(
        &passwd,
        &[("gw-1", "gw1-Secret-7f3a"), ("operator", "op-Secret-91c2")],
    );
    let broker = Broker::with_passwords(&passwd);
    let url = broker.url();
    let d = Device::new();
    let secret = d.path().join("mqtt-password");
    let write_secret = |text: &str, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        fs::write(&secret, text).unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(mode)).unwrap();
    };
    write_secret("gw1-Secret-7f3a\n", 0o600);
    d.add_mqtt(
        &url,
        "gw-1",
        &[],
        &format!(
            "username = \"gw-1\"\npassword_file = \"{}\"",
            secret.display()
        ),
    );
    let op = auth.path().join("operator-password");
    fs::write(&op, "op-Secret-91c2\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&op, fs::Permissions::from_mode(0o600)).unwrap();
    }
    let fleet = |extra: &[&str]| {
        let mut args = vec!["fleet", "status", "--broker", &url, "--fleet", "acme"];
        args.extend(extra);
        beamup(d.path(), &args)
    };
    let op_login = [
        "--username",
        "operator",
        "--password-file",
        op.to_str().unwrap(),
    ];
    let log_everything = [("RUST_LOG", "trace")];

    // The right password: the agent connects and publishes its state.
    let watch = Sub::login(
        &broker,
        &[
            "beamup/acme/device/gw-1/state",
            "beamup/acme/device/gw-1/online",
        ],
        "operator",
        "op-Secret-91c2",
    );
    let mut agent = Daemon::start(
        d.path(),
        "agent.log",
        &["agent", "--config", "agent.toml"],
        &log_everything,
    );
    let state = watch
        .wait_for("gw-1's retained state", OUTCOME, |m| {
            m.topic == "beamup/acme/device/gw-1/state" && m.json()["running"] == "1.0.0"
        })
        .json();
    assert_eq!(state["device"], "gw-1");
    watch.wait_for("gw-1 online", OUTCOME, |m| {
        m.topic == "beamup/acme/device/gw-1/online" && m.json()["online"] == true
    });
    let run = fleet(&op_login);
    run.ok();
    assert!(run.stdout.contains("gw-1"), "{}", run.stdout);
    assert_eq!(
        agent.term(Duration::from_secs(30)),
        Some(0),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert!(log.contains("connected to"), "{log}");
    assert!(
        !log.contains("gw1-Secret-7f3a"),
        "the password was logged:\n{log}"
    );

    // Without credentials, or with a wrong password, the broker refuses us:
    // exit code 31, one error line that says what was presented and what
    // to check, and never the password.
    fleet(&[]).fails(
        exit::MQTT_AUTH as i32,
        "refused our credentials: not authorized (CONNACK NotAuthorized): we sent none",
    );
    write_secret("not-the-gw1-password\n", 0o600);
    let run = fleet(&[
        "--username",
        "gw-1",
        "--password-file",
        secret.to_str().unwrap(),
    ]);
    run.fails(
        exit::MQTT_AUTH as i32,
        &format!("username \"gw-1\", password from {}", secret.display()),
    );
    assert!(
        !run.stderr.contains("not-the-gw1-password"),
        "{}",
        run.stderr
    );
    let mut agent = Daemon::start(
        d.path(),
        "agent-refused.log",
        &["agent", "--config", "agent.toml"],
        &log_everything,
    );
    assert_eq!(
        agent.wait_exit(Duration::from_secs(30)),
        Some(exit::MQTT_AUTH as i32),
        "{}",
        agent.log()
    );
    let log = agent.log();
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("beamup: error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    for needle in [
        format!("MQTT broker {url} refused our credentials"),
        "(CONNACK NotAuthorized)".into(),
        "username \"gw-1\"".into(),
        format!("password from {}", secret.display()),
        "mosquitto_passwd".into(),
    ] {
        assert!(
            errors[0].contains(&needle),
            "{needle:?} not in {}",
            errors[0]
        );
    }
    assert!(
        !log.contains("not-the-gw1-password"),
        "the password was logged:\n{log}"
    );

    // A password file other users can read is refused before connecting.
    write_secret("gw1-Secret-7f3a\n", 0o644);
    let mut agent = Daemon::start(
        d.path(),
        "agent-mode.log",
        &["agent", "--config", "agent.toml"],
        &log_everything,
    );
    assert_eq!(
        agent.wait_exit(Duration::from_secs(30)),
        Some(exit::CONFIG as i32),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("password file permissions 0644 let other users read it; run `chmod 600"),
        "{log}"
    );
    assert!(!log.contains("gw1-Secret-7f3a"), "{log}");
    assert!(!broker.log().contains("gw1-Secret-7f3a"));
}

#[test]
fn junk_on_the_device_topics_makes_it_forget_neither_a_rollback_nor_its_last_outcome() {
    let mut s = Setup::new(Broker::start(), "timeout = \"6s\"\nsoak = \"1s\"", "");
    s.d.node.incr().unwrap();
    let bundle = s.bundle("1.2.0", &[]);
    s.serve(&[]);
    s.start_agent();
    s.offer(&bundle);
    s.wait_phase("rolled_back", "1.2.0");
    let history_before = s.state_file()["history"].clone();

    // Far more junk than any list of decided offers or outcomes holds, on
    // every topic the device listens to, each message different.
    let publisher = Sub::new(&s.broker, &[]);
    for i in 0..150 {
        let junk = format!("{{\"signed\": {{\"junk\": {i}}}, \"signatures\": []}}");
        publisher.publish("beamup/acme/device/gw-1/offer", junk.into_bytes(), false);
        publisher.publish(
            "beamup/acme/group/canary/offer",
            format!("not json {i}").into_bytes(),
            false,
        );
        publisher.publish(
            "beamup/acme/device/gw-1/cmd",
            format!("{{\"v\": {i}}}").into_bytes(),
            false,
        );
    }
    let st = s.watch.wait_for("450 discarded", OUTCOME, |m| {
        m.topic == "beamup/acme/device/gw-1/state" && m.json()["discarded"]["count"] == 450
    });
    let st = st.json();
    assert_eq!(st["last_outcome"]["outcome"], "rolled_back", "{st:#}");
    assert_eq!(st["last_outcome"]["version"], "1.2.0", "{st:#}");

    // The same signed offer again, byte for byte and re-encoded (another
    // digest, the same signed manifest): neither is fetched again.
    let envelope = envelope_of(&bundle);
    let text = String::from_utf8(envelope.clone()).unwrap();
    // White space outside the signed value: the signatures still hold.
    let reencoded = format!("{{ \n  {}\n", text.strip_prefix('{').unwrap());
    assert_ne!(reencoded.as_bytes(), &envelope[..]);
    publisher.publish("beamup/acme/device/gw-1/offer", envelope, true);
    publisher.publish(
        "beamup/acme/group/canary/offer",
        reencoded.into_bytes(),
        true,
    );
    let seen = |s: &Setup, needle: &str| s.agent().log().matches(needle).count();
    let wait_seen = |s: &Setup, needle: &str, n: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen(s, needle) < n {
            assert!(Instant::now() < deadline, "{}", s.agent().log());
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    wait_seen(&s, "was decided before; ignored", 1);
    wait_seen(&s, "was already rolled back; ignored", 1);
    // Restarted without its list of offer digests (a short cut only), the
    // agent still knows from the engine's memory of decided releases: both
    // retained replays come back and are refused.
    s.agent.as_mut().unwrap().kill9();
    fs::remove_file(s.d.path().join("state/agent/agent.json")).unwrap();
    s.start_agent();
    wait_seen(&s, "was already rolled back; ignored", 3);
    std::thread::sleep(Duration::from_secs(2));
    let downloads = s
        .events()
        .iter()
        .filter(|e| e["phase"] == "downloading" && e["percent"] == 0)
        .count();
    assert_eq!(downloads, 1, "the rolled-back release was fetched again");
    assert_eq!(
        s.outcomes()
            .iter()
            .filter(|o| o["phase"] == "rolled_back")
            .count(),
        1
    );
    s.d.assert_settled_on("1.0.0", &["1.2.0"]);

    // What operators see is the real last outcome; the junk is counted apart.
    let state = s.state_file();
    assert_eq!(state["history"], history_before, "{state:#}");
    assert!(
        state["discarded"]["count"].as_u64().unwrap() >= 300,
        "{state:#}"
    );
    assert!(state["discarded"]["recent"].as_array().unwrap().len() <= 10);
    let status = s.d.status();
    assert_eq!(status["last_outcome"]["outcome"], "rolled_back");
    assert!(
        status["discarded"]["count"].as_u64().unwrap() >= 300,
        "{status:#}"
    );
    let human = beamup(s.d.path(), &["status", "--config", "agent.toml"]);
    human.ok();
    assert!(
        human.stdout.contains("last") && human.stdout.contains("rolled back thermo 1.2.0"),
        "{}",
        human.stdout
    );
    assert!(
        human.stdout.contains("unverified input(s) in all"),
        "{}",
        human.stdout
    );
    let run = s.beamup(&["fleet", "status"]);
    run.ok();
    assert!(run.stdout.contains("rolled_back 1.2.0"), "{}", run.stdout);
}

#[test]
fn the_test_brokers_persist_as_the_shipped_mosquitto_conf_does() {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/mosquitto/mosquitto.conf"),
    )
    .unwrap();
    let set: Vec<&str> = shipped
        .lines()
        .filter(|l| l.starts_with("autosave") || l.starts_with("persistence "))
        .collect();
    let ours: Vec<&str> = crate::support::mqtt::PERSISTENCE.lines().collect();
    assert_eq!(set, ours, "docs/mosquitto/mosquitto.conf");
}

#[test]
fn a_broker_crash_right_after_an_offer_is_acknowledged_keeps_the_offer() {
    // `offer` exits only once the broker acknowledged the offer: a broker
    // that saves every change keeps it through kill -9.
    let mut broker = Broker::durable();
    let d = Device::new();
    let bundle = d.bundle("1.1.0");
    beamup(
        d.path(),
        &[
            "offer",
            bundle.to_str().unwrap(),
            "--device",
            "gw-1",
            "--broker",
            &broker.url(),
            "--fleet",
            "acme",
        ],
    )
    .ok();
    // SIGKILL: no save on the way out.
    std::thread::sleep(Duration::from_millis(100));
    broker.kill();
    broker.restart();
    let sub = Sub::new(&broker, &["beamup/acme/device/gw-1/offer"]);
    let offer = sub.wait_for("the retained offer", Duration::from_secs(10), |m| m.retain);
    assert_eq!(offer.payload, envelope_of(&bundle));
}
