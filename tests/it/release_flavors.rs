//! The test nodes of every release shape (`support::otp::Flavor`): each
//! flavor's base boots with the harness's environment, answers on its
//! endpoints, restarts from disk like after a power loss, and starts and
//! stops through the command lines an agent.toml gets. Also the layout of
//! the mix tarballs, which the install tests rely on.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::otp::{BASE_VSN, Flavor, TestNode, UPGRADE_VSNS, pid_running, releases_for};

fn boots_serves_and_restarts(flavor: Flavor) {
    let mut node = TestNode::start_flavor(flavor);
    let (status, health) = node.health().expect("GET /health");
    assert_eq!(status, 200, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], BASE_VSN);
    assert_eq!(health["node"], node.node_name());
    assert_eq!(health["os_pid"], node.os_pid().to_string());
    assert_eq!(node.incr().expect("POST /incr")["counter"], 1);
    assert_eq!(node.state().expect("GET /state")["counter"], 1);

    let first = node.os_pid();
    let run_erl = node.run_erl_pid().expect("the BEAM runs under run_erl");
    assert_eq!(node.restart_from_disk(), BASE_VSN);
    assert!(!pid_running(first), "the old BEAM survived the restart");
    assert!(
        !pid_running(run_erl),
        "the old run_erl survived the restart"
    );
    assert_ne!(node.os_pid(), first);
    assert_eq!(node.beam_pids(), vec![node.os_pid()]);
    // A fresh boot: the counter starts again.
    assert_eq!(node.health().expect("GET /health").1["counter"], 0);

    let pids = [
        node.os_pid(),
        node.run_erl_pid().expect("run_erl"),
        node.epmd_pid(),
    ];
    drop(node);
    for pid in pids {
        assert!(!pid_running(pid), "pid {pid} still running after drop");
    }
}

#[test]
fn rebar3_node_boots_serves_and_restarts_from_disk() {
    boots_serves_and_restarts(Flavor::Rebar3);
}

#[test]
fn rebar3_noerts_node_boots_serves_and_restarts_from_disk() {
    boots_serves_and_restarts(Flavor::Rebar3NoErts);
}

#[test]
fn mix_node_boots_serves_and_restarts_from_disk() {
    boots_serves_and_restarts(Flavor::Mix);
}

/// What beamup does with `[node] start` / `stop`: `sh -c` the command lines.
#[test]
fn start_and_stop_commands_drive_the_node_for_every_flavor() {
    for flavor in Flavor::ALL {
        let node = TestNode::start_flavor(flavor);
        let beam = node.os_pid();
        let stop = Command::new("sh")
            .args(["-c", &node.stop_command()])
            .output()
            .expect("running the stop command");
        assert!(stop.status.success(), "{flavor:?} stop: {stop:?}");
        // mix's `stop` returns while the VM is still shutting down.
        let deadline = Instant::now() + Duration::from_secs(15);
        while pid_running(beam) {
            assert!(
                Instant::now() < deadline,
                "{flavor:?}: BEAM {beam} did not stop"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let start = Command::new("sh")
            .args(["-c", &node.start_command()])
            .output()
            .expect("running the start command");
        assert!(start.status.success(), "{flavor:?} start: {start:?}");
        let (status, health) = node
            .wait_for_health(Duration::from_secs(30))
            .expect("/health after the start command");
        assert_eq!(status, 200, "{flavor:?}: {health}");
        assert_ne!(health["os_pid"], beam.to_string(), "{flavor:?}");
        assert_eq!(health["node"], node.node_name(), "{flavor:?}");
    }
}

#[test]
fn the_mix_node_uses_its_provisioned_cookie() {
    let node = TestNode::start_flavor(Flavor::Mix);
    let cookie = std::fs::read_to_string(node.root().join("releases/COOKIE")).unwrap();
    assert_eq!(cookie, node.cookie());
    let built =
        std::fs::read_to_string(releases_for(Flavor::Mix).base_dir().join("releases/COOKIE"))
            .unwrap();
    assert_ne!(cookie, built, "the node must not run on the build's cookie");
    // `rpc` authenticates with the cookie file.
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} rpc 'IO.puts(Node.get_cookie())'",
            node.start_command().trim_end_matches(" daemon")
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), node.cookie());
}

