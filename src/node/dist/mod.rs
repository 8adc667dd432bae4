//! Talking to the running BEAM node as a hidden Erlang node.
//!
//! The agent speaks the distribution protocol itself (EPMD lookup,
//! handshake, `rex` calls) instead of shelling out to `erl_call` or the
//! release's `bin/REL rpc`: those cost a process per call, print terms as
//! text that would need parsing, and cannot tell "node down" from "call
//! failed". Here every outcome is a typed [`DistError`] or a decoded
//! [`Term`].
//!
//! Being *hidden* (no `PUBLISHED` flag) keeps the agent out of `nodes()`,
//! out of `global`'s cluster sync and invisible to the application.

mod connection;
pub mod epmd;
pub(crate) mod handshake;
pub(crate) mod term;

use std::io;
use std::time::Duration;

use crate::limits::LIMITS;

pub use connection::Connection;
#[cfg(feature = "fuzzing")]
pub(crate) use connection::fuzzing as connection_fuzzing;
pub(crate) use epmd::DEFAULT_EPMD_PORT;
pub use term::{DecodeError, Term};

/// How to reach a node and how patient to be with it.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Port of the EPMD on the node's host (`ERL_EPMD_PORT` of the node).
    pub epmd_port: u16,
    /// Bound on the whole connect: resolve, EPMD lookup, TCP connect and
    /// handshake.
    pub connect_timeout: Duration,
    /// Send a tick after this long without writing anything. We also answer
    /// every tick of the peer, which alone satisfies any `net_ticktime`; this
    /// covers a peer busy sending us data and thus not ticking.
    pub tick_interval: Duration,
    /// Declare the connection dead after this long without a byte from the
    /// peer. An idle OTP node ticks every `net_ticktime / 4` (15 s by
    /// default), so the default leaves room for several missed ticks.
    pub idle_timeout: Duration,
    /// Give up on a write the peer does not drain within this long.
    pub write_timeout: Duration,
    /// Largest frame accepted from the peer, read into memory whole: the
    /// limit bounds memory if the peer misbehaves (and
    /// `LIMITS.node_term_bytes` what a frame decodes to). Default:
    /// `LIMITS.node_frame_bytes`.
    pub max_frame_len: u32,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            epmd_port: DEFAULT_EPMD_PORT,
            connect_timeout: Duration::from_secs(5),
            tick_interval: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(75),
            write_timeout: Duration::from_secs(30),
            max_frame_len: LIMITS.node_frame_bytes,
        }
    }
}

/// Longest rendering of a term inside an error message.
const MAX_TERM_TEXT: usize = 2000;

/// Everything that can go wrong talking to a node. Each message says what
/// happened and what to check.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("invalid node name {name:?}: {why}")]
    InvalidNodeName { name: String, why: &'static str },

    #[error("cannot resolve host {host:?}: {source}; check the host part of the node name")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },

    #[error(
        "EPMD is unreachable at {host}:{port}: {source}; check that the node is running \
         (it starts EPMD) and that the EPMD port matches the node's ERL_EPMD_PORT"
    )]
    EpmdUnreachable {
        host: String,
        port: u16,
        #[source]
        source: io::Error,
    },

    #[error(
        "no node named {name:?} is registered with EPMD at {host}:{epmd_port}; check that \
         the node is running and the name before '@' is right"
    )]
    NotRegistered {
        name: String,
        host: String,
        epmd_port: u16,
    },

    #[error(
        "node {node} is registered with EPMD on port {port} but refused the connection: \
         {source}; the node may be stopping, or a firewall blocks the port"
    )]
    ConnectionRefused {
        node: String,
        port: u16,
        #[source]
        source: io::Error,
    },

    #[error(
        "node {node} closed the connection during the cookie challenge: cookie rejected or \
         not allowed, check the cookie (and net_kernel:allow/1 on the node)"
    )]
    CookieRejected { node: String },

    #[error("node {node} rejected the handshake: {detail}")]
    HandshakeRejected { node: String, detail: String },

    #[error(
        "{what} got no answer within {after:?}; the node may be overloaded or hung, or the \
         operation needs a longer timeout"
    )]
    Timeout { what: String, after: Duration },

    #[error(
        "connection to {node} lost {during}: {reason}; the node probably stopped or \
         restarted, check its logs"
    )]
    ConnectionLost {
        node: String,
        during: String,
        reason: String,
    },

    #[error("{call} on {node} failed (badrpc): {}", .reason.to_text_limited(MAX_TERM_TEXT))]
    BadRpc {
        node: String,
        call: String,
        reason: Term,
    },

    #[error("protocol error talking to {node}: {what}")]
    Protocol { node: String, what: String },
}

/// `now + after`, saturating instead of panicking on huge durations
/// (callers may pass `Duration::MAX` to mean "no limit").
pub(crate) fn deadline_after(after: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    now.checked_add(after)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// Splits `alive@host`, refusing what OTP itself would refuse.
pub(crate) fn split_node_name(node: &str) -> Result<(&str, &str), DistError> {
    let bad = |why| DistError::InvalidNodeName {
        name: node.to_owned(),
        why,
    };
    let (alive, host) = node.split_once('@').ok_or_else(|| bad("no '@host' part"))?;
    if alive.is_empty() || host.is_empty() || host.contains('@') {
        return Err(bad(
            "expected exactly one non-empty name and host around '@'",
        ));
    }
    if alive.len() > 255 || host.len() > 255 {
        return Err(bad("longer than 255 bytes"));
    }
    Ok((alive, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        assert_eq!(
            split_node_name("app@localhost").unwrap(),
            ("app", "localhost")
        );
        for bad in ["app", "@h", "a@", "a@b@c", ""] {
            assert!(split_node_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn badrpc_message_renders_reason_as_erlang() {
        let e = DistError::BadRpc {
            node: "n@h".into(),
            call: "rpc m:f/0".into(),
            reason: Term::tuple(vec![Term::atom("EXIT"), Term::atom("undef")]),
        };
        assert_eq!(
            e.to_string(),
            "rpc m:f/0 on n@h failed (badrpc): {'EXIT',undef}"
        );
    }
}
