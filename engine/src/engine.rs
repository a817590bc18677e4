//! The engine handle: start-up (device headers, cold start, shard threads), the request API,
//! and shutdown.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, unbounded, Receiver, Sender};

use crate::api::{Command, Reply, ScanPage};
use crate::coldstart::{drop_truncated, keep_newest, scan_slice};
use crate::config::EngineConfig;
use crate::error::{DeviceError, EngineError};
use crate::format::{DeviceHeader, TruncateEntry, HEADER_COPY_STRIDE, HEADER_FLAG_CLEAN};
use crate::hook::ShardHook;
use crate::index::{IndexEntry, MAX_DEVICES, MAX_DEVICE_BYTES};
use crate::io::{run_sync, AlignedBuf, DeviceSet, Doorbell, IoBackend, IoOp, IoRequest, WBuf, Wake};
use crate::shard::{Msg, Peer, ScanReq, Shard, ShardLinks};
use crate::shared::{DevShared, EngineStats, SetRegistry, ShardStats, Shared};
use crate::types::{now_cl_ms, Digest, ResultCode, MAX_SET_NAME_BYTES};

/// The start-up channel on which shards hand each other index entries.
type ExchangePair = (Sender<Vec<IndexEntry>>, Receiver<Vec<IndexEntry>>);

/// Fewest data wblocks a device must hold.
pub const MIN_DATA_WBLOCKS: u64 = 8;
/// Bytes at the start of a device checked for foreign data before formatting it.
const FOREIGN_CHECK_BYTES: u64 = 1 << 20;

/// A running namespace: its shards and devices.
pub struct Engine {
    shared: Arc<Shared>,
    devices: Arc<dyn DeviceSet>,
    senders: Vec<Sender<Msg>>,
    doorbells: Vec<Arc<Doorbell>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    headers: Mutex<Vec<DeviceHeader>>,
    previous_clean: bool,
    stopped: AtomicBool,
}

impl Engine {
    /// Open (formatting fresh devices), rebuild the index by cold start, and start the shards.
    pub fn open(cfg: EngineConfig, devices: Arc<dyn DeviceSet>) -> Result<Engine, EngineError> {
        Self::open_with_hooks(cfg, devices, Vec::new())
    }

