//! Engine mode: ACT's client rates as real record reads and writes through the Ferrospike
//! engine on the same devices (real write blocks, real defrag, real index).
//!
//! The devices are erased and formatted, a key space filling `--fill-pct` of the data space
//! is written once (untimed), then scheduler threads issue reads and writes open loop: each
//! operation has a scheduled start and its latency runs from that start to the engine's
//! reply, so back-pressure and stalls show as latency instead of a lower rate.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrospike_engine::io::FileDevices;
use ferrospike_engine::types::{compute_digest, ptype};
use ferrospike_engine::{erase_devices, Bin, Command, Digest, Engine, EngineConfig, ExistsAction, ResultCode, Value};

use super::config::{ActConfig, Derived};
use super::{report_loop, summary, Control, Named, Options};
use crate::hist::{OpHist, Scale};
use crate::rng::Rng;

/// Commands submitted to the engine and not yet answered, across all schedulers.
pub const MAX_IN_FLIGHT: usize = 4096;
/// Fixed part of a stored record with one bin named "b" and no set or key (FORMAT.md).
const RECORD_OVERHEAD_BYTES: u32 = 72 + 1 + 1 + 1 + 4;
/// Set of the records the test writes.
const SET: &str = "act";

fn digest_of(key: u64) -> Digest {
    compute_digest(SET, ptype::INTEGER, &(key as i64).to_be_bytes())
}

fn value_len(rng: &mut Rng, cfg: &ActConfig) -> usize {
    let bytes = if cfg.record_bytes_range_max > cfg.record_bytes {
        cfg.record_bytes + rng.below((cfg.record_bytes_range_max - cfg.record_bytes + 1) as u64) as u32
    } else {
        cfg.record_bytes
    };
    bytes.saturating_sub(RECORD_OVERHEAD_BYTES).max(1) as usize
}

fn payload(rng: &mut Rng, cfg: &ActConfig) -> Vec<Bin> {
    let mut v = vec![0u8; value_len(rng, cfg)];
    rng.fill(&mut v, cfg.compress_pct);
    vec![Bin::new("b", Value::Blob(v))]
}

/// Results other than OK, by code, and reads that found nothing.
struct Outcomes {
    errors: [AtomicU64; 256],
    read_misses: AtomicU64,
}

impl Outcomes {
    fn note(&self, rc: ResultCode, read: bool) {
        if rc == ResultCode::Ok {
            return;
        }
        if read && rc == ResultCode::NotFound {
            self.read_misses.fetch_add(1, Relaxed);
        } else {
            self.errors[rc.code() as usize].fetch_add(1, Relaxed);
        }
    }
}

