//! The ferrospike daemon's library: configuration, wire protocol, and the network front-end.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod config;
pub mod net;
pub mod proto;