    /// [`Engine::open`], with code to run inside the shards' loops: `hooks[i]` runs on
    /// shard `i` (see [`ShardHook`]); at most one hook per shard.
    pub fn open_with_hooks(
        cfg: EngineConfig,
        devices: Arc<dyn DeviceSet>,
        hooks: Vec<Box<dyn ShardHook>>,
    ) -> Result<Engine, EngineError> {
        cfg.validate()?;
        if hooks.len() > cfg.shards {
            return Err(EngineError::Config {
                key: "shards".into(),
                reason: format!("{} shard hooks for {} shards", hooks.len(), cfg.shards),
            });
        }
        let infos = devices.devices().to_vec();
        if infos.is_empty() || infos.len() as u32 > MAX_DEVICES {
            return Err(EngineError::Config {
                key: "devices".into(),
                reason: format!("{} devices configured; 1..{MAX_DEVICES} allowed", infos.len()),
            });
        }
        let mut io = devices.open_backend(None, 0, 0)?;
        tracing::debug!("namespace {}: I/O for the device headers: {}", cfg.namespace, io.describe());
        let headers = prepare_headers(&cfg, &devices, io.as_mut())?;
        let previous_clean = headers.iter().all(|h| h.clean());
        // Devices formatted just now hold nothing a cold start could verify (every record
        // checksum covers the new random device id): no need to scan them.
        let fresh = headers.iter().all(|h| h.write_seq == 0);
        if fresh {
            tracing::info!("namespace {}: new devices (nothing to scan)", cfg.namespace);
        } else {
            tracing::info!(
                "namespace {}: previous shutdown was {}",
                cfg.namespace,
                if previous_clean { "clean" } else { "NOT clean (crash or kill): recovering from the device contents" }
            );
        }
        // Mark every device in use (not clean) before anything else is written.
        let mut headers: Vec<DeviceHeader> = headers;
        for (d, h) in headers.iter_mut().enumerate() {
            h.flags &= !HEADER_FLAG_CLEAN;
            write_header(io.as_mut(), d as u32, h)?;
        }
        drop(io);

        let wb = cfg.wblock_bytes as u64;
        let devs = infos
            .iter()
            .zip(&headers)
            .map(|(info, h)| {
                let n = (h.device_bytes / wb) as u32;
                DevShared {
                    info: info.clone(),
                    header: h.clone(),
                    n_wblocks: n,
                    live: (0..n).map(|_| AtomicU32::new(0)).collect(),
                    seq: (0..n).map(|_| AtomicU64::new(0)).collect(),
                    min_seq: (0..n).map(|_| AtomicU64::new(u64::MAX)).collect(),
                    writer: (0..n).map(|_| AtomicU32::new(crate::shared::NO_WRITER)).collect(),
                }
            })
            .collect();
        let n_shards = cfg.shards;
        let truncates = merge_truncates(&headers);
        for t in &truncates {
            tracing::info!(
                "namespace {}: truncate in force: {} before {} ms (Citrusleaf epoch)",
                cfg.namespace,
                if t.set.is_empty() { "every record".to_string() } else { format!("set {}", t.set) },
                t.before_ms
            );
        }
        let shared = Arc::new(Shared {
            devs,
            n_shards,
            next_wblock_seq: AtomicU64::new(1),
            stats: (0..n_shards).map(|_| ShardStats::default()).collect(),
            sets: SetRegistry::new(),
            fresh_devices: fresh,
            truncates: std::sync::RwLock::new(truncates),
            cfg,
        });
        let mut engine = Engine {
            shared: shared.clone(),
            devices: devices.clone(),
            senders: Vec::new(),
            doorbells: Vec::new(),
            threads: Mutex::new(Vec::new()),
            headers: Mutex::new(headers),
            previous_clean,
            stopped: AtomicBool::new(false),
        };
        engine.start_shards(hooks)?;
        Ok(engine)
    }

