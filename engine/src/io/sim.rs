//! Simulated devices: fast, deterministic, and able to fail on purpose.
//!
//! A [`SimDisk`] is an in-memory disk shared through cheap handles, so it survives an engine
//! "restart" as long as a test keeps a handle. [`SimFaults`] injects, deterministically from a
//! seed, the failures real devices have: a crash that tears the write in progress into an
//! arbitrary subset of its 4 KiB pages (holes, not a prefix) and stops all later writes,
//! EIO on chosen byte ranges, writes that report success but are lost, and misdirected
//! writes. [`SimBackend`] runs requests synchronously in push order and enforces the same
//! request assertions (alignment, bounds, frozen ranges) as the io_uring backend.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::buf::{AlignedBuf, BUF_ALIGN};
use super::device::assert_request;
use super::uring::wait_eventfd;
use super::{
    unsupported_sock, DevId, DeviceInfo, DeviceSet, IoBackend, IoCompletion, IoOp, IoRequest, SockCompletion, SockId,
    SockRequest, Wake,
};
use crate::error::DeviceError;

/// Granularity of the lazy allocation of a disk's memory.
pub const SIM_CHUNK_BYTES: usize = 1 << 20;
/// Unit in which a crash tears a write: the page size of the host, as with a killed
/// `O_DIRECT` write that was split into page-sized pieces.
pub const TORN_PAGE_BYTES: u64 = 4096;

/// Faults to inject into one [`SimDisk`]. Write ordinals are 1-based and counted from the
/// `set_faults` call.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimFaults {
    /// Seeds every random choice (which pages of a torn write land).
    pub seed: u64,
    /// `Some(n)`: write `n + 1` is torn (a seeded random subset of its 4 KiB pages is
    /// applied) and fails with [`DeviceError::Crashed`], as does every later write, which
    /// applies nothing. Reads keep working. Models kill -9 during a large write.
    pub crash_after_writes: Option<u64>,
    /// `[start, end)` byte ranges: any read or write touching one fails with EIO.
    pub eio_ranges: Vec<(u64, u64)>,
    /// `[start, end)` byte ranges: any read touching one fails with EIO; writes land (a
    /// medium whose old sectors went bad).
    pub eio_read_ranges: Vec<(u64, u64)>,
    /// Writes (by ordinal) that report success but are not applied.
    pub lost_writes: Vec<u64>,
    /// `(ordinal, delta)`: that write lands at `offset + delta` instead; when that lies
    /// outside the disk, the write goes nowhere (it is lost).
    pub misdirect_writes: Vec<(u64, i64)>,
    /// Every fsync fails with EIO (writes keep working): a device that could not make what
    /// it acknowledged durable.
    pub fail_fsyncs: bool,
    /// Every read completes this many milliseconds after it is submitted (its data is
    /// taken then): a slow device, for tests of what happens while reads are in flight.
    pub read_delay_ms: u64,
    /// Every fsync completes this many milliseconds after it is submitted: a device slow to
    /// make writes durable, for tests of what waits for that.
    pub fsync_delay_ms: u64,
    /// The disk has a volatile write cache: a write without DSYNC is durable only once an
    /// fsync sent after it completed has completed; [`SimDisk::power_loss`] undoes the rest.
    pub volatile_cache: bool,
}

/// A simulated disk. Clones are handles to the same disk.
#[derive(Clone)]
pub struct SimDisk {
    inner: Arc<Mutex<DiskState>>,
}

struct DiskState {
    size: u64,
    /// Chunk index -> SIM_CHUNK_BYTES bytes; a missing chunk reads as zeros.
    chunks: HashMap<u64, Box<[u8]>>,
    faults: SimFaults,
    /// Writes seen since faults were last set or cleared.
    writes_seen: u64,
    crashed: bool,
    /// With `volatile_cache`: the writes not yet made durable, oldest first.
    volatile: Vec<VolatileWrite>,
    /// Numbers the writes of `volatile` (never reset).
    volatile_seq: u64,
}

/// A write in the simulated volatile cache: what it overwrote, to undo it at a power loss,
/// and what it wrote, to put back after the undoing when it is kept (a DSYNC write, durable
/// at once, always is).
struct VolatileWrite {
    seq: u64,
    offset: u64,
    old: Vec<u8>,
    new: Vec<u8>,
    dsync: bool,
}

