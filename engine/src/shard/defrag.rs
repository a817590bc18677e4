//! Defragmentation, space accounting and expiry, inside the shard loop.
//!
//! - A wblock of this shard whose live bytes fall below `defrag-lwm-pct` of its size (and
//!   that is not in the post-write cache) is queued, emptiest first, unless all its live
//!   bytes only wait for the write of their newer copies to be released (it then frees
//!   itself). One wblock at a time is read, in pieces of `READ_PIECE_BYTES` one after
//!   another (so client reads queue behind a piece, not a whole wblock); every record the
//!   index still points at (exact location match) is copied into the device's defrag write
//!   stream with its
//!   checksum re-bound to the new place and its sequence unchanged, and the index is
//!   repointed. The copies are written with RWF_DSYNC and the source's bytes are released
//!   only when they complete, so the source returns to the free list only once every copy
//!   made from it is durable. The defrag stream's open wblock is sealed when full, or when
//!   nothing has qualified for `defrag_idle_seal_ms` or it has been open that long (not at
//!   once: see `defrag_tick`); sealed sparse then, it is not a candidate until some of its
//!   live bytes go (else it would be defragmented into a new wblock, and so on).
//!   `defrag-sleep` separates two wblocks, bounding defrag's share of the device. The
//!   wblock read is walked a slice at a time, one slice per loop turn,
//!   so verifying and copying a whole wblock (up to a millisecond of work) never holds the
//!   shard's clients up for more than a slice's worth; the wblock cannot be freed, and so
//!   reused, until its walk ends.
//! - Tombstones: a tombstone hides older data copies of its digest from a cold start. It is
//!   dropped only when every data record that a cold start could still find on the devices is
//!   newer than it (`Shared::data_floor`), so no older copy can exist.
//! - Expiry (`nsup-period`): an expired record created when its digest had no index entry
//!   ("fresh": no older data copy exists) leaves the index and frees its bytes; any other
//!   expired record is replaced by a tombstone, so an older copy can never come back.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::write::Hold;
use super::{slot, Reply, Shard, WState, DEFRAG};
use crate::coldstart::{walk_step, Walk, WALK_STEP};
use crate::format::{RecordMeta, RECORD_HEADER_BYTES, WBLOCK_HEADER_BYTES};
use crate::index::{IndexEntry, Loc};
use crate::io::{AlignedBuf, IoCompletion, IoOp, IoRequest};
use crate::shared::NO_WRITER;
use crate::types::{Digest, ResultCode};

/// Below this share of free wblocks defrag runs without pausing between wblocks.
const URGENT_AVAIL_PCT: f64 = 20.0;
/// Free wblocks above the defrag reserve below which client writes wait for defrag.
const HOLD_MARGIN_WBLOCKS: usize = 4;
/// How often a shard short of space with no defrag under way looks for candidates.
const LOOK_EVERY: Duration = Duration::from_millis(20);

/// How long a defrag walk goes on with the same data floor (`cached_data_floor`).
const FLOOR_EVERY: Duration = Duration::from_secs(1);

/// Most wblocks taken into the queue per refill.
const QUEUE_REFILL: usize = 64;
/// Most candidates a look or a pass holds before it drops all but the `QUEUE_REFILL`
/// emptiest (only those are queued): a pass over 2^20 wblocks holds this many, not one
/// per candidate.
const FOUND_CAP: usize = 4 * QUEUE_REFILL;

/// Add a candidate (live bytes, device, wblock) to `found`, keeping its length at most
/// `FOUND_CAP`: when full it keeps the `QUEUE_REFILL` smallest. The `QUEUE_REFILL` smallest
/// of everything ever added are always among those kept, so `enqueue_emptiest` queues what
/// it would have from the whole list.
fn keep_emptiest(found: &mut Vec<(u32, u32, u32)>, c: (u32, u32, u32)) {
    found.push(c);
    if found.len() >= FOUND_CAP {
        found.select_nth_unstable(QUEUE_REFILL - 1);
        found.truncate(QUEUE_REFILL);
    }
}

/// Bytes of a wblock image walked per loop turn (a sixteenth of a 1 MiB wblock).
const SLICE_BYTES: usize = 64 * 1024;

/// A wblock is read for defrag in pieces of at most this size, each issued when the one
/// before has completed, so a client read queued on the device waits behind a piece rather
/// than behind the whole wblock.
const READ_PIECE_BYTES: u64 = 128 * 1024;

