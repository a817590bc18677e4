//! The front-end inside the shards' loops (`front-end = "shards"`, the default).
//!
//! Every socket operation goes through the shard's own io_uring ([`HookCtx::push_sock`]):
//! each shard keeps an accept armed on the listening socket, one receive armed on each of
//! its connections while it wants their requests, and at most one send in flight per
//! connection. What a turn queues (sends, receives, device reads) reaches the kernel in the
//! shard's one `io_uring_enter` at the end of the turn (more when it queues more than the
//! submission queue holds), and the completions come back at the
//! start of the next one. A shard that accepts a connection keeps it unless another shard
//! has fewer, then hands it over through that shard's [`Inbox`], so connections spread
//! evenly whichever shard's accept the kernel completes.
//!
//! Each turn decodes every complete frame received and submits single-record commands
//! through the shard: commands for the shard's own partitions are queued and run together
//! on this thread once the turn's receives are decoded ([`HookCtx::run_submitted`]), the
//! others are handed to their shard just before, in one batch per destination, so that
//! they run there meanwhile and their answers can go out in the same turn. Replies come
//! back over a channel (with the doorbell rung when they come from another shard) and are
//! sent in request order; at most `max-inflight` commands per connection execute at once.
//!
//! Batch requests and scans run here too: a batch's rows are submitted like single
//! commands, at most `BATCH_WINDOW` at once per batch; a scan asks the owning shards for one
//! page of one partition at a time. Finished rows and records are framed and sent as they
//! come (a response is streamed while it is the oldest one pending).
//!
//! Info requests (some wait on the whole engine, which a shard thread must never do) and
//! scans of another namespace move their connection, with its unread bytes, to a thread of
//! its own running the blocking front-end (`conn.rs`) once its in-flight replies are sent
//! and its receive is cancelled. (The clients send info on their own tend connections;
//! data connections stay on the shards.)
//!
//! A socket stays open while the ring may still name it: closing a connection shuts it
//! down (which ends its receive and send at once) and the descriptor is closed only when
//! both have completed, so its number cannot be reused under an operation not yet handed
//! to the kernel.

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use ferrospike_engine::hook::{HookCtx, ShardHook};
use ferrospike_engine::io::{Doorbell, SockCompletion, SockId, SockOp, SockRequest};
use ferrospike_engine::{Command, Digest, Reply, ResultCode};

use super::conn::{
    self, log_close, next_frame, read_window, Close, BATCH_WINDOW, KEEP_BUF_BYTES, READ_CHUNK, SCAN_PAGE, WRITE_TIMEOUT,
};
use super::{NetStats, Shared, CONN_STACK_BYTES};
use crate::proto::batch::{BatchCursor, BatchRows};
use crate::proto::codes::*;
use crate::proto::request::{self, classify, Flags, Kind};
use crate::proto::response::{
    begin_frame, encode_error, encode_reply, end_frame, write_last_msg, write_reply_msg, RespHeader,
};
use crate::proto::scan::{parse_scan, write_scan_record};
use crate::proto::{Msg, MsgHeader, Reader, PROTO_HEADER_BYTES};

/// Unsent response bytes beyond which a connection's requests are no longer read.
const MAX_OUT_BACKLOG: usize = 4 << 20;
/// Commands waiting for another shard's channel beyond which no new requests are read.
const MAX_FORWARD_BACKLOG: usize = 4096;
/// How often deadlines, idle and stalled connections are checked.
const TIMER_EVERY: Duration = Duration::from_millis(50);
/// How long an accept that failed for want of descriptors or memory waits before it is
/// armed again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// How often connections' incoming CPUs are looked at (connection affinity). A client
/// thread the scheduler moves to the other CPU runs at about half speed until its
/// connection follows, which it does at the next look at it.
const STEER_EVERY: Duration = Duration::from_millis(2);
/// Connections looked at per look, at most (the rest at the next ones): bounds the
/// getsockopt calls to 4000 a second per shard. With up to 8 connections a shard looks
/// at each every 2 ms; with 64, every 16 ms.
const STEER_BATCH: usize = 8;
/// A moved connection stays where it is at least this long, so that a client thread
/// bouncing between CPUs moves its connection at most 20 times a second.
const STEER_SETTLE: Duration = Duration::from_millis(50);
/// Socket operation tokens: the connection's slot, and what the operation is.
const TOKEN_RECV: u64 = 1 << 32;
const TOKEN_SEND: u64 = 2 << 32;
const TOKEN_ACCEPT: u64 = 3 << 32;

/// A connection on its way to the shard that is to serve it.
struct Incoming {
    sock: TcpStream,
    peer: SocketAddr,
    /// Bytes received but not yet handled (a connection moved from another shard), and
    /// when the first of them arrived (the request deadline runs on across a move).
    inbuf: Vec<u8>,
    first_byte: Option<Instant>,
    /// When it was moved from another shard, if it was.
    moved_at: Option<Instant>,
}

/// Where connections for one shard are dropped by the shard that accepted them (or that
/// served them until then), how many that shard serves, and the CPU it runs on.
pub struct Inbox {
    tx: Sender<Incoming>,
    doorbell: OnceLock<Arc<Doorbell>>,
    /// Connections the shard serves or is about to (the spread's measure).
    conns: AtomicUsize,
    /// The one CPU the shard's thread may run on; -1 when it is not pinned to one.
    cpu: AtomicI64,
}

impl Inbox {
    /// Hand a connection to the shard; gives it back when the shard has gone away.
    fn deliver(&self, inc: Incoming) -> Result<(), Incoming> {
        self.conns.fetch_add(1, SeqCst);
        if let Err(e) = self.tx.send(inc) {
            self.conns.fetch_sub(1, SeqCst);
            return Err(e.into_inner());
        }
        self.wake();
        Ok(())
    }
    /// Connections the shard serves.
    pub fn connections(&self) -> usize {
        self.conns.load(SeqCst)
    }

    /// The CPU the shard's thread is pinned to, if it is pinned to one.
    pub fn cpu(&self) -> Option<i64> {
        Some(self.cpu.load(SeqCst)).filter(|&c| c >= 0)
    }

    /// Wake the shard if it sleeps.
    pub fn wake(&self) {
        if let Some(d) = self.doorbell.get() {
            d.ring_if_sleeping();
        }
    }
}

