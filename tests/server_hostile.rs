//! Hostile input: random bytes, a header claiming a 2^47-byte body, bad version and type,
//! malformed bodies, a one-byte-per-second sender, 1000 connections opened and dropped, and
//! random requests behind valid headers (single records, batches, scans, info, compressed).
//! During each, a well-behaved client keeps getting correct answers, and the server's
//! resident memory stays bounded. Also: connections beyond `max-connections` and idle ones
//! are closed, and SIGINT stops the server cleanly.

mod common;
mod server_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrospike_engine::UserKey;
use rand::{Rng, SeedableRng};
use server_support::{Scratch, ServerProc};

fn frame(msg_type: u8, body: &[u8]) -> Vec<u8> {
    let mut f = ((2u64 << 56) | ((msg_type as u64) << 48) | body.len() as u64).to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn field(out: &mut Vec<u8>, t: u8, data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32 + 1).to_be_bytes());
    out.push(t);
    out.extend_from_slice(data);
}

/// A single-record AS_MSG for key `k` in set "h": a put of integer bin "v", or a get.
fn request(k: i64, put: Option<i64>) -> Vec<u8> {
    let digest = UserKey::Int(k).digest("h");
    let (info1, info2, n_ops) = if put.is_some() { (0u8, 1u8, 1u16) } else { (3, 0, 0) };
    let mut b = vec![22, info1, info2, 0, 0, 0];
    b.extend_from_slice(&[0; 8]);
    b.extend_from_slice(&1000u32.to_be_bytes());
    b.extend_from_slice(&3u16.to_be_bytes());
    b.extend_from_slice(&n_ops.to_be_bytes());
    field(&mut b, 0, b"test");
    field(&mut b, 1, b"h");
    field(&mut b, 4, &digest.0);
    if let Some(v) = put {
        b.extend_from_slice(&13u32.to_be_bytes());
        b.extend_from_slice(&[2, 1, 0, 1, b'v']);
        b.extend_from_slice(&v.to_be_bytes());
    }
    frame(3, &b)
}

/// Read one response frame: (result code, first op's integer value if any).
fn response(s: &mut TcpStream) -> std::io::Result<(u8, Option<i64>)> {
    let mut h = [0u8; 8];
    s.read_exact(&mut h)?;
    let n = (u64::from_be_bytes(h) & ((1 << 48) - 1)) as usize;
    assert!(n < 1 << 20, "response of {n} bytes");
    let mut body = vec![0; n];
    s.read_exact(&mut body)?;
    let rc = body[5];
    let n_ops = u16::from_be_bytes([body[20], body[21]]);
    let v = (n_ops > 0 && body.len() >= 22 + 17).then(|| i64::from_be_bytes(body[22 + 9..22 + 17].try_into().unwrap()));
    Ok((rc, v))
}

/// The well-behaved client: puts and gets on one connection, checking every answer.
fn good_client(port: u16, stop: Arc<AtomicBool>, ok: Arc<AtomicU64>) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("good client connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut i = 0i64;
    while !stop.load(SeqCst) {
        let k = i % 500;
        s.write_all(&request(k, Some(i))).expect("good client put");
        assert_eq!(response(&mut s).expect("put answer"), (0, None), "put {i}");
        s.write_all(&request(k, None)).expect("good client get");
        assert_eq!(response(&mut s).expect("get answer"), (0, Some(i)), "get {i}");
        ok.fetch_add(1, SeqCst);
        i += 1;
    }
}

/// A [`good_client`] running on a thread of its own.
struct GoodClient {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl GoodClient {
    /// Start it and give it 300 ms to get going.
    fn start(port: u16) -> GoodClient {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, ok) = (stop.clone(), ok.clone());
            std::thread::spawn(move || good_client(port, stop, ok))
        };
        std::thread::sleep(Duration::from_millis(300));
        GoodClient { stop, ok, thread }
    }

    /// Round trips answered correctly so far.
    fn round_trips(&self) -> u64 {
        self.ok.load(SeqCst)
    }

    /// Whether it stopped on its own (a wrong answer or a lost connection).
    fn failed(&self) -> bool {
        self.thread.is_finished()
    }

    /// Stop it; panics if it saw a wrong answer.
    fn finish(self) -> u64 {
        self.stop.store(true, SeqCst);
        self.thread.join().expect("the good client saw a wrong answer");
        self.ok.load(SeqCst)
    }
}

