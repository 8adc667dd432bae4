//! Shared pieces of the bench binaries: timing whole commands, peak memory
//! of child processes, and test data.
//!
//! Benches run the real `beamup` binary as a child process, the same way the
//! standard tool it is compared with runs, so both pay the same process
//! start-up and page-cache conditions within one run.

#![allow(dead_code)]

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

pub fn beamup() -> &'static str {
    env!("CARGO_BIN_EXE_beamup")
}

/// Runs a command to completion, failing loudly if it fails, and returns
/// its wall time.
pub fn time(cmd: &mut Command) -> Duration {
    let start = Instant::now();
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("spawn");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    took
}

/// Runs a command and returns its peak resident set size in bytes, read
/// from `wait4`'s rusage for exactly that child.
pub fn peak_rss(cmd: &mut Command) -> u64 {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain FFI call with valid out-pointers; the child is reaped
    // here, so `child` must not be waited on again.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4 failed");
    assert!(status == 0, "{cmd:?} exited with status {status:#x}");
    std::mem::forget(child);
    usage.ru_maxrss as u64 * 1024
}

pub fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

pub fn mib_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / d.as_secs_f64()
}

/// A scratch directory under the cargo target dir (not /tmp, which may be
/// memory-backed and would distort both speed and memory figures).
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join("bench-scratch")
        .join(name);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A release-shaped tarball (gzip, stored blocks) with `payload` bytes of
/// incompressible data, big enough to measure streaming throughput.
pub fn release_tarball(dir: &Path, name: &str, vsn: &str, payload: u64) -> PathBuf {
    let path = dir.join(format!("{name}-{vsn}.tar.gz"));
    let file = std::io::BufWriter::new(fs::File::create(&path).unwrap());
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    let mut add = |p: &str, size: u64, data: &mut dyn std::io::Read| {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, p, data).unwrap();
    };
    let rel = format!(
        "{{release,{{\"{name}\",\"{vsn}\"}},{{erts,\"13.1.5\"}},[{{kernel,\"8.5.3\"}},{{{name},\"{vsn}\"}}]}}.\n"
    );
    add(
        &format!("releases/{vsn}/{name}.rel"),
        rel.len() as u64,
        &mut rel.as_bytes(),
    );
    add(&format!("releases/{vsn}/start.boot"), 4, &mut &b"boot"[..]);
    add(
        &format!("lib/{name}-{vsn}/priv/blob"),
        payload,
        &mut NoiseReader {
            left: payload,
            x: 0x9E37_79B9_7F4A_7C15,
        },
    );
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
    path
}

struct NoiseReader {
    left: u64,
    x: u64,
}

