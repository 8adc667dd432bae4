//! The operator's side of the protocol: offering a bundle (`beamup
//! offer`), reading the fleet's retained states (`beamup fleet status`)
//! and sending a device a command (`beamup fleet retry`). Each is one short
//! MQTT session.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::transport::mqtt::{self, Broker, Conn, Qos, Session};
use crate::transport::protocol::{
    self, CommandKind, DeviceStatus, DryRunAnswer, DryRunRequest, Online, Topic, Topics,
};

pub(crate) fn session(role: &str) -> Result<Session> {
    Ok(Session {
        client_id: format!("beamup-{role}-{}", mqtt::nonce(6)?),
        persistent: false,
        keep_alive: Duration::from_secs(30),
        will: None,
    })
}

fn unreachable(b: &Broker, why: &str) -> Error {
    Error::Mqtt {
        url: b.url.clone(),
        detail: why.to_string(),
    }
}

/// Publishes one QoS 1 message and waits for the broker's PUBACK.
pub async fn publish_once(
    b: &Broker,
    topic: &str,
    payload: Vec<u8>,
    retain: bool,
    timeout: Duration,
) -> Result<()> {
    let mut conn = Conn::new(b, &session("offer")?)?;
    let deadline = Instant::now() + timeout;
    let mut payload = Some(payload);
    loop {
        let ev = tokio::time::timeout_at(deadline.into(), conn.poll())
            .await
            .map_err(|_| unreachable(b, "no acknowledgement in time"))?
            .map_err(|e| e.into_error(&b.url))?;
        match ev {
            mqtt::Event::Connected { max_packet, .. } => {
                let p = payload.take().unwrap_or_default();
                if let Some(max) = max_packet
                    && p.len() as u64 + topic.len() as u64 + 16 > u64::from(max)
                {
                    return Err(Error::TooLarge {
                        what: format!("message for {topic} (the broker's maximum packet size)"),
                        size: p.len() as u64,
                        limit: u64::from(max),
                    });
                }
                conn.publish_tracked(topic, retain, p, 1);
            }
            mqtt::Event::PubAck(1) => break,
            _ => {}
        }
    }
    conn.disconnect().await;
    Ok(())
}

/// A fresh id for a dry-run request: its answers are told apart from
/// older ones by it.
fn dry_run_id() -> Result<String> {
    Ok(format!("dry-{}", mqtt::nonce(6)?))
}

/// Asks each of `devices` what the offer `envelope` would do (a `dry_run`
/// command on its command topic) and collects the answers from their
/// retained states, until all answered or `wait` passed. A device that
/// did not answer in time maps to `None`.
pub async fn dry_run(
    b: &Broker,
    topics: &Topics,
    envelope: &[u8],
    devices: &[String],
    wait: Duration,
) -> Result<BTreeMap<String, Option<DryRunAnswer>>> {
    let offer = String::from_utf8(envelope.to_vec()).map_err(|_| {
        Error::Usage("the bundle's manifest is not UTF-8 JSON; a dry run cannot carry it".into())
    })?;
    let id = dry_run_id()?;
    let payload = serde_json::to_vec(&DryRunRequest {
        v: protocol::VERSION,
        cmd: CommandKind::DryRun,
        id: id.clone(),
        offer,
    })
    .expect("json");
    let mut answers: BTreeMap<String, Option<DryRunAnswer>> =
        devices.iter().map(|d| (d.clone(), None)).collect();
    let mut conn = Conn::new(b, &session("dry-run")?)?;
    let start = Instant::now();
    let mut unsent: Vec<&String> = Vec::new();
    let mut connected = false;
    while answers.values().any(Option::is_none) {
        let ev = match tokio::time::timeout_at((start + wait).into(), conn.poll()).await {
            Err(_) if connected => break,
            Err(_) => return Err(unreachable(b, "no connection in time")),
            Ok(Err(e)) => return Err(e.into_error(&b.url)),
            Ok(Ok(ev)) => ev,
        };
        match ev {
            mqtt::Event::Connected { .. } if !connected => {
                // Subscribed before the commands go out: the broker handles
                // one client's packets in order, so no answer is missed.
                conn.subscribe(&topics.state_filter(), Qos::AtLeastOnce)?;
                connected = true;
                unsent = devices.iter().rev().collect();
            }
            mqtt::Event::Message { topic, payload, .. } => {
                if let Some(Topic::State(d)) = topics.parse(&topic)
                    && let Some(slot) = answers.get_mut(&d)
                    && let Ok(state) = serde_json::from_slice::<DeviceStatus>(&payload)
                    && let Some(a) = state.dry_run.filter(|a| a.id == id)
                {
                    *slot = Some(a);
                }
            }
            _ => {}
        }
        // As many commands as the request queue takes; the rest after
        // the next event.
        while let Some(d) = unsent.last() {
            if conn
                .publish(&topics.command(d), Qos::AtLeastOnce, false, payload.clone())
                .is_err()
            {
                break;
            }
            unsent.pop();
        }
    }
    conn.disconnect().await;
    Ok(answers)
}

