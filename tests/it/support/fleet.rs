//! A fleet for campaign tests: a real mosquitto, `beamup serve`, and N
//! devices (each a real thermo node with its own `beamup agent`), all
//! trusting the operator's one key; an operator directory with the keys,
//! the served bundles, plans and campaigns.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::cli::{Run, beamup, sign_bundle};
use crate::support::device::{Device, keys_and_root};
use crate::support::mqtt::{Broker, Daemon, Sub};
use crate::support::otp::{Flavor, releases_for};

pub struct Fleet {
    pub broker: Broker,
    pub devices: Vec<Device>,
    pub agents: Vec<Option<Daemon>>,
    pub serve: Option<Daemon>,
    pub ops: tempfile::TempDir,
    /// Offers, states, online flags, events and campaign documents.
    pub watch: Sub,
}

pub fn id(i: usize) -> String {
    format!("gw-{}", i + 1)
}

impl Fleet {
    /// `n` devices with these `[health]` timing lines; on the devices in
    /// `health_fails` a health command fails for 1.1.0 (their install of it
    /// rolls back, and the base they roll back to is healthy).
    pub fn new(n: usize, timing: &str, health_fails: &[usize]) -> Fleet {
        Self::on_broker(Broker::start(), n, timing, health_fails, None, &[])
    }

    /// As [`Fleet::new`], on `broker`; `watch_session`: the watcher's
    /// client id for a persistent session (its subscriptions and queued
    /// messages survive a broker restart with persistence); `more`: more
    /// topics it records.
    pub fn on_broker(
        broker: Broker,
        n: usize,
        timing: &str,
        health_fails: &[usize],
        watch_session: Option<&str>,
        more: &[&str],
    ) -> Fleet {
        let ops = tempfile::Builder::new()
            .prefix("beamup-ops-")
            .tempdir()
            .unwrap();
        keys_and_root(ops.path());
        fs::create_dir(ops.path().join("bundles")).unwrap();
        let devices: Vec<Device> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|i| {
                    let timing = if health_fails.contains(&i) {
                        format!("{timing}\ncommand = 'test \"$BEAMUP_VERSION\" != 1.1.0'")
                    } else {
                        timing.to_string()
                    };
                    s.spawn(move || Device::with_health(&timing))
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, d) in devices.iter().enumerate() {
            fs::copy(ops.path().join("root.json"), d.path().join("root.json")).unwrap();
            let groups: &[&str] = if i == 0 { &["canary"] } else { &["field"] };
            d.add_mqtt(&broker.url(), &id(i), groups, "");
        }
        let mut topics = vec![
            "beamup/acme/device/+/offer",
            "beamup/acme/device/+/state",
            "beamup/acme/device/+/events",
            "beamup/acme/campaign/+/status",
        ];
        topics.extend(more);
        let watch = Sub::with_session(&broker, &topics, watch_session);
        let mut f = Fleet {
            broker,
            agents: (0..n).map(|_| None).collect(),
            devices,
            serve: None,
            ops,
            watch,
        };
        f.start_serve();
        f
    }

    pub fn dir(&self) -> &Path {
        self.ops.path()
    }

    pub fn start_serve(&mut self) {
        let s = Daemon::start(
            self.ops.path(),
            "serve.log",
            &[
                "serve",
                "--broker",
                &self.broker.url(),
                "--fleet",
                "acme",
                "--bundles",
                "bundles",
            ],
            &[],
        );
        s.wait_log("serving requests on", Duration::from_secs(20));
        self.serve = Some(s);
    }

    pub fn start_agent(&mut self, i: usize) {
        let a = Daemon::start(
            self.devices[i].path(),
            "agent.log",
            &["agent", "--config", "agent.toml"],
            &[],
        );
        self.agents[i] = Some(a);
    }

    /// Starts every agent and waits until each device reported itself
    /// online and idle on the base release.
    pub fn start_agents(&mut self, which: impl IntoIterator<Item = usize>) {
        let which: Vec<usize> = which.into_iter().collect();
        for &i in &which {
            self.start_agent(i);
        }
        for &i in &which {
            self.wait_state(i, "reported in", |s| s["running"] == "1.0.0");
        }
    }

    pub fn agent_log(&self, i: usize) -> String {
        self.agents[i].as_ref().map_or(String::new(), Daemon::log)
    }

    /// A bundle of thermo `vsn` in the served directory.
    pub fn bundle(&self, vsn: &str, extra: &[&str]) -> PathBuf {
        let out = self.dir().join(format!("bundles/thermo-{vsn}.bundle"));
        sign_bundle(
            self.dir(),
            releases_for(Flavor::Rebar3).tarball(vsn),
            &out,
            extra,
        );
        out
    }

