//! Campaigns at fleet scale, against what the broker alone can do, in one
//! run: simulated devices (`beamup fleet simulate`, each its own MQTT
//! session verifying offers and fetching verified chunks) driven by the
//! real controller (`beamup campaign start`) and `beamup serve`, through
//! one private mosquitto on loopback.
//!
//! Prints, each with its goal and ratio:
//! - campaign wall time for 1,000 devices (soaks 0) against its floor:
//!   the broker's raw time for the same number of offer, state and event
//!   messages (one raw publisher and one subscriber, QoS 1, same sizes),
//!   plus the install time of the two waves (the canary, then the rest,
//!   all at once);
//! - `serve`'s aggregate throughput with many devices fetching at once
//!   against raw mosquitto for the same bytes, and its CPU per device;
//! - peak RSS of the controller and of `serve` at 1,000 and 10,000
//!   devices; the broker's retained bytes per device;
//! - correctness: each outcome counted once, no device offered twice, the
//!   threshold judged on the right count.
//!
//! Not run by CI: `cargo bench --bench fleet` (about 3 minutes; the
//! 10,000-device run needs an open-file limit above 10,100).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use beamup::bundle::Bundle;
use common::{beamup, beamup_in, data_replies, keys_and_root, loadavg, scratch};
use serde_json::Value;

const INSTALL: Duration = Duration::from_millis(200);
const CHUNK: usize = 64 * 1024;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child stopped by its PID when dropped, also on a panic.
struct Proc(Option<Child>);

