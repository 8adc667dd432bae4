//! One distribution frame from a node, as the connection's reader handles
//! it (control message, routing to our pid, the reply to a pending call).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = beamup::fuzzing::dist_frame(data);
});
