//! `beamup campaign ...`: arguments and output; the work is in
//! `operator::campaign`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};

use super::operator::{BrokerArgs, parse_name};
use super::runtime;
use crate::error::{Error, Result};
use crate::operator::campaign::{self as campaign, state::Campaign, state::Store, view};
use crate::transport::protocol::{ControlAction, Topics};

#[derive(Subcommand, Debug)]
pub enum CampaignCommand {
    /// Check a plan against the fleet's retained states and print what
    /// would happen (waves, devices, who is offline or already current).
    /// Changes nothing.
    Plan {
        /// The plan (TOML).
        plan: PathBuf,
        #[command(flatten)]
        broker: BrokerArgs,
        #[arg(long)]
        json: bool,
        /// Also ask the selected devices (all but those already current)
        /// what the offer would do, and print per wave hot and cold counts,
        /// the download, who would refuse and why, who did not answer.
        /// Nothing is offered or changed.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: how long to wait for the answers.
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = crate::release::manifest::parse_duration, requires = "dry_run")]
        wait: Duration,
    },
    /// Create a campaign from a plan (its members frozen now) and run its
    /// controller until the campaign finishes.
    ///
    /// Exit codes: 0 completed, 42 aborted (by a threshold or an
    /// operator), 5 a campaign of that id exists, 9 its controller runs.
    Start {
        plan: PathBuf,
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        store: StoreArgs,
        /// Only create it; run it later with `beamup campaign run ID`.
        #[arg(long)]
        no_run: bool,
    },
    /// Run (or resume, after kill -9 or a reboot) a campaign's controller.
    Run {
        id: String,
        #[command(flatten)]
        broker: BrokerArgs,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Progress per wave and per device. With --broker, the view the
    /// controller publishes (from any operator machine); else this
    /// machine's copy.
    Status {
        /// The campaign (default: list them).
        id: Option<String>,
        #[command(flatten)]
        view: ViewArgs,
        #[arg(long)]
        json: bool,
        /// Print again as it changes, until the campaign finishes.
        #[arg(long)]
        watch: bool,
    },
    /// Stop new offers; devices already updating finish and are counted.
    Pause(ControlArgs),
    /// Offer again after a pause; the failures so far are accepted.
    Resume(ControlArgs),
    /// No new offers, unstarted offers withdrawn, devices in flight finish
    /// (and the plan's revert bundle goes to devices that committed).
    Abort(ControlArgs),
    /// The campaigns, with their status.
    List {
        #[command(flatten)]
        view: ViewArgs,
        #[arg(long)]
        json: bool,
    },
    /// Per device: outcome, reason, versions before and after, when it was
    /// offered, downloaded, installed and decided; per wave and in total.
    Report {
        id: String,
        #[command(flatten)]
        view: ViewArgs,
        #[arg(long, conflicts_with = "csv")]
        json: bool,
        #[arg(long)]
        csv: bool,
    },
}

#[derive(Args, Debug, Clone)]
pub struct StoreArgs {
    /// Where campaigns are kept (default: $BEAMUP_CAMPAIGNS, else
    /// $XDG_STATE_HOME/beamup/campaigns, else ~/.local/state/beamup/campaigns).
    #[arg(long, value_name = "DIR")]
    campaigns: Option<PathBuf>,
}

