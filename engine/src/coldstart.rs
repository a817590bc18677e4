//! Cold start: every shard scans its slice of wblocks on every device with whole-wblock reads
//! at queue depth, and rebuilds an index of the newest version of each digest it finds.
//!
//! A wblock's records are accepted only if they verify at the place they were found (checksum
//! bound to device, wblock, offset and wblock write sequence) and carry the wblock's current
//! write sequence: the larger of the sequence in the wblock header and the largest sequence of
//! any verified record in it (the header sector itself may have been torn away). Older
//! sequences are leftovers of an earlier use of the wblock ("stale").

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use crate::error::DeviceError;
use crate::format::{
    claimed_wblock_seq, padded, record_set, verify_record, RecordLoc, RecordMeta, WblockHeader, RECORD_HEADER_BYTES,
    RECORD_MAGIC, WBLOCK_HEADER_BYTES,
};
use crate::index::{lut_mask, Index, IndexEntry, Loc};
use crate::io::{IoBackend, IoOp, IoRequest};
use crate::shared::{truncate_cutoff, Shared};

/// What one wblock holds.
#[derive(Debug, Default)]
pub struct WblockScan {
    /// Current write sequence (0: nothing valid in it).
    pub seq: u64,
    /// Verified records of the current sequence: metadata, offset in wblock, padded length,
    /// and whether a user key is stored.
    pub records: Vec<(RecordMeta, u32, u32, bool)>,
    /// Records with a valid magic that failed verification (torn or corrupt).
    pub corrupt: u64,
    /// Verified records of an earlier use of the wblock.
    pub stale: u64,
}

/// Parse one wblock image found at (device `dev_index`, wblock `w`).
pub fn scan_wblock(buf: &[u8], device_id: u64, dev_index: u32, w: u32) -> WblockScan {
    let mut out = WblockScan::default();
    let header_seq = WblockHeader::decode(&buf[..WBLOCK_HEADER_BYTES])
        .ok()
        .filter(|h| h.device_id == device_id && h.wblock_id == w && h.device_index == dev_index)
        .map_or(0, |h| h.wblock_seq);
    let mut found = Vec::new();
    // Damaged runs: stretches of non-zero bytes that are not verified records, each with the
    // wblock sequence claimed by the bad record it starts with (None: it starts with garbage).
    let mut runs: Vec<(usize, Option<u64>)> = Vec::new();
    let mut in_run = false;
    let mut pos = WBLOCK_HEADER_BYTES;
    while pos + RECORD_HEADER_BYTES <= buf.len() {
        match walk_step(buf, pos, device_id, dev_index, w) {
            Walk::Skip(n) => pos += n,
            Walk::Record { meta, plen, has_key, claimed } => {
                found.push((meta, pos as u32, plen as u32, has_key, claimed));
                pos += plen;
                in_run = false;
            }
            Walk::Bad(claimed) => {
                if !in_run {
                    runs.push((pos, claimed));
                    in_run = true;
                }
                pos += WALK_STEP;
            }
        }
    }
    out.seq = found.iter().map(|f| f.4).max().unwrap_or(0).max(header_seq);
    let mut current_end = 0usize;
    for (meta, off, plen, has_key, claimed) in found {
        if claimed == out.seq {
            current_end = current_end.max(off as usize + plen as usize);
            out.records.push((meta, off, plen, has_key));
        } else {
            out.stale += 1;
        }
    }
    // A damaged run counts as a damaged record when it lies inside the part of the wblock
    // the current use has written (before its last good record), or starts with a record
    // that claims the current use. Non-zero bytes after the current use's last record are
    // leftovers of an earlier use, not damage.
    out.corrupt = runs.iter().filter(|(p, claimed)| *p < current_end || *claimed == Some(out.seq)).count() as u64;
    out
}

/// The step of the walk over a wblock when no verified record starts where it is.
pub(crate) const WALK_STEP: usize = 16;

