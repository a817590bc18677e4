//! On-device format v1. `engine/FORMAT.md` documents every byte; this module is the code.
//!
//! All integers are little-endian. Checksums are crc32c. A record's checksum also covers its
//! location (device index, wblock id, wblock write sequence, offset in the wblock), so a copy
//! found anywhere else — misdirected, stale from an earlier use of the wblock, or copied — fails
//! verification.

use crate::error::FormatError;
use crate::types::{Bin, Digest, Value, MAX_BIN_NAME_BYTES, MAX_SET_NAME_BYTES};

pub const FORMAT_VERSION: u32 = 1;

// ---------------------------------------------------------------- device header

pub const DEVICE_MAGIC: [u8; 8] = *b"FSPKDEV\0";
/// Bytes of the header covered by its checksum (the rest of its 4 KiB sector is zero).
pub const DEVICE_HEADER_BYTES: usize = 128;
/// Each header copy occupies one 4 KiB sector: copy A at 0, copy B at 4096.
pub const HEADER_COPY_STRIDE: u64 = 4096;
pub const HEADER_FLAG_CLEAN: u32 = 0x1;
/// The header sector holds a truncate table after the 128 checksummed bytes.
pub const HEADER_FLAG_TRUNCATES: u32 = 0x2;
const NS_NAME_BYTES: usize = 32;
/// The truncate table: count (u32) and byte length (u32) at this offset, entries after them,
/// its own CRC-32C in the sector's last 4 bytes.
const TRUNCATE_TABLE_AT: usize = DEVICE_HEADER_BYTES;
const TRUNCATE_CRC_AT: usize = HEADER_COPY_STRIDE as usize - 4;
/// Bytes available for truncate entries.
pub const TRUNCATE_TABLE_BYTES: usize = TRUNCATE_CRC_AT - TRUNCATE_TABLE_AT - 8;

/// A persisted truncate: records of `set` ("" = every record of the namespace) whose
/// last-update time is before `before_ms` (ms since the Citrusleaf epoch) are gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruncateEntry {
    pub set: String,
    pub before_ms: u64,
}

impl TruncateEntry {
    /// Bytes the entry takes in the table: set name length, name, time.
    pub fn encoded_len(&self) -> usize {
        1 + self.set.len() + 8
    }
}

/// The device header, stored twice at the start of the device (wblock 0 is reserved for it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceHeader {
    /// Incremented on every header write; the valid copy with the larger value wins.
    pub write_seq: u64,
    pub device_id: u64,
    pub namespace: String,
    pub wblock_bytes: u32,
    pub device_index: u32,
    pub n_devices: u32,
    pub flags: u32,
    pub device_bytes: u64,
    pub format_time_ms: u64,
    /// Random value shared by every device of the namespace, chosen when it was formatted.
    pub namespace_signature: u64,
    /// Truncates in force (at most one entry per set; see [`TruncateEntry`]).
    pub truncates: Vec<TruncateEntry>,
}

const _: () = assert!(DEVICE_HEADER_BYTES == 128);
const _: () = assert!(DEVICE_HEADER_BYTES as u64 <= HEADER_COPY_STRIDE);

impl DeviceHeader {
    pub fn clean(&self) -> bool {
        self.flags & HEADER_FLAG_CLEAN != 0
    }

    /// Whether the truncate table fits in the header sector.
    pub fn truncates_fit(truncates: &[TruncateEntry]) -> bool {
        truncates.iter().map(TruncateEntry::encoded_len).sum::<usize>() <= TRUNCATE_TABLE_BYTES
    }

