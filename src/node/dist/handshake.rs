//! Distribution handshake, protocol version 6 ("handshake 23"), from the
//! connecting side, as OTP's `dist_util:handshake_we_started/1` does it:
//!
//! ```text
//! us   -> 'N' Flags:64 Creation:32 NameLen:16 Name        (send_name)
//! peer -> 's' Status                                        (ok | not_allowed | alive ...)
//! peer -> 'N' Flags:64 Challenge:32 Creation:32 NameLen:16 Name
//! us   -> 'r' OurChallenge:32 md5(Cookie ++ integer_to_list(Challenge))
//! peer -> 'a' md5(Cookie ++ integer_to_list(OurChallenge))
//! ```
//!
//! Every message is framed by a 16-bit length, so a read is at most 64 KiB.
//! A wrong cookie is never reported by the peer: it logs it and closes the
//! socket after our challenge reply.
//!
//! The digest uses the `md-5` crate (RustCrypto): it shares the `digest`
//! 0.10 crate `sha2` already brings, so it adds one small crate.

use md5::{Digest, Md5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::DistError;

/// Flags OTP 25 refuses to connect without (`MANDATORY_DFLAGS_25` in
/// kernel's `dist.hrl`; the peer answers `not_allowed` if one is missing).
/// `MANDATORY_25_DIGEST` is the same set as one bit: OTP 25/26 expand it,
/// and kernel's `dist.hrl` announces OTP 27 will insist on it.
/// We ask for nothing beyond them: no atom cache (so every message arrives
/// as a plain "pass through" frame), no fragments, no `SEND_SENDER`, no
/// aliases. Not setting `PUBLISHED` is what makes us a hidden node.
pub(crate) const FLAGS: u64 = DFLAG_EXTENDED_REFERENCES
    | DFLAG_FUN_TAGS
    | DFLAG_EXTENDED_PIDS_PORTS
    | DFLAG_NEW_FUN_TAGS
    | DFLAG_EXPORT_PTR_TAG
    | DFLAG_BIT_BINARIES
    | DFLAG_NEW_FLOATS
    | DFLAG_UTF8_ATOMS
    | DFLAG_MAP_TAG
    | DFLAG_BIG_CREATION
    | DFLAG_HANDSHAKE_23
    | DFLAG_MANDATORY_25_DIGEST;

const DFLAG_EXTENDED_REFERENCES: u64 = 0x4;
const DFLAG_FUN_TAGS: u64 = 0x10;
const DFLAG_NEW_FUN_TAGS: u64 = 0x80;
const DFLAG_EXTENDED_PIDS_PORTS: u64 = 0x100;
const DFLAG_EXPORT_PTR_TAG: u64 = 0x200;
const DFLAG_BIT_BINARIES: u64 = 0x400;
const DFLAG_NEW_FLOATS: u64 = 0x800;
const DFLAG_UTF8_ATOMS: u64 = 0x1_0000;
const DFLAG_MAP_TAG: u64 = 0x2_0000;
const DFLAG_BIG_CREATION: u64 = 0x4_0000;
const DFLAG_HANDSHAKE_23: u64 = 0x100_0000;
/// OTP 25+ may send this single bit in place of the mandatory set.
const DFLAG_MANDATORY_25_DIGEST: u64 = 0x400_0000;
/// The flags the term formats we send and accept rely on.
const MANDATORY_25: u64 = FLAGS & !DFLAG_MANDATORY_25_DIGEST;

/// What the peer told us about itself.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    pub(crate) name: String,
}

