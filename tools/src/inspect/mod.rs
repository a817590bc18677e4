//! `ferrospike-inspect`: an offline, read-only look at a Ferrospike device or file.

mod device;
mod scan;

use std::collections::HashMap;
use std::fmt::Write as _;

use ferrospike_engine::config::parse_size;
use ferrospike_engine::format::{decode_record, RecordLoc, WblockHeader, HEADER_FLAG_CLEAN, WBLOCK_HEADER_BYTES};
use ferrospike_engine::{Digest, UserKey, Value};

pub use device::{Device, Headers, Identity};
pub use scan::{damaged_records, Damaged};

pub const USAGE: &str = "\
ferrospike-inspect: offline, read-only inspection of a Ferrospike device or file

USAGE:
    ferrospike-inspect DEVICE|FILE COMMAND [OPTIONS]

COMMANDS:
    header          both device header copies, the one in use, and the geometry
    wblocks         write blocks: free / used / defrag-eligible counts and a fill histogram
                    (live bytes = bytes of the newest copy of each record)
    verify          check every record's checksum and location; count live (newest version
                    of each digest), superseded, stale (left over from an earlier use of a
                    write block), tombstones, and damaged records (torn or corrupt), naming
                    each damaged record's digest. Exit status 1 when damage is found.
    get --namespace NS --set SET --key KEY [--key-type int|str|blob]
    get --digest HEX
                    every copy of one record on the device, newest first, with its bins
                    (--key-type defaults to str; blob keys are given in hex)
    dump-wblock N   the header and every record of write block N

OPTIONS:
    --write-block-size SIZE   write-block size (e.g. 1M); needed when the device header is
                              unreadable (the device id is then recovered from the write
                              block headers)
    --defrag-lwm-pct N        defrag threshold for `wblocks` (default 50)
    --help                    this text

The device is opened read-only (O_DIRECT when possible). Long scans print progress to
stderr. Exit status: 0 fine, 1 damage found (verify), 2 usage or I/O error.
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    Header,
    Wblocks,
    Verify,
    Get { namespace: Option<String>, digest: Digest },
    DumpWblock(u32),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub path: String,
    pub cmd: Cmd,
    pub wblock_bytes: Option<u32>,
    pub defrag_lwm_pct: u32,
}

pub fn parse_args(args: &[String]) -> Result<Options, String> {
    if args.iter().any(|a| a == "--help" || a == "-h") {
        return Err(USAGE.into());
    }
    let mut pos = Vec::new();
    let (mut ns, mut set, mut key, mut key_type, mut digest) = (None, None, None, "str".to_string(), None);
    let mut wblock_bytes = None;
    let mut lwm = 50;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        match a.as_str() {
            "--namespace" => ns = Some(val(a)?),
            "--set" => set = Some(val(a)?),
            "--key" => key = Some(val(a)?),
            "--key-type" => key_type = val(a)?,
            "--digest" => digest = Some(val(a)?),
            "--write-block-size" => {
                let v = val(a)?;
                let n = parse_size(&v).filter(|n| n.is_power_of_two() && (128 << 10..=8 << 20).contains(n));
                wblock_bytes =
                    Some(n.ok_or(format!("--write-block-size: '{v}' is not a power of two, 128K..8M"))? as u32);
            }
            "--defrag-lwm-pct" => {
                let v = val(a)?;
                lwm = v
                    .parse()
                    .ok()
                    .filter(|n| (1..100).contains(n))
                    .ok_or(format!("--defrag-lwm-pct: bad value '{v}'"))?;
            }
            s if s.starts_with("--") => return Err(format!("unknown option '{s}' (see --help)")),
            s => pos.push(s.to_string()),
        }
    }
    let (path, cmd) = match pos.as_slice() {
        [p, c, rest @ ..] => (p.clone(), (c.as_str(), rest)),
        _ => return Err("usage: ferrospike-inspect DEVICE|FILE COMMAND (see --help)".into()),
    };
    let cmd = match cmd {
        ("header", []) => Cmd::Header,
        ("wblocks", []) => Cmd::Wblocks,
        ("verify", []) => Cmd::Verify,
        ("dump-wblock", [n]) => Cmd::DumpWblock(n.parse().map_err(|_| format!("dump-wblock: bad number '{n}'"))?),
        ("get", []) => {
            let digest = match (digest, key) {
                (Some(h), None) => Digest::from_hex(&h).ok_or(format!("--digest: '{h}' is not 40 hex digits"))?,
                (None, Some(k)) => {
                    let set = set.unwrap_or_default();
                    user_key(&k, &key_type)?.digest(&set)
                }
                _ => return Err("get needs --key (with --set) or --digest".into()),
            };
            Cmd::Get { namespace: ns, digest }
        }
        (c, _) => return Err(format!("unknown command or wrong arguments: '{c}' (see --help)")),
    };
    Ok(Options { path, cmd, wblock_bytes, defrag_lwm_pct: lwm })
}

