//! Durations as people write them in `agent.toml` (`"10s"`, `"500ms"`),
//! for every section that has one.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// Deserializes a human duration, with an error that says what was meant.
pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!("{s:?} is not a duration like \"10s\" ({e})"))
    })
}

/// [`deserialize`] for an optional setting.
#[cfg(feature = "operator")]
pub(crate) fn deserialize_some<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Duration>, D::Error> {
    deserialize(d).map(Some)
}
