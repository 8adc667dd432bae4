//! The integration tests: one binary (link time adds up, and the OTP test
//! releases are built once per run, see `support::otp`), one module per
//! capability, all driving real components.

mod cli;
mod containers;
mod dist;
mod install;
mod layout;
mod mqtt;
mod otp_release;
mod release_flavors;
mod relup;
mod shapes;
mod signing;
mod support;
mod systemd;
mod unpack;