fn user_key(k: &str, t: &str) -> Result<UserKey, String> {
    match t {
        "int" => k.parse().map(UserKey::Int).map_err(|_| format!("--key '{k}' is not an integer")),
        "str" => Ok(UserKey::Str(k.into())),
        "blob" => {
            let bytes: Option<Vec<u8>> =
                (0..k.len()).step_by(2).map(|i| k.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok())).collect();
            bytes.map(UserKey::Blob).ok_or(format!("--key '{k}' is not hex (blob keys are given in hex)"))
        }
        _ => Err(format!("--key-type must be int, str or blob, not '{t}'")),
    }
}

pub fn main(args: Vec<String>) -> i32 {
    let opts = match crate::options_or_exit(parse_args(&args), USAGE, "ferrospike-inspect") {
        Ok(o) => o,
        Err(code) => return code,
    };
    match run(&opts) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ferrospike-inspect: {e}");
            2
        }
    }
}

fn run(o: &Options) -> Result<i32, String> {
    let dev = Device::open(&o.path)?;
    let headers = Headers::read(&dev)?;
    if o.cmd == Cmd::Header {
        print!("{}", header_text(&dev, &headers));
        return Ok(if headers.best().is_some() { 0 } else { 1 });
    }
    let id = device::identity(&dev, &headers, o.wblock_bytes)?;
    match &o.cmd {
        Cmd::Header => unreachable!("handled above"),
        Cmd::Wblocks => wblocks(&dev, &id, o.defrag_lwm_pct),
        Cmd::Verify => verify(&dev, &id),
        Cmd::Get { namespace, digest } => {
            if let (Some(ns), Some(h)) = (namespace, headers.best()) {
                if *ns != h.namespace {
                    eprintln!(
                        "ferrospike-inspect: warning: the device belongs to namespace '{}', not '{ns}'",
                        h.namespace
                    );
                }
            }
            get(&dev, &id, digest)
        }
        Cmd::DumpWblock(n) => dump_wblock(&dev, &id, *n),
    }
}

