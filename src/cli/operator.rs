//! The operator's commands: keys, bundles, serving and offering releases
//! over MQTT, the fleet's view, relups. Built with the `operator` feature
//! (on by default); device builds (`cross/build`) leave it out, so a
//! device binary carries none of this code.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::{Args, Subcommand};

use super::{load_secret, parse_scope, print_manifest, runtime};
use crate::bundle;
use crate::error::{Error, Result};
use crate::limits::LIMITS;
use crate::operator::bundle::{self as make, BundleOptions};
use crate::release::manifest;
use crate::trust::keys;

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate an Ed25519 key pair: NAME.key (secret, mode 0600) and NAME.pub.
    Keygen {
        /// Directory to write the key files into (created with mode 0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// File name stem of the key pair.
        #[arg(long, default_value = "beamup")]
        name: String,
    },

    /// Sign a release tarball into a bundle that devices can verify.
    Bundle(BundleArgs),

    /// Answer devices' requests for release data from the bundles in a
    /// directory. Several servers may serve one fleet.
    Serve {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        fleet: FleetArgs,
        /// Directory of bundles (from `beamup bundle`) to serve.
        #[arg(long, value_name = "DIR")]
        bundles: PathBuf,
    },

    /// Offer a signed bundle to a device or a group (a retained message:
    /// devices that are offline get it when they connect). The bundle must
    /// also be in the directory of a `beamup serve`.
    Offer {
        /// The bundle file.
        file: PathBuf,
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        fleet: FleetArgs,
        #[command(flatten)]
        to: OfferTarget,
        #[command(flatten)]
        dry: DryRunArgs,
    },

    /// The fleet's devices as they report themselves.
    #[command(subcommand)]
    Fleet(FleetCommand),

    /// Roll a release out to a fleet in waves, health-gated, with
    /// thresholds, pause and abort (see README "Campaigns").
    #[command(subcommand)]
    Campaign(super::campaign::CampaignCommand),

    /// Make the relup of a built release and the upgrade tarball that
    /// carries it (`mix release` makes neither; works on rebar3 output too).
    ///
    /// Every version must be built, oldest first, into the same release
    /// directory; each application whose version changed needs an appup in
    /// the new version's lib/APP-VSN/ebin/. Writes releases/TO/relup there
    /// and the tarball to --out.
    ///
    /// Exit codes: 0 written, 5 --out exists, 32 no relup could be made
    /// (the message says what is missing and where).
    Relup(RelupArgs),

    /// Rehearse an upgrade before shipping it: for each --from, provision
    /// the old release in a private temporary root, boot it (own node name,
    /// cookie, epmd and ports, passed through the environment variables
    /// named by --env), then drive the real install engine: upgrade (hot or
    /// cold), hot downgrade, upgrade again, each health-gated and followed
    /// by --check. Everything it started is stopped, also on SIGINT,
    /// SIGTERM or kill -9 of beamup.
    ///
    /// Exit codes: 0 every step passed for every from-version, 33 a step
    /// failed (the report says which and why), 2 bad arguments.
    Rehearse(RehearseArgs),

    /// Used by `rehearse`: stops what a rehearsal started once it ends.
    #[command(hide = true, name = "rehearse-reap")]
    RehearseReap {
        #[arg(long)]
        marker: String,
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        keep: bool,
    },
}

impl Command {
    /// Long-running commands, which log what they do by default.
    pub fn is_daemon(&self) -> bool {
        matches!(
            self,
            Command::Serve { .. } | Command::Fleet(FleetCommand::Simulate(_))
        ) || matches!(
            self,
            Command::Campaign(
                super::campaign::CampaignCommand::Run { .. }
                    | super::campaign::CampaignCommand::Start { .. }
            )
        )
    }
}

