//! A minimal Aerospike wire-protocol client: single-record reads, writes and deletes and
//! batch reads, over one blocking TCP connection, sending exactly what the official clients
//! send (proto version 2, type 3 AS_MSG, the 22-byte header, NAMESPACE / SET / DIGEST fields
//! and KEY only when asked). See `shared/PROTOCOL.md` §1.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use ferrospike_engine::{Digest, UserKey, Value};

pub const PROTO_VERSION: u8 = 2;
pub const MSG_TYPE_AS_MSG: u8 = 3;
pub const MSG_HEADER_BYTES: usize = 22;
/// Largest response body accepted (the C client's PROTO_SIZE_MAX).
pub const MAX_RESPONSE_BYTES: usize = 128 << 20;
/// `transaction_ttl` sent with every command, in milliseconds (the clients' default).
pub const TRANSACTION_TTL_MS: u32 = 1000;

pub const INFO1_READ: u8 = 0x01;
pub const INFO1_GET_ALL: u8 = 0x02;
pub const INFO1_BATCH: u8 = 0x08;
pub const INFO2_WRITE: u8 = 0x01;
pub const INFO2_DELETE: u8 = 0x02;
pub const INFO2_DURABLE_DELETE: u8 = 0x10;
pub const INFO3_LAST: u8 = 0x01;

pub const FIELD_NAMESPACE: u8 = 0;
pub const FIELD_SET: u8 = 1;
pub const FIELD_KEY: u8 = 2;
pub const FIELD_DIGEST: u8 = 4;
pub const FIELD_BATCH_INDEX: u8 = 41;

pub const OP_WRITE: u8 = 2;

/// Batch parent flags the clients send (INLINE_IN_MEMORY | REPORT_ALL_ERRORS | REPORT_ERROR_REC).
const BATCH_PARENT_FLAGS: u8 = 0x0d;
/// Batch row flags of a read row: HAS_EXTRA_INFO | HAS_RECORD_TTL (as both clients send).
const BATCH_ROW_READ_FLAGS: u8 = 0x0a;

/// What went wrong talking to the server (as opposed to a result code it sent).
#[derive(Debug)]
pub enum WireError {
    Io(std::io::Error),
    Protocol(String),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Io(e) => write!(f, "network: {e}"),
            WireError::Protocol(m) => write!(f, "protocol: {m}"),
        }
    }
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        WireError::Io(e)
    }
}

fn put_field(out: &mut Vec<u8>, t: u8, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32 + 1).to_be_bytes());
    out.push(t);
    out.extend_from_slice(data);
}

fn put_op(out: &mut Vec<u8>, op: u8, name: &str, v: &Value) {
    let mut val = Vec::new();
    v.encode_into(&mut val);
    out.extend_from_slice(&((4 + name.len() + val.len()) as u32).to_be_bytes());
    out.extend_from_slice(&[op, v.particle_type(), 0, name.len() as u8]);
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&val);
}

/// The 8-byte proto header followed by the 22-byte message header; the body length is
/// patched by [`finish`].
#[allow(clippy::too_many_arguments)]
fn start(out: &mut Vec<u8>, info1: u8, info2: u8, info3: u8, n_fields: u16, n_ops: u16) {
    out.clear();
    out.extend_from_slice(&[PROTO_VERSION, MSG_TYPE_AS_MSG, 0, 0, 0, 0, 0, 0]);
    out.extend_from_slice(&[MSG_HEADER_BYTES as u8, info1, info2, info3, 0, 0]);
    out.extend_from_slice(&0u32.to_be_bytes()); // generation
    out.extend_from_slice(&0u32.to_be_bytes()); // record_ttl: the namespace default
    out.extend_from_slice(&TRANSACTION_TTL_MS.to_be_bytes());
    out.extend_from_slice(&n_fields.to_be_bytes());
    out.extend_from_slice(&n_ops.to_be_bytes());
}

fn finish(out: &mut [u8]) {
    let body = (out.len() - 8) as u64;
    out[2..8].copy_from_slice(&body.to_be_bytes()[2..]);
}

/// One record address: namespace, set, user key (sent only with `send_key`).
pub struct Key<'a> {
    pub namespace: &'a str,
    pub set: &'a str,
    pub key: &'a UserKey,
    pub send_key: bool,
}