impl std::io::Read for NoiseReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = buf.len().min(self.left as usize) & !7;
        let n = if n == 0 {
            buf.len().min(self.left as usize)
        } else {
            n
        };
        for b in buf[..n].chunks_mut(8) {
            self.x ^= self.x << 13;
            self.x ^= self.x >> 7;
            self.x ^= self.x << 17;
            let bytes = self.x.to_le_bytes();
            b.copy_from_slice(&bytes[..b.len()]);
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A signing key `keys/k.key` and a 1-of-1 trust root `root.json` in
/// `dir`, made once.
pub fn keys_and_root(dir: &Path) {
    if dir.join("keys/k.key").exists() {
        return;
    }
    for args in [
        &["keygen", "--out", "keys", "--name", "k"][..],
        &[
            "root",
            "init",
            "--key",
            "keys/k.pub",
            "--threshold",
            "1",
            "--sign",
            "keys/k.key",
            "--out",
            "root.json",
        ],
    ] {
        beamup_in(dir, args);
    }
}

/// Runs `beamup ARGS` in `dir`, failing loudly if it fails.
pub fn beamup_in(dir: &Path, args: &[&str]) {
    let out = Command::new(beamup())
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "beamup {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Keys, a 1-of-1 root and a bundle of `tarball` in `dir`; returns the
/// bundle's path.
pub fn signed_bundle(dir: &Path, tarball: &Path) -> PathBuf {
    keys_and_root(dir);
    let run = |args: &[&str]| beamup_in(dir, args);
    let out = dir.join(format!(
        "{}.bundle",
        tarball.file_name().unwrap().to_string_lossy()
    ));
    run(&[
        "bundle",
        "--release",
        tarball.to_str().unwrap(),
        "--key",
        "keys/k.key",
        "--out",
        out.to_str().unwrap(),
    ]);
    out
}

/// The thermo example releases, built once into the bench scratch area
/// with `tests/otp/build` (the same script the tests use).
pub fn otp_releases() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-otp");
    if !dir.join("base").exists() {
        let status = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otp/build"))
            .arg(&dir)
            .stdout(Stdio::null())
            .status()
            .expect("run tests/otp/build");
        assert!(status.success(), "tests/otp/build failed");
    }
    dir
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running node of the thermo base release in its own root, with its own
/// epmd; stopped by PID on drop.
pub struct BenchNode {
    pub root: PathBuf,
    pub env: Vec<(String, String)>,
    pub http_port: u16,
    pub epmd_port: u16,
    pub name: String,
    pub cookie: String,
    epmd: std::process::Child,
}

impl BenchNode {
    pub fn start(base: &Path, dir: &Path, id: usize) -> BenchNode {
        let root = dir.join(format!("node{id}"));
        let _ = fs::remove_dir_all(&root);
        let st = Command::new("cp")
            .arg("-a")
            .arg(base)
            .arg(&root)
            .status()
            .unwrap();
        assert!(st.success());
        let epmd_port = free_port();
        let http_port = free_port();
        let epmd_bin = fs::read_dir(&root)
            .unwrap()
            .filter_map(|e| e.ok())
            .find(|e| e.file_name().to_string_lossy().starts_with("erts-"))
            .expect("erts dir")
            .path()
            .join("bin/epmd");
        let epmd = Command::new(epmd_bin)
            .args(["-port", &epmd_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let name = format!("thermo_bench{id}_{}@localhost", std::process::id());
        let cookie = format!("benchcookie{}", std::process::id());
        let env = vec![
            ("NODE_NAME".to_string(), name.clone()),
            ("COOKIE".to_string(), cookie.clone()),
            ("THERMO_HTTP_PORT".to_string(), http_port.to_string()),
            ("ERL_EPMD_PORT".to_string(), epmd_port.to_string()),
            ("THERMO_START_EPMD".to_string(), "false".to_string()),
            (
                "PIPE_DIR".to_string(),
                format!("{}/pipes{id}/", dir.display()),
            ),
        ];
        let node = BenchNode {
            root,
            env,
            http_port,
            epmd_port,
            name,
            cookie,
            epmd,
        };
        let st = Command::new(node.root.join("bin/thermo"))
            .arg("daemon")
            .envs(node.env.iter().cloned())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "node did not start");
        node
    }

    /// `bin/thermo ARGS` with the node's environment.
    pub fn script(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.root.join("bin/thermo"));
        c.args(args).envs(self.env.iter().cloned());
        c
    }

    /// The BEAM's OS pid, from /health.
    pub fn os_pid(&self) -> Option<i32> {
        use std::io::Read;
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.http_port)).ok()?;
        s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        let i = body.find("\"os_pid\":\"")? + 10;
        body[i..].split('"').next()?.parse().ok()
    }

    /// agent.toml for this node (health soak 0: the bench measures the
    /// install path, not the soak window).
    pub fn agent_toml(&self, dir: &Path, root_json: &Path, state: &Path) -> PathBuf {
        let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let env = env.join(" ");
        let root = self.root.display();
        let text = format!(
            r#"[release]
root = "{root}"
name = "thermo"
[node]
name = "{name}"
cookie = "{cookie}"
epmd_port = {epmd}
start = "env {env} {root}/bin/thermo daemon"
stop = "env {env} {root}/bin/thermo stop"
[health]
http = "http://127.0.0.1:{http}/health"
expect_version = true
timeout = "10s"
soak = "0s"
interval = "50ms"
[trust]
root = "{rootjson}"
[state]
dir = "{state}"
"#,
            name = self.name,
            cookie = self.cookie,
            epmd = self.epmd_port,
            http = self.http_port,
            rootjson = root_json.display(),
            state = state.display(),
        );
        let path = dir.join(format!("agent-{}.toml", self.http_port));
        fs::write(&path, text).unwrap();
        path
    }
}

impl Drop for BenchNode {
    fn drop(&mut self) {
        if let Some(pid) = self.os_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.epmd.kill();
        let _ = self.epmd.wait();
    }
}

/// The machine's load averages (1, 5, 15 minutes): what else ran beside
/// a figure.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A bundle's tarball as the data replies that carry it, one per `chunk`
/// bytes, each with the 44-byte header beamup's replies have: what the
/// raw references publish.
pub fn data_replies(bundle: &Path, chunk: usize) -> Vec<Vec<u8>> {
    let b = beamup::bundle::Bundle::open(bundle).unwrap();
    let mut tar = vec![0u8; b.tarball_size() as usize];
    b.read_tarball_at(&mut tar, 0).unwrap();
    tar.chunks(chunk)
        .enumerate()
        .map(|(i, c)| beamup::transport::protocol::encode_data(&[7; 32], (i * chunk) as u64, c))
        .collect()
}
