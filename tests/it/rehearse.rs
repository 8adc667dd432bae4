//! `beamup rehearse` on the thermo fixture: a good upgrade passes every
//! step with the node's OS process and state kept; each way an upgrade
//! fails (code_change up, code_change down, unhealthy during the soak, a
//! failing `--check`) is reported with the step and the cause; a release
//! without a relup, or a from-version its relup does not cover, is
//! rehearsed cold and says a restart is needed; a mix release rehearses
//! like a rebar3 one; settings come from flags and `--config`; nothing it
//! started survives it, not even its own kill -9.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::cli::{Run, beamup, bin};
use crate::support::otp::{self, Flavor, pid_running};

/// `beamup rehearse --json` from thermo 1.0.0 to `to`, with the fixture's
/// environment variables and a soak of `soak`; `extra` appended.
fn rehearse(to: &str, soak: &str, extra: &[&str]) -> (Run, Value) {
    let mut args = ENV.to_vec();
    args.extend(extra);
    rehearse_flavor(Flavor::Rebar3, &[otp::BASE_VSN], to, soak, &args)
}

/// `beamup rehearse --json` of the `flavor` fixture from each of `from` to
/// `to`, health-gated on `/health` with a soak of `soak`; `extra` appended
/// (the `--env` names among them).
fn rehearse_flavor(
    flavor: Flavor,
    from: &[&str],
    to: &str,
    soak: &str,
    extra: &[&str],
) -> (Run, Value) {
    let releases = otp::releases_for(flavor);
    let tmp = tempfile::tempdir().unwrap();
    let from: Vec<String> = from
        .iter()
        .map(|v| releases.tarball(v).to_str().unwrap().to_string())
        .collect();
    let to = releases.tarball(to).to_str().unwrap().to_string();
    let mut args = vec!["rehearse"];
    for f in &from {
        args.extend(["--from", f]);
    }
    args.extend([
        "--to",
        &to,
        "--json",
        "--health-http",
        "/health",
        "--soak",
        soak,
        "--health-timeout",
        "8s",
    ]);
    args.extend(extra);
    let run = beamup(tmp.path(), &args);
    let report: Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}):\n{}\n{}", run.stdout, run.stderr));
    assert_nothing_left(&report);
    (run, report)
}

const ENV: [&str; 8] = [
    "--env",
    "node_name=NODE_NAME",
    "--env",
    "cookie=COOKIE",
    "--env",
    "http_port=THERMO_HTTP_PORT",
    "--env",
    "epmd_port=ERL_EPMD_PORT",
];

/// Every pid the report recorded (epmd, BEAMs) is gone, and so is the
/// temporary directory.
#[track_caller]
fn assert_nothing_left(report: &Value) {
    for from in report["from"].as_array().unwrap() {
        let pids = from["pids"].as_array().unwrap();
        assert!(!pids.is_empty(), "no pids recorded: {from}");
        for pid in pids {
            let pid = pid.as_i64().unwrap() as i32;
            assert!(
                !pid_running(pid),
                "pid {pid} still runs after rehearse: {from}"
            );
        }
    }
    let dir = report["dir"].as_str().unwrap();
    assert!(!Path::new(dir).exists(), "{dir} is left behind");
}

fn steps(report: &Value) -> &Vec<Value> {
    from_steps(&report["from"][0])
}

fn from_steps(from: &Value) -> &Vec<Value> {
    from["steps"].as_array().unwrap()
}

fn step<'a>(report: &'a Value, name: &str) -> &'a Value {
    from_step(&report["from"][0], name)
}

fn from_step<'a>(from: &'a Value, name: &str) -> &'a Value {
    from_steps(from)
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name}: {from}"))
}

/// The steps after provisioning, each ok, with `strategy` and the node's
/// OS pid kept (hot) or replaced (cold).
#[track_caller]
fn assert_install_steps(from: &Value, to: &str, strategy: &str) {
    let base = from["version"].as_str().unwrap();
    let first_pid = from_step(from, "provision")["pid_after"].clone();
    for (name, vsn) in [("upgrade", to), ("downgrade", base), ("upgrade_again", to)] {
        let s = from_step(from, name);
        assert_eq!(s["ok"], true, "{s}");
        assert_eq!(s["version"], vsn, "{s}");
        assert_eq!(s["strategy"], strategy, "{s}");
        assert_eq!(s["pid_kept"], strategy == "hot", "{s}");
        if strategy == "hot" {
            assert_eq!(s["pid_after"], first_pid, "{s}");
        }
    }
}

