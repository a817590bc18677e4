//! One client connection: framing, limits, dispatch, ordered responses.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use ferrospike_engine::{Command, Engine, ResultCode};

use super::{NetStats, Shared};
use crate::proto::batch::BatchRows;
use crate::proto::codes::*;
use crate::proto::request::{self, classify, Flags, Kind};
use crate::proto::response::{
    begin_frame, encode_error, encode_reply, end_frame, write_last_msg, write_reply_msg, RespHeader,
};
use crate::proto::scan::{parse_scan, write_scan_record};
use crate::proto::{info, Msg, MsgHeader, ProtoHeader, ProtocolError, Reader, PROTO_HEADER_BYTES};

/// How often a blocked read wakes to check deadlines and shutdown.
const TICK: Duration = Duration::from_millis(100);
/// A client that does not take its responses within this long is dropped.
pub(super) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for the engine to answer one command before the connection gives up.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes read per `read` call; the buffer never grows by more than this ahead of data.
pub(super) const READ_CHUNK: usize = 64 << 10;
/// Smallest read, so pipelined small requests arrive in few calls.
pub(super) const MIN_READ: usize = 4096;
/// Info requests are a few commands; anything larger is not a client.
const MAX_INFO_BODY: u64 = 64 << 10;
/// Batch and scan responses are sent in frames of about this size.
const STREAM_FRAME_BYTES: usize = 256 << 10;
/// Batch rows executing at once.
pub(super) const BATCH_WINDOW: usize = 128;
/// Records asked of the engine per scan page.
pub(super) const SCAN_PAGE: usize = 256;
/// A read buffer above this capacity is shrunk when it empties.
pub(super) const KEEP_BUF_BYTES: usize = 1 << 20;

/// Why a connection ends.
#[derive(Debug)]
pub(super) enum Close {
    Eof,
    Io(std::io::Error),
    Protocol(ProtocolError),
    Unsupported(&'static str),
    Deadline,
    Idle,
    Stopping,
    EngineTimeout,
    WriteStalled,
}

/// Serve a connection on this thread until it ends. `initial` holds bytes already read
/// from it (a connection handed over by a shard's front-end), processed first.
pub fn serve(sock: TcpStream, peer: SocketAddr, sh: &Shared, initial: Vec<u8>) {
    let _ = sock.set_nodelay(true);
    if sock.set_read_timeout(Some(TICK)).is_err() || sock.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let (tx, rx) = bounded(sh.cfg.max_inflight);
    let now = Instant::now();
    let mut c = Conn {
        sock,
        sh,
        first_byte: (!initial.is_empty()).then_some(now),
        buf: initial,
        last_activity: now,
        pending: Pending { slots: Vec::new(), base_seq: 0, outstanding: 0, tx, rx, out: Vec::new() },
    };
    let why = c.run();
    log_close(peer, why, sh);
}

/// Count and log why a connection ended.
pub(super) fn log_close(peer: SocketAddr, why: Close, sh: &Shared) {
    match why {
        Close::Eof | Close::Stopping => tracing::trace!("{peer}: closed ({why:?})"),
        Close::Io(e) if matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe) => {}
        Close::Protocol(e) => {
            match e {
                ProtocolError::TooLarge { .. } => NetStats::bump(&sh.stats.frames_too_large),
                _ => NetStats::bump(&sh.stats.frames_malformed),
            }
            tracing::warn!("{peer}: closing: {e}");
        }
        Close::Deadline => {
            NetStats::bump(&sh.stats.request_deadline_expired);
            tracing::warn!("{peer}: closing: request not complete within {} ms", sh.cfg.request_deadline_ms);
        }
        Close::Idle => NetStats::bump(&sh.stats.idle_timeouts),
        Close::Unsupported(what) => {
            NetStats::bump(&sh.stats.frames_malformed);
            tracing::warn!("{peer}: closing: unsupported {what}");
        }
        other => tracing::info!("{peer}: closing: {other:?}"),
    }
}

/// Responses of one turn, in request order.
struct Pending {
    slots: Vec<Option<Vec<u8>>>,
    base_seq: u64,
    outstanding: usize,
    tx: Sender<(u64, Vec<u8>)>,
    rx: Receiver<(u64, Vec<u8>)>,
    out: Vec<u8>,
}

impl Pending {
    fn len(&self) -> usize {
        self.slots.len()
    }

    fn ready(&mut self, bytes: Vec<u8>) {
        self.slots.push(Some(bytes));
    }