#[derive(Default)]
pub(super) struct DefragState {
    queue: VecDeque<(u32, u32)>,
    /// Wblock reads in flight (one piece at a time): tag → (device, wblock).
    pub(super) reads: HashMap<u64, (u32, u32)>,
    /// The image of the wblock being read, filled a piece at a time, and its bytes so far.
    image: Option<AlignedBuf>,
    got: usize,
    /// The buffer pieces are read into, kept between reads.
    piece: Option<AlignedBuf>,
    next_at: Option<Instant>,
    /// The pass for candidates under way, a share of the wblocks per look.
    pass: Pass,
    /// `Shared::data_floor` and when it was computed (`cached_data_floor`).
    floor: Option<(Instant, u64)>,
    /// Since when no wblock has qualified (None while defrag has work): the defrag
    /// streams' open outputs are sealed once this is `defrag_idle_seal_ms` old.
    idle_since: Option<Instant>,
    /// When `defrag_reclaiming` last flushed open wblocks or looked for candidates.
    last_look: Option<Instant>,
    /// The wblock being walked (read in full, state `Defrag`).
    pub(super) job: Option<DefragJob>,
    /// Wblocks whose defrag read failed, and when: left alone for
    /// `defrag_retry_unreadable_ms`, or until they are freed.
    pub(super) unreadable: HashMap<(u32, u32), Instant>,
    /// Defrag's own output wblocks, sealed sparse (when defrag had been idle, or when opened
    /// before the next wblock to move), with their live bytes then: not candidates until
    /// some of those bytes go, or they are freed.
    pub(super) rested: HashMap<(u32, u32), u32>,
    /// Wblocks to be moved whatever their fill: dead data in them, older than their live
    /// records, holds tombstones back (see `unblock_tombstones`). Moving the live records
    /// out and freeing the wblock lets the floor rise to the oldest of those.
    pub(super) floor_moves: HashSet<(u32, u32)>,
}

/// Where an idle defrag's pass for candidates has got to, and what it found so far
/// (live bytes, device, wblock).
#[derive(Default)]
struct Pass {
    dev: usize,
    w: usize,
    found: Vec<(u32, u32, u32)>,
}

pub(super) struct DefragJob {
    dev: u32,
    w: u32,
    buf: AlignedBuf,
    /// Where the walk goes on.
    pos: usize,
    moved: u64,
    /// Records of other shards' partitions found so far, by shard: handed to them at the
    /// end of the walk.
    foreign: Vec<Vec<Foreign>>,
}

/// Records of one shard's partitions that another shard's defrag found in wblock `w` of
/// device `dev`, one of its own: after a change of the shard count a wblock can hold any
/// shard's records, and only the shard whose partitions they are can tell whether they
/// are live (its index) and copy them (into its own wblocks).
pub(crate) struct Adoption {
    dev: u32,
    w: u32,
    recs: Vec<Foreign>,
}

/// One record of an [`Adoption`]: where it is in the wblock, and its image as read.
struct Foreign {
    off: u32,
    digest: Digest,
    seq: u64,
    image: Vec<u8>,
}

impl Shard {
    /// Free-wblock share of this shard, in percent.
    pub(super) fn avail_pct(&self) -> f64 {
        let total = self.shared.stats[self.id].total_wblocks.load(Relaxed);
        if total == 0 {
            return 0.0;
        }
        let free: usize = self.free.iter().map(|f| f.len()).sum();
        100.0 * free as f64 / total as f64
    }

    /// Whether a client write now could leave the shard without free space: free space is
    /// within a point of `stop-writes-avail-pct`, or a device is down to
    /// `HOLD_MARGIN_WBLOCKS` above the reserve kept for defrag.
    pub(super) fn space_short(&self) -> bool {
        self.avail_pct() < self.shared.cfg.stop_writes_avail_pct as f64 + 1.0
            || self.free.iter().any(|f| f.len() <= self.reserve_wblocks + HOLD_MARGIN_WBLOCKS)
    }

    /// Whether space is being won back: a defrag read, walk or queue under way, or device
    /// writes in flight (or deferred, `Shard::deferred`) whose completion releases the
    /// copies they replace. With none,
    /// writes the open wblocks holding such copies, or else looks for defrag candidates (at
    /// most every `LOOK_EVERY`). A client write arriving while space is short waits for
    /// this instead of failing; it fails (stop-writes, OUT_OF_SPACE) only when the device
    /// holds nothing to reclaim (or after `MAX_HOLD`).
    pub(super) fn defrag_reclaiming(&mut self) -> bool {
        if self.read_only {
            return false;
        }
        if self.defrag.job.is_some()
            || !self.defrag.reads.is_empty()
            || !self.defrag.queue.is_empty()
            || self.writes.values().any(|w| !w.releases.is_empty())
            || self.deferred_releases()
        {
            return true;
        }
        // At most every LOOK_EVERY: each flush pads a partial wblock to 4 KiB, which must not
        // eat the space it is meant to win.
        if self.defrag.last_look.is_some_and(|t| t.elapsed() < LOOK_EVERY) {
            return false;
        }
        self.defrag.last_look = Some(Instant::now());
        // Copies replaced by writes still in an open wblock count as live until it is
        // written: write them now (as `flush-max-ms` would later), so defrag sees the
        // space they free.
        let mut flushing = false;
        for s in 0..self.open.len() {
            if self.open[s].as_ref().is_some_and(|o| o.pos > o.flushed && !o.releases.is_empty()) {
                // Defrag copies are written with DSYNC, as always: their completion releases
                // the originals.
                self.flush(s, s % 2 == DEFRAG);
                flushing = true;
            }
        }
        if flushing {
            return true;
        }
        self.refill_defrag_queue();
        !self.defrag.queue.is_empty()
    }