/// What the walk over a wblock finds at one position.
pub(crate) enum Walk {
    /// Nothing here (zeros): move on by this many bytes.
    Skip(usize),
    /// A record that verifies at this place: its metadata, padded length, whether it stores
    /// a user key, and the wblock write sequence it claims.
    Record { meta: RecordMeta, plen: usize, has_key: bool, claimed: u64 },
    /// Non-zero bytes that are not a verified record (a torn or corrupt record when a magic
    /// starts them, with the sequence it claims); move on by [`WALK_STEP`].
    Bad(Option<u64>),
}

/// One step of the walk over wblock `w` of device `dev_index`, at `pos` (which leaves room
/// for a record header). Cold start and defrag walk the same way.
pub(crate) fn walk_step(buf: &[u8], pos: usize, device_id: u64, dev_index: u32, w: u32) -> Walk {
    if pos.is_multiple_of(4096) && buf[pos..(pos + 4096).min(buf.len())].iter().all(|&b| b == 0) {
        return Walk::Skip(4096);
    }
    let chunk = &buf[pos..pos + WALK_STEP];
    if chunk[..4] == RECORD_MAGIC {
        let claimed = claimed_wblock_seq(&buf[pos..]);
        let loc =
            RecordLoc { device_id, device_index: dev_index, wblock_id: w, wblock_seq: claimed, offset: pos as u32 };
        return match verify_record(&buf[pos..], &loc, buf.len() - pos) {
            Ok((meta, len)) => {
                let has_key = buf[pos + 12] & crate::format::REC_FLAG_HAS_KEY != 0;
                Walk::Record { meta, plen: padded(len), has_key, claimed }
            }
            Err(_) => Walk::Bad(Some(claimed)),
        };
    }
    if chunk.iter().any(|&b| b != 0) {
        Walk::Bad(None)
    } else {
        Walk::Skip(WALK_STEP)
    }
}

/// What a shard's scan produced.
pub(crate) struct SliceScan {
    pub index: Index,
    pub max_seq: u64,
}

/// Keep `e` if it is newer than what `index` has for its digest. Two copies of one write
/// (the same ordering sequence) are a record and defrag's copy of it, whose source may still
/// hold the original when it was freed and not reused: the copy in the wblock with the later
/// write sequence (`wblock_seq` of a copy's location) is current, and defrag only copies
/// into a wblock whose sequence is above its source's (`Shard::defrag_slice`). Taking the
/// original instead would count the freed source as live again, and defrag would move its
/// records once more after every restart.
pub(crate) fn keep_newest(index: &mut Index, e: IndexEntry, wblock_seq: impl Fn(&Loc) -> u64) {
    match index.get(&e.digest) {
        Some(old) if old.seq > e.seq => {}
        Some(old) if old.seq == e.seq && wblock_seq(&old.loc) >= wblock_seq(&e.loc) => {}
        _ => {
            index.upsert(e);
        }
    }
}

/// Remove the entries of `shard`'s partitions that a persisted truncate covers; returns how
/// many.
pub(crate) fn drop_truncated(index: &mut Index, shared: &Shared, shard: usize) -> u64 {
    let table = shared.truncates.read().expect("truncates lock").clone();
    if table.is_empty() {
        return 0;
    }
    let cutoffs: Vec<u64> = shared.sets.names().iter().map(|n| lut_mask(truncate_cutoff(&table, n))).collect();
    let covered = |e: &IndexEntry| e.last_update_ms < cutoffs.get(e.set_id as usize).copied().unwrap_or(0);
    index.remove_where(shared.partitions_of(shard), covered).len() as u64
}

