//! The library half of the `vireo` binary: its command line and config file parsing, so
//! tests and fuzz bodies can reach them.

pub mod cli;
#[doc(hidden)]
pub mod fuzz_targets;
