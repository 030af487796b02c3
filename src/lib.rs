#![doc = include_str!("../README.md")]

pub use allocprof_core::*;

/// The embedded HTTP endpoint (feature `http`, on by default).
#[cfg(feature = "http")]
pub use allocprof_http as http;
