//! The install suite on the release shapes that ship without
//! `releases/RELEASES`: an Elixir `mix release` root exactly as mix leaves
//! it (`tests/mix`), and a relx release built without ERTS. Hot and cold
//! upgrades, rollbacks, a crashing `code_change`, tampered and hostile
//! bundles, beamup killed at every step, a second install after a rollback.
//! After every scenario the node is killed and started again from disk: it
//! must boot the release beamup says is permanent.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use beamup::error::exit;
use serde_json::Value;

use crate::support::cli::beamup;
use crate::support::device::Device;
use crate::support::otp::{Flavor, releases_for};

/// Every file a release may boot from, hashed: what no failed install,
/// rollback or recovery may change (RELEASES aside, which the first
/// install writes when the root has none).
fn boot_files(d: &Device) -> BTreeMap<PathBuf, [u8; 32]> {
    d.snapshot()
        .into_iter()
        .filter(|(p, _)| p != Path::new("releases/RELEASES"))
        .collect()
}

/// After the first install on a root without RELEASES, RELEASES lists the
/// base release with its libraries, as release_handler needs it.
fn assert_releases_describe_the_base(d: &Device) {
    let text = fs::read_to_string(d.node.root().join("releases/RELEASES")).unwrap();
    assert!(
        text.contains("\"1.0.0\"") && text.contains("./lib/kernel-"),
        "RELEASES: {text}"
    );
}

fn hot_upgrade_keeps_state_commits_and_boots(flavor: Flavor) {
    let mut d = Device::new_flavor(flavor);
    let cookie = fs::read(d.node.root().join("releases/COOKIE")).ok();
    for _ in 0..3 {
        d.node.incr().unwrap();
    }
    let pid = d.node.os_pid();
    let run = d.install(&d.bundle("1.1.0"), &[]);
    run.ok();
    let rel = d.node.release_name().to_string();
    assert!(
        run.stdout
            .contains(&format!("committed {rel} 1.1.0 (hot, from 1.0.0)")),
        "{}",
        run.stdout
    );
    assert_eq!(d.version_and_counter(), ("1.1.0".into(), 3));
    let (_, body) = d.health();
    assert_eq!(body["os_pid"].as_str().unwrap(), pid.to_string());
    d.assert_settled_on("1.1.0", &[]);
    assert_releases_describe_the_base(&d);
    assert_eq!(
        fs::read(d.node.root().join("releases/COOKIE")).ok(),
        cookie,
        "the deployed cookie was overwritten"
    );
    d.assert_boots_permanent();
    assert_eq!(d.version_and_counter().0, "1.1.0");
}

fn unhealthy_release_is_rolled_back_hot_and_the_root_still_boots(flavor: Flavor) {
    let mut d = Device::new_flavor(flavor);
    d.node.incr().unwrap();
    d.node.incr().unwrap();
    let before = boot_files(&d);
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
    assert!(
        o["reason"].as_str().unwrap().contains("status 503"),
        "{o:#}"
    );
    // A hot downgrade: same OS process, state kept (release_handler
    // downgrades hot only once RELEASES describes the base).
    assert_eq!(d.version_and_counter(), ("1.0.0".into(), 2));
    let (_, body) = d.health();
    assert_eq!(body["os_pid"].as_str().unwrap(), pid.to_string());
    d.assert_settled_on("1.0.0", &["1.2.0"]);
    assert_eq!(
        boot_files(&d),
        before,
        "the rollback changed what the base boots from"
    );
    d.assert_boots_permanent();

    // Not retried by accident; the next release installs.
    d.install(&d.bundle("1.2.0"), &[])
        .fails_after_progress(exit::REFUSED as i32, "was rolled back at");
    d.install(&d.bundle("1.1.0"), &[]).ok();
    d.assert_settled_on("1.1.0", &["1.2.0"]);
    d.assert_boots_permanent();
}