/// Why a simulated request failed (the backend adds path and offset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SimFail {
    Crashed,
    Eio,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.state();
        write!(f, "SimDisk(size={}, chunks={}, crashed={})", st.size, st.chunks.len(), st.crashed)
    }
}

impl SimDisk {
    /// A zero-filled disk of `size_bytes`; memory is allocated on first write, per 1 MiB.
    pub fn new(size_bytes: u64) -> SimDisk {
        assert!(size_bytes > 0, "a disk of 0 bytes");
        SimDisk {
            inner: Arc::new(Mutex::new(DiskState {
                size: size_bytes,
                chunks: HashMap::new(),
                faults: SimFaults::default(),
                writes_seen: 0,
                crashed: false,
                volatile: Vec::new(),
                volatile_seq: 0,
            })),
        }
    }

    fn state(&self) -> MutexGuard<'_, DiskState> {
        // A test that panicked while holding the lock leaves consistent data behind (every
        // mutation completes under the lock), so poisoning is ignored.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn size(&self) -> u64 {
        self.state().size
    }

    /// Bytes of memory the disk holds (written chunks only).
    pub fn allocated_bytes(&self) -> u64 {
        self.state().chunks.len() as u64 * SIM_CHUNK_BYTES as u64
    }

    /// Read bytes directly, bypassing faults and counters (for tests that inspect the disk).
    pub fn read_raw(&self, offset: u64, len: usize) -> Vec<u8> {
        let st = self.state();
        st.check_range(offset, len);
        let mut out = vec![0u8; len];
        st.read_into(offset, &mut out);
        out
    }

    /// Write bytes directly, bypassing faults and counters (for tests that corrupt data:
    /// bit flips, zeroed sectors, records copied elsewhere).
    pub fn write_raw(&self, offset: u64, data: &[u8]) {
        let mut st = self.state();
        st.check_range(offset, data.len());
        st.write_from(offset, data);
    }

    /// Start injecting `faults`; resets the write counter and any earlier crash.
    pub fn set_faults(&self, faults: SimFaults) {
        let mut st = self.state();
        st.faults = faults;
        st.writes_seen = 0;
        st.crashed = false;
    }

    /// A power loss: the writes still in the volatile cache (see
    /// [`SimFaults::volatile_cache`]) are undone, newest first; DSYNC writes among them stay.
    /// Returns how many writes were undone.
    pub fn power_loss(&self) -> usize {
        self.power_loss_keeping(&[])
    }

    /// A power loss after the device persisted, out of order, the cached writes that touch
    /// one of the `[start, end)` byte ranges in `keep`; the others are undone.
    pub fn power_loss_keeping(&self, keep: &[(u64, u64)]) -> usize {
        let mut st = self.state();
        let volatile = std::mem::take(&mut st.volatile);
        let kept = |v: &VolatileWrite| {
            let end = v.offset + v.old.len() as u64;
            v.dsync || keep.iter().any(|&(s, e)| v.offset < e && s < end)
        };
        for v in volatile.iter().rev() {
            if !kept(v) {
                st.write_from(v.offset, &v.old);
            }
        }
        // The kept writes again, in order, over whatever an older undone one put back.
        for v in volatile.iter().filter(|v| kept(v)) {
            st.write_from(v.offset, &v.new);
        }
        volatile.iter().filter(|v| !kept(v)).count()
    }

    /// The number of the last write in the volatile cache: an fsync sent now makes it and
    /// those before it durable.
    fn fsync_mark(&self) -> u64 {
        self.state().volatile_seq
    }

    /// Stop injecting faults (a "repaired" or restarted device); resets the write counter
    /// and any crash. The data, torn writes included, stays as it is.
    pub fn clear_faults(&self) {
        self.set_faults(SimFaults::default());
    }

    /// Writes submitted since faults were last set or cleared (failed ones included).
    pub fn writes_seen(&self) -> u64 {
        self.state().writes_seen
    }

    /// How long `op` is held back before it is executed (`read_delay_ms`, `fsync_delay_ms`).
    fn delay(&self, op: &IoOp) -> Duration {
        let f = &self.state().faults;
        Duration::from_millis(match op {
            IoOp::Read { .. } => f.read_delay_ms,
            IoOp::Fsync => f.fsync_delay_ms,
            _ => 0,
        })
    }

    /// True once a `crash_after_writes` fault has fired.
    pub fn crashed(&self) -> bool {
        self.state().crashed
    }

    fn sim_read(&self, offset: u64, out: &mut [u8]) -> Result<(), SimFail> {
        let st = self.state();
        st.check_range(offset, out.len());
        let bad_read = st.faults.eio_read_ranges.iter().any(|&(s, e)| offset < e && s < offset + out.len() as u64);
        if st.touches_eio(offset, out.len()) || bad_read {
            return Err(SimFail::Eio);
        }
        st.read_into(offset, out);
        Ok(())
    }

    fn sim_write(&self, offset: u64, data: &[u8], dsync: bool) -> Result<(), SimFail> {
        let mut st = self.state();
        st.check_range(offset, data.len());
        st.writes_seen += 1;
        let ordinal = st.writes_seen;
        if st.crashed {
            return Err(SimFail::Crashed);
        }
        if st.faults.crash_after_writes.is_some_and(|n| ordinal > n) {
            st.crashed = true;
            let seed = st.faults.seed;
            for (start, end, applied) in torn_pages(seed, ordinal, offset, data.len()) {
                if applied {
                    let from = (start - offset) as usize;
                    let to = (end - offset) as usize;
                    st.write_from(start, &data[from..to]);
                }
            }
            return Err(SimFail::Crashed);
        }
        if st.touches_eio(offset, data.len()) {
            return Err(SimFail::Eio);
        }
        if st.faults.lost_writes.contains(&ordinal) {
            return Ok(());
        }
        if let Some(&(_, delta)) = st.faults.misdirect_writes.iter().find(|(n, _)| *n == ordinal) {
            let target = i128::from(offset) + i128::from(delta);
            if target >= 0 && target + data.len() as i128 <= i128::from(st.size) {
                st.write_from(target as u64, data);
            }
            return Ok(());
        }
        if st.faults.volatile_cache {
            let mut old = vec![0u8; data.len()];
            st.read_into(offset, &mut old);
            st.volatile_seq += 1;
            let seq = st.volatile_seq;
            st.volatile.push(VolatileWrite { seq, offset, old, new: data.to_vec(), dsync });
        }
        st.write_from(offset, data);
        Ok(())
    }

    /// An fsync sent when the volatile cache's last write was `mark`.
    fn sim_fsync(&self, mark: u64) -> Result<(), SimFail> {
        let mut st = self.state();
        if st.crashed {
            return Err(SimFail::Crashed);
        }
        if st.faults.fail_fsyncs {
            return Err(SimFail::Eio);
        }
        st.volatile.retain(|v| v.seq > mark);
        Ok(())
    }
}