    /// Whether every live byte of a wblock waits only for a pending write to be released:
    /// it then frees itself once those writes land, and reading it would copy nothing.
    fn frees_itself(&self, dev: u32, w: u32) -> bool {
        self.shared.live(dev, w) <= self.pending_release[dev as usize][w as usize]
    }

    /// Whether a wblock holds live bytes, fewer than `defrag-lwm-pct` of its size.
    fn sparse(&self, dev: u32, w: u32) -> bool {
        let live = self.shared.live(dev, w) as u64;
        live > 0 && live * 100 < self.shared.cfg.defrag_lwm_pct as u64 * self.wb()
    }

    fn defrag_eligible(&self, dev: u32, w: u32) -> bool {
        if self.wstate[dev as usize][w as usize] != WState::Used || self.frees_itself(dev, w) {
            return false;
        }
        // A floor move also takes a wblock in the post-write cache (the idle device that
        // needs one may never push it out), once all its writes are done.
        (self.defrag.floor_moves.contains(&(dev, w))
            && self.mem.get(&(dev, w)).is_none_or(|m| m.sealed && m.inflight == 0))
            || (!self.mem.contains_key(&(dev, w))
                && self.sparse(dev, w)
                && self.defrag.rested.get(&(dev, w)).is_none_or(|&at| self.shared.live(dev, w) < at))
    }

    /// Queue the emptiest candidates of the whole of this shard's devices (at once: for a
    /// shard short of space).
    fn refill_defrag_queue(&mut self) {
        let mut found = Vec::new();
        for d in 0..self.wstate.len() {
            self.find_candidates(d, 1..self.wstate[d].len(), &mut found);
        }
        self.enqueue_emptiest(found);
    }

    /// The idle defrag's look for candidates: the next `defrag_look_wblocks` wblocks of the
    /// pass under way, and when that ends the pass, its emptiest candidates queued. A look
    /// that does not end a pass queues nothing. A pass over a large device is so spread
    /// over several looks, and no loop turn spends more than a bounded time on it: a whole
    /// pass over the 2^20 wblocks of a 1 TiB device every 20 ms took the p99 of cached
    /// reads from 0.45 to 2.1 ms.
    fn look_for_candidates(&mut self) {
        let mut pass = std::mem::take(&mut self.defrag.pass);
        let mut budget = self.shared.cfg.defrag_look_wblocks.max(1);
        while pass.dev < self.wstate.len() && budget > 0 {
            let from = pass.w.max(1);
            let to = (from + budget).min(self.wstate[pass.dev].len());
            self.find_candidates(pass.dev, from..to, &mut pass.found);
            budget -= to.saturating_sub(from).max(1);
            if to >= self.wstate[pass.dev].len() {
                pass.dev += 1;
                pass.w = 1;
            } else {
                pass.w = to;
            }
        }
        if pass.dev < self.wstate.len() {
            self.defrag.pass = pass;
        } else {
            self.enqueue_emptiest(pass.found);
        }
    }

    /// The defrag candidates among wblocks `ws` of device `d`, as (live bytes, device, wblock),
    /// added to `found`, which keeps only the emptiest (see `keep_emptiest`).
    fn find_candidates(&self, d: usize, ws: std::ops::Range<usize>, found: &mut Vec<(u32, u32, u32)>) {
        for w in ws {
            if self.wstate[d][w] == WState::Used
                && self.defrag_eligible(d as u32, w as u32)
                && !self.unreadable_lately(d as u32, w as u32)
            {
                keep_emptiest(found, (self.shared.live(d as u32, w as u32), d as u32, w as u32));
            }
        }
    }

    fn enqueue_emptiest(&mut self, mut found: Vec<(u32, u32, u32)>) {
        found.sort_unstable();
        self.defrag.queue.extend(found.into_iter().take(QUEUE_REFILL).map(|(_, d, w)| (d, w)));
        self.shared.stats[self.id].defrag_queue.store(self.defrag.queue.len() as u64, Relaxed);
    }

    /// Whether wblock `w` of `dev` was opened after the defrag stream's open output wblock
    /// there (false when there is none).
    fn newer_than_output(&self, dev: u32, w: u32) -> bool {
        let seq = |w: u32| self.shared.devs[dev as usize].seq[w as usize].load(Relaxed);
        self.open[slot(dev, DEFRAG)].as_ref().is_some_and(|o| seq(o.w) < seq(w))
    }

