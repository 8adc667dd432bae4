//! The install engine against the standard tools, in one run:
//!
//! 1. Time from `beamup install` start to commit for a hot upgrade of the
//!    thermo release (1.0.0 -> 1.1.0, health soak set to 0), against the
//!    relx script path on an identical node: `bin/thermo rpc release_handler
//!    unpack_release / install_release / make_permanent`. beamup does more
//!    (signature and digest checks, a health check, the boot-script switch)
//!    and is expected to be at least 10x faster, and within 1.5x of the
//!    floor: the same release_handler calls alone, plus one health probe.
//! 2. Unpack throughput of `staging::unpack` against `tar -xzf` on the same
//!    200 MiB release tarball, on one thread and on two (goal >= 2x tar
//!    with two).
//! 3. Peak RSS of `beamup install` of a 200 MiB release (budget 24 MiB).
//!
//! Run: `cargo bench --bench install`

mod common;

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1024 * 1024;
const RUNS: usize = 5;

/// The floor of a hot install: on an identical node with the new
/// release's files already in place (untimed), the release_handler calls
/// beamup makes (`which_releases`, `set_unpacked`, `install_release`,
/// `make_permanent`), timed inside the node, plus one health probe.
fn floor_of(base: &Path, dir: &Path, rels: &Path, id: usize) -> Duration {
    let node = BenchNode::start(base, dir, id);
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(rels.join("thermo-1.1.0.tar.gz"))
        .arg("-C")
        .arg(&node.root)
        .args(["--skip-old-files", "lib/thermo-1.1.0", "releases/1.1.0"])
        .status()
        .unwrap();
    assert!(st.success(), "tar");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node.script(&["ping"]).output().unwrap().status.success() {
        assert!(Instant::now() < deadline, "node did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
    let rel = node.root.join("releases/1.1.0/thermo.rel");
    let expr = format!(
        "{{T, ok}} = timer:tc(fun() -> _ = release_handler:which_releases(), \
         {{ok, \"1.1.0\"}} = release_handler:set_unpacked(\"{}\", []), \
         {{ok, _, _}} = release_handler:install_release(\"1.1.0\"), \
         ok = release_handler:make_permanent(\"1.1.0\") end), \
         T.",
        rel.display()
    );
    let out = node.script(&["eval", &expr]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let us: u64 = text
        .split_whitespace()
        .last()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("floor: {text} {}", String::from_utf8_lossy(&out.stderr)));
    let probe = Instant::now();
    assert!(node.os_pid().is_some(), "health probe");
    Duration::from_micros(us) + probe.elapsed()
}

fn main() {
    let dir = scratch("install");
    let rels = otp_releases();
    let base = rels.join("base");
    keys_and_root(&dir);
    let bundle = bundle_of(
        &dir,
        &rels.join("thermo-1.1.0.tar.gz"),
        "thermo-1.1.0.bundle",
    );

    // 1. Install to commit.
    let mut t_beamup = Vec::new();
    let mut t_relx = Vec::new();
    let mut t_floor = Vec::new();
    for i in 0..RUNS {
        let node = BenchNode::start(&base, &dir, 2 * i);
        let state = dir.join(format!("state{i}"));
        let cfg = node.agent_toml(&dir, &dir.join("root.json"), &state);
        let start = Instant::now();
        let out = Command::new(beamup())
            .args([
                "install",
                bundle.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        t_beamup.push(start.elapsed());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        drop(node);

        let node = BenchNode::start(&base, &dir, 2 * i + 1);
        let rel_dir = node.root.join("releases/1.1.0");
        let start = Instant::now();
        fs::create_dir_all(&rel_dir).unwrap();
        fs::copy(
            rels.join("thermo-1.1.0.tar.gz"),
            rel_dir.join("thermo.tar.gz"),
        )
        .unwrap();
        for (f, arg) in [
            ("unpack_release", "[\"1.1.0/thermo\"]"),
            ("install_release", "[\"1.1.0\"]"),
            ("make_permanent", "[\"1.1.0\"]"),
        ] {
            let out = node
                .script(&["rpc", "release_handler", f, arg])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && (text.contains("ok")),
                "relx rpc {f}: {text}"
            );
        }
        t_relx.push(start.elapsed());
        drop(node);

        t_floor.push(floor_of(&base, &dir, &rels, 2 * RUNS + i));
    }
    let (b, r) = (median(t_beamup), median(t_relx));
    let f = median(t_floor);
    println!("install to commit: thermo 1.0.0 -> 1.1.0 hot, median of {RUNS} runs");
    println!(
        "  relx script rpc path (unpack/install/make_permanent)  {:>7.1} ms",
        ms(r)
    );
    println!(
        "  beamup install (verify, unpack, install, health, commit) {:>7.1} ms",
        ms(b)
    );
    println!(
        "  floor: the same release_handler calls alone, timed in the node, + one health probe {:>7.1} ms",
        ms(f)
    );
    println!(
        "  ratio (relx time / beamup time): {:.1}x (goal >= 10x); beamup against the floor: {:.2} (goal <= 1.50)",
        r.as_secs_f64() / b.as_secs_f64(),
        b.as_secs_f64() / f.as_secs_f64()
    );

    // 2. Unpack throughput.
    let big_src = big_release(&dir, &rels, 200 * MIB);
    let big_bundle = bundle_of(&dir, &big_src, "big.bundle");
    let manifest = {
        let root = beamup::trust::root::Root::load(&dir.join("root.json")).unwrap();
        let b = beamup::bundle::Bundle::open(&big_bundle).unwrap();
        b.verify_manifest(&root).unwrap().0
    };
    // tar gets the very bytes beamup unpacks: the bundle's (indexed) tarball.
    let big = dir.join("big-from-bundle.tar.gz");
    {
        let b = beamup::bundle::Bundle::open(&big_bundle).unwrap();
        std::io::copy(&mut b.tarball(), &mut fs::File::create(&big).unwrap()).unwrap();
    }
    let big_size = fs::metadata(&big).unwrap().len();
    let unpacked = manifest.tarball.unpacked_size;
    let mut t_tar = Vec::new();
    let mut t_ours = Vec::new();
    let mut t_one = Vec::new();
    for i in 0..RUNS {
        let target = dir.join(format!("tar{i}"));
        fs::create_dir_all(&target).unwrap();
        t_tar.push(time(
            Command::new("tar")
                .arg("-xzf")
                .arg(&big)
                .arg("-C")
                .arg(&target),
        ));
        fs::remove_dir_all(&target).unwrap();

        for (threads, times) in [(2, &mut t_ours), (1, &mut t_one)] {
            let target = dir.join(format!("ours{i}-{threads}"));
            fs::create_dir_all(&target).unwrap();
            let plan = beamup::staging::plan(&target, "thermo", &manifest);
            let start = Instant::now();
            // Each chunk is checked against the signed manifest as it streams in.
            let bundle = beamup::bundle::Bundle::open(&big_bundle).unwrap();
            beamup::staging::unpack_on(&target, &plan, &manifest, &bundle, threads).unwrap();
            times.push(start.elapsed());
            fs::remove_dir_all(&target).unwrap();
        }
    }
    let (t, o, one) = (median(t_tar), median(t_ours), median(t_one));
    println!(
        "unpack: {} MiB tarball ({} MiB unpacked), median of {RUNS} runs",
        big_size / MIB,
        unpacked / MIB
    );
    println!(
        "  tar -xzf        {:>7.1} ms  {:>6.0} MiB/s",
        ms(t),
        mib_per_s(unpacked, t)
    );
    println!(
        "  beamup unpack, 1 thread   {:>7.1} ms  {:>6.0} MiB/s",
        ms(one),
        mib_per_s(unpacked, one)
    );
    println!(
        "  beamup unpack, 2 threads  {:>7.1} ms  {:>6.0} MiB/s",
        ms(o),
        mib_per_s(unpacked, o)
    );
    println!(
        "  ratio (beamup throughput / tar throughput): 1 thread {:.2}, 2 threads {:.2} (goal >= 2.0); 2 threads / 1: {:.2}",
        t.as_secs_f64() / one.as_secs_f64(),
        t.as_secs_f64() / o.as_secs_f64(),
        one.as_secs_f64() / o.as_secs_f64()
    );
    println!("  load average at the end: {}", loadavg());

    // 3. Peak RSS of a real install of the 200 MiB release.
    let node = BenchNode::start(&base, &dir, 100);
    let cfg = node.agent_toml(&dir, &dir.join("root.json"), &dir.join("state-big"));
    let rss = peak_rss(Command::new(beamup()).args([
        "install",
        big_bundle.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]));
    println!(
        "  peak RSS of beamup install, {} MiB release: {:.1} MiB (budget 24 MiB)",
        big_size / MIB,
        rss as f64 / MIB as f64
    );
    drop(node);
    let _ = fs::remove_dir_all(&dir);
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn bundle_of(dir: &Path, tarball: &Path, name: &str) -> PathBuf {
    let st = Command::new(beamup())
        .args([
            "bundle",
            "--release",
            tarball.to_str().unwrap(),
            "--key",
            "keys/k.key",
            "--out",
            name,
        ])
        .current_dir(dir)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    dir.join(name)
}

/// thermo 1.1.0 with `payload` bytes of extra files under its priv dir:
/// a real, installable release of the size a large product has. The data
/// is half-compressible, like BEAM files and assets.
fn big_release(dir: &Path, rels: &Path, payload: u64) -> PathBuf {
    let src = dir.join("big-src");
    let _ = fs::remove_dir_all(&src);
    fs::create_dir_all(&src).unwrap();
    let st = Command::new("tar")
        .arg("-xzf")
        .arg(rels.join("thermo-1.1.0.tar.gz"))
        .arg("-C")
        .arg(&src)
        .status()
        .unwrap();
    assert!(st.success());
    let priv_dir = src.join("lib/thermo-1.1.0/priv/assets");
    fs::create_dir_all(&priv_dir).unwrap();
    let file_size = 256 * 1024;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..(payload / file_size) {
        let mut data = vec![0u8; file_size as usize];
        for b in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x & 0x0f) as u8 + b'a';
        }
        let mut f = fs::File::create(priv_dir.join(format!("asset-{i:05}.bin"))).unwrap();
        f.write_all(&data).unwrap();
    }
    let out = dir.join("thermo-big-1.1.0.tar.gz");
    let st = Command::new("tar")
        .arg("-czf")
        .arg(&out)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    fs::remove_dir_all(&src).unwrap();
    out
}
