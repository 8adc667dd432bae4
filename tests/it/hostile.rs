//! Hostile input from the network, over MQTT 5 and 3.1.1: a client with
//! access to the broker publishes straight to a device's topics (junk,
//! unsigned and foreign offers, replays, oversize messages, floods of data
//! replies) and sends `beamup serve` requests it should not honour. After
//! all of it the agent is the same process, still connected, has reported
//! exactly what docs/PROTOCOL.md says it reports, its node runs what it ran
//! from the same files, and a genuine offer still installs.
//!
//! One broker, device, node, agent and server per protocol version; the
//! phases run in order on them, each asserting its own effects.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::cli::beamup;
use crate::support::device::{Device, envelope_of};
use crate::support::mqtt::{Broker, Daemon, Msg, Sub};

const OUTCOME: Duration = Duration::from_secs(90);
const DEVICE_TOPICS: &str = "beamup/acme/device/gw-1";
const DATA: &str = "beamup/acme/device/gw-1/data";

/// Resident memory of a process, in KiB (`VmRSS` of /proc/PID/status).
fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A decoded data reply: magic, tarball id, offset, the rest.
fn data_reply(m: &Msg) -> (String, [u8; 32], u64, Vec<u8>) {
    assert!(m.payload.len() >= 44, "short reply on {}", m.topic);
    let magic = String::from_utf8_lossy(&m.payload[..4]).into_owned();
    let id: [u8; 32] = m.payload[4..36].try_into().unwrap();
    let offset = u64::from_be_bytes(m.payload[36..44].try_into().unwrap());
    (magic, id, offset, m.payload[44..].to_vec())
}

/// What the node is: its OS process, the version it reports, and a hash of
/// every file of its release root.
#[derive(Debug, PartialEq)]
struct NodeFacts {
    os_pid: i32,
    version: String,
    root: std::collections::BTreeMap<PathBuf, [u8; 32]>,
}

impl NodeFacts {
    fn of(d: &Device) -> NodeFacts {
        NodeFacts {
            os_pid: d.node.os_pid(),
            version: d.version_and_counter().0,
            root: d.snapshot(),
        }
    }
}

/// The tarball of a bundle as `serve` holds it: id, size, chunk size, and
/// the bundle to read bytes from.
struct Tarball {
    id: [u8; 32],
    hex: String,
    size: u64,
    chunk: u64,
    bundle: beamup::bundle::Bundle,
}

impl Tarball {
    fn of(path: &Path) -> Tarball {
        let bundle = beamup::bundle::Bundle::open(path).unwrap();
        let m = bundle.manifest_unverified().unwrap();
        Tarball {
            id: hex::decode(&m.tarball.sha256).unwrap().try_into().unwrap(),
            hex: m.tarball.sha256.clone(),
            size: m.tarball.size,
            chunk: u64::from(m.tarball.chunk_size),
            bundle,
        }
    }

    fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        let n = self.bundle.read_tarball_at(&mut buf, offset).unwrap();
        assert_eq!(n, len);
        buf
    }
}

/// One protocol version's field: broker, device with its node, a server,
/// the agent, a watcher of the device's reports and data topic, and the
/// hostile client.
struct Field {
    broker: Broker,
    d: Device,
    serve: Daemon,
    agent: Daemon,
    /// gw-1's state, online flag, events and data; gw-2's data.
    watch: Sub,
    hostile: Sub,
    version: &'static str,
    /// `--broker URL --fleet acme --mqtt-version V`.
    args: Vec<String>,
}

impl Field {
    fn start(version: &'static str) -> Field {
        let broker = Broker::start();
        let d = Device::with_health("timeout = \"8s\"\nsoak = \"1s\"");
        d.add_mqtt(
            &broker.url(),
            "gw-1",
            &["canary"],
            &format!("version = \"{version}\""),
        );
        fs::create_dir(d.path().join("bundles")).unwrap();
        fs::create_dir(d.path().join("outside")).unwrap();
        let watch = Sub::new(
            &broker,
            &[
                "beamup/acme/device/gw-1/state",
                "beamup/acme/device/gw-1/online",
                "beamup/acme/device/gw-1/events",
                DATA,
                "beamup/acme/device/gw-2/data",
            ],
        );
        let hostile = Sub::new(&broker, &[]);
        let args: Vec<String> = [
            "--broker",
            &broker.url(),
            "--fleet",
            "acme",
            "--mqtt-version",
            version,
        ]
        .map(String::from)
        .to_vec();
        let mut serve_args = vec!["serve", "--bundles", "bundles"];
        serve_args.extend(args.iter().map(String::as_str));
        let serve = Daemon::start(d.path(), "serve.log", &serve_args, &[]);
        serve.wait_log("serving requests on", Duration::from_secs(20));
        let agent = Daemon::start(
            d.path(),
            "agent.log",
            &["agent", "--config", "agent.toml"],
            &[],
        );
        Field {
            broker,
            d,
            serve,
            agent,
            watch,
            hostile,
            version,
            args,
        }
    }

