//! Fleet campaigns: a release rolled out in waves, health-gated, with
//! thresholds, pause and abort, a controller that survives itself, and a
//! report. Needs nothing but the broker the fleet already uses.
//!
//! - [`plan`]: `PLAN.toml` into typed values (pure);
//! - [`roster`]: who is in the campaign and in which wave (pure);
//! - [`decide`]: every rule of the rollout, as pure functions of the
//!   state, the fleet's facts and the time;
//! - [`state`]: the campaign's state and its one-step save;
//! - [`controller`]: the effects around `decide` (MQTT, the disk);
//! - [`view`]: status and report, as text, JSON and CSV.
//!
//! This file holds the commands: `plan`, `start`, `run`, `status`,
//! `pause`/`resume`/`abort`, `list`, `report`.

pub mod controller;
pub mod decide;
pub mod plan;
pub mod roster;
pub mod state;
pub mod view;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::bundle::Bundle;
use crate::error::{Error, Result};
use crate::release::manifest::Manifest;
use crate::transport::mqtt::{self, Broker, Conn, Qos};
use crate::transport::protocol::{self, CampaignControl, ControlAction, ControllerLease, Topics};
use roster::DeviceFacts;
use state::{Campaign, Store, Target};

/// Reads and checks a plan file.
pub fn load_plan(path: &Path) -> Result<plan::Plan> {
    let bytes = crate::fsutil::read_limited(
        path,
        crate::limits::LIMITS.campaign_plan_bytes,
        "campaign plan",
    )?;
    let text = String::from_utf8(bytes).map_err(|_| Error::Config {
        path: path.to_path_buf(),
        detail: "not UTF-8 text; a plan is a TOML file".into(),
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    plan::parse(&text, dir).map_err(|detail| Error::Config {
        path: path.to_path_buf(),
        detail,
    })
}

fn plan_error(plan: &Path, detail: String) -> Error {
    Error::Config {
        path: plan.to_path_buf(),
        detail,
    }
}

/// The release a bundle offers, and its signed offer.
fn target_of(path: &Path) -> Result<(Target, Manifest, Vec<u8>)> {
    let b = Bundle::open(path)?;
    let m = b.manifest_unverified()?;
    let envelope = b.manifest_bytes().to_vec();
    Ok((
        Target {
            name: m.release.name.clone(),
            version: m.release.version.clone(),
            sequence: m.sequence,
            digest: hex::encode(Sha256::digest(&envelope)),
        },
        m,
        envelope,
    ))
}

/// Does the bundle's target scope let this device install it?
fn in_scope(m: &Manifest, fleet: &str, id: &str, f: Option<&DeviceFacts>) -> bool {
    let groups = f
        .and_then(|f| f.state.as_ref())
        .map_or(vec![], |s| s.groups.clone());
    crate::release::policy::admits(
        &m.target,
        &crate::release::policy::Identity {
            fleet: Some(fleet.to_string()),
            device: Some(id.to_string()),
            groups,
        },
    )
}

/// The fleet's retained states and online flags.
pub async fn fleet_facts(b: &Broker, topics: &Topics) -> Result<BTreeMap<String, DeviceFacts>> {
    let rows = crate::operator::fleet::status(
        b,
        topics,
        Duration::from_millis(700),
        Duration::from_secs(15),
    )
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            (
                r.device,
                DeviceFacts {
                    online: r.online,
                    state: r.state,
                },
            )
        })
        .collect())
}

/// A campaign as it would start now, checked against the fleet; nothing
/// is written.
pub struct Draft {
    pub campaign: Campaign,
    pub facts: BTreeMap<String, DeviceFacts>,
    pub offer: Vec<u8>,
    pub revert: Option<Vec<u8>>,
    pub warnings: Vec<String>,
}