/// True when the server closes `s` (EOF or reset) within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

fn connect(port: u16) -> TcpStream {
    TcpStream::connect(("127.0.0.1", port)).expect("connect")
}

#[test]
fn hostile_clients_do_not_disturb_good_ones() {
    let dir = Scratch::new("server-hostile");
    let mut srv = ServerProc::start(&dir, "request-deadline-ms = 2000\nmax-msg-size = \"1M\"\nmax-connections = 2000");
    let port = srv.port;
    let good = GoodClient::start(port);
    let rss_start = srv.rss_kib();
    let mut progress = good.round_trips();
    let mut check_progress = |what: &str| {
        std::thread::sleep(Duration::from_millis(100));
        let now = good.round_trips();
        assert!(now > progress, "the good client stalled during {what}");
        assert!(!good.failed(), "the good client failed during {what}");
        progress = now;
    };

    // Random bytes: the server closes each connection (or answers) and keeps serving.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..50 {
        let mut s = connect(port);
        let n = rng.gen_range(1..8192);
        let junk: Vec<u8> = (0..n).map(|_| rng.gen()).collect();
        let _ = s.write_all(&junk);
        let _ = closed_within(&mut s, Duration::from_millis(50));
    }
    check_progress("random bytes");

    // A header claiming a 2^47-byte body: refused before any allocation, connection closed.
    let mut s = connect(port);
    s.write_all(&((2u64 << 56) | (3u64 << 48) | (1u64 << 47)).to_be_bytes()).unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(2)), "2^47-byte header not refused");
    // Above max-msg-size (1M) but plausible: refused too.
    let mut s = connect(port);
    s.write_all(&((2u64 << 56) | (3u64 << 48) | (2 << 20)).to_be_bytes()).unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(2)), "2 MiB message not refused");
    check_progress("huge headers");

    // Bad version and bad type.
    for h in [[1u8, 3, 0, 0, 0, 0, 0, 22], [2, 9, 0, 0, 0, 0, 0, 22], [0xff; 8]] {
        let mut s = connect(port);
        s.write_all(&h).unwrap();
        s.write_all(&[0; 22]).unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(2)), "header {h:?} not refused");
    }
    check_progress("bad version and type");

    // A parseable AS_MSG header with lying field sizes gets PARAMETER and the connection
    // keeps working.
    let mut s = connect(port);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut body = vec![22, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0];
    body.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0]);
    s.write_all(&frame(3, &body)).unwrap();
    assert_eq!(response(&mut s).unwrap().0, 4);
    // more than 32768 ops
    let mut body = vec![22, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x90, 0];
    body.extend_from_slice(&[0; 8]);
    s.write_all(&frame(3, &body)).unwrap();
    assert_eq!(response(&mut s).unwrap().0, 4);
    s.write_all(&request(1, Some(5))).unwrap();
    assert_eq!(response(&mut s).unwrap().0, 0);
    // a CDT op is UNSUPPORTED_FEATURE
    let mut cdt = request(1, Some(5));
    cdt[8 + 22 + 9 + 6 + 25 + 4] = 4;
    s.write_all(&cdt).unwrap();
    assert_eq!(response(&mut s).unwrap().0, 16);
    // a truncated AS_MSG header closes the connection
    s.write_all(&frame(3, &[22, 0, 0])).unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(2)));
    check_progress("malformed bodies");

    // A sender of one byte per second is cut off at the request deadline (2 s).
    let mut s = connect(port);
    let req = request(3, None);
    let t = Instant::now();
    let mut cut = false;
    for b in &req {
        if s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
        if t.elapsed() > Duration::from_secs(6) {
            break;
        }
        check_progress("a slow sender");
    }
    assert!(cut || closed_within(&mut s, Duration::from_secs(1)), "slow sender not cut off");
    assert!(t.elapsed() < Duration::from_secs(7));

    // 1000 connections opened and dropped, 100 at a time.
    for _ in 0..10 {
        let conns: Vec<TcpStream> = (0..100).map(|_| connect(port)).collect();
        drop(conns);
    }
    check_progress("1000 connections");
    // Half-sent requests on 200 connections, then dropped.
    let conns: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = connect(port);
            let _ = s.write_all(&request(9, Some(1))[..20]);
            s
        })
        .collect();
    drop(conns);
    check_progress("half-sent requests");

    std::thread::sleep(Duration::from_millis(500));
    let rss_end = srv.rss_kib();
    let round_trips = good.finish();
    let stats = srv.info("statistics\n");
    assert!(stats.contains("proto_too_large=2"), "{stats}");
    assert!(!stats.contains("proto_malformed=0;"), "{stats}");
    assert!(!stats.contains("proto_request_deadline_expired=0;"), "{stats}");
    eprintln!("good client round trips: {round_trips}; RSS {rss_start} KiB -> {rss_end} KiB");
    assert!(rss_end < rss_start + 64 * 1024, "RSS grew from {rss_start} KiB to {rss_end} KiB");
    assert!(srv.stop().success());
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    pipelined("server-pipeline", "max-inflight = 16", "front-end inside the 2 shard loops", true);
}