fn crashing_code_change_is_rolled_back(flavor: Flavor) {
    let mut d = Device::new_flavor(flavor);
    d.node.incr().unwrap();
    let before = boot_files(&d);
    let run = d.install(&d.bundle("1.3.0"), &[]);
    assert_eq!(
        run.code,
        exit::ROLLED_BACK as i32,
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert!(run.stdout.contains("code_change in"), "{}", run.stdout);
    assert_eq!(d.version_and_counter().0, "1.0.0");
    d.assert_settled_on("1.0.0", &["1.3.0"]);
    assert_eq!(boot_files(&d), before);
    d.assert_boots_permanent();
}

fn cold_upgrade_switches_what_boots_and_commits(flavor: Flavor) {
    let mut d = Device::new_flavor(flavor);
    let old_pid = d.node.os_pid();
    let run = d.install(&d.bundle("2.0.0"), &[]);
    run.ok();
    let rel = d.node.release_name().to_string();
    assert!(
        run.stdout
            .contains(&format!("committed {rel} 2.0.0 (cold, from 1.0.0)")),
        "{}",
        run.stdout
    );
    let (_, body) = d.health();
    assert_eq!(body["version"], "2.0.0");
    assert_ne!(body["os_pid"].as_str().unwrap(), old_pid.to_string());
    d.assert_settled_on("2.0.0", &[]);
    d.assert_boots_permanent();
    assert_eq!(d.version_and_counter().0, "2.0.0");
}

fn cold_upgrade_that_fails_its_health_check_boots_the_old_release(flavor: Flavor) {
    let mut d = Device::with_health_flavor(
        flavor,
        "timeout = \"6s\"\nsoak = \"1s\"\ncommand = \"test \\\"$BEAMUP_VERSION\\\" != 2.0.0\"",
    );
    let before = boot_files(&d);
    let run = d.install(&d.bundle("2.0.0"), &[]);
    assert_eq!(
        run.code,
        exit::ROLLED_BACK as i32,
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(d.version_and_counter().0, "1.0.0");
    d.assert_settled_on("1.0.0", &["2.0.0"]);
    assert_eq!(boot_files(&d), before);
    d.assert_boots_permanent();
}

fn tampered_and_hostile_bundles_change_nothing(flavor: Flavor) {
    let mut d = Device::new_flavor(flavor);
    let before = boot_files(&d);
    let good = fs::read(d.bundle("1.1.0")).unwrap();
    // Tampered inside the new application's part of the tarball: found
    // while unpacking, after the journal started and files were created.
    let rel = d.node.release_name().to_string();
    let mut bytes = good.clone();
    let at = offset_in_unit(&good, &format!("lib/{rel}-1.1.0"));
    bytes[at] ^= 1;
    let tampered = d.path().join("tampered.bundle");
    fs::write(&tampered, &bytes).unwrap();
    d.install(&tampered, &[])
        .fails_after_progress(exit::TARBALL_MISMATCH as i32, "does not match");
    assert_eq!(boot_files(&d), before, "a rejected bundle changed the root");

    // The real 1.1.0 tarball with a symlink out of the release at its end:
    // refused half-way through the unpack.
    let hostile = with_entry_appended(
        releases_for(flavor).tarball("1.1.0"),
        &format!("lib/{rel}-1.1.0/priv/etc"),
        "/etc",
    );
    let tarball = d.path().join(format!("{rel}-1.1.0-hostile.tar.gz"));
    fs::write(&tarball, hostile).unwrap();
    // Refused at bundle time too, where the rule set is shared; sign it
    // past that check the way a compromised signer would: as raw bytes.
    let bundle = signed_raw_bundle(&d, &tarball);
    let run = d.install(&bundle, &[]);
    assert_eq!(
        run.code,
        exit::UNSAFE_TARBALL as i32,
        "{}\n{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(boot_files(&d), before, "a hostile bundle changed the root");
    assert!(d.status()["install_in_progress"].is_null());
    d.assert_boots_permanent();
    assert_eq!(d.version_and_counter().0, "1.0.0");
    // And the good bundle still installs.
    d.install(&d.bundle("1.1.0"), &[]).ok();
    d.assert_boots_permanent();
}

/// The offset in a bundle file of a byte in the middle of the tarball part
/// of `unit` (bundle layout: a tar of `manifest.json`, then
/// `release.tar.gz`).
fn offset_in_unit(bundle: &[u8], unit: &str) -> usize {
    let mut members = tar::Archive::new(bundle);
    let mut manifest = None;
    let mut tarball_at = None;
    for e in members.entries().unwrap() {
        let mut e = e.unwrap();
        match e.path().unwrap().to_str().unwrap() {
            "manifest.json" => {
                let mut text = String::new();
                e.read_to_string(&mut text).unwrap();
                manifest = Some(serde_json::from_str::<Value>(&text).unwrap());
            }
            "release.tar.gz" => tarball_at = Some(e.raw_file_position() as usize),
            _ => {}
        }
    }
    let manifest = manifest.expect("manifest.json");
    let part = manifest["signed"]["tarball"]["parts"]
        .as_array()
        .expect("an indexed bundle")
        .iter()
        .find(|p| p["unit"] == unit)
        .unwrap_or_else(|| panic!("no part {unit}"))
        .clone();
    tarball_at.expect("release.tar.gz")
        + (part["offset"].as_u64().unwrap() + part["size"].as_u64().unwrap() / 2) as usize
}

/// The gzip tar at `path` with one more entry, a symlink, before its end.
fn with_entry_appended(path: &Path, name: &str, target: &str) -> Vec<u8> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(fs::File::open(path).unwrap())
        .read_to_end(&mut raw)
        .unwrap();
    // Cut at the end of the last entry's data (before the end-of-archive
    // blocks) and append.
    let mut end = 0;
    for e in tar::Archive::new(&raw[..]).entries().unwrap() {
        let e = e.unwrap();
        end = e.raw_file_position() + e.size().div_ceil(512) * 512;
    }
    raw.truncate(end as usize);
    let mut h = tar::Header::new_gnu();
    let gnu = h.as_gnu_mut().unwrap();
    gnu.name[..name.len()].copy_from_slice(name.as_bytes());
    gnu.linkname[..target.len()].copy_from_slice(target.as_bytes());
    h.set_size(0);
    h.set_mode(0o777);
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_cksum();
    raw.extend_from_slice(h.as_bytes());
    raw.extend_from_slice(&[0; 1024]);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&raw).unwrap();
    gz.finish().unwrap()
}

/// A bundle of `tarball` signed with the device's key, with the manifest
/// `beamup bundle` would write for the real release but without its
/// checks on the entries.
fn signed_raw_bundle(d: &Device, tarball: &Path) -> PathBuf {
    use beamup::release::manifest::*;
    let info = beamup::release::metadata::inspect(tarball).unwrap();
    let bytes = fs::read(tarball).unwrap();
    let digests =
        beamup::bundle::hash_stream(&mut &bytes[..], bytes.len() as u64, DEFAULT_CHUNK_SIZE)
            .unwrap();
    let m = Manifest {
        kind: MANIFEST_TYPE.into(),
        format: FORMAT,
        release: ReleaseRef {
            name: info.name.clone(),
            version: info.version.clone(),
        },
        erts: info.erts.clone(),
        includes_erts: info.includes_erts,
        apps: info.apps.iter().map(|(a, v)| format!("{a}-{v}")).collect(),
        upgrade_from: info.upgrade_from.clone(),
        downgrade_to: info.downgrade_to.clone(),
        tarball: TarballRef {
            size: bytes.len() as u64,
            sha256: hex::encode(digests.whole),
            chunk_size: DEFAULT_CHUNK_SIZE,
            unpacked_size: info.unpacked_size,
            chunks: digests.chunks.iter().map(hex::encode).collect(),
            parts: Vec::new(),
        },
        target: vec!["any".into()],
        created_at: format_time(std::time::SystemTime::now()),
        expires_at: format_time(
            std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
        ),
        sequence: 1,
        allow_downgrade: false,
    };
    let key = beamup::trust::keys::SecretKey::load(&d.path().join("keys/k.key")).unwrap();
    let env =
        beamup::trust::signed::Envelope::sign(beamup::trust::signed::DocKind::Manifest, &m, &[key])
            .to_bytes();
    let mut out = crate::support::cli::tar_header("manifest.json", env.len() as u64).to_vec();
    out.extend_from_slice(&env);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&crate::support::cli::tar_header(
        "release.tar.gz",
        bytes.len() as u64,
    ));
    out.extend_from_slice(&bytes);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.extend_from_slice(&[0; 1024]);
    let path = d.path().join("hostile.bundle");
    fs::write(&path, out).unwrap();
    path
}

