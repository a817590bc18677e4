//! The write path of a shard: appending records to open wblocks, flushing (group commit),
//! timers, space (live bytes, freeing, the post-write cache) and I/O completions.

use super::*;
use std::sync::atomic::Ordering::SeqCst;

/// An fsync in flight: its device, the number of the first write it makes durable (it
/// covers every write completed on the device from that one until it was sent), the client
/// records whose writes it makes durable, whether some were too many to list
/// (`unsynced_overflow`), and the wblock uses whose first writes it makes durable
/// (`unsettled`).
pub(super) struct FsyncInFlight {
    dev: u32,
    first: u64,
    digests: Vec<Digest>,
    overflow: bool,
    firsts: Vec<Unsettled>,
}

/// The mark, in `Shard::freed_at`, of an earlier run's wblock: the rest is the id of the
/// snapshot of every shard's counts its reuse waits for.
pub(super) const ALL_SNAPSHOT: u64 = 1 << 63;

/// What the writes of a reused wblock wait for: the writes that freed it (released the
/// last of its live bytes) to be durable. Without DSYNC a write completes before it is
/// durable; had the new use's first write landed (a DSYNC write, or a device persisting its
/// cache out of order) and the power failed before the fsync, both the old copies here and
/// the newer ones that replaced them would be gone.
#[derive(Clone)]
pub(super) enum Hold {
    /// This shard's writes up to this number (`writes_completed` when it was freed).
    Own(u64),
    /// Every shard's writes up to these numbers, as of when the wblock was freed (an
    /// earlier run's wblock: any shard may have released its records).
    All(Vec<u64>),
}

/// A write of a reused wblock waiting for its `Hold` (`Shard::deferred`).
pub(super) struct Deferred {
    tag: u64,
    req: IoRequest,
    info: WriteInfo,
    hold: Hold,
}

/// A wblock use whose first write completed without DSYNC, waiting for an fsync to let go
/// of the previous use (`Shard::settle`): the wblock, the use's write sequence, and the
/// smallest data record sequence of the use known when it left memory.
pub(super) struct Unsettled {
    pub w: u32,
    pub wseq: u64,
    pub min: u64,
}

impl Shard {
    /// Put an encoded record into the open wblock of `dev`'s `stream`; returns its location.
    pub(super) fn append(&mut self, dev: u32, stream: usize, rec: &mut [u8]) -> Result<Loc, ResultCode> {
        let wb = self.wb() as usize;
        let s = slot(dev, stream);
        let fits = |o: &OpenWb| o.pos + rec.len() <= wb;
        if self.open[s].as_ref().is_some_and(|o| !fits(o)) {
            self.seal(s);
        }
        if self.open[s].is_none() {
            self.open_wblock(dev, stream, crate::format::is_tombstone(rec))?;
        }
        let o = self.open[s].as_mut().expect("opened above");
        let off = o.pos;
        let loc = self.shared.record_loc(dev, o.w as u64 * wb as u64 + off as u64);
        bind_record(rec, &loc);
        o.buf.write_at(off, rec);
        o.pos += rec.len();
        o.first_unflushed.get_or_insert_with(Instant::now);
        self.shared.add_live(dev, o.w, rec.len() as u32);
        if !crate::format::is_tombstone(rec) {
            let seq = crate::format::record_seq(rec);
            let mw = self.mem.get_mut(&(dev, o.w)).expect("open wblock is in memory");
            mw.use_min_seq = mw.use_min_seq.min(seq);
            self.shared.devs[dev as usize].min_seq[o.w as usize].fetch_min(seq, Relaxed);
        }
        Ok(Loc { dev, offset: o.w as u64 * wb as u64 + off as u64, size: rec.len() as u32 })
    }