impl Key<'_> {
    pub fn digest(&self) -> Digest {
        self.key.digest(self.set)
    }

    fn fields(&self, out: &mut Vec<u8>) {
        put_field(out, FIELD_NAMESPACE, self.namespace.as_bytes());
        put_field(out, FIELD_SET, self.set.as_bytes());
        put_field(out, FIELD_DIGEST, &self.digest().0);
        if self.send_key {
            put_field(out, FIELD_KEY, &self.key.to_field());
        }
    }

    fn n_fields(&self) -> u16 {
        if self.send_key {
            4
        } else {
            3
        }
    }
}

/// A put: one WRITE op per bin.
pub fn encode_put(out: &mut Vec<u8>, k: &Key, bins: &[(String, Value)]) {
    start(out, 0, INFO2_WRITE, 0, k.n_fields(), bins.len() as u16);
    k.fields(out);
    for (name, v) in bins {
        put_op(out, OP_WRITE, name, v);
    }
    finish(out);
}

/// A get of all bins.
pub fn encode_get(out: &mut Vec<u8>, k: &Key) {
    start(out, INFO1_READ | INFO1_GET_ALL, 0, 0, k.n_fields(), 0);
    k.fields(out);
    finish(out);
}

/// A delete (durable: leave a tombstone).
pub fn encode_delete(out: &mut Vec<u8>, k: &Key, durable: bool) {
    let info2 = INFO2_WRITE | INFO2_DELETE | if durable { INFO2_DURABLE_DELETE } else { 0 };
    start(out, 0, info2, 0, k.n_fields(), 0);
    k.fields(out);
    finish(out);
}

/// A batch read of all bins of `digests` in one namespace and set.
pub fn encode_batch_get(out: &mut Vec<u8>, namespace: &str, set: &str, digests: &[Digest]) {
    start(out, INFO1_BATCH, 0, 0, 1, 0);
    let mut f = Vec::with_capacity(5 + digests.len() * 64);
    f.extend_from_slice(&(digests.len() as u32).to_be_bytes());
    f.push(BATCH_PARENT_FLAGS);
    for (i, d) in digests.iter().enumerate() {
        f.extend_from_slice(&(i as u32).to_be_bytes());
        f.extend_from_slice(&d.0);
        f.push(BATCH_ROW_READ_FLAGS);
        f.extend_from_slice(&[INFO1_READ | INFO1_GET_ALL, 0, 0]);
        f.extend_from_slice(&0u32.to_be_bytes()); // record_ttl
        f.extend_from_slice(&2u16.to_be_bytes()); // n_fields
        f.extend_from_slice(&0u16.to_be_bytes()); // n_ops
        put_field(&mut f, FIELD_NAMESPACE, namespace.as_bytes());
        put_field(&mut f, FIELD_SET, set.as_bytes());
    }
    put_field(out, FIELD_BATCH_INDEX, &f);
    finish(out);
}

/// A blocking connection to one server.
pub struct Conn {
    stream: TcpStream,
    body: Vec<u8>,
}

impl Conn {
    pub fn connect(addr: &str, timeout: Duration) -> Result<Conn, WireError> {
        use std::net::ToSocketAddrs;
        let sa = addr.to_socket_addrs()?.next().ok_or_else(|| WireError::Protocol(format!("cannot resolve {addr}")))?;
        let stream = TcpStream::connect_timeout(&sa, timeout)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Conn { stream, body: Vec::new() })
    }

    fn read_frame(&mut self) -> Result<(), WireError> {
        let mut h = [0u8; 8];
        self.stream.read_exact(&mut h)?;
        let n = response_body_len(&h)?;
        self.body.resize(n, 0);
        self.stream.read_exact(&mut self.body)?;
        Ok(())
    }

    /// The socket, for callers that drive it themselves.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Send a single-record request and return the result code of its response.
    pub fn call(&mut self, req: &[u8]) -> Result<u8, WireError> {
        self.stream.write_all(req)?;
        self.read_frame()?;
        Ok(self.body[5])
    }

    /// Send a batch request; return the result code of each row (by row index) and the
    /// batch's own result code (from the LAST message).
    pub fn batch(&mut self, req: &[u8], rows: usize) -> Result<(Vec<u8>, u8), WireError> {
        self.stream.write_all(req)?;
        let mut codes = vec![u8::MAX; rows];
        loop {
            self.read_frame()?;
            let b = &self.body;
            let mut p = 0usize;
            while p < b.len() {
                if b.len() - p < MSG_HEADER_BYTES {
                    return Err(WireError::Protocol("truncated batch message".into()));
                }
                let h = &b[p..p + MSG_HEADER_BYTES];
                let rc = h[5];
                let info3 = h[3];
                let index = u32::from_be_bytes(h[14..18].try_into().expect("4 bytes")) as usize;
                let n_fields = u16::from_be_bytes([h[18], h[19]]) as usize;
                let n_ops = u16::from_be_bytes([h[20], h[21]]) as usize;
                p += MSG_HEADER_BYTES;
                for _ in 0..n_fields + n_ops {
                    let sz = b
                        .get(p..p + 4)
                        .map(|s| u32::from_be_bytes(s.try_into().expect("4 bytes")) as usize)
                        .ok_or_else(|| WireError::Protocol("truncated batch field or op".into()))?;
                    p += 4 + sz;
                }
                if p > b.len() {
                    return Err(WireError::Protocol("batch message overruns its frame".into()));
                }
                if info3 & INFO3_LAST != 0 {
                    return Ok((codes, rc));
                }
                if index < rows {
                    codes[index] = rc;
                }
            }
        }
    }
}