/// Runs the handshake on a fresh connection. `node` names the peer in
/// errors; the caller bounds the whole exchange with a deadline.
pub(crate) async fn handshake(
    stream: &mut TcpStream,
    node: &str,
    our_name: &str,
    our_creation: u32,
    cookie: &str,
) -> Result<Peer, DistError> {
    let rejected = |detail: String| DistError::HandshakeRejected {
        node: node.to_owned(),
        detail,
    };

    let mut msg = vec![b'N'];
    msg.extend(FLAGS.to_be_bytes());
    msg.extend(our_creation.to_be_bytes());
    msg.extend((our_name.len() as u16).to_be_bytes());
    msg.extend(our_name.as_bytes());
    send(stream, &msg)
        .await
        .map_err(|e| rejected(format!("sending our name failed: {e}")))?;

    let status = recv(stream)
        .await
        .map_err(|e| rejected(format!("no status reply ({e})")))?;
    match status.strip_prefix(b"s") {
        Some(b"ok") | Some(b"ok_simultaneous") => {}
        // The peer still holds an older connection under our name (a slot
        // name reused before it noticed the old socket closed): "true" tells
        // it to drop that one and continue with this.
        Some(b"alive") => send(stream, b"strue")
            .await
            .map_err(|e| rejected(format!("answering status alive: {e}")))?,
        Some(b"not_allowed") => {
            return Err(rejected(
                "status not_allowed: the node refuses our name or flags; \
                 check net_kernel:allow/1 and the node's OTP version"
                    .into(),
            ));
        }
        Some(other) => {
            return Err(rejected(format!(
                "status {:?}",
                String::from_utf8_lossy(other)
            )));
        }
        None => return Err(rejected("first reply is not a status message".into())),
    }

    let ch = recv(stream)
        .await
        .map_err(|e| rejected(format!("no challenge after status ok ({e})")))?;
    // 'N' Flags:64 Challenge:32 Creation:32 NameLen:16 Name
    if ch.len() < 19 || ch[0] != b'N' {
        return Err(rejected(format!(
            "unexpected challenge message (tag {:?}, {} bytes); the node must be OTP 23 or newer",
            ch.first().map(|&b| b as char),
            ch.len()
        )));
    }
    let mut flags = u64::from_be_bytes(ch[1..9].try_into().unwrap());
    let challenge = u32::from_be_bytes(ch[9..13].try_into().unwrap());
    let nlen = usize::from(u16::from_be_bytes(ch[17..19].try_into().unwrap()));
    let name = ch
        .get(19..19 + nlen)
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .ok_or_else(|| rejected("challenge name shorter than its length field".into()))?;
    if flags & DFLAG_MANDATORY_25_DIGEST != 0 {
        flags |= MANDATORY_25;
    }
    if flags & MANDATORY_25 != MANDATORY_25 {
        return Err(rejected(format!(
            "peer lacks distribution flags {:#x} we rely on",
            MANDATORY_25 & !flags
        )));
    }

    let our_challenge = random_u32();
    let mut reply = vec![b'r'];
    reply.extend(our_challenge.to_be_bytes());
    reply.extend(digest(challenge, cookie));
    send(stream, &reply)
        .await
        .map_err(|e| rejected(format!("sending challenge reply: {e}")))?;

    // A peer that dislikes our digest closes here without a word.
    let ack = recv(stream).await.map_err(|_| DistError::CookieRejected {
        node: node.to_owned(),
    })?;
    match ack.split_first() {
        Some((b'a', sum)) if sum == digest(our_challenge, cookie) => Ok(Peer { name }),
        Some((b'a', _)) => Err(rejected(
            "the node's challenge ack does not match our cookie; check the cookie".into(),
        )),
        _ => Err(rejected("expected a challenge ack".into())),
    }
}

/// `erlang:md5([Cookie | integer_to_list(Challenge)])`.
pub(crate) fn digest(challenge: u32, cookie: &str) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(cookie.as_bytes());
    h.update(challenge.to_string().as_bytes());
    h.finalize().into()
}

pub(crate) fn random_u32() -> u32 {
    let mut b = [0u8; 4];
    getrandom::fill(&mut b).expect("OS random source");
    u32::from_be_bytes(b)
}

async fn send(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(2 + msg.len());
    buf.extend((msg.len() as u16).to_be_bytes());
    buf.extend(msg);
    stream.write_all(&buf).await
}

async fn recv(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await?;
    let mut buf = vec![0; usize::from(len)];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_matches_erlang() {
        // erlang:md5(["secret" | integer_to_list(4000000000)])
        assert_eq!(
            hex::encode(digest(4_000_000_000, "secret")),
            "068283266ffc7df6091e084e0e32bdd2"
        );
    }

    #[test]
    fn flags_are_otp25_mandatory_set() {
        // ?MANDATORY_DFLAGS_25 evaluated on OTP 25.
        assert_eq!(MANDATORY_25, 0x107_0F94);
        assert_eq!(FLAGS, 0x507_0F94);
    }
}
