//! The Aerospike wire protocol as pure functions over byte slices: framing, the AS_MSG
//! header, fields, ops, their translation into engine commands, response encoding, batch
//! and scan layouts, and the info protocol. No I/O here; every decoder is bounded by the
//! bytes it was given and never allocates in proportion to a length it has not seen.
//! See shared/PROTOCOL.md for every fact encoded below.

pub mod batch;
pub mod codes;
pub mod header;
pub mod info;
pub mod msg;
pub mod request;
pub mod response;
pub mod scan;

pub use header::{ProtoHeader, PROTO_HEADER_BYTES};
pub use msg::{Field, Msg, MsgHeader, OpRef, MSG_HEADER_BYTES};

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    #[error("proto version {0}, expected 2")]
    Version(u8),
    #[error("unknown message type {0}")]
    MsgType(u8),
    #[error("message of {size} bytes exceeds max-msg-size {max}")]
    TooLarge { size: u64, max: u64 },
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated { what: &'static str, need: usize, have: usize },
    #[error("AS_MSG header size {0}, expected 22")]
    HeaderSize(u8),
    #[error("malformed: {0}")]
    Malformed(&'static str),
}

/// A bounded big-endian reader over a byte slice.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Reader<'a> {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Bytes read so far.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// A reader over `buf` starting at `pos` (clamped to its end).
    pub fn at(buf: &'a [u8], pos: usize) -> Reader<'a> {
        Reader { buf, pos: pos.min(buf.len()) }
    }

    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.remaining() < n {
            return Err(ProtocolError::Truncated { what, need: n, have: self.remaining() });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.bytes(1, what)?[0])
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        let b = self.bytes(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
}