impl StoreArgs {
    fn dir(&self) -> Result<PathBuf> {
        match &self.campaigns {
            Some(d) => Ok(d.clone()),
            None => campaign::state::default_dir(),
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct ViewArgs {
    #[command(flatten)]
    broker: BrokerArgs,
    #[command(flatten)]
    store: StoreArgs,
    /// The fleet (with --broker, when this machine has no copy of the
    /// campaign).
    #[arg(long, value_name = "NAME", value_parser = parse_name)]
    fleet: Option<String>,
    #[arg(long, value_name = "PREFIX", default_value = "beamup")]
    prefix: String,
}

#[derive(Args, Debug, Clone)]
pub struct ControlArgs {
    id: String,
    #[command(flatten)]
    view: ViewArgs,
    /// How long to wait for the controller to apply it.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = crate::release::manifest::parse_duration)]
    wait: Duration,
}

impl ViewArgs {
    fn local(&self, id: &str) -> Result<Option<Campaign>> {
        let store = Store::new(&self.store.dir()?, id);
        if store.exists() {
            store.load().map(Some)
        } else {
            Ok(None)
        }
    }

    fn topics(&self, id: Option<&str>) -> Result<Topics> {
        if let Some(f) = &self.fleet {
            if !crate::config::is_safe_prefix(&self.prefix) {
                return Err(Error::Usage(format!(
                    "--prefix {:?} must be names of A-Z a-z 0-9 . _ - separated by /",
                    self.prefix
                )));
            }
            return Ok(Topics::new(&self.prefix, f));
        }
        if let Some(id) = id
            && let Some(c) = self.local(id)?
        {
            return Ok(Topics::new(&c.prefix, &c.fleet));
        }
        Err(Error::Usage(
            "--fleet NAME is needed: this machine has no copy of the campaign to take it from"
                .into(),
        ))
    }

    /// The campaign: from the broker with --broker, else this machine.
    fn campaign(&self, id: &str) -> Result<Campaign> {
        if self.broker.given() {
            let b = self.broker.broker()?;
            let topics = self.topics(Some(id))?;
            let (found, _) = runtime()?.block_on(campaign::from_broker(&b, &topics, Some(id)))?;
            return found.into_iter().next().ok_or_else(|| {
                Error::Usage(format!(
                    "no campaign {id} on the broker {} under {}",
                    b.url,
                    topics.campaign_status(id)
                ))
            });
        }
        self.local(id)?.ok_or_else(|| {
            Error::Usage(format!(
                "no campaign {id} in {} (give --broker to read the fleet's campaigns, or --campaigns DIR)",
                self.store.dir().map_or(String::new(), |d| d.display().to_string())
            ))
        })
    }
}

fn id_arg(id: &str) -> Result<()> {
    parse_name(id)
        .map(|_| ())
        .map_err(|e| Error::Usage(format!("campaign id: {e}")))
}

fn finish(c: &Campaign) -> Result<()> {
    println!("{}", view::status_text(&view::report(c), true));
    match c.status {
        campaign::state::Status::Aborted => Err(Error::CampaignAborted {
            id: c.id.clone(),
            reason: c.reason.clone().unwrap_or_default(),
        }),
        _ => Ok(()),
    }
}

fn run_controller(dir: &Path, id: &str, b: &BrokerArgs) -> Result<()> {
    let broker = b.broker()?;
    let c = runtime()?.block_on(campaign::run(dir, id, broker))?;
    if !c.finished() {
        eprintln!(
            "controller stopped; the campaign is {} (resume with `beamup campaign run {id}`)",
            c.status.name()
        );
        return Ok(());
    }
    finish(&c)
}

pub fn run(cmd: CampaignCommand) -> Result<()> {
    match cmd {
        CampaignCommand::Plan {
            plan,
            broker,
            json,
            dry_run,
            wait,
        } => {
            let b = broker.broker()?;
            let rt = runtime()?;
            let d = rt.block_on(campaign::draft(&plan, &b))?;
            let p = campaign::preview(&d);
            let dry = if dry_run {
                let waves: Vec<(String, Vec<String>)> = p
                    .waves
                    .iter()
                    .map(|w| {
                        let ask = w.devices.iter().filter(|d| d.action != "already_current");
                        (w.name.clone(), ask.map(|d| d.device.clone()).collect())
                    })
                    .collect();
                let asked: Vec<String> = waves.iter().flat_map(|(_, d)| d.clone()).collect();
                let c = &d.campaign;
                let topics = Topics::new(&c.prefix, &c.fleet);
                let answers = rt.block_on(crate::operator::fleet::dry_run(
                    &b, &topics, &d.offer, &asked, wait,
                ))?;
                let all: Vec<(String, Vec<String>)> = p
                    .waves
                    .iter()
                    .map(|w| {
                        (
                            w.name.clone(),
                            w.devices.iter().map(|d| d.device.clone()).collect(),
                        )
                    })
                    .collect();
                Some(view::dry_run_summary(&all, &answers))
            } else {
                None
            };
            if json {
                let out = serde_json::json!({"plan": p, "dry_run": dry});
                let out = if dry.is_some() {
                    out
                } else {
                    serde_json::to_value(&p).expect("json")
                };
                println!("{}", serde_json::to_string_pretty(&out).expect("json"));
            } else {
                print!("{}", campaign::preview_text(&p, &d.campaign));
                if let Some(s) = &dry {
                    print!("{}", view::dry_run_text(s));
                }
            }
        }
        CampaignCommand::Start {
            plan,
            broker,
            store,
            no_run,
        } => {
            let b = broker.broker()?;
            let dir = store.dir()?;
            let d = runtime()?.block_on(campaign::draft(&plan, &b))?;
            let p = campaign::preview(&d);
            print!("{}", campaign::preview_text(&p, &d.campaign));
            let s = campaign::create(&dir, &d)?;
            println!(
                "\ncreated campaign {} in {}",
                d.campaign.id,
                s.dir.display()
            );
            // The controller reads the fleet again; the draft's copy of it
            // (megabytes for a large fleet) goes before it starts.
            let id = d.campaign.id.clone();
            drop((p, d));
            if !no_run {
                run_controller(&dir, &id, &broker)?;
            }
        }
        CampaignCommand::Run { id, broker, store } => {
            id_arg(&id)?;
            run_controller(&store.dir()?, &id, &broker)?;
        }
        CampaignCommand::Status {
            id: None,
            view,
            json,
            ..
        } => list(&view, json)?,
        CampaignCommand::Status {
            id: Some(id),
            view,
            json,
            watch,
        } => {
            id_arg(&id)?;
            let tty = std::io::stdout().is_terminal();
            loop {
                let c = view.campaign(&id)?;
                let r = view::report(&c);
                if json {
                    println!("{}", serde_json::to_string_pretty(&r).expect("json"));
                } else {
                    if watch && tty {
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{}", view::status_text(&r, true));
                }
                if !watch || c.finished() {
                    break;
                }
                std::thread::sleep(Duration::from_secs(1));
            }
        }
        CampaignCommand::Pause(a) => control(a, ControlAction::Pause)?,
        CampaignCommand::Resume(a) => control(a, ControlAction::Resume)?,
        CampaignCommand::Abort(a) => control(a, ControlAction::Abort)?,
        CampaignCommand::List { view, json } => list(&view, json)?,
        CampaignCommand::Report {
            id,
            view,
            json,
            csv,
        } => {
            id_arg(&id)?;
            let r = view::report(&view.campaign(&id)?);
            if json {
                println!("{}", serde_json::to_string_pretty(&r).expect("json"));
            } else if csv {
                print!("{}", view::report_csv(&r));
            } else {
                print!("{}", view::report_text(&r));
            }
        }
    }
    Ok(())
}

fn control(a: ControlArgs, action: ControlAction) -> Result<()> {
    id_arg(&a.id)?;
    let b = a.view.broker.broker()?;
    let topics = a.view.topics(Some(&a.id))?;
    let (c, online) =
        runtime()?.block_on(campaign::send_control(&b, &topics, &a.id, action, a.wait))?;
    match (online, c) {
        (false, _) => println!(
            "sent {} to campaign {}; no controller is online: it applies when `beamup campaign run {}` starts",
            action.name(),
            a.id,
            a.id
        ),
        (true, Some(c)) => {
            println!("{} applied", action.name());
            print!("{}", view::status_text(&view::report(&c), false));
        }
        (true, None) => println!(
            "sent {} to campaign {}; the controller did not confirm within {}",
            action.name(),
            a.id,
            humantime::format_duration(a.wait)
        ),
    }
    Ok(())
}

fn list(v: &ViewArgs, json: bool) -> Result<()> {
    let mut all: Vec<Campaign> = if v.broker.given() {
        let b = v.broker.broker()?;
        let topics = v.topics(None)?;
        runtime()?
            .block_on(campaign::from_broker(&b, &topics, None))?
            .0
    } else {
        let dir = v.store.dir()?;
        let mut found = vec![];
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let s = Store { dir: e.path() };
                if s.exists() {
                    found.push(s.load()?);
                }
            }
        }
        found
    };
    all.sort_by_key(|c| c.created_at);
    let reports: Vec<view::Report> = all.iter().map(view::report).collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&reports).expect("json"));
        return Ok(());
    }
    if reports.is_empty() {
        println!("no campaigns");
        return Ok(());
    }
    println!(
        "{:<32} {:<10} {:<24} {:<12} PROGRESS",
        "ID", "STATUS", "RELEASE", "WAVE"
    );
    for r in &reports {
        println!(
            "{:<32} {:<10} {:<24} {:<12} {}/{} committed, {} failed",
            r.id,
            r.status,
            format!("{} {}", r.release, r.version),
            r.current_wave.clone().unwrap_or("-".into()),
            r.total.committed + r.total.already_current,
            r.total.devices,
            r.total.failed
        );
    }
    Ok(())
}