fn header_text(dev: &Device, h: &Headers) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{}: {} bytes ({} MiB), read {}",
        dev.path,
        dev.size_bytes,
        dev.size_bytes >> 20,
        if dev.direct { "with O_DIRECT" } else { "buffered" }
    );
    for (i, c) in h.copies.iter().enumerate() {
        let _ = write!(s, "copy {} (offset {}): ", ["A", "B"][i], i * 4096);
        match c {
            Ok(x) => {
                let _ = writeln!(s, "valid, write_seq {}", x.write_seq);
            }
            Err(e) => {
                let _ = writeln!(s, "invalid: {e}");
            }
        }
    }
    match h.best() {
        None => s.push_str("no valid header: blank, foreign or damaged device\n"),
        Some(x) => {
            let wb = x.wblock_bytes as u64;
            let _ = writeln!(s, "in use: write_seq {}", x.write_seq);
            let _ = writeln!(s, "  namespace          {}", x.namespace);
            let _ = writeln!(s, "  device             {} of {}", x.device_index, x.n_devices);
            let _ = writeln!(s, "  device id          {:#018x}", x.device_id);
            let _ = writeln!(s, "  namespace signature {:#018x}", x.namespace_signature);
            let _ = writeln!(s, "  write-block-size   {} ({} KiB)", wb, wb >> 10);
            let _ = writeln!(
                s,
                "  usable bytes       {} ({} write blocks, {} for data)",
                x.device_bytes,
                x.device_bytes / wb,
                (x.device_bytes / wb).saturating_sub(1)
            );
            let _ = writeln!(
                s,
                "  clean shutdown     {}",
                if x.flags & HEADER_FLAG_CLEAN != 0 { "yes" } else { "no (in use, or crashed)" }
            );
            let _ = writeln!(s, "  formatted          {} ms after 2010-01-01 UTC", x.format_time_ms);
            for t in &x.truncates {
                let what = if t.set.is_empty() { "every set".to_string() } else { format!("set {}", t.set) };
                let _ = writeln!(
                    s,
                    "  truncate           {what}: records last updated before {} ms after 2010-01-01 UTC \
                     (the server ignores them; verify and get still list them)",
                    t.before_ms
                );
            }
            if x.device_bytes > dev.size_bytes {
                let _ = writeln!(s, "  WARNING: the device is smaller ({} bytes) than when formatted", dev.size_bytes);
            }
        }
    }
    s
}

/// One copy of a record found by a scan.
#[derive(Clone, Copy)]
struct Copy {
    seq: u64,
    wblock: u32,
    plen: u32,
    tombstone: bool,
}

/// Every verified current-use record, newest copy per digest, and the rest of the counts.
#[derive(Default)]
struct Census {
    newest: HashMap<Digest, Copy>,
    records: u64,
    stale: u64,
    damaged_stretches: u64,
    damaged: Vec<Damaged>,
    written_wblocks: u64,
    header_damaged_wblocks: u64,
}

fn census(dev: &Device, id: &Identity, what: &str, find_damage: bool) -> Result<Census, String> {
    let mut c = Census::default();
    scan::for_each_wblock(dev, id, what, |w, buf, s| {
        if s.seq != 0 {
            c.written_wblocks += 1;
            let hdr_ok = WblockHeader::decode(&buf[..WBLOCK_HEADER_BYTES])
                .map(|h| h.wblock_id == w && h.device_id == id.device_id && h.wblock_seq == s.seq)
                .unwrap_or(false);
            if !hdr_ok {
                c.header_damaged_wblocks += 1;
            }
        }
        c.records += s.records.len() as u64;
        c.stale += s.stale;
        c.damaged_stretches += s.corrupt;
        if find_damage && s.corrupt > 0 {
            c.damaged.extend(damaged_records(buf, id, w, &s));
        }
        for (meta, _off, plen, _) in &s.records {
            let copy = Copy { seq: meta.seq, wblock: w, plen: *plen, tombstone: meta.tombstone };
            c.newest
                .entry(meta.digest)
                .and_modify(|e| {
                    if copy.seq > e.seq {
                        *e = copy;
                    }
                })
                .or_insert(copy);
        }
    })?;
    Ok(c)
}

