//! The data model: digests, user keys, particles (bin values), result codes, time.

use ripemd::{Digest as _, Ripemd160};
use std::time::{SystemTime, UNIX_EPOCH};

/// Number of partitions, fixed by the Aerospike clients.
pub const N_PARTITIONS: usize = 4096;
/// Longest bin name accepted.
pub const MAX_BIN_NAME_BYTES: usize = 15;
/// Longest set name accepted (Aerospike allows 63).
pub const MAX_SET_NAME_BYTES: usize = 63;
/// Unix time of the Citrusleaf epoch (2010-01-01T00:00:00Z), the base of void-times.
pub const CITRUSLEAF_EPOCH_UNIX: u64 = 1_262_304_000;
/// Longest TTL a write may ask for: ten years.
pub const MAX_TTL_SECS: u32 = 315_360_000;

/// A record's address: RIPEMD-160 over set name, key particle type and key bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 20]);

impl Digest {
    /// Partition id: the low 12 bits of the first two digest bytes read little-endian.
    pub fn partition(&self) -> u16 {
        u16::from_le_bytes([self.0[0], self.0[1]]) & 0x0fff
    }

    /// A well-mixed 64-bit value for hash tables (digest bytes are already uniform).
    pub fn hash64(&self) -> u64 {
        u64::from_le_bytes(self.0[4..12].try_into().expect("8 bytes"))
    }

    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn from_hex(s: &str) -> Option<Digest> {
        if s.len() != 40 {
            return None;
        }
        let mut d = [0u8; 20];
        for (i, out) in d.iter_mut().enumerate() {
            *out = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Digest(d))
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Digest({})", self.to_hex())
    }
}

/// Particle type codes (Aerospike's).
pub mod ptype {
    pub const NULL: u8 = 0;
    pub const INTEGER: u8 = 1;
    pub const FLOAT: u8 = 2;
    pub const STRING: u8 = 3;
    pub const BLOB: u8 = 4;
    pub const BOOL: u8 = 17;
    pub const HLL: u8 = 18;
    pub const MAP: u8 = 19;
    pub const LIST: u8 = 20;
    pub const GEOJSON: u8 = 23;
}

/// A user key as the clients send it: particle type byte plus value bytes.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum UserKey {
    Int(i64),
    Str(String),
    Blob(Vec<u8>),
}

impl UserKey {
    pub fn particle_type(&self) -> u8 {
        match self {
            UserKey::Int(_) => ptype::INTEGER,
            UserKey::Str(_) => ptype::STRING,
            UserKey::Blob(_) => ptype::BLOB,
        }
    }

    /// The value bytes as hashed and sent on the wire.
    pub fn value_bytes(&self) -> Vec<u8> {
        match self {
            UserKey::Int(v) => v.to_be_bytes().to_vec(),
            UserKey::Str(s) => s.as_bytes().to_vec(),
            UserKey::Blob(b) => b.clone(),
        }
    }

    /// The KEY field encoding: particle type byte, then the value.
    pub fn to_field(&self) -> Vec<u8> {
        let mut out = vec![self.particle_type()];
        out.extend_from_slice(&self.value_bytes());
        out
    }

    /// Parse a KEY field (type byte + value). Strings that are not UTF-8 are kept as blobs of
    /// the string type would be lossy, so they are refused.
    pub fn from_field(data: &[u8]) -> Option<UserKey> {
        let (&t, v) = data.split_first()?;
        match t {
            ptype::INTEGER if v.len() == 8 => Some(UserKey::Int(i64::from_be_bytes(v.try_into().ok()?))),
            ptype::STRING => Some(UserKey::Str(String::from_utf8(v.to_vec()).ok()?)),
            ptype::BLOB => Some(UserKey::Blob(v.to_vec())),
            _ => None,
        }
    }

    /// The digest the Aerospike clients compute for this key in `set`.
    pub fn digest(&self, set: &str) -> Digest {
        compute_digest(set, self.particle_type(), &self.value_bytes())
    }
}

