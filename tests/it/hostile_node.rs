//! A hostile peer where the node should be: its own EPMD on a free
//! loopback port answering for it, a correct handshake (it knows the
//! cookie), then frames no real node sends. `beamup status` must report
//! the node as unreachable with the reason, within a memory cap, and exit
//! normally.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use md5::{Digest, Md5};

use crate::support::cli;

const COOKIE: &str = "hostile-cookie";

/// A listener served on a thread until dropped (joined then).
struct Server {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    port: u16,
}

impl Server {
    fn start(serve: impl Fn(TcpStream) + Send + 'static) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((s, _)) => {
                        s.set_nonblocking(false).unwrap();
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        serve(s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Server {
            stop,
            thread: Some(thread),
            port,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_msg(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len)?;
    let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

fn send_msg(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    s.write_all(&(msg.len() as u16).to_be_bytes())?;
    s.write_all(msg)
}

/// EPMD's `PORT2_RESP` for any name: the node listens on `node_port`.
fn epmd(node_port: u16) -> impl Fn(TcpStream) {
    move |mut s| {
        let Ok(_req) = read_msg(&mut s) else { return };
        let name = b"hostile";
        let mut resp = vec![119, 0];
        resp.extend(node_port.to_be_bytes());
        resp.extend([77, 0, 0, 6, 0, 5]);
        resp.extend((name.len() as u16).to_be_bytes());
        resp.extend(name);
        resp.extend([0, 0]);
        let _ = s.write_all(&resp);
    }
}

/// The OTP 23+ handshake, answered as a node with `COOKIE` answers it,
/// then `frame` (its 4-byte length first) sent, and the connection held
/// until the other side closes it.
fn node(frame: Vec<u8>) -> impl Fn(TcpStream) {
    move |mut s| {
        let run = |s: &mut TcpStream| -> std::io::Result<()> {
            read_msg(s)?; // 'N', the agent's name
            send_msg(s, b"sok")?;
            let flags: u64 = 0x4
                | 0x10
                | 0x80
                | 0x100
                | 0x200
                | 0x400
                | 0x800
                | 0x1_0000
                | 0x2_0000
                | 0x4_0000
                | 0x100_0000
                | 0x400_0000;
            let name = b"hostile@localhost";
            let mut ch = vec![b'N'];
            ch.extend(flags.to_be_bytes());
            ch.extend(12_345u32.to_be_bytes());
            ch.extend(7u32.to_be_bytes());
            ch.extend((name.len() as u16).to_be_bytes());
            ch.extend(name);
            send_msg(s, &ch)?;
            let reply = read_msg(s)?; // 'r', its challenge, its digest
            let theirs = u32::from_be_bytes(reply[1..5].try_into().unwrap());
            let mut h = Md5::new();
            h.update(COOKIE.as_bytes());
            h.update(theirs.to_string().as_bytes());
            let mut ack = vec![b'a'];
            ack.extend(h.finalize());
            send_msg(s, &ack)?;
            s.write_all(&(frame.len() as u32).to_be_bytes())?;
            s.write_all(&frame)?;
            let mut sink = [0u8; 4096];
            while s.read(&mut sink)? > 0 {}
            Ok(())
        };
        let _ = run(&mut s);
    }
}

fn agent_toml(dir: &std::path::Path, epmd_port: u16) -> std::path::PathBuf {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            r#"[release]
root = "{root}"
name = "thermo"
[node]
name = "hostile@localhost"
cookie = "{COOKIE}"
start = "true"
stop = "true"
epmd_port = {epmd_port}
[health]
tcp = "127.0.0.1:1"
timeout = "2s"
soak = "1s"
[trust]
root = "{root}/root.json"
[state]
dir = "{root}/state"
"#,
            root = dir.display()
        ),
    )
    .unwrap();
    path
}

/// A frame (pass-through) whose control message is 300 nested tuples,
/// each claiming as many elements as there are bytes left. Found by the
/// `etf` fuzz target's allocation limit (fuzz/regressions/etf/): each
/// level reserved room for all its claimed elements (40 bytes each)
/// before decoding one, so a 4 MiB frame asked for 160 MiB per level.
fn nested_claims(size: usize) -> Vec<u8> {
    let mut f = vec![112, 131];
    for _ in 0..300 {
        let left = size - f.len() - 5;
        f.push(105);
        f.extend((left as u32).to_be_bytes());
    }
    f.resize(size, 106);
    f
}

#[test]
fn status_survives_a_node_whose_frame_claims_huge_nested_tuples() {
    // The largest frame a node may send.
    let out = status_against(nested_claims(1 << 20));
    assert!(
        out.contains("hostile@localhost unreachable") && out.contains("nested deeper than 256"),
        "{out}"
    );
}

/// `beamup status` against a hostile node that sends `frame`; its output.
fn status_against(frame: Vec<u8>) -> String {
    let dir = tempfile::tempdir().unwrap();
    let node = Server::start(node(frame));
    let epmd = Server::start(epmd(node.port));
    let config = agent_toml(dir.path(), epmd.port);
    let run = cli::beamup_with_memory_cap(
        dir.path(),
        1 << 30,
        &["status", "--config", config.to_str().unwrap()],
    );
    run.ok();
    run.stdout
}

#[test]
fn status_survives_a_node_whose_frame_decodes_to_forty_times_its_size() {
    // A control message of 16 strings of 65,000 bytes: 1 MiB on the wire,
    // each byte a 40-byte term once decoded (40 MiB).
    let mut frame = vec![112, 131, 108];
    frame.extend(16u32.to_be_bytes());
    for _ in 0..16 {
        frame.push(107);
        frame.extend(65_000u16.to_be_bytes());
        frame.extend(std::iter::repeat_n(b'a', 65_000));
    }
    frame.push(106);
    assert!(frame.len() <= 1 << 20);
    let out = status_against(frame);
    assert!(
        out.contains("hostile@localhost unreachable")
            && out.contains("decodes to more than 8 MiB in memory; refused"),
        "{out}"
    );
}

#[test]
fn status_refuses_a_frame_over_one_mebibyte_before_reading_it() {
    let out = status_against(vec![112; (1 << 20) + 1]);
    assert!(
        out.contains("hostile@localhost unreachable")
            && out.contains("the node sent a 1048577-byte frame, over the 1048576-byte limit"),
        "{out}"
    );
}
