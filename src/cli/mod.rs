//! The command line: argument definitions and one function per command.
//!
//! Output contract: results go to stdout (human text, or JSON with
//! `--json`), diagnostics to stderr, and the exit code says what happened
//! (see `error::exit`). Commands that write files write them whole or not at
//! all.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::bundle;
use crate::config::Config;
use crate::engine::install;
use crate::engine::settings::EngineSettings;
use crate::engine::state::{Outcome, OutcomeKind, Strategy};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::limits::LIMITS;
use crate::release::manifest::Manifest;
#[cfg(feature = "operator")]
use crate::release::manifest::Scope;
use crate::release::policy::{DeviceFacts, Identity};
#[cfg(feature = "operator")]
use crate::trust::keys::{PublicKey, SecretKey};
use crate::trust::root::Root;

#[cfg(feature = "operator")]
mod campaign;
#[cfg(feature = "operator")]
mod operator;

#[derive(Parser, Debug)]
#[command(name = "beamup", version, about = "Signed, health-gated hot upgrades for BEAM releases on devices", long_about = None)]
pub struct Cli {
    /// More log output on stderr (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Create, rotate or check trust roots (the keys devices accept).
    #[command(subcommand)]
    Root(RootCommand),
    /// Verify a bundle against a trust root and print what was verified.
    Verify(VerifyArgs),
    /// Install a bundle on this device: verify, unpack beside the running
    /// release, hot (or cold) upgrade, health-gate, then commit or roll back.
    ///
    /// Exit codes: 0 committed, 40 rolled back, 50 needs attention,
    /// 10-29 rejected (nothing changed; the code says why).
    Install {
        /// The bundle file (from `beamup bundle`).
        bundle: PathBuf,
        #[arg(long, value_name = "agent.toml")]
        config: PathBuf,
        /// Install a bundle that was rolled back before.
        #[arg(long)]
        retry: bool,
        /// Print the outcome as JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Say what the install would do (every check, hot or cold and
        /// why, what it would unpack and read), changing nothing. Exit 0
        /// when it would go ahead; a refusal exits with its code.
        #[arg(long)]
        dry_run: bool,
    },
    /// Unpack a bundle's release into a directory, with no node running:
    /// provision a device, or stage a new version beside an installed one.
    ///
    /// An empty or missing DIR gets the whole release (start scripts and
    /// ERTS included): `DIR/bin/REL` boots it. A DIR holding a release of
    /// the same name gets only what the new version adds, beside it, as
    /// `install` unpacks it; nothing there is overwritten or made to run.
    /// Verified as `install` verifies (signatures, expiry, target scopes
    /// when --device/--fleet/--group are given) except anti-rollback,
    /// which `install` checks against the node.
    ///
    /// Exit codes: 0 unpacked, 5 that version is in DIR already, 24 DIR
    /// holds something else, 10-29 rejected (nothing written; the code
    /// says why).
    Unpack(UnpackArgs),
    /// Finish or undo an install that was interrupted (power loss, kill).
    Recover {
        #[arg(long, value_name = "agent.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Show the release the node runs, any install in progress, and the
    /// last outcomes.
    Status {
        #[arg(long, value_name = "agent.toml")]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// The daemon on a device: take signed offers over MQTT, fetch and
    /// verify the release, install it like `beamup install`, report.
    Agent {
        #[arg(long, value_name = "agent.toml")]
        config: PathBuf,
    },
    #[cfg(feature = "operator")]
    #[command(flatten)]
    Operator(operator::Command),
}

#[derive(Subcommand, Debug)]
pub(crate) enum RootCommand {
    #[cfg(feature = "operator")]
    /// Create a first trust root (version 1).
    Init {
        /// Public key file of a trusted signer (repeat for each key).
        #[arg(long = "key", value_name = "PUB", required = true)]
        keys: Vec<PathBuf>,
        /// How many distinct trusted keys must sign a release.
        #[arg(long)]
        threshold: usize,
        /// Secret key that signs the root itself (repeat; a threshold of the listed keys).
        #[arg(long = "sign", value_name = "KEY", required = true)]
        signers: Vec<PathBuf>,
        /// Where to write the root document.
        #[arg(long, value_name = "ROOT")]
        out: PathBuf,
    },
    #[cfg(feature = "operator")]
    /// Make the next root version: new keys and threshold, signed by a
    /// threshold of the current root's keys and of the new ones.
    Rotate {
        /// The root devices trust now.
        #[arg(long, value_name = "ROOT")]
        root: PathBuf,
        /// Public key file of a signer trusted by the new root (repeat).
        #[arg(long = "key", value_name = "PUB", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long)]
        threshold: usize,
        /// Secret key that signs the new root (repeat).
        #[arg(long = "sign", value_name = "KEY", required = true)]
        signers: Vec<PathBuf>,
        #[arg(long, value_name = "ROOT")]
        out: PathBuf,
    },
    /// Check that NEW is a valid successor of the trusted root.
    Verify {
        new: PathBuf,
        /// The root trusted now.
        #[arg(long, value_name = "ROOT")]
        trusted: PathBuf,
    },
}

#[derive(Args, Debug)]
pub(crate) struct VerifyArgs {
    file: PathBuf,
    /// Trust root to verify against.
    #[arg(long, value_name = "ROOT")]
    root: PathBuf,
    /// Print the result as JSON on stdout (also on failure).
    #[arg(long)]
    json: bool,
    /// The device's permanent release version, for the anti-rollback check.
    #[arg(long, value_name = "VSN")]
    installed: Option<String>,
    /// The last sequence number the device accepted.
    #[arg(long, value_name = "N")]
    last_sequence: Option<u64>,
    #[command(flatten)]
    identity: IdentityArgs,
    /// Verify as of this time instead of now (RFC 3339), e.g. to see whether
    /// a bundle will still be valid on the day of a site visit.
    #[arg(long, value_name = "TIME")]
    at: Option<String>,
}

/// Who the device is, for the bundle's target scopes (checked only when
/// one of these is given).
#[derive(Args, Debug)]
pub(crate) struct IdentityArgs {
    /// Check the target scopes for this device id ...
    #[arg(long, value_name = "ID")]
    device: Option<String>,
    /// ... in this fleet ...
    #[arg(long, value_name = "NAME")]
    fleet: Option<String>,
    /// ... and these groups (repeat).
    #[arg(long = "group", value_name = "NAME")]
    groups: Vec<String>,
}

impl IdentityArgs {
    fn identity(&self) -> Option<Identity> {
        (self.device.is_some() || self.fleet.is_some() || !self.groups.is_empty()).then(|| {
            Identity {
                fleet: self.fleet.clone(),
                device: self.device.clone(),
                groups: self.groups.clone(),
            }
        })
    }
}

#[derive(Args, Debug)]
pub(crate) struct UnpackArgs {
    /// The bundle file (from `beamup bundle`).
    bundle: PathBuf,
    /// Trust root to verify against.
    #[arg(long, value_name = "ROOT")]
    root: PathBuf,
    /// Release root to unpack into: empty or missing (provision), or
    /// holding an installed release of the same name (stage beside it).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    #[command(flatten)]
    identity: IdentityArgs,
    /// Print the result as JSON on stdout (also on failure).
    #[arg(long)]
    json: bool,
}

#[cfg(feature = "operator")]
fn parse_scope(s: &str) -> std::result::Result<String, String> {
    Scope::parse(s).map(|_| s.to_string())
}

/// Runs a command; returns the exit code for success paths.
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Root(cmd) => root_command(cmd)?,
        Command::Verify(args) => return verify_command(args),
        Command::Unpack(args) => return unpack_command(args),
        Command::Install {
            bundle,
            config,
            retry,
            json,
            dry_run: true,
        } => return dry_run_command(&bundle, &config, retry, json),
        Command::Install {
            bundle,
            config,
            retry,
            json,
            dry_run: false,
        } => return install_command(&bundle, &config, retry, json),
        Command::Recover { config, json } => return recover_command(&config, json),
        Command::Status { config, json } => return status_command(&config, json),
        #[cfg(feature = "operator")]
        Command::Operator(cmd) => operator::run(cmd)?,
        Command::Agent { config } => {
            let cfg = Config::load(&config)?;
            if cfg.mqtt.is_none() {
                return Err(Error::Config {
                    path: config,
                    detail: "the agent needs an [mqtt] table (url, device_id, fleet)".into(),
                });
            }
            runtime()?.block_on(crate::device::agent::run(cfg))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

impl Cli {
    /// The log level when neither -v nor RUST_LOG says otherwise: the
    /// daemons log what they do, the one-shot commands only warnings.
    pub fn default_log_level(&self) -> &'static str {
        match (self.verbose, &self.command) {
            (0, Command::Agent { .. }) => "info",
            #[cfg(feature = "operator")]
            (0, Command::Operator(c)) if c.is_daemon() => "info",
            (0, _) => "warn",
            (1, _) => "info",
            _ => "debug",
        }
    }
}

#[cfg(feature = "operator")]
fn load_public(paths: &[PathBuf]) -> Result<Vec<PublicKey>> {
    paths.iter().map(|p| PublicKey::load(p)).collect()
}

#[cfg(feature = "operator")]
fn load_secret(paths: &[PathBuf]) -> Result<Vec<SecretKey>> {
    paths.iter().map(|p| SecretKey::load(p)).collect()
}

fn root_command(cmd: RootCommand) -> Result<()> {
    match cmd {
        #[cfg(feature = "operator")]
        RootCommand::Init {
            keys,
            threshold,
            signers,
            out,
        } => {
            let env = Root::init(load_public(&keys)?, threshold, &load_secret(&signers)?)?;
            fsutil::write_atomic(&out, 0o644, false, &env.to_bytes())?;
            print_root(&Root::load(&out)?, &out);
        }
        #[cfg(feature = "operator")]
        RootCommand::Rotate {
            root,
            keys,
            threshold,
            signers,
            out,
        } => {
            let current = Root::load(&root)?;
            let env = current.rotate(load_public(&keys)?, threshold, &load_secret(&signers)?)?;
            fsutil::write_atomic(&out, 0o644, false, &env.to_bytes())?;
            print_root(&Root::load(&out)?, &out);
        }
        RootCommand::Verify { new, trusted } => {
            let current = Root::load(&trusted)?;
            let bytes = fsutil::read_limited(&new, LIMITS.root_file_bytes, "trust root")?;
            let next = current.verify_successor(&bytes, &new)?;
            println!(
                "OK  {} is a valid successor of {} (version {} -> {})",
                new.display(),
                trusted.display(),
                current.version,
                next.version
            );
            print_root(&next, &new);
        }
    }
    Ok(())
}

fn print_root(root: &Root, path: &Path) {
    println!("root        {} (version {})", path.display(), root.version);
    println!("threshold   {} of {} keys", root.threshold, root.keys.len());
    for id in root.keys.keys() {
        println!("key         {id}");
    }
    for id in &root.revoked {
        println!("revoked     {id}");
    }
}

fn print_manifest(m: &Manifest) {
    println!("release     {} {}", m.release.name, m.release.version);
    println!(
        "erts        {}{}",
        m.erts,
        if m.includes_erts { " (included)" } else { "" }
    );
    if m.upgrade_from.is_empty() {
        println!("upgrade     cold only (no relup)");
    } else {
        println!("upgrade     hot from {}", m.upgrade_from.join(", "));
    }
    if !m.downgrade_to.is_empty() {
        println!("downgrade   hot to {}", m.downgrade_to.join(", "));
    }
    println!("target      {}", m.target.join(", "));
    println!("sequence    {}", m.sequence);
    println!("created     {}", m.created_at);
    println!("expires     {}", m.expires_at);
    println!(
        "rollback    {}",
        if m.allow_downgrade {
            "downgrade allowed"
        } else {
            "downgrade refused"
        }
    );
    println!(
        "tarball     {} bytes ({} unpacked), sha256 {}, {} chunk(s) of {} bytes",
        m.tarball.size,
        m.tarball.unpacked_size,
        m.tarball.sha256,
        m.tarball.chunks.len(),
        m.tarball.chunk_size
    );
    if !m.tarball.parts.is_empty() {
        println!(
            "index       {} parts (a device reads only the ones it lacks)",
            m.tarball.parts.len()
        );
    }
}

fn verify_command(a: VerifyArgs) -> Result<ExitCode> {
    let result = verify_inner(&a);
    if a.json {
        let doc = match &result {
            Ok(v) => json!({
                "ok": true,
                "file": a.file,
                "root_version": v.root_version,
                "signed_by": v.signed_by,
                "manifest": manifest_json(&v.manifest),
            }),
            Err(e) => json!({
                "ok": false,
                "file": a.file,
                "error": error_json(e),
            }),
        };
        println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
    }
    let v = result?;
    if !a.json {
        println!("OK  {} verified", a.file.display());
        print_manifest(&v.manifest);
        println!(
            "signed by   {} (root version {})",
            v.signed_by.join(", "),
            v.root_version
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn unpack_command(a: UnpackArgs) -> Result<ExitCode> {
    let result = crate::device::unpack::unpack(&crate::device::unpack::Request {
        bundle: &a.bundle,
        trust_root: &a.root,
        dir: &a.out,
        identity: a.identity.identity(),
        now: SystemTime::now(),
    });
    if a.json {
        let doc = match &result {
            Ok(r) => json!({
                "ok": true,
                "file": a.bundle,
                "dir": a.out,
                "mode": r.mode.name(),
                "created": r.created,
                "present": r.present,
                "files": r.files,
                "bytes": r.bytes,
                "root_version": r.root_version,
                "signed_by": r.signed_by,
                "manifest": manifest_json(&r.manifest),
            }),
            Err(e) => json!({
                "ok": false,
                "file": a.bundle,
                "dir": a.out,
                "error": error_json(e),
            }),
        };
        println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
    }
    let r = result?;
    if a.json {
        return Ok(ExitCode::SUCCESS);
    }
    let m = &r.manifest;
    let dir = a.out.display();
    println!(
        "verified    {} {} (sequence {}), signed by {} (root version {})",
        m.release.name,
        m.release.version,
        m.sequence,
        r.signed_by.join(", "),
        r.root_version
    );
    let how = match r.mode {
        crate::device::unpack::Mode::Provision => "the whole release",
        crate::device::unpack::Mode::Stage => "beside the installed release",
    };
    println!(
        "unpacked    {} files, {} bytes into {dir} ({how})",
        r.files, r.bytes
    );
    for p in &r.created {
        let slash = if a.out.join(p).is_dir() { "/" } else { "" };
        println!("created     {}{slash}", p.display());
    }
    for p in &r.present {
        println!(
            "present     {}/ (already there, left as it is)",
            p.display()
        );
    }
    match r.mode {
        crate::device::unpack::Mode::Provision => {
            if !m.includes_erts {
                println!(
                    "note        the release has no ERTS: the device needs Erlang/OTP with ERTS {}",
                    m.erts
                );
            }
            println!(
                "next        start it: {dir}/bin/{} daemon (or through its service unit)",
                m.release.name
            );
        }
        crate::device::unpack::Mode::Stage => println!(
            "next        the installed release is unchanged; `beamup install {} --config agent.toml` \
             with the node running switches to {} (hot or cold, health-gated)",
            a.bundle.display(),
            m.release.version
        ),
    }
    Ok(ExitCode::SUCCESS)
}

/// An error as `--json` output carries it.
fn error_json(e: &Error) -> serde_json::Value {
    json!({"kind": e.kind(), "exit_code": e.exit_code(), "message": e.to_string()})
}

/// The manifest without its chunk list, which is long and of no use to a
/// person or a script (the count and size are kept).
fn manifest_json(m: &Manifest) -> serde_json::Value {
    let mut v = serde_json::to_value(m).expect("json");
    if let Some(t) = v.get_mut("tarball").and_then(|t| t.as_object_mut()) {
        t.remove("chunks");
        t.insert("chunk_count".into(), json!(m.tarball.chunks.len()));
    }
    v
}

fn verify_inner(a: &VerifyArgs) -> Result<bundle::Verified> {
    let root = Root::load(&a.root)?;
    let now = match &a.at {
        Some(t) => humantime::parse_rfc3339_weak(t).map_err(|e| {
            Error::Usage(format!(
                "--at {t:?}: not a time like 2026-12-01T08:00:00Z ({e})"
            ))
        })?,
        None => SystemTime::now(),
    };
    let device = DeviceFacts {
        installed_version: a.installed.clone(),
        last_sequence: a.last_sequence,
        identity: a.identity.identity(),
    };
    bundle::verify(&a.file, &root, now, &device)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Internal {
            detail: format!("cannot start the async runtime: {e}"),
        })
}

/// Progress of an install on stderr, one line per phase, for the person at
/// the terminal.
struct TerminalProgress;

impl install::Progress for TerminalProgress {
    fn phase(&self, step: install::Step, detail: &str) {
        if let install::Step::Finished(_) = step {
            return; // the outcome line that follows says it all
        }
        let phase = step.name();
        if detail.is_empty() {
            eprintln!("beamup: {phase}");
        } else {
            eprintln!("beamup: {phase}: {detail}");
        }
    }
}

fn outcome_exit(o: &Outcome) -> ExitCode {
    ExitCode::from(match o.outcome {
        OutcomeKind::Committed => 0,
        OutcomeKind::RolledBack => crate::error::exit::ROLLED_BACK,
        OutcomeKind::NeedsAttention => crate::error::exit::NEEDS_ATTENTION,
        OutcomeKind::Rejected => crate::error::exit::REFUSED,
    })
}

fn print_outcome(o: &Outcome, json: bool) {
    if json {
        println!("{}", serde_json::to_string_pretty(o).expect("json"));
        return;
    }
    let how = match (&o.strategy, &o.from_version) {
        (Some(s), Some(f)) => format!(
            " ({}, from {f})",
            if *s == Strategy::Hot { "hot" } else { "cold" }
        ),
        _ => String::new(),
    };
    match &o.reason {
        Some(r) => println!("{} {} {}{how}: {r}", o.outcome.name(), o.release, o.version),
        None => println!("{} {} {}{how}", o.outcome.name(), o.release, o.version),
    }
    if !o.steps.is_empty() {
        let steps: Vec<String> = o
            .steps
            .iter()
            .map(|t| {
                format!(
                    "{} {}",
                    t.step,
                    humantime::format_duration(std::time::Duration::from_millis(t.ms))
                )
            })
            .collect();
        println!(
            "steps: {}{}",
            steps.join(", "),
            o.failed_step
                .as_ref()
                .map_or(String::new(), |f| format!(" (failed at {f})"))
        );
    }
}

fn install_command(bundle: &Path, config: &Path, retry: bool, json: bool) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let rt = runtime()?;
    let result = rt.block_on(async {
        let mut engine = install::Engine::open(
            EngineSettings::from_config(&cfg)?,
            Box::new(TerminalProgress),
        )?;
        engine
            .install(
                bundle,
                &install::InstallOptions {
                    retry,
                    available: None,
                },
            )
            .await
    });
    match result {
        Ok(o) => {
            print_outcome(&o, json);
            Ok(outcome_exit(&o))
        }
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "outcome": "rejected",
                        "error": error_json(&e),
                    }))
                    .expect("json")
                );
            }
            Err(e)
        }
    }
}

