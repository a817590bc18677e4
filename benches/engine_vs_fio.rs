//! Engine-only throughput and latency next to fio, on the same device, in the same run
//! (issue 2's benchmark; STYLE.md habit 14).
//!
//! ```text
//! cargo bench --bench engine_vs_fio -- [--size 4G] [--seconds 8] [--runs 3]
//!                                      [--device /dev/loopN | --file PATH]
//!                                      [--threads 2] [--inflight 256] [--qd 32] [--shards N]
//!                                      [--post-write-cache 0] [--driver shard|threads]
//! ```
//!
//! By default (as root, with losetup) it creates a sparse image under the cargo target
//! directory and a loop device over it with direct I/O, detached on exit, error, panic and
//! Ctrl-C. Each run measures, on that device:
//!
//! 1. fio sequential writes (bs = write-block-size, O_DIRECT, io_uring, iodepth 4) against
//!    engine puts of 1536-byte records (random digests, `--inflight` requests in flight) in
//!    buffered mode, the elapsed time including the final flush;
//! 2. fio 4 KiB random reads at queue depth `--qd` over the region fio wrote, against engine
//!    gets of random records written in step 1 (post-write-cache 0) with `--qd` in flight;
//! 3. engine commit-to-device puts against the buffered puts of step 1, next to fio
//!    sequential O_DSYNC writes with the same bytes in flight as the engine's commit puts
//!    (one job per shard, 2 writes in flight each, each `--inflight` x 1536 B / (2 x shards)
//!    rounded down to 4 KiB): the device's limit for durable writes at that concurrency.
//!
//! The load comes from a driver inside each shard's loop by default (`--driver shard`: a
//! [`ShardHook`], the way the server's front-end drives the engine, each shard working on
//! records of its own partitions), or from `--threads` submitter threads calling
//! `Engine::submit` (`--driver threads`: every command and reply crosses threads).
//!
//! The device is discarded (holes punched) before each write phase, so fio and the engine
//! both write into unallocated space of the image and both read allocated space.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command as Proc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// The allocator the ferrospike binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use crossbeam_channel::RecvTimeoutError;
use ferrospike_engine::format::{padded, record_len};
use ferrospike_engine::hook::{HookCtx, ShardHook};
use ferrospike_engine::io::{open_devices, DeviceSet, DeviceSpec, Doorbell};
use ferrospike_engine::{Bin, Command, Digest, Engine, EngineConfig, EngineStats, Reply, ResultCode, Value};
use hdrhistogram::Histogram;

/// Stored size of every benchmark record (header, set name, one blob bin, padding).
const RECORD_BYTES: usize = 1536;
const SET: &str = "bench";
const BIN: &str = "b";
/// Goals of issue 2.
const GOAL_PUTS_VS_FIO: f64 = 0.90;
const GOAL_GETS_VS_FIO: f64 = 0.90;
const GOAL_COMMIT_VS_BUFFERED: f64 = 0.70;
/// Puts stop when fewer than this fraction of the engine's wblocks is free (running out of
/// space, and defrag's work near it, is not what is measured).
const MIN_FREE_FRACTION: f64 = 0.12;
/// fio's durable-write reference holds as many bytes in flight as the engine's commit puts:
/// one job per shard, this many O_DSYNC writes in flight per job.
const FIO_DSYNC_QD: usize = 2;

/// The fio durable-write job matching the engine's commit load: (jobs, bytes per write).
/// `--inflight` records of `RECORD_BYTES` spread over one job per shard, `FIO_DSYNC_QD`
/// writes each, rounded down to 4 KiB.
fn dsync_shape(args: &Args) -> (usize, usize) {
    let jobs = engine_config(args, true).shards.max(1);
    let bs = (args.inflight * RECORD_BYTES / (jobs * FIO_DSYNC_QD)) / 4096 * 4096;
    (jobs, bs.clamp(4096, 8 << 20))
}

/// Delay before a put answered DEVICE_OVERLOAD is sent again, as a client would.
const OVERLOAD_RETRY: Duration = Duration::from_micros(500);

/// Set by SIGINT/SIGTERM; every loop checks it, so the guards run and detach the loop device.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    // SAFETY: signal() is async-signal-safe; a second Ctrl-C then kills the process.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::Relaxed)
}

type Res<T> = Result<T, String>;

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .try_init();
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("engine_vs_fio: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    // SAFETY: installing a handler that only stores to an atomic and calls signal().
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let code = match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("engine_vs_fio: FAILED: {e}");
            1
        }
    };
    // Guards have been dropped inside run(); exit with the status.
    std::process::exit(code);
}

const USAGE: &str = "usage: cargo bench --bench engine_vs_fio -- [--size 4G] [--seconds 8] [--runs 3] \
[--device /dev/loopN | --file PATH] [--threads 2] [--inflight 256] [--qd 32] [--shards N] [--post-write-cache 0] [--driver shard|threads]";

struct Args {
    size: u64,
    seconds: f64,
    runs: usize,
    device: Option<PathBuf>,
    file: Option<PathBuf>,
    threads: usize,
    inflight: usize,
    qd: usize,
    shards: Option<usize>,
    /// `post-write-cache` of the engine (0 by default, so gets miss every cache).
    post_write_cache: u64,
    driver: Driver,
}

impl Args {
    fn parse(mut it: impl Iterator<Item = String>) -> Res<Args> {
        let mut a = Args {
            size: 4 << 30,
            seconds: 8.0,
            runs: 3,
            device: None,
            file: None,
            threads: 2,
            inflight: 256,
            qd: 32,
            shards: None,
            post_write_cache: 0,
            driver: Driver::Shard,
        };
        while let Some(k) = it.next() {
            if k == "--bench" {
                continue; // passed by `cargo bench`
            }
            if k == "--help" || k == "-h" {
                println!("{USAGE}");
                std::process::exit(0);
            }
            let v = it.next().ok_or(format!("{k} needs a value"))?;
            let num = |v: &str| v.parse::<usize>().map_err(|_| format!("{k}: '{v}' is not a number"));
            match k.as_str() {
                "--size" => {
                    a.size = ferrospike_engine::config::parse_size(&v).ok_or(format!("--size: bad size '{v}'"))?
                }
                "--seconds" => a.seconds = v.parse().map_err(|_| format!("--seconds: '{v}' is not a number"))?,
                "--runs" => a.runs = num(&v)?.max(1),
                "--device" => a.device = Some(v.into()),
                "--file" => a.file = Some(v.into()),
                "--threads" => a.threads = num(&v)?.max(1),
                "--inflight" => a.inflight = num(&v)?.max(1),
                "--qd" => a.qd = num(&v)?.max(1),
                "--shards" => a.shards = Some(num(&v)?),
                "--post-write-cache" => {
                    a.post_write_cache = ferrospike_engine::config::parse_size(&v)
                        .ok_or(format!("--post-write-cache: bad size '{v}'"))?
                }
                "--driver" => {
                    a.driver = match v.as_str() {
                        "shard" => Driver::Shard,
                        "threads" => Driver::Threads,
                        _ => return Err(format!("--driver: '{v}' is neither 'shard' nor 'threads'")),
                    }
                }
                _ => return Err(format!("unknown option {k}")),
            }
        }
        if a.device.is_some() && a.file.is_some() {
            return Err("--device and --file exclude each other".into());
        }
        if a.seconds <= 0.0 {
            return Err("--seconds must be positive".into());
        }
        Ok(a)
    }
}

