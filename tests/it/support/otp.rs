//! Real Erlang/OTP nodes for integration tests, of every release shape
//! beamup supports ([`Flavor`]).
//!
//! [`releases_for`] builds a flavor's test releases once (`thermo` from
//! `tests/otp`, `thermex` from `tests/mix`; cached under the cargo target dir,
//! keyed by a hash of the sources and the installed OTP/Elixir), and
//! [`TestNode`] runs a private copy of the flavor's base release with its own
//! epmd, ports, node name and cookie, and stops all of it on drop. See
//! `tests/otp/README.md` and `tests/mix/README.md` for the releases.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;
use sha2::{Digest, Sha256};

pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Version of the base release every [`TestNode`] starts on.
pub const BASE_VSN: &str = "1.0.0";
/// Upgrade tarballs built next to the base; see `tests/otp/README.md`.
/// The mix build (`tests/mix`) makes these; the rebar3 build these and
/// [`REHEARSAL_VSNS`].
pub const UPGRADE_VSNS: [&str; 4] = ["1.1.0", "1.2.0", "1.3.0", "2.0.0"];
/// Rebar3 only: versions that fail a rehearsal in the ways that only a
/// downgrade or a soak shows, and one whose relup covers only 1.0.0
/// (`tests/otp/README.md`).
pub const REHEARSAL_VSNS: [&str; 3] = ["1.4.0", "1.5.0", "1.6.0"];

/// How long a node may take from `bin/thermo daemon` to answering `/health`.
/// Normally about a second; generous because tests start nodes in parallel.
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

/// The shape of a release root, with the test release built in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Flavor {
    /// `thermo` by rebar3/relx with ERTS and `releases/RELEASES`.
    #[default]
    Rebar3,
    /// `thermo` by relx without ERTS (runs on the system's erts) and with no
    /// `releases/RELEASES`. Same upgrade tarballs as [`Flavor::Rebar3`].
    Rebar3NoErts,
    /// `thermex` by `mix release` (Elixir): no `releases/RELEASES`, no
    /// `bin/REL-VSN`, cookie in `releases/COOKIE`.
    Mix,
}

impl Flavor {
    pub const ALL: [Flavor; 3] = [Flavor::Rebar3, Flavor::Rebar3NoErts, Flavor::Mix];

    /// The release (and application) name.
    pub fn release_name(self) -> &'static str {
        match self {
            Flavor::Rebar3 | Flavor::Rebar3NoErts => "thermo",
            Flavor::Mix => "thermex",
        }
    }

    fn base_subdir(self) -> &'static str {
        match self {
            Flavor::Rebar3 | Flavor::Mix => "base",
            Flavor::Rebar3NoErts => "base-noerts",
        }
    }
}

/// The built releases: a deployable base root and the release tarballs.
#[derive(Debug)]
pub struct Releases {
    flavor: Flavor,
    dir: PathBuf,
    tarballs: BTreeMap<String, PathBuf>,
}

impl Releases {
    /// The cache directory holding everything below.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// Release root of the base version (1.0.0), as a device has it
    /// installed: with ERTS and RELEASES (Rebar3), without either
    /// (Rebar3NoErts), as mix unpacks it (Mix). Copy it before use;
    /// [`TestNode`] does.
    pub fn base_dir(&self) -> PathBuf {
        self.dir.join(self.flavor.base_subdir())
    }

    /// Mix only: the release directory with every version built into it and
    /// the relups made (`_build/prod/rel/thermex`). Copy it before changing it.
    pub fn rel_dir(&self) -> PathBuf {
        assert_eq!(
            self.flavor,
            Flavor::Mix,
            "only the mix build keeps its rel dir"
        );
        self.dir.join("rel")
    }

    /// `REL-VSN.tar.gz` for [`BASE_VSN`] (with ERTS) or one of
    /// [`UPGRADE_VSNS`] (rebar3 also [`REHEARSAL_VSNS`]) (rebar3: without ERTS; mix: with, as mix makes them).
    pub fn tarball(&self, vsn: &str) -> &Path {
        self.tarballs
            .get(vsn)
            .unwrap_or_else(|| panic!("no {} release {vsn} is built", self.flavor.release_name()))
    }
}

