//! `beamup unpack`: the real binary unpacking real release bundles into
//! directories, with no node: provisioning (the result must boot),
//! staging beside an installed release (only what is new is written), and
//! refusals that leave nothing behind.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use beamup::error::exit;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::install::{
    Entry, hostile_cases, hostile_indexed_tarball, hostile_tarball, signed_bundle_of,
    signed_indexed_bundle_of,
};
use crate::support::cli::{Run, beamup, sign_bundle};
use crate::support::device::{Device, keys_and_root};
use crate::support::otp::{Flavor, TestNode, releases, releases_for};

/// A signer's directory: one key (`keys/k.key`), a trust root (`root.json`)
/// and bundles of the built thermo releases.
struct Signer {
    dir: tempfile::TempDir,
}

impl Signer {
    fn new() -> Signer {
        let dir = tempfile::Builder::new()
            .prefix("beamup-unpack-")
            .tempdir()
            .unwrap();
        keys_and_root(dir.path());
        Signer { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A bundle of a built thermo version, with extra `beamup bundle` args.
    fn bundle(&self, vsn: &str, name: &str, extra: &[&str]) -> PathBuf {
        let out = self.path().join(name);
        let tarball = releases().tarball(vsn).to_str().unwrap().to_string();
        let mut args = vec!["bundle", "--release", &tarball];
        if !extra.contains(&"--key") {
            args.extend(["--key", "keys/k.key"]);
        }
        args.extend(extra);
        args.extend(["--out", out.to_str().unwrap()]);
        beamup(self.path(), &args).ok();
        out
    }

    /// `beamup unpack BUNDLE --root root.json --out DIR --json EXTRA...`
    fn unpack(&self, bundle: &Path, dir: &Path, extra: &[&str]) -> (Run, Value) {
        let mut args = vec![
            "unpack",
            bundle.to_str().unwrap(),
            "--root",
            "root.json",
            "--out",
            dir.to_str().unwrap(),
            "--json",
        ];
        args.extend(extra);
        let run = beamup(self.path(), &args);
        let doc = serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
            panic!("stdout is not JSON ({e}):\n{}\n{}", run.stdout, run.stderr)
        });
        (run, doc)
    }
}

/// A copy of `bundle` at `out` with one byte flipped in the middle of the
/// tarball part of `unit` (an indexed bundle), which an unpack that creates
/// `unit` must read.
fn flip_in_part(s: &Signer, bundle: &Path, unit: &str, out: &Path) {
    let run = beamup(
        s.path(),
        &[
            "verify",
            bundle.to_str().unwrap(),
            "--root",
            "root.json",
            "--json",
        ],
    );
    run.ok();
    let doc: Value = serde_json::from_str(&run.stdout).unwrap();
    let part = doc["manifest"]["tarball"]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["unit"] == unit)
        .unwrap_or_else(|| panic!("no part for {unit}: {doc:#}"));
    let mut bytes = fs::read(bundle).unwrap();
    let manifest_size =
        u64::from_str_radix(std::str::from_utf8(&bytes[124..135]).unwrap(), 8).unwrap();
    let tarball_offset = 512 + manifest_size.div_ceil(512) * 512 + 512;
    let at = tarball_offset + part["offset"].as_u64().unwrap() + part["size"].as_u64().unwrap() / 2;
    bytes[at as usize] ^= 0x20;
    fs::write(out, bytes).unwrap();
}