#[test]
fn a_good_hot_upgrade_passes_every_step_with_pid_and_state_kept() {
    // The counter bumped before the upgrade must survive every step.
    let (run, report) = rehearse(
        "1.1.0",
        "1s",
        &[
            "--prepare",
            "./bin/thermo rpc thermo_state incr >/dev/null",
            "--check",
            "./bin/thermo rpc thermo_state get | tr -d ' ' | grep -q 'counter=>1'",
        ],
    );
    run.ok();
    assert_eq!(report["passed"], true, "{report}");
    let names: Vec<&str> = steps(&report)
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "provision",
            "prepare",
            "upgrade",
            "downgrade",
            "upgrade_again"
        ]
    );
    let first_pid = step(&report, "provision")["pid_after"].clone();
    for (name, vsn) in [
        ("upgrade", "1.1.0"),
        ("downgrade", "1.0.0"),
        ("upgrade_again", "1.1.0"),
    ] {
        let s = step(&report, name);
        assert_eq!(s["ok"], true, "{s}");
        assert_eq!(s["version"], vsn, "{s}");
        assert_eq!(s["strategy"], "hot", "{s}");
        assert_eq!(s["pid_kept"], true, "{s}");
        assert_eq!(s["pid_after"], first_pid, "{s}");
        assert_eq!(s["check_ok"], true, "{s}");
        assert!(
            s["install_ms"].as_u64().is_some() && s["gate_ms"].as_u64().unwrap() >= 1000,
            "{s}"
        );
    }
    assert!(
        step(&report, "downgrade")["why"]
            .as_str()
            .unwrap()
            .contains("relup of the running 1.1.0 downgrades to 1.0.0"),
        "{report}"
    );
    let from = &report["from"][0];
    assert_eq!(from["restart_needed"], false, "{from}");
    let d = &from["download"];
    assert!(
        d["chunks_read"].as_u64().unwrap() < d["chunks_total"].as_u64().unwrap() / 4,
        "a hot upgrade of one app downloads a fraction: {d}"
    );
}

#[test]
fn a_code_change_crash_on_the_way_up_is_reported_with_module_and_term() {
    let (run, report) = rehearse("1.3.0", "1s", &[]);
    assert_eq!(run.code, 33, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("rehearsal failed: from 1.0.0 at upgrade"),
        "{}",
        run.stderr
    );
    let s = step(&report, "upgrade");
    assert_eq!(s["ok"], false);
    assert_eq!(s["failed_step"], "installing", "{s}");
    let why = s["reason"].as_str().unwrap();
    assert!(
        why.contains("code_change in thermo_state crashed")
            && why.contains("simulated_migration_bug"),
        "{why}"
    );
    assert_eq!(
        steps(&report).len(),
        2,
        "nothing after the failed step: {report}"
    );
}

#[test]
fn a_code_change_crash_only_on_the_way_down_fails_the_downgrade() {
    let (run, report) = rehearse("1.4.0", "1s", &[]);
    assert_eq!(run.code, 33, "{}", run.stderr);
    assert_eq!(step(&report, "upgrade")["ok"], true, "{report}");
    let s = step(&report, "downgrade");
    assert_eq!(s["ok"], false, "{s}");
    assert_eq!(s["strategy"], "hot", "{s}");
    let why = s["reason"].as_str().unwrap();
    assert!(
        why.contains("code_change in thermo_state crashed")
            && why.contains("simulated_downgrade_bug"),
        "{why}"
    );
}

#[test]
fn unhealthy_during_the_soak_fails_the_upgrade_with_the_health_output() {
    // 1.5.0 answers 200 for 2 s, then 503: only a soak longer than that
    // sees it.
    let (run, report) = rehearse("1.5.0", "4s", &[]);
    assert_eq!(run.code, 33, "{}", run.stderr);
    let s = step(&report, "upgrade");
    assert_eq!(s["ok"], false, "{s}");
    assert_eq!(s["failed_step"], "soaking", "{s}");
    let why = s["reason"].as_str().unwrap();
    assert!(
        why.contains("status 503") && why.contains("runs out of connections"),
        "{why}"
    );
}