    fn start_shards(&mut self, hooks: Vec<Box<dyn ShardHook>>) -> Result<(), EngineError> {
        let n = self.shared.n_shards;
        let barrier = Arc::new(Barrier::new(n));
        let max_seq = Arc::new(AtomicU64::new(0));
        let exchange: Vec<ExchangePair> = (0..n).map(|_| unbounded()).collect();
        let exchange_tx: Vec<Sender<Vec<IndexEntry>>> = exchange.iter().map(|(t, _)| t.clone()).collect();
        let (ready_tx, ready_rx) = unbounded::<(usize, Result<(), String>)>();
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let mut receivers = Vec::with_capacity(n);
        for _ in 0..n {
            let (tx, rx) = bounded::<Msg>(self.shared.cfg.channel_capacity);
            let doorbell = Arc::new(Doorbell::new().map_err(|e| EngineError::Thread(format!("eventfd: {e}")))?);
            self.senders.push(tx);
            self.doorbells.push(doorbell);
            receivers.push(rx);
        }
        let peers: Arc<Vec<Peer>> =
            Arc::new(self.senders.iter().zip(&self.doorbells).map(|(s, d)| (s.clone(), d.clone())).collect());
        let mut hooks: Vec<Option<Box<dyn ShardHook>>> = hooks.into_iter().map(Some).collect();
        hooks.resize_with(n, || None);
        let mut threads = Vec::new();
        for (id, ((_, ex_rx), (rx, hook))) in exchange.into_iter().zip(receivers.into_iter().zip(hooks)).enumerate() {
            let doorbell = self.doorbells[id].clone();
            let shared = self.shared.clone();
            let devices = self.devices.clone();
            let barrier = barrier.clone();
            let max_seq = max_seq.clone();
            let exchange_tx = exchange_tx.clone();
            let ready_tx = ready_tx.clone();
            let peers = peers.clone();
            let core = if shared.cfg.pin_threads && !cores.is_empty() { Some(cores[id % cores.len()]) } else { None };
            let t = std::thread::Builder::new()
                .name(format!("shard-{id}"))
                .spawn(move || {
                    if let Some(c) = core {
                        core_affinity::set_for_current(c);
                    }
                    let links = ShardLinks { rx, doorbell, peers, hook };
                    shard_main(id, shared, devices, barrier, max_seq, exchange_tx, ex_rx, links, ready_tx)
                })
                .map_err(|e| EngineError::Thread(e.to_string()))?;
            threads.push(t);
        }
        drop(ready_tx);
        *self.threads.lock().expect("threads lock") = threads;
        let mut errors = Vec::new();
        for _ in 0..n {
            match ready_rx.recv() {
                Ok((_, Ok(()))) => {}
                Ok((id, Err(e))) => errors.push(format!("shard {id}: {e}")),
                Err(_) => errors.push("a shard thread died during start-up".into()),
            }
        }
        if !errors.is_empty() {
            self.stopped.store(true, Relaxed);
            // Every shard holds senders to every channel (its peers'), so the shards that did
            // start never see their channel close: tell them to leave.
            for (tx, bell) in self.senders.iter().zip(&self.doorbells) {
                let _ = tx.try_send(Msg::Abort(Box::new(|| {})));
                bell.ring();
            }
            self.senders.clear();
            for t in self.threads.lock().expect("threads lock").drain(..) {
                let _ = t.join();
            }
            return Err(EngineError::Device(DeviceError::Other(errors.join("; "))));
        }
        let st = self.stats();
        tracing::info!(
            "namespace {}: ready: {} records, {} tombstones, {} of {} wblocks free, {} damaged records skipped, index {:.1} bytes/record",
            self.shared.cfg.namespace,
            st.records,
            st.tombstones,
            st.free_wblocks,
            st.total_wblocks,
            st.cold_start_corrupt,
            st.index_bytes_per_record
        );
        Ok(())
    }

    pub fn config(&self) -> &EngineConfig {
        &self.shared.cfg
    }

    /// The shard that owns a digest's partition.
    pub fn shard_of(&self, d: &Digest) -> usize {
        self.shared.shard_of_partition(d.partition())
    }

    fn send(&self, shard: usize, m: Msg) -> Result<(), Box<Msg>> {
        self.senders[shard].send(m).map_err(|e| Box::new(e.into_inner()))?;
        self.doorbells[shard].ring_if_sleeping();
        Ok(())
    }

    /// Queue a command; `cb` runs on the shard thread with the reply. Blocks while the
    /// shard's channel is full (back-pressure).
    pub fn submit(&self, cmd: Command, cb: impl FnOnce(Reply) + Send + 'static) {
        let shard = self.shard_of(&cmd.digest);
        if let Err(m) = self.send(shard, Msg::Cmd(cmd, Box::new(cb))) {
            if let Msg::Cmd(_, cb) = *m {
                cb(Reply::error(ResultCode::ServerError));
            }
        }
    }

    /// [`Engine::submit`] that never blocks: when the shard's channel is full, `cb` gets
    /// DEVICE_OVERLOAD (18) at once. For code that must not wait, such as another engine's
    /// shard loop.
    pub fn try_submit(&self, cmd: Command, cb: impl FnOnce(Reply) + Send + 'static) {
        let shard = self.shard_of(&cmd.digest);
        match self.senders[shard].try_send(Msg::Cmd(cmd, Box::new(cb))) {
            Ok(()) => self.doorbells[shard].ring_if_sleeping(),
            Err(e) => {
                let rc = if e.is_full() { ResultCode::DeviceOverload } else { ResultCode::ServerError };
                if let Msg::Cmd(_, cb) = e.into_inner() {
                    cb(Reply::error(rc));
                }
            }
        }
    }

