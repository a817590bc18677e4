//! The engine's request and reply types, shared by the server, the tools and the tests.
//!
//! Every single-record operation is a [`Command`]: a digest, a list of [`Op`]s and the write
//! policy. `get`, `put`, `delete`, `touch`, `exists` and `operate` are constructors of it, so
//! one code path applies them all with Aerospike's semantics.

use crate::types::{Bin, Digest, ResultCode, Value, MAX_TTL_SECS};

/// Generation check of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GenPolicy {
    #[default]
    None,
    /// Apply only if the record's generation equals this (a missing record has generation 0).
    Eq(u32),
    /// Apply only if this is greater than the record's generation.
    Gt(u32),
}

/// What a write requires of the record's existence, and whether it merges or replaces bins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ExistsAction {
    /// Create or update (merge bins). The default.
    #[default]
    Update,
    /// The record must exist; merge bins.
    UpdateOnly,
    /// Create, or replace all bins.
    CreateOrReplace,
    /// The record must exist; replace all bins.
    ReplaceOnly,
    /// The record must not exist.
    CreateOnly,
}

/// Time to live of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Ttl {
    /// The namespace's `default-ttl` (0 there means never expire).
    #[default]
    NamespaceDefault,
    Never,
    /// Keep the record's current expiry; a new record never expires.
    Keep,
    Secs(u32),
}

impl Ttl {
    /// Interpret the wire's `record_ttl` of a write: 0 default, -1 never, -2 keep, else seconds.
    pub fn from_wire(v: u32) -> Result<Ttl, ResultCode> {
        match v {
            0 => Ok(Ttl::NamespaceDefault),
            0xFFFF_FFFF => Ok(Ttl::Never),
            0xFFFF_FFFE => Ok(Ttl::Keep),
            n if n <= MAX_TTL_SECS => Ok(Ttl::Secs(n)),
            _ => Err(ResultCode::Parameter),
        }
    }
}

/// One operation on a record.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Read one bin.
    Read(String),
    /// Set a bin; `Value::Nil` deletes it.
    Write(String, Value),
    /// Add an integer or a double to a bin (created when missing).
    Incr(String, Value),
    /// Append to a string or blob bin (created when missing).
    Append(String, Value),
    /// Prepend to a string or blob bin (created when missing).
    Prepend(String, Value),
    /// Refresh the TTL and bump the generation; the record must exist.
    Touch,
    /// Delete every bin (the record goes away unless later ops add bins).
    DeleteAll,
}

impl Op {
    pub fn is_write(&self) -> bool {
        !matches!(self, Op::Read(_))
    }

    /// The bin the op names ("" for record-level ops).
    pub fn bin_name(&self) -> &str {
        match self {
            Op::Read(n) | Op::Write(n, _) | Op::Incr(n, _) | Op::Append(n, _) | Op::Prepend(n, _) => n,
            Op::Touch | Op::DeleteAll => "",
        }
    }
}

/// A single-record command.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Command {
    pub digest: Digest,
    /// Set name, stored with the record on writes.
    pub set: String,
    /// The user key as sent (KEY field: particle type byte + value), to store with writes.
    pub key: Option<Vec<u8>>,
    pub ops: Vec<Op>,
    /// Return every bin (after the ops are applied).
    pub read_all: bool,
    /// Return metadata only (exists / header read).
    pub header_only: bool,
    /// Delete the record (writes a tombstone).
    pub delete: bool,
    pub generation: GenPolicy,
    pub exists: ExistsAction,
    pub ttl: Ttl,
    /// One result per op, in order, write ops answered with `Nil`.
    pub respond_all_ops: bool,
}

impl Command {
    pub fn get(digest: Digest) -> Command {
        Command { digest, read_all: true, ..Default::default() }
    }

    pub fn get_bins(digest: Digest, bins: &[&str]) -> Command {
        Command { digest, ops: bins.iter().map(|b| Op::Read(b.to_string())).collect(), ..Default::default() }
    }

    pub fn exists(digest: Digest) -> Command {
        Command { digest, header_only: true, ..Default::default() }
    }

    pub fn put(digest: Digest, set: &str, bins: Vec<Bin>) -> Command {
        Command {
            digest,
            set: set.to_string(),
            ops: bins.into_iter().map(|b| Op::Write(b.name, b.value)).collect(),
            ..Default::default()
        }
    }

    pub fn delete(digest: Digest) -> Command {
        Command { digest, delete: true, ..Default::default() }
    }

    pub fn touch(digest: Digest, ttl: Ttl) -> Command {
        Command { digest, ops: vec![Op::Touch], ttl, ..Default::default() }
    }

    pub fn operate(digest: Digest, set: &str, ops: Vec<Op>) -> Command {
        Command { digest, set: set.to_string(), ops, ..Default::default() }
    }

    pub fn with_key(mut self, key: Vec<u8>) -> Command {
        self.key = Some(key);
        self
    }

    pub fn with_ttl(mut self, ttl: Ttl) -> Command {
        self.ttl = ttl;
        self
    }

    pub fn with_exists(mut self, e: ExistsAction) -> Command {
        self.exists = e;
        self
    }

    pub fn with_generation(mut self, g: GenPolicy) -> Command {
        self.generation = g;
        self
    }

    /// True when the command changes the record.
    pub fn is_write(&self) -> bool {
        self.delete || self.ops.iter().any(Op::is_write)
    }
}

/// One returned bin or op result.
#[derive(Clone, Debug, PartialEq)]
pub struct OpResult {
    pub name: String,
    pub value: Value,
}

/// The answer to a command.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    pub result: ResultCode,
    /// Generation after the command (0 for deletes, misses and errors).
    pub generation: u16,
    /// Void time (Citrusleaf-epoch seconds, 0 = never) after the command.
    pub void_time: u32,
    /// Bins or op results, in the order the command asks for.
    pub bins: Vec<OpResult>,
}

impl Reply {
    pub fn error(rc: ResultCode) -> Reply {
        Reply { result: rc, generation: 0, void_time: 0, bins: Vec::new() }
    }

    pub fn is_ok(&self) -> bool {
        self.result == ResultCode::Ok
    }

    /// The value of a returned bin by name.
    pub fn bin(&self, name: &str) -> Option<&Value> {
        self.bins.iter().find(|b| b.name == name).map(|b| &b.value)
    }
}

/// A record returned by a partition scan.
#[derive(Clone, Debug, PartialEq)]
pub struct ScanRecord {
    pub digest: Digest,
    pub set: String,
    pub key: Option<Vec<u8>>,
    pub generation: u16,
    pub void_time: u32,
    /// Empty when the scan asked for metadata only.
    pub bins: Vec<Bin>,
}

/// The result of scanning one partition.
#[derive(Clone, Debug, PartialEq)]
pub struct ScanPage {
    pub result: ResultCode,
    pub records: Vec<ScanRecord>,
    /// True when the partition has no more records after this page.
    pub done: bool,
}