thread_local! {
    /// Replies of commands a shard ran for its own front-end's connections: the callback
    /// runs on the shard's thread (in the turn, or when a device read completes), so it
    /// leaves the reply here for the next turn instead of going through a channel.
    static LOCAL_REPLIES: std::cell::RefCell<Vec<NetReply>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A reply on its way back to its connection.
struct NetReply {
    slot: u32,
    id: u64,
    seq: u64,
    bytes: Vec<u8>,
    /// One row of the batch request `seq` (a message, not a whole frame).
    row: bool,
    /// A page of the scan request `seq` (record messages, not a whole frame).
    page: Option<PageInfo>,
}

/// What a scan page said besides its records.
struct PageInfo {
    records: u64,
    last: Option<Digest>,
    done: bool,
    result: ResultCode,
}

/// A scan being executed: one page (of one partition) at a time.
struct ScanJob {
    set: Option<String>,
    /// Partitions with the digest to resume after.
    partitions: Vec<(u16, Option<Digest>)>,
    next: usize,
    after: Option<Digest>,
    left: u64,
    no_bins: bool,
    bins: Arc<Vec<String>>,
    seq: u64,
    in_flight: bool,
    result: Option<ResultCode>,
    rows: Vec<u8>,
}

/// A response in the making, in request order.
struct Slot {
    bytes: Vec<u8>,
    /// Complete: once it reaches the head of the queue it can go. A batch's slot is written
    /// out piece by piece while it is at the head and not done.
    done: bool,
}

impl Slot {
    fn done(bytes: Vec<u8>) -> Slot {
        Slot { bytes, done: true }
    }

    fn pending() -> Slot {
        Slot { bytes: Vec::new(), done: false }
    }
}

/// A batch request being executed: at most `BATCH_WINDOW` rows at once.
struct BatchJob {
    /// The BATCH_INDEX field (validated).
    body: Vec<u8>,
    cursor: BatchCursor,
    seq: u64,
    outstanding: usize,
    all_submitted: bool,
    /// Row messages not yet framed.
    rows: Vec<u8>,
}

/// Where a connection is going once everything it asked for is answered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Move {
    /// To a thread of its own running the blocking front-end (info requests, scans of
    /// another namespace).
    Thread,
    /// To another shard's loop: the one on the CPU its packets arrive on.
    Shard(usize),
}

struct NetConn {
    sock: TcpStream,
    peer: SocketAddr,
    id: u64,
    inbuf: Vec<u8>,
    /// When the first byte of the incomplete request in `inbuf` arrived.
    first_byte: Option<Instant>,
    last_activity: Instant,
    /// Responses not yet written, in request order.
    slots: VecDeque<Slot>,
    /// Sequence number of `slots[0]`.
    base_seq: u64,
    outstanding: usize,
    /// Response bytes not yet handed to the ring.
    out: Vec<u8>,
    /// The receive in flight, if any.
    recv: Option<SockId>,
    /// The receive was asked to end early (before a hand-over).
    recv_cancelled: bool,
    /// A receive buffer not in use: always empty, capacity at most READ_CHUNK.
    rbuf: Vec<u8>,
    /// The send in flight, if any, and the bytes it has left to send.
    send: Option<SockId>,
    sending: usize,
    /// A send buffer not in use.
    spare_out: Vec<u8>,
    last_write_progress: Instant,
    /// Hand the connection over once idle: the next frame needs the blocking front-end, or
    /// another shard is closer to the client.
    migrate: Option<Move>,
    /// When it was last moved between shards.
    moved_at: Option<Instant>,
    /// The client has shut its side down: answer what it sent, then close.
    eof: bool,
    /// Closed: shut down, waiting for its receive and send to complete before the socket
    /// is closed and the slot reused. Nothing else happens on it.
    closed: bool,
    /// The batch request in progress (one at a time per connection).
    batch: Option<BatchJob>,
    /// The scan in progress (one at a time per connection).
    scan: Option<ScanJob>,
}

impl NetConn {
    /// The response bytes written but not yet sent.
    fn backlog(&self) -> usize {
        self.out.len() + self.sending
    }
}

/// One shard's front-end.
pub struct ShardNet {
    /// The server, once it exists (shards start before it does; no connection arrives
    /// before it is set).
    sh: Arc<OnceLock<Arc<Shared>>>,
    /// The namespace whose engine runs this shard.
    namespace: String,
    /// This shard's place in `Shared::inboxes`.
    index: usize,
    inbox: Arc<Inbox>,
    rx_conns: Receiver<Incoming>,
    replies_tx: Sender<NetReply>,
    replies_rx: Receiver<NetReply>,
    /// Swapped with [`LOCAL_REPLIES`] each turn (keeps its allocation).
    local_replies: Vec<NetReply>,
    doorbell: Option<Arc<Doorbell>>,
    conns: Vec<Option<NetConn>>,
    free: Vec<u32>,
    next_id: u64,
    /// The accept armed on the listening socket, if any.
    accept: Option<SockId>,
    /// When an accept may be armed again after a failure.
    accept_after: Option<Instant>,
    done: Vec<SockCompletion>,
    /// When the current turn started: the clock is read once a turn for the connection
    /// timestamps (activity, first byte, write progress), whose timeouts are far coarser.
    now: Instant,
    last_timer: Instant,
    /// Connections that may have replies or bytes to send, or a receive to arm.
    dirty: Vec<u32>,
    /// Connections not read for now only because of the shard's forward backlog.
    parked: Vec<u32>,
    /// Said once: this shard's ring cannot carry sockets.
    warned_no_sockets: bool,
    /// Connection affinity: when the incoming CPUs were last looked at, where the next look
    /// starts, and the moves decided but not yet made, per destination shard.
    last_steer: Instant,
    steer_next: usize,
    moving: Vec<usize>,
}

fn shutdown(sock: &TcpStream) {
    // SAFETY: shutdown(2) on a descriptor this connection owns; no memory is involved.
    unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_RDWR) };
}

impl ShardNet {
    /// A front-end for shard `index` of `namespace`'s engine, and the inbox connections
    /// reach it through.
    pub fn new(
        sh: Arc<OnceLock<Arc<Shared>>>,
        namespace: &str,
        index: usize,
    ) -> std::io::Result<(ShardNet, Arc<Inbox>)> {
        let (tx, rx_conns) = unbounded();
        let inbox =
            Arc::new(Inbox { tx, doorbell: OnceLock::new(), conns: AtomicUsize::new(0), cpu: AtomicI64::new(-1) });
        let (replies_tx, replies_rx) = unbounded();
        let net = ShardNet {
            sh,
            namespace: namespace.to_string(),
            index,
            inbox: inbox.clone(),
            rx_conns,
            replies_tx,
            replies_rx,
            local_replies: Vec::new(),
            doorbell: None,
            conns: Vec::new(),
            free: Vec::new(),
            next_id: 1,
            accept: None,
            accept_after: None,
            done: Vec::new(),
            now: Instant::now(),
            last_timer: Instant::now(),
            dirty: Vec::new(),
            parked: Vec::new(),
            warned_no_sockets: false,
            last_steer: Instant::now(),
            steer_next: 0,
            moving: Vec::new(),
        };
        Ok((net, inbox))
    }

