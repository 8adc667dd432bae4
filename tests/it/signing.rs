//! keygen -> root -> bundle -> verify through the real binary, and every way
//! a bundle can be bad, each with its exact exit code and message.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::cli::{Run, beamup, beamup_with_memory_cap, fake_release, tar_header};
use beamup::error::exit;

/// Three signers a, b, c in a 2-of-3 root, one outsider d, a release
/// tarball, and a good bundle of it signed by a and b.
struct Fixture {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    release: PathBuf,
    bundle: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        for k in ["a", "b", "c", "d"] {
            beamup(&dir, &["keygen", "--out", "keys", "--name", k]).ok();
        }
        beamup(
            &dir,
            &[
                "root",
                "init",
                "--key",
                "keys/a.pub",
                "--key",
                "keys/b.pub",
                "--key",
                "keys/c.pub",
                "--threshold",
                "2",
                "--sign",
                "keys/a.key",
                "--sign",
                "keys/b.key",
                "--out",
                "root.json",
            ],
        )
        .ok();
        let release = fake_release(&dir, "thermo", "1.1.0", &["1.0.0"], 300_000);
        let bundle = dir.join("good.bundle");
        beamup(
            &dir,
            &[
                "bundle",
                "--release",
                "thermo-1.1.0.tar.gz",
                "--key",
                "keys/a.key",
                "--key",
                "keys/b.key",
                "--out",
                "good.bundle",
            ],
        )
        .ok();
        Fixture {
            _tmp: tmp,
            dir,
            release,
            bundle,
        }
    }

    fn run(&self, args: &[&str]) -> Run {
        beamup(&self.dir, args)
    }

    fn verify(&self, file: &str, extra: &[&str]) -> Run {
        let mut args = vec!["verify", file, "--root", "root.json"];
        args.extend_from_slice(extra);
        self.run(&args)
    }

    /// Bundles the release with the given keys and extra flags into `out`.
    fn bundle(&self, out: &str, keys: &[&str], extra: &[&str]) -> Run {
        let mut args = vec!["bundle", "--release", "thermo-1.1.0.tar.gz", "--out", out];
        let key_paths: Vec<String> = keys.iter().map(|k| format!("keys/{k}.key")).collect();
        for k in &key_paths {
            args.extend_from_slice(&["--key", k]);
        }
        args.extend_from_slice(extra);
        self.run(&args)
    }

    fn copy_of_bundle(&self, name: &str) -> (PathBuf, Vec<u8>) {
        let bytes = fs::read(&self.bundle).unwrap();
        let path = self.dir.join(name);
        fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// Offset of the release tarball inside a bundle: after the manifest
/// member's header and padded data, and the tarball member's header.
fn tarball_offset(bundle: &[u8]) -> usize {
    let size = usize::from_str_radix(
        std::str::from_utf8(&bundle[124..135])
            .unwrap()
            .trim_matches(char::from(0))
            .trim(),
        8,
    )
    .unwrap();
    512 + size.div_ceil(512) * 512 + 512
}

#[test]
fn round_trip_with_two_of_three_threshold() {
    let f = Fixture::new();
    assert_eq!(mode(&f.dir.join("keys/a.key")), 0o600);
    assert_eq!(mode(&f.dir.join("keys/a.pub")), 0o644);
    assert_eq!(mode(&f.dir.join("keys")), 0o700);
    let secret = fs::read_to_string(f.dir.join("keys/a.key")).unwrap();
    let secret_hex: serde_json::Value = serde_json::from_str(&secret).unwrap();
    let secret_hex = secret_hex["secret_key"].as_str().unwrap().to_string();

    let out = f.verify("good.bundle", &["--installed", "1.0.0"]);
    out.ok();
    assert!(
        out.stdout.contains("release     thermo 1.1.0"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("hot from 1.0.0"), "{}", out.stdout);
    assert!(!out.stdout.contains(&secret_hex) && !out.stderr.contains(&secret_hex));

    let out = f.verify("good.bundle", &["--json"]);
    out.ok();
    let v: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["manifest"]["release"]["version"], "1.1.0");
    assert_eq!(v["manifest"]["erts"], "13.1.5");
    assert_eq!(v["manifest"]["upgrade_from"][0], "1.0.0");
    assert_eq!(v["signed_by"].as_array().unwrap().len(), 2);
    // The tarball is stored indexed: recompressed per unit, still an
    // ordinary .tar.gz holding the same entries as the one rebar3 made.
    let size = beamup::bundle::Bundle::open(&f.dir.join("good.bundle"))
        .unwrap()
        .tarball_size();
    assert_eq!(v["manifest"]["tarball"]["size"], size);
    let inner = f.dir.join("inner.tar.gz");
    let listing = |tgz: &Path| {
        let out = Command::new("tar").arg("-tzvf").arg(tgz).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let out = Command::new("tar")
        .args(["-xOf", "good.bundle", "release.tar.gz"])
        .current_dir(&f.dir)
        .output()
        .unwrap();
    fs::write(&inner, out.stdout).unwrap();
    assert_eq!(listing(&inner), listing(&f.release));
    assert_eq!(
        v["manifest"]["tarball"]["chunk_count"],
        size.div_ceil(65536)
    );

    // With --keep-tarball the release comes back out byte for byte.
    f.bundle("kept.bundle", &["a", "b"], &["--keep-tarball"])
        .ok();
    let x = Command::new("tar")
        .args(["-xOf", "kept.bundle", "release.tar.gz"])
        .current_dir(&f.dir)
        .output()
        .unwrap();
    assert!(x.status.success());
    assert_eq!(x.stdout, fs::read(&f.release).unwrap());
    f.verify("kept.bundle", &[]).ok();

    // Any two of the three keys meet the threshold.
    f.bundle("bc.bundle", &["b", "c"], &[]).ok();
    f.verify("bc.bundle", &[]).ok();
}

#[test]
fn keygen_refuses_to_overwrite() {
    let f = Fixture::new();
    let before = fs::read(f.dir.join("keys/a.key")).unwrap();
    f.run(&["keygen", "--out", "keys", "--name", "a"])
        .fails(exit::EXISTS as i32, "a.key: already exists");
    assert_eq!(fs::read(f.dir.join("keys/a.key")).unwrap(), before);
}

#[test]
fn secret_key_readable_by_others_is_refused() {
    let f = Fixture::new();
    fs::set_permissions(f.dir.join("keys/a.key"), fs::Permissions::from_mode(0o644)).unwrap();
    f.bundle("x.bundle", &["a", "b"], &[])
        .fails(exit::INVALID_KEY as i32, "chmod 600");
    assert!(!f.dir.join("x.bundle").exists());
}

/// `beamup bundle` with `args`, the environment variables `env` set.
fn bundle_with_env(f: &Fixture, args: &[&str], env: &[(&str, &str)]) -> Run {
    let out = Command::new(crate::support::cli::bin())
        .arg("bundle")
        .args(args)
        .current_dir(&f.dir)
        .env_remove("RUST_LOG")
        .env("XDG_STATE_HOME", f.dir.join(".state"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

#[test]
fn keys_from_environment_variables_sign_without_a_key_file() {
    let f = Fixture::new();
    let a = fs::read_to_string(f.dir.join("keys/a.key")).unwrap();
    let b = fs::read_to_string(f.dir.join("keys/b.key")).unwrap();
    // One key from a file and one from the environment meet the threshold
    // of two, as two from the environment do.
    let args = ["--release", "thermo-1.1.0.tar.gz", "--key-env", "KEY_B"];
    let mut mixed = args.to_vec();
    mixed.extend(["--key", "keys/a.key", "--out", "mixed.bundle"]);
    bundle_with_env(&f, &mixed, &[("KEY_B", &b)]).ok();
    f.verify("mixed.bundle", &[]).ok();
    let mut both = args.to_vec();
    both.extend(["--key-env", "KEY_A", "--out", "env.bundle"]);
    let run = bundle_with_env(&f, &both, &[("KEY_A", &a), ("KEY_B", &b)]);
    run.ok();
    assert!(!run.stdout.contains(&a[40..80]), "{}", run.stdout);
    f.verify("env.bundle", &[]).ok();
}

#[test]
fn a_bad_key_in_the_environment_is_refused_without_showing_it() {
    let f = Fixture::new();
    let a = fs::read_to_string(f.dir.join("keys/a.key")).unwrap();
    let secret: serde_json::Value = serde_json::from_str(&a).unwrap();
    let secret = secret["secret_key"].as_str().unwrap();
    let out = ["--release", "thermo-1.1.0.tar.gz", "--out", "x.bundle"];
    let with = |var_args: &[&str], env: &[(&str, &str)]| {
        let mut args = out.to_vec();
        args.extend(var_args);
        bundle_with_env(&f, &args, env)
    };
    let cut = a.replace(secret, &secret[2..]);
    let public = fs::read_to_string(f.dir.join("keys/a.pub")).unwrap();
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[],
            "environment variable K: not a usable key file: is not set",
        ),
        (
            &[("K", " \n")],
            "environment variable K: not a usable key file: is empty",
        ),
        (&[("K", &cut)], "secret_key must be 32 hex-encoded bytes"),
        (&[("K", &public)], "this is a public key"),
    ];
    for (env, needle) in cases {
        let run = with(&["--key-env", "K"], env);
        run.fails(exit::INVALID_KEY as i32, needle);
        assert!(!run.stderr.contains(&secret[2..30]), "{}", run.stderr);
        assert!(!f.dir.join("x.bundle").exists());
    }
}

#[test]
fn the_tarball_inside_a_bundle_bundles_again() {
    // One gzip member per unit, as devices fetch it (the .rel is not in the
    // first member): what a pipeline takes from its serve directory as the
    // previous release.
    let f = Fixture::new();
    let thermo = crate::support::otp::releases().tarball("1.1.0");
    let first = [
        "bundle",
        "--release",
        thermo.to_str().unwrap(),
        "--key",
        "keys/a.key",
        "--key",
        "keys/b.key",
        "--out",
        "thermo.bundle",
    ];
    f.run(&first).ok();
    let st = Command::new("tar")
        .args(["-xf", "thermo.bundle", "release.tar.gz"])
        .current_dir(&f.dir)
        .status()
        .unwrap();
    assert!(st.success());
    let mut again = first;
    again[2] = "release.tar.gz";
    again[8] = "again.bundle";
    let run = f.run(&again);
    run.ok();
    assert!(
        run.stdout.contains("release     thermo 1.1.0"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("upgrade     hot from 1.0.0"),
        "{}",
        run.stdout
    );
    f.verify("again.bundle", &[]).ok();
}

#[test]
fn too_few_signatures() {
    let f = Fixture::new();
    f.bundle("one.bundle", &["a"], &[]).ok();
    f.verify("one.bundle", &[]).fails(
        exit::THRESHOLD as i32,
        "1 valid signature(s), the trust root requires 2",
    );
}

#[test]
fn unknown_key() {
    let f = Fixture::new();
    f.bundle("d.bundle", &["d"], &[]).ok();
    let id = fs::read_to_string(f.dir.join("keys/d.pub")).unwrap();
    let id: serde_json::Value = serde_json::from_str(&id).unwrap();
    f.verify("d.bundle", &[]).fails(
        exit::UNKNOWN_KEY as i32,
        &format!(
            "signed only by keys this device does not trust ({})",
            id["keyid"].as_str().unwrap()
        ),
    );
}

#[test]
fn rotation_revokes_old_keys_and_trusts_new_ones() {
    let f = Fixture::new();
    // New root: b, c, d with threshold 2, signed by b and c (2 of the old
    // keys and 2 of the new ones).
    f.run(&[
        "root",
        "rotate",
        "--root",
        "root.json",
        "--key",
        "keys/b.pub",
        "--key",
        "keys/c.pub",
        "--key",
        "keys/d.pub",
        "--threshold",
        "2",
        "--sign",
        "keys/b.key",
        "--sign",
        "keys/c.key",
        "--out",
        "root2.json",
    ])
    .ok();
    let out = f.run(&["root", "verify", "root2.json", "--trusted", "root.json"]);
    out.ok();
    assert!(out.stdout.contains("version 1 -> 2"), "{}", out.stdout);

    // c + d verify under the new root; a is revoked there.
    f.bundle("cd.bundle", &["c", "d"], &[]).ok();
    f.run(&["verify", "cd.bundle", "--root", "root2.json"]).ok();
    f.run(&["verify", "cd.bundle", "--root", "root.json"])
        .fails(exit::THRESHOLD as i32, "1 valid signature(s)");
    let a_id: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(f.dir.join("keys/a.pub")).unwrap()).unwrap();
    f.run(&["verify", "good.bundle", "--root", "root2.json"])
        .fails(
            exit::REVOKED_KEY as i32,
            &format!("signed by revoked key {}", a_id["keyid"].as_str().unwrap()),
        );

    // A rotation the current keys did not sign is refused, both when made
    // and when checked.
    f.run(&[
        "root",
        "rotate",
        "--root",
        "root.json",
        "--key",
        "keys/d.pub",
        "--threshold",
        "1",
        "--sign",
        "keys/d.key",
        "--out",
        "evil.json",
    ])
    .fails(exit::UNKNOWN_KEY as i32, "by the current root's keys");
    assert!(!f.dir.join("evil.json").exists());
    f.run(&[
        "root",
        "init",
        "--key",
        "keys/d.pub",
        "--threshold",
        "1",
        "--sign",
        "keys/d.key",
        "--out",
        "d1.json",
    ])
    .ok();
    f.run(&[
        "root",
        "rotate",
        "--root",
        "d1.json",
        "--key",
        "keys/d.pub",
        "--threshold",
        "1",
        "--sign",
        "keys/d.key",
        "--out",
        "d2.json",
    ])
    .ok();
    f.run(&["root", "verify", "d2.json", "--trusted", "root.json"])
        .fails(exit::UNKNOWN_KEY as i32, "does not trust");
    // Skipping a version is refused.
    f.run(&["root", "verify", "d2.json", "--trusted", "root2.json"])
        .fails(exit::INVALID_ROOT as i32, "rotate one version at a time");
    // A root needs its own threshold of signatures.
    f.run(&[
        "root",
        "init",
        "--key",
        "keys/a.pub",
        "--key",
        "keys/b.pub",
        "--threshold",
        "2",
        "--sign",
        "keys/a.key",
        "--out",
        "weak.json",
    ])
    .fails(exit::THRESHOLD as i32, "requires 2");
}

#[test]
fn tampered_tarball() {
    let f = Fixture::new();
    let (path, mut bytes) = f.copy_of_bundle("tampered.bundle");
    let at = tarball_offset(&bytes) + 70_000; // inside chunk 1
    bytes[at] ^= 0x01;
    fs::write(&path, &bytes).unwrap();
    f.verify("tampered.bundle", &[]).fails(
        exit::TARBALL_MISMATCH as i32,
        "does not match the signed manifest: chunk 1 (bytes 65536..131072) has the wrong SHA-256",
    );
    // verify never writes: the file is as it was.
    assert_eq!(fs::read(&path).unwrap(), bytes);
}

#[test]
fn tampered_manifest() {
    let f = Fixture::new();
    let (path, bytes) = f.copy_of_bundle("tampered.bundle");
    let text = String::from_utf8_lossy(&bytes[..tarball_offset(&bytes)]).into_owned();
    let i = text
        .find("\"allow_downgrade\": false")
        .expect("manifest field");
    let mut bytes = bytes;
    // Same length, so the container stays intact: only the signature can tell.
    bytes[i..i + 24].copy_from_slice(b"\"allow_downgrade\": true ");
    fs::write(&path, &bytes).unwrap();
    f.verify("tampered.bundle", &[]).fails(
        exit::BAD_SIGNATURE as i32,
        "does not verify; it was altered after signing",
    );
}

#[test]
fn expired_bundle() {
    let f = Fixture::new();
    f.bundle("short.bundle", &["a", "b"], &["--expires", "1h"])
        .ok();
    f.verify("short.bundle", &[]).ok();
    let later = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + std::time::Duration::from_secs(2 * 3600),
    )
    .to_string();
    f.verify("short.bundle", &["--at", &later])
        .fails(exit::EXPIRED as i32, "expired at");
}

#[test]
fn downgrade_is_refused_unless_signed_as_allowed() {
    let f = Fixture::new();
    f.verify("good.bundle", &["--installed", "1.1.0"]).fails(
        exit::DOWNGRADE as i32,
        "release 1.1.0 is not newer than the installed release 1.1.0",
    );
    f.verify("good.bundle", &["--installed", "1.10.0"])
        .fails(exit::DOWNGRADE as i32, "not newer");
    f.bundle("down.bundle", &["a", "b"], &["--allow-downgrade"])
        .ok();
    f.verify("down.bundle", &["--installed", "2.0.0"]).ok();
}

#[test]
fn replayed_sequence() {
    let f = Fixture::new();
    f.bundle("seq.bundle", &["a", "b"], &["--sequence", "5"])
        .ok();
    f.verify("seq.bundle", &["--last-sequence", "4"]).ok();
    f.verify("seq.bundle", &["--last-sequence", "5"]).fails(
        exit::REPLAYED as i32,
        "sequence number 5 is not greater than the last accepted 5",
    );
}

#[test]
fn wrong_target() {
    let f = Fixture::new();
    f.bundle(
        "t.bundle",
        &["a", "b"],
        &["--target", "device:gw-1", "--target", "group:canary"],
    )
    .ok();
    f.verify("t.bundle", &["--device", "gw-1"]).ok();
    f.verify("t.bundle", &["--device", "gw-2", "--group", "canary"])
        .ok();
    f.verify("t.bundle", &["--device", "gw-2", "--group", "eu"]).fails(
        exit::WRONG_TARGET as i32,
        "bundle targets device:gw-1, group:canary, which does not include this device (device:gw-2, group:eu)",
    );
    let run = f.bundle("x.bundle", &["a", "b"], &["--target", "planet:mars"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("must be any, fleet:NAME, group:NAME or device:ID"),
        "{}",
        run.stderr
    );
}

#[test]
fn truncated_bundles() {
    let f = Fixture::new();
    let bytes = fs::read(&f.bundle).unwrap();
    let off = tarball_offset(&bytes);
    for (name, cut) in [
        ("in-first-header", 100),
        ("in-manifest", 800),
        ("before-tarball", off - 512),
        ("in-tarball", off + 1000),
        (
            "last-byte",
            off + beamup::bundle::Bundle::open(&f.bundle)
                .unwrap()
                .tarball_size() as usize
                - 1,
        ),
    ] {
        let file = format!("cut-{name}.bundle");
        fs::write(f.dir.join(&file), &bytes[..cut]).unwrap();
        let run = f.verify(&file, &[]);
        run.fails(exit::TRUNCATED as i32, "truncated");
        assert!(
            run.stderr.contains("copy the bundle again"),
            "{}",
            run.stderr
        );
    }
}

#[test]
fn not_a_bundle() {
    let f = Fixture::new();
    fs::write(f.dir.join("empty"), b"").unwrap();
    fs::write(f.dir.join("json"), br#"{"signed":{},"signatures":[]}"#).unwrap();
    fs::write(f.dir.join("noise"), vec![0x5a; 4096]).unwrap();
    for (file, needle) in [
        ("empty", "the file is empty"),
        ("json", "29 bytes, too short to be a tar archive"),
        ("noise", "no valid tar header"),
        ("thermo-1.1.0.tar.gz", "no valid tar header"),
    ] {
        f.verify(file, &[]).fails(
            exit::NOT_A_BUNDLE as i32,
            &format!("not a beamup bundle: {needle}"),
        );
    }
    // A tar with other members is not a bundle either.
    let mut other = tar_header("etc/passwd", 4).to_vec();
    other.extend_from_slice(&[b'x'; 512]);
    other.extend_from_slice(&[0; 1024]);
    fs::write(f.dir.join("other.tar"), &other).unwrap();
    f.verify("other.tar", &[]).fails(
        exit::NOT_A_BUNDLE as i32,
        "expected member \"manifest.json\", found \"etc/passwd\"",
    );
    f.verify("missing.bundle", &[])
        .fails(exit::IO as i32, "missing.bundle: open");
}

#[test]
fn absurd_sizes_are_refused_without_allocating() {
    let f = Fixture::new();
    let cap = 256 << 20; // far below what any of these claims would need
    // The manifest member claims 1 TiB.
    let mut huge_manifest = tar_header("manifest.json", 1 << 40).to_vec();
    huge_manifest.extend_from_slice(&[b'{'; 512]);
    fs::write(f.dir.join("huge-manifest"), &huge_manifest).unwrap();
    beamup_with_memory_cap(
        &f.dir,
        cap,
        &["verify", "huge-manifest", "--root", "root.json"],
    )
    .fails(
        exit::TOO_LARGE as i32,
        "manifest: 1099511627776 bytes exceeds the limit",
    );

    // A correctly signed manifest claiming a 1 TB tarball: the signer is
    // trusted, the claim still is not.
    let keys: Vec<beamup::trust::keys::SecretKey> = ["a", "b"]
        .iter()
        .map(|k| {
            beamup::trust::keys::SecretKey::load(&f.dir.join(format!("keys/{k}.key"))).unwrap()
        })
        .collect();
    let bundle = beamup::bundle::Bundle::open(&f.bundle).unwrap();
    let root = beamup::trust::root::Root::load(&f.dir.join("root.json")).unwrap();
    let (mut m, _) = bundle.verify_manifest(&root).unwrap();
    m.tarball.size = 1_000_000_000_000;
    m.tarball.chunk_size = 16 << 20;
    m.tarball.chunks = vec!["00".repeat(32); 1_000_000_000_000u64.div_ceil(16 << 20) as usize];
    let env =
        beamup::trust::signed::Envelope::sign(beamup::trust::signed::DocKind::Manifest, &m, &keys)
            .to_bytes();
    let mut forged = tar_header("manifest.json", env.len() as u64).to_vec();
    forged.extend_from_slice(&env);
    forged.resize(forged.len().div_ceil(512) * 512, 0);
    forged.extend_from_slice(&tar_header("release.tar.gz", 1_000_000_000_000));
    fs::write(f.dir.join("huge-tarball"), &forged).unwrap();
    // The tar header's claim alone is caught as truncation (the bytes are not there) ...
    beamup_with_memory_cap(
        &f.dir,
        cap,
        &["verify", "huge-tarball", "--root", "root.json"],
    )
    .fails(exit::TRUNCATED as i32, "needs 1000000000000 bytes");
    // ... and with the bytes "there" (a sparse file), as a size beyond the limit.
    let file = fs::OpenOptions::new()
        .write(true)
        .open(f.dir.join("huge-tarball"))
        .unwrap();
    file.set_len(forged.len() as u64 + 1_000_000_000_000)
        .unwrap();
    beamup_with_memory_cap(
        &f.dir,
        cap,
        &["verify", "huge-tarball", "--root", "root.json"],
    )
    .fails(
        exit::TOO_LARGE as i32,
        "1000000000000 bytes exceeds the limit",
    );
}

#[test]
fn bundle_refuses_what_is_not_a_release_and_writes_nothing() {
    let f = Fixture::new();
    fs::write(f.dir.join("junk.tar.gz"), b"not gzip at all").unwrap();
    f.run(&[
        "bundle",
        "--release",
        "junk.tar.gz",
        "--key",
        "keys/a.key",
        "--out",
        "j.bundle",
    ])
    .fails(
        exit::INVALID_RELEASE as i32,
        "not a gzip-compressed tar archive",
    );
    assert!(!f.dir.join("j.bundle").exists());
    let before = fs::read(&f.bundle).unwrap();
    f.bundle("good.bundle", &["a", "b"], &[])
        .fails(exit::EXISTS as i32, "good.bundle: already exists");
    assert_eq!(fs::read(&f.bundle).unwrap(), before);
    // No stray temporary files either.
    let stray: Vec<_> = fs::read_dir(&f.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

/// Bundle time and the device apply one rule set: every hostile tarball
/// a device refuses, `beamup bundle` refuses too, indexed and with
/// `--keep-tarball`, naming the entry and the rule in the device's words,
/// and writes no bundle. Each case is also unpacked (signed by hand, as a
/// compromised build server could) to show the device refuses it alike.
#[test]
fn bundle_refuses_what_a_device_refuses_case_by_case() {
    use crate::install::{Entry, hostile_cases, hostile_tarball, signed_bundle_of};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    crate::support::device::keys_and_root(dir);
    let mut cases = hostile_cases("lib/thermo-1.1.0/../../../x", "/tmp/beamup-bundle-escaped");
    cases.extend([
        (
            "absolute-symlink",
            vec![Entry::Symlink("lib/thermo-1.1.0/priv", "/etc")],
            "symlink lib/thermo-1.1.0/priv -> /etc points outside the release (absolute target)",
        ),
        (
            "same-file-twice",
            vec![
                Entry::File("lib/thermo-1.1.0/priv/x", b"1".to_vec()),
                Entry::File("lib/thermo-1.1.0/priv/x", b"2".to_vec()),
            ],
            "lib/thermo-1.1.0/priv/x appears twice",
        ),
        (
            "beneath-a-file",
            vec![
                Entry::File("lib/thermo-1.1.0/priv/x", b"1".to_vec()),
                Entry::File("lib/thermo-1.1.0/priv/x/y", b"2".to_vec()),
            ],
            "would be written beneath the file lib/thermo-1.1.0/priv/x",
        ),
        (
            // Linked elsewhere, the symlink's relative target would resolve
            // outside the release.
            "hardlink-to-symlink",
            vec![
                Entry::Symlink("lib/thermo-1.1.0/priv/a/b", "../../../../bin"),
                Entry::Hardlink("lib/thermo-1.1.0/b", "lib/thermo-1.1.0/priv/a/b"),
            ],
            "hard link lib/thermo-1.1.0/b -> lib/thermo-1.1.0/priv/a/b points to a symlink",
        ),
    ]);
    for (name, entries, needle) in cases {
        let tarball = hostile_tarball(&entries);
        let release = format!("{name}.tar.gz");
        fs::write(dir.join(&release), &tarball).unwrap();
        for extra in [&[][..], &["--keep-tarball"][..]] {
            let out = format!("{name}.bundle");
            let mut args = vec!["bundle", "--release", &release, "--key", "keys/k.key"];
            args.extend(["--out", &out]);
            args.extend(extra);
            let run = beamup(dir, &args);
            run.fails(exit::UNSAFE_TARBALL as i32, needle);
            assert!(
                run.stderr
                    .contains(&format!("{release}: release tarball refused"))
                    && run
                        .stderr
                        .contains("so it was not signed (rebuild the release"),
                "{name} {extra:?}: {}",
                run.stderr
            );
            assert!(!dir.join(&out).exists(), "{name} {extra:?}: bundle written");
        }
        let signed = signed_bundle_of(dir, &format!("{name}-signed.bundle"), &tarball, 1 << 20);
        let run = beamup(
            dir,
            &[
                "unpack",
                signed.to_str().unwrap(),
                "--root",
                "root.json",
                "--out",
                "fresh",
            ],
        );
        run.fails(exit::UNSAFE_TARBALL as i32, needle);
        assert!(!dir.join("fresh").exists(), "{name}: unpack left files");
    }
    assert!(!Path::new("/tmp/beamup-bundle-escaped").exists());
}

/// `beamup bundle` with `XDG_STATE_HOME` in `state`, printing its manifest.
fn bundle_in(f: &Fixture, state: &Path, out: &str, extra: &[&str]) -> Run {
    let output = Command::new(crate::support::cli::bin())
        .args([
            "bundle",
            "--release",
            "thermo-1.1.0.tar.gz",
            "--key",
            "keys/a.key",
        ])
        .args(["--key", "keys/b.key", "--out", out])
        .args(extra)
        .current_dir(&f.dir)
        .env("XDG_STATE_HOME", state)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

fn sequence_of(run: &Run) -> u64 {
    run.ok();
    run.stdout
        .lines()
        .find_map(|l| l.strip_prefix("sequence    "))
        .unwrap_or_else(|| panic!("no sequence in {}", run.stdout))
        .parse()
        .unwrap()
}

/// Bundles made back to back (a CI job bundling several versions in one
/// second), also concurrently, get distinct, increasing default sequences,
/// above the seconds the old default used and exact in JSON; a device that
/// committed one accepts the next. `--sequence` still wins.
#[test]
fn default_sequences_never_collide_and_keep_growing() {
    let f = Fixture::new();
    let state = f.dir.join("state");
    let mut seqs: Vec<u64> = (0..4)
        .map(|i| sequence_of(&bundle_in(&f, &state, &format!("s{i}.bundle"), &[])))
        .collect();
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(seqs[0] > secs * 1000, "{seqs:?}");
    assert!(*seqs.last().unwrap() < 1 << 53, "{seqs:?}");
    // Concurrent runs of one user: distinct, all above the earlier ones.
    let concurrent: Vec<u64> = std::thread::scope(|s| {
        let f = &f;
        let state = &state;
        let runs: Vec<_> = (0..3)
            .map(|i| s.spawn(move || bundle_in(f, state, &format!("c{i}.bundle"), &[])))
            .collect();
        runs.into_iter()
            .map(|r| sequence_of(&r.join().unwrap()))
            .collect()
    });
    let mut all = concurrent.clone();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 3, "{concurrent:?}");
    assert!(
        all[0] > *seqs.last().unwrap(),
        "{seqs:?} then {concurrent:?}"
    );
    seqs.extend(all);

    // The manifest carries it exactly, and a device whose last committed
    // sequence is one bundle's accepts the next (and refuses it replayed).
    let run = f.verify("s1.bundle", &["--json"]);
    run.ok();
    let v: serde_json::Value = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(v["manifest"]["sequence"].as_u64(), Some(seqs[1]));
    f.verify("s1.bundle", &["--last-sequence", &seqs[0].to_string()])
        .ok();
    f.verify("s1.bundle", &["--last-sequence", &seqs[1].to_string()])
        .fails(
            exit::REPLAYED as i32,
            "is not greater than the last accepted",
        );

    // An explicit sequence wins, and is bounded to what JSON reads exactly.
    assert_eq!(
        sequence_of(&bundle_in(&f, &state, "x.bundle", &["--sequence", "7"])),
        7
    );
    let run = bundle_in(&f, &state, "y.bundle", &["--sequence", "9007199254740992"]);
    assert_eq!(run.code, exit::USAGE as i32, "{}", run.stderr);
    let next = sequence_of(&bundle_in(&f, &state, "z.bundle", &[]));
    assert!(next > *seqs.last().unwrap(), "{next} after {seqs:?}");
}
