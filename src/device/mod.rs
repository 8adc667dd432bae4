//! What runs on a device besides the engine: the agent daemon (offers over
//! MQTT, the transfer, reporting) and `beamup unpack` (provisioning and
//! staging without a node). Never imports the operator side.
//!
//! The agent is split by job: `agent` (the loop that wires the others),
//! `session` (the MQTT connection), `report` (retained state, events,
//! outbox), `offers` (the memory of offers), `transfer` (the download),
//! `intake` (pure: what an arriving offer means).

pub(crate) mod agent;
pub(crate) mod intake;
pub(crate) mod offers;
pub(crate) mod report;
pub(crate) mod session;
pub(crate) mod transfer;
pub(crate) mod unpack;
