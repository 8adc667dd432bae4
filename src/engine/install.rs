//! The install engine: one straight line from a bundle to a committed (or
//! rolled back) release, each phase written to the journal before its
//! effect.
//!
//! ```text
//! verify -> unpack beside -> set_unpacked -> install_release (hot)   -> soak -> commit
//!                                          \ stop, boot new (cold) /        \-> roll back
//! ```
//!
//! The decisions live in `decide` (strategy, recovery) and `health::Gate`;
//! this module performs them. Outcomes are exactly one of committed, rolled
//! back (with the reason), rejected (with the reason: nothing was changed),
//! or needs attention (the rollback itself failed; the journal is kept so
//! `beamup recover` can try again).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use crate::bundle::Bundle;
use crate::engine::decide::{self, NodeSeen, Recovery, Running};
use crate::engine::settings::EngineSettings;
use crate::engine::state::{
    DeviceState, Journal, Outcome, OutcomeKind, Phase, StepTime, Store, Strategy,
};
use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::health::{self, Gate, Verdict};
use crate::limits::LIMITS;
use crate::node::calls::{NodeError, ReleaseStatus};
use crate::node::link::NodeLink;
use crate::release::manifest::{self, Manifest};
use crate::release::policy::{self, DeviceFacts};
use crate::release::releases_file::{self, OnDisk};
use crate::staging::bootset::{self, Protected};
use crate::staging::{self, Plan};
use crate::trust::root::Root;

/// A step of an install as it is reported while it happens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    Verifying,
    Unpacking,
    Installing,
    Restarting,
    Soaking,
    Committing,
    RollingBack,
    Recovering,
    /// The outcome, just before the engine returns it.
    Finished(OutcomeKind),
}

impl Step {
    /// How the step is shown to a person (`beamup: soaking: ...`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Step::Verifying => "verifying",
            Step::Unpacking => "unpacking",
            Step::Installing => "installing",
            Step::Restarting => "restarting",
            Step::Soaking => "soaking",
            Step::Committing => "committing",
            Step::RollingBack => "rolling_back",
            Step::Recovering => "recovering",
            Step::Finished(kind) => kind.name(),
        }
    }
}

/// Where progress goes: the terminal for `beamup install`, MQTT for the
/// agent.
pub(crate) trait Progress: Send + Sync {
    fn phase(&self, step: Step, detail: &str);
}

#[derive(Clone, Debug, Default)]
pub(crate) struct InstallOptions {
    /// Install a bundle that was rolled back before.
    pub(crate) retry: bool,
    /// The chunks of the tarball the bundle file holds, one flag per chunk
    /// (a download that fetched only what the unpack reads); `None` when
    /// it holds all of them. An install that would read a chunk the file
    /// lacks stops before changing anything, with [`Error::Incomplete`].
    pub(crate) available: Option<Vec<bool>>,
}

/// Owns what it needs (settings, the progress sink), so that a caller can
/// move it into a task or a future of its own.
pub(crate) struct Engine {
    settings: EngineSettings,
    store: Store,
    state: DeviceState,
    node: NodeLink,
    progress: Box<dyn Progress>,
    /// Flushing the unpacked files to disk, started after the unpack and
    /// awaited before the commit (see `commit`).
    pending_sync: Option<tokio::task::JoinHandle<Result<()>>>,
    /// The steps of the install in progress, with when each began: the
    /// outcome carries their durations.
    timeline: Vec<(Step, Instant)>,
}

/// What `prepare` established about a bundle before anything is touched.
struct Prepared {
    bundle: Bundle,
    manifest: Manifest,
    running: Running,
    strategy: Strategy,
    plan: Plan,
    /// release_handler lists the new version already (unpacked or old).
    registered: Option<ReleaseStatus>,
}

/// What an install would do (`beamup install --dry-run`).
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct DryRun {
    pub(crate) release: String,
    pub(crate) version: String,
    pub(crate) sequence: u64,
    pub(crate) running: String,
    pub(crate) permanent: String,
    /// hot or cold
    pub(crate) strategy: &'static str,
    pub(crate) why: String,
    /// Top-level paths the unpack would create in the release root.
    pub(crate) creates: Vec<String>,
    /// release_handler lists the version as unpacked or old: it would be
    /// forgotten first.
    pub(crate) forgets_unpacked: bool,
    /// The root has no usable RELEASES (mix, relx without ERTS): it would
    /// be written from the `.rel` files first.
    pub(crate) writes_releases_file: bool,
    /// Of the tarball, what the unpack reads (and what the agent fetches).
    pub(crate) chunks_read: usize,
    pub(crate) chunks_total: usize,
    pub(crate) bytes_read: u64,
    pub(crate) tarball_size: u64,
    pub(crate) space_needed: u64,
    pub(crate) space_free: u64,
    /// Releases beamup installed that the commit would prune.
    pub(crate) prunes_after_commit: Vec<String>,
}

impl Engine {
    /// Takes the state-dir lock and sets up the node link.
    pub(crate) fn open(settings: EngineSettings, progress: Box<dyn Progress>) -> Result<Engine> {
        let (store, state) = Store::open(&settings.state_dir)?;
        let node = NodeLink::new(settings.link.clone());
        Ok(Engine {
            settings,
            store,
            state,
            node,
            progress,
            pending_sync: None,
            timeline: Vec::new(),
        })
    }

    pub(crate) fn state(&self) -> &DeviceState {
        &self.state
    }

    /// A step begins: recorded for the outcome's durations, and reported.
    fn begin_step(&mut self, step: Step, detail: &str) {
        if !matches!(step, Step::Finished(_)) {
            self.timeline.push((step, Instant::now()));
        }
        self.progress.phase(step, detail);
    }

    /// How long each step of this install took, until `end`; and, for a
    /// rollback, the step that failed (the one before rolling back).
    fn step_times(&self, end: Instant) -> (Vec<StepTime>, Option<String>) {
        let times = self
            .timeline
            .iter()
            .enumerate()
            .map(|(i, (step, at))| {
                let until = self.timeline.get(i + 1).map_or(end, |(_, t)| *t);
                StepTime {
                    step: step.name().to_string(),
                    ms: until.duration_since(*at).as_millis() as u64,
                }
            })
            .collect();
        let failed = self
            .timeline
            .iter()
            .position(|(s, _)| *s == Step::RollingBack)
            .and_then(|i| i.checked_sub(1))
            .map(|i| self.timeline[i].0.name().to_string());
        (times, failed)
    }

