//! A shard: one thread, one ring, its partitions' index, and its slice of wblocks.
//!
//! The loop never blocks on anything but its ring. Each turn it takes a bounded number of
//! requests from its channel, reaps I/O completions, runs timers (flush-max-ms, fsync,
//! free-wblock sweep), issues group-commit flushes, and then submits and (if idle) sleeps on
//! the ring with the doorbell armed.
//!
//! Write path: a record is encoded into the open wblock buffer of its device, the index is
//! repointed, and the old version's bytes are released only once the new version has been
//! written (durably, with commit-to-device), so a wblock is never freed and reused while it
//! holds the newest durable copy of anything.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, TryRecvError};

mod defrag;

use crate::api::{Command, Reply, ScanPage, ScanRecord};
use crate::error::{DeviceError, FormatError};
use crate::format::{
    bind_record, decode_record, encode_record, RecordBody, RecordMeta, WblockHeader, WBLOCK_HEADER_BYTES,
};
use crate::index::{lut_mask, seq_mask, Index, IndexEntry, Loc};
use crate::io::{AlignedBuf, Doorbell, IoBackend, IoCompletion, IoOp, IoRequest, WBuf};
use crate::ops::{self, Current, Outcome};
use crate::shared::Shared;
use crate::types::{now_cl_ms, now_cl_secs, Digest, ResultCode};

pub(crate) type Callback = Box<dyn FnOnce(Reply) + Send>;
pub(crate) type ScanCallback = Box<dyn FnOnce(ScanPage) + Send>;
pub(crate) type Done = Box<dyn FnOnce() + Send>;

/// Messages a shard accepts.
pub(crate) enum Msg {
    Cmd(Command, Callback),
    Scan {
        pid: u16,
        after: Option<Digest>,
        max: usize,
        with_bins: bool,
        cb: ScanCallback,
    },
    /// Write every buffered record durably, then call back.
    Flush(Done),
    /// Flush, fsync and leave the loop, then call back.
    Stop(Done),
    /// Leave the loop at once, dropping buffered records (simulates a crash in tests).
    Abort(Done),
    /// Publish up-to-date statistics, then call back.
    Stats(Done),
}

/// Most requests taken from the channel per loop turn (the rest wait for the next turn, so
/// completions and timers keep being served under load).
const MSGS_PER_TURN: usize = 256;
/// Partial flushes are padded to this boundary; sectors holding acknowledged records are
/// never written again.
const FLUSH_ALIGN: usize = 4096;
/// Group-commit writes in flight per open wblock: disjoint 4 KiB-padded ranges, each
/// acknowledging its own group, so commit throughput is not bound by one write's latency.
const MAX_COMMITS_IN_FLIGHT: u32 = 4;
/// Read buffers up to this size are pooled and reused.
const POOLED_READ_BYTES: usize = 64 * 1024;
/// How often the shard looks for wblocks emptied by other shards.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WState {
    NotMine,
    Free,
    Open,
    Used,
    /// Being read by the defragmenter.
    Defrag,
}

/// Write streams: each device has an open wblock for client writes and one for defrag.
const CLIENT: usize = 0;
const DEFRAG: usize = 1;

/// Index into `Shard::open` of a device's stream.
fn slot(dev: u32, stream: usize) -> usize {
    dev as usize * 2 + stream
}

struct OpenWb {
    dev: u32,
    w: u32,
    buf: Rc<WBuf>,
    pos: usize,
    flushed: usize,
    first_unflushed: Option<Instant>,
    acks: Vec<(Callback, Reply)>,
    releases: Vec<Loc>,
    /// Group-commit writes of this wblock in flight.
    commit_inflight: u32,
}

struct MemWb {
    buf: Rc<WBuf>,
    inflight: u32,
    sealed: bool,
    /// Smallest sequence of a data record written in this use of the wblock.
    use_min_seq: u64,
}

struct WriteInfo {
    slot: usize,
    dev: u32,
    w: u32,
    bytes: usize,
    /// The first write of a wblock's new use: once it completes, the previous use's data
    /// can no longer be taken for current by a cold start.
    first: bool,
    acks: Vec<(Callback, Reply)>,
    releases: Vec<Loc>,
    commit: bool,
}

enum ReadFor {
    Cmd(Command, Callback),
    Scan(u32, usize, bool),
}