    /// Seal the defrag stream's open wblock on `dev`, if any. A sparse one is remembered with
    /// its live bytes (`DefragState::rested`) and is not a candidate until some of them go.
    fn seal_defrag_output(&mut self, dev: u32) {
        let s = slot(dev, DEFRAG);
        if let Some(o) = self.open[s].as_ref() {
            if self.sparse(o.dev, o.w) {
                self.defrag.rested.insert((o.dev, o.w), self.shared.live(o.dev, o.w));
            }
            self.seal(s);
        }
    }

    /// Start the next wblock's defrag when none is in flight and the pause has passed.
    pub(super) fn defrag_tick(&mut self) {
        if self.defrag.job.is_some() {
            self.defrag_slice();
            return;
        }
        if !self.defrag.reads.is_empty() || self.read_only {
            return;
        }
        if self.defrag.next_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        if self.defrag.queue.is_empty() {
            self.look_for_candidates();
            if self.defrag.queue.is_empty() {
                // Nothing qualifies (or the pass has not ended yet). The defrag streams'
                // partly filled outputs stay open for the next candidates. Sealing one now
                // would retire it to the post-write cache and push the cache's oldest
                // wblock out; when that one is sparse it qualifies next, goes into a new
                // output that is sealed in turn, and so on through the whole cache: a
                // wblock read and a synced write for every wblock freed and another one used
                // (what followed every burst of updates before).
                //
                // They are sealed once nothing has qualified for `defrag_idle_seal_ms`, or
                // one has been open that long, so that the copies in them can age out like
                // any other data (a dead copy in a wblock left open holds back tombstone
                // collection: its sequence bounds the oldest data on the device until the
                // wblock is freed). One whose copies have all died is sealed at once when
                // space is short, so that it is freed (not one still holding some: that
                // would use a wblock per candidate just when space is short). A sparse one
                // is remembered with its live bytes and is not a candidate until some of
                // them go: else it would be defragmented as soon as it left the post-write
                // cache, into a new output wblock sealed sparse in turn, and so on for ever.
                // Look again a little later.
                let now = Instant::now();
                let idle_since = *self.defrag.idle_since.get_or_insert(now);
                let limit = Duration::from_millis(self.shared.cfg.defrag_idle_seal_ms);
                let idle = now.duration_since(idle_since) >= limit;
                let short = self.space_short();
                for d in 0..self.wstate.len() {
                    let Some(o) = self.open[slot(d as u32, DEFRAG)].as_ref() else { continue };
                    let dead = self.shared.live(o.dev, o.w) == 0;
                    if idle || now.duration_since(o.opened) >= limit || (short && dead) {
                        self.seal_defrag_output(d as u32);
                    }
                }
                self.defrag.next_at = Some(now + Duration::from_millis(20));
                return;
            }
        }
        self.defrag.idle_since = None;
        while let Some((dev, w)) = self.defrag.queue.pop_front() {
            if !self.defrag_eligible(dev, w) || self.unreadable_lately(dev, w) {
                continue;
            }
            self.wstate[dev as usize][w as usize] = WState::Defrag;
            let image = self.io.alloc(self.wb() as usize);
            self.defrag.image = Some(image);
            self.defrag.got = 0;
            self.read_piece(dev, w);
            break;
        }
        self.shared.stats[self.id].defrag_queue.store(self.defrag.queue.len() as u64, Relaxed);
    }

    /// How long a wblock whose defrag read failed is left alone.
    fn retry_unreadable(&self) -> Duration {
        Duration::from_millis(self.shared.cfg.defrag_retry_unreadable_ms)
    }

    /// Whether defrag failed to read the wblock less than `retry_unreadable` ago.
    fn unreadable_lately(&self, dev: u32, w: u32) -> bool {
        self.defrag.unreadable.get(&(dev, w)).is_some_and(|t| t.elapsed() < self.retry_unreadable())
    }

    /// Read the next piece of the wblock being read for defrag.
    fn read_piece(&mut self, dev: u32, w: u32) {
        let wb = self.wb();
        let at = self.defrag.got as u64;
        let len = READ_PIECE_BYTES.min(wb - at) as usize;
        let buf = match self.defrag.piece.take() {
            Some(b) if b.len() == len => b,
            _ => AlignedBuf::new(len),
        };
        let tag = self.tag();
        self.io.push(IoRequest { tag, dev, offset: w as u64 * wb + at, op: IoOp::Read { buf } });
        self.defrag.reads.insert(tag, (dev, w));
    }