/// Scan this shard's wblocks on every device.
pub(crate) fn scan_slice(io: &mut dyn IoBackend, shared: &Shared, shard: usize) -> Result<SliceScan, DeviceError> {
    let wb = shared.wblock_bytes();
    let qd = shared.cfg.cold_start_queue_depth.max(1);
    let stats = &shared.stats[shard];
    let mut index = Index::new();
    let mut max_seq = 0u64;
    let mut todo: Vec<(u32, u32)> = Vec::new();
    for (d, dev) in shared.devs.iter().enumerate() {
        for w in 1..dev.n_wblocks {
            if shared.wblock_owner(w) == shard {
                todo.push((d as u32, w));
            }
        }
    }
    let total_bytes = todo.len() as u64 * wb;
    let started = Instant::now();
    let mut last_log = started;
    let mut next = 0usize;
    let mut done_bytes = 0u64;
    let mut spare: Vec<crate::io::AlignedBuf> = Vec::new();
    let mut comps = Vec::new();
    // Set name → set id, so each record costs one map lookup.
    let mut sets: std::collections::HashMap<Vec<u8>, u16> = std::collections::HashMap::new();
    while next < todo.len() || io.in_flight() > 0 {
        while next < todo.len() && io.in_flight() < qd {
            let (d, w) = todo[next];
            let buf = spare.pop().unwrap_or_else(|| io.alloc(wb as usize));
            io.push(IoRequest { tag: next as u64, dev: d, offset: w as u64 * wb, op: IoOp::Read { buf } });
            next += 1;
        }
        io.submit_and_wait(true, Some(Duration::from_millis(200)))?;
        io.reap(&mut comps);
        for c in comps.drain(..) {
            let (d, w) = todo[c.tag as usize];
            let IoOp::Read { buf } = c.op else { unreachable!("cold start issues only reads") };
            c.result?;
            let dev = &shared.devs[d as usize];
            let scan = scan_wblock(&buf, dev.header.device_id, d, w);
            dev.seq[w as usize].store(scan.seq, Relaxed);
            let min_data = scan.records.iter().filter(|r| !r.0.tombstone).map(|r| r.0.seq).min().unwrap_or(u64::MAX);
            dev.min_seq[w as usize].store(min_data, Relaxed);
            stats.cold_corrupt.fetch_add(scan.corrupt, Relaxed);
            stats.cold_stale.fetch_add(scan.stale, Relaxed);
            stats.cold_records.fetch_add(scan.records.len() as u64, Relaxed);
            for (meta, off, plen, has_key) in scan.records {
                max_seq = max_seq.max(meta.seq);
                let set = record_set(&buf[off as usize..]);
                let set_id = match sets.get(set) {
                    Some(&id) => id,
                    None => {
                        let name = String::from_utf8_lossy(set).into_owned();
                        let id = shared.sets.intern(&name).unwrap_or_else(|| {
                            tracing::warn!(
                                "more than {} sets: records of set {name} counted as no set",
                                crate::shared::MAX_SETS
                            );
                            0
                        });
                        sets.insert(set.to_vec(), id);
                        id
                    }
                };
                // Truncates are applied once the newest copy of each digest is known
                // (`drop_truncated`): filtering copies here could let an older copy stand in
                // for a truncated newer one.
                let loc = Loc { dev: d, offset: w as u64 * wb + off as u64, size: plen };
                keep_newest(&mut index, IndexEntry::of_record(&meta, loc, set_id, has_key), |l| {
                    shared.wblock_seq_at(l)
                });
            }
            spare.push(buf);
            done_bytes += wb;
            stats.cold_bytes.fetch_add(wb, Relaxed);
        }
        if last_log.elapsed() >= Duration::from_secs(2) {
            last_log = Instant::now();
            let secs = started.elapsed().as_secs_f64();
            tracing::info!(
                "shard {shard}: cold start scanned {} of {} MiB ({:.0} MiB/s), {} records",
                done_bytes >> 20,
                total_bytes >> 20,
                (done_bytes >> 20) as f64 / secs,
                index.records() + index.tombstones()
            );
        }
    }
    for b in spare {
        io.free(b);
    }
    let secs = started.elapsed().as_secs_f64().max(1e-6);
    tracing::info!(
        "shard {shard}: cold start scanned {} MiB in {:.2}s ({:.0} MiB/s): {} entries, {} damaged records skipped, {} stale copies ignored",
        done_bytes >> 20,
        secs,
        (done_bytes >> 20) as f64 / secs,
        index.records() + index.tombstones(),
        stats.cold_corrupt.load(Relaxed),
        stats.cold_stale.load(Relaxed)
    );
    Ok(SliceScan { index, max_seq })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{bind_record, encode_record};
    use crate::types::{Bin, Digest, Value};

    fn image(seq: u64, records: &[(u8, u64)], wb: usize) -> Vec<u8> {
        let mut buf = vec![0u8; wb];
        let h = WblockHeader { shard: 0, wblock_seq: seq, wblock_id: 3, device_index: 0, device_id: 9 };
        buf[..WBLOCK_HEADER_BYTES].copy_from_slice(&h.encode());
        let mut pos = WBLOCK_HEADER_BYTES;
        for &(d, rseq) in records {
            let meta = RecordMeta {
                digest: Digest([d; 20]),
                generation: 1,
                void_time: 0,
                last_update_ms: 0,
                seq: rseq,
                tombstone: false,
            };
            let mut r = Vec::new();
            encode_record(&meta, "s", None, &[Bin::new("b", Value::Blob(vec![d; 5000]))], &mut r);
            bind_record(
                &mut r,
                &RecordLoc { device_id: 9, device_index: 0, wblock_id: 3, wblock_seq: seq, offset: pos as u32 },
            );
            buf[pos..pos + r.len()].copy_from_slice(&r);
            pos += r.len();
        }
        buf
    }

    #[test]
    fn finds_records_and_skips_torn_ones() {
        let wb = 128 * 1024;
        let mut buf = image(5, &[(1, 10), (2, 11), (3, 12)], wb);
        let s = scan_wblock(&buf, 9, 0, 3);
        assert_eq!((s.seq, s.records.len(), s.corrupt, s.stale), (5, 3, 0, 0));
        // Tear the second 4 KiB page (inside record 1 and 2).
        buf[4096..8192].fill(0);
        let s = scan_wblock(&buf, 9, 0, 3);
        let digests: Vec<u8> = s.records.iter().map(|r| r.0.digest.0[0]).collect();
        assert_eq!(digests, vec![3]);
        assert_eq!(s.corrupt, 1, "records 1 and 2 form one damaged stretch");
        // Wrong device id: nothing verifies.
        let s = scan_wblock(&image(5, &[(1, 10)], wb), 8, 0, 3);
        assert!(s.records.is_empty());
    }

    #[test]
    fn older_uses_of_a_wblock_are_stale() {
        let wb = 128 * 1024;
        let old = image(4, &[(1, 10), (2, 11), (3, 12)], wb);
        let new = image(7, &[(9, 20)], wb);
        // The new use wrote only its first two pages; the rest still holds the old use.
        let mut buf = old.clone();
        buf[..8192].copy_from_slice(&new[..8192]);
        let s = scan_wblock(&buf, 9, 0, 3);
        assert_eq!(s.seq, 7);
        assert_eq!(s.records.len(), 1);
        assert_eq!(s.records[0].0.digest.0[0], 9);
        assert!(s.stale >= 1);
        // The header page torn away, but the new record survived elsewhere: the record's own
        // sequence still identifies the current use.
        let mut buf = old;
        let first_rec_end = WBLOCK_HEADER_BYTES + 5200;
        buf[WBLOCK_HEADER_BYTES..first_rec_end].copy_from_slice(&new[WBLOCK_HEADER_BYTES..first_rec_end]);
        let s = scan_wblock(&buf, 9, 0, 3);
        assert_eq!(s.seq, 7);
        assert!(s.records.iter().all(|r| r.0.digest.0[0] == 9));
    }
}
