//! The operator's side: making bundles, serving their data and offering
//! them over MQTT, the fleet's view, relups. Built with the `operator`
//! feature; device code never imports it (device builds leave it out).

pub mod bundle;
pub mod campaign;
pub mod fleet;
pub mod rehearse;
pub mod relup;
pub mod sequence;
pub mod serve;
pub mod tarindex;