struct PendingRead {
    entry: IndexEntry,
    skip: usize,
    for_: ReadFor,
}

struct ScanJob {
    records: Vec<Option<ScanRecord>>,
    remaining: usize,
    done: bool,
    cb: Option<ScanCallback>,
}

pub(crate) struct Shard {
    id: usize,
    shared: Arc<Shared>,
    io: Box<dyn IoBackend>,
    index: Index,
    rx: Receiver<Msg>,
    doorbell: Arc<Doorbell>,
    wstate: Vec<Vec<WState>>,
    free: Vec<VecDeque<u32>>,
    open: Vec<Option<OpenWb>>,
    mem: HashMap<(u32, u32), MemWb>,
    cache: VecDeque<(u32, u32)>,
    cache_limit: usize,
    writes: HashMap<u64, WriteInfo>,
    reads: HashMap<u64, PendingRead>,
    fsyncs: HashMap<u64, u32>,
    scans: HashMap<u32, ScanJob>,
    next_scan: u32,
    busy: HashMap<Digest, VecDeque<(Command, Callback)>>,
    flush_waiters: Vec<(u64, Done)>,
    next_tag: u64,
    next_seq: u64,
    read_only: bool,
    /// Bytes handed to the device and not yet completed.
    inflight_write_bytes: u64,
    write_cache_limit: u64,
    writes_since_fsync: Vec<bool>,
    fsync_inflight: Vec<bool>,
    last_timer: Instant,
    last_sweep: Instant,
    now_secs: u32,
    scratch: Vec<u8>,
    stopping: Option<Done>,
    aborted: bool,
    reserve_wblocks: usize,
    /// Wblock buffers dropped from memory while something still referenced them.
    unrecycled: Vec<Rc<WBuf>>,
    /// Small aligned buffers for record reads, reused.
    read_pool: Vec<AlignedBuf>,
    defrag: defrag::DefragState,
    last_nsup: Instant,
}

impl Shard {
    pub(crate) fn new(
        id: usize,
        shared: Arc<Shared>,
        io: Box<dyn IoBackend>,
        index: Index,
        next_seq: u64,
        rx: Receiver<Msg>,
        doorbell: Arc<Doorbell>,
    ) -> Shard {
        let n_devs = shared.devs.len();
        let mut wstate = Vec::with_capacity(n_devs);
        let mut free = Vec::with_capacity(n_devs);
        let mut n_free = 0u64;
        let mut n_mine = 0u64;
        for (d, dev) in shared.devs.iter().enumerate() {
            let mut st = vec![WState::NotMine; dev.n_wblocks as usize];
            let mut fl = VecDeque::new();
            for w in 1..dev.n_wblocks {
                if shared.wblock_owner(w) != id {
                    continue;
                }
                n_mine += 1;
                if shared.live(d as u32, w) == 0 {
                    st[w as usize] = WState::Free;
                    fl.push_back(w);
                    n_free += 1;
                } else {
                    st[w as usize] = WState::Used;
                }
            }
            wstate.push(st);
            free.push(fl);
        }
        let cfg = &shared.cfg;
        let per_shard_cache = cfg.post_write_cache_bytes / shared.n_shards as u64;
        let cache_limit = (per_shard_cache / cfg.wblock_bytes as u64) as usize;
        let write_cache_limit = (cfg.max_write_cache_bytes / shared.n_shards as u64).max(cfg.wblock_bytes as u64);
        let stats = &shared.stats[id];
        stats.free_wblocks.store(n_free, Relaxed);
        stats.total_wblocks.store(n_mine, Relaxed);
        stats.records.store(index.records(), Relaxed);
        stats.tombstones.store(index.tombstones(), Relaxed);
        stats.index_bytes.store(index.memory_bytes(), Relaxed);
        Shard {
            id,
            io,
            index,
            rx,
            doorbell,
            wstate,
            free,
            open: (0..2 * n_devs).map(|_| None).collect(),
            mem: HashMap::new(),
            cache: VecDeque::new(),
            cache_limit,
            writes: HashMap::new(),
            reads: HashMap::new(),
            fsyncs: HashMap::new(),
            scans: HashMap::new(),
            next_scan: 0,
            busy: HashMap::new(),
            flush_waiters: Vec::new(),
            next_tag: 1,
            next_seq,
            read_only: false,
            inflight_write_bytes: 0,
            write_cache_limit,
            writes_since_fsync: vec![false; n_devs],
            fsync_inflight: vec![false; n_devs],
            last_timer: Instant::now(),
            last_sweep: Instant::now(),
            now_secs: now_cl_secs(),
            scratch: Vec::new(),
            stopping: None,
            aborted: false,
            reserve_wblocks: shared.cfg.defrag_reserve_wblocks,
            unrecycled: Vec::new(),
            read_pool: Vec::new(),
            defrag: defrag::DefragState::default(),
            last_nsup: Instant::now(),
            shared,
        }
    }

