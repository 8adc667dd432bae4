//! `agent.toml`, as the agent and `beamup install` load it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = beamup::fuzzing::agent_toml(text);
});