/// The body length of a response frame from its 8-byte header, checked (an AS_MSG of this
/// protocol version, a body between a message header and `MAX_RESPONSE_BYTES`).
fn response_body_len(h: &[u8; 8]) -> Result<usize, WireError> {
    if h[0] != PROTO_VERSION || h[1] != MSG_TYPE_AS_MSG {
        return Err(WireError::Protocol(format!("unexpected proto version {} type {}", h[0], h[1])));
    }
    let n = (u64::from_be_bytes(*h) & ((1 << 48) - 1)) as usize;
    if !(MSG_HEADER_BYTES..=MAX_RESPONSE_BYTES).contains(&n) {
        return Err(WireError::Protocol(format!("response body of {n} bytes")));
    }
    Ok(n)
}

/// Take one whole response frame off the front of `buf` and return its result code; None
/// while it has not arrived in full.
pub fn parse_response(buf: &mut Vec<u8>) -> Result<Option<u8>, WireError> {
    let Some(h) = buf.first_chunk::<8>() else { return Ok(None) };
    let n = response_body_len(h)?;
    if buf.len() < 8 + n {
        return Ok(None);
    }
    let rc = buf[8 + 5];
    buf.drain(..8 + n);
    Ok(Some(rc))
}

/// Client-side names of the result codes (PROTOCOL.md §1.8).
pub fn result_name(rc: u8) -> &'static str {
    match rc {
        0 => "OK",
        1 => "SERVER_ERROR",
        2 => "KEY_NOT_FOUND",
        3 => "GENERATION_ERROR",
        4 => "PARAMETER_ERROR",
        5 => "KEY_EXISTS",
        6 => "BIN_EXISTS",
        7 => "CLUSTER_KEY_MISMATCH",
        8 => "SERVER_MEM_ERROR (out of space)",
        9 => "TIMEOUT",
        11 => "PARTITION_UNAVAILABLE",
        12 => "BIN_TYPE_ERROR",
        13 => "RECORD_TOO_BIG",
        14 => "KEY_BUSY",
        16 => "UNSUPPORTED_FEATURE",
        18 => "DEVICE_OVERLOAD",
        19 => "KEY_MISMATCH",
        20 => "NAMESPACE_NOT_FOUND",
        21 => "BIN_NAME_TOO_LONG",
        22 => "FAIL_FORBIDDEN",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_matches_the_captured_request() {
        // PROTOCOL.md §1.10: Python client.get(('test','demo','key1')).
        let key = UserKey::Str("key1".into());
        let k = Key { namespace: "test", set: "demo", key: &key, send_key: false };
        let mut out = Vec::new();
        encode_get(&mut out, &k);
        let mut expect = vec![0x02, 0x03, 0, 0, 0, 0, 0, 0x41, 0x16, 0x03, 0, 0, 0, 0];
        expect.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x03, 0xe8, 0, 3, 0, 0]);
        expect.extend_from_slice(&[0, 0, 0, 5, 0, b't', b'e', b's', b't', 0, 0, 0, 5, 1, b'd', b'e', b'm', b'o']);
        expect.extend_from_slice(&[0, 0, 0, 0x15, 4]);
        expect.extend_from_slice(&k.digest().0);
        assert_eq!(out, expect);
        assert_eq!(k.digest().to_hex(), "ec91192d4b7f8ce35d5d78d34bca65cbaaaac960");
    }
}