    fn root(&self) -> &Path {
        &self.settings.release_root
    }

    fn save(&self) -> Result<()> {
        self.store.save(&self.state)
    }

    fn journal(&self) -> &Journal {
        self.state.current.as_ref().expect("install in progress")
    }

    /// Moves the journal to `phase`, durably, before the caller acts on it.
    fn enter(&mut self, phase: Phase) -> Result<()> {
        let j = self.state.current.as_mut().expect("install in progress");
        crash_point(&format!("{}+", j.phase.name()));
        tracing::info!("{} {}: {}", j.release, j.to_version, phase.name());
        j.phase = phase;
        self.save()?;
        crash_point(self.journal().phase.name());
        Ok(())
    }

    fn finish(&mut self, kind: OutcomeKind, reason: Option<String>) -> Result<Outcome> {
        let j = self.journal().clone();
        crash_point(&format!("{}+", j.phase.name()));
        let (steps, failed_step) = self.step_times(Instant::now());
        let outcome = Outcome {
            outcome: kind,
            release: j.release.clone(),
            version: j.to_version.clone(),
            from_version: Some(j.from_version.clone()),
            sequence: Some(j.sequence),
            strategy: Some(j.strategy),
            reason,
            at: manifest::format_time(SystemTime::now()),
            interrupted: false,
            steps,
            failed_step,
        };
        self.timeline.clear();
        self.state.finish(outcome.clone());
        self.save()?;
        self.begin_step(
            Step::Finished(kind),
            outcome.reason.as_deref().unwrap_or(""),
        );
        Ok(outcome)
    }

    fn reject(&mut self, m: Option<&Manifest>, e: &Error) -> Result<()> {
        self.state.finish(Outcome::rejected(
            m,
            &self.settings.release_name,
            e.to_string(),
        ));
        self.save()?;
        self.begin_step(Step::Finished(OutcomeKind::Rejected), &e.to_string());
        Ok(())
    }

    /// Installs a bundle file. An interrupted earlier install is recovered
    /// first. Returns the outcome; a rejection is an `Err` carrying the
    /// specific reason (and its exit code), recorded in the state as well.
    pub(crate) async fn install(
        &mut self,
        bundle: &Path,
        opts: &InstallOptions,
    ) -> Result<Outcome> {
        if let Some(o) = self.recover().await?
            && o.outcome == OutcomeKind::NeedsAttention
        {
            return Err(Error::Refused {
                reason: format!(
                    "an earlier install of {} {} needs attention ({}); fix the node, then run `beamup recover`",
                    o.release,
                    o.version,
                    o.reason.unwrap_or_default()
                ),
            });
        }
        let started = Instant::now();
        self.timeline.clear();
        self.begin_step(Step::Verifying, &bundle.display().to_string());
        let mut manifest_seen = None;
        let prepared = match self.prepare(bundle, opts, &mut manifest_seen).await {
            Ok(p) => p,
            // A download that lacks chunks is no verdict on the bundle:
            // nothing is recorded, the chunks can be fetched.
            Err(e @ Error::Incomplete { .. }) => return Err(e),
            Err(e) => {
                self.reject(manifest_seen.as_ref(), &e)?;
                return Err(e);
            }
        };
        let outcome = self.apply(prepared).await?;
        tracing::info!("install finished in {:?}", started.elapsed());
        Ok(outcome)
    }

    /// Everything that decides whether this device takes a verified
    /// manifest, before any data is fetched or read: the release name, a
    /// node in a settled state, the policy (expiry, target, anti-rollback
    /// against the node's permanent release and the last sequence), and
    /// no automatic retry of a release that was rolled back. Returns what
    /// the node runs.
    pub(crate) async fn check_offer(&mut self, m: &Manifest, retry: bool) -> Result<Running> {
        if m.release.name != self.settings.release_name {
            return Err(Error::Refused {
                reason: format!(
                    "the bundle holds release {:?}, this device runs {:?}",
                    m.release.name, self.settings.release_name
                ),
            });
        }
        let running = self.running().await?;
        if running.current != running.permanent {
            return Err(Error::Refused {
                reason: format!(
                    "the node runs {} but {} is permanent: an install outside beamup is unfinished; \
                     make one of them permanent (or restart the node) first",
                    running.current, running.permanent
                ),
            });
        }
        let facts = DeviceFacts {
            installed_version: Some(running.permanent.clone()),
            last_sequence: self.state.last_sequence,
            identity: self.settings.identity.clone(),
        };
        policy::check(m, SystemTime::now(), &facts)?;
        if !retry
            && let Some(o) = self
                .state
                .rolled_back_before(&m.release.version, m.sequence)
        {
            return Err(Error::Refused {
                reason: format!(
                    "{} {} (sequence {}) was rolled back at {} ({}); it is not retried automatically: \
                     pass --retry, or bundle a fixed release",
                    m.release.name,
                    m.release.version,
                    m.sequence,
                    o.at,
                    o.reason.as_deref().unwrap_or("no reason recorded")
                ),
            });
        }
        Ok(running)
    }

    /// What the node runs, as it reports it.
    pub(crate) async fn running(&mut self) -> Result<Running> {
        self.node
            .running()
            .await
            .map_err(|e| self.node.node_error("reading the running release", e))
    }

    /// Records a rejection decided outside `install` (an offer refused
    /// before its data was fetched), so that `beamup status` shows it. The
    /// journal of an install that needs attention stays for `beamup
    /// recover`. Input that never verified (`m` is `None`) is only counted:
    /// it is no phase of any release, so no progress step is sent for it
    /// (the agent would otherwise show the release it last handled as
    /// rejected).
    pub(crate) fn record_rejection(&mut self, m: Option<&Manifest>, e: &Error) -> Result<()> {
        self.state.refused(Outcome::rejected(
            m,
            &self.settings.release_name,
            e.to_string(),
        ));
        self.save()?;
        if m.is_some() {
            self.begin_step(Step::Finished(OutcomeKind::Rejected), &e.to_string());
        }
        Ok(())
    }

