//! Podman (Debian's 4.3.1, runc, cgroupfs, no registry) for the container
//! tests: one storage under the cargo target dir (`target/tmp/podman/`),
//! held under a file lock by one test at a time, and the image of
//! `containers/Containerfile` built once per hash of its inputs (the root
//! file system of `containers/rootfs`, the container files, the beamup
//! binary, catatonit). A [`Pod`] is removed by its name, with the volumes
//! it used and its `/libpod_parent` cgroups, also when a test panics.

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};
use sha2::{Digest, Sha256};

use crate::support::nspawn::rootfs;

/// The tag `containers/pod.yaml` names.
pub const IMAGE: &str = "localhost/beamup:latest";

/// runc rather than Debian's default crun (which refuses hybrid cgroups),
/// cgroupfs (no systemd), open-file limits within the host's hard limit,
/// no default bridge network (a pod here runs with `--network host`).
const CONTAINERS_CONF: &str = r#"[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"#;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Fails with what to install when a tool is missing.
pub fn require_tools() {
    for tool in ["podman", "runc", "catatonit", "zstd"] {
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

/// The test storage, locked for the caller's lifetime, with the image
/// tagged [`IMAGE`].
pub struct Podman {
    dir: PathBuf,
    _lock: Flock<fs::File>,
}

impl Podman {
    pub fn open() -> Podman {
        require_tools();
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("podman");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("containers.conf"), CONTAINERS_CONF).unwrap();
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("lock"))
            .unwrap();
        let lock = Flock::lock(lock, FlockArg::LockExclusive).expect("locking the podman storage");
        let p = Podman { dir, _lock: lock };
        p.build_image();
        p
    }

    /// `podman --root ... --runroot ...` as a shell word list.
    fn global(&self) -> Vec<String> {
        vec![
            "--root".into(),
            self.dir.join("root").display().to_string(),
            "--runroot".into(),
            self.dir.join("runroot").display().to_string(),
        ]
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new("podman");
        c.args(self.global())
            .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("running podman")
    }

    /// Runs podman, failing on a non-zero exit; returns stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "podman {}: {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn build_image(&self) {
        let rootfs = rootfs();
        let beamup = PathBuf::from(crate::support::cli::bin());
        let catatonit = PathBuf::from("/usr/bin/catatonit");
        let mut h = Sha256::new();
        // The rootfs cache is named by the hash of what made it.
        h.update(rootfs.file_name().unwrap().as_encoded_bytes());
        for f in [
            "Containerfile",
            "build-image",
            "beamup-release",
            "beamup-node",
        ] {
            h.update(fs::read(repo().join("containers").join(f)).unwrap());
        }
        h.update(fs::read(&beamup).unwrap());
        h.update(fs::read(&catatonit).unwrap());
        let tag = format!("localhost/beamup:{}", hex::encode(&h.finalize()[..10]));
        let exists = self.run(&["image", "exists", &tag]).status.success();
        if !exists {
            let started = Instant::now();
            let podman = std::iter::once("podman".to_string())
                .chain(self.global())
                .collect::<Vec<_>>()
                .join(" ");
            let out = Command::new(repo().join("containers/build-image"))
                .arg(rootfs)
                .arg(&beamup)
                .arg(&tag)
                .env("PODMAN", podman)
                .env("CONTAINERS_CONF", self.dir.join("containers.conf"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "containers/build-image failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            eprintln!("built {tag} in {:.1?}", started.elapsed());
            // Earlier builds' images: only the current one is kept.
            let old = self.ok(&[
                "images",
                "--filter",
                "reference=localhost/beamup",
                "--format",
                "{{.Repository}}:{{.Tag}}",
            ]);
            for t in old.lines().filter(|t| *t != tag && *t != IMAGE) {
                let _ = self.run(&["rmi", t]);
            }
        }
        self.ok(&["tag", &tag, IMAGE]);
    }

    /// A named volume (removed with the pod that uses it, see
    /// [`Pod::play`]); returns its directory on the host.
    pub fn volume_dir(&self, name: &str) -> PathBuf {
        let out = self.run(&["volume", "inspect", name, "--format", "{{.Mountpoint}}"]);
        if !out.status.success() {
            self.ok(&["volume", "create", name]);
            return self.volume_dir(name);
        }
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    }
}

/// A pod from a Kubernetes manifest, removed on drop with its volumes.
pub struct Pod<'a> {
    pub podman: &'a Podman,
    pub name: String,
    manifest: PathBuf,
    volumes: Vec<String>,
    ids: Vec<String>,
}

impl<'a> Pod<'a> {
    /// Removes what an earlier run may have left under these names, lets
    /// `prepare` fill volumes (through [`Podman::volume_dir`]), then runs
    /// `podman kube play --network host MANIFEST`: the pod shares the
    /// host's loopback, where the broker and `beamup serve` run.
    pub fn play(
        podman: &'a Podman,
        manifest: &Path,
        name: &str,
        volumes: &[&str],
        prepare: impl FnOnce(),
    ) -> Pod<'a> {
        let mut pod = Pod {
            podman,
            name: name.into(),
            manifest: manifest.into(),
            volumes: volumes.iter().map(|v| v.to_string()).collect(),
            ids: vec![],
        };
        pod.remove();
        prepare();
        pod.start();
        pod
    }

    /// `podman kube play` of the manifest (again, after [`down`](Self::down)).
    pub fn start(&mut self) {
        let manifest = self.manifest.display().to_string();
        self.podman
            .ok(&["kube", "play", "--network", "host", &manifest]);
        let id = self
            .podman
            .ok(&["pod", "inspect", &self.name, "--format", "{{.ID}}"]);
        self.ids.push(id.trim().to_string());
    }

    /// `podman kube down`: the pod and its containers go, the volumes stay
    /// (as a Deployment's pod is replaced and its claim kept).
    pub fn down(&mut self) {
        let manifest = self.manifest.display().to_string();
        self.podman.ok(&["kube", "down", &manifest]);
        self.remove_cgroups();
    }

    /// The container `NAME-CONTAINER` of this pod.
    pub fn container(&self, container: &str) -> String {
        format!("{}-{container}", self.name)
    }

    /// What the container printed, across its restarts.
    pub fn logs(&self, container: &str) -> String {
        let out = self.podman.run(&["logs", &self.container(container)]);
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }

    /// `{{.State.Status}}` of the container: running, exited, ...
    pub fn status(&self, container: &str) -> String {
        let out = self.podman.run(&[
            "inspect",
            &self.container(container),
            "--format",
            "{{.State.Status}}",
        ]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn remove(&mut self) {
        let _ = self
            .podman
            .run(&["pod", "rm", "-f", "-t", "10", &self.name]);
        for v in &self.volumes {
            let _ = self.podman.run(&["volume", "rm", "-f", v]);
        }
        self.remove_cgroups();
    }

    fn remove_cgroups(&self) {
        for id in &self.ids {
            for h in fs::read_dir("/sys/fs/cgroup")
                .into_iter()
                .flatten()
                .flatten()
            {
                let dir = h.path().join("libpod_parent").join(id);
                remove_cgroup(&dir);
            }
        }
    }
}

impl Drop for Pod<'_> {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Removes a cgroup directory and its children, deepest first; the kernel
/// may take a moment to empty them after the last process exits.
fn remove_cgroup(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while dir.exists() && !remove_tree(dir) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
}

fn remove_tree(dir: &Path) -> bool {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&e.path());
        }
    }
    fs::remove_dir(dir).is_ok()
}
