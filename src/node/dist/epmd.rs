//! EPMD client: `PORT_PLEASE2_REQ`, the one request a connecting node needs.
//!
//! EPMD answers a single request per TCP connection and then closes it, so
//! there is no session to keep.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};

use super::DistError;

/// The port EPMD listens on unless told otherwise (`ERL_EPMD_PORT`).
pub(crate) const DEFAULT_EPMD_PORT: u16 = 4369;

const PORT_PLEASE2_REQ: u8 = 122;
const PORT2_RESP: u8 = 119;

/// What EPMD knows about a registered node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    /// The address EPMD was reached at; the node listens on the same host.
    pub(crate) addr: SocketAddr,
    /// The node's distribution listen port.
    pub(crate) port: u16,
    /// 77 ('M') for a normal Erlang node, 72 ('H') for a hidden one.
    pub(crate) node_type: u8,
    pub(crate) highest_version: u16,
    pub(crate) lowest_version: u16,
    /// The name as registered (the part before '@').
    pub(crate) name: String,
}

/// Asks EPMD on `host:epmd_port` for the port of the node registered as
/// `name` (the part of a node name before '@').
pub async fn port_please(
    host: &str,
    epmd_port: u16,
    name: &str,
    timeout: Duration,
) -> Result<NodeEntry, DistError> {
    let deadline = super::deadline_after(timeout);
    let what = || format!("EPMD lookup of {name:?} at {host}:{epmd_port}");
    let addrs = resolve(host, epmd_port, deadline, timeout).await?;
    match timeout_at(deadline, port_please_at(&addrs, host, epmd_port, name)).await {
        Ok(r) => r,
        Err(_) => Err(DistError::Timeout {
            what: what(),
            after: timeout,
        }),
    }
}

/// Resolves `host`, IPv4 addresses first: a node's distribution listener
/// is IPv4-only unless it runs `-proto_dist inet6_tcp`.
pub(crate) async fn resolve(
    host: &str,
    port: u16,
    deadline: Instant,
    after: Duration,
) -> Result<Vec<SocketAddr>, DistError> {
    let lookup = tokio::net::lookup_host((host, port));
    let mut addrs: Vec<SocketAddr> = match timeout_at(deadline, lookup).await {
        Err(_) => {
            return Err(DistError::Timeout {
                what: format!("resolving host {host:?}"),
                after,
            });
        }
        Ok(Err(source)) => {
            return Err(DistError::Resolve {
                host: host.to_owned(),
                source,
            });
        }
        Ok(Ok(a)) => a.collect(),
    };
    addrs.sort_by_key(|a| !a.is_ipv4());
    if addrs.is_empty() {
        return Err(DistError::Resolve {
            host: host.to_owned(),
            source: std::io::Error::other("no addresses"),
        });
    }
    Ok(addrs)
}

/// Tries each address in turn; the entry records the one that answered, so
/// the node is then reached on the same address.
pub(crate) async fn port_please_at(
    addrs: &[SocketAddr],
    host: &str,
    epmd_port: u16,
    name: &str,
) -> Result<NodeEntry, DistError> {
    let mut last_err = None;
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                stream = Some((s, *addr));
                break;
            }
            Err(e) => last_err = Some(e),
        }
    }
    let Some((mut stream, addr)) = stream else {
        return Err(DistError::EpmdUnreachable {
            host: host.to_owned(),
            port: epmd_port,
            source: last_err.unwrap_or_else(|| std::io::Error::other("no address")),
        });
    };
    let proto = |what: String| DistError::Protocol {
        node: format!("EPMD at {host}:{epmd_port}"),
        what,
    };
    let io = |e: std::io::Error| proto(format!("reading the PORT2_RESP reply: {e}"));

    let mut req = Vec::with_capacity(3 + name.len());
    let len = u16::try_from(1 + name.len()).map_err(|_| proto("node name too long".into()))?;
    req.extend(len.to_be_bytes());
    req.push(PORT_PLEASE2_REQ);
    req.extend(name.as_bytes());
    stream
        .write_all(&req)
        .await
        .map_err(|e| proto(format!("sending PORT_PLEASE2_REQ: {e}")))?;

    // The reply is not length-prefixed; every variable part below carries a
    // 16-bit length, so reads stay bounded.
    let tag = stream.read_u8().await.map_err(io)?;
    if tag != PORT2_RESP {
        return Err(proto(format!("reply tag {tag}, expected {PORT2_RESP}")));
    }
    if stream.read_u8().await.map_err(io)? != 0 {
        return Err(DistError::NotRegistered {
            name: name.to_owned(),
            host: host.to_owned(),
            epmd_port,
        });
    }
    let port = stream.read_u16().await.map_err(io)?;
    let node_type = stream.read_u8().await.map_err(io)?;
    let _protocol = stream.read_u8().await.map_err(io)?;
    let highest_version = stream.read_u16().await.map_err(io)?;
    let lowest_version = stream.read_u16().await.map_err(io)?;
    let nlen = stream.read_u16().await.map_err(io)?;
    let mut raw = vec![0; usize::from(nlen)];
    stream.read_exact(&mut raw).await.map_err(io)?;
    // Extra data follows; nothing in it is needed.
    Ok(NodeEntry {
        addr,
        port,
        node_type,
        highest_version,
        lowest_version,
        name: String::from_utf8_lossy(&raw).into_owned(),
    })
}
