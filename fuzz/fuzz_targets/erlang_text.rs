//! The Erlang text-term reader and what reads through it: `.rel`, relup,
//! RELEASES (whose writer must read back what it wrote) and
//! `start_erl.data`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = beamup::fuzzing::erlang_text(text, "1.1.0") {
        panic!("{e}");
    }
});