/// The Rebar3 releases (see [`releases_for`]).
pub fn releases() -> &'static Releases {
    releases_for(Flavor::Rebar3)
}

/// A flavor's releases, built on first use. Blocks while another thread or
/// test process builds the same sources.
pub fn releases_for(flavor: Flavor) -> &'static Releases {
    static RELEASES: [OnceLock<Releases>; 3] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let slot = match flavor {
        Flavor::Rebar3 => 0,
        Flavor::Rebar3NoErts => 1,
        Flavor::Mix => 2,
    };
    RELEASES[slot].get_or_init(|| {
        let (dir, tarballs) = match flavor {
            Flavor::Rebar3 | Flavor::Rebar3NoErts => otp_build(),
            Flavor::Mix => mix_build(),
        };
        Releases {
            flavor,
            dir: dir.clone(),
            tarballs: tarballs.clone(),
        }
    })
}

type Built = (PathBuf, BTreeMap<String, PathBuf>);

fn otp_build() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let sources = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/otp");
        build_cached(&sources, "otp-cache", "thermo", &REHEARSAL_VSNS, &[], &[])
            .unwrap_or_else(|e| panic!("building the OTP test releases: {e}"))
    })
}

fn mix_build() -> &'static Built {
    static BUILT: OnceLock<Built> = OnceLock::new();
    BUILT.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        // The upgrade tarballs are made by `beamup relup`: a change to it
        // rebuilds them.
        let relup_sources: Vec<PathBuf> = [
            "src/operator/relup.rs",
            "src/release/metadata.rs",
            "src/release/releases_file.rs",
            "src/release/eterm.rs",
        ]
        .iter()
        .map(|p| manifest.join(p))
        .collect();
        build_cached(
            &manifest.join("tests/mix"),
            "mix-cache",
            "thermex",
            &[],
            &relup_sources,
            &[("BEAMUP", env!("CARGO_BIN_EXE_beamup"))],
        )
        .unwrap_or_else(|e| panic!("building the mix test releases: {e}"))
    })
}

fn build_cached(
    sources: &Path,
    cache_name: &str,
    release_name: &str,
    extra_vsns: &[&str],
    extra_key_files: &[PathBuf],
    build_env: &[(&str, &str)],
) -> Result<Built> {
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join(cache_name);
    fs::create_dir_all(&cache)?;
    let key = cache_key(sources, extra_key_files)?;
    let dir = cache.join(&key);
    let stamp = dir.join(".complete");

    // Held until the end of this function: other test processes wait here
    // rather than build the same thing into the same place.
    let lock_file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.join(format!("{key}.lock")))?;
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, errno)| errno)?;

    if !stamp.exists() {
        // Leftovers of an interrupted build.
        if dir.exists() {
            fs::remove_dir_all(&dir)?;
        }
        let started = Instant::now();
        let output = Command::new(sources.join("build"))
            .arg(&dir)
            .envs(build_env.iter().copied())
            .output()?;
        if !output.status.success() {
            return Err(format!(
                "{}/build failed ({}):\n{}\n{}",
                sources.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        eprintln!(
            "built {release_name} test releases into {} in {:.1?}",
            dir.display(),
            started.elapsed()
        );
        // Written last: its presence means the directory is complete.
        fs::write(&stamp, b"")?;
    }

    let mut tarballs = BTreeMap::new();
    for &vsn in std::iter::once(&BASE_VSN)
        .chain(&UPGRADE_VSNS)
        .chain(extra_vsns)
    {
        let path = dir.join(format!("{release_name}-{vsn}.tar.gz"));
        if !path.is_file() {
            return Err(format!(
                "{} is missing; delete {} to rebuild",
                path.display(),
                dir.display()
            )
            .into());
        }
        tarballs.insert(vsn.to_owned(), path);
    }
    Ok((dir, tarballs))
}

/// Hash of every file under the sources (path, executable bit, contents),
/// of `extra_files`, and of the installed OTP and Elixir, whose ERTS and
/// libraries end up in the releases.
fn cache_key(sources: &Path, extra_files: &[PathBuf]) -> Result<String> {
    let mut files = Vec::new();
    collect_files(sources, &mut files)?;
    files.sort();
    files.extend(extra_files.iter().cloned());
    let mut hasher = Sha256::new();
    for path in &files {
        use std::os::unix::fs::PermissionsExt;
        let rel = path.strip_prefix(sources).unwrap_or(path);
        let exec = fs::metadata(path)?.permissions().mode() & 0o111 != 0;
        let contents = fs::read(path)?;
        hasher.update(rel.as_os_str().as_encoded_bytes());
        hasher.update([0, u8::from(exec)]);
        hasher.update((contents.len() as u64).to_le_bytes());
        hasher.update(&contents);
    }
    hasher.update(installed_otp_fingerprint().as_bytes());
    hasher.update(installed_elixir_fingerprint().as_bytes());
    Ok(hex::encode(&hasher.finalize()[..10]))
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            collect_files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(program))
            .find(|p| p.is_file())
    })
}

