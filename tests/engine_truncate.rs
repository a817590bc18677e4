//! Truncate (a set, or the whole namespace, before a time), per-set counts and set-filtered
//! scans, on simulated devices: truncated records stay gone across a crash and a clean
//! restart, later writes survive, and the space comes back.

mod common;

use std::sync::Arc;
use std::time::Duration;

use ferrospike_engine::io::{SimDevices, SimDisk};
use ferrospike_engine::types::{compute_digest, now_cl_ms, N_PARTITIONS};
use ferrospike_engine::{Bin, Command, Digest, Engine, EngineConfig, ResultCode, TruncateError, Value};

fn cfg() -> EngineConfig {
    let mut c = EngineConfig::new("test");
    c.shards = 2;
    c.pin_threads = false;
    c.wblock_bytes = 128 * 1024;
    c.post_write_cache_bytes = 0;
    c.max_write_cache_bytes = 8 << 20;
    c.defrag_sleep_us = 0;
    c
}

fn open(disk: &SimDisk) -> Engine {
    Engine::open(cfg(), Arc::new(SimDevices::new(vec![disk.clone()], 4096))).expect("engine opens")
}

/// A new 64 MiB simulated disk and an engine on it.
fn start() -> (SimDisk, Engine) {
    common::init_logs();
    let disk = SimDisk::new(64 << 20);
    let e = open(&disk);
    (disk, e)
}

fn digest(set: &str, i: u64) -> Digest {
    compute_digest(set, 1, &(i as i64).to_be_bytes())
}

fn put(e: &Engine, set: &str, i: u64) {
    let bins = vec![Bin::new("v", Value::Int(i as i64)), Bin::new("pad", Value::Blob(vec![i as u8; 2000]))];
    let r = e.execute(Command::put(digest(set, i), set, bins));
    assert_eq!(r.result, ResultCode::Ok, "put {set}/{i}");
}

fn found(e: &Engine, set: &str, keys: std::ops::Range<u64>) -> usize {
    keys.filter(|&i| e.execute(Command::get(digest(set, i))).result == ResultCode::Ok).count()
}

fn scan_count(e: &Engine, set: Option<&str>) -> usize {
    let mut n = 0;
    for pid in 0..N_PARTITIONS as u16 {
        let page = e.scan_partition(pid, set, None, usize::MAX, false);
        assert_eq!(page.result, ResultCode::Ok);
        if let Some(s) = set {
            assert!(page.records.iter().all(|r| r.set == s), "scan of set {s} returned another set");
        }
        n += page.records.len();
    }
    n
}

fn set_records(e: &Engine, set: &str) -> Option<(u64, u64)> {
    e.stats().sets.iter().find(|s| s.name == set).map(|s| (s.records, s.truncate_before_ms))
}

#[test]
fn truncating_a_set_is_durable_and_leaves_other_sets_alone() {
    let (disk, e) = start();
    for i in 0..300 {
        put(&e, "a", i);
    }
    for i in 0..200 {
        put(&e, "b", i);
    }
    for i in 0..100 {
        put(&e, "", i);
    }
    assert_eq!(set_records(&e, "a"), Some((300, 0)));
    assert_eq!(set_records(&e, "b"), Some((200, 0)));
    assert_eq!(e.stats().records, 600);
    assert_eq!(scan_count(&e, Some("a")), 300);
    assert_eq!(scan_count(&e, Some("b")), 200);
    assert_eq!(scan_count(&e, Some("never-written")), 0);
    assert_eq!(scan_count(&e, None), 600);

    e.flush();
    let free_before = e.stats().free_wblocks;
    let cutoff = e.truncate(Some("a"), None).expect("truncate set a");
    assert!(cutoff > 0);
    let st = e.stats();
    assert_eq!(st.truncated, 300);
    assert_eq!(st.records, 300);
    assert!(st.free_wblocks > free_before, "set a's wblocks are free again: {free_before} -> {}", st.free_wblocks);
    assert_eq!(found(&e, "a", 0..300), 0);
    assert_eq!(found(&e, "b", 0..200), 200);
    assert_eq!(found(&e, "", 0..100), 100);
    assert_eq!(scan_count(&e, Some("a")), 0);
    assert_eq!(set_records(&e, "a"), Some((0, cutoff)));
    assert_eq!(set_records(&e, "b"), Some((200, 0)));

    // Writes after the truncate are kept (their last-update time is not before it).
    std::thread::sleep(Duration::from_millis(2));
    for i in 1000..1050 {
        put(&e, "a", i);
    }
    // A crash, not a clean shutdown: the truncate must already be on the device.
    e.flush();
    e.crash();
    drop(e);
    let e = open(&disk);
    let st = e.stats();
    assert!(st.cold_start_truncated >= 300, "cold start skipped {} truncated records", st.cold_start_truncated);
    assert_eq!(found(&e, "a", 0..300), 0, "a truncated record came back after a crash");
    assert_eq!(found(&e, "a", 1000..1050), 50);
    assert_eq!(found(&e, "b", 0..200), 200);
    assert_eq!(found(&e, "", 0..100), 100);
    assert_eq!(set_records(&e, "a"), Some((50, cutoff)));
    e.shutdown().unwrap();
}

