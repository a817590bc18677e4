//! The io_uring backend: one ring per shard thread.
//!
//! - The ring is set up `SINGLE_ISSUER | DEFER_TASKRUN` where the kernel allows it (6.1+),
//!   else `COOP_TASKRUN`, else plain; both with `TASKRUN_FLAG`, so that a non-waiting
//!   `submit` still runs the deferred completion work. CQ = 4 × SQ. Never SQPOLL.
//! - Device fds are registered; SQEs name them as `Fixed(dev)`.
//! - An optional arena of equal slots is registered as fixed buffers; buffers from it use
//!   `ReadFixed`/`WriteFixed`. When `RLIMIT_MEMLOCK` or the kernel refuses, plain buffers
//!   are used and one warning gives the numbers.
//! - The doorbell eventfd is watched by a `PollAdd` with a reserved `user_data`.
//! - Socket operations (receive, send, accept) for the shard's front-end live in a slab of
//!   their own, outside the device ops' CQ budget and `in_flight`; `Drop` cancels them.
//!
//! Ownership rule that makes the `unsafe` sound: every buffer named by an SQE belongs to an
//! entry of `slab` (through its [`IoOp`]) from before the SQE is pushed until its CQE is
//! reaped, and `Drop` waits for the kernel to finish every such entry (or leaks them).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::rc::Rc;
use std::time::Duration;

use io_uring::types::{Fd, Fixed, FsyncFlags, SubmitArgs, Timespec};
use io_uring::{opcode, squeue, IoUring};

use super::buf::{AlignedBuf, BUF_ALIGN};
use super::device::{assert_request, explain_setup_error, is_aligned};
use super::{
    DevId, DeviceInfo, IoBackend, IoCompletion, IoOp, IoRequest, SockCompletion, SockId, SockOp, SockRequest, Wake,
};
use crate::error::DeviceError;

/// `user_data` of the doorbell's poll; slab indices never reach it.
const DOORBELL: u64 = u64::MAX;
/// `user_data` of a cancellation request (its own completion is ignored).
const CANCEL: u64 = u64::MAX - 1;
/// Marks the `user_data` of a socket operation: `SOCK_BIT | serial << SOCK_IDX_BITS | index`,
/// the serial below bit 62, so it never equals `DOORBELL` or `CANCEL`.
const SOCK_BIT: u64 = 1 << 63;
const SOCK_IDX_BITS: u32 = 24;
const SOCK_SERIAL_MASK: u64 = (1 << (62 - SOCK_IDX_BITS)) - 1;
/// Completion queue entries at least, for the sockets' receives armed all at once.
const MIN_CQ_ENTRIES: u32 = 4096;
/// Extra non-waiting submissions `submit_and_wait` makes for socket ops that did not fit
/// the SQ.
const SOCK_FILL_ROUNDS: usize = 64;
/// Largest SQ accepted (the kernel's own limit is 32768).
const MAX_SQ_ENTRIES: u32 = 4096;
/// Times one request is resubmitted after `EINTR`/`EAGAIN` without progress before it fails.
const MAX_RETRIES: u32 = 64;
/// io_uring accepts at most 16384 registered buffers, each at most 1 GiB.
const MAX_ARENA_SLOTS: usize = 1 << 14;
const MAX_ARENA_SLOT_BYTES: usize = 1 << 30;
/// How long `Drop` waits for in-flight I/O before leaking its buffers instead.
const DROP_WAIT: Duration = Duration::from_secs(60);
/// Bit of `CAP_IPC_LOCK` in `/proc/self/status` `CapEff` (exempts from `RLIMIT_MEMLOCK`).
const CAP_IPC_LOCK_BIT: u32 = 14;

// ---------------------------------------------------------------------------------------------
// The errno table

/// What a request does, as far as completion handling is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Read,
    Write,
    Fsync,
}

/// The state of one request when its CQE arrives.
#[derive(Debug, Clone, Copy)]
pub(super) struct OpState<'a> {
    pub kind: Kind,
    pub path: &'a str,
    /// Offset of the whole request.
    pub offset: u64,
    /// Length of the whole request (0 for fsync).
    pub len: usize,
    /// Bytes transferred before this CQE.
    pub done: usize,
    /// Resubmissions without progress so far.
    pub retries: u32,
    pub io_align: u32,
}

/// The decision for one CQE.
#[derive(Debug)]
pub(super) enum Step {
    /// Every requested byte was transferred (`len`; 0 for fsync).
    Done(usize),
    /// Submit the remainder `[done, len)` again. `retry` marks a resubmission without
    /// progress (`EINTR`/`EAGAIN`), counted against [`MAX_RETRIES`].
    Again {
        done: usize,
        retry: bool,
    },
    Fail(DeviceError),
}

/// THE errno table: the one place that decides what a completion result means.
/// - `EINTR`, `EAGAIN`: resubmit the same remainder (at most [`MAX_RETRIES`] times in a row).
/// - short transfer: resubmit for the remainder, which must stay aligned for `O_DIRECT`.
/// - a write of 0 bytes: [`DeviceError::ZeroWrite`]; a read of 0 bytes: end of device,
///   [`DeviceError::Io`] with `UnexpectedEof`.
/// - `EINVAL` on a read or write: an alignment bug, [`DeviceError::Misaligned`].
/// - any other errno: [`DeviceError::Io`] naming the path, offset and length.
pub(super) fn errno_table(s: &OpState<'_>, res: i32) -> Step {
    let at = s.offset + s.done as u64;
    let rest = s.len - s.done;
    let io_err = |source: io::Error| DeviceError::Io { path: s.path.to_string(), offset: at, len: rest, source };
    if res < 0 {
        let errno = -res;
        return match errno {
            libc::EINTR | libc::EAGAIN if s.retries < MAX_RETRIES => Step::Again { done: s.done, retry: true },
            libc::EINVAL if s.kind != Kind::Fsync => Step::Fail(DeviceError::Misaligned {
                path: s.path.to_string(),
                offset: at,
                len: rest,
                align: s.io_align,
            }),
            _ => Step::Fail(io_err(io::Error::from_raw_os_error(errno))),
        };
    }
    let n = res as usize;
    match s.kind {
        Kind::Fsync => Step::Done(0),
        Kind::Write if n == 0 => Step::Fail(DeviceError::ZeroWrite { path: s.path.to_string(), offset: at }),
        Kind::Read if n == 0 => Step::Fail(io_err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("end of device after {} of {} bytes", s.done, s.len),
        ))),
        Kind::Read | Kind::Write => {
            assert!(n <= rest, "kernel reported {n} bytes for a {rest}-byte transfer on {}", s.path);
            let done = s.done + n;
            if done == s.len {
                Step::Done(done)
            } else if !is_aligned(done as u64, u64::from(s.io_align)) {
                // O_DIRECT cannot continue from an unaligned point.
                Step::Fail(DeviceError::Misaligned {
                    path: s.path.to_string(),
                    offset: s.offset + done as u64,
                    len: s.len - done,
                    align: s.io_align,
                })
            } else {
                Step::Again { done, retry: false }
            }
        }
    }
}

/// Where the untransferred part of a request lies: `(device offset, buffer offset, length)`.
pub(super) fn remainder(offset: u64, done: usize, len: usize) -> (u64, usize, usize) {
    assert!(done < len, "remainder of a finished transfer ({done} of {len})");
    (offset + done as u64, done, len - done)
}

// ---------------------------------------------------------------------------------------------
// The registered buffer arena

/// `slots` equal, page-aligned slots in one anonymous mapping, registered with the ring.
struct Arena {
    base: NonNull<u8>,
    slot_bytes: usize,
    slots: usize,
    free: Vec<u16>,
}

impl Arena {
    fn map(slot_bytes: usize, slots: usize) -> io::Result<Arena> {
        let total = slot_bytes.checked_mul(slots).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        // SAFETY: an anonymous private mapping with no address hint; the kernel validates
        // the length and we check the result.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Ask for transparent huge pages (THP "madvise" mode): the post-write cache's reads
        // land anywhere in the arena, and with 4 KiB pages nearly each one misses the TLB.
        // Advice only; a kernel without THP says EINVAL and the arena works as before.
        // SAFETY: the range is exactly the mapping just created.
        if unsafe { libc::madvise(p, total, libc::MADV_HUGEPAGE) } != 0 {
            tracing::debug!("arena: MADV_HUGEPAGE refused ({}); 4 KiB pages", io::Error::last_os_error());
        }
        let base = NonNull::new(p.cast::<u8>()).expect("mmap returned null");
        // Hand out low slots first.
        let free = (0..slots as u16).rev().collect();
        Ok(Arena { base, slot_bytes, slots, free })
    }

