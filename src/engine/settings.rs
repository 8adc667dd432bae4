//! What the engine is given when it opens: typed, owned values, taken from
//! `agent.toml` once (`from_config`, the one place the engine reads the
//! loader's types). The engine keeps them for its lifetime, so it borrows
//! nothing and can be moved into the install running beside the agent's
//! loop.

use std::path::PathBuf;

use crate::config::{self, Config};
use crate::error::Result;
use crate::health::HealthConfig;
use crate::node::link::LinkSettings;
use crate::release::policy::Identity;

/// What `[install] strategy` allows when a release cannot be installed hot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StrategyRule {
    /// Restart into the new release (cold).
    Auto,
    /// Refuse it.
    HotOnly,
}

#[derive(Clone, Debug)]
pub(crate) struct EngineSettings {
    /// The release root: holds `bin/`, `lib/`, `releases/`.
    pub(crate) release_root: PathBuf,
    /// The one release this device runs.
    pub(crate) release_name: String,
    /// The trust root file, loaded again for each bundle (it may be rotated).
    pub(crate) trust_root: PathBuf,
    /// The state directory (locked while the engine is open).
    pub(crate) state_dir: PathBuf,
    pub(crate) strategy: StrategyRule,
    pub(crate) health: HealthConfig,
    /// The device's identity for target scopes (from `[mqtt]`), if any.
    pub(crate) identity: Option<Identity>,
    /// How to reach, start and stop the node (the cookie read already).
    pub(crate) link: LinkSettings,
}

impl EngineSettings {
    /// The engine's settings from a loaded `agent.toml`; reads the cookie.
    pub(crate) fn from_config(cfg: &Config) -> Result<EngineSettings> {
        Ok(EngineSettings {
            release_root: cfg.release.root.clone(),
            release_name: cfg.release.name.clone(),
            trust_root: cfg.trust.root.clone(),
            state_dir: cfg.state.dir.clone(),
            strategy: match cfg.install.strategy {
                config::Strategy::Auto => StrategyRule::Auto,
                config::Strategy::HotOnly => StrategyRule::HotOnly,
            },
            health: cfg.health.clone(),
            identity: cfg.identity(),
            link: cfg.link_settings()?,
        })
    }
}