#[test]
fn a_release_without_relup_is_rehearsed_cold_and_says_a_restart_is_needed() {
    let (run, report) = rehearse("2.0.0", "1s", &[]);
    run.ok();
    let from = &report["from"][0];
    assert_eq!(from["restart_needed"], true, "{from}");
    assert!(
        from["why"].as_str().unwrap().contains("has no relup"),
        "{from}"
    );
    assert_eq!(from["downgrade_restart_needed"], true, "{from}");
    for name in ["upgrade", "downgrade", "upgrade_again"] {
        let s = step(&report, name);
        assert_eq!(s["ok"], true, "{s}");
        assert_eq!(s["strategy"], "cold", "{s}");
        assert_eq!(s["pid_kept"], false, "a cold step restarts the node: {s}");
    }
}

#[test]
fn a_failing_check_fails_the_rehearsal_at_its_step() {
    // Env names and the check from --config; its 30 s soak is overridden
    // by the flag.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rehearse.toml");
    std::fs::write(
        &config,
        r#"soak = "30s"
check = "echo step=$BEAMUP_STEP version=$BEAMUP_VERSION; test $BEAMUP_STEP != downgrade"

[env]
node_name = "NODE_NAME"
cookie = "COOKIE"
http_port = "THERMO_HTTP_PORT"
epmd_port = "ERL_EPMD_PORT"
"#,
    )
    .unwrap();
    let (run, report) = rehearse_flavor(
        Flavor::Rebar3,
        &[otp::BASE_VSN],
        "1.1.0",
        "1s",
        &["--config", config.to_str().unwrap()],
    );
    assert_eq!(run.code, 33, "{}", run.stderr);
    let up = step(&report, "upgrade");
    assert_eq!(up["check_ok"], true, "{report}");
    assert!(
        up["gate_ms"].as_u64().unwrap() < 10_000,
        "--soak 1s wins: {up}"
    );
    let s = step(&report, "downgrade");
    assert_eq!(s["ok"], false, "{s}");
    assert_eq!(s["check_ok"], false, "{s}");
    let why = s["reason"].as_str().unwrap();
    assert!(
        why.contains("--check failed after the downgrade")
            && why.contains("step=downgrade version=1.0.0"),
        "{why}"
    );
}

#[test]
fn an_unknown_key_in_the_config_is_refused_naming_key_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("rehearse.toml"),
        "[env]\nnode_name = \"NODE_NAME\"\ncookie = \"COOKIE\"\nhttp = \"PORT\"\n",
    )
    .unwrap();
    let r = otp::releases();
    let run = beamup(
        tmp.path(),
        &[
            "rehearse",
            "--config",
            "rehearse.toml",
            "--from",
            r.tarball("1.0.0").to_str().unwrap(),
            "--to",
            r.tarball("1.1.0").to_str().unwrap(),
        ],
    );
    run.fails(
        4,
        "rehearse.toml: invalid configuration: line 4 in [env]: unknown field `http`",
    );
}

#[test]
fn missing_env_names_are_refused_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let r = otp::releases();
    let run = beamup(
        tmp.path(),
        &[
            "rehearse",
            "--from",
            r.tarball("1.0.0").to_str().unwrap(),
            "--to",
            r.tarball("1.1.0").to_str().unwrap(),
        ],
    );
    run.fails(2, "--env node_name=VAR, --env cookie=VAR missing");
}

