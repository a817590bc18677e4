//! Raw mode: ACT's I/O mix on the devices, open loop, through one io_uring per generator
//! thread.
//!
//! Every generator thread owns a ring and a set of streams, each with a rate. Operation `i`
//! of a stream is scheduled at `i / rate` seconds after the start; it is issued as soon as
//! that time has come (and fewer than [`MAX_IN_FLIGHT`] operations of the thread are
//! outstanding), and its latency is measured from the scheduled time, not from the issue.
//! A thread whose next unissued operation is more than max-lag-sec late stops the test with
//! ACT's message.

use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use ferrospike_engine::io::{
    run_sync, AlignedBuf, DeviceSet, FileDevices, IoBackend, IoCompletion, IoOp, IoRequest, WBuf,
};

use super::config::{ActConfig, Derived};
use super::{report_loop, summary, Control, DevPlan, Named};
use crate::hist::{OpHist, Scale};
use crate::rng::Rng;

/// Outstanding operations per generator thread (bounded by the ring size).
pub const MAX_IN_FLIGHT: usize = 128;
/// Resolution of the read/write split of service threads (as ACT's SPLIT_RESOLUTION).
const SPLIT_RESOLUTION: u64 = 1 << 24;
/// Longest a generator sleeps without looking at its schedule and the stop flag.
const MAX_WAIT: Duration = Duration::from_millis(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Record-sized reads (and commit-to-device writes) on random devices.
    Service,
    LargeRead(u32),
    LargeWrite(u32),
}

struct Stream {
    kind: Kind,
    /// Nanoseconds between two scheduled operations.
    period_ns: f64,
    issued: u64,
}

impl Stream {
    fn due_ns(&self) -> u64 {
        (self.issued as f64 * self.period_ns) as u64
    }
}

/// What an issued operation records when it completes.
#[derive(Clone, Copy)]
enum Rec {
    Read(u32),
    Write(u32),
    LargeRead,
    LargeWrite,
}

struct Pending {
    scheduled_ns: u64,
    rec: Rec,
    kind: Kind,
}

/// Every histogram of the test, by role.
struct Hists {
    reads: Arc<OpHist>,
    dev_reads: Vec<Arc<OpHist>>,
    writes: Arc<OpHist>,
    dev_writes: Vec<Arc<OpHist>>,
    lb_reads: Arc<OpHist>,
    lb_writes: Arc<OpHist>,
}

pub(super) fn run(
    cfg: &ActConfig,
    d: &Derived,
    devices: Arc<FileDevices>,
    plans: &[DevPlan],
    scale: Scale,
) -> Result<bool, String> {
    let ctl = Arc::new(Control::new());
    let n_dev = plans.len();
    let mk = || Arc::new(OpHist::new(scale));
    let hists = Arc::new(Hists {
        reads: mk(),
        dev_reads: (0..n_dev).map(|_| mk()).collect(),
        writes: mk(),
        dev_writes: (0..n_dev).map(|_| mk()).collect(),
        lb_reads: mk(),
        lb_writes: mk(),
    });
    // ACT's histogram names, in its order.
    let mut named: Vec<Named> = Vec::new();
    let do_reads = cfg.read_reqs_per_sec != 0;
    let do_lb = cfg.write_reqs_per_sec != 0;
    let do_commits = cfg.commit_to_device && cfg.write_reqs_per_sec != 0;
    if do_reads {
        named.push(("reads".into(), hists.reads.clone()));
        for (p, h) in plans.iter().zip(&hists.dev_reads) {
            named.push((format!("{}-reads", p.name), h.clone()));
        }
    }
    if do_lb {
        named.push(("large-block-reads".into(), hists.lb_reads.clone()));
        named.push(("large-block-writes".into(), hists.lb_writes.clone()));
    }
    if do_commits {
        named.push(("writes".into(), hists.writes.clone()));
        for (p, h) in plans.iter().zip(&hists.dev_writes) {
            named.push((format!("{}-writes", p.name), h.clone()));
        }
    }

    let mut threads = Vec::new();
    let total = d.internal_read_reqs_per_sec as u64 + d.internal_write_reqs_per_sec as u64;
    if total != 0 {
        // ACT: each service thread does total / service-threads requests per second.
        let per_thread = total / cfg.service_threads as u64;
        let read_split = SPLIT_RESOLUTION * d.internal_read_reqs_per_sec as u64 / total;
        for t in 0..cfg.service_threads {
            let streams = vec![Stream { kind: Kind::Service, period_ns: 1e9 / per_thread as f64, issued: 0 }];
            threads.push(spawn(format!("act-service-{t}"), streams, read_split, cfg, plans, &devices, &hists, &ctl)?);
        }
    }
    if do_lb {
        for dev in 0..n_dev as u32 {
            let mut streams = Vec::new();
            if d.large_block_reads_per_sec > 0.0 {
                let period = 1e9 * n_dev as f64 / d.large_block_reads_per_sec;
                streams.push(Stream { kind: Kind::LargeRead(dev), period_ns: period, issued: 0 });
            }
            if d.large_block_writes_per_sec > 0.0 {
                let period = 1e9 * n_dev as f64 / d.large_block_writes_per_sec;
                streams.push(Stream { kind: Kind::LargeWrite(dev), period_ns: period, issued: 0 });
            }
            if !streams.is_empty() {
                threads.push(spawn(format!("act-large-{dev}"), streams, 0, cfg, plans, &devices, &hists, &ctl)?);
            }
        }
    }
    if cfg.tomb_raider {
        for dev in 0..n_dev as u32 {
            let (devices, ctl, plan) = (devices.clone(), ctl.clone(), plans[dev as usize].clone());
            let lb = cfg.large_block_bytes() as u64;
            let sleep_us = cfg.tomb_raider_sleep_usec as u64;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("act-tomb-raider-{dev}"))
                    .spawn(move || tomb_raider(&*devices, dev, &plan, lb, sleep_us, &ctl))
                    .map_err(|e| e.to_string())?,
            );
        }
    }
    report_loop(cfg, &named, &ctl);
    let elapsed = ctl.start.elapsed();
    ctl.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    print!("{}", summary(&named, scale, elapsed));
    Ok(ctl.failed())
}