#[test]
fn pipelined_requests_are_answered_in_order_by_the_thread_front_end() {
    pipelined(
        "server-pipeline-threads",
        "max-inflight = 16\nfront-end = \"threads\"",
        "one thread per connection",
        false,
    );
}

/// A list-valued entry of the info command `statistics`.
fn stat_list(port: u16, name: &str) -> Vec<String> {
    let stats = info(port, "statistics");
    let prefix = format!("{name}=");
    stats
        .split(';')
        .find_map(|kv| kv.strip_prefix(prefix.as_str()))
        .unwrap_or_else(|| panic!("no {name} in {stats}"))
        .trim_end()
        .split(',')
        .map(str::to_string)
        .collect()
}

/// With connection affinity off, the shards accept on the one listener through their rings
/// and hand connections to the shard with the fewest, so however the kernel picks the
/// accepting shard, and whichever connections close, the counts never differ by more than
/// one; every connection works.
#[test]
fn connections_spread_evenly_over_the_shards() {
    let dir = Scratch::new("server-spread");
    let mut srv = ServerProc::start(&dir, "connection-affinity = false");
    let per_shard = |want_total: usize| -> Vec<usize> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counts: Vec<usize> =
                stat_list(srv.port, "client_connections_per_shard").iter().map(|n| n.parse().unwrap()).collect();
            if counts.iter().sum::<usize>() == want_total {
                return counts;
            }
            assert!(Instant::now() < deadline, "{counts:?} never added up to {want_total}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let mut conns: Vec<TcpStream> = (0..9).map(|_| connect(srv.port)).collect();
    let counts = per_shard(9);
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "9 connections: {counts:?}");
    // Close the first four (whatever shards serve them), open four more.
    conns.drain(..4);
    per_shard(5);
    conns.extend((0..4).map(|_| connect(srv.port)));
    let counts = per_shard(9);
    assert!(counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1, "after churn: {counts:?}");
    for (i, s) in conns.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(&request(i as i64, Some(i as i64))).unwrap();
        assert_eq!(response(s).unwrap(), (0, None), "connection {i}");
    }
    drop(conns);
    per_shard(0);
    assert!(srv.stop().success());
}

/// Pin the calling thread to one CPU.
fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain bytes (all zero is the empty set), CPU_SET writes a bit
    // inside it, and sched_setaffinity reads at most the size it is given.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    assert_eq!(rc, 0, "cannot pin the test thread to CPU {cpu}: {}", std::io::Error::last_os_error());
}

