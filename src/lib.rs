//! beamup: an update agent for devices that run one BEAM release each.
//!
//! The library holds everything; `src/main.rs` is a thin command-line shell
//! over it. See `ARCHITECTURE.md` for the map.

pub mod agent;
pub mod bootset;
pub mod bundle;
pub mod cli;
pub mod config;
pub mod decide;
pub mod dist;
pub mod error;
pub mod eterm;
pub mod fsutil;
pub mod health;
pub mod install;
pub mod keys;
pub mod logging;
pub mod manifest;
pub mod memory;
pub mod mqtt;
pub mod node;
pub mod nodelink;
#[cfg(feature = "operator")]
pub mod operator;
pub mod outbox;
pub mod policy;
pub mod protocol;
pub mod release;
pub mod releases_file;
pub mod root;
pub mod signed;
pub mod staging;
pub mod state;
pub mod tarrules;
pub mod transfer;
pub mod unpack;
pub mod version;

pub use error::{Error, Result};
