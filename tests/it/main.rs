//! Integration tests against real components, in one binary.

mod dist;
