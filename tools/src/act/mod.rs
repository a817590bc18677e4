//! `ferrospike-act`: ACT-style device certification (`act_storage`), in raw mode on the
//! devices through io_uring, or through the Ferrospike engine (`--engine`).
//!
//! The output reproduces ACT 6.6's layout — configuration echo, derived configuration,
//! device lines, histogram names and the cumulative per-interval histogram dumps — so
//! ACT's `act_latency.py` reads it, then adds a summary (threshold table and HDR
//! percentiles) after the last interval.

pub mod config;
mod engine_mode;
mod raw;

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrospike_engine::format::{DeviceHeader, DEVICE_MAGIC, HEADER_COPY_STRIDE};
use ferrospike_engine::io::{open_devices, DeviceSet, DeviceSpec, FileDevices};

use crate::hist::{act_dump, hdr_summary_us, pct_over, OpHist, Scale};
pub use config::{ActConfig, ConfigError, Derived};

/// Submission queue entries of each generator's ring.
pub const RING_ENTRIES: u32 = 256;
/// Thresholds of the summary table, as act_latency.py's default columns: 2^0 .. 2^6 units.
pub const THRESHOLD_COLUMNS: usize = 7;

pub const USAGE: &str = "\
ferrospike-act: ACT-style storage device certification (compatible with ACT 6.6's act_storage)

USAGE:
    ferrospike-act CONFIG [--engine] [--force] [--fill-pct N]

CONFIG is an act_storage configuration file: `name: value` lines, `#` comments. Keys and
defaults are ACT's:
    device-names            (required) comma-separated devices (or files)
    file-size-mbytes        0: use the devices at their size; N: regular files of N MiB
    service-threads         5 x CPUs      test-duration-sec       (required)
    report-interval-sec     1             microsecond-histograms  no
    read-reqs-per-sec       0             write-reqs-per-sec      0
    record-bytes            1536          record-bytes-range-max  0
    large-block-op-kbytes   128           replication-factor      1
    update-pct              0             defrag-lwm-pct          50
    no-defrag-reads         no            compress-pct            100
    disable-odsync          no            commit-to-device        no
    tomb-raider             no            tomb-raider-sleep-usec  0
    max-lag-sec             10
An unknown key or an unparsable value is an error naming it.

MODES:
    (default)   raw mode: the I/O mix ACT generates (record-sized reads at random offsets,
                large-block reads and writes modelling defrag, record-sized writes with
                commit-to-device), issued open loop through io_uring with O_DIRECT (and
                O_DSYNC unless disable-odsync): every operation has a scheduled start and its
                latency is counted from it, so a stalled device cannot hide its stall.
    --engine    the same client rates as real record reads and writes through the Ferrospike
                engine on the same devices (real write blocks, real defrag). The devices are
                erased and formatted, then filled to --fill-pct (default 40) percent before
                the timed test; reads then hit records on the device (no post-write cache).

The test DESTROYS the contents of every device it names. It refuses to start on a device
holding a Ferrospike header unless --force is given.

OUTPUT: ACT's layout on stdout (act_latency.py -l LOG reads it), then a summary: the
percentage of operations over 1..64 ms (or us) per histogram and HDR p50/p99/p99.9/max.
A progress line per interval goes to stderr. Exit status: 0 when the test ran to its end,
1 when it was stopped (a generator fell max-lag-sec behind, or an I/O error), 2 on bad
usage, configuration or devices.
";

/// Command-line options besides the config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Options {
    pub config_path: String,
    pub engine: bool,
    pub force: bool,
    /// Engine mode: share of the data space filled with records before the timed test.
    pub fill_pct: u32,
}