    /// Serve a connection here (already counted in `connections_current` and in this
    /// shard's inbox).
    fn add_conn(&mut self, inc: Incoming) {
        let Incoming { sock, peer, inbuf, first_byte, moved_at } = inc;
        if moved_at.is_none() {
            let _ = sock.set_nodelay(true);
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                (self.conns.len() - 1) as u32
            }
        };
        let now = Instant::now();
        let id = self.next_id;
        self.next_id += 1;
        self.conns[slot as usize] = Some(NetConn {
            sock,
            peer,
            id,
            first_byte: first_byte.or((!inbuf.is_empty()).then_some(now)),
            inbuf,
            last_activity: now,
            slots: VecDeque::new(),
            base_seq: 0,
            outstanding: 0,
            out: Vec::new(),
            recv: None,
            recv_cancelled: false,
            rbuf: Vec::new(),
            send: None,
            sending: 0,
            spare_out: Vec::new(),
            last_write_progress: now,
            migrate: None,
            moved_at,
            eof: false,
            closed: false,
            batch: None,
            scan: None,
        });
        self.dirty.push(slot);
    }

    /// A live connection.
    fn conn(&mut self, slot: u32) -> Option<&mut NetConn> {
        self.conns.get_mut(slot as usize).and_then(Option::as_mut).filter(|c| !c.closed)
    }

    fn close(&mut self, sh: &Shared, slot: u32, why: Close) {
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut).filter(|c| !c.closed) else {
            return;
        };
        c.closed = true;
        if let Some(Move::Shard(j)) = c.migrate.take() {
            self.moving[j] -= 1;
        }
        // Ends the receive and the send at once (end of stream, broken pipe).
        shutdown(&c.sock);
        let peer = c.peer;
        log_close(peer, why, sh);
        sh.stats.connections_current.fetch_sub(1, SeqCst);
        self.inbox.conns.fetch_sub(1, SeqCst);
        self.reclaim(slot);
    }

    /// Free a closed connection's slot (closing its socket) once the ring is done with it.
    fn reclaim(&mut self, slot: u32) {
        let idle = self.conns[slot as usize].as_ref().is_some_and(|c| c.closed && c.recv.is_none() && c.send.is_none());
        if idle {
            self.conns[slot as usize] = None;
            self.free.push(slot);
        }
    }

    /// Arm a receive on a connection when it wants requests and has none armed.
    fn arm_recv(&mut self, sh: &Shared, slot: u32, ctx: &mut HookCtx<'_>) {
        let backlog = ctx.forward_backlog();
        let Some(c) = self.conn(slot) else { return };
        if c.recv.is_some() || c.eof || held(c, sh) {
            return;
        }
        if backlog > MAX_FORWARD_BACKLOG {
            self.parked.push(slot);
            return;
        }
        // Empty, and room for the window, never zeroed: the receive fills it.
        let mut buf = std::mem::take(&mut c.rbuf);
        buf.reserve(read_window(&c.inbuf));
        let req = SockRequest { token: TOKEN_RECV | slot as u64, fd: c.sock.as_raw_fd(), op: SockOp::Recv { buf } };
        c.recv = Some(ctx.push_sock(req));
    }

    /// Hand the connection's unsent response bytes to the ring when no send is in flight.
    fn send(&mut self, slot: u32, ctx: &mut HookCtx<'_>) {
        let now = self.now;
        let Some(c) = self.conn(slot) else { return };
        if c.send.is_some() || c.out.is_empty() {
            return;
        }
        let buf = std::mem::replace(&mut c.out, std::mem::take(&mut c.spare_out));
        c.sending = buf.len();
        // A stall is counted from here: the connection may have been quiet for long.
        c.last_write_progress = now;
        let req =
            SockRequest { token: TOKEN_SEND | slot as u64, fd: c.sock.as_raw_fd(), op: SockOp::Send { buf, at: 0 } };
        c.send = Some(ctx.push_sock(req));
    }

    /// A receive completed: keep what arrived and submit the complete requests.
    fn on_recv(&mut self, sh: &Shared, slot: u32, result: std::io::Result<usize>, op: SockOp, ctx: &mut HookCtx<'_>) {
        let SockOp::Recv { mut buf, .. } = op else { unreachable!("a receive token names a receive") };
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        c.recv = None;
        if c.closed {
            self.reclaim(slot);
            return;
        }
        match result {
            Ok(0) => {
                // A half-closed client still gets the answers to what it sent; `flush`
                // closes the connection once they are written.
                c.eof = true;
            }
            Ok(n) => {
                debug_assert_eq!(buf.len(), n, "a receive into an empty buffer holds what arrived");
                c.last_activity = self.now;
                if c.inbuf.is_empty() {
                    c.first_byte = Some(self.now);
                    std::mem::swap(&mut c.inbuf, &mut buf);
                } else {
                    c.inbuf.extend_from_slice(&buf);
                }
                buf.clear();
                // A receive takes its buffer's whole spare capacity: one grown past
                // READ_CHUNK (for a large request) is not kept, so that no receive takes more.
                if buf.capacity() <= READ_CHUNK {
                    c.rbuf = buf;
                }
                if !throttled(c, sh, ctx) {
                    if let Err(why) = self.process(sh, slot, ctx) {
                        self.close(sh, slot, why);
                        return;
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ECANCELED) => {}
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
            Err(e) => {
                self.close(sh, slot, Close::Io(e));
                return;
            }
        }
        self.dirty.push(slot);
    }

    /// A send completed: send the rest, or take the next responses.
    fn on_send(&mut self, sh: &Shared, slot: u32, result: std::io::Result<usize>, op: SockOp, ctx: &mut HookCtx<'_>) {
        let SockOp::Send { buf, at } = op else { unreachable!("a send token names a send") };
        let Some(c) = self.conns.get_mut(slot as usize).and_then(Option::as_mut) else { return };
        c.send = None;
        if c.closed {
            self.reclaim(slot);
            return;
        }
        let at = match result {
            Ok(0) => {
                self.close(sh, slot, Close::Io(ErrorKind::WriteZero.into()));
                return;
            }
            Ok(n) => at + n,
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => at,
            Err(e) => {
                self.close(sh, slot, Close::Io(e));
                return;
            }
        };
        if at > 0 {
            c.last_write_progress = self.now;
        }
        if at < buf.len() {
            c.sending = buf.len() - at;
            let req =
                SockRequest { token: TOKEN_SEND | slot as u64, fd: c.sock.as_raw_fd(), op: SockOp::Send { buf, at } };
            c.send = Some(ctx.push_sock(req));
        } else {
            c.sending = 0;
            let mut buf = buf;
            buf.clear();
            if buf.capacity() <= KEEP_BUF_BYTES {
                c.spare_out = buf;
            }
        }
        self.dirty.push(slot);
    }

    /// Arm an accept on the listening socket, unless one is armed, the server is stopping
    /// or a failed accept is backing off.
    fn arm_accept(&mut self, sh: &Shared, ctx: &mut HookCtx<'_>) {
        let Some(fd) = sh.listener_fd.filter(|_| self.accept.is_none() && !sh.stopping.load(SeqCst)) else {
            return;
        };
        if !ctx.sockets() {
            return; // said once in `turn`
        }
        if self.accept_after.is_some_and(|t| Instant::now() < t) {
            return;
        }
        self.accept_after = None;
        self.accept = Some(ctx.push_sock(SockRequest { token: TOKEN_ACCEPT, fd, op: SockOp::Accept }));
    }

    /// An accept completed: serve the connection here or on the shard with the fewest.
    fn on_accept(&mut self, sh: &Shared, result: std::io::Result<usize>) {
        self.accept = None;
        let fd = match result {
            Ok(fd) => fd as RawFd,
            Err(e) => {
                match e.raw_os_error() {
                    _ if sh.stopping.load(SeqCst) => {}
                    Some(libc::ECANCELED) => {}
                    // That one connection went wrong before it was accepted.
                    Some(libc::ECONNABORTED | libc::EPROTO | libc::EPERM) => tracing::debug!("accept failed: {e}"),
                    _ => {
                        tracing::warn!("accept failed: {e}");
                        // Out of descriptors or memory: back off instead of spinning.
                        self.accept_after = Some(Instant::now() + ACCEPT_BACKOFF);
                    }
                }
                return;
            }
        };
        // SAFETY: the ring's accept returned a fresh descriptor that nothing else owns.
        let sock = unsafe { TcpStream::from_raw_fd(fd) };
        if sh.stopping.load(SeqCst) {
            return; // dropping the socket closes it
        }
        let peer = match sock.peer_addr() {
            Ok(p) => p,
            Err(_) => return, // gone already
        };
        let n = sh.stats.connections_current.fetch_add(1, SeqCst);
        if n >= sh.cfg.max_connections {
            sh.stats.connections_current.fetch_sub(1, SeqCst);
            NetStats::bump(&sh.stats.connections_refused);
            tracing::debug!("refusing {peer}: {n} connections open");
            return;
        }
        NetStats::bump(&sh.stats.connections_opened);
        // The shard on the CPU the client's packets arrive on, unless it already has more
        // than its share; otherwise the one with the fewest connections, this one on a tie.
        let near = self.near_shard(sh, &sock).filter(|&j| self.has_room(sh, j, 1));
        let best = near.unwrap_or_else(|| self.fewest_shard(sh));
        let inc = Incoming { sock, peer, inbuf: Vec::new(), first_byte: None, moved_at: None };
        let inc = if best == self.index {
            inc
        } else {
            match sh.inboxes[best].deliver(inc) {
                Ok(()) => return,
                Err(inc) => {
                    tracing::warn!("shard {best} is gone; serving {peer} here");
                    inc
                }
            }
        };
        self.inbox.conns.fetch_add(1, SeqCst);
        self.add_conn(inc);
    }

    /// The shard serving the fewest connections; this one on a tie.
    fn fewest_shard(&self, sh: &Shared) -> usize {
        let mine = (self.index, self.inbox.conns.load(SeqCst));
        let others = sh.inboxes.iter().map(|i| i.conns.load(SeqCst)).enumerate();
        others.fold(mine, |best, (i, n)| if n < best.1 { (i, n) } else { best }).0
    }

    /// The shard pinned to the CPU on which the socket's packets were last received, when
    /// that is another shard and connection affinity is on.
    fn near_shard(&self, sh: &Shared, sock: &TcpStream) -> Option<usize> {
        if !sh.cfg.connection_affinity || sh.inboxes.len() < 2 {
            return None;
        }
        let cpu = incoming_cpu(sock)?;
        if self.inbox.cpu() == Some(cpu) {
            return None; // already there (several shards may share a CPU)
        }
        let j = sh.inboxes.iter().position(|i| i.cpu() == Some(cpu))?;
        (j != self.index).then_some(j)
    }

    /// Whether shard `j` may take one more connection for affinity's sake (`uncounted`: 1
    /// for a connection not yet counted anywhere, 0 for one moving between shards): it may
    /// serve up to half again its even share, so that clients crowded on one CPU still
    /// leave the other shards some connections to serve.
    fn has_room(&self, sh: &Shared, j: usize, uncounted: usize) -> bool {
        let total: usize = sh.inboxes.iter().map(|i| i.conns.load(SeqCst)).sum::<usize>() + uncounted;
        let fair = total.div_ceil(sh.inboxes.len());
        let limit = fair + fair.div_ceil(2);
        let pending = self.moving.get(j).copied().unwrap_or(0);
        sh.inboxes[j].conns.load(SeqCst) + pending < limit
    }

    /// Connection affinity: a connection whose client's packets arrive on another shard's
    /// CPU moves there once everything it asked for is answered, so that its receives and
    /// sends wake threads on one CPU instead of interrupting the other. Looks at up to
    /// `STEER_BATCH` connections per call, going round the slots.
    fn steer(&mut self, sh: &Shared, now: Instant) {
        if !sh.cfg.connection_affinity || sh.inboxes.len() < 2 || now.duration_since(self.last_steer) < STEER_EVERY {
            return;
        }
        self.last_steer = now;
        self.moving.resize(sh.inboxes.len(), 0);
        let n = self.conns.len();
        let (mut looked, mut k) = (0, 0);
        // Empty, closing and settling slots are passed over without a look, but at most
        // eight times the batch of them per call.
        while looked < STEER_BATCH && k < n.min(8 * STEER_BATCH) {
            let slot = ((self.steer_next + k) % n) as u32;
            k += 1;
            let Some(c) = self.conns[slot as usize].as_ref().filter(|c| !c.closed) else { continue };
            if c.migrate.is_some() || c.eof || c.moved_at.is_some_and(|t| now.duration_since(t) < STEER_SETTLE) {
                continue;
            }
            looked += 1;
            let go = self.near_shard(sh, &c.sock).filter(|&j| self.has_room(sh, j, 0));
            if let Some(j) = go {
                let Some(c) = self.conn(slot) else { continue };
                c.migrate = Some(Move::Shard(j));
                self.moving[j] += 1;
                self.dirty.push(slot);
            }
        }
        self.steer_next = if n == 0 { 0 } else { (self.steer_next + k) % n };
    }

    /// Handle the complete frames at the start of a connection's buffer, up to the
    /// connection's in-flight limit or a frame that needs the blocking front-end.
    fn process(&mut self, sh: &Shared, slot: u32, ctx: &mut HookCtx<'_>) -> Result<(), Close> {
        let max_body = sh.cfg.max_msg_bytes;
        let max_inflight = sh.cfg.max_inflight;
        let Some(c) = self.conns[slot as usize].as_mut() else { return Ok(()) };
        let buf = std::mem::take(&mut c.inbuf);
        let mut pos = 0;
        let mut result = Ok(());
        while c.migrate.is_none() && c.outstanding < max_inflight {
            let (h, total) = match next_frame(&buf[pos..], max_body) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    result = Err(Close::Protocol(e));
                    break;
                }
            };
            let body = &buf[pos + PROTO_HEADER_BYTES..pos + total];
            match h.msg_type {
                MSG_TYPE_AS_MSG => {
                    if let Err(e) = MsgHeader::parse(&mut Reader::new(body)) {
                        result = Err(Close::Protocol(e));
                        break;
                    }
                    let m = match Msg::parse(body) {
                        Ok(m) => m,
                        Err(e) => {
                            NetStats::bump(&sh.stats.frames_malformed);
                            tracing::debug!("malformed AS_MSG: {e}");
                            NetStats::bump(&sh.stats.error_replies);
                            c.slots.push_back(Slot::done(encode_error(ResultCode::Parameter.code())));
                            pos += total;
                            continue;
                        }
                    };
                    match classify(&m) {
                        Kind::Single => {}
                        Kind::Batch if c.batch.is_some() => break,
                        Kind::Batch => {
                            NetStats::bump(&sh.stats.batch_requests);
                            let seq = c.base_seq + c.slots.len() as u64;
                            match start_batch(sh, &m, seq) {
                                Ok(job) => {
                                    c.slots.push_back(Slot::pending());
                                    c.outstanding += 1;
                                    c.batch = Some(job);
                                }
                                Err(rc) => c.slots.push_back(Slot::done(last_frame(rc))),
                            }
                            pos += total;
                            continue;
                        }
                        Kind::Scan if c.scan.is_some() => break,
                        Kind::Scan => {
                            let req = match parse_scan(&m) {
                                Ok(r) => r,
                                Err(rc) => {
                                    NetStats::bump(&sh.stats.scan_requests);
                                    c.slots.push_back(Slot::done(last_frame(rc)));
                                    pos += total;
                                    continue;
                                }
                            };
                            if req.namespace != self.namespace {
                                // Another namespace's shards: the blocking front-end scans it.
                                c.migrate = Some(Move::Thread);
                                break;
                            }
                            NetStats::bump(&sh.stats.scan_requests);
                            let seq = c.base_seq + c.slots.len() as u64;
                            c.slots.push_back(Slot::pending());
                            c.outstanding += 1;
                            let after = req.partitions.first().and_then(|p| p.1);
                            c.scan = Some(ScanJob {
                                set: req.set.map(str::to_string),
                                partitions: req.partitions,
                                next: 0,
                                after,
                                left: req.max_records.unwrap_or(u64::MAX),
                                no_bins: req.no_bins,
                                bins: Arc::new(req.bins),
                                seq,
                                in_flight: false,
                                result: None,
                                rows: Vec::new(),
                            });
                            pos += total;
                            continue;
                        }
                    }
                    NetStats::bump(&sh.stats.single_requests);
                    match request::single(&Flags::from(&m.header), &m.fields, &m.ops, None) {
                        Ok(req) => {
                            let seq = c.base_seq + c.slots.len() as u64;
                            c.slots.push_back(Slot::pending());
                            c.outstanding += 1;
                            let op_codes = req.op_codes;
                            let back =
                                Back { tx: &self.replies_tx, bell: &self.doorbell, slot, id: c.id, seq, row: false };
                            let encode = move |r: &Reply| encode_reply(r, op_codes.as_deref());
                            if !dispatch(sh, ctx, &self.namespace, req.namespace, req.cmd, back, encode) {
                                // Not executed after all: answer in place.
                                c.outstanding -= 1;
                                c.slots.pop_back();
                                NetStats::bump(&sh.stats.error_replies);
                                c.slots.push_back(Slot::done(encode_error(ResultCode::Namespace.code())));
                            }
                        }
                        Err(rc) => {
                            NetStats::bump(&sh.stats.error_replies);
                            c.slots.push_back(Slot::done(encode_error(rc.code())));
                        }
                    }
                }
                MSG_TYPE_INFO => {
                    c.migrate = Some(Move::Thread);
                    break;
                }
                MSG_TYPE_COMPRESSED => {
                    NetStats::bump(&sh.stats.error_replies);
                    c.slots.push_back(Slot::done(encode_error(ResultCode::UnsupportedFeature.code())));
                }
                _ => {
                    result = Err(Close::Unsupported("security/admin messages (no authentication is configured)"));
                    break;
                }
            }
            pos += total;
        }
        c.inbuf = buf;
        if pos > 0 {
            c.inbuf.drain(..pos);
            c.first_byte = (!c.inbuf.is_empty()).then_some(self.now);
            if c.inbuf.is_empty() && c.inbuf.capacity() > KEEP_BUF_BYTES {
                c.inbuf = Vec::new();
            }
        }
        result
    }

    /// Run more rows of the connection's batch, and frame the rows that have finished.
    fn pump_batch(&mut self, sh: &Shared, slot: u32, ctx: &mut HookCtx<'_>) {
        let Some(c) = self.conns[slot as usize].as_mut().filter(|c| c.batch.is_some()) else { return };
        let backlog = c.backlog() + c.slots.iter().map(|s| s.bytes.len()).sum::<usize>();
        let Some(job) = c.batch.as_mut() else { return };
        let BatchJob { body, cursor, seq, outstanding, all_submitted, rows } = job;
        if !*all_submitted && *outstanding < BATCH_WINDOW && backlog < MAX_OUT_BACKLOG {
            match BatchRows::resume(body, *cursor) {
                Ok(mut it) => {
                    while *outstanding < BATCH_WINDOW {
                        let Some(Ok(row)) = it.next() else {
                            // Validated before it started: the end of the rows.
                            *all_submitted = true;
                            break;
                        };
                        let index = row.index;
                        let req = match row.req {
                            Ok(r) => r,
                            Err(rc) => {
                                RespHeader { result_code: rc.code(), txn_ttl: index, ..Default::default() }.write(rows);
                                continue;
                            }
                        };
                        let codes = req.op_codes;
                        let back =
                            Back { tx: &self.replies_tx, bell: &self.doorbell, slot, id: c.id, seq: *seq, row: true };
                        let encode = move |r: &Reply| {
                            let mut b = Vec::with_capacity(64);
                            write_reply_msg(&mut b, r, codes.as_deref(), index, 0);
                            b
                        };
                        if !dispatch(sh, ctx, &self.namespace, req.namespace, req.cmd, back, encode) {
                            let rc = ResultCode::Namespace.code();
                            RespHeader { result_code: rc, txn_ttl: index, ..Default::default() }.write(rows);
                            continue;
                        }
                        *outstanding += 1;
                    }
                    *cursor = it.cursor();
                }
                Err(_) => *all_submitted = true,
            }
        }
        let i = (*seq - c.base_seq) as usize;
        let out = &mut c.slots[i].bytes;
        if !rows.is_empty() {
            let start = begin_frame(out, MSG_TYPE_AS_MSG);
            out.append(rows);
            end_frame(out, start);
        }
        if *all_submitted && *outstanding == 0 {
            out.extend_from_slice(&last_frame(ResultCode::Ok));
            c.slots[i].done = true;
            c.batch = None;
            c.outstanding -= 1;
        }
    }

    /// Ask for the connection's scan's next page, and frame the records that came back.
    fn pump_scan(&mut self, slot: u32, ctx: &mut HookCtx<'_>) {
        let Some(c) = self.conns[slot as usize].as_mut().filter(|c| c.scan.is_some()) else { return };
        let backlog = c.backlog() + c.slots.iter().map(|s| s.bytes.len()).sum::<usize>();
        let Some(job) = c.scan.as_mut() else { return };
        if job.result.is_none() && (job.left == 0 || job.next >= job.partitions.len()) {
            job.result = Some(ResultCode::Ok);
        }
        if job.result.is_none() && !job.in_flight && backlog < MAX_OUT_BACKLOG {
            let pid = job.partitions[job.next].0;
            let max = job.left.min(SCAN_PAGE as u64) as usize;
            let (tx, bell) = (self.replies_tx.clone(), self.doorbell.clone());
            let (id, seq, no_bins, bins) = (c.id, job.seq, job.no_bins, job.bins.clone());
            let ns = self.namespace.clone();
            job.in_flight = true;
            ctx.scan(pid, job.set.as_deref(), job.after, max, !no_bins, move |page| {
                let mut bytes = Vec::new();
                for rec in &page.records {
                    write_scan_record(&mut bytes, &ns, rec, no_bins, &bins);
                }
                let info = PageInfo {
                    records: page.records.len() as u64,
                    last: page.records.last().map(|r| r.digest),
                    done: page.done,
                    result: page.result,
                };
                let _ = tx.send(NetReply { slot, id, seq, bytes, row: false, page: Some(info) });
                if let Some(b) = bell {
                    b.ring_if_sleeping();
                }
            });
        }
        let Some(job) = c.scan.as_mut() else { return };
        let i = (job.seq - c.base_seq) as usize;
        let out = &mut c.slots[i].bytes;
        if !job.rows.is_empty() {
            let start = begin_frame(out, MSG_TYPE_AS_MSG);
            out.append(&mut job.rows);
            end_frame(out, start);
        }
        if let Some(rc) = job.result.filter(|_| !job.in_flight) {
            out.extend_from_slice(&last_frame(rc));
            c.slots[i].done = true;
            c.scan = None;
            c.outstanding -= 1;
        }
    }

    /// Send a connection's finished responses, in order; take up requests held back; arm
    /// its receive; close or hand it over when its time has come.
    fn flush(&mut self, sh: &Shared, slot: u32, ctx: &mut HookCtx<'_>) {
        if self.conn(slot).is_none() {
            return;
        }
        self.pump_batch(sh, slot, ctx);
        self.pump_scan(slot, ctx);
        let Some(c) = self.conn(slot) else { return };
        while let Some(front) = c.slots.front_mut() {
            if c.out.is_empty() && c.out.capacity() <= front.bytes.capacity() {
                // The answer becomes the output as it is, with no copy (the empty buffer
                // goes with the slot). A larger one (kept from earlier sends) is kept.
                std::mem::swap(&mut c.out, &mut front.bytes);
            } else {
                c.out.append(&mut front.bytes);
            }
            if !front.done {
                break;
            }
            c.slots.pop_front();
            c.base_seq += 1;
        }
        self.send(slot, ctx);
        // Requests already buffered but held back by the in-flight limit.
        let Some(c) = self.conn(slot) else { return };
        if c.migrate.is_none() && !throttled(c, sh, ctx) && c.outstanding < sh.cfg.max_inflight && !c.inbuf.is_empty() {
            let before = c.outstanding + c.slots.len();
            if let Err(why) = self.process(sh, slot, ctx) {
                self.close(sh, slot, why);
                return;
            }
            let Some(c) = self.conn(slot) else { return };
            if c.outstanding + c.slots.len() != before {
                self.dirty.push(slot);
            }
        } else if !c.inbuf.is_empty() && !held(c, sh) && ctx.forward_backlog() > MAX_FORWARD_BACKLOG {
            // Requests already here wait for the shard's backlog alone: no event of this
            // connection's may come to bring them back (its receive may be armed already,
            // or the client may have sent everything and be waiting).
            self.parked.push(slot);
        }
        let Some(c) = self.conn(slot) else { return };
        let answered = c.outstanding == 0 && c.slots.is_empty() && c.out.is_empty() && c.send.is_none();
        if c.migrate.is_some() && answered {
            match c.recv {
                None => self.hand_over(sh, slot),
                Some(id) if !c.recv_cancelled => {
                    // Its completion (with whatever arrived before) brings the connection
                    // back here.
                    c.recv_cancelled = true;
                    ctx.cancel_sock(id);
                }
                Some(_) => {}
            }
            return;
        }
        if c.eof && answered && next_frame(&c.inbuf, sh.cfg.max_msg_bytes).ok().flatten().is_none() {
            // Everything the client sent in full is answered; a partial frame is dropped.
            self.close(sh, slot, Close::Eof);
            return;
        }
        self.arm_recv(sh, slot, ctx);
    }

    /// Put a reply where it belongs: its connection's request slot, batch or scan.
    fn take_reply(&mut self, r: NetReply) {
        let Some(c) = self.conn(r.slot).filter(|c| c.id == r.id) else {
            return;
        };
        if let Some(p) = r.page {
            if let Some(job) = c.scan.as_mut().filter(|j| j.seq == r.seq) {
                job.in_flight = false;
                job.rows.extend_from_slice(&r.bytes);
                job.left = job.left.saturating_sub(p.records);
                if p.result != ResultCode::Ok {
                    job.result = Some(p.result);
                } else if p.done || p.records == 0 {
                    job.next += 1;
                    job.after = job.partitions.get(job.next).and_then(|q| q.1);
                } else {
                    job.after = p.last;
                }
            }
        } else if r.row {
            if let Some(job) = c.batch.as_mut().filter(|j| j.seq == r.seq) {
                job.rows.extend_from_slice(&r.bytes);
                job.outstanding -= 1;
            }
        } else {
            let i = (r.seq - c.base_seq) as usize;
            debug_assert!(!c.slots[i].done, "one reply per request");
            c.slots[i] = Slot::done(r.bytes);
            c.outstanding -= 1;
        }
        self.dirty.push(r.slot);
    }

    /// Give a connection to a thread of its own running the blocking front-end (nothing of
    /// it is with the ring any more).
    fn hand_over(&mut self, sh: &Shared, slot: u32) {
        let Some(c) = self.conns[slot as usize].take() else { return };
        debug_assert!(c.recv.is_none() && c.send.is_none(), "handing over a connection the ring still uses");
        self.free.push(slot);
        self.inbox.conns.fetch_sub(1, SeqCst);
        if let Some(Move::Shard(j)) = c.migrate {
            self.moving[j] -= 1;
            let inc = Incoming {
                sock: c.sock,
                peer: c.peer,
                first_byte: c.first_byte.filter(|_| !c.inbuf.is_empty()),
                inbuf: c.inbuf,
                moved_at: Some(Instant::now()),
            };
            match sh.inboxes[j].deliver(inc) {
                Ok(()) => NetStats::bump(&sh.stats.connections_moved),
                Err(inc) => {
                    // That shard has stopped: keep serving the connection here.
                    self.inbox.conns.fetch_add(1, SeqCst);
                    self.add_conn(inc);
                }
            }
            return;
        }
        let Some(shared) = self.sh.get().cloned() else {
            // Unreachable (a connection exists only once the server does); counted out anyway.
            sh.stats.connections_current.fetch_sub(1, SeqCst);
            return;
        };
        NetStats::bump(&sh.stats.connections_handed_over);
        let (sock, peer, inbuf) = (c.sock, c.peer, c.inbuf);
        let spawned = std::thread::Builder::new().name("conn".into()).stack_size(CONN_STACK_BYTES).spawn(move || {
            conn::serve(sock, peer, &shared, inbuf);
            shared.stats.connections_current.fetch_sub(1, SeqCst);
        });
        if let Err(e) = spawned {
            sh.stats.connections_current.fetch_sub(1, SeqCst);
            NetStats::bump(&sh.stats.connections_refused);
            tracing::warn!("{peer}: cannot start a thread for an info, batch or scan request: {e}");
        }
    }

    fn timers(&mut self, sh: &Shared) {
        let now = Instant::now();
        if now.duration_since(self.last_timer) < TIMER_EVERY {
            return;
        }
        self.last_timer = now;
        let stopping = sh.stopping.load(SeqCst);
        let deadline = Duration::from_millis(sh.cfg.request_deadline_ms);
        let idle = Duration::from_secs(sh.cfg.idle_timeout_secs);
        for slot in 0..self.conns.len() as u32 {
            let Some(c) = self.conns[slot as usize].as_ref().filter(|c| !c.closed) else { continue };
            let quiet = c.outstanding == 0 && c.slots.is_empty() && c.backlog() == 0;
            let why = if c.send.is_some() && now.duration_since(c.last_write_progress) > WRITE_TIMEOUT {
                Some(Close::WriteStalled)
            } else if c.migrate.is_none()
                && !c.inbuf.is_empty()
                && c.first_byte.is_some_and(|t| now.duration_since(t) > deadline)
                // A request that arrived in full and waits its turn is not late.
                && next_frame(&c.inbuf, sh.cfg.max_msg_bytes).ok().flatten().is_none()
            {
                Some(Close::Deadline)
            } else if quiet && c.inbuf.is_empty() && stopping {
                Some(Close::Stopping)
            } else if quiet
                && c.inbuf.is_empty()
                && sh.cfg.idle_timeout_secs > 0
                && now.duration_since(c.last_activity) > idle
            {
                Some(Close::Idle)
            } else {
                None
            };
            if let Some(why) = why {
                self.close(sh, slot, why);
            }
        }
    }
}

