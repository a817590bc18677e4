//! State shared by the shards of one namespace: per-wblock live bytes and write sequences
//! (atomics, because after a shard-count change a record may live in a wblock owned by
//! another shard), the global wblock sequence, and statistics.

use std::collections::HashMap;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64,
    Ordering::{AcqRel, Acquire, Relaxed, SeqCst},
};
use std::sync::{Mutex, RwLock};

use crate::config::EngineConfig;
use crate::format::{DeviceHeader, RecordLoc, TruncateEntry};
use crate::io::DeviceInfo;

/// Most sets a namespace can hold (Aerospike's limit too); set ids are 1..=MAX_SETS.
pub const MAX_SETS: usize = 4095;

/// Set names numbered for the index (id 0 is "no set"). Ids live only in memory: a cold
/// start numbers the sets it finds afresh.
pub(crate) struct SetRegistry {
    inner: RwLock<SetNames>,
}

struct SetNames {
    names: Vec<String>,
    ids: HashMap<String, u16>,
}

impl SetRegistry {
    pub fn new() -> SetRegistry {
        let ids = HashMap::from([(String::new(), 0u16)]);
        SetRegistry { inner: RwLock::new(SetNames { names: vec![String::new()], ids }) }
    }

    pub fn id(&self, name: &str) -> Option<u16> {
        self.inner.read().expect("set registry lock").ids.get(name).copied()
    }

    /// The id of `name`, numbering it if new; `None` when the namespace already has
    /// `MAX_SETS` sets.
    pub fn intern(&self, name: &str) -> Option<u16> {
        if let Some(id) = self.id(name) {
            return Some(id);
        }
        let mut g = self.inner.write().expect("set registry lock");
        if let Some(&id) = g.ids.get(name) {
            return Some(id);
        }
        if g.names.len() > MAX_SETS {
            return None;
        }
        let id = g.names.len() as u16;
        g.names.push(name.to_string());
        g.ids.insert(name.to_string(), id);
        Some(id)
    }

    pub fn name(&self, id: u16) -> String {
        self.inner.read().expect("set registry lock").names.get(id as usize).cloned().unwrap_or_default()
    }

    /// Every set name, indexed by id (entry 0 is "").
    pub fn names(&self) -> Vec<String> {
        self.inner.read().expect("set registry lock").names.clone()
    }
}

/// The truncate time in force for a set: the later of the namespace-wide truncate and the
/// set's own (0 when neither exists).
pub fn truncate_cutoff(table: &[TruncateEntry], set: &str) -> u64 {
    table.iter().filter(|t| t.set.is_empty() || t.set == set).map(|t| t.before_ms).max().unwrap_or(0)
}

pub(crate) struct DevShared {
    pub info: DeviceInfo,
    pub header: DeviceHeader,
    /// Wblocks on the device including wblock 0 (the header block, never used for data).
    pub n_wblocks: u32,
    /// Live bytes per wblock (records and tombstones the index points at).
    pub live: Box<[AtomicU32]>,
    /// Write sequence of each wblock's current contents (0 = never written).
    pub seq: Box<[AtomicU64]>,
    /// Smallest ordering sequence of any data (non-tombstone) record a cold start could
    /// find in each wblock, live or not (u64::MAX: none). Kept for free wblocks until their
    /// next use is on the device. The minimum over all wblocks bounds how old any data copy
    /// on the device can be: a tombstone older than that hides nothing and can go.
    pub min_seq: Box<[AtomicU64]>,
    /// The shard that wrote each wblock's current use in this run, or `NO_WRITER` for
    /// contents from an earlier run. Ordering sequences are per shard within a run (each
    /// starts above everything on the devices), so only wblocks of the same writer, or of
    /// earlier runs, can hold older copies of a shard's records. Set when the use's first
    /// write is durable (a DSYNC write done, or the fsync after it), not when the wblock is
    /// opened: until then an earlier run's copies, of any shard's records after a change of
    /// the shard count, can still be on the device.
    pub writer: Box<[AtomicU32]>,
}