#[test]
fn base_roots_have_the_shape_of_their_flavor() {
    let rebar3 = releases_for(Flavor::Rebar3).base_dir();
    assert!(rebar3.join("releases/RELEASES").is_file());
    assert!(has_erts(&rebar3));
    let noerts = releases_for(Flavor::Rebar3NoErts).base_dir();
    assert!(!noerts.join("releases/RELEASES").exists());
    assert!(!has_erts(&noerts), "base-noerts carries an ERTS");
    assert!(noerts.join("bin/thermo-1.0.0").is_file());
    let mix = releases_for(Flavor::Mix).base_dir();
    assert!(!mix.join("releases/RELEASES").exists());
    assert!(has_erts(&mix));
    assert!(mix.join("releases/COOKIE").is_file());
    assert!(!mix.join("bin/thermex-1.0.0").exists());
    assert_eq!(
        std::fs::read_to_string(mix.join("releases/start_erl.data")).unwrap(),
        "13.1.5 1.0.0".replace("13.1.5", &erts_vsn(&mix))
    );
}

#[test]
fn mix_tarballs_have_the_layout_mix_gives_them() {
    let releases = releases_for(Flavor::Mix);
    for vsn in std::iter::once(BASE_VSN).chain(UPGRADE_VSNS) {
        let listing = crate::otp_release::tar_listing(releases.tarball(vsn));
        for want in [
            "bin/thermex".to_string(),
            "releases/COOKIE".into(),
            "releases/start_erl.data".into(),
            format!("releases/{vsn}/thermex.rel"),
            format!("releases/{vsn}/start.boot"),
            format!("releases/{vsn}/env.sh"),
            format!("lib/thermex-{vsn}/ebin/thermex.app"),
        ] {
            assert!(listing.contains(&want), "{vsn} lacks {want}");
        }
        assert!(!listing.iter().any(|p| p == "releases/RELEASES"), "{vsn}");
        assert!(
            !listing.iter().any(|p| p.starts_with("bin/thermex-")),
            "{vsn}"
        );
        assert!(
            listing.iter().any(|p| p.starts_with("erts-")),
            "{vsn} lacks ERTS"
        );
        let has_relup = listing.contains(&format!("releases/{vsn}/relup"));
        assert_eq!(
            has_relup,
            ["1.1.0", "1.2.0", "1.3.0"].contains(&vsn),
            "relup in {vsn}"
        );
        let info = beamup::release::metadata::inspect(releases.tarball(vsn)).unwrap();
        assert_eq!(
            (info.name.as_str(), info.version.as_str()),
            ("thermex", vsn)
        );
        if has_relup {
            assert_eq!(info.upgrade_from, ["1.0.0"], "{vsn}");
            assert_eq!(info.downgrade_to, ["1.0.0"], "{vsn}");
        }
    }
}

fn has_erts(root: &std::path::Path) -> bool {
    !erts_vsn(root).is_empty()
}

fn erts_vsn(root: &std::path::Path) -> String {
    std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| n.strip_prefix("erts-").map(str::to_string))
        .unwrap_or_default()
}

/// The agent.toml of every flavor reaches its node, and
/// `assert_boots_permanent` holds on a fresh device.
#[test]
fn every_flavor_device_is_reachable_and_boots_its_permanent_release() {
    for flavor in Flavor::ALL {
        let mut device = crate::support::device::Device::new_flavor(flavor);
        let st = device.status();
        assert_eq!(st["node"]["reachable"], true, "{flavor:?}: {st:#}");
        assert_eq!(st["node"]["running"], BASE_VSN, "{flavor:?}: {st:#}");
        device.assert_boots_permanent();
        assert_eq!(device.status()["node"]["running"], BASE_VSN, "{flavor:?}");
    }
}
