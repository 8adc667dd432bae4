//! Integration tests: one binary, so that the OTP releases are built once per
//! run (see `support::otp`). Run with `cargo test --test it`.

mod otp_release;
mod support;
