//! `ferrospike-bench`: an asbench-style load generator over the Aerospike wire protocol,
//! for Ferrospike or any Aerospike server.
//!
//! One thread per connection (`-z`), one request in flight per connection, as the official
//! clients' synchronous calls do; with `--async`, event loops (`-W`, default 1) each drive
//! their share of the `-z` connections over non-blocking sockets and epoll, one request in
//! flight per connection, as asbench's async mode and redis-benchmark do. Without `--throughput` each connection sends its next request as soon as the
//! previous one is answered (closed loop, latency from the send). With `--throughput` every
//! request has a scheduled start (open loop) and its latency is counted from it, so a slow
//! server shows up as latency instead of a quietly lower rate.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrospike_engine::{UserKey, Value};
use hdrhistogram::Histogram;

use crate::hist::{hdr_summary_us, new_hdr, HDR_MAX_NS};
use crate::rng::Rng;
use crate::wire::{encode_batch_get, encode_delete, encode_get, encode_put, result_name, Conn, Key, WireError};

pub const USAGE: &str = "\
ferrospike-bench: load generator over the Aerospike wire protocol (asbench's flags)

USAGE:
    ferrospike-bench [OPTIONS]

OPTIONS:
    -h, --hosts HOST        server address (default 127.0.0.1)
    -p, --port PORT         server port (default 3000)
    -n, --namespace NS      namespace (default test)
    -s, --set SET           set (default testset)
    -K, --start-key N       first key (default 0)
    -k, --keys N            number of keys (default 100000)
    -o, --object-spec SPEC  bins: I (integer), S<len> (string), B<len> (blob), comma list for
                            several bins named testbin, testbin_2, ... (default I)
    -w, --workload W        I          linear insert of every key, then stop
                            RU,<pct>   random reads (pct %) and updates (default RU,50)
                            DB         delete every key, then stop
    -z, --threads N         connections, one thread each (default 4)
    -a, --async             event loops drive the -z connections instead of a thread each
                            (one request in flight per connection; RU, I and DB, single-key
                            requests only)
    -W, --event-loops N     event-loop threads with --async (default 1; also --eventLoops)
    -t, --duration SECS     run time of RU (default 10)
        --throughput N      target ops/s across all connections: open loop, latency counted
                            from each request's scheduled start (starts spread evenly
                            over the connections); without it, closed loop
        --batch-size N      RU reads as batch reads of N keys (default 1: single reads)
        --durable-delete    DB deletes leave tombstones
        --send-key          send the user key with every request (default: digest only)
        --json FILE         write the summary as JSON
        --resp              talk to a Redis server instead (with -a and RU only): GET and SET
                            of key:<12-digit key> with a value of 'x' as long as the first
                            bin of -o, the keys and values redis-benchmark -r K -d N uses; for
                            timing Redis with this client next to Ferrospike
        --help              this text

Keys are integers; the digest is RIPEMD-160(set, key type, key) as every client computes it.
A line per second goes to stdout (tps per op kind, p50/p99, errors by result code), then a
summary with HDR p50/p99/p99.9/max per op kind and the error table. Exit status: 0 when no
errors, 1 when any request failed, 2 on bad usage or no connection.
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    Insert,
    ReadUpdate { read_pct: u32 },
    Delete,
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Workload::Insert => write!(f, "I"),
            Workload::ReadUpdate { read_pct } => write!(f, "RU,{read_pct}"),
            Workload::Delete => write!(f, "DB"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BinSpec {
    Int,
    Str(usize),
    Blob(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub host: String,
    pub port: u16,
    pub namespace: String,
    pub set: String,
    pub start_key: u64,
    pub keys: u64,
    pub bins: Vec<BinSpec>,
    pub workload: Workload,
    pub threads: usize,
    pub duration_secs: u64,
    pub throughput: Option<u64>,
    pub batch_size: usize,
    pub durable_delete: bool,
    pub send_key: bool,
    pub json: Option<String>,
    /// Event loops drive the connections (None: a thread per connection).
    pub event_loops: Option<usize>,
    /// Speak Redis's protocol (RESP): GET/SET of `key:<12 digits>` (`--resp`).
    pub resp: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            host: "127.0.0.1".into(),
            port: 3000,
            namespace: "test".into(),
            set: "testset".into(),
            start_key: 0,
            keys: 100_000,
            bins: vec![BinSpec::Int],
            workload: Workload::ReadUpdate { read_pct: 50 },
            threads: 4,
            duration_secs: 10,
            throughput: None,
            batch_size: 1,
            durable_delete: false,
            send_key: false,
            json: None,
            event_loops: None,
            resp: false,
        }
    }
}

/// Most connections accepted.
pub const MAX_THREADS: usize = 1024;
/// Largest batch.
pub const MAX_BATCH: usize = 5000;
/// Largest string or blob bin.
pub const MAX_BIN_BYTES: usize = 1 << 20;