    /// One header copy: a whole 4 KiB sector.
    pub fn encode(&self) -> Vec<u8> {
        assert!(self.namespace.len() <= NS_NAME_BYTES);
        assert!(Self::truncates_fit(&self.truncates), "truncate table overflows the header sector");
        let mut b = vec![0u8; HEADER_COPY_STRIDE as usize];
        let flags = if self.truncates.is_empty() {
            self.flags & !HEADER_FLAG_TRUNCATES
        } else {
            self.flags | HEADER_FLAG_TRUNCATES
        };
        b[0..8].copy_from_slice(&DEVICE_MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, DEVICE_HEADER_BYTES as u32);
        put_u64(&mut b, 16, self.write_seq);
        put_u64(&mut b, 24, self.device_id);
        b[32..32 + self.namespace.len()].copy_from_slice(self.namespace.as_bytes());
        put_u32(&mut b, 64, self.wblock_bytes);
        put_u32(&mut b, 68, self.device_index);
        put_u32(&mut b, 72, self.n_devices);
        put_u32(&mut b, 76, flags);
        put_u64(&mut b, 80, self.device_bytes);
        put_u64(&mut b, 88, self.format_time_ms);
        put_u64(&mut b, 96, self.namespace_signature);
        let crc = crc32c::crc32c(&b[..124]);
        put_u32(&mut b, 124, crc);
        if !self.truncates.is_empty() {
            let mut at = TRUNCATE_TABLE_AT + 8;
            for t in &self.truncates {
                assert!(t.set.len() <= MAX_SET_NAME_BYTES);
                b[at] = t.set.len() as u8;
                b[at + 1..at + 1 + t.set.len()].copy_from_slice(t.set.as_bytes());
                at += 1 + t.set.len();
                put_u64(&mut b, at, t.before_ms);
                at += 8;
            }
            put_u32(&mut b, TRUNCATE_TABLE_AT, self.truncates.len() as u32);
            put_u32(&mut b, TRUNCATE_TABLE_AT + 4, (at - TRUNCATE_TABLE_AT - 8) as u32);
            let crc = crc32c::crc32c(&b[TRUNCATE_TABLE_AT..at]);
            put_u32(&mut b, TRUNCATE_CRC_AT, crc);
        }
        b
    }

    /// Parse the truncate table of a header sector whose flags say it has one.
    fn decode_truncates(b: &[u8]) -> Result<Vec<TruncateEntry>, FormatError> {
        if b.len() < HEADER_COPY_STRIDE as usize {
            return Err(FormatError::Truncated { need: HEADER_COPY_STRIDE as usize, have: b.len() });
        }
        let count = get_u32(b, TRUNCATE_TABLE_AT) as usize;
        let len = get_u32(b, TRUNCATE_TABLE_AT + 4) as usize;
        if len > TRUNCATE_TABLE_BYTES {
            return Err(FormatError::Malformed("truncate table longer than its space"));
        }
        let end = TRUNCATE_TABLE_AT + 8 + len;
        let stored = get_u32(b, TRUNCATE_CRC_AT);
        let computed = crc32c::crc32c(&b[TRUNCATE_TABLE_AT..end]);
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }
        let mut out = Vec::with_capacity(count.min(len));
        let mut at = TRUNCATE_TABLE_AT + 8;
        for _ in 0..count {
            let n = *b.get(at).ok_or(FormatError::Malformed("truncate table entry past its end"))? as usize;
            if n > MAX_SET_NAME_BYTES || at + 1 + n + 8 > end {
                return Err(FormatError::Malformed("truncate table entry past its end"));
            }
            let set = std::str::from_utf8(&b[at + 1..at + 1 + n])
                .map_err(|_| FormatError::Malformed("truncated set name is not UTF-8"))?
                .to_string();
            at += 1 + n;
            out.push(TruncateEntry { set, before_ms: get_u64(b, at) });
            at += 8;
        }
        if at != end {
            return Err(FormatError::Malformed("truncate table length disagrees with its entries"));
        }
        Ok(out)
    }

    pub fn decode(b: &[u8]) -> Result<DeviceHeader, FormatError> {
        if b.len() < DEVICE_HEADER_BYTES {
            return Err(FormatError::Truncated { need: DEVICE_HEADER_BYTES, have: b.len() });
        }
        if b[0..8] != DEVICE_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::Version { found: version, supported: FORMAT_VERSION });
        }
        let stored = get_u32(b, 124);
        let computed = crc32c::crc32c(&b[..124]);
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }
        let ns_raw = &b[32..64];
        let ns_len = ns_raw.iter().position(|&c| c == 0).unwrap_or(NS_NAME_BYTES);
        let namespace = std::str::from_utf8(&ns_raw[..ns_len])
            .map_err(|_| FormatError::Malformed("namespace is not UTF-8"))?
            .to_string();
        let flags = get_u32(b, 76);
        let truncates = if flags & HEADER_FLAG_TRUNCATES != 0 { Self::decode_truncates(b)? } else { Vec::new() };
        Ok(DeviceHeader {
            write_seq: get_u64(b, 16),
            device_id: get_u64(b, 24),
            namespace,
            wblock_bytes: get_u32(b, 64),
            device_index: get_u32(b, 68),
            n_devices: get_u32(b, 72),
            // The table bit is derived from `truncates` on the way out.
            flags: flags & !HEADER_FLAG_TRUNCATES,
            device_bytes: get_u64(b, 80),
            format_time_ms: get_u64(b, 88),
            namespace_signature: get_u64(b, 96),
            truncates,
        })
    }
}