    pub(super) fn defrag_read_done(&mut self, dev: u32, w: u32, c: IoCompletion) {
        let IoOp::Read { buf: piece } = c.op else { unreachable!("defrag issues reads") };
        let Some(mut image) = self.defrag.image.take() else { unreachable!("a piece read has its image") };
        let give_up = match &c.result {
            Err(e) => {
                tracing::error!(
                    "shard {}: defrag read of device {dev} wblock {w} failed: {e}; trying it again in {:?}",
                    self.id,
                    self.retry_unreadable()
                );
                self.shared.stats[self.id].defrag_read_errors.fetch_add(1, Relaxed);
                self.defrag.unreadable.insert((dev, w), Instant::now());
                true
            }
            // Stopping, or latched read-only: the rest of the wblock is not worth reading.
            Ok(_) => self.stopping.is_some() || self.read_only,
        };
        if give_up {
            self.io.free(image);
            self.wstate[dev as usize][w as usize] = WState::Used;
            // Its last live bytes may have been released while it was being read.
            self.maybe_free(dev, w);
            self.defrag_pause();
            return;
        }
        let at = self.defrag.got;
        image[at..at + piece.len()].copy_from_slice(&piece);
        self.defrag.got += piece.len();
        self.defrag.piece = Some(piece);
        if self.defrag.got < image.len() {
            self.defrag.image = Some(image);
            self.read_piece(dev, w);
            return;
        }
        let buf = image;
        let stats = &self.shared.stats[self.id];
        stats.defrag_reads.fetch_add(1, Relaxed);
        stats.defrag_read_bytes.fetch_add(self.wb(), Relaxed);
        self.defrag.job = Some(DefragJob { dev, w, buf, pos: WBLOCK_HEADER_BYTES, moved: 0, foreign: Vec::new() });
        self.defrag_slice();
    }

    /// Pause between wblocks to leave the device to clients, unless space is short.
    fn defrag_pause(&mut self) {
        let pause = if self.avail_pct() < URGENT_AVAIL_PCT { 0 } else { self.shared.cfg.defrag_sleep_us };
        self.defrag.next_at = Some(Instant::now() + Duration::from_micros(pause));
    }

    /// Walk the next slice of the wblock being defragmented: every record the index still
    /// points at (exact location) is copied into the defrag stream and repointed. At the end
    /// of the wblock the copies are flushed, and the wblock can be freed once they are
    /// durable.
    pub(super) fn defrag_slice(&mut self) {
        let Some(mut job) = self.defrag.job.take() else { return };
        let (dev, w) = (job.dev, job.w);
        let wb = self.wb();
        let device_id = self.shared.devs[dev as usize].header.device_id;
        let floor = self.cached_data_floor();
        let slice_end = job.pos + SLICE_BYTES;
        let mut stopped = false;
        let mut moved = 0u64;
        while job.pos + RECORD_HEADER_BYTES <= job.buf.len() && job.pos < slice_end {
            if self.read_only {
                // A failed write latched the shard between slices: copy nothing more (the
                // wblock keeps what was not copied).
                stopped = true;
                break;
            }
            let (meta, plen) = match walk_step(&job.buf, job.pos, device_id, dev, w) {
                Walk::Skip(n) => {
                    job.pos += n;
                    continue;
                }
                Walk::Bad(_) => {
                    job.pos += WALK_STEP;
                    continue;
                }
                Walk::Record { meta, plen, .. } => (meta, plen),
            };
            let off = job.pos;
            job.pos += plen;
            let here = Loc { dev, offset: w as u64 * wb + off as u64, size: plen as u32 };
            let owner = self.shared.shard_of_partition(meta.digest.partition());
            if owner != self.id {
                job.foreign.resize_with(self.shared.n_shards, Vec::new);
                let image = job.buf[off..off + plen].to_vec();
                job.foreign[owner].push(Foreign { off: off as u32, digest: meta.digest, seq: meta.seq, image });
                continue;
            }
            // The image is the job's own and the walk is past this record: re-bind it in
            // place rather than through a copy.
            match self.defrag_record(w, here, &meta.digest, meta.seq, &mut job.buf[off..off + plen], floor) {
                Ok(n) => moved += n,
                Err(rc) => {
                    tracing::warn!("shard {}: defrag of device {dev} wblock {w} stopped: {rc:?}", self.id);
                    stopped = true;
                    break;
                }
            }
        }
        job.moved += moved;
        self.shared.stats[self.id].defrag_write_bytes.fetch_add(moved, Relaxed);
        if !stopped && job.pos + RECORD_HEADER_BYTES <= job.buf.len() {
            self.defrag.job = Some(job);
            return;
        }
        tracing::debug!("shard {}: defrag of device {dev} wblock {w} copied {} bytes", self.id, job.moved);
        self.defrag.floor_moves.remove(&(dev, w));
        self.io.free(job.buf);
        self.wstate[dev as usize][w as usize] = WState::Used;
        self.defrag_pause();
        // Make the copies durable now, so the source can be freed.
        self.flush(slot(dev, DEFRAG), true);
        self.maybe_free(dev, w);
        self.hand_over_foreign(dev, w, job.foreign);
    }

