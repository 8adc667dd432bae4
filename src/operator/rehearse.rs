//! `beamup rehearse`: an upgrade tried out before it ships. For each
//! from-version, in a private temporary directory: provision the old
//! release in an empty root (as `beamup unpack` does), boot it with its own
//! node name, cookie, epmd and ports, then drive the real install engine
//! through upgrade, hot downgrade and upgrade again, each health-gated, with
//! the user's checks after every step.
//!
//! Bundles are signed with a key made for the run and kept in memory only;
//! the trust root that trusts it lives in the temporary directory. Every
//! process the rehearsal starts carries `REHEARSAL_MARKER=<id>` in its
//! environment (inherited through `run_erl`'s detaching and every exec), so
//! that the sweep can find and kill them by PID. A reaper process (this
//! binary, `rehearse-reap`, in a session of its own) waits on a pipe from
//! the rehearsal and sweeps when it closes: after a normal end, an error, a
//! signal, and also after `kill -9` of the rehearsal.

use std::fs;
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::bundle::Bundle;
use crate::device::unpack;
use crate::engine::install::{Engine, InstallOptions, Progress, Step};
use crate::engine::settings::{EngineSettings, StrategyRule};
use crate::engine::state::OutcomeKind;
use crate::error::{Error, IoContext, Result};
use crate::health::{self, HealthConfig};
use crate::limits::LIMITS;
use crate::node::link::{LinkSettings, NodeLink};
use crate::operator::bundle::{self as make, BundleOptions};
use crate::release::metadata;
use crate::trust::keys::SecretKey;
use crate::trust::root::Root;

/// The environment variable that marks every process of one rehearsal.
pub(crate) const MARKER_VAR: &str = "REHEARSAL_MARKER";

/// Which environment variables the release reads its settings from.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EnvNames {
    pub(crate) node_name: Option<String>,
    pub(crate) cookie: Option<String>,
    pub(crate) http_port: Option<String>,
    pub(crate) epmd_port: Option<String>,
}

impl EnvNames {
    pub(crate) const ROLES: [&str; 4] = ["node_name", "cookie", "http_port", "epmd_port"];

    /// The variable named for `role`.
    pub(crate) fn slot(&mut self, role: &str) -> Option<&mut Option<String>> {
        match role {
            "node_name" => Some(&mut self.node_name),
            "cookie" => Some(&mut self.cookie),
            "http_port" => Some(&mut self.http_port),
            "epmd_port" => Some(&mut self.epmd_port),
            _ => None,
        }
    }
}

/// Whether `var` can name an environment variable (it ends up in an
/// `env NAME=value` command line).
pub(crate) fn is_env_var_name(var: &str) -> bool {
    !var.is_empty()
        && !var.starts_with(|c: char| c.is_ascii_digit())
        && var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// What a `--config` file and the flags can both set; a flag wins over the
/// file, the file over the defaults.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Settings {
    pub(crate) health_http: Option<String>,
    #[serde(default, deserialize_with = "crate::durations::deserialize_some")]
    pub(crate) soak: Option<Duration>,
    #[serde(default, deserialize_with = "crate::durations::deserialize_some")]
    pub(crate) health_timeout: Option<Duration>,
    pub(crate) prepare: Option<String>,
    pub(crate) check: Option<String>,
    #[serde(default)]
    pub(crate) env: EnvNames,
}

/// Defaults of what neither a flag nor the file sets.
pub(crate) const DEFAULT_SOAK: Duration = Duration::from_secs(2);
pub(crate) const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(30);

impl Settings {
    /// Reads a `--config` file.
    pub(crate) fn load(path: &Path) -> Result<Settings> {
        let bytes =
            crate::fsutil::read_limited(path, LIMITS.rehearse_config_bytes, "rehearse config")?;
        let text = String::from_utf8(bytes).map_err(|_| Error::Config {
            path: path.to_path_buf(),
            detail: "not UTF-8 text".into(),
        })?;
        Self::parse(&text, path)
    }

    pub(crate) fn parse(text: &str, path: &Path) -> Result<Settings> {
        let invalid = |detail| Error::Config {
            path: path.to_path_buf(),
            detail,
        };
        let settings: Settings = toml::from_str(text)
            .map_err(|e| invalid(crate::config::describe_toml_error(text, &e)))?;
        let env = &settings.env;
        let named = [
            ("node_name", &env.node_name),
            ("cookie", &env.cookie),
            ("http_port", &env.http_port),
            ("epmd_port", &env.epmd_port),
        ];
        for (role, var) in named {
            if let Some(var) = var
                && !is_env_var_name(var)
            {
                return Err(invalid(format!(
                    "[env] {role} = {var:?} is not an environment variable name"
                )));
            }
        }
        Ok(settings)
    }