    /// The locked state directory.
    pub(crate) fn state_dir(&self) -> &Path {
        self.store.dir()
    }

    async fn prepare(
        &mut self,
        path: &Path,
        opts: &InstallOptions,
        seen: &mut Option<Manifest>,
    ) -> Result<Prepared> {
        let root = Root::load(&self.settings.trust_root)?;
        let bundle = Bundle::open(path)?;
        let (m, _) = bundle.verify_manifest(&root)?;
        *seen = Some(m.clone());
        let running = self.check_offer(&m, opts.retry).await?;
        check_space(self.root(), m.tarball.unpacked_size)?;
        // The tarball's bytes are checked chunk by chunk as they are
        // unpacked (`staging::unpack`): one pass over what is used, nothing
        // unverified reaches the decompressor.
        let down_to = self.running_down_to(&running);
        let strategy = decide::strategy(&m, &running, &down_to, self.settings.strategy)
            .map_err(|reason| Error::Refused { reason })?;
        self.ensure_releases_file(&running).await;
        let (registered, plan) = self.plan_with_leftovers(&m).await?;
        if let Some(have) = &opts.available {
            staging::check_available(path, &m, &plan, have)?;
        }
        Ok(Prepared {
            bundle,
            manifest: m,
            running,
            strategy,
            plan,
            registered,
        })
    }

    /// The versions the running release's relup on disk downgrades to
    /// (none when it has no readable relup).
    fn running_down_to(&self, running: &Running) -> Vec<String> {
        let path = self
            .root()
            .join("releases")
            .join(&running.current)
            .join("relup");
        fsutil::read_limited(&path, LIMITS.relup_file_bytes, "relup")
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .and_then(|text| crate::release::metadata::parse_relup(&text, &running.current).ok())
            .map_or_else(Vec::new, |(_, down)| down)
    }

    /// Makes release_handler know what the running release consists of.
    /// A root as `mix release` (or relx without ERTS) leaves it has no
    /// RELEASES, and release_handler then describes the booted release
    /// with no libraries and no ERTS: a hot downgrade to it fails inside
    /// release_handler. RELEASES is written from the `.rel` files (see
    /// `releases_file::repaired`) and release_handler restarted to read
    /// it. Runs only on a settled node (checked by `check_offer`); a
    /// failure is logged, not fatal: deletions never rely on
    /// release_handler's view (see `bootset`), a rollback then restarts
    /// the node instead of downgrading it hot.
    async fn ensure_releases_file(&mut self, running: &Running) {
        if let Err(e) = self.try_ensure_releases_file(running).await {
            tracing::warn!(
                "release_handler does not know what {} {} consists of, and RELEASES could not be repaired ({e}); a rollback will restart the node",
                self.settings.release_name,
                running.permanent
            );
        }
    }

    async fn try_ensure_releases_file(&mut self, running: &Running) -> Result<()> {
        let disk = OnDisk::read(self.root(), &self.settings.release_name)?;
        let releases = self
            .node
            .which_releases()
            .await
            .map_err(|e| self.node.node_error("listing releases", e))?;
        let blind = releases
            .iter()
            .any(|r| r.vsn == running.permanent && r.libs.is_empty());
        let repaired = releases_file::repaired(&disk, &running.permanent);
        if repaired.is_none() && !blind {
            return Ok(());
        }
        if let Some(entries) = &repaired {
            let path = releases_file::write_releases(self.root(), entries)?;
            tracing::info!(
                "wrote {} from the .rel files: release_handler did not list what {} {} consists of",
                path.display(),
                self.settings.release_name,
                running.permanent
            );
        }
        self.node.reload_release_handler().await.map_err(|e| {
            self.node
                .node_error("restarting release_handler to read RELEASES", e)
        })?;
        let after = self
            .node
            .which_releases()
            .await
            .map_err(|e| self.node.node_error("listing releases", e))?;
        if after
            .iter()
            .any(|r| r.vsn == running.permanent && !r.libs.is_empty())
        {
            Ok(())
        } else {
            Err(Error::Refused {
                reason: format!("after the restart release_handler still lists {after:?}"),
            })
        }
    }

    /// What `install` would do with this bundle, changing nothing: every
    /// check `prepare` makes (signatures, policy against the node, disk
    /// space, hot or cold, the unpack plan), read-only. No recovery runs,
    /// no RELEASES is written, no journal, no lock beyond the engine's.
    pub(crate) async fn dry_run(&mut self, path: &Path, retry: bool) -> Result<DryRun> {
        let root = Root::load(&self.settings.trust_root)?;
        let bundle = Bundle::open(path)?;
        let (m, _) = bundle.verify_manifest(&root)?;
        let dry = self.dry_run_offer(&m, retry).await?;
        // The install checks each chunk as it unpacks; a dry run that
        // promised an install would go ahead checks them all now.
        bundle.verify_tarball(&m)?;
        Ok(dry)
    }