    /// Copy the record at `here` in wblock `w` (`image`, as read) into the defrag stream and
    /// repoint the index, if the index still points at it there; drop it instead if it is a
    /// tombstone older than `floor`. Returns the bytes copied; an error when no copy could
    /// be made (the walk stops).
    fn defrag_record(
        &mut self,
        w: u32,
        here: Loc,
        digest: &Digest,
        seq: u64,
        image: &mut [u8],
        floor: u64,
    ) -> Result<u64, ResultCode> {
        let dev = here.dev;
        // Only the copy the index points at is live; anything else here is an older
        // version, deleted, or a leftover of an earlier use of the wblock.
        let Some(e) = self.index.get(digest) else { return Ok(0) };
        if e.loc != here {
            return Ok(0);
        }
        let shared = self.shared.clone();
        let stats = &shared.stats[self.id];
        if e.tombstone && seq < floor {
            self.index.remove(digest);
            stats.tombstones_dropped.fetch_add(1, Relaxed);
            self.release(here);
            return Ok(0);
        }
        // Copies go only into a wblock written after their source, so that a cold start
        // finding both (the source freed and not yet reused) takes the copy
        // (`coldstart::keep_newest`). An output wblock opened before the source is sealed;
        // this copy opens a new one (and so does a full output: a new wblock is always the
        // newest). That happens at most once per refill of the queue: every wblock queued
        // existed before the new output was opened.
        if self.newer_than_output(dev, w) {
            self.seal_defrag_output(dev);
            stats.defrag_outputs_sealed_early.fetch_add(1, Relaxed);
        }
        let new_loc = self.append(dev, DEFRAG, image)?;
        self.index.upsert(IndexEntry { loc: new_loc, ..e });
        self.release_after_flush(slot(dev, DEFRAG), here);
        Ok(image.len() as u64)
    }

    /// Hand the records of other shards' partitions found in wblock `w` to those shards
    /// (`adopt`), without waiting: a shard whose channel is full does not get them now, and
    /// the wblock, still holding them, is walked again on a later pass. Once their copies
    /// are durable they release their bytes here, and `sweep_empty` frees the wblock.
    fn hand_over_foreign(&mut self, dev: u32, w: u32, foreign: Vec<Vec<Foreign>>) {
        for (shard, recs) in foreign.into_iter().enumerate() {
            if recs.is_empty() {
                continue;
            }
            let n = recs.len();
            let (tx, bell) = &self.peers[shard];
            match tx.try_send(super::Msg::Adopt(Adoption { dev, w, recs })) {
                Ok(()) => bell.ring_if_sleeping(),
                Err(_) => tracing::debug!(
                    "shard {}: {n} records of shard {shard} in device {dev} wblock {w} left for a later pass",
                    self.id
                ),
            }
        }
    }

    /// Copy out the records another shard's defrag found in one of its wblocks (see
    /// [`Adoption`]) that this shard's index still points at there, as its own defrag walk
    /// would, and make the copies durable at once, so that the wblock can be freed. Not when
    /// this shard is short of space: the copies would take the wblocks its own defrag and
    /// clients need (the records stay where they are, and a later pass sends them again).
    pub(super) fn adopt(&mut self, a: Adoption) {
        if self.read_only || self.space_short() {
            tracing::debug!(
                "shard {}: {} records in device {} wblock {} left where they are: {}",
                self.id,
                a.recs.len(),
                a.dev,
                a.w,
                if self.read_only { "read-only" } else { "space is short" }
            );
            return;
        }
        let floor = self.cached_data_floor();
        let wb = self.wb();
        let mut moved = 0;
        for mut f in a.recs {
            let here = Loc { dev: a.dev, offset: a.w as u64 * wb + f.off as u64, size: f.image.len() as u32 };
            match self.defrag_record(a.w, here, &f.digest, f.seq, &mut f.image, floor) {
                Ok(n) => moved += n,
                Err(rc) => {
                    tracing::warn!(
                        "shard {}: copying its records out of device {} wblock {} stopped: {rc:?}",
                        self.id,
                        a.dev,
                        a.w
                    );
                    break;
                }
            }
        }
        self.shared.stats[self.id].defrag_write_bytes.fetch_add(moved, Relaxed);
        self.flush(slot(a.dev, DEFRAG), true);
        if moved > 0 {
            // Defrag work, as a candidate of its own would be: the output stays open for
            // what comes next rather than being sealed sparse at the next idle look.
            self.defrag.idle_since = None;
        }
    }

