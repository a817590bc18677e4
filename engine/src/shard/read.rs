//! The read path of a shard: records from memory or one aligned O_DIRECT read, verified;
//! and partition scans.

use super::*;

/// How much of a record [`Shard::prefetch_cmds`] asks for.
const PREFETCH_RECORD_BYTES: usize = 4096;

/// How many commands [`Shard::prefetch_cmds`] is given at a time: what it fetches for them
/// (at most 256 KiB, usually much less) fits in a server core's L2 cache (2 MiB here)
/// until they run.
pub(super) const PREFETCH_WINDOW: usize = 64;

impl Shard {
    // ------------------------------------------------------------------ reads

    pub(super) fn body_from_memory(&self, e: &IndexEntry) -> Option<Result<RecordBody, FormatError>> {
        let wb = self.wb();
        let w = (e.loc.offset / wb) as u32;
        let mw = self.mem.get(&(e.loc.dev, w))?;
        let (off, len) = ((e.loc.offset % wb) as usize, e.loc.size as usize);
        // Flushed bytes (every record of the post-write cache) are decoded where they lie.
        Some(match mw.buf.frozen_slice(off, len) {
            Some(bytes) => self.decode_at(bytes, e),
            None => self.decode_at(&mw.buf.read_at(off, len), e),
        })
    }