    /// Run a command and wait for its reply.
    pub fn execute(&self, cmd: Command) -> Reply {
        let (tx, rx) = bounded(1);
        self.submit(cmd, move |r| {
            let _ = tx.send(r);
        });
        rx.recv().unwrap_or_else(|_| Reply::error(ResultCode::ServerError))
    }

    /// Up to `max` live records of partition `pid` in digest order, after `after`; only
    /// records of `set` when one is given.
    pub fn scan_partition(
        &self,
        pid: u16,
        set: Option<&str>,
        after: Option<Digest>,
        max: usize,
        with_bins: bool,
    ) -> ScanPage {
        let set = match set {
            None => None,
            Some(name) => match self.shared.sets.id(name) {
                Some(id) => Some(id),
                // No record of this set was ever seen: nothing to scan.
                None => return ScanPage { result: ResultCode::Ok, records: Vec::new(), done: true },
            },
        };
        let (tx, rx) = bounded(1);
        let shard = self.shared.shard_of_partition(pid);
        let cb = Box::new(move |p: ScanPage| {
            let _ = tx.send(p);
        });
        let failed = ScanPage { result: ResultCode::ServerError, records: Vec::new(), done: true };
        if self.send(shard, Msg::Scan(ScanReq { pid: pid & 0x0fff, set, after, max, with_bins }, cb)).is_err() {
            return failed;
        }
        rx.recv().unwrap_or(failed)
    }

    /// Send every shard the message `make` builds around a completion callback, and wait
    /// until each has called it (or has gone away).
    fn broadcast(&self, make: impl Fn(crate::shard::Done) -> Msg) {
        let (tx, rx) = bounded(self.senders.len());
        for s in 0..self.senders.len() {
            let tx = tx.clone();
            let _ = self.send(
                s,
                make(Box::new(move || {
                    let _ = tx.send(());
                })),
            );
        }
        drop(tx);
        while rx.recv().is_ok() {}
    }

    /// Remove every record of `set` (every record of the namespace when `None`) last updated
    /// before `before_ms` (ms since the Citrusleaf epoch; `None`: now), durably: the
    /// truncate is written to every device header before any record is dropped, and a cold
    /// start ignores the records it covers. Returns the cutoff used.
    pub fn truncate(&self, set: Option<&str>, before_ms: Option<u64>) -> Result<u64, TruncateError> {
        let now = now_cl_ms();
        if let Some(b) = before_ms.filter(|&b| b > now) {
            return Err(TruncateError::Future { before_ms: b, now_ms: now });
        }
        let name = set.unwrap_or("");
        if set.is_some_and(|s| s.is_empty() || s.len() > MAX_SET_NAME_BYTES) {
            return Err(TruncateError::BadSet(name.to_string()));
        }
        if self.stopped.load(Relaxed) {
            return Err(TruncateError::Stopped);
        }
        let before;
        {
            // Persist first: once any record is gone from the index, a restart must not
            // bring it back.
            let mut headers = self.headers.lock().expect("headers lock");
            let mut table = self.shared.truncates.read().expect("truncates lock").clone();
            // "Now" covers every write acknowledged before this call, including those of the
            // current millisecond and those stamped with an earlier cutoff (shards give
            // writes made after a truncate a last-update time at or after its cutoff).
            let latest = table.iter().map(|t| t.before_ms).max().unwrap_or(0);
            before = before_ms.unwrap_or((now_cl_ms() + 1).max(latest + 1));
            match table.iter_mut().find(|t| t.set == name) {
                Some(t) if t.before_ms >= before => {}
                Some(t) => t.before_ms = before,
                None => table.push(TruncateEntry { set: name.to_string(), before_ms: before }),
            }
            if set.is_none() {
                // A namespace-wide truncate covers every set truncate at or before it.
                table.retain(|t| t.set.is_empty() || t.before_ms > before);
            }
            if !DeviceHeader::truncates_fit(&table) {
                return Err(TruncateError::TableFull);
            }
            // New header images are swapped in only when every device took them: a failed
            // truncate is not written again by a later header write (it may still have
            // reached some devices, and then applies after a crash and restart).
            let mut updated = headers.clone();
            let mut io = self.devices.open_backend(None, 0, 0).map_err(|e| TruncateError::Device(e.to_string()))?;
            for (d, h) in updated.iter_mut().enumerate() {
                h.truncates = table.clone();
                write_header(io.as_mut(), d as u32, h).map_err(|e| TruncateError::Device(e.to_string()))?;
            }
            *headers = updated;
            *self.shared.truncates.write().expect("truncates lock") = table;
        }
        // Number the set even when nothing of it was seen yet, so a first write of it racing
        // with this truncate is covered too. Every shard hears of the truncate either way:
        // it must stamp later writes at or after the cutoff.
        let set_id = set.map(|s| self.shared.sets.intern(s).unwrap_or(crate::shard::NO_SET_MATCHES));
        self.broadcast(|done| Msg::Truncate { set_id, before_ms: before, done });
        tracing::info!(
            "namespace {}: truncated {} (records last updated before {before} ms)",
            self.shared.cfg.namespace,
            set.map_or("every set".to_string(), |s| format!("set {s}"))
        );
        Ok(before)
    }