/// Parse the command line; `Err` holds the message (the usage for `--help`).
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options { config_path: String::new(), engine: false, force: false, fill_pct: 40 };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--help" | "-h" => return Err(USAGE.to_string()),
            "--engine" => o.engine = true,
            "--force" => o.force = true,
            "--fill-pct" => {
                let v = it.next().ok_or("--fill-pct needs a value")?;
                o.fill_pct = v.parse().map_err(|_| format!("--fill-pct: bad value '{v}'"))?;
                if !(1..=90).contains(&o.fill_pct) {
                    return Err("--fill-pct must be 1..90".into());
                }
            }
            s if s.starts_with('-') => return Err(format!("unknown option '{s}' (see --help)")),
            s => {
                if !o.config_path.is_empty() {
                    return Err(format!("unexpected argument '{s}' (one config file expected)"));
                }
                o.config_path = s.to_string();
            }
        }
    }
    if o.config_path.is_empty() {
        return Err("missing CONFIG (see --help)".into());
    }
    Ok(o)
}

/// Shared run state: the stop flag and why the test stopped early.
pub(crate) struct Control {
    pub stop: AtomicBool,
    pub failure: Mutex<Option<String>>,
    pub start: Instant,
}

impl Control {
    pub fn new() -> Control {
        Control { stop: AtomicBool::new(false), failure: Mutex::new(None), start: Instant::now() }
    }

    /// Stop the test, printing ACT's message (the first failure wins).
    pub fn fail(&self, msg: String) {
        let mut f = self.failure.lock().expect("failure lock");
        if f.is_none() {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{msg}");
            let _ = out.flush();
            *f = Some(msg);
        }
        self.stop.store(true, Relaxed);
    }

    pub fn failed(&self) -> bool {
        self.failure.lock().expect("failure lock").is_some()
    }

    pub fn stopped(&self) -> bool {
        self.stop.load(Relaxed)
    }