impl DiskState {
    fn check_range(&self, offset: u64, len: usize) {
        assert!(
            offset.checked_add(len as u64).is_some_and(|end| end <= self.size),
            "simulated I/O past the end: offset {offset} + {len} > size {}",
            self.size
        );
    }

    fn touches_eio(&self, offset: u64, len: usize) -> bool {
        let end = offset + len as u64;
        self.faults.eio_ranges.iter().any(|&(s, e)| offset < e && s < end)
    }

    /// Visit `[offset, offset + len)` chunk by chunk: `(chunk index, offset in chunk,
    /// offset in the caller's buffer, length)`.
    fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize, usize)> {
        let chunk = SIM_CHUNK_BYTES as u64;
        let mut done = 0usize;
        std::iter::from_fn(move || {
            if done == len {
                return None;
            }
            let at = offset + done as u64;
            let in_chunk = (at % chunk) as usize;
            let n = (SIM_CHUNK_BYTES - in_chunk).min(len - done);
            let piece = (at / chunk, in_chunk, done, n);
            done += n;
            Some(piece)
        })
    }

    fn read_into(&self, offset: u64, out: &mut [u8]) {
        for (idx, at, from, n) in Self::pieces(offset, out.len()) {
            let dst = &mut out[from..from + n];
            match self.chunks.get(&idx) {
                Some(c) => dst.copy_from_slice(&c[at..at + n]),
                None => dst.fill(0),
            }
        }
    }

    fn write_from(&mut self, offset: u64, data: &[u8]) {
        for (idx, at, from, n) in Self::pieces(offset, data.len()) {
            let c = self.chunks.entry(idx).or_insert_with(|| vec![0u8; SIM_CHUNK_BYTES].into_boxed_slice());
            c[at..at + n].copy_from_slice(&data[from..from + n]);
        }
    }
}

