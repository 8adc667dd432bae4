//! Shared test harness. Not every helper is used by every test module.
#![allow(dead_code)]

pub mod cli;
pub mod device;
pub mod mqtt;
pub mod nspawn;
pub mod otp;
pub mod podman;
