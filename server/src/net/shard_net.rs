//! The front-end inside the shards' loops (`front-end = "shards"`, the default).
//!
//! The acceptor thread hands each new connection to one shard's [`ShardNet`] in turn. A
//! `ShardNet` is a [`ShardHook`]: it runs on its shard's thread, once per loop turn, with an
//! epoll set of its connections (and the shard's doorbell) that the shard's io_uring watches
//! while the shard sleeps. Sockets are non-blocking; each turn reads what has arrived,
//! decodes every complete frame, and submits single-record commands through the shard:
//! commands for the shard's own partitions run at once on this thread, the others are
//! handed to their shard in one batch per destination per turn. Replies come back over a
//! channel (with the doorbell rung when they come from another shard) and are written in
//! request order; at most `max-inflight` commands per connection execute at once.
//!
//! Batch requests and scans run here too: a batch's rows are submitted like single
//! commands, at most `BATCH_WINDOW` at once per batch; a scan asks the owning shards for one
//! page of one partition at a time. Finished rows and records are framed and written as they
//! come (a response is streamed while it is the oldest one pending).
//!
//! Info requests (some wait on the whole engine, which a shard thread must never do) and
//! scans of another namespace move their connection, with its unread bytes, to a thread of
//! its own running the blocking front-end (`conn.rs`) once its in-flight replies are written.
//! (The clients send info on their own tend connections; data connections stay on the
//! shards.)

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver, Sender};
use ferrospike_engine::hook::{HookCtx, ShardHook};
use ferrospike_engine::io::Doorbell;
use ferrospike_engine::{Command, Digest, Reply, ResultCode};