/// Where `elixir` on PATH lives and its `elixir.app` (which names the
/// version): changes with every Elixir package upgrade.
fn installed_elixir_fingerprint() -> String {
    let Some(elixir) = on_path("elixir") else {
        return String::new();
    };
    let elixir = fs::canonicalize(&elixir).unwrap_or(elixir);
    let app = elixir
        .parent()
        .and_then(Path::parent)
        .map(|root| root.join("lib/elixir/ebin/elixir.app"));
    let app_text = app
        .and_then(|a| fs::read_to_string(a).ok())
        .unwrap_or_default();
    format!("{}\n{app_text}", elixir.display())
}

/// Names of the ERTS and library directories of the OTP that `erl` on PATH
/// belongs to: cheap, and changes with every OTP package upgrade.
fn installed_otp_fingerprint() -> String {
    let Some(erl) = on_path("erl") else {
        return String::new(); // the build reports the missing erl properly
    };
    let erl = fs::canonicalize(&erl).unwrap_or(erl);
    let Some(root) = erl.parent().and_then(Path::parent) else {
        return String::new();
    };
    let mut names: Vec<String> = [root.to_path_buf(), root.join("lib")]
        .iter()
        .filter_map(|d| fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    names.sort();
    format!("{}\n{}", root.display(), names.join("\n"))
}

/// A running node of the base release in a private copy of its root, with
/// its own epmd. Everything it started is stopped on drop, also when the
/// test panics.
#[derive(Debug)]
pub struct TestNode {
    flavor: Flavor,
    tmp: tempfile::TempDir,
    root: PathBuf,
    node_name: String,
    cookie: String,
    epmd_port: u16,
    http_port: u16,
    epmd: Child,
    daemon_script: Option<Child>,
    os_pid: Option<i32>,
    run_erl_pid: Option<i32>,
}

impl TestNode {
    /// Deploys a fresh copy of the Rebar3 base release and starts it with
    /// `bin/thermo daemon`; returns once the start script has finished and
    /// `/health` answers. Panics (after cleaning up) if it does not.
    pub fn start() -> TestNode {
        Self::start_flavor(Flavor::Rebar3)
    }

    /// Like [`start`](Self::start), for a node of `flavor`'s base release.
    /// A mix node gets its own cookie written into `ROOT/releases/COOKIE`,
    /// as an operator provisions one.
    pub fn start_flavor(flavor: Flavor) -> TestNode {
        Self::start_flavor_with(flavor, |root| {
            copy_tree(&releases_for(flavor).base_dir(), root)
        })
    }

    /// Like [`start`](Self::start), with the release root laid out by
    /// `deploy` (given the root's path, which does not exist yet) instead of
    /// copied from the base build.
    pub fn start_with(deploy: impl FnOnce(&Path)) -> TestNode {
        Self::start_flavor_with(Flavor::Rebar3, deploy)
    }

    /// [`start_with`](Self::start_with) for any flavor.
    pub fn start_flavor_with(flavor: Flavor, deploy: impl FnOnce(&Path)) -> TestNode {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("{}-node-", flavor.release_name()))
            .tempdir()
            .expect("creating a temp dir for the node");
        let root = tmp.path().join("root");
        deploy(&root);
        let cookie = random_hex(16);
        if flavor == Flavor::Mix {
            // No trailing newline, as mix writes it.
            fs::write(root.join("releases/COOKIE"), &cookie).expect("writing releases/COOKIE");
        }

        let id = unique_id();
        let (epmd, epmd_port) = start_epmd(&root);
        let mut node = TestNode {
            flavor,
            node_name: format!("{}_{id}@localhost", flavor.release_name()),
            cookie,
            http_port: free_port(),
            epmd_port,
            epmd,
            root,
            tmp,
            daemon_script: None,
            os_pid: None,
            run_erl_pid: None,
        };
        // From here on a panic drops `node`, which cleans up.
        node.boot();
        node
    }

    fn boot(&mut self) {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.path().join("daemon.out"))
            .expect("opening daemon.out");
        let mut cmd = Command::new(self.root.join(format!("bin/{}", self.release_name())));
        cmd.arg("daemon")
            // Keep relx/mix/erl knobs of the caller's environment out of the
            // node (what boots is decided by files on disk); then ours.
            .env_remove("RELEASE_VSN")
            .env_remove("RELEASE_COOKIE")
            .env_remove("RELEASE_TMP")
            .env_remove("RELX_CONFIG_PATH")
            .env_remove("VMARGS_PATH")
            .env_remove("RELX_REPLACE_OS_VARS")
            .env_remove("ERL_FLAGS")
            .env_remove("ERL_AFLAGS")
            .env_remove("ERL_ZFLAGS")
            .envs(self.env())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup daemon.out"))
            .stderr(log)
            // Its own process group: the script loops on erl_call + sleep until
            // the node answers, and all of that is killed together on failure.
            .process_group(0);
        self.daemon_script = Some(cmd.spawn().expect("spawning bin/thermo daemon"));

        // relx's script exits 0 once the node answers distribution
        // (erl_call), and after a failed boot it would poll forever, hence the
        // deadline; mix's returns at once, before the node answers.
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut script_done = false;
        let mut health = None;
        while !(script_done && health.is_some()) {
            if Instant::now() > deadline {
                panic!(
                    "node {} did not come up within {BOOT_TIMEOUT:?} (script finished: {script_done}, \
                     /health answered: {})\n{}",
                    self.node_name,
                    health.is_some(),
                    self.diagnostics()
                );
            }
            if !script_done {
                let script = self.daemon_script.as_mut().expect("script spawned");
                if let Some(status) = script.try_wait().expect("waiting for bin/thermo daemon") {
                    assert!(
                        status.success(),
                        "bin/thermo daemon failed: {status}\n{}",
                        self.diagnostics()
                    );
                    self.daemon_script = None;
                    script_done = true;
                }
            }
            if health.is_none() {
                health = self.health().ok();
            }
            thread::sleep(POLL);
        }
        let (_, body) = health.expect("loop ends with an answer");
        let pid: i32 = body["os_pid"]
            .as_str()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("/health has no os_pid: {body}"));
        self.os_pid = Some(pid);
        // `daemon` starts the BEAM under run_erl, which detaches itself: the
        // BEAM's ancestry is our only handle on it (relx: the parent; mix:
        // the grandparent, through `sh -c` without exec).
        let mut ancestor = parent_pid(pid);
        self.run_erl_pid = None;
        for _ in 0..3 {
            let Some(ppid) = ancestor else { break };
            if cmdline(ppid).is_some_and(|args| {
                args.first().is_some_and(|a| a.ends_with("run_erl"))
                    && args.iter().any(|a| self.in_tmp(a))
            }) {
                self.run_erl_pid = Some(ppid);
                break;
            }
            ancestor = parent_pid(ppid);
        }
    }

    /// Environment of the node: what `bin/REL` needs to start or talk to
    /// this node (also for starting it again, as beamup does).
    pub fn env(&self) -> Vec<(String, String)> {
        if self.flavor == Flavor::Mix {
            let alive = self.node_name.split('@').next().expect("name@host");
            return vec![
                // Short names: a long-names node (RELEASE_DISTRIBUTION=name)
                // refuses to connect to NAME@localhost ("Hostname localhost
                // is illegal"), which breaks `bin/thermex rpc` and `stop`.
                ("RELEASE_NODE".into(), self.node_name.clone()),
                ("RELEASE_DISTRIBUTION".into(), "sname".into()),
                ("THERMEX_HTTP_PORT".into(), self.http_port.to_string()),
                ("ERL_EPMD_PORT".into(), self.epmd_port.to_string()),
                // Pipes, logs and the rendered sys.config inside our temp dir.
                (
                    "RELEASE_TMP".into(),
                    format!("{}/release-tmp-{alive}", self.tmp_str()),
                ),
                ("ELIXIR_ERL_OPTIONS".into(), "-start_epmd false".into()),
            ];
        }
        let pipe_dir = format!("{}/pipes/", self.tmp_str()); // run_erl wants the slash
        vec![
            ("NODE_NAME".into(), self.node_name.clone()),
            ("COOKIE".into(), self.cookie.clone()),
            ("THERMO_HTTP_PORT".into(), self.http_port.to_string()),
            ("ERL_EPMD_PORT".into(), self.epmd_port.to_string()),
            ("THERMO_START_EPMD".into(), "false".into()),
            ("PIPE_DIR".into(), pipe_dir),
        ]
    }

    pub fn flavor(&self) -> Flavor {
        self.flavor
    }
    pub fn release_name(&self) -> &'static str {
        self.flavor.release_name()
    }

    /// A shell command line (for `sh -c`, as agent.toml's `[node] start`)
    /// that starts this node from disk: `env K=V... ROOT/bin/REL daemon`.
    pub fn start_command(&self) -> String {
        self.script_command("daemon")
    }

    /// Like [`start_command`](Self::start_command), for `bin/REL stop`.
    pub fn stop_command(&self) -> String {
        self.script_command("stop")
    }

    /// `env K=V... ROOT/bin/REL VERB` as one shell command line.
    pub fn script_command(&self, verb: &str) -> String {
        let mut words = vec!["env".to_string()];
        words.extend(
            self.env()
                .iter()
                .map(|(k, v)| shell_quote(&format!("{k}={v}"))),
        );
        words.push(shell_quote(&format!(
            "{}/bin/{}",
            self.root.display(),
            self.release_name()
        )));
        words.push(verb.into());
        words.join(" ")
    }

    /// Power loss: kills every process of this node with SIGKILL (BEAMs,
    /// run_erl, scripts; not the private epmd, which stands for the
    /// system's), then boots it again from disk with `bin/REL daemon`, waits
    /// for `/health` and records the new OS pid. Returns the version
    /// `/health` reports.
    pub fn restart_from_disk(&mut self) -> String {
        if let Some(mut script) = self.daemon_script.take() {
            let _ = killpg(Pid::from_raw(script.id() as i32), Signal::SIGKILL);
            let _ = script.wait();
        }
        let epmd = self.epmd_pid();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            // epmd runs from the root's ERTS, so it matches too.
            let left: Vec<i32> = self
                .our_processes()
                .into_iter()
                .filter(|&pid| pid != epmd)
                .collect();
            if left.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "processes {left:?} survived SIGKILL for 5 s"
            );
            for pid in left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.os_pid = None;
        self.run_erl_pid = None;
        self.boot();
        let (_, body) = self.health().expect("/health answered at boot");
        body["version"]
            .as_str()
            .unwrap_or_else(|| panic!("/health has no version: {body}"))
            .to_string()
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    pub fn node_name(&self) -> &str {
        &self.node_name
    }
    pub fn cookie(&self) -> &str {
        &self.cookie
    }
    pub fn epmd_port(&self) -> u16 {
        self.epmd_port
    }
    pub fn http_port(&self) -> u16 {
        self.http_port
    }
    /// OS pid of the BEAM as reported by `/health` when the node started.
    pub fn os_pid(&self) -> i32 {
        self.os_pid.expect("node booted")
    }
    /// The run_erl process that `daemon` started the BEAM under.
    pub fn run_erl_pid(&self) -> Option<i32> {
        self.run_erl_pid
    }
    /// The private epmd of this node.
    pub fn epmd_pid(&self) -> i32 {
        self.epmd.id() as i32
    }

    /// `GET /health`: the status code and the JSON body.
    pub fn health(&self) -> Result<(u16, Value)> {
        http_request(self.http_port, "GET", "/health")
    }

    /// `GET /state`.
    pub fn state(&self) -> Result<Value> {
        expect_ok(http_request(self.http_port, "GET", "/state")?)
    }

    /// `POST /incr`: increments the counter, returns the new state.
    pub fn incr(&self) -> Result<Value> {
        expect_ok(http_request(self.http_port, "POST", "/incr")?)
    }

    /// Polls `/health` until it answers with any status (the node may be
    /// restarting), up to `timeout`.
    pub fn wait_for_health(&self, timeout: Duration) -> Result<(u16, Value)> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.health() {
                Ok(answer) => return Ok(answer),
                Err(e) if Instant::now() > deadline => {
                    return Err(format!("/health did not answer within {timeout:?}: {e}").into());
                }
                Err(_) => thread::sleep(POLL),
            }
        }
    }

    /// BEAM processes currently running this node (there may be a newer one
    /// than [`os_pid`](Self::os_pid) after a restart).
    pub fn beam_pids(&self) -> Vec<i32> {
        self.our_processes()
            .into_iter()
            .filter(|&pid| comm(pid).is_some_and(|c| c.starts_with("beam")))
            .collect()
    }

    /// Kills the node's BEAM(s) with SIGKILL, like a crash would, and waits
    /// until they are gone; returns the pids killed.
    pub fn kill9(&self) -> Vec<i32> {
        let pids = self.beam_pids();
        for &pid in &pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        // Delivery is asynchronous; callers want the crash to have happened.
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|&pid| pid_running(pid)) {
            assert!(
                Instant::now() < deadline,
                "BEAM {pids:?} survived SIGKILL for 5 s"
            );
            thread::sleep(Duration::from_millis(5));
        }
        pids
    }

    fn tmp_str(&self) -> &str {
        self.tmp.path().to_str().expect("temp dir path is UTF-8")
    }

    /// Whether a process argument names a path in our temp dir.
    fn in_tmp(&self, arg: &str) -> bool {
        arg.contains(&format!("{}/", self.tmp_str()))
    }

    /// Processes of this node: an argument names the node (BEAMs, also ones
    /// beamup restarted; erl_call) or lies in our temp dir (run_erl, BEAMs).
    fn our_processes(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| pid != me && pid_running(pid))
            .filter(|&pid| {
                cmdline(pid)
                    .is_some_and(|args| args.iter().any(|a| a == &self.node_name || self.in_tmp(a)))
            })
            .collect()
    }

    fn diagnostics(&self) -> String {
        let mut out = String::new();
        let daemon_out = fs::read_to_string(self.tmp.path().join("daemon.out")).unwrap_or_default();
        out.push_str(&format!(
            "--- bin/{} daemon output:\n{daemon_out}\n",
            self.release_name()
        ));
        let mut logs: Vec<PathBuf> = Vec::new();
        for dir in std::iter::once(self.root.join("log")).chain(
            self.env()
                .into_iter()
                .filter(|(k, _)| k == "RELEASE_TMP")
                .map(|(_, v)| Path::new(&v).join("log")),
        ) {
            if let Ok(entries) = fs::read_dir(dir) {
                logs.extend(entries.filter_map(|e| Some(e.ok()?.path())));
            }
        }
        {
            logs.sort();
            for log in logs {
                let text = fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                out.push_str(&format!("--- {} (tail):\n", log.display()));
                for line in tail.iter().rev() {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        // The start script first, so that it cannot start anything more.
        if let Some(mut script) = self.daemon_script.take() {
            let _ = killpg(Pid::from_raw(script.id() as i32), Signal::SIGKILL);
            let _ = script.wait();
        }
        // BEAMs and run_erl, by pid: the ones recorded at start plus whatever
        // else carries this node's name or temp dir (a beamup restart may
        // have replaced the BEAM). Repeated because run_erl or a restart in
        // flight can leave a new process behind after a pass.
        let recorded: Vec<i32> = self.os_pid.into_iter().chain(self.run_erl_pid).collect();
        for &pid in &recorded {
            if pid_running(pid)
                && cmdline(pid).is_some_and(|args| args.iter().any(|a| self.in_tmp(a)))
            {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = self.our_processes();
            if left.is_empty() || Instant::now() > deadline {
                if !left.is_empty() {
                    eprintln!(
                        "TestNode {}: processes survived SIGKILL: {left:?}",
                        self.node_name
                    );
                }
                break;
            }
            for pid in left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Last, so that nothing of ours is left looking for it.
        let _ = self.epmd.kill();
        let _ = self.epmd.wait();
    }
}

/// True if `pid` exists and is not a zombie. Zombies count as gone: whatever
/// reaps them is not up to us (PID 1 of a container may never do it).
pub fn pid_running(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name, which may itself
        // contain spaces or parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

fn parent_pid(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn cmdline(pid: i32) -> Option<Vec<String>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|&b| b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

fn comm(pid: i32) -> Option<String> {
    Some(
        fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()?
            .trim()
            .to_owned(),
    )
}

/// Starts `epmd -port P` in the foreground as our child, on a free port,
/// and waits until it accepts connections.
fn start_epmd(root: &Path) -> (Child, u16) {
    let epmd_bin = fs::read_dir(root)
        .expect("reading the release root")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("erts-"))
        })
        .map(|erts| erts.join("bin/epmd"))
        // A release without ERTS runs on the system's.
        .or_else(|| on_path("epmd"))
        .expect("epmd: neither in the release's ERTS nor on PATH");
    // The free port can be taken by someone else before epmd binds it.
    for _ in 0..5 {
        let port = free_port();
        let mut child = Command::new(&epmd_bin)
            .args(["-port", &port.to_string(), "-address", "127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning epmd");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return (child, port);
            }
            if child.try_wait().expect("waiting for epmd").is_some() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("could not start a private epmd");
}

/// `s` as one word for sh.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A port on 127.0.0.1 free at the time of asking, for a process to
/// listen on later. Drawn below the kernel's ephemeral range: a port the
/// kernel hands out (the local end of every outgoing connection, any
/// `bind(0)`) could be taken in the meantime by a process the suite
/// started, and the listener would find it in use. Never the same port
/// twice in one test process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let ephemeral_from = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000u16, ephemeral_from.saturating_sub(1));
    assert!(
        high > low + 1000,
        "ephemeral ports start at {ephemeral_from}"
    );
    let mut given = GIVEN.lock().unwrap();
    loop {
        let mut r = [0u8; 2];
        getrandom::fill(&mut r).expect("getrandom");
        let port = low + u16::from_le_bytes(r) % (high - low);
        if !given.contains(&port) && TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
}

/// Node names must be unique across parallel tests and test processes, and
/// across runs (a leftover from a killed run must not match ours).
fn unique_id() -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    format!(
        "it{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        random_hex(4)
    )
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("getrandom");
    hex::encode(buf)
}

fn copy_tree(from: &Path, to: &Path) {
    // cp -a keeps modes and symlinks and is fast; the source is our own build.
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("running cp");
    assert!(
        status.success(),
        "cp -a {} {} failed",
        from.display(),
        to.display()
    );
}

/// A blocking HTTP/1.1 request without a body; the server closes the
/// connection after one response.
fn http_request(port: u16, method: &str, path: &str) -> Result<(u16, Value)> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8(raw)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("incomplete HTTP response: {text:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad HTTP status line: {head:?}"))?;
    let json = serde_json::from_str(body)
        .map_err(|e| format!("body of {method} {path} is not JSON ({e}): {body:?}"))?;
    Ok((status, json))
}

fn expect_ok((status, body): (u16, Value)) -> Result<Value> {
    if status == 200 {
        Ok(body)
    } else {
        Err(format!("HTTP {status}: {body}").into())
    }
}