    fn slot_ptr(&self, slot: u16) -> NonNull<u8> {
        assert!((slot as usize) < self.slots);
        // SAFETY: slot < slots, so the offset stays inside the mapping of slots × slot_bytes.
        unsafe { self.base.add(slot as usize * self.slot_bytes) }
    }

    /// True when `[addr, addr + len)` lies inside slot `slot` of this arena.
    fn owns(&self, slot: u16, addr: usize, len: usize) -> bool {
        if slot as usize >= self.slots {
            return false;
        }
        let start = self.slot_ptr(slot).as_ptr() as usize;
        addr >= start && addr + len <= start + self.slot_bytes
    }

    fn iovecs(&self) -> Vec<libc::iovec> {
        (0..self.slots as u16)
            .map(|s| libc::iovec { iov_base: self.slot_ptr(s).as_ptr().cast(), iov_len: self.slot_bytes })
            .collect()
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        if self.free.len() != self.slots {
            // A buffer still points into the arena (held by the caller, or leaked with an op
            // the kernel never finished): keep the memory mapped so it never dangles.
            tracing::warn!(
                in_use = self.slots - self.free.len(),
                bytes = self.slots * self.slot_bytes,
                "arena slots still in use at shutdown; leaking the arena"
            );
            return;
        }
        // SAFETY: base/len describe our mapping; no slot is handed out and the ring that
        // registered it is gone (it drops first), so nothing refers to it any more.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.slots * self.slot_bytes) };
    }
}

/// Whether an arena of `needed` bytes may be registered under `limit` (None: unlimited).
fn arena_fits_memlock(needed: u64, limit: Option<u64>, cap_ipc_lock: bool) -> Result<(), String> {
    match limit {
        Some(lim) if needed > lim && !cap_ipc_lock => Err(format!(
            "registered buffers off: the arena needs {needed} bytes of locked memory but RLIMIT_MEMLOCK \
             is {lim} bytes; raise it (ulimit -l, systemd LimitMEMLOCK=) to use fixed buffers"
        )),
        _ => Ok(()),
    }
}

/// `RLIMIT_MEMLOCK` soft limit, `None` when unlimited.
pub(super) fn memlock_limit() -> Option<u64> {
    let mut rl = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: rl is a live rlimit the call fills in.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut rl) } != 0 || rl.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(rl.rlim_cur)
}

fn has_cap_ipc_lock() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return false };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK_BIT) != 0)
}