pub fn max_namespace_bytes() -> usize {
    NS_NAME_BYTES
}

// ---------------------------------------------------------------- wblock header

pub const WBLOCK_MAGIC: [u8; 4] = *b"FSWB";
pub const WBLOCK_HEADER_BYTES: usize = 48;
pub const MIN_WBLOCK_BYTES: u32 = 128 * 1024;
pub const MAX_WBLOCK_BYTES: u32 = 8 * 1024 * 1024;
/// Records are aligned to, and padded to a multiple of, this many bytes.
pub const RECORD_ALIGN: usize = 16;

const _: () = assert!(WBLOCK_HEADER_BYTES.is_multiple_of(RECORD_ALIGN));
const _: () = assert!(MIN_WBLOCK_BYTES.is_multiple_of(4096) && MIN_WBLOCK_BYTES.is_power_of_two());

/// Header at the start of every written wblock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WblockHeader {
    pub shard: u16,
    pub wblock_seq: u64,
    pub wblock_id: u32,
    pub device_index: u32,
    /// The device header's `device_id`: wblocks left over from an earlier format of the
    /// device carry another value and are ignored.
    pub device_id: u64,
}

impl WblockHeader {
    pub fn encode(&self) -> [u8; WBLOCK_HEADER_BYTES] {
        let mut b = [0u8; WBLOCK_HEADER_BYTES];
        b[0..4].copy_from_slice(&WBLOCK_MAGIC);
        put_u16(&mut b, 4, FORMAT_VERSION as u16);
        put_u16(&mut b, 6, self.shard);
        put_u64(&mut b, 8, self.wblock_seq);
        put_u32(&mut b, 16, self.wblock_id);
        put_u32(&mut b, 20, self.device_index);
        put_u64(&mut b, 24, self.device_id);
        let crc = crc32c::crc32c(&b[..44]);
        put_u32(&mut b, 44, crc);
        b
    }

    pub fn decode(b: &[u8]) -> Result<WblockHeader, FormatError> {
        if b.len() < WBLOCK_HEADER_BYTES {
            return Err(FormatError::Truncated { need: WBLOCK_HEADER_BYTES, have: b.len() });
        }
        if b[0..4] != WBLOCK_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = get_u16(b, 4) as u32;
        if version != FORMAT_VERSION {
            return Err(FormatError::Version { found: version, supported: FORMAT_VERSION });
        }
        let stored = get_u32(b, 44);
        let computed = crc32c::crc32c(&b[..44]);
        if stored != computed {
            return Err(FormatError::Checksum { stored, computed });
        }
        Ok(WblockHeader {
            shard: get_u16(b, 6),
            wblock_seq: get_u64(b, 8),
            wblock_id: get_u32(b, 16),
            device_index: get_u32(b, 20),
            device_id: get_u64(b, 24),
        })
    }
}

// ---------------------------------------------------------------- records

pub const RECORD_MAGIC: [u8; 4] = *b"FSRC";
pub const RECORD_HEADER_BYTES: usize = 72;
pub const REC_FLAG_TOMBSTONE: u8 = 0x1;
pub const REC_FLAG_HAS_KEY: u8 = 0x2;

const _: () = assert!(RECORD_HEADER_BYTES.is_multiple_of(8));

/// Where a record sits; its checksum is bound to all four values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordLoc {
    /// The device header's random `device_id` (records of an earlier format never verify).
    pub device_id: u64,
    pub device_index: u32,
    pub wblock_id: u32,
    pub wblock_seq: u64,
    /// Byte offset of the record inside its wblock.
    pub offset: u32,
}

impl std::fmt::Display for RecordLoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "device {} wblock {} (seq {}) offset {}",
            self.device_index, self.wblock_id, self.wblock_seq, self.offset
        )
    }
}

/// Record metadata, everything in the fixed header but the length and checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordMeta {
    pub digest: Digest,
    pub generation: u16,
    /// Expiry in seconds since the Citrusleaf epoch; 0 = never.
    pub void_time: u32,
    pub last_update_ms: u64,
    /// Ordering sequence: among copies of one digest, the largest is the current version.
    pub seq: u64,
    pub tombstone: bool,
}