#[test]
fn kill_9_of_rehearse_leaves_no_node_running() {
    let releases = otp::releases();
    let tmp = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin())
        .args(["rehearse", "--from"])
        .arg(releases.tarball(otp::BASE_VSN))
        .arg("--to")
        .arg(releases.tarball("1.1.0"))
        .args(ENV)
        .args([
            "--health-http",
            "/health",
            "--soak",
            "30s",
            "--health-timeout",
            "60s",
        ])
        .current_dir(tmp.path())
        .env("XDG_STATE_HOME", tmp.path().join(".state"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut pid = None;
    let mut seen = String::new();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if let Some(rest) = line.split("node up, pid ").nth(1) {
            pid = rest
                .split_whitespace()
                .next()
                .and_then(|p| p.parse::<i32>().ok());
        }
        // Mid-soak: the node has been upgraded and is being watched.
        if pid.is_some() && line.contains("soaking") {
            break;
        }
    }
    let pid = pid.unwrap_or_else(|| panic!("no node pid reported:\n{seen}"));
    assert!(pid_running(pid));
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while pid_running(pid) {
        assert!(
            Instant::now() < deadline,
            "node {pid} survived kill -9 of rehearse"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The reaper removes the directory after the sweep.
    let dir = seen
        .split_whitespace()
        .find_map(|w| {
            w.split("/bundles/")
                .next()
                .filter(|d| d.contains("beamup-rehearse-") && w.contains("/bundles/"))
        })
        .unwrap_or_else(|| panic!("no bundle path in the progress:\n{seen}"))
        .to_string();
    while Path::new(&dir).exists() {
        assert!(Instant::now() < deadline, "{dir} is left behind");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_mix_release_upgrades_hot_downgrades_and_upgrades_again_with_state_kept() {
    // Mix's own names: RELEASE_NODE, RELEASE_COOKIE; the default sname
    // distribution suits NAME@localhost.
    let (run, report) = rehearse_flavor(
        Flavor::Mix,
        &[otp::BASE_VSN],
        "1.1.0",
        "1s",
        &[
            "--env",
            "node_name=RELEASE_NODE",
            "--env",
            "cookie=RELEASE_COOKIE",
            "--env",
            "http_port=THERMEX_HTTP_PORT",
            "--env",
            "epmd_port=ERL_EPMD_PORT",
            "--prepare",
            "./bin/thermex rpc 'Thermex.State.incr()'",
            "--check",
            "./bin/thermex rpc 'IO.puts(Thermex.State.get().counter)' | grep -qx 1",
        ],
    );
    run.ok();
    assert_eq!(report["release"], "thermex", "{report}");
    assert_eq!(report["passed"], true, "{report}");
    let from = &report["from"][0];
    assert_install_steps(from, "1.1.0", "hot");
    for name in ["upgrade", "downgrade", "upgrade_again"] {
        assert_eq!(from_step(from, name)["check_ok"], true, "{from}");
    }
    assert_eq!(from["restart_needed"], false, "{from}");
    assert_eq!(from["downgrade_restart_needed"], false, "{from}");
}

#[test]
fn a_from_version_the_relup_does_not_cover_is_rehearsed_cold_beside_a_hot_one() {
    // 1.6.0's relup covers 1.0.0 only: a device on 1.1.0 restarts, both
    // ways; that is reported, not failed.
    let mut args = ENV.to_vec();
    args.extend(["--check", "./bin/thermo rpc thermo_state get"]);
    let (run, report) = rehearse_flavor(Flavor::Rebar3, &["1.0.0", "1.1.0"], "1.6.0", "1s", &args);
    run.ok();
    assert_eq!(report["passed"], true, "{report}");
    let [hot, cold] = [&report["from"][0], &report["from"][1]];
    assert_eq!(hot["version"], "1.0.0");
    assert_install_steps(hot, "1.6.0", "hot");
    assert_eq!(hot["restart_needed"], false, "{hot}");
    assert_eq!(hot["downgrade_restart_needed"], false, "{hot}");

    assert_eq!(cold["version"], "1.1.0");
    assert_install_steps(cold, "1.6.0", "cold");
    assert_eq!(cold["restart_needed"], true, "{cold}");
    assert!(
        cold["why"]
            .as_str()
            .unwrap()
            .contains("the relup of 1.6.0 upgrades from 1.0.0, not from the running 1.1.0"),
        "{cold}"
    );
    assert_eq!(cold["downgrade_restart_needed"], true, "{cold}");
    let down_why = cold["downgrade_why"].as_str().unwrap();
    assert!(
        down_why.contains("the relup of the running 1.6.0 downgrades to 1.0.0, not to 1.1.0"),
        "{down_why}"
    );
    for name in ["upgrade", "downgrade", "upgrade_again"] {
        let s = from_step(cold, name);
        assert_eq!(s["check_ok"], true, "{s}");
        assert!(s["gate_ms"].as_u64().unwrap() >= 1000, "health-gated: {s}");
    }
}
