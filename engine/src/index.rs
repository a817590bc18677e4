//! The in-memory index: per partition, digest → location and metadata.
//!
//! Memory layout, chosen for ≤ 64 bytes per record including the map's own overhead:
//! entries are 48-byte packed records (set id and bin-name list included) in a chunked arena (no growth slack beyond one chunk,
//! freed slots reused through an intrusive free list), and each partition has a hash table
//! of 4-byte arena slot numbers (hashbrown: 5 bytes per bucket). The digest is already
//! uniformly distributed, so its bytes are the hash.

use crate::types::{Digest, N_PARTITIONS};
use hashbrown::HashTable;

/// Where a record lives on its namespace's devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loc {
    pub dev: u32,
    /// Byte offset on the device (a multiple of 16).
    pub offset: u64,
    /// Padded record size in bytes (a multiple of 16).
    pub size: u32,
}

pub const MAX_DEVICES: u32 = 128;
const DEV_BITS: u32 = 7;
const RBLOCK_BITS: u32 = 37;
const SIZE_BITS: u32 = 20;
const _: () = assert!(DEV_BITS + RBLOCK_BITS + SIZE_BITS == 64);
const _: () = assert!(1 << DEV_BITS == MAX_DEVICES);
/// Largest device offset the index can address (2 TiB).
pub const MAX_DEVICE_BYTES: u64 = (1u64 << RBLOCK_BITS) * 16;

impl Loc {
    fn pack(&self) -> u64 {
        debug_assert!(self.dev < MAX_DEVICES && self.offset.is_multiple_of(16) && self.size.is_multiple_of(16));
        let rblock = self.offset / 16;
        let nr = (self.size / 16) as u64;
        assert!(rblock < (1 << RBLOCK_BITS) && nr < (1 << SIZE_BITS));
        (self.dev as u64) << (RBLOCK_BITS + SIZE_BITS) | rblock << SIZE_BITS | nr
    }

    fn unpack(v: u64) -> Loc {
        Loc {
            dev: (v >> (RBLOCK_BITS + SIZE_BITS)) as u32,
            offset: ((v >> SIZE_BITS) & ((1 << RBLOCK_BITS) - 1)) * 16,
            size: ((v & ((1 << SIZE_BITS) - 1)) * 16) as u32,
        }
    }
}

/// Everything the index keeps about one record version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub digest: Digest,
    pub loc: Loc,
    /// Ordering sequence (48 bits kept).
    pub seq: u64,
    /// Last update, ms since the Citrusleaf epoch (40 bits kept).
    pub last_update_ms: u64,
    pub void_time: u32,
    pub generation: u16,
    /// The record's set, as numbered by the namespace's set registry (0: no set).
    pub set_id: u16,
    pub tombstone: bool,
    pub key_stored: bool,
    /// The record was created when the index had no entry for its digest, so no older data
    /// copy of it exists on the device (it may be dropped at expiry without a tombstone).
    pub fresh: bool,
    /// The record's bin names, as numbered by its shard's [`crate::binsets::BinSets`]
    /// (0: not known; always 0 after a cold start). Not kept on the device.
    pub binset: u8,
}

impl IndexEntry {
    /// The entry of a record found at `loc` (`fresh` false: see [`Index::upsert_marking_fresh`]).
    pub fn of_record(meta: &crate::format::RecordMeta, loc: Loc, set_id: u16, key_stored: bool) -> IndexEntry {
        IndexEntry {
            digest: meta.digest,
            loc,
            seq: seq_mask(meta.seq),
            last_update_ms: lut_mask(meta.last_update_ms),
            void_time: meta.void_time,
            generation: meta.generation,
            set_id,
            tombstone: meta.tombstone,
            key_stored,
            binset: 0,
            fresh: false,
        }
    }
}

pub const SEQ_BITS: u32 = 48;
const LUT_BITS: u32 = 40;

const F_TOMBSTONE: u8 = 0x1;
const F_KEY: u8 = 0x2;
const F_FRESH: u8 = 0x4;
const F_FREE: u8 = 0x80;

/// Packed arena slot: 48 bytes, alignment 1. `set_id` holds the set id in its low 12 bits
/// (ids are at most `MAX_SETS`, 4095) and the high 4 bits of `binset`; bits 3..=6 of
/// `flags` hold its low 4 bits.
#[derive(Clone, Copy)]
struct Slot {
    digest: [u8; 20],
    loc: [u8; 8],
    seq: [u8; 6],
    lut: [u8; 5],
    void_time: [u8; 4],
    generation: [u8; 2],
    set_id: [u8; 2],
    flags: u8,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 48);