/// Runs an operator command.
pub fn run(cmd: Command) -> Result<()> {
    match cmd {
        Command::Keygen { out, name } => {
            let k = keys::keygen(&out, &name)?;
            println!("key id      {}", k.id);
            println!(
                "secret key  {} (mode 0600; keep it off devices)",
                k.secret.display()
            );
            println!("public key  {}", k.public.display());
        }

        Command::Bundle(args) => bundle_command(args)?,

        Command::Serve {
            broker,
            fleet,
            bundles,
        } => {
            let opts = crate::operator::serve::ServeOptions {
                broker: broker.broker()?,
                prefix: fleet.prefix.clone(),
                fleet: fleet.fleet.clone(),
                bundles,
                max_piece: LIMITS.chunk_size_max,
            };
            fleet.topics()?;
            // One thread unless built with `threaded-serve`: reading a
            // piece of a bundle is a copy from the page cache, and handing
            // replies between threads cost more CPU than it saved
            // (benches/transfer.rs).
            #[cfg(feature = "threaded-serve")]
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            #[cfg(feature = "threaded-serve")]
            builder.worker_threads(2);
            #[cfg(not(feature = "threaded-serve"))]
            let mut builder = tokio::runtime::Builder::new_current_thread();
            builder
                .enable_all()
                .build()
                .map_err(|e| Error::Internal {
                    detail: format!("cannot start the async runtime: {e}"),
                })?
                .block_on(crate::operator::serve::run(opts))?;
        }

        Command::Offer {
            file,
            broker,
            fleet,
            to,
            dry,
        } if dry.dry_run => offer_dry_run(&file, &broker, &fleet, &to, &dry)?,
        Command::Offer {
            file,
            broker,
            fleet,
            to,
            ..
        } => offer_command(&file, &broker, &fleet, &to)?,

        Command::Fleet(cmd) => fleet_command(cmd)?,

        Command::Campaign(cmd) => super::campaign::run(cmd)?,

        Command::Relup(args) => relup_command(args)?,
        Command::Rehearse(args) => rehearse_command(args)?,
        Command::RehearseReap { marker, dir, keep } => {
            crate::operator::rehearse::reap(&marker, &dir, keep)?
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct RelupArgs {
    /// The built release, e.g. _build/prod/rel/NAME.
    #[arg(long, value_name = "DIR")]
    release_dir: PathBuf,
    /// A version the relup upgrades from and downgrades to (repeatable):
    /// the version(s) devices run.
    #[arg(long, value_name = "VSN", required = true)]
    from: Vec<String>,
    /// The new version.
    #[arg(long, value_name = "VSN")]
    to: String,
    /// The tarball to write, e.g. NAME-VSN.tar.gz.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Replace an existing --out.
    #[arg(long)]
    overwrite: bool,
}

#[derive(Args, Debug)]
pub struct RehearseArgs {
    /// A release tarball (with ERTS, or for the system's Erlang/OTP) of a
    /// version devices run; repeat for each from-version.
    #[arg(long = "from", value_name = "OLD.tar.gz", required = true)]
    from: Vec<PathBuf>,
    /// The new release: a tarball or a bundle (re-signed for the rehearsal).
    #[arg(long, value_name = "NEW.tar.gz|NEW.bundle")]
    to: PathBuf,
    /// The release name (default: the one in --to).
    #[arg(long, value_name = "NAME")]
    release: Option<String>,
    /// Shell command run in the release root once the old release is up
    /// (load state); gets the --env variables, BEAMUP_ROOT, BEAMUP_NODE.
    #[arg(long, value_name = "CMD")]
    prepare: Option<String>,
    /// Shell command run after each step (state assertions), with
    /// BEAMUP_STEP (upgrade, downgrade, upgrade_again) and BEAMUP_VERSION;
    /// a failure fails the rehearsal.
    #[arg(long, value_name = "CMD")]
    check: Option<String>,
    /// Health check: GET http://127.0.0.1:<http_port>PATH must answer 200.
    #[arg(long, value_name = "PATH")]
    health_http: Option<String>,
    /// Healthy continuously this long before each step commits [default: 2s].
    #[arg(long, value_name = "DURATION", value_parser = manifest::parse_duration)]
    soak: Option<std::time::Duration>,
    /// Time to become healthy and soak [default: 30s].
    #[arg(long, value_name = "DURATION", value_parser = manifest::parse_duration)]
    health_timeout: Option<std::time::Duration>,
    /// ROLE=VAR: the environment variable the release reads a setting from;
    /// roles node_name and cookie (required), http_port, epmd_port (default
    /// ERL_EPMD_PORT).
    #[arg(long = "env", value_name = "ROLE=VAR", value_parser = parse_env_role)]
    env: Vec<(String, String)>,
    /// A TOML file with an [env] table (the roles above) and any of
    /// health_http, soak, health_timeout, prepare, check; flags override it.
    #[arg(long, value_name = "rehearse.toml")]
    config: Option<PathBuf>,
    /// The report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Keep the temporary directory (roots, logs, bundles) for inspection;
    /// the processes are stopped all the same.
    #[arg(long)]
    keep: bool,
}

fn parse_env_role(s: &str) -> std::result::Result<(String, String), String> {
    use crate::operator::rehearse::{EnvNames, is_env_var_name};
    let (role, var) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ROLE=VAR, e.g. node_name=NODE_NAME"))?;
    if !EnvNames::ROLES.contains(&role) {
        return Err(format!(
            "unknown role {role:?}; roles: {}",
            EnvNames::ROLES.join(", ")
        ));
    }
    if !is_env_var_name(var) {
        return Err(format!("{var:?} is not an environment variable name"));
    }
    Ok((role.to_string(), var.to_string()))
}

fn rehearse_command(a: RehearseArgs) -> Result<()> {
    use crate::operator::rehearse::{self, EnvNames, Options, Settings};
    let mut env = EnvNames::default();
    for (role, var) in a.env {
        *env.slot(&role).expect("checked by parse_env_role") = Some(var);
    }
    let flags = Settings {
        health_http: a.health_http,
        soak: a.soak,
        health_timeout: a.health_timeout,
        prepare: a.prepare,
        check: a.check,
        env,
    };
    let settings = match &a.config {
        Some(path) => flags.over(Settings::load(path)?),
        None => flags,
    };
    let opts = Options {
        env: settings.env,
        from: a.from,
        to: a.to,
        release: a.release,
        prepare: settings.prepare,
        check: settings.check,
        health_http: settings.health_http,
        soak: settings.soak.unwrap_or(rehearse::DEFAULT_SOAK),
        health_timeout: settings
            .health_timeout
            .unwrap_or(rehearse::DEFAULT_HEALTH_TIMEOUT),
        keep: a.keep,
    };
    let report = runtime()?.block_on(rehearse::run(&opts))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("json"));
    } else {
        print!("{}", rehearse::text(&report));
    }
    if report.passed {
        return Ok(());
    }
    let failed: Vec<String> = report
        .from
        .iter()
        .filter(|f| !f.passed)
        .map(|f| {
            let step = f.steps.iter().find(|s| !s.ok).map_or("?", |s| s.step);
            format!("from {} at {step}", f.version)
        })
        .collect();
    Err(Error::RehearsalFailed {
        detail: failed.join("; "),
    })
}

#[derive(Args, Debug, Clone)]
pub struct BrokerArgs {
    /// Broker URL: mqtt://HOST[:PORT] or mqtts://HOST[:PORT].
    #[arg(long, value_name = "URL", env = "BEAMUP_BROKER")]
    broker: Option<String>,
    /// MQTT protocol version: 5 or 3.1.1.
    #[arg(long, value_name = "VERSION", default_value = "5")]
    mqtt_version: String,
    /// CA certificate(s) (PEM) to verify the broker with (mqtts://).
    #[arg(long, value_name = "PEM")]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for TLS client authentication.
    #[arg(long, value_name = "PEM", requires = "key_file")]
    cert_file: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, value_name = "PEM", requires = "cert_file")]
    key_file: Option<PathBuf>,
    #[arg(long)]
    username: Option<String>,
    /// File holding the password.
    #[arg(long, value_name = "FILE", requires = "username")]
    password_file: Option<PathBuf>,
}

