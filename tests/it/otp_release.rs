//! The test fixture itself: a node of the base release starts, serves its
//! endpoints, and leaves nothing running after it is dropped.

use std::panic;
use std::sync::{Arc, Mutex};

use crate::support::otp::{self, BASE_VSN, TestNode, UPGRADE_VSNS, pid_running};

#[test]
fn base_node_reports_health_and_counts() {
    let node = TestNode::start();

    let (status, health) = node.health().expect("GET /health");
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], BASE_VSN);
    assert_eq!(health["node"], node.node_name());
    assert_eq!(health["counter"], 0);
    assert_eq!(health["os_pid"], node.os_pid().to_string());

    assert_eq!(node.incr().expect("POST /incr")["counter"], 1);
    assert_eq!(node.incr().expect("POST /incr")["counter"], 2);
    assert_eq!(node.state().expect("GET /state")["counter"], 2);
    assert_eq!(node.health().expect("GET /health").1["counter"], 2);

    let beam = node.os_pid();
    let run_erl = node.run_erl_pid().expect("the BEAM runs under run_erl");
    let epmd = node.epmd_pid();
    assert_eq!(node.beam_pids(), vec![beam]);
    for pid in [beam, run_erl, epmd] {
        assert!(pid_running(pid), "pid {pid} should be running");
    }

    drop(node);
    for pid in [beam, run_erl, epmd] {
        assert!(!pid_running(pid), "pid {pid} still running after drop");
    }
}

#[test]
fn nodes_are_isolated_from_each_other() {
    let a = TestNode::start();
    let b = TestNode::start();
    assert_ne!(a.http_port(), b.http_port());
    assert_ne!(a.epmd_port(), b.epmd_port());
    assert_ne!(a.os_pid(), b.os_pid());

    a.incr().expect("POST /incr on a");
    assert_eq!(a.state().expect("state of a")["counter"], 1);
    assert_eq!(b.state().expect("state of b")["counter"], 0);
}

#[test]
fn a_panicking_test_still_stops_its_node() {
    let pids = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&pids);
    let outcome = panic::catch_unwind(move || {
        let node = TestNode::start();
        seen.lock()
            .unwrap()
            .extend([node.os_pid(), node.epmd_pid()]);
        panic!("test failure while the node runs");
    });
    assert!(outcome.is_err());
    let pids = pids.lock().unwrap();
    assert_eq!(pids.len(), 2);
    for &pid in pids.iter() {
        assert!(!pid_running(pid), "pid {pid} survived the panic");
    }
}

#[test]
fn kill9_takes_the_node_down() {
    let node = TestNode::start();
    assert_eq!(node.kill9(), vec![node.os_pid()]);
    assert!(!pid_running(node.os_pid()));
    assert!(node.health().is_err(), "nothing answers after SIGKILL");
}

#[test]
fn upgrade_tarballs_are_built_without_erts() {
    let releases = otp::releases();
    assert!(releases.base_dir().join("releases/RELEASES").is_file());
    assert!(
        releases
            .base_dir()
            .join("releases/start_erl.data")
            .is_file()
    );
    for vsn in UPGRADE_VSNS.into_iter().chain(otp::REHEARSAL_VSNS) {
        let tarball = releases.tarball(vsn);
        let listing = tar_listing(tarball);
        assert!(
            listing.contains(&format!("releases/{vsn}/thermo.rel")),
            "{vsn}"
        );
        assert!(
            !listing.iter().any(|p| p.starts_with("erts-")),
            "{vsn} must not carry ERTS"
        );
        let has_relup = listing.contains(&format!("releases/{vsn}/relup"));
        assert_eq!(has_relup, vsn != "2.0.0", "relup in {vsn}");
    }
    let base = tar_listing(releases.tarball(BASE_VSN));
    assert!(
        base.iter().any(|p| p.starts_with("erts-")),
        "the base tarball carries ERTS"
    );
}

pub fn tar_listing(path: &std::path::Path) -> Vec<String> {
    let file = std::fs::File::open(path).expect("open tarball");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
    archive
        .entries()
        .expect("read tarball")
        .map(|e| {
            e.expect("tar entry")
                .path()
                .expect("entry path")
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}
