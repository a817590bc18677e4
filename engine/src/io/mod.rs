//! The OS boundary: devices, the io_uring backend, and the simulated backend.
//!
//! Everything above this module talks to storage through [`IoBackend`], one instance per
//! shard thread (backends are not `Send`: a ring belongs to the thread that created it).
//! A [`DeviceSet`] is the shareable description of a namespace's devices and the factory of
//! backends; the engine creates one backend per shard on the shard's own thread.
//!
//! Contract shared by both backends:
//! - `push` never blocks and never fails; the request is handed to the device by the next
//!   `submit_and_wait`. The caller bounds how much it pushes (see `IoLimits`).
//! - Every pushed request produces exactly one [`IoCompletion`] with the same `tag`, carrying
//!   the request's buffers back, so the caller regains ownership of them.
//! - Errno handling lives in the backend, in one table: `EINTR`/`EAGAIN` are resubmitted, short
//!   transfers are continued for the remainder, a zero-byte write is an error, `EINVAL` means an
//!   alignment bug (reported as [`DeviceError::Misaligned`] naming the offset). A completion's
//!   result is `Ok(len)` only when all requested bytes were transferred.
//! - Reads past the end of a device are a caller bug (asserted).

mod buf;
mod device;
mod doorbell;
pub mod sim;
mod uring;

use std::os::fd::RawFd;
use std::time::Duration;

pub use buf::{AlignedBuf, WBuf};
pub use device::{open_devices, probe_uring, DeviceSpec, FileDevices};
pub use doorbell::Doorbell;
pub use sim::{SimDevices, SimDisk, SimFaults};

use crate::error::DeviceError;

/// Index of a device within its namespace.
pub type DevId = u32;

/// What the engine needs to know about one device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Path for logs and messages (`sim:N` for simulated disks).
    pub path: String,
    /// Usable size in bytes.
    pub size_bytes: u64,
    /// Alignment (and size granularity) every O_DIRECT transfer must honour: the largest of
    /// the logical block size and the DIO alignment the kernel reports.
    pub io_align: u32,
    /// Physical block size as reported (informational).
    pub physical_block: u32,
    /// True for a raw block device, false for a regular file or a simulated disk.
    pub is_block_device: bool,
}

/// One I/O request. `offset` and lengths must be multiples of the device's `io_align`.
#[derive(Debug)]
pub struct IoRequest {
    pub tag: u64,
    pub dev: DevId,
    pub offset: u64,
    pub op: IoOp,
}

/// The operation and the buffers it owns until its completion returns them.
#[derive(Debug)]
pub enum IoOp {
    /// Read `buf.len()` bytes at `offset` into `buf`.
    Read { buf: AlignedBuf },
    /// Write `buf[start..end]` to `offset`. `[start, end)` must be frozen in `buf`
    /// (see [`WBuf::freeze_to`]), so the caller cannot change it while the device reads it.
    /// With `dsync` the write is durable when it completes (`RWF_DSYNC`).
    Write { buf: std::rc::Rc<WBuf>, start: usize, end: usize, dsync: bool },
    /// Make every completed write on `dev` durable.
    Fsync,
}

/// The result of one request; `op` gives the buffers back.
#[derive(Debug)]
pub struct IoCompletion {
    pub tag: u64,
    pub dev: DevId,
    pub offset: u64,
    pub result: Result<usize, DeviceError>,
    pub op: IoOp,
}

/// A socket operation carried out by a shard's ring for code running in the shard's loop
/// (the server's front-end). The descriptor must stay open until the operation's
/// [`SockCompletion`] has been reaped: the kernel resolves the descriptor number only when
/// it takes the request, which may be after `push_sock` returns.
#[derive(Debug)]
pub struct SockRequest {
    /// Handed back in the completion.
    pub token: u64,
    pub fd: RawFd,
    pub op: SockOp,
}

/// What a socket operation does; the buffers travel with it and come back in the completion.
#[derive(Debug)]
pub enum SockOp {
    /// Receive into the spare capacity of `buf` (at most `capacity - len` bytes, none of them
    /// zeroed first): what arrives is appended, `len` growing by the count. Completes when
    /// at least one byte arrived, at end of stream (0), or on an error (`len` unchanged).
    Recv { buf: Vec<u8> },
    /// Send `buf[at..]`; may complete after sending only part of it.
    Send { buf: Vec<u8>, at: usize },
    /// Accept one connection on a listening socket: the result is the new descriptor,
    /// close-on-exec, owned by whoever reaps the completion.
    Accept,
}

