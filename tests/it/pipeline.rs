//! `scripts/cd-release` end to end on the thermo fixture: a real `rebar3
//! tar` of the commit's sources, `beamup relup` from the previous release,
//! `beamup rehearse`, `beamup bundle` with the key from an environment
//! variable, the serve directory of a running `beamup serve`, and a
//! campaign over real agents on thermo nodes and mosquitto. Only the CI
//! system is missing: the test runs the script as a CI job would.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;

use crate::support::cli::{beamup, bin};
use crate::support::fleet::{Fleet, id};
use crate::support::otp::{self, BASE_VSN};
use crate::support::repo;

const TIMING: &str = "timeout = \"8s\"\nsoak = \"1s\"";
/// The whole pipeline, build to completed campaign, on a loaded machine.
const PIPELINE: Duration = Duration::from_secs(240);

/// The thermo sources as a commit of version `vsn` has them: the base
/// tree, the version's overlay, `@VSN@` replaced (as tests/otp/build lays
/// them out).
fn project_at(vsn: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("thermo-project-")
        .tempdir()
        .unwrap();
    let sources = repo().join("tests/otp");
    copy_sources(&sources.join("thermo"), dir.path(), vsn);
    let overlay = sources.join("versions").join(vsn);
    if overlay.is_dir() {
        copy_sources(&overlay, dir.path(), vsn);
    }
    dir
}

fn copy_sources(from: &Path, to: &Path, vsn: &str) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_sources(&e.path(), &target, vsn);
        } else {
            let text = fs::read_to_string(e.path()).unwrap();
            fs::write(&target, text.replace("@VSN@", vsn)).unwrap();
        }
    }
}

/// What a run of the script printed and returned.
struct Ran {
    code: i32,
    output: String,
}

/// A fleet of `devices` thermo 1.0.0 devices with agents running, and the
/// inputs a CI job of the project gives the script.
struct Job {
    fleet: Fleet,
    project: tempfile::TempDir,
    /// TMPDIR of the job: empty again when the script is done.
    tmp: PathBuf,
    key_text: String,
}

impl Job {
    fn new(vsn: &str, devices: usize) -> Job {
        let mut fleet = Fleet::new(devices, TIMING, &[]);
        fleet.start_agents(0..devices);
        let tmp = fleet.dir().join("tmp");
        fs::create_dir(&tmp).unwrap();
        let key_text = fs::read_to_string(fleet.dir().join("keys/k.key")).unwrap();
        Job {
            fleet,
            project: project_at(vsn),
            tmp,
            key_text,
        }
    }

    fn out(&self) -> PathBuf {
        self.fleet.dir().join("out")
    }

    fn served(&self, vsn: &str) -> PathBuf {
        self.fleet
            .dir()
            .join(format!("bundles/thermo-{vsn}.bundle"))
    }

    /// `bash [-x] scripts/cd-release` with the job's inputs and `extra`
    /// flags before the rehearsal's arguments; `env` added to the job's
    /// environment (which holds the signing key).
    fn run(&self, trace: bool, extra: &[&str], env: &[(&str, &str)]) -> Ran {
        let dir = self.fleet.dir();
        let log = dir.join("cd-release.log");
        let file = fs::File::create(&log).unwrap();
        let mut cmd = Command::new("bash");
        if trace {
            cmd.arg("-x");
        }
        cmd.arg(repo().join("scripts/cd-release"))
            .arg("--project")
            .arg(self.project.path())
            // Relative, as a CI job names them: the job's directory.
            .args(["--serve-dir", "bundles", "--trust-root", "root.json"])
            .arg("--out")
            .arg(self.out())
            .arg("--campaigns")
            .arg(dir.join("campaigns"))
            .args(["--beamup", bin(), "--broker", &self.fleet.broker.url()])
            .args(["--fleet", "acme", "--canary", "1", "--canary-soak", "1s"])
            .args(extra)
            .args([
                "--",
                "--env",
                "node_name=NODE_NAME",
                "--env",
                "cookie=COOKIE",
                "--env",
                "http_port=THERMO_HTTP_PORT",
                "--env",
                "epmd_port=ERL_EPMD_PORT",
                "--health-http",
                "/health",
                "--soak",
                "1s",
                "--health-timeout",
                "8s",
            ])
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .env("BEAMUP_SIGNING_KEY", &self.key_text)
            .env("TMPDIR", &self.tmp)
            .env("XDG_STATE_HOME", dir.join(".state"))
            .env("REBAR_CACHE_DIR", self.project.path().join(".rebar3-cache"))
            .env("REBAR_COLOR", "none")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            // Its own process group: stopped as one if the test gives up.
            .process_group(0);
        let mut job = Group(Some(cmd.spawn().unwrap()));
        let code = job.wait(PIPELINE);
        Ran {
            code,
            output: fs::read_to_string(&log).unwrap(),
        }
    }

