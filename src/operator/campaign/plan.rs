//! The campaign plan (`PLAN.toml`), parsed and checked into typed values.
//! Pure: reading the file is the caller's; every error names the key (and
//! the caller adds the file).
//!
//! ```toml
//! id = "thermo-1.1.0"            # optional; default RELEASE-VERSION-YYYYMMDDhhmm
//! bundle = "thermo-1.1.0.bundle" # relative to the plan file
//! fleet = "acme"
//! prefix = "beamup"              # optional
//!
//! [select]                       # optional; default: the whole fleet
//! groups = ["eu"]                # with `devices`: their union
//! devices = ["gw-9"]
//! running = "1.0.0"              # of those, only the devices running it
//!
//! [defaults]                     # for every wave that does not say
//! soak = "10m"
//! success = 0.9                # of reached devices; unset: the failure limits judge
//! max_failures = 0
//! max_failure_percent = 5.0
//! min_decided = 10
//!
//! [[waves]]
//! name = "canary"
//! devices = ["gw-1"]             # or count = 10, percent = 25, rest = true
//!
//! [rollout]
//! max_in_flight = 20
//! device_timeout = "15m"
//! offline_wait = "10m"
//! order = "random"               # or "id"; seed = 42 to repeat an order
//! on_threshold = "pause"         # or "abort"
//! start_at = "2026-12-01T22:00:00Z"
//! window = "22:00-05:00"         # daily, UTC; offers only inside it
//! late_joiners = "report"        # or "tail": a last wave of them
//! retries = 0                    # per device, after a rollback
//! retry_backoff = "1m"           # doubled per retry
//!
//! [revert]                       # offered on abort to devices that committed
//! bundle = "thermo-1.0.0-revert.bundle"
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::transport::protocol::is_topic_name;

/// A checked plan.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub id: Option<String>,
    pub bundle: PathBuf,
    pub fleet: String,
    pub prefix: String,
    pub select: Selection,
    pub waves: Vec<WavePlan>,
    pub max_in_flight: usize,
    pub device_timeout: Duration,
    pub offline_wait: Duration,
    pub order: Order,
    pub seed: Option<u64>,
    pub on_threshold: OnThreshold,
    /// Milliseconds since the epoch.
    pub start_at: Option<u64>,
    pub window: Option<Window>,
    pub late_joiners: LateJoiners,
    pub retries: u32,
    pub retry_backoff: Duration,
    pub revert: Option<PathBuf>,
}

/// Which devices the campaign is for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    pub groups: Vec<String>,
    pub devices: Vec<String>,
    pub running: Option<String>,
}