/// Where a command's answer goes back to.
struct Back<'a> {
    tx: &'a Sender<NetReply>,
    bell: &'a Option<Arc<Doorbell>>,
    slot: u32,
    id: u64,
    seq: u64,
    row: bool,
}

/// Run `cmd` on the engine of `namespace` (this shard's engine, through `ctx`, or another
/// namespace's without waiting); its answer, encoded by `encode`, comes back as a
/// [`NetReply`]: through [`LOCAL_REPLIES`] when this shard runs it, else the replies
/// channel. False when the namespace does not exist (nothing was run).
fn dispatch(
    sh: &Shared,
    ctx: &mut HookCtx<'_>,
    mine: &str,
    namespace: &str,
    cmd: Command,
    back: Back<'_>,
    encode: impl FnOnce(&Reply) -> Vec<u8> + Send + 'static,
) -> bool {
    let Back { slot, id, seq, row, .. } = back;
    if namespace == mine && ctx.shard_of(&cmd.digest) == ctx.shard_id() {
        // Runs on this thread, and so does its callback (now or after a device read): the
        // reply waits in LOCAL_REPLIES for the turn, with no channel or doorbell.
        ctx.submit(cmd, move |reply: Reply| {
            let r = NetReply { slot, id, seq, bytes: encode(&reply), row, page: None };
            LOCAL_REPLIES.with(|l| l.borrow_mut().push(r));
        });
        return true;
    }
    let (tx, bell) = (back.tx.clone(), back.bell.clone());
    let cb = move |reply: Reply| {
        let _ = tx.send(NetReply { slot, id, seq, bytes: encode(&reply), row, page: None });
        if let Some(b) = bell {
            b.ring_if_sleeping();
        }
    };
    if namespace == mine {
        ctx.submit(cmd, cb);
    } else if let Some(e) = sh.engine(namespace) {
        e.try_submit(cmd, cb);
    } else {
        return false;
    }
    true
}

