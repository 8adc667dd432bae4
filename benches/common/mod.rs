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

/// Keys, a 1-of-1 root and a bundle of `tarball` in `dir`; returns the
/// bundle's path.
pub fn signed_bundle(dir: &Path, tarball: &Path) -> PathBuf {
    let run = |args: &[&str]| {
        let out = Command::new(beamup())
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    if !dir.join("keys/k.key").exists() {
        run(&["keygen", "--out", "keys", "--name", "k"]);
        run(&[
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
        ]);
    }
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