    /// [`dry_run`](Self::dry_run) of a verified manifest without its
    /// tarball (the agent's dry run of an offer): everything but the
    /// tarball's digests, which a download checks chunk by chunk.
    pub(crate) async fn dry_run_offer(&mut self, m: &Manifest, retry: bool) -> Result<DryRun> {
        if let Some(j) = &self.state.current {
            return Err(Error::Refused {
                reason: format!(
                    "an interrupted install of {} is in the journal (phase {}); an install would finish or undo it first (`beamup recover`)",
                    j.to_version,
                    j.phase.name()
                ),
            });
        }
        let running = self.check_offer(m, retry).await?;
        let (space_needed, space_free) = space(self.root(), m.tarball.unpacked_size)?;
        check_space(self.root(), m.tarball.unpacked_size)?;
        let down_to = self.running_down_to(&running);
        let strategy = decide::strategy(m, &running, &down_to, self.settings.strategy)
            .map_err(|reason| Error::Refused { reason })?;
        let (registered, plan) = self.plan_with_leftovers(m).await?;
        let needed = staging::chunks_read(m, &plan);
        let chunks_read = needed.iter().filter(|n| **n).count();
        let bytes_read = needed
            .iter()
            .enumerate()
            .filter(|(_, n)| **n)
            .map(|(i, _)| {
                let start = i as u64 * u64::from(m.tarball.chunk_size);
                (start + u64::from(m.tarball.chunk_size)).min(m.tarball.size) - start
            })
            .sum();
        let releases_file = OnDisk::read(self.root(), &self.settings.release_name)
            .ok()
            .and_then(|disk| releases_file::repaired(&disk, &running.permanent))
            .is_some();
        let prunable = self
            .state
            .installed
            .keys()
            .filter(|v| **v != running.permanent && **v != m.release.version)
            .cloned()
            .collect();
        Ok(DryRun {
            release: m.release.name.clone(),
            version: m.release.version.clone(),
            sequence: m.sequence,
            running: running.current.clone(),
            permanent: running.permanent.clone(),
            strategy: strategy.name(),
            why: decide::strategy_reason(m, &running, &down_to),
            creates: plan
                .creates
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            forgets_unpacked: registered.is_some(),
            writes_releases_file: releases_file,
            chunks_read,
            chunks_total: m.tarball.chunks.len(),
            bytes_read,
            tarball_size: m.tarball.size,
            space_needed,
            space_free,
            prunes_after_commit: prunable,
        })
    }

    /// What an install of `m` would unpack into the release root as it is
    /// now: the plan `install` makes, leftovers of an earlier attempt
    /// included (they are removed first, see `plan_with_leftovers`), so
    /// that a transfer can fetch only the chunks that plan reads
    /// ([`staging::chunks_read`]). Asks the node which releases it knows;
    /// changes nothing.
    pub(crate) async fn plan_for(&mut self, m: &Manifest) -> Result<Plan> {
        Ok(self.plan_with_leftovers(m).await?.1)
    }

    /// The unpack plan of `m`, and whether release_handler still lists its
    /// version as unpacked or old (and must forget it first). Paths of the
    /// new version that exist already are leftovers of an install that
    /// beamup did not journal (a crash of another tool, a manual copy);
    /// they would be picked up instead of the bundle's files, so the plan
    /// creates them again, once the journal names them. A path that a
    /// release on the device may boot from (`bootset`) is no leftover:
    /// it stays and is not unpacked. Refused when that version is already
    /// installed.
    async fn plan_with_leftovers(&mut self, m: &Manifest) -> Result<(Option<ReleaseStatus>, Plan)> {
        let releases = self
            .node
            .which_releases()
            .await
            .map_err(|e| self.node.node_error("listing releases", e))?;
        let vsn = &m.release.version;
        let registered = match releases.iter().find(|r| &r.vsn == vsn) {
            None => None,
            Some(r) if matches!(r.status, ReleaseStatus::Unpacked | ReleaseStatus::Old) => {
                Some(r.status)
            }
            Some(r) => {
                return Err(Error::Refused {
                    reason: format!("release {vsn} is already {:?} on the node", r.status),
                });
            }
        };
        let keep = self.boot_set(vsn).await?;
        let mut plan = staging::plan(self.root(), &self.settings.release_name, m);
        let name = &self.settings.release_name;
        let mut candidates: Vec<PathBuf> = vec![
            PathBuf::from("releases").join(vsn),
            PathBuf::from("bin").join(format!("{name}-{vsn}")),
        ];
        candidates.extend(m.apps.iter().map(|a| PathBuf::from("lib").join(a)));
        if m.includes_erts {
            candidates.push(PathBuf::from(format!("erts-{}", m.erts)));
        }
        for p in candidates {
            let exists = self.root().join(&p).symlink_metadata().is_ok();
            if exists && !keep.covers(&p) && !plan.creates.contains(&p) {
                plan.creates.push(p);
            }
        }
        Ok((registered, plan))
    }

    /// The boot set of the release root as it is now, for deleting what
    /// beamup created for `removing` (see `bootset`). The node's facts are
    /// added when it answers.
    async fn boot_set(&mut self, removing: &str) -> Result<Protected> {
        let disk = OnDisk::read(self.root(), &self.settings.release_name)?;
        let node = if self.node.is_up().await {
            self.node.running().await.ok()
        } else {
            None
        };
        Ok(bootset::protected(
            &disk,
            &self.settings.release_name,
            Some(removing),
            node.as_ref(),
        ))
    }

    /// Deletes what beamup created for `removing` (journaled paths), less
    /// the boot set.
    async fn remove_created(&mut self, removing: &str, created: &[PathBuf]) -> Result<()> {
        let keep = self.boot_set(removing).await?;
        bootset::remove(self.root(), created, &keep)?;
        Ok(())
    }

    /// After the journal names them: release_handler forgets a leftover
    /// registration of the new version, and leftover paths are removed.
    async fn remove_leftovers(&mut self, p: &Prepared) -> Result<()> {
        let vsn = &p.manifest.release.version;
        // Old: a release that was permanent before (going back to it is
        // routine); unpacked: left by an attempt that did not finish.
        let went_back = p.registered == Some(ReleaseStatus::Old);
        if let Some(status) = p.registered {
            if went_back {
                tracing::info!(
                    "release_handler keeps {vsn} as old (it ran before); forgetting it to install it afresh"
                );
            } else {
                tracing::warn!(
                    "release_handler lists {vsn} as {status:?} from an earlier attempt; forgetting it"
                );
            }
            self.node.set_removed(vsn).await.map_err(|e| {
                self.node
                    .node_error("forgetting a leftover release (set_removed)", e)
            })?;
        }
        let stale: Vec<PathBuf> = p
            .plan
            .creates
            .iter()
            .filter(|c| self.root().join(c).symlink_metadata().is_ok())
            .cloned()
            .collect();
        if went_back && !stale.is_empty() {
            tracing::info!("removing the old files of {vsn} to unpack them afresh: {stale:?}");
        } else if !stale.is_empty() {
            tracing::warn!(
                "removing leftover paths of {vsn} that no release boots from: {stale:?}"
            );
        }
        if !stale.is_empty() {
            self.remove_created(vsn, &stale).await?;
        }
        Ok(())
    }

