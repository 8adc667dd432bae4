//! Chaos: the operator's view equals the truth. A fleet of real devices
//! (agents on thermo nodes) and simulated ones (`beamup fleet simulate`,
//! mixed fates) on one mosquitto with persistence, `beamup serve`, and a
//! campaign per round for each kind, run by the real controller. During
//! each round, faults at random moments from a seeded schedule: the broker
//! killed with -9 and restarted on its port with its database, agents
//! killed with -9 or stopped with SIGTERM and started again after a delay
//! (as systemd would), a node killed while its device soaks, `serve`
//! killed as a transfer runs and started again, a controller killed and
//! `campaign run` again. After each round, once the fleet is quiet, every
//! device's row in `fleet status` and in the campaign's report is compared
//! with what the device says (`beamup status`, the simulator's summary)
//! and what its node says (`/health`, release_handler's releases); each
//! mismatch is a disagreement, and there must be none.
//!
//! Packet loss and delay (netem) are not injected: this machine's kernel
//! has no `sch_netem` ("Specified qdisc kind is unknown" in a fresh
//! network namespace) and no modules to load it from.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::cli::sign_bundle;
use crate::support::fleet::{Fleet, id};
use crate::support::mqtt::{Broker, Daemon, Msg};
use crate::support::otp::{Flavor, releases_for};
use crate::support::sim::release_tarball;

const REAL: usize = 3;
const TIMING: &str = "timeout = \"10s\"\nsoak = \"2s\"";
const MIX: &str = "commit=0.85,rollback=0.05,silent=0.03,offline=0.02,restart=0.05";
/// A round that has not ended by then is a disagreement of its own.
const ROUND_LIMIT: Duration = Duration::from_secs(180);
/// The most chunk requests one device may send in a round: its window (64)
/// a few times over, for resumes after the broker or `serve` died. A
/// device retrying in a loop sends thousands.
const MAX_REQUESTS: usize = 400;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    BrokerKill,
    AgentKill,
    AgentTerm,
    NodeKillInSoak,
    ServeKill,
    ControllerKill,
}

const FAULTS: [Fault; 6] = [
    Fault::BrokerKill,
    Fault::AgentKill,
    Fault::AgentTerm,
    Fault::NodeKillInSoak,
    Fault::ServeKill,
    Fault::ControllerKill,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::BrokerKill => "broker kill -9",
            Fault::AgentKill => "agent kill -9",
            Fault::AgentTerm => "agent SIGTERM",
            Fault::NodeKillInSoak => "node kill -9 while soaking",
            Fault::ServeKill => "serve kill -9 mid-transfer",
            Fault::ControllerKill => "controller kill -9",
        }
    }
}

/// xorshift64: the whole schedule follows from the seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo))
    }
}

/// Something stopped by a fault, to start again at a time.
enum Restart {
    Agent(usize),
    Broker,
    Serve,
}

/// One campaign's controller, restarted after kills.
struct Controller {
    id: String,
    plan: PathBuf,
    daemon: Daemon,
    starts: u32,
    exit: Option<i32>,
}

struct Chaos {
    f: Fleet,
    rng: Rng,
    seed: u64,
    sims: usize,
    sim_bundle: PathBuf,
    shm: tempfile::TempDir,
    faults: BTreeMap<Fault, u32>,
    disagreements: Vec<String>,
    rounds: u32,
    broker_back_at: Option<Instant>,
    /// Offers a controller's MQTT client sent again (DUP) after the broker
    /// died before their PUBACK was read: one publish each, not counted.
    replays: usize,
    /// Offers sent again to a restarted broker that lacked them.
    after_restart: usize,
}