impl Selection {
    pub fn whole_fleet(&self) -> bool {
        self.groups.is_empty() && self.devices.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WavePlan {
    pub name: String,
    pub size: WaveSize,
    pub gate: Gate,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveSize {
    Devices(Vec<String>),
    Count(usize),
    /// Of the selection, rounded up.
    Percent(f64),
    /// Every selected device no earlier wave took.
    Rest,
}

/// When a wave may be followed by the next, and when it stops the
/// campaign.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    /// After the wave's last commit, before the next wave.
    pub soak: Duration,
    /// Fraction of the wave's reached devices that must commit. Unset:
    /// the failure limits alone judge the wave, but a wave in which no
    /// device committed never advances.
    pub success: Option<f64>,
    /// More failures than this trip the threshold.
    pub max_failures: Option<u32>,
    /// A failure percentage above this trips it, once `min_decided`
    /// devices of the wave have an outcome.
    pub max_failure_percent: Option<f64>,
    pub min_decided: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    Random,
    Id,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnThreshold {
    Pause,
    Abort,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LateJoiners {
    Report,
    Tail,
}

/// A daily window in UTC, minutes after midnight; `end < start` spans
/// midnight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub start: u32,
    pub end: u32,
}

impl Window {
    pub fn contains(&self, now_ms: u64) -> bool {
        let minute = ((now_ms / 60_000) % (24 * 60)) as u32;
        if self.start <= self.end {
            (self.start..self.end).contains(&minute)
        } else {
            minute >= self.start || minute < self.end
        }
    }

    pub fn text(&self) -> String {
        format!(
            "{:02}:{:02}-{:02}:{:02} UTC",
            self.start / 60,
            self.start % 60,
            self.end / 60,
            self.end % 60
        )
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    id: Option<String>,
    bundle: String,
    fleet: String,
    prefix: Option<String>,
    #[serde(default)]
    select: RawSelect,
    #[serde(default)]
    defaults: RawGate,
    #[serde(default)]
    waves: Vec<RawWave>,
    #[serde(default)]
    rollout: RawRollout,
    revert: Option<RawRevert>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSelect {
    #[serde(default)]
    groups: Vec<String>,
    #[serde(default)]
    devices: Vec<String>,
    running: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawGate {
    soak: Option<String>,
    success: Option<f64>,
    max_failures: Option<u32>,
    max_failure_percent: Option<f64>,
    min_decided: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWave {
    name: Option<String>,
    devices: Option<Vec<String>>,
    count: Option<usize>,
    percent: Option<f64>,
    rest: Option<bool>,
    soak: Option<String>,
    success: Option<f64>,
    max_failures: Option<u32>,
    max_failure_percent: Option<f64>,
    min_decided: Option<u32>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawRollout {
    max_in_flight: Option<usize>,
    device_timeout: Option<String>,
    offline_wait: Option<String>,
    order: Option<String>,
    seed: Option<u64>,
    on_threshold: Option<String>,
    start_at: Option<String>,
    window: Option<String>,
    late_joiners: Option<String>,
    retries: Option<u32>,
    retry_backoff: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRevert {
    bundle: String,
}

fn duration(key: &str, s: &Option<String>, default: Duration) -> Result<Duration, String> {
    match s {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s)
            .map_err(|e| format!("{key}: {s:?} is not a duration like \"30s\" or \"10m\" ({e})")),
    }
}

fn names(key: &str, v: &[String]) -> Result<(), String> {
    for n in v {
        if !is_topic_name(n) {
            return Err(format!(
                "{key}: {n:?} is not a device or group name (1-64 characters of A-Z a-z 0-9 . _ -)"
            ));
        }
    }
    Ok(())
}

fn fraction(key: &str, f: Option<f64>) -> Result<Option<f64>, String> {
    match f {
        Some(f) if !(0.0..=1.0).contains(&f) => {
            Err(format!("{key}: {f} must be a fraction from 0.0 to 1.0"))
        }
        f => Ok(f),
    }
}

fn percent(key: &str, p: Option<f64>) -> Result<Option<f64>, String> {
    match p {
        Some(p) if !(0.0..=100.0).contains(&p) => {
            Err(format!("{key}: {p} must be a percentage from 0 to 100"))
        }
        p => Ok(p),
    }
}

fn hhmm(key: &str, s: &str) -> Result<u32, String> {
    let bad = || format!("{key}: {s:?} is not a time of day like 02:30");
    let (h, m) = s.trim().split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// Parses and checks a plan. `dir` is the plan file's directory: relative
/// bundle paths are taken from there.
pub fn parse(text: &str, dir: &Path) -> Result<Plan, String> {
    let raw: RawPlan = toml::from_str(text).map_err(|e| e.to_string())?;
    if let Some(id) = &raw.id
        && !is_topic_name(id)
    {
        return Err(format!(
            "id: {id:?} must be 1-64 characters of A-Z a-z 0-9 . _ -"
        ));
    }
    if !is_topic_name(&raw.fleet) {
        return Err(format!(
            "fleet: {:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
            raw.fleet
        ));
    }
    let prefix = raw.prefix.unwrap_or_else(|| "beamup".into());
    if !crate::config::is_safe_prefix(&prefix) {
        return Err(format!(
            "prefix: {prefix:?} must be names of A-Z a-z 0-9 . _ - separated by /"
        ));
    }
    names("select.groups", &raw.select.groups)?;
    names("select.devices", &raw.select.devices)?;
    let d = &raw.defaults;
    let default_gate = Gate {
        soak: duration("defaults.soak", &d.soak, Duration::ZERO)?,
        success: fraction("defaults.success", d.success)?,
        max_failures: d.max_failures,
        max_failure_percent: percent("defaults.max_failure_percent", d.max_failure_percent)?,
        min_decided: d.min_decided.unwrap_or(1),
    };
    if raw.waves.is_empty() {
        return Err(
            "waves: a plan needs at least one [[waves]] table (e.g. a canary wave of `devices`, then `rest = true`)"
                .into(),
        );
    }
    let mut waves = Vec::new();
    for (i, w) in raw.waves.iter().enumerate() {
        let key = |k: &str| format!("waves[{i}].{k}");
        let sizes = [
            w.devices.is_some(),
            w.count.is_some(),
            w.percent.is_some(),
            w.rest == Some(true),
        ];
        let size = match (sizes.iter().filter(|s| **s).count(), w) {
            (
                1,
                RawWave {
                    devices: Some(d), ..
                },
            ) => {
                names(&key("devices"), d)?;
                if d.is_empty() {
                    return Err(format!("{}: an empty list", key("devices")));
                }
                WaveSize::Devices(d.clone())
            }
            (1, RawWave { count: Some(n), .. }) => {
                if *n == 0 {
                    return Err(format!("{}: must be at least 1", key("count")));
                }
                WaveSize::Count(*n)
            }
            (
                1,
                RawWave {
                    percent: Some(p), ..
                },
            ) => {
                if !(*p > 0.0 && *p <= 100.0) {
                    return Err(format!(
                        "{}: {p} must be above 0 and at most 100",
                        key("percent")
                    ));
                }
                WaveSize::Percent(*p)
            }
            (1, _) => WaveSize::Rest,
            _ => {
                return Err(format!(
                    "waves[{i}]: say how big the wave is with exactly one of devices = [...], count = N, percent = P or rest = true"
                ));
            }
        };
        if matches!(size, WaveSize::Rest) && i + 1 != raw.waves.len() {
            return Err(format!(
                "{}: only the last wave can take the rest",
                key("rest")
            ));
        }
        let gate = Gate {
            soak: match &w.soak {
                Some(_) => duration(&key("soak"), &w.soak, Duration::ZERO)?,
                None => default_gate.soak,
            },
            success: fraction(&key("success"), w.success)?.or(default_gate.success),
            max_failures: w.max_failures.or(default_gate.max_failures),
            max_failure_percent: percent(&key("max_failure_percent"), w.max_failure_percent)?
                .or(default_gate.max_failure_percent),
            min_decided: w.min_decided.unwrap_or(default_gate.min_decided),
        };
        // Unnamed: a first wave before others is the canary wave.
        let name = w.name.clone().unwrap_or_else(|| {
            if i == 0 && raw.waves.len() > 1 {
                "canary".into()
            } else if raw.waves.len() == 1 {
                "all".into()
            } else {
                format!("wave-{}", i + 1)
            }
        });
        if !is_topic_name(&name) {
            return Err(format!(
                "{}: {name:?} must be 1-64 characters of A-Z a-z 0-9 . _ -",
                key("name")
            ));
        }
        if waves.iter().any(|x: &WavePlan| x.name == name) {
            return Err(format!(
                "{}: {name:?} is the name of an earlier wave",
                key("name")
            ));
        }
        waves.push(WavePlan { name, size, gate });
    }
    let r = &raw.rollout;
    let max_in_flight = r.max_in_flight.unwrap_or(10);
    if max_in_flight == 0 {
        return Err("rollout.max_in_flight: must be at least 1".into());
    }
    let choice = |key: &str, v: &Option<String>, allowed: &[&str]| -> Result<usize, String> {
        match v {
            None => Ok(0),
            Some(s) => allowed
                .iter()
                .position(|a| a == s)
                .ok_or_else(|| format!("{key}: {s:?} is not one of {}", allowed.join(", "))),
        }
    };
    let order = [Order::Random, Order::Id][choice("rollout.order", &r.order, &["random", "id"])?];
    let on_threshold = [OnThreshold::Pause, OnThreshold::Abort]
        [choice("rollout.on_threshold", &r.on_threshold, &["pause", "abort"])?];
    let late_joiners = [LateJoiners::Report, LateJoiners::Tail]
        [choice("rollout.late_joiners", &r.late_joiners, &["report", "tail"])?];
    let start_at = match &r.start_at {
        None => None,
        Some(s) => {
            let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
                format!("rollout.start_at: {s:?} is not a time like 2026-12-01T22:00:00Z ({e})")
            })?;
            Some(
                t.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
            )
        }
    };
    let window = match &r.window {
        None => None,
        Some(s) => {
            let (a, b) = s.split_once('-').ok_or_else(|| {
                format!("rollout.window: {s:?} is not a daily window like \"22:00-05:00\" (UTC)")
            })?;
            let w = Window {
                start: hhmm("rollout.window", a)?,
                end: hhmm("rollout.window", b)?,
            };
            if w.start == w.end {
                return Err(format!("rollout.window: {s:?} is empty"));
            }
            Some(w)
        }
    };
    let resolve = |p: &str| {
        let p = PathBuf::from(p);
        if p.is_absolute() { p } else { dir.join(p) }
    };
    Ok(Plan {
        id: raw.id,
        bundle: resolve(&raw.bundle),
        fleet: raw.fleet,
        prefix,
        select: Selection {
            groups: raw.select.groups,
            devices: raw.select.devices,
            running: raw.select.running,
        },
        waves,
        max_in_flight,
        device_timeout: duration(
            "rollout.device_timeout",
            &r.device_timeout,
            Duration::from_secs(15 * 60),
        )?,
        offline_wait: duration(
            "rollout.offline_wait",
            &r.offline_wait,
            Duration::from_secs(10 * 60),
        )?,
        order,
        seed: r.seed,
        on_threshold,
        start_at,
        window,
        late_joiners,
        retries: r.retries.unwrap_or(0),
        retry_backoff: duration(
            "rollout.retry_backoff",
            &r.retry_backoff,
            Duration::from_secs(60),
        )?,
        revert: raw.revert.map(|r| resolve(&r.bundle)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "bundle = \"b.bundle\"\nfleet = \"acme\"\n[[waves]]\ndevices = [\"gw-1\"]\n[[waves]]\nrest = true\n";

    #[test]
    fn a_minimal_plan_has_safe_defaults() {
        let p = parse(MIN, Path::new("/plans")).unwrap();
        assert_eq!(p.bundle, PathBuf::from("/plans/b.bundle"));
        assert_eq!(p.waves[0].name, "canary");
        assert_eq!(p.waves[1].size, WaveSize::Rest);
        // Default: pause on the first failure.
        assert_eq!(p.waves[0].gate.max_failures, None);
        assert_eq!(p.waves[0].gate.success, None);
        assert_eq!(p.on_threshold, OnThreshold::Pause);
        assert_eq!(p.order, Order::Random);
        assert_eq!(p.max_in_flight, 10);
        assert!(p.select.whole_fleet());
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            (
                MIN.replace("rest = true", "rest = true\ncount = 3"),
                "waves[1]",
            ),
            (MIN.replace("[\"gw-1\"]", "[\"a/b\"]"), "waves[0].devices"),
            (
                format!("{MIN}[rollout]\norder = \"alpha\"\n"),
                "rollout.order",
            ),
            (
                format!("{MIN}[rollout]\ndevice_timeout = \"soon\"\n"),
                "rollout.device_timeout",
            ),
            (
                format!("{MIN}[rollout]\nwindow = \"25:00-01:00\"\n"),
                "rollout.window",
            ),
            (
                format!("{MIN}[rollout]\nmax_in_flight = 0\n"),
                "rollout.max_in_flight",
            ),
            (
                format!("{MIN}[defaults]\nsuccess = 2.0\n"),
                "defaults.success",
            ),
            (format!("{MIN}[rollout]\nsoak = \"1m\"\n"), "soak"),
            ("bundle = \"b\"\nfleet = \"acme\"\n".to_string(), "waves"),
            (
                "bundle = \"b\"\nfleet = \"acme\"\n[[waves]]\nrest = true\n[[waves]]\ncount = 1\n"
                    .to_string(),
                "waves[0].rest",
            ),
        ];
        for (text, key) in cases {
            let e = parse(&text, Path::new("/")).unwrap_err();
            assert!(e.contains(key), "{key} not in {e:?}");
        }
    }

    #[test]
    fn windows_may_span_midnight() {
        let w = Window {
            start: 22 * 60,
            end: 5 * 60,
        };
        let at = |h: u64, m: u64| (h * 60 + m) * 60_000 + 3 * 86_400_000;
        assert!(w.contains(at(23, 0)));
        assert!(w.contains(at(4, 59)));
        assert!(!w.contains(at(5, 0)));
        assert!(!w.contains(at(12, 0)));
        let day = Window {
            start: 2 * 60,
            end: 5 * 60,
        };
        assert!(day.contains(at(2, 0)) && !day.contains(at(1, 59)));
    }
}
