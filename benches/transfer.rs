//! A 50 MiB release through mosquitto on loopback: `beamup serve` ->
//! broker -> `beamup agent` (requests, per-chunk SHA-256, writes, fsynced
//! checkpoints) against the broker's raw throughput for the same bytes (a
//! plain publisher loop of the same 64 KiB chunks into `mosquitto_sub`), in
//! one run. Plus the agent's idle RSS and its peak RSS during the transfer.
//!
//! Goals: transfer throughput >= 0.8 of raw; idle RSS 4 MiB (must be
//! < 8 MiB); peak RSS < 24 MiB.
//!
//! Two agent binaries take turns in every run: the host's release build
//! (glibc, dynamically linked, all features) and the static build a
//! device runs (`cross/build x86_64-musl`, which the bench runs first; or
//! the binary `BEAMUP_BENCH_DEVICE_BIN` names). Their idle RSS differs
//! mostly in code pages: the kernel maps a binary's and libc's code in
//! blocks of up to 64 KiB around each page touched, so the larger release
//! build and the shared libc (about 1.5 MiB resident) weigh more than the
//! agent's own memory (about 0.5 MiB).
//!
//! It also prints the CPU time each process spent on a transfer (medians),
//! on both sides: on a small machine the processes share the cores, and the
//! broker's share decides the pace.
//!
//! What was measured on the 2-core build machine (shared with other
//! builds; CPU per 50 MiB, medians of 7-9 alternating runs):
//! - `beamup serve` on one thread instead of two: 37-43 -> 22-28 ms.
//! - verified chunks written in batches of 1 MiB (one writev) instead of
//!   one pwrite per 64 KiB chunk at offsets that are not page-aligned:
//!   agent 87 -> 78 ms.
//! - glibc malloc keeping up to 4 MiB instead of trimming its heap (or
//!   munmapping) after nearly every message: agent 92 -> 82 ms, serve
//!   33 -> 30 ms; with `malloc_trim` after the transfer, the agent's own
//!   memory when idle again is 0.8 MiB (2.4 MiB without the trim).
//! - the download file allocated up front (fallocate): agent 90 -> 83 ms.
//! - verified chunks copied into one reused 1 MiB buffer and written with
//!   one pwrite, each message freed at once, instead of kept until a
//!   writev of all of them: agent 76-80 -> 63 ms.
//! - the static (musl) device build: 290-370 ms of agent CPU at first.
//!   opt-level "z" left the SHA instruction intrinsics as calls (sha2 now
//!   builds at opt-level 3 in the device profile: -> 195 ms), and musl's
//!   malloc mapped and unmapped every 64 KiB message (about 800 mmap and
//!   munmap calls per transfer, 17 page faults each; `src/memory.rs` now
//!   keeps a few freed large blocks: 110 mmaps, -> 71 ms).
//! - no effect beyond the noise: a request window of 16, 32 or 128 pieces
//!   instead of 64; 1, 2 or 4 pieces per request instead of 8;
//!   checkpoints every 32 or 64 chunks instead of 256 (the last fsync gets
//!   shorter, 10 -> 5 ms, the agent's CPU grows, 79 -> 90 ms).
//! - worse: O_DIRECT writes (in this VM every write waits for the device:
//!   agent 86 -> 109 ms of CPU, the transfer 4x slower); SHA-256 from ring
//!   instead of sha2 (the same 29 ms for 50 MiB: both use the CPU's SHA
//!   instructions, which bound the agent).
//! - mosquitto: once it holds a retained message of about 60 KB (an offer),
//!   glibc trims and regrows its heap around every 64 KiB message and its
//!   CPU for 50 MiB doubles (about 40 -> 90 ms). Both sides of this bench
//!   pay it alike, except the warm-up and the first raw run, which come
//!   before the first offer.
//!
//! The agent runs with `BEAMUP_AGENT_FETCH_ONLY=1`: it verifies the offer's
//! signatures, fetches and verifies every chunk exactly as in production
//! (fetch-only has no node to plan an unpack with, so it needs them all),
//! then exits instead of installing (there is no BEAM node here).
//!
//! Run: `cargo bench --bench transfer`

mod common;

use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1024 * 1024;
const RUNS: usize = 9;
const CHUNK: usize = 64 * 1024;

fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mosquitto(dir: &Path) -> (Killed, u16) {
    let port = free_port();
    let conf = dir.join("mosquitto.conf");
    fs::write(
        &conf,
        // As docs/mosquitto/mosquitto.conf recommends (both runs use it).
        format!(
            "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        ),
    )
    .unwrap();
    let child = Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto");
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
        assert!(Instant::now() < deadline, "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    (Killed(child), port)
}

/// CPU time of the processes of one transfer.
#[derive(Clone, Copy, Default)]
struct Cpu {
    /// Raw: this bench process (publisher and the reader of
    /// mosquitto_sub's output); beamup: `beamup serve`.
    sender: Duration,
    broker: Duration,
    /// mosquitto_sub, or the agent.
    receiver: Duration,
}

/// Raw: a rumqttc publisher loop (QoS 0) into `mosquitto_sub`, timed from
/// the first publish to the subscriber's exit after the last message.
fn raw(port: u16, msgs: &[Vec<u8>], broker: u32) -> (Duration, Cpu) {
    let mut sub = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-t", "bench/raw", "-q", "0", "-C", &msgs.len().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub");
    std::thread::sleep(Duration::from_millis(300)); // subscribed
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut o = rumqttc::v5::MqttOptions::new("bench-raw", "127.0.0.1", port);
    o.set_max_packet_size(Some(1 << 20));
    let (client, mut el) = rumqttc::v5::AsyncClient::new(o, 64);
    let payloads: Vec<Vec<u8>> = msgs.to_vec();
    let mut out = sub.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut sink = vec![0u8; 1 << 20];
        let mut n = 0u64;
        while let Ok(k) = out.read(&mut sink) {
            if k == 0 {
                break;
            }
            n += k as u64;
        }
        n
    });
    let sub_pid = sub.id();
    let cpu0 = (cpu(std::process::id()), cpu(broker));
    let start = Instant::now();
    let sub_cpu = rt.block_on(async {
        let publisher = async {
            for p in payloads {
                client
                    .publish(
                        "bench/raw",
                        rumqttc::v5::mqttbytes::QoS::AtMostOnce,
                        false,
                        p,
                    )
                    .await
                    .unwrap();
            }
        };
        let driver = async {
            loop {
                if el.poll().await.is_err() {
                    break;
                }
            }
        };
        tokio::select! {
            _ = async { publisher.await; std::future::pending::<()>().await } => unreachable!(),
            _ = driver => panic!("the raw publisher lost its connection"),
            r = tokio::task::spawn_blocking(move || reap(sub_pid, true)) => r.unwrap().unwrap().1,
        }
    });
    let took = start.elapsed();
    let used = Cpu {
        sender: cpu(std::process::id()) - cpu0.0,
        broker: cpu(broker) - cpu0.1,
        receiver: sub_cpu,
    };
    std::mem::forget(sub); // reaped above
    let bytes = reader.join().unwrap();
    assert!(
        bytes >= (msgs.len() * CHUNK) as u64 - CHUNK as u64,
        "mosquitto_sub got {bytes} bytes"
    );
    (took, used)
}

/// CPU time of a running process so far: the sum over its threads of the
/// scheduler's run time (`/proc/PID/task/*/schedstat`); zero where the
/// kernel does not keep it.
fn cpu(pid: u32) -> Duration {
    let mut ns = 0u64;
    if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let s = fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            ns += s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(ns)
}

/// Reaps a child if it exited (`block`: waits for it); its exit status and
/// the CPU time (user + system) it used, from wait4.
fn reap(pid: u32, block: bool) -> Option<(i32, Duration)> {
    let mut status = 0;
    // SAFETY: plain FFI call with valid out-pointers, for a child of ours
    // that nothing else waits for.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if block { 0 } else { libc::WNOHANG };
    let rc = unsafe { libc::wait4(pid as libc::pid_t, &mut status, flags, &mut usage) };
    assert!(rc >= 0, "wait4 failed");
    if rc == 0 {
        return None;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Some((status, tv(usage.ru_utime) + tv(usage.ru_stime)))
}

fn vm(pid: u32, field: &str) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .map_or(0, |k| k * 1024)
}

/// One agent binary under test and its transfers.
struct Agent {
    label: &'static str,
    bin: PathBuf,
    runs: Vec<AgentRun>,
}

impl Agent {
    fn new(label: &'static str, bin: PathBuf) -> Agent {
        Agent {
            label,
            bin,
            runs: Vec::new(),
        }
    }
}

/// One agent transfer.
struct AgentRun {
    /// `beamup offer` -> agent exit.
    wall: Duration,
    /// First request -> last chunk verified.
    verified: Duration,
    /// First request -> data and bitmap fsynced.
    durable: Duration,
    idle: u64,
    peak: u64,
    cpu: Cpu,
}