pub fn parse_object_spec(s: &str) -> Result<Vec<BinSpec>, String> {
    s.split(',')
        .map(|p| {
            let p = p.trim();
            let len = |r: &str| -> Result<usize, String> {
                r.parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_BIN_BYTES).contains(n))
                    .ok_or(format!("-o: bad length in '{p}' (1..{MAX_BIN_BYTES})"))
            };
            match p.as_bytes().first() {
                Some(b'I') if p.len() == 1 || p[1..].parse::<u8>().is_ok_and(|n| (1..=8).contains(&n)) => {
                    Ok(BinSpec::Int)
                }
                Some(b'S') => Ok(BinSpec::Str(len(&p[1..])?)),
                Some(b'B') => Ok(BinSpec::Blob(len(&p[1..])?)),
                _ => Err(format!("-o: unknown bin spec '{p}' (I, S<len>, B<len>)")),
            }
        })
        .collect()
}

pub fn parse_workload(s: &str) -> Result<Workload, String> {
    match s {
        "I" => Ok(Workload::Insert),
        "DB" => Ok(Workload::Delete),
        _ => {
            let pct = s.strip_prefix("RU,").or_else(|| (s == "RU").then_some("50"));
            pct.and_then(|p| p.parse::<u32>().ok())
                .filter(|p| *p <= 100)
                .map(|read_pct| Workload::ReadUpdate { read_pct })
                .ok_or(format!("-w: unknown workload '{s}' (I, RU,<read%>, DB)"))
        }
    }
}

fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T, String> {
    v.parse().map_err(|_| format!("{flag}: bad number '{v}'"))
}

pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--help" {
            return Err(USAGE.into());
        }
        let mut v = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "-h" | "--hosts" => o.host = v()?,
            "-p" | "--port" => o.port = num(a, v()?)?,
            "-n" | "--namespace" => o.namespace = v()?,
            "-s" | "--set" => o.set = v()?,
            "-K" | "--start-key" => o.start_key = num(a, v()?)?,
            "-k" | "--keys" => o.keys = num(a, v()?)?,
            "-o" | "--object-spec" => o.bins = parse_object_spec(&v()?)?,
            "-w" | "--workload" => o.workload = parse_workload(&v()?)?,
            "-z" | "--threads" => o.threads = num(a, v()?)?,
            "-t" | "--duration" => o.duration_secs = num(a, v()?)?,
            "--throughput" => o.throughput = Some(num(a, v()?)?),
            "--batch-size" => o.batch_size = num(a, v()?)?,
            "--durable-delete" => o.durable_delete = true,
            "--send-key" => o.send_key = true,
            "--json" => o.json = Some(v()?),
            "--resp" => o.resp = true,
            "-a" | "--async" => o.event_loops = Some(o.event_loops.unwrap_or(1)),
            "-W" | "--event-loops" | "--eventLoops" => o.event_loops = Some(num(a, v()?)?),
            s => return Err(format!("unknown option '{s}' (see --help)")),
        }
    }
    if o.keys == 0 {
        return Err("-k must be at least 1".into());
    }
    if !(1..=MAX_THREADS).contains(&o.threads) {
        return Err(format!("-z must be 1..{MAX_THREADS}"));
    }
    if !(1..=MAX_BATCH).contains(&o.batch_size) {
        return Err(format!("--batch-size must be 1..{MAX_BATCH}"));
    }
    if let Some(n) = o.event_loops {
        if !(1..=o.threads).contains(&n) {
            return Err(format!("-W must be 1..{} (the connections, -z)", o.threads));
        }
        if o.batch_size > 1 {
            return Err("--async runs single-key requests: no --batch-size".into());
        }
    }
    if o.resp && (o.event_loops.is_none() || !matches!(o.workload, Workload::ReadUpdate { .. })) {
        return Err("--resp runs RU workloads with -a only (populate Redis with redis-cli)".into());
    }
    if o.throughput == Some(0) {
        return Err("--throughput must be at least 1".into());
    }
    if o.host.contains(':') && !o.host.starts_with('[') {
        // asbench accepts host:port
        let (h, p) = o.host.rsplit_once(':').expect("contains ':'");
        o.port = num("-h", p.to_string())?;
        o.host = h.to_string();
    }
    Ok(o)
}

/// Operation kinds reported separately.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Delete,
    BatchRead,
}

const KINDS: [(Kind, &str); 4] =
    [(Kind::Read, "read"), (Kind::Write, "write"), (Kind::Delete, "delete"), (Kind::BatchRead, "batch-read")];

/// Latencies and counts of one op kind: per-interval and whole-run HDR histograms.
struct KindStats {
    interval: Mutex<Histogram<u64>>,
    total: Mutex<Histogram<u64>>,
}