    /// Submit a command; the shard encodes its response and hands it back by sequence.
    fn submit(&mut self, engine: &Engine, cmd: Command, op_codes: Option<Vec<u8>>) {
        let seq = self.base_seq + self.slots.len() as u64;
        self.slots.push(None);
        self.outstanding += 1;
        let tx = self.tx.clone();
        engine.submit(cmd, move |reply| {
            let bytes = encode_reply(&reply, op_codes.as_deref());
            // Never blocks: at most `max-inflight` replies are outstanding and the channel
            // holds that many. A closed connection makes the send fail, which is fine.
            let _ = tx.try_send((seq, bytes));
        });
    }

    /// Wait for every outstanding response and write them all, in order.
    fn flush(&mut self, sock: &mut TcpStream) -> Result<(), Close> {
        while self.outstanding > 0 {
            let (seq, bytes) = self.rx.recv_timeout(ENGINE_TIMEOUT).map_err(|_| Close::EngineTimeout)?;
            let i = (seq - self.base_seq) as usize;
            debug_assert!(self.slots[i].is_none(), "one reply per request");
            self.slots[i] = Some(bytes);
            self.outstanding -= 1;
        }
        if self.slots.is_empty() {
            return Ok(());
        }
        self.base_seq += self.slots.len() as u64;
        self.out.clear();
        for s in self.slots.drain(..) {
            self.out.extend_from_slice(&s.expect("every slot is filled"));
        }
        sock.write_all(&self.out).map_err(Close::Io)?;
        if self.out.capacity() > KEEP_BUF_BYTES {
            self.out = Vec::new();
        }
        Ok(())
    }
}

struct Conn<'a> {
    sock: TcpStream,
    sh: &'a Shared,
    buf: Vec<u8>,
    /// When the first byte of the incomplete request in `buf` arrived.
    first_byte: Option<Instant>,
    last_activity: Instant,
    pending: Pending,
}

/// How many bytes to ask the socket for next, given the unprocessed bytes in `buf`: the rest
/// of the frame that has begun (its header was checked against max-msg-size when it was
/// first parsed), within [MIN_READ, READ_CHUNK], so a buffer only grows as bytes arrive.
pub(super) fn read_window(buf: &[u8]) -> usize {
    let have = buf.len();
    let want = match buf.first_chunk::<PROTO_HEADER_BYTES>() {
        Some(h) => (PROTO_HEADER_BYTES as u64 + (u64::from_be_bytes(*h) & ((1 << 48) - 1)))
            .saturating_sub(have as u64)
            .min(READ_CHUNK as u64) as usize,
        None => PROTO_HEADER_BYTES - have,
    };
    want.clamp(MIN_READ, READ_CHUNK)
}

/// A complete frame at the start of `buf`: its header and total length.
pub(super) fn next_frame(buf: &[u8], max_body: u64) -> Result<Option<(ProtoHeader, usize)>, ProtocolError> {
    let Some(h) = buf.first_chunk::<PROTO_HEADER_BYTES>() else {
        return Ok(None);
    };
    let h = ProtoHeader::parse(h, max_body)?;
    let total = PROTO_HEADER_BYTES + h.size as usize;
    Ok((buf.len() >= total).then_some((h, total)))
}

impl Conn<'_> {
    fn run(&mut self) -> Close {
        loop {
            if let Err(c) = self.process() {
                return c;
            }
            if self.sh.stopping.load(SeqCst) && self.buf.is_empty() {
                return Close::Stopping;
            }
            if let Err(c) = self.read_more() {
                return c;
            }
        }
    }

    /// Read what has arrived (waiting at most one tick), then check the deadlines.
    fn read_more(&mut self) -> Result<(), Close> {
        let have = self.buf.len();
        let want = read_window(&self.buf);
        self.buf.resize(have + want, 0);
        let r = self.sock.read(&mut self.buf[have..]);
        let now = Instant::now();
        match r {
            Ok(0) => {
                self.buf.truncate(have);
                return Err(Close::Eof);
            }
            Ok(n) => {
                self.buf.truncate(have + n);
                self.last_activity = now;
                if have == 0 {
                    self.first_byte = Some(now);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                self.buf.truncate(have);
            }
            Err(e) => return Err(Close::Io(e)),
        }
        let cfg = &self.sh.cfg;
        match self.first_byte {
            Some(t) if !self.buf.is_empty() => {
                if now.duration_since(t) > Duration::from_millis(cfg.request_deadline_ms) {
                    return Err(Close::Deadline);
                }
            }
            _ => {
                if self.sh.stopping.load(SeqCst) {
                    return Err(Close::Stopping);
                }
                if cfg.idle_timeout_secs > 0
                    && now.duration_since(self.last_activity) > Duration::from_secs(cfg.idle_timeout_secs)
                {
                    return Err(Close::Idle);
                }
            }
        }
        Ok(())
    }

    /// Handle every complete frame in the buffer and send their responses in order.
    fn process(&mut self) -> Result<(), Close> {
        let max_body = self.sh.cfg.max_msg_bytes;
        let max_inflight = self.sh.cfg.max_inflight;
        let mut pos = 0;
        loop {
            let Conn { buf, sh, pending, sock, .. } = self;
            let Some((h, total)) = next_frame(&buf[pos..], max_body).map_err(Close::Protocol)? else {
                break;
            };
            let body = &buf[pos + PROTO_HEADER_BYTES..pos + total];
            pos += total;
            handle_frame(sh, h, body, pending, sock)?;
            if pending.outstanding >= max_inflight || pending.len() >= 4 * max_inflight {
                pending.flush(sock)?;
            }
        }
        self.pending.flush(&mut self.sock)?;
        if pos > 0 {
            self.buf.drain(..pos);
            self.first_byte = (!self.buf.is_empty()).then(Instant::now);
            if self.buf.is_empty() && self.buf.capacity() > KEEP_BUF_BYTES {
                self.buf = Vec::new();
            }
        }
        Ok(())
    }
}