/// The static device build a device runs (cross/build x86_64-musl, which
/// installs what it lacks and prints the binary's path last). Devices run
/// that build, not the host's release build, so its memory is the figure
/// that matters on a device. `BEAMUP_BENCH_DEVICE_BIN` names another
/// binary to measure in its place (a build of your own, or one with symbols
/// for a profiler).
fn device_build() -> PathBuf {
    if let Some(bin) = std::env::var_os("BEAMUP_BENCH_DEVICE_BIN") {
        return bin.into();
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("cross/build");
    let out = Command::new(&script)
        .arg("x86_64-musl")
        .stderr(Stdio::inherit())
        .output()
        .expect("cross/build");
    assert!(
        out.status.success(),
        "cross/build x86_64-musl failed; the transfer bench measures the static device build too"
    );
    let path = String::from_utf8_lossy(&out.stdout);
    let path = path.lines().last().unwrap_or_default().trim();
    let bin = PathBuf::from(path);
    assert!(
        bin.is_file(),
        "cross/build printed no binary path: {path:?}"
    );
    bin
}

fn agent_run(
    agent: &Path,
    dir: &Path,
    port: u16,
    bundle: &Path,
    n: usize,
    (broker, serve): (u32, u32),
) -> AgentRun {
    let run_dir = dir.join(format!("agent-{n}"));
    let _ = fs::remove_dir_all(&run_dir);
    fs::create_dir_all(&run_dir).unwrap();
    let config = format!(
        r#"[release]
root = "{d}/release"
name = "thermo"
[node]
name = "thermo@localhost"
cookie = "bench"
epmd_port = {closed}
start = "true"
stop = "true"
[health]
tcp = "127.0.0.1:1"
[trust]
root = "{root}"
[state]
dir = "{d}/state"
[mqtt]
url = "mqtt://127.0.0.1:{port}"
device_id = "bench-{n}"
fleet = "bench"
"#,
        d = run_dir.display(),
        closed = free_port(),
        root = dir.join("root.json").display(),
    );
    fs::write(run_dir.join("agent.toml"), config).unwrap();
    let log = fs::File::create(run_dir.join("agent.log")).unwrap();
    let child = Command::new(agent)
        .args(["agent", "--config", "agent.toml"])
        .current_dir(&run_dir)
        .env("BEAMUP_AGENT_FETCH_ONLY", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fs::read_to_string(run_dir.join("agent.log"))
        .unwrap_or_default()
        .contains("connected to")
    {
        assert!(Instant::now() < deadline, "agent did not connect");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(2)); // settled, idle
    let idle = vm(pid, "VmRSS:");
    let cpu0 = (cpu(serve), cpu(broker), cpu(pid));
    let start = Instant::now();
    let out = Command::new(beamup())
        .args(["offer", bundle.to_str().unwrap(), "--broker"])
        .arg(format!("mqtt://127.0.0.1:{port}"))
        .args(["--fleet", "bench", "--device", &format!("bench-{n}")])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Peak RSS: the kernel's high-water mark of the agent's own memory,
    // sampled until it exits (wait4's ru_maxrss would also count the
    // bench's pages the child had between fork and exec).
    let mut peak = 0;
    let (status, agent_cpu) = loop {
        peak = peak.max(vm(pid, "VmHWM:"));
        if let Some(done) = reap(pid, false) {
            break done;
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let wall = start.elapsed();
    let used = Cpu {
        sender: cpu(serve) - cpu0.0,
        broker: cpu(broker) - cpu0.1,
        receiver: agent_cpu.saturating_sub(cpu0.2),
    };
    std::mem::forget(child); // reaped above
    let text = fs::read_to_string(run_dir.join("agent.log")).unwrap();
    assert!(status == 0, "agent failed ({status:#x}):\n{text}");
    let line = text
        .lines()
        .find(|l| l.contains("fetched thermo"))
        .unwrap_or_else(|| panic!("no transfer line in the agent log:\n{text}"));
    let ms = |key: &str| -> u64 {
        line.split(key)
            .nth(1)
            .and_then(|r| r.split(" ms").next())
            .and_then(|m| m.parse().ok())
            .unwrap_or_else(|| panic!("no {key:?} in {line}"))
    };
    AgentRun {
        wall,
        verified: Duration::from_millis(ms("all verified in ")),
        durable: Duration::from_millis(ms("durable at ")),
        idle,
        peak,
        cpu: used,
    }
}

fn main() {
    let dir = scratch("transfer");
    let tarball = release_tarball(&dir, "thermo", "1.1.0", 50 * MIB);
    let bundle = signed_bundle(&dir, &tarball);
    let bundles = dir.join("bundles");
    fs::create_dir_all(&bundles).unwrap();
    fs::rename(&bundle, bundles.join("thermo.bundle")).unwrap();
    let bundle = bundles.join("thermo.bundle");
    let size = beamup::bundle::Bundle::open(&bundle)
        .unwrap()
        .tarball_size();
    let msgs = data_replies(&bundle, CHUNK);

    let (broker, port) = mosquitto(&dir);
    let broker_pid = broker.0.id();
    let serve_log = fs::File::create(dir.join("serve.log")).unwrap();
    let serve = Command::new(beamup())
        .args(["serve", "--broker"])
        .arg(format!("mqtt://127.0.0.1:{port}"))
        .args(["--fleet", "bench", "--bundles"])
        .arg(&bundles)
        .stdout(Stdio::null())
        .stderr(serve_log)
        .spawn()
        .unwrap();
    let serve_pid = serve.id();
    let _serve = Killed(serve);
    std::thread::sleep(Duration::from_millis(500));

    raw(port, &msgs, broker_pid); // warm-up
    let mut agents = [
        Agent::new(
            "host build (release profile, glibc, dynamic)",
            beamup().into(),
        ),
        Agent::new(
            "device build (cross/build x86_64-musl: static, opt-level z)",
            device_build(),
        ),
    ];
    let mut t_raw = Vec::new();
    let mut cpu_raw = Vec::new();
    for n in 0..RUNS {
        let (t, c) = raw(port, &msgs, broker_pid);
        t_raw.push(t);
        cpu_raw.push(c);
        for (k, agent) in agents.iter_mut().enumerate() {
            let run = agent_run(
                &agent.bin,
                &dir,
                port,
                &bundle,
                n * 2 + k,
                (broker_pid, serve_pid),
            );
            agent.runs.push(run);
        }
    }
    let r = median(t_raw);
    let mb = |b: u64| b as f64 / MIB as f64;
    println!(
        "transfer: {:.1} MiB release tarball in {} chunks of 64 KiB through mosquitto on loopback, median of {RUNS}",
        mb(size),
        msgs.len()
    );
    println!(
        "  raw (rumqttc publisher -> mosquitto -> mosquitto_sub)       {:>8.1} ms  {:>7.1} MiB/s",
        r.as_secs_f64() * 1e3,
        mib_per_s(size, r)
    );
    let ms = |cs: &[Cpu], f: fn(&Cpu) -> Duration| {
        median(cs.iter().map(f).collect()).as_secs_f64() * 1e3
    };
    println!(
        "  CPU per raw transfer: publisher and reader {:.0} ms, mosquitto {:.0} ms, mosquitto_sub {:.0} ms",
        ms(&cpu_raw, |c| c.sender),
        ms(&cpu_raw, |c| c.broker),
        ms(&cpu_raw, |c| c.receiver),
    );
    for agent in &agents {
        let runs = &agent.runs;
        let (w, a, d) = (
            median(runs.iter().map(|r| r.wall).collect()),
            median(runs.iter().map(|r| r.verified).collect()),
            median(runs.iter().map(|r| r.durable).collect()),
        );
        println!("beamup serve -> agent, {}:", agent.label);
        println!(
            "  first request to last chunk verified                      {:>8.1} ms  {:>7.1} MiB/s",
            a.as_secs_f64() * 1e3,
            mib_per_s(size, a)
        );
        println!(
            "  ... and fsynced (data, then the chunk bitmap)             {:>8.1} ms  {:>7.1} MiB/s",
            d.as_secs_f64() * 1e3,
            mib_per_s(size, d)
        );
        println!(
            "  beamup offer -> agent exit (verify, allocate, fetch, sync) {:>8.1} ms  {:>7.1} MiB/s",
            w.as_secs_f64() * 1e3,
            mib_per_s(size, w)
        );
        println!(
            "  ratio to raw throughput: verified {:.2}, durable {:.2}, offer-to-exit {:.2} (goal >= 0.8)",
            r.as_secs_f64() / a.as_secs_f64(),
            r.as_secs_f64() / d.as_secs_f64(),
            r.as_secs_f64() / w.as_secs_f64()
        );
        let cpu: Vec<Cpu> = runs.iter().map(|r| r.cpu).collect();
        println!(
            "  CPU per transfer: serve {:.0} ms, mosquitto {:.0} ms, agent {:.0} ms",
            ms(&cpu, |c| c.sender),
            ms(&cpu, |c| c.broker),
            ms(&cpu, |c| c.receiver),
        );
        let mut idle: Vec<u64> = runs.iter().map(|r| r.idle).collect();
        let mut peak: Vec<u64> = runs.iter().map(|r| r.peak).collect();
        idle.sort();
        peak.sort();
        println!(
            "  agent idle RSS {:.1} MiB (goal 4, must be < 8); peak RSS during the transfer {:.1} MiB (must be < 24)",
            mb(idle[idle.len() / 2]),
            mb(peak[peak.len() / 2])
        );
    }
    drop(broker);
    fs::remove_dir_all(&dir).unwrap();
}