const _: () = assert!(crate::shared::MAX_SETS <= SET_ID_MASK as usize);
const SET_ID_MASK: u16 = 0x0FFF;
const F_BINSET_SHIFT: u32 = 3;
const F_BINSET_MASK: u8 = 0x0F << F_BINSET_SHIFT;
const EMPTY_SLOT: Slot = Slot {
    digest: [0; 20],
    loc: [0; 8],
    seq: [0; 6],
    lut: [0; 5],
    void_time: [0; 4],
    generation: [0; 2],
    set_id: [0; 2],
    flags: F_FREE,
};

impl Slot {
    fn from_entry(e: &IndexEntry) -> Slot {
        let mut s = EMPTY_SLOT;
        s.digest = e.digest.0;
        s.loc = e.loc.pack().to_le_bytes();
        s.seq.copy_from_slice(&e.seq.to_le_bytes()[..6]);
        s.lut.copy_from_slice(&e.last_update_ms.to_le_bytes()[..5]);
        s.void_time = e.void_time.to_le_bytes();
        s.generation = e.generation.to_le_bytes();
        debug_assert!(e.set_id <= SET_ID_MASK, "set id {} beyond 12 bits", e.set_id);
        s.set_id = ((e.set_id & SET_ID_MASK) | (u16::from(e.binset >> 4) << 12)).to_le_bytes();
        s.flags = (e.tombstone as u8 * F_TOMBSTONE)
            | (e.key_stored as u8 * F_KEY)
            | (e.fresh as u8 * F_FRESH)
            | ((e.binset & 0x0F) << F_BINSET_SHIFT);
        s
    }

    fn to_entry(self) -> IndexEntry {
        let mut seq = [0u8; 8];
        seq[..6].copy_from_slice(&self.seq);
        let mut lut = [0u8; 8];
        lut[..5].copy_from_slice(&self.lut);
        IndexEntry {
            digest: Digest(self.digest),
            loc: Loc::unpack(u64::from_le_bytes(self.loc)),
            seq: u64::from_le_bytes(seq),
            last_update_ms: u64::from_le_bytes(lut),
            void_time: u32::from_le_bytes(self.void_time),
            generation: u16::from_le_bytes(self.generation),
            set_id: u16::from_le_bytes(self.set_id) & SET_ID_MASK,
            tombstone: self.flags & F_TOMBSTONE != 0,
            key_stored: self.flags & F_KEY != 0,
            fresh: self.flags & F_FRESH != 0,
            binset: ((u16::from_le_bytes(self.set_id) >> 12) as u8) << 4
                | (self.flags & F_BINSET_MASK) >> F_BINSET_SHIFT,
        }
    }

    fn hash(&self) -> u64 {
        Digest(self.digest).hash64()
    }
}

const CHUNK_SLOTS: usize = 4096;
const NO_FREE: u32 = u32::MAX;

/// Chunked slot storage with an intrusive free list (a free slot's `loc` holds the next).
struct Arena {
    chunks: Vec<Box<[Slot]>>,
    used: u32,
    free_head: u32,
}

impl Arena {
    fn get(&self, i: u32) -> &Slot {
        &self.chunks[i as usize / CHUNK_SLOTS][i as usize % CHUNK_SLOTS]
    }

    fn get_mut(&mut self, i: u32) -> &mut Slot {
        &mut self.chunks[i as usize / CHUNK_SLOTS][i as usize % CHUNK_SLOTS]
    }

    fn alloc(&mut self, s: Slot) -> u32 {
        if self.free_head != NO_FREE {
            let i = self.free_head;
            let next = u64::from_le_bytes(self.get(i).loc) as u32;
            debug_assert!(self.get(i).flags & F_FREE != 0);
            self.free_head = next;
            *self.get_mut(i) = s;
            return i;
        }
        let i = self.used;
        assert!(i < NO_FREE, "index arena full");
        if i as usize / CHUNK_SLOTS == self.chunks.len() {
            self.chunks.push(vec![EMPTY_SLOT; CHUNK_SLOTS].into_boxed_slice());
        }
        self.used += 1;
        *self.get_mut(i) = s;
        i
    }

    fn release(&mut self, i: u32) {
        let head = self.free_head;
        let s = self.get_mut(i);
        *s = EMPTY_SLOT;
        s.loc = (head as u64).to_le_bytes();
        self.free_head = i;
    }
}

/// One shard's index: 4096 partition tables (only owned partitions are populated).
pub struct Index {
    arena: Arena,
    parts: Vec<HashTable<u32>>,
    records: u64,
    tombstones: u64,
    /// Live (non-tombstone) entries per set id.
    set_records: Vec<u64>,
}

impl Default for Index {
    fn default() -> Self {
        Self::new()
    }
}

impl Index {
    pub fn new() -> Index {
        Index {
            arena: Arena { chunks: Vec::new(), used: 0, free_head: NO_FREE },
            parts: (0..N_PARTITIONS).map(|_| HashTable::new()).collect(),
            records: 0,
            tombstones: 0,
            set_records: Vec::new(),
        }
    }