fn verify(dev: &Device, id: &Identity) -> Result<i32, String> {
    let c = census(dev, id, "verify", true)?;
    let live = c.newest.values().filter(|x| !x.tombstone).count();
    let tombstones = c.newest.len() - live;
    let torn = c.damaged.iter().filter(|d| d.torn).count();
    println!(
        "{}: {} data write blocks of {} KiB, {} written",
        dev.path,
        id.n_wblocks.saturating_sub(1),
        id.wblock_bytes >> 10,
        c.written_wblocks
    );
    println!("records verified:   {}", c.records);
    println!("live:               {live} (newest version of each digest)");
    println!("tombstones:         {tombstones} (newest version is a delete)");
    println!("superseded:         {} (older versions of live digests)", c.records - c.newest.len() as u64);
    println!("stale:              {} (left over from an earlier use of a write block)", c.stale);
    println!(
        "damaged:            {} stretch(es); {} damaged record(s): {} torn, {} corrupt",
        c.damaged_stretches,
        c.damaged.len(),
        torn,
        c.damaged.len() - torn
    );
    if c.header_damaged_wblocks > 0 {
        println!("write block headers damaged: {} (their records still verify)", c.header_damaged_wblocks);
    }
    for d in &c.damaged {
        println!(
            "DAMAGED {} wblock {} offset {} digest {} ({})",
            if d.torn { "torn" } else { "corrupt" },
            d.wblock,
            d.offset,
            d.digest.map(|x| x.to_hex()).unwrap_or_else(|| "unreadable".into()),
            d.reason
        );
    }
    let damaged = c.damaged_stretches > 0 || !c.damaged.is_empty();
    println!("{}", if damaged { "RESULT: DAMAGE FOUND" } else { "RESULT: clean" });
    Ok(if damaged { 1 } else { 0 })
}

fn wblocks(dev: &Device, id: &Identity, lwm: u32) -> Result<i32, String> {
    let c = census(dev, id, "wblocks", false)?;
    let n = id.n_wblocks.saturating_sub(1) as usize;
    let mut live = vec![0u64; id.n_wblocks as usize];
    for x in c.newest.values() {
        live[x.wblock as usize] += x.plen as u64;
    }
    let wb = id.wblock_bytes as u64;
    let mut hist = [0u64; 11];
    let (mut free, mut used, mut eligible) = (0u64, 0u64, 0u64);
    for &l in &live[1..] {
        if l == 0 {
            free += 1;
            continue;
        }
        used += 1;
        let pct = l * 100 / wb;
        hist[(pct / 10).min(10) as usize] += 1;
        if pct < lwm as u64 {
            eligible += 1;
        }
    }
    let total_live: u64 = live.iter().sum();
    println!("{}: {} data write blocks of {} KiB", dev.path, n, wb >> 10);
    println!("free:             {free} (no live records)");
    println!("used:             {used}");
    println!("defrag-eligible:  {eligible} (used, live bytes below {lwm}%)");
    println!(
        "live bytes:       {} ({:.1}% of the data space)",
        total_live,
        total_live as f64 * 100.0 / (n as u64 * wb).max(1) as f64
    );
    println!("fill of used write blocks (live bytes):");
    for (i, &h) in hist.iter().enumerate() {
        if i == 10 {
            println!("  100%      {h:>10}");
        } else {
            println!("  {:>3}-{:<3}%  {h:>10}", i * 10, i * 10 + 10);
        }
    }
    Ok(0)
}

