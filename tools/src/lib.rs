//! Ferrospike tools: `ferrospike-act` (ACT-style device certification), `ferrospike-bench`
//! (an asbench-style load generator over the Aerospike wire protocol) and
//! `ferrospike-inspect` (offline device inspection). Each binary is a thin wrapper around the
//! `main` of its module here, so tests can run the tools in-process or re-executed.
#![deny(unsafe_code)]

pub mod act;
pub mod bench;
pub mod hist;
pub mod inspect;
pub mod rng;
pub mod wire;