struct Stats {
    kinds: Vec<KindStats>,
    /// Requests answered with each non-OK result code (batch rows count one each).
    errors: Vec<AtomicU64>,
    /// Requests that failed on the network or with a malformed response.
    net_errors: AtomicU64,
    stop: AtomicBool,
    first_error: Mutex<Option<String>>,
}

impl Stats {
    fn record(&self, k: Kind, ns: u64) {
        let i = KINDS.iter().position(|(x, _)| *x == k).expect("kind");
        let ns = ns.clamp(1, HDR_MAX_NS);
        self.kinds[i].interval.lock().expect("hdr").saturating_record(ns);
        self.kinds[i].total.lock().expect("hdr").saturating_record(ns);
    }

    fn error_table(&self) -> Vec<(u8, u64)> {
        (0..=255u8).filter_map(|c| Some((c, self.errors[c as usize].load(Relaxed))).filter(|x| x.1 > 0)).collect()
    }
}

fn make_bins(specs: &[BinSpec], rng: &mut Rng) -> Vec<(String, Value)> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let name = if i == 0 { "testbin".to_string() } else { format!("testbin_{}", i + 1) };
            let v = match s {
                BinSpec::Int => Value::Int(rng.next_u64() as i64 & i64::MAX),
                BinSpec::Str(n) => Value::Str((0..*n).map(|_| b'a' + rng.below(26) as u8).collect()),
                BinSpec::Blob(n) => {
                    let mut b = vec![0u8; *n];
                    rng.fill(&mut b, 100);
                    Value::Blob(b)
                }
            };
            (name, v)
        })
        .collect()
}

pub fn main(args: Vec<String>) -> i32 {
    let o = match crate::options_or_exit(parse_args(&args), USAGE, "ferrospike-bench") {
        Ok(o) => o,
        Err(code) => return code,
    };
    run(&o)
}