fn format_value(v: &Value) -> String {
    let hex = |b: &[u8]| {
        let shown: String = b.iter().take(32).map(|x| format!("{x:02x}")).collect();
        if b.len() > 32 {
            format!("{shown}… ({} bytes)", b.len())
        } else {
            shown
        }
    };
    match v {
        Value::Nil => "nil".into(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Str(s) => format!("{:?}", String::from_utf8_lossy(s)),
        Value::Blob(b) => format!("blob {}", hex(b)),
        other => format!("particle {} {}", other.particle_type(), {
            let mut b = Vec::new();
            other.encode_into(&mut b);
            hex(&b)
        }),
    }
}

fn get(dev: &Device, id: &Identity, digest: &Digest) -> Result<i32, String> {
    let mut copies = Vec::new();
    let wb = id.wblock_bytes as usize;
    scan::for_each_wblock(dev, id, "get", |w, buf, s| {
        for (meta, off, _plen, _) in &s.records {
            if meta.digest == *digest {
                let loc = RecordLoc {
                    device_id: id.device_id,
                    device_index: id.device_index,
                    wblock_id: w,
                    wblock_seq: s.seq,
                    offset: *off,
                };
                copies.push((meta.seq, loc, decode_record(&buf[*off as usize..], &loc, wb - *off as usize)));
            }
        }
    })?;
    println!("digest {} (partition {})", digest.to_hex(), digest.partition());
    if copies.is_empty() {
        println!("not found on {}", dev.path);
        return Ok(1);
    }
    copies.sort_by_key(|c| std::cmp::Reverse(c.0));
    for (i, (seq, loc, rec)) in copies.iter().enumerate() {
        let role = if i == 0 { "CURRENT" } else { "superseded" };
        match rec {
            Ok(r) => {
                println!(
                    "{role}: {loc}, seq {seq}, generation {}, void-time {}, last-update {} ms{}",
                    r.meta.generation,
                    r.meta.void_time,
                    r.meta.last_update_ms,
                    if r.meta.tombstone { ", TOMBSTONE (deleted)" } else { "" }
                );
                if !r.set.is_empty() {
                    println!("  set: {}", r.set);
                }
                if let Some(k) = &r.key {
                    match UserKey::from_field(k) {
                        Some(UserKey::Int(v)) => println!("  key: {v} (int)"),
                        Some(UserKey::Str(v)) => println!("  key: {v:?} (str)"),
                        _ => println!("  key: {}", k.iter().map(|b| format!("{b:02x}")).collect::<String>()),
                    }
                }
                for b in &r.bins {
                    println!("  bin {}: {}", b.name, format_value(&b.value));
                }
            }
            Err(e) => println!("{role}: {loc}, seq {seq}: cannot decode: {e}"),
        }
    }
    Ok(0)
}

fn dump_wblock(dev: &Device, id: &Identity, w: u32) -> Result<i32, String> {
    if w == 0 || w >= id.n_wblocks {
        return Err(format!("write block {w} is out of range 1..{}", id.n_wblocks.saturating_sub(1)));
    }
    let wb = id.wblock_bytes as usize;
    let buf = dev.read(w as u64 * wb as u64, wb)?;
    let s = ferrospike_engine::coldstart::scan_wblock(&buf, id.device_id, id.device_index, w);
    println!("write block {w} at offset {} ({} KiB)", w as u64 * wb as u64, wb >> 10);
    match WblockHeader::decode(&buf[..WBLOCK_HEADER_BYTES]) {
        Ok(h) => println!(
            "header: shard {}, wblock_seq {}, wblock id {}, device {} (id {:#018x}){}",
            h.shard,
            h.wblock_seq,
            h.wblock_id,
            h.device_index,
            h.device_id,
            if h.device_id != id.device_id || h.wblock_id != w { " — NOT THIS DEVICE/BLOCK" } else { "" }
        ),
        Err(e) => println!("header: invalid ({e})"),
    }
    println!(
        "current use: seq {}, {} records, {} stale, {} damaged stretch(es)",
        s.seq,
        s.records.len(),
        s.stale,
        s.corrupt
    );
    println!("{:>8} {:>7}  {:<40} {:>12} {:>5}  flags", "offset", "bytes", "digest", "seq", "gen");
    for (meta, off, plen, has_key) in &s.records {
        println!(
            "{off:>8} {plen:>7}  {:<40} {:>12} {:>5}  {}{}",
            meta.digest.to_hex(),
            meta.seq,
            meta.generation,
            if meta.tombstone { "tombstone " } else { "" },
            if *has_key { "key" } else { "" }
        );
    }
    for d in damaged_records(&buf, id, w, &s) {
        println!(
            "{:>8} {:>7}  {:<40} DAMAGED {} ({})",
            d.offset,
            "?",
            d.digest.map(|x| x.to_hex()).unwrap_or_default(),
            if d.torn { "torn" } else { "corrupt" },
            d.reason
        );
    }
    let used = s.records.iter().map(|r| r.1 + r.2).max().unwrap_or(WBLOCK_HEADER_BYTES as u32);
    println!("bytes used by the current use: {used} of {wb}");
    Ok(if s.corrupt > 0 { 1 } else { 0 })
}
