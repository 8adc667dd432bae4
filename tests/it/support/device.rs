//! A device for integration tests: a running node of a base release (of any
//! [`Flavor`]), a trust root with one key, a state dir and the agent.toml
//! that ties them together. Used by the `install` and `mqtt` tests.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::support::cli::{Run, beamup};
use crate::support::otp::{Flavor, TestNode, releases_for};

/// A device: a running base node, a trust root with one key, a state dir
/// and the agent.toml that ties them together.
pub struct Device {
    pub node: TestNode,
    pub dir: tempfile::TempDir,
}

const DEFAULT_TIMING: &str = "timeout = \"8s\"\nsoak = \"1s\"";

impl Device {
    /// A device of the Rebar3 flavor.
    pub fn new() -> Device {
        Self::new_flavor(Flavor::Rebar3)
    }

    pub fn new_flavor(flavor: Flavor) -> Device {
        Self::with_health_flavor(flavor, DEFAULT_TIMING)
    }

    /// A Rebar3 device with these `[health]` timing lines.
    pub fn with_health(timing: &str) -> Device {
        Self::with_health_flavor(Flavor::Rebar3, timing)
    }

    /// agent.toml for the flavor: release name, start/stop commands, and the
    /// cookie (mix: `cookie_file = ROOT/releases/COOKIE`, where the node's
    /// cookie was provisioned).
    pub fn with_health_flavor(flavor: Flavor, timing: &str) -> Device {
        let node = TestNode::start_flavor(flavor);
        let dir = tempfile::Builder::new()
            .prefix("beamup-device-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        keys_and_root(d);
        let root = node.root().display().to_string();
        let cookie = match flavor {
            Flavor::Mix => format!(
                "cookie_file = {}",
                toml_str(&format!("{root}/releases/COOKIE"))
            ),
            _ => format!("cookie = {}", toml_str(node.cookie())),
        };
        let config = format!(
            r#"[release]
root = {root_str}
name = "{release}"
[node]
name = "{name}"
{cookie}
epmd_port = {epmd}
start = {start}
stop = {stop}
call_timeout = "10s"
start_timeout = "30s"
[health]
http = "http://127.0.0.1:{http}/health"
expect_version = true
interval = "100ms"
{timing}
[trust]
root = "{dir}/root.json"
[state]
dir = "{dir}/state"
"#,
            root_str = toml_str(&root),
            release = node.release_name(),
            start = toml_str(&node.start_command()),
            stop = toml_str(&node.stop_command()),
            name = node.node_name(),
            epmd = node.epmd_port(),
            http = node.http_port(),
            dir = d.display(),
        );
        fs::write(d.join("agent.toml"), config).unwrap();
        Device { node, dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn flavor(&self) -> Flavor {
        self.node.flavor()
    }

    /// A signed bundle of one of the built versions of this flavor.
    pub fn bundle(&self, vsn: &str) -> PathBuf {
        let out = self
            .path()
            .join(format!("{}-{vsn}.bundle", self.node.release_name()));
        if !out.exists() {
            let tarball = releases_for(self.flavor())
                .tarball(vsn)
                .display()
                .to_string();
            beamup(
                self.path(),
                &[
                    "bundle",
                    "--release",
                    &tarball,
                    "--key",
                    "keys/k.key",
                    "--out",
                    out.to_str().unwrap(),
                ],
            )
            .ok();
        }
        out
    }

    /// A signed bundle with extra `beamup bundle` arguments (chunk size,
    /// expiry, targets, key), written to `name` in the device dir.
    pub fn bundle_with(&self, vsn: &str, name: &str, extra: &[&str]) -> PathBuf {
        let out = self.path().join(name);
        let tarball = releases_for(self.flavor())
            .tarball(vsn)
            .display()
            .to_string();
        let mut args = vec![
            "bundle",
            "--release",
            &tarball,
            "--out",
            out.to_str().unwrap(),
        ];
        if !extra.contains(&"--key") {
            args.extend(["--key", "keys/k.key"]);
        }
        args.extend(extra);
        beamup(self.path(), &args).ok();
        out
    }

    /// Appends an `[mqtt]` table to agent.toml (`extra`: more lines of it).
    pub fn add_mqtt(&self, url: &str, device_id: &str, groups: &[&str], extra: &str) {
        let cfg = self.path().join("agent.toml");
        let groups: Vec<String> = groups.iter().map(|g| format!("{g:?}")).collect();
        let text = fs::read_to_string(&cfg).unwrap()
            + &format!(
                "[mqtt]\nurl = \"{url}\"\ndevice_id = \"{device_id}\"\nfleet = \"acme\"\ngroups = [{}]\n{extra}\n",
                groups.join(", ")
            );
        fs::write(&cfg, text).unwrap();
    }

    pub fn install(&self, bundle: &Path, extra: &[&str]) -> Run {
        self.install_env(bundle, extra, &[])
    }

    pub fn install_env(&self, bundle: &Path, extra: &[&str], env: &[(&str, &str)]) -> Run {
        let mut cmd = Command::new(crate::support::cli::bin());
        cmd.args([
            "install",
            bundle.to_str().unwrap(),
            "--config",
            "agent.toml",
        ])
        .args(extra)
        .current_dir(self.path())
        .env_remove("RUST_LOG");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn status(&self) -> Value {
        let run = beamup(self.path(), &["status", "--config", "agent.toml", "--json"]);
        run.ok();
        serde_json::from_str(&run.stdout).unwrap()
    }

    pub fn health(&self) -> (u16, Value) {
        self.node.wait_for_health(Duration::from_secs(20)).unwrap()
    }

    pub fn version_and_counter(&self) -> (String, u64) {
        let (status, body) = self.health();
        assert_eq!(status, 200, "{body}");
        (
            body["version"].as_str().unwrap().to_string(),
            body["counter"].as_u64().unwrap(),
        )
    }

    /// The device is consistent on `vsn`: it runs it, it is permanent, an
    /// OS restart would boot it (relx: bin/REL is bin/REL-VSN; every flavor:
    /// start_erl.data names it, which is what mix's script boots), no install
    /// is in progress, and no other version's files are left over.
    pub fn assert_settled_on(&self, vsn: &str, gone: &[&str]) {
        let st = self.status();
        assert_eq!(st["node"]["running"], vsn, "{st:#}");
        assert_eq!(st["node"]["permanent"], vsn, "{st:#}");
        assert!(st["install_in_progress"].is_null(), "{st:#}");
        let root = self.node.root();
        let rel = self.node.release_name();
        if self.flavor() != Flavor::Mix {
            assert_eq!(
                fs::read(root.join(format!("bin/{rel}"))).unwrap(),
                fs::read(root.join(format!("bin/{rel}-{vsn}"))).unwrap(),
                "bin/{rel} does not boot {vsn}"
            );
        }
        let start_erl = fs::read_to_string(root.join("releases/start_erl.data")).unwrap();
        assert_eq!(
            start_erl.split_whitespace().nth(1),
            Some(vsn),
            "start_erl.data: {start_erl}"
        );
        assert!(root.join(format!("releases/{vsn}/start.boot")).is_file());
        for v in gone {
            for p in [
                format!("releases/{v}"),
                format!("lib/{rel}-{v}"),
                format!("bin/{rel}-{v}"),
            ] {
                assert!(!root.join(&p).exists(), "{p} left behind");
            }
        }
    }

    /// Power loss and reboot: the node is killed and started from disk, and
    /// it must come up on the version `beamup status` calls permanent.
    pub fn assert_boots_permanent(&mut self) {
        let st = self.status();
        let permanent = st["node"]["permanent"]
            .as_str()
            .unwrap_or_else(|| panic!("status names no permanent release: {st:#}"))
            .to_string();
        let booted = self.node.restart_from_disk();
        assert_eq!(
            booted, permanent,
            "after a restart from disk the node runs {booted}, but {permanent} was permanent"
        );
    }

    /// Hashes of every file under the release root that beamup could touch
    /// (logs and the start script's rendered vm.args excluded).
    pub fn snapshot(&self) -> BTreeMap<PathBuf, [u8; 32]> {
        let mut out = BTreeMap::new();
        walk(self.node.root(), self.node.root(), &mut out);
        out
    }
}

/// The signed envelope of a bundle (its `manifest.json`), byte for byte.
pub fn envelope_of(bundle: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut a = tar::Archive::new(fs::File::open(bundle).unwrap());
    let mut first = a.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(first.path().unwrap().to_str(), Some("manifest.json"));
    let mut out = Vec::new();
    first.read_to_end(&mut out).unwrap();
    out
}

/// `s` as a TOML basic string.
fn toml_str(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// One signing key (`keys/k.key`, `keys/k.pub`) and a trust root
/// (`root.json`) of it alone, in `d`.
pub fn keys_and_root(d: &Path) {
    beamup(d, &["keygen", "--out", "keys", "--name", "k"]).ok();
    beamup(
        d,
        &[
            "root",
            "init",
            "--key",
            "keys/k.pub",
            "--threshold",
            "1",
            "--sign",
            "keys/k.key",
            "--out",
            "root.json",
        ],
    )
    .ok();
}

pub fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, [u8; 32]>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_path_buf();
        if rel.starts_with("log") || rel.file_name().is_some_and(|n| n == "vm.args") {
            continue;
        }
        let meta = fs::symlink_metadata(&p).unwrap();
        if meta.is_dir() {
            out.insert(rel, [0; 32]);
            walk(root, &p, out);
        } else if meta.file_type().is_symlink() {
            let target = fs::read_link(&p).unwrap();
            out.insert(
                rel,
                Sha256::digest(target.as_os_str().as_encoded_bytes()).into(),
            );
        } else if meta.is_file() {
            out.insert(rel, Sha256::digest(fs::read(&p).unwrap_or_default()).into());
        } else {
            // A FIFO or socket of a running node (run_erl's pipes): never read.
            out.insert(rel, [1; 32]);
        }
    }
}