    async fn apply(&mut self, p: Prepared) -> Result<Outcome> {
        let m = &p.manifest;
        self.state.current = Some(Journal {
            release: m.release.name.clone(),
            from_version: p.running.permanent.clone(),
            to_version: m.release.version.clone(),
            sequence: m.sequence,
            strategy: p.strategy,
            creates: p.plan.creates.clone(),
            phase: Phase::Unpacking,
            started_at: manifest::format_time(SystemTime::now()),
            swapped_boot: false,
        });
        self.save()?;
        crash_point("unpacking");
        self.begin_step(
            Step::Unpacking,
            &format!("{} {}", m.release.name, m.release.version),
        );
        if let Err(e) = self.remove_leftovers(&p).await {
            self.cleanup().await?;
            self.reject_journaled(&e)?;
            return Err(e);
        }
        let t = Instant::now();
        match staging::unpack(self.root(), &p.plan, m, &p.bundle) {
            Ok(u) => tracing::debug!(
                "unpacked {} files ({} bytes) in {:?}",
                u.files,
                u.bytes,
                t.elapsed()
            ),
            Err(e) => {
                self.remove_created(&m.release.version, &p.plan.creates)
                    .await?;
                self.reject_journaled(&e)?;
                return Err(e);
            }
        }
        // The new files must be durable before the release can become
        // permanent, not before: until the commit, recovery removes them
        // whatever state they are in. So the flush runs in the background
        // while the node installs and the health gate runs.
        let root = self.root().to_path_buf();
        let creates = p.plan.creates.clone();
        self.pending_sync = Some(tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let r = sync_new(&root, &creates);
            tracing::debug!("synced the file system in {:?}", t.elapsed());
            r
        }));

        self.enter(Phase::Registering)?;
        let rel_file = self
            .root()
            .join("releases")
            .join(&m.release.version)
            .join(format!("{}.rel", m.release.name));
        if let Err(e) = self.node.set_unpacked(&rel_file).await {
            let e = self
                .node
                .node_error("registering the new release (set_unpacked)", e);
            self.cleanup().await?;
            self.reject_journaled(&e)?;
            return Err(e);
        }

        match p.strategy {
            Strategy::Hot => {
                self.enter(Phase::Installing)?;
                self.begin_step(Step::Installing, "hot upgrade through the relup");
                let to = m.release.version.clone();
                match self.node.install_release(&to).await {
                    Ok(_) => {}
                    Err(NodeError::CodeChangeFailed {
                        module,
                        reason_text,
                    }) => {
                        let from = self.journal().from_version.clone();
                        let reason = format!(
                            "code_change in {module} crashed during install_release: {}; \
                             the node restarted itself on {from} and lost its in-memory state",
                            brief(&reason_text, 200)
                        );
                        // It is back in about a second; the rollback needs it.
                        self.node.reset();
                        let _ = self.node.wait_up(self.node.start_timeout).await;
                        return self.rollback(reason).await;
                    }
                    Err(e) => return self.rollback(format!("install_release failed: {e}")).await,
                }
            }
            Strategy::Cold => {
                self.enter(Phase::Restarting)?;
                self.begin_step(
                    Step::Restarting,
                    "cold upgrade: restarting the node into the new release",
                );
                // Once the boot is switched a power cut boots the new
                // release: its files must be on disk first.
                if let Err(e) = self.await_sync().await {
                    return self
                        .rollback(format!("could not make the new release durable: {e}"))
                        .await;
                }
                if let Err(why) = self.node.stop().await {
                    return self
                        .rollback(format!("could not stop the node for a cold upgrade: {why}"))
                        .await;
                }
                self.switch_boot()?;
                if let Err(why) = self.node.start().await {
                    return self
                        .rollback(format!("the new release did not start: {why}"))
                        .await;
                }
            }
        }

        self.enter(Phase::Soaking)?;
        if let Err(why) = self.health_gate().await {
            return self.rollback(why).await;
        }
        self.enter(Phase::Committing)?;
        self.commit().await
    }

    /// Records a rejection found after the journal was started (nothing of
    /// the running release was changed).
    fn reject_journaled(&mut self, e: &Error) -> Result<()> {
        self.finish(OutcomeKind::Rejected, Some(e.to_string()))?;
        Ok(())
    }

    /// Passes when the configured checks pass continuously for the soak
    /// window and the node reports the new version as what it runs.
    async fn health_gate(&mut self) -> std::result::Result<(), String> {
        let (soak, timeout) = (self.settings.health.soak, self.settings.health.timeout);
        let to = self.journal().to_version.clone();
        self.begin_step(
            Step::Soaking,
            &format!(
                "healthy for {} within {}",
                humantime::format_duration(soak),
                humantime::format_duration(timeout)
            ),
        );
        self.gate(&to, timeout, soak).await
    }

    async fn gate(
        &mut self,
        version: &str,
        timeout: std::time::Duration,
        soak: std::time::Duration,
    ) -> std::result::Result<(), String> {
        let checks = health::Checks::new(&self.settings.health, version);
        let mut gate = Gate::new(Instant::now(), timeout, soak);
        loop {
            let result = match checks.run_once().await {
                Err(e) => Err(e),
                Ok(()) => match self.node.running().await {
                    Ok(r) if r.current == version => Ok(()),
                    Ok(r) => Err(format!("the node runs {}, not {version}", r.current)),
                    Err(e) => Err(format!("node check: {e}")),
                },
            };
            match gate.observe(Instant::now(), result) {
                Verdict::Pass => return Ok(()),
                Verdict::Fail(why) => return Err(why),
                Verdict::Wait => tokio::time::sleep(self.settings.health.interval).await,
            }
        }
    }

    /// Makes the new release the one that boots: the boot script, then
    /// `make_permanent`; then removes releases no longer needed.
    async fn commit(&mut self) -> Result<Outcome> {
        let to = self.journal().to_version.clone();
        let from = self.journal().from_version.clone();
        self.begin_step(Step::Committing, &to);
        let result: std::result::Result<(), String> = async {
            self.await_sync().await.map_err(|e| e.to_string())?;
            // What boots first: a crash between the two then boots the
            // verified release, and recovery makes it permanent.
            self.switch_boot().map_err(|e| e.to_string())?;
            let releases = self
                .node
                .which_releases()
                .await
                .map_err(|e| e.to_string())?;
            let status = releases.iter().find(|r| r.vsn == to).map(|r| r.status);
            if status == Some(ReleaseStatus::Unpacked) {
                // A cold boot: release_handler still lists the new release
                // as only unpacked. An empty relup step from the old version
                // makes it current without touching the running code.
                self.write_noop_relup(&to, &from)
                    .map_err(|e| e.to_string())?;
                self.node
                    .install_release(&to)
                    .await
                    .map_err(|e| format!("marking the cold-booted release current: {e}"))?;
            }
            self.restore_relup(&to, &from).map_err(|e| e.to_string())?;
            if status != Some(ReleaseStatus::Permanent) {
                self.node
                    .make_permanent(&to)
                    .await
                    .map_err(|e| format!("make_permanent: {e}"))?;
            }
            Ok(())
        }
        .await;
        if let Err(why) = result {
            // Health passed but the commit did not: go back rather than
            // leave a release that is neither permanent nor gone.
            return self.rollback(format!("commit failed: {why}")).await;
        }
        let created = self.journal().creates.clone();
        self.state.installed.insert(to.clone(), created);
        self.prune_old_releases(&from, &to).await;
        for b in self.boot_backups() {
            let _ = fs::remove_file(b);
        }
        self.finish(OutcomeKind::Committed, None)
    }

    /// Waits for the flush of the unpacked files started after the unpack
    /// (or, after a restart of beamup, flushes the file system).
    async fn await_sync(&mut self) -> Result<()> {
        match self.pending_sync.take() {
            Some(sync) => sync.await.map_err(|e| Error::Internal {
                detail: format!("the file sync task failed: {e}"),
            })?,
            None => sync_fs(self.root()),
        }
    }

    /// Keeps the release just replaced (for a manual downgrade) and prunes
    /// older ones that beamup installed: release_handler forgets them
    /// (`set_removed`), then the paths their install created go, less the
    /// boot set. A release beamup did not install (the one the device was
    /// provisioned with) is left alone. Failure here is logged, not fatal:
    /// the commit stands.
    async fn prune_old_releases(&mut self, previous: &str, current: &str) {
        let Ok(releases) = self.node.which_releases().await else {
            return;
        };
        let prunable: Vec<String> = self
            .state
            .installed
            .keys()
            .filter(|v| *v != previous && *v != current)
            .filter(|v| {
                releases
                    .iter()
                    .find(|r| &&r.vsn == v)
                    .is_none_or(|r| r.status == ReleaseStatus::Old)
            })
            .cloned()
            .collect();
        for vsn in prunable {
            if releases.iter().any(|r| r.vsn == vsn)
                && let Err(e) = self.node.set_removed(&vsn).await
            {
                tracing::warn!("could not remove old release {vsn}: {e}");
                continue;
            }
            let created = self.state.installed.get(&vsn).cloned().unwrap_or_default();
            match self.remove_created(&vsn, &created).await {
                Ok(()) => {
                    self.state.installed.remove(&vsn);
                }
                Err(e) => tracing::warn!("could not remove the files of old release {vsn}: {e}"),
            }
        }
    }

    fn boot_script(&self) -> PathBuf {
        self.root().join("bin").join(&self.settings.release_name)
    }

    fn start_erl_data(&self) -> PathBuf {
        self.root().join("releases").join("start_erl.data")
    }

    /// Copies of what boots before the switch, in the state dir:
    /// `bin/REL`, `releases/start_erl.data`.
    fn boot_backups(&self) -> [PathBuf; 2] {
        [
            self.store.dir().join("boot-script.previous"),
            self.store.dir().join("start_erl.data.previous"),
        ]
    }

    /// Makes the new release the one that boots, journaled: a relx
    /// `bin/REL` hard-codes its version, so it is replaced by
    /// `bin/REL-VSN`; a mix `bin/REL` (and relx's `run_erl` tooling) boots
    /// what `releases/start_erl.data` names, so that names the new
    /// release and its ERTS. Copies of both are kept to restore; every
    /// write is atomic, so a power cut at any point leaves one consistent
    /// release to boot, and the journal says which to restore.
    fn switch_boot(&mut self) -> Result<()> {
        let j = self.journal().clone();
        if j.swapped_boot {
            return Ok(());
        }
        let new_script = self
            .root()
            .join("bin")
            .join(format!("{}-{}", j.release, j.to_version));
        let new_script = new_script.is_file().then_some(new_script);
        let start_erl = self.start_erl_data();
        let new_start_erl = match fs::symlink_metadata(&start_erl) {
            Err(_) => None,
            Ok(_) => {
                let disk = OnDisk::read(self.root(), &j.release)?;
                let rel = disk
                    .rel(&j.to_version)
                    .ok_or_else(|| Error::InvalidRelease {
                        path: self
                            .root()
                            .join("releases")
                            .join(&j.to_version)
                            .join(format!("{}.rel", j.release)),
                        detail: "missing: the unpacked release has no .rel".into(),
                    })?;
                Some(releases_file::format_start_erl(&rel.erts, &j.to_version))
            }
        };
        let [script_backup, start_erl_backup] = self.boot_backups();
        for b in [&script_backup, &start_erl_backup] {
            let _ = fs::remove_file(b);
        }
        if new_script.is_some() {
            let old = fs::read(self.boot_script()).ctx(self.boot_script(), "read")?;
            fsutil::write_atomic(&script_backup, 0o600, true, &old)?;
        }
        if new_start_erl.is_some() {
            let old = fs::read(&start_erl).ctx(&start_erl, "read")?;
            fsutil::write_atomic(&start_erl_backup, 0o600, true, &old)?;
        }
        self.state.current.as_mut().expect("journal").swapped_boot = true;
        self.save()?;
        if let Some(new_script) = new_script {
            let new = fs::read(&new_script).ctx(&new_script, "read")?;
            fsutil::write_atomic(&self.boot_script(), 0o755, true, &new)?;
        }
        if let Some(text) = new_start_erl {
            fsutil::write_atomic(&start_erl, 0o644, true, text.as_bytes())?;
        }
        Ok(())
    }

    /// Undoes [`switch_boot`](Self::switch_boot) from the copies it kept.
    fn restore_boot(&mut self) -> Result<()> {
        if !self.journal().swapped_boot {
            return Ok(());
        }
        let [script_backup, start_erl_backup] = self.boot_backups();
        for (backup, target, mode) in [
            (&script_backup, self.boot_script(), 0o755),
            (&start_erl_backup, self.start_erl_data(), 0o644),
        ] {
            match fs::read(backup) {
                Ok(old) => fsutil::write_atomic(&target, mode, true, &old)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(backup, "read", e)),
            }
        }
        self.state.current.as_mut().expect("journal").swapped_boot = false;
        self.save()?;
        for b in [script_backup, start_erl_backup] {
            let _ = fs::remove_file(b);
        }
        Ok(())
    }

    fn relup_backup(&self) -> PathBuf {
        self.store.dir().join("relup.previous")
    }

    /// Puts the bundle's relup of `to` back after the empty step that made
    /// a cold-booted release current (its down section is what a later
    /// downgrade from `to` runs). A release that had no relup gets none:
    /// the empty step left behind would make a later downgrade "hot"
    /// without changing any code.
    fn restore_relup(&self, to: &str, from: &str) -> Result<()> {
        let backup = self.relup_backup();
        let path = self.root().join("releases").join(to).join("relup");
        match fs::read(&backup) {
            Ok(text) => {
                fsutil::write_atomic(&path, 0o644, true, &text)?;
                let _ = fs::remove_file(&backup);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if fs::read(&path).is_ok_and(|t| t == noop_relup(to, from).as_bytes()) {
                    fs::remove_file(&path).ctx(&path, "remove")?;
                }
                Ok(())
            }
            Err(e) => Err(Error::io(&backup, "read", e)),
        }
    }

    /// `releases/TO/relup` with an empty step from `from`, for a release
    /// booted cold; written only into the new release's own directory.
    fn write_noop_relup(&self, to: &str, from: &str) -> Result<()> {
        let path = self.root().join("releases").join(to).join("relup");
        let backup = self.relup_backup();
        if path.is_file() && !backup.exists() {
            let text = fs::read(&path).ctx(&path, "read")?;
            fsutil::write_atomic(&backup, 0o600, true, &text)?;
        }
        fsutil::write_atomic(&path, 0o644, true, noop_relup(to, from).as_bytes())
    }

    /// Returns the node to the previous release and removes the new one.
    async fn rollback(&mut self, reason: String) -> Result<Outcome> {
        self.enter(Phase::RollingBack {
            reason: reason.clone(),
        })?;
        self.begin_step(Step::RollingBack, &reason);
        let j = self.journal().clone();

        // A relup-based downgrade keeps the node (and its state) running.
        let mut on_old = false;
        if j.strategy == Strategy::Hot
            && !j.swapped_boot
            && self
                .node
                .wait_up(std::time::Duration::from_secs(3))
                .await
                .is_ok()
        {
            match self.node.running().await {
                Ok(r) if r.current == j.from_version => on_old = true,
                Ok(r) if r.current == j.to_version => {
                    match self.node.install_release(&j.from_version).await {
                        Ok(_) => on_old = true,
                        Err(e) => tracing::warn!("hot downgrade failed ({e}); restarting the node"),
                    }
                }
                _ => {}
            }
        }
        if !on_old {
            // Restart: the node boots the permanent (old) release.
            if self.node.is_up().await
                && let Err(e) = self.node.stop().await
            {
                return self
                    .needs_attention(format!("{reason}; rollback could not stop the node: {e}"));
            }
            self.restore_boot()?;
            if let Err(e) = self.node.start().await {
                return self
                    .needs_attention(format!("{reason}; rollback could not start the node: {e}"));
            }
        }
        self.restore_boot()?;
        match self.node.running().await {
            Ok(r) if r.current == j.from_version && r.permanent == j.from_version => {}
            Ok(r) => {
                return self.needs_attention(format!(
                    "{reason}; after rollback the node runs {} (permanent {}), expected {}",
                    r.current, r.permanent, j.from_version
                ));
            }
            Err(e) => return self.needs_attention(format!("{reason}; after rollback: {e}")),
        }
        if let Err(e) = self.cleanup().await {
            tracing::warn!("cleanup after rollback: {e}");
        }
        let soak = self
            .settings
            .health
            .soak
            .min(std::time::Duration::from_secs(1));
        if let Err(why) = self
            .gate(&j.from_version, self.settings.health.timeout, soak)
            .await
        {
            return self.needs_attention(format!(
                "{reason}; the previous release {} is not healthy either: {why}",
                j.from_version
            ));
        }
        self.finish(OutcomeKind::RolledBack, Some(reason))
    }

    fn needs_attention(&mut self, reason: String) -> Result<Outcome> {
        tracing::error!("{reason}");
        self.finish(OutcomeKind::NeedsAttention, Some(reason))
    }

    /// Removes the new release: release_handler forgets it
    /// (`set_removed`: no file is deleted by the node), then the paths the
    /// journal says the unpack created go, less the boot set.
    async fn cleanup(&mut self) -> Result<()> {
        let j = self.journal().clone();
        if let Ok(releases) = self.node.which_releases().await
            && let Some(r) = releases.iter().find(|r| r.vsn == j.to_version)
            && r.status != ReleaseStatus::Permanent
            && r.status != ReleaseStatus::Current
            && let Err(e) = self.node.set_removed(&j.to_version).await
        {
            return Err(self.node.node_error("removing the failed release", e));
        }
        self.remove_created(&j.to_version, &j.creates).await
    }

    /// Finishes or undoes an install the journal says was interrupted.
    /// `None` when there was nothing to recover.
    pub(crate) async fn recover(&mut self) -> Result<Option<Outcome>> {
        let Some(j) = self.state.current.clone() else {
            return Ok(None);
        };
        self.begin_step(
            Step::Recovering,
            &format!(
                "{} {} was interrupted while {}",
                j.release,
                j.to_version,
                j.phase.name()
            ),
        );
        let mut seen = self.observe().await;
        let mut decision = decide::recovery(&j, &seen);
        if decision == Recovery::StartNode && decide::restore_boot_before_start(&j) {
            // The new release was never made permanent: boot the old one
            // rather than a release that may not even start.
            self.restore_boot()?;
        }
        if decision == Recovery::StartNode {
            if let Err(e) = self.node.start().await {
                return self
                    .needs_attention(format!(
                        "recovering {} {}: the node does not start: {e}",
                        j.release, j.to_version
                    ))
                    .map(Some);
            }
            seen = self.observe().await;
            decision = decide::recovery(&j, &seen);
        }
        let outcome = match decision {
            Recovery::StartNode => {
                self.needs_attention("the node is not reachable after starting it".into())?
            }
            Recovery::Cleanup { reason } => {
                self.restore_boot()?;
                self.cleanup().await?;
                self.finish(OutcomeKind::RolledBack, Some(reason))?
            }
            Recovery::RollBack { reason } => self.rollback(reason).await?,
            Recovery::FinishCommit => self.commit().await?,
        };
        // Undoing an install because beamup was cut off is not a verdict on
        // the release: it may be installed again without --retry.
        let interrupted = !matches!(j.phase, Phase::RollingBack { .. });
        if interrupted && outcome.outcome == OutcomeKind::RolledBack {
            if let Some(h) = self.state.history.first_mut() {
                h.interrupted = true;
            }
            self.save()?;
            return Ok(Some(Outcome {
                interrupted: true,
                ..outcome
            }));
        }
        Ok(Some(outcome))
    }

    async fn observe(&mut self) -> NodeSeen {
        if self
            .node
            .wait_up(std::time::Duration::from_secs(3))
            .await
            .is_err()
        {
            return NodeSeen::Down;
        }
        match self.node.running().await {
            Ok(r) => NodeSeen::Up(r),
            Err(_) => NodeSeen::Down,
        }
    }
}