    /// A bundle of `vsn` in `dir` (under the device dir).
    fn bundle_in(&self, dir: &str, vsn: &str, extra: &[&str]) -> PathBuf {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.d
            .bundle_with(vsn, &format!("{dir}/thermo-{vsn}-{n}.bundle"), extra)
    }

    /// The device's signing key (the one its trust root names).
    fn key(&self) -> beamup::trust::keys::SecretKey {
        beamup::trust::keys::SecretKey::load(&self.d.path().join("keys/k.key")).unwrap()
    }

    fn manifest_of(&self, bundle: &Path) -> beamup::release::manifest::Manifest {
        beamup::bundle::Bundle::open(bundle)
            .unwrap()
            .manifest_unverified()
            .unwrap()
    }

    /// The envelope of `m` signed by `key`: a genuine offer of whatever
    /// `m` says, without a bundle of its own.
    fn resign(
        &self,
        m: &beamup::release::manifest::Manifest,
        key: &beamup::trust::keys::SecretKey,
    ) -> Vec<u8> {
        beamup::trust::signed::Envelope::sign(
            beamup::trust::signed::DocKind::Manifest,
            m,
            std::slice::from_ref(key),
        )
        .to_bytes()
    }

    fn offer(&self, bundle: &Path) {
        let mut args = vec!["offer", bundle.to_str().unwrap(), "--device", "gw-1"];
        args.extend(self.args.iter().map(String::as_str));
        beamup(self.d.path(), &args).ok();
    }

    fn states(&self) -> Vec<Value> {
        self.watch
            .messages()
            .iter()
            .filter(|m| m.topic == format!("{DEVICE_TOPICS}/state"))
            .map(Msg::json)
            .collect()
    }

    fn events(&self) -> Vec<Value> {
        self.watch
            .messages()
            .iter()
            .filter(|m| m.topic == format!("{DEVICE_TOPICS}/events"))
            .map(Msg::json)
            .collect()
    }

    #[track_caller]
    fn wait_state(&self, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        self.watch
            .wait_for(what, OUTCOME, |m| {
                m.topic == format!("{DEVICE_TOPICS}/state") && f(&m.json())
            })
            .json()
    }

    fn discarded(&self) -> u64 {
        self.states()
            .last()
            .and_then(|s| s["discarded"]["count"].as_u64())
            .unwrap_or(0)
    }