pub(crate) const NO_WRITER: u32 = u32::MAX;

pub(crate) struct Shared {
    pub cfg: EngineConfig,
    pub devs: Vec<DevShared>,
    pub n_shards: usize,
    pub next_wblock_seq: AtomicU64,
    pub stats: Vec<ShardStats>,
    pub sets: SetRegistry,
    /// Every device was formatted by this start: the cold start scan is skipped.
    pub fresh_devices: bool,
    /// Truncates in force (as persisted in the device headers).
    pub truncates: RwLock<Vec<TruncateEntry>>,
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

    /// The partitions `shard` owns.
    pub fn partitions_of(&self, shard: usize) -> impl Iterator<Item = u16> {
        (shard..crate::types::N_PARTITIONS).step_by(self.n_shards).map(|p| p as u16)
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

    /// The write sequence of the wblock holding `loc` (as [`Shared::record_loc`] has it).
    pub(crate) fn wblock_seq_at(&self, loc: &crate::index::Loc) -> u64 {
        self.devs[loc.dev as usize].seq[(loc.offset / self.wblock_bytes()) as usize].load(Relaxed)
    }

    pub fn add_live(&self, dev: u32, w: u32, bytes: u32) {
        self.devs[dev as usize].live[w as usize].fetch_add(bytes, Relaxed);
    }

    /// Subtract; returns the new value. Release (and acquire, for the shard whose own
    /// subtraction brings it to 0), paired with the acquire in `live`: whoever sees a wblock's
    /// live bytes at 0 also sees what the releasing shard did before, its
    /// `ShardStats::writes_completed` count of the write that made the bytes dead (which a
    /// scrub of the wblock waits to be durable). The same instruction as relaxed on x86.
    pub fn sub_live(&self, dev: u32, w: u32, bytes: u32) -> u32 {
        let prev = self.devs[dev as usize].live[w as usize].fetch_sub(bytes, AcqRel);
        assert!(prev >= bytes, "live bytes underflow in device {dev} wblock {w}");
        prev - bytes
    }

    /// The oldest data record sequence, in `shard`'s sequence space, that a cold start could
    /// find: over the wblocks this shard wrote in this run and those from earlier runs.
    /// (Records of a shard's partitions are only ever written by that shard.)
    pub fn data_floor(&self, shard: usize) -> u64 {
        let mut floor = u64::MAX;
        for d in &self.devs {
            for (m, w) in d.min_seq.iter().zip(d.writer.iter()) {
                let writer = w.load(Relaxed);
                if writer == shard as u32 || writer == NO_WRITER {
                    floor = floor.min(m.load(Relaxed));
                }
            }
        }
        floor
    }

    /// The oldest tombstone `shard` kept at its last expiry sweep, if it kept any.
    pub fn kept_tomb(&self, shard: usize) -> Option<u64> {
        Some(self.stats[shard].oldest_kept_tomb.load(Relaxed)).filter(|&t| t != 0 && t != u64::MAX)
    }

    /// Every shard's `ShardStats::writes_completed`, now.
    pub fn completed_writes(&self) -> Vec<u64> {
        self.stats.iter().map(|s| s.writes_completed.load(SeqCst)).collect()
    }

    /// Whether every shard's writes up to `counts` (from `completed_writes`) are durable.
    pub fn synced_through(&self, counts: &[u64]) -> bool {
        self.stats.iter().zip(counts).all(|(s, &n)| s.writes_synced.load(SeqCst) >= n)
    }

    /// Acquire: see `sub_live`.
    pub fn live(&self, dev: u32, w: u32) -> u32 {
        self.devs[dev as usize].live[w as usize].load(Acquire)
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
    pub update_reads_skipped: AtomicU64,
    /// Client writes held back until defrag won space back (instead of failing).
    pub writes_held_for_space: AtomicU64,
    pub read_errors: AtomicU64,
    pub write_errors: AtomicU64,
    pub client_write_bytes: AtomicU64,
    pub write_cache_bytes: AtomicU64,
    pub read_only: AtomicBool,
    pub cold_records: AtomicU64,
    pub cold_corrupt: AtomicU64,
    pub cold_stale: AtomicU64,
    pub cold_bytes: AtomicU64,
    pub defrag_reads: AtomicU64,
    pub defrag_read_errors: AtomicU64,
    pub defrag_outputs_sealed_early: AtomicU64,
    pub defrag_writes: AtomicU64,
    pub defrag_read_bytes: AtomicU64,
    pub defrag_write_bytes: AtomicU64,
    pub defrag_queue: AtomicU64,
    pub expired: AtomicU64,
    pub tombstones_dropped: AtomicU64,
    /// Free wblocks given an empty header so that their old records stop holding
    /// tombstones back.
    pub free_wblocks_scrubbed: AtomicU64,
    /// Wblocks reused while the writes that freed them were not durable yet: their writes
    /// waited for the fsync.
    pub wblock_reuses_held: AtomicU64,
    /// The sequence of the shard's oldest tombstone kept by its last expiry sweep (u64::MAX:
    /// none; 0: no sweep yet), for the other shards' `unblock_tombstones`.
    pub oldest_kept_tomb: AtomicU64,
    /// Device writes of the shard completed so far (numbered from 1 in completion order),
    /// published before the releases of each: a wblock freed by a release is freed after its
    /// write's number was.
    pub writes_completed: AtomicU64,
    /// Every write numbered up to this is durable (covered by a completed fsync, or written
    /// with DSYNC). A new use or a scrub of a freed wblock waits until the writes counted
    /// when it was freed are durable (`Hold`: this shard's, or every shard's for a wblock an
    /// earlier run wrote).
    pub writes_synced: AtomicU64,
    /// Someone waits for this shard's writes up to this number to be durable (another shard
    /// reusing or scrubbing an earlier run's wblock, or a flush): fsync them now rather than
    /// on the `flush-max-ms` timer.
    pub sync_wanted: AtomicU64,
    /// Wblocks of this shard whose last live bytes another shard released (after a change
    /// of the shard count, or an adoption), for it to free.
    pub emptied: Mutex<Vec<(u32, u32)>>,
    pub truncated: AtomicU64,
    pub cold_truncated: AtomicU64,
    /// Live records per set id, as of the shard's last `publish_stats`.
    pub set_records: Mutex<Vec<u64>>,
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
    /// Writes to an existing record that needed its bins and did not read them: updates that
    /// wrote every bin it had (see [`crate::binsets`]), and create-only writes or failing
    /// generation checks, which answer an error whatever the bins are.
    pub update_reads_skipped: u64,
    pub writes_held_for_space: u64,
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
    /// Free wblocks as a percentage of all data wblocks.
    pub avail_pct: f64,
    pub defrag_queue: u64,
    pub defrag_reads: u64,
    /// Wblock reads by defrag that failed (each wblock is then left alone a while).
    pub defrag_read_errors: u64,
    /// Defrag output wblocks sealed before they were full because they were opened before
    /// the wblock to be moved (copies must land in a later wblock than their source).
    pub defrag_outputs_sealed_early: u64,
    /// Output wblocks defrag has opened (each is written as it fills, and when it is sealed).
    pub defrag_writes: u64,
    pub defrag_read_bytes: u64,
    pub defrag_write_bytes: u64,
    /// Device bytes written per client byte written.
    pub write_amplification: f64,
    pub expired: u64,
    /// Records evicted (always 0: Ferrospike does not evict).
    pub evicted: u64,
    pub tombstones_dropped: u64,
    /// Free wblocks given an empty header so that their old records stop holding
    /// tombstones back.
    pub free_wblocks_scrubbed: u64,
    /// Wblocks reused while the writes that freed them were not durable yet (their writes
    /// waited for the fsync).
    pub wblock_reuses_held: u64,
    /// Records removed by truncates in this run.
    pub truncated: u64,
    /// Records a cold start ignored because a truncate covers them.
    pub cold_start_truncated: u64,
    /// Per set (those with records or a truncate), in set-name order.
    pub sets: Vec<SetStats>,
}

/// Statistics of one set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetStats {
    pub name: String,
    pub records: u64,
    /// The set's truncate time in force (ms since the Citrusleaf epoch; 0: none), the
    /// namespace-wide one included.
    pub truncate_before_ms: u64,
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
            s.update_reads_skipped += st.update_reads_skipped.load(Relaxed);
            s.writes_held_for_space += st.writes_held_for_space.load(Relaxed);
            s.read_errors += st.read_errors.load(Relaxed);
            s.write_errors += st.write_errors.load(Relaxed);
            s.client_write_bytes += st.client_write_bytes.load(Relaxed);
            s.read_only |= st.read_only.load(Relaxed);
            s.cold_start_records += st.cold_records.load(Relaxed);
            s.cold_start_corrupt += st.cold_corrupt.load(Relaxed);
            s.cold_start_stale += st.cold_stale.load(Relaxed);
            s.cold_start_bytes += st.cold_bytes.load(Relaxed);
            s.defrag_queue += st.defrag_queue.load(Relaxed);
            s.defrag_reads += st.defrag_reads.load(Relaxed);
            s.defrag_read_errors += st.defrag_read_errors.load(Relaxed);
            s.defrag_outputs_sealed_early += st.defrag_outputs_sealed_early.load(Relaxed);
            s.defrag_writes += st.defrag_writes.load(Relaxed);
            s.defrag_read_bytes += st.defrag_read_bytes.load(Relaxed);
            s.defrag_write_bytes += st.defrag_write_bytes.load(Relaxed);
            s.expired += st.expired.load(Relaxed);
            s.tombstones_dropped += st.tombstones_dropped.load(Relaxed);
            s.free_wblocks_scrubbed += st.free_wblocks_scrubbed.load(Relaxed);
            s.wblock_reuses_held += st.wblock_reuses_held.load(Relaxed);
            s.truncated += st.truncated.load(Relaxed);
            s.cold_start_truncated += st.cold_truncated.load(Relaxed);
        }
        let names = shared.sets.names();
        let mut per_set = vec![0u64; names.len()];
        for st in &shared.stats {
            for (i, n) in st.set_records.lock().expect("set stats lock").iter().enumerate() {
                if let Some(c) = per_set.get_mut(i) {
                    *c += n;
                }
            }
        }
        let truncates = shared.truncates.read().expect("truncates lock").clone();
        let mut sets: Vec<SetStats> = names
            .iter()
            .zip(&per_set)
            .skip(1)
            .map(|(name, &records)| SetStats {
                name: name.clone(),
                records,
                truncate_before_ms: truncate_cutoff(&truncates, name),
            })
            .collect();
        for t in truncates.iter().filter(|t| !t.set.is_empty()) {
            if !names.contains(&t.set) {
                sets.push(SetStats {
                    name: t.set.clone(),
                    records: 0,
                    truncate_before_ms: truncate_cutoff(&truncates, &t.set),
                });
            }
        }
        sets.sort_by(|a, b| a.name.cmp(&b.name));
        s.sets = sets;
        s.avail_pct = if s.total_wblocks == 0 { 0.0 } else { 100.0 * s.free_wblocks as f64 / s.total_wblocks as f64 };
        s.write_amplification =
            if s.client_write_bytes == 0 { 0.0 } else { s.device_write_bytes as f64 / s.client_write_bytes as f64 };
        let entries = s.records + s.tombstones;
        s.index_bytes_per_record = if entries == 0 { 0.0 } else { s.index_bytes as f64 / entries as f64 };
        s
    }
}