use super::conn::{
    self, log_close, next_frame, read_window, Close, BATCH_WINDOW, KEEP_BUF_BYTES, SCAN_PAGE, WRITE_TIMEOUT,
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

/// epoll token of the doorbell; connection tokens are slab indices.
const DOORBELL_TOKEN: u64 = u64::MAX;
/// Events taken per epoll_wait.
const EVENTS: usize = 128;
/// Reads per connection per turn, so one busy connection cannot starve the others.
const READS_PER_TURN: usize = 4;
/// Unsent response bytes beyond which a connection's requests are no longer read.
const MAX_OUT_BACKLOG: usize = 4 << 20;
/// Commands waiting for another shard's channel beyond which no new requests are read.
const MAX_FORWARD_BACKLOG: usize = 4096;
/// The longest a turn goes without looking into the epoll set when the ring reports nothing.
const EPOLL_SAFETY_NET: Duration = Duration::from_millis(5);
/// How often deadlines, idle and stalled connections are checked.
const TIMER_EVERY: Duration = Duration::from_millis(50);

/// Where the acceptor drops connections for one shard.
pub struct Inbox {
    tx: Sender<(TcpStream, SocketAddr)>,
    doorbell: OnceLock<Arc<Doorbell>>,
}

impl Inbox {
    /// Hand a connection to the shard; gives it back when the shard has gone away.
    pub fn deliver(&self, sock: TcpStream, peer: SocketAddr) -> Result<(), TcpStream> {
        self.tx.send((sock, peer)).map_err(|e| e.into_inner().0)?;
        if let Some(d) = self.doorbell.get() {
            d.ring_if_sleeping();
        }
        Ok(())
    }
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
    out: Vec<u8>,
    out_pos: usize,
    last_write_progress: Instant,
    /// epoll events currently registered.
    interest: u32,
    /// The next frame needs the blocking front-end: hand the connection over once idle.
    migrate: bool,
    /// The client has shut its side down: answer what it sent, then close.
    eof: bool,
    /// The batch request in progress (one at a time per connection).
    batch: Option<BatchJob>,
    /// The scan in progress (one at a time per connection).
    scan: Option<ScanJob>,
}

/// One shard's front-end.
pub struct ShardNet {
    epoll: OwnedFd,
    /// The server, once it exists (shards start before it does; no connection arrives
    /// before it is set).
    sh: Arc<OnceLock<Arc<Shared>>>,
    /// The namespace whose engine runs this shard.
    namespace: String,
    inbox: Arc<Inbox>,
    rx_conns: Receiver<(TcpStream, SocketAddr)>,
    replies_tx: Sender<NetReply>,
    replies_rx: Receiver<NetReply>,
    doorbell: Option<Arc<Doorbell>>,
    conns: Vec<Option<NetConn>>,
    free: Vec<u32>,
    next_id: u64,
    events: Vec<libc::epoll_event>,
    /// When the epoll set was last looked into.
    last_epoll: Instant,
    last_timer: Instant,
    /// Connections that may have replies or bytes to write.
    dirty: Vec<u32>,
}

fn epoll_ctl(ep: RawFd, op: libc::c_int, fd: RawFd, events: u32, token: u64) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a live epoll_event; epoll_ctl only reads it (and ignores it for DEL).
    if unsafe { libc::epoll_ctl(ep, op, fd, &mut ev) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl ShardNet {
    /// A front-end for one shard of `namespace`'s engine, and the inbox the acceptor uses.
    pub fn new(sh: Arc<OnceLock<Arc<Shared>>>, namespace: &str) -> std::io::Result<(ShardNet, Arc<Inbox>)> {
        // SAFETY: epoll_create1 has no memory-safety preconditions; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nothing else owns.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        let (tx, rx_conns) = unbounded();
        let inbox = Arc::new(Inbox { tx, doorbell: OnceLock::new() });
        let (replies_tx, replies_rx) = unbounded();
        let net = ShardNet {
            epoll,
            sh,
            namespace: namespace.to_string(),
            inbox: inbox.clone(),
            rx_conns,
            replies_tx,
            replies_rx,
            doorbell: None,
            conns: Vec::new(),
            free: Vec::new(),
            next_id: 1,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS],
            last_epoll: Instant::now(),
            last_timer: Instant::now(),
            dirty: Vec::new(),
        };
        Ok((net, inbox))
    }

    fn add_conn(&mut self, sh: &Shared, sock: TcpStream, peer: SocketAddr) {
        if sock.set_nonblocking(true).is_err() {
            sh.stats.connections_current.fetch_sub(1, SeqCst);
            return;
        }
        let _ = sock.set_nodelay(true);
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                (self.conns.len() - 1) as u32
            }
        };
        let interest = libc::EPOLLIN as u32;
        if let Err(e) = epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, sock.as_raw_fd(), interest, slot as u64)
        {
            tracing::warn!("{peer}: cannot watch the connection: {e}");
            self.free.push(slot);
            sh.stats.connections_current.fetch_sub(1, SeqCst);
            return;
        }
        let now = Instant::now();
        let id = self.next_id;
        self.next_id += 1;
        self.conns[slot as usize] = Some(NetConn {
            sock,
            peer,
            id,
            inbuf: Vec::new(),
            first_byte: None,
            last_activity: now,
            slots: VecDeque::new(),
            base_seq: 0,
            outstanding: 0,
            out: Vec::new(),
            out_pos: 0,
            last_write_progress: now,
            interest,
            migrate: false,
            eof: false,
            batch: None,
            scan: None,
        });
    }

    fn close(&mut self, sh: &Shared, slot: u32, why: Close) {
        if let Some(c) = self.conns[slot as usize].take() {
            // Closing the socket removes it from the epoll set.
            log_close(c.peer, why, sh);
            sh.stats.connections_current.fetch_sub(1, SeqCst);
            self.free.push(slot);
        }
    }

    /// Read what has arrived on a connection and submit its complete requests.
    fn read_conn(&mut self, sh: &Shared, slot: u32, ctx: &mut HookCtx<'_>) {
        for _ in 0..READS_PER_TURN {
            let Some(c) = self.conns[slot as usize].as_mut() else { return };
            if c.eof || throttled(c, sh, ctx) {
                break;
            }
            let have = c.inbuf.len();
            let want = read_window(&c.inbuf);
            c.inbuf.resize(have + want, 0);
            match c.sock.read(&mut c.inbuf[have..]) {
                Ok(0) => {
                    // A half-closed client still gets the answers to what it sent; `flush`
                    // closes the connection once they are written.
                    c.inbuf.truncate(have);
                    c.eof = true;
                    break;
                }
                Ok(n) => {
                    c.inbuf.truncate(have + n);
                    let now = Instant::now();
                    c.last_activity = now;
                    if have == 0 {
                        c.first_byte = Some(now);
                    }
                    if let Err(why) = self.process(sh, slot, ctx) {
                        self.close(sh, slot, why);
                        return;
                    }
                    if n < want {
                        break;
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    c.inbuf.truncate(have);
                    break;
                }
                Err(e) => {
                    c.inbuf.truncate(have);
                    self.close(sh, slot, Close::Io(e));
                    return;
                }
            }
        }
        self.dirty.push(slot);
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
        while !c.migrate && c.outstanding < max_inflight {
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
                                c.migrate = true;
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
                    c.migrate = true;
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
            c.first_byte = (!c.inbuf.is_empty()).then(Instant::now);
            if c.inbuf.is_empty() && c.inbuf.capacity() > KEEP_BUF_BYTES {
                c.inbuf = Vec::new();
            }
        }
        result
    }

    /// Run more rows of the connection's batch, and frame the rows that have finished.
    fn pump_batch(&mut self, sh: &Shared, slot: u32, ctx: &mut HookCtx<'_>) {
        let Some(c) = self.conns[slot as usize].as_mut().filter(|c| c.batch.is_some()) else { return };
        let backlog = c.out.len() - c.out_pos + c.slots.iter().map(|s| s.bytes.len()).sum::<usize>();
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
        let backlog = c.out.len() - c.out_pos + c.slots.iter().map(|s| s.bytes.len()).sum::<usize>();
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

    /// Write a connection's finished responses, in order, as far as the socket takes them.
    fn flush(&mut self, sh: &Shared, slot: u32, ctx: &mut HookCtx<'_>) {
        self.pump_batch(sh, slot, ctx);
        self.pump_scan(slot, ctx);
        let Some(c) = self.conns[slot as usize].as_mut() else { return };
        while let Some(front) = c.slots.front_mut() {
            if c.out_pos == c.out.len() {
                c.out.clear();
                c.out_pos = 0;
            }
            c.out.append(&mut front.bytes);
            if !front.done {
                break;
            }
            c.slots.pop_front();
            c.base_seq += 1;
        }
        while c.out_pos < c.out.len() {
            match c.sock.write(&c.out[c.out_pos..]) {
                Ok(0) => {
                    self.close(sh, slot, Close::Io(ErrorKind::WriteZero.into()));
                    return;
                }
                Ok(n) => {
                    c.out_pos += n;
                    c.last_write_progress = Instant::now();
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.close(sh, slot, Close::Io(e));
                    return;
                }
            }
        }
        if c.out_pos == c.out.len() {
            c.out.clear();
            c.out_pos = 0;
            if c.out.capacity() > KEEP_BUF_BYTES {
                c.out = Vec::new();
            }
        }
        // Requests already buffered but held back by the in-flight limit.
        if !c.migrate && !throttled(c, sh, ctx) && c.outstanding < sh.cfg.max_inflight && !c.inbuf.is_empty() {
            let before = c.outstanding + c.slots.len();
            if let Err(why) = self.process(sh, slot, ctx) {
                self.close(sh, slot, why);
                return;
            }
            let Some(c) = self.conns[slot as usize].as_ref() else { return };
            if c.outstanding + c.slots.len() != before {
                self.dirty.push(slot);
            }
        }
        let Some(c) = self.conns[slot as usize].as_mut() else { return };
        let answered = c.outstanding == 0 && c.slots.is_empty() && c.out.is_empty();
        if c.migrate && answered {
            self.hand_over(sh, slot);
            return;
        }
        if c.eof && answered && next_frame(&c.inbuf, sh.cfg.max_msg_bytes).ok().flatten().is_none() {
            // Everything the client sent in full is answered; a partial frame is dropped.
            self.close(sh, slot, Close::Eof);
            return;
        }
        let mut want = 0u32;
        if !c.eof && !held(c, sh) {
            want |= libc::EPOLLIN as u32;
        }
        if c.out_pos < c.out.len() {
            want |= libc::EPOLLOUT as u32;
        }
        if want != c.interest {
            match epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, c.sock.as_raw_fd(), want, slot as u64) {
                Ok(()) => c.interest = want,
                Err(e) => self.close(sh, slot, Close::Io(e)),
            }
        }
    }

    /// Give a connection to a thread of its own running the blocking front-end.
    fn hand_over(&mut self, sh: &Shared, slot: u32) {
        let Some(c) = self.conns[slot as usize].take() else { return };
        self.free.push(slot);
        let _ = epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, c.sock.as_raw_fd(), 0, 0);
        let Some(shared) = self.sh.get().cloned() else { return };
        if c.sock.set_nonblocking(false).is_err() {
            sh.stats.connections_current.fetch_sub(1, SeqCst);
            return;
        }
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
            let Some(c) = self.conns[slot as usize].as_ref() else { continue };
            let quiet = c.outstanding == 0 && c.slots.is_empty() && c.out.is_empty();
            let why = if c.out_pos < c.out.len() && now.duration_since(c.last_write_progress) > WRITE_TIMEOUT {
                Some(Close::WriteStalled)
            } else if !c.migrate
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
/// [`NetReply`]. False when the namespace does not exist (nothing was run).
fn dispatch(
    sh: &Shared,
    ctx: &mut HookCtx<'_>,
    mine: &str,
    namespace: &str,
    cmd: Command,
    back: Back<'_>,
    encode: impl FnOnce(&Reply) -> Vec<u8> + Send + 'static,
) -> bool {
    let (tx, bell) = (back.tx.clone(), back.bell.clone());
    let Back { slot, id, seq, row, .. } = back;
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
/// arriving, its output draining), so it may switch off the connection's EPOLLIN. The
/// shard-wide forward backlog clears at the end of the turn without any event on the
/// connection: a connection parked for it alone would never be woken again.
fn held(c: &NetConn, sh: &Shared) -> bool {
    c.migrate || c.outstanding >= sh.cfg.max_inflight || c.out.len() - c.out_pos > MAX_OUT_BACKLOG
}

impl ShardHook for ShardNet {
    fn wake_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    fn start(&mut self, doorbell: Arc<Doorbell>) {
        if let Err(e) = epoll_ctl(
            self.epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            doorbell.raw_fd(),
            libc::EPOLLIN as u32,
            DOORBELL_TOKEN,
        ) {
            tracing::error!("shard front-end: cannot watch the doorbell ({e}); replies rely on timeouts");
        }
        let _ = self.inbox.doorbell.set(doorbell.clone());
        self.doorbell = Some(doorbell);
    }

    fn pending(&self) -> bool {
        !self.replies_rx.is_empty() || !self.rx_conns.is_empty()
    }

    fn turn(&mut self, ctx: &mut HookCtx<'_>) -> bool {
        let sh = self.sh.get().cloned();
        let mut did = false;
        if let Some(sh) = sh.as_deref() {
            while let Ok((sock, peer)) = self.rx_conns.try_recv() {
                self.add_conn(sh, sock, peer);
                did = true;
            }
        }
        // The ring polls the epoll set between turns: when it did not report it readable,
        // nothing in it was ready, and an epoll_wait would only cost a system call. (Looked
        // into anyway now and then, should a wake-up ever go missing.)
        let n = if ctx.woken() || self.last_epoll.elapsed() >= EPOLL_SAFETY_NET {
            self.last_epoll = Instant::now();
            // SAFETY: `events` is a live buffer of EVENTS epoll_event entries; the kernel
            // writes at most that many.
            unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), self.events.as_mut_ptr(), EVENTS as libc::c_int, 0) }
        } else {
            0
        };
        let Some(sh) = sh.as_deref() else {
            // No server yet: only the doorbell can be in the set; reset it.
            if n > 0 {
                if let Some(d) = &self.doorbell {
                    drain_eventfd(d.raw_fd());
                }
            }
            return false;
        };
        for i in 0..n.max(0) as usize {
            let ev = self.events[i];
            let (token, flags) = (ev.u64, ev.events);
            if token == DOORBELL_TOKEN {
                if let Some(d) = &self.doorbell {
                    drain_eventfd(d.raw_fd());
                }
                continue;
            }
            did = true;
            let slot = token as u32;
            if flags & (libc::EPOLLIN | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                self.read_conn(sh, slot, ctx);
            }
            if flags & libc::EPOLLOUT as u32 != 0 {
                self.dirty.push(slot);
            }
        }
        while let Ok(r) = self.replies_rx.try_recv() {
            did = true;
            let Some(c) = self.conns.get_mut(r.slot as usize).and_then(Option::as_mut).filter(|c| c.id == r.id) else {
                continue;
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
        self.timers(sh);
        did
    }
}

/// Reset an eventfd's counter (non-blocking).
fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64; the eventfd is non-blocking.
    unsafe {
        libc::read(fd, (&mut v as *mut u64).cast(), 8);
    }
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
