//! The repo's units, `systemd/beamup-agent.service` and
//! `systemd/example-release.service`, under a real systemd booted in
//! systemd-nspawn: installed as README says, readiness, hot and cold
//! upgrades and a restart rollback over MQTT through `systemctl`, the
//! watchdog killing a frozen agent whose next start recovers the install,
//! and the agent's sandbox. The broker, `beamup serve` and `beamup offer`
//! run on the host; the machine shares its loopback.

use std::fs;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::cli::beamup;
use crate::support::device::keys_and_root;
use crate::support::mqtt::{Broker, Daemon, Sub};
use crate::support::nspawn::Machine;
use crate::support::otp::releases;
use crate::support::{free_port, http, repo};

const OUTCOME: Duration = Duration::from_secs(90);

/// A machine with both units installed and started, and the operator's
/// side on the host: broker, `beamup serve`, keys, bundles.
struct Rig {
    m: Machine,
    broker: Broker,
    _serve: Daemon,
    watch: Sub,
    op: tempfile::TempDir,
    http_port: u16,
    bundles: u32,
}

impl Rig {
    /// `health`: the `[health]` lines besides `http`; `agent_dropin`: a
    /// drop-in for beamup-agent.service (timing), or "".
    fn new(health: &str, agent_dropin: &str) -> Rig {
        let broker = Broker::start();
        let op = tempfile::Builder::new()
            .prefix("beamup-operator-")
            .tempdir()
            .unwrap();
        keys_and_root(op.path());
        fs::create_dir(op.path().join("bundles")).unwrap();
        let http_port = free_port();
        let epmd_port = free_port();
        let cookie = format!("c{}", std::process::id());
        let config = format!(
            r#"[release]
root = "/opt/thermo"
name = "thermo"
[node]
name = "thermo@localhost"
cookie_file = "/opt/thermo/releases/COOKIE"
epmd_port = {epmd_port}
start = "systemctl start example-release"
stop  = "systemctl stop example-release"
[health]
http = "http://127.0.0.1:{http_port}/health"
expect_version = true
interval = "100ms"
{health}
[trust]
root = "/etc/beamup/root.json"
[state]
dir = "/var/lib/beamup"
[mqtt]
url = "{url}"
device_id = "gw-1"
fleet = "acme"
groups = ["canary"]
"#,
            url = broker.url()
        );
        let root_json = op.path().join("root.json");
        let beamup_bin = PathBuf::from(crate::support::cli::bin());
        let units = repo().join("systemd");
        let m = Machine::boot(
            &[
                (beamup_bin.as_path(), "/usr/local/bin/beamup"),
                (units.as_path(), "/usr/local/share/beamup/systemd"),
            ],
            |root| {
                // The release as a device has it, and the agent's config.
                let status = std::process::Command::new("cp")
                    .arg("-a")
                    .arg(releases().base_dir())
                    .arg(root.join("opt/thermo"))
                    .status()
                    .unwrap();
                assert!(status.success());
                fs::write(root.join("opt/thermo/releases/COOKIE"), &cookie).unwrap();
                fs::create_dir_all(root.join("etc/beamup")).unwrap();
                fs::write(root.join("etc/beamup/agent.toml"), &config).unwrap();
                fs::copy(&root_json, root.join("etc/beamup/root.json")).unwrap();
                // This machine shares the host's ports: the release's own
                // settings (what `systemctl edit example-release` adds).
                let d = root.join("etc/systemd/system/example-release.service.d");
                fs::create_dir_all(&d).unwrap();
                fs::write(
                    d.join("ports.conf"),
                    format!(
                        "[Service]\nEnvironment=NODE_NAME=thermo@localhost COOKIE={cookie} \
                         THERMO_HTTP_PORT={http_port} ERL_EPMD_PORT={epmd_port}\n"
                    ),
                )
                .unwrap();
                if !agent_dropin.is_empty() {
                    let d = root.join("etc/systemd/system/beamup-agent.service.d");
                    fs::create_dir_all(&d).unwrap();
                    fs::write(d.join("timing.conf"), agent_dropin).unwrap();
                }
            },
        );
        // README's install, with the units exactly as the repo has them.
        m.ok(
            "useradd --system --user-group --home-dir /opt/thermo --no-create-home thermo \
              && chown -R thermo:thermo /opt/thermo && chmod 0600 /opt/thermo/releases/COOKIE \
              && install -m 0644 /usr/local/share/beamup/systemd/example-release.service \
                 /usr/local/share/beamup/systemd/beamup-agent.service /etc/systemd/system/ \
              && systemctl daemon-reload && systemctl enable --now example-release",
        );
        let watch = Sub::new(&broker, &["beamup/acme/device/+/state"]);
        let serve = Daemon::start(
            op.path(),
            "serve.log",
            &[
                "serve",
                "--broker",
                &broker.url(),
                "--fleet",
                "acme",
                "--bundles",
                "bundles",
            ],
            &[],
        );
        serve.wait_log("serving requests on", Duration::from_secs(20));
        let b = Rig {
            m,
            broker,
            _serve: serve,
            watch,
            op,
            http_port,
            bundles: 0,
        };
        b.wait_health("1.0.0");
        b
    }