    /// Waits until the agent logged `needle` at least `n` times.
    #[track_caller]
    fn wait_logged(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.agent.log().matches(needle).count() < n {
            assert!(
                Instant::now() < deadline,
                "{needle:?} not logged {n} times:\n{}",
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The topics the agent subscribed to, as the broker saw them (its log
    /// lists each filter of a SUBSCRIBE on a line of its own).
    fn agent_subscriptions(&self) -> BTreeSet<String> {
        let log = self.broker.log();
        let mut out = BTreeSet::new();
        let mut in_agent_subscribe = false;
        for line in log.lines() {
            let text = line.split_once(": ").map_or(line, |(_, t)| t);
            if let Some(who) = text.strip_prefix("Received SUBSCRIBE from ") {
                in_agent_subscribe = who == "beamup-acme-gw-1";
            } else if in_agent_subscribe && let Some(f) = text.strip_prefix('\t') {
                out.insert(f.split(" (QoS").next().unwrap().to_string());
            } else {
                in_agent_subscribe = false;
            }
        }
        out
    }

    fn connections(&self) -> usize {
        self.agent.log().matches("connected to mqtt://").count()
    }

    /// The same agent process, connected once and never again, with its
    /// retained online flag up.
    #[track_caller]
    fn assert_agent_standing(&mut self, pid: u32) {
        assert_eq!(self.agent.running_pid(), Some(pid), "{}", self.agent.log());
        assert_eq!(self.connections(), 1, "{}", self.agent.log());
        let online = Sub::new(&self.broker, &["beamup/acme/device/gw-1/online"]);
        let flag = online.wait_for("the online flag", Duration::from_secs(10), |m| m.retain);
        assert_eq!(flag.json()["online"], true);
    }
}

/// Junk on every topic the device subscribes to. Offers and commands it
/// cannot believe are counted as discarded, never an outcome or an event;
/// data replies that answer no request are dropped without a count (they
/// arrive in normal operation too: duplicates, late replies).
fn junk_is_counted_and_changes_nothing(f: &Field, topics: &BTreeSet<String>, installed: &Path) {
    let key = f.key();
    let signed_not_a_manifest = beamup::trust::signed::Envelope::sign(
        beamup::trust::signed::DocKind::Manifest,
        &json!({"hello": "world", "sequence": 99}),
        std::slice::from_ref(&key),
    )
    .to_bytes();
    // A document the trusted key really signed, of another kind.
    let trust_root = fs::read(f.d.path().join("root.json")).unwrap();
    beamup(f.d.path(), &["keygen", "--out", "other", "--name", "x"]).ok();
    let other = beamup::trust::keys::SecretKey::load(&f.d.path().join("other/x.key")).unwrap();
    let unknown_key = f.resign(&f.manifest_of(installed), &other);
    let junk: Vec<Vec<u8>> = vec![
        (0..=255u8).cycle().take(3000).collect(),
        b"\xff\xfe\x00garbage".to_vec(),
        b"{\"hello\": 1}".to_vec(),
        b"[1, 2, 3]".to_vec(),
        b"\"a string\"".to_vec(),
        b"{\"signed\": {\"type\": \"beamup-manifest\"}, \"signatures\": [{\"keyid\": \"00\", \"sig\": \"00\"}]}".to_vec(),
        b"{\"v\": 1, \"cmd\": \"reboot\"}".to_vec(),
        b"{\"v\": 2, \"cmd\": \"retry\"}".to_vec(),
        signed_not_a_manifest,
        trust_root,
        unknown_key,
        // Junk that parsers quote back in their errors (an unknown
        // variant, a string where a list belongs): a megabyte of it, with
        // JSON-escaped newlines that become lines of their own.
        format!(
            "{{\"v\": 1, \"cmd\": \"x\\nERROR beamup: forged line\\n{}\"}}",
            "z".repeat(1 << 20)
        )
        .into_bytes(),
        format!(
            "{{\"signed\": {{}}, \"signatures\": \"x\\nERROR beamup: forged line\\n{}\"}}",
            "z".repeat(1 << 20)
        )
        .into_bytes(),
    ];
    let events_before = f.events().len();
    let discarded_before = f.discarded();
    let last_outcome = f.states().last().unwrap()["last_outcome"].clone();
    let mut counted = 0;
    for topic in topics {
        for j in &junk {
            f.hostile.publish(topic, j.clone(), false);
            if !topic.ends_with("/data") {
                counted += 1;
            }
        }
    }
    let want = discarded_before + counted;
    let st = f.wait_state(&format!("{want} discarded"), |s| {
        s["discarded"]["count"] == want
    });
    assert_eq!(st["last_outcome"], last_outcome, "{st:#}");
    assert_eq!(st["phase"]["name"], "committed", "{st:#}");
    let log = f.agent.log();
    for reason in [
        "is not a signed manifest",
        "does not trust",
        "signed, but not a manifest",
        "not a command",
        "not understood",
    ] {
        assert!(log.contains(reason), "no discard says {reason:?}:\n{log}");
    }
    // What it reports and logs of them is bounded and one line each.
    assert!(
        log.contains("x\\nERROR beamup: forged line"),
        "the junk was not quoted back, escaped"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("ERROR beamup: forged")),
        "junk wrote a line of its own into the log"
    );
    assert!(
        log.lines().all(|l| l.len() < 4096),
        "junk made a log line of {} bytes",
        log.lines().map(str::len).max().unwrap_or(0)
    );
    let state: Value =
        serde_json::from_slice(&fs::read(f.d.path().join("state/state.json")).unwrap()).unwrap();
    let recent = state["discarded"]["recent"].as_array().unwrap();
    assert!(
        recent
            .iter()
            .all(|r| r["reason"].as_str().unwrap().len() < 1024),
        "{recent:#?}"
    );
    assert!(st["discarded"]["reason"].as_str().unwrap().len() < 1024);
    // Nothing more trickles in, and nothing went out as an event.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(f.discarded(), want);
    assert_eq!(f.events().len(), events_before, "{:#?}", f.events());
}

/// Genuine signed offers that must not be installed: the one installed
/// already (byte for byte, and re-encoded), an older one it superseded, one
/// for another device. Replays are ignored silently; the others are
/// refused with a `rejected` outcome naming the reason.
fn replays_and_foreign_offers_are_refused(f: &Field, installed: &Path, newer: &Path) {
    let events_before = f.events().len();
    let discarded_before = f.discarded();
    let envelope = envelope_of(installed);
    let text = String::from_utf8(envelope.clone()).unwrap();
    let reencoded = format!("{{\n {}", text.strip_prefix('{').unwrap());
    f.hostile
        .publish(&format!("{DEVICE_TOPICS}/offer"), envelope.clone(), false);
    f.hostile.publish(
        "beamup/acme/group/canary/offer",
        reencoded.into_bytes(),
        false,
    );
    f.wait_logged("was decided before; ignored", 1);
    f.wait_logged("was already committed; ignored", 1);

    let key = f.key();
    let mut m = f.manifest_of(newer);
    m.target = vec!["device:gw-2".into()];
    let for_gw2 = f.resign(&m, &key);
    let mut m = f.manifest_of(installed);
    m.sequence -= 1000;
    let superseded = f.resign(&m, &key);
    // On gw-2's own topic it never reaches gw-1 ...
    f.hostile
        .publish("beamup/acme/device/gw-2/offer", for_gw2.clone(), false);
    // ... and on gw-1's it is refused.
    f.hostile
        .publish(&format!("{DEVICE_TOPICS}/offer"), for_gw2, false);
    f.hostile
        .publish(&format!("{DEVICE_TOPICS}/offer"), superseded, false);
    let outcomes = |f: &Field| -> Vec<Value> {
        f.events()[events_before..]
            .iter()
            .filter(|e| e["kind"] == "outcome")
            .cloned()
            .collect()
    };
    f.watch
        .wait_for("two refusals", OUTCOME, |_| outcomes(f).len() >= 2);
    let o = outcomes(f);
    assert_eq!(o[0]["phase"], "rejected", "{o:#?}");
    assert_eq!(o[0]["version"], "2.0.0", "{o:#?}");
    let reason = o[0]["reason"].as_str().unwrap();
    assert!(reason.contains("does not include this device"), "{reason}");
    assert_eq!(o[1]["phase"], "rejected", "{o:#?}");
    assert_eq!(o[1]["version"], "1.1.0", "{o:#?}");
    let reason = o[1]["reason"].as_str().unwrap();
    assert!(
        reason.contains("sequence number 1000 is not greater than the last accepted 2000"),
        "{reason}"
    );
    let st = f.wait_state("the last refusal in the state", |s| {
        s["last_outcome"]["reason"].as_str() == Some(reason)
    });
    assert_eq!(st["last_outcome"]["outcome"], "rejected", "{st:#}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(outcomes(f).len(), 2, "{:#?}", outcomes(f));
    // Nothing but outcomes: no transfer started for any of them.
    assert_eq!(f.events().len(), events_before + 2, "{:#?}", f.events());
    assert_eq!(f.discarded(), discarded_before);
}

/// A message above the device's packet limit on each topic it subscribes
/// to, the offer retained. MQTT 5: the broker never sends them (the device
/// announced its limit) and the device does not learn of them. 3.1.1: the
/// connection's guard drops each unread and the device counts it.
fn oversize_messages_are_dropped(f: &Field, topics: &BTreeSet<String>) {
    let discarded_before = f.discarded();
    let huge = vec![b'x'; 17 << 20];
    for topic in topics {
        f.hostile
            .publish(topic, huge.clone(), topic.ends_with("/offer"));
    }
    if f.version == "3.1.1" {
        let want = discarded_before + topics.len() as u64;
        let st = f.wait_state("oversize counted", |s| s["discarded"]["count"] == want);
        let reason = st["discarded"]["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("a message of 17.0 MiB is larger than the 16.1 MiB"),
            "{reason}"
        );
    } else {
        // The broker drops them for the device: a garbage command sent
        // after them arrives, and nothing else was counted.
        f.hostile
            .publish(&format!("{DEVICE_TOPICS}/cmd"), b"after".to_vec(), false);
        let want = discarded_before + 1;
        let st = f.wait_state("the command after them", |s| {
            s["discarded"]["count"].as_u64() >= Some(want)
        });
        assert_eq!(st["discarded"]["count"], want, "{st:#}");
        let said = f
            .broker
            .log()
            .matches("Dropping too large outgoing PUBLISH for beamup-acme-gw-1")
            .count();
        assert_eq!(said, topics.len(), "mosquitto did not drop each of them");
    }
    // The retained oversize offer is replaced by nothing readable.
    f.hostile
        .publish(&format!("{DEVICE_TOPICS}/offer"), Vec::new(), true);
}

/// Requests `serve` must not honour. Each gets the protocol's error reply
/// on the requesting device's data topic, or is dropped unanswered when it
/// cannot be read; a bundle reached through a symbolic link out of the
/// directory is not served; floods leave its memory bounded. Returns when
/// a genuine request was answered with the right bytes.
fn hostile_requests_to_serve(f: &mut Field, held: &Path, outside: &Path) {
    let t = Tarball::of(held);
    let out = Tarball::of(outside);
    std::os::unix::fs::symlink(outside, f.d.path().join("bundles/linked.bundle")).unwrap();
    let unknown = "ab".repeat(32);
    let req = |bundle: &str, offset: u64, len: u64, piece: Option<u64>| {
        let mut r = json!({"v": 1, "bundle": bundle, "chunk": 0, "offset": offset, "len": len});
        if let Some(p) = piece {
            r["piece"] = json!(p);
        }
        serde_json::to_vec(&r).unwrap()
    };
    let to_gw1 = "beamup/acme/req/gw-1";
    let replies_before = f.watch.messages().len();
    // (request, the offset its error reply names, the error).
    let refused: Vec<(Vec<u8>, u64, &str)> = vec![
        (req(&t.hex, t.size, 1, None), t.size, "bad range"),
        (req(&t.hex, t.size - 10, 20, None), t.size - 10, "bad range"),
        (
            req(&t.hex, u64::MAX - 5, 10, None),
            u64::MAX - 5,
            "bad range",
        ),
        (req(&t.hex, 1, u64::from(u32::MAX), None), 1, "bad range"),
        (req(&t.hex, 2, 9 * t.chunk, Some(t.chunk)), 2, "bad range"),
        (
            req(&t.hex, 3, 2 * t.chunk, Some(2 * t.chunk)),
            3,
            "bad range",
        ),
        (req(&t.hex, 4, 10, Some(0)), 4, "bad range"),
        (req(&t.hex, 5, 0, None), 5, "bad range"),
        (
            req(&unknown, 6, 10, None),
            6,
            "no bundle with this tarball here",
        ),
        (
            req(&out.hex, 7, 10, None),
            7,
            "no bundle with this tarball here",
        ),
    ];
    let unreadable: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        b"[]".to_vec(),
        req("../../../../etc/passwd", 0, 10, None),
        req(&format!("../{}", &t.hex[3..]), 0, 10, None),
        req(&t.hex[..63], 0, 10, None),
        br#"{"v": 2, "bundle": "00", "chunk": 0, "offset": 0, "len": 1}"#.to_vec(),
        format!(
            r#"{{"v": 1, "bundle": "{}", "chunk": 0, "offset": -1, "len": 1}}"#,
            t.hex
        )
        .into_bytes(),
        format!(
            r#"{{"v": 1, "bundle": "{}", "chunk": 0, "offset": 0, "len": 4294967296}}"#,
            t.hex
        )
        .into_bytes(),
    ];
    for (r, _, _) in &refused {
        f.hostile.publish(to_gw1, r.clone(), false);
    }
    for r in &unreadable {
        f.hostile.publish(to_gw1, r.clone(), false);
        f.hostile.publish("beamup/acme/req/..", r.clone(), false);
    }
    f.hostile
        .publish("beamup/acme/req/..", req(&t.hex, 0, 10, None), false);
    // A genuine request, last: answered with the tarball's bytes, to the
    // device named by the request topic.
    f.hostile
        .publish("beamup/acme/req/gw-2", req(&t.hex, 0, t.chunk, None), false);
    let reply = f.watch.wait_for("the genuine reply", OUTCOME, |m| {
        m.topic == "beamup/acme/device/gw-2/data"
    });
    let (magic, id, offset, data) = data_reply(&reply);
    assert_eq!((magic.as_str(), id, offset), ("BUD1", t.id, 0));
    assert_eq!(data, t.bytes(0, t.chunk as usize));
    let answers: Vec<(String, [u8; 32], u64, Vec<u8>)> = f.watch.messages()[replies_before..]
        .iter()
        .filter(|m| m.topic == DATA)
        .map(data_reply)
        .collect();
    let want: Vec<(String, [u8; 32], u64, Vec<u8>)> = refused
        .iter()
        .map(|(r, offset, why)| {
            let bundle: Value = serde_json::from_slice(r).unwrap();
            let id = hex::decode(bundle["bundle"].as_str().unwrap()).unwrap();
            (
                "BUE1".into(),
                id.try_into().unwrap(),
                *offset,
                why.as_bytes().to_vec(),
            )
        })
        .collect();
    let show = |v: &[(String, [u8; 32], u64, Vec<u8>)]| -> Vec<String> {
        v.iter()
            .map(|(m, _, o, d)| {
                format!("{m} {o} {}", String::from_utf8_lossy(&d[..d.len().min(40)]))
            })
            .collect()
    };
    assert_eq!(show(&answers), show(&want), "{}", f.serve.log());
    assert_eq!(answers, want);
    let log = f.serve.log();
    assert!(log.contains("linked.bundle: not served"), "{log}");

    // Floods: thousands of requests, fast, of every kind above, and
    // requests padded to 128 KiB while the server is busy sending.
    let serve_pid = f.serve.running_pid().unwrap();
    let rss_before = rss_kib(serve_pid);
    let padded = {
        let mut r = req(&t.hex, 0, 8 * t.chunk, Some(t.chunk));
        r.splice(1..1, std::iter::repeat_n(b' ', 128 << 10));
        r
    };
    let started = Instant::now();
    for i in 0..4000u64 {
        match i % 20 {
            0 => f
                .hostile
                .publish(to_gw1, req(&t.hex, 0, 8 * t.chunk, Some(t.chunk)), false),
            1..=2 => f.hostile.publish(to_gw1, padded.clone(), false),
            3..=6 => f.hostile.publish(to_gw1, req(&unknown, i, 10, None), false),
            7..=10 => f
                .hostile
                .publish(to_gw1, req(&t.hex, t.size + i, 10, None), false),
            _ => f
                .hostile
                .publish(to_gw1, unreadable[(i % 8) as usize].clone(), false),
        }
    }
    // The server is still there and answers. A request that finds its
    // queue full is dropped, so it is asked again, as a device does.
    let deadline = Instant::now() + OUTCOME;
    let answered =
        |m: &Msg| m.topic == "beamup/acme/device/gw-2/data" && data_reply(m).2 == t.chunk;
    let reply = loop {
        f.hostile.publish(
            "beamup/acme/req/gw-2",
            req(&t.hex, t.chunk, 10, None),
            false,
        );
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end && !f.watch.messages().iter().any(answered) {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Some(m) = f.watch.messages().into_iter().find(answered) {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "serve never answered after the flood:\n{}",
            f.serve.log()
        );
    };
    assert_eq!(data_reply(&reply).3, t.bytes(t.chunk, 10));
    assert_eq!(f.serve.running_pid(), Some(serve_pid), "{}", f.serve.log());
    let grown = rss_kib(serve_pid).saturating_sub(rss_before);
    eprintln!(
        "MQTT {}: serve took 4000 hostile requests in {:?}, from {rss_before} KiB grew by {grown} KiB",
        f.version,
        started.elapsed()
    );
    assert!(
        grown < 32 * 1024,
        "serve grew by {grown} KiB during the flood (from {rss_before} KiB)"
    );
}

/// Requests padded to a megabyte, sent to a server too slow to keep up
/// (it waits before each reply): each is dropped as it arrives, none is
/// queued, so its memory does not grow by the megabytes they carry.
fn padded_requests_are_not_queued(f: &Field, held: &Path) {
    let t = Tarball::of(held);
    let mut args = vec!["serve", "--bundles", "bundles"];
    args.extend(f.args.iter().map(String::as_str));
    let fleet = args.iter().position(|a| *a == "acme").unwrap();
    args[fleet] = "slow";
    let mut slow = Daemon::start(
        f.d.path(),
        "serve-slow.log",
        &args,
        &[("BEAMUP_SERVE_FAULTS", "delay:300")],
    );
    slow.wait_log("serving requests on", Duration::from_secs(20));
    let pid = slow.running_pid().expect("slow serve running");
    let rss_before = rss_kib(pid);
    let busy = serde_json::to_vec(&json!({"v": 1, "bundle": t.hex, "chunk": 0, "offset": 0,
        "len": 8 * t.chunk, "piece": t.chunk}))
    .unwrap();
    let mut padded = busy.clone();
    padded.splice(1..1, std::iter::repeat_n(b' ', 1 << 20));
    f.hostile.publish("beamup/slow/req/gw-1", busy, false);
    for _ in 0..100 {
        f.hostile
            .publish("beamup/slow/req/gw-1", padded.clone(), false);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while slow.log().matches("dropped unread").count() < 100 {
        assert!(
            Instant::now() < deadline,
            "padded requests were not dropped on arrival:\n{}",
            slow.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let grown = rss_kib(pid).saturating_sub(rss_before);
    eprintln!(
        "MQTT {}: a slow serve took 100 padded requests, from {rss_before} KiB grew by {grown} KiB",
        f.version
    );
    assert!(grown < 16 * 1024, "a slow serve grew by {grown} KiB");
}

/// A transfer that stalls (the server does not hold the bundle yet) while
/// a flood of data replies arrives: for another transfer, for this one at
/// offsets never asked for or of the wrong length, error replies with
/// lines of their own. The agent drops them all with its memory bounded;
/// once the server holds the bundle the genuine transfer completes.
fn data_floods_are_dropped_and_the_genuine_transfer_completes(
    f: &Field,
    final_bundle: &Path,
    agent_pid: u32,
) {
    let t = Tarball::of(final_bundle);
    let outcomes = |f: &Field| f.events().iter().filter(|e| e["kind"] == "outcome").count();
    let outcomes_before = outcomes(f);
    f.offer(final_bundle);
    f.wait_logged("the server cannot serve this release", 1);
    // An error reply with lines of its own, before the flood (the broker
    // may drop what queues behind one).
    let mut forged = b"BUE1".to_vec();
    forged.extend_from_slice(&t.id);
    forged.extend_from_slice(&0u64.to_be_bytes());
    forged.extend_from_slice(b"gone\nERROR beamup: forged line\n");
    forged.extend(std::iter::repeat_n(b'z', 1 << 20));
    f.hostile.publish(DATA, forged, false);
    f.wait_logged("forged line", 1);
    let rss_before = rss_kib(agent_pid);
    let piece = vec![0x5a; 32 * 1024];
    let other = [0x42u8; 32];
    for i in 0..4000u64 {
        let reply = match i % 4 {
            0 | 1 => beamup::transport::protocol::encode_data(&other, i * 32768, &piece),
            // Not a piece start, or not the length asked for.
            2 => beamup::transport::protocol::encode_data(&t.id, 1 + i, &piece),
            _ => beamup::transport::protocol::encode_data(&t.id, 0, &piece[..100]),
        };
        f.hostile.publish_at_most_once(DATA, reply);
    }
    // The broker drops what the agent cannot take as fast: a command sent
    // after the flood, once it is counted, says the agent has taken in all
    // that reached it.
    let discarded = f.discarded();
    for i in 0.. {
        f.hostile.publish(
            &format!("{DEVICE_TOPICS}/cmd"),
            format!("after {i}").into_bytes(),
            false,
        );
        std::thread::sleep(Duration::from_millis(200));
        if f.discarded() > discarded {
            break;
        }
        assert!(i < 150, "the agent never took in a command after the flood");
    }

    let log = f.agent.log();
    assert!(
        !log.lines()
            .any(|l| l.starts_with("ERROR beamup: forged line")),
        "a data reply wrote a line of its own into the log"
    );
    assert!(
        log.lines().all(|l| l.len() < 64 * 1024),
        "a data reply made a log line of a megabyte"
    );
    let dropped = log
        .matches("data reply for another transfer ignored")
        .count()
        + log.matches("ignored: not requested").count()
        + log.matches("ignored: not the length requested").count();
    assert!(
        dropped >= 500,
        "only {dropped} hostile replies reached the agent"
    );
    let grown = rss_kib(agent_pid).saturating_sub(rss_before);
    eprintln!(
        "MQTT {}: the agent dropped {dropped} hostile data replies, from {rss_before} KiB grew by {grown} KiB",
        f.version
    );
    assert!(
        grown < 16 * 1024,
        "the agent grew by {grown} KiB during the flood (from {rss_before} KiB)"
    );
    // Still downloading: the flood decided nothing.
    assert_eq!(outcomes(f), outcomes_before, "{:#?}", f.events());
    assert_eq!(
        f.states().last().unwrap()["phase"]["name"],
        "downloading",
        "{:#?}",
        f.states().last()
    );
}

fn hostile_input_leaves_the_device_standing(version: &'static str) {
    let mut f = Field::start(version);
    f.wait_state("idle", |s| s["phase"]["name"] == "idle");
    let agent_pid = f.agent.running_pid().expect("agent running");

    // Two genuine bundles (every other offer is re-signed from their
    // manifests), made at once. The first is installed, so that there is
    // an installed offer to replay; the second waits for the end, outside
    // the served directory, reached from inside it only by a link.
    let (installed, final_bundle) = std::thread::scope(|s| {
        let later = s.spawn(|| f.bundle_in("outside", "2.0.0", &["--keep-tarball"]));
        let now = f.bundle_in(
            "bundles",
            "1.1.0",
            &["--keep-tarball", "--sequence", "2000"],
        );
        (now, later.join().unwrap())
    });
    f.offer(&installed);
    f.wait_state("committed 1.1.0", |s| {
        s["phase"]["name"] == "committed" && s["phase"]["version"] == "1.1.0"
    });
    let node = NodeFacts::of(&f.d);
    assert_eq!(node.version, "1.1.0");

    let topics = f.agent_subscriptions();
    assert!(topics.contains(DATA), "{topics:?}");
    assert!(
        topics.iter().all(|t| t.starts_with("beamup/acme/")),
        "{topics:?}"
    );
    assert!(topics.len() >= 3, "{topics:?}");

    junk_is_counted_and_changes_nothing(&f, &topics, &installed);
    replays_and_foreign_offers_are_refused(&f, &installed, &final_bundle);
    oversize_messages_are_dropped(&f, &topics);
    hostile_requests_to_serve(&mut f, &installed, &final_bundle);
    padded_requests_are_not_queued(&f, &installed);
    data_floods_are_dropped_and_the_genuine_transfer_completes(&f, &final_bundle, agent_pid);

    // After all of it: the same agent, connected, and a node untouched.
    f.assert_agent_standing(agent_pid);
    assert_eq!(
        NodeFacts::of(&f.d),
        node,
        "the node or its release root changed"
    );
    let st = f.d.status();
    assert_eq!(st["node"]["running"], "1.1.0", "{st:#}");

    // The genuine offer waiting all along installs once the server holds it.
    fs::rename(
        &final_bundle,
        f.d.path()
            .join("bundles")
            .join(final_bundle.file_name().unwrap()),
    )
    .unwrap();
    let deadline = Instant::now() + OUTCOME;
    let committed =
        |s: &Value| s["phase"]["name"] == "committed" && s["phase"]["version"] == "2.0.0";
    while !f.states().iter().any(committed) {
        let tail = |log: String| {
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        assert!(
            Instant::now() < deadline,
            "2.0.0 not committed\nserve:\n{}\nagent:\n{}",
            tail(f.serve.log()),
            tail(f.agent.log())
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = f.states().into_iter().find(committed).unwrap();
    assert_eq!(st["running"], "2.0.0", "{st:#}");
    f.d.assert_settled_on("2.0.0", &[]);
    f.assert_agent_standing(agent_pid);
}

#[test]
fn hostile_input_over_mqtt_5_leaves_the_device_standing() {
    hostile_input_leaves_the_device_standing("5");
}

#[test]
fn hostile_input_over_mqtt_3_1_1_leaves_the_device_standing() {
    hostile_input_leaves_the_device_standing("3.1.1");
}