pub(super) fn run(
    cfg: &ActConfig,
    d: &Derived,
    opts: &Options,
    devices: Arc<FileDevices>,
    scale: Scale,
) -> Result<bool, String> {
    erase_devices(&*devices).map_err(|e| format!("erasing the devices: {e}"))?;
    let mut ecfg = EngineConfig::new("act");
    ecfg.wblock_bytes = cfg.large_block_bytes().clamp(128 << 10, 8 << 20);
    ecfg.commit_to_device = cfg.commit_to_device;
    ecfg.defrag_lwm_pct = cfg.defrag_lwm_pct.clamp(1, 99);
    // ACT models reads that go to the device: no post-write cache.
    ecfg.post_write_cache_bytes = 0;
    ecfg.max_write_cache_bytes = ecfg.max_write_cache_bytes.max(4 * ecfg.wblock_bytes as u64);
    let engine = Arc::new(Engine::open(ecfg.clone(), devices).map_err(|e| format!("opening the engine: {e}"))?);
    let st = engine.stats();
    let data_bytes = st.total_wblocks * ecfg.wblock_bytes as u64;
    let avg_record = ((d.record_stored_bytes as u64 + d.record_stored_bytes_rmx as u64) / 2).max(16);
    let n_keys = (data_bytes * opts.fill_pct as u64 / 100 / avg_record).max(1);
    eprintln!(
        "ferrospike-act: engine: {} shards, write-block-size {} KiB, {} write blocks, commit-to-device {}, \
         defrag-lwm-pct {}; filling {} records ({}% of {} MiB)",
        st.shards,
        ecfg.wblock_bytes >> 10,
        st.total_wblocks,
        ecfg.commit_to_device,
        ecfg.defrag_lwm_pct,
        n_keys,
        opts.fill_pct,
        data_bytes >> 20
    );
    let outcomes = Arc::new(Outcomes { errors: std::array::from_fn(|_| AtomicU64::new(0)), read_misses: 0.into() });
    fill(&engine, cfg, n_keys, &outcomes)?;

    let mk = || Arc::new(OpHist::new(scale));
    let (reads, writes) = (mk(), mk());
    let mut named: Vec<Named> = Vec::new();
    if cfg.read_reqs_per_sec != 0 {
        named.push(("reads".into(), reads.clone()));
    }
    if cfg.write_reqs_per_sec != 0 {
        named.push(("writes".into(), writes.clone()));
    }
    let read_rate = cfg.read_reqs_per_sec as f64;
    let write_rate = cfg.write_reqs_per_sec as f64 * cfg.replication_factor as f64;
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as u32;
    let n_sched = cfg.service_threads.min(cpus).max(1);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let before = engine.stats();
    // The timed test starts now.
    let ctl = Arc::new(Control::new());
    let mut threads = Vec::new();
    for t in 0..n_sched {
        let s = Scheduler {
            engine: engine.clone(),
            cfg: cfg.clone(),
            n_keys,
            period_ns: 1e9 * n_sched as f64 / (read_rate + write_rate),
            read_share: read_rate / (read_rate + write_rate),
            reads: reads.clone(),
            writes: writes.clone(),
            outcomes: outcomes.clone(),
            in_flight: in_flight.clone(),
            ctl: ctl.clone(),
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("act-sched-{t}"))
                .spawn(move || s.run())
                .map_err(|e| e.to_string())?,
        );
    }
    report_loop(cfg, &named, &ctl);
    let elapsed = ctl.start.elapsed();
    ctl.stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while in_flight.load(Relaxed) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    print!("{}", summary(&named, scale, elapsed));
    let after = engine.stats();
    let secs = elapsed.as_secs_f64().max(1e-9);
    let rate = |a: u64, b: u64| (a - b.min(a)) as f64 / secs;
    println!("\nENGINE (during the timed test)");
    println!(
        "device reads/s: {:.1} ({:.1} MiB/s), device writes/s: {:.1} ({:.1} MiB/s)",
        rate(after.device_reads, before.device_reads),
        rate(after.device_read_bytes, before.device_read_bytes) / 1048576.0,
        rate(after.device_writes, before.device_writes),
        rate(after.device_write_bytes, before.device_write_bytes) / 1048576.0
    );
    println!(
        "defrag reads/s: {:.1} ({:.1} MiB/s read, {:.1} MiB/s rewritten), write amplification {:.2}",
        rate(after.defrag_reads, before.defrag_reads),
        rate(after.defrag_read_bytes, before.defrag_read_bytes) / 1048576.0,
        rate(after.defrag_write_bytes, before.defrag_write_bytes) / 1048576.0,
        after.write_amplification
    );
    println!(
        "records {}, free write blocks {} of {} ({:.1}% available), read errors {}, write errors {}, read-only {}",
        after.records,
        after.free_wblocks,
        after.total_wblocks,
        after.avail_pct,
        after.read_errors,
        after.write_errors,
        after.read_only
    );
    let mut errs = String::new();
    for (code, n) in outcomes.errors.iter().enumerate() {
        let n = n.load(Relaxed);
        if n > 0 {
            errs.push_str(&format!(" {}:{n}", code));
        }
    }
    println!(
        "result codes other than OK: {} read misses,{}",
        outcomes.read_misses.load(Relaxed),
        if errs.is_empty() { " no errors".into() } else { errs }
    );
    engine.shutdown().map_err(|e| format!("engine shutdown: {e}"))?;
    Ok(ctl.failed())
}