    /// Write every buffered record durably on every shard, and wait.
    pub fn flush(&self) {
        self.broadcast(Msg::Flush);
    }

    /// Statistics, current as of this call (each running shard publishes its counters first).
    pub fn stats(&self) -> EngineStats {
        if !self.stopped.load(Relaxed) {
            self.broadcast(Msg::Stats);
        }
        EngineStats::collect(&self.shared, self.previous_clean)
    }

    /// Flush, stop the shards and mark the devices clean.
    pub fn shutdown(&self) -> Result<(), EngineError> {
        if self.stopped.swap(true, Relaxed) {
            return Ok(());
        }
        self.stop_shards(false);
        if self.stats().read_only {
            tracing::warn!("namespace {}: not marking devices clean: a write failed", self.shared.cfg.namespace);
            return Ok(());
        }
        let mut io = self.devices.open_backend(None, 0, 0)?;
        let mut headers = self.headers.lock().expect("headers lock");
        for (d, h) in headers.iter_mut().enumerate() {
            h.flags |= HEADER_FLAG_CLEAN;
            write_header(io.as_mut(), d as u32, h)?;
        }
        tracing::info!("namespace {}: shut down cleanly", self.shared.cfg.namespace);
        Ok(())
    }

    /// Stop the shards at once without flushing or marking the devices clean, as a crash
    /// would (for tests of recovery).
    pub fn crash(&self) {
        if !self.stopped.swap(true, Relaxed) {
            self.stop_shards(true);
        }
    }