/// Whether a connection's requests should not be read for now.
fn throttled(c: &NetConn, sh: &Shared, ctx: &HookCtx<'_>) -> bool {
    held(c, sh) || ctx.forward_backlog() > MAX_FORWARD_BACKLOG
}

/// The part of [`throttled`] that only this connection's own progress ends (its replies
/// arriving, its output draining), so its receive need not be armed meanwhile. The
/// shard-wide forward backlog clears at the end of a turn without any event on the
/// connection: a connection held back for it alone is parked and looked at again.
fn held(c: &NetConn, sh: &Shared) -> bool {
    c.migrate.is_some() || c.outstanding >= sh.cfg.max_inflight || c.backlog() > MAX_OUT_BACKLOG
}

impl ShardHook for ShardNet {
    fn start(&mut self, doorbell: Arc<Doorbell>) {
        // Called on the shard's thread, after it is pinned (if it is).
        if let Some(cpu) = pinned_cpu() {
            self.inbox.cpu.store(cpu, SeqCst);
        }
        let _ = self.inbox.doorbell.set(doorbell.clone());
        self.doorbell = Some(doorbell);
    }

    fn pending(&self) -> bool {
        // Parked connections are looked at again once the forward backlog has drained,
        // which may happen after the turn that parked them.
        !self.replies_rx.is_empty()
            || !self.rx_conns.is_empty()
            || !self.parked.is_empty()
            || LOCAL_REPLIES.with(|l| !l.borrow().is_empty())
    }