    /// Writes `plan.toml` (fleet acme, bundle `bundle`) with `body`.
    pub fn plan(&self, name: &str, bundle: &Path, body: &str) -> PathBuf {
        let p = self.dir().join(name);
        fs::write(
            &p,
            format!(
                "bundle = {:?}\nfleet = \"acme\"\n{body}\n",
                bundle.display().to_string()
            ),
        )
        .unwrap();
        p
    }

    pub fn beamup(&self, args: &[&str]) -> Run {
        let mut all: Vec<&str> = args.to_vec();
        let url = self.broker.url();
        all.extend(["--broker", &url]);
        beamup(self.dir(), &all)
    }

    /// `beamup campaign start PLAN` as a daemon (the controller).
    pub fn start_campaign(&self, plan: &Path, log: &str) -> Daemon {
        Daemon::start(
            self.dir(),
            log,
            &[
                "campaign",
                "start",
                plan.to_str().unwrap(),
                "--broker",
                &self.broker.url(),
                "--campaigns",
                "campaigns",
            ],
            &[],
        )
    }

    /// `beamup campaign run ID` as a daemon.
    pub fn run_campaign(&self, id: &str, log: &str) -> Daemon {
        Daemon::start(
            self.dir(),
            log,
            &[
                "campaign",
                "run",
                id,
                "--broker",
                &self.broker.url(),
                "--campaigns",
                "campaigns",
            ],
            &[],
        )
    }

    /// The device's latest retained state, once it satisfies `f`.
    #[track_caller]
    pub fn wait_state(&self, i: usize, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let topic = format!("beamup/acme/device/{}/state", id(i));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let last = self
                .watch
                .messages()
                .into_iter()
                .rev()
                .find(|m| m.topic == topic)
                .map(|m| m.json());
            if let Some(s) = &last
                && f(s)
            {
                return s.clone();
            }
            assert!(
                Instant::now() < deadline,
                "{} never {what}; last state {last:?}\n{}",
                id(i),
                self.agent_log(i)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The campaign's latest retained view, once it satisfies `f`.
    #[track_caller]
    pub fn wait_campaign(
        &self,
        cid: &str,
        what: &str,
        timeout: Duration,
        f: impl Fn(&Value) -> bool,
    ) -> Value {
        let topic = format!("beamup/acme/campaign/{cid}/status");
        let deadline = Instant::now() + timeout;
        loop {
            let last = self
                .watch
                .messages()
                .into_iter()
                .rev()
                .find(|m| m.topic == topic && !m.payload.is_empty())
                .map(|m| m.json());
            if let Some(c) = &last
                && f(c)
            {
                return c.clone();
            }
            assert!(
                Instant::now() < deadline,
                "campaign {cid} never {what}; last view: {}",
                last.map_or("none".into(), |c| format!(
                    "status {} reason {} log {}",
                    c["status"], c["reason"], c["log"]
                ))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Non-empty offers published to device `i` (each one an offer sent).
    pub fn offers_to(&self, i: usize) -> usize {
        let topic = format!("beamup/acme/device/{}/offer", id(i));
        self.watch
            .messages()
            .iter()
            .filter(|m| m.topic == topic && !m.payload.is_empty() && !m.retain)
            .count()
    }

    /// The first time (index in the message log) an offer went to device i.
    pub fn first_offer_index(&self, i: usize) -> Option<usize> {
        let topic = format!("beamup/acme/device/{}/offer", id(i));
        self.watch
            .messages()
            .iter()
            .position(|m| m.topic == topic && !m.payload.is_empty())
    }

    /// The index of the first state of device i with this last outcome.
    pub fn outcome_index(&self, i: usize, outcome: &str, version: &str) -> Option<usize> {
        let topic = format!("beamup/acme/device/{}/state", id(i));
        self.watch.messages().iter().position(|m| {
            m.topic == topic
                && m.json()["last_outcome"]["outcome"] == outcome
                && m.json()["last_outcome"]["version"] == version
        })
    }

    /// `beamup campaign report ID --json` (this machine's copy).
    pub fn report(&self, cid: &str) -> Value {
        let r = beamup(
            self.dir(),
            &[
                "campaign",
                "report",
                cid,
                "--json",
                "--campaigns",
                "campaigns",
            ],
        );
        r.ok();
        serde_json::from_str(&r.stdout).unwrap()
    }

    /// The report's row for device i.
    pub fn row(report: &Value, i: usize) -> Value {
        report["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device"] == id(i))
            .cloned()
            .unwrap_or(Value::Null)
    }
}