impl Proc {
    fn pid(&self) -> u32 {
        self.0.as_ref().unwrap().id()
    }
    fn term(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if c.try_wait().unwrap().is_some() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn spawn(dir: &Path, log: &str, args: &[&str]) -> Proc {
    let out = fs::File::create(dir.join(log)).unwrap();
    Proc(Some(
        Command::new(beamup())
            .args(args)
            .current_dir(dir)
            .env(
                "RUST_LOG",
                std::env::var("BENCH_RUST_LOG").unwrap_or("beamup=info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap(),
    ))
}

fn wait_log(dir: &Path, log: &str, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = fs::read_to_string(dir.join(log)).unwrap_or_default();
        if text.contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in {log} within {timeout:?}:\n{}",
            &text[text.len().saturating_sub(3000)..]
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `VmHWM` (peak resident set) of a running process, in bytes.
fn peak_of(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// User plus system CPU of a process so far (`/proc/PID/stat`).
fn cpu_of(pid: u32) -> Duration {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz.max(1))
}

/// Runs a child to its exit; its wall time, exit code, peak RSS and CPU
/// time (from `wait4`'s rusage for exactly that child).
fn run_measured(dir: &Path, log: &str, args: &[&str]) -> (Duration, i32, u64, Duration) {
    let start = Instant::now();
    let mut p = spawn(dir, log, args);
    let child = p.0.take().unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain FFI call with valid out-pointers; the child is reaped
    // here and not waited on again.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4");
    std::mem::forget(child);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (
        start.elapsed(),
        code,
        usage.ru_maxrss as u64 * 1024,
        tv(usage.ru_utime) + tv(usage.ru_stime),
    )
}

/// The soft open-file limit raised to the hard one (children inherit it).
fn raise_nofile() -> (u64, u64) {
    // SAFETY: getrlimit/setrlimit with a valid struct.
    unsafe {
        let mut r: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        (r.rlim_cur, r.rlim_max)
    }
}

struct Mosquitto {
    port: u16,
    /// Stopped when dropped.
    _proc: Proc,
}

fn mosquitto(dir: &Path) -> Mosquitto {
    for _ in 0..5 {
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest none\nmax_connections -1\nmax_queued_messages 0\n"
            ),
        )
        .unwrap();
        let proc = Proc(Some(
            Command::new("/usr/sbin/mosquitto")
                .arg("-c")
                .arg(&conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("mosquitto"),
        ));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Mosquitto { port, _proc: proc };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("mosquitto did not start");
}

/// A subscriber that keeps what it sees: per topic kind, messages and
/// bytes; every offer topic's non-retained publishes; the last state per
/// device; retained messages when asked for them.
#[derive(Default)]
struct Seen {
    count: BTreeMap<&'static str, (u64, u64)>,
    offers: BTreeMap<String, u32>,
    retained_bytes: u64,
    retained: u64,
}

struct Watch {
    seen: Arc<Mutex<Seen>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn kind_of(topic: &str) -> Option<&'static str> {
    ["offer", "state", "events", "online", "data"]
        .into_iter()
        .find(|k| topic.ends_with(&format!("/{k}")))
        .or_else(|| topic.contains("/req/").then_some("req"))
}

impl Watch {
    fn new(port: u16, filters: &[&str], id: &str) -> Watch {
        let mut o = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        o.set_max_packet_size(32 << 20, 32 << 20)
            .set_keep_alive(Duration::from_secs(30));
        let (client, mut conn) = rumqttc::Client::new(o, 1024);
        client
            .subscribe_many(
                filters.iter().map(|f| {
                    rumqttc::SubscribeFilter::new(f.to_string(), rumqttc::QoS::AtLeastOnce)
                }),
            )
            .unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let subscribed = Arc::new(AtomicBool::new(false));
        let (s, st, sub) = (seen.clone(), stop.clone(), subscribed.clone());
        let thread = std::thread::spawn(move || {
            let _client = client;
            for ev in conn.iter() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        let mut g = s.lock().unwrap();
                        if p.retain {
                            g.retained += 1;
                            g.retained_bytes += p.payload.len() as u64;
                            continue;
                        }
                        if let Some(k) = kind_of(&p.topic) {
                            let e = g.count.entry(k).or_default();
                            e.0 += 1;
                            e.1 += p.payload.len() as u64;
                            if k == "offer" && !p.payload.is_empty() {
                                *g.offers.entry(p.topic.clone()).or_default() += 1;
                            }
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        sub.store(true, Ordering::Relaxed)
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        while !subscribed.load(Ordering::Relaxed) {
            assert!(Instant::now() < deadline, "no SUBACK");
            std::thread::sleep(Duration::from_millis(10));
        }
        Watch {
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn stop(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        // The loop notices on its next event (pings come every 30 s at
        // most; the fleet is still talking).
        let t = self.thread.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

/// The broker alone: `n` QoS 1 messages of `size` bytes from one
/// publisher (64 in flight) to one subscriber, on `topics` distinct
/// topics; timed from the first publish to the last delivery.
fn raw_messages(port: u16, n: u64, size: usize, topics: usize) -> Duration {
    let got = Arc::new(AtomicU64::new(0));
    let mut so = rumqttc::MqttOptions::new("bench-raw-sub", "127.0.0.1", port);
    so.set_max_packet_size(32 << 20, 32 << 20).set_inflight(64);
    let (sc, mut sconn) = rumqttc::Client::new(so, 64);
    sc.subscribe("raw/#", rumqttc::QoS::AtLeastOnce).unwrap();
    let g = got.clone();
    let ready = Arc::new(AtomicBool::new(false));
    let r = ready.clone();
    let sub = std::thread::spawn(move || {
        let _sc = sc;
        for ev in sconn.iter() {
            match ev {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_)))
                    if g.fetch_add(1, Ordering::Relaxed) + 1 >= n =>
                {
                    break;
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                    r.store(true, Ordering::Relaxed)
                }
                _ => {}
            }
        }
    });
    while !ready.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut po = rumqttc::MqttOptions::new("bench-raw-pub", "127.0.0.1", port);
    po.set_max_packet_size(32 << 20, 32 << 20).set_inflight(64);
    let (pc, mut pconn) = rumqttc::Client::new(po, 256);
    let start = Instant::now();
    let publisher = std::thread::spawn(move || {
        for i in 0..n {
            pc.publish(
                format!("raw/{}/x", i as usize % topics.max(1)),
                rumqttc::QoS::AtLeastOnce,
                false,
                vec![b'x'; size],
            )
            .unwrap();
        }
        pc
    });
    let driver = std::thread::spawn(move || {
        for ev in pconn.iter() {
            if ev.is_err() {
                break;
            }
        }
    });
    sub.join().unwrap();
    let took = start.elapsed();
    let pc = publisher.join().unwrap();
    let _ = pc.disconnect();
    let _ = driver.join();
    took
}

/// The broker alone for the release's bytes: `msgs` data replies (QoS 0)
/// from one publisher to each of `devices` receivers, each subscribed to
/// its own data topic as a device is (two threads, as the simulator has);
/// timed from the first publish to the last delivery.
fn raw_data(port: u16, msgs: &[Vec<u8>], devices: usize) -> Duration {
    let n = (msgs.len() * devices) as u64;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let got = Arc::new(AtomicU64::new(0));
    let all_in = Arc::new(tokio::sync::Notify::new());
    let (subscribed_tx, mut subscribed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut receivers = Vec::new();
    for d in 0..devices {
        let mut o = rumqttc::MqttOptions::new(format!("bench-data-{d}"), "127.0.0.1", port);
        o.set_max_packet_size(32 << 20, 32 << 20)
            .set_keep_alive(Duration::from_secs(30));
        let (client, mut el) = rumqttc::AsyncClient::new(o, 16);
        let (got, all_in, subscribed) = (got.clone(), all_in.clone(), subscribed_tx.clone());
        receivers.push(rt.spawn(async move {
            client
                .subscribe(format!("rawdata/d{d}/data"), rumqttc::QoS::AtMostOnce)
                .await
                .unwrap();
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(_))) => {
                        if got.fetch_add(1, Ordering::Relaxed) + 1 >= n {
                            all_in.notify_one();
                        }
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        let _ = subscribed.send(());
                    }
                    Ok(_) => {}
                    Err(e) => panic!("raw receiver {d}: {e}"),
                }
            }
        }));
    }
    rt.block_on(async {
        for _ in 0..devices {
            subscribed_rx.recv().await.unwrap();
        }
    });
    let mut po = rumqttc::MqttOptions::new("bench-data-pub", "127.0.0.1", port);
    po.set_max_packet_size(32 << 20, 32 << 20);
    let (pc, mut pconn) = rumqttc::Client::new(po, 256);
    let payloads: Vec<Vec<u8>> = msgs.to_vec();
    let start = Instant::now();
    let publisher = std::thread::spawn(move || {
        // Like serve: each device's pieces in turn.
        for piece in &payloads {
            for d in 0..devices {
                pc.publish(
                    format!("rawdata/d{d}/data"),
                    rumqttc::QoS::AtMostOnce,
                    false,
                    piece.clone(),
                )
                .unwrap();
            }
        }
        pc
    });
    let driver = std::thread::spawn(move || {
        for ev in pconn.iter() {
            if ev.is_err() {
                break;
            }
        }
    });
    let arrived = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(120), all_in.notified())
            .await
            .is_ok()
    });
    let took = start.elapsed();
    assert!(
        arrived,
        "the raw receivers got {} of {n}: QoS 0 dropped some",
        got.load(Ordering::Relaxed)
    );
    for r in receivers {
        r.abort();
    }
    let pc = publisher.join().unwrap();
    let _ = pc.disconnect();
    let _ = driver.join();
    rt.shutdown_background();
    took
}

/// A release-shaped tarball of thermo `vsn` with `payload` bytes of noise.
fn tarball(dir: &Path, vsn: &str, payload: u64) -> PathBuf {
    common::release_tarball(dir, "thermo", vsn, payload)
}

fn bundle(dir: &Path, vsn: &str, payload: u64) -> PathBuf {
    let t = tarball(dir, vsn, payload);
    let out = dir.join(format!("bundles/thermo-{vsn}.bundle"));
    beamup_in(
        dir,
        &[
            "bundle",
            "--release",
            t.to_str().unwrap(),
            "--key",
            "keys/k.key",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    out
}

struct Fleet {
    broker: Mosquitto,
    serve: Proc,
    sim: Proc,
    dir: PathBuf,
    state: PathBuf,
}

fn fleet(dir: &Path, n: usize, mix: &str, group: Option<&str>, install: &str) -> Fleet {
    let broker = mosquitto(dir);
    let url = format!("mqtt://127.0.0.1:{}", broker.port);
    let serve = spawn(
        dir,
        "serve.log",
        &[
            "serve",
            "--broker",
            &url,
            "--fleet",
            "acme",
            "--bundles",
            "bundles",
        ],
    );
    wait_log(
        dir,
        "serve.log",
        "serving requests on",
        Duration::from_secs(20),
    );
    let state = Path::new("/dev/shm").join(format!("beamup-bench-fleet-{}", std::process::id()));
    let _ = fs::remove_dir_all(&state);
    let _ = fs::remove_file(dir.join("summary.json"));
    let n_text = n.to_string();
    let mut args = vec![
        "fleet",
        "simulate",
        "--broker",
        &url,
        "--fleet",
        "acme",
        "--devices",
        &n_text,
        "--root",
        "root.json",
        "--release",
        "thermo",
        "--mix",
        mix,
        "--install-time",
        install,
        "--state-dir",
        state.to_str().unwrap(),
        "--summary",
        "summary.json",
        "--connect-rate",
        "1000",
    ];
    if let Some(g) = group {
        args.extend(["--group", g]);
    }
    let sim = spawn(dir, "sim.log", &args);
    wait_log(
        dir,
        "sim.log",
        &format!("all {n} simulated devices connected"),
        Duration::from_secs(n as u64 / 100 + 60),
    );
    Fleet {
        broker,
        serve,
        sim,
        dir: dir.to_path_buf(),
        state,
    }
}

impl Fleet {
    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.broker.port)
    }

    /// Stops the devices; what they say they did.
    fn stop_devices(&mut self) -> Value {
        self.sim.term();
        let _ = fs::remove_dir_all(&self.state);
        serde_json::from_str(&fs::read_to_string(self.dir.join("summary.json")).unwrap()).unwrap()
    }
}

struct CampaignRun {
    devices: usize,
    /// When the controller was started, and how long it ran.
    started: SystemTime,
    wall: Duration,
    code: i32,
    controller_rss: u64,
    /// CPU of the controller, the simulated devices, serve and mosquitto
    /// during the campaign.
    cpu: [Duration; 4],
    serve_rss: u64,
    msgs: u64,
    msg_bytes: u64,
    /// Devices that fetched the release.
    fetched: usize,
    retained_per_device: f64,
    correct: Result<String, String>,
}

/// Every device's outcome counted once, none offered twice, the failures
/// the report counts are the devices' own.
fn check(
    report: &Value,
    summary: &Value,
    offers: &BTreeMap<String, u32>,
    n: usize,
) -> Result<String, String> {
    let rows: BTreeMap<&str, &Value> = report["devices"]
        .as_array()
        .ok_or("no report")?
        .iter()
        .map(|r| (r["device"].as_str().unwrap_or(""), r))
        .collect();
    if rows.len() != n {
        return Err(format!(
            "{} devices in the report, {n} simulated",
            rows.len()
        ));
    }
    let (mut committed, mut rolled_back) = (0, 0);
    for d in summary["devices"].as_array().ok_or("no summary")? {
        let id = d["device"].as_str().unwrap_or("");
        let row = rows.get(id).ok_or(format!("{id} not in the report"))?;
        let said = d["outcomes"].as_array().map_or(0, |o| o.len());
        let sent = offers
            .get(&format!("beamup/acme/device/{id}/offer"))
            .copied()
            .unwrap_or(0);
        if sent != 1 {
            return Err(format!("{id} offered {sent} times"));
        }
        if said != 1 || d["outcomes"][0]["outcome"] != row["outcome"] {
            return Err(format!(
                "{id}: the device said {}, the report {}",
                d["outcomes"], row["outcome"]
            ));
        }
        match row["outcome"].as_str() {
            Some("committed") => committed += 1,
            Some("rolled_back") => rolled_back += 1,
            o => return Err(format!("{id}: {o:?}")),
        }
    }
    if report["total"]["committed"] != committed || report["total"]["failed"] != rolled_back {
        return Err(format!(
            "totals {} against {committed}/{rolled_back}",
            report["total"]
        ));
    }
    Ok(format!(
        "{committed} committed, {rolled_back} rolled back, each once; {n} offers, one per device"
    ))
}

/// A campaign of `n` simulated devices (2% roll back; the threshold
/// allows 3% of the fleet): canary of one, then everyone at once, soaks 0.
fn campaign(dir: &Path, n: usize, small: &Path) -> CampaignRun {
    let mut f = fleet(dir, n, "commit=0.98,rollback=0.02", None, "200ms");
    let summary: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("summary.json")).unwrap()).unwrap();
    let canary = summary["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["fate"] == "commit")
        .unwrap()["device"]
        .as_str()
        .unwrap()
        .to_string();
    let id = format!("bench{n}");
    let plan = dir.join(format!("{id}.toml"));
    fs::write(
        &plan,
        format!(
            "bundle = {:?}\nfleet = \"acme\"\nid = \"{id}\"\n\
             [[waves]]\nname = \"canary\"\ndevices = [\"{canary}\"]\nsoak = \"0s\"\n\
             [[waves]]\nname = \"rest\"\nrest = true\nsoak = \"0s\"\nmax_failures = {}\n\
             [rollout]\nmax_in_flight = {n}\ndevice_timeout = \"10m\"\n",
            small.display().to_string(),
            n * 3 / 100
        ),
    )
    .unwrap();
    // Everything the campaign makes devices and controller say.
    // Not the data replies: a watcher of those would double the broker's
    // work for the release's bytes, which the devices alone should cost.
    let watch = Watch::new(
        f.broker.port,
        &[
            "beamup/acme/device/+/offer",
            "beamup/acme/device/+/state",
            "beamup/acme/device/+/events",
        ],
        "bench-watch",
    );
    let url = f.url();
    let cpu0 = (
        cpu_of(f.sim.pid()),
        cpu_of(f.serve.pid()),
        cpu_of(f.broker._proc.pid()),
    );
    let started = SystemTime::now();
    let (wall, code, controller_rss, controller_cpu) = run_measured(
        dir,
        &format!("controller-{n}.log"),
        &[
            "campaign",
            "start",
            plan.to_str().unwrap(),
            "--broker",
            &url,
            "--campaigns",
            "campaigns",
        ],
    );
    let cpu = [
        controller_cpu,
        cpu_of(f.sim.pid()) - cpu0.0,
        cpu_of(f.serve.pid()) - cpu0.1,
        cpu_of(f.broker._proc.pid()) - cpu0.2,
    ];
    // Let the last states and events in.
    std::thread::sleep(Duration::from_secs(1));
    let seen = watch.stop();
    let serve_rss = peak_of(f.serve.pid());
    let report = {
        let out = Command::new(beamup())
            .args([
                "campaign",
                "report",
                &id,
                "--json",
                "--campaigns",
                "campaigns",
            ])
            .current_dir(dir)
            .output()
            .unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)
    };
    // The broker's retained messages per device, after the campaign.
    let retained = Watch::new(f.broker.port, &["beamup/acme/#"], "bench-retained");
    std::thread::sleep(Duration::from_secs(2));
    let r = retained.stop();
    let summary = f.stop_devices();
    f.serve.term();
    let msgs: u64 = ["offer", "state", "events"]
        .iter()
        .map(|k| seen.count.get(k).map_or(0, |c| c.0))
        .sum();
    let msg_bytes: u64 = ["offer", "state", "events"]
        .iter()
        .map(|k| seen.count.get(k).map_or(0, |c| c.1))
        .sum();
    let correct = if code == 0 {
        check(&report, &summary, &seen.offers, n)
    } else {
        Err(format!(
            "the controller exited with {code}: {}",
            report["reason"]
        ))
    };
    CampaignRun {
        devices: n,
        started,
        wall,
        code,
        controller_rss,
        cpu,
        serve_rss,
        msgs,
        msg_bytes,
        fetched: summary["devices"].as_array().map_or(0, |d| {
            d.iter().filter(|d| d["fetch_done_ms"].is_u64()).count()
        }),
        retained_per_device: r.retained_bytes as f64 / n as f64,
        correct,
    }
}

/// The phases of a campaign run, from the controller's log and the
/// moments it was started and exited: its start-up (to "controller
/// started"), reading the fleet (to the canary's offer), the rollout (to
/// "completed") and its goodbye (to its exit).
fn timeline(log: &Path, started: SystemTime, wall: Duration) -> [Duration; 4] {
    let text = fs::read_to_string(log).unwrap_or_default();
    let at = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|t| humantime::parse_rfc3339(t).ok())
    };
    let between = |a: SystemTime, b: SystemTime| b.duration_since(a).unwrap_or_default();
    match (
        at("controller started"),
        at("wave canary started"),
        at(": completed"),
    ) {
        (Some(a), Some(b), Some(c)) => [
            between(started, a),
            between(a, b),
            between(b, c),
            between(c, started + wall),
        ],
        _ => [Duration::ZERO; 4],
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// `FLEET_BENCH=campaign,serve,10k` (any of them; default all) runs only
/// those parts.
fn part(name: &str) -> bool {
    std::env::var("FLEET_BENCH")
        .map(|v| v.split(',').any(|p| p.trim() == name))
        .unwrap_or(true)
}

fn main() {
    let nofile = raise_nofile();
    let dir = scratch("fleet");
    keys_and_root(&dir);
    fs::create_dir_all(dir.join("bundles")).unwrap();
    let small = bundle(&dir, "1.1.0", 200_000);
    let big_payload: u64 = 2 << 20;
    let big = bundle(&dir, "1.2.0", big_payload);
    println!(
        "fleet bench: load average at start {}; open files {} (hard {})",
        loadavg(),
        nofile.0,
        nofile.1
    );

    // 1. A campaign of 1,000 devices, and the broker's raw rate for as many
    //    messages of the same mean size.
    let c1k = part("campaign").then(|| {
        let c1k = campaign(&dir, 1000, &small);
        let b = mosquitto(&dir);
        let mean = (c1k.msg_bytes / c1k.msgs.max(1)) as usize;
        let raw = raw_messages(b.port, c1k.msgs, mean, 1000);
        drop(b);
        // The release's bytes to every device that fetched it, as serve
        // sends them (one reply per chunk, QoS 0), through the broker alone.
        let b = mosquitto(&dir);
        let raw_release = raw_data(b.port, &data_replies(&small, CHUNK), c1k.fetched);
        drop(b);
        let floor = raw + raw_release + 2 * INSTALL;
        let [startup, settle, rollout, goodbye] =
            timeline(&dir.join("controller-1000.log"), c1k.started, c1k.wall);
        println!(
            "campaign, 1000 devices (soaks 0, 2% roll back): {:.2} s wall (start to exit, exit {}); floor {:.2} s = raw broker {:.2} s for its {} offer/state/event messages ({mean} B mean, QoS 1) + raw broker {:.2} s for the release's {:.1} MiB to as many raw receivers as devices fetched it ({}) + 2 x {} ms install; ratio {:.2} (goal <= 2.00)",
            c1k.wall.as_secs_f64(),
            c1k.code,
            floor.as_secs_f64(),
            raw.as_secs_f64(),
            c1k.msgs,
            raw_release.as_secs_f64(),
            mib(c1k.fetched as u64 * Bundle::open(&small).unwrap().tarball_size()),
            c1k.fetched,
            INSTALL.as_millis(),
            c1k.wall.as_secs_f64() / floor.as_secs_f64()
        );
        let messages_only = raw + 2 * INSTALL;
        println!(
            "  against the messages and installs alone ({:.2} s, the release's bytes left out): ratio {:.2}",
            messages_only.as_secs_f64(),
            c1k.wall.as_secs_f64() / messages_only.as_secs_f64()
        );
        println!(
            "  of which: {:.2} s the controller's start-up, {:.2} s from there to the canary's offer (the retained messages settle: 0.7 s without one), {:.2} s from the canary's offer to the last outcome (against the floor: ratio {:.2}), {:.2} s from there to the controller's exit",
            startup.as_secs_f64(),
            settle.as_secs_f64(),
            rollout.as_secs_f64(),
            rollout.as_secs_f64() / floor.as_secs_f64(),
            goodbye.as_secs_f64()
        );
        c1k
    });

    // 2. serve with many devices fetching at once, against the broker
    //    alone for the same bytes.
    let devices = 200;
    let serve_rss_many = part("serve").then(|| {
    let mut f = fleet(&dir, devices, "commit=1", Some("all"), "0ms");
    let cpu0 = (
        cpu_of(f.serve.pid()),
        cpu_of(f.sim.pid()),
        cpu_of(f.broker._proc.pid()),
    );
    let fetch_started = Instant::now();
    let url = f.url();
    beamup_in(
        &dir,
        &[
            "offer",
            big.to_str().unwrap(),
            "--broker",
            &url,
            "--fleet",
            "acme",
            "--group",
            "all",
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(300);
    let (summary, (sim_cpu, broker_cpu, fetch_wall)) = loop {
        let text = fs::read_to_string(f.sim_log()).unwrap_or_default();
        if text.matches("fetched thermo 1.2.0").count() >= devices {
            let cpus = (
                cpu_of(f.sim.pid()) - cpu0.1,
                cpu_of(f.broker._proc.pid()) - cpu0.2,
                fetch_started.elapsed(),
            );
            break (f.stop_devices(), cpus);
        }
        assert!(
            Instant::now() < deadline,
            "the devices did not fetch in time"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let serve_cpu = cpu_of(f.serve.pid()) - cpu0.0;
    let serve_rss_many = peak_of(f.serve.pid());
    f.serve.term();
    let starts: Vec<u64> = summary["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["fetch_started_ms"].as_u64())
        .collect();
    let ends: Vec<u64> = summary["devices"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["fetch_done_ms"].as_u64())
        .collect();
    assert_eq!(ends.len(), devices, "every device fetched");
    let span = Duration::from_millis(ends.iter().max().unwrap() - starts.iter().min().unwrap());
    let size = Bundle::open(&big).unwrap().tarball_size();
    let total = size * devices as u64;
    let msgs = data_replies(&big, CHUNK);
    let b = mosquitto(&dir);
    let raw_span = raw_data(b.port, &msgs, devices);
    drop(b);
    let serve_rate = mib(total) / span.as_secs_f64();
    let raw_rate = mib(total) / raw_span.as_secs_f64();
    println!(
        "serve, {devices} devices fetching {:.1} MiB each at once: {serve_rate:.1} MiB/s aggregate ({:.1} MiB in {:.2} s); raw mosquitto {raw_rate:.1} MiB/s for the same bytes to {devices} raw receivers; ratio {:.2} (goal >= 0.80); serve CPU {:.1} ms per device ({:.0} ms in all)",
        mib(size),
        mib(total),
        span.as_secs_f64(),
        serve_rate / raw_rate,
        serve_cpu.as_secs_f64() * 1000.0 / devices as f64,
        serve_cpu.as_secs_f64() * 1000.0,
    );
    println!(
        "  CPU while they fetched ({:.2} s from the offer): simulated devices {:.2} s (one thread per core: SHA-256 of every chunk, the downloads' files, 200 MQTT sessions), mosquitto {:.2} s, serve {:.2} s",
        fetch_wall.as_secs_f64(),
        sim_cpu.as_secs_f64(),
        broker_cpu.as_secs_f64(),
        serve_cpu.as_secs_f64()
    );
    serve_rss_many
    });

    // 3. 10,000 devices, where the machine allows.
    let c10k = if !part("10k") {
        None
    } else if nofile.0 >= 10_200 {
        Some(campaign(&dir, 10_000, &small))
    } else {
        println!(
            "campaign, 10000 devices: not run: the open-file limit is {} (hard {}); it needs about 10,200",
            nofile.0, nofile.1
        );
        None
    };
    for c in c1k.iter().chain(c10k.as_ref()) {
        println!(
            "{} devices: campaign {:.1} s (exit {}); controller peak RSS {:.1} MiB{}; serve peak RSS {:.1} MiB; broker retains {:.0} bytes per device after it; {} messages seen",
            c.devices,
            c.wall.as_secs_f64(),
            c.code,
            mib(c.controller_rss),
            if c.devices >= 10_000 {
                format!(
                    " (goal < 64 MiB: {})",
                    if c.controller_rss < 64 << 20 {
                        "met"
                    } else {
                        "missed"
                    }
                )
            } else {
                String::new()
            },
            mib(c.serve_rss),
            c.retained_per_device,
            c.msgs
        );
        println!(
            "{} devices: CPU during the campaign: controller {:.2} s, simulated devices {:.2} s, serve {:.2} s, mosquitto {:.2} s",
            c.devices,
            c.cpu[0].as_secs_f64(),
            c.cpu[1].as_secs_f64(),
            c.cpu[2].as_secs_f64(),
            c.cpu[3].as_secs_f64()
        );
        println!(
            "{} devices: correctness: {}",
            c.devices,
            match &c.correct {
                Ok(s) => format!("ok: {s}"),
                Err(e) => format!("FAILED: {e}"),
            }
        );
    }
    if let Some(rss) = serve_rss_many {
        println!(
            "serve peak RSS with {devices} devices fetching 2 MiB each: {:.1} MiB",
            mib(rss)
        );
    }
    println!("load average at the end {}", loadavg());
    std::io::stdout().flush().unwrap();
}

impl Fleet {
    fn sim_log(&self) -> PathBuf {
        self.dir.join("sim.log")
    }
}
