//! `beamup verify` against `sha256sum` and `openssl dgst -sha256` on the
//! same 100 MiB release, in one run, plus the peak memory of verifying a
//! 1 GiB bundle.
//!
//! `beamup verify` does more than either: it also checks the signatures,
//! the manifest and the policy, and hashes the tarball as the signed
//! 64 KiB chunks. `openssl` uses the CPU's SHA instructions where it has
//! them, which makes it the limit for hashing a file on this machine. Goals:
//! at least 0.9 of `openssl`'s throughput, memory flat (under 16 MiB peak
//! RSS for a 1 GiB bundle).
//!
//! Run: `cargo bench --bench verify`

mod common;

use std::process::Command;

use common::*;

const MIB: u64 = 1024 * 1024;
const RUNS: usize = 7;

fn main() {
    let dir = scratch("verify");
    let tarball = release_tarball(&dir, "thermo", "1.1.0", 100 * MIB);
    let bundle = signed_bundle(&dir, &tarball);
    let size = std::fs::metadata(&bundle).unwrap().len();

    let sha = || {
        let mut c = Command::new("sha256sum");
        c.arg(&bundle);
        c
    };
    let openssl = || {
        let mut c = Command::new("openssl");
        c.args(["dgst", "-sha256"]).arg(&bundle);
        c
    };
    let verify = || {
        let mut c = Command::new(beamup());
        c.arg("verify")
            .arg(&bundle)
            .arg("--root")
            .arg(dir.join("root.json"));
        c
    };
    // Warm the page cache so both read from memory.
    time(&mut sha());
    time(&mut openssl());
    time(&mut verify());
    let mut t_sha = Vec::new();
    let mut t_ossl = Vec::new();
    let mut t_verify = Vec::new();
    for _ in 0..RUNS {
        t_sha.push(time(&mut sha()));
        t_ossl.push(time(&mut openssl()));
        t_verify.push(time(&mut verify()));
    }
    let (s, o, v) = (median(t_sha), median(t_ossl), median(t_verify));
    let (s_tp, o_tp, v_tp) = (mib_per_s(size, s), mib_per_s(size, o), mib_per_s(size, v));
    println!("verify: {} MiB release, median of {RUNS} runs", size / MIB);
    println!(
        "  sha256sum      {:>8.1} ms  {:>7.0} MiB/s",
        s.as_secs_f64() * 1e3,
        s_tp
    );
    println!(
        "  openssl dgst   {:>8.1} ms  {:>7.0} MiB/s",
        o.as_secs_f64() * 1e3,
        o_tp
    );
    println!(
        "  beamup verify  {:>8.1} ms  {:>7.0} MiB/s",
        v.as_secs_f64() * 1e3,
        v_tp
    );
    println!(
        "  ratio to sha256sum: {:.2}; ratio to openssl dgst -sha256: {:.2} (goal >= 0.90)",
        v_tp / s_tp,
        v_tp / o_tp
    );

    let big = release_tarball(&dir, "thermo", "1.2.0", 1024 * MIB);
    let big_bundle = signed_bundle(&dir, &big);
    std::fs::remove_file(&big).unwrap();
    let rss = peak_rss(
        Command::new(beamup())
            .arg("verify")
            .arg(&big_bundle)
            .arg("--root")
            .arg(dir.join("root.json")),
    );
    let sha_rss = peak_rss(Command::new("sha256sum").arg(&big_bundle));
    println!(
        "  peak RSS verifying a 1 GiB bundle: beamup {:.1} MiB (budget 16 MiB), sha256sum {:.1} MiB",
        rss as f64 / MIB as f64,
        sha_rss as f64 / MIB as f64
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