impl BrokerArgs {
    pub(crate) fn given(&self) -> bool {
        self.broker.is_some()
    }

    pub(crate) fn broker(&self) -> Result<crate::transport::mqtt::Broker> {
        let url = self.broker.as_ref().ok_or_else(|| {
            Error::Usage(
                "--broker URL (or BEAMUP_BROKER) is required: the broker the fleet uses".into(),
            )
        })?;
        crate::transport::mqtt::parse_url(url).map_err(Error::Usage)?;
        Ok(crate::transport::mqtt::Broker {
            url: url.clone(),
            version: crate::transport::mqtt::Version::parse(&self.mqtt_version)
                .map_err(Error::Usage)?,
            ca_file: self.ca_file.clone(),
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            username: self.username.clone(),
            password_file: self.password_file.clone(),
        })
    }
}

#[derive(Args, Debug, Clone)]
pub struct FleetArgs {
    /// The fleet.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    pub(crate) fleet: String,
    /// Topic prefix (as in the devices' agent.toml).
    #[arg(long, value_name = "PREFIX", default_value = "beamup")]
    pub(crate) prefix: String,
}

impl FleetArgs {
    pub(crate) fn topics(&self) -> Result<crate::transport::protocol::Topics> {
        if !crate::config::is_safe_prefix(&self.prefix) {
            return Err(Error::Usage(format!(
                "--prefix {:?} must be names of A-Z a-z 0-9 . _ - separated by /",
                self.prefix
            )));
        }
        Ok(crate::transport::protocol::Topics::new(
            &self.prefix,
            &self.fleet,
        ))
    }
}