fn setup_arena(ring: &IoUring, slot_bytes: usize, slots: usize) -> (Option<Arena>, String) {
    if slots == 0 {
        return (None, "plain buffers (no arena requested)".into());
    }
    assert!(
        slot_bytes > 0 && is_aligned(slot_bytes as u64, BUF_ALIGN as u64),
        "arena slot size {slot_bytes} must be a positive multiple of {BUF_ALIGN}"
    );
    let plain = |why: String| {
        tracing::warn!("{why}");
        (None, format!("plain buffers ({why})"))
    };
    if slots > MAX_ARENA_SLOTS || slot_bytes > MAX_ARENA_SLOT_BYTES {
        return plain(format!(
            "registered buffers off: {slots} slots of {slot_bytes} bytes exceed io_uring's limits \
             ({MAX_ARENA_SLOTS} slots of at most {MAX_ARENA_SLOT_BYTES} bytes)"
        ));
    }
    let needed = (slots * slot_bytes) as u64;
    let limit = memlock_limit();
    if let Err(why) = arena_fits_memlock(needed, limit, has_cap_ipc_lock()) {
        return plain(why);
    }
    let arena = match Arena::map(slot_bytes, slots) {
        Ok(a) => a,
        Err(e) => return plain(format!("registered buffers off: cannot map a {needed}-byte arena: {e}")),
    };
    let iovecs = arena.iovecs();
    // SAFETY: each iovec covers one slot of the live mapping, which stays mapped until after
    // the ring is gone: the ring field drops before the arena field, Drop unregisters the
    // buffers once no I/O is in flight, and the arena leaks itself while any slot is in use.
    match unsafe { ring.submitter().register_buffers(&iovecs) } {
        Ok(()) => (Some(arena), format!("{slots} registered buffers of {slot_bytes} bytes")),
        Err(e) => {
            let lim = limit.map_or_else(|| "unlimited".to_string(), |l| format!("{l} bytes"));
            // Nothing was registered: the mapping can go (all slots are free).
            drop(arena);
            plain(format!("registered buffers off: registering {needed} bytes failed ({e}); RLIMIT_MEMLOCK is {lim}"))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The backend

/// One request from `push` until its completion is queued in `ready`.
struct Op {
    tag: u64,
    dev: DevId,
    offset: u64,
    op: IoOp,
    /// Bytes the whole request transfers (0 for fsync).
    len: usize,
    /// Bytes transferred so far (short transfers are continued).
    done: usize,
    retries: u32,
    /// An SQE for this op is with the kernel; its buffers must not move or be freed.
    in_kernel: bool,
}

impl Op {
    fn kind(&self) -> Kind {
        match self.op {
            IoOp::Read { .. } => Kind::Read,
            IoOp::Write { .. } => Kind::Write,
            IoOp::Fsync => Kind::Fsync,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Stats {
    /// SQEs that used `ReadFixed`/`WriteFixed`.
    pub fixed_ops: u64,
    /// SQEs that used plain `Read`/`Write`.
    pub plain_ops: u64,
    /// Resubmissions (short transfers, `EINTR`, `EAGAIN`).
    pub resubmits: u64,
}

/// One socket operation; its `user_data` is `id`.
struct SockSlot {
    id: u64,
    req: SockRequest,
    /// An SQE for it is with the kernel: its buffer must not move or be freed.
    in_kernel: bool,
}

pub(super) struct UringBackend {
    /// Declared before `arena`: the ring (and its buffer registration) goes first.
    ring: IoUring,
    arena: Option<Arena>,
    devices: Vec<DeviceInfo>,
    /// In-flight ops; `user_data` of an SQE is its index here. Bounded by what the caller
    /// pushes (the engine bounds in-flight I/O per shard).
    slab: Vec<Option<Op>>,
    slab_free: Vec<usize>,
    /// Slab indices waiting for room in the SQ (new requests and resubmissions).
    pending: VecDeque<usize>,
    /// Finished requests waiting for `reap`.
    ready: VecDeque<IoCompletion>,
    /// Ops whose SQE is with the kernel.
    in_kernel: usize,
    /// Bound on `in_kernel`: the CQ size less one entry kept for the doorbell. Socket ops
    /// are not counted: more of them may complete at once than the CQ holds, which the
    /// kernel keeps on its overflow list (IORING_FEAT_NODROP) until an enter flushes it.
    kernel_max: usize,
    doorbell: Option<Wake>,
    doorbell_armed: bool,
    rung: bool,
    /// Reusable buffer for CQEs read in one pass.
    cqes: Vec<(u64, i32)>,
    /// Socket operations from `push_sock` until their completion is queued in `sock_ready`.
    socks: Vec<Option<SockSlot>>,
    socks_free: Vec<usize>,
    /// Slab indices of socket operations waiting for room in the SQ.
    socks_pending: VecDeque<usize>,
    /// `user_data` of socket operations to cancel, waiting for room in the SQ.
    cancels: Vec<u64>,
    sock_ready: Vec<SockCompletion>,
    /// Socket operations whose SQE is with the kernel.
    socks_in_kernel: usize,
    sock_serial: u64,
    setup_flags: &'static str,
    /// Receives skip their first attempt ([`RECV_POLL_FIRST`]), where
    /// [`probe_recv_poll_first`] found that the kernel takes the bit.
    recv_poll_first: bool,
    buffers_note: String,
    stats: Stats,
}

impl UringBackend {
    /// Create a ring of `entries` SQ entries on the calling thread, registering `fds`
    /// (device `i` is `fds[i]`, described by `devices[i]`).
    pub(super) fn new(
        entries: u32,
        fds: &[RawFd],
        devices: Vec<DeviceInfo>,
        doorbell: Option<Wake>,
        arena_slot_bytes: usize,
        arena_slots: usize,
    ) -> Result<UringBackend, DeviceError> {
        assert!((1..=MAX_SQ_ENTRIES).contains(&entries), "ring entries {entries} not in 1..={MAX_SQ_ENTRIES}");
        assert_eq!(fds.len(), devices.len(), "one fd per device");
        let (mut ring, setup_flags) = build_ring(entries)?;
        let recv_poll_first = probe_recv_poll_first(&mut ring);
        if !fds.is_empty() {
            ring.submitter()
                .register_files(fds)
                .map_err(|source| DeviceError::Ring { context: "register device files", source })?;
        }
        let (arena, buffers_note) = setup_arena(&ring, arena_slot_bytes, arena_slots);
        let cq_entries = ring.params().cq_entries() as usize;
        Ok(UringBackend {
            kernel_max: cq_entries.saturating_sub(1).max(1),
            cqes: Vec::with_capacity(cq_entries),
            ring,
            arena,
            devices,
            slab: Vec::new(),
            slab_free: Vec::new(),
            pending: VecDeque::new(),
            ready: VecDeque::new(),
            in_kernel: 0,
            doorbell,
            doorbell_armed: false,
            rung: false,
            recv_poll_first,
            setup_flags,
            buffers_note,
            stats: Stats::default(),
            socks: Vec::new(),
            socks_free: Vec::new(),
            socks_pending: VecDeque::new(),
            cancels: Vec::new(),
            sock_ready: Vec::new(),
            socks_in_kernel: 0,
            sock_serial: 0,
        })
    }

    #[cfg(test)]
    pub(super) fn stats(&self) -> Stats {
        self.stats
    }

    /// Move pending ops (and the doorbell poll, first) into the SQ while there is room in
    /// the SQ (and, for device ops, in the CQ budget), then socket ops and cancellations.
    /// What does not fit stays pending.
    fn fill_sq(&mut self) {
        let mut sq = self.ring.submission();
        if let Some(wake) = self.doorbell.filter(|_| !self.doorbell_armed) {
            if !sq.is_full() {
                let e = opcode::PollAdd::new(Fd(wake.fd()), libc::POLLIN as u32).build().user_data(DOORBELL);
                // SAFETY: a poll SQE references no memory of ours, only the eventfd, which
                // the caller keeps open while the backend lives.
                unsafe { sq.push(&e) }.expect("SQ has room (checked)");
                self.doorbell_armed = true;
            }
        }
        while self.in_kernel < self.kernel_max && !sq.is_full() {
            let Some(idx) = self.pending.pop_front() else { break };
            let op = self.slab[idx].as_mut().expect("pending index names a live op");
            let entry = build_sqe(op, idx, self.arena.as_ref(), &mut self.stats);
            // SAFETY: the SQE points into buffers owned by `op` (an AlignedBuf, or the frozen
            // range of an Rc<WBuf> that `op` holds a reference to). `op` stays in the slab,
            // untouched, until this SQE's CQE is reaped, and Drop waits for that CQE (or
            // leaks the op), so the memory outlives the kernel's use of it. Moving `op`
            // within the slab does not move the heap memory the pointers name.
            unsafe { sq.push(&entry) }.expect("SQ has room (checked)");
            op.in_kernel = true;
            self.in_kernel += 1;
        }
        while !sq.is_full() {
            let Some(idx) = self.socks_pending.pop_front() else { break };
            let slot = self.socks[idx].as_mut().expect("pending index names a live socket op");
            let entry = build_sock_sqe(&mut slot.req, self.recv_poll_first).user_data(slot.id);
            // SAFETY: the SQE points into the Vec owned by `slot.req` (its heap memory does
            // not move while the Vec is neither resized nor dropped), or at no memory at all
            // (accept). The slot stays in the slab, untouched, until this SQE's CQE is reaped,
            // and Drop cancels and waits for it (or leaks it).
            unsafe { sq.push(&entry) }.expect("SQ has room (checked)");
            slot.in_kernel = true;
            self.socks_in_kernel += 1;
        }
        while !sq.is_full() {
            let Some(target) = self.cancels.pop() else { break };
            let e = opcode::AsyncCancel::new(target).build().user_data(CANCEL);
            // SAFETY: a cancel SQE references no memory.
            unsafe { sq.push(&e) }.expect("SQ has room (checked)");
        }
    }

    /// Drop finished socket ops nobody will reap, closing the descriptors accepts returned.
    fn discard_sock_ready(&mut self) {
        for c in self.sock_ready.drain(..) {
            if let (SockOp::Accept, Ok(fd)) = (&c.op, &c.result) {
                // SAFETY: the accept returned this descriptor to us and nobody else has seen it.
                drop(unsafe { std::os::fd::OwnedFd::from_raw_fd(*fd as RawFd) });
            }
        }
    }

    fn on_sock_cqe(&mut self, user_data: u64, res: i32) {
        let idx = (user_data & ((1 << SOCK_IDX_BITS) - 1)) as usize;
        let slot = self.socks.get_mut(idx).and_then(Option::take).expect("CQE for an unknown socket op");
        assert!(slot.id == user_data && slot.in_kernel, "CQE for a socket op that was not submitted");
        self.socks_in_kernel -= 1;
        self.socks_free.push(idx);
        let result = if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) };
        let mut op = slot.req.op;
        if let (SockOp::Recv { buf }, Ok(n)) = (&mut op, &result) {
            let n = (*n).min(buf.capacity() - buf.len());
            // SAFETY: the receive was given the spare capacity after `len` (build_sock_sqe)
            // and the kernel reports writing `n` bytes there, so `[len, len + n)` is
            // initialised; `n` is capped at the capacity in any case.
            unsafe { buf.set_len(buf.len() + n) };
        }
        self.sock_ready.push(SockCompletion { token: slot.req.token, result, op });
    }

    /// Enter the kernel: submit what is in the SQ, and wait for one completion when asked.
    fn enter(&mut self, want: bool, timeout: Option<Duration>) -> Result<(), DeviceError> {
        let can_complete = self.in_kernel > 0 || self.socks_in_kernel > 0 || self.doorbell_armed;
        let submitter = self.ring.submitter();
        let r = match (want, timeout) {
            (true, Some(t)) => {
                let ts = Timespec::from(t);
                submitter.submit_with_args(1, &SubmitArgs::new().timespec(&ts))
            }
            // Nothing could ever complete: waiting without a timeout would hang forever.
            (true, None) if can_complete => submitter.submit_and_wait(1),
            _ => submitter.submit(),
        };
        match r {
            Ok(_) => Ok(()),
            // Timeout, signal, CQ backlog, kernel short of memory: not failures of the ring;
            // the caller comes back.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {
                Ok(())
            }
            Err(source) => Err(DeviceError::Ring { context: "io_uring_enter", source }),
        }
    }

    /// Read every CQE available and process it.
    fn drain_cq(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
        for &(user_data, res) in &cqes {
            if user_data == DOORBELL {
                self.on_doorbell(res);
            } else if user_data == CANCEL {
                // The cancelled op reports for itself.
            } else if user_data & SOCK_BIT != 0 {
                self.on_sock_cqe(user_data, res);
            } else {
                self.on_cqe(user_data as usize, res);
            }
        }
        self.cqes = cqes;
    }

    fn on_doorbell(&mut self, res: i32) {
        self.doorbell_armed = false;
        let Some(wake) = self.doorbell else { return };
        if res >= 0 {
            // The poll reported the eventfd readable, so one read resets its counter; no
            // poll(2) first.
            drain_eventfd(wake.fd());
            self.rung = true;
        } else if -res != libc::ECANCELED {
            tracing::warn!(
                fd = wake.fd(),
                error = %io::Error::from_raw_os_error(-res),
                "doorbell poll failed; doorbell disabled, waits rely on timeouts"
            );
            self.doorbell = None;
            // Wake the caller: it may be waiting for a ring that can no longer arrive.
            self.rung = true;
        }
    }

    fn on_cqe(&mut self, idx: usize, res: i32) {
        let op = self.slab.get_mut(idx).and_then(Option::as_mut).expect("CQE for an unknown op");
        assert!(op.in_kernel, "CQE for an op that was not submitted");
        op.in_kernel = false;
        self.in_kernel -= 1;
        let info = &self.devices[op.dev as usize];
        let state = OpState {
            kind: op.kind(),
            path: &info.path,
            offset: op.offset,
            len: op.len,
            done: op.done,
            retries: op.retries,
            io_align: info.io_align,
        };
        match errno_table(&state, res) {
            Step::Done(n) => self.finish(idx, Ok(n)),
            Step::Again { done, retry } => {
                op.done = done;
                op.retries = if retry { op.retries + 1 } else { 0 };
                self.stats.resubmits += 1;
                self.pending.push_front(idx);
            }
            Step::Fail(e) => self.finish(idx, Err(e)),
        }
    }

    fn finish(&mut self, idx: usize, result: Result<usize, DeviceError>) {
        let op = self.slab[idx].take().expect("finishing a live op");
        self.slab_free.push(idx);
        self.ready.push_back(IoCompletion { tag: op.tag, dev: op.dev, offset: op.offset, result, op: op.op });
    }

    /// Give arena slots held by finished or never-submitted ops back to the arena.
    fn reclaim_slot(arena: &mut Option<Arena>, op: IoOp) {
        let Some(arena) = arena.as_mut() else { return };
        let buf = match op {
            IoOp::Read { buf } => buf,
            IoOp::Write { buf, .. } => match Rc::try_unwrap(buf) {
                Ok(w) => w.into_inner(),
                Err(_) => return,
            },
            IoOp::Fsync => return,
        };
        if let Some(slot) = buf.arena_slot().filter(|&s| arena.owns(s, buf.as_ptr() as usize, buf.capacity())) {
            arena.free.push(slot);
        }
    }
}

/// Build the SQE for the untransferred part of `op`.
fn build_sqe(op: &mut Op, idx: usize, arena: Option<&Arena>, stats: &mut Stats) -> squeue::Entry {
    let fd = Fixed(op.dev);
    if let IoOp::Fsync = op.op {
        return opcode::Fsync::new(fd).flags(FsyncFlags::DATASYNC).build().user_data(idx as u64);
    }
    let (at, buf_off, rest) = remainder(op.offset, op.done, op.len);
    let rest32 = u32::try_from(rest).expect("transfer bounded by MAX_IO_BYTES");
    let entry = match &mut op.op {
        IoOp::Read { buf } => {
            let slot = buf.arena_slot().filter(|&s| arena.is_some_and(|a| a.owns(s, buf.as_ptr() as usize, buf.len())));
            let ptr = buf[buf_off..].as_mut_ptr();
            match slot {
                Some(s) => {
                    stats.fixed_ops += 1;
                    opcode::ReadFixed::new(fd, ptr, rest32, s).offset(at).build()
                }
                None => {
                    stats.plain_ops += 1;
                    opcode::Read::new(fd, ptr, rest32).offset(at).build()
                }
            }
        }
        IoOp::Write { buf, start, end, dsync } => {
            let whole = buf.io_ptr(*start, *end) as usize;
            let slot = buf.arena_slot().filter(|&s| arena.is_some_and(|a| a.owns(s, whole, *end - *start)));
            let ptr = buf.io_ptr(*start + buf_off, *end);
            let flags = if *dsync { libc::RWF_DSYNC } else { 0 };
            match slot {
                Some(s) => {
                    stats.fixed_ops += 1;
                    opcode::WriteFixed::new(fd, ptr, rest32, s).offset(at).rw_flags(flags).build()
                }
                None => {
                    stats.plain_ops += 1;
                    opcode::Write::new(fd, ptr, rest32).offset(at).rw_flags(flags).build()
                }
            }
        }
        IoOp::Fsync => unreachable!("handled above"),
    };
    entry.user_data(idx as u64)
}

/// `IORING_RECVSEND_POLL_FIRST` from the kernel's io_uring.h (kernel 5.19+).
const RECV_POLL_FIRST: u16 = 1;

/// Whether the kernel takes `IORING_RECVSEND_POLL_FIRST` on a receive: one receive with the
/// flag on a socket pair that holds a byte, on the fresh ring. An older kernel (or one with
/// the ring's flags backported and not this) answers EINVAL, and every receive would fail.
fn probe_recv_poll_first(ring: &mut IoUring) -> bool {
    let mut sv = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array it is given.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0, sv.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: both descriptors were just created and are owned here alone.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(sv[0]), OwnedFd::from_raw_fd(sv[1])) };
    // SAFETY: writes one byte from a static string to a socket we own.
    if unsafe { libc::write(b.as_raw_fd(), b"x".as_ptr().cast(), 1) } != 1 {
        return false;
    }
    let mut byte = Box::new(0u8);
    let sqe = opcode::Recv::new(Fd(a.as_raw_fd()), &mut *byte, 1).ioprio(RECV_POLL_FIRST).build().user_data(0);
    // SAFETY: the receive writes into `byte`'s heap cell and reads socket `a`; both stay
    // alive until its completion has been seen, or are leaked when it cannot be.
    if unsafe { ring.submission().push(&sqe) }.is_err() {
        return false;
    }
    let completed = loop {
        match ring.submit_and_wait(1) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => break r.is_ok(),
        }
    };
    if !completed {
        // The receive may still be with the kernel: its memory and socket must outlive it.
        std::mem::forget((byte, a, b));
        return false;
    }
    let ok = ring.completion().next().is_some_and(|c| c.result() == 1);
    if !ok {
        tracing::debug!("io_uring: receives without POLL_FIRST (the kernel refused it)");
    }
    ok
}