fn handle_frame(
    sh: &Shared,
    h: ProtoHeader,
    body: &[u8],
    pending: &mut Pending,
    sock: &mut TcpStream,
) -> Result<(), Close> {
    match h.msg_type {
        MSG_TYPE_INFO => {
            NetStats::bump(&sh.stats.info_requests);
            if h.size > MAX_INFO_BODY {
                return Err(Close::Protocol(ProtocolError::TooLarge { size: h.size, max: MAX_INFO_BODY }));
            }
            let v = info::handle(body, sh);
            let mut f = Vec::with_capacity(PROTO_HEADER_BYTES + v.len());
            f.extend_from_slice(&ProtoHeader::encode(MSG_TYPE_INFO, v.len() as u64));
            f.extend_from_slice(&v);
            pending.ready(f);
            Ok(())
        }
        MSG_TYPE_AS_MSG => as_msg(sh, body, pending, sock),
        MSG_TYPE_COMPRESSED => {
            NetStats::bump(&sh.stats.error_replies);
            pending.ready(encode_error(ResultCode::UnsupportedFeature.code()));
            Ok(())
        }
        _ => Err(Close::Unsupported("security/admin messages (no authentication is configured)")),
    }
}

fn error_reply(sh: &Shared, pending: &mut Pending, rc: ResultCode) {
    NetStats::bump(&sh.stats.error_replies);
    pending.ready(encode_error(rc.code()));
}

fn as_msg(sh: &Shared, body: &[u8], pending: &mut Pending, sock: &mut TcpStream) -> Result<(), Close> {
    // A body whose header does not parse is not an AS_MSG at all: close.
    MsgHeader::parse(&mut Reader::new(body)).map_err(Close::Protocol)?;
    let m = match Msg::parse(body) {
        Ok(m) => m,
        Err(e) => {
            NetStats::bump(&sh.stats.frames_malformed);
            tracing::debug!("malformed AS_MSG: {e}");
            error_reply(sh, pending, ResultCode::Parameter);
            return Ok(());
        }
    };
    match classify(&m) {
        Kind::Single => {
            NetStats::bump(&sh.stats.single_requests);
            match request::single(&Flags::from(&m.header), &m.fields, &m.ops, None) {
                Ok(req) => match sh.engine(req.namespace) {
                    Some(e) => pending.submit(e, req.cmd, req.op_codes),
                    None => error_reply(sh, pending, ResultCode::Namespace),
                },
                Err(rc) => error_reply(sh, pending, rc),
            }
            Ok(())
        }
        Kind::Batch => {
            pending.flush(sock)?;
            NetStats::bump(&sh.stats.batch_requests);
            batch(sh, &m, sock)
        }
        Kind::Scan => {
            pending.flush(sock)?;
            NetStats::bump(&sh.stats.scan_requests);
            scan(sh, &m, sock)
        }
    }
}

/// Write a frame holding only a LAST message with `rc`.
fn send_last(sock: &mut TcpStream, rc: u8) -> Result<(), Close> {
    let mut out = Vec::with_capacity(30);
    let start = begin_frame(&mut out, MSG_TYPE_AS_MSG);
    write_last_msg(&mut out, rc);
    end_frame(&mut out, start);
    sock.write_all(&out).map_err(Close::Io)
}

/// Streams record messages in frames of about [`STREAM_FRAME_BYTES`].
struct Stream {
    out: Vec<u8>,
    start: usize,
}