    /// Ask the CPU for the memory a batch of commands (at most [`PREFETCH_WINDOW`]) will
    /// touch, ahead of running them. A first pass asks for the heads of their partition
    /// tables; a second looks each command up in the index (the head now at hand) and, when
    /// the command will read the record ([`Shard::reads_body`]) and its bytes are in memory
    /// (an open wblock or the post-write cache), asks for up to [`PREFETCH_RECORD_BYTES`] of
    /// them. The loads of different commands overlap, where one command at a time would
    /// wait for each in turn; when the commands then run, their lookups and copies find the
    /// bytes in the caches. A hint only: nothing changes.
    pub(super) fn prefetch_cmds<'a>(&self, cmds: impl Iterator<Item = &'a Command> + Clone) {
        if cmds.clone().nth(1).is_none() {
            // One command: nothing to overlap its loads with.
            return;
        }
        for cmd in cmds.clone() {
            self.index.prefetch(&cmd.digest);
        }
        let wb = self.wb();
        for cmd in cmds {
            let Some(e) = self.index.get(&cmd.digest) else { continue };
            if !self.reads_body(cmd, &e) {
                continue;
            }
            if let Some(mw) = self.mem.get(&(e.loc.dev, (e.loc.offset / wb) as u32)) {
                // The first few KiB: a larger record streams in as it is copied.
                let len = (e.loc.size as usize).min(PREFETCH_RECORD_BYTES);
                mw.buf.prefetch((e.loc.offset % wb) as usize, len);
            }
        }
    }

    pub(super) fn decode_at(&self, bytes: &[u8], e: &IndexEntry) -> Result<RecordBody, FormatError> {
        let loc = self.shared.record_loc(e.loc.dev, e.loc.offset);
        let body = decode_record(bytes, &loc, e.loc.size as usize)?;
        if body.meta.digest != e.digest {
            return Err(FormatError::Digest);
        }
        Ok(body)
    }

    pub(super) fn issue_read(&mut self, e: IndexEntry, for_: ReadFor) {
        let align = self.shared.devs[e.loc.dev as usize].info.io_align.max(512) as u64;
        let start = e.loc.offset / align * align;
        let end = (e.loc.offset + e.loc.size as u64).div_ceil(align) * align;
        let len = (end - start) as usize;
        let buf = match self.read_pool.iter().position(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.read_pool.swap_remove(i);
                b.set_len(len);
                b
            }
            None => AlignedBuf::new(len.max(if len <= POOLED_READ_BYTES { 8192 } else { 0 })),
        };
        let mut buf = buf;
        buf.set_len(len);
        let tag = self.tag();
        self.io.push(IoRequest { tag, dev: e.loc.dev, offset: start, op: IoOp::Read { buf } });
        self.reads.insert(tag, PendingRead { entry: e, skip: (e.loc.offset - start) as usize, for_ });
    }

    pub(super) fn read_done(&mut self, p: PendingRead, c: IoCompletion) {
        let stats = &self.shared.stats[self.id];
        let IoOp::Read { buf } = c.op else { unreachable!("reads complete as reads") };
        let res: Result<RecordBody, String> = match c.result {
            Ok(_) => {
                stats.device_reads.fetch_add(1, Relaxed);
                stats.device_read_bytes.fetch_add(buf.len() as u64, Relaxed);
                self.decode_at(&buf[p.skip..p.skip + p.entry.loc.size as usize], &p.entry).map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        if buf.capacity() <= POOLED_READ_BYTES && self.read_pool.len() < 256 {
            self.read_pool.push(buf);
        }
        match p.for_ {
            // The shard latched while the read was in flight, and the record is suspect.
            ReadFor::Cmd(cmd, cb) if self.is_lost(&cmd.digest) => {
                let digest = cmd.digest;
                cb(Reply::error(ResultCode::ServerError));
                self.release_busy(digest);
            }
            ReadFor::Cmd(cmd, cb) => match res {
                Ok(body) if self.index.get(&cmd.digest).map(|n| n.loc) == Some(p.entry.loc) => {
                    let cur = current_of(body);
                    self.finish(cmd, cb, Some(cur));
                }
                // The version read is no longer the indexed one (moved by defrag, or gone with
                // a truncate or expiry while the read was in flight): start over from the
                // index rather than act on what it was.
                Ok(_) => self.start_cmd(cmd, cb),
                Err(err) => {
                    let digest = cmd.digest;
                    let moved = self.index.get(&digest).map(|n| n.loc) != Some(p.entry.loc);
                    if moved {
                        // The record was rewritten while the read was in flight and its old
                        // wblock reused: start over from the index.
                        self.start_cmd(cmd, cb);
                    } else {
                        self.record_error(&p.entry, &err);
                        cb(Reply::error(ResultCode::ServerError));
                        self.release_busy(digest);
                    }
                }
            },
            ReadFor::Scan(job, slot, with_bins) => {
                match res {
                    Ok(body) => {
                        if let Some(j) = self.scans.get_mut(&job) {
                            j.records[slot] = Some(scan_record(body, with_bins));
                        }
                    }
                    Err(err) => self.record_error(&p.entry, &err),
                }
                self.scan_progress(job, true);
            }
        }
    }

    pub(super) fn record_error(&self, e: &IndexEntry, err: &dyn std::fmt::Display) {
        self.shared.stats[self.id].read_errors.fetch_add(1, Relaxed);
        tracing::error!(
            "shard {}: record {} at device {} offset {} failed verification: {err}",
            self.id,
            e.digest.to_hex(),
            e.loc.dev,
            e.loc.offset
        );
    }

    // ------------------------------------------------------------------ scans

    pub(super) fn start_scan(&mut self, req: ScanReq, cb: ScanCallback) {
        let ScanReq { pid, set, after, max, with_bins } = req;
        if self.partition_lost(pid) {
            // A record of this partition may be listed with a version the device does not
            // hold, or missing though the device holds it (see `Shard::lost`).
            cb(ScanPage { result: ResultCode::ServerError, records: Vec::new(), done: true });
            return;
        }
        let mut entries: Vec<IndexEntry> = self
            .index
            .partition_entries(pid)
            .into_iter()
            .filter(|e| self.visible(e) && set.is_none_or(|s| e.set_id == s) && after.is_none_or(|a| e.digest > a))
            .collect();
        entries.sort_unstable_by_key(|e| e.digest);
        let done = entries.len() <= max;
        entries.truncate(max);
        let id = self.next_scan;
        self.next_scan = self.next_scan.wrapping_add(1);
        let mut job = ScanJob { pid, records: vec![None; entries.len()], remaining: 0, done, cb: Some(cb) };
        let mut to_read = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match self.body_from_memory(e) {
                Some(Ok(body)) => job.records[i] = Some(scan_record(body, with_bins)),
                Some(Err(err)) => self.record_error(e, &err),
                None => to_read.push((i, *e)),
            }
        }
        job.remaining = to_read.len();
        self.scans.insert(id, job);
        for (i, e) in to_read {
            self.issue_read(e, ReadFor::Scan(id, i, with_bins));
        }
        self.scan_progress(id, false);
    }

    /// Whether the shard is latched and a record of partition `pid` may have a latest write
    /// that is not on the device (see `Shard::lost`).
    fn partition_lost(&self, pid: u16) -> bool {
        self.read_only && (self.lost_all || self.lost_partitions.contains(&pid))
    }

    /// Account for one finished read of scan `id` (or none), and answer once all are in.
    pub(super) fn scan_progress(&mut self, id: u32, read_finished: bool) {
        let Some(j) = self.scans.get_mut(&id) else { return };
        if read_finished {
            j.remaining -= 1;
        }
        if j.remaining > 0 {
            return;
        }
        let mut j = self.scans.remove(&id).expect("present");
        let page = if self.partition_lost(j.pid) {
            // The shard latched while the page's reads were in flight: what the index said
            // when the page started may be what the device does not hold.
            ScanPage { result: ResultCode::ServerError, records: Vec::new(), done: true }
        } else {
            ScanPage { result: ResultCode::Ok, records: j.records.drain(..).flatten().collect(), done: j.done }
        };
        if let Some(cb) = j.cb.take() {
            cb(page);
        }
    }
}

pub(super) fn current_of(body: RecordBody) -> Current {
    Current { generation: body.meta.generation, void_time: body.meta.void_time, key: body.key, bins: body.bins }
}

pub(super) fn scan_record(body: RecordBody, with_bins: bool) -> ScanRecord {
    ScanRecord {
        digest: body.meta.digest,
        set: body.set,
        key: body.key,
        generation: body.meta.generation,
        void_time: body.meta.void_time,
        bins: if with_bins { body.bins } else { Vec::new() },
    }
}