// ------------------------------------------------------------------------------------ target

/// The device under test, and what to undo on drop.
struct Target {
    path: PathBuf,
    kind: TargetKind,
    size: u64,
}

enum TargetKind {
    /// A loop device this process attached over `image` (detached and removed on drop).
    Loop { image: PathBuf },
    /// A block device given by the user.
    Block,
    /// A regular file; removed on drop when this process created it.
    File { created: bool },
}

impl Drop for Target {
    fn drop(&mut self) {
        match &self.kind {
            TargetKind::Loop { image } => {
                let ok = Proc::new("losetup").arg("-d").arg(&self.path).status().is_ok_and(|s| s.success());
                if ok {
                    eprintln!("detached {}", self.path.display());
                } else {
                    eprintln!(
                        "WARNING: could not detach {}; run: losetup -d {}",
                        self.path.display(),
                        self.path.display()
                    );
                }
                let _ = std::fs::remove_file(image);
            }
            TargetKind::File { created: true } => {
                let _ = std::fs::remove_file(&self.path);
            }
            _ => {}
        }
    }
}

impl Target {
    fn setup(args: &Args) -> Res<Target> {
        let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(&scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
        if let Some(dev) = &args.device {
            let size = blockdev(dev, "--getsize64")?;
            eprintln!("WARNING: every byte of {} will be overwritten and discarded", dev.display());
            return Ok(Target { path: dev.clone(), kind: TargetKind::Block, size });
        }
        if let Some(f) = &args.file {
            let created = !f.exists();
            let t = Target { path: f.clone(), kind: TargetKind::File { created }, size: args.size };
            t.reset()?;
            return Ok(t);
        }
        match Self::make_loop(&scratch, args.size) {
            Ok(t) => Ok(t),
            Err(why) => {
                let path = scratch.join("engine_vs_fio.dat");
                eprintln!();
                eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
                eprintln!("!! NO LOOP DEVICE ({why})");
                eprintln!("!! falling back to a FILE: {} — numbers include the filesystem", path.display());
                eprintln!("!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!");
                eprintln!();
                let t = Target { path, kind: TargetKind::File { created: true }, size: args.size };
                t.reset()?;
                Ok(t)
            }
        }
    }

    fn make_loop(dir: &Path, size: u64) -> Res<Target> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let image = dir.join(format!("engine_vs_fio-{}.img", std::process::id()));
        let f = std::fs::File::create(&image).map_err(|e| format!("{}: {e}", image.display()))?;
        f.set_len(size).map_err(|e| e.to_string())?;
        drop(f);
        let out = Proc::new("losetup").args(["-f", "--show", "--direct-io=on"]).arg(&image).output();
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                let _ = std::fs::remove_file(&image);
                return Err(format!("losetup: {e}"));
            }
        };
        if !out.status.success() {
            let _ = std::fs::remove_file(&image);
            return Err(format!("losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        let t = Target { path, kind: TargetKind::Loop { image }, size };
        eprintln!("attached {} (sparse image of {} MiB, direct-io requested)", t.path.display(), size >> 20);
        Ok(t)
    }

    fn is_block(&self) -> bool {
        !matches!(self.kind, TargetKind::File { .. })
    }

    fn spec(&self) -> DeviceSpec {
        DeviceSpec { path: self.path.clone(), file_size: if self.is_block() { None } else { Some(self.size) } }
    }

    /// Return the device to "never written": discard a block device (a loop device punches
    /// holes in its image), recreate a file sparse. Falls back to the engine's erase.
    fn reset(&self) -> Res<()> {
        if self.is_block() {
            let st = Proc::new("blkdiscard").arg(&self.path).output();
            if st.as_ref().is_ok_and(|o| o.status.success()) {
                return Ok(());
            }
            let why = match st {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => e.to_string(),
            };
            eprintln!("blkdiscard {} failed ({why}); erasing the Ferrospike header instead", self.path.display());
            let devs = open_devices(&[self.spec()], 8).map_err(|e| e.to_string())?;
            return ferrospike_engine::erase_devices(&devs).map_err(|e| e.to_string());
        }
        let _ = std::fs::remove_file(&self.path);
        let f = std::fs::File::create(&self.path).map_err(|e| format!("{}: {e}", self.path.display()))?;
        f.set_len(self.size).map_err(|e| e.to_string())
    }
}

fn blockdev(dev: &Path, what: &str) -> Res<u64> {
    let out = Proc::new("blockdev").arg(what).arg(dev).output().map_err(|e| format!("blockdev: {e}"))?;
    if !out.status.success() {
        return Err(format!("blockdev {what} {}: {}", dev.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|e| format!("blockdev {what}: {e}"))
}

// ------------------------------------------------------------------------------- environment

fn sh(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Proc::new(cmd).args(args).output().ok()?;
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn sysfs(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok().map(|s| s.trim().to_string())
}

fn environment(args: &Args, t: &Target, cfg: &EngineConfig, fio: Option<&str>) -> String {
    let mut s = String::new();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let _ = writeln!(s, "environment");
    let _ = writeln!(s, "  cores (nproc)       {}", sh("nproc", &[]).unwrap_or_else(|| "?".into()));
    let _ = writeln!(s, "  CPU                 {cpu}");
    let _ = writeln!(s, "  kernel              {}", sh("uname", &["-r"]).unwrap_or_else(|| "?".into()));
    let _ = writeln!(s, "  memory              {}", mem_total());
    let _ = writeln!(s, "  load average        {} (at start; other processes share these cores)", loadavg());
    let name = t.path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let kind = match &t.kind {
        TargetKind::Loop { image } => {
            let fs = sh("findmnt", &["-n", "-o", "FSTYPE,SOURCE", "-T", &image.to_string_lossy()])
                .unwrap_or_else(|| "?".into());
            format!("loop device over sparse image {} ({fs})", image.display())
        }
        TargetKind::Block => "block device".to_string(),
        TargetKind::File { .. } => {
            let fs = sh(
                "findmnt",
                &["-n", "-o", "FSTYPE,SOURCE", "-T", &t.path.parent().unwrap_or(Path::new("/")).to_string_lossy()],
            )
            .unwrap_or_else(|| "?".into());
            format!("REGULAR FILE ({fs}), not a block device")
        }
    };
    let _ = writeln!(s, "  device              {} — {kind}", t.path.display());
    let _ = writeln!(s, "  device size         {} MiB ({} bytes)", t.size >> 20, t.size);
    if t.is_block() {
        let lbs = sysfs(&format!("/sys/class/block/{name}/queue/logical_block_size")).unwrap_or_else(|| "?".into());
        let pbs = sysfs(&format!("/sys/class/block/{name}/queue/physical_block_size")).unwrap_or_else(|| "?".into());
        let _ = writeln!(s, "  logical block size  {lbs} B (physical {pbs} B)");
        let sched = sysfs(&format!("/sys/class/block/{name}/queue/scheduler")).unwrap_or_else(|| "?".into());
        let _ = writeln!(s, "  I/O scheduler       {sched}");
    } else {
        let _ = writeln!(s, "  logical block size  n/a (file)");
    }
    let dio = match &t.kind {
        TargetKind::Loop { .. } | TargetKind::Block if name.starts_with("loop") => {
            match sysfs(&format!("/sys/class/block/{name}/loop/dio")).as_deref() {
                Some("1") => "on".to_string(),
                Some("0") => "OFF (buffered loop: numbers include the page cache)".to_string(),
                _ => "unknown".to_string(),
            }
        }
        _ => "n/a (not a loop device)".to_string(),
    };
    let _ = writeln!(s, "  loop direct-io      {dio}");
    let _ = writeln!(s, "  fio                 {}", fio.unwrap_or("NOT INSTALLED"));
    let _ = writeln!(
        s,
        "  ferrospike          {} shards{}, write-block-size {} KiB, records {RECORD_BYTES} B stored, \
         post-write-cache {} MiB, max-write-cache {} MiB, flush-max-ms {}",
        cfg.shards,
        if cfg.pin_threads { " (pinned)" } else { "" },
        cfg.wblock_bytes >> 10,
        cfg.post_write_cache_bytes >> 20,
        cfg.max_write_cache_bytes >> 20,
        cfg.flush_max_ms
    );
    let from = match args.driver {
        Driver::Shard => "a driver inside each shard's loop (--driver shard)".to_string(),
        Driver::Threads => format!("{} submitter threads (--driver threads)", args.threads),
    };
    let _ = writeln!(
        s,
        "  load                from {from}; puts: {} in flight; gets: {} in flight; fio randread iodepth {}",
        args.inflight, args.qd, args.qd
    );
    let _ = writeln!(
        s,
        "  runs                {} x up to {} s per phase; throughput shown as min / median / max over runs",
        args.runs, args.seconds
    );
    s
}

fn loadavg() -> String {
    sysfs("/proc/loadavg").map_or("?".into(), |l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

fn mem_total() -> String {
    sysfs("/proc/meminfo")
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or("?".into(), |kb| format!("{} MiB", kb >> 10))
}

// ----------------------------------------------------------------------------------------- fio

struct FioResult {
    /// Bytes per second.
    bw: f64,
    iops: f64,
    /// Bytes transferred.
    io_bytes: u64,
    /// Completion latency percentiles in ns: p50, p99, p99.9, max.
    lat: [f64; 4],
}

fn fio_version() -> Option<String> {
    sh("fio", &["--version"])
}

fn run_fio(t: &Target, job: &[String], dir: &str) -> Res<FioResult> {
    let mut cmd = Proc::new("fio");
    cmd.arg(format!("--filename={}", t.path.display()))
        .args(["--direct=1", "--ioengine=io_uring", "--group_reporting", "--output-format=json"])
        .args(job);
    let out = cmd.output().map_err(|e| format!("fio: {e}"))?;
    if interrupted() {
        return Err("interrupted".into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!("fio failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    let start = text.find('{').ok_or("fio printed no JSON")?;
    let json = Json::parse(&text[start..])?;
    let j = json.get("jobs").and_then(|j| j.idx(0)).ok_or("fio JSON has no jobs")?;
    if let Some(e) = j.get("error").and_then(Json::num) {
        if e != 0.0 {
            return Err(format!("fio job error {e}"));
        }
    }
    let d = j.get(dir).ok_or(format!("fio JSON has no '{dir}' section"))?;
    let f = |k: &str| d.get(k).and_then(Json::num).ok_or(format!("fio JSON lacks {dir}.{k}"));
    let clat = d.get("clat_ns").ok_or("fio JSON lacks clat_ns")?;
    let pct = |p: &str| clat.get("percentile").and_then(|x| x.get(p)).and_then(Json::num).unwrap_or(f64::NAN);
    Ok(FioResult {
        bw: f("bw_bytes")?,
        iops: f("iops")?,
        io_bytes: f("io_bytes")? as u64,
        lat: [
            pct("50.000000"),
            pct("99.000000"),
            pct("99.900000"),
            clat.get("max").and_then(Json::num).unwrap_or(f64::NAN),
        ],
    })
}

/// A minimal JSON reader, enough for fio's output.
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn parse(s: &str) -> Res<Json> {
        let mut p = JsonParser { b: s.as_bytes(), i: 0 };
        p.value()
    }

    fn get(&self, k: &str) -> Option<&Json> {
        match self {
            Json::Obj(v) => v.iter().find(|(n, _)| n == k).map(|(_, v)| v),
            _ => None,
        }
    }

    fn idx(&self, i: usize) -> Option<&Json> {
        match self {
            Json::Arr(v) => v.get(i),
            _ => None,
        }
    }

    fn num(&self) -> Option<f64> {
        match self {
            Json::Num(n) => Some(*n),
            Json::Str(s) => s.parse().ok(),
            Json::Bool(b) => Some(*b as u8 as f64),
            Json::Null | Json::Arr(_) | Json::Obj(_) => None,
        }
    }
}

struct JsonParser<'a> {
    b: &'a [u8],
    i: usize,
}

impl JsonParser<'_> {
    fn ws(&mut self) {
        while self.i < self.b.len() && self.b[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn err<T>(&self, what: &str) -> Res<T> {
        Err(format!("fio JSON: {what} at byte {}", self.i))
    }

    fn eat(&mut self, c: u8) -> Res<()> {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            self.err(&format!("expected '{}'", c as char))
        }
    }

    fn value(&mut self) -> Res<Json> {
        self.ws();
        match self.b.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(v));
                }
                loop {
                    self.ws();
                    let k = self.string()?;
                    self.eat(b':')?;
                    v.push((k, self.value()?));
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(v));
                        }
                        _ => return self.err("expected ',' or '}'"),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut v = Vec::new();
                self.ws();
                if self.b.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(v));
                }
                loop {
                    v.push(self.value()?);
                    self.ws();
                    match self.b.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(v));
                        }
                        _ => return self.err("expected ',' or ']'"),
                    }
                }
            }
            Some(b'"') => Ok(Json::Str(self.string()?)),
            Some(b't') if self.b[self.i..].starts_with(b"true") => {
                self.i += 4;
                Ok(Json::Bool(true))
            }
            Some(b'f') if self.b[self.i..].starts_with(b"false") => {
                self.i += 5;
                Ok(Json::Bool(false))
            }
            Some(b'n') if self.b[self.i..].starts_with(b"null") => {
                self.i += 4;
                Ok(Json::Null)
            }
            Some(_) => {
                let start = self.i;
                while self.i < self.b.len() && matches!(self.b[self.i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    self.i += 1;
                }
                let t = std::str::from_utf8(&self.b[start..self.i]).unwrap_or("");
                t.parse().map(Json::Num).or_else(|_| self.err("bad value"))
            }
            None => self.err("unexpected end"),
        }
    }

    fn string(&mut self) -> Res<String> {
        self.eat(b'"')?;
        let mut out = Vec::new();
        while let Some(&c) = self.b.get(self.i) {
            self.i += 1;
            match c {
                b'"' => return Ok(String::from_utf8_lossy(&out).into_owned()),
                b'\\' => {
                    let e = *self.b.get(self.i).ok_or("fio JSON: unterminated escape")?;
                    self.i += 1;
                    match e {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' | b'f' => {}
                        b'u' => {
                            let h = self.b.get(self.i..self.i + 4).ok_or("fio JSON: short \\u")?;
                            let cp = u32::from_str_radix(std::str::from_utf8(h).unwrap_or("x"), 16).unwrap_or(0xfffd);
                            self.i += 4;
                            let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
                            out.extend_from_slice(ch.to_string().as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                c => out.push(c),
            }
        }
        self.err("unterminated string")
    }
}

// ------------------------------------------------------------------------------------ counters

/// CPU seconds (user, system) of the live threads whose name starts with `prefix`.
fn threads_cpu(prefix: &str) -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut user = 0.0;
    let mut sys = 0.0;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else { return (f64::NAN, f64::NAN) };
    for e in dir.flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let (Some(l), Some(r)) = (stat.find('('), stat.rfind(')')) else { continue };
        if !stat[l + 1..r].starts_with(prefix) {
            continue;
        }
        // Fields after the name: state(3) ... utime(14) stime(15), counted from 1.
        let f: Vec<&str> = stat[r + 2..].split_whitespace().collect();
        user += f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / hz;
        sys += f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / hz;
    }
    (user, sys)
}

/// CPU seconds of the calling thread.
fn thread_cpu_now() -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// Minor page faults and context switches (voluntary, involuntary) of the process so far.
fn rusage() -> [u64; 3] {
    // SAFETY: an all-zero rusage is a valid value; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: ru is a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    [ru.ru_minflt as u64, ru.ru_nvcsw as u64, ru.ru_nivcsw as u64]
}

// -------------------------------------------------------------------------------------- engine

/// A digest for record `i` of a run salted `salt`: uniform bytes, so partitions (and shards)
/// are random, at almost no client cost (RIPEMD-160 would be client work, not engine work).
fn digest_of(salt: u64, i: u64) -> Digest {
    let mut d = [0u8; 20];
    let mut x = salt ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for chunk in d.chunks_mut(8) {
        x = splitmix(x);
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    Digest(d)
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Blob length that makes a record of exactly `RECORD_BYTES` on the device.
fn blob_len() -> usize {
    let base = record_len(SET, None, &[Bin::new(BIN, Value::Blob(Vec::new()))]);
    let n = RECORD_BYTES - base;
    assert_eq!(padded(record_len(SET, None, &[Bin::new(BIN, Value::Blob(vec![0; n]))])), RECORD_BYTES);
    n
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("histogram bounds")
}

struct LoadResult {
    ok: u64,
    overloads: u64,
    errors: u64,
    first_error: Option<ResultCode>,
    elapsed: Duration,
    hist: Histogram<u64>,
    stats_before: EngineStats,
    stats_after: EngineStats,
    /// Why the phase ended.
    ended: &'static str,
    /// CPU seconds of the shard threads (user, system) and of the submitter threads.
    shard_cpu: (f64, f64),
    submit_cpu: f64,
    /// Process minor faults and context switches (voluntary, involuntary) during the phase.
    rusage: [u64; 3],
}

impl LoadResult {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn lat(&self) -> [f64; 4] {
        let h = &self.hist;
        [
            h.value_at_quantile(0.50) as f64,
            h.value_at_quantile(0.99) as f64,
            h.value_at_quantile(0.999) as f64,
            h.max() as f64,
        ]
    }
}

struct Completion {
    idx: u64,
    start: Instant,
    rc: ResultCode,
    whole: bool,
}

enum Kind {
    Put { payload: Arc<Vec<u8>> },
    Get { written: u64 },
}

/// Drive `engine` with `threads` submitters keeping `inflight` requests in flight in total
/// until `deadline`, `stop` or (puts) the free-space floor. Latency is measured from the first
/// submission to the final reply (an overloaded put is retried and its wait counted).
fn drive(
    engine: &Arc<Engine>,
    kind: &Kind,
    salt: u64,
    threads: usize,
    inflight: usize,
    seconds: f64,
    flush_at_end: bool,
) -> LoadResult {
    let stats_before = engine.stats();
    let cpu_before = threads_cpu("shard-");
    let ru_before = rusage();
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let mut handles = Vec::new();
    for t in 0..threads {
        let depth = inflight / threads + usize::from(t < inflight % threads);
        let engine = engine.clone();
        let stop = stop.clone();
        let next = next.clone();
        let kind = match kind {
            Kind::Put { payload } => Kind::Put { payload: payload.clone() },
            Kind::Get { written } => Kind::Get { written: *written },
        };
        let seed = splitmix(salt ^ (t as u64 + 1));
        let h = std::thread::Builder::new()
            .name(format!("submit-{t}"))
            .spawn(move || submitter(&engine, &kind, salt, seed, depth, &stop, &next))
            .expect("spawn submitter");
        handles.push(h);
    }
    let ended =
        wait_phase(engine, matches!(kind, Kind::Put { .. }), deadline, || handles.iter().all(|h| h.is_finished()));
    stop.store(true, Ordering::Relaxed);
    let results = handles.into_iter().map(|h| h.join().expect("submitter thread panicked")).collect();
    finish_load(engine, results, stats_before, cpu_before, ru_before, start, ended, flush_at_end)
}

/// Wait until `deadline`, Ctrl-C, (puts) the free-space floor or `finished()`; returns why.
fn wait_phase(engine: &Engine, put: bool, deadline: Instant, finished: impl Fn() -> bool) -> &'static str {
    let total_wblocks = engine.stats().total_wblocks.max(1);
    loop {
        std::thread::sleep(Duration::from_millis(5));
        if interrupted() {
            return "interrupted";
        }
        if Instant::now() >= deadline {
            return "time";
        }
        if put && (engine.stats().free_wblocks as f64) < MIN_FREE_FRACTION * total_wblocks as f64 {
            return "device full";
        }
        if finished() {
            return "submitters done";
        }
    }
}

/// Sum the drivers' results and the engine's counters over a phase.
#[allow(clippy::too_many_arguments)]
fn finish_load(
    engine: &Engine,
    results: Vec<SubmitterResult>,
    stats_before: EngineStats,
    cpu_before: (f64, f64),
    ru_before: [u64; 3],
    start: Instant,
    ended: &'static str,
    flush_at_end: bool,
) -> LoadResult {
    let mut r = LoadResult {
        ok: 0,
        overloads: 0,
        errors: 0,
        first_error: None,
        elapsed: Duration::ZERO,
        hist: new_hist(),
        stats_before,
        stats_after: EngineStats::default(),
        ended,
        shard_cpu: (0.0, 0.0),
        submit_cpu: 0.0,
        rusage: [0; 3],
    };
    for s in results {
        r.ok += s.ok;
        r.overloads += s.overloads;
        r.errors += s.errors;
        r.first_error = r.first_error.or(s.first_error);
        r.submit_cpu += s.cpu;
        r.hist.add(&s.hist).expect("same histogram bounds");
    }
    if flush_at_end {
        engine.flush();
    }
    r.elapsed = start.elapsed();
    r.stats_after = engine.stats();
    let cpu_after = threads_cpu("shard-");
    r.shard_cpu = (cpu_after.0 - cpu_before.0, cpu_after.1 - cpu_before.1);
    let ru_after = rusage();
    r.rusage = [0, 1, 2].map(|i| ru_after[i] - ru_before[i]);
    r
}

struct SubmitterResult {
    ok: u64,
    overloads: u64,
    errors: u64,
    first_error: Option<ResultCode>,
    hist: Histogram<u64>,
    /// CPU seconds this thread used.
    cpu: f64,
}

impl SubmitterResult {
    fn new() -> SubmitterResult {
        SubmitterResult { ok: 0, overloads: 0, errors: 0, first_error: None, hist: new_hist(), cpu: 0.0 }
    }

    /// Count one reply (`whole`: it carried what was asked for) to a command first submitted
    /// at `first`. Returns true for DEVICE_OVERLOAD: the caller sends the command again.
    fn count(&mut self, rc: ResultCode, whole: bool, first: Instant) -> bool {
        match rc {
            ResultCode::Ok if whole => {
                self.ok += 1;
                self.hist.saturating_record(first.elapsed().as_nanos() as u64);
            }
            ResultCode::DeviceOverload => {
                self.overloads += 1;
                return true;
            }
            rc => {
                self.errors += 1;
                self.first_error.get_or_insert(rc);
            }
        }
        false
    }
}

/// The command for record `d`: a put of `payload`, or a get.
fn command(d: Digest, payload: Option<&Arc<Vec<u8>>>) -> Command {
    match payload {
        Some(p) => Command::put(d, SET, vec![Bin::new(BIN, Value::Blob(p.as_ref().clone()))]),
        None => Command::get(d),
    }
}

/// Whether a reply carries what its command asked for: a get, the whole blob of `blen`
/// bytes (a put's reply has no bins to check).
fn whole(r: &Reply, put: bool, blen: usize) -> bool {
    put || matches!(r.bin(BIN), Some(Value::Blob(b)) if b.len() == blen)
}

fn submitter(
    engine: &Engine,
    kind: &Kind,
    salt: u64,
    mut rng: u64,
    depth: usize,
    stop: &AtomicBool,
    next: &AtomicU64,
) -> SubmitterResult {
    let (tx, rx) = crossbeam_channel::unbounded::<Completion>();
    let cpu0 = thread_cpu_now();
    let mut out = SubmitterResult::new();
    let mut in_flight = 0usize;
    let mut retries: VecDeque<(Instant, u64, Instant)> = VecDeque::new();
    let payload = match kind {
        Kind::Put { payload } => Some(payload),
        Kind::Get { .. } => None,
    };
    let blen = blob_len();
    let submit = |idx: u64, first: Instant| {
        let tx = tx.clone();
        let put = payload.is_some();
        engine.submit(command(digest_of(salt, idx), payload), move |r| {
            let _ = tx.send(Completion { idx, start: first, rc: r.result, whole: whole(&r, put, blen) });
        });
    };
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        // Overloaded puts whose pause is over go first.
        let now = Instant::now();
        while retries.front().is_some_and(|r| r.0 <= now) && in_flight < depth {
            // Retried even after the phase ends, so records 0..n are all written.
            let (_, idx, first) = retries.pop_front().expect("non-empty");
            submit(idx, first);
            in_flight += 1;
        }
        while !stopping && in_flight + retries.len() < depth {
            let idx = match kind {
                Kind::Put { .. } => next.fetch_add(1, Ordering::Relaxed),
                Kind::Get { written } => {
                    rng = splitmix(rng);
                    rng % written
                }
            };
            submit(idx, Instant::now());
            in_flight += 1;
        }
        if in_flight == 0 && retries.is_empty() {
            break;
        }
        let wait = retries.front().map_or(Duration::from_millis(50), |r| r.0.saturating_duration_since(Instant::now()));
        let c = match rx.recv_timeout(wait) {
            Ok(c) => c,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => unreachable!("the submitter holds a sender"),
        };
        in_flight -= 1;
        let handle = |c: Completion, out: &mut SubmitterResult, retries: &mut VecDeque<_>| {
            if out.count(c.rc, c.whole, c.start) {
                retries.push_back((Instant::now() + OVERLOAD_RETRY, c.idx, c.start));
            }
        };
        handle(c, &mut out, &mut retries);
        while let Ok(c) = rx.try_recv() {
            in_flight -= 1;
            handle(c, &mut out, &mut retries);
        }
    }
    out.cpu = thread_cpu_now() - cpu0;
    out
}

struct EngineRun {
    open_secs: f64,
    put: LoadResult,
    get: Option<LoadResult>,
}

fn engine_config(args: &Args, commit: bool) -> EngineConfig {
    let mut cfg = EngineConfig::new("bench");
    if let Some(s) = args.shards {
        cfg.shards = s;
    }
    cfg.wblock_bytes = 1 << 20;
    cfg.commit_to_device = commit;
    cfg.post_write_cache_bytes = args.post_write_cache;
    cfg
}

/// Reset the device, open a fresh engine, run puts (and then gets on what they wrote).
fn engine_run(t: &Target, args: &Args, commit: bool, with_gets: bool, payload: &Arc<Vec<u8>>) -> Res<EngineRun> {
    t.reset()?;
    let cfg = engine_config(args, commit);
    let t0 = Instant::now();
    let devs: Arc<dyn DeviceSet> = Arc::new(open_devices(&[t.spec()], cfg.ring_entries).map_err(|e| e.to_string())?);
    let ctl = Arc::new(Ctl::default());
    let hooks: Vec<Box<dyn ShardHook>> = match args.driver {
        Driver::Shard => (0..cfg.shards).map(|i| Box::new(ShardDriver::new(i, ctl.clone())) as _).collect(),
        Driver::Threads => Vec::new(),
    };
    let engine = Arc::new(Engine::open_with_hooks(cfg, devs, hooks).map_err(|e| e.to_string())?);
    let open_secs = t0.elapsed().as_secs_f64();
    let salt = splitmix(rand::random());
    let put = match args.driver {
        Driver::Shard => drive_in_shard(&engine, &ctl, Some(payload.clone()), salt, args.inflight, args.seconds, true),
        Driver::Threads => drive(
            &engine,
            &Kind::Put { payload: payload.clone() },
            salt,
            args.threads,
            args.inflight,
            args.seconds,
            true,
        ),
    };
    if interrupted() {
        return Err("interrupted".into());
    }
    let get = if with_gets && put.errors == 0 && put.ok > 0 {
        // Records are numbered densely from 0, and every one was retried until acknowledged.
        let written = put.ok;
        Some(match args.driver {
            Driver::Shard => drive_in_shard(&engine, &ctl, None, salt, args.qd, args.seconds, false),
            Driver::Threads => {
                drive(&engine, &Kind::Get { written }, salt, args.threads.min(args.qd), args.qd, args.seconds, false)
            }
        })
    } else {
        None
    };
    let engine = Arc::try_unwrap(engine).map_err(|_| "engine still referenced")?;
    engine.shutdown().map_err(|e| e.to_string())?;
    drop(engine);
    if interrupted() {
        return Err("interrupted".into());
    }
    Ok(EngineRun { open_secs, put, get })
}

// ------------------------------------------------------------------------- in-shard driver

/// Where the load comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Driver {
    /// A load generator inside each shard's loop (a [`ShardHook`]), the way the server's
    /// front-end drives the engine: each shard works on records of its own partitions, so
    /// commands and replies never cross threads.
    Shard,
    /// Submitter threads calling [`Engine::submit`]: every command and every reply crosses
    /// threads (the API the tools use).
    Threads,
}

