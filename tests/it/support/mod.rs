//! Shared test harness. Not every helper is used by every test module.
#![allow(dead_code)]

pub mod cli;
pub mod device;
pub mod fleet;
pub mod mqtt;
pub mod nspawn;
pub mod otp;
pub mod podman;
pub mod sim;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

pub use otp::free_port;

/// One HTTP/1.0 request to a release on loopback; its JSON body.
pub fn http(port: u16, request: &str) -> Option<serde_json::Value> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "{request} HTTP/1.0\r\nContent-Length: 0\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    serde_json::from_str(text.split_once("\r\n\r\n")?.1).ok()
}

/// A temporary directory in memory (`/dev/shm`) where there is a tmpfs,
/// else in the usual place: for files rewritten all the time (a broker's
/// database, thousands of simulated devices' state), whose writes on a
/// disk shared with parallel builds would set the pace.
pub fn memory_tempdir(prefix: &str) -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    let mut builder = tempfile::Builder::new();
    builder.prefix(prefix);
    if shm.is_dir() {
        builder.tempdir_in(shm)
    } else {
        builder.tempdir()
    }
    .unwrap()
}

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}
