//! The signed manifest envelope: an offer's payload over MQTT, the first
//! member of a bundle. Raw bytes go through `verify_envelope` as a device
//! receives them (seeds are envelopes signed with `fuzz/keys`); UTF-8 input is also signed as a manifest body by a
//! threshold of trusted keys (a signer that made a mistake, or a stolen
//! key), so that the manifest's own checks and the policy run on it.
#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = beamup_fuzz::signers();
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000);
    if let Ok(m) = beamup::fuzzing::verify_envelope(data, &s.root) {
        let _ = beamup::fuzzing::admit(&m, now, Some("1.0.0"), Some(5), None);
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(envelope) = beamup::fuzzing::sign_manifest(text, &s.keys[..2]) else {
        return;
    };
    let Ok(m) = beamup::fuzzing::verify_envelope(&envelope, &s.root) else {
        return;
    };
    let _ = beamup::fuzzing::admit(&m, now, None, None, None);
    let _ = beamup::fuzzing::admit(
        &m,
        now,
        Some("1.0.0"),
        Some(5),
        Some(("gw-1", "acme", "canary")),
    );
    // What a valid manifest promises the code after it.
    assert!(m.tarball.size > 0);
    assert_eq!(
        m.tarball.chunks.len() as u64,
        m.tarball.size.div_ceil(u64::from(m.tarball.chunk_size))
    );
    for p in &m.tarball.parts {
        assert!(
            p.size > 0
                && p.offset
                    .checked_add(p.size)
                    .is_some_and(|e| e <= m.tarball.size)
        );
    }
});