/// One load phase as the in-shard drivers see it.
#[derive(Clone)]
struct Phase {
    put: Option<Arc<Vec<u8>>>,
    /// Commands each shard keeps in flight (index: shard).
    depth: Vec<usize>,
    salt: u64,
}

/// What the main thread and the in-shard drivers share.
#[derive(Default)]
struct Ctl {
    /// Bumped (after `phase` is set) to start a phase.
    epoch: AtomicU64,
    phase: Mutex<Option<Phase>>,
    /// Set to end the phase: drivers stop starting commands, finish what is in flight
    /// (overloaded puts are retried to the end) and hand in their results.
    stop: AtomicBool,
    bells: Mutex<Vec<Arc<Doorbell>>>,
    done: Mutex<Vec<SubmitterResult>>,
}

impl Ctl {
    fn ring_all(&self) {
        for b in self.bells.lock().expect("bells").iter() {
            b.ring();
        }
    }
}

/// Counters the driver's callbacks update (they run on the same shard thread, so the lock is
/// never contended).
struct DriverState {
    in_flight: usize,
    /// Commands answered DEVICE_OVERLOAD, sent again on the next turn: (record, first
    /// submission).
    retries: Vec<(u64, Instant)>,
    /// Replies other than DEVICE_OVERLOAD since the previous turn.
    answered: u64,
    res: SubmitterResult,
}

