//! The integration tests: one binary (link time adds up), one module per
//! capability, all driving real components.

mod cli;
mod dist;
mod signing;