/// Write every key once, as fast as the engine takes them, with progress on stderr. Writes
/// the engine turns back with DEVICE_OVERLOAD (its write cache is full) are sent again.
fn fill(engine: &Arc<Engine>, cfg: &ActConfig, n_keys: u64, outcomes: &Arc<Outcomes>) -> Result<(), String> {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let retry: Arc<std::sync::Mutex<Vec<u64>>> = Arc::default();
    let mut rng = Rng::new();
    let started = Instant::now();
    let mut last = started;
    let submit = |k: u64, rng: &mut Rng| {
        while in_flight.load(Relaxed) >= MAX_IN_FLIGHT {
            std::thread::sleep(Duration::from_micros(50));
        }
        in_flight.fetch_add(1, Relaxed);
        let (f, o, again) = (in_flight.clone(), outcomes.clone(), retry.clone());
        let cmd = Command::put(digest_of(k), SET, payload(rng, cfg)).with_exists(ExistsAction::CreateOrReplace);
        engine.submit(cmd, move |r| {
            if r.result == ResultCode::DeviceOverload {
                again.lock().expect("retry list").push(k);
            } else {
                o.note(r.result, false);
            }
            f.fetch_sub(1, Relaxed);
        });
    };
    for k in 0..n_keys {
        submit(k, &mut rng);
        if last.elapsed() >= Duration::from_secs(2) {
            last = Instant::now();
            eprintln!(
                "ferrospike-act: filling: {k} of {n_keys} records ({:.0}/s)",
                k as f64 / started.elapsed().as_secs_f64()
            );
        }
    }
    loop {
        while in_flight.load(Relaxed) > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let again = std::mem::take(&mut *retry.lock().expect("retry list"));
        if again.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
        for k in again {
            submit(k, &mut rng);
        }
    }
    engine.flush();
    let failed: u64 = outcomes.errors.iter().map(|e| e.load(Relaxed)).sum();
    if failed > 0 {
        return Err(format!("{failed} writes failed while filling the device; lower --fill-pct"));
    }
    eprintln!("ferrospike-act: filled {n_keys} records in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

struct Scheduler {
    engine: Arc<Engine>,
    cfg: ActConfig,
    n_keys: u64,
    period_ns: f64,
    read_share: f64,
    reads: Arc<OpHist>,
    writes: Arc<OpHist>,
    outcomes: Arc<Outcomes>,
    in_flight: Arc<AtomicUsize>,
    ctl: Arc<Control>,
}

impl Scheduler {
    fn run(self) {
        let mut rng = Rng::new();
        let max_lag_ns = self.cfg.max_lag_sec as u64 * 1_000_000_000;
        let update_pct = self.cfg.update_pct as u64;
        let mut issued = 0u64;
        while !self.ctl.stopped() {
            let due = (issued as f64 * self.period_ns) as u64;
            let now = self.ctl.now_ns();
            if due > now {
                let wait = due - now;
                // Sleep rather than spin: on small machines a spinning load generator takes the
                // cores the engine needs. Oversleeping is counted (latency runs from `due`).
                if wait > 20_000 {
                    std::thread::sleep(Duration::from_nanos(wait.min(10_000_000)));
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            if max_lag_ns != 0 && due + max_lag_ns < now {
                self.ctl.fail(
                    "ERROR: service thread can't keep up\nACT can't do requested load - test stopped\n\
                     try configuring more 'service-threads'"
                        .into(),
                );
                break;
            }
            if self.in_flight.load(Relaxed) >= MAX_IN_FLIGHT {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            issued += 1;
            let key = rng.below(self.n_keys);
            let read = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= self.read_share;
            let cmd = if read {
                Command::get(digest_of(key))
            } else {
                // update-pct of the writes merge into the existing record (the engine reads it);
                // the rest replace it.
                let exists =
                    if rng.below(100) < update_pct { ExistsAction::Update } else { ExistsAction::CreateOrReplace };
                Command::put(digest_of(key), SET, payload(&mut rng, &self.cfg)).with_exists(exists)
            };
            let hist = if read { self.reads.clone() } else { self.writes.clone() };
            let (f, o, ctl) = (self.in_flight.clone(), self.outcomes.clone(), self.ctl.clone());
            self.in_flight.fetch_add(1, Relaxed);
            self.engine.submit(cmd, move |r| {
                hist.record_ns(ctl.now_ns().saturating_sub(due));
                o.note(r.result, read);
                f.fetch_sub(1, Relaxed);
            });
        }
    }
}
