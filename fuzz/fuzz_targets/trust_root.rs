//! Trust-root documents: a root file loaded as a device loads it, and the
//! same bytes checked as the successor of a trusted root (rotation).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let s = beamup_fuzz::signers();
    let dir = beamup_fuzz::fresh("root");
    let path = dir.join("root.json");
    std::fs::write(&path, data).unwrap();
    let _ = beamup::trust::root::Root::load(&path);
    let _ = beamup::fuzzing::root_successor(&s.root, data, &path);
});
