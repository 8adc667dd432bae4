//! What runs on a device besides the engine: the agent daemon (offers over
//! MQTT, the transfer, reporting) and `beamup unpack` (provisioning and
//! staging without a node). Never imports the operator side.

pub mod agent;
pub mod intake;
pub mod unpack;