/// Everything about every entry under `root` that a write would change:
/// kind, size, mode, inode, mtime and content.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = fs::symlink_metadata(&p).unwrap();
            let content = if m.is_file() {
                hex::encode(Sha256::digest(fs::read(&p).unwrap()))
            } else if m.is_symlink() {
                fs::read_link(&p).unwrap().display().to_string()
            } else {
                String::new()
            };
            // A directory's size and mtime change with its entries.
            let facts = if m.is_dir() {
                format!("{:o} ino {}", m.mode(), m.ino())
            } else {
                format!(
                    "{:o} {} ino {} mtime {}.{} {content}",
                    m.mode(),
                    m.len(),
                    m.ino(),
                    m.mtime(),
                    m.mtime_nsec()
                )
            };
            out.insert(p.strip_prefix(root).unwrap().to_path_buf(), facts);
            if m.is_dir() {
                walk(root, &p, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Paths, kinds, executable bits and contents (not inodes or times): what
/// two deployments of the same release must share.
fn contents(root: &Path) -> BTreeMap<PathBuf, String> {
    snapshot(root)
        .into_iter()
        .map(|(p, facts)| {
            let mut f = facts.split(' ');
            let mode = u32::from_str_radix(f.next().unwrap(), 8).unwrap();
            let kind = mode & 0o170000;
            let exec = kind != 0o040000 && mode & 0o111 != 0;
            let content = if kind == 0o040000 {
                ""
            } else {
                f.next_back().unwrap_or_default()
            };
            (p, format!("{kind:o} {exec} {content}"))
        })
        .collect()
}

/// Fails with the paths that differ, not with both whole trees.
#[track_caller]
fn assert_same(before: &BTreeMap<PathBuf, String>, after: &BTreeMap<PathBuf, String>, what: &str) {
    let changed: Vec<String> = before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .map(|p| match (before.contains_key(p), after.contains_key(p)) {
            (true, true) => format!("changed {}", p.display()),
            (true, false) => format!("removed {}", p.display()),
            _ => format!("added {}", p.display()),
        })
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(changed.is_empty(), "{what}: {changed:#?}");
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

#[track_caller]
fn assert_refused(run: &Run, doc: &Value, code: u8, needle: &str) {
    assert_eq!(
        run.code,
        i32::from(code),
        "stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert_eq!(doc["ok"], false, "{doc:#}");
    assert_eq!(doc["error"]["exit_code"], code, "{doc:#}");
    let message = doc["error"]["message"].as_str().unwrap();
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
    assert!(run.stderr.contains(needle), "{}", run.stderr);
}

#[test]
fn provisioning_an_empty_directory_gives_a_release_that_boots() {
    let s = Signer::new();
    let bundle = s.bundle("1.0.0", "thermo-1.0.0.bundle", &[]);
    let mut report = Value::Null;
    let node = TestNode::start_with(|root| {
        // A mount point of a fresh file system: empty but for lost+found.
        fs::create_dir_all(root.join("lost+found")).unwrap();
        let (run, doc) = s.unpack(&bundle, root, &[]);
        run.ok();
        fs::remove_dir(root.join("lost+found")).unwrap();
        report = doc;
    });
    let (status, health) = node.health().unwrap();
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["version"], "1.0.0", "{health}");

    assert_eq!(report["ok"], true);
    assert_eq!(report["mode"], "provision");
    assert_eq!(report["manifest"]["release"]["version"], "1.0.0");
    let created = strings(&report["created"]);
    for unit in [
        "bin/thermo",
        "bin/thermo-1.0.0",
        "lib/kernel-8.5.3",
        "lib/thermo-1.0.0",
        "releases/1.0.0",
        "releases/RELEASES",
        "releases/start_erl.data",
    ] {
        assert!(
            created.iter().any(|c| c == unit),
            "{unit} not in {created:?}"
        );
    }
    assert!(
        created.iter().any(|c| c.starts_with("erts-")),
        "{created:?}"
    );
    assert!(strings(&report["present"]).is_empty(), "{report:#}");

    // Byte for byte (and mode for mode) what `tar -xzf` of the same tarball
    // gives, apart from what the running node wrote since.
    let mut got = contents(node.root());
    got.retain(|p, _| !p.starts_with("log") && p.file_name().is_none_or(|n| n != "vm.args"));
    let base = contents(&releases().base_dir());
    let files = base.values().filter(|v| v.starts_with("100")).count();
    let mut want = base;
    want.retain(|p, _| p.file_name().is_none_or(|n| n != "vm.args"));
    assert_same(&want, &got, "provisioned vs tar -xzf");
    assert_eq!(report["files"].as_u64().unwrap(), files as u64);
}

/// A bundle of the tarball as it was built (not indexed): provisioning
/// reads it once for its units, once to unpack; the same tree results.
#[test]
fn provisioning_from_a_plain_tarball_gives_the_same_tree() {
    let s = Signer::new();
    let indexed = s.bundle("1.0.0", "indexed.bundle", &[]);
    let plain = s.bundle("1.0.0", "plain.bundle", &["--keep-tarball"]);
    let (a, b) = (s.path().join("a"), s.path().join("b"));
    let (run, doc) = s.unpack(&plain, &a, &[]);
    run.ok();
    assert!(
        doc["manifest"]["tarball"]["parts"]
            .as_array()
            .is_none_or(Vec::is_empty)
    );
    let (run, doc_indexed) = s.unpack(&indexed, &b, &[]);
    run.ok();
    assert_eq!(doc["created"], doc_indexed["created"]);
    assert_same(
        &contents(&releases().base_dir()),
        &contents(&a),
        "plain vs tar -xzf",
    );
    assert_same(&contents(&a), &contents(&b), "plain vs indexed");
}

#[test]
fn human_output_names_what_was_written() {
    let s = Signer::new();
    let bundle = s.bundle("1.0.0", "thermo-1.0.0.bundle", &[]);
    let dir = s.path().join("opt/thermo");
    fs::create_dir(s.path().join("opt")).unwrap();
    let args = [
        "unpack",
        bundle.to_str().unwrap(),
        "--root",
        "root.json",
        "--out",
        "opt/thermo",
    ];
    let run = beamup(s.path(), &args);
    run.ok();
    assert!(run.stderr.is_empty(), "{}", run.stderr);
    let out = &run.stdout;
    assert!(
        out.starts_with("verified    thermo 1.0.0 (sequence "),
        "{out}"
    );
    assert!(out.contains("into opt/thermo (the whole release)"), "{out}");
    assert!(out.contains("\ncreated     releases/1.0.0/\n"), "{out}");
    assert!(out.contains("\ncreated     bin/thermo\n"), "{out}");
    assert!(
        out.contains("next        start it: opt/thermo/bin/thermo daemon"),
        "{out}"
    );
    assert!(dir.join("bin/thermo").is_file());
}

#[test]
fn staging_beside_an_installed_release_writes_only_what_is_new() {
    let s = Signer::new();
    let base = s.bundle("1.0.0", "thermo-1.0.0.bundle", &[]);
    let next = s.bundle("1.1.0", "thermo-1.1.0.bundle", &[]);
    let dir = s.path().join("thermo");
    s.unpack(&base, &dir, &[]).0.ok();
    let before = snapshot(&dir);

    let (run, doc) = s.unpack(&next, &dir, &[]);
    run.ok();
    assert_eq!(doc["mode"], "stage", "{doc:#}");
    assert_eq!(
        strings(&doc["created"]),
        ["bin/thermo-1.1.0", "lib/thermo-1.1.0", "releases/1.1.0"]
    );
    assert_eq!(
        strings(&doc["present"]),
        ["lib/kernel-8.5.3", "lib/sasl-4.2", "lib/stdlib-4.2"]
    );
    let after = snapshot(&dir);
    for (path, facts) in &before {
        assert_eq!(after.get(path), Some(facts), "{} changed", path.display());
    }
    let added: Vec<&PathBuf> = after.keys().filter(|p| !before.contains_key(*p)).collect();
    assert!(!added.is_empty());
    for p in &added {
        assert!(
            p.starts_with("bin/thermo-1.1.0")
                || p.starts_with("lib/thermo-1.1.0")
                || p.starts_with("releases/1.1.0"),
            "{} was written",
            p.display()
        );
    }
    // The new version's files are the tarball's.
    let listing = std::process::Command::new("tar")
        .arg("-tzf")
        .arg(releases().tarball("1.1.0"))
        .output()
        .unwrap();
    let listing = String::from_utf8(listing.stdout).unwrap();
    let new_files: Vec<&str> = listing
        .lines()
        .filter(|l| !l.ends_with('/'))
        .filter(|l| l.starts_with("lib/thermo-1.1.0/") || l.starts_with("releases/1.1.0/"))
        .collect();
    assert!(new_files.len() > 5, "{listing}");
    for f in new_files {
        assert!(dir.join(f).is_file(), "{f} missing");
    }

    // The same version again: it is there, nothing is written.
    let (run, doc) = s.unpack(&next, &dir, &[]);
    assert_refused(&run, &doc, exit::EXISTS, "releases/1.1.0: already exists");
    assert_same(&after, &snapshot(&dir), "unpacked again");
}

#[test]
fn a_staged_release_is_then_installed_by_the_engine() {
    let d = Device::new();
    let bundle = d.bundle("1.1.0");
    let root = d.node.root().to_str().unwrap().to_string();
    beamup(
        d.path(),
        &[
            "unpack",
            bundle.to_str().unwrap(),
            "--root",
            "root.json",
            "--out",
            &root,
        ],
    )
    .ok();
    // Staging made nothing run: the node is where it was.
    assert_eq!(d.version_and_counter().0, "1.0.0");
    let run = d.install(&bundle, &[]);
    run.ok();
    assert!(
        run.stdout.contains("committed thermo 1.1.0"),
        "{}",
        run.stdout
    );
    d.assert_settled_on("1.1.0", &[]);
}

#[test]
fn a_release_without_erts_provisions_with_a_note() {
    let s = Signer::new();
    let bundle = s.bundle("1.1.0", "thermo-1.1.0.bundle", &[]);
    let run = beamup(
        s.path(),
        &[
            "unpack",
            bundle.to_str().unwrap(),
            "--root",
            "root.json",
            "--out",
            "fresh",
        ],
    );
    run.ok();
    assert!(
        run.stdout.contains(
            "\nnote        the release has no ERTS: the device needs Erlang/OTP with ERTS 13.1.5\n"
        ),
        "{}",
        run.stdout
    );
    let dir = s.path().join("fresh");
    assert!(dir.join("bin/thermo-1.1.0").is_file());
    assert!(dir.join("releases/RELEASES").is_file());
    assert!(!fs::read_dir(&dir).unwrap().any(|e| {
        e.unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("erts-")
    }));
}

#[test]
fn what_is_neither_empty_nor_that_release_is_refused() {
    let s = Signer::new();
    let bundle = s.bundle("1.0.0", "thermo-1.0.0.bundle", &[]);
    let dir = s.path().join("other");
    fs::create_dir_all(dir.join("releases/1.0.0")).unwrap();
    fs::write(dir.join("releases/1.0.0/other.rel"), "{release,...}.").unwrap();
    fs::write(dir.join("notes.txt"), "mine").unwrap();
    let before = snapshot(&dir);
    let (run, doc) = s.unpack(&bundle, &dir, &[]);
    assert_refused(
        &run,
        &doc,
        exit::REFUSED,
        "is neither empty nor the root of a release thermo",
    );
    assert_same(&before, &snapshot(&dir), "a directory of something else");

    let file = s.path().join("a-file");
    fs::write(&file, "x").unwrap();
    let (run, doc) = s.unpack(&bundle, &file, &[]);
    assert_refused(&run, &doc, exit::EXISTS, "already exists");
    assert_eq!(fs::read(&file).unwrap(), b"x");
}

/// Every refusal, into a missing directory, an empty one and beside an
/// installed release: the exit code says why, and nothing is written.
#[test]
fn tampered_hostile_and_unauthorised_bundles_write_nothing() {
    let s = Signer::new();
    let p = s.path();
    let base = s.bundle("1.0.0", "thermo-1.0.0.bundle", &[]);
    let installed = p.join("installed");
    s.unpack(&base, &installed, &[]).0.ok();
    let empty = p.join("empty");
    fs::create_dir(&empty).unwrap();
    let missing = p.join("missing/thermo");

    // One byte of the release tarball flipped after signing: in a part
    // that staging and provisioning read, and (for a plain tarball, read
    // whole) anywhere.
    let good = s.bundle("1.1.0", "thermo-1.1.0.bundle", &[]);
    flip_in_part(&s, &good, "lib/thermo-1.1.0", &p.join("tampered.bundle"));
    let plain = s.bundle("1.1.0", "plain-1.1.0.bundle", &["--keep-tarball"]);
    let mut bytes = fs::read(&plain).unwrap();
    let at = bytes.len() - 1024 - 700;
    bytes[at] ^= 0x20;
    fs::write(p.join("tampered-plain.bundle"), &bytes).unwrap();

    // Signed by a key the root does not list.
    beamup(p, &["keygen", "--out", "keys", "--name", "stranger"]).ok();
    let stranger = s.bundle("1.1.0", "stranger.bundle", &["--key", "keys/stranger.key"]);
    // For another device than the one named.
    let elsewhere = s.bundle("1.1.0", "elsewhere.bundle", &["--target", "device:gw-2"]);
    // Expired on arrival.
    let expired = s.bundle("1.1.0", "expired.bundle", &["--expires", "1s"]);
    std::thread::sleep(std::time::Duration::from_secs(2));

    let mut hostile = hostile_cases("lib/thermo-1.1.0/../../../x", "/tmp/beamup-unpack-escaped");
    hostile.push((
        "bomb",
        vec![Entry::File("lib/thermo-1.1.0/priv/zeros", vec![0; 2 << 20])],
        "unpacks to more than the 1048576 bytes",
    ));
    let mut cases: Vec<(PathBuf, u8, &str, &[&str])> = vec![
        (
            p.join("tampered.bundle"),
            exit::TARBALL_MISMATCH,
            "has the wrong SHA-256",
            &[],
        ),
        (
            p.join("tampered-plain.bundle"),
            exit::TARBALL_MISMATCH,
            "has the wrong SHA-256",
            &[],
        ),
        (stranger, exit::UNKNOWN_KEY, "does not trust", &[]),
        (
            elsewhere,
            exit::WRONG_TARGET,
            "does not include this device (device:gw-1",
            &["--device", "gw-1"],
        ),
        (expired, exit::EXPIRED, "expired at", &[]),
    ];
    for (name, entries, needle) in hostile {
        let tarball = hostile_tarball(&entries);
        let b = signed_bundle_of(p, &format!("{name}.bundle"), &tarball, 1 << 20);
        cases.push((b, exit::UNSAFE_TARBALL, needle, &[]));
        let (tarball, parts) = hostile_indexed_tarball(&entries);
        let b = signed_indexed_bundle_of(
            p,
            &format!("{name}-indexed.bundle"),
            &tarball,
            parts,
            1 << 20,
        );
        cases.push((b, exit::UNSAFE_TARBALL, needle, &[]));
    }

    let installed_before = snapshot(&installed);
    for (bundle, code, needle, extra) in &cases {
        for dir in [&installed, &empty, &missing] {
            let (run, doc) = s.unpack(bundle, dir, extra);
            let what = format!("{} into {}", bundle.display(), dir.display());
            assert_eq!(run.code, i32::from(*code), "{what}: {}", run.stderr);
            assert_refused(&run, &doc, *code, needle);
            assert_same(&installed_before, &snapshot(&installed), &what);
            assert_eq!(fs::read_dir(&empty).unwrap().count(), 0, "{what}");
            assert!(!p.join("missing").exists(), "{what}");
        }
    }
    // Provisioning from an indexed bundle reads every unit's part.
    let provision_tampered = p.join("tampered-1.0.0.bundle");
    flip_in_part(&s, &base, "erts-13.1.5", &provision_tampered);
    let (run, doc) = s.unpack(&provision_tampered, &missing, &[]);
    assert_refused(&run, &doc, exit::TARBALL_MISMATCH, "has the wrong SHA-256");
    assert!(!p.join("missing").exists());
    assert!(!Path::new("/tmp/beamup-unpack-escaped").exists());
    assert!(!p.join("x").exists());
}

/// A release tarball in `mix release`'s layout, written to `dir/name`: one
/// `bin/meter` for every version (no `bin/meter-VSN`), `releases/COOKIE`,
/// `releases/start_erl.data`, no `releases/RELEASES`.
fn mix_tarball(dir: &Path, name: &str, vsn: &str) -> PathBuf {
    let path = dir.join(name);
    let gz = flate2::write::GzEncoder::new(
        fs::File::create(&path).unwrap(),
        flate2::Compression::fast(),
    );
    let mut tar = tar::Builder::new(gz);
    let rel = format!(
        "{{release,{{\"meter\",\"{vsn}\"}},{{erts,\"13.1.5\"}},[{{kernel,\"8.5.3\"}},{{stdlib,\"4.2\"}},{{elixir,\"1.14.0\"}},{{meter,\"{vsn}\"}}]}}.\n"
    );
    let start_erl = format!("13.1.5 {vsn}");
    let files: Vec<(String, &[u8], u32)> = vec![
        ("bin/meter".into(), b"#!/bin/sh\n", 0o755),
        (format!("releases/{vsn}/meter.rel"), rel.as_bytes(), 0o644),
        (format!("releases/{vsn}/start.boot"), b"boot", 0o644),
        (format!("releases/{vsn}/env.sh"), b"#!/bin/sh\n", 0o755),
        ("releases/COOKIE".into(), b"cookie", 0o644),
        (
            "releases/start_erl.data".into(),
            start_erl.as_bytes(),
            0o644,
        ),
        ("lib/kernel-8.5.3/ebin/kernel.app".into(), b"k", 0o644),
        ("lib/stdlib-4.2/ebin/stdlib.app".into(), b"s", 0o644),
        ("lib/elixir-1.14.0/ebin/elixir.app".into(), b"e", 0o644),
        (format!("lib/meter-{vsn}/ebin/meter.app"), b"m", 0o644),
    ];
    for (p, data, mode) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        tar.append_data(&mut h, p, data).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
    path
}

/// A mix release has no `bin/REL-VSN`: `unpack` must not claim to have
/// created one, when provisioning or when staging beside an installed
/// version, in its human output or its JSON.
#[test]
fn unpack_of_a_mix_release_reports_only_what_it_created() {
    let s = Signer::new();
    let p = s.path();
    for vsn in ["0.1.0", "0.2.0"] {
        mix_tarball(p, &format!("meter-{vsn}.tar.gz"), vsn);
        sign_bundle(
            p,
            &p.join(format!("meter-{vsn}.tar.gz")),
            &p.join(format!("meter-{vsn}.bundle")),
            &[],
        );
    }
    let dir = p.join("meter");
    let (run, doc) = s.unpack(&p.join("meter-0.1.0.bundle"), &dir, &[]);
    run.ok();
    assert_eq!(doc["mode"], "provision", "{doc:#}");
    let created = strings(&doc["created"]);
    assert_eq!(
        created,
        [
            "bin/meter",
            "lib/elixir-1.14.0",
            "lib/kernel-8.5.3",
            "lib/meter-0.1.0",
            "lib/stdlib-4.2",
            "releases/0.1.0",
            "releases/COOKIE",
            "releases/RELEASES",
            "releases/start_erl.data",
        ]
    );
    // mix ships no RELEASES: the one written names the release's libraries.
    let releases = fs::read_to_string(dir.join("releases/RELEASES")).unwrap();
    assert!(
        releases.contains(r#"{release,"meter","0.1.0","#)
            && releases.contains("./lib/kernel-8.5.3"),
        "{releases}"
    );
    for c in &created {
        assert!(dir.join(c).symlink_metadata().is_ok(), "{c} does not exist");
    }

    // Staging 0.2.0 beside it, with the human output this time.
    let bundle = p.join("meter-0.2.0.bundle");
    let run = beamup(
        p,
        &[
            "unpack",
            bundle.to_str().unwrap(),
            "--root",
            "root.json",
            "--out",
            "meter",
        ],
    );
    run.ok();
    let created: Vec<&str> = run
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("created     "))
        .collect();
    assert_eq!(
        created,
        ["lib/meter-0.2.0/", "releases/0.2.0/"],
        "{}",
        run.stdout
    );
    assert!(!dir.join("bin/meter-0.2.0").exists());
    assert!(!run.stdout.contains("bin/meter-"), "{}", run.stdout);
}

/// A root provisioned from a real `mix release` bundle boots, and the
/// RELEASES written for it (mix ships none) is what release_handler reads:
/// the node lists its release with its libraries, not the empty entry it
/// makes up without one.
#[test]
fn a_provisioned_mix_root_boots_with_a_releases_file_release_handler_reads() {
    let s = Signer::new();
    let tarball = releases_for(Flavor::Mix).tarball("1.0.0");
    let bundle = s.path().join("thermex-1.0.0.bundle");
    sign_bundle(s.path(), tarball, &bundle, &[]);
    let mut report = Value::Null;
    let node = TestNode::start_flavor_with(Flavor::Mix, |root| {
        let (run, doc) = s.unpack(&bundle, root, &[]);
        run.ok();
        report = doc;
    });
    assert_eq!(node.health().unwrap().1["version"], "1.0.0");
    assert!(
        strings(&report["created"]).contains(&"releases/RELEASES".to_string()),
        "{report:#}"
    );
    let rpc = std::process::Command::new(node.root().join("bin/thermex"))
        .args(["rpc", ":release_handler.which_releases() |> IO.inspect()"])
        .envs(node.env())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&rpc.stdout);
    assert!(
        out.contains("~c\"kernel-8.5.3\"") || out.contains("'kernel-8.5.3'"),
        "which_releases: {out}\n{}",
        String::from_utf8_lossy(&rpc.stderr)
    );
}
