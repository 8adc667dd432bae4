//! `beamup fleet simulate` (hidden): N simulated devices in one process,
//! for campaign tests and benches at a scale no machine runs real nodes
//! at. Each device speaks the real protocol with the agent's own code: its
//! own persistent MQTT session and last will (`device::session`), its own
//! topics, offers checked by `bundle::verify_envelope`, `device::intake`
//! and `release::policy`, the needed chunks fetched from `beamup serve`
//! through the request window and verified (`device::transfer`), and its
//! state, online flag and events published by `device::report` through an
//! outbox. Only the node is simulated: a device holds a version string,
//! and its "install" walks the engine's steps and ends in the outcome its
//! fate says.
//!
//! Not part of a device build (feature `operator`), and not an operator
//! tool: a controller cannot tell these devices from real ones, which is
//! the point.

mod device;

use std::path::PathBuf;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::fsutil;
use crate::transport::mqtt::Broker;
use crate::transport::protocol::Topics;
use crate::trust::root::Root;

/// What a simulated device does with an offer it takes up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Fate {
    /// Fetches, installs, soaks and commits.
    Commit,
    /// Fetches, installs, and rolls back (a failed health check).
    Rollback,
    /// Fetches and installs, then says nothing more (stuck soaking).
    Silent,
    /// Drops off the broker (last will) when it takes the offer up, and
    /// stays away.
    Offline,
    /// Restarts half-way through the transfer (connection cut, download
    /// resumed from its bitmap), then commits.
    Restart,
}

const FATES: [(Fate, &str); 5] = [
    (Fate::Commit, "commit"),
    (Fate::Rollback, "rollback"),
    (Fate::Silent, "silent"),
    (Fate::Offline, "offline"),
    (Fate::Restart, "restart"),
];

/// Shares of the fleet per fate, summing to 1.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Mix(Vec<(Fate, f64)>);

impl Mix {
    /// `commit=0.98,rollback=0.02` (fates not named get none).
    pub(crate) fn parse(s: &str) -> std::result::Result<Mix, String> {
        let mut shares = Vec::new();
        for part in s.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, value) = part.split_once('=').ok_or_else(|| {
                format!("--mix {part:?}: expected FATE=SHARE, e.g. rollback=0.02")
            })?;
            let fate = FATES
                .iter()
                .find(|(_, n)| *n == name.trim())
                .map(|(f, _)| *f)
                .ok_or_else(|| {
                    format!(
                        "--mix: unknown fate {name:?}; fates are commit, rollback, silent, offline, restart"
                    )
                })?;
            let share: f64 = value
                .trim()
                .parse()
                .ok()
                .filter(|v: &f64| (0.0..=1.0).contains(v))
                .ok_or_else(|| format!("--mix {part:?}: the share must be a number from 0 to 1"))?;
            if shares.iter().any(|(f, _)| *f == fate) {
                return Err(format!("--mix names {name} twice"));
            }
            shares.push((fate, share));
        }
        let total: f64 = shares.iter().map(|(_, s)| s).sum();
        if (total - 1.0).abs() > 1e-6 {
            return Err(format!("--mix {s:?}: the shares add up to {total}, not 1"));
        }
        Ok(Mix(shares))
    }

    /// The fate of each of `n` devices: each share rounded (largest
    /// remainder, so the counts add up to `n`), then spread over the fleet
    /// in an order fixed by `seed`.
    pub(crate) fn assign(&self, n: usize, seed: u64) -> Vec<Fate> {
        let exact: Vec<f64> = self.0.iter().map(|(_, s)| s * n as f64).collect();
        let mut counts: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
        let mut order: Vec<usize> = (0..counts.len()).collect();
        order.sort_by(|&a, &b| {
            let (ra, rb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
            rb.partial_cmp(&ra).unwrap_or(std::cmp::Ordering::Equal)
        });
        let mut left = n - counts.iter().sum::<usize>();
        for i in order {
            if left == 0 {
                break;
            }
            counts[i] += 1;
            left -= 1;
        }
        let mut fates: Vec<Fate> = self
            .0
            .iter()
            .zip(&counts)
            .flat_map(|((f, _), &c)| std::iter::repeat_n(*f, c))
            .collect();
        // Fisher-Yates with xorshift: the same seed, the same fleet.
        let mut x = seed | 1;
        for i in (1..fates.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            fates.swap(i, (x % (i as u64 + 1)) as usize);
        }
        fates
    }
}

