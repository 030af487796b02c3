//! The pprof wire format: `profile.proto` message types and the encoder.

pub mod encode;
pub mod proto;

pub use encode::{encode, encode_uncompressed};