/// The end of one [`SockRequest`]: bytes transferred (or the accepted descriptor), or the
/// error (`ECANCELED` after [`IoBackend::cancel_sock`]).
#[derive(Debug)]
pub struct SockCompletion {
    pub token: u64,
    pub result: std::io::Result<usize>,
    pub op: SockOp,
}

/// Names a socket operation in flight, for [`IoBackend::cancel_sock`]. Never reused for
/// another operation of the same backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SockId(pub u64);

/// A per-shard I/O queue: the real io_uring or the simulated disk.
pub trait IoBackend {
    /// Queue a request; it is submitted by the next `submit_and_wait`.
    fn push(&mut self, req: IoRequest);

    /// Submit what is queued. When `wait` is true, block until at least one completion is
    /// ready, the doorbell given at creation is rung, or `timeout` passes (None: no limit).
    /// Returns an error only when the ring itself fails (not for failed I/O requests).
    fn submit_and_wait(&mut self, wait: bool, timeout: Option<Duration>) -> Result<(), DeviceError>;

    /// Move finished requests into `out`. Returns true if the doorbell was rung since the last
    /// call (the backend then re-arms it and resets the eventfd counter).
    fn reap(&mut self, out: &mut Vec<IoCompletion>) -> bool;

    /// Requests pushed whose completions have not been reaped yet.
    fn in_flight(&self) -> usize;

    /// An aligned buffer of `len` bytes for I/O, zero-filled; from the registered arena when
    /// one is available and `len` matches its slot size, else a plain allocation.
    fn alloc(&mut self, len: usize) -> AlignedBuf;

    /// Return a buffer obtained from `alloc` (arena slots go back to the arena).
    fn free(&mut self, buf: AlignedBuf);

    /// A one-line description for logs (ring flags, registered buffers or why not).
    fn describe(&self) -> String;

    /// Whether socket operations run on this backend (the io_uring one). Elsewhere every
    /// socket operation completes at once with `Unsupported`.
    fn sockets(&self) -> bool {
        false
    }

    /// Queue a socket operation; like `push`, it goes to the kernel with the next
    /// `submit_and_wait` and produces exactly one [`SockCompletion`]. Socket operations do
    /// not count in `in_flight` (a receive may wait for its peer for ever).
    fn push_sock(&mut self, req: SockRequest) -> SockId;

    /// Ask the kernel to end a socket operation early (it then completes with
    /// `ECANCELED`, or with what it did before the cancellation reached it). Harmless when
    /// the operation has already completed.
    fn cancel_sock(&mut self, id: SockId);

    /// Move finished socket operations into `out`.
    fn reap_sock(&mut self, out: &mut Vec<SockCompletion>);

    /// Whether something finished that a `reap` (after a non-waiting `submit_and_wait`)
    /// would bring: a cheap look at the ring's shared memory, without a system call, for a
    /// caller spinning before it sleeps.
    fn events_waiting(&mut self) -> bool {
        false
    }
}

/// The eventfd (a [`Doorbell`]'s) a backend watches while it waits, besides its own
/// completions; the backend resets its counter when it fires.
#[derive(Debug, Clone, Copy)]
pub struct Wake(pub RawFd);

impl Wake {
    pub fn fd(self) -> RawFd {
        self.0
    }
}

/// The devices of one namespace, shareable across shard threads.
pub trait DeviceSet: Send + Sync {
    fn devices(&self) -> &[DeviceInfo];

    /// Create the backend for one shard, on the calling thread. `wake` is a descriptor the
    /// backend watches while waiting; its readiness shows as the doorbell being rung.
    /// `arena_slot_bytes`/`arena_slots` ask for a registered buffer arena of that shape.
    fn open_backend(
        &self,
        wake: Option<Wake>,
        arena_slot_bytes: usize,
        arena_slots: usize,
    ) -> Result<Box<dyn IoBackend>, DeviceError>;
}

/// The completion of a socket operation that a backend cannot run.
pub(crate) fn unsupported_sock(req: SockRequest) -> SockCompletion {
    let e = std::io::Error::new(std::io::ErrorKind::Unsupported, "socket operations need the io_uring backend");
    SockCompletion { token: req.token, result: Err(e), op: req.op }
}

/// Run one request to completion on `io` (start-up and shutdown paths only).
pub fn run_sync(io: &mut dyn IoBackend, req: IoRequest) -> Result<IoCompletion, DeviceError> {
    let tag = req.tag;
    io.push(req);
    let mut out = Vec::with_capacity(1);
    loop {
        io.submit_and_wait(true, Some(Duration::from_millis(100)))?;
        io.reap(&mut out);
        if let Some(i) = out.iter().position(|c| c.tag == tag) {
            return Ok(out.swap_remove(i));
        }
    }
}