    /// Nanoseconds since the test started.
    pub fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// A named histogram in report order.
pub(crate) type Named = (String, Arc<OpHist>);

/// Entry point of the binary; returns the exit status.
pub fn main(args: Vec<String>) -> i32 {
    let opts = match crate::options_or_exit(parse_args(&args), USAGE, "ferrospike-act") {
        Ok(o) => o,
        Err(code) => return code,
    };
    let cfg = match ActConfig::load(&opts.config_path) {
        Ok(c) => c,
        Err(e) => {
            println!("ERROR: {e}");
            eprintln!("ferrospike-act: {e}");
            return 2;
        }
    };
    if let Err(e) = check_devices(&cfg, opts.force) {
        eprintln!("ferrospike-act: {e}");
        return 2;
    }
    eprintln!(
        "ferrospike-act: WARNING: this test destroys the contents of {} ({} mode)",
        cfg.device_names.join(", "),
        if opts.engine { "engine" } else { "raw" }
    );
    let specs: Vec<DeviceSpec> = cfg
        .device_names
        .iter()
        .map(|d| DeviceSpec {
            path: d.into(),
            file_size: (cfg.file_size_mbytes != 0).then_some((cfg.file_size_mbytes as u64) << 20),
        })
        .collect();
    let devices = match open_devices(&specs, RING_ENTRIES) {
        Ok(d) => Arc::new(d),
        Err(e) => {
            eprintln!("ferrospike-act: {e}");
            return 2;
        }
    };
    run(&cfg, &opts, devices)
}

/// Refuse devices that hold a Ferrospike header (either copy has the magic) unless `force`.
pub fn check_devices(cfg: &ActConfig, force: bool) -> Result<(), String> {
    for name in &cfg.device_names {
        let Ok(mut f) = std::fs::File::open(name) else {
            if cfg.file_size_mbytes != 0 {
                continue; // a file that will be created
            }
            return Err(format!("cannot open {name}"));
        };
        let mut b = vec![0u8; 2 * HEADER_COPY_STRIDE as usize];
        let n = read_up_to(&mut f, &mut b).map_err(|e| format!("cannot read {name}: {e}"))?;
        let copies = [&b[..HEADER_COPY_STRIDE as usize], &b[HEADER_COPY_STRIDE as usize..]];
        let found = n > 0 && copies.iter().any(|c| c[..8] == DEVICE_MAGIC);
        if found {
            let what = copies
                .iter()
                .find_map(|c| DeviceHeader::decode(c).ok())
                .map(|h| format!("namespace '{}', device {} of {}", h.namespace, h.device_index, h.n_devices))
                .unwrap_or_else(|| "a damaged header".into());
            if !force {
                return Err(format!(
                    "{name} holds Ferrospike data ({what}); the test would destroy it. \
                     Refusing; pass --force to run anyway"
                ));
            }
            eprintln!("ferrospike-act: --force: overwriting Ferrospike data on {name} ({what})");
        }
    }
    Ok(())
}

fn read_up_to(f: &mut std::fs::File, b: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < b.len() {
        match f.read(&mut b[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Device geometry as ACT discovers it.
#[derive(Debug, Clone)]
pub(crate) struct DevPlan {
    pub name: String,
    pub bytes: u64,
    pub n_large_blocks: u64,
    pub min_op_bytes: u64,
    pub read_bytes: u64,
    pub n_read_sizes: u64,
    pub n_read_offsets: u64,
}

impl DevPlan {
    fn new(name: &str, bytes: u64, io_align: u32, cfg: &ActConfig, d: &Derived) -> DevPlan {
        let lb = cfg.large_block_bytes() as u64;
        let n_large_blocks = bytes / lb;
        let min_op = (io_align as u64).max(512);
        let n_min_op_blocks = n_large_blocks * lb / min_op;
        let blocks = (d.record_stored_bytes as u64).div_ceil(min_op);
        let blocks_rmx = (d.record_stored_bytes_rmx as u64).div_ceil(min_op);
        DevPlan {
            name: name.to_string(),
            bytes,
            n_large_blocks,
            min_op_bytes: min_op,
            read_bytes: blocks * min_op,
            n_read_sizes: blocks_rmx - blocks + 1,
            n_read_offsets: (n_min_op_blocks + 1).saturating_sub(blocks_rmx),
        }
    }
}

fn run(cfg: &ActConfig, opts: &Options, devices: Arc<FileDevices>) -> i32 {
    let d = cfg.derive();
    let scale = if cfg.microsecond_histograms { Scale::Microseconds } else { Scale::Milliseconds };
    let plans: Vec<DevPlan> = devices
        .devices()
        .iter()
        .zip(&cfg.device_names)
        .map(|(info, name)| DevPlan::new(name, info.size_bytes, info.io_align, cfg, &d))
        .collect();
    let mut pre = String::new();
    let _ = write!(pre, "\nACT version {}\nStorage device IO test\n", config::ACT_VERSION);
    let _ = write!(
        pre,
        "ferrospike-act {} ({} mode): ACT-compatible output\n\n",
        env!("CARGO_PKG_VERSION"),
        if opts.engine { "engine" } else { "raw" }
    );
    pre.push_str(&cfg.echo());
    pre.push_str(&cfg.explain());
    for p in &plans {
        if p.n_large_blocks == 0 || p.n_read_offsets == 0 {
            eprintln!("ferrospike-act: {} is too small ({} bytes) for this configuration", p.name, p.bytes);
            return 2;
        }
        let _ = writeln!(
            pre,
            "{} size = {} bytes, {} large blocks, minimum IO size = {} bytes",
            p.name, p.bytes, p.n_large_blocks, p.min_op_bytes
        );
    }
    print!("{pre}");
    let _ = std::io::stdout().flush();

    let result = if opts.engine {
        engine_mode::run(cfg, &d, opts, devices, scale)
    } else {
        raw::run(cfg, &d, devices, &plans, scale)
    };
    match result {
        Ok(false) => 0,
        Ok(true) => 1,
        Err(e) => {
            eprintln!("ferrospike-act: {e}");
            2
        }
    }
}

/// Print the histogram names, then report every interval until the test duration is over
/// or the test is stopped. ACT's main loop: report `count` is printed at `count` ×
/// interval after the start.
pub(crate) fn report_loop(cfg: &ActConfig, hists: &[Named], ctl: &Control) {
    let mut s = String::from("\nHISTOGRAM NAMES\n");
    for (name, _) in hists {
        s.push_str(name);
        s.push('\n');
    }
    s.push('\n');
    print!("{s}");
    let _ = std::io::stdout().flush();
    let interval_ns = cfg.report_interval_sec as u64 * 1_000_000_000;
    let stop_ns = cfg.test_duration_sec as u64 * 1_000_000_000;
    let mut count = 0u64;
    let mut last_counts: Vec<u64> = vec![0; hists.len()];
    while !ctl.stopped() && ctl.now_ns() < stop_ns {
        count += 1;
        let due = count * interval_ns;
        while !ctl.stopped() && ctl.now_ns() < due {
            std::thread::sleep(Duration::from_nanos((due - ctl.now_ns().min(due)).min(20_000_000)));
        }
        let mut out = format!("after {} sec:\n", due / 1_000_000_000);
        let mut progress = format!("ferrospike-act: {} / {} s:", due / 1_000_000_000, cfg.test_duration_sec);
        for (i, (name, h)) in hists.iter().enumerate() {
            let c = h.act.snapshot();
            act_dump(name, &c, &mut out);
            let total: u64 = c.iter().sum();
            if ["reads", "writes", "large-block-reads", "large-block-writes"].contains(&name.as_str()) {
                let per_s = (total - last_counts[i]) as f64 / cfg.report_interval_sec as f64;
                let _ = write!(progress, " {name} {per_s:.0}/s");
            }
            last_counts[i] = total;
        }
        out.push('\n');
        let mut so = std::io::stdout().lock();
        let _ = so.write_all(out.as_bytes());
        let _ = so.flush();
        drop(so);
        eprintln!("{progress}");
    }
}

/// The summary after the last interval: ACT's threshold table over the whole run and the
/// HDR percentiles, per histogram.
pub(crate) fn summary(hists: &[Named], scale: Scale, elapsed: Duration) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "SUMMARY ({:.1} s)", elapsed.as_secs_f64());
    let unit = scale.label();
    let w = hists.iter().map(|(n, _)| n.len() + 2).max().unwrap_or(0).max(28);
    let _ = write!(s, "{:<w$}{:>12}", format!("% of ops >= ({unit})"), "ops");
    for i in 0..THRESHOLD_COLUMNS {
        let _ = write!(s, "{:>8}", 1u64 << i);
    }
    s.push('\n');
    for (name, h) in hists {
        let c = h.act.snapshot();
        let total: u64 = c.iter().sum();
        let _ = write!(s, "{name:<w$}{total:>12}");
        for p in pct_over(&c, THRESHOLD_COLUMNS) {
            let _ = write!(s, "{p:>8.2}");
        }
        s.push('\n');
    }
    s.push('\n');
    let _ =
        writeln!(s, "{:<w$}{:>12}{:>12}{:>12}{:>12}{:>12}", "latency (HDR, us)", "ops", "p50", "p99", "p99.9", "max");
    for (name, h) in hists {
        let hdr = h.hdr.lock().expect("hdr lock");
        let [p50, p99, p999, max] = hdr_summary_us(&hdr);
        let _ = writeln!(s, "{name:<w$}{:>12}{p50:>12.1}{p99:>12.1}{p999:>12.1}{max:>12.1}", hdr.len());
    }
    if let Some((_, reads)) = hists.iter().find(|(n, _)| n == "reads") {
        let c = reads.act.snapshot();
        if c.iter().sum::<u64>() > 0 && scale == Scale::Milliseconds {
            let p = pct_over(&c, THRESHOLD_COLUMNS);
            let pass = p[0] < 5.0 && p[3] < 1.0 && p[6] < 0.1;
            let _ = writeln!(
                s,
                "\nACT criteria on reads over the whole run (<5% >1ms, <1% >8ms, <0.1% >64ms): {} \
                 ({:.2}% / {:.2}% / {:.2}%); certification judges every hour with act_latency.py",
                if pass { "PASS" } else { "FAIL" },
                p[0],
                p[3],
                p[6]
            );
        }
    }
    s
}
