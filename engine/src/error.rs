//! Errors, typed by layer. Each carries the numbers an operator needs to act on it.

use std::io;

/// Failures of the device layer: opening, probing and I/O.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeviceError {
    #[error("cannot open {path}: {source}")]
    Open { path: String, source: io::Error },

    #[error("{path} is in use by another process (opened with O_EXCL): {source}")]
    Busy { path: String, source: io::Error },

    #[error(
        "{path} is too small: {size} bytes, at least {needed} needed \
         (a header block plus {min_wblocks} write blocks of {wblock_bytes} bytes)"
    )]
    TooSmall { path: String, size: u64, needed: u64, min_wblocks: u64, wblock_bytes: u64 },

    #[error("{path}: O_DIRECT is not supported here ({source}); use a filesystem or device that supports direct I/O")]
    NoDirectIo { path: String, source: io::Error },

    #[error("io_uring is unavailable: {reason}. {fix}")]
    UringUnavailable { reason: String, fix: String },

    #[error("I/O error on {path} at offset {offset} ({len} bytes): {source}")]
    Io { path: String, offset: u64, len: usize, source: io::Error },

    #[error("device {path} wrote 0 bytes at offset {offset}: treating as a failed write")]
    ZeroWrite { path: String, offset: u64 },

    #[error("misaligned I/O on {path}: offset {offset} or length {len} is not a multiple of {align}")]
    Misaligned { path: String, offset: u64, len: usize, align: u32 },

    #[error("simulated crash: the device stopped accepting writes")]
    Crashed,

    #[error(
        "{path} is {actual} bytes but the configuration says {configured} bytes; \
         set the configured size to {actual}, or remove the file to recreate it (destroying its data)"
    )]
    SizeMismatch { path: String, actual: u64, configured: u64 },

    #[error("io_uring failed ({context}): {source}")]
    Ring { context: &'static str, source: io::Error },

    #[error("{0}")]
    Other(String),
}

/// Failures decoding on-device structures.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    #[error("bad magic")]
    BadMagic,
    #[error("unsupported format version {found} (this build reads version {supported})")]
    Version { found: u32, supported: u32 },
    #[error("checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("length {len} is out of range (at most {max})")]
    Length { len: usize, max: usize },
    #[error("record belongs elsewhere: it claims {claimed}, found at {actual}")]
    Location { claimed: String, actual: String },
    #[error("digest mismatch")]
    Digest,
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

/// Start-up failures of the engine as a whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    #[error(transparent)]
    Device(#[from] DeviceError),

    #[error("bad configuration: {key}: {reason}")]
    Config { key: String, reason: String },

    #[error(
        "{path} holds Ferrospike data for namespace '{found}', but this namespace is '{expected}'. \
         Point the namespace at another device, or erase this one (ferrospike --erase / ferrospike-inspect format) \
         to destroy its data"
    )]
    WrongNamespace { path: String, found: String, expected: String },

    #[error(
        "{path} was formatted with write-block-size {found} bytes, but the configuration says {expected} bytes. \
         Set write-block-size = {found} to use the data, or erase the device to reformat it"
    )]
    WrongWblockSize { path: String, found: u32, expected: u32 },

    #[error(
        "{path} was formatted as device {found_index} of {found_count} of its namespace, but is configured as \
         device {expected_index} of {expected_count}. Keep the device list in the order it was formatted with"
    )]
    WrongDeviceSlot { path: String, found_index: u32, found_count: u32, expected_index: u32, expected_count: u32 },

    #[error(
        "{path} holds data that is not a Ferrospike device (first non-zero byte at offset {offset}). \
         Refusing to overwrite it; erase it explicitly (ferrospike --erase) if its contents are disposable"
    )]
    ForeignData { path: String, offset: u64 },

    #[error("{path}: device header is corrupt in both copies ({reason}); erase the device to reuse it")]
    CorruptHeader { path: String, reason: String },

    #[error("{path}: format version {found} is not supported by this build (supports {supported})")]
    UnsupportedVersion { path: String, found: u32, supported: u32 },

    #[error("shard thread failed to start: {0}")]
    Thread(String),
}