    fn stop_shards(&self, abort: bool) {
        self.broadcast(if abort { Msg::Abort } else { Msg::Stop });
        for t in self.threads.lock().expect("threads lock").drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!("shutdown failed: {e}");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn shard_main(
    id: usize,
    shared: Arc<Shared>,
    devices: Arc<dyn DeviceSet>,
    barrier: Arc<Barrier>,
    max_seq: Arc<AtomicU64>,
    exchange_tx: Vec<Sender<Vec<IndexEntry>>>,
    exchange_rx: Receiver<Vec<IndexEntry>>,
    links: ShardLinks,
    ready: Sender<(usize, Result<(), String>)>,
) {
    let n = shared.n_shards;
    let cfg = &shared.cfg;
    // Arena slots: the write cache, the post-write cache, and an open wblock per device and
    // stream, per shard.
    let slots = ((cfg.max_write_cache_bytes + cfg.post_write_cache_bytes) / n as u64 / cfg.wblock_bytes as u64)
        as usize
        + 2 * shared.devs.len();
    let mut result: Result<(), String> = Ok(());
    let wake = Wake(links.doorbell.raw_fd());
    let arena_mib = (slots as u64 * cfg.wblock_bytes as u64) >> 20;
    if id == 0 {
        // Registering the buffers pins them, which touches every page: a large
        // post-write-cache takes seconds here, before the cold start logs anything.
        tracing::info!(
            "namespace {}: each of {n} shard(s) sets up {arena_mib} MiB of I/O buffers \
             (max-write-cache, post-write-cache and open wblocks), registered with its ring \
             (pinned in memory) where RLIMIT_MEMLOCK allows",
            cfg.namespace
        );
    }
    let started = std::time::Instant::now();
    let mut io: Option<Box<dyn IoBackend>> = match devices.open_backend(Some(wake), cfg.wblock_bytes as usize, slots) {
        Ok(io) => {
            tracing::info!(
                "namespace {}: shard {id}: I/O: {} (set up in {:.1} s)",
                cfg.namespace,
                io.describe(),
                started.elapsed().as_secs_f64()
            );
            Some(io)
        }
        Err(e) => {
            result = Err(e.to_string());
            None
        }
    };
    // Phase 1: scan this shard's slice.
    let mut index = crate::index::Index::new();
    if let Some(io) = io.as_mut().filter(|_| !shared.fresh_devices) {
        match scan_slice(io.as_mut(), &shared, id) {
            Ok(s) => {
                max_seq.fetch_max(s.max_seq, Relaxed);
                index = s.index;
            }
            Err(e) => result = Err(e.to_string()),
        }
    }
    barrier.wait();
    // Phase 2: hand entries of partitions owned by other shards to their owners; keep the
    // newest copy of each digest.
    for (t, tx) in exchange_tx.iter().enumerate() {
        if t == id {
            continue;
        }
        let mut out = Vec::new();
        for pid in shared.partitions_of(t) {
            if index.partition_len(pid) > 0 {
                out.extend(index.drain_partition(pid));
            }
        }
        let _ = tx.send(out);
    }
    drop(exchange_tx);
    for _ in 1..n {
        if let Ok(batch) = exchange_rx.recv() {
            for e in batch {
                keep_newest(&mut index, e, |l| shared.wblock_seq_at(l));
            }
        }
    }
    let truncated = drop_truncated(&mut index, &shared, id);
    shared.stats[id].cold_truncated.store(truncated, Relaxed);
    for pid in shared.partitions_of(id) {
        for e in index.partition_entries(pid) {
            let w = (e.loc.offset / shared.wblock_bytes()) as u32;
            shared.add_live(e.loc.dev, w, e.loc.size);
        }
    }
    barrier.wait();
    if id == 0 {
        let max_w = shared.devs.iter().flat_map(|d| d.seq.iter().map(|s| s.load(Relaxed))).max().unwrap_or(0);
        shared.next_wblock_seq.store(max_w + 1, Relaxed);
    }
    barrier.wait();
    let Some(io) = io.filter(|_| result.is_ok()) else {
        let _ = ready.send((id, result));
        return;
    };
    let next_seq = max_seq.load(Relaxed) + 1;
    let shard = Shard::new(id, shared, io, index, next_seq, links);
    let _ = ready.send((id, Ok(())));
    shard.run();
}

/// Why a truncate was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TruncateError {
    #[error("truncate time {before_ms} is in the future (now {now_ms}, ms since 2010-01-01)")]
    Future { before_ms: u64, now_ms: u64 },
    #[error("bad set name '{0}' (1 to 63 bytes)")]
    BadSet(String),
    #[error("too many truncated sets: the device header's truncate table is full")]
    TableFull,
    #[error(
        "writing the truncate to the device headers failed: {0}; nothing was removed now, but \
         devices written before the failure hold it and apply it after a restart"
    )]
    Device(String),
    #[error("the namespace is shutting down")]
    Stopped,
}

