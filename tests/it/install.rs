//! `beamup install` against real nodes of the thermo release: hot and cold
//! upgrades, health-gated rollback, code_change crashes, hostile tarballs,
//! and beamup or the node killed at every step.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use beamup::error::exit;
use serde_json::Value;

use crate::support::cli::{beamup, tar_header};
use crate::support::device::Device;
use crate::support::otp::releases;

/// The names of an outcome's steps, in order.
fn step_names(outcome: &Value) -> Vec<&str> {
    outcome["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect()
}

#[test]
fn hot_upgrade_keeps_state_and_commits() {
    let mut d = Device::new();
    for _ in 0..3 {
        d.node.incr().unwrap();
    }
    let pid = d.node.os_pid();
    let run = d.install(&d.bundle("1.1.0"), &[]);
    run.ok();
    assert!(
        run.stdout
            .contains("committed thermo 1.1.0 (hot, from 1.0.0)"),
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("beamup: soaking"), "{}", run.stderr);
    assert_eq!(
        d.version_and_counter(),
        ("1.1.0".into(), 3),
        "state must survive"
    );
    let (_, body) = d.health();
    assert_eq!(
        body["os_pid"].as_str().unwrap(),
        pid.to_string(),
        "same OS process"
    );
    d.assert_settled_on("1.1.0", &[]);
    let st = d.status();
    assert_eq!(st["last_outcome"]["outcome"], "committed");
    assert_eq!(st["last_outcome"]["strategy"], "hot");
    let steps = step_names(&st["last_outcome"]);
    assert_eq!(
        steps,
        [
            "verifying",
            "unpacking",
            "installing",
            "soaking",
            "committing"
        ],
        "{st:#}"
    );
    assert!(st["last_outcome"]["failed_step"].is_null());
    assert!(run.stdout.contains("steps: verifying "), "{}", run.stdout);
    // The previous release stays for a manual downgrade.
    assert!(d.node.root().join("releases/1.0.0").exists());
    d.assert_boots_permanent();
}

#[test]
fn unhealthy_release_is_rolled_back_hot_and_the_next_install_succeeds() {
    let mut d = Device::new();
    d.node.incr().unwrap();
    d.node.incr().unwrap();
    let pid = d.node.os_pid();
    let run = d.install(&d.bundle("1.2.0"), &["--json"]);
    assert_eq!(
        run.code,
        exit::ROLLED_BACK as i32,
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    let o: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(o["outcome"], "rolled_back");
    let reason = o["reason"].as_str().unwrap();
    assert!(reason.contains("status 503"), "{reason}");
    // The outcome says how long each step took, and which one failed.
    let steps = step_names(&o);
    assert_eq!(
        steps,
        [
            "verifying",
            "unpacking",
            "installing",
            "soaking",
            "rolling_back"
        ],
        "{o:#}"
    );
    assert_eq!(o["failed_step"], "soaking", "{o:#}");
    // The soak ran into its timeout (8 s): its time says so.
    assert!(o["steps"][3]["ms"].as_u64().unwrap() >= 7_000, "{o:#}");
    assert_eq!(
        d.version_and_counter(),
        ("1.0.0".into(), 2),
        "state kept through the downgrade"
    );
    let (_, body) = d.health();
    assert_eq!(
        body["os_pid"].as_str().unwrap(),
        pid.to_string(),
        "hot rollback, no restart"
    );
    d.assert_settled_on("1.0.0", &["1.2.0"]);

    // The same bundle is not retried by accident ...
    let again = d.install(&d.bundle("1.2.0"), &[]);
    again.fails_after_progress(exit::REFUSED as i32, "was rolled back at");
    // ... and the failure did not block the next release (bundled with the
    // tarball as rebar3 made it: one gzip stream, inflated whole).
    let plain = d.bundle_with("1.1.0", "thermo-1.1.0-plain.bundle", &["--keep-tarball"]);
    d.install(&plain, &[]).ok();
    assert_eq!(d.version_and_counter(), ("1.1.0".into(), 2));
    d.assert_settled_on("1.1.0", &["1.2.0"]);
    d.assert_boots_permanent();
}

#[test]
fn crashing_code_change_is_recognized_and_rolled_back() {
    let mut d = Device::new();
    d.node.incr().unwrap();
    let run = d.install(&d.bundle("1.3.0"), &[]);
    assert_eq!(
        run.code,
        exit::ROLLED_BACK as i32,
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout.contains("code_change in thermo_state crashed")
            && run.stdout.contains("restarted itself on 1.0.0"),
        "{}",
        run.stdout
    );
    // The node restarted itself: same release, state gone.
    assert_eq!(d.version_and_counter(), ("1.0.0".into(), 0));
    d.assert_settled_on("1.0.0", &["1.3.0"]);
    d.assert_boots_permanent();
}

#[test]
fn cold_upgrade_restarts_into_the_new_release() {
    let mut d = Device::new();
    let old_pid = d.node.os_pid();
    let run = d.install(&d.bundle("2.0.0"), &[]);
    run.ok();
    assert!(
        run.stdout
            .contains("committed thermo 2.0.0 (cold, from 1.0.0)"),
        "{}",
        run.stdout
    );
    let (_, body) = d.health();
    assert_eq!(body["version"], "2.0.0");
    assert_ne!(
        body["os_pid"].as_str().unwrap(),
        old_pid.to_string(),
        "a cold upgrade restarts"
    );
    d.assert_settled_on("2.0.0", &[]);
    d.assert_boots_permanent();
}

#[test]
fn cold_upgrade_that_fails_its_health_check_restarts_the_old_release() {
    // 2.0.0 itself is healthy; a site-specific check rejects it.
    let mut d = Device::with_health(
        "timeout = \"5s\"\nsoak = \"1s\"\ncommand = \"test \\\"$BEAMUP_VERSION\\\" != 2.0.0\"",
    );
    let run = d.install(&d.bundle("2.0.0"), &[]);
    assert_eq!(
        run.code,
        exit::ROLLED_BACK as i32,
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        run.stdout
            .contains("rolled back thermo 2.0.0 (cold, from 1.0.0)"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("command check"), "{}", run.stdout);
    assert_eq!(d.version_and_counter().0, "1.0.0");
    d.assert_settled_on("1.0.0", &["2.0.0"]);
    d.assert_boots_permanent();
}

#[test]
fn hot_only_refuses_a_cold_upgrade_without_touching_anything() {
    let mut d = Device::new();
    let cfg = d.path().join("agent.toml");
    let text = fs::read_to_string(&cfg).unwrap() + "[install]\nstrategy = \"hot-only\"\n";
    fs::write(&cfg, text).unwrap();
    let before = d.snapshot();
    d.install(&d.bundle("2.0.0"), &[]).fails_after_progress(
        exit::REFUSED as i32,
        "has no relup, so it needs a restart, and [install] strategy is hot-only",
    );
    assert_eq!(d.snapshot(), before);
    d.assert_boots_permanent();
}

#[test]
fn bad_bundles_are_rejected_and_the_release_is_untouched() {
    let mut d = Device::new();
    d.node.incr().unwrap();
    let before = d.snapshot();
    let good = fs::read(d.bundle("1.1.0")).unwrap();

    // Tampered tarball.
    let mut bytes = good.clone();
    let n = bytes.len();
    bytes[n - 5000] ^= 1;
    fs::write(d.path().join("tampered.bundle"), &bytes).unwrap();
    d.install(&d.path().join("tampered.bundle"), &[])
        .fails_after_progress(
            exit::TARBALL_MISMATCH as i32,
            "does not match the signed manifest",
        );
    // Truncated copy.
    fs::write(d.path().join("cut.bundle"), &good[..good.len() / 2]).unwrap();
    d.install(&d.path().join("cut.bundle"), &[])
        .fails_after_progress(exit::TRUNCATED as i32, "truncated");
    // Not a bundle at all.
    d.install(releases().tarball("1.1.0"), &[])
        .fails_after_progress(exit::NOT_A_BUNDLE as i32, "not a beamup bundle");
    // Signed by a key the device does not trust.
    beamup(d.path(), &["keygen", "--out", "other", "--name", "x"]).ok();
    let tarball = releases().tarball("1.1.0").display().to_string();
    beamup(
        d.path(),
        &[
            "bundle",
            "--release",
            &tarball,
            "--key",
            "other/x.key",
            "--out",
            "x.bundle",
        ],
    )
    .ok();
    d.install(&d.path().join("x.bundle"), &[])
        .fails_after_progress(exit::UNKNOWN_KEY as i32, "does not trust");
    // A downgrade to the running version.
    let base = releases().tarball("1.0.0").display().to_string();
    beamup(
        d.path(),
        &[
            "bundle",
            "--release",
            &base,
            "--key",
            "keys/k.key",
            "--out",
            "old.bundle",
        ],
    )
    .ok();
    d.install(&d.path().join("old.bundle"), &[])
        .fails_after_progress(
            exit::DOWNGRADE as i32,
            "not newer than the installed release 1.0.0",
        );
    // A bundle for another device.
    let cfg = d.path().join("agent.toml");
    let text = fs::read_to_string(&cfg).unwrap()
        + "[mqtt]\nurl = \"mqtt://127.0.0.1:1\"\ndevice_id = \"gw-1\"\nfleet = \"acme\"\n";
    fs::write(&cfg, text).unwrap();
    beamup(
        d.path(),
        &[
            "bundle",
            "--release",
            &tarball,
            "--key",
            "keys/k.key",
            "--target",
            "device:gw-2",
            "--out",
            "t.bundle",
        ],
    )
    .ok();
    d.install(&d.path().join("t.bundle"), &[])
        .fails_after_progress(
            exit::WRONG_TARGET as i32,
            "does not include this device (device:gw-1",
        );

    assert_eq!(d.snapshot(), before, "the release root changed");
    assert_eq!(d.version_and_counter(), ("1.0.0".into(), 1));
    let st = d.status();
    assert_eq!(st["last_outcome"]["outcome"], "rejected", "{st:#}");
    assert!(st["install_in_progress"].is_null());
    d.assert_boots_permanent();
}

/// One entry of a hand-made (hostile) release tarball.
pub(crate) enum Entry {
    File(&'static str, Vec<u8>),
    Symlink(&'static str, &'static str),
    Hardlink(&'static str, &'static str),
    CharDevice(&'static str),
}

/// The hostile release tarballs every command that unpacks must refuse:
/// (name, entries, what the refusal says). `slip` climbs out with `..`,
/// `absolute` is an absolute path (each test names its own, to check that
/// nothing appeared there).
pub(crate) fn hostile_cases(
    slip: &'static str,
    absolute: &'static str,
) -> Vec<(&'static str, Vec<Entry>, &'static str)> {
    vec![
        (
            "tar-slip",
            vec![Entry::File(slip, b"x".to_vec())],
            "climbs out with '..'",
        ),
        (
            "absolute",
            vec![Entry::File(absolute, b"x".to_vec())],
            "is an absolute path",
        ),
        (
            "symlink-escape",
            vec![Entry::Symlink(
                "lib/thermo-1.1.0/priv/etc",
                "../../../../../../etc",
            )],
            "points outside the release",
        ),
        (
            "write-through-symlink",
            vec![
                Entry::Symlink("lib/thermo-1.1.0/priv/rel", "../../../releases"),
                Entry::File("lib/thermo-1.1.0/priv/rel/RELEASES", b"[].".to_vec()),
            ],
            "would be written through the symlink",
        ),
        (
            "write-through-symlink-up",
            vec![
                Entry::Symlink("lib/thermo-1.1.0/priv/up", "../../.."),
                Entry::File("lib/thermo-1.1.0/priv/up/bin/thermo", b"x".to_vec()),
            ],
            "would be written through the symlink",
        ),
        (
            "hardlink-escape",
            vec![Entry::Hardlink(
                "lib/thermo-1.1.0/priv/passwd",
                "/etc/passwd",
            )],
            "points outside the release",
        ),
        (
            "hardlink-to-running-release",
            vec![Entry::Hardlink(
                "lib/thermo-1.1.0/priv/boot",
                "releases/start_erl.data",
            )],
            "points outside what this release adds",
        ),
        (
            "device-file",
            vec![Entry::CharDevice("lib/thermo-1.1.0/priv/mem")],
            "is a character device",
        ),
    ]
}

/// Writes a gzip tar with raw headers (no path checks: that is the point).
pub(crate) fn hostile_tarball(entries: &[Entry]) -> Vec<u8> {
    let mut tar: Vec<u8> = hostile_entries(entries).into_iter().flatten().collect();
    tar.extend_from_slice(&[0; 1024]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    gz.finish().unwrap()
}

/// The same entries as an indexed tarball whose index claims every hostile
/// entry for `lib/thermo-1.1.0`, a part the device unpacks: what a
/// compromised signer could produce.
pub(crate) fn hostile_indexed_tarball(
    entries: &[Entry],
) -> (Vec<u8>, Vec<beamup::release::manifest::Part>) {
    let mut groups: Vec<(&str, Vec<u8>)> =
        vec![("releases/1.1.0", vec![]), ("lib/thermo-1.1.0", vec![])];
    for e in hostile_entries(entries) {
        let name = String::from_utf8_lossy(&e[..100]).into_owned();
        let g = usize::from(!name.starts_with("releases/1.1.0"));
        groups[g].1.extend_from_slice(&e);
    }
    groups.push(("", vec![0; 1024]));
    let mut out = Vec::new();
    let mut parts = Vec::new();
    for (unit, tar) in groups {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let member = gz.finish().unwrap();
        parts.push(beamup::release::manifest::Part {
            unit: unit.into(),
            offset: out.len() as u64,
            size: member.len() as u64,
        });
        out.extend_from_slice(&member);
    }
    (out, parts)
}

/// Each entry as its header and padded data.
fn hostile_entries(entries: &[Entry]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let rel = br#"{release,{"thermo","1.1.0"},{erts,"13.1.5"},[{kernel,"8.5.3"},{stdlib,"4.2"},{sasl,"4.2"},{thermo,"1.1.0"}]}."#;
    let mut all = vec![
        Entry::File("releases/1.1.0/thermo.rel", rel.to_vec()),
        Entry::File("releases/1.1.0/start.boot", b"boot".to_vec()),
        Entry::File("lib/thermo-1.1.0/ebin/thermo.app", b"app".to_vec()),
    ];
    all.extend(entries.iter().map(|e| match e {
        Entry::File(p, d) => Entry::File(p, d.clone()),
        Entry::Symlink(p, t) => Entry::Symlink(p, t),
        Entry::Hardlink(p, t) => Entry::Hardlink(p, t),
        Entry::CharDevice(p) => Entry::CharDevice(p),
    }));
    for e in &all {
        let mut h = tar::Header::new_gnu();
        let (path, data, kind, link): (&str, &[u8], tar::EntryType, &str) = match e {
            Entry::File(p, d) => (p, d, tar::EntryType::Regular, ""),
            Entry::Symlink(p, t) => (p, b"", tar::EntryType::Symlink, t),
            Entry::Hardlink(p, t) => (p, b"", tar::EntryType::Link, t),
            Entry::CharDevice(p) => (p, b"", tar::EntryType::Char, ""),
        };
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..path.len()].copy_from_slice(path.as_bytes());
        gnu.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(kind);
        h.set_cksum();
        let mut tar = h.as_bytes().to_vec();
        tar.extend_from_slice(data);
        tar.resize(tar.len().div_ceil(512) * 512, 0);
        out.push(tar);
    }
    out
}

/// A correctly signed bundle around arbitrary tarball bytes: what a
/// compromised build server could produce, signed with `dir/keys/k.key` and
/// written to `dir/name`. `unpacked` is the size the manifest declares.
pub(crate) fn signed_bundle_of(dir: &Path, name: &str, tarball: &[u8], unpacked: u64) -> PathBuf {
    signed_indexed_bundle_of(dir, name, tarball, Vec::new(), unpacked)
}

pub(crate) fn signed_indexed_bundle_of(
    dir: &Path,
    name: &str,
    tarball: &[u8],
    parts: Vec<beamup::release::manifest::Part>,
    unpacked: u64,
) -> PathBuf {
    use beamup::release::manifest::*;
    let digests =
        beamup::bundle::hash_stream(&mut &tarball[..], tarball.len() as u64, DEFAULT_CHUNK_SIZE)
            .unwrap();
    let m = Manifest {
        kind: MANIFEST_TYPE.into(),
        format: FORMAT,
        release: ReleaseRef {
            name: "thermo".into(),
            version: "1.1.0".into(),
        },
        erts: "13.1.5".into(),
        includes_erts: false,
        apps: vec!["thermo-1.1.0".into()],
        upgrade_from: vec!["1.0.0".into()],
        downgrade_to: vec!["1.0.0".into()],
        tarball: TarballRef {
            size: tarball.len() as u64,
            sha256: hex::encode(digests.whole),
            chunk_size: DEFAULT_CHUNK_SIZE,
            unpacked_size: unpacked,
            chunks: digests.chunks.iter().map(hex::encode).collect(),
            parts,
        },
        target: vec!["any".into()],
        created_at: format_time(std::time::SystemTime::now()),
        expires_at: format_time(std::time::SystemTime::now() + Duration::from_secs(3600)),
        sequence: 1,
        allow_downgrade: false,
    };
    let key = beamup::trust::keys::SecretKey::load(&dir.join("keys/k.key")).unwrap();
    let env =
        beamup::trust::signed::Envelope::sign(beamup::trust::signed::DocKind::Manifest, &m, &[key])
            .to_bytes();
    let mut out = tar_header("manifest.json", env.len() as u64).to_vec();
    out.extend_from_slice(&env);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&tar_header("release.tar.gz", tarball.len() as u64));
    out.extend_from_slice(tarball);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0; 1024]);
    let path = dir.join(name);
    fs::write(&path, out).unwrap();
    path
}

#[test]
fn hostile_tarballs_are_refused_with_the_release_untouched() {
    let mut d = Device::new();
    let before = d.snapshot();
    let outside = d.path().join("outside");
    fs::create_dir(&outside).unwrap();
    let cases = hostile_cases(
        "lib/thermo-1.1.0/../../../../escaped",
        "/tmp/beamup-escaped",
    );
    for (name, entries, needle) in cases {
        let tarball = hostile_tarball(&entries);
        let plain = signed_bundle_of(d.path(), &format!("{name}.bundle"), &tarball, 1 << 20);
        let (tarball, parts) = hostile_indexed_tarball(&entries);
        let indexed = signed_indexed_bundle_of(
            d.path(),
            &format!("{name}-indexed.bundle"),
            &tarball,
            parts,
            1 << 20,
        );
        for bundle in [plain, indexed] {
            let run = d.install(&bundle, &[]);
            let shown = bundle.file_name().unwrap().to_string_lossy();
            assert_eq!(
                run.code,
                exit::UNSAFE_TARBALL as i32,
                "{shown}: {}",
                run.stderr
            );
            assert!(run.stderr.contains(needle), "{shown}: {}", run.stderr);
            assert_eq!(d.snapshot(), before, "{shown}: the release root changed");
        }
    }
    // More data than the manifest declares (a gzip bomb).
    let big = hostile_tarball(&[Entry::File("lib/thermo-1.1.0/priv/zeros", vec![0; 4 << 20])]);
    let bundle = signed_bundle_of(d.path(), "bomb.bundle", &big, 1 << 20);
    d.install(&bundle, &[]).fails_after_progress(
        exit::UNSAFE_TARBALL as i32,
        "unpacks to more than the 1048576 bytes its manifest declares",
    );
    // A truncated gzip stream (signed as it is).
    let good = hostile_tarball(&[]);
    let bundle = signed_bundle_of(
        d.path(),
        "truncated-gzip.bundle",
        &good[..good.len() - 20],
        1 << 20,
    );
    d.install(&bundle, &[])
        .fails_after_progress(exit::UNSAFE_TARBALL as i32, "truncated or corrupt");

    assert_eq!(d.snapshot(), before, "the release root changed");
    assert!(!Path::new("/tmp/beamup-escaped").exists());
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
    assert_eq!(d.version_and_counter().0, "1.0.0");
    assert!(d.status()["install_in_progress"].is_null());
    d.assert_boots_permanent();
}

#[test]
fn node_killed_during_the_soak_is_rolled_back_by_restart() {
    let mut d = Device::with_health("timeout = \"20s\"\nsoak = \"4s\"");
    let bundle = d.bundle("1.1.0");
    let child = Command::new(crate::support::cli::bin())
        .args([
            "install",
            bundle.to_str().unwrap(),
            "--config",
            "agent.toml",
        ])
        .current_dir(d.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_phase(&d, "soaking", Duration::from_secs(30));
    d.node.kill9();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(exit::ROLLED_BACK as i32),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("rolled back thermo 1.1.0"), "{stdout}");
    assert_eq!(d.version_and_counter().0, "1.0.0");
    d.assert_settled_on("1.0.0", &["1.1.0"]);
    d.assert_boots_permanent();
}

/// Polls state.json until the journal reaches `phase`.
fn wait_for_phase(d: &Device, phase: &str, within: Duration) {
    let deadline = Instant::now() + within;
    let path = d.path().join("state/state.json");
    loop {
        if let Ok(text) = fs::read_to_string(&path)
            && let Ok(v) = serde_json::from_str::<Value>(&text)
            && v["current"]["phase"] == phase
        {
            return;
        }
        assert!(Instant::now() < deadline, "install never reached {phase}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// beamup dies (SIGKILL, as in a power cut) at one step boundary; the next
/// `beamup recover` leaves the device consistent, on the expected release.
fn crash_and_recover(point: &str, expect: &str) {
    let mut d = Device::new();
    d.node.incr().unwrap();
    let run = d.install_env(&d.bundle("1.1.0"), &[], &[("BEAMUP_CRASH", point)]);
    assert_eq!(
        run.code, -1,
        "{point}: beamup should have been killed\n{}",
        run.stderr
    );
    let st = d.status();
    assert!(
        !st["install_in_progress"].is_null(),
        "{point}: journal lost: {st:#}"
    );
    let rec = beamup(d.path(), &["recover", "--config", "agent.toml", "--json"]);
    let o: Value = serde_json::from_str(&rec.stdout).unwrap_or(Value::Null);
    let gone: &[&str] = if expect == "1.0.0" { &["1.1.0"] } else { &[] };
    d.assert_settled_on(expect, gone);
    if expect == "1.0.0" {
        assert_eq!(
            rec.code,
            exit::ROLLED_BACK as i32,
            "{point}: {}",
            rec.stderr
        );
        assert_eq!(o["interrupted"], true, "{point}: {o:#}");
        // An interruption is not the release's fault: it installs next time.
        d.install(&d.bundle("1.1.0"), &[]).ok();
        d.assert_settled_on("1.1.0", &[]);
    } else {
        assert_eq!(rec.code, 0, "{point}: {}", rec.stderr);
        assert_eq!(o["outcome"], "committed", "{point}: {o:#}");
    }
    // The counter survived wherever the node kept running.
    assert_eq!(d.version_and_counter().1, 1, "{point}");
    d.assert_boots_permanent();
}

#[test]
fn killed_while_unpacking() {
    crash_and_recover("unpacking", "1.0.0");
}
#[test]
fn killed_after_unpacking() {
    crash_and_recover("unpacking+", "1.0.0");
}
#[test]
fn killed_while_registering() {
    crash_and_recover("registering", "1.0.0");
}
#[test]
fn killed_after_registering() {
    crash_and_recover("registering+", "1.0.0");
}
#[test]
fn killed_before_install_release() {
    crash_and_recover("installing", "1.0.0");
}
#[test]
fn killed_after_install_release() {
    crash_and_recover("installing+", "1.0.0");
}
#[test]
fn killed_while_soaking() {
    crash_and_recover("soaking", "1.0.0");
}
#[test]
fn killed_after_the_health_gate_passed() {
    crash_and_recover("soaking+", "1.0.0");
}
#[test]
fn killed_while_committing() {
    crash_and_recover("committing", "1.1.0");
}
#[test]
fn killed_after_committing() {
    crash_and_recover("committing+", "1.1.0");
}

/// A cold upgrade (2.0.0 has no relup) cut at one step boundary: the next
/// `beamup recover` leaves the device on the expected release, with what
/// boots (`bin/thermo`, `start_erl.data`) matching it.
fn cold_crash_and_recover(point: &str, expect: &str) {
    let mut d = Device::new();
    let run = d.install_env(&d.bundle("2.0.0"), &[], &[("BEAMUP_CRASH", point)]);
    assert_eq!(
        run.code, -1,
        "{point}: beamup should have been killed\n{}",
        run.stderr
    );
    let rec = beamup(d.path(), &["recover", "--config", "agent.toml", "--json"]);
    let o: Value = serde_json::from_str(&rec.stdout).unwrap_or(Value::Null);
    if expect == "1.0.0" {
        assert_eq!(
            rec.code,
            exit::ROLLED_BACK as i32,
            "{point}: {}",
            rec.stderr
        );
        assert_eq!(o["interrupted"], true, "{point}: {o:#}");
        d.assert_settled_on("1.0.0", &["2.0.0"]);
        d.install(&d.bundle("2.0.0"), &[]).ok();
    } else {
        assert_eq!(rec.code, 0, "{point}: {}", rec.stderr);
        assert_eq!(o["outcome"], "committed", "{point}: {o:#}");
    }
    d.assert_settled_on("2.0.0", &[]);
    assert_eq!(d.version_and_counter().0, "2.0.0");
    d.assert_boots_permanent();
}

#[test]
fn cold_killed_before_the_restart() {
    cold_crash_and_recover("restarting", "1.0.0");
}
#[test]
fn cold_killed_after_the_restart_into_the_new_release() {
    cold_crash_and_recover("restarting+", "1.0.0");
}
#[test]
fn cold_killed_while_soaking() {
    cold_crash_and_recover("soaking", "1.0.0");
}
#[test]
fn cold_killed_after_committing() {
    cold_crash_and_recover("committing+", "2.0.0");
}

/// Everything under a directory but its lock file, hashed.
fn state_files(dir: &Path) -> std::collections::BTreeMap<PathBuf, [u8; 32]> {
    let mut out = std::collections::BTreeMap::new();
    if dir.exists() {
        crate::support::device::walk(dir, dir, &mut out);
    }
    out.retain(|p, _| p.file_name().is_none_or(|n| n != "lock"));
    out
}

#[test]
fn a_dry_run_says_what_an_install_would_do_and_changes_nothing() {
    let mut d = Device::new();
    d.node.incr().unwrap();
    let state = d.path().join("state");
    let (root_before, state_before) = (d.snapshot(), state_files(&state));

    let hot = beamup(
        d.path(),
        &[
            "install",
            d.bundle("1.1.0").to_str().unwrap(),
            "--config",
            "agent.toml",
            "--dry-run",
        ],
    );
    hot.ok();
    for want in [
        "nothing was changed",
        "hot upgrade through the relup, no restart: its relup upgrades from the running 1.0.0",
        "releases/1.1.0",
        "lib/thermo-1.1.0",
    ] {
        assert!(hot.stdout.contains(want), "{want:?} not in\n{}", hot.stdout);
    }
    let cold = beamup(
        d.path(),
        &[
            "install",
            d.bundle("2.0.0").to_str().unwrap(),
            "--config",
            "agent.toml",
            "--dry-run",
            "--json",
        ],
    );
    cold.ok();
    let j: Value = serde_json::from_str(&cold.stdout).unwrap();
    assert_eq!(j["strategy"], "cold", "{j:#}");
    assert_eq!(j["why"], "thermo 2.0.0 has no relup");
    assert!(j["chunks_read"].as_u64().unwrap() <= j["chunks_total"].as_u64().unwrap());
    // A bundle the install would refuse is refused by the dry run, with the
    // same exit code.
    let mut bytes = fs::read(d.bundle("1.1.0")).unwrap();
    let n = bytes.len();
    bytes[n - 5000] ^= 1;
    fs::write(d.path().join("tampered.bundle"), &bytes).unwrap();
    let bad = beamup(
        d.path(),
        &[
            "install",
            "tampered.bundle",
            "--config",
            "agent.toml",
            "--dry-run",
        ],
    );
    assert_eq!(bad.code, exit::TARBALL_MISMATCH as i32, "{}", bad.stderr);

    assert_eq!(d.snapshot(), root_before, "the release root changed");
    assert_eq!(state_files(&state), state_before, "the state dir changed");
    assert_eq!(d.version_and_counter(), ("1.0.0".into(), 1));
    // And the install it described does what it said.
    d.install(&d.bundle("1.1.0"), &[]).ok();
    d.assert_settled_on("1.1.0", &[]);
    d.assert_boots_permanent();
}
