//! The repo's pod, `containers/pod.yaml`, under `podman kube play` with the
//! image of `containers/Containerfile`: the release's container provisions
//! the empty volume from a bundle and runs the release from it; the agent's
//! container upgrades it in place over MQTT (hot, with the state kept; an
//! unhealthy release rolled back; a cold upgrade whose agent is killed
//! half-way and recovers); a restart of the release's container and a new
//! pod on the same volume boot what is permanent there. The broker,
//! `beamup serve` and `beamup offer` run on the host; the pod shares its
//! loopback (`--network host`), so every port is a free one of the host's.

use std::fs;
use std::os::unix::fs::{PermissionsExt, chown};
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::cli::beamup;
use crate::support::device::keys_and_root;
use crate::support::mqtt::{Broker, Daemon, Sub};
use crate::support::otp::releases;
use crate::support::podman::{Pod, Podman};
use crate::support::{free_port, http, repo};

const OUTCOME: Duration = Duration::from_secs(90);
/// The uid and gid of both containers (`containers/Containerfile`).
const BEAM_UID: u32 = 1000;

/// The operator's side on the host and the device's settings for the pod.
struct Operator {
    broker: Broker,
    _serve: Daemon,
    watch: Sub,
    dir: tempfile::TempDir,
    http_port: u16,
    bundles: u32,
}