    /// Live (non-tombstone) entries.
    pub fn records(&self) -> u64 {
        self.records
    }

    pub fn tombstones(&self) -> u64 {
        self.tombstones
    }

    /// Ask the CPU for the head of `d`'s partition table, the first of the dependent loads a
    /// [`Index::get`] makes (a hint: nothing changes).
    pub fn prefetch(&self, d: &Digest) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let p: *const HashTable<u32> = &self.parts[d.partition() as usize];
            // SAFETY: a prefetch never faults and has no architectural effect; the address is
            // that of a live element.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = d;
    }

    pub fn get(&self, d: &Digest) -> Option<IndexEntry> {
        let arena = &self.arena;
        self.parts[d.partition() as usize]
            .find(d.hash64(), |&i| arena.get(i).digest == d.0)
            .map(|&i| arena.get(i).to_entry())
    }

    /// Insert or replace the entry for `e.digest`; returns the previous one.
    pub fn upsert(&mut self, e: IndexEntry) -> Option<IndexEntry> {
        self.upsert_inner(e, false)
    }

    /// [`Index::upsert`], with `fresh` set to whether the digest had no entry (one lookup
    /// instead of a `get` before the upsert).
    pub fn upsert_marking_fresh(&mut self, e: IndexEntry) -> Option<IndexEntry> {
        self.upsert_inner(e, true)
    }

    fn upsert_inner(&mut self, mut e: IndexEntry, mark_fresh: bool) -> Option<IndexEntry> {
        let arena = &mut self.arena;
        let table = &mut self.parts[e.digest.partition() as usize];
        let hash = e.digest.hash64();
        let old = match table.find(hash, |&i| arena.get(i).digest == e.digest.0) {
            Some(&i) => {
                if mark_fresh {
                    e.fresh = false;
                }
                let old = arena.get(i).to_entry();
                *arena.get_mut(i) = Slot::from_entry(&e);
                Some(old)
            }
            None => {
                if mark_fresh {
                    e.fresh = true;
                }
                let i = arena.alloc(Slot::from_entry(&e));
                table.insert_unique(hash, i, |&j| arena.get(j).hash());
                None
            }
        };
        if let Some(o) = &old {
            self.count(o, -1);
        }
        self.count(&e, 1);
        old
    }

    pub fn remove(&mut self, d: &Digest) -> Option<IndexEntry> {
        let arena = &mut self.arena;
        let table = &mut self.parts[d.partition() as usize];
        let entry = table.find_entry(d.hash64(), |&i| arena.get(i).digest == d.0).ok()?;
        let (i, _) = entry.remove();
        let old = arena.get(i).to_entry();
        arena.release(i);
        self.count(&old, -1);
        Some(old)
    }

    fn count(&mut self, e: &IndexEntry, delta: i64) {
        let c = if e.tombstone { &mut self.tombstones } else { &mut self.records };
        *c = c.checked_add_signed(delta).expect("index counters");
        if !e.tombstone {
            let i = e.set_id as usize;
            if i >= self.set_records.len() {
                self.set_records.resize(i + 1, 0);
            }
            let c = &mut self.set_records[i];
            *c = c.checked_add_signed(delta).expect("index set counters");
        }
    }

    /// Live (non-tombstone) entries per set id (index = set id; missing ids have none).
    pub fn set_records(&self) -> &[u64] {
        &self.set_records
    }

    /// Remove and return the entries of partitions `pids` for which `doomed` holds.
    pub fn remove_where(
        &mut self,
        pids: impl Iterator<Item = u16>,
        doomed: impl Fn(&IndexEntry) -> bool,
    ) -> Vec<IndexEntry> {
        let mut out = Vec::new();
        for pid in pids {
            let gone: Vec<IndexEntry> = self.partition_entries(pid).into_iter().filter(&doomed).collect();
            for e in &gone {
                self.remove(&e.digest);
            }
            out.extend(gone);
        }
        out
    }

    /// Entries of one partition, in no particular order.
    pub fn partition_entries(&self, pid: u16) -> Vec<IndexEntry> {
        self.parts[pid as usize].iter().map(|&i| self.arena.get(i).to_entry()).collect()
    }

    pub fn partition_len(&self, pid: u16) -> usize {
        self.parts[pid as usize].len()
    }

    /// Remove and return every entry of a partition.
    pub fn drain_partition(&mut self, pid: u16) -> Vec<IndexEntry> {
        let table = std::mem::take(&mut self.parts[pid as usize]);
        let mut out = Vec::with_capacity(table.len());
        for i in table {
            let e = self.arena.get(i).to_entry();
            self.arena.release(i);
            self.count(&e, -1);
            out.push(e);
        }
        out
    }

    /// Bytes of memory held by the index (arena chunks plus hash tables).
    pub fn memory_bytes(&self) -> u64 {
        let arena = self.arena.chunks.len() * CHUNK_SLOTS * std::mem::size_of::<Slot>();
        let tables: usize = self
            .parts
            .iter()
            .map(|t| {
                let cap = t.capacity();
                if cap == 0 {
                    0
                } else {
                    // hashbrown keeps capacity = 7/8 of a power-of-two bucket count (or
                    // buckets - 1 for small tables); each bucket costs a 4-byte slot and a
                    // control byte, plus a group of trailing control bytes.
                    let buckets =
                        if cap < 8 { (cap + 1).next_power_of_two() } else { (cap * 8 / 7).next_power_of_two() };
                    buckets * 5 + 16
                }
            })
            .sum();
        (arena + tables + self.parts.capacity() * std::mem::size_of::<HashTable<u32>>()) as u64
    }
}