struct ShardDriver {
    id: usize,
    ctl: Arc<Ctl>,
    seen: u64,
    phase: Option<Phase>,
    st: Arc<Mutex<DriverState>>,
    /// Records this shard's puts numbered so far (all acknowledged when a put phase ends).
    next: u64,
    /// Records written by the last put phase.
    written: u64,
    rng: u64,
    blen: usize,
}

impl ShardDriver {
    fn new(id: usize, ctl: Arc<Ctl>) -> ShardDriver {
        ShardDriver {
            id,
            ctl,
            seen: 0,
            phase: None,
            st: Arc::new(Mutex::new(DriverState {
                in_flight: 0,
                retries: Vec::new(),
                answered: 0,
                res: SubmitterResult::new(),
            })),
            next: 0,
            written: 0,
            rng: splitmix(id as u64 + 1),
            blen: blob_len(),
        }
    }

    /// The digest of this shard's record `i`: the first of a disjoint run of candidates that
    /// falls in one of this shard's partitions.
    fn digest(&self, ctx: &HookCtx<'_>, salt: u64, i: u64) -> Digest {
        let salt = salt ^ splitmix(self.id as u64 + 0x5eed);
        for k in 0..1u64 << 20 {
            let d = digest_of(salt, i << 20 | k);
            if ctx.shard_of(&d) == self.id {
                return d;
            }
        }
        panic!("shard {} owns no partition", self.id);
    }