/// The SQE for what is left of a socket operation (no `user_data` yet). `poll_first` skips a
/// receive's first attempt (not for the rest of a receive continued at an offset into its
/// buffer, whose bytes may well be waiting).
fn build_sock_sqe(req: &mut SockRequest, poll_first: bool) -> squeue::Entry {
    let fd = Fd(req.fd);
    match &mut req.op {
        SockOp::Recv { buf } => {
            let holds_bytes = !buf.is_empty();
            let spare = buf.spare_capacity_mut();
            let len = u32::try_from(spare.len()).unwrap_or(u32::MAX);
            // Poll first: a receive is armed when the connection's client is waiting for an
            // answer, so the socket is almost always empty and the attempt io_uring would
            // otherwise make before arming its poll only fails. Not for a buffer that already
            // holds part of a message, whose rest may well be waiting.
            let ioprio = if poll_first && !holds_bytes { RECV_POLL_FIRST } else { 0 };
            // The kernel writes at most `len` bytes from here; `on_sock_cqe` then counts them
            // into the Vec's length.
            opcode::Recv::new(fd, spare.as_mut_ptr().cast::<u8>(), len).ioprio(ioprio).build()
        }
        SockOp::Send { buf, at } => {
            let rest = &buf[*at..];
            let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
            opcode::Send::new(fd, rest.as_ptr(), len).flags(libc::MSG_NOSIGNAL).build()
        }
        SockOp::Accept => {
            opcode::Accept::new(fd, std::ptr::null_mut(), std::ptr::null_mut()).flags(libc::SOCK_CLOEXEC).build()
        }
    }
}

/// Set up the ring with the best flags the kernel accepts.
fn build_ring(entries: u32) -> Result<(IoUring, &'static str), DeviceError> {
    let cq = (entries * 4).max(MIN_CQ_ENTRIES);
    let mut last_err = None;
    for (name, mode) in
        [("SINGLE_ISSUER|DEFER_TASKRUN|TASKRUN_FLAG", 0), ("COOP_TASKRUN|TASKRUN_FLAG", 1), ("plain", 2)]
    {
        let mut b = IoUring::builder();
        b.setup_cqsize(cq);
        match mode {
            0 => {
                b.setup_single_issuer().setup_defer_taskrun().setup_taskrun_flag();
            }
            1 => {
                b.setup_coop_taskrun().setup_taskrun_flag();
            }
            _ => {}
        }
        match b.build(entries) {
            Ok(ring) => return Ok((ring, name)),
            Err(e) => {
                tracing::debug!(flags = name, error = %e, "io_uring set-up refused, trying fewer flags");
                last_err = Some(e);
            }
        }
    }
    Err(explain_setup_error(&last_err.expect("at least one attempt")))
}

impl IoBackend for UringBackend {
    fn push(&mut self, req: IoRequest) {
        assert_request(&self.devices, &req);
        let len = match &req.op {
            IoOp::Read { buf } => buf.len(),
            IoOp::Write { start, end, .. } => end - start,
            IoOp::Fsync => 0,
        };
        let op = Op {
            tag: req.tag,
            dev: req.dev,
            offset: req.offset,
            op: req.op,
            len,
            done: 0,
            retries: 0,
            in_kernel: false,
        };
        let idx = match self.slab_free.pop() {
            Some(i) => {
                self.slab[i] = Some(op);
                i
            }
            None => {
                self.slab.push(Some(op));
                self.slab.len() - 1
            }
        };
        self.pending.push_back(idx);
    }

    fn submit_and_wait(&mut self, wait: bool, timeout: Option<Duration>) -> Result<(), DeviceError> {
        self.fill_sq();
        // Socket ops beyond one SQ's worth (many connections arriving at once) go to the
        // kernel now as well: the caller may be about to sleep, and nothing would bring
        // them out before its next wake-up. Bounded, should the kernel take none.
        for _ in 0..SOCK_FILL_ROUNDS {
            if self.socks_pending.is_empty() && self.cancels.is_empty() {
                break;
            }
            self.enter(false, None)?;
            self.fill_sq();
        }
        let block = wait && self.ready.is_empty() && self.sock_ready.is_empty() && !self.rung;
        self.enter(block, timeout)?;
        self.drain_cq();
        // Resubmissions (short transfers, EINTR) go back to the kernel now rather than on the
        // caller's next turn; bounded by the SQ and CQ budget.
        if !self.pending.is_empty() && self.in_kernel < self.kernel_max {
            self.fill_sq();
            self.enter(false, None)?;
        }
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<IoCompletion>) -> bool {
        self.drain_cq();
        out.extend(self.ready.drain(..));
        std::mem::take(&mut self.rung)
    }