    fn turn(&mut self, ctx: &mut HookCtx<'_>) -> bool {
        let Some(sh) = self.sh.get().cloned() else {
            // No server yet: no connection can exist.
            return false;
        };
        let sh = &*sh;
        self.now = Instant::now();
        if !ctx.sockets() && !self.warned_no_sockets {
            self.warned_no_sockets = true;
            tracing::error!("shard {}: its ring cannot carry sockets; it serves no connections", ctx.shard_id());
        }
        let mut did = false;
        while let Ok(inc) = self.rx_conns.try_recv() {
            self.add_conn(inc);
            did = true;
        }
        let mut done = std::mem::take(&mut self.done);
        ctx.take_sock_completions(&mut done);
        did |= !done.is_empty();
        for d in done.drain(..) {
            let slot = (d.token & 0xffff_ffff) as u32;
            match d.token & !0xffff_ffff {
                TOKEN_RECV => self.on_recv(sh, slot, d.result, d.op, ctx),
                TOKEN_SEND => self.on_send(sh, slot, d.result, d.op, ctx),
                TOKEN_ACCEPT => {
                    self.on_accept(sh, d.result);
                    while let Ok(inc) = self.rx_conns.try_recv() {
                        self.add_conn(inc);
                    }
                }
                other => unreachable!("unknown socket token kind {other:#x}"),
            }
        }
        self.done = done;
        // The requests just taken run now, so that their answers are sent in this turn.
        ctx.run_submitted();
        // Replies of the commands this shard ran for its own connections, then those other
        // shards (or namespaces) sent back.
        LOCAL_REPLIES.with(|l| std::mem::swap(&mut *l.borrow_mut(), &mut self.local_replies));
        let mut local = std::mem::take(&mut self.local_replies);
        did |= !local.is_empty();
        for r in local.drain(..) {
            self.take_reply(r);
        }
        self.local_replies = local;
        while let Ok(r) = self.replies_rx.try_recv() {
            did = true;
            self.take_reply(r);
        }
        if !self.parked.is_empty() && ctx.forward_backlog() <= MAX_FORWARD_BACKLOG {
            self.dirty.append(&mut self.parked);
        }
        // Before the flushes, so that a move decided now starts in this turn.
        self.steer(sh, self.now);
        let mut dirty = std::mem::take(&mut self.dirty);
        dirty.sort_unstable();
        dirty.dedup();
        for slot in dirty.drain(..) {
            self.flush(sh, slot, ctx);
        }
        if self.dirty.is_empty() {
            self.dirty = dirty;
        } else {
            // Flushing submitted held-back requests: come round again for their replies.
            did = true;
        }
        self.arm_accept(sh, ctx);
        self.timers(sh);
        did
    }
}

