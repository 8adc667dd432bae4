//! The bundle container: a file of any bytes opened as a bundle (the two
//! tar headers walked by beamup itself), its manifest read, and when that
//! is a valid manifest the tarball streamed against its digests.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = beamup_fuzz::fresh("bundle");
    let path = dir.join("x.bundle");
    std::fs::write(&path, data).unwrap();
    let Ok(b) = beamup::bundle::Bundle::open(&path) else {
        return;
    };
    let size = b.tarball_size();
    assert!(size <= data.len() as u64, "a tarball larger than the file");
    let mut buf = vec![0u8; 4096];
    let n = b
        .read_tarball_at(&mut buf, size.saturating_sub(100))
        .unwrap();
    assert!(n as u64 <= size.min(100));
    let _ = b.verify_manifest(&beamup_fuzz::signers().root);
    if let Ok(m) = b.manifest_unverified() {
        let _ = beamup::fuzzing::verify_tarball(&b, &m);
    }
});