    fn submit(&self, ctx: &mut HookCtx<'_>, p: &Phase, idx: u64, first: Instant) {
        let d = self.digest(ctx, p.salt, idx);
        self.st.lock().expect("driver state").in_flight += 1;
        let st = self.st.clone();
        let (put, blen) = (p.put.is_some(), self.blen);
        ctx.submit(command(d, p.put.as_ref()), move |r| {
            let whole = whole(&r, put, blen);
            let mut s = st.lock().expect("driver state");
            s.in_flight -= 1;
            if s.res.count(r.result, whole, first) {
                s.retries.push((idx, first));
            } else {
                s.answered += 1;
            }
        });
    }
}

impl ShardHook for ShardDriver {
    fn start(&mut self, doorbell: Arc<Doorbell>) {
        self.ctl.bells.lock().expect("bells").push(doorbell);
    }

    fn turn(&mut self, ctx: &mut HookCtx<'_>) -> bool {
        let epoch = self.ctl.epoch.load(Ordering::Acquire);
        if epoch != self.seen {
            self.seen = epoch;
            self.phase = self.ctl.phase.lock().expect("phase").clone();
            let mut s = self.st.lock().expect("driver state");
            s.res = SubmitterResult::new();
            s.answered = 0;
            if self.phase.as_ref().is_some_and(|p| p.put.is_some()) {
                self.next = 0;
            }
        }
        let Some(p) = self.phase.clone() else { return false };
        let stopping = self.ctl.stop.load(Ordering::Acquire);
        let (retries, in_flight, answered) = {
            let mut s = self.st.lock().expect("driver state");
            (std::mem::take(&mut s.retries), s.in_flight, std::mem::take(&mut s.answered))
        };
        let mut did = answered > 0;
        let mut in_flight = in_flight + retries.len();
        // Overloaded puts go again (even after the phase ends, so records 0..next all exist).
        for (idx, first) in retries {
            self.submit(ctx, &p, idx, first);
        }
        let depth = p.depth[self.id];
        while !stopping && in_flight < depth {
            let idx = if p.put.is_some() {
                self.next += 1;
                self.next - 1
            } else if self.written > 0 {
                self.rng = splitmix(self.rng);
                self.rng % self.written
            } else {
                break;
            };
            self.submit(ctx, &p, idx, Instant::now());
            in_flight += 1;
            did = true;
        }
        let s = &mut *self.st.lock().expect("driver state");
        if stopping && s.in_flight == 0 && s.retries.is_empty() {
            if p.put.is_some() {
                self.written = self.next;
            }
            // (`cpu` stays 0: this ran on the shard thread, counted as shard CPU.)
            self.ctl.done.lock().expect("done").push(std::mem::replace(&mut s.res, SubmitterResult::new()));
            self.phase = None;
        }
        did
    }
}

