//! What a peer on the EPMD port and on the node's port sends, over real
//! loopback sockets: the EPMD `PORT2_RESP`, then the distribution
//! handshake (status, challenge, ack) as the agent runs it.
//!
//! Input: one length byte, that many bytes EPMD answers, then what the
//! node answers (each 2-byte-length-prefixed handshake message included).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    })
}

/// Accepts one connection on `l`, sends `bytes`, closes its sending side
/// and reads until the other side closes.
async fn peer(l: TcpListener, bytes: Vec<u8>) {
    let Ok((mut s, _)) = l.accept().await else {
        return;
    };
    let _ = s.write_all(&bytes).await;
    let _ = s.shutdown().await;
    let mut sink = [0u8; 1024];
    while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (epmd, node) = rest.split_at(usize::from(n).min(rest.len()));
    runtime().block_on(async {
        let limit = Duration::from_secs(5);
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let p = tokio::spawn(peer(l, epmd.to_vec()));
        let r = tokio::time::timeout(limit, beamup::fuzzing::epmd_lookup(addr, "thermo")).await;
        assert!(r.is_ok(), "EPMD lookup hung");
        let _ = p.await;

        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let p = tokio::spawn(peer(l, node.to_vec()));
        let mut s = TcpStream::connect(addr).await.unwrap();
        let r =
            tokio::time::timeout(limit, beamup::fuzzing::dist_handshake(&mut s, "cookie")).await;
        assert!(r.is_ok(), "handshake hung");
        if let Ok(Ok(name)) = r {
            panic!("handshake passed without our cookie digest (peer {name})");
        }
        drop(s);
        let _ = p.await;
    });
});