/// RIPEMD-160(set || key type || key bytes); the namespace is not part of it.
pub fn compute_digest(set: &str, key_ptype: u8, key_bytes: &[u8]) -> Digest {
    let mut h = Ripemd160::new();
    h.update(set.as_bytes());
    h.update([key_ptype]);
    h.update(key_bytes);
    Digest(h.finalize().into())
}

/// A bin value: an Aerospike particle. List, map, geojson and hll bytes are kept exactly as
/// the client sent them.
#[derive(Clone, PartialEq, Debug)]
pub enum Value {
    Nil,
    Int(i64),
    Float(f64),
    Str(Vec<u8>),
    Blob(Vec<u8>),
    Bool(bool),
    List(Vec<u8>),
    Map(Vec<u8>),
    GeoJson(Vec<u8>),
    Hll(Vec<u8>),
    /// Any other particle type (language blobs, vectors…), stored opaquely.
    Other(u8, Vec<u8>),
}

impl Value {
    pub fn particle_type(&self) -> u8 {
        match self {
            Value::Nil => ptype::NULL,
            Value::Int(_) => ptype::INTEGER,
            Value::Float(_) => ptype::FLOAT,
            Value::Str(_) => ptype::STRING,
            Value::Blob(_) => ptype::BLOB,
            Value::Bool(_) => ptype::BOOL,
            Value::List(_) => ptype::LIST,
            Value::Map(_) => ptype::MAP,
            Value::GeoJson(_) => ptype::GEOJSON,
            Value::Hll(_) => ptype::HLL,
            Value::Other(t, _) => *t,
        }
    }

    /// Length of the wire/on-device encoding of the value.
    pub fn encoded_len(&self) -> usize {
        match self {
            Value::Nil => 0,
            Value::Int(_) | Value::Float(_) => 8,
            Value::Bool(_) => 1,
            Value::Str(b)
            | Value::Blob(b)
            | Value::List(b)
            | Value::Map(b)
            | Value::GeoJson(b)
            | Value::Hll(b)
            | Value::Other(_, b) => b.len(),
        }
    }

    /// Append the value's bytes in the wire encoding (big-endian numbers).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        match self {
            Value::Nil => {}
            Value::Int(v) => out.extend_from_slice(&v.to_be_bytes()),
            Value::Float(v) => out.extend_from_slice(&v.to_bits().to_be_bytes()),
            Value::Bool(v) => out.push(*v as u8),
            Value::Str(b)
            | Value::Blob(b)
            | Value::List(b)
            | Value::Map(b)
            | Value::GeoJson(b)
            | Value::Hll(b)
            | Value::Other(_, b) => out.extend_from_slice(b),
        }
    }

    /// Decode a particle from its type and wire bytes. Fixed-size types of the wrong size are
    /// refused (a client bug or a corrupt record).
    pub fn decode(ptype_code: u8, data: &[u8]) -> Option<Value> {
        Some(match ptype_code {
            ptype::NULL => Value::Nil,
            ptype::INTEGER => Value::Int(i64::from_be_bytes(data.try_into().ok()?)),
            ptype::FLOAT => Value::Float(f64::from_bits(u64::from_be_bytes(data.try_into().ok()?))),
            ptype::BOOL => match data {
                [b] => Value::Bool(*b != 0),
                _ => return None,
            },
            ptype::STRING => Value::Str(data.to_vec()),
            ptype::BLOB => Value::Blob(data.to_vec()),
            ptype::LIST => Value::List(data.to_vec()),
            ptype::MAP => Value::Map(data.to_vec()),
            ptype::GEOJSON => Value::GeoJson(data.to_vec()),
            ptype::HLL => Value::Hll(data.to_vec()),
            t => Value::Other(t, data.to_vec()),
        })
    }
}

/// A named bin.
#[derive(Clone, PartialEq, Debug)]
pub struct Bin {
    pub name: String,
    pub value: Value,
}

impl Bin {
    pub fn new(name: &str, value: Value) -> Bin {
        Bin { name: name.to_string(), value }
    }
}