    /// `Shared::data_floor`, computed at most once a `FLOOR_EVERY`: it goes over every
    /// wblock of every device (2^20 of them on a 1 TiB device, milliseconds of work), and a
    /// defrag walk needs it for every slice. A floor up to that old is safe to drop
    /// tombstones below: the floor over this shard's own copies only ever rises (a wblock's
    /// floor is let go of only when its next use's first write is durable, a wblock's writer
    /// only goes from none, an earlier run, to its owner, which counted it already, and only
    /// once that first write is done, and a defrag copy keeps its sequence, at or above its
    /// source's floor, which the source holds until the copy is durable), except from
    /// u64::MAX, when no data is counted at all, to the first record written after: hence
    /// the cap at the next record sequence, below which no record can be written. (The value
    /// computed can dip below the cached one when another shard writes into a wblock of an
    /// earlier run that every shard still counts; those copies are not this shard's.)
    fn cached_data_floor(&mut self) -> u64 {
        match self.defrag.floor {
            Some((at, floor)) if at.elapsed() < FLOOR_EVERY => floor,
            _ => {
                // Capped at the next record sequence: with no data counted at all the floor
                // is u64::MAX, and a record written within the second would be below it.
                let floor = self.shared.data_floor(self.id).min(self.next_seq);
                self.defrag.floor = Some((Instant::now(), floor));
                floor
            }
        }
    }

    /// Get the wblocks of this shard whose dead records hold kept tombstones back out of the
    /// way, so that a later sweep can drop them.
    /// - A free wblock's old records stay on the device (a cold start would find them) until
    ///   it is written again, which on a device with few writes may be never: it is given an
    ///   empty header (`scrub_free`). One an earlier run wrote counts in every shard's floor,
    ///   so any shard's kept tombstones (`ShardStats::oldest_kept_tomb`) are reason enough.
    /// - A used one of this shard (written by it, or by an earlier run: after any restart
    ///   every wblock is one), whose oldest data record is dead (its live records are all
    ///   newer), is moved whatever its fill (`DefragState::floor_moves`): a wblock that
    ///   holds mostly tombstones, live, would otherwise never qualify, and the dead records
    ///   written before them would keep every later tombstone too. Not one
    ///   whose oldest data record is live, nor anything above the oldest live record of the
    ///   shard: moving those would not raise the floor (copies keep their sequence).
    /// - An open wblock (client or defrag stream) is sealed when it is such a one, so that it
    ///   can be moved.
    ///
    /// `oldest`: this shard's oldest kept tombstone (u64::MAX: none); `live_min`: the oldest
    /// live data record of each of its wblocks, by device.
    fn unblock_tombstones(&mut self, oldest: u64, live_min: &[Vec<u64>]) {
        if self.read_only || live_min.is_empty() {
            self.scrub_queue.clear();
            return;
        }
        let shared = self.shared.clone();
        // The scrub queue is filled again only once it is empty (else each sweep would start
        // its waits again, those taking every shard's count): the wblocks freed since wait
        // for a later sweep. A count taken now covers whatever freed a wblock seen free
        // (`Shared::sub_live` orders another shard's release after its count).
        let refill = self.scrub_queue.is_empty();
        // The wblocks of earlier runs count in every shard's floor.
        let any_shard = (0..shared.n_shards).filter_map(|i| shared.kept_tomb(i)).max();
        // This shard's floor cannot pass its oldest live record: with a tombstone above that,
        // nothing done here would let it go.
        let live_floor = live_min.iter().flatten().copied().min().unwrap_or(u64::MAX);
        let own = (oldest < live_floor).then_some(oldest);
        let mut blocking: Vec<(u32, u32)> = Vec::new();
        // The other shards are asked for their fsyncs once, for the last (largest) counts.
        let mut ask: Option<Hold> = None;
        for (d, dev) in shared.devs.iter().enumerate() {
            for w in 1..dev.n_wblocks {
                let mut min = dev.min_seq[w as usize].load(Relaxed);
                if min == u64::MAX {
                    continue;
                }
                // Whose floors the wblock counts in (as `Shared::data_floor` has it).
                let writer = dev.writer[w as usize].load(Relaxed);
                let below = if writer == self.id as u32 {
                    own
                } else if writer == NO_WRITER {
                    any_shard
                } else {
                    None
                };
                let Some(below) = below else { continue };
                let state = self.wstate[d][w as usize];
                if !matches!(state, WState::Free | WState::Used | WState::Open) {
                    continue;
                }
                if state == WState::Free {
                    if refill && min < below && shared.cfg.scrub_free_wblocks && self.scrub_queue.len() < 4096 {
                        if let Some(h @ Hold::All(_)) = self.hold_for(d as u32, w) {
                            ask = Some(h);
                        }
                        self.scrub_queue.push_back((d as u32, w, self.freed_at[d][w as usize]));
                    }
                    continue;
                }
                if let Some(m) = self.mem.get(&(d as u32, w)) {
                    // Until its first write is durable `min_seq` still holds the previous
                    // use's floor (let go of then, not by a move): what this use holds is its
                    // own.
                    min = m.use_min_seq;
                }
                // Only when a dead record is the oldest: moving live ones would not raise
                // the floor.
                if min < below && live_min[d][w as usize] > min {
                    blocking.push((d as u32, w));
                }
            }
        }
        if let Some(h) = ask {
            self.ask_for_syncs(&h);
        }
        let mut moves = 0;
        for (dev, w) in blocking {
            if self.wstate[dev as usize][w as usize] == WState::Open {
                let s = slot(dev, super::CLIENT);
                if self.open[s].as_ref().is_some_and(|o| o.w == w) {
                    self.seal(s);
                } else if self.open[slot(dev, DEFRAG)].as_ref().is_some_and(|o| o.w == w) {
                    // Dead copies in defrag's own output (it would be sealed only once
                    // defrag has been idle for `defrag_idle_seal_ms`).
                    self.seal_defrag_output(dev);
                }
            } else if moves < QUEUE_REFILL {
                self.defrag.floor_moves.insert((dev, w));
                if !self.defrag.queue.contains(&(dev, w)) {
                    self.defrag.queue.push_back((dev, w));
                    moves += 1;
                }
            }
        }
    }