    pub(super) fn open_wblock(&mut self, dev: u32, stream: usize, tombstone: bool) -> Result<(), ResultCode> {
        // The last few free wblocks are kept for defrag (and deletes), so space can always be
        // won back.
        if stream == CLIENT && !tombstone && self.free[dev as usize].len() <= self.reserve_wblocks {
            return Err(ResultCode::OutOfSpace);
        }
        let w = loop {
            let w = self.free[dev as usize].pop_front().ok_or(ResultCode::OutOfSpace)?;
            if self.wstate[dev as usize][w as usize] == WState::Free {
                break w;
            }
            // Its empty header is being written: the completion puts it back on the list.
            self.scrub_popped.insert((dev, w));
            self.shared.stats[self.id].free_wblocks.fetch_sub(1, Relaxed);
        };
        if self.hold_for(dev, w).is_some() {
            self.shared.stats[self.id].wblock_reuses_held.fetch_add(1, Relaxed);
        }
        // `writer` stays as it is until this use's first write is durable: copies an earlier
        // run left here (of any shard's records, should the shard count have changed) are
        // on the device until then, and every shard's floor must go on counting them.
        let header = self.begin_use(dev, w);
        let buf = Rc::new(WBuf::new(self.io.alloc(self.wb() as usize)));
        buf.write_at(0, &header);
        self.mem.insert((dev, w), MemWb { buf: buf.clone(), inflight: 0, sealed: false, use_min_seq: u64::MAX });
        self.wstate[dev as usize][w as usize] = WState::Open;
        self.open[slot(dev, stream)] = Some(OpenWb {
            dev,
            w,
            buf,
            pos: WBLOCK_HEADER_BYTES,
            flushed: 0,
            first_unflushed: None,
            acks: Vec::new(),
            releases: Vec::new(),
            digests: Vec::new(),
            commit_inflight: 0,
            opened: Instant::now(),
        });
        let stats = &self.shared.stats[self.id];
        stats.free_wblocks.fetch_sub(1, Relaxed);
        if stream == DEFRAG {
            stats.defrag_writes.fetch_add(1, Relaxed);
        }
        Ok(())
    }

    /// A new use of wblock `w` of `dev`: its write sequence, taken now and recorded in
    /// `DevShared::seq`, and the header that starts it on the device.
    fn begin_use(&self, dev: u32, w: u32) -> [u8; WBLOCK_HEADER_BYTES] {
        let seq = self.shared.next_wblock_seq.fetch_add(1, Relaxed);
        let d = &self.shared.devs[dev as usize];
        d.seq[w as usize].store(seq, Relaxed);
        WblockHeader {
            shard: self.id as u16,
            wblock_seq: seq,
            wblock_id: w,
            device_index: dev,
            device_id: d.header.device_id,
        }
        .encode()
    }

    /// Write the open wblock's remaining bytes and retire it to the post-write cache.
    pub(super) fn seal(&mut self, s: usize) {
        self.flush(s, self.shared.cfg.commit_to_device || s % 2 == DEFRAG);
        let o = self.open[s].take().expect("sealing an open wblock");
        let dev = o.dev;
        let mw = self.mem.get_mut(&(dev, o.w)).expect("open wblock is in memory");
        mw.sealed = true;
        self.wstate[dev as usize][o.w as usize] = WState::Used;
        debug_assert!(o.acks.is_empty() && o.releases.is_empty() && o.digests.is_empty());
        if mw.inflight == 0 {
            self.retire(dev, o.w);
        }
    }

    /// Hand the unflushed tail of an open wblock to the device. With `commit-to-device`
    /// every flush is a durable write whatever the caller asked: one may carry replies
    /// waiting for durability (sent when it completes), and the completion of a write lets
    /// go of the copies it replaces, which only a durable write may do. A wblock's first
    /// write lets go of the previous use's floor (`min_seq`, `writer`) when it is durable:
    /// at its completion with DSYNC, else at the completion of the fsync sent after it.
    pub(super) fn flush(&mut self, s: usize, dsync: bool) {
        let wb = self.wb() as usize;
        self.submit_deferred();
        // Held while what freed the wblock is not durable, or while earlier writes of it
        // still wait (they go first).
        let Some((dev, w)) = self.open[s].as_ref().filter(|o| o.pos > o.flushed).map(|o| (o.dev, o.w)) else {
            return;
        };
        let held = self
            .hold_for(dev, w)
            .or_else(|| self.deferred.iter().find(|d| d.info.dev == dev && d.info.w == w).map(|d| d.hold.clone()));
        let Some(o) = self.open[s].as_mut() else { return };
        let dsync = dsync || self.shared.cfg.commit_to_device;
        let end = o.pos.div_ceil(FLUSH_ALIGN).saturating_mul(FLUSH_ALIGN).min(wb);
        o.buf.zero(o.pos, end);
        o.buf.freeze_to(end);
        let start = o.flushed;
        let info = WriteInfo {
            slot: s,
            dev,
            w,
            first: start == 0,

            bytes: end - start,
            acks: std::mem::take(&mut o.acks),
            releases: std::mem::take(&mut o.releases),
            digests: std::mem::take(&mut o.digests),
            dsync,
            commit: dsync && self.shared.cfg.commit_to_device,
        };
        if info.commit {
            o.commit_inflight += 1;
        }
        self.inflight_write_bytes += (end - start) as u64;
        o.pos = end;
        o.flushed = end;
        o.first_unflushed = None;
        let buf = o.buf.clone();
        let tag = self.tag();
        let req = IoRequest {
            tag,
            dev,
            offset: w as u64 * wb as u64 + start as u64,
            op: IoOp::Write { buf, start, end, dsync },
        };
        self.mem.get_mut(&(dev, w)).expect("flushed wblock is in memory").inflight += 1;
        match held {
            Some(hold) => {
                // The fsyncs that end the wait.
                self.fsync_through(self.own_wait(&hold));
                self.ask_for_syncs(&hold);
                self.deferred.push_back(Deferred { tag, req, info, hold });
            }
            None => {
                self.io.push(req);
                self.writes.insert(tag, info);
            }
        }
    }

