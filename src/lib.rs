//! beamup: an update agent for devices that run one BEAM release each.
//!
//! See `ARCHITECTURE.md` for the map of this crate.

pub mod dist;
pub mod node;
