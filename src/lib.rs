//! beamup: an update agent for devices that run one BEAM release each.
//!
//! The library holds everything; `src/main.rs` is a thin command-line shell
//! over it. The folders read as the update path, in order (see
//! `ARCHITECTURE.md` for the map and the dependency rules, checked by
//! `tests/it/layout.rs`):
//!
//! - [`trust`]: keys, signed envelopes, the trust root;
//! - [`release`]: the manifest, policy, versions, tar rules, release files
//!   (pure);
//! - [`transport`]: the MQTT protocol, connection, transfer window,
//!   download file and outbox;
//! - [`bundle`]: the container and its streaming verification;
//! - [`staging`]: unpacking beside the running release; the boot set that
//!   guards every deletion;
//! - [`node`]: the release_handler driver (distribution protocol, typed
//!   calls, the link);
//! - `health`: checks and the soak gate;
//! - `engine`: the install pipeline, its decisions, the journal;
//! - `device`: the agent daemon and `beamup unpack`;
//! - `operator` (feature `operator`): bundles, serving, offers, the fleet,
//!   relups;
//! - [`cli`]: arguments, dispatch, output.
//!
//! Beside them: `config` (`agent.toml`), [`error`], `fsutil`, `limits`
//! (every size bound on input, one struct), [`logging`], `memory`.
//!
//! Everything is `pub(crate)` unless something outside the crate uses it,
//! so that the compiler reports dead code. The public surface is what
//! `src/main.rs` needs ([`cli::Cli`], [`cli::run`], [`logging::init`],
//! [`error`] with its exit codes) and what the integration tests and
//! benches build their fixtures with: manifests ([`release::manifest`],
//! [`release::metadata::inspect`], [`bundle::hash_stream`]), signatures
//! ([`trust`]: `SecretKey::load`, `Envelope::sign`, `Root::load`), bundles
//! ([`bundle::Bundle`]), the unpack ([`staging::plan`], [`staging::unpack`]),
//! data replies ([`transport::protocol::encode_data`]) and the
//! distribution protocol driven against real nodes ([`node::dist`],
//! [`node::calls`]).

pub mod bundle;
pub mod cli;
pub(crate) mod device;
pub(crate) mod engine;
pub(crate) mod health;
pub mod node;
#[cfg(feature = "operator")]
pub(crate) mod operator;
pub mod release;
#[cfg(feature = "operator")]
pub(crate) mod simulate;
pub mod staging;
pub mod transport;
pub mod trust;

pub(crate) mod config;
pub(crate) mod durations;
pub mod error;
pub(crate) mod fsutil;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub(crate) mod limits;
pub mod logging;
pub(crate) mod memory;

pub use error::{Error, Result};