/// Aerospike result codes (the subset the engine produces; the server adds its own).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub enum ResultCode {
    Ok = 0,
    ServerError = 1,
    NotFound = 2,
    Generation = 3,
    Parameter = 4,
    RecordExists = 5,
    OutOfSpace = 8,
    Timeout = 9,
    IncompatibleType = 12,
    RecordTooBig = 13,
    KeyBusy = 14,
    UnsupportedFeature = 16,
    BinNotFound = 17,
    DeviceOverload = 18,
    KeyMismatch = 19,
    Namespace = 20,
    BinName = 21,
    Forbidden = 22,
}

impl ResultCode {
    pub fn code(self) -> u8 {
        self as u8
    }
}

/// Seconds since the Citrusleaf epoch, now.
pub fn now_cl_secs() -> u32 {
    let unix = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    unix.saturating_sub(CITRUSLEAF_EPOCH_UNIX) as u32
}

/// Milliseconds since the Citrusleaf epoch, now (last-update times).
pub fn now_cl_ms() -> u64 {
    let unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    unix_ms.saturating_sub(CITRUSLEAF_EPOCH_UNIX * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(d: &Digest) -> String {
        d.to_hex()
    }

    /// Test vectors from shared/PROTOCOL.md §2, checked against the official clients.
    #[test]
    fn digest_vectors_match_the_clients() {
        let d = UserKey::Str("key1".into()).digest("demo");
        assert_eq!(hex(&d), "ec91192d4b7f8ce35d5d78d34bca65cbaaaac960");
        assert_eq!(d.partition(), 492);
        let d = UserKey::Int(42).digest("demo");
        assert_eq!(hex(&d), "cf5a1365effa4dc53333f2166d103358f8711096");
        assert_eq!(d.partition(), 2767);
        let d = UserKey::Blob(vec![1, 2, 3]).digest("demo");
        assert_eq!(hex(&d), "ff31c926fbef445648ce63ca72a698a5473425c1");
        assert_eq!(d.partition(), 511);
        let d = UserKey::Str("key1".into()).digest("");
        assert_eq!(hex(&d), "579f05ecf9e6a9e796f4da2ab0b1323364df5c10");
        assert_eq!(d.partition(), 3927);
        let d = UserKey::Int(-1).digest("demo");
        assert_eq!(hex(&d), "e9d49a24c3debdc5a6d551d3e7087999a263bb97");
        assert_eq!(d.partition(), 1257);
        let d = UserKey::Str("alice".into()).digest("users");
        assert_eq!(hex(&d), "da59d2c81357e4165b50cef5f1feaa053ae7fdf9");
        assert_eq!(d.partition(), 2522);
        let d = compute_digest("demo", ptype::STRING, &[1, 2, 3]);
        assert_eq!(hex(&d), "9c97e9f9b68648e20bfe3b8fcd455dcefbe9765b");
    }

    #[test]
    fn values_round_trip_through_their_encoding() {
        let vals = [
            Value::Int(-5),
            Value::Float(1.5),
            Value::Str(b"abc".to_vec()),
            Value::Blob(vec![0, 1]),
            Value::Bool(true),
            Value::List(vec![0x92, 1, 0xa2, 3, b'x']),
            Value::Map(vec![0x81, 0xa2, 3, b'k', 2]),
            Value::GeoJson(vec![0, 0, 0, b'{', b'}']),
            Value::Hll(vec![9; 10]),
            Value::Other(9, vec![1]),
        ];
        for v in vals {
            let mut buf = Vec::new();
            v.encode_into(&mut buf);
            assert_eq!(buf.len(), v.encoded_len());
            assert_eq!(Value::decode(v.particle_type(), &buf), Some(v));
        }
        assert_eq!(Value::decode(ptype::INTEGER, &[1, 2]), None);
    }

    #[test]
    fn user_key_field_round_trips() {
        for k in [UserKey::Int(42), UserKey::Str("k".into()), UserKey::Blob(vec![1])] {
            assert_eq!(UserKey::from_field(&k.to_field()), Some(k));
        }
    }
}