#[allow(clippy::too_many_arguments)]
fn spawn(
    name: String,
    streams: Vec<Stream>,
    read_split: u64,
    cfg: &ActConfig,
    plans: &[DevPlan],
    devices: &Arc<FileDevices>,
    hists: &Arc<Hists>,
    ctl: &Arc<Control>,
) -> Result<std::thread::JoinHandle<()>, String> {
    let g = Generator {
        streams,
        read_split,
        plans: plans.to_vec(),
        large_block_bytes: cfg.large_block_bytes() as u64,
        compress_pct: cfg.compress_pct,
        dsync: !cfg.disable_odsync,
        max_lag_ns: cfg.max_lag_sec as u64 * 1_000_000_000,
        hists: hists.clone(),
        ctl: ctl.clone(),
        rng: Rng::new(),
        pending: Vec::new(),
        free_tags: Vec::new(),
        bufs: Vec::new(),
        in_flight: 0,
    };
    let devices = devices.clone();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let mut g = g;
            match devices.open_backend(None, 0, 0) {
                Ok(mut io) => g.run(io.as_mut()),
                Err(e) => g.ctl.fail(format!("ERROR: cannot set up I/O: {e}")),
            }
        })
        .map_err(|e| e.to_string())
}

struct Generator {
    streams: Vec<Stream>,
    read_split: u64,
    plans: Vec<DevPlan>,
    large_block_bytes: u64,
    compress_pct: u32,
    dsync: bool,
    max_lag_ns: u64,
    hists: Arc<Hists>,
    ctl: Arc<Control>,
    rng: Rng,
    pending: Vec<Option<Pending>>,
    free_tags: Vec<usize>,
    bufs: Vec<AlignedBuf>,
    in_flight: usize,
}