/// beamup killed (SIGKILL, as a power cut) at one step boundary of the
/// install of `vsn`; `beamup recover` leaves the device on `expect`, and
/// the root boots what is permanent.
fn killed_at(flavor: Flavor, vsn: &str, point: &str, expect: &str) {
    let mut d = Device::new_flavor(flavor);
    let before = boot_files(&d);
    let run = d.install_env(&d.bundle(vsn), &[], &[("BEAMUP_CRASH", point)]);
    assert_eq!(run.code, -1, "{point}: not killed\n{}", run.stderr);
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
        d.assert_settled_on("1.0.0", &[vsn]);
        assert_eq!(boot_files(&d), before, "{point}: the base changed");
    } else {
        assert_eq!(rec.code, 0, "{point}: {}", rec.stderr);
        assert_eq!(o["outcome"], "committed", "{point}: {o:#}");
        d.assert_settled_on(expect, &[]);
    }
    d.assert_boots_permanent();
    assert_eq!(d.version_and_counter().0, expect, "{point}");
}

macro_rules! on_every_shape {
    ($($name:ident => $body:expr;)*) => {
        mod mix {
            use super::*;
            $( #[test] fn $name() { ($body)(Flavor::Mix) } )*
        }
        mod relx_without_erts {
            use super::*;
            $( #[test] fn $name() { ($body)(Flavor::Rebar3NoErts) } )*
        }
    };
}

on_every_shape! {
    hot_upgrade => hot_upgrade_keeps_state_commits_and_boots;
    unhealthy_rolled_back_hot => unhealthy_release_is_rolled_back_hot_and_the_root_still_boots;
    crashing_code_change => crashing_code_change_is_rolled_back;
    cold_upgrade => cold_upgrade_switches_what_boots_and_commits;
    cold_unhealthy => cold_upgrade_that_fails_its_health_check_boots_the_old_release;
    tampered_and_hostile => tampered_and_hostile_bundles_change_nothing;
    killed_after_unpacking => |f| killed_at(f, "1.1.0", "unpacking+", "1.0.0");
    killed_after_registering => |f| killed_at(f, "1.1.0", "registering+", "1.0.0");
    killed_after_install_release => |f| killed_at(f, "1.1.0", "installing+", "1.0.0");
    killed_while_soaking => |f| killed_at(f, "1.1.0", "soaking", "1.0.0");
    killed_while_committing => |f| killed_at(f, "1.1.0", "committing", "1.1.0");
    cold_killed_before_the_restart => |f| killed_at(f, "2.0.0", "restarting", "1.0.0");
    cold_killed_after_the_restart => |f| killed_at(f, "2.0.0", "restarting+", "1.0.0");
    cold_killed_after_committing => |f| killed_at(f, "2.0.0", "committing+", "2.0.0");
}

/// A dry run on a mix root says RELEASES would be written first, and
/// writes nothing: not RELEASES, not anything else.
#[test]
fn a_dry_run_on_a_mix_root_writes_no_releases_file() {
    let mut d = Device::new_flavor(Flavor::Mix);
    let before = d.snapshot();
    assert!(!d.node.root().join("releases/RELEASES").exists());
    let run = beamup(
        d.path(),
        &[
            "install",
            d.bundle("1.1.0").to_str().unwrap(),
            "--config",
            "agent.toml",
            "--dry-run",
            "--json",
        ],
    );
    run.ok();
    let j: Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(j["writes_releases_file"], true, "{j:#}");
    assert_eq!(j["strategy"], "hot", "{j:#}");
    assert_eq!(d.snapshot(), before, "the dry run changed the root");
    assert!(!d.node.root().join("releases/RELEASES").exists());
    d.assert_boots_permanent();
}