fn run(o: &Options) -> i32 {
    let addr = format!("{}:{}", o.host, o.port);
    // Fail fast when the server is not there.
    if let Err(e) = Conn::connect(&addr, Duration::from_secs(5)) {
        eprintln!("ferrospike-bench: cannot connect to {addr}: {e}");
        return 2;
    }
    let stats = Arc::new(Stats {
        kinds: KINDS
            .iter()
            .map(|_| KindStats { interval: Mutex::new(new_hdr()), total: Mutex::new(new_hdr()) })
            .collect(),
        errors: (0..256).map(|_| AtomicU64::new(0)).collect(),
        net_errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        first_error: Mutex::new(None),
    });
    println!(
        "ferrospike-bench: {addr} namespace {} set {} keys {}..{} workload {} bins {:?} connections {}{}{}",
        o.namespace,
        o.set,
        o.start_key,
        o.start_key + o.keys,
        o.workload,
        o.bins,
        o.threads,
        o.event_loops.map(|n| format!(" on {n} event loop(s)")).unwrap_or_default(),
        o.throughput.map(|t| format!(" throughput {t} ops/s (open loop)")).unwrap_or_default()
    );
    let start = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    let workers = o.event_loops.unwrap_or(o.threads);
    for t in 0..workers {
        let (o, stats, addr, done) = (o.clone(), stats.clone(), addr.clone(), done.clone());
        threads.push(std::thread::spawn(move || match o.event_loops {
            None => worker(t, &o, &addr, &stats, start, &done),
            Some(n) => {
                // Connections t, t + n, t + 2n, ...
                let mine: Vec<usize> = (t..o.threads).step_by(n).collect();
                event_loop(&mine, &o, &addr, &stats, start, &done);
            }
        }));
    }
    let limit = match o.workload {
        Workload::ReadUpdate { .. } => Some(Duration::from_secs(o.duration_secs)),
        _ => None,
    };
    let mut per_second = Vec::new();
    let mut second = 0u64;
    let mut last_errors = 0u64;
    loop {
        second += 1;
        let due = start + Duration::from_secs(second);
        let finished = loop {
            let all_done = done.load(Relaxed) == workers as u64;
            if all_done || Instant::now() >= due {
                break all_done;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if limit.is_some_and(|l| start.elapsed() >= l) {
            stats.stop.store(true, Relaxed);
        }
        let secs = if finished { start.elapsed().as_secs_f64() - (second - 1) as f64 } else { 1.0 };
        let (line, row) = interval_line(&stats, second, secs.max(1e-3), &mut last_errors);
        println!("{line}");
        per_second.push(row);
        if finished || stats.stop.load(Relaxed) {
            stats.stop.store(true, Relaxed);
            break;
        }
    }
    for t in threads {
        let _ = t.join();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (text, json) = summary(o, &stats, elapsed, &per_second);
    print!("{text}");
    if let Some(path) = &o.json {
        if let Err(e) = std::fs::write(path, json) {
            eprintln!("ferrospike-bench: cannot write {path}: {e}");
            return 2;
        }
    }
    let failed = !stats.error_table().is_empty() || stats.net_errors.load(Relaxed) > 0;
    if let Some(e) = stats.first_error.lock().expect("lock").as_ref() {
        eprintln!("ferrospike-bench: first network/protocol error: {e}");
    }
    if failed {
        1
    } else {
        0
    }
}

fn interval_line(stats: &Stats, second: u64, secs: f64, last_errors: &mut u64) -> (String, String) {
    let mut line = format!("[{second:>4}s]");
    let mut row = format!("{{\"second\":{second}");
    for (i, (_, name)) in KINDS.iter().enumerate() {
        let mut h = stats.kinds[i].interval.lock().expect("hdr");
        if h.is_empty() {
            continue;
        }
        let tps = h.len() as f64 / secs;
        let [p50, p99, _, _] = hdr_summary_us(&h);
        let _ = write!(line, " {name} {tps:.0} tps p50 {:.3} ms p99 {:.3} ms |", p50 / 1e3, p99 / 1e3);
        let _ = write!(row, ",\"{name}\":{{\"tps\":{tps:.1},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1}}}");
        h.reset();
    }
    let table = stats.error_table();
    let total: u64 = table.iter().map(|x| x.1).sum::<u64>() + stats.net_errors.load(Relaxed);
    if total == *last_errors {
        line.push_str(" errors: none new");
    } else {
        let _ = write!(line, " errors: {} new (", total - *last_errors);
        for (c, n) in &table {
            let _ = write!(line, "{c}:{n} ");
        }
        let _ = write!(line, "net:{})", stats.net_errors.load(Relaxed));
    }
    *last_errors = total;
    row.push('}');
    (line, row)
}

fn summary(o: &Options, stats: &Stats, elapsed: f64, per_second: &[String]) -> (String, String) {
    let mut s = format!("\nSUMMARY ({elapsed:.1} s)\n");
    let _ = writeln!(
        s,
        "{:<12}{:>12}{:>12}{:>12}{:>12}{:>12}{:>12}",
        "op", "count", "tps", "p50 ms", "p99 ms", "p99.9 ms", "max ms"
    );
    let mut js = String::from("{");
    let _ = write!(
        js,
        "\"host\":\"{}\",\"port\":{},\"namespace\":\"{}\",\"set\":\"{}\",\"workload\":\"{}\",\"connections\":{},\
         \"throughput\":{},\"duration_secs\":{elapsed:.3},\"ops\":{{",
        esc(&o.host),
        o.port,
        esc(&o.namespace),
        esc(&o.set),
        o.workload,
        o.threads,
        o.throughput.map(|t| t.to_string()).unwrap_or("null".into())
    );
    let mut first = true;
    for (i, (_, name)) in KINDS.iter().enumerate() {
        let h = stats.kinds[i].total.lock().expect("hdr");
        if h.is_empty() {
            continue;
        }
        let [p50, p99, p999, max] = hdr_summary_us(&h);
        let tps = h.len() as f64 / elapsed.max(1e-9);
        let _ = writeln!(
            s,
            "{name:<12}{:>12}{tps:>12.0}{:>12.3}{:>12.3}{:>12.3}{:>12.3}",
            h.len(),
            p50 / 1e3,
            p99 / 1e3,
            p999 / 1e3,
            max / 1e3
        );
        let _ = write!(
            js,
            "{}\"{name}\":{{\"count\":{},\"tps\":{tps:.1},\"p50_us\":{p50:.1},\"p99_us\":{p99:.1},\"p999_us\":{p999:.1},\"max_us\":{max:.1}}}",
            if first { "" } else { "," },
            h.len()
        );
        first = false;
    }
    js.push_str("},\"errors\":{");
    let table = stats.error_table();
    if table.is_empty() && stats.net_errors.load(Relaxed) == 0 {
        s.push_str("errors: none\n");
    } else {
        let _ = writeln!(s, "{:<8}{:<36}{:>12}", "code", "error", "count");
        for (c, n) in &table {
            let _ = writeln!(s, "{c:<8}{:<36}{n:>12}", result_name(*c));
        }
        let _ = writeln!(s, "{:<8}{:<36}{:>12}", "-", "network / protocol", stats.net_errors.load(Relaxed));
    }
    let codes: Vec<String> = table.iter().map(|(c, n)| format!("\"{c}\":{n}")).collect();
    js.push_str(&codes.join(","));
    let _ = writeln!(
        js,
        "}},\"net_errors\":{},\"per_second\":[{}]}}",
        stats.net_errors.load(Relaxed),
        per_second.join(",")
    );
    (s, js)
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// One connection's loop.
fn worker(t: usize, o: &Options, addr: &str, stats: &Stats, start: Instant, done: &AtomicU64) {
    let mut rng = Rng::new();
    let mut conn: Option<Conn> = None;
    let mut req = Vec::with_capacity(4096);
    // Linear workloads: this connection's slice of the key range.
    let (lo, hi) = slice_of(o, t);
    let mut next_linear = lo;
    let period = open_loop_period(o);
    let mut issued = 0u64;
    while !stats.stop.load(Relaxed) {
        // Open loop: wait for this request's scheduled start.
        let scheduled = match period {
            Some(p) => {
                let due = first_start(o, start, p, t) + p.mul_f64(issued as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep((due - now).min(Duration::from_millis(50)));
                    continue;
                }
                due
            }
            None => Instant::now(),
        };
        issued += 1;
        let Some(kind) = next_kind(o, &mut rng, next_linear, hi) else { break };
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match Conn::connect(addr, Duration::from_secs(5)) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    note_net(stats, &e);
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            },
        };
        let result = if kind == Kind::BatchRead {
            let digests: Vec<_> = (0..o.batch_size)
                .map(|_| UserKey::Int(key_of(o, &mut rng, &mut next_linear) as i64).digest(&o.set))
                .collect();
            encode_batch_get(&mut req, &o.namespace, &o.set, &digests);
            c.batch(&req, digests.len()).map(|(rows, rc)| {
                for r in rows.into_iter().chain(std::iter::once(rc)) {
                    if r != 0 {
                        stats.errors[r as usize].fetch_add(1, Relaxed);
                    }
                }
                0
            })
        } else {
            encode_single(o, kind, &mut rng, &mut next_linear, &mut req);
            c.call(&req)
        };
        match result {
            Ok(rc) => {
                stats.record(kind, scheduled.elapsed().as_nanos() as u64);
                if rc != 0 {
                    stats.errors[rc as usize].fetch_add(1, Relaxed);
                }
            }
            Err(e) => {
                note_net(stats, &e);
                conn = None;
            }
        }
    }
    done.fetch_add(1, Relaxed);
}

/// With `--throughput`: how often each connection starts a request (z / throughput).
fn open_loop_period(o: &Options) -> Option<Duration> {
    o.throughput.map(|tp| Duration::from_secs_f64(o.threads as f64 / tp as f64))
}

/// With `--throughput`: connection `t`'s first start, `t/z` of a period after `start`, so
/// that the starts of all connections are spread evenly.
fn first_start(o: &Options, start: Instant, period: Duration, t: usize) -> Instant {
    start + period.mul_f64(t as f64 / o.threads as f64)
}

/// What the next request of a connection is; None when its slice of a linear workload is
/// done (`next_linear` reached `hi`).
fn next_kind(o: &Options, rng: &mut Rng, next_linear: u64, hi: u64) -> Option<Kind> {
    Some(match &o.workload {
        Workload::Insert | Workload::Delete if next_linear >= hi => return None,
        Workload::Insert => Kind::Write,
        Workload::Delete => Kind::Delete,
        Workload::ReadUpdate { read_pct } => {
            if rng.below(100) < *read_pct as u64 {
                if o.batch_size > 1 {
                    Kind::BatchRead
                } else {
                    Kind::Read
                }
            } else {
                Kind::Write
            }
        }
    })
}

/// The key of the next request: random for RU, the next of the connection's slice otherwise.
fn key_of(o: &Options, rng: &mut Rng, next: &mut u64) -> u64 {
    match o.workload {
        Workload::ReadUpdate { .. } => o.start_key + rng.below(o.keys),
        _ => {
            *next += 1;
            *next - 1
        }
    }
}

/// Encode a single-key request of `kind` into `req`.
fn encode_single(o: &Options, kind: Kind, rng: &mut Rng, next_linear: &mut u64, req: &mut Vec<u8>) {
    if o.resp {
        let key = key_of(o, rng, next_linear);
        let value_len = match o.bins.first() {
            Some(BinSpec::Str(n) | BinSpec::Blob(n)) => *n,
            _ => 1,
        };
        encode_resp(req, kind == Kind::Write, key, value_len);
        return;
    }
    let uk = UserKey::Int(key_of(o, rng, next_linear) as i64);
    let k = Key { namespace: &o.namespace, set: &o.set, key: &uk, send_key: o.send_key };
    match kind {
        Kind::Read => encode_get(req, &k),
        Kind::Write => encode_put(req, &k, &make_bins(&o.bins, rng)),
        _ => encode_delete(req, &k, o.durable_delete),
    }
}

/// A Redis GET of `key:<key, 12 digits>`, or a SET of it to `value_len` bytes of 'x' (what
/// `redis-benchmark -r K -d N` sends).
fn encode_resp(req: &mut Vec<u8>, set: bool, key: u64, value_len: usize) {
    use std::io::Write as _;
    req.clear();
    // "key:" and at least 12 digits.
    let key_len = 4 + key.checked_ilog10().map_or(1, |d| d as usize + 1).max(12);
    if set {
        let _ = write!(req, "*3\r\n$3\r\nSET\r\n${key_len}\r\nkey:{key:012}\r\n${value_len}\r\n");
        req.resize(req.len() + value_len, b'x');
        req.extend_from_slice(b"\r\n");
    } else {
        let _ = write!(req, "*2\r\n$3\r\nGET\r\n${key_len}\r\nkey:{key:012}\r\n");
    }
}

/// Largest bulk string a reply may announce (Redis's own limit, proto-max-bulk-len, is
/// 512 MiB by default); a larger length is a broken stream, not a value to buffer.
const MAX_RESP_VALUE: i64 = 512 << 20;

/// One Redis reply from the front of `buf`, mapped to an Aerospike result code for the error
/// table: 0 for `+OK`, an integer or a value, 2 (KEY_NOT_FOUND) for a nil bulk string, 1
/// (SERVER_ERROR) for an error reply. `None` until the reply is whole.
fn parse_resp_reply(buf: &mut Vec<u8>) -> Result<Option<u8>, WireError> {
    let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") else {
        if buf.len() > 64 * 1024 {
            return Err(WireError::Protocol("RESP reply line longer than 64 KiB".into()));
        }
        return Ok(None);
    };
    let bad =
        || WireError::Protocol(format!("unexpected RESP reply {:?}", String::from_utf8_lossy(&buf[..eol.min(64)])));
    let (rc, used) = match buf.first() {
        Some(b'+' | b':') => (0, eol + 2),
        Some(b'-') => (1, eol + 2),
        Some(b'$') => {
            let len: i64 = std::str::from_utf8(&buf[1..eol]).ok().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
            if len < 0 {
                (2, eol + 2)
            } else if len > MAX_RESP_VALUE {
                return Err(bad());
            } else {
                let need = eol + 2 + len as usize + 2;
                if buf.len() < need {
                    return Ok(None);
                }
                if &buf[need - 2..need] != b"\r\n" {
                    return Err(WireError::Protocol("RESP bulk string not followed by CRLF".into()));
                }
                (0, need)
            }
        }
        _ => return Err(bad()),
    };
    buf.drain(..used);
    Ok(Some(rc))
}

/// This connection's slice `[lo, hi)` of the key range, for linear workloads.
fn slice_of(o: &Options, t: usize) -> (u64, u64) {
    let per = o.keys.div_ceil(o.threads as u64);
    let lo = o.start_key + per * t as u64;
    (lo, (lo + per).min(o.start_key + o.keys))
}

/// One connection of an event loop.
struct LoopConn {
    conn: Option<AsyncConn>,
    next_linear: u64,
    hi: u64,
    /// The request in flight: its kind and when its latency is counted from (the send, or
    /// with `--throughput` its scheduled start).
    in_flight: Option<(Kind, Instant)>,
    /// Finished (its slice done), or given up after a network error.
    done: bool,
    /// With `--throughput`: when this connection's next request is due.
    due: Option<Instant>,
}

/// Drive connections `mine` (indices among the `-z` connections) from one thread: each has
/// one request in flight. Closed loop: a readable socket's response is recorded and the
/// connection's next request sent at once. Open loop (`--throughput`): connection `t` of the
/// `-z` sends at `start + t·p/z + k·p` (`p` = z / throughput, so the starts are spread
/// evenly), or at once when its previous request was answered late, and latency is counted
/// from that schedule.
fn event_loop(mine: &[usize], o: &Options, addr: &str, stats: &Stats, start: Instant, done: &AtomicU64) {
    let mut rng = Rng::new();
    let mut req = Vec::with_capacity(4096);
    let period = open_loop_period(o);
    let mut conns: Vec<LoopConn> = mine
        .iter()
        .map(|&t| {
            let (lo, hi) = slice_of(o, t);
            let due = period.map(|p| first_start(o, start, p, t));
            LoopConn { conn: None, next_linear: lo, hi, in_flight: None, done: false, due }
        })
        .collect();
    let mut poller = match Poller::new() {
        Ok(p) => p,
        Err(e) => {
            note_net(stats, &WireError::Io(e));
            done.fetch_add(1, Relaxed);
            return;
        }
    };
    // Open loop: connections waiting for their next start, earliest first.
    let mut waiting: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
    let mut ready = Vec::new();
    // Start every connection, then serve whichever answers.
    ready.extend(0..conns.len());
    while !stats.stop.load(Relaxed) && conns.iter().any(|c| !c.done) {
        let now = Instant::now();
        while let Some(&Reverse((due, i))) = waiting.peek() {
            if due > now {
                break;
            }
            waiting.pop();
            ready.push(i);
        }
        for &i in &ready {
            let c = &mut conns[i];
            if c.done {
                continue;
            }
            if let (Some(ac), Some(_)) = (c.conn.as_mut(), c.in_flight.as_ref()) {
                match ac.try_response(o.resp) {
                    Ok(None) => continue,
                    Ok(Some(rc)) => {
                        let (kind, since) = c.in_flight.take().expect("a response answers a request");
                        stats.record(kind, since.elapsed().as_nanos() as u64);
                        if rc != 0 {
                            stats.errors[rc as usize].fetch_add(1, Relaxed);
                        }
                    }
                    Err(e) => {
                        note_net(stats, &e);
                        poller.forget(ac);
                        c.conn = None;
                        c.in_flight = None;
                    }
                }
            }
            if stats.stop.load(Relaxed) {
                break;
            }
            let scheduled = match c.due {
                Some(due) if due > Instant::now() => {
                    waiting.push(Reverse((due, i)));
                    continue;
                }
                Some(due) => {
                    c.due = Some(due + period.expect("a due time comes with a period"));
                    due
                }
                None => Instant::now(),
            };
            let Some(kind) = next_kind(o, &mut rng, c.next_linear, c.hi) else {
                c.done = true;
                continue;
            };
            if c.conn.is_none() {
                match AsyncConn::connect(addr).and_then(|mut ac| poller.watch(&mut ac, i).map(|()| ac)) {
                    Ok(ac) => c.conn = Some(ac),
                    Err(e) => {
                        note_net(stats, &e);
                        // The thread-per-connection worker retries; an event loop must not
                        // spin on a server that is gone.
                        c.done = true;
                        continue;
                    }
                }
            }
            encode_single(o, kind, &mut rng, &mut c.next_linear, &mut req);
            let ac = c.conn.as_mut().expect("connected above");
            match ac.send(&req) {
                Ok(()) => c.in_flight = Some((kind, if c.due.is_some() { scheduled } else { Instant::now() })),
                Err(e) => {
                    note_net(stats, &e);
                    poller.forget(ac);
                    c.conn = None;
                }
            }
        }
        ready.clear();
        // epoll's timeout is in whole milliseconds: wait the whole milliseconds left before
        // the next start, and poll without waiting in the last one.
        let timeout = match waiting.peek() {
            None => Duration::from_millis(50),
            Some(&Reverse((due, _))) => {
                let left = due.saturating_duration_since(Instant::now());
                Duration::from_millis(left.as_millis().min(50) as u64)
            }
        };
        if let Err(e) = poller.wait(&mut ready, timeout) {
            note_net(stats, &WireError::Io(e));
            break;
        }
    }
    done.fetch_add(1, Relaxed);
}

/// A non-blocking connection of an event loop. Requests are small and one is in flight at
/// a time, so a send is written whole (waiting for room in the rare case the socket has
/// none); responses are read as they arrive.
struct AsyncConn {
    stream: mio::net::TcpStream,
    inbuf: Vec<u8>,
}

impl AsyncConn {
    fn connect(addr: &str) -> Result<AsyncConn, WireError> {
        let c = Conn::connect(addr, Duration::from_secs(5))?;
        let stream = c.into_stream();
        stream.set_nonblocking(true)?;
        Ok(AsyncConn { stream: mio::net::TcpStream::from_std(stream), inbuf: Vec::with_capacity(4096) })
    }

    fn send(&mut self, mut req: &[u8]) -> Result<(), WireError> {
        use std::io::Write;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !req.is_empty() {
            match self.stream.write(req) {
                Ok(0) => return Err(WireError::Io(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => req = &req[n..],
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_micros(50));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Read what has arrived; the result code once a whole response (a RESP reply with
    /// `resp`) is in.
    fn try_response(&mut self, resp: bool) -> Result<Option<u8>, WireError> {
        use std::io::Read;
        loop {
            let parsed =
                if resp { parse_resp_reply(&mut self.inbuf)? } else { crate::wire::parse_response(&mut self.inbuf)? };
            if let Some(rc) = parsed {
                return Ok(Some(rc));
            }
            let have = self.inbuf.len();
            self.inbuf.resize(have + 4096, 0);
            match self.stream.read(&mut self.inbuf[have..]) {
                Ok(0) => {
                    self.inbuf.truncate(have);
                    return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(n) => self.inbuf.truncate(have + n),
                Err(e) => {
                    self.inbuf.truncate(have);
                    match e.kind() {
                        std::io::ErrorKind::WouldBlock => return Ok(None),
                        std::io::ErrorKind::Interrupted => {}
                        _ => return Err(e.into()),
                    }
                }
            }
        }
    }
}

/// The readiness of an event loop's connections (edge-triggered: a connection is read until
/// its response is whole or the socket has nothing more), each known by its index.
struct Poller {
    poll: mio::Poll,
    events: mio::Events,
}

impl Poller {
    fn new() -> std::io::Result<Poller> {
        Ok(Poller { poll: mio::Poll::new()?, events: mio::Events::with_capacity(256) })
    }

    fn watch(&self, c: &mut AsyncConn, index: usize) -> Result<(), WireError> {
        self.poll.registry().register(&mut c.stream, mio::Token(index), mio::Interest::READABLE)?;
        Ok(())
    }

    /// Stop watching a connection about to be dropped.
    fn forget(&self, c: &mut AsyncConn) {
        // A failure only means it was not watched.
        let _ = self.poll.registry().deregister(&mut c.stream);
    }

    /// The indices of connections that became readable, waiting at most `timeout`.
    fn wait(&mut self, out: &mut Vec<usize>, timeout: Duration) -> std::io::Result<()> {
        match self.poll.poll(&mut self.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        }
        out.extend(self.events.iter().map(|e| e.token().0));
        Ok(())
    }
}

fn note_net(stats: &Stats, e: &WireError) {
    stats.net_errors.fetch_add(1, Relaxed);
    let mut f = stats.first_error.lock().expect("lock");
    if f.is_none() {
        *f = Some(e.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn asbench_flags_parse() {
        let o = parse_args(&args("-h 10.0.0.1 -p 3100 -n bar -s s1 -k 500 -o I,S16,B32 -w RU,80 -z 8 -t 3 --throughput 1000 --batch-size 10 --json x.json")).unwrap();
        assert_eq!(o.host, "10.0.0.1");
        assert_eq!(o.port, 3100);
        assert_eq!(o.bins, vec![BinSpec::Int, BinSpec::Str(16), BinSpec::Blob(32)]);
        assert_eq!(o.workload, Workload::ReadUpdate { read_pct: 80 });
        assert_eq!((o.threads, o.duration_secs, o.throughput, o.batch_size), (8, 3, Some(1000), 10));
        assert_eq!(parse_args(&args("-w DB --durable-delete")).unwrap().workload, Workload::Delete);
        assert!(parse_args(&args("-w XY")).is_err());
        assert!(parse_args(&args("-o Q")).is_err());
        assert!(parse_args(&args("--help")).unwrap_err().contains("USAGE"));
        assert_eq!(parse_args(&args("-z 8 -a")).unwrap().event_loops, Some(1));
        assert_eq!(parse_args(&args("-z 8 --async --eventLoops 4")).unwrap().event_loops, Some(4));
        assert_eq!(parse_args(&args("-z 8")).unwrap().event_loops, None);
        assert!(parse_args(&args("-z 2 -W 3")).is_err(), "more event loops than connections");
        assert!(parse_args(&args("-a --batch-size 2")).is_err());
        assert_eq!(parse_args(&args("-a --throughput 100")).unwrap().throughput, Some(100));
    }

    #[test]
    fn resp_requests_are_what_redis_benchmark_sends() {
        let mut req = Vec::new();
        encode_resp(&mut req, false, 42, 4);
        assert_eq!(req, b"*2\r\n$3\r\nGET\r\n$16\r\nkey:000000000042\r\n");
        encode_resp(&mut req, true, 7, 4);
        assert_eq!(req, b"*3\r\n$3\r\nSET\r\n$16\r\nkey:000000000007\r\n$4\r\nxxxx\r\n");
        assert!(parse_args(&args("-a -w RU,100 --resp")).unwrap().resp);
        assert!(parse_args(&args("-w RU,100 --resp")).is_err(), "--resp needs -a");
        assert!(parse_args(&args("-a -w I --resp")).is_err(), "--resp runs RU only");
    }

    #[test]
    fn resp_replies_parse_whole_or_not_at_all() {
        let mut buf = b"+OK\r\n$3\r\nabc\r\n$-1\r\n-ERR x\r\n:5\r\n$4\r\nab".to_vec();
        assert_eq!(parse_resp_reply(&mut buf).unwrap(), Some(0), "+OK");
        assert_eq!(parse_resp_reply(&mut buf).unwrap(), Some(0), "a value");
        assert_eq!(parse_resp_reply(&mut buf).unwrap(), Some(2), "nil: not found");
        assert_eq!(parse_resp_reply(&mut buf).unwrap(), Some(1), "an error reply");
        assert_eq!(parse_resp_reply(&mut buf).unwrap(), Some(0), "an integer");
        assert_eq!(parse_resp_reply(&mut buf).unwrap(), None, "half a value waits");
        buf.extend_from_slice(b"cd\r\n");
        assert_eq!(parse_resp_reply(&mut buf).unwrap(), Some(0));
        assert!(buf.is_empty());
        assert!(parse_resp_reply(&mut b"*1\r\n".to_vec()).is_err(), "arrays are not replies to GET/SET");
        assert!(parse_resp_reply(&mut b"$x\r\n".to_vec()).is_err());
        assert!(parse_resp_reply(&mut b"$1\r\nabc\r\n".to_vec()).is_err(), "value longer than announced");
        assert!(parse_resp_reply(&mut b"$9999999999\r\n".to_vec()).is_err(), "absurd length");
    }
}
