//! The operator's side of the protocol: offering a bundle (`beamup
//! offer`), reading the fleet's retained states (`beamup fleet status`)
//! and sending a device a command (`beamup fleet retry`). Each is one short
//! MQTT session.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::transport::mqtt::{self, Broker, Conn, Qos, Session};
use crate::transport::protocol::{DeviceStatus, Online, Topic, Topics};

pub(crate) fn session(role: &str) -> Result<Session> {
    let mut id = [0u8; 6];
    getrandom::fill(&mut id).map_err(|e| Error::Internal {
        detail: format!("no OS randomness: {e}"),
    })?;
    Ok(Session {
        client_id: format!("beamup-{role}-{}", hex::encode(id)),
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
        let deadline = match &settle {
            Some(s) => s.deadline().min(start + max),
            None => start + max,
        };
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
    out
}
