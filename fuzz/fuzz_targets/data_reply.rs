//! Messages on a device's data topic during a transfer, as the agent's
//! download takes them: decoded, matched to the transfer, each piece
//! checked against the window and each chunk against its signed digest.
//!
//! Input: messages (see `beamup_fuzz::messages`). A message's first byte
//! says what it is: 0, the rest is the payload as it arrived; 1..=3, the
//! rest picks a requested piece (2 bytes) and the target sends that piece
//! with the right bytes (1), one byte flipped (2), or the right header
//! and the fuzzer's bytes (3). Every 8 messages the download asks again.
//!
//! Property: every chunk the download holds as verified, and every chunk
//! it reported verified, has the signed bytes in the file.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const CHUNK: usize = 4096;
const PIECE: u32 = 1024;

struct Fixture {
    tarball: Vec<u8>,
    id: [u8; 32],
    manifest: beamup::release::manifest::Manifest,
    envelope: Vec<u8>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let mut x: u32 = 0x9e37_79b9;
        let tarball: Vec<u8> = (0..10 * CHUNK + 1000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let manifest = beamup::fuzzing::manifest_for(&tarball, CHUNK as u32);
        let mut id = [0u8; 32];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&manifest.tarball.sha256[2 * i..2 * i + 2], 16).unwrap();
        }
        let envelope = br#"{"signed":{},"signatures":[]}"#.to_vec();
        Fixture {
            tarball,
            id,
            manifest,
            envelope,
        }
    })
}

fn reply(id: &[u8; 32], offset: u64, data: &[u8]) -> bytes::Bytes {
    bytes::Bytes::from(beamup::transport::protocol::encode_data(id, offset, data))
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let dir = beamup_fuzz::fresh("download");
    let mut sink = beamup::fuzzing::DataSink::open(&dir, &f.envelope, &f.manifest, PIECE).unwrap();
    let mut asked = sink.request();
    let mut verified = Vec::new();
    for (i, msg) in beamup_fuzz::messages(data).into_iter().enumerate() {
        if i % 8 == 7 {
            asked.extend(sink.request());
        }
        let Some((&kind, rest)) = msg.split_first() else {
            continue;
        };
        let payload = if kind == 0 || asked.is_empty() {
            bytes::Bytes::copy_from_slice(rest)
        } else {
            let pick = rest.first().copied().unwrap_or(0) as usize
                | usize::from(rest.get(1).copied().unwrap_or(0)) << 8;
            let (offset, len) = asked[pick % asked.len()];
            let range = offset as usize..offset as usize + len as usize;
            match kind % 4 {
                1 => reply(&f.id, offset, &f.tarball[range]),
                2 => {
                    let mut d = f.tarball[range].to_vec();
                    let at = rest.get(2).copied().unwrap_or(0) as usize % d.len();
                    d[at] ^= 1 << (rest.get(3).copied().unwrap_or(0) % 8);
                    reply(&f.id, offset, &d)
                }
                _ => reply(&f.id, offset, rest.get(2..).unwrap_or_default()),
            }
        };
        match sink.reply(&payload) {
            Ok(Some(c)) => verified.push(c),
            Ok(None) => {}
            // Too many bad copies of one chunk: the transfer stops.
            Err(_) => break,
        }
    }
    sink.checkpoint().unwrap();
    let file = std::fs::read(sink.path()).unwrap();
    let start = file.len() - 1024 - f.tarball.len().next_multiple_of(512);
    let have = sink.have();
    for c in verified
        .iter()
        .map(|&c| c as usize)
        .chain(have.iter().enumerate().filter(|(_, h)| **h).map(|(i, _)| i))
    {
        let range = c * CHUNK..((c + 1) * CHUNK).min(f.tarball.len());
        assert!(have[c], "chunk {c} reported verified, not held");
        assert_eq!(
            file[start + range.start..start + range.end],
            f.tarball[range.clone()],
            "chunk {c} held as verified has other bytes"
        );
    }
});
