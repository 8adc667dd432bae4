//! What `beamup campaign status` and `report` show, from a campaign's
//! state (local, or the retained copy any operator reads): a pure
//! rendering into a report, then a table, JSON or CSV.

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;

use super::decide::{self, Counts};
use super::state::{Campaign, Track};
use crate::transport::protocol::DryRunAnswer;

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub id: String,
    pub fleet: String,
    pub release: String,
    pub version: String,
    pub sequence: u64,
    pub status: &'static str,
    pub reason: Option<String>,
    pub finished: bool,
    pub current_wave: Option<String>,
    pub waves: Vec<WaveReport>,
    pub total: Totals,
    pub devices: Vec<DeviceReport>,
    pub left_out: Vec<String>,
    pub late_joiners: Vec<String>,
    pub log: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct WaveReport {
    pub name: String,
    pub state: &'static str,
    #[serde(flatten)]
    pub counts: Totals,
    pub soak_until: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Totals {
    pub devices: usize,
    pub committed: usize,
    pub already_current: usize,
    pub failed: usize,
    pub unreached: usize,
    pub in_flight: usize,
    pub waiting: usize,
    pub withdrawn: usize,
}

impl From<Counts> for Totals {
    fn from(c: Counts) -> Totals {
        Totals {
            devices: c.total,
            committed: c.committed,
            already_current: c.already,
            failed: c.failed,
            unreached: c.unreached,
            in_flight: c.in_flight,
            waiting: c.waiting,
            withdrawn: c.withdrawn,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct DeviceReport {
    pub device: String,
    pub wave: String,
    pub outcome: &'static str,
    pub reason: Option<String>,
    pub before: Option<String>,
    pub after: Option<String>,
    pub attempts: u32,
    pub offered_at: Option<String>,
    pub downloaded_at: Option<String>,
    pub installed_at: Option<String>,
    /// When the device reported its outcome (committed or not).
    pub outcome_at: Option<String>,
    /// The device's install, step by step (milliseconds).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<crate::transport::protocol::StepReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub late: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revert: Option<&'static str>,
}

pub fn time(ms: Option<u64>) -> Option<String> {
    ms.map(|ms| {
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
    })
}

pub fn report(c: &Campaign) -> Report {
    let waves = c
        .waves
        .iter()
        .enumerate()
        .map(|(i, w)| WaveReport {
            name: w.name.clone(),
            state: if w.done_at.is_some() && (i < c.wave || c.finished()) {
                "done"
            } else if c.status == super::state::Status::Aborted {
                if w.started_at.is_some() {
                    "stopped"
                } else {
                    "not started"
                }
            } else if w.done_at.is_some() {
                "soaking"
            } else if w.started_at.is_some() {
                "rolling out"
            } else {
                "pending"
            },
            counts: decide::wave_counts(c, i).into(),
            soak_until: time(w.soak_until),
        })
        .collect();
    let total: Totals = decide::counts(c.devices.values().map(|r| &r.update)).into();
    let mut devices: Vec<DeviceReport> = c
        .devices
        .iter()
        .map(|(id, r)| {
            let t: &Track = &r.update;
            DeviceReport {
                device: id.clone(),
                wave: c.waves.get(r.wave).map_or("?".into(), |w| w.name.clone()),
                outcome: t.verdict().name(),
                reason: t.reason.clone(),
                before: r.before.clone(),
                after: r.after.clone(),
                attempts: t.attempts,
                offered_at: time(t.offered_at),
                downloaded_at: time(t.downloaded_at),
                installed_at: time(t.installed_at),
                outcome_at: time(t.outcome_at),
                steps: t.steps.clone(),
                late: t.late.clone(),
                revert: r.revert.as_ref().map(|t| t.verdict().name()),
            }
        })
        .collect();
    devices.sort_by(|a, b| (a.wave.as_str(), &a.device).cmp(&(b.wave.as_str(), &b.device)));
    devices.sort_by_key(|d| c.waves.iter().position(|w| w.name == d.wave));
    Report {
        id: c.id.clone(),
        fleet: c.fleet.clone(),
        release: c.target.name.clone(),
        version: c.target.version.clone(),
        sequence: c.target.sequence,
        status: c.status.name(),
        reason: c.reason.clone(),
        finished: c.finished(),
        current_wave: c.waves.get(c.wave).map(|w| w.name.clone()),
        waves,
        total,
        devices,
        left_out: c.left_out.clone(),
        late_joiners: c.late_joiners.iter().cloned().collect(),
        log: c
            .log
            .iter()
            .map(|l| format!("{} {}", time(Some(l.at)).unwrap_or_default(), l.text))
            .collect(),
    }
}

fn bar(t: &Totals, width: usize) -> String {
    if t.devices == 0 {
        return format!("[{}]", " ".repeat(width));
    }
    let cells = |n: usize| n * width / t.devices;
    let ok = cells(t.committed + t.already_current);
    let bad = cells(t.failed + t.unreached).min(width - ok);
    let busy = cells(t.in_flight).min(width - ok - bad);
    format!(
        "[{}{}{}{}]",
        "#".repeat(ok),
        "x".repeat(bad),
        ">".repeat(busy),
        ".".repeat(width - ok - bad - busy)
    )
}

fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|i| {
            rows.iter()
                .filter_map(|r| r.get(i))
                .map(String::len)
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, cell)| {
                if i + 1 == r.len() {
                    cell.clone()
                } else {
                    format!("{cell:<w$}", w = widths[i])
                }
            })
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn totals_text(t: &Totals) -> String {
    let mut s = format!(
        "{}/{} committed",
        t.committed + t.already_current,
        t.devices
    );
    for (n, what) in [
        (t.already_current, "already current"),
        (t.failed, "failed"),
        (t.unreached, "unreached"),
        (t.in_flight, "in flight"),
        (t.withdrawn, "not offered"),
    ] {
        if n > 0 {
            s.push_str(&format!(", {n} {what}"));
        }
    }
    s
}

/// The human view: header, a progress bar per wave, a line per device.
pub fn status_text(r: &Report, devices: bool) -> String {
    let mut out = format!(
        "campaign {}  {} {} (sequence {})  fleet {}\nstatus   {}{}\n",
        r.id,
        r.release,
        r.version,
        r.sequence,
        r.fleet,
        r.status,
        r.reason
            .as_ref()
            .map_or(String::new(), |why| format!(": {why}"))
    );
    let mut rows = vec![];
    for w in &r.waves {
        rows.push(vec![
            format!("  {}", w.name),
            w.state.to_string(),
            bar(&w.counts, 20),
            totals_text(&w.counts),
        ]);
    }
    rows.push(vec![
        "  total".into(),
        String::new(),
        bar(&r.total, 20),
        totals_text(&r.total),
    ]);
    out.push_str(&table(&rows));
    if !r.left_out.is_empty() {
        out.push_str(&format!("not in any wave: {}\n", r.left_out.join(", ")));
    }
    if !r.late_joiners.is_empty() {
        out.push_str(&format!(
            "joined after the start (not offered): {}\n",
            r.late_joiners.join(", ")
        ));
    }
    if devices {
        let mut rows = vec![vec![
            "DEVICE".to_string(),
            "WAVE".into(),
            "OUTCOME".into(),
            "TRIES".into(),
            "BEFORE".into(),
            "AFTER".into(),
            "REASON".into(),
        ]];
        for d in &r.devices {
            rows.push(vec![
                d.device.clone(),
                d.wave.clone(),
                d.outcome.to_string(),
                d.attempts.to_string(),
                d.before.clone().unwrap_or("-".into()),
                d.after.clone().unwrap_or("-".into()),
                d.reason.clone().unwrap_or_default()
                    + &d.late
                        .as_ref()
                        .map_or(String::new(), |l| format!(" (later: {l})")),
            ]);
        }
        out.push('\n');
        out.push_str(&table(&rows));
    }
    out
}

/// The report, per device with its times, then per wave and in total.
pub fn report_text(r: &Report) -> String {
    let mut out = status_text(r, false);
    let mut rows = vec![vec![
        "DEVICE".to_string(),
        "WAVE".into(),
        "OUTCOME".into(),
        "TRIES".into(),
        "BEFORE".into(),
        "AFTER".into(),
        "OFFERED".into(),
        "DOWNLOADED".into(),
        "INSTALLED".into(),
        "OUTCOME AT".into(),
        "TOOK".into(),
        "REASON".into(),
    ]];
    let dash = |s: &Option<String>| s.clone().unwrap_or("-".into());
    for d in &r.devices {
        rows.push(vec![
            d.device.clone(),
            d.wave.clone(),
            d.outcome.to_string(),
            d.attempts.to_string(),
            dash(&d.before),
            dash(&d.after),
            dash(&d.offered_at),
            dash(&d.downloaded_at),
            dash(&d.installed_at),
            dash(&d.outcome_at),
            took(&d.steps),
            d.reason.clone().unwrap_or_default(),
        ]);
    }
    out.push('\n');
    out.push_str(&table(&rows));
    out.push_str("\nhistory\n");
    for l in &r.log {
        out.push_str(&format!("  {l}\n"));
    }
    out
}

/// An install's time, and its longest step (the soak, usually).
fn took(steps: &[crate::transport::protocol::StepReport]) -> String {
    let Some(longest) = steps.iter().max_by_key(|s| s.ms) else {
        return "-".into();
    };
    let total: u64 = steps.iter().map(|s| s.ms).sum();
    format!(
        "{:.1}s ({} {:.1}s)",
        total as f64 / 1000.0,
        longest.step,
        longest.ms as f64 / 1000.0
    )
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

pub fn report_csv(r: &Report) -> String {
    let mut out = String::from(
        "device,wave,outcome,reason,before,after,attempts,offered_at,downloaded_at,installed_at,outcome_at,steps_ms,revert\n",
    );
    let o = |s: &Option<String>| csv_field(s.as_deref().unwrap_or(""));
    for d in &r.devices {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
            csv_field(&d.device),
            csv_field(&d.wave),
            d.outcome,
            o(&d.reason),
            o(&d.before),
            o(&d.after),
            d.attempts,
            o(&d.offered_at),
            o(&d.downloaded_at),
            o(&d.installed_at),
            o(&d.outcome_at),
            csv_field(
                &d.steps
                    .iter()
                    .map(|s| format!("{}={}", s.step, s.ms))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            d.revert.unwrap_or("")
        ));
    }
    out
}

/// `beamup campaign plan --dry-run`: per wave, what the asked devices
/// answered to a dry run of the campaign's offer.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DryRunSummary {
    pub waves: Vec<DryRunWave>,
    /// Summed over the waves.
    pub hot: usize,
    pub cold: usize,
    pub download_bytes: u64,
    pub refused: usize,
    pub no_answer: usize,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DryRunWave {
    pub name: String,
    pub hot: usize,
    pub cold: usize,
    /// What the devices that would install would fetch, together.
    pub download_bytes: u64,
    /// Devices not asked: they run the release already.
    pub already_current: usize,
    /// Devices that would refuse or ignore the offer (or are busy), and why.
    pub refused: Vec<DryRunRefusal>,
    /// Devices that did not answer in time.
    pub no_answer: Vec<String>,
    pub answers: Vec<(String, DryRunAnswer)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DryRunRefusal {
    pub device: String,
    pub verdict: String,
    pub reason: String,
}

/// Sorts each wave's devices by their answer (`None`: no answer; devices
/// not in `answers` were not asked, as they run the release already).
pub fn dry_run_summary(
    waves: &[(String, Vec<String>)],
    answers: &std::collections::BTreeMap<String, Option<DryRunAnswer>>,
) -> DryRunSummary {
    let mut s = DryRunSummary::default();
    for (name, devices) in waves {
        let mut w = DryRunWave {
            name: name.clone(),
            ..DryRunWave::default()
        };
        for d in devices {
            match answers.get(d) {
                None => w.already_current += 1,
                Some(None) => w.no_answer.push(d.clone()),
                Some(Some(a)) => {
                    if a.verdict == "would_install" {
                        match a.strategy.as_deref() {
                            Some("hot") => w.hot += 1,
                            _ => w.cold += 1,
                        }
                        w.download_bytes += a.bytes.unwrap_or(0);
                    } else {
                        w.refused.push(DryRunRefusal {
                            device: d.clone(),
                            verdict: a.verdict.clone(),
                            reason: a.reason.clone().unwrap_or_default(),
                        });
                    }
                    w.answers.push((d.clone(), a.clone()));
                }
            }
        }
        s.hot += w.hot;
        s.cold += w.cold;
        s.download_bytes += w.download_bytes;
        s.refused += w.refused.len();
        s.no_answer += w.no_answer.len();
        s.waves.push(w);
    }
    s
}

pub fn dry_run_text(s: &DryRunSummary) -> String {
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / 1048576.0);
    let mut out = String::from("\ndry run: the devices checked the offer and changed nothing\n");
    for w in &s.waves {
        out.push_str(&format!(
            "wave {}: {} hot, {} cold, download {}, {} would refuse, {} no answer{}\n",
            w.name,
            w.hot,
            w.cold,
            mib(w.download_bytes),
            w.refused.len(),
            w.no_answer.len(),
            if w.already_current > 0 {
                format!(", {} already current", w.already_current)
            } else {
                String::new()
            }
        ));
        for r in &w.refused {
            out.push_str(&format!(
                "  {:<24} {}: {}\n",
                r.device,
                r.verdict.replace('_', " "),
                r.reason
            ));
        }
        for d in &w.no_answer {
            out.push_str(&format!(
                "  {d:<24} no answer (offline, or an agent without dry runs)\n"
            ));
        }
    }
    out.push_str(&format!(
        "total: {} hot, {} cold, download {}, {} would refuse, {} no answer\n",
        s.hot,
        s.cold,
        mib(s.download_bytes),
        s.refused,
        s.no_answer
    ));
    out
}

#[cfg(test)]
mod dry_run_tests {
    use std::collections::BTreeMap;

    use super::*;

    fn answer(
        verdict: &str,
        strategy: Option<&str>,
        bytes: u64,
        reason: Option<&str>,
    ) -> DryRunAnswer {
        DryRunAnswer {
            id: "dry-1".into(),
            verdict: verdict.into(),
            strategy: strategy.map(str::to_string),
            bytes: Some(bytes),
            reason: reason.map(str::to_string),
            ..DryRunAnswer::default()
        }
    }

    #[test]
    fn each_device_counts_once_in_its_wave_by_its_answer() {
        let waves = vec![
            ("canary".to_string(), vec!["a".to_string(), "b".into()]),
            (
                "rest".to_string(),
                vec!["c".into(), "d".into(), "e".into(), "f".into()],
            ),
        ];
        let answers: BTreeMap<String, Option<DryRunAnswer>> = [
            ("a", Some(answer("would_install", Some("hot"), 100, None))),
            // b runs the release already: not asked.
            ("c", Some(answer("would_install", Some("cold"), 1000, None))),
            ("d", Some(answer("would_refuse", None, 0, Some("hot-only")))),
            ("e", None),
            ("f", Some(answer("would_install", Some("hot"), 10, None))),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let s = dry_run_summary(&waves, &answers);
        let c = &s.waves[0];
        assert_eq!(
            (c.hot, c.cold, c.download_bytes, c.already_current),
            (1, 0, 100, 1)
        );
        let r = &s.waves[1];
        assert_eq!((r.hot, r.cold, r.download_bytes), (1, 1, 1010));
        assert_eq!(r.refused.len(), 1);
        assert_eq!(
            (r.refused[0].device.as_str(), r.refused[0].reason.as_str()),
            ("d", "hot-only")
        );
        assert_eq!(r.no_answer, ["e"]);
        assert_eq!(
            (s.hot, s.cold, s.download_bytes, s.refused, s.no_answer),
            (2, 1, 1110, 1, 1)
        );
        let text = dry_run_text(&s);
        assert!(text.contains("wave canary: 1 hot, 0 cold, download 0.0 MiB, 0 would refuse, 0 no answer, 1 already current\n"), "{text}");
        assert!(
            text.contains("  d                        would refuse: hot-only\n"),
            "{text}"
        );
        assert!(text.contains("total: 2 hot, 1 cold,"), "{text}");
    }
}