#[test]
fn namespace_truncate_before_a_time() {
    let (disk, e) = start();
    for i in 0..100 {
        put(&e, "a", i);
        put(&e, "", i);
    }
    std::thread::sleep(Duration::from_millis(20));
    let t = now_cl_ms();
    std::thread::sleep(Duration::from_millis(20));
    for i in 0..100 {
        put(&e, "b", i);
    }
    // Ten old records rewritten after the cutoff survive it; a deleted one stays deleted.
    for i in 0..10 {
        put(&e, "a", i);
    }
    assert_eq!(e.execute(Command::delete(digest("b", 5))).result, ResultCode::Ok);

    assert!(matches!(e.truncate(None, Some(now_cl_ms() + 60_000)), Err(TruncateError::Future { .. })));
    assert!(matches!(e.truncate(Some(""), None), Err(TruncateError::BadSet(_))));
    assert_eq!(e.truncate(None, Some(t)).unwrap(), t);
    let check = |e: &Engine| {
        assert_eq!(found(e, "a", 0..10), 10);
        assert_eq!(found(e, "a", 10..100), 0);
        assert_eq!(found(e, "", 0..100), 0);
        assert_eq!(found(e, "b", 0..100), 99);
        assert_eq!(e.execute(Command::get(digest("b", 5))).result, ResultCode::NotFound);
        assert_eq!(e.stats().records, 109);
    };
    check(&e);
    e.shutdown().unwrap();
    drop(e);
    let e = open(&disk);
    check(&e);
    e.crash();
    drop(e);
    let e = open(&disk);
    check(&e);
    e.shutdown().unwrap();
}

#[test]
fn the_truncate_table_has_a_limit_and_a_namespace_truncate_compacts_it() {
    let (disk, e) = start();
    let mut n = 0;
    let err = loop {
        match e.truncate(Some(&format!("{n:063}")), None) {
            Ok(_) => n += 1,
            Err(err) => break err,
        }
        assert!(n < 1000, "the truncate table never filled");
    };
    assert_eq!(err, TruncateError::TableFull);
    assert!((40..=60).contains(&n), "{n} set truncates fit in the header");
    // A namespace-wide truncate supersedes every set truncate before it.
    e.truncate(None, None).unwrap();
    e.truncate(Some("after"), None).unwrap();
    e.shutdown().unwrap();
    drop(e);
    let e = open(&disk);
    let st = e.stats();
    assert!(st.sets.iter().any(|s| s.name == "after" && s.truncate_before_ms > 0));
    e.shutdown().unwrap();
}

#[test]
fn truncate_now_covers_writes_of_the_same_millisecond_and_spares_later_ones() {
    let (disk, e) = start();
    for r in 0..20 {
        put(&e, "x", r);
        e.truncate(Some("x"), None).unwrap();
        assert_eq!(found(&e, "x", r..r + 1), 0, "round {r}: a write acknowledged before the truncate survived it");
        put(&e, "x", 1000 + r);
    }
    assert_eq!(found(&e, "x", 1000..1020), 1, "each truncate removes the previous round's later write");
    e.flush();
    e.crash();
    drop(e);
    let e = open(&disk);
    assert_eq!(found(&e, "x", 0..20), 0);
    assert_eq!(found(&e, "x", 1019..1020), 1, "the write after the last truncate is lost after a restart");
    e.shutdown().unwrap();
}

#[test]
fn a_write_right_after_truncating_a_set_never_written_survives_a_restart() {
    let (disk, e) = start();
    for r in 0..20 {
        let set = format!("new{r}");
        e.truncate(Some(&set), None).unwrap();
        put(&e, &set, r);
    }
    e.flush();
    e.crash();
    drop(e);
    let e = open(&disk);
    for r in 0..20 {
        assert_eq!(found(&e, &format!("new{r}"), r..r + 1), 1, "the write after truncating new{r} was lost");
    }
    e.shutdown().unwrap();
}