/// The truncates of every device header, merged: the latest time per set.
fn merge_truncates(headers: &[DeviceHeader]) -> Vec<TruncateEntry> {
    let mut out: Vec<TruncateEntry> = Vec::new();
    for t in headers.iter().flat_map(|h| &h.truncates) {
        match out.iter_mut().find(|o| o.set == t.set) {
            Some(o) => o.before_ms = o.before_ms.max(t.before_ms),
            None => out.push(t.clone()),
        }
    }
    out
}

/// Read, check or create the header of every device.
fn prepare_headers(
    cfg: &EngineConfig,
    devices: &Arc<dyn DeviceSet>,
    io: &mut dyn IoBackend,
) -> Result<Vec<DeviceHeader>, EngineError> {
    let wb = cfg.wblock_bytes as u64;
    let n_devices = devices.devices().len() as u32;
    let signature: u64 = rand::random();
    let mut out = Vec::new();
    for (d, info) in devices.devices().iter().enumerate() {
        let needed = wb * (1 + MIN_DATA_WBLOCKS.max(2 * cfg.shards as u64));
        if info.size_bytes < needed {
            return Err(DeviceError::TooSmall {
                path: info.path.clone(),
                size: info.size_bytes,
                needed,
                min_wblocks: MIN_DATA_WBLOCKS.max(2 * cfg.shards as u64),
                wblock_bytes: wb,
            }
            .into());
        }
        let found = read_header(io, d as u32, &info.path)?;
        let h = match found {
            Some(h) => {
                if h.namespace != cfg.namespace {
                    return Err(EngineError::WrongNamespace {
                        path: info.path.clone(),
                        found: h.namespace,
                        expected: cfg.namespace.clone(),
                    });
                }
                if h.wblock_bytes != cfg.wblock_bytes {
                    return Err(EngineError::WrongWblockSize {
                        path: info.path.clone(),
                        found: h.wblock_bytes,
                        expected: cfg.wblock_bytes,
                    });
                }
                if h.device_index != d as u32 || h.n_devices != n_devices {
                    return Err(EngineError::WrongDeviceSlot {
                        path: info.path.clone(),
                        found_index: h.device_index,
                        found_count: h.n_devices,
                        expected_index: d as u32,
                        expected_count: n_devices,
                    });
                }
                if h.device_bytes > info.size_bytes {
                    return Err(EngineError::Config {
                        key: "devices".into(),
                        reason: format!(
                            "{} was formatted for {} bytes but is now only {} bytes",
                            info.path, h.device_bytes, info.size_bytes
                        ),
                    });
                }
                h
            }
            None => {
                check_blank(io, d as u32, info.path.as_str(), info.size_bytes)?;
                let usable = (info.size_bytes.min(MAX_DEVICE_BYTES) / wb) * wb;
                let h = DeviceHeader {
                    write_seq: 0,
                    device_id: rand::random(),
                    namespace: cfg.namespace.clone(),
                    wblock_bytes: cfg.wblock_bytes,
                    device_index: d as u32,
                    n_devices,
                    flags: HEADER_FLAG_CLEAN,
                    device_bytes: usable,
                    format_time_ms: now_cl_ms(),
                    namespace_signature: signature,
                    truncates: Vec::new(),
                };
                tracing::info!(
                    "{}: blank device, formatting for namespace {} ({} MiB, {} write blocks of {} KiB)",
                    info.path,
                    cfg.namespace,
                    usable >> 20,
                    usable / wb - 1,
                    wb >> 10
                );
                h
            }
        };
        out.push(h);
    }
    if out.iter().any(|h| h.namespace_signature != out[0].namespace_signature && h.write_seq > 0) {
        tracing::warn!(
            "namespace {}: devices were formatted at different times (signatures differ); continuing",
            cfg.namespace
        );
    }
    Ok(out)
}