    fn in_flight(&self) -> usize {
        self.slab.len() - self.slab_free.len() + self.ready.len()
    }

    fn sockets(&self) -> bool {
        true
    }

    fn push_sock(&mut self, req: SockRequest) -> SockId {
        let idx = match self.socks_free.pop() {
            Some(i) => i,
            None => {
                assert!(self.socks.len() < (1 << SOCK_IDX_BITS) - 1, "too many socket operations in flight");
                self.socks.push(None);
                self.socks.len() - 1
            }
        };
        self.sock_serial = (self.sock_serial + 1) & SOCK_SERIAL_MASK;
        let id = SOCK_BIT | self.sock_serial << SOCK_IDX_BITS | idx as u64;
        self.socks[idx] = Some(SockSlot { id, req, in_kernel: false });
        self.socks_pending.push_back(idx);
        SockId(id)
    }

    fn cancel_sock(&mut self, id: SockId) {
        let idx = (id.0 & ((1 << SOCK_IDX_BITS) - 1)) as usize;
        let Some(slot) = self.socks.get(idx).and_then(Option::as_ref).filter(|s| s.id == id.0) else {
            return; // already completed
        };
        if slot.in_kernel {
            self.cancels.push(id.0);
        } else {
            // Never submitted: it ends here.
            self.socks_pending.retain(|&i| i != idx);
            let slot = self.socks[idx].take().expect("checked above");
            self.socks_free.push(idx);
            let result = Err(io::Error::from_raw_os_error(libc::ECANCELED));
            self.sock_ready.push(SockCompletion { token: slot.req.token, result, op: slot.req.op });
        }
    }

    fn events_waiting(&mut self) -> bool {
        // TASKRUN: completions wait as deferred task work, which the next enter runs.
        !self.ready.is_empty()
            || !self.sock_ready.is_empty()
            || self.ring.submission().taskrun()
            || !self.ring.completion().is_empty()
    }

    fn reap_sock(&mut self, out: &mut Vec<SockCompletion>) {
        self.drain_cq();
        out.append(&mut self.sock_ready);
    }

    fn alloc(&mut self, len: usize) -> AlignedBuf {
        if let Some(arena) = self.arena.as_mut().filter(|a| a.slot_bytes == len) {
            if let Some(slot) = arena.free.pop() {
                let ptr = arena.slot_ptr(slot);
                // SAFETY: the slot is `len` bytes inside the live mapping, and no one else
                // holds it (it was just taken off the free list).
                unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0, len) };
                // SAFETY: ptr is valid for `len` bytes, page-aligned (page-aligned base, slot
                // size a multiple of BUF_ALIGN), handed to this buffer only, and outlives it:
                // the arena leaks its mapping while any slot is out.
                return unsafe { AlignedBuf::from_arena(ptr, len, slot) };
            }
        }
        AlignedBuf::new(len)
    }

    fn free(&mut self, buf: AlignedBuf) {
        if let Some(slot) = buf.arena_slot() {
            let arena = self.arena.as_mut().expect("arena buffer freed to a backend without an arena");
            assert!(
                arena.owns(slot, buf.as_ptr() as usize, buf.capacity()),
                "arena buffer (slot {slot}) freed to a backend that does not own it"
            );
            debug_assert!(!arena.free.contains(&slot), "arena slot {slot} freed twice");
            arena.free.push(slot);
        }
        // A plain buffer frees itself; an arena buffer's drop does nothing.
        drop(buf);
    }

    fn describe(&self) -> String {
        format!(
            "io_uring sq={} cq={} setup={} devices={} doorbell={} buffers: {}",
            self.ring.params().sq_entries(),
            self.ring.params().cq_entries(),
            self.setup_flags,
            self.devices.len(),
            if self.doorbell.is_some() { "poll" } else { "none" },
            self.buffers_note
        )
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // Ops never handed to the kernel need no waiting.
        self.pending.clear();
        self.socks_pending.clear();
        // A receive or accept may wait for its peer for ever: cancel every socket op.
        self.cancels = self.socks.iter().flatten().filter(|s| s.in_kernel).map(|s| s.id).collect();
        let deadline = std::time::Instant::now() + DROP_WAIT;
        while self.in_kernel > 0 || self.socks_in_kernel > 0 {
            self.fill_sq();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let failed = if left.is_zero() {
                Some(format!("{} I/O still in flight after {} s", self.in_kernel, DROP_WAIT.as_secs()))
            } else {
                self.enter(true, Some(left.min(Duration::from_secs(1)))).err().map(|e| e.to_string())
            };
            if let Some(why) = failed {
                // The kernel may still write into these buffers: never free them.
                tracing::error!(
                    "{why}; leaking the buffers of {} in-flight I/O",
                    self.in_kernel + self.socks_in_kernel
                );
                for slot in self.slab.iter_mut() {
                    if slot.as_ref().is_some_and(|op| op.in_kernel) {
                        std::mem::forget(slot.take());
                    }
                }
                for slot in self.socks.iter_mut() {
                    if slot.as_ref().is_some_and(|s| s.in_kernel) {
                        std::mem::forget(slot.take());
                    }
                }
                // The arena stays mapped: the forgotten ops hold slots, so it leaks itself.
                return;
            }
            self.drain_cq();
            self.pending.clear();
            self.discard_sock_ready();
        }
        self.discard_sock_ready();
        let mut ops: Vec<IoOp> = self.slab.iter_mut().filter_map(Option::take).map(|op| op.op).collect();
        ops.extend(self.ready.drain(..).map(|c| c.op));
        for op in ops {
            Self::reclaim_slot(&mut self.arena, op);
        }
        if self.arena.is_some() {
            // Nothing is in flight; failing to unregister is harmless (closing the ring does it).
            let _ = self.ring.submitter().unregister_buffers();
        }
        // Closing a ring releases its registered files asynchronously (in a kernel work
        // item), which would keep an O_EXCL block device busy for a moment after the engine
        // stops; unregistering is synchronous, so a restart can reopen the device at once.
        let _ = self.ring.submitter().unregister_files();
    }
}

// ---------------------------------------------------------------------------------------------
// eventfd helpers (shared with the simulated backend)

/// Wait up to `timeout` (None: without limit) for `wake` to become readable; when it does,
/// reset it when it is an eventfd and return true. With `wake` None this just sleeps for the
/// timeout.
pub(super) fn wait_eventfd(wake: Option<Wake>, timeout: Option<Duration>) -> bool {
    let ms: libc::c_int = match timeout {
        None => -1,
        Some(d) => d.as_nanos().div_ceil(1_000_000).min(libc::c_int::MAX as u128) as libc::c_int,
    };
    // poll ignores entries with a negative fd, which turns the call into a plain sleep.
    let mut pfd = libc::pollfd { fd: wake.map_or(-1, Wake::fd), events: libc::POLLIN, revents: 0 };
    // SAFETY: pfd is a live pollfd and nfds is 1.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    if n != 1 || pfd.revents & libc::POLLIN == 0 {
        return false;
    }
    if wake.is_some() {
        drain_eventfd(pfd.fd);
    }
    true
}