impl Stream {
    fn new() -> Stream {
        let mut out = Vec::new();
        let start = begin_frame(&mut out, MSG_TYPE_AS_MSG);
        Stream { out, start }
    }

    fn maybe_send(&mut self, sock: &mut TcpStream) -> Result<(), Close> {
        if self.out.len() >= STREAM_FRAME_BYTES {
            self.send(sock)?;
        }
        Ok(())
    }

    fn send(&mut self, sock: &mut TcpStream) -> Result<(), Close> {
        if self.out.len() > self.start + PROTO_HEADER_BYTES {
            end_frame(&mut self.out, self.start);
            sock.write_all(&self.out).map_err(Close::Io)?;
        }
        self.out.clear();
        self.start = begin_frame(&mut self.out, MSG_TYPE_AS_MSG);
        Ok(())
    }
}

fn batch(sh: &Shared, m: &Msg<'_>, sock: &mut TcpStream) -> Result<(), Close> {
    if m.fields.iter().any(|f| field_unsupported(f.ftype) || f.ftype == FIELD_BATCH_WITH_SET) {
        return send_last(sock, ResultCode::UnsupportedFeature.code());
    }
    let Some(data) = m.field(FIELD_BATCH_INDEX) else {
        return send_last(sock, ResultCode::Parameter.code());
    };
    if let Err(e) = BatchRows::validate(data) {
        NetStats::bump(&sh.stats.frames_malformed);
        tracing::debug!("malformed batch: {e}");
        return send_last(sock, ResultCode::Parameter.code());
    }
    let (tx, rx) = bounded::<Vec<u8>>(BATCH_WINDOW);
    let mut stream = Stream::new();
    let mut outstanding = 0usize;
    let rows = BatchRows::new(data).map_err(Close::Protocol)?;
    for row in rows {
        let row = row.map_err(Close::Protocol)?;
        let index = row.index;
        let target = row.req.and_then(|r| sh.engine(r.namespace).map(|e| (e, r)).ok_or(ResultCode::Namespace));
        match target {
            Ok((engine, r)) => {
                if outstanding == BATCH_WINDOW {
                    let msg = rx.recv_timeout(ENGINE_TIMEOUT).map_err(|_| Close::EngineTimeout)?;
                    stream.out.extend_from_slice(&msg);
                    outstanding -= 1;
                }
                let tx = tx.clone();
                let codes = r.op_codes;
                engine.submit(r.cmd, move |reply| {
                    let mut b = Vec::with_capacity(64);
                    write_reply_msg(&mut b, &reply, codes.as_deref(), index, 0);
                    // Never blocks: at most BATCH_WINDOW rows are outstanding.
                    let _ = tx.try_send(b);
                });
                outstanding += 1;
            }
            Err(rc) => {
                RespHeader { result_code: rc.code(), txn_ttl: index, ..Default::default() }.write(&mut stream.out);
            }
        }
        stream.maybe_send(sock)?;
    }
    while outstanding > 0 {
        let msg = rx.recv_timeout(ENGINE_TIMEOUT).map_err(|_| Close::EngineTimeout)?;
        stream.out.extend_from_slice(&msg);
        outstanding -= 1;
        stream.maybe_send(sock)?;
    }
    stream.send(sock)?;
    send_last(sock, ResultCode::Ok.code())
}

fn scan(sh: &Shared, m: &Msg<'_>, sock: &mut TcpStream) -> Result<(), Close> {
    let req = match parse_scan(m) {
        Ok(r) => r,
        Err(rc) => return send_last(sock, rc.code()),
    };
    let Some(engine) = sh.engine(req.namespace) else {
        return send_last(sock, ResultCode::Namespace.code());
    };
    let mut left = req.max_records.unwrap_or(u64::MAX);
    let mut stream = Stream::new();
    let mut rc = ResultCode::Ok;
    'partitions: for &(pid, resume) in &req.partitions {
        let mut after = resume;
        loop {
            let page = engine.scan_partition(pid, req.set, after, SCAN_PAGE, !req.no_bins);
            if page.result != ResultCode::Ok {
                rc = page.result;
                break 'partitions;
            }
            for rec in &page.records {
                after = Some(rec.digest);
                write_scan_record(&mut stream.out, req.namespace, rec, req.no_bins, &req.bins);
                left -= 1;
                if left == 0 {
                    break 'partitions;
                }
                stream.maybe_send(sock)?;
            }
            if page.done || page.records.is_empty() {
                break;
            }
        }
    }
    stream.send(sock)?;
    send_last(sock, rc.code())
}