impl Generator {
    fn run(&mut self, io: &mut dyn IoBackend) {
        let mut done: Vec<IoCompletion> = Vec::with_capacity(MAX_IN_FLIGHT);
        while !self.ctl.stopped() {
            let now = self.ctl.now_ns();
            let mut next_due = u64::MAX;
            for s in 0..self.streams.len() {
                loop {
                    let due = self.streams[s].due_ns();
                    if due > now {
                        next_due = next_due.min(due);
                        break;
                    }
                    if self.in_flight >= MAX_IN_FLIGHT {
                        next_due = next_due.min(due);
                        break;
                    }
                    self.issue(io, s, due);
                    self.streams[s].issued += 1;
                }
                let due = self.streams[s].due_ns();
                if self.max_lag_ns != 0 && due + self.max_lag_ns < now {
                    self.ctl.fail(lag_message(self.streams[s].kind));
                }
            }
            let wait = if next_due <= now { MAX_WAIT } else { Duration::from_nanos(next_due - now).min(MAX_WAIT) };
            if let Err(e) = io.submit_and_wait(true, Some(wait)) {
                self.ctl.fail(format!("ERROR: io_uring failed: {e}"));
                break;
            }
            io.reap(&mut done);
            for c in done.drain(..) {
                self.complete(c);
            }
        }
        // Drain: every buffer must come back before the ring is dropped.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while self.in_flight > 0 && std::time::Instant::now() < deadline {
            if io.submit_and_wait(true, Some(Duration::from_millis(100))).is_err() {
                break;
            }
            io.reap(&mut done);
            for c in done.drain(..) {
                self.complete(c);
            }
        }
    }

    fn take_buf(&mut self, len: u64) -> AlignedBuf {
        let mut b = match self.bufs.iter().position(|b| b.capacity() as u64 >= len) {
            Some(i) => self.bufs.swap_remove(i),
            None => AlignedBuf::new(len as usize),
        };
        b.set_len(len as usize);
        b
    }

    fn issue(&mut self, io: &mut dyn IoBackend, s: usize, scheduled_ns: u64) {
        let kind = self.streams[s].kind;
        let (dev, offset, len, rec, write) = match kind {
            Kind::Service => {
                let dev = self.rng.below(self.plans.len() as u64) as u32;
                let p = &self.plans[dev as usize];
                let offset = self.rng.below(p.n_read_offsets) * p.min_op_bytes;
                let len = p.read_bytes + p.min_op_bytes * self.rng.below(p.n_read_sizes);
                if self.read_split > self.rng.below(SPLIT_RESOLUTION) {
                    (dev, offset, len, Rec::Read(dev), false)
                } else {
                    (dev, offset, len, Rec::Write(dev), true)
                }
            }
            Kind::LargeRead(dev) => {
                let p = &self.plans[dev as usize];
                let offset = self.rng.below(p.n_large_blocks) * self.large_block_bytes;
                (dev, offset, self.large_block_bytes, Rec::LargeRead, false)
            }
            Kind::LargeWrite(dev) => {
                let p = &self.plans[dev as usize];
                let offset = self.rng.below(p.n_large_blocks) * self.large_block_bytes;
                (dev, offset, self.large_block_bytes, Rec::LargeWrite, true)
            }
        };
        let mut buf = self.take_buf(len);
        let op = if write {
            // ACT refills the buffer with fresh data before every write.
            self.rng.fill(&mut buf, self.compress_pct);
            let w = WBuf::new(buf);
            w.freeze_to(len as usize);
            IoOp::Write { buf: Rc::new(w), start: 0, end: len as usize, dsync: self.dsync }
        } else {
            IoOp::Read { buf }
        };
        let tag = self.free_tags.pop().unwrap_or_else(|| {
            self.pending.push(None);
            self.pending.len() - 1
        });
        self.pending[tag] = Some(Pending { scheduled_ns, rec, kind });
        self.in_flight += 1;
        io.push(IoRequest { tag: tag as u64, dev, offset, op });
    }

    fn complete(&mut self, c: IoCompletion) {
        let now = self.ctl.now_ns();
        let tag = c.tag as usize;
        let p = self.pending[tag].take().expect("completion of a pending request");
        self.free_tags.push(tag);
        self.in_flight -= 1;
        match c.op {
            IoOp::Read { buf } => self.bufs.push(buf),
            IoOp::Write { buf, .. } => {
                if let Ok(w) = Rc::try_unwrap(buf) {
                    self.bufs.push(w.into_inner());
                }
            }
            IoOp::Fsync => {}
        }
        if let Err(e) = c.result {
            let what = match p.kind {
                Kind::Service => "read/write",
                Kind::LargeRead(_) => "large block read",
                Kind::LargeWrite(_) => "large block write",
            };
            self.ctl.fail(format!("ERROR: {what} failed: {e}\ntest stopped"));
            return;
        }
        let ns = now.saturating_sub(p.scheduled_ns);
        let h = &self.hists;
        match p.rec {
            Rec::Read(d) => {
                h.reads.record_ns(ns);
                h.dev_reads[d as usize].record_ns(ns);
            }
            Rec::Write(d) => {
                h.writes.record_ns(ns);
                h.dev_writes[d as usize].record_ns(ns);
            }
            Rec::LargeRead => h.lb_reads.record_ns(ns),
            Rec::LargeWrite => h.lb_writes.record_ns(ns),
        }
    }
}

/// ACT's messages when a generator cannot keep up.
fn lag_message(kind: Kind) -> String {
    match kind {
        Kind::Service => "ERROR: service thread can't keep up\nACT can't do requested load - test stopped\n\
                          try configuring more 'service-threads'"
            .into(),
        Kind::LargeRead(_) => "ERROR: large block reads can't keep up\ndrive(s) can't keep up - test stopped".into(),
        Kind::LargeWrite(_) => "ERROR: large block writes can't keep up\ndrive(s) can't keep up - test stopped".into(),
    }
}

/// ACT's tomb raider: endless sequential large-block reads over the whole device, not timed.
fn tomb_raider(devices: &dyn DeviceSet, dev: u32, plan: &DevPlan, lb: u64, sleep_us: u64, ctl: &Control) {
    let mut io = match devices.open_backend(None, 0, 0) {
        Ok(io) => io,
        Err(e) => return ctl.fail(format!("ERROR: tomb raider cannot set up I/O: {e}")),
    };
    let end = plan.n_large_blocks * lb;
    let mut offset = 0u64;
    let mut buf = Some(AlignedBuf::new(lb as usize));
    while !ctl.stopped() {
        if sleep_us != 0 {
            std::thread::sleep(Duration::from_micros(sleep_us));
        }
        let req = IoRequest { tag: 0, dev, offset, op: IoOp::Read { buf: buf.take().expect("buffer") } };
        match run_sync(io.as_mut(), req) {
            Ok(c) => {
                if let Err(e) = c.result {
                    return ctl.fail(format!("ERROR: tomb raider read failed: {e}\ntest stopped"));
                }
                if let IoOp::Read { buf: b } = c.op {
                    buf = Some(b);
                }
            }
            Err(e) => return ctl.fail(format!("ERROR: tomb raider: {e}")),
        }
        offset += lb;
        if offset >= end {
            offset = 0;
        }
    }
}