    /// `self` (the flags) over `file`, role by role for the env names.
    pub(crate) fn over(self, file: Settings) -> Settings {
        let mut env = file.env;
        let mut flags = self.env;
        for role in EnvNames::ROLES {
            if let Some(Some(var)) = flags.slot(role).map(Option::take) {
                *env.slot(role).expect("a role") = Some(var);
            }
        }
        Settings {
            health_http: self.health_http.or(file.health_http),
            soak: self.soak.or(file.soak),
            health_timeout: self.health_timeout.or(file.health_timeout),
            prepare: self.prepare.or(file.prepare),
            check: self.check.or(file.check),
            env,
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct Options {
    pub(crate) from: Vec<PathBuf>,
    pub(crate) to: PathBuf,
    pub(crate) release: Option<String>,
    pub(crate) prepare: Option<String>,
    pub(crate) check: Option<String>,
    /// The health endpoint's path on `127.0.0.1:<http port>`.
    pub(crate) health_http: Option<String>,
    pub(crate) soak: Duration,
    pub(crate) health_timeout: Duration,
    pub(crate) env: EnvNames,
    /// Keep the temporary directory (the roots, logs, bundles).
    pub(crate) keep: bool,
}

#[derive(Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) release: String,
    pub(crate) to_version: String,
    pub(crate) passed: bool,
    pub(crate) from: Vec<FromReport>,
    /// The temporary directory (removed at the end unless kept).
    pub(crate) dir: PathBuf,
    pub(crate) kept: bool,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct FromReport {
    pub(crate) tarball: PathBuf,
    pub(crate) version: String,
    pub(crate) passed: bool,
    /// A device on this version restarts for the upgrade (no relup from
    /// it, or ERTS changes); `why` says which.
    pub(crate) restart_needed: Option<bool>,
    pub(crate) why: Option<String>,
    /// Going back from the new version to this one (a revert) restarts the
    /// node: the new release's relup does not downgrade to it.
    pub(crate) downgrade_restart_needed: Option<bool>,
    pub(crate) downgrade_why: Option<String>,
    /// What a device on this version downloads (what its unpack reads).
    pub(crate) download: Option<Download>,
    pub(crate) steps: Vec<StepReport>,
    /// The OS processes it started (epmd, BEAMs), all stopped at the end.
    pub(crate) pids: Vec<u32>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Download {
    pub(crate) chunks_read: usize,
    pub(crate) chunks_total: usize,
    pub(crate) bytes_read: u64,
    pub(crate) tarball_size: u64,
}

#[derive(Debug, Default, Serialize)]
pub(crate) struct StepReport {
    /// provision, prepare, upgrade, downgrade, upgrade_again
    pub(crate) step: &'static str,
    pub(crate) version: String,
    pub(crate) ok: bool,
    /// Why it failed: the health output, the code_change crash,
    /// release_handler's error, the check's output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    /// The engine's step that failed (installing, soaking, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) failed_step: Option<String>,
    /// hot or cold, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) strategy: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) why: Option<String>,
    /// install_release (hot) or the restart (cold), in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) install_ms: Option<u64>,
    /// The health gate with its soak.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) gate_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pid_before: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pid_after: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) pid_kept: Option<bool>,
    /// `--check` passed after the step (absent: no check, or not run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) check_ok: Option<bool>,
    pub(crate) ms: u64,
}

/// How long a `--prepare` or `--check` command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// How much of a failing command's output the report keeps.
const OUTPUT_TAIL: usize = 1500;

/// Runs the rehearsal; the report, or an error that stopped it before any
/// from-version could be tried (bad input). The caller turns a failed
/// report into the exit code.
pub(crate) async fn run(opts: &Options) -> Result<Report> {
    check_options(opts)?;
    let marker = random_hex(8);
    let tmp = std::env::temp_dir().join(format!("beamup-rehearse-{marker}"));
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .ctx(&tmp, "create directory")?;
    let reaper = Reaper::spawn(&marker, &tmp, opts.keep);
    let result = tokio::select! {
        r = rehearse_all(opts, &tmp, &marker) => r,
        s = interrupted() => Err(Error::RehearsalFailed {
            detail: format!("interrupted by {s}; everything it started was stopped"),
        }),
    };
    sweep(&marker, Duration::from_secs(10));
    match reaper {
        Ok(r) => r.finish(),
        Err(e) => {
            tracing::warn!("no reaper ({e}); removing {} myself", tmp.display());
            if !opts.keep {
                let _ = fs::remove_dir_all(&tmp);
            }
        }
    }
    let mut report = result?;
    report.dir = tmp;
    report.kept = opts.keep;
    Ok(report)
}

fn check_options(opts: &Options) -> Result<()> {
    if opts.from.is_empty() {
        return Err(Error::Usage(
            "at least one --from OLD.tar.gz is needed".into(),
        ));
    }
    let missing: Vec<&str> = [
        ("node_name", &opts.env.node_name),
        ("cookie", &opts.env.cookie),
    ]
    .iter()
    .filter(|(_, v)| v.is_none())
    .map(|(k, _)| *k)
    .collect();
    if !missing.is_empty() {
        return Err(Error::Usage(format!(
            "--env {}=VAR missing (or in the [env] table of --config): name the environment variable \
             the release reads it from (relx vm.args: `-name ${{VAR}}`; mix: RELEASE_NODE / RELEASE_COOKIE), \
             so each rehearsal node gets its own",
            missing.join("=VAR, --env ")
        )));
    }
    if opts.health_http.is_some() && opts.env.http_port.is_none() {
        return Err(Error::Usage(
            "--health-http needs --env http_port=VAR: the variable the release reads its HTTP port from".into(),
        ));
    }
    Ok(())
}

async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// What every from-version shares: the release to ship and the bundles.
struct Shared {
    key: SecretKey,
    trust_root: PathBuf,
    release: String,
    new_version: String,
    /// NEW for the first upgrade and for the upgrade after the downgrade
    /// (a higher sequence: the device saw the first one).
    new_bundles: [PathBuf; 2],
}

async fn rehearse_all(opts: &Options, tmp: &Path, marker: &str) -> Result<Report> {
    let shared = prepare_shared(opts, tmp)?;
    let mut report = Report {
        release: shared.release.clone(),
        to_version: shared.new_version.clone(),
        passed: true,
        from: Vec::new(),
        dir: tmp.to_path_buf(),
        kept: opts.keep,
    };
    for (i, old) in opts.from.iter().enumerate() {
        let dir = tmp.join(format!("from-{}", i + 1));
        fs::create_dir(&dir).ctx(&dir, "create directory")?;
        let mut one = FromReport {
            tarball: old.clone(),
            ..FromReport::default()
        };
        rehearse_one(opts, &shared, &dir, marker, old, &mut one).await;
        // Nothing of this from-version may run into the next.
        sweep(marker, Duration::from_secs(10));
        one.passed = !one.steps.is_empty() && one.steps.iter().all(|s| s.ok);
        report.passed &= one.passed;
        report.from.push(one);
    }
    Ok(report)
}

fn prepare_shared(opts: &Options, tmp: &Path) -> Result<Shared> {
    let key = SecretKey::generate()?;
    let root = Root::init(vec![key.public()], 1, std::slice::from_ref(&key))?;
    let trust_root = tmp.join("root.json");
    fs::write(&trust_root, root.to_bytes()).ctx(&trust_root, "write")?;
    let bundles = tmp.join("bundles");
    fs::create_dir(&bundles).ctx(&bundles, "create directory")?;

    let new_tarball = tarball_of(&opts.to, &bundles)?;
    let info = metadata::inspect(&new_tarball)?;
    if let Some(name) = &opts.release
        && *name != info.name
    {
        return Err(Error::Usage(format!(
            "{} holds release {:?}, not --release {name:?}",
            opts.to.display(),
            info.name
        )));
    }
    let mut new_bundles = [PathBuf::new(), PathBuf::new()];
    for (i, seq) in [(0, 2), (1, 4)] {
        let out = bundles.join(format!("{}-{}-{seq}.bundle", info.name, info.version));
        sign(&new_tarball, &key, seq, false, &out)?;
        new_bundles[i] = out;
    }
    Ok(Shared {
        key,
        trust_root,
        release: info.name,
        new_version: info.version,
        new_bundles,
    })
}

/// The release tarball of `--to`: the file itself, or what a bundle holds
/// (checked against its manifest's digests; its signatures are not, as the
/// rehearsal signs its own copies).
fn tarball_of(to: &Path, scratch: &Path) -> Result<PathBuf> {
    let Ok(bundle) = Bundle::open(to) else {
        return Ok(to.to_path_buf());
    };
    let m = bundle.manifest_unverified()?;
    bundle.verify_tarball(&m)?;
    let out = scratch.join(format!("{}-{}.tar.gz", m.release.name, m.release.version));
    let mut file = fs::File::create(&out).ctx(&out, "create")?;
    std::io::copy(&mut bundle.tarball(), &mut file).ctx(&out, "write")?;
    Ok(out)
}

/// A throwaway bundle: explicit sequence (no sequence state is written),
/// valid for a day.
fn sign(tarball: &Path, key: &SecretKey, sequence: u64, downgrade: bool, out: &Path) -> Result<()> {
    sign_as(tarball, key, sequence, downgrade, true, out)
}

/// [`sign`], `indexed` as `beamup bundle` does by default (what the
/// download cost is measured on); the old release's bundles, which only
/// provision and downgrade, keep the tarball's bytes (no recompression).
fn sign_as(
    tarball: &Path,
    key: &SecretKey,
    sequence: u64,
    downgrade: bool,
    indexed: bool,
    out: &Path,
) -> Result<()> {
    let opts = BundleOptions {
        indexed,
        sequence: Some(sequence),
        allow_downgrade: downgrade,
        expires_in: Duration::from_secs(24 * 3600),
        now: SystemTime::now(),
        ..BundleOptions::default()
    };
    make::create(tarball, std::slice::from_ref(key), &opts, out).map(|_| ())
}

/// One from-version, its steps recorded in `rep` as they happen; stops at
/// the first failed step.
async fn rehearse_one(
    opts: &Options,
    shared: &Shared,
    dir: &Path,
    marker: &str,
    old: &Path,
    rep: &mut FromReport,
) {
    let t = Instant::now();
    let node = match provision(opts, shared, dir, marker, old, rep).await {
        Ok(n) => n,
        Err(reason) => {
            rep.steps.push(StepReport {
                step: "provision",
                version: rep.version.clone(),
                reason: Some(reason),
                ms: ms(t),
                ..StepReport::default()
            });
            return;
        }
    };
    rep.steps.push(StepReport {
        step: "provision",
        version: rep.version.clone(),
        ok: true,
        pid_after: rep.pids.last().copied(),
        ms: ms(t),
        ..StepReport::default()
    });
    let label = format!("from {}", rep.version);
    if let Some(cmd) = &opts.prepare {
        let t = Instant::now();
        let r = node.run_user(cmd, "prepare", &rep.version).await;
        let ok = r.is_ok();
        rep.steps.push(StepReport {
            step: "prepare",
            version: rep.version.clone(),
            ok,
            reason: r.err().map(|e| format!("--prepare failed: {e}")),
            ms: ms(t),
            ..StepReport::default()
        });
        if !ok {
            return;
        }
    }
    let downgrade_bundle = dir.join(format!("{}-{}-3.bundle", shared.release, rep.version));
    if let Err(e) = sign_as(old, &shared.key, 3, true, false, &downgrade_bundle) {
        rep.steps.push(failed(
            "downgrade",
            &rep.version,
            format!("bundling {}: {e}", old.display()),
        ));
        return;
    }
    let mut engine = match Engine::open(
        node.engine_settings(opts, shared),
        Box::new(StepProgress(label.clone())),
    ) {
        Ok(e) => e,
        Err(e) => {
            rep.steps
                .push(failed("upgrade", &shared.new_version, e.to_string()));
            return;
        }
    };
    let mut observer = NodeLink::new(node.link.clone());
    let plan = [
        (
            "upgrade",
            &shared.new_bundles[0],
            shared.new_version.clone(),
        ),
        ("downgrade", &downgrade_bundle, rep.version.clone()),
        (
            "upgrade_again",
            &shared.new_bundles[1],
            shared.new_version.clone(),
        ),
    ];
    for (step, bundle, version) in plan {
        let r = install_step(
            &mut engine,
            &mut observer,
            &node,
            opts,
            step,
            bundle,
            &version,
            rep,
        )
        .await;
        if let Some(pid) = r.pid_after
            && !rep.pids.contains(&pid)
        {
            rep.pids.push(pid);
        }
        let ok = r.ok;
        rep.steps.push(r);
        if !ok {
            return;
        }
    }
}

fn failed(step: &'static str, version: &str, reason: String) -> StepReport {
    StepReport {
        step,
        version: version.to_string(),
        reason: Some(reason),
        ..StepReport::default()
    }
}

#[allow(clippy::too_many_arguments)]
async fn install_step(
    engine: &mut Engine,
    observer: &mut NodeLink,
    node: &RehearsalNode,
    opts: &Options,
    step: &'static str,
    bundle: &Path,
    version: &str,
    rep: &mut FromReport,
) -> StepReport {
    let t = Instant::now();
    let mut r = StepReport {
        step,
        version: version.to_string(),
        ..StepReport::default()
    };
    eprintln!("rehearse: from {}: {step} to {version}", rep.version);
    let dry = match engine.dry_run(bundle, false).await {
        Ok(d) => d,
        Err(e) => {
            r.reason = Some(format!("the install would be refused: {e}"));
            r.ms = ms(t);
            return r;
        }
    };
    r.strategy = Some(dry.strategy);
    r.why = Some(dry.why.clone());
    if step == "upgrade" {
        rep.restart_needed = Some(dry.strategy == "cold");
        rep.why = Some(dry.why.clone());
        rep.download = Some(Download {
            chunks_read: dry.chunks_read,
            chunks_total: dry.chunks_total,
            bytes_read: dry.bytes_read,
            tarball_size: dry.tarball_size,
        });
    }
    if step == "downgrade" {
        rep.downgrade_restart_needed = Some(dry.strategy == "cold");
        rep.downgrade_why = Some(dry.why.clone());
    }
    observer.reset();
    r.pid_before = observer.os_pid().await;
    let outcome = engine.install(bundle, &InstallOptions::default()).await;
    observer.reset();
    r.pid_after = observer.os_pid().await;
    r.pid_kept = match (r.pid_before, r.pid_after) {
        (Some(a), Some(b)) => Some(a == b),
        _ => None,
    };
    match outcome {
        Err(e) => r.reason = Some(format!("refused: {e}")),
        Ok(o) => {
            let took = |names: &[&str]| {
                o.steps
                    .iter()
                    .filter(|s| names.contains(&s.step.as_str()))
                    .map(|s| s.ms)
                    .reduce(|a, b| a + b)
            };
            r.install_ms = took(&["installing", "restarting"]);
            r.gate_ms = took(&["soaking"]);
            r.failed_step = o.failed_step.clone();
            if o.outcome == OutcomeKind::Committed {
                r.ok = true;
            } else {
                r.reason = Some(format!(
                    "{}: {}",
                    o.outcome.name(),
                    o.reason.as_deref().unwrap_or("no reason given")
                ));
            }
        }
    }
    if r.ok
        && let Some(cmd) = &opts.check
    {
        let check = node.run_user(cmd, step, version).await;
        r.check_ok = Some(check.is_ok());
        if let Err(e) = check {
            r.ok = false;
            r.reason = Some(format!("--check failed after the {step}: {e}"));
        }
    }
    r.ms = ms(t);
    r
}

/// The node of one from-version: its root, ports, names and environment.
struct RehearsalNode {
    root: PathBuf,
    link: LinkSettings,
    http_port: Option<u16>,
    /// Every variable the node, its scripts and the user's commands get.
    env: Vec<(String, String)>,
}

async fn provision(
    opts: &Options,
    shared: &Shared,
    dir: &Path,
    marker: &str,
    old: &Path,
    rep: &mut FromReport,
) -> std::result::Result<RehearsalNode, String> {
    let info = metadata::inspect(old).map_err(|e| e.to_string())?;
    rep.version = info.version.clone();
    if info.name != shared.release {
        return Err(format!(
            "{} holds release {}, the new one is {}",
            old.display(),
            info.name,
            shared.release
        ));
    }
    if info.version == shared.new_version {
        return Err(format!("{} is {} already", old.display(), info.version));
    }
    let bundle = dir.join(format!("{}-{}-1.bundle", info.name, info.version));
    sign_as(old, &shared.key, 1, false, false, &bundle).map_err(|e| format!("bundling: {e}"))?;
    let root = dir.join("root");
    unpack::unpack(&unpack::Request {
        bundle: &bundle,
        trust_root: &shared.trust_root,
        dir: &root,
        identity: None,
        now: SystemTime::now(),
    })
    .map_err(|e| format!("unpacking {}: {e}", old.display()))?;

    let (epmd_pid, epmd_port) = start_epmd(&root, marker).await?;
    rep.pids.push(epmd_pid);
    let http_port = opts.health_http.as_ref().map(|_| free_port()).transpose()?;
    let name = format!("{}_rehearse_{}@localhost", shared.release, random_hex(4));
    let cookie = random_hex(16);
    let dir_text = dir.display().to_string();
    let mut env = vec![
        (MARKER_VAR.to_string(), marker.to_string()),
        // relx: run_erl's pipes and logs; mix: its tmp dir. Inside the
        // rehearsal's directory, so nothing is left elsewhere.
        ("PIPE_DIR".into(), format!("{dir_text}/pipes/")),
        ("RUNNER_LOG_DIR".into(), format!("{dir_text}/log")),
        ("RELEASE_TMP".into(), format!("{dir_text}/release-tmp")),
        ("BEAMUP_ROOT".into(), root.display().to_string()),
        ("BEAMUP_NODE".into(), name.clone()),
    ];
    let names = &opts.env;
    for (var, value) in [
        (&names.node_name, Some(name.clone())),
        (&names.cookie, Some(cookie.clone())),
        (&names.http_port, http_port.map(|p| p.to_string())),
        (
            &Some(names.epmd_port.clone().unwrap_or("ERL_EPMD_PORT".into())),
            Some(epmd_port.to_string()),
        ),
    ] {
        if let (Some(var), Some(value)) = (var, value) {
            env.push((var.clone(), value));
        }
    }
    let script = root.join("bin").join(&shared.release);
    let command = |verb: &str| {
        let mut words = vec!["env".to_string()];
        words.extend(env.iter().map(|(k, v)| shell_quote(&format!("{k}={v}"))));
        words.push(shell_quote(&script.display().to_string()));
        words.push(verb.to_string());
        words.join(" ")
    };
    let link = LinkSettings {
        name: name.clone(),
        cookie,
        epmd_port,
        call_timeout: Duration::from_secs(30),
        start_timeout: Duration::from_secs(60),
        start: command("daemon"),
        stop: command("stop"),
        root: root.clone(),
    };
    let node = RehearsalNode {
        root,
        link,
        http_port,
        env,
    };
    let mut link = NodeLink::new(node.link.clone());
    eprintln!("rehearse: from {}: starting node {name}", info.version);
    link.start()
        .await
        .map_err(|e| format!("booting {}: {e}", info.version))?;
    let pid = link.os_pid().await;
    rep.pids.extend(pid);
    eprintln!(
        "rehearse: from {}: node up, pid {} (epmd port {epmd_port}{})",
        info.version,
        pid.map_or("unknown".into(), |p| p.to_string()),
        http_port.map_or(String::new(), |p| format!(", http port {p}"))
    );
    node.wait_healthy(opts, &info.version, &mut link).await?;
    Ok(node)
}

impl RehearsalNode {
    fn health(&self, opts: &Options) -> HealthConfig {
        HealthConfig {
            http: opts
                .health_http
                .as_ref()
                .zip(self.http_port)
                .map(|(path, port)| format!("http://127.0.0.1:{port}{path}")),
            tcp: None,
            command: None,
            expect_version: false,
            timeout: opts.health_timeout,
            soak: opts.soak,
            interval: Duration::from_millis(250),
        }
    }

    fn engine_settings(&self, opts: &Options, shared: &Shared) -> EngineSettings {
        EngineSettings {
            release_root: self.root.clone(),
            release_name: shared.release.clone(),
            trust_root: shared.trust_root.clone(),
            state_dir: self.root.with_file_name("state"),
            strategy: StrategyRule::Auto,
            health: self.health(opts),
            identity: None,
            link: self.link.clone(),
        }
    }

    /// The booted old release must pass its health check before anything
    /// is tried on it.
    async fn wait_healthy(
        &self,
        opts: &Options,
        version: &str,
        link: &mut NodeLink,
    ) -> std::result::Result<(), String> {
        let checks = health::Checks::new(&self.health(opts), version);
        let deadline = Instant::now() + opts.health_timeout;
        loop {
            let last = checks.run_once().await;
            let running = link.running().await.map_err(|e| e.to_string());
            match (last, running) {
                (Ok(()), Ok(_)) => return Ok(()),
                (Err(why), _) | (_, Err(why)) if Instant::now() >= deadline => {
                    return Err(format!("{version} booted but is not healthy: {why}"));
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Runs a `--prepare` or `--check` command in the release root, with
    /// the node's environment and BEAMUP_STEP / BEAMUP_VERSION; the error
    /// says how it ended and the tail of its output.
    async fn run_user(
        &self,
        cmd: &str,
        step: &str,
        version: &str,
    ) -> std::result::Result<(), String> {
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(&self.root)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("BEAMUP_STEP", step)
            .env("BEAMUP_VERSION", version)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("`{cmd}`: {e}"))?;
        let group = child.id();
        let out = match tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output()).await {
            Ok(r) => r.map_err(|e| format!("`{cmd}`: {e}"))?,
            Err(_) => {
                if let Some(g) = group {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(g as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                return Err(format!(
                    "`{cmd}` did not finish within {}",
                    humantime::format_duration(COMMAND_TIMEOUT)
                ));
            }
        };
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        let text = text.trim();
        let start = text
            .char_indices()
            .rev()
            .nth(OUTPUT_TAIL)
            .map_or(0, |(i, _)| i);
        Err(format!("`{cmd}` {}: {}", out.status, &text[start..]))
    }
}

/// Starts a private epmd (the release's own, else the one on PATH) on a
/// free loopback port; returns its pid and port once it accepts.
async fn start_epmd(root: &Path, marker: &str) -> std::result::Result<(u32, u16), String> {
    let bundled = fs::read_dir(root)
        .map_err(|e| format!("{}: {e}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("erts-"))
        })
        .map(|erts| erts.join("bin/epmd"))
        .filter(|p| p.is_file());
    let epmd = bundled.unwrap_or_else(|| PathBuf::from("epmd"));
    // The port can be taken between asking and binding: a few tries.
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port()?;
        let mut child = tokio::process::Command::new(&epmd)
            .args(["-port", &port.to_string(), "-address", "127.0.0.1"])
            .env(MARKER_VAR, marker)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", epmd.display()))?;
        let pid = child.id().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                // Stopped by the sweep, by pid; not reaped by us.
                std::mem::forget(child);
                return Ok((pid, port));
            }
            if let Ok(Some(status)) = child.try_wait() {
                last = format!("epmd exited: {status}");
                break;
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                last = "epmd did not listen within 5 s".into();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Err(format!("could not start a private epmd: {last}"))
}

fn free_port() -> std::result::Result<u16, String> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

/// Processes whose environment carries the marker, as far as /proc lets
/// us read (only our own user's).
pub(crate) fn marked_processes(marker: &str) -> Vec<i32> {
    let needle = format!("{MARKER_VAR}={marker}");
    let me = std::process::id() as i32;
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == needle.as_bytes()))
        })
        .filter(|pid| !is_zombie(*pid))
        .collect()
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X")
    })
}

/// Kills every marked process with SIGKILL, by pid, until none is left (a
/// start script may spawn another between two passes) or `within` passed.
pub(crate) fn sweep(marker: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = marked_processes(marker);
        if left.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            tracing::warn!("processes {left:?} survived SIGKILL");
            return;
        }
        for pid in left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The reaper: this binary as `rehearse-reap`, in a session of its own (a
/// terminal's Ctrl-C or a kill of our process group does not reach it),
/// reading a pipe whose only writer is the rehearsal.
struct Reaper {
    child: std::process::Child,
}

impl Reaper {
    fn spawn(marker: &str, dir: &Path, keep: bool) -> std::io::Result<Reaper> {
        let exe = std::env::current_exe()?;
        let mut cmd = std::process::Command::new(exe);
        cmd.arg("rehearse-reap")
            .arg("--marker")
            .arg(marker)
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        if keep {
            cmd.arg("--keep");
        }
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        Ok(Reaper {
            child: cmd.spawn()?,
        })
    }

    /// Closes the pipe: the reaper sweeps, removes the directory, exits.
    fn finish(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// `beamup rehearse-reap`: waits until its stdin closes (the rehearsal
/// ended, however), then kills what carries the marker and removes the
/// rehearsal's directory.
pub(crate) fn reap(marker: &str, dir: &Path, keep: bool) -> Result<()> {
    if marker.is_empty() || !marker.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Usage("--marker must be hex".into()));
    }
    let _ = nix::unistd::setsid();
    let mut sink = [0u8; 256];
    let mut stdin = std::io::stdin();
    while matches!(stdin.read(&mut sink), Ok(n) if n > 0) {}
    sweep(marker, Duration::from_secs(10));
    let expected = std::env::temp_dir().join(format!("beamup-rehearse-{marker}"));
    if !keep && dir == expected {
        let _ = fs::remove_dir_all(dir);
    }
    Ok(())
}

/// The report for a person.
pub(crate) fn text(r: &Report) -> String {
    let mut out = String::new();
    for f in &r.from {
        out.push_str(&format!(
            "rehearse    {} {} -> {} ({}): {}\n",
            r.release,
            if f.version.is_empty() {
                "?"
            } else {
                &f.version
            },
            r.to_version,
            f.tarball.display(),
            if f.passed { "passed" } else { "FAILED" }
        ));
        for s in &f.steps {
            let mut line = format!(
                "  {:<14}{:<7}{:<8}",
                s.step,
                if s.ok { "ok" } else { "FAILED" },
                s.version
            );
            let mut parts = Vec::new();
            if let Some(how) = s.strategy {
                parts.push(how.to_string());
            }
            if let Some(ms) = s.install_ms {
                parts.push(format!(
                    "{} {ms} ms",
                    if s.strategy == Some("cold") {
                        "restart"
                    } else {
                        "install_release"
                    }
                ));
            }
            if let Some(ms) = s.gate_ms {
                parts.push(format!("gate {ms} ms"));
            }
            match (s.pid_kept, s.pid_after) {
                (Some(true), Some(p)) => parts.push(format!("pid {p} kept")),
                (Some(false), Some(p)) => {
                    parts.push(format!("pid {} -> {p}", s.pid_before.unwrap_or_default()))
                }
                (None, Some(p)) => parts.push(format!("pid {p}")),
                _ => {}
            }
            if let Some(c) = s.check_ok {
                parts.push(format!("check {}", if c { "ok" } else { "failed" }));
            }
            line.push_str(&parts.join(", "));
            out.push_str(line.trim_end());
            out.push('\n');
            if let Some(why) = &s.reason {
                let at = s
                    .failed_step
                    .as_ref()
                    .map_or(String::new(), |f| format!(" (while {f})"));
                out.push_str(&format!("                because{at}: {why}\n"));
            }
        }
        if let Some(restart) = f.restart_needed {
            out.push_str(&format!(
                "  device      {}: {}\n",
                if restart {
                    "restart needed"
                } else {
                    "no restart"
                },
                f.why.as_deref().unwrap_or("")
            ));
        }
        if let (Some(true), Some(why)) = (f.downgrade_restart_needed, &f.downgrade_why) {
            out.push_str(&format!("  revert      restart needed: {why}\n"));
        }
        if let Some(d) = &f.download {
            out.push_str(&format!(
                "  download    {} of {} chunks ({:.1} MiB of {:.1} MiB)\n",
                d.chunks_read,
                d.chunks_total,
                d.bytes_read as f64 / 1048576.0,
                d.tarball_size as f64 / 1048576.0
            ));
        }
    }
    let passed = r.from.iter().filter(|f| f.passed).count();
    out.push_str(&format!(
        "result      {} of {} from-versions passed{}\n",
        passed,
        r.from.len(),
        if r.kept {
            format!("; kept {}", r.dir.display())
        } else {
            String::new()
        }
    ));
    out
}

fn ms(since: Instant) -> u64 {
    since.elapsed().as_millis() as u64
}

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("OS randomness");
    hex::encode(buf)
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

/// Engine progress on stderr, prefixed with the from-version.
struct StepProgress(String);

impl Progress for StepProgress {
    fn phase(&self, step: Step, detail: &str) {
        if matches!(step, Step::Finished(_)) {
            return;
        }
        eprintln!("rehearse: {}: {}: {detail}", self.0, step.name());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words_survive_quoting() {
        assert_eq!(shell_quote("A=b"), "A=b");
        assert_eq!(shell_quote("x y'z"), "'x y'\\''z'");
    }

    #[test]
    fn missing_env_names_are_a_usage_error_naming_them() {
        let opts = Options {
            from: vec!["a.tar.gz".into()],
            to: "b.tar.gz".into(),
            release: None,
            prepare: None,
            check: None,
            health_http: Some("/health".into()),
            soak: Duration::from_secs(1),
            health_timeout: Duration::from_secs(5),
            env: EnvNames::default(),
            keep: false,
        };
        let e = check_options(&opts).unwrap_err().to_string();
        assert!(
            e.contains("node_name=VAR") && e.contains("cookie=VAR"),
            "{e}"
        );
    }

    #[test]
    fn a_cold_from_version_says_why_and_that_a_revert_restarts_too() {
        let step = |step, version: &str| StepReport {
            step,
            version: version.into(),
            ok: true,
            strategy: Some("cold"),
            ..StepReport::default()
        };
        let report = Report {
            release: "thermo".into(),
            to_version: "1.6.0".into(),
            passed: true,
            from: vec![FromReport {
                tarball: "thermo-1.1.0.tar.gz".into(),
                version: "1.1.0".into(),
                passed: true,
                restart_needed: Some(true),
                why: Some("no relup from 1.1.0".into()),
                downgrade_restart_needed: Some(true),
                downgrade_why: Some("no relup down to 1.1.0".into()),
                steps: vec![
                    step("upgrade", "1.6.0"),
                    step("downgrade", "1.1.0"),
                    step("upgrade_again", "1.6.0"),
                ],
                ..FromReport::default()
            }],
            dir: "/tmp/x".into(),
            kept: false,
        };
        let out = text(&report);
        assert!(out.contains("): passed\n"), "{out}");
        assert!(
            out.contains("  device      restart needed: no relup from 1.1.0\n"),
            "{out}"
        );
        assert!(
            out.contains("  revert      restart needed: no relup down to 1.1.0\n"),
            "{out}"
        );
        assert!(!out.contains("FAILED"), "{out}");
    }

    const FILE: &str = r#"
health_http = "/health"
soak = "1s"
health_timeout = "20s"
prepare = "bin/thermo rpc thermo_state incr"
check = "bin/thermo rpc thermo_state get"

[env]
node_name = "NODE_NAME"
cookie = "COOKIE"
http_port = "THERMO_HTTP_PORT"
epmd_port = "ERL_EPMD_PORT"
"#;

    fn parse(text: &str) -> Result<Settings> {
        Settings::parse(text, Path::new("ci/rehearse.toml"))
    }

    #[test]
    fn a_settings_file_sets_every_option() {
        let s = parse(FILE).unwrap();
        assert_eq!(s.health_http.as_deref(), Some("/health"));
        assert_eq!(s.soak, Some(Duration::from_secs(1)));
        assert_eq!(s.health_timeout, Some(Duration::from_secs(20)));
        assert_eq!(
            s.prepare.as_deref(),
            Some("bin/thermo rpc thermo_state incr")
        );
        assert_eq!(s.check.as_deref(), Some("bin/thermo rpc thermo_state get"));
        assert_eq!(
            s.env,
            EnvNames {
                node_name: Some("NODE_NAME".into()),
                cookie: Some("COOKIE".into()),
                http_port: Some("THERMO_HTTP_PORT".into()),
                epmd_port: Some("ERL_EPMD_PORT".into()),
            }
        );
        // Only [env] is needed; everything else has its default.
        let s = parse("[env]\nnode_name = \"N\"\ncookie = \"C\"\n").unwrap();
        assert_eq!((s.soak, s.health_http), (None, None));
        assert_eq!(s.env.cookie.as_deref(), Some("C"));
    }

    #[track_caller]
    fn refused(text: &str, needles: &[&str]) {
        let e = parse(text).unwrap_err();
        assert_eq!(e.exit_code(), crate::error::exit::CONFIG, "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("ci/rehearse.toml: invalid configuration: "),
            "{msg}"
        );
        for n in needles {
            assert!(msg.contains(n), "{msg} lacks {n:?}");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_config_errors_naming_key_and_file() {
        refused(
            "helth_http = \"/health\"\n",
            &["line 1", "unknown field `helth_http`"],
        );
        refused(
            "[env]\nnode_name = \"N\"\nnode = \"X\"\n",
            &["line 3 in [env]", "unknown field `node`"],
        );
        refused("[environment]\n", &["unknown field `environment`"]);
        refused("soak = \"soon\"\n", &["\"soon\" is not a duration"]);
        refused(
            "[env]\ncookie = \"MY COOKIE\"\n",
            &["[env] cookie = \"MY COOKIE\" is not an environment variable name"],
        );
        refused("[env]\nhttp_port = 8080\n", &["line 2 in [env]", "string"]);
    }

    #[test]
    fn flags_override_the_file_role_by_role() {
        let flags = Settings {
            soak: Some(Duration::from_secs(5)),
            check: Some("true".into()),
            env: EnvNames {
                cookie: Some("RELEASE_COOKIE".into()),
                ..EnvNames::default()
            },
            ..Settings::default()
        };
        let s = flags.over(parse(FILE).unwrap());
        assert_eq!(s.soak, Some(Duration::from_secs(5)));
        assert_eq!(s.health_timeout, Some(Duration::from_secs(20)));
        assert_eq!(s.check.as_deref(), Some("true"));
        assert_eq!(
            s.prepare.as_deref(),
            Some("bin/thermo rpc thermo_state incr")
        );
        assert_eq!(s.env.cookie.as_deref(), Some("RELEASE_COOKIE"));
        assert_eq!(s.env.node_name.as_deref(), Some("NODE_NAME"));
        assert_eq!(s.env.epmd_port.as_deref(), Some("ERL_EPMD_PORT"));
    }
}