/// Mask a sequence to what the index keeps.
pub fn seq_mask(seq: u64) -> u64 {
    seq & ((1u64 << SEQ_BITS) - 1)
}

/// Mask a last-update time to what the index keeps.
pub fn lut_mask(ms: u64) -> u64 {
    ms & ((1u64 << LUT_BITS) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn entry(i: u64) -> IndexEntry {
        let mut d = [0u8; 20];
        d[..8].copy_from_slice(&i.to_le_bytes());
        d[8..16].copy_from_slice(&(i.wrapping_mul(0x9e3779b97f4a7c15)).to_le_bytes());
        let d = crate::types::compute_digest("s", 1, &d);
        IndexEntry {
            digest: d,
            loc: Loc { dev: (i % 3) as u32, offset: i * 16, size: 64 },
            seq: i,
            last_update_ms: i * 7,
            void_time: i as u32,
            generation: (i % 65535) as u16 + 1,
            // Set ids 0..5 and the largest, 4095, next to every bin-name list id.
            set_id: if i % 6 == 5 { 4095 } else { (i % 6) as u16 },
            tombstone: i.is_multiple_of(10),
            key_stored: i.is_multiple_of(2),
            fresh: i.is_multiple_of(3),
            binset: (i % 256) as u8,
        }
    }

    #[test]
    fn behaves_like_a_map() {
        let mut idx = Index::new();
        let mut model = std::collections::HashMap::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..50_000 {
            let i = rng.gen_range(0..5_000u64);
            match rng.gen_range(0..3) {
                0 | 1 => {
                    let mut e = entry(i);
                    e.seq = rng.gen_range(0..1 << 40);
                    assert_eq!(idx.upsert(e).map(|o| o.digest), model.insert(e.digest, e).map(|o| o.digest));
                }
                _ => {
                    let d = entry(i).digest;
                    assert_eq!(idx.remove(&d), model.remove(&d));
                }
            }
        }
        for (d, e) in &model {
            assert_eq!(idx.get(d), Some(*e));
        }
        let live = model.values().filter(|e| !e.tombstone).count() as u64;
        assert_eq!(idx.records(), live);
        assert_eq!(idx.tombstones(), model.len() as u64 - live);
        for set in (0..5u16).chain([4095]) {
            let n = model.values().filter(|e| !e.tombstone && e.set_id == set).count() as u64;
            assert_eq!(idx.set_records().get(set as usize).copied().unwrap_or(0), n);
        }
        let total: usize = (0..N_PARTITIONS as u16).map(|p| idx.partition_len(p)).sum();
        assert_eq!(total, model.len());
    }

    #[test]
    fn upsert_marking_fresh_says_whether_the_digest_was_new() {
        let mut idx = Index::new();
        let e = IndexEntry { fresh: false, ..entry(1) };
        assert!(idx.upsert_marking_fresh(e).is_none());
        assert!(idx.get(&e.digest).unwrap().fresh);
        let again = IndexEntry { fresh: true, seq: 9, ..e };
        assert!(idx.upsert_marking_fresh(again).is_some());
        assert!(!idx.get(&e.digest).unwrap().fresh);
    }

    #[test]
    fn loc_packing_round_trips_at_the_limits() {
        for l in [
            Loc { dev: 0, offset: 0, size: 16 },
            Loc { dev: 127, offset: MAX_DEVICE_BYTES - 16, size: 8 * 1024 * 1024 },
        ] {
            assert_eq!(Loc::unpack(l.pack()), l);
        }
    }

    #[test]
    fn memory_per_record_is_within_target() {
        let mut idx = Index::new();
        let n = 1_000_000u64;
        for i in 0..n {
            idx.upsert(entry(i));
        }
        let per = idx.memory_bytes() as f64 / n as f64;
        assert!(per <= 64.0, "index uses {per:.1} bytes per record");
    }
}