pub(crate) struct Options {
    pub(crate) broker: Broker,
    pub(crate) prefix: String,
    pub(crate) fleet: String,
    pub(crate) devices: usize,
    /// Device ids are `ID_PREFIX-00001` and so on.
    pub(crate) id_prefix: String,
    pub(crate) groups: Vec<String>,
    pub(crate) root: PathBuf,
    pub(crate) release: String,
    /// The version every device runs (and has permanent) at start.
    pub(crate) running: String,
    pub(crate) mix: Mix,
    pub(crate) seed: u64,
    /// From the download's end to the outcome.
    pub(crate) install_time: Duration,
    /// Outboxes and downloads, one directory per device.
    pub(crate) state_dir: PathBuf,
    /// What each device did, written once every device is online and at
    /// the end (JSON).
    pub(crate) summary: Option<PathBuf>,
    /// New connections per second at start.
    pub(crate) connect_rate: u32,
    /// Threads the devices are spread over.
    pub(crate) threads: usize,
}

/// What one device did, as it says.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Record {
    pub(crate) device: String,
    pub(crate) fate: Option<Fate>,
    /// Offers taken up (a transfer started), not counting resumes.
    pub(crate) offers: u32,
    pub(crate) restarts: u32,
    pub(crate) requests: u64,
    /// Chunks received and verified against the signed digests.
    pub(crate) chunks_verified: u64,
    /// Offers refused before any data moved (with the reason).
    pub(crate) rejected: Vec<String>,
    pub(crate) outcomes: Vec<OutcomeRecord>,
    pub(crate) connections: u32,
    /// When the last transfer started and when its last chunk verified
    /// (milliseconds since the epoch), for throughput figures.
    pub(crate) fetch_started_ms: Option<u64>,
    pub(crate) fetch_done_ms: Option<u64>,
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct OutcomeRecord {
    pub(crate) outcome: String,
    pub(crate) version: String,
    pub(crate) sequence: Option<u64>,
    pub(crate) reason: Option<String>,
}

#[derive(Serialize)]
struct Summary<'a> {
    devices: &'a [Record],
    online: usize,
    nofile: (u64, u64),
}

/// Raises the soft limit on open files to the hard limit: each device is
/// one socket and a few files at a time. Returns (soft, hard) after.
fn raise_nofile() -> (u64, u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                (hard, hard)
            } else {
                (soft, hard)
            }
        }
        Err(_) => (0, 0),
    }
}

fn write_summary(path: &std::path::Path, records: &[Record], nofile: (u64, u64)) -> Result<()> {
    let online = records.iter().filter(|r| r.connections > 0).count();
    let bytes = serde_json::to_vec(&Summary {
        devices: records,
        online,
        nofile,
    })
    .expect("json");
    fsutil::write_atomic(path, 0o644, true, &bytes)
}

/// Runs the devices until SIGTERM or SIGINT.
pub(crate) async fn run(opts: Options) -> Result<()> {
    crate::memory::tune_allocator();
    let nofile = raise_nofile();
    // Per device: its socket, and a download file and an outbox file now
    // and then.
    let wanted = opts.devices as u64 + 64;
    if nofile.0 < wanted {
        return Err(Error::Usage(format!(
            "{} devices need about {wanted} open files; the limit is {} (hard {}): raise it (ulimit -n) or simulate fewer",
            opts.devices, nofile.0, nofile.1
        )));
    }
    // Checked once here, loaded again by each shard.
    Root::load(&opts.root)?;
    std::fs::create_dir_all(&opts.state_dir)
        .map_err(|e| Error::io(&opts.state_dir, "create", e))?;
    let threads = opts.threads.clamp(1, opts.devices.max(1));
    tracing::info!(
        "simulating {} devices on {threads} thread(s); open files limit {} (hard {})",
        opts.devices,
        nofile.0,
        nofile.1
    );
    let fates = opts.mix.assign(opts.devices, opts.seed);
    let width = opts.devices.to_string().len().max(5);
    let records: Records = Arc::new(Mutex::new(
        fates
            .iter()
            .enumerate()
            .map(|(i, f)| Record {
                device: format!("{}-{:0width$}", opts.id_prefix, i + 1),
                fate: Some(*f),
                ..Default::default()
            })
            .collect(),
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let opts = Arc::new(opts);
    // Each shard is a thread of its own with a single-threaded runtime:
    // a device's state never crosses threads, and the devices' work (TLS,
    // SHA-256 of every chunk, their files) spreads over the cores.
    let shards: Vec<std::thread::JoinHandle<()>> = (0..threads)
        .map(|shard| {
            let devices: Vec<(usize, Fate)> = fates
                .iter()
                .copied()
                .enumerate()
                .filter(|(i, _)| i % threads == shard)
                .collect();
            let (opts, records, stop) = (opts.clone(), records.clone(), stop_rx.clone());
            std::thread::Builder::new()
                .name(format!("sim-{shard}"))
                .spawn(move || run_shard(shard, threads, devices, opts, records, stop))
                .map_err(|e| Error::Internal {
                    detail: format!("cannot start a simulator thread: {e}"),
                })
        })
        .collect::<Result<_>>()?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::Internal {
            detail: format!("cannot handle SIGTERM: {e}"),
        })?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| Error::Internal {
            detail: format!("cannot handle SIGINT: {e}"),
        })?;
    let watch = async {
        let mut all_online_said = false;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let online = lock(&records).iter().filter(|r| r.connections > 0).count();
            if !all_online_said && online == opts.devices {
                all_online_said = true;
                if let Some(p) = &opts.summary
                    && let Err(e) = write_summary(p, &lock(&records), nofile)
                {
                    tracing::error!("{e}");
                }
                tracing::info!("all {} simulated devices connected", opts.devices);
            }
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = watch => {}
    }
    let _ = stop_tx.send(true);
    for s in shards {
        let _ = s.join();
    }
    if let Some(p) = &opts.summary {
        write_summary(p, &lock(&records), nofile)?;
    }
    tracing::info!("simulator stopped");
    Ok(())
}