fn dry_run_command(bundle: &Path, config: &Path, retry: bool, json: bool) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let d = runtime()?.block_on(async {
        let mut engine = install::Engine::open(
            EngineSettings::from_config(&cfg)?,
            Box::new(TerminalProgress),
        )?;
        engine.dry_run(bundle, retry).await
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&d).expect("json"));
        return Ok(ExitCode::SUCCESS);
    }
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0));
    println!("dry run     nothing was changed; an install would go ahead");
    println!(
        "release     {} {} (sequence {}): signatures, expiry, target and anti-rollback checked",
        d.release, d.version, d.sequence
    );
    println!("node        runs {} (permanent {})", d.running, d.permanent);
    println!(
        "install     {}: {}",
        if d.strategy == "hot" {
            "hot upgrade through the relup, no restart"
        } else {
            "cold: the node restarts into the new release"
        },
        d.why
    );
    if d.writes_releases_file {
        println!(
            "            releases/RELEASES written first from the .rel files (the root has none release_handler can use)"
        );
    }
    if d.forgets_unpacked {
        println!(
            "            release_handler forgets an earlier unpack of {} first",
            d.version
        );
    }
    println!("unpacks     {}", d.creates.join(", "));
    println!(
        "reads       {} of {} chunks ({} of {}); over MQTT the agent fetches those",
        d.chunks_read,
        d.chunks_total,
        mib(d.bytes_read),
        mib(d.tarball_size)
    );
    println!(
        "disk        needs {}, {} free",
        mib(d.space_needed),
        mib(d.space_free)
    );
    if d.prunes_after_commit.is_empty() {
        println!("after       nothing pruned after the commit");
    } else {
        println!(
            "after       the commit prunes {} (installed by beamup earlier)",
            d.prunes_after_commit.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn recover_command(config: &Path, json: bool) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let rt = runtime()?;
    let outcome = rt.block_on(async {
        let mut engine = install::Engine::open(
            EngineSettings::from_config(&cfg)?,
            Box::new(TerminalProgress),
        )?;
        engine.recover().await
    })?;
    match outcome {
        Some(o) => {
            print_outcome(&o, json);
            Ok(outcome_exit(&o))
        }
        None => {
            if json {
                println!(
                    "{}",
                    json!({"outcome": null, "message": "nothing to recover"})
                );
            } else {
                println!("nothing to recover");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn status_command(config: &Path, json: bool) -> Result<ExitCode> {
    let cfg = Config::load(config)?;
    let state = crate::engine::state::Store::peek(&cfg.state.dir)?;
    let rt = runtime()?;
    let node = rt.block_on(async {
        let mut link = crate::node::link::NodeLink::new(cfg.link_settings()?);
        link.call_timeout = link.call_timeout.min(std::time::Duration::from_secs(5));
        Ok::<_, Error>(link.running().await.map_err(|e| e.to_string()))
    })?;
    if json {
        let node_json = match &node {
            Ok(r) => {
                json!({"reachable": true, "running": r.current, "permanent": r.permanent, "erts": r.erts})
            }
            Err(e) => json!({"reachable": false, "error": e}),
        };
        let doc = json!({
            "release": cfg.release.name,
            "node": node_json,
            "install_in_progress": state.current,
            "last_outcome": state.last_outcome(),
            "last_sequence": state.last_sequence,
            "history": state.history,
            "discarded": state.discarded,
        });
        println!("{}", serde_json::to_string_pretty(&doc).expect("json"));
        return Ok(ExitCode::SUCCESS);
    }
    println!("release     {}", cfg.release.name);
    match &node {
        Ok(r) => println!(
            "node        {} runs {} (permanent {}, ERTS {})",
            cfg.node.name, r.current, r.permanent, r.erts
        ),
        Err(e) => println!("node        {} unreachable: {e}", cfg.node.name),
    }
    match &state.current {
        Some(j) => println!(
            "in progress {} {} -> {} ({:?}), {} since {}",
            j.release,
            j.from_version,
            j.to_version,
            j.strategy,
            j.phase.name(),
            j.started_at
        ),
        None => println!("in progress none"),
    }
    match state.last_outcome() {
        Some(o) => {
            print!("last        {}: ", o.at);
            print_outcome(o, false);
        }
        None => println!("last        none"),
    }
    if let Some(d) = state.discarded.recent.first() {
        println!(
            "discarded   {} unverified input(s) in all; last at {}: {}",
            state.discarded.count, d.last_at, d.reason
        );
    }
    Ok(ExitCode::SUCCESS)
}