/// The pieces of a torn write, cut at absolute 4 KiB boundaries: `(start, end, applied)`.
/// Each page lands or not by a coin flip seeded from `(seed, ordinal)`, so the result is an
/// arbitrary subset, reproducible from the seed.
fn torn_pages(seed: u64, ordinal: u64, offset: u64, len: usize) -> Vec<(u64, u64, bool)> {
    let mut rng = SplitMix64(seed ^ ordinal.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let end = offset + len as u64;
    let mut out = Vec::new();
    let mut at = offset;
    while at < end {
        let next = ((at / TORN_PAGE_BYTES + 1) * TORN_PAGE_BYTES).min(end);
        out.push((at, next, rng.next() & 1 == 1));
        at = next;
    }
    out
}

/// A tiny, stable PRNG (SplitMix64): the same seed gives the same faults in every build.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

// ---------------------------------------------------------------------------------------------

/// Simulated devices of one namespace.
#[derive(Debug, Clone)]
pub struct SimDevices {
    disks: Vec<SimDisk>,
    infos: Vec<DeviceInfo>,
}

impl SimDevices {
    /// `io_align` plays the device's logical block size (512 to 4096, a power of two); each
    /// disk's usable size is its size rounded down to it.
    pub fn new(disks: Vec<SimDisk>, io_align: u32) -> SimDevices {
        assert!(!disks.is_empty(), "no simulated disks");
        assert!(
            io_align.is_power_of_two() && (512..=BUF_ALIGN as u32).contains(&io_align),
            "io_align {io_align} must be a power of two in 512..={BUF_ALIGN}"
        );
        let infos = disks
            .iter()
            .enumerate()
            .map(|(i, d)| DeviceInfo {
                path: format!("sim:{i}"),
                size_bytes: d.size() - d.size() % u64::from(io_align),
                io_align,
                physical_block: io_align,
                is_block_device: false,
            })
            .collect();
        SimDevices { disks, infos }
    }

    pub fn disks(&self) -> &[SimDisk] {
        &self.disks
    }
}

impl DeviceSet for SimDevices {
    fn devices(&self) -> &[DeviceInfo] {
        &self.infos
    }

    fn open_backend(
        &self,
        wake: Option<Wake>,
        _arena_slot_bytes: usize,
        _arena_slots: usize,
    ) -> Result<Box<dyn IoBackend>, DeviceError> {
        Ok(Box::new(SimBackend {
            disks: self.disks.clone(),
            infos: self.infos.clone(),
            doorbell: wake,
            pending: VecDeque::new(),
            delayed: VecDeque::new(),
            ready: VecDeque::new(),
            rung: false,
            sock_ready: Vec::new(),
        }))
    }
}

/// Runs requests against [`SimDisk`]s, synchronously and in push order, at `submit_and_wait`.
pub struct SimBackend {
    disks: Vec<SimDisk>,
    infos: Vec<DeviceInfo>,
    doorbell: Option<Wake>,
    pending: VecDeque<IoRequest>,
    /// Reads and fsyncs held back by [`SimFaults::read_delay_ms`] and
    /// [`SimFaults::fsync_delay_ms`], with the time each is due (in submission order: one
    /// due earlier behind one due later waits for it).
    delayed: VecDeque<(Instant, IoRequest, u64)>,
    ready: VecDeque<IoCompletion>,
    rung: bool,
    /// Socket operations, all refused (see [`IoBackend::sockets`]).
    sock_ready: Vec<SockCompletion>,
}

impl SimBackend {
    /// `mark`: for an fsync, the volatile cache's last write when it was sent.
    fn execute(&self, req: IoRequest, mark: u64) -> IoCompletion {
        let IoRequest { tag, dev, offset, op } = req;
        let disk = &self.disks[dev as usize];
        let (result, len, op) = match op {
            IoOp::Read { mut buf } => {
                let len = buf.len();
                (disk.sim_read(offset, &mut buf), len, IoOp::Read { buf })
            }
            IoOp::Write { buf, start, end, dsync } => {
                let data = buf.read_at(start, end - start);
                (disk.sim_write(offset, &data, dsync), data.len(), IoOp::Write { buf, start, end, dsync })
            }
            IoOp::Fsync => (disk.sim_fsync(mark), 0, IoOp::Fsync),
        };
        let result = result.map(|()| len).map_err(|f| self.error(dev, offset, len, f));
        IoCompletion { tag, dev, offset, result, op }
    }

    fn error(&self, dev: DevId, offset: u64, len: usize, f: SimFail) -> DeviceError {
        match f {
            SimFail::Crashed => DeviceError::Crashed,
            SimFail::Eio => DeviceError::Io {
                path: self.infos[dev as usize].path.clone(),
                offset,
                len,
                source: io::Error::from_raw_os_error(libc::EIO),
            },
        }
    }
}

impl IoBackend for SimBackend {
    fn push(&mut self, req: IoRequest) {
        assert_request(&self.infos, &req);
        self.pending.push_back(req);
    }

    fn submit_and_wait(&mut self, wait: bool, timeout: Option<Duration>) -> Result<(), DeviceError> {
        let now = Instant::now();
        while let Some(req) = self.pending.pop_front() {
            let disk = &self.disks[req.dev as usize];
            let (delay, mark) = (disk.delay(&req.op), disk.fsync_mark());
            if !delay.is_zero() {
                self.delayed.push_back((now + delay, req, mark));
                continue;
            }
            let c = self.execute(req, mark);
            self.ready.push_back(c);
        }
        while self.delayed.front().is_some_and(|(due, ..)| *due <= now) {
            let (_, req, mark) = self.delayed.pop_front().expect("not empty");
            let c = self.execute(req, mark);
            self.ready.push_back(c);
        }
        if self.rung {
            return Ok(());
        }
        let block = wait && self.ready.is_empty();
        // A delayed request is due by then: wake for it.
        let timeout = match self.delayed.front() {
            Some((due, ..)) => {
                Some(timeout.map_or(due.saturating_duration_since(now), |t| t.min(due.saturating_duration_since(now))))
            }
            None => timeout,
        };
        let wait_for = if block { timeout } else { Some(Duration::ZERO) };
        // Without a doorbell and without a timeout nothing could ever end the wait.
        if self.doorbell.is_some() || (block && timeout.is_some()) {
            self.rung = wait_eventfd(self.doorbell, wait_for);
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<IoCompletion>) -> bool {
        out.extend(self.ready.drain(..));
        std::mem::take(&mut self.rung)
    }

    fn in_flight(&self) -> usize {
        self.pending.len() + self.delayed.len() + self.ready.len()
    }

    fn alloc(&mut self, len: usize) -> AlignedBuf {
        AlignedBuf::new(len)
    }

    fn free(&mut self, buf: AlignedBuf) {
        assert!(buf.arena_slot().is_none(), "arena buffer freed to the simulated backend");
        drop(buf);
    }

    fn describe(&self) -> String {
        format!(
            "simulated: {} disk(s), io_align {}, doorbell={}",
            self.disks.len(),
            self.infos.first().map_or(0, |i| i.io_align),
            if self.doorbell.is_some() { "poll" } else { "none" }
        )
    }

    fn push_sock(&mut self, req: SockRequest) -> SockId {
        self.sock_ready.push(unsupported_sock(req));
        SockId(u64::MAX)
    }

    fn cancel_sock(&mut self, _id: SockId) {}

    fn reap_sock(&mut self, out: &mut Vec<SockCompletion>) {
        out.append(&mut self.sock_ready);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::buf::WBuf;
    use crate::io::run_sync;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::rc::Rc;
    use std::time::Instant;

    const PAGE: usize = TORN_PAGE_BYTES as usize;

    fn backend(disk: &SimDisk) -> Box<dyn IoBackend> {
        SimDevices::new(vec![disk.clone()], 4096).open_backend(None, 0, 0).unwrap()
    }

    fn write(io: &mut dyn IoBackend, offset: u64, data: &[u8]) -> Result<usize, DeviceError> {
        let w = WBuf::new(io.alloc(data.len()));
        w.write_at(0, data);
        w.freeze_to(data.len());
        let op = IoOp::Write { buf: Rc::new(w), start: 0, end: data.len(), dsync: false };
        run_sync(io, IoRequest { tag: 1, dev: 0, offset, op }).unwrap().result
    }

    fn read(io: &mut dyn IoBackend, offset: u64, len: usize) -> Result<Vec<u8>, DeviceError> {
        let op = IoOp::Read { buf: io.alloc(len) };
        let c = run_sync(io, IoRequest { tag: 2, dev: 0, offset, op }).unwrap();
        let IoOp::Read { buf } = c.op else { panic!("not a read") };
        c.result.map(|_| buf.to_vec())
    }

    #[test]
    fn sparse_disks_are_cheap_and_read_zero() {
        let disk = SimDisk::new(1 << 40);
        assert_eq!(disk.size(), 1 << 40);
        assert_eq!(disk.allocated_bytes(), 0);
        disk.write_raw((1 << 40) - 4096, &[7u8; 4096]);
        assert_eq!(disk.read_raw((1 << 40) - 4096, 4096), vec![7u8; 4096]);
        assert_eq!(disk.allocated_bytes(), SIM_CHUNK_BYTES as u64);
        assert!(disk.read_raw(1 << 30, 8192).iter().all(|&b| b == 0));
        // A write across a chunk boundary lands in both chunks.
        let at = SIM_CHUNK_BYTES as u64 - 10;
        disk.write_raw(at, &[1u8; 20]);
        assert_eq!(disk.read_raw(at - 1, 22), [&[0u8][..], &[1u8; 20], &[0u8]].concat());
    }

    #[test]
    fn requests_run_in_push_order_and_data_persists_across_backends() {
        let disk = SimDisk::new(8 << 20);
        let devs = SimDevices::new(vec![disk.clone(), SimDisk::new(1 << 20)], 512);
        assert_eq!(devs.devices()[1].path, "sim:1");
        let mut io = devs.open_backend(None, 0, 0).unwrap();
        for (tag, byte) in [(10u64, 1u8), (11, 2)] {
            let w = WBuf::new(io.alloc(4096));
            w.write_at(0, &[byte; 4096]);
            w.freeze_to(4096);
            io.push(IoRequest {
                tag,
                dev: 0,
                offset: 512,
                op: IoOp::Write { buf: Rc::new(w), start: 0, end: 4096, dsync: true },
            });
        }
        io.push(IoRequest { tag: 12, dev: 0, offset: 0, op: IoOp::Fsync });
        assert_eq!(io.in_flight(), 3);
        io.submit_and_wait(true, None).unwrap();
        let mut out = Vec::new();
        assert!(!io.reap(&mut out));
        assert_eq!(out.iter().map(|c| c.tag).collect::<Vec<_>>(), vec![10, 11, 12]);
        assert!(out.iter().all(|c| c.result.is_ok()));
        assert_eq!(io.in_flight(), 0);
        drop(io);
        // A new engine on the same disk sees the later write.
        let mut io = backend(&disk);
        assert_eq!(read(io.as_mut(), 0, 8192).unwrap()[512..4608], [2u8; 4096]);
        assert!(io.describe().contains("simulated"));
    }

    #[test]
    fn crash_tears_a_subset_of_pages_and_stops_later_writes() {
        let pattern_of = |seed: u64| -> Vec<bool> {
            let disk = SimDisk::new(8 << 20);
            let mut io = backend(&disk);
            disk.set_faults(SimFaults { seed, crash_after_writes: Some(2), ..Default::default() });
            write(io.as_mut(), 0, &[1u8; 8192]).unwrap();
            write(io.as_mut(), 8192, &[2u8; 8192]).unwrap();
            let err = write(io.as_mut(), 1 << 20, &[0xab; 64 * PAGE]).unwrap_err();
            assert!(matches!(err, DeviceError::Crashed), "{err}");
            assert!(disk.crashed());
            // Every later write fails and applies nothing; fsync fails; reads work.
            assert!(matches!(write(io.as_mut(), 0, &[9u8; 4096]), Err(DeviceError::Crashed)));
            let fsync = run_sync(io.as_mut(), IoRequest { tag: 3, dev: 0, offset: 0, op: IoOp::Fsync }).unwrap();
            assert!(matches!(fsync.result, Err(DeviceError::Crashed)));
            assert_eq!(read(io.as_mut(), 0, 8192).unwrap(), vec![1u8; 8192]);
            assert_eq!(disk.writes_seen(), 4);
            let torn = read(io.as_mut(), 1 << 20, 64 * PAGE).unwrap();
            torn.chunks(PAGE)
                .map(|p| {
                    // Each page is wholly applied or wholly absent.
                    assert!(p.iter().all(|&b| b == p[0]) && (p[0] == 0 || p[0] == 0xab));
                    p[0] == 0xab
                })
                .collect()
        };
        let a = pattern_of(42);
        let applied = a.iter().filter(|&&x| x).count();
        assert!(applied > 0 && applied < a.len(), "torn write applied {applied} of {} pages", a.len());
        let hole_then_page = a.windows(2).any(|w| !w[0] && w[1]);
        assert!(hole_then_page, "torn write is a prefix, not a subset with holes: {a:?}");
        assert_eq!(a, pattern_of(42), "same seed, same tear");
        assert_ne!(a, pattern_of(43), "another seed, another tear");
    }

    #[test]
    fn torn_pieces_follow_absolute_page_boundaries() {
        let pieces = torn_pages(1, 1, 4096 - 512, 2 * 4096);
        let bounds: Vec<(u64, u64)> = pieces.iter().map(|&(s, e, _)| (s, e)).collect();
        assert_eq!(bounds, vec![(3584, 4096), (4096, 8192), (8192, 11776)]);
    }

    #[test]
    fn clear_faults_revives_a_crashed_disk_keeping_its_data() {
        let disk = SimDisk::new(1 << 20);
        let mut io = backend(&disk);
        disk.set_faults(SimFaults { crash_after_writes: Some(0), seed: 5, ..Default::default() });
        assert!(write(io.as_mut(), 0, &[3u8; 4096]).is_err());
        disk.clear_faults();
        assert!(!disk.crashed());
        assert_eq!(disk.writes_seen(), 0);
        write(io.as_mut(), 4096, &[4u8; 4096]).unwrap();
        assert_eq!(disk.read_raw(4096, 4096), vec![4u8; 4096]);
        assert_eq!(disk.writes_seen(), 1);
    }

    #[test]
    fn eio_ranges_fail_reads_and_writes_that_touch_them() {
        let disk = SimDisk::new(1 << 20);
        let mut io = backend(&disk);
        disk.write_raw(40960, &[5u8; 4096]);
        disk.set_faults(SimFaults { eio_ranges: vec![(40960 + 100, 40960 + 101)], ..Default::default() });
        match read(io.as_mut(), 36864, 8192) {
            Err(DeviceError::Io { path, offset, len, source }) => {
                assert_eq!((path.as_str(), offset, len), ("sim:0", 36864, 8192));
                assert_eq!(source.raw_os_error(), Some(libc::EIO));
            }
            other => panic!("expected EIO, got {other:?}"),
        }
        assert!(matches!(write(io.as_mut(), 40960, &[6u8; 4096]), Err(DeviceError::Io { .. })));
        assert_eq!(disk.read_raw(40960, 4096), vec![5u8; 4096], "failed write applied nothing");
        // Neighbours are fine.
        read(io.as_mut(), 45056, 4096).unwrap();
        write(io.as_mut(), 36864, &[7u8; 4096]).unwrap();
        assert_eq!(disk.read_raw(36864, 4096), vec![7u8; 4096]);
    }

    #[test]
    fn a_power_loss_undoes_the_writes_no_completed_fsync_covers() {
        let disk = SimDisk::new(1 << 20);
        let mut io = backend(&disk);
        disk.set_faults(SimFaults { volatile_cache: true, fsync_delay_ms: 50, ..Default::default() });
        let dsync = |io: &mut dyn IoBackend, offset: u64, byte: u8| {
            let w = WBuf::new(io.alloc(4096));
            w.write_at(0, &[byte; 4096]);
            w.freeze_to(4096);
            let op = IoOp::Write { buf: Rc::new(w), start: 0, end: 4096, dsync: true };
            run_sync(io, IoRequest { tag: 3, dev: 0, offset, op }).unwrap().result.unwrap();
        };
        write(io.as_mut(), 0, &[1; 4096]).unwrap();
        // Sent after the first write, completed (50 ms later) after the second: it covers
        // only the first.
        io.push(IoRequest { tag: 4, dev: 0, offset: 0, op: IoOp::Fsync });
        io.submit_and_wait(false, None).unwrap();
        write(io.as_mut(), 0, &[2; 4096]).unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            io.submit_and_wait(true, Some(std::time::Duration::from_millis(100))).unwrap();
            io.reap(&mut out);
        }
        assert!(out[0].result.is_ok());
        write(io.as_mut(), 8192, &[3; 4096]).unwrap();
        dsync(io.as_mut(), 8192, 4);
        write(io.as_mut(), 16384, &[5; 4096]).unwrap();
        dsync(io.as_mut(), 16384, 6);
        write(io.as_mut(), 16384, &[7; 4096]).unwrap();
        assert_eq!(disk.power_loss(), 4);
        assert_eq!(disk.read_raw(0, 4096), vec![1u8; 4096], "the fsynced write stays, the later one goes");
        assert_eq!(disk.read_raw(8192, 4096), vec![4u8; 4096], "a DSYNC write stays");
        assert_eq!(disk.read_raw(16384, 4096), vec![6u8; 4096], "a DSYNC write stays, what came after goes");
        assert_eq!(disk.power_loss(), 0, "nothing left to undo");
    }

    #[test]
    fn lost_writes_report_success_but_change_nothing() {
        let disk = SimDisk::new(1 << 20);
        let mut io = backend(&disk);
        disk.set_faults(SimFaults { lost_writes: vec![2], ..Default::default() });
        for i in 0..3u8 {
            assert_eq!(write(io.as_mut(), u64::from(i) * 4096, &[i + 1; 4096]).unwrap(), 4096);
        }
        assert_eq!(disk.read_raw(0, 4096), vec![1u8; 4096]);
        assert_eq!(disk.read_raw(4096, 4096), vec![0u8; 4096], "write 2 was lost");
        assert_eq!(disk.read_raw(8192, 4096), vec![3u8; 4096]);
        assert_eq!(disk.writes_seen(), 3);
    }

    #[test]
    fn misdirected_writes_land_elsewhere() {
        let disk = SimDisk::new(1 << 20);
        let mut io = backend(&disk);
        disk.set_faults(SimFaults { misdirect_writes: vec![(1, 8192), (2, -(1 << 30))], ..Default::default() });
        assert_eq!(write(io.as_mut(), 4096, &[8u8; 4096]).unwrap(), 4096);
        assert_eq!(disk.read_raw(4096, 4096), vec![0u8; 4096], "intended place untouched");
        assert_eq!(disk.read_raw(12288, 4096), vec![8u8; 4096], "landed 8 KiB further");
        // Out of range: the write vanishes but reports success.
        assert_eq!(write(io.as_mut(), 0, &[9u8; 4096]).unwrap(), 4096);
        assert_eq!(disk.read_raw(0, 4096), vec![0u8; 4096]);
        // Unlisted writes are normal.
        write(io.as_mut(), 0, &[10u8; 4096]).unwrap();
        assert_eq!(disk.read_raw(0, 4096), vec![10u8; 4096]);
    }

    #[test]
    fn doorbell_wakes_the_simulated_backend() {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(raw >= 0);
        // SAFETY: raw is a fresh descriptor we own.
        let efd = unsafe { OwnedFd::from_raw_fd(raw) };
        let devs = SimDevices::new(vec![SimDisk::new(1 << 20)], 4096);
        let mut io = devs.open_backend(Some(Wake(efd.as_raw_fd())), 0, 0).unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live local u64 to an open eventfd.
            unsafe { libc::write(raw, (&one as *const u64).cast(), 8) };
        });
        let t0 = Instant::now();
        io.submit_and_wait(true, Some(Duration::from_secs(10))).unwrap();
        assert!(t0.elapsed() < Duration::from_secs(5));
        let mut out = Vec::new();
        assert!(io.reap(&mut out));
        assert!(!io.reap(&mut out));
        t.join().unwrap();
        // Without a ring the wait ends at the timeout.
        let t0 = Instant::now();
        io.submit_and_wait(true, Some(Duration::from_millis(30))).unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(25));
        assert!(!io.reap(&mut out));
    }

    #[test]
    fn waiting_without_doorbell_or_timeout_does_not_hang() {
        let mut io = backend(&SimDisk::new(1 << 20));
        io.submit_and_wait(true, None).unwrap();
        let t0 = Instant::now();
        io.submit_and_wait(true, Some(Duration::from_millis(20))).unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(15));
    }

    #[test]
    #[should_panic(expected = "misaligned I/O on sim:0")]
    fn misaligned_requests_panic_in_simulation_too() {
        let mut io = backend(&SimDisk::new(1 << 20));
        let buf = io.alloc(4096);
        io.push(IoRequest { tag: 1, dev: 0, offset: 512, op: IoOp::Read { buf } });
    }

    #[test]
    #[should_panic(expected = "unfrozen")]
    fn writing_an_unfrozen_range_panics() {
        let mut io = backend(&SimDisk::new(1 << 20));
        let w = Rc::new(WBuf::new(io.alloc(4096)));
        io.push(IoRequest { tag: 1, dev: 0, offset: 0, op: IoOp::Write { buf: w, start: 0, end: 4096, dsync: false } });
    }
}