#[derive(Args, Debug, Clone)]
#[group(required = true, multiple = false)]
pub struct OfferTarget {
    /// Offer to this device.
    #[arg(long, value_name = "ID", value_parser = parse_name)]
    device: Option<String>,
    /// Offer to every device of this group.
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    group: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct DryRunArgs {
    /// Offer nothing: ask the devices (a group: those whose retained state
    /// names it) what the offer would do, and print their answers. They
    /// check it as a real offer and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: how long to wait for the answers.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = manifest::parse_duration, requires = "dry_run")]
    wait: std::time::Duration,
    /// With --dry-run: the answers as JSON.
    #[arg(long, requires = "dry_run")]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Each device's retained state: online, running and permanent release,
    /// phase, last outcome.
    Status {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        fleet: FleetArgs,
        #[arg(long)]
        json: bool,
        /// The broker's retained states are taken to be all in once it
        /// echoed a marker (see docs/PROTOCOL.md); where it does not (an
        /// ACL without PREFIX/FLEET/sync/#), once none came for this long.
        #[arg(long, value_name = "DURATION", default_value = "700ms", value_parser = manifest::parse_duration)]
        wait: std::time::Duration,
    },
    /// Tell a device to install the last release offered to it again, even
    /// though it was rolled back.
    Retry {
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        fleet: FleetArgs,
        #[arg(long, value_name = "ID", value_parser = parse_name)]
        device: String,
    },
    /// Simulated devices that speak the real protocol, for tests and
    /// benches at fleet scale (not a device or operator tool).
    #[command(hide = true)]
    Simulate(Box<SimulateArgs>),
}

#[derive(Args, Debug)]
pub struct SimulateArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    fleet: FleetArgs,
    /// How many devices.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    devices: u32,
    /// Device ids are PREFIX-00001, PREFIX-00002, ...
    #[arg(long, value_name = "PREFIX", default_value = "sim", value_parser = parse_name)]
    id_prefix: String,
    /// A group every device is in (repeatable).
    #[arg(long = "group", value_name = "NAME", value_parser = parse_name)]
    groups: Vec<String>,
    /// The trust root offers are verified against.
    #[arg(long, value_name = "FILE")]
    root: PathBuf,
    /// The release the devices run.
    #[arg(long, value_name = "NAME")]
    release: String,
    /// The version they run (and have permanent) at start.
    #[arg(long, value_name = "VSN", default_value = "1.0.0")]
    running: String,
    /// Share of the devices per fate: commit, rollback, silent, offline,
    /// restart (mid-transfer, then commit), adding up to 1.
    #[arg(long, value_name = "FATE=SHARE,...", default_value = "commit=1", value_parser = crate::simulate::Mix::parse)]
    mix: crate::simulate::Mix,
    /// Which devices get which fate.
    #[arg(long, default_value = "1")]
    seed: u64,
    /// From a finished download to the outcome.
    #[arg(long, value_name = "DURATION", default_value = "200ms", value_parser = manifest::parse_duration)]
    install_time: std::time::Duration,
    /// Outboxes and downloads, one directory per device.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// What each device did (JSON), written once all are connected and
    /// when stopped.
    #[arg(long, value_name = "FILE")]
    summary: Option<PathBuf>,
    /// Threads to spread the devices over (default: one per core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: Option<u16>,
    /// New connections per second at start.
    #[arg(long, value_name = "N", default_value = "500")]
    connect_rate: u32,
}