    /// Neither the key's text nor its secret half appears in what the
    /// script printed, nor in a file the job left.
    #[track_caller]
    fn assert_key_never_shown(&self, ran: &Ran) {
        let secret: Value = serde_json::from_str(&self.key_text).unwrap();
        let secret = secret["secret_key"].as_str().unwrap().to_string();
        assert!(!ran.output.contains(&secret), "{}", ran.output);
        assert!(!ran.output.contains(&secret[..16]), "{}", ran.output);
        for (path, bytes) in files_under(&self.out()) {
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(&secret), "{} holds the key", path.display());
        }
        let left: Vec<PathBuf> = fs::read_dir(&self.tmp)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert!(left.is_empty(), "left in TMPDIR: {left:?}");
    }

    /// `beamup verify --json` of a served bundle, as the devices' root sees it.
    fn verify(&self, bundle: &Path) -> Value {
        let r = beamup(
            self.fleet.dir(),
            &[
                "verify",
                bundle.to_str().unwrap(),
                "--root",
                "root.json",
                "--json",
            ],
        );
        r.ok();
        serde_json::from_str(&r.stdout).unwrap()
    }
}

/// The script and everything it started in its process group, stopped by
/// the group's id if it outlives its time or the test.
struct Group(Option<Child>);

impl Group {
    fn wait(&mut self, timeout: Duration) -> i32 {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.0.as_mut().unwrap();
            if let Some(status) = child.try_wait().unwrap() {
                self.0 = None;
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "cd-release still running after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let group = Pid::from_raw(child.id() as i32);
            // TERM first: rehearse then stops the nodes it started.
            let _ = killpg(group, Signal::SIGTERM);
            std::thread::sleep(Duration::from_secs(2));
            let _ = killpg(group, Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push((p.clone(), fs::read(&p).unwrap()));
        }
    }
    out
}

fn os_pid(f: &Fleet, i: usize) -> String {
    f.devices[i].health().1["os_pid"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_commit_ships_hot_through_rehearsal_and_campaign_with_pids_kept() {
    let job = Job::new("1.1.0", 2);
    // The previous release, as the last run of the pipeline served it,
    // beside an older one: `latest` takes the highest below 1.1.0.
    job.fleet.bundle(BASE_VSN, &[]);
    fs::copy(job.served(BASE_VSN), job.served("0.9.0")).unwrap();
    for d in &job.fleet.devices {
        d.node.incr().unwrap();
    }
    let pids: Vec<String> = (0..2).map(|i| os_pid(&job.fleet, i)).collect();

    // Traced (`bash -x`), as a CI job being debugged would run it.
    let ran = job.run(
        true,
        &["--prev-version", "latest", "--campaign-id", "ship-1.1.0"],
        &[],
    );
    assert_eq!(ran.code, 0, "{}", ran.output);
    assert!(
        ran.output
            .contains("hot: the relup upgrades 1.0.0 to 1.1.0"),
        "{}",
        ran.output
    );
    assert!(!ran.output.contains("cold:"), "{}", ran.output);
    assert!(
        ran.output
            .contains("shipped: thermo 1.1.0 (hot), campaign ship-1.1.0 completed"),
        "{}",
        ran.output
    );
    job.assert_key_never_shown(&ran);

    let rehearsal: Value =
        serde_json::from_str(&fs::read_to_string(job.out().join("rehearse.json")).unwrap())
            .unwrap();
    assert_eq!(rehearsal["passed"], true, "{rehearsal:#}");
    let served = job.verify(&job.served("1.1.0"));
    assert_eq!(
        served["manifest"]["upgrade_from"][0], BASE_VSN,
        "{served:#}"
    );
    assert_eq!(
        served["manifest"]["downgrade_to"][0], BASE_VSN,
        "{served:#}"
    );

    // Each device committed 1.1.0 hot: same OS process, counter kept.
    for (i, d) in job.fleet.devices.iter().enumerate() {
        let st = d.status();
        assert_eq!(st["node"]["running"], "1.1.0", "{}: {st:#}", id(i));
        assert_eq!(st["node"]["permanent"], "1.1.0", "{}: {st:#}", id(i));
        assert_eq!(
            st["last_outcome"]["outcome"],
            "committed",
            "{}: {st:#}",
            id(i)
        );
        let (_, h) = d.health();
        assert_eq!(h["os_pid"], pids[i].as_str(), "{}", id(i));
        assert_eq!(h["counter"], 1, "{}", id(i));
    }
    let report: Value =
        serde_json::from_str(&fs::read_to_string(job.out().join("campaign-report.json")).unwrap())
            .unwrap();
    assert_eq!(report["status"], "completed", "{report:#}");
}

#[test]
fn a_failed_rehearsal_fails_the_pipeline_with_nothing_served_or_offered() {
    // thermo 1.3.0's code_change crashes on the way up.
    let job = Job::new("1.3.0", 1);
    let prev = otp::releases().tarball(BASE_VSN).display().to_string();
    let ran = job.run(false, &["--prev", &prev], &[]);
    assert_eq!(ran.code, 33, "rehearse's exit code: {}", ran.output);
    assert!(
        ran.output
            .contains("rehearsal failed: from 1.0.0 at upgrade")
            && ran.output.contains("nothing was signed, served or offered"),
        "{}",
        ran.output
    );
    job.assert_key_never_shown(&ran);
    let rehearsal: Value =
        serde_json::from_str(&fs::read_to_string(job.out().join("rehearse.json")).unwrap())
            .unwrap();
    assert_eq!(rehearsal["passed"], false, "{rehearsal:#}");

    let bundles: Vec<_> = fs::read_dir(job.fleet.dir().join("bundles"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(bundles.is_empty(), "served: {bundles:?}");
    assert!(!job.out().join("thermo-1.3.0.bundle").exists());
    assert!(
        !job.fleet.dir().join("campaigns").exists(),
        "a campaign was created"
    );
    // Nothing reached the broker or the device.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(job.fleet.offers_to(0), 0);
    assert!(
        job.fleet
            .watch
            .messages()
            .iter()
            .all(|m| !m.topic.contains("/campaign/")),
        "a campaign was published"
    );
    let st = job.fleet.devices[0].status();
    assert_eq!(st["node"]["running"], BASE_VSN, "{st:#}");
}

#[test]
fn without_a_relup_the_pipeline_ships_cold_and_devices_restart_into_it() {
    // thermo 2.0.0 has no appup: `beamup relup` refuses, the pipeline goes on.
    let job = Job::new("2.0.0", 1);
    let before = os_pid(&job.fleet, 0);
    let prev = otp::releases().tarball(BASE_VSN).display().to_string();
    let ran = job.run(
        false,
        &["--prev", &prev, "--campaign-id", "ship-2.0.0"],
        &[],
    );
    assert_eq!(ran.code, 0, "{}", ran.output);
    assert!(
        ran.output.contains("cold: beamup relup could not make one")
            && ran
                .output
                .contains("application thermo changed from 1.0.0 to 2.0.0"),
        "{}",
        ran.output
    );
    assert!(
        ran.output
            .contains("the bundle carries no relup: devices restart into 2.0.0"),
        "{}",
        ran.output
    );
    job.assert_key_never_shown(&ran);
    let served = job.verify(&job.served("2.0.0"));
    assert_eq!(
        served["manifest"]["upgrade_from"],
        serde_json::json!([]),
        "{served:#}"
    );

    let d = &job.fleet.devices[0];
    let st = d.status();
    assert_eq!(st["node"]["running"], "2.0.0", "{st:#}");
    assert_eq!(st["node"]["permanent"], "2.0.0", "{st:#}");
    assert_eq!(st["last_outcome"]["outcome"], "committed", "{st:#}");
    assert_ne!(
        os_pid(&job.fleet, 0),
        before,
        "a cold upgrade restarts the node"
    );
}

#[test]
fn a_release_marked_cold_ships_without_its_relup() {
    // 1.1.0 could go hot; BEAMUP_COLD=1 says it must not.
    let job = Job::new("1.1.0", 1);
    let before = os_pid(&job.fleet, 0);
    let prev = otp::releases().tarball(BASE_VSN).display().to_string();
    // The plan the repository holds: no bundle, id or fleet; the pipeline
    // fills them in.
    let plan = job.project.path().join("rollout.toml");
    fs::write(
        &plan,
        "# thermo's rollout\n[[waves]]\nname = \"all\"\nrest = true\n[rollout]\norder = \"id\"\n",
    )
    .unwrap();
    let ran = job.run(
        false,
        &["--prev", &prev, "--plan", plan.to_str().unwrap()],
        &[("BEAMUP_COLD", "1")],
    );
    assert_eq!(ran.code, 0, "{}", ran.output);
    let written = fs::read_to_string(job.out().join("plan.toml")).unwrap();
    assert!(
        written.starts_with(&format!(
            "bundle = \"{}\"\nid = \"thermo-1.1.0-",
            job.served("1.1.0").display()
        )) && written.contains("fleet = \"acme\"\n# thermo's rollout\n"),
        "{written}"
    );
    let report: Value =
        serde_json::from_str(&fs::read_to_string(job.out().join("campaign-report.json")).unwrap())
            .unwrap();
    assert_eq!(report["waves"][0]["name"], "all", "{report:#}");
    assert!(
        ran.output
            .contains("cold: the release is marked cold (--cold or BEAMUP_COLD)"),
        "{}",
        ran.output
    );
    assert!(!ran.output.contains("cd-release: relup:"), "{}", ran.output);
    let served = job.verify(&job.served("1.1.0"));
    assert_eq!(
        served["manifest"]["upgrade_from"],
        serde_json::json!([]),
        "{served:#}"
    );
    let st = job.fleet.devices[0].status();
    assert_eq!(st["node"]["permanent"], "1.1.0", "{st:#}");
    assert_ne!(
        os_pid(&job.fleet, 0),
        before,
        "a cold upgrade restarts the node"
    );
}

#[test]
fn a_missing_or_empty_signing_key_stops_the_pipeline_before_the_build() {
    let project = project_at("1.1.0");
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("bundles")).unwrap();
    fs::write(dir.path().join("root.json"), "{}").unwrap();
    for (env, needle) in [(None, "is not set"), (Some(""), "is empty")] {
        let mut cmd = Command::new("bash");
        cmd.arg("-x")
            .arg(repo().join("scripts/cd-release"))
            .arg("--project")
            .arg(project.path())
            .args(["--serve-dir", "bundles", "--trust-root", "root.json"])
            .args(["--broker", "mqtt://127.0.0.1:1", "--fleet", "acme"])
            .args(["--prev-version", "1.0.0", "--beamup", bin()])
            .args(["--", "--env", "node_name=NODE_NAME"])
            .current_dir(dir.path())
            .env_remove("BEAMUP_SIGNING_KEY");
        if let Some(v) = env {
            cmd.env("BEAMUP_SIGNING_KEY", v);
        }
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "cd-release: error: the signing key variable BEAMUP_SIGNING_KEY {needle}"
            )),
            "{stderr}"
        );
        assert!(!project.path().join("_build").exists(), "built anyway");
    }
}

#[test]
fn secrets_reach_no_command_but_their_own_and_no_file_outlives_the_job() {
    let project = project_at("1.1.0");
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    fs::create_dir_all(dir.path().join("bundles")).unwrap();
    fs::create_dir(&tmp).unwrap();
    fs::write(dir.path().join("root.json"), "{}").unwrap();
    let key = "{\"type\":\"beamup-secret-key\",\"keyid\":\"k\",\"secret_key\":\"5ec2e7\"}";
    let password = "hunter2-broker-password";
    // The build sees neither secret in its environment, and finds the
    // password in a 0600 file of the script's private directory; its exit
    // code 7 says all of that held.
    let expected = dir.path().join("expected-password");
    fs::write(&expected, format!("{password}\n")).unwrap();
    let build = format!(
        "test -z \"${{BEAMUP_SIGNING_KEY:-}}${{BEAMUP_MQTT_PASSWORD:-}}\" \
         && f=$(echo \"$TMPDIR\"/cd-release.*/mqtt-password) \
         && test \"$(stat -c %a \"$f\" \"${{f%/*}}\" | tr '\\n' ' ')\" = '600 700 ' \
         && cmp -s \"$f\" {} && exit 7",
        expected.display()
    );
    let out = Command::new("bash")
        .arg("-x")
        .arg(repo().join("scripts/cd-release"))
        .arg("--project")
        .arg(project.path())
        .args(["--serve-dir", "bundles", "--trust-root", "root.json"])
        .args(["--broker", "mqtt://127.0.0.1:1", "--fleet", "acme"])
        .args(["--prev-version", "1.0.0", "--beamup", bin()])
        .args(["--build-cmd", &build, "--username", "ops"])
        .args(["--", "--env", "node_name=NODE_NAME"])
        .current_dir(dir.path())
        .env("BEAMUP_SIGNING_KEY", key)
        .env("BEAMUP_MQTT_PASSWORD", password)
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(60), "{stderr}");
    assert!(
        stderr.contains("cd-release: error: the build failed (exit 7)"),
        "{stderr}"
    );
    assert!(!stderr.contains("5ec2e7"), "{stderr}");
    assert!(!stderr.contains(password), "{stderr}");
    let left: Vec<_> = fs::read_dir(&tmp).unwrap().collect();
    assert!(left.is_empty(), "left in TMPDIR: {left:?}");
}
