//! Payloads on the request topic (`beamup serve`) and the command topic
//! (the agent). Property: a request serve answers gets replies inside the
//! tarball, each at most the piece limit, at most the per-request count.
#![no_main]

use libfuzzer_sys::fuzz_target;

const TARBALL: u64 = 6_370_062;
const MAX_PIECE: u32 = 256 * 1024;

fuzz_target!(|data: &[u8]| {
    if let Some(Some(replies)) = beamup::fuzzing::chunk_request(data, TARBALL, MAX_PIECE) {
        assert!(
            !replies.is_empty() && replies.len() <= 8,
            "{} replies",
            replies.len()
        );
        for &(offset, len) in &replies {
            assert!(len > 0 && len <= MAX_PIECE);
            assert!(offset + u64::from(len) <= TARBALL);
        }
    }
    let _ = beamup::fuzzing::command(data);
});
