//! A shard: one thread, one ring, its partitions' index, and its slice of wblocks.
//!
//! The loop never blocks on anything but its ring. Each turn it takes a bounded number of
//! requests from its channel, reaps I/O completions, runs timers (flush-max-ms, fsync,
//! free-wblock sweep, expiry, defrag), issues group-commit flushes, and then submits and,
//! when its channel is empty, waits in the ring with the doorbell armed.
//!
//! This file holds the loop and the command logic; `write.rs` the write path, space and
//! completions; `read.rs` the read path and scans; `defrag.rs` defrag and expiry.
//!
//! Write path: a record is encoded into the open wblock buffer of its device, the index is
//! repointed, and the old version's bytes are released only once the new version has been
//! written (durably, with commit-to-device), so a wblock is never freed and reused while it
//! holds the newest durable copy of anything.

use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};

mod defrag;
mod read;
mod write;

use read::{current_of, PREFETCH_WINDOW};

use crate::api::{Command, ExistsAction, Op, Reply, ScanPage, ScanRecord};
use crate::error::{DeviceError, FormatError};
use crate::format::{
    bind_record, decode_record, encode_record, RecordBody, RecordMeta, WblockHeader, WBLOCK_HEADER_BYTES,
};
use crate::index::{lut_mask, Index, IndexEntry, Loc};
use crate::io::{AlignedBuf, Doorbell, IoBackend, IoCompletion, IoOp, IoRequest, WBuf};
use crate::ops::{self, Current, Outcome};
use crate::shared::Shared;
use crate::types::{now_cl_ms, now_cl_secs, Bin, Digest, ResultCode, Value};

pub(crate) type Callback = Box<dyn FnOnce(Reply) + Send>;
pub(crate) type ScanCallback = Box<dyn FnOnce(ScanPage) + Send>;
pub(crate) type Done = Box<dyn FnOnce() + Send>;

/// A set id no record has (set ids stop at `MAX_SETS`): a truncate that matches nothing.
pub(crate) const NO_SET_MATCHES: u16 = u16::MAX;

/// Another shard's channel and doorbell.
pub(crate) type Peer = (Sender<Msg>, Arc<Doorbell>);

/// What a shard thread is given to talk to the world.
pub(crate) struct ShardLinks {
    pub rx: Receiver<Msg>,
    pub doorbell: Arc<Doorbell>,
    /// Every shard's channel and doorbell, this one's included.
    pub peers: Arc<Vec<Peer>>,
    pub hook: Option<Box<dyn crate::hook::ShardHook>>,
}

/// One page of a partition scan: up to `max` live records after `after`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ScanReq {
    pub pid: u16,
    /// Only records of this set id.
    pub set: Option<u16>,
    pub after: Option<Digest>,
    pub max: usize,
    pub with_bins: bool,
}