fn seed() -> u64 {
    std::env::var("CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

fn sim_name(round: u32, i: usize, n: usize) -> String {
    let width = n.to_string().len().max(5);
    format!("r{round}-{:0width$}", i + 1)
}

fn device_of(topic: &str, kind: &str) -> Option<String> {
    topic
        .strip_prefix("beamup/acme/device/")?
        .strip_suffix(&format!("/{kind}"))
        .map(str::to_string)
}

/// What the node itself says: the version `/health` reports (the running
/// application) and the release release_handler calls permanent
/// (`release_handler:which_releases()` over distribution, by the root's
/// own `erl_call`). `None` when it does not answer. (`bin/thermo versions`
/// cannot be used: its escript refuses the node's `NAME@localhost` long
/// name, "Hostname localhost is illegal".)
fn node_truth(d: &crate::support::device::Device) -> (Option<String>, Option<String>) {
    let running = d
        .node
        .health()
        .ok()
        .and_then(|(_, b)| b["version"].as_str().map(str::to_string));
    let erts = std::fs::read_dir(d.node.root())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("erts-")
        })
        .expect("the root has its ERTS");
    let out = Command::new(erts.join("bin/erl_call"))
        .args([
            "-name",
            d.node.node_name(),
            "-c",
            d.node.cookie(),
            "-timeout",
            "10",
        ])
        .args(["-a", "release_handler which_releases"])
        .envs(d.node.env())
        .output()
        .unwrap();
    let text: String = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect();
    // [{"thermo","1.1.0",["kernel-8.5.3",...],permanent},...]
    let permanent = text.split("{\"").skip(1).find_map(|entry| {
        let (_, rest) = entry.split_once("\",\"")?;
        let (vsn, rest) = rest.split_once('"')?;
        // The libraries' list holds no `]`: the first `],` ends it.
        let status = rest.split_once("],")?.1.split('}').next()?;
        (status == "permanent").then(|| vsn.to_string())
    });
    if permanent.is_none() {
        eprintln!(
            "{}: which_releases: {text} {}",
            d.node.node_name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (running, permanent)
}

impl Chaos {
    fn new(sims: usize) -> Chaos {
        let seed = seed();
        eprintln!("chaos seed {seed} (CHAOS_SEED={seed} repeats the fault schedule)");
        // mosquitto with persistence as docs/mosquitto/mosquitto.conf has
        // it, and no cap on queued messages (the watcher must see every
        // offer and request of a burst to count them).
        let broker = Broker::start_with(&format!(
            "{}max_queued_messages 0\n",
            crate::support::mqtt::PERSISTENCE
        ));
        let mut f = Fleet::on_broker(
            broker,
            REAL,
            TIMING,
            &[],
            Some("chaos-watch"),
            &["beamup/acme/req/+"],
        );
        f.start_agents(0..REAL);
        let tarball = release_tarball(f.dir(), "1.1.0", 200_000);
        let sim_bundle = f.dir().join("bundles/sim-1.1.0.bundle");
        sign_bundle(f.dir(), &tarball, &sim_bundle, &[]);
        let shm = crate::support::memory_tempdir("beamup-chaos-");
        Chaos {
            f,
            rng: Rng(seed | 1),
            seed,
            sims,
            sim_bundle,
            shm,
            faults: BTreeMap::new(),
            disagreements: Vec::new(),
            rounds: 0,
            broker_back_at: None,
            replays: 0,
            after_restart: 0,
        }
    }

    fn disagree(&mut self, round: u32, what: String) {
        eprintln!("DISAGREEMENT round {round} (seed {}): {what}", self.seed);
        self.disagreements.push(format!("round {round}: {what}"));
    }

    /// The real devices' bundle of round `round`: 1.1.0 (hot upgrade) in
    /// odd rounds, back to 1.0.0 (hot downgrade) in even ones, each signed
    /// anew (a new sequence).
    fn real_bundle(&self, round: u32) -> (PathBuf, &'static str) {
        let vsn = if round % 2 == 1 { "1.1.0" } else { "1.0.0" };
        let out = self
            .f
            .dir()
            .join(format!("bundles/thermo-{vsn}-r{round}.bundle"));
        let extra: &[&str] = if vsn == "1.0.0" {
            &["--allow-downgrade"]
        } else {
            &[]
        };
        sign_bundle(
            self.f.dir(),
            releases_for(Flavor::Rebar3).tarball(vsn),
            &out,
            extra,
        );
        (out, vsn)
    }

    fn start_sims(&self, round: u32) -> Daemon {
        let n = self.sims.to_string();
        let prefix = format!("r{round}");
        let state = self.shm.path().join(&prefix);
        let summary = format!("sim-{prefix}.json");
        let seed = (self.seed ^ u64::from(round)).to_string();
        let url = self.f.broker.url();
        let sim = Daemon::start(
            self.f.dir(),
            &format!("sim-{prefix}.log"),
            &[
                "fleet",
                "simulate",
                "--broker",
                &url,
                "--fleet",
                "acme",
                "--devices",
                &n,
                "--id-prefix",
                &prefix,
                "--group",
                &prefix,
                "--root",
                "root.json",
                "--release",
                "thermo",
                "--mix",
                MIX,
                "--seed",
                &seed,
                "--install-time",
                "300ms",
                "--state-dir",
                state.to_str().unwrap(),
                "--summary",
                &summary,
            ],
            &[("RUST_LOG", "beamup=info")],
        );
        sim.wait_log(
            &format!("all {} simulated devices connected", self.sims),
            Duration::from_secs(60),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let idle: BTreeSet<String> = self
                .f
                .watch
                .messages()
                .iter()
                .filter_map(|m| {
                    let d = device_of(&m.topic, "state")?;
                    (d.starts_with(&format!("{prefix}-"))
                        && m.json()["running"] == "1.0.0"
                        && m.json()["phase"]["name"] == "idle")
                        .then_some(d)
                })
                .collect();
            if idle.len() == self.sims {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {} simulated devices reported in",
                idle.len(),
                self.sims
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        sim
    }

    fn start_controller(&self, id: &str, plan: &Path, starts: u32) -> Daemon {
        let log = format!("{id}-{starts}.log");
        if self
            .f
            .dir()
            .join(format!("campaigns/{id}/campaign.json"))
            .exists()
        {
            self.f.run_campaign(id, &log)
        } else {
            self.f.start_campaign(plan, &log)
        }
    }

    /// One round: both campaigns under faults, then the comparison.
    fn round(&mut self) {
        self.rounds += 1;
        let round = self.rounds;
        let first_msg = self.f.watch.messages().len();
        let first_log = self.f.broker.log().len();
        let (bundle, vsn) = self.real_bundle(round);
        let devices: Vec<String> = (0..REAL).map(|i| format!("{:?}", id(i))).collect();
        let real_id = format!("real-r{round}");
        let real_plan = self.f.plan(
            &format!("{real_id}.toml"),
            &bundle,
            &format!(
                "id = \"{real_id}\"\n[select]\ndevices = [{}]\n[[waves]]\nrest = true\nmax_failures = {REAL}\n[rollout]\nmax_in_flight = 2\norder = \"random\"\ndevice_timeout = \"90s\"\noffline_wait = \"90s\"\n",
                devices.join(", ")
            ),
        );
        let mut sim = self.start_sims(round);
        let sim_id = format!("sim-r{round}");
        let sim_plan = self.f.plan(
            &format!("{sim_id}.toml"),
            &self.sim_bundle,
            &format!(
                "id = \"{sim_id}\"\n[select]\ngroups = [\"r{round}\"]\n[[waves]]\nrest = true\nmax_failures = {}\n[rollout]\nmax_in_flight = 50\ndevice_timeout = \"45s\"\noffline_wait = \"60s\"\n",
                self.sims
            ),
        );
        let mut ctls: Vec<Controller> = [(real_id.clone(), real_plan), (sim_id.clone(), sim_plan)]
            .into_iter()
            .map(|(id, plan)| Controller {
                daemon: self.start_controller(&id, &plan, 0),
                id,
                plan,
                starts: 1,
                exit: None,
            })
            .collect();
        // Each fault once, at a random moment of the campaigns' first
        // seconds (a fault due after both ended is not injected).
        let started = Instant::now();
        let mut due: Vec<(Duration, Fault)> = FAULTS
            .iter()
            .map(|&k| (self.rng.ms(300, 9000), k))
            .collect();
        due.sort();
        let mut armed: Vec<(Fault, usize)> = Vec::new();
        let mut restarts: Vec<(Instant, Restart)> = Vec::new();
        let mut injected: Vec<String> = Vec::new();
        loop {
            let now = Instant::now();
            // Restarts that are due, as systemd (or an operator) would.
            let mut later = Vec::new();
            for (at, r) in restarts.drain(..) {
                if at > now {
                    later.push((at, r));
                    continue;
                }
                match r {
                    Restart::Agent(i) => self.f.start_agent(i),
                    Restart::Broker => {
                        self.f.broker.restart();
                        self.broker_back_at = Some(Instant::now());
                    }
                    Restart::Serve => self.f.start_serve(),
                }
            }
            restarts = later;
            while due.first().is_some_and(|(at, _)| started + *at <= now) {
                let (_, k) = due.remove(0);
                armed.push((k, self.f.watch.messages().len()));
            }
            // Armed faults: some fire at once, some wait for their moment.
            let mut keep = Vec::new();
            for (k, since) in armed.drain(..) {
                let fired = self.fire(k, since, &mut ctls, &mut restarts);
                match fired {
                    Some(what) => {
                        *self.faults.entry(k).or_insert(0) += 1;
                        injected.push(format!("{:.1}s {what}", started.elapsed().as_secs_f64()));
                    }
                    None => keep.push((k, since)),
                }
            }
            armed = keep;
            for c in &mut ctls {
                if c.exit.is_some() {
                    continue;
                }
                if c.daemon.running_pid().is_none() {
                    let code = c.daemon.wait_exit(Duration::from_secs(1));
                    // Started while the broker was down (or just back): it
                    // cannot reach it and exits 30; run it again, as an
                    // operator's unit would.
                    let broker_recent = self.f.broker.pid().is_none()
                        || self
                            .broker_back_at
                            .is_some_and(|t| t.elapsed() < Duration::from_secs(15));
                    if code == Some(30) && broker_recent {
                        std::thread::sleep(Duration::from_millis(500));
                        c.daemon = self.start_controller(&c.id, &c.plan, c.starts);
                        c.starts += 1;
                    } else {
                        c.exit = Some(code.unwrap_or(-1));
                    }
                }
            }
            let ended = ctls.iter().all(|c| c.exit.is_some());
            if ended && restarts.is_empty() {
                break;
            }
            if started.elapsed() > ROUND_LIMIT {
                let open: Vec<&str> = ctls
                    .iter()
                    .filter(|c| c.exit.is_none())
                    .map(|c| c.id.as_str())
                    .collect();
                self.disagree(
                    round,
                    format!("campaigns {open:?} did not end within {ROUND_LIMIT:?}"),
                );
                for c in &mut ctls {
                    c.daemon.kill9();
                }
                for (_, r) in restarts.drain(..) {
                    match r {
                        Restart::Agent(i) => self.f.start_agent(i),
                        Restart::Broker => self.f.broker.restart(),
                        Restart::Serve => self.f.start_serve(),
                    }
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for c in &ctls {
            if c.exit.is_some_and(|e| e != 0) {
                let log = c.daemon.log();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                self.disagree(
                    round,
                    format!(
                        "campaign {} exited with {:?} (completed is 0): {}",
                        c.id,
                        c.exit,
                        tail.join(" | ")
                    ),
                );
            }
        }
        eprintln!(
            "round {round}: {} -> thermo {vsn} on {REAL} real devices, sim 1.1.0 on {} simulated; {} fault(s): {}",
            real_id,
            self.sims,
            injected.len(),
            injected.join("; ")
        );
        self.wait_quiet(round);
        // A node killed a moment after its device committed stays down:
        // beamup starts a node only to install or roll back; the node's
        // supervisor (systemd's `Restart=`) starts it again, into its
        // permanent release, as it does here.
        // Only then: a node left down after a rollback is the agent's
        // failure, and the comparison below must see it.
        for i in 0..REAL {
            if self.f.devices[i].node.beam_pids().is_empty()
                && self.f.devices[i].status()["last_outcome"]["outcome"] == "committed"
            {
                let vsn = self.f.devices[i].node.restart_from_disk();
                // Its agent sees it at its next poll of the node, within
                // seconds while the node did not answer.
                let topic = format!("beamup/acme/device/{}/state", id(i));
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline
                    && !self
                        .f
                        .watch
                        .messages()
                        .iter()
                        .rev()
                        .find(|m| m.topic == topic)
                        .is_some_and(|m| m.json()["running"] == vsn.as_str())
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                eprintln!(
                    "round {round}: the node of {} was down after its install; started again from disk, as its supervisor would: {vsn}",
                    id(i)
                );
            }
        }
        let msgs: Vec<Msg> = self.f.watch.messages()[first_msg..].to_vec();
        let broker_log = self.f.broker.log();
        std::fs::write(self.f.dir().join("mosquitto.log"), &broker_log).unwrap();
        let offers = offers_in_broker_log(&broker_log[first_log..]);
        let mut log = String::new();
        for m in &msgs {
            let _ = writeln!(
                log,
                "{} retain={} dup={} {}",
                m.topic,
                m.retain,
                m.dup,
                String::from_utf8_lossy(&m.payload[..m.payload.len().min(160)])
            );
        }
        std::fs::write(self.f.dir().join(format!("watch-r{round}.log")), log).unwrap();
        let status = self
            .f
            .beamup(&["fleet", "status", "--fleet", "acme", "--json"]);
        status.ok();
        let rows: BTreeMap<String, Value> = serde_json::from_str::<Vec<Value>>(&status.stdout)
            .unwrap()
            .into_iter()
            .map(|r| (r["device"].as_str().unwrap().to_string(), r))
            .collect();
        let real_report = self.f.report(&real_id);
        let sim_report = self.f.report(&sim_id);
        assert_eq!(sim.term(Duration::from_secs(30)), Some(0), "{}", sim.log());
        let summary: Value = serde_json::from_str(
            &std::fs::read_to_string(self.f.dir().join(format!("sim-r{round}.json"))).unwrap(),
        )
        .unwrap();
        self.check_real(round, vsn, &real_report, &rows, &msgs, &offers);
        self.check_sims(round, &sim_report, &summary, &rows, &msgs, &offers);
        let total: usize = self.disagreements.len();
        eprintln!(
            "round {round} checked: {} devices, disagreements so far {total}",
            REAL + self.sims
        );
    }

    /// Fires fault `k` if its moment has come; what it did, or `None` to
    /// wait. `since`: the watcher's message count when it was armed.
    fn fire(
        &mut self,
        k: Fault,
        since: usize,
        ctls: &mut [Controller],
        restarts: &mut Vec<(Instant, Restart)>,
    ) -> Option<String> {
        // Drawn only when a fault fires: the schedule follows the seed.
        let back_in = |rng: &mut Rng| {
            let d = rng.ms(300, 2500);
            (d, Instant::now() + d)
        };
        let agent_down = |restarts: &Vec<(Instant, Restart)>, i: usize| {
            restarts
                .iter()
                .any(|(_, r)| matches!(r, Restart::Agent(j) if *j == i))
        };
        match k {
            Fault::BrokerKill => {
                // Down already (a kill not yet restarted): wait.
                self.f.broker.pid()?;
                let (delay, later) = back_in(&mut self.rng);
                self.f.broker.kill();
                restarts.push((later, Restart::Broker));
                Some(format!("broker killed, back in {delay:?}"))
            }
            Fault::AgentKill | Fault::AgentTerm => {
                let up: Vec<usize> = (0..REAL).filter(|&i| !agent_down(restarts, i)).collect();
                if up.is_empty() {
                    return None;
                }
                let i = up[self.rng.below(up.len() as u64) as usize];
                let (delay, later) = back_in(&mut self.rng);
                let a = self.f.agents[i].as_mut().unwrap();
                if k == Fault::AgentKill {
                    a.kill9();
                } else {
                    a.term(Duration::from_secs(60));
                }
                restarts.push((later, Restart::Agent(i)));
                Some(format!("{} of {}, back in {delay:?}", k.name(), id(i)))
            }
            Fault::NodeKillInSoak => {
                // The first real device seen soaking since the fault was
                // armed (given up after 20 s without one).
                let msgs = self.f.watch.messages();
                let soaking = msgs[since.min(msgs.len())..].iter().find_map(|m| {
                    let d = device_of(&m.topic, "state")?;
                    let i = (0..REAL).find(|&i| id(i) == d)?;
                    (m.json()["phase"]["name"] == "soaking").then_some(i)
                });
                if let Some(i) = soaking {
                    let pids = self.f.devices[i].node.kill9();
                    return Some(format!("node of {} killed while soaking ({pids:?})", id(i)));
                }
                None
            }
            Fault::ServeKill => {
                // At the next chunk request after arming: a transfer runs.
                let msgs = self.f.watch.messages();
                let transfer = msgs[since.min(msgs.len())..]
                    .iter()
                    .any(|m| m.topic.starts_with("beamup/acme/req/"));
                if !transfer || self.f.serve.is_none() {
                    return None;
                }
                let (delay, later) = back_in(&mut self.rng);
                self.f.serve.as_mut().unwrap().kill9();
                self.f.serve = None;
                restarts.push((later, Restart::Serve));
                Some(format!("serve killed, back in {delay:?}"))
            }
            Fault::ControllerKill => {
                let live: Vec<usize> = (0..ctls.len())
                    .filter(|&c| ctls[c].exit.is_none() && ctls[c].daemon.running_pid().is_some())
                    .collect();
                if live.is_empty() {
                    return None;
                }
                let c = &mut ctls[live[self.rng.below(live.len() as u64) as usize]];
                c.daemon.kill9();
                c.daemon = self.start_controller(&c.id, &c.plan, c.starts);
                c.starts += 1;
                Some(format!("controller of {} killed and run again", c.id))
            }
        }
    }

    /// Waits until every real device is done: its agent up, no install in
    /// progress, and its retained state not in the middle of one.
    fn wait_quiet(&mut self, round: u32) {
        let deadline = Instant::now() + Duration::from_secs(90);
        for i in 0..REAL {
            loop {
                let st = self.f.devices[i].status();
                let busy = !st["install_in_progress"].is_null();
                let topic = format!("beamup/acme/device/{}/state", id(i));
                let phase = self
                    .f
                    .watch
                    .messages()
                    .iter()
                    .rev()
                    .find(|m| m.topic == topic)
                    .map(|m| m.json()["phase"]["name"].as_str().unwrap_or("").to_string())
                    .unwrap_or_default();
                let settled = matches!(
                    phase.as_str(),
                    "idle" | "committed" | "rolled_back" | "rejected" | "needs_attention"
                );
                if !busy && settled {
                    break;
                }
                if Instant::now() > deadline {
                    self.disagree(
                        round,
                        format!(
                            "{} never quiet: install in progress {}, retained phase {phase:?}",
                            id(i),
                            st["install_in_progress"]
                        ),
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        // The retained state is republished at most every 250 ms.
        std::thread::sleep(Duration::from_secs(1));
    }

    /// Each real device: the node, `beamup status`, `fleet status` and the
    /// report say the same; committed only if it runs the release
    /// permanently; offered at most once; no request loop.
    fn check_real(
        &mut self,
        round: u32,
        vsn: &str,
        report: &Value,
        rows: &BTreeMap<String, Value>,
        msgs: &[Msg],
        offers: &BTreeMap<String, Offers>,
    ) {
        let seq = report["sequence"].clone();
        let mut problems = Vec::new();
        let report_rows = report["devices"].as_array().unwrap();
        for i in 0..REAL {
            let dev = id(i);
            let d = &self.f.devices[i];
            let st = d.status();
            let (node_running, node_permanent) = node_truth(d);
            let said_running = st["node"]["running"].as_str().map(str::to_string);
            let said_permanent = st["node"]["permanent"].as_str().map(str::to_string);
            if said_running != node_running || said_permanent != node_permanent {
                problems.push(format!(
                    "{dev}: beamup status says running {said_running:?} permanent {said_permanent:?}, the node {node_running:?} / {node_permanent:?}"
                ));
            }
            let last = &st["last_outcome"];
            match rows.get(&dev) {
                None => problems.push(format!("{dev}: not in fleet status")),
                Some(row) => {
                    let s = &row["state"];
                    if row["online"] != true {
                        problems.push(format!("{dev}: fleet status says offline: {row}"));
                    }
                    for (field, truth) in
                        [("running", &node_running), ("permanent", &node_permanent)]
                    {
                        if s[field].as_str() != truth.as_deref() {
                            problems.push(format!(
                                "{dev}: fleet status {field} {} but the node {truth:?}",
                                s[field]
                            ));
                        }
                    }
                    for field in ["outcome", "version", "sequence", "reason"] {
                        if s["last_outcome"][field] != last[field] {
                            problems.push(format!(
                                "{dev}: fleet status last outcome {field} {} but the device {}",
                                s["last_outcome"][field], last[field]
                            ));
                        }
                    }
                }
            }
            let mine: Vec<&Value> = report_rows.iter().filter(|r| r["device"] == dev).collect();
            if mine.len() != 1 {
                problems.push(format!("{dev}: {} rows in the report", mine.len()));
                continue;
            }
            let row = mine[0];
            let outcome = row["outcome"].as_str().unwrap_or("");
            let device_decided_this =
                last["version"] == vsn && last["sequence"] == seq && !last["outcome"].is_null();
            match outcome {
                "committed" => {
                    if node_running.as_deref() != Some(vsn)
                        || node_permanent.as_deref() != Some(vsn)
                    {
                        problems.push(format!(
                            "{dev}: FALSE COMMITTED: the report says committed {vsn}, the node runs {node_running:?} permanent {node_permanent:?}"
                        ));
                    }
                    if !(device_decided_this && last["outcome"] == "committed") {
                        problems.push(format!(
                            "{dev}: the report says committed, the device's last outcome is {last}"
                        ));
                    }
                }
                "rolled_back" | "rejected" | "needs_attention" => {
                    if !(device_decided_this && last["outcome"] == outcome) {
                        problems.push(format!(
                            "{dev}: the report says {outcome}, the device's last outcome is {last}"
                        ));
                    } else if row["reason"] != last["reason"] {
                        problems.push(format!(
                            "{dev}: the report's reason {} is not the device's {}",
                            row["reason"], last["reason"]
                        ));
                    }
                }
                "already_current" => {
                    if node_permanent.as_deref() != Some(vsn) {
                        problems.push(format!(
                            "{dev}: the report says it already ran {vsn}, the node has {node_permanent:?} permanent"
                        ));
                    }
                }
                other => {
                    // Timed out, unreached, not offered: then the device
                    // must not have decided this release.
                    if device_decided_this {
                        problems.push(format!(
                            "{dev}: the report says {other}, the device decided {last}"
                        ));
                    }
                }
            }
            if row["attempts"].as_u64().unwrap_or(0) > 1 {
                problems.push(format!("{dev}: {} attempts counted", row["attempts"]));
            }
            let (requests, outcomes) = traffic(msgs, &dev, &seq);
            let o = offers.get(&dev).copied().unwrap_or_default();
            self.replays += o.resends;
            self.after_restart += o.after_restart;
            if o.most_in_one_run > 1 {
                problems.push(format!(
                    "{dev}: offered {} times while the broker held it",
                    o.most_in_one_run
                ));
            }
            if requests > MAX_REQUESTS {
                problems.push(format!("{dev}: {requests} chunk requests in the round"));
            }
            if outcomes > 1 {
                problems.push(format!(
                    "{dev}: {outcomes} distinct outcome events for one offer"
                ));
            }
            if device_decided_this && outcomes == 0 {
                problems.push(format!("{dev}: decided {last} but no outcome event came"));
            }
        }
        check_totals(report, REAL, &mut problems);
        for p in problems {
            self.disagree(round, p);
        }
    }

    /// Each simulated device: the report and `fleet status` say what the
    /// simulator's summary says it did; offered at most once; each offer
    /// sent was taken up; no request loop.
    fn check_sims(
        &mut self,
        round: u32,
        report: &Value,
        summary: &Value,
        rows: &BTreeMap<String, Value>,
        msgs: &[Msg],
        offers: &BTreeMap<String, Offers>,
    ) {
        let mut problems = Vec::new();
        let seq = report["sequence"].clone();
        let by_id: BTreeMap<String, &Value> = report["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| (r["device"].as_str().unwrap().to_string(), r))
            .collect();
        let devices = summary["devices"].as_array().unwrap();
        if devices.len() != self.sims {
            problems.push(format!("the summary has {} devices", devices.len()));
        }
        for (i, d) in devices.iter().enumerate() {
            let dev = sim_name(round, i, self.sims);
            if d["device"] != dev.as_str() {
                problems.push(format!("summary row {i} is {}", d["device"]));
                continue;
            }
            let Some(row) = by_id.get(&dev) else {
                problems.push(format!("{dev}: not in the report"));
                continue;
            };
            let outcome = row["outcome"].as_str().unwrap_or("");
            let said = d["outcomes"].as_array().unwrap();
            if said.len() > 1 {
                problems.push(format!(
                    "{dev}: the device reported {} outcomes",
                    said.len()
                ));
            }
            match said.last() {
                Some(o) if o["outcome"] != outcome || o["version"] != "1.1.0" => {
                    problems.push(format!(
                        "{dev} ({}): the report says {outcome}, the device {} {}",
                        d["fate"], o["outcome"], o["version"]
                    ))
                }
                None if matches!(
                    outcome,
                    "committed" | "rolled_back" | "rejected" | "needs_attention"
                ) =>
                {
                    problems.push(format!(
                        "{dev} ({}): the report says {outcome}, the device decided nothing",
                        d["fate"]
                    ))
                }
                _ => {}
            }
            // fleet status: the device's last retained state.
            let last_said = said.last();
            match rows.get(&dev) {
                None => problems.push(format!("{dev}: not in fleet status")),
                Some(r) => {
                    let lo = &r["state"]["last_outcome"];
                    let agrees = match last_said {
                        Some(o) => lo["outcome"] == o["outcome"] && lo["version"] == o["version"],
                        None => lo.is_null(),
                    };
                    if !agrees {
                        problems.push(format!(
                            "{dev}: fleet status last outcome {lo}, the device {last_said:?}"
                        ));
                    }
                }
            }
            let (requests, _) = traffic(msgs, &dev, &seq);
            let o = offers.get(&dev).copied().unwrap_or_default();
            self.replays += o.resends;
            self.after_restart += o.after_restart;
            if o.most_in_one_run > 1 {
                problems.push(format!(
                    "{dev}: offered {} times while the broker held it",
                    o.most_in_one_run
                ));
            }
            // However often it reached the device, it was taken up once.
            let taken = d["offers"].as_u64().unwrap_or(0);
            if taken != u64::from(o.runs > 0) {
                problems.push(format!(
                    "{dev}: sent in {} broker run(s), taken up {taken} times",
                    o.runs
                ));
            }
            if requests > MAX_REQUESTS {
                problems.push(format!("{dev}: {requests} chunk requests in the round"));
            }
        }
        check_totals(report, self.sims, &mut problems);
        for p in problems {
            self.disagree(round, p);
        }
    }

    fn print_summary(&self) {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "chaos: seed {}, {} round(s), {} devices ({REAL} real, {} simulated per round)",
            self.seed,
            self.rounds,
            REAL + self.sims,
            self.sims
        );
        for k in FAULTS {
            let _ = writeln!(
                s,
                "  {:<28} {}",
                k.name(),
                self.faults.get(&k).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            s,
            "  offers resent (DUP) by a controller's client after a broker crash: {}",
            self.replays
        );
        let _ = writeln!(
            s,
            "  offers sent again to a restarted broker that had lost them: {}",
            self.after_restart
        );
        let _ = writeln!(s, "  disagreements: {}", self.disagreements.len());
        for d in &self.disagreements {
            let _ = writeln!(s, "    {d}");
        }
        eprint!("{s}");
    }
}

/// Offers the controllers published, per device, as the broker logged
/// each PUBLISH it received (`log_type all`): `(first sends, resends)`.
/// A resend (DUP) is the client library sending again a QoS 1 publish
/// whose PUBACK it had not read when the connection broke (the broker
/// killed); the broker forwards it as a new message, so a subscriber
/// sees the offer twice, but it is one publish of the controller.
fn offers_in_broker_log(log: &str) -> BTreeMap<String, Offers> {
    let mut out: BTreeMap<String, Offers> = BTreeMap::new();
    // Sends per device in the current run of the broker.
    let mut this_run: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines() {
        if line.contains("mosquitto version") && line.contains("starting") {
            this_run.clear();
            continue;
        }
        let Some((_, rest)) = line.split_once("Received PUBLISH from beamup-campaign-") else {
            continue;
        };
        let Some((flags, rest)) = rest.split_once("'beamup/acme/device/") else {
            continue;
        };
        let Some((dev, rest)) = rest.split_once("/offer'") else {
            continue;
        };
        if rest.trim_end().ends_with("(0 bytes))") {
            continue; // a clear
        }
        let e = out.entry(dev.to_string()).or_default();
        if flags.contains("(d1") {
            e.resends += 1;
            continue;
        }
        let n = this_run.entry(dev.to_string()).or_default();
        *n += 1;
        if *n == 1 && e.runs > 0 {
            e.after_restart += 1;
        }
        e.runs += usize::from(*n == 1);
        e.most_in_one_run = e.most_in_one_run.max(*n);
    }
    out
}

/// A device's offers in the broker's log.
#[derive(Clone, Copy, Debug, Default)]
struct Offers {
    /// The most first sends (not DUP) while one run of the broker lasted:
    /// more than one is an offer sent again while the broker held it.
    most_in_one_run: usize,
    /// Runs of the broker it was sent in.
    runs: usize,
    /// Sent again to a broker restarted after a kill -9 (its database
    /// may lack the retained offer, and the controller, seeing it lack
    /// it once its retained messages settled, sends it again).
    after_restart: usize,
    /// DUP resends of a publish whose PUBACK the crash lost.
    resends: usize,
}

/// `dev`'s chunk requests, and the distinct ids of its outcome events
/// for sequence `seq`.
fn traffic(msgs: &[Msg], dev: &str, seq: &Value) -> (usize, usize) {
    let req = format!("beamup/acme/req/{dev}");
    let events = format!("beamup/acme/device/{dev}/events");
    let requests = msgs.iter().filter(|m| m.topic == req).count();
    let outcomes: BTreeSet<String> = msgs
        .iter()
        .filter(|m| m.topic == events)
        .map(Msg::json)
        .filter(|e| e["kind"] == "outcome" && e["sequence"] == *seq)
        .map(|e| e["id"].to_string())
        .collect();
    (requests, outcomes.len())
}

/// Every device counted once: one row each, and the totals are the rows'.
fn check_totals(report: &Value, n: usize, problems: &mut Vec<String>) {
    let rows = report["devices"].as_array().unwrap();
    let ids: BTreeSet<&str> = rows.iter().filter_map(|r| r["device"].as_str()).collect();
    if rows.len() != n || ids.len() != n {
        problems.push(format!(
            "{}: {} rows for {} distinct devices, {n} in the campaign",
            report["id"],
            rows.len(),
            ids.len()
        ));
    }
    let committed = rows.iter().filter(|r| r["outcome"] == "committed").count();
    if report["total"]["committed"].as_u64() != Some(committed as u64) {
        problems.push(format!(
            "{}: total committed {} but {committed} rows committed",
            report["id"], report["total"]["committed"]
        ));
    }
    let failed = rows
        .iter()
        .filter(|r| {
            matches!(
                r["outcome"].as_str(),
                Some("rolled_back" | "rejected" | "needs_attention" | "timed_out")
            )
        })
        .count();
    if report["total"]["failed"].as_u64() != Some(failed as u64) {
        problems.push(format!(
            "{}: total failed {} but {failed} rows failed",
            report["id"], report["total"]["failed"]
        ));
    }
}

fn run(rounds: u32, sims: usize) {
    let mut chaos = Chaos::new(sims);
    for _ in 0..rounds {
        chaos.round();
    }
    chaos.print_summary();
    if !chaos.disagreements.is_empty()
        && let Some(keep) = std::env::var_os("CHAOS_KEEP")
    {
        // The logs of every process and what the watcher saw, per round.
        let _ = Command::new("cp")
            .arg("-a")
            .arg(chaos.f.dir())
            .arg(&keep)
            .status();
    }
    assert!(
        chaos.disagreements.is_empty(),
        "{} disagreement(s) with seed {} (CHAOS_SEED={} repeats the schedule):\n{}",
        chaos.disagreements.len(),
        chaos.seed,
        chaos.seed,
        chaos.disagreements.join("\n")
    );
}

/// Two rounds (1.0.0 -> 1.1.0 hot, then back by a hot downgrade) of three
/// real devices and 100 simulated ones, each fault kind once per round.
#[test]
fn under_random_faults_the_fleet_view_and_the_reports_equal_what_devices_and_nodes_say() {
    run(2, 100);
}

/// The long run: `CHAOS_ROUNDS` rounds (default 10) of `CHAOS_SIMS`
/// simulated devices (default 200) beside the three real ones.
#[test]
#[ignore = "long: CHAOS_ROUNDS=N cargo test --test it chaos -- --ignored --nocapture"]
fn chaos_rounds_from_the_environment() {
    let get = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    run(
        get("CHAOS_ROUNDS", 10) as u32,
        get("CHAOS_SIMS", 200) as usize,
    );
}
