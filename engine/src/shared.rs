//! State shared by the shards of one namespace: per-wblock live bytes and write sequences
//! (atomics, because after a shard-count change a record may live in a wblock owned by
//! another shard), the global wblock sequence, and statistics.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::config::EngineConfig;
use crate::format::{DeviceHeader, RecordLoc};
use crate::io::DeviceInfo;

pub(crate) struct DevShared {
    pub info: DeviceInfo,
    pub header: DeviceHeader,
    /// Wblocks on the device including wblock 0 (the header block, never used for data).
    pub n_wblocks: u32,
    /// Live bytes per wblock (records and tombstones the index points at).
    pub live: Box<[AtomicU32]>,
    /// Write sequence of each wblock's current contents (0 = never written).
    pub seq: Box<[AtomicU64]>,
}

pub(crate) struct Shared {
    pub cfg: EngineConfig,
    pub devs: Vec<DevShared>,
    pub n_shards: usize,
    pub next_wblock_seq: AtomicU64,
    pub stats: Vec<ShardStats>,
}

impl Shared {
    pub fn wblock_bytes(&self) -> u64 {
        self.cfg.wblock_bytes as u64
    }

    /// The shard that owns (allocates and frees) data wblock `w`.
    pub fn wblock_owner(&self, w: u32) -> usize {
        debug_assert!(w >= 1);
        (w as usize - 1) % self.n_shards
    }

    pub fn shard_of_partition(&self, pid: u16) -> usize {
        pid as usize % self.n_shards
    }

    /// The device a digest's records are written to (Aerospike uses digest bytes 8..12 too).
    pub fn device_of(&self, d: &crate::types::Digest) -> u32 {
        u32::from_le_bytes(d.0[8..12].try_into().expect("4 bytes")) % self.devs.len() as u32
    }

    pub fn record_loc(&self, dev: u32, offset: u64) -> RecordLoc {
        let d = &self.devs[dev as usize];
        let w = (offset / self.wblock_bytes()) as u32;
        RecordLoc {
            device_id: d.header.device_id,
            device_index: dev,
            wblock_id: w,
            wblock_seq: d.seq[w as usize].load(Relaxed),
            offset: (offset % self.wblock_bytes()) as u32,
        }
    }

    pub fn add_live(&self, dev: u32, w: u32, bytes: u32) {
        self.devs[dev as usize].live[w as usize].fetch_add(bytes, Relaxed);
    }

    /// Subtract; returns the new value.
    pub fn sub_live(&self, dev: u32, w: u32, bytes: u32) -> u32 {
        let prev = self.devs[dev as usize].live[w as usize].fetch_sub(bytes, Relaxed);
        assert!(prev >= bytes, "live bytes underflow in device {dev} wblock {w}");
        prev - bytes
    }

    pub fn live(&self, dev: u32, w: u32) -> u32 {
        self.devs[dev as usize].live[w as usize].load(Relaxed)
    }
}

/// Counters of one shard. Written only by that shard (relaxed), read by anyone.
#[derive(Default)]
pub(crate) struct ShardStats {
    pub records: AtomicU64,
    pub tombstones: AtomicU64,
    pub index_bytes: AtomicU64,
    pub free_wblocks: AtomicU64,
    pub total_wblocks: AtomicU64,
    pub device_reads: AtomicU64,
    pub device_read_bytes: AtomicU64,
    pub device_writes: AtomicU64,
    pub device_write_bytes: AtomicU64,
    pub cache_hits: AtomicU64,
    pub cache_misses: AtomicU64,
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
    pub client_write_bytes: AtomicU64,
    pub write_cache_bytes: AtomicU64,
    pub read_only: AtomicBool,
    pub cold_records: AtomicU64,
    pub cold_corrupt: AtomicU64,
    pub cold_stale: AtomicU64,
    pub cold_bytes: AtomicU64,
}

/// A snapshot of the namespace's statistics.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub shards: usize,
    /// Live records (tombstones excluded).
    pub records: u64,
    pub tombstones: u64,
    pub index_bytes: u64,
    /// Index memory divided by the entries it holds.
    pub index_bytes_per_record: f64,
    pub free_wblocks: u64,
    pub total_wblocks: u64,
    pub device_reads: u64,
    pub device_read_bytes: u64,
    pub device_writes: u64,
    pub device_write_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Records that failed checksum, location or digest checks when read.
    pub read_errors: u64,
    pub write_errors: u64,
    pub client_write_bytes: u64,
    /// True when any shard latched read-only after a failed write.
    pub read_only: bool,
    /// Cold start: valid records found, damaged records skipped, stale copies ignored.
    pub cold_start_records: u64,
    pub cold_start_corrupt: u64,
    pub cold_start_stale: u64,
    pub cold_start_bytes: u64,
    /// Whether the previous shutdown was clean on every device.
    pub previous_shutdown_clean: bool,
}

impl EngineStats {
    pub(crate) fn collect(shared: &Shared, previous_clean: bool) -> EngineStats {
        let mut s =
            EngineStats { shards: shared.n_shards, previous_shutdown_clean: previous_clean, ..Default::default() };
        for st in &shared.stats {
            s.records += st.records.load(Relaxed);
            s.tombstones += st.tombstones.load(Relaxed);
            s.index_bytes += st.index_bytes.load(Relaxed);
            s.free_wblocks += st.free_wblocks.load(Relaxed);
            s.total_wblocks += st.total_wblocks.load(Relaxed);
            s.device_reads += st.device_reads.load(Relaxed);
            s.device_read_bytes += st.device_read_bytes.load(Relaxed);
            s.device_writes += st.device_writes.load(Relaxed);
            s.device_write_bytes += st.device_write_bytes.load(Relaxed);
            s.cache_hits += st.cache_hits.load(Relaxed);
            s.cache_misses += st.cache_misses.load(Relaxed);
            s.read_errors += st.read_errors.load(Relaxed);
            s.write_errors += st.write_errors.load(Relaxed);
            s.client_write_bytes += st.client_write_bytes.load(Relaxed);
            s.read_only |= st.read_only.load(Relaxed);
            s.cold_start_records += st.cold_records.load(Relaxed);
            s.cold_start_corrupt += st.cold_corrupt.load(Relaxed);
            s.cold_start_stale += st.cold_stale.load(Relaxed);
            s.cold_start_bytes += st.cold_bytes.load(Relaxed);
        }
        let entries = s.records + s.tombstones;
        s.index_bytes_per_record = if entries == 0 { 0.0 } else { s.index_bytes as f64 / entries as f64 };
        s
    }
}