pub(crate) fn parse_name(s: &str) -> std::result::Result<String, String> {
    if crate::transport::protocol::is_topic_name(s) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
        ))
    }
}

#[derive(Args, Debug)]
pub struct BundleArgs {
    /// The release tarball as `rebar3 tar` or `mix release` produced it.
    #[arg(long, value_name = "REL.tar.gz")]
    release: PathBuf,
    /// Secret key to sign with (repeat for a threshold of signers).
    #[arg(long = "key", value_name = "KEY", required_unless_present = "key_envs")]
    keys: Vec<PathBuf>,
    /// An environment variable holding the text of a secret key file, e.g.
    /// a CI secret, so that no key file exists (repeatable; with --key too).
    #[arg(long = "key-env", value_name = "VAR")]
    key_envs: Vec<String>,
    /// How long the bundle stays valid (30d, 12h, ...).
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = manifest::parse_duration)]
    expires: std::time::Duration,
    /// Allow installing over a newer or equal release, or a higher sequence.
    #[arg(long)]
    allow_downgrade: bool,
    /// Keep the tarball's bytes as they are. By default it is recompressed
    /// as one gzip member per application, ERTS and release directory, with
    /// an index in the manifest, so that a device reads and inflates only
    /// what it does not have yet (still a valid .tar.gz).
    #[arg(long)]
    keep_tarball: bool,
    /// Who may install it: any, fleet:NAME, group:NAME or device:ID (repeat).
    #[arg(long = "target", value_name = "SCOPE", default_value = "any", value_parser = parse_scope)]
    targets: Vec<String>,
    /// Sequence number, at most 2^53 - 1 (default: milliseconds since the
    /// epoch x 1024 + random per-machine bits, above the last one this user
    /// issued).
    #[arg(long, value_parser = clap::value_parser!(u64).range(..=crate::operator::sequence::MAX))]
    sequence: Option<u64>,
    /// Bytes per verified chunk for transports.
    #[arg(long, value_name = "BYTES", default_value_t = manifest::DEFAULT_CHUNK_SIZE)]
    chunk_size: u32,
    /// Where to write the bundle (refuses to overwrite).
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

fn relup_command(args: RelupArgs) -> Result<()> {
    let report = crate::operator::relup::run(&crate::operator::relup::RelupOptions {
        release_dir: args.release_dir,
        from: args.from,
        to: args.to,
        out: args.out,
        overwrite: args.overwrite,
    })?;
    for w in &report.warnings {
        eprintln!("warning: systools: {w}");
    }
    println!("release     {}", report.release);
    for (app, from, to) in &report.changed_apps {
        println!("changed     {app} {} -> {to}", from.join(", "));
    }
    println!("relup       {}", report.relup.display());
    println!("tarball     {}", report.tarball.display());
    Ok(())
}

fn offer_command(file: &Path, b: &BrokerArgs, f: &FleetArgs, to: &OfferTarget) -> Result<()> {
    let topics = f.topics()?;
    let bundle = bundle::Bundle::open(file)?;
    let m = bundle.manifest_unverified()?;
    let (topic, whom) = match (&to.device, &to.group) {
        (Some(d), _) => (topics.device_offer(d), format!("device {d}")),
        (_, Some(g)) => (topics.group_offer(g), format!("group {g}")),
        _ => unreachable!("clap requires one"),
    };
    let broker = b.broker()?;
    runtime()?.block_on(crate::operator::fleet::publish_once(
        &broker,
        &topic,
        bundle.manifest_bytes().to_vec(),
        true,
        std::time::Duration::from_secs(30),
    ))?;
    println!(
        "offered     {} {} (sequence {}) to {whom}",
        m.release.name, m.release.version, m.sequence
    );
    println!("topic       {topic} (retained)");
    println!(
        "data        {} bytes in {} chunks, served by `beamup serve` from a directory holding {}",
        m.tarball.size,
        m.tarball.chunks.len(),
        file.file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned())
    );
    Ok(())
}