/// What every device records, shared by the shards (each device writes
/// only its own row).
pub(crate) type Records = Arc<Mutex<Vec<Record>>>;

pub(crate) fn lock(r: &Records) -> std::sync::MutexGuard<'_, Vec<Record>> {
    r.lock().unwrap_or_else(|p| p.into_inner())
}

/// One thread's devices, until `stop` turns true. They connect at the
/// shard's share of the connect rate, interleaved with the other shards.
fn run_shard(
    shard: usize,
    threads: usize,
    devices: Vec<(usize, Fate)>,
    opts: Arc<Options>,
    records: Records,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!("simulator thread {shard}: no runtime: {e}");
            return;
        }
    };
    let root = match Root::load(&opts.root) {
        Ok(r) => Rc::new(r),
        Err(e) => {
            tracing::error!("simulator thread {shard}: {e}");
            return;
        }
    };
    let topics = Rc::new(Topics::new(&opts.prefix, &opts.fleet));
    let broker = Rc::new(opts.broker.clone());
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let gap = Duration::from_secs(1) / opts.connect_rate.max(1);
        let mut next = tokio::time::Instant::now() + gap * shard as u32;
        let spawner = {
            let stop = stop.clone();
            async move {
                for (i, fate) in devices {
                    let id = lock(&records)[i].device.clone();
                    let d = device::SimDevice::new(device::Setup {
                        index: i,
                        fate,
                        id,
                        opts: opts.clone(),
                        topics: topics.clone(),
                        broker: broker.clone(),
                        root: root.clone(),
                        records: records.clone(),
                    });
                    match d {
                        Ok(d) => {
                            tokio::task::spawn_local(d.run(stop.clone()));
                        }
                        Err(e) => tracing::error!("device {}: {e}", i + 1),
                    }
                    next += gap * threads as u32;
                    tokio::time::sleep_until(next).await;
                }
            }
        };
        tokio::task::spawn_local(spawner);
        while !*stop.borrow() {
            if stop.changed().await.is_err() {
                break;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mix_gives_each_fate_its_rounded_share_and_the_counts_add_up() {
        let m = Mix::parse("commit=0.98,rollback=0.02").unwrap();
        let f = m.assign(300, 7);
        assert_eq!(f.len(), 300);
        assert_eq!(f.iter().filter(|f| **f == Fate::Rollback).count(), 6);
        let m = Mix::parse("commit=0.5,silent=0.25,restart=0.25").unwrap();
        let f = m.assign(3, 1);
        assert_eq!(f.len(), 3);
        // The same seed spreads the fates the same way; another does not
        // (for a large enough fleet).
        let m = Mix::parse("commit=0.9,rollback=0.1").unwrap();
        assert_eq!(m.assign(100, 3), m.assign(100, 3));
        assert_ne!(m.assign(100, 3), m.assign(100, 4));
    }

    #[test]
    fn a_mix_that_does_not_add_up_or_names_an_unknown_fate_is_refused() {
        assert!(
            Mix::parse("commit=0.9")
                .unwrap_err()
                .contains("add up to 0.9")
        );
        assert!(
            Mix::parse("commit=0.9,explode=0.1")
                .unwrap_err()
                .contains("unknown fate \"explode\"")
        );
        assert!(Mix::parse("commit=2").unwrap_err().contains("from 0 to 1"));
        assert!(Mix::parse("commit").unwrap_err().contains("FATE=SHARE"));
    }
}
