//! A simulated fleet for campaigns at scale: a real mosquitto, a real
//! `beamup serve`, and N devices of `beamup fleet simulate` (one process,
//! each device with its own session, verifying offers and fetching
//! chunks like an agent); the operator's keys, root and a small signed
//! bundle. Everything started is stopped by PID on drop.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::cli::{Run, beamup};
use crate::support::device::keys_and_root;
use crate::support::mqtt::{Broker, Daemon, Sub};

pub const FLEET: &str = "acme";

pub struct SimFleet {
    pub broker: Broker,
    pub ops: tempfile::TempDir,
    /// The devices' outboxes and downloads: memory-backed where the
    /// machine has it (their disk is not what is tested).
    pub state: tempfile::TempDir,
    pub serve: Daemon,
    pub sim: Option<Daemon>,
    pub n: usize,
    /// Offers, states and campaign documents, as the broker sent them.
    pub watch: Sub,
}

pub fn sim_id(i: usize) -> String {
    format!("sim-{:05}", i + 1)
}

/// A release-shaped tarball of thermo `vsn` with `payload` bytes of
/// incompressible data (stored, not compressed), for `beamup bundle`.
pub fn release_tarball(dir: &Path, vsn: &str, payload: usize) -> PathBuf {
    let path = dir.join(format!("thermo-{vsn}.tar.gz"));
    let file = fs::File::create(&path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    let mut add = |p: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, p, data).unwrap();
    };
    let rel = format!(
        "{{release,{{\"thermo\",\"{vsn}\"}},{{erts,\"13.1.5\"}},[{{kernel,\"8.5.3\"}},{{thermo,\"{vsn}\"}}]}}.\n"
    );
    add(&format!("releases/{vsn}/thermo.rel"), rel.as_bytes());
    add(&format!("releases/{vsn}/start.boot"), b"boot");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ vsn.len() as u64;
    let blob: Vec<u8> = (0..payload)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    add(&format!("lib/thermo-{vsn}/priv/blob"), &blob);
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
    path
}

impl SimFleet {
    /// `n` simulated devices with this fate mix (see `beamup fleet
    /// simulate --mix`), connected and reported in.
    pub fn new(n: usize, mix: &str, install_time: &str) -> SimFleet {
        // No cap on the messages queued per client (mosquitto's default is
        // 1000): the test's own subscriber must see every offer of a burst
        // to count them.
        Self::on_broker(
            Broker::start_with("max_queued_messages 0\n"),
            n,
            mix,
            install_time,
        )
    }

    pub fn on_broker(broker: Broker, n: usize, mix: &str, install_time: &str) -> SimFleet {
        let ops = tempfile::Builder::new()
            .prefix("beamup-simops-")
            .tempdir()
            .unwrap();
        keys_and_root(ops.path());
        fs::create_dir(ops.path().join("bundles")).unwrap();
        let state = super::memory_tempdir("beamup-sim-");
        let serve = Daemon::start(
            ops.path(),
            "serve.log",
            &[
                "serve",
                "--broker",
                &broker.url(),
                "--fleet",
                FLEET,
                "--bundles",
                "bundles",
            ],
            &[],
        );
        serve.wait_log("serving requests on", Duration::from_secs(20));
        let watch = Sub::new(
            &broker,
            &[
                "beamup/acme/device/+/offer",
                "beamup/acme/device/+/state",
                "beamup/acme/campaign/+/status",
            ],
        );
        let n_text = n.to_string();
        let sim = Daemon::start(
            ops.path(),
            "sim.log",
            &[
                "fleet",
                "simulate",
                "--broker",
                &broker.url(),
                "--fleet",
                FLEET,
                "--devices",
                &n_text,
                "--root",
                "root.json",
                "--release",
                "thermo",
                "--mix",
                mix,
                "--install-time",
                install_time,
                "--state-dir",
                state.path().to_str().unwrap(),
                "--summary",
                "summary.json",
            ],
            &[("RUST_LOG", "beamup=info")],
        );
        let f = SimFleet {
            broker,
            ops,
            state,
            serve,
            sim: Some(sim),
            n,
            watch,
        };
        f.sim().wait_log(
            &format!("all {n} simulated devices connected"),
            Duration::from_secs(60),
        );
        // Each device's retained state is on the broker: a campaign
        // started now sees the whole fleet.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let states = f.latest("state");
            let ready = states
                .values()
                .filter(|s| s["running"] == "1.0.0" && s["phase"]["name"] == "idle")
                .count();
            if ready == n {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {ready} of {n} devices reported in"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        f
    }

    pub fn sim(&self) -> &Daemon {
        self.sim.as_ref().expect("simulator running")
    }

    pub fn dir(&self) -> &Path {
        self.ops.path()
    }

    /// Each device's latest message on `device/ID/KIND`, as JSON.
    pub fn latest(&self, kind: &str) -> BTreeMap<String, Value> {
        let mut out = BTreeMap::new();
        for m in self.watch.messages() {
            let Some(rest) = m.topic.strip_prefix("beamup/acme/device/") else {
                continue;
            };
            if let Some((id, k)) = rest.split_once('/')
                && k == kind
                && !m.payload.is_empty()
            {
                out.insert(id.to_string(), m.json());
            }
        }
        out
    }

    /// What each simulated device says it was given and did (written by
    /// the simulator once all were connected, and again when it stops).
    pub fn summary(&self) -> Value {
        let text = fs::read_to_string(self.dir().join("summary.json")).unwrap();
        serde_json::from_str(&text).unwrap()
    }

    /// Stops the simulator and returns its final summary.
    pub fn stop_devices(&mut self) -> Value {
        let mut sim = self.sim.take().expect("simulator running");
        assert_eq!(sim.term(Duration::from_secs(30)), Some(0), "{}", sim.log());
        self.summary()
    }

    /// The devices whose fate is `fate`, by index.
    pub fn with_fate(summary: &Value, fate: &str) -> Vec<usize> {
        summary["devices"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, d)| d["fate"] == fate)
            .map(|(i, _)| i)
            .collect()
    }

    /// A bundle of thermo `vsn` in the served directory.
    pub fn bundle(&self, vsn: &str, payload: usize) -> PathBuf {
        let tarball = release_tarball(self.dir(), vsn, payload);
        let out = self.dir().join(format!("bundles/thermo-{vsn}.bundle"));
        super::cli::sign_bundle(self.dir(), &tarball, &out, &[]);
        out
    }

    pub fn plan(&self, name: &str, bundle: &Path, body: &str) -> PathBuf {
        let p = self.dir().join(name);
        fs::write(
            &p,
            format!(
                "bundle = {:?}\nfleet = \"{FLEET}\"\n{body}\n",
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

    /// `beamup campaign start PLAN` as a daemon (the real controller).
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
            &[("RUST_LOG", "beamup=info")],
        )
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
                "campaign {cid} never {what}; last status {:?} reason {:?}",
                last.as_ref().map(|c| c["status"].clone()),
                last.as_ref().map(|c| c["reason"].clone()),
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Offers sent to each device: non-empty offer messages that were not
    /// retained copies (each one a publish that reached the broker).
    pub fn offers_sent(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for m in self.watch.messages() {
            if let Some(id) = m
                .topic
                .strip_prefix("beamup/acme/device/")
                .and_then(|r| r.strip_suffix("/offer"))
                && !m.payload.is_empty()
                && !m.retain
            {
                *out.entry(id.to_string()).or_insert(0) += 1;
            }
        }
        out
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
}
