//! How bytes reach a device over MQTT: the topics and payloads
//! (`protocol`), one connection behind a small interface (`mqtt`, with the
//! guard that drops oversize messages), the request window and the
//! download file (`transfer`), and the durable outbox of events.

pub(crate) mod mqtt;
pub(crate) mod outbox;
pub mod protocol;
pub(crate) mod transfer;
