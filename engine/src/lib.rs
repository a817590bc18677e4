//! Ferrospike storage engine.
//!
//! Records are appended into fixed-size write blocks on raw block devices (or files) with
//! `O_DIRECT` through one io_uring per shard; an in-memory index maps each record's digest to
//! its location; cold start rebuilds the index from the devices. See `engine/FORMAT.md` for
//! the on-device format and the repository's `shared/DESIGN.md` for the architecture.
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod api;
pub mod binsets;
pub mod coldstart;
pub mod config;
pub mod engine;
pub mod error;
pub mod format;
pub mod hook;
pub mod index;
pub mod io;
pub mod ops;
mod shard;
mod shared;
pub mod types;

pub use api::{Command, ExistsAction, GenPolicy, Op, OpResult, Reply, ScanPage, ScanRecord, Ttl};
pub use config::EngineConfig;
pub use engine::{erase_devices, Engine, TruncateError};
pub use error::{DeviceError, EngineError, FormatError};
pub use shared::{EngineStats, SetStats};
pub use types::{Bin, Digest, ResultCode, UserKey, Value};