/// Connection affinity: a client whose thread runs on one CPU is served by the shard pinned
/// to that CPU, and when the thread moves to the other CPU its connection follows (without
/// a request lost or answered out of turn). Needs 2 CPUs: the shards are pinned one per CPU.
#[test]
fn connections_follow_their_clients_cpu() {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    assert!(cpus >= 2, "this test needs 2 CPUs to put the two shards and its client on; the machine has {cpus}");
    let dir = Scratch::new("server-affinity");
    let mut srv = ServerProc::start(&dir, "");
    // Each shard says its CPU once its loop has started, which may be just after the server
    // starts listening.
    let deadline = Instant::now() + Duration::from_secs(10);
    let shard_cpus: Vec<usize> = loop {
        let cpus = stat_list(srv.port, "shard_cpus");
        if let Ok(cpus) = cpus.iter().map(|c| c.parse()).collect::<Result<Vec<usize>, _>>() {
            break cpus;
        }
        assert!(Instant::now() < deadline, "shards not pinned to CPUs: {cpus:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(shard_cpus.len(), 2, "{shard_cpus:?}");
    assert_ne!(shard_cpus[0], shard_cpus[1], "{shard_cpus:?}");
    let port = srv.port;
    std::thread::spawn(move || {
        let mut s = connect(port);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut i = 0i64;
        for (round, &cpu) in [shard_cpus[0], shard_cpus[1], shard_cpus[0]].iter().enumerate() {
            pin_to(cpu);
            let serving = shard_cpus.iter().position(|&c| c == cpu).unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut checked = Instant::now();
            loop {
                // A put and a get of the value just put, both answered in turn.
                s.write_all(&request(i % 1000, Some(i))).unwrap();
                assert_eq!(response(&mut s).unwrap(), (0, None), "put {i}");
                s.write_all(&request(i % 1000, None)).unwrap();
                assert_eq!(response(&mut s).unwrap(), (0, Some(i)), "get {i}");
                i += 1;
                if checked.elapsed() < Duration::from_millis(100) {
                    continue;
                }
                checked = Instant::now();
                let counts = stat_list(port, "client_connections_per_shard");
                if counts.iter().enumerate().all(|(k, n)| n == if k == serving { "1" } else { "0" }) {
                    break;
                }
                assert!(Instant::now() < deadline, "round {round}: on CPU {cpu} for 10 s and still {counts:?}");
            }
        }
        i
    })
    .join()
    .expect("the client saw a wrong answer or its connection never followed it");
    let moved: u64 = stat_list(port, "client_connections_moved")[0].parse().unwrap();
    assert!(moved >= 2, "client_connections_moved={moved}");
    assert!(srv.stop().success());
}

/// One info command's value, on a connection of its own.
fn info(port: u16, cmd: &str) -> String {
    common::info_round_trip(port, &format!("{cmd}\n")).expect("info request")
}

/// Batch reads of more rows than run at once, some missing, then single commands on the
/// same connection.
fn batches(port: u16) {
    use ferrospike_tools::wire::{encode_batch_get, Conn};
    let mut c = Conn::connect(&format!("127.0.0.1:{port}"), Duration::from_secs(10)).unwrap();
    let keys: Vec<i64> = (0..400).collect();
    let digests: Vec<_> = keys.iter().map(|&k| UserKey::Int(k).digest("h")).collect();
    let mut req = Vec::new();
    encode_batch_get(&mut req, "test", "h", &digests);
    for round in 0..3 {
        let (rows, last) = c.batch(&req, digests.len()).unwrap();
        assert_eq!(last, 0, "round {round}");
        for (i, rc) in rows.iter().enumerate() {
            assert_eq!(*rc, if i < 300 { 0 } else { 2 }, "round {round}: row {i}");
        }
        assert_eq!(c.call(&request(7, None)).unwrap(), 0, "round {round}: a get after the batch");
    }
}

/// Pipelined puts and gets (more than max-inflight, over both shards) with an info request
/// in the middle, which the shard front-end hands to a connection thread: every answer
/// comes back, in order.
fn pipelined(name: &str, service: &str, front_end_log: &str, shard_front_end: bool) {
    let dir = Scratch::new(name);
    let mut srv = ServerProc::start(&dir, service);
    assert!(srv.log_text().contains(front_end_log), "{}", srv.log_text());
    let mut s = connect(srv.port);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // 300 puts then 300 gets (plus an info frame in the middle) in one write: more than
    // max-inflight at once, spread over both shards.
    let mut burst = Vec::new();
    for k in 0..300 {
        burst.extend_from_slice(&request(k, Some(k * 7)));
    }
    burst.extend_from_slice(&frame(1, b"build\n"));
    for k in 0..300 {
        burst.extend_from_slice(&request(k, None));
    }
    s.write_all(&burst).unwrap();
    for k in 0..300 {
        assert_eq!(response(&mut s).unwrap(), (0, None), "put {k}");
    }
    let mut h = [0u8; 8];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[1], 1, "the info answer comes in its place");
    let mut body = vec![0; (u64::from_be_bytes(h) & 0xffff_ffff) as usize];
    s.read_exact(&mut body).unwrap();
    assert_eq!(body, b"build\t8.1.0.0\n");
    for k in 0..300 {
        assert_eq!(response(&mut s).unwrap(), (0, Some(k * 7)), "get {k}");
    }
    // The connection goes on after the hand-over.
    s.write_all(&request(5, None)).unwrap();
    assert_eq!(response(&mut s).unwrap(), (0, Some(35)));
    drop(s);
    batches(srv.port);
    if shard_front_end {
        // Only the connections that sent an info request left the shards (the start-up
        // check's, the pipelined one and this one): batches are served in them.
        let stats = info(srv.port, "statistics");
        assert!(stats.contains(";client_connections_handed_over=3;"), "{stats}");
    }
    // A client that sends its requests and shuts its side down still gets every answer,
    // then the server closes.
    let mut s = connect(srv.port);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut burst = Vec::new();
    for k in 0..40 {
        burst.extend_from_slice(&request(k, None));
    }
    s.write_all(&burst).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    for k in 0..40 {
        assert_eq!(response(&mut s).unwrap(), (0, Some(k * 7)), "get {k} after the client's shutdown");
    }
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).unwrap(), 0, "the server closes after the last answer");
    drop(s);
    assert!(srv.stop().success());
}