pub async fn draft(plan_path: &Path, b: &Broker) -> Result<Draft> {
    let plan = load_plan(plan_path)?;
    let (target, m, offer) = target_of(&plan.bundle)?;
    let now = controller::now_ms();
    let mut warnings = Vec::new();
    if let Ok(t) = humantime::parse_rfc3339_weak(&m.expires_at) {
        let left = t
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default();
        if left.is_zero() {
            return Err(plan_error(
                plan_path,
                format!(
                    "bundle: {} expired at {}; bundle the release again",
                    plan.bundle.display(),
                    m.expires_at
                ),
            ));
        }
        if left < Duration::from_secs(24 * 3600) {
            warnings.push(format!(
                "the bundle expires at {} (in {}); devices refuse it after that",
                m.expires_at,
                humantime::format_duration(Duration::from_secs(left.as_secs()))
            ));
        }
    }
    let revert = match &plan.revert {
        None => None,
        Some(p) => {
            let (t, rm, bytes) = target_of(p)?;
            if !rm.allow_downgrade {
                return Err(plan_error(
                    plan_path,
                    format!(
                        "revert.bundle: {} was not bundled with --allow-downgrade; devices would refuse it as a downgrade",
                        p.display()
                    ),
                ));
            }
            if rm.release.name != m.release.name {
                return Err(plan_error(
                    plan_path,
                    format!(
                        "revert.bundle: {} is release {}, the campaign's is {}",
                        p.display(),
                        rm.release.name,
                        m.release.name
                    ),
                ));
            }
            Some((t, bytes))
        }
    };
    let topics = Topics::new(&plan.prefix, &plan.fleet);
    let facts = fleet_facts(b, &topics).await?;
    let id = plan.id.clone().unwrap_or_else(|| {
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let digits: String = stamp
            .chars()
            .filter(char::is_ascii_digit)
            .take(12)
            .collect();
        format!("{}-{}-{digits}", target.name, target.version)
    });
    let seed = plan.seed.unwrap_or_else(|| {
        let mut b = [0u8; 8];
        let _ = getrandom::fill(&mut b);
        u64::from_le_bytes(b) >> 12
    });
    let campaign = decide::create(
        id,
        plan,
        target,
        revert.as_ref().map(|(t, _)| t.clone()),
        &facts,
        seed,
        now,
    );
    if campaign.devices.is_empty() {
        return Err(plan_error(
            plan_path,
            format!(
                "select: no device of fleet {} matches (fleet status shows {} device(s) there)",
                campaign.fleet,
                facts.len()
            ),
        ));
    }
    let outside: Vec<&String> = campaign
        .devices
        .keys()
        .filter(|d| !in_scope(&m, &campaign.fleet, d, facts.get(*d)))
        .collect();
    if !outside.is_empty() {
        return Err(plan_error(
            plan_path,
            format!(
                "bundle: its target ({}) leaves out {} selected device(s): {}; devices refuse it (bundle with --target fleet:{} or narrow the selection)",
                m.target.join(", "),
                outside.len(),
                outside
                    .iter()
                    .take(10)
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                campaign.fleet
            ),
        ));
    }
    Ok(Draft {
        campaign,
        facts,
        offer,
        revert: revert.map(|(_, b)| b),
        warnings,
    })
}

/// `campaign plan --json`: what would happen.
#[derive(Serialize)]
pub struct Preview {
    pub id: String,
    pub release: String,
    pub version: String,
    pub sequence: u64,
    pub waves: Vec<PreviewWave>,
    pub left_out: Vec<String>,
    pub warnings: Vec<String>,
}

#[derive(Serialize)]
pub struct PreviewWave {
    pub name: String,
    pub devices: Vec<PreviewDevice>,
}

#[derive(Serialize)]
pub struct PreviewDevice {
    pub device: String,
    /// `true`, `false`, or null when the broker holds no online flag.
    pub online: Option<bool>,
    pub running: Option<String>,
    /// offer, already_current, offline (waits up to offline_wait), unknown
    pub action: &'static str,
}

