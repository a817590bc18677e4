//! A writer process using commit-to-device is killed with SIGKILL again and again; after each
//! kill every acknowledged write is there, with its latest acknowledged value, and no
//! acknowledged delete is undone.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command as Proc, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrospike_engine::io::{open_devices, DeviceSpec};
use ferrospike_engine::{Command, Engine, EngineConfig, ResultCode, UserKey, Value};

const SIZE: u64 = 1 << 30;
const WORKERS: u64 = 4;

/// What a key may hold after a crash: the last acknowledged state, or the state of an
/// operation that started but whose acknowledgement was not seen.
#[derive(Default, Debug)]
struct KeyModel {
    acked: Option<Option<u64>>,
    in_flight: Vec<Option<u64>>,
}

#[test]
fn sigkill_loses_no_acknowledged_write() {
    crash_rounds("crash", SIZE, None, 4, 1500);
}

/// The same on a device small enough that defrag runs all the time, so kills land while
/// wblocks are being defragmented and reused.
#[test]
fn sigkill_during_defrag_loses_no_acknowledged_write() {
    crash_rounds("crash-defrag", 24 << 20, Some((128 << 10, 1 << 20)), 3, 12_000);
}

fn crash_rounds(name: &str, size: u64, wblock_and_cache: Option<(u32, u64)>, rounds: u64, kill_base: u64) {
    common::init_logs();
    let dir = common::TestDir::new(name);
    let path = dir.path("dev.dat");
    let mut model: HashMap<u64, KeyModel> = HashMap::new();
    let mut first = 1u64;
    for round in 0..rounds {
        let mut proc = Proc::new(env!("CARGO_BIN_EXE_crash_writer"));
        proc.arg(&path).arg(size.to_string()).arg(WORKERS.to_string()).arg(first.to_string());
        if let Some((wb, cache)) = wblock_and_cache {
            proc.arg(wb.to_string()).arg(cache.to_string());
        }
        let mut child = proc.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("spawn crash_writer");
        let pid = child.id();
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let started = Instant::now();
        let mut acks = 0u64;
        let kill_after = kill_base + round * 700;
        let mut killed = false;
        let apply = |line: &str, model: &mut HashMap<u64, KeyModel>| -> bool {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 {
                return false;
            }
            let key: u64 = f[2].parse().unwrap();
            let ver: u64 = f[3].parse().unwrap();
            let state = if f[1] == "D" { None } else { Some(ver) };
            let m = model.entry(key).or_default();
            match f[0] {
                "S" => m.in_flight.push(state),
                "A" => {
                    m.acked = Some(state);
                    m.in_flight.clear();
                    return true;
                }
                _ => {}
            }
            false
        };
        let mut failures = Vec::new();
        for line in lines.by_ref() {
            let line = line.expect("line");
            if line.starts_with('F') {
                failures.push(line.clone());
            }
            if apply(&line, &mut model) {
                acks += 1;
            }
            if !killed && (acks >= kill_after || started.elapsed() > Duration::from_secs(60)) {
                // SAFETY: kill has no memory-safety preconditions; pid is our own child.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                killed = true;
            }
        }
        let status = child.wait().expect("wait");
        assert!(
            failures.is_empty(),
            "round {round}: writes failed before the kill: {:?}",
            &failures[..failures.len().min(5)]
        );
        assert!(killed && acks >= kill_after, "round {round}: writer exited by itself ({status:?}) after {acks} acks");
        eprintln!("round {round}: killed the writer after {acks} acknowledged writes");
        first += 1_000_000;

        // Recover in this process and check every key.
        let mut cfg = EngineConfig::new("test");
        cfg.shards = 2;
        if let Some((wb, _)) = wblock_and_cache {
            cfg.wblock_bytes = wb;
        }
        let devs = open_devices(&[DeviceSpec { path: path.clone(), file_size: Some(size) }], 256).unwrap();
        let engine = Engine::open(cfg, Arc::new(devs)).expect("recovery");
        assert!(!engine.stats().previous_shutdown_clean);
        for (key, m) in model.iter_mut() {
            let d = UserKey::Int(*key as i64).digest("demo");
            let r = engine.execute(Command::get(d));
            let found = match r.result {
                ResultCode::Ok => match r.bin("v") {
                    Some(Value::Int(v)) => Some(*v as u64),
                    other => panic!("key {key}: bad bin {other:?}"),
                },
                ResultCode::NotFound => None,
                rc => panic!("key {key}: read failed with {rc:?}"),
            };
            let allowed: Vec<Option<u64>> = m.acked.iter().copied().chain(m.in_flight.iter().copied()).collect();
            let never_acked = m.acked.is_none();
            assert!(
                allowed.contains(&found) || (never_acked && found.is_none()),
                "round {round} key {key}: found {found:?}, acknowledged {:?}, in flight {:?}",
                m.acked,
                m.in_flight
            );
            // What recovery shows is now the durable truth for the next round.
            m.acked = Some(found);
            m.in_flight.clear();
        }
        let st = engine.stats();
        assert_eq!(st.read_errors, 0);
        eprintln!(
            "round {round}: recovered {} records, {} tombstones, {} damaged skipped",
            st.records, st.tombstones, st.cold_start_corrupt
        );
        engine.shutdown().unwrap();
    }
}