#[test]
fn sigterm_under_write_load_loses_no_acknowledged_write() {
    sigterm_under_load("server-sigterm", "");
}

#[test]
fn sigterm_under_write_load_loses_no_acknowledged_write_with_the_thread_front_end() {
    sigterm_under_load("server-sigterm-threads", "front-end = \"threads\"");
}

/// Writers stream puts of distinct keys without waiting for answers (a reader per
/// connection takes them), so their connections always hold unanswered requests and outlast
/// the server's drain wait: the engine shuts down under them. After a restart every put that
/// was answered OK is there with its value.
fn sigterm_under_load(name: &str, service: &str) {
    let dir = Scratch::new(name);
    let mut srv = ServerProc::start(&dir, service);
    let port = srv.port;
    let writers: Vec<_> = (0..4i64)
        .map(|t| {
            std::thread::spawn(move || {
                let s = connect(port);
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
                let key = move |i: i64| t * 10_000_000 + i;
                let mut w = s.try_clone().unwrap();
                let sender = std::thread::spawn(move || {
                    let mut i = 0i64;
                    while w.write_all(&request(key(i), Some(i))).is_ok() {
                        i += 1;
                    }
                });
                // Answers come in request order: answer n is for put n.
                let mut r = s;
                let mut acked = Vec::new();
                for n in 0..i64::MAX {
                    match response(&mut r) {
                        Ok((0, _)) => acked.push((key(n), n)),
                        _ => break,
                    }
                }
                let _ = r.shutdown(std::net::Shutdown::Both);
                sender.join().unwrap();
                acked
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(800));
    let st = srv.stop();
    assert!(st.success(), "exit status {st}");
    let acked: Vec<(i64, i64)> = writers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(acked.len() > 100, "only {} puts were acknowledged", acked.len());
    let log = srv.log_text();
    println!(
        "{name}: {} puts acknowledged; the engine stopped {} connections closed",
        acked.len(),
        if log.contains("still open after") { "before" } else { "after" }
    );
    srv.restart();
    let mut s = connect(srv.port);
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for chunk in acked.chunks(2000) {
        let burst: Vec<u8> = chunk.iter().flat_map(|&(k, _)| request(k, None)).collect();
        s.write_all(&burst).unwrap();
        for &(k, v) in chunk {
            assert_eq!(response(&mut s).unwrap(), (0, Some(v)), "acknowledged put of key {k} lost over a SIGTERM");
        }
    }
    drop(s);
    assert!(srv.stop().success());
}

/// Random bytes of a random length in `len`.
fn junk(rng: &mut rand::rngs::StdRng, len: std::ops::Range<usize>) -> Vec<u8> {
    let n = rng.gen_range(len);
    (0..n).map(|_| rng.gen()).collect()
}

/// A random op: any op code and particle type, a short name and value, its size field
/// consistent with them.
fn random_op(rng: &mut rand::rngs::StdRng, out: &mut Vec<u8>) {
    let name = junk(rng, 0..6);
    let value = junk(rng, 0..24);
    out.extend_from_slice(&(4 + name.len() as u32 + value.len() as u32).to_be_bytes());
    let op = if rng.gen_bool(0.7) { [1u8, 2, 3, 4, 5, 9, 10, 11, 14][rng.gen_range(0..9)] } else { rng.gen() };
    out.extend_from_slice(&[op, rng.gen_range(0..25), 0, name.len() as u8]);
    out.extend_from_slice(&name);
    out.extend_from_slice(&value);
}

/// A random field of a type the server reads, mostly with plausible contents.
fn random_field(rng: &mut rand::rngs::StdRng, out: &mut Vec<u8>, batch_ok: bool) {
    const TYPES: [u8; 16] = [0, 0, 1, 2, 4, 4, 7, 9, 11, 12, 13, 21, 30, 41, 42, 43];
    let t = TYPES[rng.gen_range(0..TYPES.len())];
    let data = match t {
        0 if rng.gen_bool(0.8) => b"test".to_vec(),
        1 if rng.gen_bool(0.5) => b"fz".to_vec(),
        4 if rng.gen_bool(0.8) => junk(rng, 20..21),
        11 => (0..rng.gen_range(0..6)).flat_map(|_| rng.gen_range(0u16..4200).to_le_bytes()).collect(),
        12 => junk(rng, 0..3).iter().flat_map(|_| junk(rng, 20..21)).collect(),
        13 => junk(rng, 8..9),
        41 | 42 if batch_ok => random_batch(rng),
        _ => junk(rng, 0..40),
    };
    field(out, t, &data);
}

/// A random BATCH_INDEX field: a row count (sometimes not the number of rows), then rows
/// with random flags, repeats included, each with random fields and ops.
fn random_batch(rng: &mut rand::rngs::StdRng) -> Vec<u8> {
    let rows = rng.gen_range(0..6u32);
    let mut b = Vec::new();
    let announced = if rng.gen_bool(0.8) { rows } else { rng.gen_range(0..8) };
    b.extend_from_slice(&announced.to_be_bytes());
    b.push(rng.gen());
    for i in 0..rows {
        b.extend_from_slice(&i.to_be_bytes());
        b.extend_from_slice(&junk(rng, 20..21));
        let flags: u8 = if rng.gen_bool(0.3) { 1 } else { rng.gen::<u8>() & 0x1e };
        b.push(flags);
        if flags & 1 != 0 {
            continue;
        }
        b.push(rng.gen());
        if flags & 0x02 != 0 {
            b.extend_from_slice(&[rng.gen(), rng.gen()]);
        }
        if flags & 0x10 != 0 {
            b.push(rng.gen());
        }
        if flags & 0x04 != 0 {
            b.extend_from_slice(&rng.gen::<u16>().to_be_bytes());
        }
        if flags & 0x08 != 0 {
            b.extend_from_slice(&rng.gen::<u32>().to_be_bytes());
        }
        let (nf, no) = (rng.gen_range(0..3u16), rng.gen_range(0..3u16));
        b.extend_from_slice(&nf.to_be_bytes());
        b.extend_from_slice(&no.to_be_bytes());
        for _ in 0..nf {
            random_field(rng, &mut b, false);
        }
        for _ in 0..no {
            random_op(rng, &mut b);
        }
    }
    b
}

/// A random AS_MSG body behind a well-formed 22-byte header: random info bits, generation
/// and TTL, random fields and ops; one in eight has a byte changed or is cut short after.
fn random_body(rng: &mut rand::rngs::StdRng) -> Vec<u8> {
    let mut b = vec![22, rng.gen(), rng.gen(), rng.gen(), rng.gen(), 0];
    b.extend_from_slice(&rng.gen::<u32>().to_be_bytes());
    b.extend_from_slice(&rng.gen::<u32>().to_be_bytes());
    b.extend_from_slice(&1000u32.to_be_bytes());
    let (nf, no) = (rng.gen_range(0..6u16), rng.gen_range(0..5u16));
    b.extend_from_slice(&nf.to_be_bytes());
    b.extend_from_slice(&no.to_be_bytes());
    for _ in 0..nf {
        random_field(rng, &mut b, true);
    }
    for _ in 0..no {
        random_op(rng, &mut b);
    }
    if rng.gen_bool(0.125) {
        if rng.gen_bool(0.5) {
            let at = rng.gen_range(22..b.len().max(23));
            if at < b.len() {
                b[at] = rng.gen();
            }
        } else {
            b.truncate(rng.gen_range(22..b.len().max(23)));
        }
    }
    b
}

#[test]
fn random_requests_behind_valid_headers_do_not_disturb_good_ones() {
    // Frames that pass the 8-byte header check and carry random AS_MSG bodies (single
    // records, batches, scans, unsupported fields), random info text and random
    // "compressed" messages: each gets an answer or a closed connection, the server never
    // panics, and a well-behaved client keeps getting correct answers throughout.
    let dir = Scratch::new("server-fuzz");
    let mut srv = ServerProc::start(&dir, "request-deadline-ms = 2000\nmax-msg-size = \"1M\"");
    let port = srv.port;
    let good = GoodClient::start(port);
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let infos: [&[u8]; 8] = [
        b"namespace/test\n",
        b"sets/test/fz\n",
        b"statistics\n",
        b"replicas\n",
        b"node\n",
        b"namespace/",
        b"\n\n",
        b"build\n",
    ];
    let (mut frames, mut answered, mut closed) = (0u32, 0u32, 0u32);
    let mut progress = 0;
    for round in 0..300 {
        let mut s = connect(port);
        let mut out = Vec::new();
        for _ in 0..rng.gen_range(1..6) {
            frames += 1;
            match rng.gen_range(0..20) {
                0 => {
                    let mut text = infos[rng.gen_range(0..infos.len())].to_vec();
                    text.extend(junk(&mut rng, 0..12));
                    out.extend(frame(1, &text));
                }
                1 => {
                    let mut body = rng.gen_range(0u64..4 << 20).to_be_bytes().to_vec();
                    body.extend(junk(&mut rng, 0..200));
                    out.extend(frame(4, &body));
                }
                _ => out.extend(frame(3, &random_body(&mut rng))),
            }
        }
        let _ = s.write_all(&out);
        // Read what comes back until the server closes the connection or goes quiet.
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let mut got = 0usize;
        let mut b = [0u8; 8192];
        loop {
            match s.read(&mut b) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(n) => got += n,
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
                Err(_) => {
                    closed += 1;
                    break;
                }
            }
        }
        if got > 0 {
            answered += 1;
        }
        if round % 25 == 24 {
            let now = good.round_trips();
            assert!(now > progress, "the good client stalled (round {round})");
            assert!(!good.failed(), "the good client failed (round {round})");
            progress = now;
        }
    }
    let round_trips = good.finish();
    let log = srv.log_text();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
    let stats = srv.info("statistics\n");
    let counters: Vec<&str> = stats
        .split(';')
        .filter(|kv| {
            ["proto_malformed", "batch_requests", "scan_requests", "error_replies"].iter().any(|k| kv.starts_with(k))
        })
        .collect();
    eprintln!(
        "{frames} random frames on 300 connections: {answered} connections answered, {closed} closed by the server; \
         good client round trips {round_trips}; {counters:?}"
    );
    // The generator reaches the parsers, not just the header check: most connections get
    // answers, and some frames are refused as malformed.
    assert!(answered > 150, "only {answered} of 300 connections got an answer");
    assert!(!stats.contains("proto_malformed=0;"), "{stats}");
    assert!(srv.stop().success(), "the server did not stop cleanly");
}

/// Send a single-record request on `s` and read its answer.
fn ask(s: &mut TcpStream, k: i64, put: Option<i64>) -> (u8, Option<i64>) {
    s.write_all(&request(k, put)).expect("send");
    response(s).expect("answer")
}

#[test]
fn connections_beyond_the_limit_are_refused_and_their_places_come_back() {
    let dir = Scratch::new("server-max-conns");
    let mut srv = ServerProc::start(&dir, "max-connections = 4");
    let port = srv.port;
    // Four connections are served; a fifth is closed at once and the four keep working.
    // (The connections that `ServerProc` opened to see the server up may still count for a
    // moment: a connection the server closes unanswered is opened again.)
    let t = Instant::now();
    let mut conns: Vec<TcpStream> = Vec::new();
    while conns.len() < 4 {
        let i = conns.len() as i64;
        let mut s = connect(port);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&request(i, Some(i + 10)));
        match response(&mut s) {
            Ok(answer) => {
                assert_eq!(answer, (0, None));
                conns.push(s);
            }
            Err(_) => assert!(t.elapsed() < Duration::from_secs(10), "only {i} connections were served"),
        }
    }
    let mut extra = connect(port);
    let _ = extra.write_all(&request(9, None));
    assert!(closed_within(&mut extra, Duration::from_secs(5)), "a fifth connection was not refused");
    for (i, s) in conns.iter_mut().enumerate() {
        assert_eq!(ask(s, i as i64, None), (0, Some(i as i64 + 10)));
    }
    // Three close; their places are free again (two new connections and the info request).
    conns.truncate(1);
    let t = Instant::now();
    let mut again: Vec<TcpStream> = Vec::new();
    while again.len() < 2 {
        let mut s = connect(port);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&request(0, None));
        match response(&mut s) {
            Ok(answer) => {
                assert_eq!(answer, (0, Some(10)));
                again.push(s);
            }
            // The server may not have seen the closes yet.
            Err(_) => assert!(t.elapsed() < Duration::from_secs(10), "closed connections' places did not come back"),
        }
    }
    let stats = srv.info("statistics\n");
    assert!(stats.contains("connections_refused="), "{stats}");
    assert!(!stats.contains("connections_refused=0;"), "{stats}");
    assert!(srv.stop().success());
}

#[test]
fn idle_connections_are_closed_and_sigint_stops_cleanly() {
    let dir = Scratch::new("server-idle");
    let mut srv = ServerProc::start(&dir, "idle-timeout-secs = 2");
    let port = srv.port;
    let mut quiet = connect(port);
    quiet.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(ask(&mut quiet, 1, Some(11)), (0, None));
    // A connection kept busy stays open past the idle timeout; the quiet one is closed.
    let mut busy = connect(port);
    busy.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(5) {
        assert_eq!(ask(&mut busy, 1, None), (0, Some(11)), "a busy connection was cut");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        closed_within(&mut quiet, Duration::from_secs(3)),
        "a connection quiet for 5 s was not closed (idle timeout 2 s)"
    );
    // SIGINT stops the server as SIGTERM does: exit 0, devices marked clean.
    drop(busy);
    assert!(srv.stop_with(libc::SIGINT).success(), "exit status after SIGINT");
    assert!(srv.log_text().contains("shut down cleanly"), "{}", srv.log_text());
}