impl Operator {
    fn new() -> Operator {
        let broker = Broker::start();
        let dir = tempfile::Builder::new()
            .prefix("beamup-operator-")
            .tempdir()
            .unwrap();
        keys_and_root(dir.path());
        fs::create_dir(dir.path().join("bundles")).unwrap();
        let watch = Sub::new(&broker, &["beamup/acme/device/+/state"]);
        let serve = Daemon::start(
            dir.path(),
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
        Operator {
            broker,
            _serve: serve,
            watch,
            dir,
            http_port: free_port(),
            bundles: 0,
        }
    }

    fn bundle(&mut self, vsn: &str) -> String {
        self.bundles += 1;
        let name = format!("bundles/thermo-{vsn}-{}.bundle", self.bundles);
        let tarball = releases().tarball(vsn).display().to_string();
        beamup(
            self.dir.path(),
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
        name
    }

    /// The pod's read-only settings (`/etc/beamup`, the "config" volume):
    /// what a ConfigMap and a Secret would hold in Kubernetes.
    fn write_settings(&mut self, dir: &Path) {
        let epmd_port = free_port();
        let cookie = format!("c{}", std::process::id());
        let agent = format!(
            r#"[release]
root = "/data/release"
name = "thermo"
[node]
name = "thermo@localhost"
cookie_file = "/etc/beamup/cookie"
epmd_port = {epmd_port}
start = "beamup-node start"
stop  = "beamup-node stop"
[health]
http = "http://127.0.0.1:{http}/health"
expect_version = true
interval = "100ms"
timeout = "10s"
soak = "4s"
[trust]
root = "/etc/beamup/root.json"
[state]
dir = "/data/state"
[mqtt]
url = "{url}"
device_id = "gw-1"
fleet = "acme"
groups = ["canary"]
"#,
            http = self.http_port,
            url = self.broker.url()
        );
        fs::write(dir.join("agent.toml"), agent).unwrap();
        fs::write(
            dir.join("release.env"),
            format!(
                "# The host's ports (the pod runs on the host's network here)\n\
                 NODE_NAME=thermo@localhost\nERL_EPMD_PORT={epmd_port}\n\
                 THERMO_HTTP_PORT={}\n",
                self.http_port
            ),
        )
        .unwrap();
        fs::write(dir.join("cookie"), cookie).unwrap();
        fs::set_permissions(dir.join("cookie"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::copy(self.dir.path().join("root.json"), dir.join("root.json")).unwrap();
        let base = self.bundle("1.0.0");
        fs::copy(self.dir.path().join(base), dir.join("provision.bundle")).unwrap();
        for e in fs::read_dir(dir).unwrap() {
            chown(e.unwrap().path(), Some(BEAM_UID), Some(BEAM_UID)).unwrap();
        }
    }

    fn offer(&mut self, vsn: &str) {
        let name = self.bundle(vsn);
        let url = self.broker.url();
        beamup(
            self.dir.path(),
            &[
                "offer", &name, "--device", "gw-1", "--broker", &url, "--fleet", "acme",
            ],
        )
        .ok();
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

    fn incr(&self) {
        http(self.http_port, "POST /incr").expect("POST /incr");
    }

    #[track_caller]
    fn wait_health(&self, pod: &Pod, vsn: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(h) = http(self.http_port, "GET /health")
                && h["version"] == vsn
            {
                return h;
            }
            assert!(
                Instant::now() < deadline,
                "the release never answered as {vsn}: {:?}\n{}",
                http(self.http_port, "GET /health"),
                pod.logs("release")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn in_a_pod_the_release_on_the_volume_is_upgraded_in_place_and_boots_permanent_after_restarts() {
    let podman = Podman::open();
    let mut op = Operator::new();
    let manifest = repo().join("containers/pod.yaml");
    let mut pod = Pod::play(
        &podman,
        &manifest,
        "thermo",
        &["thermo-data", "thermo-config"],
        || op.write_settings(&podman.volume_dir("thermo-config")),
    );
    let data = podman.volume_dir("thermo-data");

    // First start: the empty volume is provisioned from the bundle, and
    // the release runs from it.
    let h = op.wait_health(&pod, "1.0.0");
    assert_eq!(h["node"], "thermo@localhost", "{h}");
    let log = pod.logs("release");
    assert!(log.contains("provisioning /data/release"), "{log}");
    assert!(data.join("release/releases/1.0.0/thermo.rel").exists());

    // Hot: the same BEAM, its state kept.
    op.incr();
    op.incr();
    op.offer("1.1.0");
    let st = op.wait_phase("committed", "1.1.0");
    assert_eq!(st["permanent"], "1.1.0", "{st:#}");
    let h1 = op.wait_health(&pod, "1.1.0");
    assert_eq!(h1["counter"], 2, "{h1}");
    assert_eq!(h1["os_pid"], h["os_pid"], "a hot upgrade keeps the BEAM");
    assert_eq!(
        fs::read_to_string(data.join("release/releases/start_erl.data"))
            .unwrap()
            .trim(),
        "13.1.5 1.1.0"
    );

    // The release's container restarted: it boots the committed release
    // from the volume, fresh, and does not provision again.
    podman.ok(&["restart", &pod.container("release")]);
    let h = op.wait_health(&pod, "1.1.0");
    assert_eq!(h["counter"], 0, "a new BEAM: {h}");
    let log = pod.logs("release");
    assert_eq!(
        log.matches("beamup-release: provisioning").count(),
        1,
        "{log}"
    );

    // Unhealthy (1.2.0 answers 503): rolled back inside the pod.
    op.offer("1.2.0");
    let st = op.wait_phase("rolled_back", "1.2.0");
    assert_eq!(st["running"], "1.1.0", "{st:#}");
    assert_eq!(st["permanent"], "1.1.0", "{st:#}");
    op.wait_health(&pod, "1.1.0");

    // Cold (2.0.0 has no relup): the agent stops and starts the node in the
    // other container. Its container is killed while the gate soaks; once
    // it runs again it undoes the interrupted install, then installs again.
    op.offer("2.0.0");
    op.wait_phase("soaking", "2.0.0");
    podman.ok(&["kill", "--signal", "KILL", &pod.container("agent")]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pod.status("agent") == "running" {
        assert!(Instant::now() < deadline, "the agent survived SIGKILL");
        std::thread::sleep(Duration::from_millis(100));
    }
    // A kubelet would restart it (restartPolicy: Always); podman applies
    // the policy to a container that exits by itself, not to `podman kill`.
    if pod.status("agent") != "running" {
        podman.ok(&["start", &pod.container("agent")]);
    }
    let st = op.wait_phase("committed", "2.0.0");
    assert_eq!(st["permanent"], "2.0.0", "{st:#}");
    op.wait_health(&pod, "2.0.0");
    let log = pod.logs("agent");
    assert!(
        log.contains("recovered an interrupted install"),
        "no recovery in the agent's log:\n{log}"
    );

    // A new pod on the same volume (what `kubectl rollout restart` does):
    // it boots the permanent release, the volume is not provisioned again.
    pod.down();
    pod.start();
    let h = op.wait_health(&pod, "2.0.0");
    assert_eq!(h["counter"], 0, "{h}");
    let log = pod.logs("release");
    assert!(!log.contains("beamup-release: provisioning"), "{log}");
}
