//! A real systemd, booted in `systemd-nspawn` from a Debian root file
//! system that `containers/rootfs` builds from Debian's packages (cached
//! under the cargo target dir, keyed by the script). The machine shares the
//! host's network namespace (its loopback is ours: brokers and nodes pick
//! free ports). Stopped by the nspawn PID recorded, also when a test
//! panics; the cgroup directories made for it are removed afterwards.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};

const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// The root file system tarball, built on first use (about 30-60 s; 40 MB).
pub fn rootfs() -> &'static Path {
    static ROOTFS: OnceLock<PathBuf> = OnceLock::new();
    ROOTFS.get_or_init(build_rootfs)
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn build_rootfs() -> PathBuf {
    let script = repo().join("containers/rootfs");
    let mirror = debian_mirror();
    let mut h = Sha256::new();
    h.update(fs::read(&script).expect("reading containers/rootfs"));
    h.update(mirror.as_bytes());
    let key = hex::encode(&h.finalize()[..10]);
    let cache = Path::new(env!("CARGO_TARGET_TMPDIR")).join("rootfs-cache");
    fs::create_dir_all(&cache).unwrap();
    let out = cache.join(format!("{key}.tar.zst"));
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(cache.join(format!("{key}.lock")))
        .unwrap();
    let _lock = Flock::lock(lock, FlockArg::LockExclusive).expect("locking the rootfs cache");
    if !out.exists() {
        let started = Instant::now();
        let run = Command::new(&script)
            .arg(&out)
            .arg(&mirror)
            .output()
            .unwrap();
        assert!(
            run.status.success(),
            "containers/rootfs failed ({}):\n{}\n{}",
            run.status,
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        eprintln!("built {} in {:.1?}", out.display(), started.elapsed());
    }
    out
}

/// The host's Debian mirror (deb822 sources), else deb.debian.org.
fn debian_mirror() -> String {
    fs::read_to_string("/etc/apt/sources.list.d/debian.sources")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("URIs:"))
                .and_then(|u| u.split_whitespace().next().map(str::to_string))
        })
        .unwrap_or_else(|| "http://deb.debian.org/debian".into())
}

/// Fails with what to install when a tool the machine needs is missing.
pub fn require_tools() {
    for tool in ["systemd-nspawn", "mmdebstrap", "zstd", "nsenter"] {
        if !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            panic!("{tool} is missing: tests/setup installs it");
        }
    }
}

/// A booted machine.
pub struct Machine {
    pub name: String,
    tmp: tempfile::TempDir,
    nspawn: Option<Child>,
    init: i32,
}

