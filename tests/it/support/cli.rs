//! Running the real `beamup` binary, and the files its commands work on.

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// What a `beamup` run printed and returned.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }

    /// Asserts the exit code and that stderr is exactly one error line
    /// containing `needle`.
    #[track_caller]
    pub fn fails(&self, code: i32, needle: &str) -> &Self {
        assert_eq!(
            self.code, code,
            "wrong exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}:\n{}",
            self.stderr
        );
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "error is not one line:\n{}", self.stderr);
        assert!(lines[0].starts_with("beamup: error: "), "{}", lines[0]);
        self
    }

    /// Like [`Run::fails`], for commands that report progress on stderr
    /// first: the error is the last line, and the only error line.
    #[track_caller]
    pub fn fails_after_progress(&self, code: i32, needle: &str) -> &Self {
        assert_eq!(
            self.code, code,
            "wrong exit code\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        let errors: Vec<&str> = self
            .stderr
            .lines()
            .filter(|l| l.starts_with("beamup: error: "))
            .collect();
        assert_eq!(errors.len(), 1, "expected one error line:\n{}", self.stderr);
        assert_eq!(
            Some(errors[0]),
            self.stderr.lines().last(),
            "{}",
            self.stderr
        );
        assert!(
            errors[0].contains(needle),
            "error lacks {needle:?}:\n{}",
            self.stderr
        );
        self
    }
}

fn finish(out: Output) -> Run {
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_beamup")
}

/// Runs `beamup ARGS` in `dir`. Per-user state (the last bundle sequence
/// number) is kept in `dir/.state`, not in the home directory of whoever
/// runs the tests.
pub fn beamup(dir: &Path, args: &[&str]) -> Run {
    finish(
        Command::new(bin())
            .args(args)
            .current_dir(dir)
            .env_remove("RUST_LOG")
            .env("XDG_STATE_HOME", dir.join(".state"))
            .output()
            .expect("run beamup"),
    )
}

/// `beamup bundle` of `tarball` into `out`, signed with the fixtures'
/// `keys/k.key` in `dir`, with `extra` flags; it must succeed.
pub fn sign_bundle(dir: &Path, tarball: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec![
        "bundle",
        "--release",
        tarball.to_str().unwrap(),
        "--key",
        "keys/k.key",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    beamup(dir, &args).ok();
}

/// Runs `beamup ARGS` with its address space capped, so that an attempt to
/// allocate what a hostile file claims fails loudly instead of succeeding on
/// a large machine.
pub fn beamup_with_memory_cap(dir: &Path, cap_bytes: u64, args: &[&str]) -> Run {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .current_dir(dir)
        .env("XDG_STATE_HOME", dir.join(".state"));
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::resource::setrlimit(
                nix::sys::resource::Resource::RLIMIT_AS,
                cap_bytes,
                cap_bytes,
            )
            .map_err(std::io::Error::from)
        });
    }
    finish(cmd.output().expect("run beamup"))
}

/// Writes a gzip-compressed release tarball shaped like `rebar3 tar` output:
/// `releases/VSN/NAME.rel`, `start.boot`, an optional relup, and an
/// application directory with `payload` bytes of incompressible data.
pub fn fake_release(
    dir: &Path,
    name: &str,
    vsn: &str,
    upgrade_from: &[&str],
    payload: usize,
) -> PathBuf {
    let path = dir.join(format!("{name}-{vsn}.tar.gz"));
    let file = fs::File::create(&path).unwrap();
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut add = |p: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, p, data).unwrap();
    };
    let rel = format!(
        "{{release,{{\"{name}\",\"{vsn}\"}},{{erts,\"13.1.5\"}},[{{kernel,\"8.5.3\"}},{{stdlib,\"4.2\"}},{{{name},\"{vsn}\"}}]}}.\n"
    );
    add(&format!("releases/{vsn}/{name}.rel"), rel.as_bytes());
    add(&format!("releases/{vsn}/start.boot"), b"boot");
    if !upgrade_from.is_empty() {
        let ups: Vec<String> = upgrade_from
            .iter()
            .map(|v| format!("{{\"{v}\",[],[point_of_no_return]}}"))
            .collect();
        let relup = format!("{{\"{vsn}\",[{}],[{}]}}.\n", ups.join(","), ups.join(","));
        add(&format!("releases/{vsn}/relup"), relup.as_bytes());
    }
    let mut data = vec![0u8; payload];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for b in data.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    add(&format!("lib/{name}-{vsn}/priv/blob"), &data);
    tar.into_inner().unwrap().finish().unwrap().flush().unwrap();
    path
}

/// A small POSIX tar header for hand-made containers.
pub fn tar_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    *h.as_bytes()
}