pub fn preview(d: &Draft) -> Preview {
    let c = &d.campaign;
    Preview {
        id: c.id.clone(),
        release: c.target.name.clone(),
        version: c.target.version.clone(),
        sequence: c.target.sequence,
        waves: c
            .waves
            .iter()
            .map(|w| PreviewWave {
                name: w.name.clone(),
                devices: w
                    .devices
                    .iter()
                    .map(|id| {
                        let f = d.facts.get(id);
                        let online = f.and_then(|f| f.online);
                        let running = f.and_then(|f| f.running().map(str::to_string));
                        let current = f.is_some_and(|f| {
                            f.running() == Some(c.target.version.as_str())
                                && f.permanent() == Some(c.target.version.as_str())
                        });
                        PreviewDevice {
                            device: id.clone(),
                            online,
                            running,
                            action: if current {
                                "already_current"
                            } else if f.is_none() {
                                "unknown"
                            } else if online != Some(true) {
                                "offline"
                            } else {
                                "offer"
                            },
                        }
                    })
                    .collect(),
            })
            .collect(),
        left_out: c.left_out.clone(),
        warnings: d.warnings.clone(),
    }
}

pub fn preview_text(p: &Preview, c: &Campaign) -> String {
    let mut out = format!(
        "campaign {}: {} {} (sequence {}) to {} device(s) of fleet {}\n",
        p.id,
        p.release,
        p.version,
        p.sequence,
        c.devices.len(),
        c.fleet
    );
    let plan = &c.plan;
    out.push_str(&format!(
        "rollout  {} at once, device timeout {}, offline wait {}, order {}{}, on threshold {}\n",
        plan.max_in_flight,
        humantime::format_duration(plan.device_timeout),
        humantime::format_duration(plan.offline_wait),
        match plan.order {
            plan::Order::Random => "random",
            plan::Order::Id => "by id",
        },
        if plan.order == plan::Order::Random {
            format!(" (seed {})", c.seed)
        } else {
            String::new()
        },
        match plan.on_threshold {
            plan::OnThreshold::Pause => "pause",
            plan::OnThreshold::Abort => "abort",
        }
    ));
    if let Some(w) = plan.window {
        out.push_str(&format!("window   offers only {}\n", w.text()));
    }
    for (w, pw) in c.waves.iter().zip(&p.waves) {
        let g = &w.gate;
        let mut limits = vec![];
        if let Some(s) = g.success {
            limits.push(format!("success {:.0}% of reached devices", s * 100.0));
        }
        match (g.max_failures, g.max_failure_percent) {
            (None, None) => limits.push("stops at the first failure".into()),
            (m, pct) => {
                if let Some(m) = m {
                    limits.push(format!("at most {m} failure(s)"));
                }
                if let Some(p) = pct {
                    limits.push(format!(
                        "at most {p}% failed once {} decided",
                        g.min_decided
                    ));
                }
            }
        }
        if !g.soak.is_zero() {
            limits.push(format!("soak {}", humantime::format_duration(g.soak)));
        }
        out.push_str(&format!(
            "\nwave {} ({} devices; {})\n",
            w.name,
            w.devices.len(),
            limits.join(", ")
        ));
        for d in &pw.devices {
            out.push_str(&format!(
                "  {:<24} {:<8} {:<10} {}\n",
                d.device,
                match d.online {
                    Some(true) => "online",
                    Some(false) => "offline",
                    None => "?",
                },
                d.running.as_deref().unwrap_or("-"),
                match d.action {
                    "already_current" => "already runs it: done without an offer",
                    "offline" => "offline: waits for it",
                    "unknown" => "no state on the broker: waits for it",
                    _ => "offer",
                }
            ));
        }
    }
    if !p.left_out.is_empty() {
        out.push_str(&format!(
            "\nnot in any wave ({}): {}\n",
            p.left_out.len(),
            p.left_out.join(", ")
        ));
    }
    for w in &p.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

/// Creates the campaign's directory from a draft.
pub fn create(campaigns: &Path, d: &Draft) -> Result<Store> {
    let store = Store::new(campaigns, &d.campaign.id);
    store.create(&d.campaign, &d.offer, d.revert.as_deref())?;
    Ok(store)
}

/// Runs the controller until the campaign finishes (or SIGTERM/SIGINT).
pub async fn run(campaigns: &Path, id: &str, broker: Broker) -> Result<Campaign> {
    let store = Store::new(campaigns, id);
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    controller::run(controller::RunOptions { broker, store }, shutdown).await
}

/// The retained campaign views on the broker: one campaign, or all.
pub async fn from_broker(
    b: &Broker,
    topics: &Topics,
    id: Option<&str>,
) -> Result<(Vec<Campaign>, BTreeMap<String, ControllerLease>)> {
    let session = crate::operator::fleet::session("campaign-view")?;
    let mut conn = Conn::new(b, &session)?;
    let (filter, lease_filter) = match id {
        Some(id) => (topics.campaign_status(id), topics.campaign_controller(id)),
        None => (
            topics.campaign_status_filter(),
            topics.campaign_controller("+"),
        ),
    };
    let mut found = Vec::new();
    let mut leases = BTreeMap::new();
    let start = Instant::now();
    let mut settle: Option<mqtt::Settle> = None;
    loop {
        let deadline = settle
            .as_ref()
            .and_then(mqtt::Settle::deadline)
            .map_or(start + Duration::from_secs(15), |d| {
                d.min(start + Duration::from_secs(15))
            });
        match tokio::time::timeout_at(deadline.into(), conn.poll()).await {
            Err(_) if settle.is_some() => break,
            Err(_) => {
                return Err(Error::Mqtt {
                    url: b.url.clone(),
                    detail: "no connection in time".into(),
                });
            }
            Ok(Err(e)) => return Err(e.into_error(&b.url)),
            Ok(Ok(mqtt::Event::Connected { .. })) => {
                conn.subscribe(&filter, Qos::AtLeastOnce)?;
                conn.subscribe(&lease_filter, Qos::AtLeastOnce)?;
                settle = Some(conn.begin_settle(topics.sync(&session.client_id))?);
            }
            Ok(Ok(mqtt::Event::SubAck)) => {
                if let Some(s) = settle.as_mut() {
                    s.observe_suback(Instant::now());
                }
            }
            Ok(Ok(mqtt::Event::Message {
                topic,
                payload,
                retain,
            })) => {
                if let Some(s) = settle.as_mut()
                    && s.observe(&topic, &payload, retain, Instant::now())
                {
                    continue;
                }
                match topics.parse(&topic) {
                    Some(protocol::Topic::CampaignStatus(_)) => {
                        if let Ok(c) = serde_json::from_slice::<Campaign>(&payload) {
                            found.push(c);
                        }
                    }
                    Some(protocol::Topic::CampaignController(c)) => {
                        if let Ok(l) = serde_json::from_slice::<ControllerLease>(&payload) {
                            leases.insert(c, l);
                        }
                    }
                    _ => {}
                }
            }
            Ok(Ok(_)) => {}
        }
    }
    conn.disconnect().await;
    Ok((found, leases))
}

fn operator_name() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| format!("uid {}", nix::unistd::getuid()));
    format!("{user}@{}", controller::hostname())
}