    fn wb(&self) -> u64 {
        self.shared.wblock_bytes()
    }

    /// What `max-write-cache` bounds: bytes in flight to the device plus bytes buffered in
    /// open wblocks and not yet handed to it.
    fn write_cache_bytes(&self) -> u64 {
        let unflushed: usize = self.open.iter().flatten().map(|o| o.pos - o.flushed).sum();
        self.inflight_write_bytes + unflushed as u64
    }

    fn tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    /// The loop. Returns when a Stop message has been fully carried out or every sender is
    /// gone (then it stops the same way).
    pub(crate) fn run(mut self) {
        let mut comps: Vec<IoCompletion> = Vec::new();
        self.publish_stats();
        loop {
            self.now_secs = now_cl_secs();
            let mut did = 0usize;
            if self.stopping.is_none() {
                for _ in 0..MSGS_PER_TURN {
                    match self.rx.try_recv() {
                        Ok(m) => {
                            did += 1;
                            self.handle(m);
                            if self.aborted {
                                return;
                            }
                        }
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            self.begin_stop(Box::new(|| {}));
                            break;
                        }
                    }
                }
            }
            let woke = self.io.reap(&mut comps);
            did += comps.len() + woke as usize;
            for c in comps.drain(..) {
                self.complete(c);
            }
            self.timers();
            self.commit_flushes();
            if did > 0 {
                let s = &self.shared.stats[self.id];
                s.records.store(self.index.records(), Relaxed);
                s.tombstones.store(self.index.tombstones(), Relaxed);
            }
            if let Some(done) = self.stopping.take() {
                if self.writes.is_empty()
                    && self.fsyncs.is_empty()
                    && self.reads.is_empty()
                    && self.defrag.reads.is_empty()
                {
                    if self.writes_since_fsync.iter().any(|&b| b) {
                        self.fsync_all();
                        self.stopping = Some(done);
                    } else {
                        self.publish_stats();
                        self.release_buffers();
                        done();
                        return;
                    }
                } else {
                    self.stopping = Some(done);
                }
            }
            // Nothing left to take from the channel: wait in the ring for a completion, the
            // doorbell or the next timer, instead of turning with a non-waiting submit.
            let mut idle = self.rx.is_empty() || self.stopping.is_some();
            if idle && self.stopping.is_none() && self.io.in_flight() == 0 {
                // Spin briefly on the channel before paying for a sleep and a doorbell.
                let spin_until = Instant::now() + Duration::from_micros(self.shared.cfg.spin_us);
                while Instant::now() < spin_until {
                    if !self.rx.is_empty() {
                        idle = false;
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
            if idle {
                self.doorbell.prepare_sleep();
                if !self.rx.is_empty() && self.stopping.is_none() {
                    self.doorbell.awake();
                    continue;
                }
            }
            let timeout = Duration::from_millis(self.shared.cfg.flush_max_ms.clamp(1, 100));
            if let Err(e) = self.io.submit_and_wait(idle, Some(timeout)) {
                tracing::error!("shard {}: ring failed: {e}; latching read-only", self.id);
                self.latch_read_only();
                std::thread::sleep(Duration::from_millis(10));
            }
            if idle {
                self.doorbell.awake();
            }
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Cmd(cmd, cb) => self.submit_cmd(cmd, cb),
            Msg::Scan { pid, after, max, with_bins, cb } => self.start_scan(pid, after, max, with_bins, cb),
            Msg::Flush(done) => {
                for s in 0..self.open.len() {
                    self.flush(s, true);
                }
                let mark = self.next_tag;
                if self.writes.is_empty() {
                    done();
                } else {
                    self.flush_waiters.push((mark, done));
                }
            }
            Msg::Stop(done) => self.begin_stop(done),
            Msg::Stats(done) => {
                self.publish_stats();
                done();
            }
            Msg::Abort(done) => {
                self.aborted = true;
                done();
            }
        }
    }

    fn begin_stop(&mut self, done: Done) {
        for s in 0..self.open.len() {
            self.flush(s, true);
        }
        self.stopping = Some(done);
    }

    // ------------------------------------------------------------------ commands

    fn submit_cmd(&mut self, cmd: Command, cb: Callback) {
        if cmd.is_write() {
            if let Some(q) = self.busy.get_mut(&cmd.digest) {
                q.push_back((cmd, cb));
                return;
            }
        }
        self.start_cmd(cmd, cb);
    }

    fn visible(&self, e: &IndexEntry) -> bool {
        !e.tombstone && (e.void_time == 0 || e.void_time > self.now_secs)
    }

    fn start_cmd(&mut self, cmd: Command, cb: Callback) {
        let entry = self.index.get(&cmd.digest).filter(|e| self.visible(e));
        let Some(e) = entry else {
            self.finish(cmd, cb, None);
            return;
        };
        let need_body = ops::needs_bins(&cmd) || (cmd.is_write() && !cmd.delete && e.key_stored && cmd.key.is_none());
        if !need_body {
            let cur = Current { generation: e.generation, void_time: e.void_time, key: None, bins: Vec::new() };
            self.finish(cmd, cb, Some(cur));
            return;
        }
        match self.body_from_memory(&e) {
            Some(Ok(body)) => {
                self.shared.stats[self.id].cache_hits.fetch_add(1, Relaxed);
                let cur = current_of(body);
                self.finish(cmd, cb, Some(cur));
            }
            Some(Err(err)) => {
                self.record_error(&e, &err);
                cb(Reply::error(ResultCode::ServerError));
            }
            None => {
                self.shared.stats[self.id].cache_misses.fetch_add(1, Relaxed);
                if cmd.is_write() {
                    self.busy.entry(cmd.digest).or_default();
                }
                self.issue_read(e, ReadFor::Cmd(cmd, cb));
            }
        }
    }

    /// Apply the command and carry out its outcome; then let queued writes of the digest go.
    fn finish(&mut self, cmd: Command, cb: Callback, cur: Option<Current>) {
        let outcome = ops::apply(&cmd, cur.as_ref(), self.now_secs, self.shared.cfg.default_ttl_secs);
        let digest = cmd.digest;
        match outcome {
            Outcome::Reply(r) => cb(r),
            Outcome::Store { generation, void_time, key, bins, reply } => {
                let meta = RecordMeta {
                    digest,
                    generation,
                    void_time,
                    last_update_ms: now_cl_ms(),
                    seq: self.next_seq,
                    tombstone: false,
                };
                self.store(&cmd.set, meta, key.as_deref(), &bins, reply, cb);
            }
            Outcome::Delete { reply } => {
                let generation = cur.as_ref().map_or(1, |c| c.generation.wrapping_add(1).max(1));
                let meta = RecordMeta {
                    digest,
                    generation,
                    void_time: 0,
                    last_update_ms: now_cl_ms(),
                    seq: self.next_seq,
                    tombstone: true,
                };
                self.store(&cmd.set, meta, None, &[], reply, cb);
            }
        }
        self.release_busy(digest);
    }

    fn release_busy(&mut self, digest: Digest) {
        let Some(mut q) = self.busy.remove(&digest) else { return };
        while let Some((cmd, cb)) = q.pop_front() {
            self.start_cmd(cmd, cb);
            if let Some(again) = self.busy.get_mut(&digest) {
                again.extend(q);
                return;
            }
        }
    }

    fn store(
        &mut self,
        set: &str,
        meta: RecordMeta,
        key: Option<&[u8]>,
        bins: &[crate::types::Bin],
        reply: Reply,
        cb: Callback,
    ) {
        if self.read_only {
            cb(Reply::error(ResultCode::ServerError));
            return;
        }
        if !meta.tombstone && self.avail_pct() < self.shared.cfg.stop_writes_avail_pct as f64 {
            cb(Reply::error(ResultCode::OutOfSpace));
            return;
        }
        if self.write_cache_bytes() >= self.write_cache_limit {
            cb(Reply::error(ResultCode::DeviceOverload));
            return;
        }
        let mut rec = std::mem::take(&mut self.scratch);
        rec.clear();
        let plen = encode_record(&meta, set, key, bins, &mut rec);
        let max = self.wb() as usize - WBLOCK_HEADER_BYTES;
        if plen > max {
            self.scratch = rec;
            cb(Reply::error(ResultCode::RecordTooBig));
            return;
        }
        let dev = self.shared.device_of(&meta.digest);
        let loc = match self.append(dev, CLIENT, &mut rec) {
            Ok(l) => l,
            Err(rc) => {
                self.scratch = rec;
                cb(Reply::error(rc));
                return;
            }
        };
        self.scratch = rec;
        self.next_seq += 1;
        let entry = IndexEntry {
            digest: meta.digest,
            loc,
            seq: seq_mask(meta.seq),
            last_update_ms: lut_mask(meta.last_update_ms),
            void_time: meta.void_time,
            generation: meta.generation,
            tombstone: meta.tombstone,
            key_stored: key.is_some(),
            fresh: false,
        };
        let old = self.index.upsert(IndexEntry { fresh: self.index.get(&meta.digest).is_none(), ..entry });
        self.shared.stats[self.id].client_write_bytes.fetch_add(plen as u64, Relaxed);
        let open = self.open[slot(dev, CLIENT)].as_mut().expect("append leaves an open wblock");
        if let Some(o) = old {
            open.releases.push(o.loc);
        }
        if self.shared.cfg.commit_to_device {
            open.acks.push((cb, reply));
        } else {
            cb(reply);
        }
    }

    /// Put an encoded record into the open wblock of `dev`'s `stream`; returns its location.
    fn append(&mut self, dev: u32, stream: usize, rec: &mut [u8]) -> Result<Loc, ResultCode> {
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

    fn open_wblock(&mut self, dev: u32, stream: usize, tombstone: bool) -> Result<(), ResultCode> {
        // The last few free wblocks are kept for defrag (and deletes), so space can always be
        // won back.
        if stream == CLIENT && !tombstone && self.free[dev as usize].len() <= self.reserve_wblocks {
            return Err(ResultCode::OutOfSpace);
        }
        let w = self.free[dev as usize].pop_front().ok_or(ResultCode::OutOfSpace)?;
        let seq = self.shared.next_wblock_seq.fetch_add(1, Relaxed);
        let d = &self.shared.devs[dev as usize];
        d.seq[w as usize].store(seq, Relaxed);
        d.writer[w as usize].store(self.id as u32, Relaxed);
        let buf = Rc::new(WBuf::new(self.io.alloc(self.wb() as usize)));
        let h = WblockHeader {
            shard: self.id as u16,
            wblock_seq: seq,
            wblock_id: w,
            device_index: dev,
            device_id: d.header.device_id,
        };
        buf.write_at(0, &h.encode());
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
            commit_inflight: 0,
        });
        self.shared.stats[self.id].free_wblocks.fetch_sub(1, Relaxed);
        Ok(())
    }

    /// Write the open wblock's remaining bytes and retire it to the post-write cache.
    fn seal(&mut self, s: usize) {
        self.flush(s, self.shared.cfg.commit_to_device || s % 2 == DEFRAG);
        let o = self.open[s].take().expect("sealing an open wblock");
        let dev = o.dev;
        let mw = self.mem.get_mut(&(dev, o.w)).expect("open wblock is in memory");
        mw.sealed = true;
        self.wstate[dev as usize][o.w as usize] = WState::Used;
        debug_assert!(o.acks.is_empty() && o.releases.is_empty());
        if mw.inflight == 0 {
            self.retire(dev, o.w);
        }
    }

    /// Hand the unflushed tail of an open wblock to the device.
    fn flush(&mut self, s: usize, dsync: bool) {
        let wb = self.wb() as usize;
        let Some(o) = self.open[s].as_mut() else { return };
        let dev = o.dev;
        if o.pos == o.flushed {
            return;
        }
        let end = o.pos.div_ceil(FLUSH_ALIGN).saturating_mul(FLUSH_ALIGN).min(wb);
        o.buf.zero(o.pos, end);
        o.buf.freeze_to(end);
        let start = o.flushed;
        let w = o.w;
        let info = WriteInfo {
            slot: s,
            dev,
            w,
            first: start == 0,

            bytes: end - start,
            acks: std::mem::take(&mut o.acks),
            releases: std::mem::take(&mut o.releases),
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
        self.io.push(IoRequest {
            tag,
            dev,
            offset: w as u64 * wb as u64 + start as u64,
            op: IoOp::Write { buf, start, end, dsync },
        });
        self.writes.insert(tag, info);
        self.mem.get_mut(&(dev, w)).expect("flushed wblock is in memory").inflight += 1;
    }

    fn commit_flushes(&mut self) {
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

    fn timers(&mut self) {
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
        if self.last_sweep.elapsed() >= SWEEP_EVERY {
            self.last_sweep = Instant::now();
            self.sweep_empty();
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

    fn fsync_all(&mut self) {
        for d in 0..self.writes_since_fsync.len() {
            if self.writes_since_fsync[d] && !self.fsync_inflight[d] {
                self.writes_since_fsync[d] = false;
                self.fsync_inflight[d] = true;
                let tag = self.tag();
                self.io.push(IoRequest { tag, dev: d as u32, offset: 0, op: IoOp::Fsync });
                self.fsyncs.insert(tag, d as u32);
            }
        }
    }

    /// Free wblocks of this shard whose live bytes were released by other shards.
    fn sweep_empty(&mut self) {
        for d in 0..self.wstate.len() {
            for w in 1..self.wstate[d].len() {
                if self.wstate[d][w] == WState::Used && self.shared.live(d as u32, w as u32) == 0 {
                    self.maybe_free(d as u32, w as u32);
                }
            }
        }
    }

    fn publish_stats(&self) {
        let s = &self.shared.stats[self.id];
        s.records.store(self.index.records(), Relaxed);
        s.tombstones.store(self.index.tombstones(), Relaxed);
        s.index_bytes.store(self.index.memory_bytes(), Relaxed);
        s.write_cache_bytes.store(self.write_cache_bytes(), Relaxed);
    }

    // ------------------------------------------------------------------ space

    fn release(&mut self, loc: Loc) {
        let w = (loc.offset / self.wb()) as u32;
        let left = self.shared.sub_live(loc.dev, w, loc.size);
        if left == 0 && self.shared.wblock_owner(w) == self.id {
            self.maybe_free(loc.dev, w);
        }
    }

    /// Free a wblock with no live bytes, unless it is open or still being written.
    fn maybe_free(&mut self, dev: u32, w: u32) {
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
        self.free[dev as usize].push_back(w);
        self.shared.stats[self.id].free_wblocks.fetch_add(1, Relaxed);
    }

    /// A sealed wblock whose writes all completed: keep it in the post-write cache.
    fn retire(&mut self, dev: u32, w: u32) {
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

    fn drop_from_memory(&mut self, dev: u32, w: u32) {
        if let Some(mw) = self.mem.remove(&(dev, w)) {
            self.cache.retain(|&k| k != (dev, w));
            self.recycle(mw.buf);
        }
    }

    /// Return a wblock buffer to the backend (its arena slot, if any) once nothing else
    /// holds it; buffers still referenced are retried on later turns.
    fn recycle(&mut self, buf: Rc<WBuf>) {
        match Rc::try_unwrap(buf) {
            Ok(wbuf) => self.io.free(wbuf.into_inner()),
            Err(still) => self.unrecycled.push(still),
        }
    }

    /// Give every wblock buffer back to the backend (arena slots must return before the
    /// ring goes away).
    fn release_buffers(&mut self) {
        self.open.iter_mut().for_each(|o| drop(o.take()));
        let keys: Vec<(u32, u32)> = self.mem.keys().copied().collect();
        for (d, w) in keys {
            self.drop_from_memory(d, w);
        }
    }

    fn latch_read_only(&mut self) {
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

    // ------------------------------------------------------------------ completions

    fn complete(&mut self, c: IoCompletion) {
        if let Some(info) = self.writes.remove(&c.tag) {
            self.write_done(info, c);
        } else if let Some(p) = self.reads.remove(&c.tag) {
            self.read_done(p, c);
        } else if let Some((dev, w)) = self.defrag.reads.remove(&c.tag) {
            self.defrag_read_done(dev, w, c);
        } else if let Some(d) = self.fsyncs.remove(&c.tag) {
            self.fsync_inflight[d as usize] = false;
            if let Err(e) = c.result {
                tracing::error!("shard {}: fsync of device {d} failed: {e}", self.id);
                self.shared.stats[self.id].write_errors.fetch_add(1, Relaxed);
                self.latch_read_only();
            }
        } else {
            panic!("completion for unknown tag {}", c.tag);
        }
    }

    fn write_done(&mut self, info: WriteInfo, c: IoCompletion) {
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
                self.writes_since_fsync[info.dev as usize] = true;
                if info.first {
                    // The previous use of this wblock is overwritten for good: only this
                    // use's data records bound the oldest data on the device now.
                    let cur = self.mem.get(&(info.dev, info.w)).map_or(u64::MAX, |m| m.use_min_seq);
                    self.shared.devs[info.dev as usize].min_seq[info.w as usize].store(cur, Relaxed);
                }
                for loc in info.releases {
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
        if !self.flush_waiters.is_empty() {
            let oldest = self.writes.keys().min().copied().unwrap_or(u64::MAX);
            let (ready, wait): (Vec<_>, Vec<_>) = self.flush_waiters.drain(..).partition(|(mark, _)| oldest >= *mark);
            self.flush_waiters = wait;
            for (_, done) in ready {
                done();
            }
        }
    }

    // ------------------------------------------------------------------ reads

    fn body_from_memory(&self, e: &IndexEntry) -> Option<Result<RecordBody, FormatError>> {
        let wb = self.wb();
        let w = (e.loc.offset / wb) as u32;
        let mw = self.mem.get(&(e.loc.dev, w))?;
        let bytes = mw.buf.read_at((e.loc.offset % wb) as usize, e.loc.size as usize);
        Some(self.decode_at(&bytes, e))
    }

    fn decode_at(&self, bytes: &[u8], e: &IndexEntry) -> Result<RecordBody, FormatError> {
        let loc = self.shared.record_loc(e.loc.dev, e.loc.offset);
        let body = decode_record(bytes, &loc, e.loc.size as usize)?;
        if body.meta.digest != e.digest {
            return Err(FormatError::Digest);
        }
        Ok(body)
    }

    fn issue_read(&mut self, e: IndexEntry, for_: ReadFor) {
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

    fn read_done(&mut self, p: PendingRead, c: IoCompletion) {
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
            ReadFor::Cmd(cmd, cb) => match res {
                Ok(body) => {
                    let cur = current_of(body);
                    self.finish(cmd, cb, Some(cur));
                }
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

    fn record_error(&self, e: &IndexEntry, err: &dyn std::fmt::Display) {
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

    fn start_scan(&mut self, pid: u16, after: Option<Digest>, max: usize, with_bins: bool, cb: ScanCallback) {
        let mut entries: Vec<IndexEntry> = self
            .index
            .partition_entries(pid)
            .into_iter()
            .filter(|e| self.visible(e) && after.is_none_or(|a| e.digest > a))
            .collect();
        entries.sort_unstable_by_key(|e| e.digest);
        let done = entries.len() <= max;
        entries.truncate(max);
        let id = self.next_scan;
        self.next_scan = self.next_scan.wrapping_add(1);
        let mut job = ScanJob { records: vec![None; entries.len()], remaining: 0, done, cb: Some(cb) };
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

    /// Account for one finished read of scan `id` (or none), and answer once all are in.
    fn scan_progress(&mut self, id: u32, read_finished: bool) {
        let Some(j) = self.scans.get_mut(&id) else { return };
        if read_finished {
            j.remaining -= 1;
        }
        if j.remaining > 0 {
            return;
        }
        let mut j = self.scans.remove(&id).expect("present");
        let page = ScanPage { result: ResultCode::Ok, records: j.records.drain(..).flatten().collect(), done: j.done };
        if let Some(cb) = j.cb.take() {
            cb(page);
        }
    }
}

fn current_of(body: RecordBody) -> Current {
    Current { generation: body.meta.generation, void_time: body.meta.void_time, key: body.key, bins: body.bins }
}

fn scan_record(body: RecordBody, with_bins: bool) -> ScanRecord {
    ScanRecord {
        digest: body.meta.digest,
        set: body.set,
        key: body.key,
        generation: body.meta.generation,
        void_time: body.meta.void_time,
        bins: if with_bins { body.bins } else { Vec::new() },
    }
}

impl From<DeviceError> for ResultCode {
    fn from(_: DeviceError) -> ResultCode {
        ResultCode::ServerError
    }
}