/// Reset the counter of an eventfd reported readable.
fn drain_eventfd(fd: RawFd) {
    let mut counter: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live local u64. The eventfd was just reported
    // readable and only its backend reads it, so the read does not block.
    unsafe { libc::read(fd, (&mut counter as *mut u64).cast(), 8) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::buf::WBuf;
    use crate::io::device::{open_devices, test_path, DeviceSpec, FileDevices};
    use crate::io::{run_sync, DeviceSet};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::path::{Path, PathBuf};
    use std::time::Instant;

    /// Removes a test's device file when the test ends, however it ends.
    struct TempFile(PathBuf);
    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn file_devices(name: &str, size: u64) -> (FileDevices, TempFile) {
        let path = test_path(name);
        let devs = open_devices(&[DeviceSpec { path: path.clone(), file_size: Some(size) }], 16).unwrap();
        (devs, TempFile(path))
    }

    fn backend(devs: &FileDevices, entries: u32, doorbell: Option<Wake>, slot: usize, slots: usize) -> UringBackend {
        let fds: Vec<RawFd> = (0..devs.devices().len() as u32).map(|d| devs.device_fd(d)).collect();
        UringBackend::new(entries, &fds, devs.devices().to_vec(), doorbell, slot, slots).unwrap()
    }

    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8).collect()
    }

    /// A frozen write buffer holding `data`, allocated from `io`.
    fn wbuf(io: &mut dyn IoBackend, data: &[u8]) -> Rc<WBuf> {
        let w = WBuf::new(io.alloc(data.len()));
        w.write_at(0, data);
        w.freeze_to(data.len());
        Rc::new(w)
    }

    fn write_req(tag: u64, offset: u64, buf: Rc<WBuf>, dsync: bool) -> IoRequest {
        let end = buf.len();
        IoRequest { tag, dev: 0, offset, op: IoOp::Write { buf, start: 0, end, dsync } }
    }

    fn read_req(tag: u64, offset: u64, buf: AlignedBuf) -> IoRequest {
        IoRequest { tag, dev: 0, offset, op: IoOp::Read { buf } }
    }

    fn read_back(io: &mut dyn IoBackend, offset: u64, len: usize) -> AlignedBuf {
        let buf = io.alloc(len);
        let c = run_sync(io, read_req(u64::MAX - 1, offset, buf)).unwrap();
        assert_eq!(c.result.unwrap(), len);
        match c.op {
            IoOp::Read { buf } => buf,
            other => panic!("read completion carried {other:?}"),
        }
    }

    /// Write, fsync and read back on any device set: the checks shared by the file and the
    /// loop-device tests.
    fn round_trip_checks(devs: &dyn DeviceSet) {
        let info = devs.devices()[0].clone();
        let mut io = devs.open_backend(None, 0, 0).unwrap();
        let len = 64 << 10;
        let last = info.size_bytes - info.io_align as u64;
        for (i, offset) in [0u64, 1 << 20, info.size_bytes - len as u64].into_iter().enumerate() {
            let data = pattern(i as u64 + 1, len);
            let w = wbuf(io.as_mut(), &data);
            let c = run_sync(io.as_mut(), write_req(i as u64, offset, w, true)).unwrap();
            assert_eq!(c.result.unwrap(), len);
            assert_eq!(c.offset, offset);
            assert_eq!(&read_back(io.as_mut(), offset, len)[..], &data[..]);
        }
        let c = run_sync(io.as_mut(), IoRequest { tag: 9, dev: 0, offset: 0, op: IoOp::Fsync }).unwrap();
        assert_eq!(c.result.unwrap(), 0);
        // The last aligned block of the device is readable.
        let b = read_back(io.as_mut(), last, info.io_align as usize);
        assert_eq!(b.len(), info.io_align as usize);
        assert_eq!(io.in_flight(), 0);
    }

    fn eventfd() -> OwnedFd {
        // SAFETY: eventfd takes no pointers; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        assert!(fd >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: fd is a fresh descriptor we own.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    fn ring_doorbell(fd: RawFd) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live local u64 to an eventfd.
        let n = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
        assert_eq!(n, 8);
    }

    fn state(kind: Kind, len: usize, done: usize, retries: u32) -> OpState<'static> {
        OpState { kind, path: "dev0", offset: 8192, len, done, retries, io_align: 4096 }
    }

    #[test]
    fn errno_table_handles_every_case() {
        let s = state(Kind::Read, 16384, 0, 0);
        assert!(matches!(errno_table(&s, 16384), Step::Done(16384)));
        // Short transfer: continue for the remainder.
        assert!(matches!(errno_table(&s, 4096), Step::Again { done: 4096, retry: false }));
        let s2 = state(Kind::Read, 16384, 4096, 0);
        assert!(matches!(errno_table(&s2, 12288), Step::Done(16384)));
        // EINTR / EAGAIN: resubmit without progress, bounded.
        assert!(matches!(errno_table(&s, -libc::EINTR), Step::Again { done: 0, retry: true }));
        assert!(matches!(errno_table(&s2, -libc::EAGAIN), Step::Again { done: 4096, retry: true }));
        let tired = state(Kind::Write, 16384, 0, MAX_RETRIES);
        assert!(matches!(errno_table(&tired, -libc::EAGAIN), Step::Fail(DeviceError::Io { .. })));
        // Zero-byte write is fatal; zero-byte read is end of device.
        let w = state(Kind::Write, 16384, 4096, 0);
        assert!(matches!(errno_table(&w, 0), Step::Fail(DeviceError::ZeroWrite { offset: 12288, .. })));
        match errno_table(&s2, 0) {
            Step::Fail(DeviceError::Io { offset, len, source, .. }) => {
                assert_eq!((offset, len, source.kind()), (12288, 12288, io::ErrorKind::UnexpectedEof));
            }
            other => panic!("{other:?}"),
        }
        // EINVAL is an alignment bug.
        assert!(matches!(
            errno_table(&s2, -libc::EINVAL),
            Step::Fail(DeviceError::Misaligned { offset: 12288, len: 12288, align: 4096, .. })
        ));
        // A short transfer that stops off alignment cannot be continued with O_DIRECT.
        assert!(matches!(errno_table(&s, 100), Step::Fail(DeviceError::Misaligned { offset: 8292, .. })));
        // Other errnos name path, offset and length.
        match errno_table(&s2, -libc::EIO) {
            Step::Fail(e @ DeviceError::Io { .. }) => {
                let m = e.to_string();
                assert!(m.contains("dev0") && m.contains("12288"), "{m}");
            }
            other => panic!("{other:?}"),
        }
        // Fsync: 0 is success, errors are I/O errors (EINVAL included).
        let f = state(Kind::Fsync, 0, 0, 0);
        assert!(matches!(errno_table(&f, 0), Step::Done(0)));
        assert!(matches!(errno_table(&f, -libc::EIO), Step::Fail(DeviceError::Io { .. })));
        assert!(matches!(errno_table(&f, -libc::EINVAL), Step::Fail(DeviceError::Io { .. })));
    }

    #[test]
    fn remainder_arithmetic() {
        assert_eq!(remainder(8192, 0, 16384), (8192, 0, 16384));
        assert_eq!(remainder(8192, 4096, 16384), (12288, 4096, 12288));
        assert_eq!(remainder(0, 12288, 16384), (12288, 12288, 4096));
    }

    #[test]
    #[should_panic(expected = "remainder of a finished transfer")]
    fn remainder_of_a_finished_transfer_is_a_bug() {
        remainder(0, 4096, 4096);
    }

    #[test]
    fn memlock_decision() {
        assert!(arena_fits_memlock(1 << 20, None, false).is_ok());
        assert!(arena_fits_memlock(1 << 20, Some(2 << 20), false).is_ok());
        assert!(arena_fits_memlock(4 << 20, Some(2 << 20), true).is_ok());
        let why = arena_fits_memlock(4 << 20, Some(2 << 20), false).unwrap_err();
        assert!(why.contains("4194304") && why.contains("2097152"), "{why}");
    }

    #[test]
    fn dsync_write_then_read_back() {
        let (devs, _f) = file_devices("dsync", 4 << 20);
        round_trip_checks(&devs);
        // Unwritten space of a fresh sparse file reads as zeros.
        let mut io = backend(&devs, 8, None, 0, 0);
        assert!(read_back(&mut io, 2 << 20, 8192).iter().all(|&b| b == 0));
        eprintln!("{}", io.describe());
    }

    #[test]
    fn more_requests_than_ring_entries_all_complete() {
        let (devs, _f) = file_devices("many", 8 << 20);
        let mut io = backend(&devs, 4, None, 0, 0);
        let n = 300u64;
        for i in 0..n {
            let w = wbuf(&mut io, &pattern(i, 4096));
            io.push(write_req(i, i * 4096, w, false));
        }
        assert_eq!(io.in_flight(), n as usize);
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while done.len() < n as usize {
            assert!(Instant::now() < deadline, "only {} of {n} writes completed", done.len());
            io.submit_and_wait(true, Some(Duration::from_secs(1))).unwrap();
            io.reap(&mut done);
            assert!(io.in_kernel <= io.kernel_max);
        }
        let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..n).collect::<Vec<_>>());
        assert!(done.iter().all(|c| matches!(c.result, Ok(4096))));
        assert_eq!(io.in_flight(), 0);
        // Read them all back, again more than the ring holds at once.
        for i in 0..n {
            let b = io.alloc(4096);
            io.push(read_req(i, i * 4096, b));
        }
        let mut reads = Vec::new();
        while reads.len() < n as usize {
            assert!(Instant::now() < deadline);
            io.submit_and_wait(true, Some(Duration::from_secs(1))).unwrap();
            io.reap(&mut reads);
        }
        for c in reads {
            let IoOp::Read { buf } = c.op else { panic!("not a read") };
            assert_eq!(&buf[..], &pattern(c.tag, 4096)[..], "block {}", c.tag);
        }
    }

    #[test]
    fn polling_without_waiting_makes_progress() {
        // With DEFER_TASKRUN, completions only appear when the kernel runs our task work;
        // a caller that never waits must still see them.
        let (devs, _f) = file_devices("poll", 1 << 20);
        let mut io = backend(&devs, 8, None, 0, 0);
        let b = io.alloc(4096);
        io.push(read_req(1, 0, b));
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while out.is_empty() {
            assert!(Instant::now() < deadline, "no completion without waiting ({})", io.describe());
            io.submit_and_wait(false, None).unwrap();
            io.reap(&mut out);
        }
        assert!(matches!(out[0].result, Ok(4096)));
    }

    #[test]
    fn doorbell_wakes_a_waiting_backend() {
        let (devs, _f) = file_devices("doorbell", 1 << 20);
        let efd = eventfd();
        let mut io = backend(&devs, 8, Some(Wake(efd.as_raw_fd())), 0, 0);
        for round in 0..3 {
            let raw = efd.as_raw_fd();
            let ringer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(100));
                ring_doorbell(raw);
            });
            let t0 = Instant::now();
            let mut rung = false;
            let mut out = Vec::new();
            while !rung {
                assert!(t0.elapsed() < Duration::from_secs(5), "round {round}: doorbell never woke the backend");
                io.submit_and_wait(true, Some(Duration::from_secs(10))).unwrap();
                rung = io.reap(&mut out);
            }
            assert!(t0.elapsed() < Duration::from_secs(5));
            assert!(out.is_empty());
            ringer.join().unwrap();
            // The counter was drained: reading it now finds nothing.
            let mut v = 0u64;
            // SAFETY: reads 8 bytes into a live local from a non-blocking eventfd.
            let n = unsafe { libc::read(raw, (&mut v as *mut u64).cast(), 8) };
            assert_eq!(n, -1, "doorbell counter not drained");
            assert!(!io.reap(&mut out), "doorbell reported twice");
        }
        assert!(io.describe().contains("doorbell=poll"));
    }

    #[test]
    fn wait_with_timeout_returns_when_nothing_happens() {
        let (devs, _f) = file_devices("timeout", 1 << 20);
        let mut io = backend(&devs, 8, None, 0, 0);
        let t0 = Instant::now();
        io.submit_and_wait(true, Some(Duration::from_millis(50))).unwrap();
        assert!(t0.elapsed() >= Duration::from_millis(40), "returned after {:?}", t0.elapsed());
        // Waiting without a timeout on nothing returns instead of hanging.
        io.submit_and_wait(true, None).unwrap();
        let mut out = Vec::new();
        assert!(!io.reap(&mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn fixed_buffers_used_when_the_arena_registers() {
        let (devs, _f) = file_devices("fixed", 4 << 20);
        let slot = 64 << 10;
        let mut io = backend(&devs, 8, None, slot, 4);
        let desc = io.describe();
        eprintln!("{desc}");
        let registered = io.arena.is_some();
        if !registered {
            eprintln!("arena did not register here ({desc}); checking the plain-buffer fallback instead");
        }
        let data = pattern(7, slot);
        let wb = io.alloc(slot);
        assert_eq!(wb.arena_slot().is_some(), registered);
        assert!(wb.iter().all(|&b| b == 0));
        let w = WBuf::new(wb);
        w.write_at(0, &data);
        w.freeze_to(slot);
        let w = Rc::new(w);
        let c = run_sync(&mut io, write_req(1, 1 << 20, w, true)).unwrap();
        assert_eq!(c.result.unwrap(), slot);
        let rb = read_back(&mut io, 1 << 20, slot);
        assert_eq!(rb.arena_slot().is_some(), registered);
        assert_eq!(&rb[..], &data[..]);
        let stats = io.stats();
        if registered {
            assert_eq!((stats.fixed_ops, stats.plain_ops), (2, 0));
        } else {
            assert_eq!((stats.fixed_ops, stats.plain_ops), (0, 2));
        }
        // Give the buffers back, then exhaust the arena: the fifth buffer is plain.
        let IoOp::Write { buf, .. } = c.op else { panic!("not a write") };
        io.free(Rc::try_unwrap(buf).unwrap().into_inner());
        io.free(rb);
        let bufs: Vec<AlignedBuf> = (0..5).map(|_| io.alloc(slot)).collect();
        let arena_bufs = bufs.iter().filter(|b| b.arena_slot().is_some()).count();
        assert_eq!(arena_bufs, if registered { 4 } else { 0 });
        assert!(io.alloc(4096).arena_slot().is_none(), "only slot-sized buffers come from the arena");
        for b in bufs {
            io.free(b);
        }
        if let Some(a) = &io.arena {
            assert_eq!(a.free.len(), 4, "every slot returned");
        }
    }

    #[test]
    #[should_panic(expected = "misaligned I/O")]
    fn misaligned_offset_panics() {
        let (devs, _f) = file_devices("misaligned", 1 << 20);
        let mut io = backend(&devs, 8, None, 0, 0);
        let b = io.alloc(4096);
        io.push(read_req(1, 100, b));
    }

    #[test]
    #[should_panic(expected = "misaligned I/O")]
    fn misaligned_length_panics() {
        let (devs, _f) = file_devices("misaligned-len", 1 << 20);
        let mut io = backend(&devs, 8, None, 0, 0);
        let w = wbuf(&mut io, &[1u8; 100]);
        io.push(write_req(1, 0, w, false));
    }

    #[test]
    #[should_panic(expected = "past the end")]
    fn read_past_the_end_panics() {
        let (devs, _f) = file_devices("pastend", 1 << 20);
        let mut io = backend(&devs, 8, None, 0, 0);
        let b = io.alloc(8192);
        io.push(read_req(1, (1 << 20) - 4096, b));
    }

    #[test]
    fn drop_waits_for_in_flight_io() {
        let (devs, _f) = file_devices("drop", 8 << 20);
        for _ in 0..5 {
            let mut io = backend(&devs, 16, None, 64 << 10, 8);
            for i in 0..40u64 {
                let b = io.alloc(64 << 10);
                io.push(read_req(i, i * (64 << 10), b));
            }
            for i in 0..20u64 {
                let w = wbuf(&mut io, &pattern(i, 64 << 10));
                io.push(write_req(100 + i, (4 << 20) + i * (64 << 10), w, false));
            }
            io.submit_and_wait(false, None).unwrap();
            // Dropped with I/O in the kernel: Drop must wait before freeing the buffers.
            drop(io);
        }
    }

    /// Detaches a loop device when the test ends, whether it passes or panics.
    struct LoopDev(String);
    impl Drop for LoopDev {
        fn drop(&mut self) {
            let out = std::process::Command::new("losetup").args(["-d", &self.0]).output();
            match out {
                Ok(o) if o.status.success() => eprintln!("detached {}", self.0),
                other => eprintln!("WARNING: could not detach {}: {other:?}", self.0),
            }
        }
    }

    fn attach_loop(file: &Path) -> Result<LoopDev, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let out = std::process::Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .map_err(|e| format!("cannot run losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!("losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if dev.is_empty() {
            return Err("losetup printed no device".into());
        }
        Ok(LoopDev(dev))
    }

    #[test]
    fn loop_device_round_trip_or_file_fallback() {
        let backing = test_path("loop-backing");
        let _backing_guard = TempFile(backing.clone());
        std::fs::File::create(&backing).unwrap().set_len(64 << 20).unwrap();
        match attach_loop(&backing) {
            Ok(lo) => {
                eprintln!("loop-device test: using {} backed by {}", lo.0, backing.display());
                let devs = open_devices(&[DeviceSpec { path: lo.0.clone().into(), file_size: None }], 16).unwrap();
                let info = devs.devices()[0].clone();
                eprintln!("{}", devs.describe());
                assert!(info.is_block_device);
                assert_eq!(info.size_bytes, 64 << 20);
                assert!(info.io_align >= 512 && info.io_align.is_power_of_two());
                assert!(info.physical_block >= info.io_align || info.physical_block >= 512);
                // O_EXCL: a second open of the same device is refused as busy.
                let again = open_devices(&[DeviceSpec { path: lo.0.clone().into(), file_size: None }], 16);
                assert!(matches!(again, Err(DeviceError::Busy { .. })), "second open: {again:?}");
                round_trip_checks(&devs);
                drop(devs);
                drop(lo);
            }
            Err(why) => {
                eprintln!("loop-device test FELL BACK to a regular file: {why}");
                let devs =
                    open_devices(&[DeviceSpec { path: backing.clone(), file_size: Some(64 << 20) }], 16).unwrap();
                assert!(!devs.devices()[0].is_block_device);
                round_trip_checks(&devs);
            }
        }
    }

    /// Socket completions until there are `n` (at most 5 s).
    fn wait_socks(io: &mut UringBackend, n: usize) -> Vec<SockCompletion> {
        let mut out = Vec::new();
        let t0 = Instant::now();
        while out.len() < n {
            assert!(t0.elapsed() < Duration::from_secs(5), "{} of {n} socket operations completed", out.len());
            io.submit_and_wait(true, Some(Duration::from_millis(100))).unwrap();
            io.reap_sock(&mut out);
        }
        out
    }

    fn recv_req(token: u64, fd: RawFd) -> SockRequest {
        SockRequest { token, fd, op: SockOp::Recv { buf: Vec::with_capacity(64) } }
    }

    /// A connected pair: the client end, and the server end accepted by std.
    fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (client, l.accept().unwrap().0)
    }

    #[test]
    fn this_kernel_takes_receives_that_poll_first() {
        // The test machines run 6.x kernels; on one that refused the flag the backend would
        // receive without it, and this test says so.
        let (mut ring, _) = build_ring(8).unwrap();
        assert!(probe_recv_poll_first(&mut ring), "IORING_RECVSEND_POLL_FIRST refused by this kernel");
        let mut plain = IoUring::new(8).unwrap();
        assert!(probe_recv_poll_first(&mut plain), "the flag does not depend on the ring's set-up flags");
    }

    #[test]
    fn sockets_accept_receive_send_and_cancel() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut io = UringBackend::new(8, &[], Vec::new(), None, 0, 0).unwrap();
        assert!(io.sockets());
        io.push_sock(SockRequest { token: 1, fd: listener.as_raw_fd(), op: SockOp::Accept });
        // Nothing to accept yet: a pass without waiting completes nothing.
        io.submit_and_wait(false, None).unwrap();
        let mut out = Vec::new();
        io.reap_sock(&mut out);
        assert!(out.is_empty(), "accept completed with no connection: {out:?}");
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let done = wait_socks(&mut io, 1);
        assert_eq!(done[0].token, 1);
        let fd = *done[0].result.as_ref().unwrap() as RawFd;
        // SAFETY: the accept returned a fresh descriptor that nothing else owns.
        let server = unsafe { std::net::TcpStream::from_raw_fd(fd) };
        assert_eq!(server.peer_addr().unwrap(), client.local_addr().unwrap());

        // A receive armed before the bytes exist completes when they arrive.
        io.push_sock(recv_req(2, fd));
        io.submit_and_wait(false, None).unwrap();
        client.write_all(b"hello").unwrap();
        let done = wait_socks(&mut io, 1);
        assert_eq!((done[0].token, *done[0].result.as_ref().unwrap()), (2, 5));
        let SockOp::Recv { buf } = &done[0].op else { panic!("the receive's buffer comes back") };
        assert_eq!(buf, b"hello", "what arrived, and nothing else, is the buffer's content");

        // A buffer holding bytes already: what arrives is appended, within its capacity.
        let mut buf = Vec::with_capacity(8);
        buf.extend_from_slice(b"abc");
        let room = buf.capacity() - 3;
        assert!(room < 8, "the allocator rounded the capacity up to {}", buf.capacity());
        io.push_sock(SockRequest { token: 7, fd, op: SockOp::Recv { buf } });
        client.write_all(b"defghijk").unwrap();
        let done = wait_socks(&mut io, 1);
        assert_eq!((done[0].token, *done[0].result.as_ref().unwrap()), (7, room));
        let SockOp::Recv { buf } = &done[0].op else { panic!("the receive's buffer comes back") };
        assert_eq!(buf[..], b"abcdefghijk"[..3 + room]);
        io.push_sock(SockRequest { token: 8, fd, op: SockOp::Recv { buf: Vec::with_capacity(64) } });
        let done = wait_socks(&mut io, 1);
        let SockOp::Recv { buf } = &done[0].op else { panic!("the receive's buffer comes back") };
        assert_eq!(buf[..], b"defghijk"[room..], "the rest stayed in the socket");

        // A send starts at its offset.
        io.push_sock(SockRequest { token: 3, fd, op: SockOp::Send { buf: b"--world".to_vec(), at: 2 } });
        let done = wait_socks(&mut io, 1);
        assert_eq!((done[0].token, *done[0].result.as_ref().unwrap()), (3, 5));
        let mut got = [0u8; 5];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"world");

        // Cancelled: a receive the kernel holds, and one never submitted.
        let held = io.push_sock(recv_req(4, fd));
        io.submit_and_wait(false, None).unwrap();
        io.cancel_sock(held);
        let queued = io.push_sock(recv_req(5, fd));
        io.cancel_sock(queued);
        let mut done = wait_socks(&mut io, 2);
        done.sort_by_key(|d| d.token);
        for (d, token) in done.iter().zip([4, 5]) {
            assert_eq!(d.token, token);
            let e = d.result.as_ref().expect_err("cancelled");
            assert_eq!(e.raw_os_error(), Some(libc::ECANCELED), "token {token}: {e}");
        }
        // Cancelling what has completed does nothing.
        io.cancel_sock(held);

        // The client goes away: end of stream.
        io.push_sock(recv_req(6, fd));
        io.submit_and_wait(false, None).unwrap();
        drop(client);
        let done = wait_socks(&mut io, 1);
        assert_eq!((done[0].token, *done[0].result.as_ref().unwrap()), (6, 0));
        drop(server);
    }

    #[test]
    fn socket_ops_beyond_the_sq_go_out_in_one_submission() {
        use std::io::Write;
        // 40 receives on a ring of 8 SQ entries: one submission hands them all to the
        // kernel (a shard about to sleep must not keep any back), and the last one then
        // completes when its bytes arrive.
        let pairs: Vec<_> = (0..40).map(|_| tcp_pair()).collect();
        let mut io = UringBackend::new(8, &[], Vec::new(), None, 0, 0).unwrap();
        for (i, (_, server)) in pairs.iter().enumerate() {
            io.push_sock(recv_req(i as u64, server.as_raw_fd()));
        }
        io.submit_and_wait(false, None).unwrap();
        assert_eq!(io.socks_in_kernel, 40, "{} pending", io.socks_pending.len());
        (&pairs[39].0).write_all(b"x").unwrap();
        let done = wait_socks(&mut io, 1);
        assert_eq!((done[0].token, *done[0].result.as_ref().unwrap()), (39, 1));
    }

    #[test]
    fn shutting_a_socket_down_ends_its_receive() {
        // How the front-end closes a connection whose receive is armed.
        let (_client, server) = tcp_pair();
        let mut io = UringBackend::new(8, &[], Vec::new(), None, 0, 0).unwrap();
        io.push_sock(recv_req(1, server.as_raw_fd()));
        io.submit_and_wait(false, None).unwrap();
        // SAFETY: shutdown(2) on a descriptor this test owns.
        assert_eq!(unsafe { libc::shutdown(server.as_raw_fd(), libc::SHUT_RDWR) }, 0);
        let done = wait_socks(&mut io, 1);
        assert_eq!(*done[0].result.as_ref().unwrap(), 0);
    }

    #[test]
    fn drop_cancels_armed_socket_operations() {
        let (_client, server) = tcp_pair();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut io = UringBackend::new(8, &[], Vec::new(), None, 0, 0).unwrap();
        io.push_sock(recv_req(1, server.as_raw_fd()));
        io.push_sock(SockRequest { token: 2, fd: listener.as_raw_fd(), op: SockOp::Accept });
        io.submit_and_wait(false, None).unwrap();
        assert_eq!(io.socks_in_kernel, 2);
        let t0 = Instant::now();
        drop(io);
        assert!(t0.elapsed() < Duration::from_secs(5), "drop waited {:?} for a receive", t0.elapsed());
    }

    #[test]
    fn the_simulated_backend_refuses_socket_operations() {
        use crate::io::sim::SimDevices;
        let devs = SimDevices::new(vec![crate::io::SimDisk::new(1 << 20)], 4096);
        let mut io = devs.open_backend(None, 0, 0).unwrap();
        assert!(!io.sockets());
        io.push_sock(recv_req(9, 0));
        let mut out = Vec::new();
        io.reap_sock(&mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].result.as_ref().unwrap_err().kind(), io::ErrorKind::Unsupported);
    }
}