fn offer_dry_run(
    file: &Path,
    b: &BrokerArgs,
    f: &FleetArgs,
    to: &OfferTarget,
    dry: &DryRunArgs,
) -> Result<()> {
    use crate::operator::fleet;
    let topics = f.topics()?;
    let bundle = bundle::Bundle::open(file)?;
    let m = bundle.manifest_unverified()?;
    let broker = b.broker()?;
    let rt = runtime()?;
    let devices = match (&to.device, &to.group) {
        (Some(d), _) => vec![d.clone()],
        (_, Some(g)) => {
            let rows = rt.block_on(fleet::status(
                &broker,
                &topics,
                std::time::Duration::from_millis(500),
                std::time::Duration::from_secs(10),
            ))?;
            rows.into_iter()
                .filter(|r| r.state.as_ref().is_some_and(|s| s.groups.contains(g)))
                .map(|r| r.device)
                .collect()
        }
        _ => unreachable!("clap requires one"),
    };
    if devices.is_empty() {
        return Err(Error::Usage(format!(
            "no device of fleet {} reports group {:?}",
            f.fleet,
            to.group.as_deref().unwrap_or("")
        )));
    }
    let answers = rt.block_on(fleet::dry_run(
        &broker,
        &topics,
        bundle.manifest_bytes(),
        &devices,
        dry.wait,
    ))?;
    if dry.json {
        println!("{}", serde_json::to_string_pretty(&answers).expect("json"));
    } else {
        println!(
            "dry run   {} {} (sequence {}): nothing offered, nothing changed",
            m.release.name, m.release.version, m.sequence
        );
        print!("{}", fleet::dry_run_table(&answers));
    }
    Ok(())
}

fn fleet_command(cmd: FleetCommand) -> Result<()> {
    match cmd {
        FleetCommand::Status {
            broker,
            fleet,
            json,
            wait,
        } => {
            let topics = fleet.topics()?;
            let rows = runtime()?.block_on(crate::operator::fleet::status(
                &broker.broker()?,
                &topics,
                wait,
                std::time::Duration::from_secs(10).max(wait * 4),
            ))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows).expect("json"));
            } else if rows.is_empty() {
                println!("no devices have reported in fleet {}", fleet.fleet);
            } else {
                print!("{}", crate::operator::fleet::table(&rows));
            }
        }
        FleetCommand::Retry {
            broker,
            fleet,
            device,
        } => {
            let topics = fleet.topics()?;
            let cmd = crate::transport::protocol::Command {
                v: crate::transport::protocol::VERSION,
                cmd: crate::transport::protocol::CommandKind::Retry,
            };
            runtime()?.block_on(crate::operator::fleet::publish_once(
                &broker.broker()?,
                &topics.command(&device),
                serde_json::to_vec(&cmd).expect("json"),
                false,
                std::time::Duration::from_secs(30),
            ))?;
            println!("sent retry to device {device}");
        }
        FleetCommand::Simulate(a) => {
            a.fleet.topics()?;
            let opts = crate::simulate::Options {
                broker: a.broker.broker()?,
                prefix: a.fleet.prefix.clone(),
                fleet: a.fleet.fleet.clone(),
                devices: a.devices as usize,
                id_prefix: a.id_prefix,
                groups: a.groups,
                root: a.root,
                release: a.release,
                running: a.running,
                mix: a.mix,
                seed: a.seed,
                install_time: a.install_time,
                state_dir: a.state_dir,
                summary: a.summary,
                connect_rate: a.connect_rate,
                threads: a
                    .threads
                    .map(usize::from)
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            };
            runtime()?.block_on(crate::simulate::run(opts))?;
        }
    }
    Ok(())
}

fn bundle_command(a: BundleArgs) -> Result<()> {
    let mut keys = load_secret(&a.keys)?;
    for var in &a.key_envs {
        keys.push(keys::SecretKey::from_env(var)?);
    }
    let opts = BundleOptions {
        chunk_size: a.chunk_size,
        expires_in: a.expires,
        targets: a.targets,
        sequence: a.sequence,
        allow_downgrade: a.allow_downgrade,
        now: SystemTime::now(),
        indexed: !a.keep_tarball,
    };
    let m = make::create(&a.release, &keys, &opts, &a.out)?;
    println!("bundle      {}", a.out.display());
    print_manifest(&m);
    let ids: Vec<String> = keys.iter().map(|k| k.id()).collect();
    println!("signed by   {}", ids.join(", "));
    Ok(())
}
