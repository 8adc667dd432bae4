//! `beamup relup`: relups and upgrade tarballs for mix and relx release
//! directories, checked by what release_handler does with them.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::support::cli::beamup;
use crate::support::otp::{Flavor, TestNode, releases_for};

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// Extracts the members under `prefixes` of a tarball into `root`, as an
/// installer stages a new version beside the running one.
fn extract_parts(tarball: &Path, root: &Path, prefixes: &[&str]) {
    let file = fs::File::open(tarball).unwrap();
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        if prefixes.iter().any(|p| path.starts_with(p)) {
            entry.unpack_in(root).unwrap();
        }
    }
}

#[test]
fn a_mix_relup_hot_upgrades_a_running_thermex_node() {
    let work = tempfile::tempdir().unwrap();
    let rel = work.path().join("rel");
    copy_dir(&releases_for(Flavor::Mix).rel_dir(), &rel);
    fs::remove_file(rel.join("releases/1.1.0/relup")).unwrap();
    let out = work.path().join("thermex-1.1.0.tar.gz");
    let run = beamup(
        work.path(),
        &[
            "relup",
            "--release-dir",
            rel.to_str().unwrap(),
            "--from",
            "1.0.0",
            "--to",
            "1.1.0",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    run.ok();
    assert!(
        run.stdout.contains("changed     thermex 1.0.0 -> 1.1.0"),
        "{}",
        run.stdout
    );
    assert!(rel.join("releases/1.1.0/relup").is_file());
    let info = beamup::release::metadata::inspect(&out).unwrap();
    assert_eq!(info.upgrade_from, ["1.0.0"]);
    assert_eq!(info.downgrade_to, ["1.0.0"]);

    let node = TestNode::start_flavor(Flavor::Mix);
    node.incr().unwrap();
    node.incr().unwrap();
    extract_parts(
        &out,
        node.root(),
        &["lib/thermex-1.1.0/", "releases/1.1.0/"],
    );
    // release_handler driven directly; paths come from the node itself.
    let code = r#"rel = Path.join([List.to_string(:code.root_dir()), "releases", "1.1.0", "thermex.rel"]) |> String.to_charlist(); {:ok, '1.1.0'} = :release_handler.set_unpacked(rel, []); {:ok, '1.0.0', _} = :release_handler.install_release('1.1.0'); IO.puts("installed")"#;
    let rpc = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} rpc \"$0\"",
            node.start_command().trim_end_matches(" daemon")
        ))
        .arg(code)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&rpc.stdout).contains("installed"),
        "{rpc:?}"
    );
    let (status, health) = node.health().unwrap();
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["version"], "1.1.0");
    assert_eq!(health["counter"], 2, "the counter survives the hot upgrade");
    assert_eq!(health["os_pid"], node.os_pid().to_string(), "same VM");
    assert_eq!(node.state().unwrap()["migrated_from"], "1.0.0");
}

#[test]
fn a_missing_appup_is_named_with_its_app_versions_and_place() {
    let work = tempfile::tempdir().unwrap();
    let rel = work.path().join("rel");
    copy_dir(&releases_for(Flavor::Mix).rel_dir(), &rel);
    let appup = rel.join("lib/thermex-1.1.0/ebin/thermex.appup");
    fs::remove_file(&appup).unwrap();
    let out = work.path().join("thermex-1.1.0.tar.gz");
    beamup(
        work.path(),
        &[
            "relup",
            "--release-dir",
            rel.to_str().unwrap(),
            "--from",
            "1.0.0",
            "--to",
            "1.1.0",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .fails(32, "application thermex changed from 1.0.0 to 1.1.0")
    .fails(32, appup.to_str().unwrap());
    assert!(!out.exists(), "no tarball after a failure");
}

#[test]
fn an_existing_output_is_not_overwritten_unless_asked() {
    let work = tempfile::tempdir().unwrap();
    let rel = work.path().join("rel");
    copy_dir(&releases_for(Flavor::Mix).rel_dir(), &rel);
    let out = work.path().join("thermex-1.2.0.tar.gz");
    fs::write(&out, b"keep me").unwrap();
    let args = [
        "relup",
        "--release-dir",
        rel.to_str().unwrap(),
        "--from",
        "1.0.0",
        "--to",
        "1.2.0",
        "--out",
        out.to_str().unwrap(),
    ];
    beamup(work.path(), &args).fails(5, "already exists");
    assert_eq!(fs::read(&out).unwrap(), b"keep me");
    let mut with = args.to_vec();
    with.push("--overwrite");
    beamup(work.path(), &with).ok();
    assert_eq!(
        beamup::release::metadata::inspect(&out).unwrap().version,
        "1.2.0"
    );
}

/// A relx release directory with 1.0.0 and 1.1.0 built into it, as
/// `rebar3 release` leaves it: the base root plus the 1.1.0 tarball's
/// files, and the appup in the built ebin.
#[test]
fn rebar3_output_gets_a_relup_and_a_tarball_as_rebar3_tar_makes() {
    let work = tempfile::tempdir().unwrap();
    let rel = work.path().join("thermo");
    let releases = releases_for(Flavor::Rebar3);
    copy_dir(&releases.base_dir(), &rel);
    extract_parts(
        releases.tarball("1.1.0"),
        &rel,
        &["lib/thermo-1.1.0/", "releases/1.1.0/", "bin/thermo-1.1.0"],
    );
    fs::remove_file(rel.join("releases/1.1.0/relup")).unwrap();
    let appup = fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otp/versions/1.1.0/ebin/thermo.appup"),
    )
    .unwrap()
    .replace("@VSN@", "1.1.0");
    fs::write(rel.join("lib/thermo-1.1.0/ebin/thermo.appup"), appup).unwrap();

    let out = work.path().join("thermo-1.1.0.tar.gz");
    beamup(
        work.path(),
        &[
            "relup",
            "--release-dir",
            rel.to_str().unwrap(),
            "--from",
            "1.0.0",
            "--to",
            "1.1.0",
            "--out",
            out.to_str().unwrap(),
        ],
    )
    .ok();
    let info = beamup::release::metadata::inspect(&out).unwrap();
    assert_eq!(
        (info.name.as_str(), info.version.as_str()),
        ("thermo", "1.1.0")
    );
    assert_eq!(info.upgrade_from, ["1.0.0"]);
    assert_eq!(info.downgrade_to, ["1.0.0"]);

    let unpacked = work.path().join("unpacked");
    fs::create_dir(&unpacked).unwrap();
    let st = Command::new("tar")
        .arg("xzf")
        .arg(&out)
        .arg("-C")
        .arg(&unpacked)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(
        fs::read(unpacked.join("bin/thermo")).unwrap(),
        fs::read(unpacked.join("bin/thermo-1.1.0")).unwrap(),
        "bin/thermo must boot 1.1.0, as rebar3 tar makes it"
    );
    assert!(
        fs::read_to_string(unpacked.join("releases/start_erl.data"))
            .unwrap()
            .ends_with(" 1.1.0")
    );
    let releases_file = fs::read_to_string(unpacked.join("releases/RELEASES")).unwrap();
    assert!(
        releases_file.contains(r#"{release,"thermo","1.1.0""#),
        "{releases_file}"
    );
    assert!(unpacked.join("releases/thermo.rel").is_file());
    assert!(
        unpacked
            .join("lib/thermo-1.1.0/ebin/thermo_state.beam")
            .is_file()
    );
}