impl Machine {
    /// Unpacks the root file system, lets `prepare` add files to it (given
    /// its path), and boots it with `binds` (host path, path inside) bound
    /// read-only. Returns once systemd reports `running` (or `degraded`).
    pub fn boot(binds: &[(&Path, &str)], prepare: impl FnOnce(&Path)) -> Machine {
        require_tools();
        let tarball = rootfs();
        let tmp = tempfile::Builder::new()
            .prefix("beamup-machine-")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("root");
        fs::create_dir(&dir).unwrap();
        let unpack = Command::new("sh")
            .arg("-c")
            .arg("zstd -dc \"$1\" | tar -C \"$2\" --numeric-owner -xf -")
            .arg("sh")
            .arg(tarball)
            .arg(&dir)
            .status()
            .unwrap();
        assert!(unpack.success(), "unpacking {}", tarball.display());
        prepare(&dir);

        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "beamup-it-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        for h in ["systemd", "unified"] {
            fs::create_dir_all(format!("/sys/fs/cgroup/{h}/{name}")).unwrap();
        }
        let log = fs::File::create(tmp.path().join("console.log")).unwrap();
        // nspawn with --keep-unit splits the cgroup it starts in: start it
        // from one of its own (the shell moves itself, then execs).
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!(
                "echo $$ > /sys/fs/cgroup/systemd/{name}/cgroup.procs && \
                 echo $$ > /sys/fs/cgroup/unified/{name}/cgroup.procs && exec \"$@\""
            ))
            .arg("sh")
            .arg("systemd-nspawn")
            .arg("-D")
            .arg(&dir)
            .args(["-M", &name, "--boot", "--register=no", "--keep-unit"])
            .arg("--console=read-only");
        for (host, inside) in binds {
            cmd.arg(format!("--bind-ro={}:{inside}", host.display()));
        }
        cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let nspawn = cmd.spawn().expect("spawning systemd-nspawn");
        let mut m = Machine {
            name,
            tmp,
            nspawn: Some(nspawn),
            init: 0,
        };
        m.wait_booted();
        m
    }

    fn wait_booted(&mut self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let procs = format!(
            "/sys/fs/cgroup/unified/{}/payload/init.scope/cgroup.procs",
            self.name
        );
        loop {
            assert!(
                Instant::now() < deadline,
                "machine did not boot within {BOOT_TIMEOUT:?}:\n{}",
                self.console()
            );
            if let Some(c) = self.nspawn.as_mut()
                && let Some(status) = c.try_wait().unwrap()
            {
                self.nspawn = None;
                panic!("systemd-nspawn exited: {status}\n{}", self.console());
            }
            if self.init == 0 {
                self.init = fs::read_to_string(&procs)
                    .ok()
                    .and_then(|s| s.lines().next().and_then(|l| l.trim().parse().ok()))
                    .unwrap_or(0);
            }
            if self.init != 0 {
                let out = self.sh("systemctl is-system-running");
                let state = String::from_utf8_lossy(&out.stdout);
                if matches!(state.trim(), "running" | "degraded") {
                    return;
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The machine's root directory, as the host sees it.
    pub fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    pub fn console(&self) -> String {
        fs::read_to_string(self.tmp.path().join("console.log")).unwrap_or_default()
    }

    /// Runs `sh -c SCRIPT` inside the machine (all its namespaces, as root).
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.init.to_string(), "-a", "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("running nsenter")
    }

    /// Like [`sh`](Self::sh), failing on a non-zero exit; returns stdout.
    #[track_caller]
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        assert!(
            out.status.success(),
            "in the machine: {script}\nexit {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `systemctl show -p PROP --value UNIT`.
    pub fn prop(&self, unit: &str, prop: &str) -> String {
        self.ok(&format!("systemctl show -p {prop} --value {unit}"))
            .trim()
            .to_string()
    }

    /// `journalctl -u UNIT` as a user reads it.
    pub fn journal(&self, unit: &str) -> String {
        self.ok(&format!("journalctl -u {unit} --no-pager -o cat"))
    }

    /// Runs `sh -c SCRIPT` in the mount namespace of process `pid` of the
    /// machine (a service's sandbox), as root.
    pub fn sh_in_sandbox_of(&self, pid: &str, script: &str) -> Output {
        self.sh(&format!(
            "nsenter -t {pid} -m -- sh -c '{}'",
            script.replace('\'', "'\\''")
        ))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if let Some(mut c) = self.nspawn.take() {
            // SIGTERM to nspawn: a clean poweroff of the machine.
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if c.try_wait().ok().flatten().is_some() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGKILL);
                    let _ = c.wait();
                    break;
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        for h in ["systemd", "unified"] {
            remove_cgroup(Path::new(&format!("/sys/fs/cgroup/{h}/{}", self.name)));
        }
    }
}

/// Removes a cgroup directory and its children, deepest first; the kernel
/// may take a moment to empty them after the last process exits.
fn remove_cgroup(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if !dir.exists() || remove_tree(dir) || Instant::now() > deadline {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

fn remove_tree(dir: &Path) -> bool {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path());
            }
        }
    }
    fs::remove_dir(dir).is_ok()
}