/// Messages a shard accepts.
pub(crate) enum Msg {
    Cmd(Command, Callback),
    /// Messages (commands, scan pages) handed over by another shard's hook, in order.
    Many(Vec<Msg>),
    Scan(ScanReq, ScanCallback),
    /// Write every buffered record durably, then call back.
    Flush(Done),
    /// Flush, fsync and leave the loop, then call back.
    Stop(Done),
    /// Leave the loop at once, dropping buffered records (simulates a crash in tests).
    Abort(Done),
    /// Publish up-to-date statistics, then call back.
    Stats(Done),
    /// Drop every entry of the set (all sets when `None`; none for `NO_SET_MATCHES`) last
    /// updated before `before_ms` (the truncate is already persisted in the device headers),
    /// raise the floor of later writes' last-update times to it, then call back.
    Truncate {
        set_id: Option<u16>,
        before_ms: u64,
        done: Done,
    },
    /// Records of this shard's partitions that another shard's defrag found in a wblock of
    /// its own (possible after a change of the shard count), to be copied out.
    Adopt(defrag::Adoption),
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
/// Longest a client write waits for defrag to win space back before it is tried anyway
/// (and may fail with OUT_OF_SPACE).
const MAX_HOLD: Duration = Duration::from_millis(500);
/// Client records listed per device as written and not yet fsynced, at most (20 MiB of
/// digests); beyond it a failed fsync makes every record of the shard suspect.
const MAX_UNSYNCED: usize = 1 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum WState {
    NotMine,
    Free,
    Open,
    Used,
    /// Being read by the defragmenter.
    Defrag,
    /// Free, with a new empty header being written over what its last use left (see
    /// `Shard::scrub_free`); it may be off the free list meanwhile.
    Scrub,
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
    /// The records client writes put here since the last flush (client stream only).
    digests: Vec<Digest>,
    /// Group-commit writes of this wblock in flight.
    commit_inflight: u32,
    /// When it was opened (a defrag output open this long is sealed once nothing qualifies).
    opened: Instant,
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
    /// The records of client writes this write carries.
    digests: Vec<Digest>,
    /// A DSYNC write: durable once it completes, without waiting for an fsync.
    dsync: bool,
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
    pid: u16,
    records: Vec<Option<ScanRecord>>,
    remaining: usize,
    done: bool,
    cb: Option<ScanCallback>,
}

pub(crate) struct Shard {
    id: usize,
    shared: Arc<Shared>,
    pub(crate) io: Box<dyn IoBackend>,
    /// Socket operations of the hook completed, for its next turn.
    pub(crate) sock_done: Vec<crate::io::SockCompletion>,
    index: Index,
    rx: Receiver<Msg>,
    doorbell: Arc<Doorbell>,
    wstate: Vec<Vec<WState>>,
    /// Per device and wblock: live bytes whose release waits for the write of their newer
    /// copy (an overwrite, a delete's tombstone, a defrag copy). Defrag leaves a wblock
    /// whose live bytes are all pending alone: it frees itself once those writes land, and
    /// reading it would copy nothing.
    pending_release: Vec<Vec<u32>>,
    free: Vec<VecDeque<u32>>,
    open: Vec<Option<OpenWb>>,
    /// Looked up at least once per record read: hashbrown's seeded fast hasher (foldhash)
    /// rather than std's SipHash. So is `busy`.
    mem: hashbrown::HashMap<(u32, u32), MemWb>,
    cache: VecDeque<(u32, u32)>,
    cache_limit: usize,
    writes: HashMap<u64, WriteInfo>,
    reads: HashMap<u64, PendingRead>,
    /// Fsyncs in flight, by tag.
    fsyncs: HashMap<u64, write::FsyncInFlight>,
    /// Per device, client records written without DSYNC since the last fsync was sent.
    unsynced: Vec<Vec<Digest>>,
    /// Per device, wblocks whose new use's first write completed without DSYNC since the
    /// last fsync was sent: the previous use is let go of (its data floor and, after a
    /// change of the shard count, its place in every shard's floor) only once an fsync sent
    /// after that completion has completed.
    unsettled: Vec<Vec<write::Unsettled>>,
    /// Free wblocks whose old contents hold tombstones back, to be given an empty header
    /// (`scrub_free`): (device, wblock, its `freed_at` when queued: what the scrub waits
    /// for, `write::Shard::hold_for`); and the header writes in flight: tag → (device, wblock, its new write
    /// sequence).
    scrub_queue: VecDeque<(u32, u32, u64)>,
    scrubs: HashMap<u64, (u32, u32, u64)>,
    /// Wblocks being scrubbed that `open_wblock` took off the free list: back on it when
    /// the write completes.
    scrub_popped: HashSet<(u32, u32)>,
    scans: HashMap<u32, ScanJob>,
    next_scan: u32,
    busy: hashbrown::HashMap<Digest, VecDeque<(Command, Callback)>>,
    /// Client writes held back, in arrival order, while free space is about to run out and
    /// defrag is winning some back.
    held: VecDeque<(Command, Callback, Instant)>,
    flush_waiters: Vec<(u64, Done)>,
    /// Flushes whose writes have all completed, waiting for the fsync that makes every
    /// write completed until then durable (this shard's `writes_synced` reaching the number).
    sync_waiters: Vec<(u64, Done)>,
    next_tag: u64,
    next_seq: u64,
    read_only: bool,
    /// Records whose client write failed on the device (the shard is then read-only): the
    /// index may hold a version the device does not, or miss one a failed delete left, so
    /// they answer SERVER_ERROR until a restart reads the device again.
    lost: HashSet<Digest>,
    /// The partitions of the `lost` records (a scan of one answers SERVER_ERROR).
    lost_partitions: HashSet<u16>,
    /// Every record is suspect: `unsynced` overflowed before the failure.
    lost_all: bool,
    /// Per device: writes completed since the last fsync was sent that `unsynced` had no
    /// room for (more than `MAX_UNSYNCED` records).
    unsynced_overflow: Vec<bool>,
    /// Bytes handed to the device and not yet completed.
    inflight_write_bytes: u64,
    write_cache_limit: u64,
    /// Device writes completed (successfully) so far, numbered in completion order
    /// (`ShardStats::writes_completed`).
    writes_completed: u64,
    /// Per device: the number of the first write completed since the last fsync was sent
    /// (u64::MAX: none, nothing to fsync).
    unsynced_first: Vec<u64>,
    /// Per device and wblock: this shard's `writes_completed` when the wblock was last
    /// freed; 0: not freed in this run (what it holds was durable when the run began);
    /// `ALL_SNAPSHOT | id`: it held an earlier run's records, which any shard may have
    /// released, and was freed when every shard's count was `all_snapshots[id]`.
    freed_at: Vec<Vec<u64>>,
    /// Every shard's `writes_completed` as of frees of earlier runs' wblocks, oldest first,
    /// with the id of the first; those whose writes are all durable are let go (a hold
    /// naming one of them is over).
    all_snapshots: VecDeque<Vec<u64>>,
    all_snapshots_first: u64,
    /// The first wblock write sequence of this run: a use from before was begun by an
    /// earlier run (and may hold any shard's records after a change of the shard count).
    run_first_wblock_seq: u64,
    /// Writes of reused wblocks waiting, in order, for the writes that freed them to be
    /// durable (`write::Hold`).
    deferred: VecDeque<write::Deferred>,
    /// The number of the first write a failed fsync was to make durable (u64::MAX: none).
    fsync_failed_first: u64,
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
    /// Set name → id, a per-shard cache of the namespace's set registry.
    set_ids: HashMap<String, u16>,
    /// The lists of bin names this shard stored, numbered for the index entries.
    binsets: crate::binsets::BinSets,
    peers: Arc<Vec<Peer>>,
    hook: Option<Box<dyn crate::hook::ShardHook>>,
    /// Commands from the hook for other shards, per destination, not yet handed over.
    forward: Vec<Vec<Msg>>,
    /// Commands from the hook for this shard, run together by [`Shard::run_local`] so that
    /// the memory they need is fetched for all of them at once.
    local: Vec<(Command, Callback)>,
    /// The latest truncate cutoff this shard applied: every later write gets a last-update
    /// time at least this, so no write made after a truncate falls under it (even if the
    /// wall clock steps back).
    lut_floor: u64,
}

impl Shard {
    pub(crate) fn new(
        id: usize,
        shared: Arc<Shared>,
        io: Box<dyn IoBackend>,
        index: Index,
        next_seq: u64,
        links: ShardLinks,
    ) -> Shard {
        let ShardLinks { rx, doorbell, peers, hook } = links;
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
        let pending_release = shared.devs.iter().map(|dev| vec![0; dev.n_wblocks as usize]).collect();
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
        let lut_floor = shared.truncates.read().expect("truncates lock").iter().map(|t| t.before_ms).max().unwrap_or(0);
        Shard {
            id,
            io,
            index,
            rx,
            doorbell,
            wstate,
            pending_release,
            free,
            open: (0..2 * n_devs).map(|_| None).collect(),
            mem: hashbrown::HashMap::new(),
            cache: VecDeque::new(),
            cache_limit,
            writes: HashMap::new(),
            reads: HashMap::new(),
            fsyncs: HashMap::new(),
            unsynced: vec![Vec::new(); n_devs],
            unsettled: (0..n_devs).map(|_| Vec::new()).collect(),
            scrub_queue: VecDeque::new(),
            scrubs: HashMap::new(),
            scrub_popped: HashSet::new(),
            scans: HashMap::new(),
            next_scan: 0,
            busy: hashbrown::HashMap::new(),
            held: VecDeque::new(),
            flush_waiters: Vec::new(),
            sync_waiters: Vec::new(),
            next_tag: 1,
            next_seq,
            read_only: false,
            lost: HashSet::new(),
            lost_partitions: HashSet::new(),
            lost_all: false,
            unsynced_overflow: vec![false; n_devs],
            inflight_write_bytes: 0,
            write_cache_limit,
            writes_completed: 0,
            unsynced_first: vec![u64::MAX; n_devs],
            freed_at: shared.devs.iter().map(|dev| vec![0; dev.n_wblocks as usize]).collect(),
            all_snapshots: VecDeque::new(),
            all_snapshots_first: 0,
            run_first_wblock_seq: shared.next_wblock_seq.load(Relaxed),
            deferred: VecDeque::new(),
            fsync_failed_first: u64::MAX,
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
            set_ids: HashMap::new(),
            binsets: crate::binsets::BinSets::default(),
            lut_floor,
            forward: (0..peers.len()).map(|_| Vec::new()).collect(),
            local: Vec::new(),
            peers,
            hook,
            shared,
            sock_done: Vec::new(),
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
        if let Some(h) = self.hook.as_mut() {
            h.start(self.doorbell.clone());
        }
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
            } else {
                // Stopping: nothing new is executed (it could not be made durable before the
                // devices are marked clean), but nobody is left without an answer.
                while let Ok(m) = self.rx.try_recv() {
                    did += 1;
                    self.refuse(m);
                    if self.aborted {
                        return;
                    }
                }
            }
            let woke = self.io.reap(&mut comps);
            did += comps.len() + woke as usize;
            if self.hook.is_some() {
                let before = self.sock_done.len();
                self.io.reap_sock(&mut self.sock_done);
                did += self.sock_done.len() - before;
            }
            for c in comps.drain(..) {
                self.complete(c);
            }
            self.timers();
            did += self.release_held();
            if let Some(mut h) = self.hook.take() {
                did += h.turn(&mut crate::hook::HookCtx { shard: &mut self }) as usize;
                self.hook = Some(h);
                self.run_local();
                self.hand_over_forwards();
            }
            self.commit_flushes();
            if did > 0 {
                let s = &self.shared.stats[self.id];
                s.records.store(self.index.records(), Relaxed);
                s.tombstones.store(self.index.tombstones(), Relaxed);
            }
            if self.stopping.is_some() {
                // A wblock walk in progress ends now (at most a wblock's worth of work): its
                // copies are flushed with the rest below.
                while self.defrag.job.is_some() {
                    self.defrag_slice();
                }
            }
            if let Some(done) = self.stopping.take() {
                if self.writes.is_empty()
                    && self.deferred.is_empty()
                    && self.fsyncs.is_empty()
                    && self.reads.is_empty()
                    && self.defrag.reads.is_empty()
                    && self.scrubs.is_empty()
                {
                    if self.open.iter().flatten().any(|o| o.pos > o.flushed) {
                        // Commands whose reads were in flight when the stop began have
                        // written since: flush them too.
                        for s in 0..self.open.len() {
                            self.flush(s, true);
                        }
                        self.stopping = Some(done);
                    } else if self.unsynced_first.iter().any(|&f| f != u64::MAX) {
                        self.fsync_all();
                        self.stopping = Some(done);
                    } else {
                        // Everything is written and durable: no flush is left waiting.
                        self.check_flush_waiters();
                        self.publish_stats();
                        self.release_buffers();
                        done();
                        return;
                    }
                } else {
                    self.stopping = Some(done);
                }
            }
            // Nothing left to take from the channel (and no wblock walk going on): wait in the
            // ring for a completion, the doorbell or the next timer, instead of turning with a
            // non-waiting submit.
            let mut idle = (self.rx.is_empty() && self.defrag.job.is_none()) || self.stopping.is_some();
            if self.hook.is_some() && (did > 0 || self.forward_backlog() > 0) {
                // The hook's sockets are not visible to the channel check: go round again
                // while it is busy.
                idle = false;
            } else if idle && self.stopping.is_none() && self.writes.is_empty() && self.fsyncs.is_empty() {
                // Keep looking at the channel (and the hook's queues and the ring) for a
                // while before paying for a sleep and a doorbell: waking a sleeping thread
                // costs tens of microseconds on a virtual machine, whose idle CPU halts.
                // Between looks the CPU goes to any other thread that wants it (a client on
                // the same machine, the loop device's worker). Not while device writes are in
                // flight: polling then delayed their completion (on a loop device, whose
                // worker needs the CPU) until up to 32 MiB of writes were queued and client
                // writes got DEVICE_OVERLOAD.
                // What this turn queued (a shard without a front-end hook polls right after
                // taking requests) goes to the kernel before the poll, not after it.
                if let Err(e) = self.io.submit_and_wait(false, None) {
                    tracing::error!("shard {}: ring failed: {e}; latching read-only", self.id);
                    self.latch_read_only();
                }
                let spin_until = Instant::now() + Duration::from_micros(self.shared.cfg.spin_us);
                while Instant::now() < spin_until {
                    if !self.rx.is_empty() || self.hook_pending() || self.io.events_waiting() || self.sync_to_send() {
                        idle = false;
                        break;
                    }
                    std::thread::yield_now();
                }
            }
            if idle {
                self.doorbell.prepare_sleep();
                // Whoever queued something before seeing the flag did not ring: look again.
                if (!self.rx.is_empty() || self.hook_pending() || self.sync_to_send()) && self.stopping.is_none() {
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
            Msg::Many(mut msgs) => {
                fn cmd_of(m: &Msg) -> Option<&Command> {
                    match m {
                        Msg::Cmd(cmd, _) => Some(cmd),
                        _ => None,
                    }
                }
                self.run_prefetched(&mut msgs, cmd_of, Shard::handle);
            }
            Msg::Scan(req, cb) => self.start_scan(req, cb),
            Msg::Truncate { set_id, before_ms, done } => {
                self.truncate(set_id, before_ms);
                done();
            }
            Msg::Flush(done) => {
                for s in 0..self.open.len() {
                    self.flush(s, true);
                }
                self.flush_waiters.push((self.next_tag, done));
                self.check_flush_waiters();
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
            Msg::Adopt(a) => self.adopt(a),
        }
    }

    /// Answer a message that arrives while the shard stops, without executing it.
    fn refuse(&mut self, m: Msg) {
        match m {
            Msg::Cmd(_, cb) => cb(Reply::error(ResultCode::ServerError)),
            Msg::Many(msgs) => {
                for m in msgs {
                    self.refuse(m);
                }
            }
            Msg::Scan(_, cb) => cb(ScanPage { result: ResultCode::ServerError, records: Vec::new(), done: true }),
            Msg::Abort(done) => {
                self.aborted = true;
                done();
            }
            Msg::Stats(done) => {
                self.publish_stats();
                done();
            }
            // The stop in progress writes and fsyncs everything: a flush is answered once what
            // it covers is durable (at the latest when the stop ends).
            Msg::Flush(done) => {
                self.flush_waiters.push((u64::MAX, done));
                self.check_flush_waiters();
            }
            // A truncate is refused by the engine once it is stopping.
            Msg::Stop(done) | Msg::Truncate { done, .. } => done(),
            // The records stay where they are, counted live: a later run moves them.
            Msg::Adopt(_) => {}
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
        if cmd.is_write() && !cmd.delete && (!self.held.is_empty() || self.space_short()) {
            if self.stopping.is_none() && self.defrag_reclaiming() {
                return self.hold(cmd, cb);
            }
            // Nothing will free space soon: the writes held so far go first (they may fail);
            // if starting some set space winning in motion again, this one waits behind the rest.
            self.release_held();
        }
        // A delete does not wait for space, but nothing overtakes a write it follows.
        if cmd.is_write() && !self.held.is_empty() {
            return self.hold(cmd, cb);
        }
        self.admit(cmd, cb);
    }

    /// Queue a command behind the held writes (counted when it is a write waiting for space).
    fn hold(&mut self, cmd: Command, cb: Callback) {
        if !cmd.delete {
            self.shared.stats[self.id].writes_held_for_space.fetch_add(1, Relaxed);
        }
        self.held.push_back((cmd, cb, Instant::now()));
    }

    /// Start the held writes, in order, while there is room or nothing will free any (or
    /// the oldest has waited `MAX_HOLD`: a defrag that cannot finish must not hang writes).
    pub(super) fn release_held(&mut self) -> usize {
        let mut n = 0;
        while let Some((cmd, _, since)) = self.held.front() {
            // A delete at the head needs no space.
            let wait = !cmd.delete && self.stopping.is_none() && since.elapsed() < MAX_HOLD;
            if wait && self.space_short() && self.defrag_reclaiming() {
                break;
            }
            let (cmd, cb, _) = self.held.pop_front().expect("not empty");
            self.admit(cmd, cb);
            n += 1;
        }
        n
    }

    fn admit(&mut self, cmd: Command, cb: Callback) {
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
        if (self.read_only && cmd.is_write()) || self.is_lost(&cmd.digest) {
            // A failed device write latched the shard: the index may now say less than the
            // device holds (a delete whose tombstone never landed), so no write, not even a
            // delete that would find nothing, is answered as if it had taken effect; nor is
            // a read of a record whose write failed, which would answer with a version the
            // device may not hold.
            cb(Reply::error(ResultCode::ServerError));
            return;
        }
        let entry = self.index.get(&cmd.digest).filter(|e| self.visible(e));
        let Some(e) = entry else {
            self.finish(cmd, cb, None);
            return;
        };
        if !needs_body(&cmd, &e) {
            self.finish(cmd, cb, Some(meta_only(&e)));
            return;
        }
        if let Some(cur) = self.current_without_read(&cmd, &e) {
            self.shared.stats[self.id].update_reads_skipped.fetch_add(1, Relaxed);
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

    /// The current version as far as a write needs it, without reading the record, in two
    /// cases. A create-only write or a failing generation check: the answer is an error
    /// whatever the bins are (unless a sent key must first be compared with the stored one).
    /// An update that writes (with a value) every bin the record has and nothing but that:
    /// the merge then keeps the old bins' names and order and none of their values, so they
    /// stand in as `Nil`s that the writes replace. None when the record must be read: another
    /// op (read, incr, append, touch, a bin deleted), a policy that is not a merge, a stored
    /// key (a sent one must be compared with it), or bin names not known or not all written.
    /// A damaged old copy, which a read would have answered with SERVER_ERROR, is then not
    /// looked at: the write replaces it, or fails, as it would over a sound one.
    fn current_without_read(&self, cmd: &Command, e: &IndexEntry) -> Option<Current> {
        match self.read_skipped(cmd, e)? {
            None => Some(meta_only(e)),
            Some(names) => {
                let bins = names.iter().map(|n| Bin { name: n.clone(), value: Value::Nil }).collect();
                Some(Current { bins, ..meta_only(e) })
            }
        }
    }

    /// The decision of [`Shard::current_without_read`], without building anything: `None`
    /// when the record must be read; `Some(None)` when its metadata answers; `Some(names)`
    /// when the merge keeps these bin names.
    fn read_skipped(&self, cmd: &Command, e: &IndexEntry) -> Option<Option<&[String]>> {
        if !(e.key_stored && cmd.key.is_some()) && ops::fails_on_meta(cmd, e.generation) {
            return Some(None);
        }
        let merge = matches!(cmd.exists, ExistsAction::Update | ExistsAction::UpdateOnly);
        if !merge || cmd.delete || cmd.read_all || e.key_stored || cmd.ops.is_empty() {
            return None;
        }
        if !cmd.ops.iter().all(|o| matches!(o, Op::Write(_, v) if !matches!(v, Value::Nil))) {
            return None;
        }
        let names = self.binsets.names(e.binset)?;
        if !names.iter().all(|n| cmd.ops.iter().any(|o| o.bin_name() == n)) {
            return None;
        }
        Some(Some(names))
    }

    /// Whether [`Shard::start_cmd`] will need the record's bytes for `cmd`, its index entry
    /// being `e`.
    pub(super) fn reads_body(&self, cmd: &Command, e: &IndexEntry) -> bool {
        self.visible(e) && needs_body(cmd, e) && self.read_skipped(cmd, e).is_none()
    }

    /// Apply the command and carry out its outcome; then let queued writes of the digest go.
    fn finish(&mut self, cmd: Command, cb: Callback, cur: Option<Current>) {
        if !cmd.is_write() {
            // The record read is not needed after the reply: its bins move into it.
            let digest = cmd.digest;
            cb(ops::read(&cmd, cur));
            self.release_busy(digest);
            return;
        }
        let outcome = ops::apply(&cmd, cur.as_ref(), self.now_secs, self.shared.cfg.default_ttl_secs);
        let digest = cmd.digest;
        match outcome {
            Outcome::Reply(r) => cb(r),
            Outcome::Store { generation, void_time, key, bins, reply } => {
                let meta = RecordMeta {
                    digest,
                    generation,
                    void_time,
                    last_update_ms: self.lut_now(),
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
                    last_update_ms: self.lut_now(),
                    seq: self.next_seq,
                    tombstone: true,
                };
                self.store(&cmd.set, meta, None, &[], reply, cb);
            }
        }
        self.release_busy(digest);
    }

    /// Whether the shard is latched and the record's latest write may not be on the device
    /// (see `lost`; the set is looked at only once the shard is latched).
    pub(super) fn is_lost(&self, d: &Digest) -> bool {
        self.read_only && (self.lost_all || self.lost.contains(d))
    }

    fn release_busy(&mut self, digest: Digest) {
        if self.busy.is_empty() {
            // The usual case, without hashing the digest.
            return;
        }
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
        // A command without a set name (an engine-level delete, an expiry tombstone) keeps
        // the set of the version it replaces.
        let inherited;
        let (set, set_id) = if set.is_empty() {
            match self.index.get(&meta.digest).filter(|o| o.set_id != 0) {
                Some(o) => {
                    inherited = self.shared.sets.name(o.set_id);
                    (inherited.as_str(), o.set_id)
                }
                None => ("", 0),
            }
        } else {
            match self.set_id(set) {
                Some(id) => (set, id),
                None => {
                    cb(Reply::error(ResultCode::Forbidden));
                    return;
                }
            }
        };
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
        let mut entry = IndexEntry::of_record(&meta, loc, set_id, key.is_some());
        entry.binset = self.binsets.id_of(bins);
        let old = self.index.upsert_marking_fresh(entry);
        self.shared.stats[self.id].client_write_bytes.fetch_add(plen as u64, Relaxed);
        if let Some(o) = old {
            self.release_after_flush(slot(dev, CLIENT), o.loc);
        }
        let open = self.open[slot(dev, CLIENT)].as_mut().expect("append leaves an open wblock");
        open.digests.push(meta.digest);
        if self.shared.cfg.commit_to_device {
            open.acks.push((cb, reply));
        } else {
            cb(reply);
        }
    }
}

impl Shard {
    pub(crate) fn id(&self) -> usize {
        self.id
    }

    /// A command from this shard's hook: queue it here (`local`, run by [`Shard::run_local`]),
    /// or for its owner.
    pub(crate) fn submit_from_hook(&mut self, cmd: Command, cb: Callback) {
        if self.stopping.is_some() {
            cb(Reply::error(ResultCode::ServerError));
            return;
        }
        let owner = self.owner_of(&cmd.digest);
        if owner == self.id {
            self.local.push((cmd, cb));
        } else {
            self.forward[owner].push(Msg::Cmd(cmd, cb));
        }
    }

    /// Run the hook's commands for this shard, in the order submitted, after asking the
    /// CPU for the memory they will touch ([`Shard::prefetch_cmds`]).
    pub(crate) fn run_local(&mut self) {
        if self.local.is_empty() {
            return;
        }
        let mut local = std::mem::take(&mut self.local);
        self.run_prefetched(
            &mut local,
            |(cmd, _)| Some(cmd),
            |shard, (cmd, cb)| {
                // A stop begins only between turns, when this queue is empty; should that ever
                // change, what was queued is answered, not run after the flush.
                if shard.stopping.is_some() {
                    cb(Reply::error(ResultCode::ServerError));
                } else {
                    shard.submit_cmd(cmd, cb);
                }
            },
        );
        if self.local.is_empty() {
            self.local = local;
        }
    }

    /// Run `items` in order with `run`, [`PREFETCH_WINDOW`] at a time, each window after
    /// [`Shard::prefetch_cmds`] for the commands in it (`cmd_of`). Leaves `items` empty.
    fn run_prefetched<T>(
        &mut self,
        items: &mut Vec<T>,
        cmd_of: fn(&T) -> Option<&Command>,
        mut run: impl FnMut(&mut Shard, T),
    ) {
        let mut it = items.drain(..);
        while !it.as_slice().is_empty() {
            let w = it.as_slice().len().min(PREFETCH_WINDOW);
            self.prefetch_cmds(it.as_slice()[..w].iter().filter_map(cmd_of));
            for item in it.by_ref().take(w) {
                run(self, item);
            }
        }
    }

    pub(crate) fn owner_of(&self, d: &Digest) -> usize {
        self.shared.shard_of_partition(d.partition())
    }

    fn hook_pending(&self) -> bool {
        self.hook.as_ref().is_some_and(|h| h.pending())
    }

    pub(crate) fn forward_backlog(&self) -> usize {
        self.forward.iter().map(Vec::len).sum()
    }

    /// A scan page for the hook: run here, or queue it for the partition's owner.
    pub(crate) fn scan_from_hook(&mut self, mut req: ScanReq, cb: ScanCallback) {
        req.pid &= 0x0fff;
        if self.stopping.is_some() {
            cb(ScanPage { result: ResultCode::ServerError, records: Vec::new(), done: true });
            return;
        }
        let owner = self.shared.shard_of_partition(req.pid);
        if owner == self.id {
            self.start_scan(req, cb);
        } else {
            self.forward[owner].push(Msg::Scan(req, cb));
        }
    }

    pub(crate) fn set_id_of(&self, name: &str) -> Option<u16> {
        self.shared.sets.id(name)
    }

    /// Hand each destination its queued messages in one message, without blocking: a full
    /// channel keeps them for the next turn.
    pub(crate) fn hand_over_forwards(&mut self) {
        for dest in 0..self.forward.len() {
            if self.forward[dest].is_empty() {
                continue;
            }
            let batch = std::mem::take(&mut self.forward[dest]);
            let (tx, bell) = &self.peers[dest];
            match tx.try_send(Msg::Many(batch)) {
                Ok(()) => bell.ring_if_sleeping(),
                Err(TrySendError::Full(Msg::Many(batch))) => {
                    self.forward[dest] = batch;
                    bell.ring_if_sleeping();
                }
                Err(TrySendError::Disconnected(m)) => self.refuse(m),
                Err(_) => unreachable!("the message sent was Many"),
            }
        }
    }

    /// The id of a (non-empty) set name; `None` when the namespace has too many sets.
    fn set_id(&mut self, name: &str) -> Option<u16> {
        if let Some(&id) = self.set_ids.get(name) {
            return Some(id);
        }
        let id = self.shared.sets.intern(name)?;
        self.set_ids.insert(name.to_string(), id);
        Some(id)
    }

    /// The last-update time of a write made now.
    fn lut_now(&self) -> u64 {
        now_cl_ms().max(self.lut_floor)
    }

    /// Drop the entries a truncate covers and give their space back.
    fn truncate(&mut self, set_id: Option<u16>, before_ms: u64) {
        self.lut_floor = self.lut_floor.max(before_ms);
        let cutoff = lut_mask(before_ms);
        let doomed = self.index.remove_where(self.shared.partitions_of(self.id), |e| {
            set_id.is_none_or(|s| e.set_id == s) && e.last_update_ms < cutoff
        });
        let mut gone = 0u64;
        for e in doomed {
            self.release(e.loc);
            gone += !e.tombstone as u64;
        }
        self.shared.stats[self.id].truncated.fetch_add(gone, Relaxed);
        self.publish_stats();
        tracing::info!("shard {}: truncate removed {gone} records", self.id);
    }
}

impl From<DeviceError> for ResultCode {
    fn from(_: DeviceError) -> ResultCode {
        ResultCode::ServerError
    }
}

/// Whether `cmd` needs the current version's bins or stored key, before the shortcuts of
/// [`Shard::current_without_read`]: to read them, merge them, or compare a stored key
/// (which the command does not send) when it writes.
fn needs_body(cmd: &Command, e: &IndexEntry) -> bool {
    ops::needs_bins(cmd) || (cmd.is_write() && !cmd.delete && e.key_stored && cmd.key.is_none())
}

/// The current version as far as the index knows it: generation and expiry, no key, no bins.
fn meta_only(e: &IndexEntry) -> Current {
    Current { generation: e.generation, void_time: e.void_time, key: None, bins: Vec::new() }
}