/// A relup with one empty step from `from` to `to`, and back.
fn noop_relup(to: &str, from: &str) -> String {
    format!("{{\"{to}\",[{{\"{from}\",[],[]}}],[{{\"{from}\",[],[]}}]}}.\n")
}

/// The first `max` characters of an Erlang term's text: enough to name the
/// error, short enough for a status line (the full term is in the log).
fn brief(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    tracing::info!("full text: {text}");
    let mut s: String = text.chars().take(max).collect();
    s.push_str("...");
    s
}

/// Fault injection for the crash-safety tests: with `BEAMUP_CRASH=PHASE`
/// the process kills itself with SIGKILL right after journaling PHASE
/// (before its effect); with `BEAMUP_CRASH=PHASE+`, right after PHASE's
/// effect (before the next journal write). Exactly what a power cut at that
/// step boundary leaves behind.
fn crash_point(point: &str) {
    if std::env::var("BEAMUP_CRASH").is_ok_and(|v| v == point) {
        eprintln!("beamup: BEAMUP_CRASH={point}: killing myself");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
}

/// The space an unpack of `need` bytes wants (the files plus a margin for
/// directories and the journal), and what the file system has free.
fn space(root: &Path, need: u64) -> Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(root).map_err(|e| Error::io(root, "statvfs", e.into()))?;
    let have = st.blocks_available() as u64 * st.fragment_size() as u64;
    Ok((need + need / 20 + 1024 * 1024, have))
}

