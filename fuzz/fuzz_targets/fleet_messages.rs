//! What the operator's side reads from the broker: device states, online
//! flags, events and campaign controls, as a campaign's controller takes
//! them in (and then decides a turn) and as `beamup fleet status` shows
//! them; then every view the operator gets.
//!
//! Input: messages (see `beamup_fuzz::messages`); a message's first byte
//! picks the device (`gw-1`..`gw-3`, or `gw-9`, not in the campaign) and
//! the topic (state, online, events, control, offer); the rest is the
//! payload. Each message moves the clock by a second.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut feed = beamup::fuzzing::CampaignFeed::new();
    let mut now = 1_000;
    for msg in beamup_fuzz::messages(data) {
        let Some((&pick, payload)) = msg.split_first() else {
            continue;
        };
        let device = ["gw-1", "gw-2", "gw-3", "gw-9"][usize::from(pick & 3)];
        let topic = feed.topics(device)[usize::from(pick >> 2) % 5].clone();
        now += 1_000;
        feed.message(&topic, payload, now);
    }
    feed.views();
});