    /// The expiry sweep: expired records leave (fresh ones) or become tombstones; tombstones
    /// older than every data copy on the device are dropped.
    pub(super) fn nsup(&mut self) {
        let now = self.now_secs;
        let floor = self.shared.data_floor(self.id);
        let mut expired: Vec<IndexEntry> = Vec::new();
        let mut dead_tombs: Vec<IndexEntry> = Vec::new();
        let mut oldest_kept_tomb = u64::MAX;
        // With tombstones about: the oldest live data record of each wblock, for
        // `unblock_tombstones`.
        let wb = self.wb();
        let others_keep = (0..self.shared.n_shards).any(|i| i != self.id && self.shared.kept_tomb(i).is_some());
        let mut live_min: Vec<Vec<u64>> = if self.index.tombstones() > 0 || others_keep {
            self.shared.devs.iter().map(|d| vec![u64::MAX; d.n_wblocks as usize]).collect()
        } else {
            Vec::new()
        };
        for pid in self.shared.partitions_of(self.id) {
            for e in self.index.partition_entries(pid) {
                if e.tombstone {
                    if e.seq < floor {
                        dead_tombs.push(e);
                    } else {
                        oldest_kept_tomb = oldest_kept_tomb.min(e.seq);
                    }
                    continue;
                }
                if let Some(m) = live_min.get_mut(e.loc.dev as usize) {
                    let m = &mut m[(e.loc.offset / wb) as usize];
                    *m = (*m).min(e.seq);
                }
                if e.void_time != 0 && e.void_time <= now {
                    expired.push(e);
                }
            }
        }
        let shared = self.shared.clone();
        let stats = &shared.stats[self.id];
        for t in &dead_tombs {
            self.index.remove(&t.digest);
            self.release(t.loc);
        }
        stats.tombstones_dropped.fetch_add(dead_tombs.len() as u64, Relaxed);
        stats.oldest_kept_tomb.store(oldest_kept_tomb, Relaxed);
        self.unblock_tombstones(oldest_kept_tomb, &live_min);
        let mut n_expired = 0u64;
        for e in expired {
            if e.fresh {
                self.index.remove(&e.digest);
                self.release(e.loc);
                n_expired += 1;
                continue;
            }
            let meta = RecordMeta {
                digest: e.digest,
                generation: e.generation,
                void_time: 0,
                last_update_ms: self.lut_now(),
                seq: self.next_seq,
                tombstone: true,
            };
            let (tx, rx) = std::sync::mpsc::channel();
            self.store(
                "",
                meta,
                None,
                &[],
                Reply::error(ResultCode::Ok),
                Box::new(move |r| {
                    let _ = tx.send(r.result);
                }),
            );
            // Without commit-to-device the callback ran already; with it, the tombstone is
            // acknowledged later and the outcome does not matter here.
            match rx.try_recv() {
                Ok(ResultCode::Ok) | Err(_) => n_expired += 1,
                Ok(rc) => {
                    tracing::warn!("shard {}: expiry sweep paused: {rc:?}", self.id);
                    break;
                }
            }
        }
        stats.expired.fetch_add(n_expired, Relaxed);
        if n_expired > 0 || !dead_tombs.is_empty() {
            tracing::info!(
                "shard {}: expiry sweep: {n_expired} expired, {} tombstones dropped",
                self.id,
                dead_tombs.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_emptiest_holds_a_bounded_list_with_the_emptiest_of_all() {
        // Live byte counts from a small LCG, with repeats, over two devices.
        let mut x = 12345u64;
        let mut all = Vec::new();
        let mut found = Vec::new();
        for w in 0..20_000u32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let c = (((x >> 33) % 5000) as u32, w % 2, w);
            all.push(c);
            keep_emptiest(&mut found, c);
            assert!(found.len() < FOUND_CAP, "the list grew to {}", found.len());
        }
        all.sort_unstable();
        found.sort_unstable();
        assert_eq!(&found[..QUEUE_REFILL], &all[..QUEUE_REFILL]);
    }
}