/// One device as the broker's retained messages describe it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeviceRow {
    pub device: String,
    pub online: Option<bool>,
    pub state: Option<DeviceStatus>,
}

/// Collects the retained states of a fleet: waits until the broker sent
/// them all (see [`mqtt::Settle`]; `quiet` is its pause without the
/// marker), or `max` passed.
pub async fn status(
    b: &Broker,
    topics: &Topics,
    quiet: Duration,
    max: Duration,
) -> Result<Vec<DeviceRow>> {
    let session = session("fleet")?;
    let mut conn = Conn::new(b, &session)?;
    let mut rows: BTreeMap<String, DeviceRow> = BTreeMap::new();
    let start = Instant::now();
    let mut settle: Option<mqtt::Settle> = None;
    loop {
        let deadline = settle
            .as_ref()
            .and_then(mqtt::Settle::deadline)
            .map_or(start + max, |d| d.min(start + max));
        let ev = match tokio::time::timeout_at(deadline.into(), conn.poll()).await {
            Err(_) if settle.is_some() => break,
            Err(_) => return Err(unreachable(b, "no connection in time")),
            Ok(Err(e)) => return Err(e.into_error(&b.url)),
            Ok(Ok(ev)) => ev,
        };
        match ev {
            mqtt::Event::Connected { .. } => {
                conn.subscribe(&topics.state_filter(), Qos::AtLeastOnce)?;
                conn.subscribe(&topics.online_filter(), Qos::AtLeastOnce)?;
                settle = Some(
                    conn.begin_settle(topics.sync(&session.client_id))?
                        .with_quiet(quiet),
                );
            }
            mqtt::Event::SubAck => {
                if let Some(s) = settle.as_mut() {
                    s.observe_suback(Instant::now());
                }
            }
            mqtt::Event::Message {
                topic,
                payload,
                retain,
            } => {
                if let Some(s) = settle.as_mut()
                    && s.observe(&topic, &payload, retain, Instant::now())
                {
                    continue;
                }
                match topics.parse(&topic) {
                    Some(Topic::State(d)) => {
                        let row = rows.entry(d.clone()).or_insert_with(|| DeviceRow {
                            device: d,
                            ..Default::default()
                        });
                        row.state = serde_json::from_slice(&payload).ok();
                    }
                    Some(Topic::Online(d)) => {
                        let row = rows.entry(d.clone()).or_insert_with(|| DeviceRow {
                            device: d,
                            ..Default::default()
                        });
                        row.online = serde_json::from_slice::<Online>(&payload)
                            .ok()
                            .map(|o| o.online);
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    conn.disconnect().await;
    Ok(rows.into_values().collect())
}

/// A dry-run answer in one line: the verdict, the release, then hot or
/// cold and the download (would_install) or the reason.
pub fn dry_run_line(a: &DryRunAnswer) -> String {
    let mut t = a.verdict.replace('_', " ");
    if let (Some(r), Some(v)) = (&a.release, &a.version) {
        t.push_str(&format!(" {r} {v}"));
    }
    if a.verdict == "would_install" {
        t.push_str(&format!(
            ": {}, fetches {} of {} chunks ({}){}; {}",
            a.strategy.as_deref().unwrap_or("?"),
            a.chunks.unwrap_or(0),
            a.chunks_total.unwrap_or(0),
            crate::device::transfer::size_text(a.bytes.unwrap_or(0)),
            if a.removes.is_empty() {
                String::new()
            } else {
                format!(", removes {} after the commit", a.removes.join(", "))
            },
            a.why.as_deref().unwrap_or("")
        ));
    } else if let Some(r) = &a.reason {
        t.push_str(&format!(": {r}"));
    }
    t
}

/// The answers of `beamup offer --dry-run`, one device a line.
pub fn dry_run_table(answers: &BTreeMap<String, Option<DryRunAnswer>>) -> String {
    let width = answers.keys().map(String::len).max().unwrap_or(0);
    let mut out = String::new();
    for (d, a) in answers {
        let line = a.as_ref().map_or(
            "no answer in time (offline, or an agent without dry runs)".into(),
            dry_run_line,
        );
        out.push_str(&format!("{d:<width$}  {line}\n"));
    }
    out
}

/// The table `beamup fleet status` prints. `DISCARDED` counts the junk a
/// device dropped (its `discarded` report), which never takes the place of
/// the last real outcome.
pub fn table(rows: &[DeviceRow]) -> String {
    let mut lines = vec![[
        "DEVICE".to_string(),
        "ONLINE".into(),
        "RUNNING".into(),
        "PERMANENT".into(),
        "PHASE".into(),
        "DISCARDED".into(),
        "LAST OUTCOME".into(),
    ]];
    for r in rows {
        let s = r.state.as_ref();
        let phase = s.map_or("-".to_string(), |s| {
            let mut p = s.phase.name.name().to_string();
            if let Some(pct) = s.phase.percent {
                p.push_str(&format!(" {pct}%"));
            }
            if let Some(v) = &s.phase.version {
                p.push_str(&format!(" {v}"));
            }
            p
        });
        let last = s
            .and_then(|s| s.last_outcome.as_ref())
            .map_or("-".to_string(), |o| {
                let mut t = format!("{} {} {}", o.outcome, o.version, o.at);
                if let Some(r) = &o.reason {
                    t.push_str(&format!(": {r}"));
                }
                t
            });
        lines.push([
            r.device.clone(),
            match r.online {
                Some(true) => "yes".into(),
                Some(false) => "no".into(),
                None => "?".into(),
            },
            s.and_then(|s| s.running.clone()).unwrap_or("-".into()),
            s.and_then(|s| s.permanent.clone()).unwrap_or("-".into()),
            phase,
            s.and_then(|s| s.discarded.as_ref())
                .map_or("0".to_string(), |d| d.count.to_string()),
            last,
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|i| lines.iter().map(|l| l[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for l in &lines {
        for (i, w) in widths.iter().enumerate() {
            out.push_str(&format!("{:<w$}  ", l[i]));
        }
        out.push_str(&l[6]);
        out.push('\n');
    }
    let dry: Vec<(&str, &DryRunAnswer)> = rows
        .iter()
        .filter_map(|r| Some((r.device.as_str(), r.state.as_ref()?.dry_run.as_ref()?)))
        .collect();
    if !dry.is_empty() {
        out.push_str("\nlast dry run of each device that answered one:\n");
        let width = dry.iter().map(|(d, _)| d.len()).max().unwrap_or(0);
        for (d, a) in dry {
            out.push_str(&format!("{d:<width$}  {}  {}\n", a.at, dry_run_line(a)));
        }
    }
    out
}