/// The one CPU the calling thread may run on, if it is pinned to one.
fn pinned_cpu() -> Option<i64> {
    // SAFETY: cpu_set_t is plain bytes (all zero is the empty set); sched_getaffinity
    // writes at most the size it is given into it.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        set
    };
    // SAFETY: CPU_COUNT and CPU_ISSET only read the set filled in above.
    if unsafe { libc::CPU_COUNT(&set) } != 1 {
        return None;
    }
    // SAFETY: as above.
    (0..libc::CPU_SETSIZE as usize).find(|&c| unsafe { libc::CPU_ISSET(c, &set) }).map(|c| c as i64)
}

/// The CPU that last received packets for `sock` (SO_INCOMING_CPU): for a client on this
/// machine the CPU its thread ran on when it sent; for a remote one the CPU that handled
/// the network card's interrupt.
fn incoming_cpu(sock: &TcpStream) -> Option<i64> {
    let mut cpu: libc::c_int = -1;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cpu`, an int that lives across
    // the call, on a descriptor the caller owns.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_INCOMING_CPU,
            (&mut cpu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (rc == 0 && cpu >= 0).then_some(cpu as i64)
}

/// A frame holding only a LAST message with `rc` (the whole answer to a failed batch, or
/// the end of a good one).
fn last_frame(rc: ResultCode) -> Vec<u8> {
    let mut out = Vec::with_capacity(PROTO_HEADER_BYTES + 22);
    let start = begin_frame(&mut out, MSG_TYPE_AS_MSG);
    write_last_msg(&mut out, rc.code());
    end_frame(&mut out, start);
    out
}

/// Check a batch request and set up its execution, or say what is wrong with it.
fn start_batch(sh: &Shared, m: &Msg<'_>, seq: u64) -> Result<BatchJob, ResultCode> {
    if m.fields.iter().any(|f| field_unsupported(f.ftype) || f.ftype == FIELD_BATCH_WITH_SET) {
        return Err(ResultCode::UnsupportedFeature);
    }
    let data = m.field(FIELD_BATCH_INDEX).ok_or(ResultCode::Parameter)?;
    let cursor = match BatchRows::validate(data).and_then(|_| BatchRows::new(data)) {
        Ok(rows) => rows.cursor(),
        Err(e) => {
            NetStats::bump(&sh.stats.frames_malformed);
            tracing::debug!("malformed batch: {e}");
            return Err(ResultCode::Parameter);
        }
    };
    Ok(BatchJob { body: data.to_vec(), cursor, seq, outstanding: 0, all_submitted: false, rows: Vec::new() })
}
