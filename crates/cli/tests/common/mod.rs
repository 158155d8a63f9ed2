//! Helpers for the command-line tool's tests: the library's shared test helpers (`tests/common` at the
//! top level) and [`cli`], which runs the `psbridge` binary this package builds.
#![allow(dead_code)] // each test binary uses a different subset

#[path = "../../../../tests/common/mod.rs"]
mod shared;
pub use shared::*;

pub mod cli;