/// A decoded record.
#[derive(Clone, Debug, PartialEq)]
pub struct RecordBody {
    pub meta: RecordMeta,
    pub set: String,
    /// The KEY field as the client sent it (particle type byte + value), when stored.
    pub key: Option<Vec<u8>>,
    pub bins: Vec<Bin>,
}

/// Stored size of a record (header + variable part), before padding.
pub fn record_len(set: &str, key: Option<&[u8]>, bins: &[Bin]) -> usize {
    RECORD_HEADER_BYTES
        + set.len()
        + key.map_or(0, |k| k.len())
        + bins.iter().map(|b| 1 + b.name.len() + 1 + 4 + b.value.encoded_len()).sum::<usize>()
}

pub fn padded(len: usize) -> usize {
    len.div_ceil(RECORD_ALIGN) * RECORD_ALIGN
}

/// Append a record, padded to `RECORD_ALIGN`, to `out`; its checksum is filled in by
/// [`bind_record`] once the location is known. Returns the padded length.
pub fn encode_record(meta: &RecordMeta, set: &str, key: Option<&[u8]>, bins: &[Bin], out: &mut Vec<u8>) -> usize {
    assert!(set.len() <= MAX_SET_NAME_BYTES);
    assert!(bins.len() <= u16::MAX as usize);
    assert!(!meta.tombstone || bins.is_empty());
    let start = out.len();
    let len = record_len(set, key, bins);
    assert!(len <= u32::MAX as usize);
    let mut flags = 0;
    if meta.tombstone {
        flags |= REC_FLAG_TOMBSTONE;
    }
    if key.is_some() {
        flags |= REC_FLAG_HAS_KEY;
    }
    let mut h = [0u8; RECORD_HEADER_BYTES];
    h[0..4].copy_from_slice(&RECORD_MAGIC);
    put_u32(&mut h, 4, len as u32);
    h[12] = flags;
    h[13] = set.len() as u8;
    put_u16(&mut h, 14, bins.len() as u16);
    put_u64(&mut h, 24, meta.seq);
    h[32..52].copy_from_slice(&meta.digest.0);
    put_u16(&mut h, 52, meta.generation);
    put_u16(&mut h, 54, key.map_or(0, |k| k.len()) as u16);
    put_u32(&mut h, 56, meta.void_time);
    put_u64(&mut h, 64, meta.last_update_ms);
    out.extend_from_slice(&h);
    out.extend_from_slice(set.as_bytes());
    if let Some(k) = key {
        assert!(k.len() <= u16::MAX as usize);
        out.extend_from_slice(k);
    }
    for bin in bins {
        assert!(bin.name.len() <= MAX_BIN_NAME_BYTES);
        out.push(bin.name.len() as u8);
        out.extend_from_slice(bin.name.as_bytes());
        out.push(bin.value.particle_type());
        out.extend_from_slice(&(bin.value.encoded_len() as u32).to_le_bytes());
        bin.value.encode_into(out);
    }
    debug_assert_eq!(out.len() - start, len);
    let plen = padded(len);
    out.resize(start + plen, 0);
    plen
}

fn record_crc(rec: &[u8], len: usize, loc: &RecordLoc) -> u32 {
    let mut l = [0u8; 28];
    put_u64(&mut l, 0, loc.device_id);
    put_u32(&mut l, 8, loc.device_index);
    put_u32(&mut l, 12, loc.wblock_id);
    put_u64(&mut l, 16, loc.wblock_seq);
    put_u32(&mut l, 24, loc.offset);
    let c = crc32c::crc32c(&l);
    crc32c::crc32c_append(c, &rec[12..len])
}

/// Stamp the location into an encoded record: its wblock sequence and its checksum.
pub fn bind_record(rec: &mut [u8], loc: &RecordLoc) {
    let len = get_u32(rec, 4) as usize;
    assert!(len >= RECORD_HEADER_BYTES && len <= rec.len());
    put_u64(rec, 16, loc.wblock_seq);
    let crc = record_crc(rec, len, loc);
    put_u32(rec, 8, crc);
}