pub(crate) fn check_space(root: &Path, need: u64) -> Result<()> {
    let (want, have) = space(root, need)?;
    if have < want {
        return Err(Error::NoSpace {
            path: root.to_path_buf(),
            need: want,
            have,
        });
    }
    Ok(())
}

/// Makes the paths an unpack created durable. An upgrade adds a few dozen
/// files: those are fsynced one by one, with their directories, so the
/// commit does not wait for whatever else the device has in its page cache
/// (`syncfs` would flush it all). Beyond that, one `syncfs` is cheaper.
pub(crate) fn sync_new(root: &Path, creates: &[PathBuf]) -> Result<()> {
    const MAX_ONE_BY_ONE: usize = 256;
    let mut files = Vec::new();
    let mut dirs = Vec::new();
    let mut stack: Vec<PathBuf> = creates.iter().map(|p| root.join(p)).collect();
    while let Some(p) = stack.pop() {
        if files.len() + dirs.len() > MAX_ONE_BY_ONE {
            return sync_fs(root);
        }
        let Ok(meta) = p.symlink_metadata() else {
            continue;
        };
        if meta.is_dir() {
            for entry in fs::read_dir(&p).ctx(&p, "read directory")? {
                stack.push(entry.ctx(&p, "read directory")?.path());
            }
            dirs.push(p);
        } else if meta.is_file() {
            files.push(p);
        }
    }
    // And the directories that gained an entry.
    let parents: std::collections::BTreeSet<PathBuf> = creates
        .iter()
        .filter_map(|p| root.join(p).parent().map(Path::to_path_buf))
        .collect();
    dirs.extend(parents);
    // Nothing needs them durable in any order, only all of them before the
    // release can become permanent: fsyncs that run at once share the
    // filesystem's journal commits (one by one, each waited for its own).
    let all: Vec<(&Path, &str)> = files
        .iter()
        .map(|f| (f.as_path(), "fsync"))
        .chain(dirs.iter().map(|d| (d.as_path(), "fsync directory")))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let sync_some = || -> Result<()> {
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let Some((path, what)) = all.get(i) else {
                return Ok(());
            };
            fs::File::open(path)
                .and_then(|f| f.sync_all())
                .ctx(path, what)?;
        }
    };
    std::thread::scope(|s| {
        let helpers: Vec<_> = (1..SYNC_THREADS.min(all.len()))
            .map(|_| s.spawn(sync_some))
            .collect();
        let mine = sync_some();
        helpers
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .chain([mine])
            .collect::<Result<()>>()
    })
}

/// fsyncs in flight at once: they wait on the disk, not on a core.
const SYNC_THREADS: usize = 8;

fn sync_fs(root: &Path) -> Result<()> {
    let dir = fs::File::open(root).ctx(root, "open")?;
    nix::unistd::syncfs(&dir).map_err(|e| Error::io(root, "syncfs", e.into()))
}
