//! 100k records of mixed sizes (16 B to 100 KiB) and every bin type go through the engine on a
//! real device; after a clean restart every record is byte-identical. Runs on a file device
//! and, when the test runs as root, on a loop device it creates (it prints which).

mod common;

use std::sync::Arc;

use ferrospike_engine::io::{open_devices, DeviceSpec};
use ferrospike_engine::{Bin, Command, Engine, EngineConfig, ResultCode};

const RECORDS: u64 = 100_000;
const SEED: u64 = 0x5eed;

fn config() -> EngineConfig {
    let mut c = EngineConfig::new("test");
    c.shards = 2;
    c.wblock_bytes = 1 << 20;
    c.post_write_cache_bytes = 8 << 20;
    c
}

fn open(spec: &DeviceSpec) -> Engine {
    let devs = Arc::new(open_devices(std::slice::from_ref(spec), 256).expect("devices open"));
    Engine::open(config(), devs).expect("engine opens")
}

fn round_trip(spec: DeviceSpec) {
    let engine = open(&spec);
    let puts = (0..RECORDS).map(|i| {
        let (d, key) = common::digest_of(i);
        Command::put(d, "demo", common::gen_bins(SEED, i)).with_key(key)
    });
    common::pipeline(&engine, puts, 256, |i, r| assert_eq!(r.result, ResultCode::Ok, "put {i}: {r:?}"));
    let st = engine.stats();
    assert_eq!(st.records, RECORDS);
    eprintln!(
        "wrote {} records: {} MiB written to the device, index {:.1} bytes/record",
        st.records,
        st.device_write_bytes >> 20,
        st.index_bytes_per_record
    );
    engine.shutdown().expect("clean shutdown");
    drop(engine);

    let engine = open(&spec);
    let st = engine.stats();
    assert!(st.previous_shutdown_clean);
    assert_eq!(st.records, RECORDS, "every record found by cold start");
    assert_eq!(st.cold_start_corrupt, 0);
    let gets = (0..RECORDS).map(|i| Command::get(common::digest_of(i).0));
    common::pipeline(&engine, gets, 256, |i, r| {
        assert_eq!(r.result, ResultCode::Ok, "get {i}");
        let got: Vec<Bin> = r.bins.into_iter().map(|b| Bin::new(&b.name, b.value)).collect();
        assert!(got == common::gen_bins(SEED, i as u64), "record {i} differs after restart");
    });
    // The stored user key comes back too.
    let page = engine.scan_partition(common::digest_of(7).0.partition(), None, None, usize::MAX, false);
    assert!(page.records.iter().any(|r| r.key.as_deref() == Some(&common::digest_of(7).1[..])));
    engine.shutdown().unwrap();
}

#[test]
fn hundred_thousand_records_survive_restart_on_a_file() {
    common::init_logs();
    let dir = common::TestDir::new("restart-file");
    eprintln!("using a file device under {}", dir.0.display());
    round_trip(common::file_spec(&dir, "dev.dat", 4 << 30));
}

#[test]
fn hundred_thousand_records_survive_restart_on_a_loop_device() {
    common::init_logs();
    let dir = common::TestDir::new("restart-loop");
    let (spec, _loop) = common::loop_or_file(&dir, 4 << 30);
    round_trip(spec);
}