/// The newest valid header copy, `None` for a blank device; an error for damaged headers.
fn read_header(io: &mut dyn IoBackend, dev: u32, path: &str) -> Result<Option<DeviceHeader>, EngineError> {
    let buf = AlignedBuf::new(2 * HEADER_COPY_STRIDE as usize);
    let c = run_sync(io, IoRequest { tag: 0, dev, offset: 0, op: IoOp::Read { buf } })?;
    c.result?;
    let IoOp::Read { buf } = c.op else { unreachable!("read returns its buffer") };
    let copies = [
        DeviceHeader::decode(&buf[..HEADER_COPY_STRIDE as usize]),
        DeviceHeader::decode(&buf[HEADER_COPY_STRIDE as usize..]),
    ];
    let best = copies.iter().filter_map(|c| c.as_ref().ok()).max_by_key(|h| h.write_seq).cloned();
    if best.is_some() {
        return Ok(best);
    }
    use crate::error::FormatError;
    for c in &copies {
        match c {
            Err(FormatError::Version { found, supported }) => {
                return Err(EngineError::UnsupportedVersion { path: path.into(), found: *found, supported: *supported })
            }
            Err(FormatError::BadMagic) => {}
            Err(e) => return Err(EngineError::CorruptHeader { path: path.into(), reason: e.to_string() }),
            Ok(_) => {}
        }
    }
    Ok(None)
}

/// Refuse a device whose first bytes are not all zero.
fn check_blank(io: &mut dyn IoBackend, dev: u32, path: &str, size: u64) -> Result<(), EngineError> {
    let len = FOREIGN_CHECK_BYTES.min(size) as usize;
    let buf = AlignedBuf::new(len);
    let c = run_sync(io, IoRequest { tag: 0, dev, offset: 0, op: IoOp::Read { buf } })?;
    c.result?;
    let IoOp::Read { buf } = c.op else { unreachable!("read returns its buffer") };
    if let Some(off) = buf.iter().position(|&b| b != 0) {
        return Err(EngineError::ForeignData { path: path.into(), offset: off as u64 });
    }
    Ok(())
}

/// Write `h` (with its write sequence advanced) over the older of the two header copies,
/// durably, so a torn header write always leaves the other copy intact.
fn write_header(io: &mut dyn IoBackend, dev: u32, h: &mut DeviceHeader) -> Result<(), EngineError> {
    h.write_seq += 1;
    let slot = h.write_seq % 2;
    let buf = WBuf::new(AlignedBuf::new(HEADER_COPY_STRIDE as usize));
    buf.write_at(0, &h.encode());
    buf.freeze_to(HEADER_COPY_STRIDE as usize);
    let c = run_sync(
        io,
        IoRequest {
            tag: 0,
            dev,
            offset: slot * HEADER_COPY_STRIDE,
            op: IoOp::Write { buf: std::rc::Rc::new(buf), start: 0, end: HEADER_COPY_STRIDE as usize, dsync: true },
        },
    )?;
    c.result?;
    Ok(())
}

/// Destroy the Ferrospike format (and with it all data) on every device: zero both header
/// copies and the first write block. Records left further in become unreadable, because
/// the next format picks a new random device id that every record checksum covers.
pub fn erase_devices(devices: &dyn DeviceSet) -> Result<(), EngineError> {
    let mut io = devices.open_backend(None, 0, 0)?;
    for (d, info) in devices.devices().iter().enumerate() {
        let len = FOREIGN_CHECK_BYTES.min(info.size_bytes) as usize;
        let buf = WBuf::new(AlignedBuf::new(len));
        buf.freeze_to(len);
        let c = run_sync(
            io.as_mut(),
            IoRequest {
                tag: 0,
                dev: d as u32,
                offset: 0,
                op: IoOp::Write { buf: std::rc::Rc::new(buf), start: 0, end: len, dsync: true },
            },
        )?;
        c.result?;
        tracing::warn!("{}: erased", info.path);
    }
    Ok(())
}