/// [`drive`] with the in-shard drivers: start a phase, wait for its end, collect.
fn drive_in_shard(
    engine: &Arc<Engine>,
    ctl: &Ctl,
    put: Option<Arc<Vec<u8>>>,
    salt: u64,
    inflight: usize,
    seconds: f64,
    flush_at_end: bool,
) -> LoadResult {
    let shards = engine.config().shards;
    let stats_before = engine.stats();
    let cpu_before = threads_cpu("shard-");
    let ru_before = rusage();
    let is_put = put.is_some();
    let depth = (0..shards).map(|s| inflight / shards + usize::from(s < inflight % shards)).collect();
    ctl.done.lock().expect("done").clear();
    ctl.stop.store(false, Ordering::Release);
    *ctl.phase.lock().expect("phase") = Some(Phase { put, depth, salt });
    let start = Instant::now();
    ctl.epoch.fetch_add(1, Ordering::AcqRel);
    ctl.ring_all();
    let ended = wait_phase(engine, is_put, start + Duration::from_secs_f64(seconds), || false);
    ctl.stop.store(true, Ordering::Release);
    ctl.ring_all();
    let mut results = Vec::new();
    let give_up = Instant::now() + Duration::from_secs(60);
    while results.len() < shards {
        results.append(&mut ctl.done.lock().expect("done"));
        assert!(Instant::now() < give_up, "in-shard drivers did not finish their phase within 60 s");
        std::thread::sleep(Duration::from_millis(1));
    }
    *ctl.phase.lock().expect("phase") = None;
    finish_load(engine, results, stats_before, cpu_before, ru_before, start, ended, flush_at_end)
}

// ------------------------------------------------------------------------------------ reporting

#[derive(Default)]
struct Series(Vec<f64>);

impl Series {
    fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    fn sorted(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.0.iter().copied().filter(|x| x.is_finite()).collect();
        v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        v
    }

    fn median(&self) -> Option<f64> {
        let v = self.sorted();
        if v.is_empty() {
            return None;
        }
        let n = v.len();
        Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
    }

    fn mmm(&self, fmt: impl Fn(f64) -> String) -> String {
        let v = self.sorted();
        if v.is_empty() {
            return format!("{:>12} {:>12} {:>12}", "n/a", "n/a", "n/a");
        }
        format!("{:>12} {:>12} {:>12}", fmt(v[0]), fmt(self.median().expect("non-empty")), fmt(v[v.len() - 1]))
    }
}

