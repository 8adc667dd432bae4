//! What a release is, as pure facts and decisions: the signed manifest and
//! its checks, the acceptance policy, version ordering, the tar entry rules
//! every unpack applies, a strict reader for Erlang terms, and the files of
//! a release (`.rel`, relup, `RELEASES`, `start_erl.data`). No tokio, no
//! MQTT, no node.

pub(crate) mod eterm;
pub mod manifest;
pub mod metadata;
pub(crate) mod policy;
pub(crate) mod releases_file;
pub(crate) mod tarrules;
pub(crate) mod version;