    /// `systemctl enable --now beamup-agent`: returns when systemd has the
    /// agent's READY=1 (Type=notify).
    fn start_agent(&self) {
        self.m.ok("systemctl enable --now beamup-agent");
    }

    fn release_pid(&self) -> String {
        self.m.prop("example-release", "MainPID")
    }

    fn agent_pid(&self) -> String {
        self.m.prop("beamup-agent", "MainPID")
    }

    fn health(&self) -> Option<Value> {
        http(self.http_port, "GET /health")
    }

    #[track_caller]
    fn wait_health(&self, vsn: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(h) = self.health()
                && h["version"] == vsn
            {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "the release never answered as {vsn}: {:?}\n{}",
                self.health(),
                self.m.journal("example-release")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn incr(&self) {
        http(self.http_port, "POST /incr").expect("POST /incr");
    }

    fn offer(&mut self, vsn: &str) {
        self.bundles += 1;
        let name = format!("bundles/thermo-{vsn}-{}.bundle", self.bundles);
        let tarball = releases().tarball(vsn).display().to_string();
        beamup(
            self.op.path(),
            &[
                "bundle",
                "--release",
                &tarball,
                "--key",
                "keys/k.key",
                "--out",
                &name,
            ],
        )
        .ok();
        self.operator(&["offer", &name, "--device", "gw-1"]);
    }

    fn operator(&self, args: &[&str]) {
        let mut all: Vec<&str> = args.to_vec();
        let url = self.broker.url();
        all.extend(["--broker", &url, "--fleet", "acme"]);
        beamup(self.op.path(), &all).ok();
    }

    /// The first retained state of gw-1 in `phase` for `vsn`.
    #[track_caller]
    fn wait_phase(&self, phase: &str, vsn: &str) -> Value {
        self.watch
            .wait_for(&format!("{phase} {vsn}"), OUTCOME, |m| {
                m.topic == "beamup/acme/device/gw-1/state"
                    && m.json()["phase"]["name"] == phase
                    && m.json()["phase"]["version"] == vsn
            })
            .json()
    }
}

#[test]
fn under_systemd_the_agent_is_ready_hot_and_cold_upgrades_and_rolls_back_by_restart() {
    // The health gate also fails for a version VSN while
    // /etc/beamup/unhealthy-VSN exists (the command gets BEAMUP_VERSION).
    let mut b = Rig::new(
        "timeout = \"6s\"\nsoak = \"1s\"\ncommand = \"test ! -e /etc/beamup/unhealthy-$BEAMUP_VERSION\"",
        "",
    );
    b.start_agent();
    // `systemctl start` returned: systemd had READY=1 and the status text
    // the agent sends with it.
    assert_eq!(b.m.prop("beamup-agent", "ActiveState"), "active");
    assert_eq!(b.m.prop("beamup-agent", "StatusText"), "running");
    assert_eq!(b.m.prop("beamup-agent", "Type"), "notify");

    // Hot: the same BEAM process, its state kept.
    b.incr();
    b.incr();
    let pid = b.release_pid();
    b.offer("1.1.0");
    let st = b.wait_phase("committed", "1.1.0");
    assert_eq!(st["permanent"], "1.1.0", "{st:#}");
    let h = b.wait_health("1.1.0");
    assert_eq!(h["counter"], 2, "{h}");
    assert_eq!(b.release_pid(), pid, "a hot upgrade keeps the main PID");
    assert_eq!(h["os_pid"].as_str().unwrap(), pid);

    // Cold and unhealthy: systemctl stop, start on 2.0.0, the gate fails,
    // systemctl stop, start on the permanent 1.1.0.
    b.m.ok("touch /etc/beamup/unhealthy-2.0.0");
    b.offer("2.0.0");
    let st = b.wait_phase("rolled_back", "2.0.0");
    assert_eq!(st["running"], "1.1.0", "{st:#}");
    assert_eq!(st["permanent"], "1.1.0", "{st:#}");
    let h = b.wait_health("1.1.0");
    let rolled_back_pid = b.release_pid();
    assert_ne!(rolled_back_pid, pid, "the rollback restarted the service");
    assert_eq!(h["os_pid"].as_str().unwrap(), rolled_back_pid);
    let journal = b.m.journal("example-release");
    assert!(
        journal.matches("Stopped example-release.service").count() >= 2,
        "stopped twice through systemctl (cold, then rollback):\n{journal}"
    );

    // Healthy again: the retry's cold upgrade commits, and a restart of
    // the service boots what is permanent.
    b.m.ok("rm /etc/beamup/unhealthy-2.0.0");
    b.operator(&["fleet", "retry", "--device", "gw-1"]);
    let st = b.wait_phase("committed", "2.0.0");
    assert_eq!(st["permanent"], "2.0.0", "{st:#}");
    b.wait_health("2.0.0");
    assert_ne!(b.release_pid(), rolled_back_pid, "cold: a new process");
    b.m.ok("systemctl restart example-release");
    let h = b.wait_health("2.0.0");
    assert_eq!(h["counter"], 0, "{h}");
    assert_eq!(b.m.prop("example-release", "NRestarts"), "0");

    // The logs, as a user reads them.
    let log = b.m.journal("beamup-agent");
    for line in [
        "committed thermo 1.1.0",
        "rolled back thermo 2.0.0",
        "committed thermo 2.0.0",
    ] {
        assert!(
            log.contains(line),
            "journalctl -u beamup-agent lacks {line:?}:\n{log}"
        );
    }

    // The sandbox: writable are the release root and the state directory,
    // nothing else; and the agent keeps only two capabilities.
    let agent = b.agent_pid();
    for ok in ["/opt/thermo/.probe", "/var/lib/beamup/.probe"] {
        let out =
            b.m.sh_in_sandbox_of(&agent, &format!("touch {ok} && rm {ok}"));
        assert!(
            out.status.success(),
            "{ok}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for denied in [
        "/etc/beamup/.probe",
        "/usr/local/bin/.probe",
        "/etc/systemd/system/.probe",
        "/root/.probe",
        "/var/log/.probe",
    ] {
        let out = b.m.sh_in_sandbox_of(&agent, &format!("touch {denied}"));
        assert!(
            !out.status.success(),
            "the agent's sandbox lets it write {denied}"
        );
    }
    let status = b.m.ok(&format!("cat /proc/{agent}/status"));
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .unwrap()
        .trim();
    // CAP_CHOWN (0) and CAP_DAC_OVERRIDE (1).
    assert_eq!(u64::from_str_radix(bounding, 16).unwrap(), 0b11, "{status}");

    let report =
        b.m.ok("systemd-analyze security --no-pager beamup-agent.service");
    let score: f64 = report
        .lines()
        .find_map(|l| l.split("beamup-agent.service: ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no exposure score:\n{report}"));
    eprintln!("systemd-analyze security beamup-agent.service: {score}");
    assert!(score <= 2.5, "exposure {score}:\n{report}");
}

#[test]
fn a_frozen_agent_is_killed_by_the_watchdog_and_its_next_start_recovers_the_install() {
    // A short watchdog for the test's sake; the unit's own is 60 s.
    let mut b = Rig::new(
        "timeout = \"30s\"\nsoak = \"4s\"",
        "[Service]\nWatchdogSec=3s\nRestartSec=1s\n",
    );
    b.start_agent();
    b.incr();
    b.offer("1.1.0");
    b.wait_phase("soaking", "1.1.0");
    let frozen = b.agent_pid();
    b.m.ok("systemctl kill --kill-whom=main -s SIGSTOP beamup-agent");

    // Killed and started again; its next start finds the journaled install
    // and undoes it (an interruption), then installs the offer again.
    let deadline = Instant::now() + Duration::from_secs(60);
    while b.m.prop("beamup-agent", "NRestarts") == "0" {
        assert!(Instant::now() < deadline, "{}", b.m.journal("beamup-agent"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = b.wait_phase("committed", "1.1.0");
    assert_eq!(st["permanent"], "1.1.0", "{st:#}");
    assert_ne!(b.agent_pid(), frozen);
    assert_eq!(b.m.prop("beamup-agent", "ActiveState"), "active");
    let h = b.wait_health("1.1.0");
    assert!(h["counter"].as_u64().is_some(), "{h}");

    let log = b.m.journal("beamup-agent");
    let watchdog = log
        .find("Watchdog timeout")
        .unwrap_or_else(|| panic!("no watchdog timeout:\n{log}"));
    let recovered = log
        .find("recovered an interrupted install")
        .unwrap_or_else(|| panic!("no recovery:\n{log}"));
    // Ready only after the recovery: systemd logs the start after it.
    let started_again = log[watchdog..]
        .find("Started beamup-agent.service")
        .map(|i| i + watchdog)
        .unwrap_or_else(|| panic!("not started again:\n{log}"));
    assert!(
        watchdog < recovered && recovered < started_again,
        "watchdog, recovery, then ready:\n{log}"
    );
}