/// Read the fixed part of a record found at `loc` without trusting it: magic and a plausible
/// length (at most `max_len`), then the checksum over the whole record. Returns the metadata
/// and the unpadded length.
pub fn verify_record(b: &[u8], loc: &RecordLoc, max_len: usize) -> Result<(RecordMeta, usize), FormatError> {
    if b.len() < RECORD_HEADER_BYTES {
        return Err(FormatError::Truncated { need: RECORD_HEADER_BYTES, have: b.len() });
    }
    if b[0..4] != RECORD_MAGIC {
        return Err(FormatError::BadMagic);
    }
    let len = get_u32(b, 4) as usize;
    if len < RECORD_HEADER_BYTES || len > max_len {
        return Err(FormatError::Length { len, max: max_len });
    }
    if len > b.len() {
        return Err(FormatError::Truncated { need: len, have: b.len() });
    }
    let stored_seq = get_u64(b, 16);
    let stored = get_u32(b, 8);
    let computed = record_crc(b, len, loc);
    if stored != computed {
        if stored_seq != loc.wblock_seq {
            let claimed = RecordLoc { wblock_seq: stored_seq, ..*loc };
            if record_crc(b, len, &claimed) == stored {
                return Err(FormatError::Location { claimed: claimed.to_string(), actual: loc.to_string() });
            }
        }
        return Err(FormatError::Checksum { stored, computed });
    }
    let flags = b[12];
    let mut d = [0u8; 20];
    d.copy_from_slice(&b[32..52]);
    Ok((
        RecordMeta {
            digest: Digest(d),
            generation: get_u16(b, 52),
            void_time: get_u32(b, 56),
            last_update_ms: get_u64(b, 64),
            seq: get_u64(b, 24),
            tombstone: flags & REC_FLAG_TOMBSTONE != 0,
        },
        len,
    ))
}

/// Whether an encoded record is a tombstone (header flag; not verified).
/// The set name bytes of a verified record starting at `b[0]` (empty when it has none).
pub fn record_set(b: &[u8]) -> &[u8] {
    let n = b.get(13).copied().unwrap_or(0) as usize;
    b.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + n).unwrap_or(&[])
}

pub fn is_tombstone(b: &[u8]) -> bool {
    b[12] & REC_FLAG_TOMBSTONE != 0
}

/// The ordering sequence of an encoded record (not verified).
pub fn record_seq(b: &[u8]) -> u64 {
    get_u64(b, 24)
}

/// The wblock sequence a record claims (checksum not verified).
pub fn claimed_wblock_seq(b: &[u8]) -> u64 {
    get_u64(b, 16)
}

/// Verify and fully decode a record found at `loc`.
pub fn decode_record(b: &[u8], loc: &RecordLoc, max_len: usize) -> Result<RecordBody, FormatError> {
    let (meta, len) = verify_record(b, loc, max_len)?;
    let b = &b[..len];
    let flags = b[12];
    let set_len = b[13] as usize;
    let n_bins = get_u16(b, 14) as usize;
    let key_len = get_u16(b, 54) as usize;
    let mut p = RECORD_HEADER_BYTES;
    let take = |p: &mut usize, n: usize| -> Result<&[u8], FormatError> {
        let s = b.get(*p..*p + n).ok_or(FormatError::Malformed("record body overruns its length"))?;
        *p += n;
        Ok(s)
    };
    let set = std::str::from_utf8(take(&mut p, set_len)?)
        .map_err(|_| FormatError::Malformed("set name is not UTF-8"))?
        .to_string();
    let key = if flags & REC_FLAG_HAS_KEY != 0 { Some(take(&mut p, key_len)?.to_vec()) } else { None };
    let mut bins = Vec::with_capacity(n_bins.min(1024));
    for _ in 0..n_bins {
        let nl = take(&mut p, 1)?[0] as usize;
        let name = std::str::from_utf8(take(&mut p, nl)?)
            .map_err(|_| FormatError::Malformed("bin name is not UTF-8"))?
            .to_string();
        let t = take(&mut p, 1)?[0];
        let vl = get_u32(take(&mut p, 4)?, 0) as usize;
        let v = Value::decode(t, take(&mut p, vl)?).ok_or(FormatError::Malformed("bad particle"))?;
        bins.push(Bin { name, value: v });
    }
    if p != len {
        return Err(FormatError::Malformed("record has trailing bytes"));
    }
    Ok(RecordBody { meta, set, key, bins })
}

// ---------------------------------------------------------------- little-endian helpers

pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
pub fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("2 bytes"))
}
pub fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> RecordMeta {
        RecordMeta {
            digest: Digest([7; 20]),
            generation: 3,
            void_time: 99,
            last_update_ms: 12345,
            seq: 42,
            tombstone: false,
        }
    }

    fn loc() -> RecordLoc {
        RecordLoc { device_id: 3, device_index: 0, wblock_id: 5, wblock_seq: 9, offset: 48 }
    }

    #[test]
    fn record_round_trips_and_is_bound_to_its_location() {
        let bins = vec![Bin::new("a", Value::Int(1)), Bin::new("s", Value::Str(b"xyz".to_vec()))];
        let mut out = Vec::new();
        let n = encode_record(&meta(), "demo", Some(&[3, b'k']), &bins, &mut out);
        assert_eq!(n % RECORD_ALIGN, 0);
        assert_eq!(n, out.len());
        bind_record(&mut out, &loc());
        let rec = decode_record(&out, &loc(), 1 << 20).unwrap();
        assert_eq!(rec.meta, meta());
        assert_eq!(rec.set, "demo");
        assert_eq!(rec.key.as_deref(), Some(&[3, b'k'][..]));
        assert_eq!(rec.bins, bins);
        // Any other location fails.
        for other in [
            RecordLoc { offset: 64, ..loc() },
            RecordLoc { device_id: 4, ..loc() },
            RecordLoc { wblock_id: 6, ..loc() },
            RecordLoc { device_index: 1, ..loc() },
        ] {
            assert!(matches!(verify_record(&out, &other, 1 << 20), Err(FormatError::Checksum { .. })));
        }
        // A stale copy (earlier use of the wblock) is reported as such.
        let newer = RecordLoc { wblock_seq: 10, ..loc() };
        assert!(matches!(verify_record(&out, &newer, 1 << 20), Err(FormatError::Location { .. })));
    }

    #[test]
    fn every_bit_flip_is_detected() {
        let bins = vec![Bin::new("b", Value::Blob(vec![1, 2, 3, 4]))];
        let mut out = Vec::new();
        encode_record(&meta(), "", None, &bins, &mut out);
        bind_record(&mut out, &loc());
        let len = record_len("", None, &bins);
        for byte in 0..len {
            for bit in 0..8 {
                let mut c = out.clone();
                c[byte] ^= 1 << bit;
                assert!(decode_record(&c, &loc(), 1 << 20).is_err(), "flip at {byte}:{bit}");
            }
        }
    }

    #[test]
    fn headers_round_trip_and_reject_damage() {
        let h = DeviceHeader {
            write_seq: 2,
            device_id: 77,
            namespace: "test".into(),
            wblock_bytes: 1 << 20,
            device_index: 0,
            n_devices: 1,
            flags: HEADER_FLAG_CLEAN,
            device_bytes: 64 << 20,
            format_time_ms: 5,
            namespace_signature: 11,
            truncates: Vec::new(),
        };
        let mut b = h.encode();
        assert_eq!(b.len(), HEADER_COPY_STRIDE as usize);
        assert_eq!(DeviceHeader::decode(&b).unwrap(), h);
        b[40] ^= 1;
        assert!(matches!(DeviceHeader::decode(&b), Err(FormatError::Checksum { .. })));
        // With a truncate table: round trip, and damage to the table is caught by its CRC.
        let t = DeviceHeader {
            truncates: vec![
                TruncateEntry { set: String::new(), before_ms: 1 },
                TruncateEntry { set: "demo".into(), before_ms: 1 << 40 },
            ],
            ..h.clone()
        };
        let mut b = t.encode();
        assert_eq!(DeviceHeader::decode(&b).unwrap(), t);
        b[DEVICE_HEADER_BYTES + 10] ^= 1;
        assert!(matches!(DeviceHeader::decode(&b), Err(FormatError::Checksum { .. })));
        // The table's capacity: 63-byte names, as many as fit.
        let long = TruncateEntry { set: "s".repeat(MAX_SET_NAME_BYTES), before_ms: 9 };
        let n = TRUNCATE_TABLE_BYTES / long.encoded_len();
        let full = DeviceHeader { truncates: vec![long.clone(); n], ..h.clone() };
        assert!(DeviceHeader::truncates_fit(&full.truncates));
        assert_eq!(DeviceHeader::decode(&full.encode()).unwrap(), full);
        assert!(!DeviceHeader::truncates_fit(&vec![long; n + 1]));
        let w = WblockHeader { shard: 1, wblock_seq: 3, wblock_id: 4, device_index: 0, device_id: 8 };
        let mut b = w.encode();
        assert_eq!(WblockHeader::decode(&b).unwrap(), w);
        b[9] ^= 1;
        assert!(WblockHeader::decode(&b).is_err());
    }
}