    /// Whether a deferred write will release older copies when it completes.
    pub(super) fn deferred_releases(&self) -> bool {
        self.deferred.iter().any(|d| !d.info.releases.is_empty())
    }

    /// Whether a shard whose writes `h` waits for is latched read-only (they may never be
    /// durable).
    fn hold_failed(&self, h: &Hold) -> bool {
        match h {
            Hold::Own(_) => false,
            Hold::All(_) => self.shared.stats.iter().any(|s| s.read_only.load(Relaxed)),
        }
    }

    /// What a new write over free wblock `w` of `dev` (a new use, or a scrub) must wait
    /// for: the writes that freed it, unless they are durable already.
    pub(super) fn hold_for(&self, dev: u32, w: u32) -> Option<Hold> {
        match self.freed_at[dev as usize][w as usize] {
            0 => None,
            n if n & ALL_SNAPSHOT != 0 => {
                // A snapshot already let go of (`prune_all_snapshots`) was durable; one still
                // kept is copied out only while its writes are not (this runs at every flush
                // of the wblock).
                let i = (n & !ALL_SNAPSHOT).checked_sub(self.all_snapshots_first)?;
                let counts = &self.all_snapshots[i as usize];
                (!self.shared.synced_through(counts)).then(|| Hold::All(counts.clone()))
            }
            n => Some(Hold::Own(n)).filter(|h| !self.hold_over(h)),
        }
    }

    /// The `freed_at` of an earlier run's wblock freed now: every shard's count of completed
    /// writes (which covers the releases that emptied it, `Shared::sub_live` ordering each
    /// after its shard's count), kept once for all the wblocks freed while it is current.
    fn all_snapshot_now(&mut self) -> u64 {
        let now = self.shared.completed_writes();
        if self.all_snapshots.back() != Some(&now) {
            self.all_snapshots.push_back(now);
        }
        ALL_SNAPSHOT | (self.all_snapshots_first + self.all_snapshots.len() as u64 - 1)
    }

    /// Let go of the snapshots whose writes are all durable, oldest first.
    pub(super) fn prune_all_snapshots(&mut self) {
        while self.all_snapshots.front().is_some_and(|v| self.shared.synced_through(v)) {
            self.all_snapshots.pop_front();
            self.all_snapshots_first += 1;
        }
    }

    /// Ask the other shards whose writes `h` waits for to fsync them now, not on their
    /// timer: what waits meanwhile is a reuse (client writes needing space) or a scrub.
    pub(super) fn ask_for_syncs(&self, h: &Hold) {
        let Hold::All(counts) = h else { return };
        for (j, (s, &n)) in self.shared.stats.iter().zip(counts).enumerate() {
            if j != self.id && s.writes_synced.load(SeqCst) < n {
                s.sync_wanted.fetch_max(n, SeqCst);
                self.peers[j].1.ring_if_sleeping();
            }
        }
    }

    /// Fsync now the writes someone waits for (`ask_for_syncs`, a flush). A device whose
    /// fsync is in flight gets the next one once that completes, if the wait is not over by
    /// then.
    fn answer_sync_request(&mut self) {
        let s = &self.shared.stats[self.id];
        let wanted = s.sync_wanted.load(SeqCst);
        if wanted > s.writes_synced.load(SeqCst) {
            self.fsync_through(wanted);
        }
    }

    /// Whether a wanted fsync (`answer_sync_request`) could be sent now: a shard about to
    /// sleep looks once more, as a request made after its turn's `timers` rings only a
    /// sleeping shard.
    pub(super) fn sync_to_send(&self) -> bool {
        let s = &self.shared.stats[self.id];
        let wanted = s.sync_wanted.load(SeqCst);
        wanted > s.writes_synced.load(SeqCst)
            && (0..self.unsynced_first.len()).any(|d| self.unsynced_first[d] <= wanted && !self.fsync_inflight[d])
    }