/// Latency percentiles over runs: the median of each percentile, and the largest max.
#[derive(Default)]
struct LatSeries([Series; 4]);

impl LatSeries {
    fn push(&mut self, l: [f64; 4]) {
        for (s, v) in self.0.iter_mut().zip(l) {
            s.push(v);
        }
    }

    fn show(&self) -> String {
        let p = |i: usize| self.0[i].median().map_or("n/a".into(), fmt_ns);
        let max = self.0[3].sorted().last().copied().map_or("n/a".into(), fmt_ns);
        format!("{:>10} {:>10} {:>10} {:>10}", p(0), p(1), p(2), max)
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.2} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else {
        format!("{:.1} us", ns / 1e3)
    }
}

fn num(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.3}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.1}")
    }
}

fn mbs(v: f64) -> String {
    format!("{:.1}", v / 1e6)
}

fn ratio(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

#[derive(Default)]
struct Report {
    fio_w_bw: Series,
    fio_w_lat: LatSeries,
    fio_r_iops: Series,
    fio_r_lat: LatSeries,
    put_rate: Series,
    put_bw: Series,
    put_ratio: Series,
    put_lat: LatSeries,
    get_rate: Series,
    get_ratio: Series,
    get_lat: LatSeries,
    cput_rate: Series,
    cput_bw: Series,
    cput_ratio: Series,
    cput_lat: LatSeries,
    fio_dw_bw: Series,
    fio_dw_lat: LatSeries,
    cput_vs_fio: Series,
    /// fio's durable bandwidth over the buffered puts' bandwidth: the best commit / buffered
    /// ratio this device allows at this concurrency.
    dsync_ceiling: Series,
    notes: Vec<String>,
}

fn describe_load(name: &str, r: &LoadResult) -> String {
    let a = &r.stats_after;
    let b = &r.stats_before;
    let writes = a.device_writes - b.device_writes;
    let wbytes = a.device_write_bytes - b.device_write_bytes;
    let reads = a.device_reads - b.device_reads;
    let rbytes = a.device_read_bytes - b.device_read_bytes;
    let mut s = format!(
        "{name}: {} ok in {:.2} s (ended: {}), {} overload retries, {} errors{}",
        r.ok,
        r.elapsed.as_secs_f64(),
        r.ended,
        r.overloads,
        r.errors,
        r.first_error.map_or(String::new(), |e| format!(" (first: {e:?})")),
    );
    if writes > 0 {
        let _ = write!(
            s,
            "; device writes {writes} of avg {:.0} KiB, {:.1} MB/s written, {:.2} records/write",
            wbytes as f64 / writes as f64 / 1024.0,
            wbytes as f64 / r.elapsed.as_secs_f64() / 1e6,
            r.ok as f64 / writes as f64
        );
    }
    if reads > 0 {
        let _ = write!(
            s,
            "; device reads {reads} of avg {:.0} B; cache hits {} misses {}",
            rbytes as f64 / reads as f64,
            a.cache_hits - b.cache_hits,
            a.cache_misses - b.cache_misses
        );
    }
    let secs = r.elapsed.as_secs_f64();
    let per_op = |cpu: f64| if r.ok > 0 { cpu / r.ok as f64 * 1e6 } else { f64::NAN };
    let load = if r.submit_cpu > 0.0 {
        format!("submitters {:.0}% ({:.2} us/op)", r.submit_cpu / secs * 100.0, per_op(r.submit_cpu))
    } else {
        "load generated inside the shard loops (in the shards' CPU)".to_string()
    };
    let _ = write!(
        s,
        "; CPU: shards {:.0}% user + {:.0}% sys of a core ({:.2} us/op), {load}; \
         minor faults {}, context switches {} voluntary {} involuntary",
        r.shard_cpu.0 / secs * 100.0,
        r.shard_cpu.1 / secs * 100.0,
        per_op(r.shard_cpu.0 + r.shard_cpu.1),
        r.rusage[0],
        r.rusage[1],
        r.rusage[2]
    );
    s
}

fn run(args: &Args) -> Res<()> {
    let fio = fio_version();
    if fio.is_none() {
        eprintln!("fio is not installed: the fio columns will be n/a. Install it with: apt-get install fio");
    }
    let target = Target::setup(args)?;
    let env = environment(args, &target, &engine_config(args, false), fio.as_deref());
    eprintln!("\n{env}");
    let payload: Arc<Vec<u8>> = {
        let mut x = splitmix(rand::random());
        Arc::new(
            (0..blob_len())
                .map(|_| {
                    x = splitmix(x);
                    x as u8
                })
                .collect(),
        )
    };
    let secs = format!("{}", args.seconds.ceil().max(1.0) as u64);
    let mut rep = Report::default();
    for run in 1..=args.runs {
        eprintln!("run {run}/{}", args.runs);
        // 1a, 2a: fio sequential writes, then random reads over what it wrote.
        let mut fio_w = None;
        let mut fio_r = None;
        let mut fio_dw = None;
        if fio.is_some() {
            target.reset()?;
            let w = run_fio(
                &target,
                &[
                    "--name=seqwrite".into(),
                    "--rw=write".into(),
                    "--bs=1M".into(),
                    "--iodepth=4".into(),
                    format!("--size={}", target.size),
                    format!("--runtime={secs}"),
                ],
                "write",
            )?;
            eprintln!("  fio seq write   {} MB/s ({} MiB)", mbs(w.bw), w.io_bytes >> 20);
            let region = (w.io_bytes / (1 << 20)) << 20;
            let r = run_fio(
                &target,
                &[
                    "--name=randread".into(),
                    "--rw=randread".into(),
                    "--bs=4k".into(),
                    format!("--iodepth={}", args.qd),
                    format!("--size={}", region.max(1 << 20)),
                    format!("--runtime={secs}"),
                    "--time_based".into(),
                    "--norandommap".into(),
                    "--randrepeat=0".into(),
                ],
                "read",
            )?;
            eprintln!("  fio rand read   {} IOPS", num(r.iops));
            // The device's own limit for durable writes with as many bytes in flight as the
            // engine's commit puts have (every put waits for its durable write, so no more
            // than that can be in flight): the reference for commit-to-device.
            target.reset()?;
            let (jobs, bs) = dsync_shape(args);
            let per_job = target.size / jobs as u64 / (1 << 20) * (1 << 20);
            let dw = run_fio(
                &target,
                &[
                    "--name=dsyncwrite".into(),
                    "--rw=write".into(),
                    format!("--bs={bs}"),
                    format!("--iodepth={FIO_DSYNC_QD}"),
                    format!("--numjobs={jobs}"),
                    format!("--offset_increment={per_job}"),
                    "--sync=dsync".into(),
                    format!("--size={per_job}"),
                    format!("--runtime={secs}"),
                ],
                "write",
            )?;
            eprintln!("  fio dsync write {} MB/s", mbs(dw.bw));
            fio_w = Some(w);
            fio_r = Some(r);
            fio_dw = Some(dw);
        }
        if interrupted() {
            return Err("interrupted".into());
        }
        // 1b, 2b: buffered engine puts, then uncached gets of what they wrote.
        let b = engine_run(&target, args, false, true, &payload)?;
        eprintln!("  (engine open with cold start of an empty device: {:.2} s)", b.open_secs);
        eprintln!("  {}", describe_load("engine puts", &b.put));
        rep.notes.push(format!("run {run}: {}", describe_load("buffered puts", &b.put)));
        // 3: commit-to-device puts.
        let c = engine_run(&target, args, true, false, &payload)?;
        eprintln!("  {}", describe_load("commit puts", &c.put));
        rep.notes.push(format!("run {run}: {}", describe_load("commit-to-device puts", &c.put)));

        let put_bw = b.put.rate() * RECORD_BYTES as f64;
        rep.put_rate.push(b.put.rate());
        rep.put_bw.push(put_bw);
        rep.put_lat.push(b.put.lat());
        if let Some(w) = &fio_w {
            rep.fio_w_bw.push(w.bw);
            rep.fio_w_lat.push(w.lat);
            rep.put_ratio.push(put_bw / w.bw);
        }
        if let Some(g) = &b.get {
            eprintln!("  {}", describe_load("engine gets", g));
            rep.notes.push(format!("run {run}: {}", describe_load("uncached gets", g)));
            rep.get_rate.push(g.rate());
            rep.get_lat.push(g.lat());
            if let Some(r) = &fio_r {
                rep.get_ratio.push(g.rate() / r.iops);
            }
        }
        if let Some(r) = &fio_r {
            rep.fio_r_iops.push(r.iops);
            rep.fio_r_lat.push(r.lat);
        }
        rep.cput_rate.push(c.put.rate());
        rep.cput_bw.push(c.put.rate() * RECORD_BYTES as f64);
        rep.cput_lat.push(c.put.lat());
        rep.cput_ratio.push(c.put.rate() / b.put.rate());
        if let Some(dw) = &fio_dw {
            rep.fio_dw_bw.push(dw.bw);
            rep.fio_dw_lat.push(dw.lat);
            rep.cput_vs_fio.push(c.put.rate() * RECORD_BYTES as f64 / dw.bw);
            rep.dsync_ceiling.push(dw.bw / (b.put.rate() * RECORD_BYTES as f64));
        }
    }
    println!("{}", render(args, &env, &rep));
    Ok(())
}

fn render(args: &Args, env: &str, r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "==================================== engine_vs_fio ====================================");
    let _ = write!(s, "{env}");
    let hdr = format!("{:<44}{:>12} {:>12} {:>12}", "", "min", "median", "max");
    let lhdr = format!(
        "{:<44}{:>10} {:>10} {:>10} {:>10}",
        "latency (median of runs; max of runs)", "p50", "p99", "p99.9", "max"
    );
    let row = |name: &str, v: String| format!("{name:<44}{v}");

    let _ =
        writeln!(s, "\n1. puts of {RECORD_BYTES} B records (buffered) vs fio sequential write, bs 1 MiB, iodepth 4");
    let _ = writeln!(s, "{hdr}");
    let _ = writeln!(s, "{}", row("fio seq write MB/s", r.fio_w_bw.mmm(mbs)));
    let _ = writeln!(s, "{}", row("engine puts records/s", r.put_rate.mmm(num)));
    let _ = writeln!(s, "{}", row("engine puts MB/s (records x 1536 B)", r.put_bw.mmm(mbs)));
    let _ = writeln!(s, "{}", row("ratio engine / fio", r.put_ratio.mmm(ratio)));
    let _ = writeln!(s, "{lhdr}");
    let _ = writeln!(s, "{}", row("  fio 1 MiB write (clat)", r.fio_w_lat.show()));
    let _ = writeln!(s, "{}", row("  engine put (submit to reply)", r.put_lat.show()));

    let _ = writeln!(s, "\n2. uncached gets vs fio 4 KiB random reads, {} in flight", args.qd);
    let _ = writeln!(s, "{hdr}");
    let _ = writeln!(s, "{}", row("fio rand read IOPS", r.fio_r_iops.mmm(num)));
    let _ = writeln!(s, "{}", row("engine gets/s", r.get_rate.mmm(num)));
    let _ = writeln!(s, "{}", row("ratio engine / fio", r.get_ratio.mmm(ratio)));
    let _ = writeln!(s, "{lhdr}");
    let _ = writeln!(s, "{}", row("  fio 4 KiB read (clat)", r.fio_r_lat.show()));
    let _ = writeln!(s, "{}", row("  engine get (submit to reply)", r.get_lat.show()));

    let _ = writeln!(s, "\n3. commit-to-device puts vs buffered puts ({} in flight)", args.inflight);
    let _ = writeln!(s, "{hdr}");
    let _ = writeln!(s, "{}", row("buffered puts records/s", r.put_rate.mmm(num)));
    let _ = writeln!(s, "{}", row("commit-to-device puts records/s", r.cput_rate.mmm(num)));
    let _ = writeln!(s, "{}", row("commit-to-device puts MB/s", r.cput_bw.mmm(mbs)));
    let _ = writeln!(s, "{}", row("ratio commit / buffered", r.cput_ratio.mmm(ratio)));
    let (jobs, bs) = dsync_shape(args);
    let fio_dw = format!("fio O_DSYNC MB/s ({jobs}x qd {FIO_DSYNC_QD}x {} KiB)", bs >> 10);
    let _ = writeln!(s, "{}", row(&fio_dw, r.fio_dw_bw.mmm(mbs)));
    let _ = writeln!(s, "{}", row("ratio commit puts MB/s / fio O_DSYNC", r.cput_vs_fio.mmm(ratio)));
    let _ = writeln!(s, "{}", row("ceiling: fio O_DSYNC / buffered puts MB/s", r.dsync_ceiling.mmm(ratio)));
    let _ = writeln!(s, "{lhdr}");
    let _ = writeln!(s, "{}", row("  buffered put", r.put_lat.show()));
    let _ = writeln!(s, "{}", row("  commit-to-device put", r.cput_lat.show()));
    let _ = writeln!(s, "{}", row("  fio O_DSYNC write (clat)", r.fio_dw_lat.show()));

    let _ = writeln!(s, "\ngoals (issue 2), judged on the median ratio");
    let goal = |name: &str, g: f64, v: &Series| {
        let (m, verdict) = match v.median() {
            Some(m) => (ratio(m), if m >= g { "PASS" } else { "MISS" }),
            None => ("n/a".into(), "n/a (not measured)"),
        };
        format!("  {name:<46} goal >= {:<6} measured {m:>7}  {verdict}", ratio(g))
    };
    let _ = writeln!(s, "{}", goal("puts vs fio write bandwidth", GOAL_PUTS_VS_FIO, &r.put_ratio));
    let _ = writeln!(s, "{}", goal("gets vs fio read IOPS", GOAL_GETS_VS_FIO, &r.get_ratio));
    let _ = writeln!(s, "{}", goal("commit-to-device vs buffered puts", GOAL_COMMIT_VS_BUFFERED, &r.cput_ratio));
    if let Some(c) = r.dsync_ceiling.median().filter(|&c| c < GOAL_COMMIT_VS_BUFFERED) {
        let _ = writeln!(
            s,
            "    (the device's own durable writes at this concurrency reach {} of the buffered puts' bandwidth)",
            ratio(c)
        );
    }

    let _ = writeln!(s, "\nload average at the end: {}", loadavg());
    let _ = writeln!(s, "\nengine counters per run");
    for n in &r.notes {
        let _ = writeln!(s, "  {n}");
    }
    s
}
