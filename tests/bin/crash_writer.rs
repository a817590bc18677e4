//! Test helper for tests/engine_crash.rs: writes through the engine with commit-to-device
//! until it is killed, printing each operation before it starts (`S`) and once it is
//! acknowledged (`A`), so the parent knows exactly which writes were acknowledged.
//!
//! Usage: crash_writer DEVICE_FILE SIZE_BYTES WORKERS FIRST_VERSION [WBLOCK_BYTES POST_WRITE_CACHE_BYTES]

use std::io::Write;
use std::sync::Arc;

use ferrospike_engine::io::{open_devices, DeviceSpec};
use ferrospike_engine::{Bin, Command, Engine, EngineConfig, UserKey, Value};

const KEYS_PER_WORKER: u64 = 500;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let path = std::path::PathBuf::from(&args[1]);
    let size: u64 = args[2].parse().expect("size");
    let workers: u64 = args[3].parse().expect("workers");
    let first: u64 = args[4].parse().expect("first version");
    let mut cfg = EngineConfig::new("test");
    cfg.shards = 2;
    cfg.commit_to_device = true;
    if let (Some(wb), Some(cache)) = (args.get(5), args.get(6)) {
        cfg.wblock_bytes = wb.parse().expect("wblock bytes");
        cfg.post_write_cache_bytes = cache.parse().expect("cache bytes");
    }
    let devs = open_devices(&[DeviceSpec { path, file_size: Some(size) }], 256).expect("devices");
    let engine = Arc::new(Engine::open(cfg, Arc::new(devs)).expect("engine"));
    println!("READY");
    let threads: Vec<_> = (0..workers)
        .map(|w| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                let mut x = w * 7919 + first;
                for n in 0.. {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let key = w * KEYS_PER_WORKER + (x >> 33) % KEYS_PER_WORKER;
                    let d = UserKey::Int(key as i64).digest("demo");
                    let ver = first + n * workers + w;
                    let delete = (x >> 20).is_multiple_of(8);
                    let cmd = if delete {
                        Command::delete(d)
                    } else {
                        let pad = vec![(ver % 251) as u8; 100 + (x % 3000) as usize];
                        Command::put(
                            d,
                            "demo",
                            vec![Bin::new("v", Value::Int(ver as i64)), Bin::new("p", Value::Blob(pad))],
                        )
                    };
                    let op = if delete { "D" } else { "P" };
                    emit(&format!("S {op} {key} {ver}"));
                    let r = engine.execute(cmd);
                    if r.is_ok() || (delete && r.result == ferrospike_engine::ResultCode::NotFound) {
                        emit(&format!("A {op} {key} {ver}"));
                    } else {
                        emit(&format!("F {op} {key} {ver} {:?}", r.result));
                    }
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