/// Sends a control and, if a controller is online, waits (up to
/// `wait`) until its view shows it applied. Returns the view then.
pub async fn send_control(
    b: &Broker,
    topics: &Topics,
    id: &str,
    action: ControlAction,
    wait: Duration,
) -> Result<(Option<Campaign>, bool)> {
    let (before, leases) = from_broker(b, topics, Some(id)).await?;
    if before.is_empty() && !leases.contains_key(id) {
        return Err(Error::Usage(format!(
            "no campaign {id} on the broker {} under {}; see `beamup campaign list`",
            b.url,
            topics.campaign_status(id)
        )));
    }
    let prev = before.first().map_or(0, |c| c.control_seq);
    let seq = controller::now_ms().max(prev + 1);
    let ctl = CampaignControl {
        v: protocol::VERSION,
        seq,
        action,
        by: operator_name(),
        at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
    };
    crate::operator::fleet::publish_once(
        b,
        &topics.campaign_control(id),
        serde_json::to_vec(&ctl).expect("json"),
        true,
        Duration::from_secs(30),
    )
    .await?;
    let online = leases.get(id).is_some_and(|l| l.online);
    if !online {
        return Ok((before.into_iter().next(), false));
    }
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (now, _) = from_broker(b, topics, Some(id)).await?;
        if let Some(c) = now.into_iter().next()
            && c.control_seq >= seq
        {
            return Ok((Some(c), true));
        }
    }
    Ok((None, true))
}