    /// The last of this shard's own writes that `h` waits for (0: none).
    fn own_wait(&self, h: &Hold) -> u64 {
        match h {
            Hold::Own(n) => *n,
            Hold::All(v) => v.get(self.id).copied().unwrap_or(0),
        }
    }

    /// Whether the writes `h` waits for are durable.
    pub(super) fn hold_over(&self, h: &Hold) -> bool {
        match h {
            Hold::Own(n) => self.shared.stats[self.id].writes_synced.load(SeqCst) >= *n,
            Hold::All(v) => self.shared.synced_through(v),
        }
    }

    /// Hand the deferred writes whose wait is over to the device, in order: once one of a
    /// wblock waits, its later ones wait too. They fail on a latched shard, and when a shard
    /// whose writes they wait for is latched (its failed fsync means those never become
    /// durable, and this shard could not stop).
    pub(super) fn submit_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let mut waiting = VecDeque::new();
        let mut blocked: Vec<(u32, u32)> = Vec::new();
        while let Some(d) = self.deferred.pop_front() {
            let key = (d.info.dev, d.info.w);
            if self.read_only || self.hold_failed(&d.hold) {
                if !self.read_only {
                    tracing::error!(
                        "shard {}: another shard's fsync failed before device {} wblock {} could be reused; latching read-only",
                        self.id,
                        key.0,
                        key.1
                    );
                }
                let IoRequest { tag, dev, offset, op } = d.req;
                self.write_done(d.info, IoCompletion { tag, dev, offset, result: Err(DeviceError::Crashed), op });
            } else if !blocked.contains(&key) && self.hold_over(&d.hold) {
                self.io.push(d.req);
                self.writes.insert(d.tag, d.info);
            } else {
                blocked.push(key);
                waiting.push_back(d);
            }
        }
        self.deferred = waiting;
        let own = self.deferred.iter().map(|d| self.own_wait(&d.hold)).max();
        if let Some(n) = own.filter(|&n| n > 0) {
            // A device whose fsync was in flight gets the next one as soon as it completes.
            self.fsync_through(n);
        }
    }

    pub(super) fn commit_flushes(&mut self) {
        if !self.shared.cfg.commit_to_device {
            return;
        }
        for d in 0..self.open.len() {
            let due =
                self.open[d].as_ref().is_some_and(|o| !o.acks.is_empty() && o.commit_inflight < MAX_COMMITS_IN_FLIGHT);
            if due {
                self.flush(d, true);
            }
        }
    }

    pub(super) fn timers(&mut self) {
        self.check_flush_waiters();
        self.answer_sync_request();
        self.submit_deferred();
        let flush_every = Duration::from_millis(self.shared.cfg.flush_max_ms);
        for d in 0..self.open.len() {
            let due = self.open[d].as_ref().and_then(|o| o.first_unflushed).is_some_and(|t| t.elapsed() >= flush_every);
            if due {
                self.flush(d, d % 2 == DEFRAG);
            }
        }
        if self.last_timer.elapsed() >= flush_every {
            self.last_timer = Instant::now();
            self.fsync_all();
        }
        self.scrub_free();
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.last_sweep = Instant::now();
            self.sweep_empty();
            self.prune_all_snapshots();
            self.publish_stats();
            for buf in std::mem::take(&mut self.unrecycled) {
                self.recycle(buf);
            }
        }
        let nsup = self.shared.cfg.nsup_period_secs;
        if nsup > 0 && self.last_nsup.elapsed() >= Duration::from_secs(nsup) {
            self.last_nsup = Instant::now();
            self.nsup();
        }
        if self.stopping.is_none() {
            self.defrag_tick();
        }
    }

    pub(super) fn fsync_all(&mut self) {
        self.fsync_through(u64::MAX - 1);
    }

    /// Fsync the devices holding writes numbered up to `n` that no fsync covers yet (one
    /// whose fsync is in flight gets the next once it completes, when asked again).
    pub(super) fn fsync_through(&mut self, n: u64) {
        for d in 0..self.unsynced_first.len() {
            if self.unsynced_first[d] <= n && !self.fsync_inflight[d] {
                let first = std::mem::replace(&mut self.unsynced_first[d], u64::MAX);
                self.fsync_inflight[d] = true;
                let tag = self.tag();
                self.io.push(IoRequest { tag, dev: d as u32, offset: 0, op: IoOp::Fsync });
                let listed = std::mem::take(&mut self.unsynced[d]);
                let overflow = std::mem::take(&mut self.unsynced_overflow[d]);
                let firsts = std::mem::take(&mut self.unsettled[d]);
                self.fsyncs.insert(tag, FsyncInFlight { dev: d as u32, first, digests: listed, overflow, firsts });
            }
        }
    }

    /// `ShardStats::writes_synced`: every write numbered below the first one still waiting
    /// for an fsync (to be sent, or in flight) is durable.
    fn publish_synced(&self) {
        let waiting = self
            .unsynced_first
            .iter()
            .copied()
            .chain(self.fsyncs.values().map(|f| f.first))
            .chain([self.fsync_failed_first])
            .min();
        let synced = match waiting {
            Some(first) if first != u64::MAX => first - 1,
            _ => self.writes_completed,
        };
        let s = &self.shared.stats[self.id];
        let before = s.writes_synced.swap(synced, SeqCst);
        if synced > before && s.sync_wanted.load(SeqCst) > before {
            // Writes someone asked for became durable: a shard holding writes for them may
            // be asleep (this shard's own flush waiters are looked at in its next turn).
            for (j, (_, bell)) in self.peers.iter().enumerate() {
                if j != self.id {
                    bell.ring_if_sleeping();
                }
            }
        }
    }

    /// Free wblocks of this shard whose live bytes were released by other shards. One still
    /// open, being written or being defragmented is freed by what ends that (`retire`, the
    /// end of its walk), which looks at its live bytes again.
    pub(super) fn sweep_empty(&mut self) {
        let emptied = std::mem::take(&mut *self.shared.stats[self.id].emptied.lock().expect("emptied lock"));
        for (d, w) in emptied {
            self.maybe_free(d, w);
        }
    }

    pub(super) fn publish_stats(&self) {
        let s = &self.shared.stats[self.id];
        s.records.store(self.index.records(), Relaxed);
        s.tombstones.store(self.index.tombstones(), Relaxed);
        s.index_bytes.store(self.index.memory_bytes(), Relaxed);
        s.write_cache_bytes.store(self.write_cache_bytes(), Relaxed);
        let mut per_set = s.set_records.lock().expect("set stats lock");
        per_set.clear();
        per_set.extend_from_slice(self.index.set_records());
    }

    // ------------------------------------------------------------------ space

    /// Release `loc` once the write of open wblock `s` (which holds its newer copy) is done.
    pub(super) fn release_after_flush(&mut self, s: usize, loc: Loc) {
        let w = (loc.offset / self.wb()) as usize;
        self.pending_release[loc.dev as usize][w] += loc.size;
        self.open[s].as_mut().expect("the newer copy's wblock is open").releases.push(loc);
    }

    fn unpend_release(&mut self, loc: Loc) {
        let w = (loc.offset / self.wb()) as usize;
        let p = &mut self.pending_release[loc.dev as usize][w];
        *p = p.saturating_sub(loc.size);
    }

    pub(super) fn release(&mut self, loc: Loc) {
        let w = (loc.offset / self.wb()) as u32;
        let left = self.shared.sub_live(loc.dev, w, loc.size);
        if left == 0 {
            let owner = self.shared.wblock_owner(w);
            if owner == self.id {
                self.maybe_free(loc.dev, w);
            } else {
                // Exactly one release takes the live bytes to 0: the owner learns of it once.
                self.shared.stats[owner].emptied.lock().expect("emptied lock").push((loc.dev, w));
            }
        }
    }

    /// Free a wblock with no live bytes, unless it is open or still being written.
    pub(super) fn maybe_free(&mut self, dev: u32, w: u32) {
        if self.wstate[dev as usize][w as usize] != WState::Used || self.shared.live(dev, w) != 0 {
            return;
        }
        if let Some(mw) = self.mem.get(&(dev, w)) {
            if mw.inflight > 0 || !mw.sealed {
                return;
            }
            self.drop_from_memory(dev, w);
        }
        self.wstate[dev as usize][w as usize] = WState::Free;
        // A use this shard began in this run holds only its records, released by its writes.
        let this_run = self.shared.devs[dev as usize].seq[w as usize].load(Relaxed) >= self.run_first_wblock_seq;
        self.freed_at[dev as usize][w as usize] =
            if this_run { self.writes_completed.max(1) } else { self.all_snapshot_now() };
        self.defrag.unreadable.remove(&(dev, w));
        self.defrag.rested.remove(&(dev, w));
        self.defrag.floor_moves.remove(&(dev, w));
        self.free[dev as usize].push_back(w);
        self.shared.stats[self.id].free_wblocks.fetch_add(1, Relaxed);
    }

    /// A sealed wblock whose writes all completed: keep it in the post-write cache.
    pub(super) fn retire(&mut self, dev: u32, w: u32) {
        if self.shared.live(dev, w) == 0 {
            self.maybe_free(dev, w);
            return;
        }
        self.cache.push_back((dev, w));
        while self.cache.len() > self.cache_limit {
            let (d, ow) = self.cache.pop_front().expect("non-empty");
            self.drop_from_memory(d, ow);
        }
    }

    pub(super) fn drop_from_memory(&mut self, dev: u32, w: u32) {
        if let Some(mw) = self.mem.remove(&(dev, w)) {
            // A use not settled yet keeps its smallest sequence for `settle`.
            let waiting = self.unsettled[dev as usize]
                .iter_mut()
                .chain(self.fsyncs.values_mut().filter(|f| f.dev == dev).flat_map(|f| f.firsts.iter_mut()));
            for u in waiting.filter(|u| u.w == w) {
                u.min = u.min.min(mw.use_min_seq);
            }
            self.cache.retain(|&k| k != (dev, w));
            self.recycle(mw.buf);
        }
    }

    /// The first write of wblock `u.w`'s use `u.wseq` is durable: the previous use is
    /// overwritten for good, so only this use's data records bound the oldest data on the
    /// device there now, and only this shard's floor needs to count them. Nothing changes
    /// if the wblock has been freed and taken for another use meanwhile.
    pub(super) fn settle(&mut self, dev: u32, u: Unsettled) {
        let d = &self.shared.devs[dev as usize];
        if d.seq[u.w as usize].load(Relaxed) != u.wseq {
            return;
        }
        let min = self.mem.get(&(dev, u.w)).map_or(u.min, |m| m.use_min_seq.min(u.min));
        d.min_seq[u.w as usize].store(min, Relaxed);
        d.writer[u.w as usize].store(self.id as u32, Relaxed);
    }

    /// Give queued free wblocks (see `nsup`) an empty header, a few at a time: a free
    /// wblock's old records are still on the device, where a cold start would find them, so
    /// its floor (`min_seq`) holds back the tombstones of newer deletes until the wblock is
    /// written again, which on a device with few writes may be never. A new header, written
    /// with DSYNC, makes every record there stale; the wblock then holds no data.
    pub(super) fn scrub_free(&mut self) {
        const SCRUBS_IN_FLIGHT: usize = 4;
        while self.scrubs.len() < SCRUBS_IN_FLIGHT && !self.read_only && self.stopping.is_none() {
            let Some(&(dev, w, freed)) = self.scrub_queue.front() else { break };
            let d = &self.shared.devs[dev as usize];
            // Not if the wblock was used since it was queued (freed again, its wait is
            // another), nor once it holds no data.
            if self.wstate[dev as usize][w as usize] != WState::Free
                || self.freed_at[dev as usize][w as usize] != freed
                || d.min_seq[w as usize].load(Relaxed) == u64::MAX
            {
                self.scrub_queue.pop_front();
                continue;
            }
            // Only once the writes that freed it are durable (`Hold`, as for a new use): a
            // power loss would otherwise take the newer copies and leave the older ones here
            // gone too, and with them, say, a tombstone. Writes completed since do not
            // matter, so steady writes do not hold scrubs back.
            if self.hold_for(dev, w).is_some() {
                break;
            }
            self.scrub_queue.pop_front();
            let header = self.begin_use(dev, w);
            let seq = d.seq[w as usize].load(Relaxed);
            let buf = WBuf::new(self.io.alloc(FLUSH_ALIGN));
            buf.zero(0, FLUSH_ALIGN);
            buf.write_at(0, &header);
            buf.freeze_to(FLUSH_ALIGN);
            self.wstate[dev as usize][w as usize] = WState::Scrub;
            let tag = self.tag();
            self.io.push(IoRequest {
                tag,
                dev,
                offset: w as u64 * self.wb(),
                op: IoOp::Write { buf: Rc::new(buf), start: 0, end: FLUSH_ALIGN, dsync: true },
            });
            self.scrubs.insert(tag, (dev, w, seq));
        }
    }

    fn scrub_done(&mut self, dev: u32, w: u32, seq: u64, c: IoCompletion) {
        let IoCompletion { result, op, .. } = c;
        if let IoOp::Write { buf, .. } = op {
            self.recycle(buf);
        }
        match result {
            Ok(_) => {
                let stats = &self.shared.stats[self.id];
                stats.device_writes.fetch_add(1, Relaxed);
                stats.device_write_bytes.fetch_add(FLUSH_ALIGN as u64, Relaxed);
                stats.free_wblocks_scrubbed.fetch_add(1, Relaxed);
                let d = &self.shared.devs[dev as usize];
                if d.seq[w as usize].load(Relaxed) == seq {
                    d.min_seq[w as usize].store(u64::MAX, Relaxed);
                    d.writer[w as usize].store(self.id as u32, Relaxed);
                }
            }
            Err(e) => {
                // The old header may be damaged or not: the floor stays as it was.
                self.shared.stats[self.id].write_errors.fetch_add(1, Relaxed);
                tracing::error!("shard {}: header write of free device {dev} wblock {w} failed: {e}", self.id);
                self.latch_read_only();
            }
        }
        self.wstate[dev as usize][w as usize] = WState::Free;
        if self.scrub_popped.remove(&(dev, w)) {
            self.free[dev as usize].push_back(w);
            self.shared.stats[self.id].free_wblocks.fetch_add(1, Relaxed);
        }
    }

    /// Return a wblock buffer to the backend (its arena slot, if any) once nothing else
    /// holds it; buffers still referenced are retried on later turns.
    pub(super) fn recycle(&mut self, buf: Rc<WBuf>) {
        match Rc::try_unwrap(buf) {
            Ok(wbuf) => self.io.free(wbuf.into_inner()),
            Err(still) => self.unrecycled.push(still),
        }
    }

    /// Give every wblock buffer back to the backend (arena slots must return before the
    /// ring goes away).
    pub(super) fn release_buffers(&mut self) {
        self.open.iter_mut().for_each(|o| drop(o.take()));
        let keys: Vec<(u32, u32)> = self.mem.keys().copied().collect();
        for (d, w) in keys {
            self.drop_from_memory(d, w);
        }
    }

    pub(super) fn latch_read_only(&mut self) {
        // On a device that failed, only DSYNC writes still to complete can make a record
        // durable: every other client record not yet known durable is treated as lost
        // (written and not fsynced, under an fsync still in flight, being written without
        // DSYNC, or waiting in an open wblock for a flush that will not be DSYNC either).
        if self.unsynced_overflow.iter().any(|&o| o) || self.fsyncs.values().any(|f| f.overflow) {
            self.lost_all = true;
        }
        let mut doomed: Vec<Digest> = self.unsynced.iter_mut().flat_map(|u| u.drain(..)).collect();
        doomed.extend(self.fsyncs.values().flat_map(|f| f.digests.iter().copied()));
        doomed.extend(self.writes.values().filter(|w| !w.dsync).flat_map(|w| w.digests.iter().copied()));
        if !self.shared.cfg.commit_to_device {
            doomed.extend(self.open.iter().flatten().flat_map(|o| o.digests.iter().copied()));
        }
        self.mark_lost(doomed);
        if !self.read_only {
            self.read_only = true;
            self.shared.stats[self.id].read_only.store(true, Relaxed);
            tracing::error!(
                "shard {}: a device write failed; this shard is now READ-ONLY (writes answer error 1) \
                 until the device is fixed and the server restarted",
                self.id
            );
        }
    }

    /// Records whose latest write may not be on the device: reads of them, and scans of
    /// their partitions, answer SERVER_ERROR until a restart.
    fn mark_lost(&mut self, digests: impl IntoIterator<Item = Digest>) {
        for d in digests {
            self.lost_partitions.insert(d.partition());
            self.lost.insert(d);
        }
    }

    // ------------------------------------------------------------------ completions

    pub(super) fn complete(&mut self, c: IoCompletion) {
        if let Some(info) = self.writes.remove(&c.tag) {
            self.write_done(info, c);
        } else if let Some(p) = self.reads.remove(&c.tag) {
            self.read_done(p, c);
        } else if let Some((dev, w)) = self.defrag.reads.remove(&c.tag) {
            self.defrag_read_done(dev, w, c);
        } else if let Some((dev, w, seq)) = self.scrubs.remove(&c.tag) {
            self.scrub_done(dev, w, seq, c);
        } else if let Some(FsyncInFlight { dev: d, first, digests, overflow, firsts }) = self.fsyncs.remove(&c.tag) {
            self.fsync_inflight[d as usize] = false;
            if let Err(e) = c.result {
                // Its writes stay counted as not durable (a later fsync's success would not
                // make them so), and the scrubs that wait for them wait for good.
                self.fsync_failed_first = self.fsync_failed_first.min(first);
                tracing::error!("shard {}: fsync of device {d} failed: {e}", self.id);
                self.shared.stats[self.id].write_errors.fetch_add(1, Relaxed);
                self.latch_read_only();
                // Writes it was to make durable may not be: their records are as good as lost.
                self.mark_lost(digests);
                self.lost_all |= overflow;
                // And the previous uses of those wblocks may still be on the device: their
                // floors stay counted.
            } else {
                for u in firsts {
                    self.settle(d, u);
                }
            }
            self.publish_synced();
        } else {
            panic!("completion for unknown tag {}", c.tag);
        }
    }

    pub(super) fn write_done(&mut self, info: WriteInfo, c: IoCompletion) {
        // Drop the completion's reference to the wblock buffer first, so a retired buffer
        // can go back to the arena below.
        let IoCompletion { result, op, .. } = c;
        drop(op);
        let stats = &self.shared.stats[self.id];
        self.inflight_write_bytes -= info.bytes as u64;
        if let Some(o) = self.open[info.slot].as_mut() {
            if o.w == info.w && info.commit {
                o.commit_inflight -= 1;
            }
        }
        match result {
            Ok(_) => {
                stats.device_writes.fetch_add(1, Relaxed);
                stats.device_write_bytes.fetch_add(info.bytes as u64, Relaxed);
                self.writes_completed += 1;
                if !info.dsync {
                    let first = &mut self.unsynced_first[info.dev as usize];
                    if *first == u64::MAX {
                        *first = self.writes_completed;
                    }
                }
                // Before the releases below, which may let another shard free a wblock.
                self.shared.stats[self.id].writes_completed.store(self.writes_completed, SeqCst);
                self.publish_synced();
                if !info.dsync {
                    let u = &mut self.unsynced[info.dev as usize];
                    if self.read_only {
                        // Nothing not yet fsynced is trusted on a latched shard.
                        self.mark_lost(info.digests);
                    } else if u.len() + info.digests.len() <= MAX_UNSYNCED {
                        u.extend(info.digests);
                    } else {
                        // Too many to track (fsyncs not completing): should the next one
                        // fail, every record of the shard is suspect.
                        self.unsynced_overflow[info.dev as usize] = true;
                    }
                }
                if info.first {
                    let cur = self.mem.get(&(info.dev, info.w)).map_or(u64::MAX, |m| m.use_min_seq);
                    let wseq = self.shared.devs[info.dev as usize].seq[info.w as usize].load(Relaxed);
                    let u = Unsettled { w: info.w, wseq, min: cur };
                    if info.dsync {
                        self.settle(info.dev, u);
                    } else {
                        // Completed is not durable yet: a power loss before the next fsync
                        // could leave the previous use on the device.
                        self.unsettled[info.dev as usize].push(u);
                    }
                }
                for loc in info.releases {
                    self.unpend_release(loc);
                    self.release(loc);
                }
                for (cb, reply) in info.acks {
                    cb(reply);
                }
            }
            Err(e) => {
                stats.write_errors.fetch_add(1, Relaxed);
                tracing::error!("shard {}: write of device {} wblock {} failed: {e}", self.id, info.dev, info.w);
                self.latch_read_only();
                self.mark_lost(info.digests);
                for (cb, _) in info.acks {
                    cb(Reply::error(ResultCode::ServerError));
                }
            }
        }
        let mw = self.mem.get_mut(&(info.dev, info.w)).expect("written wblock is in memory");
        mw.inflight -= 1;
        if mw.sealed && mw.inflight == 0 {
            self.retire(info.dev, info.w);
        }
        self.check_flush_waiters();
    }

    /// Flush waiters: once every write begun before their flush has completed (the deferred
    /// ones too), they wait for the fsync that makes every write completed by then durable,
    /// asked for now. A latched shard answers them at once: what it has not made durable by
    /// then it never will.
    pub(super) fn check_flush_waiters(&mut self) {
        if !self.flush_waiters.is_empty() {
            let oldest =
                self.writes.keys().chain(self.deferred.iter().map(|d| &d.tag)).min().copied().unwrap_or(u64::MAX);
            let (ready, wait): (Vec<_>, Vec<_>) = self.flush_waiters.drain(..).partition(|(mark, _)| oldest >= *mark);
            self.flush_waiters = wait;
            if !ready.is_empty() {
                let target = self.writes_completed;
                self.sync_waiters.extend(ready.into_iter().map(|(_, done)| (target, done)));
                self.shared.stats[self.id].sync_wanted.fetch_max(target, SeqCst);
                self.fsync_through(target);
            }
        }
        if !self.sync_waiters.is_empty() {
            let synced = self.shared.stats[self.id].writes_synced.load(SeqCst);
            let latched = self.read_only;
            let (ready, wait): (Vec<_>, Vec<_>) =
                self.sync_waiters.drain(..).partition(|&(target, _)| latched || synced >= target);
            self.sync_waiters = wait;
            for (_, done) in ready {
                done();
            }
        }
    }
}
