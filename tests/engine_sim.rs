//! The engine on simulated devices: deterministic runs of its semantics against a model,
//! restarts, torn writes at a crash, and corruption found by the read path.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use ferrospike_engine::hook::ShardHook;
use ferrospike_engine::io::{SimDevices, SimDisk, SimFaults};
use ferrospike_engine::ops::{apply, Current, Outcome};
use ferrospike_engine::types::now_cl_secs;
use ferrospike_engine::{
    Bin, Command, Digest, Engine, EngineConfig, ExistsAction, GenPolicy, Op, ResultCode, Ttl, Value,
};
use rand::{Rng, SeedableRng};

fn cfg(shards: usize) -> EngineConfig {
    let mut c = EngineConfig::new("test");
    c.shards = shards;
    c.pin_threads = false;
    c.wblock_bytes = 128 * 1024;
    c.post_write_cache_bytes = 0;
    c.max_write_cache_bytes = 8 << 20;
    c
}

fn open(disks: &[SimDisk], c: EngineConfig) -> Engine {
    open_with_hook(disks, c, None)
}

/// [`open`], with `hook` running in shard 0's loop.
fn open_with_hook(disks: &[SimDisk], c: EngineConfig, hook: Option<Box<dyn ShardHook>>) -> Engine {
    let devs = Arc::new(SimDevices::new(disks.to_vec(), 4096));
    Engine::open_with_hooks(c, devs, hook.into_iter().collect()).expect("engine opens")
}

/// Write 100 records of 2000 bytes (keys `first..first + 100`), enough to fill a 128 KiB
/// open wblock: the records written before are then sealed away, written and (without a
/// post-write cache) read from the device.
fn fill_open_wblock(engine: &Engine, first: u64) {
    for k in first..first + 100 {
        let filler = Command::put(common::digest_of(k).0, "demo", vec![Bin::new("b", Value::Blob(vec![7; 2000]))]);
        assert_eq!(engine.execute(filler).result, ResultCode::Ok);
    }
}

fn disks(n: usize, size: u64) -> Vec<SimDisk> {
    (0..n).map(|_| SimDisk::new(size)).collect()
}

/// Expiry times computed by the engine and by the model from their own clocks, a second
/// or two apart at most.
fn same_expiry(a: u32, b: u32) -> bool {
    (a == 0) == (b == 0) && a.abs_diff(b) <= 2
}

/// The user key of the test digests (the same for a digest whenever it is sent).
fn key_of(d: &Digest) -> [u8; 8] {
    d.0[..8].try_into().unwrap()
}

fn random_command(rng: &mut impl Rng, digests: &[Digest]) -> Command {
    let d = digests[rng.gen_range(0..digests.len())];
    let small = |rng: &mut dyn rand::RngCore| Value::Blob(vec![rng.gen(); rng.gen_range(0..3000)]);
    let mut cmd = match rng.gen_range(0..10) {
        0 => Command::get(d),
        1 => Command::exists(d),
        2 => Command::delete(d),
        3 => Command::touch(d, if rng.gen_bool(0.5) { Ttl::Never } else { Ttl::Secs(100_000) }),
        4 => Command::operate(
            d,
            "demo",
            vec![
                Op::Incr("n".into(), Value::Int(rng.gen_range(-5..5))),
                Op::Read("n".into()),
                Op::Append("s".into(), Value::Str(b"x".to_vec())),
                Op::Read("s".into()),
            ],
        ),
        5 => Command::operate(d, "demo", vec![Op::Write("a".into(), Value::Nil)]),
        6 => Command::get_bins(d, &["a", "n"]),
        // Puts of every bin of a two-bin record (in either order) merge without reading it;
        // a put of one bin, or onto a record with more bins, reads it.
        _ => {
            let (a, k) = (Bin::new("a", small(rng)), Bin::new("k", Value::Int(rng.gen())));
            let put = match rng.gen_range(0..4) {
                0 => Command::put(d, "demo", vec![k, a]),
                1 => Command::put(d, "demo", vec![a]),
                _ => Command::put(d, "demo", vec![a, k]),
            };
            // Some keep the record's expiry, which must then come from the right version.
            let put = if rng.gen_bool(0.2) { put.with_ttl(Ttl::Keep) } else { put };
            // Now and then the key is stored: later updates must then read the record.
            if rng.gen_bool(0.05) {
                put.with_key(key_of(&d).to_vec())
            } else {
                put
            }
        }
    };
    cmd.respond_all_ops = rng.gen_bool(0.3) && !cmd.read_all;
    if cmd.is_write() && !cmd.delete {
        cmd.exists = match rng.gen_range(0..8) {
            0 => ExistsAction::CreateOnly,
            1 => ExistsAction::UpdateOnly,
            2 if !cmd.ops.iter().any(|o| matches!(o, Op::Incr(..) | Op::Touch | Op::Write(_, Value::Nil))) => {
                ExistsAction::CreateOrReplace
            }
            _ => ExistsAction::Update,
        };
        if rng.gen_bool(0.1) {
            cmd.generation = GenPolicy::Eq(rng.gen_range(0..4));
        }
    }
    cmd
}

/// The engine answers exactly as the pure semantics applied to a model map, through cache
/// misses, disk reads, and restarts.
#[test]
fn semantics_match_a_model_across_restarts() {
    common::init_logs();
    let disks = disks(2, 64 << 20);
    let digests: Vec<Digest> = (0..300).map(|i| common::digest_of(i).0).collect();
    let mut model: HashMap<Digest, Current> = HashMap::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for round in 0..3 {
        let engine = open(&disks, cfg(2 + round % 2));
        for _ in 0..4000 {
            let cmd = random_command(&mut rng, &digests);
            let now = now_cl_secs();
            let expect = apply(&cmd, model.get(&cmd.digest), now, 0);
            let got = engine.execute(cmd.clone());
            let want = match &expect {
                Outcome::Reply(r) => r.clone(),
                Outcome::Store { reply, .. } | Outcome::Delete { reply } => reply.clone(),
            };
            assert_eq!(got.result, want.result, "{cmd:?}");
            assert_eq!(got.bins, want.bins, "{cmd:?}");
            assert_eq!(got.generation, want.generation, "{cmd:?}");
            assert!(same_expiry(got.void_time, want.void_time), "{cmd:?}: {} vs {}", got.void_time, want.void_time);
            match expect {
                Outcome::Store { generation, void_time, key, bins, .. } => {
                    model.insert(cmd.digest, Current { generation, void_time, key, bins });
                }
                Outcome::Delete { .. } => {
                    model.remove(&cmd.digest);
                }
                Outcome::Reply(_) => {}
            }
        }
        let st = engine.stats();
        assert_eq!(st.records, model.len() as u64);
        assert!(st.device_reads > 0, "with no post-write cache, reads must reach the device");
        assert!(st.update_reads_skipped > 100, "updates of every bin skip the read: {}", st.update_reads_skipped);
        engine.shutdown().unwrap();
    }
    let engine = open(&disks, cfg(2));
    assert!(engine.stats().previous_shutdown_clean);
    // Stored keys survive every update (a scan returns them).
    let mut keys: HashMap<Digest, Option<Vec<u8>>> = HashMap::new();
    for pid in 0..ferrospike_engine::types::N_PARTITIONS as u16 {
        let page = engine.scan_partition(pid, None, None, usize::MAX, false);
        assert!(page.done);
        keys.extend(page.records.into_iter().map(|r| (r.digest, r.key)));
    }
    assert_eq!(keys.len(), model.len());
    for (d, c) in &model {
        assert_eq!(keys.get(d), Some(&c.key), "stored key of {d:?}");
    }
    assert!(model.values().any(|c| c.key.is_some()), "some records store their key");
    for d in &digests {
        let r = engine.execute(Command::get(*d));
        match model.get(d) {
            Some(c) => {
                assert_eq!(r.result, ResultCode::Ok);
                assert_eq!(r.generation, c.generation);
                assert!(same_expiry(r.void_time, c.void_time), "{d:?}: {} vs {}", r.void_time, c.void_time);
                let bins: Vec<Bin> = r.bins.iter().map(|b| Bin::new(&b.name, b.value.clone())).collect();
                assert_eq!(bins, c.bins);
            }
            None => assert_eq!(r.result, ResultCode::NotFound),
        }
    }
}

/// With commit-to-device, a crash that tears the write in flight (a random subset of its
/// 4 KiB pages lands) loses no acknowledged write and brings back no deleted record.
#[test]
fn torn_write_at_crash_loses_no_acknowledged_write() {
    common::init_logs();
    for seed in 0..6u64 {
        let disks = disks(1, 64 << 20);
        let mut c = cfg(2);
        c.commit_to_device = true;
        let engine = open(&disks, c.clone());
        // Some durable history first, including deletes.
        let mut acked: HashMap<u64, Option<u64>> = HashMap::new();
        for i in 0..200u64 {
            let (d, _) = common::digest_of(i);
            assert!(engine.execute(Command::put(d, "demo", vec![Bin::new("v", Value::Int(i as i64))])).is_ok());
            acked.insert(i, Some(i));
        }
        for i in (0..200u64).step_by(7) {
            let (d, _) = common::digest_of(i);
            assert!(engine.execute(Command::delete(d)).is_ok());
            acked.insert(i, None);
        }
        disks[0].set_faults(SimFaults { seed, crash_after_writes: Some(5 + seed * 3), ..Default::default() });
        let mut maybe: HashMap<u64, Vec<u64>> = HashMap::new();
        for n in 0..400u64 {
            let i = n % 250;
            let v = 1000 + n;
            let (d, _) = common::digest_of(i);
            let r = engine.execute(Command::put(d, "demo", vec![Bin::new("v", Value::Int(v as i64))]));
            if r.is_ok() {
                acked.insert(i, Some(v));
            } else {
                maybe.entry(i).or_default().push(v);
            }
        }
        assert!(disks[0].crashed(), "the fault must have fired");
        engine.crash();
        drop(engine);
        disks[0].clear_faults();
        let engine = open(&disks, c);
        assert!(!engine.stats().previous_shutdown_clean);
        for (i, want) in &acked {
            let (d, _) = common::digest_of(*i);
            let r = engine.execute(Command::get(d));
            let got = r.bin("v").cloned();
            let ok = match want {
                Some(v) => got == Some(Value::Int(*v as i64)),
                None => r.result == ResultCode::NotFound,
            } || maybe.get(i).is_some_and(|m| m.iter().any(|m| got == Some(Value::Int(*m as i64))));
            assert!(ok, "seed {seed} key {i}: acknowledged {want:?}, found {got:?} ({:?})", r.result);
        }
    }
}

/// The same on a small device kept busy by defrag: crashes (torn write, then nothing)
/// land while wblocks are being defragmented and reused, and still no acknowledged write is
/// lost and no deleted record comes back.
#[test]
fn torn_write_during_defrag_loses_no_acknowledged_write() {
    common::init_logs();
    for seed in 0..4u64 {
        let disks = disks(1, 4 << 20); // 31 data wblocks of 128 KiB
        let mut c = cfg(1);
        c.commit_to_device = true;
        c.defrag_sleep_us = 0;
        let engine = open(&disks, c.clone());
        let mut acked: HashMap<u64, Option<u64>> = HashMap::new();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut ver = 0u64;
        let mut step =
            |engine: &Engine, acked: &mut HashMap<u64, Option<u64>>, maybe: &mut HashMap<u64, Vec<Option<u64>>>| {
                ver += 1;
                let key = rng.gen_range(0..300u64);
                let (d, _) = common::digest_of(key);
                let delete = rng.gen_range(0..10) == 0;
                let cmd = if delete {
                    Command::delete(d)
                } else {
                    Command::put(
                        d,
                        "demo",
                        vec![Bin::new("v", Value::Int(ver as i64)), Bin::new("p", Value::Blob(vec![7; 1500]))],
                    )
                };
                let r = engine.execute(cmd);
                let state = if delete { None } else { Some(ver) };
                if r.is_ok() || (delete && r.result == ResultCode::NotFound) {
                    acked.insert(key, state);
                } else {
                    maybe.entry(key).or_default().push(state);
                }
            };
        let mut maybe: HashMap<u64, Vec<Option<u64>>> = HashMap::new();
        // Churn well past the device size so defrag is running, then arm the crash.
        for _ in 0..6000 {
            step(&engine, &mut acked, &mut maybe);
        }
        assert!(maybe.is_empty(), "seed {seed}: writes failed before the crash: {maybe:?}");
        assert!(engine.stats().defrag_reads > 0, "defrag must be running");
        disks[0].set_faults(SimFaults { seed, crash_after_writes: Some(3 + seed * 5), ..Default::default() });
        for _ in 0..400 {
            step(&engine, &mut acked, &mut maybe);
        }
        assert!(disks[0].crashed(), "the fault must have fired");
        engine.crash();
        drop(engine);
        disks[0].clear_faults();
        let engine = open(&disks, c);
        for (key, want) in &acked {
            let r = engine.execute(Command::get(common::digest_of(*key).0));
            let got = match r.result {
                ResultCode::Ok => match r.bin("v") {
                    Some(Value::Int(v)) => Some(*v as u64),
                    other => panic!("key {key}: {other:?}"),
                },
                ResultCode::NotFound => None,
                rc => panic!("seed {seed} key {key}: {rc:?}"),
            };
            let ok = got == *want || maybe.get(key).is_some_and(|m| m.contains(&got));
            assert!(ok, "seed {seed} key {key}: acknowledged {want:?}, found {got:?}");
        }
    }
}

/// A put of bin "v" = `v` to test key `key`.
fn put_v(key: u64, v: i64) -> Command {
    Command::put(common::digest_of(key).0, "demo", vec![Bin::new("v", Value::Int(v))])
}

/// Bin "v" of test key `key`: the value, None when not found, or the error.
fn get_v(engine: &Engine, key: u64) -> Result<Option<i64>, ResultCode> {
    let r = engine.execute(Command::get(common::digest_of(key).0));
    match (r.result, r.bin("v")) {
        (ResultCode::Ok, Some(Value::Int(v))) => Ok(Some(*v)),
        (ResultCode::NotFound, _) => Ok(None),
        (rc, _) => Err(rc),
    }
}

/// A create-only write to an existing record, or a write whose generation check fails,
/// answers its error from the index without reading the record (which is on the device:
/// the tests run without a post-write cache). A stored key must still be compared with a
/// sent one first, so that case still reads.
#[test]
fn writes_that_fail_on_existence_or_generation_do_not_read_the_record() {
    common::init_logs();
    let engine = open(&disks(1, 64 << 20), cfg(1));
    let reads = |e: &Engine| e.stats().device_reads;
    assert_eq!(engine.execute(put_v(1, 10)).result, ResultCode::Ok);
    assert_eq!(engine.execute(put_v(2, 20).with_key(b"two".to_vec())).result, ResultCode::Ok);
    // Fill the open wblock so that the two records' one is sealed, written and dropped.
    fill_open_wblock(&engine, 1000);
    wait_for("key 1 is read from the device", || {
        let b = reads(&engine);
        get_v(&engine, 1) == Ok(Some(10)) && reads(&engine) > b
    });
    let before = reads(&engine);

    let mut create = put_v(1, 11);
    create.exists = ExistsAction::CreateOnly;
    assert_eq!(engine.execute(create).result, ResultCode::RecordExists);
    let incr = |generation| {
        let mut c = Command::operate(common::digest_of(1).0, "demo", vec![Op::Incr("v".into(), Value::Int(1))]);
        c.generation = generation;
        c
    };
    assert_eq!(engine.execute(incr(GenPolicy::Eq(5))).result, ResultCode::Generation);
    assert_eq!(engine.execute(incr(GenPolicy::Gt(1))).result, ResultCode::Generation);
    assert_eq!(reads(&engine), before, "failing on the index's metadata reads nothing");

    // The same increment with a generation that holds needs the old value: it reads.
    assert_eq!(engine.execute(incr(GenPolicy::Eq(1))).result, ResultCode::Ok);
    assert!(reads(&engine) > before, "an increment reads the record from the device");
    assert_eq!(get_v(&engine, 1), Ok(Some(11)));

    // A stored key is compared with a sent one before anything else.
    let before = reads(&engine);
    let mut other_key = put_v(2, 21).with_key(b"zwei".to_vec());
    other_key.exists = ExistsAction::CreateOnly;
    assert_eq!(engine.execute(other_key).result, ResultCode::KeyMismatch);
    let mut same_key = put_v(2, 21).with_key(b"two".to_vec());
    same_key.exists = ExistsAction::CreateOnly;
    assert_eq!(engine.execute(same_key).result, ResultCode::RecordExists);
    assert!(reads(&engine) >= before + 2, "both create-only writes with a sent key read the stored one");
    assert_eq!(get_v(&engine, 2), Ok(Some(20)));
    engine.shutdown().unwrap();
}

/// A client write whose device write fails latches the shard read-only. Until a restart,
/// a read of a record that failed write carried answers SERVER_ERROR instead of what the
/// index says (the new value, which the device may not hold, or nothing for a delete that
/// never landed); other records are still served. The restart brings back what the
/// device holds.
#[test]
fn reads_of_records_whose_write_failed_answer_server_error_until_restart() {
    common::init_logs();
    // The torn write is one 4 KiB page: it lands whole (seeds 1 and 4) or not at all (2).
    for (seed, delete) in [(1u64, false), (2, false), (2, true), (4, true)] {
        let disks = disks(1, 4 << 20);
        let mut c = cfg(1);
        c.commit_to_device = true;
        let engine = open(&disks, c.clone());
        for key in 0..3 {
            assert!(engine.execute(put_v(key, 1)).is_ok());
        }
        disks[0].set_faults(SimFaults { seed, crash_after_writes: Some(0), ..Default::default() });
        let failing = if delete { Command::delete(common::digest_of(0).0) } else { put_v(0, 2) };
        let r = engine.execute(failing);
        assert_eq!(r.result, ResultCode::ServerError, "seed {seed}: the write must fail");
        assert_eq!(get_v(&engine, 0), Err(ResultCode::ServerError), "seed {seed}: key 0 after its failed write");
        assert_eq!(get_v(&engine, 1), Ok(Some(1)), "seed {seed}: key 1 is untouched");
        let (p0, p1) = (common::digest_of(0).0.partition(), common::digest_of(1).0.partition());
        assert_ne!(p0, p1, "keys 0 and 1 fall in different partitions");
        let page = engine.scan_partition(p0, None, None, 100, true);
        assert_eq!(page.result, ResultCode::ServerError, "seed {seed}: a scan of key 0's partition");
        let page = engine.scan_partition(p1, None, None, 100, true);
        assert_eq!(page.result, ResultCode::Ok, "seed {seed}: a scan of key 1's partition");
        assert_eq!(page.records.iter().map(|r| r.digest).collect::<Vec<_>>(), vec![common::digest_of(1).0]);
        assert_eq!(engine.execute(put_v(2, 3)).result, ResultCode::ServerError, "seed {seed}: latched");
        assert_eq!(get_v(&engine, 2), Ok(Some(1)), "seed {seed}: key 2's refused update changed nothing");
        engine.crash();
        drop(engine);
        disks[0].clear_faults();
        let engine = open(&disks, c);
        // The torn write may have landed whole: then the device holds the new version.
        let after = get_v(&engine, 0);
        let landed = if delete { Ok(None) } else { Ok(Some(2)) };
        assert!(after == Ok(Some(1)) || after == landed, "seed {seed}: key 0 after the restart: {after:?}");
        assert_eq!(get_v(&engine, 1), Ok(Some(1)), "seed {seed}");
        assert_eq!(get_v(&engine, 2), Ok(Some(1)), "seed {seed}");
    }
}

/// A scan page whose device reads are still in flight when a failed write latches the
/// shard answers SERVER_ERROR when the write's record is in its partition, like a page
/// started after the latch: what the page took from the index and from memory before the
/// latch may be a version the device never got (here it happens to be the old one, which
/// the device holds; the page cannot tell).
#[test]
fn a_scan_page_reading_when_the_shard_latches_answers_server_error() {
    common::init_logs();
    // Two keys of one partition.
    let mut first: HashMap<u16, u64> = HashMap::new();
    let (a, b) = (0u64..)
        .find_map(|k| {
            let p = common::digest_of(k).0.partition();
            first.get(&p).map(|&a| (a, k)).or_else(|| {
                first.insert(p, k);
                None
            })
        })
        .expect("a pair");
    let pid = common::digest_of(a).0.partition();
    let disks = disks(1, 8 << 20);
    let mut c = cfg(1);
    c.commit_to_device = true;
    let engine = open(&disks, c);
    assert!(engine.execute(put_v(a, 1)).is_ok());
    assert!(engine.execute(put_v(b, 1)).is_ok());
    // Fill the open wblock so that theirs is sealed and both are read from the device.
    fill_open_wblock(&engine, 1_000_000);
    let page = engine.scan_partition(pid, None, None, 100, true);
    assert_eq!(page.result, ResultCode::Ok);
    assert_eq!(page.records.len(), 2, "both keys, before any fault");
    let reads = engine.stats().device_reads;
    assert!(reads >= 2, "the page was read from the device ({reads} reads)");

    disks[0].set_faults(SimFaults { crash_after_writes: Some(0), read_delay_ms: 1000, ..Default::default() });
    std::thread::scope(|s| {
        let scan = s.spawn(|| engine.scan_partition(pid, None, None, 100, true));
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!scan.is_finished(), "the page waits for its reads");
        assert_eq!(engine.execute(put_v(b, 2)).result, ResultCode::ServerError, "the write fails");
        let page = scan.join().expect("scan thread");
        assert_eq!(page.result, ResultCode::ServerError, "the page after the latch: {:?}", page.records);
    });
    engine.crash();
}

/// Without commit-to-device a write completes before it is durable; when the fsync meant
/// to make it so fails, the shard latches read-only and reads of the records that write
/// carried answer SERVER_ERROR until a restart, which brings back what the device holds.
#[test]
fn reads_of_records_whose_fsync_failed_answer_server_error_until_restart() {
    common::init_logs();
    let disks = disks(1, 4 << 20);
    let mut c = cfg(1);
    c.flush_max_ms = 10;
    let engine = open(&disks, c.clone());
    for key in 0..3 {
        assert!(engine.execute(put_v(key, 1)).is_ok());
    }
    engine.flush();
    // Let the fsync due after that flush complete (it is sent within flush-max-ms), so that
    // the first one to fail is the one meant to make key 0's update durable.
    std::thread::sleep(std::time::Duration::from_millis(100));
    // The next write reports success without landing, and no fsync succeeds.
    disks[0].set_faults(SimFaults { lost_writes: vec![1], fail_fsyncs: true, ..Default::default() });
    assert!(engine.execute(put_v(0, 2)).is_ok(), "acknowledged before it is written");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while engine.execute(put_v(2, 3)).result != ResultCode::ServerError {
        assert!(std::time::Instant::now() < deadline, "the failed fsync must latch the shard");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(get_v(&engine, 0), Err(ResultCode::ServerError), "key 0 after its fsync failed");
    assert_eq!(get_v(&engine, 1), Ok(Some(1)), "key 1 is untouched");
    engine.crash();
    drop(engine);
    disks[0].clear_faults();
    let engine = open(&disks, c);
    assert_eq!(get_v(&engine, 0), Ok(Some(1)), "the lost write is gone after the restart");
    assert_eq!(get_v(&engine, 1), Ok(Some(1)));
}

/// Device read errors in the second 128 KiB piece of every 1 MiB wblock: defrag gives up
/// each wblock it cannot read whole, leaves it alone a while and goes on; client writes
/// keep succeeding, and a read answers a record's latest version or SERVER_ERROR (never an
/// older version or NOT_FOUND). Once the device reads again every record survives a
/// restart, and defrag goes on after it.
#[test]
fn read_errors_between_defrag_pieces_stop_only_those_wblocks() {
    common::init_logs();
    let mib = 1u64 << 20;
    let disks = disks(1, 24 * mib);
    let mut c = cfg(1);
    c.wblock_bytes = mib as u32;
    c.defrag_sleep_us = 0;
    let engine = open(&disks, c.clone());
    let put = |engine: &Engine, key: u64, ver: u64| {
        let bins = vec![Bin::new("v", Value::Int(ver as i64)), Bin::new("p", Value::Blob(vec![7; 1500]))];
        engine.execute(Command::put(common::digest_of(key).0, "demo", bins))
    };
    let keys = 4000u64; // about 6.4 MiB of records
    let mut latest: HashMap<u64, i64> = HashMap::new();
    let mut ver = 0u64;
    for key in 0..keys {
        ver += 1;
        assert!(put(&engine, key, ver).is_ok());
        latest.insert(key, ver as i64);
    }
    engine.flush();
    let bad: Vec<(u64, u64)> = (0..24).map(|w| (w * mib + 128 * 1024, w * mib + 256 * 1024)).collect();
    disks[0].set_faults(SimFaults { eio_read_ranges: bad, ..Default::default() });
    // Rewrite the first half twice: the wblocks holding it turn sparse and defrag reads them.
    for _ in 0..2 {
        for key in 0..keys / 2 {
            ver += 1;
            let r = put(&engine, key, ver);
            // An update reads the old record only for bins it does not write; these write
            // both, so a bad range never fails a write.
            assert!(r.is_ok(), "key {key}: {:?}", r.result);
            latest.insert(key, ver as i64);
        }
    }
    engine.flush();
    let mut errors = 0;
    for (key, want) in &latest {
        match get_v(&engine, *key) {
            Ok(Some(v)) => assert_eq!(v, *want, "key {key}: an older version"),
            Err(ResultCode::ServerError) => errors += 1,
            other => panic!("key {key}: {other:?}"),
        }
    }
    assert!(errors > 0 && errors < keys, "reads in the bad ranges fail, others do not ({errors} failed)");
    // Each unreadable wblock is tried once, then left alone (not read and logged at every
    // defrag pause).
    let failed = engine.stats().defrag_read_errors;
    assert!((1..=24).contains(&failed), "{failed} failed defrag reads of 24 wblocks at most");
    disks[0].clear_faults();
    for key in keys / 2..keys {
        ver += 1;
        assert!(put(&engine, key, ver).is_ok());
        latest.insert(key, ver as i64);
    }
    engine.shutdown().unwrap();
    drop(engine);
    // Every record survives the restart, and defrag works as before on the churn after it.
    let engine = open(&disks, c);
    for (key, want) in &latest {
        assert_eq!(get_v(&engine, *key), Ok(Some(*want)), "key {key} after the restart");
    }
    for key in 0..keys / 2 {
        ver += 1;
        assert!(put(&engine, key, ver).is_ok());
        latest.insert(key, ver as i64);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while engine.stats().defrag_reads == 0 {
        assert!(std::time::Instant::now() < deadline, "defrag must run after the restart");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert_eq!(engine.stats().defrag_read_errors, 0);
    for (key, want) in &latest {
        assert_eq!(get_v(&engine, *key), Ok(Some(*want)), "key {key} after defrag");
    }
}

/// Records of about 1.5 KiB: some 80 fill a 128 KiB wblock.
const FILL_BYTES: usize = 1500;

/// A put of bin "v" = `ver` and a `FILL_BYTES` bin "p" to test key `key`. It writes every
/// bin of the record, so it never reads the old version (a bad read range never fails it).
fn put_vp(engine: &Engine, key: u64, ver: i64) {
    let bins = vec![Bin::new("v", Value::Int(ver)), Bin::new("p", Value::Blob(vec![7; FILL_BYTES]))];
    let r = engine.execute(Command::put(common::digest_of(key).0, "demo", bins));
    assert!(r.is_ok(), "put of key {key}: {:?}", r.result);
}

/// Wblock `w` of `disk` as a cold start sees it, read directly (past any fault).
fn scan_wblock(disk: &SimDisk, w: u32, wb: u64) -> ferrospike_engine::coldstart::WblockScan {
    let image = disk.read_raw(w as u64 * wb, wb as usize);
    ferrospike_engine::coldstart::scan_wblock(&image, device_id(&disk.read_raw(0, 8192)), 0, w)
}

/// The test keys among `keys` with a record in the current use of wblock `w` of `disk`.
fn keys_in_wblock(disk: &SimDisk, w: u32, wb: u64, keys: impl Iterator<Item = u64>) -> Vec<u64> {
    let names: HashMap<Digest, u64> = keys.map(|k| (common::digest_of(k).0, k)).collect();
    let mut found: Vec<u64> =
        scan_wblock(disk, w, wb).records.iter().filter_map(|r| names.get(&r.0.digest)).copied().collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// The wblock of `disk` holding test key `key` (written once).
fn wblock_of(disk: &SimDisk, wb: u64, key: u64) -> u32 {
    (1..(disk.size() / wb) as u32)
        .find(|&w| !keys_in_wblock(disk, w, wb, std::iter::once(key)).is_empty())
        .unwrap_or_else(|| panic!("key {key} is on no wblock"))
}

/// Test keys with their latest version (`None`: deleted).
type Latest = HashMap<u64, Option<i64>>;

/// Keys 0..200 written once each with both bins (versions 1..=200) and flushed: their
/// latest versions and the last version used.
fn put_200(engine: &Engine) -> (Latest, i64) {
    let mut latest = Latest::new();
    for key in 0..200 {
        put_vp(engine, key, key as i64 + 1);
        latest.insert(key, Some(key as i64 + 1));
    }
    engine.flush();
    (latest, 200)
}

/// A one-shard config whose defrag does not pause between wblocks.
fn defrag_cfg() -> EngineConfig {
    let mut c = cfg(1);
    c.defrag_sleep_us = 0;
    c
}

/// Keys `keys` written with both bins at version `ver`, and so recorded in `latest`.
fn put_all(engine: &Engine, keys: impl Iterator<Item = u64>, ver: i64, latest: &mut Latest) {
    for key in keys {
        put_vp(engine, key, ver);
        latest.insert(key, Some(ver));
    }
}

/// One 4 MiB sim disk (31 data wblocks of 128 KiB) and a one-shard config whose defrag
/// does not pause between wblocks and looks for candidates in two steps.
fn small_defrag_setup() -> (Vec<SimDisk>, EngineConfig) {
    let mut c = defrag_cfg();
    // Two looks for candidates per pass, as on a device of more than 2^16 wblocks.
    c.defrag_look_wblocks = 16;
    (disks(1, 4 << 20), c)
}

/// The wblock holding key 0 of keys 0..200 and the keys in it, checked to be full.
fn key0_wblock(disk: &SimDisk, wb: u64) -> (u32, Vec<u64>) {
    let target = wblock_of(disk, wb, 0);
    let keys = keys_in_wblock(disk, target, wb, 0..200);
    assert!(keys.len() > 60, "the wblock is full: {keys:?}");
    (target, keys)
}

/// Overwrite the filler keys `fillers` in turn, with a flush after each pass, until
/// wblock `w` holds a new write (it was freed, then taken from the free list, which is
/// first in first out). Panics when that has not happened after eight times the device's
/// worth of writes: `w` was never freed.
#[track_caller]
fn churn_until_reused(
    engine: &Engine,
    disk: &SimDisk,
    w: u32,
    fillers: std::ops::Range<u64>,
    ver: &mut i64,
    latest: &mut Latest,
) {
    let wb = engine.config().wblock_bytes as u64;
    let before = scan_wblock(disk, w, wb).seq;
    let passes = 8 * disk.size() / ((fillers.end - fillers.start) * FILL_BYTES as u64);
    for _ in 0..passes {
        for key in fillers.clone() {
            *ver += 1;
            put_vp(engine, key, *ver);
            latest.insert(key, Some(*ver));
        }
        engine.flush();
        if scan_wblock(disk, w, wb).seq != before {
            return;
        }
    }
    panic!("wblock {w} was never reused: it was not freed");
}

/// Every key reads back its latest version.
fn check_latest(engine: &Engine, latest: &Latest, when: &str) {
    for (&key, &want) in latest {
        assert_eq!(get_v(engine, key), Ok(want), "key {key} {when}");
    }
}

/// Wait for `cond`, for 10 seconds at most.
#[track_caller]
fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A wblock whose defrag read failed is read again once `defrag_retry_unreadable_ms` has
/// passed; the device reading again by then, it is defragmented like any other (its live
/// records move out and it is freed, then reused), and every record reads back its latest
/// version, also after a restart.
#[test]
fn unreadable_wblock_is_defragmented_when_tried_again() {
    common::init_logs();
    let (disks, mut c) = small_defrag_setup();
    c.defrag_retry_unreadable_ms = 200;
    let wb = c.wblock_bytes as u64;
    let engine = open(&disks, c.clone());
    let (mut latest, mut ver) = put_200(&engine);
    // The wblock holding key 0 turns sparse, and its reads fail when defrag reads it.
    let (target, keys) = key0_wblock(&disks[0], wb);
    let (kept, gone) = keys.split_at(keys.len() / 4);
    let bad = vec![(target as u64 * wb, (target as u64 + 1) * wb)];
    disks[0].set_faults(SimFaults { eio_read_ranges: bad, ..Default::default() });
    for &key in gone {
        ver += 1;
        put_vp(&engine, key, ver);
        latest.insert(key, Some(ver));
    }
    engine.flush();
    wait_for("defrag tries the sparse wblock", || engine.stats().defrag_read_errors > 0);
    assert_eq!(engine.stats().defrag_reads, 0, "no other wblock is sparse");
    for &key in kept {
        assert_eq!(get_v(&engine, key), Err(ResultCode::ServerError), "key {key} is on the bad wblock");
    }
    // The device reads again (on a slow run defrag may have failed once more before). The
    // filler keys never touch the kept ones, so the wblock is freed, and so reused, only
    // if defrag reads it again and moves them out.
    disks[0].clear_faults();
    // Churning only once the retry came keeps the test off the clock: the churn is bounded
    // by what it writes, the retry by time.
    wait_for("defrag reads the wblock again", || engine.stats().defrag_reads > 0);
    churn_until_reused(&engine, &disks[0], target, 1000..1040, &mut ver, &mut latest);
    check_latest(&engine, &latest, "after defrag");
    engine.shutdown().unwrap();
    drop(engine);
    let engine = open(&disks, c);
    check_latest(&engine, &latest, "after the restart");
}

/// A wblock left alone after a failed defrag read loses that mark when it is freed (every
/// record on it overwritten or deleted): reused for new writes and turned sparse again, it
/// is defragmented at once, not skipped until the retry delay (far longer than the test)
/// has passed.
#[test]
fn freed_unreadable_wblock_is_defragmented_after_reuse() {
    common::init_logs();
    let (disks, mut c) = small_defrag_setup();
    // Only a wblock down to a record or two of under 1.3 KiB qualifies: the filler churn,
    // whose records are larger, never gives defrag work, so the client stream alone takes
    // wblocks from the free list, and a small record leaves its wblock only through defrag.
    c.defrag_lwm_pct = 1;
    c.defrag_retry_unreadable_ms = 600_000;
    let wb = c.wblock_bytes as u64;
    let engine = open(&disks, c.clone());
    let mut latest = Latest::new();
    let mut ver = 0i64;
    for key in 0..200 {
        ver += 1;
        if key < 2 {
            assert!(engine.execute(put_v(key, ver)).is_ok());
        } else {
            put_vp(&engine, key, ver);
        }
        latest.insert(key, Some(ver));
    }
    engine.flush();
    // The wblock holding small keys 0 and 1 turns sparse, and its reads fail when defrag
    // reads it: it is marked unreadable.
    let (target, keys) = key0_wblock(&disks[0], wb);
    assert_eq!(wblock_of(&disks[0], wb, 1), target);
    let bad = vec![(target as u64 * wb, (target as u64 + 1) * wb)];
    disks[0].set_faults(SimFaults { eio_read_ranges: bad, ..Default::default() });
    // Some of the large records are deleted, the rest overwritten. Each tombstone lands
    // next to a later large record (the last operation is a put), so no wblock is ever
    // down to tombstones alone.
    let large: Vec<u64> = keys.iter().copied().filter(|&k| k >= 2).collect();
    for (i, &key) in large.iter().enumerate() {
        if i % 4 == 1 && i + 1 < large.len() {
            assert!(engine.execute(Command::delete(common::digest_of(key).0)).is_ok());
            latest.insert(key, None);
        } else {
            ver += 1;
            put_vp(&engine, key, ver);
            latest.insert(key, Some(ver));
        }
    }
    engine.flush();
    wait_for("defrag tries the sparse wblock", || engine.stats().defrag_read_errors == 1);
    assert_eq!(get_v(&engine, 0), Err(ResultCode::ServerError), "key 0 is on the bad wblock");
    // The device reads again, but the mark keeps defrag away: a few looks later (one per
    // 20 ms) nothing has been read. Keys 0 and 1 overwritten (by large records, which never
    // qualify), the wblock has no live record left and is freed.
    disks[0].clear_faults();
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(engine.stats().defrag_reads, 0, "the marked wblock is left alone");
    for key in 0..2 {
        ver += 1;
        put_vp(&engine, key, ver);
        latest.insert(key, Some(ver));
    }
    engine.flush();
    // Reused by the churn, it gets small key 2000 and then filler records until it is full.
    let fillers = 1000..1040;
    churn_until_reused(&engine, &disks[0], target, fillers.clone(), &mut ver, &mut latest);
    let small = 2000;
    ver += 1;
    assert!(engine.execute(put_v(small, ver)).is_ok());
    latest.insert(small, Some(ver));
    for _ in 0..4 {
        for key in fillers.clone() {
            ver += 1;
            put_vp(&engine, key, ver);
            latest.insert(key, Some(ver));
        }
    }
    engine.flush();
    assert_eq!(keys_in_wblock(&disks[0], target, wb, std::iter::once(small)), vec![small]);
    // The churn overwrites its filler records: down to the small record, it qualifies, and
    // defrag takes it at once (moves the record out, frees it and it is reused once more).
    churn_until_reused(&engine, &disks[0], target, fillers, &mut ver, &mut latest);
    assert_eq!(engine.stats().defrag_read_errors, 1, "defrag read it without error");
    check_latest(&engine, &latest, "after defrag");
    engine.shutdown().unwrap();
    drop(engine);
    let engine = open(&disks, c);
    check_latest(&engine, &latest, "after the restart");
}

/// What defrag and the shard have done so far: (wblocks read by defrag, bytes it copied,
/// device writes).
fn defrag_activity(engine: &Engine) -> (u64, u64, u64) {
    let st = engine.stats();
    (st.defrag_reads, st.defrag_write_bytes, st.device_writes)
}

/// Wait (10 s at most) until defrag has done nothing for 400 ms. On a loaded machine defrag
/// may start on a wblock before the last overwrites of its records (their copies then die
/// in its output, which qualifies in turn and is moved once more, legitimately); a defrag
/// that never stops fails here.
#[track_caller]
fn wait_for_defrag_rest(engine: &Engine, when: &str) {
    let mut last = defrag_activity(engine);
    wait_for(&format!("defrag comes to rest {when}"), || {
        std::thread::sleep(std::time::Duration::from_millis(400));
        let now = defrag_activity(engine);
        std::mem::replace(&mut last, now) == now
    });
}

/// With no client activity, defrag is at rest: over 400 ms (four looks for candidates at
/// least: an idle shard wakes every 100 ms) it reads and copies nothing, and nothing is
/// written.
#[track_caller]
fn assert_defrag_at_rest(engine: &Engine, when: &str) {
    let before = defrag_activity(engine);
    std::thread::sleep(std::time::Duration::from_millis(400));
    let after = defrag_activity(engine);
    assert_eq!(
        after, before,
        "defrag went on with no client activity {when} (wblocks read, bytes copied, device writes)"
    );
}

/// Defrag's own output is not its next candidate. Once defrag has moved the records of
/// the one sparse wblock into its output wblock (which they fill to less than
/// `defrag-lwm-pct`) and nothing else qualifies, it comes to rest. When nothing has
/// qualified for `defrag_idle_seal_ms` it seals that output wblock, which, sparse and out
/// of the post-write cache at once here (its moved records are then read from the
/// device), would otherwise qualify in turn and have the same records moved from wblock to
/// wblock for ever (a wblock read and a synced write each time), but does not take it
/// until some of its live bytes go. Every record reads back its latest version, also after
/// a restart, after which defrag comes to rest again.
#[test]
fn defrag_comes_to_rest_once_nothing_qualifies() {
    common::init_logs();
    let (disks, mut c) = small_defrag_setup();
    c.defrag_idle_seal_ms = 1000;
    let wb = c.wblock_bytes as u64;
    let engine = open(&disks, c.clone());
    let (mut latest, mut ver) = put_200(&engine);
    // Three quarters of the records of key 0's wblock are overwritten: down to a quarter of
    // its bytes, below the default defrag-lwm-pct of 50, it is the one wblock that
    // qualifies, and defrag moves the other quarter.
    let (_, keys) = key0_wblock(&disks[0], wb);
    for &key in &keys[keys.len() / 4..] {
        ver += 1;
        put_vp(&engine, key, ver);
        latest.insert(key, Some(ver));
    }
    engine.flush();
    wait_for("defrag moves the sparse wblock", || engine.stats().defrag_reads > 0);
    wait_for_defrag_rest(&engine, "after moving the sparse wblock");
    assert_defrag_at_rest(&engine, "after moving the sparse wblock");
    check_latest(&engine, &latest, "after defrag");
    let device_reads = engine.stats().device_reads;
    wait_for("the idle output is sealed, and a moved record read from the device", || {
        assert_eq!(get_v(&engine, keys[0]), Ok(latest[&keys[0]]));
        engine.stats().device_reads > device_reads
    });
    assert_defrag_at_rest(&engine, "once the output is sealed");
    engine.shutdown().unwrap();
    drop(engine);
    let engine = open(&disks, c);
    check_latest(&engine, &latest, "after the restart");
    wait_for_defrag_rest(&engine, "after the restart");
    assert_defrag_at_rest(&engine, "after the restart");
    // The wblocks the client and defrag streams had open are now used ones like any other,
    // both sparse here: each is moved once. (The defrag copies' originals, still in their
    // freed source, are not taken for current: see
    // `a_restart_serves_defrag_copies_not_their_freed_originals`.)
    let reads = engine.stats().defrag_reads;
    assert!(reads <= 2, "{reads} wblocks defragged after the restart, not only the two left open");
    check_latest(&engine, &latest, "after defrag following the restart");
}

/// Check that defrag's source wblock `w` (with write sequence `seq`) was not reused and still
/// holds the originals of what defrag moved; shut down; reopen with defrag held back (nothing
/// is below 1% live) and every read of `w` failing: each record must be served from
/// elsewhere, its latest version.
#[track_caller]
fn restart_without_source(engine: Engine, disks: &[SimDisk], c: &EngineConfig, (w, seq): (u32, u64), latest: &Latest) {
    let wb = c.wblock_bytes as u64;
    assert_eq!(scan_wblock(&disks[0], w, wb).seq, seq, "the source still holds the originals");
    engine.shutdown().unwrap();
    drop(engine);
    let mut c = c.clone();
    c.defrag_lwm_pct = 1;
    let engine = open(disks, c);
    disks[0]
        .set_faults(SimFaults { eio_read_ranges: vec![(w as u64 * wb, (w as u64 + 1) * wb)], ..Default::default() });
    check_latest(&engine, latest, "after the restart, the source unreadable");
}

/// Overwrite three quarters of `keys`, so that their wblock drops below the default
/// defrag-lwm-pct and qualifies.
fn thin_out(engine: &Engine, keys: &[u64], ver: &mut i64, latest: &mut Latest) {
    for &key in &keys[keys.len() / 4..] {
        *ver += 1;
        put_vp(engine, key, *ver);
        latest.insert(key, Some(*ver));
    }
    engine.flush();
}

/// After a restart the records defrag moved are served from its copies, not from the
/// originals still in their freed (and not yet reused) source wblock: of two copies of one
/// write, the cold start takes the one in the later-written wblock. Before, it kept the
/// copy it scanned first, here the original (the source has the lower number): the freed
/// source counted as live again, and defrag moved the same records after every restart.
/// The source's reads fail after the restart, so a record still pointing there fails.
#[test]
fn a_restart_serves_defrag_copies_not_their_freed_originals() {
    common::init_logs();
    let (disks, c) = small_defrag_setup();
    let wb = c.wblock_bytes as u64;
    let engine = open(&disks, c.clone());
    let (mut latest, mut ver) = put_200(&engine);
    let (source, keys) = key0_wblock(&disks[0], wb);
    let source_seq = scan_wblock(&disks[0], source, wb).seq;
    thin_out(&engine, &keys, &mut ver, &mut latest);
    wait_for("defrag moves the sparse wblock", || engine.stats().defrag_reads > 0);
    wait_for_defrag_rest(&engine, "after moving the sparse wblock");
    restart_without_source(engine, &disks, &c, (source, source_seq), &latest);
}

/// Defrag copies a record only into a wblock written after the record's source, which is
/// what lets a cold start tell the copy (see the test above). Its output wblock, opened
/// while it moved one sparse wblock and kept open through the pause after it, is older
/// than a client wblock that is opened, filled and thinned out during that pause: before
/// moving that one, defrag seals the output and opens a new one.
#[test]
fn defrag_copies_land_in_a_wblock_newer_than_their_source() {
    common::init_logs();
    let (disks, mut c) = small_defrag_setup();
    // Long enough for the set-up below on a loaded machine (it takes well under a second).
    c.defrag_sleep_us = 5_000_000;
    let wb = c.wblock_bytes as u64;
    let engine = open(&disks, c.clone());
    let (mut latest, mut ver) = put_200(&engine);
    let (first, keys) = key0_wblock(&disks[0], wb);
    thin_out(&engine, &keys, &mut ver, &mut latest);
    wait_for("defrag moves the first sparse wblock", || engine.stats().defrag_reads > 0);
    let t0 = std::time::Instant::now();
    // During the pause: keys 1000..1250 fill the client wblock open now and the next ones.
    for key in 1000..1250 {
        ver += 1;
        put_vp(&engine, key, ver);
        latest.insert(key, Some(ver));
    }
    engine.flush();
    // Defrag's output: the wblock besides the first that holds its first key.
    let output = (1..(disks[0].size() / wb) as u32)
        .find(|&w| w != first && !keys_in_wblock(&disks[0], w, wb, std::iter::once(keys[0])).is_empty())
        .expect("the moved key has a copy");
    let source = wblock_of(&disks[0], wb, 1125);
    let source_keys = keys_in_wblock(&disks[0], source, wb, 1000..1250);
    let (out_seq, source_seq) = (scan_wblock(&disks[0], output, wb).seq, scan_wblock(&disks[0], source, wb).seq);
    assert!(source_keys.len() > 60, "a full client wblock: {source_keys:?}");
    assert!(out_seq < source_seq, "the output (seq {out_seq}) was opened before the source (seq {source_seq})");
    thin_out(&engine, &source_keys, &mut ver, &mut latest);
    assert!(
        t0.elapsed() < std::time::Duration::from_millis(4500),
        "the set-up outlasted defrag's pause ({:?}): the output may have been sealed at rest",
        t0.elapsed()
    );
    assert_eq!(engine.stats().defrag_reads, 1, "defrag is still in its pause");
    wait_for("defrag moves the client wblock", || engine.stats().defrag_reads > 1);
    assert_eq!(engine.stats().defrag_outputs_sealed_early, 1, "the older output was sealed first");
    std::thread::sleep(std::time::Duration::from_millis(100));
    check_latest(&engine, &latest, "after defrag");
    restart_without_source(engine, &disks, &c, (source, source_seq), &latest);
}

/// A record damaged on the device after it was written is reported as an error by the read
/// path (never wrong data), counted, and every other record stays readable.
#[test]
fn read_path_detects_damage() {
    common::init_logs();
    let disks = disks(1, 64 << 20);
    let engine = open(&disks, cfg(1));
    for i in 0..50u64 {
        let (d, _) = common::digest_of(i);
        let bins = vec![Bin::new("v", Value::Blob(vec![i as u8; 3000]))];
        assert!(engine.execute(Command::put(d, "demo", bins)).is_ok());
    }
    engine.flush();
    // Find the records on the disk image and flip one bit in record 10's value.
    let image = disks[0].read_raw(0, 64 << 20);
    let wb = 128 * 1024;
    let target = common::digest_of(10).0;
    let mut flipped = false;
    for w in 1..(image.len() / wb) {
        let s = ferrospike_engine::coldstart::scan_wblock(&image[w * wb..(w + 1) * wb], device_id(&image), 0, w as u32);
        for (meta, off, _, _) in s.records {
            if meta.digest == target {
                let at = (w * wb) as u64 + off as u64 + 200;
                let mut b = disks[0].read_raw(at, 1);
                b[0] ^= 0x10;
                disks[0].write_raw(at, &b);
                flipped = true;
            }
        }
    }
    assert!(flipped);
    let r = engine.execute(Command::get(target));
    assert_eq!(r.result, ResultCode::ServerError, "damaged record must not be served");
    assert!(engine.stats().read_errors >= 1);
    for i in (0..50u64).filter(|&i| i != 10) {
        let r = engine.execute(Command::get(common::digest_of(i).0));
        assert_eq!(r.bin("v"), Some(&Value::Blob(vec![i as u8; 3000])));
    }
}

fn device_id(image: &[u8]) -> u64 {
    [0usize, 4096]
        .iter()
        .filter_map(|&o| ferrospike_engine::format::DeviceHeader::decode(&image[o..o + 4096]).ok())
        .max_by_key(|h| h.write_seq)
        .expect("a valid header")
        .device_id
}

/// TTL: a record with a 1-second TTL disappears; -1 never expires; -2 keeps the expiry.
#[test]
fn ttl_expiry() {
    common::init_logs();
    let disks = disks(1, 64 << 20);
    let engine = open(&disks, cfg(1));
    let (a, _) = common::digest_of(1);
    let (b, _) = common::digest_of(2);
    let put = |d, ttl| engine.execute(Command::put(d, "demo", vec![Bin::new("x", Value::Int(1))]).with_ttl(ttl));
    let r = put(a, Ttl::Secs(1));
    assert!(r.is_ok() && r.void_time > 0);
    assert_eq!(put(b, Ttl::Never).void_time, 0);
    let kept = engine.execute(Command::put(a, "demo", vec![Bin::new("y", Value::Int(2))]).with_ttl(Ttl::Keep));
    assert_eq!(kept.void_time, r.void_time);
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_eq!(engine.execute(Command::get(a)).result, ResultCode::NotFound);
    assert_eq!(engine.execute(Command::exists(a)).result, ResultCode::NotFound);
    assert!(engine.execute(Command::get(b)).is_ok());
    engine.shutdown().unwrap();
    drop(engine);
    let engine = open(&disks, cfg(1));
    assert_eq!(engine.execute(Command::get(a)).result, ResultCode::NotFound, "expired stays expired after restart");
    assert!(engine.execute(Command::get(b)).is_ok());
}

/// A full device answers OUT_OF_SPACE (8) and keeps serving reads.
#[test]
fn full_device_answers_out_of_space() {
    common::init_logs();
    let disks = disks(1, 2 << 20); // 16 wblocks of 128 KiB, 15 for data
    let engine = open(&disks, cfg(1));
    let mut stored = 0u64;
    let mut last = ResultCode::Ok;
    for i in 0..1000u64 {
        let (d, _) = common::digest_of(i);
        let r = engine.execute(Command::put(d, "demo", vec![Bin::new("v", Value::Blob(vec![1; 20_000]))]));
        if r.is_ok() {
            stored += 1;
        } else {
            last = r.result;
            break;
        }
    }
    assert_eq!(last, ResultCode::OutOfSpace);
    assert!(stored > 50);
    assert!(engine.execute(Command::get(common::digest_of(0).0)).is_ok());
}

/// Scans return every live record of a partition, in digest order, resumable.
#[test]
fn partition_scan_pages() {
    common::init_logs();
    let disks = disks(1, 64 << 20);
    let engine = open(&disks, cfg(2));
    let mut per_part: HashMap<u16, Vec<Digest>> = HashMap::new();
    for i in 0..3000u64 {
        let (d, key) = common::digest_of(i);
        let cmd = Command::put(d, "demo", vec![Bin::new("v", Value::Int(i as i64))]).with_key(key);
        assert!(engine.execute(cmd).is_ok());
        per_part.entry(d.partition()).or_default().push(d);
    }
    let mut total = 0;
    for pid in 0..4096u16 {
        let mut after = None;
        let mut got = Vec::new();
        loop {
            let page = engine.scan_partition(pid, None, after, 1, true);
            assert_eq!(page.result, ResultCode::Ok);
            for r in &page.records {
                assert_eq!(r.set, "demo");
                assert!(r.key.is_some());
                assert_eq!(r.bins.len(), 1);
            }
            got.extend(page.records.iter().map(|r| r.digest));
            after = page.records.last().map(|r| r.digest).or(after);
            if page.done {
                break;
            }
        }
        let mut want = per_part.remove(&pid).unwrap_or_default();
        want.sort();
        assert_eq!(got, want, "partition {pid}");
        total += got.len();
    }
    assert_eq!(total, 3000);
}

#[test]
fn a_shard_failing_at_start_up_fails_the_open_without_hanging() {
    common::init_logs();
    let disks = disks(1, 16 << 20);
    let e = open(&disks, cfg(2));
    let d = common::digest_of(1).0;
    assert!(e.execute(Command::put(d, "demo", vec![Bin::new("a", Value::Int(1))])).is_ok());
    e.shutdown().unwrap();
    drop(e);
    // Write block 1 belongs to shard 0: its cold-start read fails, shard 1's do not.
    let wb = cfg(2).wblock_bytes as u64;
    disks[0].set_faults(SimFaults { eio_ranges: vec![(wb, 2 * wb)], ..Default::default() });
    let (tx, rx) = std::sync::mpsc::channel();
    let d2 = disks.clone();
    std::thread::spawn(move || {
        let r = Engine::open(cfg(2), Arc::new(SimDevices::new(d2, 4096))).map(|_| ());
        let _ = tx.send(r.map_err(|e| e.to_string()));
    });
    let r = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("Engine::open hung after a shard failed");
    let err = r.expect_err("a failed cold-start read must fail the open");
    assert!(err.contains("shard 0"), "{err}");
    disks[0].clear_faults();
    let e = open(&disks, cfg(2));
    assert!(e.execute(Command::get(d)).is_ok());
    e.shutdown().unwrap();
}

/// A front-end stand-in: in its first turn it submits every command of `script`, calling
/// [`HookCtx::run_submitted`] after the first `run_after` of them (never when `None`: the
/// rest then runs when the turn ends), and files each reply under its command's number.
/// Right after that call it notes how many of the commands submitted so far for its own
/// shard had their answer (records in memory answer at once).
struct ScriptHook {
    script: Vec<Command>,
    run_after: Option<usize>,
    replies: Arc<std::sync::Mutex<Vec<Option<ferrospike_engine::Reply>>>>,
    /// (own commands submitted, of them answered) right after `run_submitted`.
    at_run: Arc<std::sync::Mutex<Option<(usize, usize)>>>,
}

impl ShardHook for ScriptHook {
    fn start(&mut self, _doorbell: Arc<ferrospike_engine::io::Doorbell>) {}

    fn turn(&mut self, ctx: &mut ferrospike_engine::hook::HookCtx<'_>) -> bool {
        let script = std::mem::take(&mut self.script);
        let did = !script.is_empty();
        let mut own: Vec<usize> = Vec::new();
        for (i, cmd) in script.into_iter().enumerate() {
            if self.run_after == Some(i) {
                ctx.run_submitted();
                let replies = self.replies.lock().unwrap();
                let answered = own.iter().filter(|&&j| replies[j].is_some()).count();
                *self.at_run.lock().unwrap() = Some((own.len(), answered));
            }
            if ctx.shard_of(&cmd.digest) == ctx.shard_id() {
                own.push(i);
            }
            let replies = self.replies.clone();
            ctx.submit(cmd, move |r| replies.lock().unwrap()[i] = Some(r));
        }
        did
    }
}

/// Commands a shard's hook submits in one turn run in the order submitted, each exactly
/// once, whether the hook runs them itself part way (and then has the answers of its own
/// shard's at once) or leaves them to the end of the turn, for records of either shard
/// (the other shard's come in one handed-over batch), in batches of more than the 64 the
/// shard prefetches for at a time, and with records that are in memory (which is what the
/// batch asks the CPU for ahead).
#[test]
fn commands_a_hook_submits_in_one_turn_run_in_order() {
    common::init_logs();
    for run_after in [None, Some(1), Some(37), Some(100)] {
        let disks = disks(1, 64 << 20);
        let mut c = cfg(2);
        c.post_write_cache_bytes = 4 << 20;
        let keys: Vec<u64> = (0..24).collect();
        // Per key: two puts, the second only if the first went first (generation 1), a
        // read, a delete, a read that finds nothing, and a put that creates it again.
        let mut script = Vec::new();
        for round in 0..6 {
            for &k in &keys {
                let d = common::digest_of(k).0;
                script.push(match round {
                    0 => put_v(k, 1),
                    1 => put_v(k, 2).with_generation(GenPolicy::Eq(1)),
                    2 | 4 => Command::get(d),
                    3 => Command::delete(d),
                    _ => put_v(k, 3).with_exists(ExistsAction::CreateOnly),
                });
            }
        }
        let n = script.len();
        let replies = Arc::new(std::sync::Mutex::new(vec![None; n]));
        let at_run = Arc::new(std::sync::Mutex::new(None));
        let hook = ScriptHook { script, run_after, replies: replies.clone(), at_run: at_run.clone() };
        let engine = open_with_hook(&disks, c, Some(Box::new(hook)));
        wait_for("every reply", || replies.lock().unwrap().iter().all(Option::is_some));
        let replies = replies.lock().unwrap().clone();
        let owners: std::collections::HashSet<usize> =
            keys.iter().map(|&k| engine.shard_of(&common::digest_of(k).0)).collect();
        assert_eq!(owners.len(), 2, "the keys belong to both shards");
        for (i, r) in replies.iter().enumerate() {
            let r = r.as_ref().expect("answered");
            let (round, k) = (i / keys.len(), keys[i % keys.len()]);
            let what = format!("run_after {run_after:?}, key {k}, round {round}");
            match round {
                0 | 1 => assert!(r.is_ok() && r.generation == round as u16 + 1, "{what}: {r:?}"),
                2 => assert_eq!(r.bin("v"), Some(&Value::Int(2)), "{what}: {r:?}"),
                3 => assert!(r.is_ok(), "{what}: {r:?}"),
                4 => assert_eq!(r.result, ResultCode::NotFound, "{what}: {r:?}"),
                _ => assert!(r.is_ok() && r.generation == 1, "{what}: {r:?}"),
            }
        }
        if run_after.is_some() {
            let (own, answered) = at_run.lock().unwrap().expect("run_submitted was called");
            assert!(own > 0, "run_after {run_after:?}: some of shard 0's commands came first");
            assert_eq!(answered, own, "run_after {run_after:?}: answered right after run_submitted");
        }
        for &k in &keys {
            let r = engine.execute(Command::get(common::digest_of(k).0));
            assert_eq!(r.bin("v"), Some(&Value::Int(3)), "key {k} at the end");
        }
        engine.shutdown().expect("clean shutdown");
    }
}

/// A hook that submits writes and then, in the same turn, scans their partition gets a
/// page that holds them, even when they introduce the set the scan asks for: the scan
/// starts only after the commands queued before it.
#[test]
fn a_scan_from_a_hook_sees_the_writes_submitted_before_it() {
    struct PutThenScan {
        pages: Arc<std::sync::Mutex<Vec<(u16, ferrospike_engine::ScanPage)>>>,
        done: bool,
    }
    impl ShardHook for PutThenScan {
        fn start(&mut self, _doorbell: Arc<ferrospike_engine::io::Doorbell>) {}

        fn turn(&mut self, ctx: &mut ferrospike_engine::hook::HookCtx<'_>) -> bool {
            if std::mem::replace(&mut self.done, true) {
                return false;
            }
            // Keys of this shard's own partitions (the others' are scanned there).
            let mut pids = Vec::new();
            for k in (0..).take(2000) {
                let d = common::digest_of(k).0;
                if ctx.shard_of(&d) != ctx.shard_id() {
                    continue;
                }
                ctx.submit(Command::put(d, "brand_new", vec![Bin::new("v", Value::Int(k as i64))]), |_| {});
                pids.push(d.partition());
                if pids.len() == 8 {
                    break;
                }
            }
            for pid in pids {
                let pages = self.pages.clone();
                ctx.scan(pid, Some("brand_new"), None, 100, true, move |p| pages.lock().unwrap().push((pid, p)));
            }
            true
        }
    }
    common::init_logs();
    let disks = disks(1, 64 << 20);
    let mut c = cfg(2);
    c.post_write_cache_bytes = 4 << 20;
    let pages = Arc::new(std::sync::Mutex::new(Vec::new()));
    let hook = PutThenScan { pages: pages.clone(), done: false };
    let engine = open_with_hook(&disks, c, Some(Box::new(hook)));
    wait_for("every page", || pages.lock().unwrap().len() == 8);
    for (pid, page) in pages.lock().unwrap().iter() {
        assert_eq!(page.result, ResultCode::Ok, "partition {pid}");
        assert!(!page.records.is_empty(), "partition {pid}: the put before the scan is in its page");
        assert!(page.records.iter().all(|r| r.set == "brand_new"), "partition {pid}: {:?}", page.records);
    }
    engine.shutdown().expect("clean shutdown");
}

/// Defrag does not move records round the post-write cache. When the wblocks in the cache
/// are sparse too, sealing a partly filled output the moment nothing qualifies retired it
/// to the cache, which pushed its oldest (sparse) wblock out; that one qualified next and
/// went into a new output, sealed in turn, and so on through the whole cache: a wblock read
/// and a synced write for each wblock freed and another one used, after every burst of
/// updates (about six a second, for minutes, after an 8 s RU,50 run with a 1 GiB cache).
/// Now the output stays open for the next candidates until nothing has qualified for
/// `defrag_idle_seal_ms`: every output defrag opens is filled, but for the last one and
/// those sealed early for being older than their source.
#[test]
fn defrag_fills_its_outputs_instead_of_churning_through_the_cache() {
    common::init_logs();
    let mut c = defrag_cfg();
    let wb = c.wblock_bytes as u64;
    // 40 of the 127 data wblocks of 128 KiB stay in memory.
    c.post_write_cache_bytes = 40 * wb;
    // Two looks for candidates per pass, as on a device of more than 2^16 wblocks.
    c.defrag_look_wblocks = 64;
    let disks = disks(1, 16 << 20);
    let engine = open(&disks, c);
    let mut latest = Latest::new();
    let mut ver = 0;
    // Round r writes the keys of 0..1280 that are ≥ r mod 8 (about 16, 14, ..., 4 wblocks
    // for r = 0..6), so that the wblocks of every round but the last keep an eighth or so
    // of their bytes live: sparse, and 36 of them still in the cache at the end.
    for round in 0..7u64 {
        for key in (0..1280u64).filter(|k| k % 8 >= round) {
            ver += 1;
            put_vp(&engine, key, ver);
            latest.insert(key, Some(ver));
        }
    }
    engine.flush();
    wait_for("defrag starts", || engine.stats().defrag_reads > 0);
    wait_for_defrag_rest(&engine, "after the updates");
    let st = engine.stats();
    // The copies, and the padding to 4 KiB of the synced flush after each wblock moved.
    let usable = wb - ferrospike_engine::format::WBLOCK_HEADER_BYTES as u64;
    let filled = (st.defrag_write_bytes + 4096 * st.defrag_reads).div_ceil(usable);
    eprintln!(
        "{} wblocks defragged, {} bytes moved ({} wblocks' worth with padding), {} outputs ({} sealed early)",
        st.defrag_reads, st.defrag_write_bytes, filled, st.defrag_writes, st.defrag_outputs_sealed_early
    );
    assert!(st.defrag_reads >= 20, "the sparse wblocks out of the cache were moved: {st:?}");
    assert!(
        st.defrag_writes <= filled + 1 + st.defrag_outputs_sealed_early,
        "{} outputs for {} bytes moved: defrag sealed outputs it could have filled",
        st.defrag_writes,
        st.defrag_write_bytes
    );
    check_latest(&engine, &latest, "after defrag");
}

/// An idle defrag looks for candidates a share of the device at a time
/// (`defrag_look_wblocks`, 3 here), and a pass made of many looks misses none: every
/// wblock left a quarter live is moved.
#[test]
fn a_pass_for_candidates_in_many_looks_finds_every_one() {
    common::init_logs();
    let mut c = defrag_cfg();
    c.defrag_look_wblocks = 3;
    let wb = c.wblock_bytes as u64;
    let disks = disks(1, 4 << 20);
    let engine = open(&disks, c);
    let mut latest = Latest::new();
    put_all(&engine, 0..960, 1, &mut latest);
    engine.flush();
    let mut originals: Vec<u32> = (0..960).map(|k| wblock_of(&disks[0], wb, k)).collect();
    originals.sort_unstable();
    originals.dedup();
    assert!(originals.len() >= 10, "the keys fill several wblocks: {originals:?}");
    put_all(&engine, (0..960).filter(|k| k % 4 != 0), 2, &mut latest);
    engine.flush();
    // The last of them may hold enough of the new writes not to qualify.
    let want = originals.len() as u64 - 1;
    wait_for(&format!("defrag moves at least {want} of the wblocks {originals:?}"), || {
        engine.stats().defrag_reads >= want
    });
    check_latest(&engine, &latest, "after defrag");
}

/// A defrag output is sealed once it has been open `defrag_idle_seal_ms`, even while
/// candidates keep coming, each of which keeps defrag from being idle: else the dead copies
/// in it could hold tombstone collection back for as long as such a trickle lasts. The
/// candidates here are wblocks left one record live each, pushed out of the post-write
/// cache one every 100 ms or so by new writes; all were written before the output was
/// opened, so none has it sealed early. Each one moved takes 4 KiB of the output (its
/// record, padded by the synced flush), so the output is far from full when it is sealed.
#[test]
fn a_defrag_output_open_too_long_is_sealed_though_candidates_keep_coming() {
    common::init_logs();
    let mut c = defrag_cfg();
    c.defrag_idle_seal_ms = 400;
    let wb = c.wblock_bytes as u64;
    c.post_write_cache_bytes = 16 * wb;
    let disks = disks(1, 16 << 20);
    let engine = open(&disks, c);
    let mut latest = Latest::new();
    // About 24 wblocks of keys, then all but one key in 80 deleted.
    put_all(&engine, 0..1920, 1, &mut latest);
    engine.flush();
    for k in (0..1920u64).filter(|k| k % 80 != 0) {
        assert!(engine.execute(Command::delete(common::digest_of(k).0)).is_ok(), "delete {k}");
        latest.insert(k, None);
    }
    engine.flush();
    // New keys, a wblock's worth at a time, push the rest out of the cache.
    let start = std::time::Instant::now();
    let mut key = 1_000_000u64;
    for _ in 0..40 {
        let st = engine.stats();
        if st.defrag_writes >= 2 + st.defrag_outputs_sealed_early {
            break;
        }
        put_all(&engine, key..key + 80, 1, &mut latest);
        engine.flush();
        key += 80;
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let st = engine.stats();
    eprintln!(
        "after {:?}: {} outputs, {} wblocks moved, {} sealed early",
        start.elapsed(),
        st.defrag_writes,
        st.defrag_reads,
        st.defrag_outputs_sealed_early
    );
    assert!(st.defrag_writes >= 2 + st.defrag_outputs_sealed_early, "the first output was never sealed: {st:?}");
    let room = (wb as usize - ferrospike_engine::format::WBLOCK_HEADER_BYTES) / 4096;
    assert!((st.defrag_reads as usize) < room, "the first output may have been sealed for being full: {st:?}");
    check_latest(&engine, &latest, "after defrag");
}

/// Whether shard `shard` of two works on test key `key`'s partition.
fn on_shard_of_two(key: u64, shard: u16) -> bool {
    common::digest_of(key).0.partition() % 2 == shard
}

/// Test keys from `from` on whose partitions shard `shard` of two works.
fn keys_of_shard(shard: u16, from: u64, n: usize) -> Vec<u64> {
    (from..).filter(|&k| on_shard_of_two(k, shard)).take(n).collect()
}

/// After the shard count changes, a wblock written by an earlier run can hold copies of
/// any shard's records. When its owner takes it for a new use, the other shards must go on
/// counting its old copies until that use's first write is on the device: a tombstone
/// dropped before then, with the wblock that held it reused, lets a crash bring the deleted
/// record back from the old copy.
#[test]
fn a_wblock_of_an_earlier_run_keeps_other_shards_tombstones_until_it_is_overwritten() {
    earlier_runs_copies_outlive_their_tombstone_or_not(false);
}

/// The same when the first write of the wblock's new use completes without DSYNC and is
/// then lost (as a power loss before the next fsync would lose it): a completed write is not
/// a durable one, and the previous use is let go of only by the fsync after it.
#[test]
fn a_first_write_not_yet_fsynced_keeps_the_previous_use_counted() {
    earlier_runs_copies_outlive_their_tombstone_or_not(true);
}

/// Run 1 with one shard leaves record `gone` in wblock 1; run 2 with two shards deletes it
/// (shard 1) and has shard 0 take wblock 1 for a new use, which is never written
/// (`first_write_lost`: written without DSYNC, reported done and lost, and no fsync
/// follows). Shard 1 then runs its expiry sweeps and writes its wblocks over; after a crash
/// `gone` must still be deleted.
fn earlier_runs_copies_outlive_their_tombstone_or_not(first_write_lost: bool) {
    common::init_logs();
    let disks = disks(1, 4 << 20); // 31 data wblocks of 128 KiB
    let wb = 128 * 1024u64;
    // Run 1, one shard: record `gone` lands in wblock 1.
    let gone = keys_of_shard(1, 1_000, 1)[0];
    let engine = open(&disks, cfg(1));
    put_vp(&engine, gone, 1);
    engine.shutdown().expect("clean shutdown");
    drop(engine);
    assert_eq!(wblock_of(&disks[0], wb, gone), 1);
    let run1_seq = scan_wblock(&disks[0], 1, wb).seq;

    // Run 2, two shards: shard 1 has `gone`'s partition, shard 0 owns the odd wblocks
    // (1, 3, ..., 31), free in that order, and wblock 1 once `gone` is deleted.
    let mut c = cfg(2);
    c.flush_max_ms = 3_600_000; // open wblocks are written when full or when told to
    c.nsup_period_secs = 1;
    c.defrag_lwm_pct = 1;
    // Else wblock 1, free with the first run's copy in it, gets an empty header before
    // shard 0 takes it (which also keeps `gone` deleted): this test is about the floor.
    c.scrub_free_wblocks = false;
    let engine = open(&disks, c.clone());
    let free_before = engine.stats().free_wblocks;
    assert!(engine.execute(Command::delete(common::digest_of(gone).0)).is_ok());
    engine.flush(); // the tombstone is on the device, so the old copy's space is let go
    wait_for("shard 0 frees wblock 1", || engine.stats().free_wblocks == free_before);

    // Shard 0 goes through its free wblocks up to 31; the write that does not fit there
    // opens wblock 1 (in memory only: nothing makes it write it).
    let shard0_keys = keys_of_shard(0, 0, 40);
    let mut ver = 1;
    'cycle: for _ in 0..100 {
        for &k in &shard0_keys {
            ver += 1;
            put_vp(&engine, k, ver);
            if scan_wblock(&disks[0], 31, wb).seq != 0 {
                break 'cycle;
            }
        }
    }
    wait_for("wblock 31 is written", || scan_wblock(&disks[0], 31, wb).seq != 0);
    if first_write_lost {
        // Shard 0 fills wblock 1: it is sealed and written, the next write the disk sees,
        // without DSYNC (and with no fsync for an hour); the write is reported done and lost.
        disks[0].set_faults(SimFaults { lost_writes: vec![1], ..Default::default() });
        let writes = disks[0].writes_seen();
        'fill: for _ in 0..100 {
            for &k in &shard0_keys {
                ver += 1;
                put_vp(&engine, k, ver);
                if disks[0].writes_seen() > writes {
                    break 'fill;
                }
            }
        }
        assert!(disks[0].writes_seen() > writes, "wblock 1 was written");
    }
    // Expiry sweeps run on shard 1, then it writes its own wblocks over, several times.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let shard1_keys = keys_of_shard(1, 0, 40);
    for _ in 0..90 {
        for &k in &shard1_keys {
            ver += 1;
            put_vp(&engine, k, ver);
        }
    }
    assert_eq!(scan_wblock(&disks[0], 1, wb).seq, run1_seq, "wblock 1 still holds the first run's copy");
    engine.crash();
    drop(engine);

    let engine = open(&disks, c);
    assert_eq!(get_v(&engine, gone), Ok(None), "a deleted record came back after the crash");
}

/// After the shard count changes, a wblock can hold live records of shards other than its
/// owner. Defrag moves those too: the owner hands them to the shard whose partitions they
/// are, which copies them into its own output, and the wblock is freed. Before, the owner
/// passed over them, and a wblock holding only other shards' records was never freed and
/// was read again at every pass.
#[test]
fn defrag_moves_other_shards_records_after_a_change_of_the_shard_count() {
    common::init_logs();
    let (disks, c1) = small_defrag_setup();
    // Run 1, one shard: keys 0..200 fill wblocks 1 to 3 or 4.
    let engine = open(&disks, c1.clone());
    let (mut latest, mut ver) = put_200(&engine);
    engine.shutdown().expect("clean shutdown");
    drop(engine);
    // Run 2, two shards: every record of shard 0 is written again, so the first run's
    // wblocks hold only shard 1's live records, less than 90% of each.
    let mut c = c1;
    c.shards = 2;
    c.defrag_lwm_pct = 90;
    let engine = open(&disks, c.clone());
    ver += 1;
    put_all(&engine, (0..200).filter(|&k| on_shard_of_two(k, 0)), ver, &mut latest);
    engine.flush();
    wait_for_defrag_rest(&engine, "after the records of shard 0 are written again");
    assert_defrag_at_rest(&engine, "after the records of shard 0 are written again");
    check_latest(&engine, &latest, "after defrag");
    // 200 records of about 1.5 KiB fill less than 3 wblocks; each shard may have a client
    // and a defrag output open.
    let st = engine.stats();
    assert!(st.free_wblocks + 7 >= st.total_wblocks, "{} of {} wblocks free", st.free_wblocks, st.total_wblocks);
    engine.shutdown().expect("clean shutdown");
    drop(engine);
    let engine = open(&disks, c);
    check_latest(&engine, &latest, "after the restart");
    wait_for_defrag_rest(&engine, "after the restart");
}

/// Tombstones are collected on an idle device too. Dead records older than a tombstone
/// hold it back wherever a cold start could still find them; with no more writes nothing
/// moved them out of the way. The expiry sweep now does: free wblocks holding such records
/// get an empty header (`free_wblocks_scrubbed`), the open wblock holding the tombstones
/// after the last records is sealed, and a used one whose oldest data record is dead is
/// moved whatever its fill (here: all its live bytes are tombstones). After a crash the
/// deleted records stay deleted.
#[test]
fn tombstones_are_collected_on_an_idle_device() {
    tombstones_are_collected_with_no_more_writes(false);
}

/// The same after a restart between the deletes and the sweeps, when every wblock holds an
/// earlier run's records (and so counts in every shard's floor).
#[test]
fn tombstones_are_collected_on_an_idle_device_after_a_restart() {
    tombstones_are_collected_with_no_more_writes(true);
}

/// One 4 MiB sim disk, a one-shard config with an expiry sweep every second and a defrag
/// that takes no wblock for its fill (only the floor's reasons move one) and does not pause,
/// the engine on them, and keys 0..200 written (`put_200`).
fn tomb_setup() -> (Vec<SimDisk>, EngineConfig, Engine, Latest) {
    tomb_setup_with(|_| {})
}

/// [`tomb_setup`], with `tweak` applied to the config.
fn tomb_setup_with(tweak: impl FnOnce(&mut EngineConfig)) -> (Vec<SimDisk>, EngineConfig, Engine, Latest) {
    common::init_logs();
    let disks = disks(1, 4 << 20);
    let mut c = cfg(1);
    c.nsup_period_secs = 1;
    c.defrag_sleep_us = 0;
    c.defrag_lwm_pct = 1;
    tweak(&mut c);
    let engine = open(&disks, c.clone());
    let (latest, _) = put_200(&engine);
    (disks, c, engine, latest)
}

fn tombstones_are_collected_with_no_more_writes(restart: bool) {
    // Defrag takes no wblock for its fill (the one holding the tombstones is sparse here, as
    // it would not be after a mass delete): only the floor's reasons move it.
    let (disks, c, mut engine, mut latest) = tomb_setup();
    for key in 0..200 {
        assert!(engine.execute(Command::delete(common::digest_of(key).0)).is_ok());
        latest.insert(key, None);
    }
    engine.flush();
    if restart {
        engine.shutdown().expect("clean shutdown");
        drop(engine);
        engine = open(&disks, c.clone());
    }
    assert_eq!(engine.stats().tombstones, 200);
    wait_for("every tombstone is dropped", || engine.stats().tombstones == 0);
    let st = engine.stats();
    assert!(st.free_wblocks_scrubbed >= 2, "{} free wblocks scrubbed", st.free_wblocks_scrubbed);
    assert!(st.defrag_reads >= 1, "the wblock holding the tombstones was moved");
    assert_eq!(st.tombstones_dropped, 200);
    crash_and_check(engine, &disks, c, &latest);
}

/// After a restart every wblock holds an earlier run's records, which count in every
/// shard's floor: a free one of shard 0 with such records holds shard 1's tombstones back
/// too, so shard 0 gives it an empty header though it keeps no tombstones itself.
#[test]
fn a_shard_scrubs_its_free_wblocks_for_another_shards_tombstones() {
    common::init_logs();
    let disks = disks(1, 4 << 20);
    let mut c = cfg(2);
    c.nsup_period_secs = 1;
    let engine = open(&disks, c.clone());
    let (mut latest, _) = put_200(&engine);
    engine.shutdown().expect("clean shutdown");
    drop(engine);
    // Run 2: shard 1's records are deleted, shard 0's written again, so every wblock of the
    // first run is free.
    let engine = open(&disks, c.clone());
    let (ones, zeros): (Vec<u64>, Vec<u64>) = (0..200).partition(|&k| on_shard_of_two(k, 1));
    for &key in &ones {
        assert!(engine.execute(Command::delete(common::digest_of(key).0)).is_ok());
        latest.insert(key, None);
    }
    put_all(&engine, zeros.into_iter(), 1000, &mut latest);
    engine.flush();
    assert_eq!(engine.stats().tombstones, ones.len() as u64);
    wait_for("every tombstone is dropped", || engine.stats().tombstones == 0);
    check_latest(&engine, &latest, "after the tombstones are dropped");
    crash_and_check(engine, &disks, c, &latest);
}

/// Defrag's open output holding copies that have died since (here: records moved out of
/// sparse wblocks, then deleted) keeps the floor below the tombstones of those deletes; the
/// expiry sweep seals it so that it can be moved, rather than waiting for the output to be
/// sealed for idleness (`defrag_idle_seal_ms`, far off here).
#[test]
fn tombstones_are_collected_past_defrag_output_holding_dead_copies() {
    let (disks, c, engine, mut latest) = tomb_setup_with(|c| {
        c.defrag_lwm_pct = EngineConfig::new("test").defrag_lwm_pct;
        c.defrag_idle_seal_ms = 600_000;
    });
    // Three keys of four written again: the first wblocks keep a quarter of their records,
    // which defrag moves into its output.
    put_all(&engine, (0..200).filter(|k| k % 4 != 0), 2, &mut latest);
    engine.flush();
    wait_for("defrag moves the sparse wblocks' records", || engine.stats().defrag_reads >= 2);
    wait_for_defrag_rest(&engine, "after the updates");
    for key in 0..200 {
        assert!(engine.execute(Command::delete(common::digest_of(key).0)).is_ok());
        latest.insert(key, None);
    }
    engine.flush();
    wait_for("every tombstone is dropped", || engine.stats().tombstones == 0);
    crash_and_check(engine, &disks, c, &latest);
}

/// A free wblock is given an empty header only once the writes that freed it are durable:
/// until then a power loss could take the newer copies (here the tombstones) and leave the
/// old ones, which the header would have wiped too. With fsyncs taking 2.5 s, no scrub
/// comes before the deletes' fsync has completed, though the sweep (every second) wants
/// them at once.
#[test]
fn a_scrub_waits_for_the_fsync_of_the_writes_that_freed_its_wblock() {
    let (disks, c, engine, mut latest) = tomb_setup();
    disks[0].set_faults(SimFaults { fsync_delay_ms: 2500, ..Default::default() });
    // Every fsync sent from here on completes 2.5 s after it was sent.
    let slow = std::time::Instant::now();
    for key in 0..200 {
        assert!(engine.execute(Command::delete(common::digest_of(key).0)).is_ok());
        latest.insert(key, None);
    }
    // The timer writes the deletes without DSYNC (`Engine::flush` would make them durable).
    wait_for("a free wblock is scrubbed", || engine.stats().free_wblocks_scrubbed >= 1);
    let after = slow.elapsed();
    assert!(
        after >= std::time::Duration::from_millis(2500),
        "a free wblock was scrubbed {after:?} after the deletes began, before the fsync of their writes could complete"
    );
    disks[0].set_faults(SimFaults::default());
    wait_for("every tombstone is dropped", || engine.stats().tombstones == 0);
    crash_and_check(engine, &disks, c, &latest);
}

/// The same wait, judged by a power loss: the disk keeps writes in a volatile cache and its
/// fsyncs do not complete before the power goes. The updates that freed the first wblocks
/// and the deletes that made their scrubs wanted are undone; the old versions must still be
/// there, so no free wblock may have been scrubbed meanwhile.
#[test]
fn a_power_loss_before_the_fsync_leaves_the_old_versions_unscrubbed() {
    let (disks, c, engine, latest) = tomb_setup();
    // From here on nothing is durable but DSYNC writes.
    disks[0].set_faults(SimFaults { volatile_cache: true, fsync_delay_ms: 60_000, ..Default::default() });
    for key in 150..200 {
        assert!(engine.execute(Command::delete(common::digest_of(key).0)).is_ok());
    }
    // Every other record written again after the deletes: no live record is older than
    // the tombstones, so the wblocks freed, holding older copies, are to be scrubbed.
    let mut updated = latest.clone();
    put_all(&engine, 0..150, 2, &mut updated);
    // Not `engine.flush()`, which would make them durable: the timer writes the open
    // wblock out within `flush_max_ms` (1 s), and two expiry sweeps follow, each wanting
    // the freed wblocks scrubbed.
    std::thread::sleep(std::time::Duration::from_millis(3500));
    let st = engine.stats();
    assert!(st.device_writes > 0 && st.tombstones == 50, "{st:?}");
    engine.crash();
    drop(engine);
    assert!(disks[0].power_loss() > 0, "the updates and deletes were in the volatile cache");
    disks[0].set_faults(SimFaults::default());
    let engine = open(&disks, c);
    // A version from before the power loss: the old one, or the new one where a DSYNC
    // write (a defrag copy) made it durable; never nothing.
    for key in 0..200 {
        let old = latest[&key];
        let new = if key < 150 { Some(2) } else { None };
        let v = get_v(&engine, key);
        assert!(v == Ok(old) || v == Ok(new), "key {key} after the power loss: {v:?} (before {old:?}, after {new:?})");
    }
}

/// A wblock freed by writes not yet durable is written again only once they are: a device
/// may persist its cache out of order, and here the power fails with the reused wblock's
/// writes persisted and the writes that freed it (the newer copies of its records) not.
/// The old copies must still be there. Before, the reused wblock was written at once and
/// those records were lost.
#[test]
fn a_reused_wblock_is_written_only_once_the_writes_that_freed_it_are_durable() {
    common::init_logs();
    let disks = disks(1, 4 << 20);
    let c = cfg(1);
    let wb = c.wblock_bytes as u64;
    let engine = open(&disks, c.clone());
    // Fill the device until 5 wblocks are free (2 of them the reserve), durably.
    let mut keys = 0;
    while engine.stats().free_wblocks > 5 {
        put_vp(&engine, keys, 1);
        keys += 1;
    }
    engine.flush();
    let first = wblock_of(&disks[0], wb, 0);
    disks[0].set_faults(SimFaults { volatile_cache: true, fsync_delay_ms: 60_000, ..Default::default() });
    // Rewrite the oldest keys, in order: each wblock's worth frees the wblock holding their
    // first versions, which joins the end of the free list; within a few, the list comes
    // round to `first`. Then some more records go into it. (The fsync never completing
    // here, nothing is freed once the held writes start: the rewrites stop soon after.)
    let mut key = 0;
    let mut after_hold = 0;
    while after_hold < 20 && key < keys / 2 {
        put_vp(&engine, key, 2);
        key += 1;
        if engine.stats().wblock_reuses_held > 0 {
            after_hold += 1;
        }
    }
    // The open wblock is written out by the timer (`flush_max_ms`).
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let held = engine.stats().wblock_reuses_held;
    engine.crash();
    drop(engine);
    disks[0].power_loss_keeping(&[(first as u64 * wb, (first as u64 + 1) * wb)]);
    disks[0].set_faults(SimFaults::default());
    let engine = open(&disks, c);
    for key in 0..keys {
        let v = get_v(&engine, key);
        assert!(matches!(v, Ok(Some(1 | 2))), "key {key} after the power loss: {v:?}");
    }
    assert!(held >= 1, "the test reused no wblock freed by writes not yet durable");
}

/// A scrub waits until the writes completed before it was queued are durable, not for a
/// moment when no write waits for an fsync: under steady writes to a device slow to fsync
/// there is no such moment (an fsync is in flight, or writes completed since it was sent),
/// and free wblocks were then never scrubbed.
#[test]
fn free_wblocks_are_scrubbed_under_steady_writes() {
    let (disks, c, engine, mut latest) = tomb_setup();
    for key in 0..200 {
        assert!(engine.execute(Command::delete(common::digest_of(key).0)).is_ok());
        latest.insert(key, None);
    }
    engine.flush();
    disks[0].set_faults(SimFaults { fsync_delay_ms: 300, ..Default::default() });
    let stop = std::sync::atomic::AtomicBool::new(false);
    let written = std::thread::scope(|s| {
        // Small records, each written out at once: a write completes every few
        // milliseconds, into one or two wblocks (their reuse of free wblocks does not do
        // the scrubs' job).
        let writer = s.spawn(|| {
            let mut written = Latest::new();
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = 1000 + n % 20;
                let ver = n as i64 + 1;
                let put = Command::put(common::digest_of(key).0, "demo", vec![Bin::new("v", Value::Int(ver))]);
                assert!(engine.execute(put).is_ok());
                written.insert(key, Some(ver));
                engine.flush();
                n += 1;
                std::thread::sleep(std::time::Duration::from_millis(3));
            }
            written
        });
        // Not `wait_for`: its panic would leave the writer running and the scope waiting.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut scrubbed = false;
        while !scrubbed && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
            scrubbed = engine.stats().free_wblocks_scrubbed >= 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (scrubbed, writer.join())
    });
    let (scrubbed, written) = written;
    assert!(scrubbed, "no free wblock was scrubbed in 10 s of steady writes");
    latest.extend(written.expect("writer"));
    wait_for("every tombstone is dropped", || engine.stats().tombstones == 0);
    disks[0].set_faults(SimFaults::default());
    crash_and_check(engine, &disks, c, &latest);
}

/// Stop `engine` as a crash would, reopen `disks`, and check that every key reads back its
/// latest version.
fn crash_and_check(engine: Engine, disks: &[SimDisk], c: EngineConfig, latest: &Latest) {
    engine.crash();
    drop(engine);
    let engine = open(disks, c);
    check_latest(&engine, latest, "after the crash");
}

// ------------------------------------------------------------------ the reuse hold

/// The size of the "p" bin of [`put_big`]: three such records fill a 128 KiB wblock.
const BIG_BYTES: usize = 40 * 1024;

/// A put of bin "v" = `ver` and a `BIG_BYTES` bin "p" to test key `key`: a filler that
/// takes wblocks quickly.
fn put_big(engine: &Engine, key: u64, ver: i64) {
    let bins = vec![Bin::new("v", Value::Int(ver)), Bin::new("p", Value::Blob(vec![9; BIG_BYTES]))];
    let r = engine.execute(Command::put(common::digest_of(key).0, "demo", bins));
    assert!(r.is_ok(), "put of key {key}: {:?}", r.result);
}

/// Whether the records of test key `key` go to device `dev` of two (digest bytes 8..12
/// pick the device, as `Shared::device_of` does).
fn on_device_of_two(key: u64, dev: u32) -> bool {
    let d = common::digest_of(key).0;
    u32::from_le_bytes(d.0[8..12].try_into().unwrap()) % 2 == dev
}

/// Test keys from `from` on whose partitions shard `shard` of two works and whose records
/// go to device `dev` of two.
fn keys_of_shard_on(shard: u16, dev: u32, from: u64, n: usize) -> Vec<u64> {
    (from..).filter(|&k| on_shard_of_two(k, shard) && on_device_of_two(k, dev)).take(n).collect()
}

/// A config for the tests of the reuse hold: open wblocks written and fsyncs sent every
/// 200 ms, no reserve and no minimum of free space (so that a freed wblock, last on its
/// free list, is reached by client writes) and a defrag that moves nothing.
fn hold_cfg(shards: usize) -> EngineConfig {
    let mut c = cfg(shards);
    c.flush_max_ms = 200;
    c.defrag_reserve_wblocks = 0;
    c.stop_writes_avail_pct = 0;
    c.defrag_lwm_pct = 1;
    c
}

/// Run `f` (a stop, a flush) on a thread of its own and wait 10 s at most for it: a hang
/// fails the test instead of stalling it (the thread is left behind).
#[track_caller]
fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not return within 10 s"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}

/// A flush while `held` keys' writes are held and the fsync they wait for fails: it returns,
/// the shard is latched, and those keys (taken out of `latest`) answer SERVER_ERROR.
fn flush_latches(engine: &Arc<Engine>, held: &[u64], latest: &mut Latest) {
    let e = engine.clone();
    within_10s("the flush", move || e.flush());
    let st = engine.stats();
    assert!(st.read_only && st.write_errors >= 2, "{st:?}");
    for &key in held {
        assert_eq!(get_v(engine, key), Err(ResultCode::ServerError), "key {key} of a held write that failed");
        latest.remove(&key);
    }
}

/// After the restart that follows [`flush_latches`]: everything else is there, and the
/// held writes, never written, are not.
fn check_held_lost(engine: &Engine, latest: &Latest, held: &[u64]) {
    check_latest(engine, latest, "after the restart");
    for &key in held {
        assert_eq!(get_v(engine, key), Ok(None), "key {key} of a held write that failed");
    }
}

/// An engine of two shards on two disks whose shard 0 holds the writes of its reuse of an
/// earlier run's wblock (wblock 1 of disk 0), waiting for shard 1's fsync of disk 1.
struct HeldReuse {
    disks: Vec<SimDisk>,
    c: EngineConfig,
    engine: Arc<Engine>,
    /// Every acknowledged write.
    latest: Latest,
    /// Keys whose only records are in the held use of wblock 1, not written yet.
    held: Vec<u64>,
}

/// Run 1 leaves records of keys `olds` (shard 0, disk 0) in wblock 1 of disk 0 and takes
/// every other wblock of shard 0 there but the last (31) with fillers. Run 2, with faults
/// `faults0` and `faults1` on the disks: shard 1 writes a record to disk 1 (written by the
/// timer, without DSYNC: shard 1's writes are not all durable until its fsync of disk 1
/// completes), shard 0 deletes `olds` (tombstones in wblock 31, written by its timer), which frees wblock 1,
/// fills wblock 31 and takes wblock 1 for a new use, whose writes are held (`Hold::All`)
/// until shard 1's writes are durable. Records of keys `held` go into it.
fn held_reuse_of_an_earlier_runs_wblock(faults0: SimFaults, faults1: SimFaults) -> HeldReuse {
    common::init_logs();
    let disks = disks(2, 4 << 20); // 31 data wblocks of 128 KiB each
    let c = hold_cfg(2);
    let wb = c.wblock_bytes as u64;
    let mut latest = Latest::new();
    let olds = keys_of_shard_on(0, 0, 0, 60);
    let mut fillers = keys_of_shard_on(0, 0, 100_000, 200).into_iter();
    let mut fill = |engine: &Engine, latest: &mut Latest| {
        let key = fillers.next().expect("enough filler keys");
        put_big(engine, key, 1);
        latest.insert(key, Some(1));
        key
    };

    let engine = open(&disks, c.clone());
    put_all(&engine, olds.iter().copied(), 1, &mut latest);
    // Shard 0 opens its wblocks of disk 0 in order: 1 (`olds`), then 3 to 29.
    let free = engine.stats().free_wblocks;
    while engine.stats().free_wblocks > free - 14 {
        fill(&engine, &mut latest);
    }
    engine.shutdown().expect("clean shutdown");
    drop(engine);
    assert_eq!(keys_in_wblock(&disks[0], 1, wb, olds.iter().copied()), olds, "wblock 1 holds the old records");

    let engine = Arc::new(open(&disks, c.clone()));
    let free = engine.stats().free_wblocks;
    disks[0].set_faults(faults0);
    disks[1].set_faults(faults1);
    let s1 = keys_of_shard_on(1, 1, 0, 1)[0];
    let writes = engine.stats().device_writes;
    put_vp(&engine, s1, 1);
    latest.insert(s1, Some(1));
    // Not `Engine::flush`, which would fsync it.
    wait_for("shard 1's timer writes its open wblock", || engine.stats().device_writes > writes);
    // Deletes, not new versions: their small tombstones fit wblock 31 whatever the timer's
    // partial writes of it pad (a slow machine's).
    for &key in &olds {
        assert!(engine.execute(Command::delete(common::digest_of(key).0)).is_ok());
        latest.insert(key, None);
    }
    // Wblocks 2 (disk 1) and 31 (disk 0) taken, wblock 1 freed once shard 0's timer has
    // written the tombstones.
    wait_for("wblock 1 is freed", || engine.stats().free_wblocks == free - 1);
    // The filler that does not fit in wblock 31 goes into wblock 1.
    let mut last = None;
    for _ in 0..5 {
        if engine.stats().free_wblocks < free - 1 {
            break;
        }
        last = Some(fill(&engine, &mut latest));
    }
    assert_eq!(engine.stats().free_wblocks, free - 2, "shard 0 filled wblock 31 and took wblock 1");
    assert_eq!(engine.stats().wblock_reuses_held, 1, "shard 0's reuse of wblock 1 waits for shard 1's fsync");
    let mut held = vec![last.expect("a filler was written")];
    held.extend(keys_of_shard_on(0, 0, 200_000, 30));
    put_all(&engine, held[1..].iter().copied(), 1, &mut latest);
    HeldReuse { disks, c, engine, latest, held }
}

/// A stop while a reuse's writes are held (waiting for another shard's slow fsync) waits
/// for them: it returns, and after a restart every acknowledged write is there, those of
/// the held use too.
#[test]
fn a_stop_writes_the_held_writes_of_a_reuse_before_it_returns() {
    let slow = SimFaults { fsync_delay_ms: 3000, ..Default::default() };
    let HeldReuse { disks, c, engine, latest, .. } = held_reuse_of_an_earlier_runs_wblock(SimFaults::default(), slow);
    let e = engine.clone();
    within_10s("the shutdown", move || e.shutdown()).expect("clean shutdown");
    drop(engine);
    disks[1].clear_faults();
    let engine = open(&disks, c);
    assert!(engine.stats().previous_shutdown_clean);
    check_latest(&engine, &latest, "after the restart");
}

/// `Engine::flush` while a reuse's writes are held returns only once they are on the
/// device (written with DSYNC): the wblock's image holds them when it returns, and a power
/// loss right after keeps them.
#[test]
fn a_flush_returns_once_the_held_writes_of_a_reuse_are_on_the_device() {
    let volatile = SimFaults { volatile_cache: true, ..Default::default() };
    let slow = SimFaults { fsync_delay_ms: 3000, ..Default::default() };
    let HeldReuse { disks, c, engine, latest, held, .. } = held_reuse_of_an_earlier_runs_wblock(volatile, slow);
    let wb = c.wblock_bytes as u64;
    assert!(keys_in_wblock(&disks[0], 1, wb, held.iter().copied()).is_empty(), "the held writes are not written yet");
    let e = engine.clone();
    within_10s("the flush", move || e.flush());
    let found = keys_in_wblock(&disks[0], 1, wb, held.iter().copied());
    assert_eq!(found, held, "the flush returned before the held writes were on the device");
    engine.crash();
    drop(engine);
    disks[0].power_loss();
    disks[0].clear_faults();
    disks[1].clear_faults();
    let engine = open(&disks, c);
    check_latest(&engine, &latest, "after a power loss right after the flush");
}

/// A held write fails, rather than waiting for ever, when the shard whose writes it waits
/// for latches read-only: here shard 1's fsync of disk 1 fails. Shard 0 then latches too;
/// the flush and the stop return; reads of the records of the held writes answer
/// SERVER_ERROR until a restart, after which the records written before are all there,
/// and the held ones, never written, are not.
#[test]
fn held_writes_fail_when_a_shard_they_wait_for_latches() {
    let failing = SimFaults { fsync_delay_ms: 2500, fail_fsyncs: true, ..Default::default() };
    let HeldReuse { disks, c, engine, mut latest, held, .. } =
        held_reuse_of_an_earlier_runs_wblock(SimFaults::default(), failing);
    flush_latches(&engine, &held, &mut latest);
    let put = engine.execute(put_v(held[0], 2));
    assert!(!put.is_ok(), "a write to latched shard 0 answered {:?}", put.result);
    let e = engine.clone();
    within_10s("the shutdown", move || e.shutdown()).expect("shutdown");
    drop(engine);
    disks[1].clear_faults();
    let engine = open(&disks, c);
    assert!(!engine.stats().previous_shutdown_clean);
    check_held_lost(&engine, &latest, &held);
}

/// The same on one shard whose own fsync fails: its held writes (`Hold::Own`, a wblock it
/// freed in this run) fail once it latches, and the old copies they would have overwritten
/// are still there after a restart.
#[test]
fn held_writes_fail_when_the_fsync_they_wait_for_fails() {
    common::init_logs();
    let disks = disks(1, 4 << 20);
    let c = hold_cfg(1);
    let engine = Arc::new(open(&disks, c.clone()));
    let mut latest = Latest::new();
    let olds: Vec<u64> = (0..60).collect();
    put_all(&engine, olds.iter().copied(), 1, &mut latest);
    // Wblock 1 holds `olds`; fillers take wblocks 2 to 30.
    let free = engine.stats().free_wblocks;
    let mut fillers = 100_000..;
    while engine.stats().free_wblocks > free - 29 {
        let key = fillers.next().unwrap();
        put_big(&engine, key, 1);
        latest.insert(key, Some(1));
    }
    engine.flush();
    assert_eq!(engine.stats().free_wblocks, 1);
    // From here on every fsync fails, 3 s after it was sent.
    disks[0].set_faults(SimFaults { fsync_delay_ms: 3000, fail_fsyncs: true, ..Default::default() });
    // `olds` again, into wblocks 30 and 31 without DSYNC (a seal, the timer): wblock 1 is
    // freed by writes not durable.
    put_all(&engine, olds.iter().copied(), 2, &mut latest);
    wait_for("wblock 1 is freed", || engine.stats().free_wblocks == 1);
    // The filler that does not fit in wblock 31 goes into wblock 1.
    let mut last = None;
    for _ in 0..5 {
        if engine.stats().free_wblocks == 0 {
            break;
        }
        let key = fillers.next().unwrap();
        put_big(&engine, key, 1);
        latest.insert(key, Some(1));
        last = Some(key);
    }
    let st = engine.stats();
    assert!(st.free_wblocks == 0 && st.wblock_reuses_held == 1 && !st.read_only, "wblock 1 reused, held: {st:?}");
    let mut held = vec![last.expect("a filler was written")];
    held.extend(200_000..200_030);
    put_all(&engine, held[1..].iter().copied(), 1, &mut latest);
    flush_latches(&engine, &held, &mut latest);
    let e = engine.clone();
    within_10s("the shutdown", move || e.shutdown()).expect("shutdown");
    drop(engine);
    disks[0].clear_faults();
    let engine = open(&disks, c);
    for &key in &olds {
        let v = get_v(&engine, key);
        assert!(matches!(v, Ok(Some(1 | 2))), "key {key} after the restart: {v:?}");
        latest.remove(&key);
    }
    check_held_lost(&engine, &latest, &held);
}

/// After a change of the shard count a wblock of an earlier run can hold any shard's
/// records; its reuse waits for every shard's writes to be durable (`Hold::All`), not only
/// its owner's. Run 1 (one shard) leaves keys 0..60 in wblock 1; in run 2 (two shards)
/// shard 1 writes its keys of them again without DSYNC (its fsyncs taking 4 s), then shard
/// 0 writes its own again (written by its timer), which frees wblock 1, and reuses it. A flush writes the
/// new use (with DSYNC) only once shard 1's writes are durable; a power loss then, with
/// the new use persisted, loses no record. Before shard 1's fsync it would have lost the
/// records of shard 1 whose old copies the new use overwrote.
#[test]
fn a_reuse_of_an_earlier_runs_wblock_waits_for_every_shards_fsync() {
    common::init_logs();
    let disks = disks(1, 4 << 20);
    let c1 = hold_cfg(1);
    let wb = c1.wblock_bytes as u64;
    let engine = open(&disks, c1);
    let mut versions = Latest::new();
    let olds: Vec<u64> = (0..60).collect();
    put_all(&engine, olds.iter().copied(), 1, &mut versions);
    // Fillers take wblocks 2 to 29.
    let free = engine.stats().free_wblocks;
    let mut fillers = 100_000..;
    while engine.stats().free_wblocks > free - 28 {
        put_big(&engine, fillers.next().unwrap(), 1);
    }
    engine.shutdown().expect("clean shutdown");
    drop(engine);
    assert_eq!(keys_in_wblock(&disks[0], 1, wb, olds.iter().copied()), olds, "wblock 1 holds keys 0..60");
    let run1_seq = scan_wblock(&disks[0], 1, wb).seq;

    // Run 2: shard 0 owns wblocks 1 and 31 (free), shard 1 owns wblock 30 (free).
    let c = hold_cfg(2);
    let engine = open(&disks, c.clone());
    assert_eq!(engine.stats().free_wblocks, 2);
    // From here on writes without DSYNC are durable only 4 s after an fsync is sent.
    disks[0].set_faults(SimFaults { volatile_cache: true, fsync_delay_ms: 4000, ..Default::default() });
    let (ones, zeros): (Vec<u64>, Vec<u64>) = olds.iter().partition(|&&k| on_shard_of_two(k, 1));
    let writes = engine.stats().device_writes;
    put_all(&engine, ones.iter().copied(), 2, &mut versions);
    // Not `Engine::flush`, which would fsync them.
    wait_for("shard 1's timer writes its open wblock", || engine.stats().device_writes > writes);
    put_all(&engine, zeros.iter().copied(), 2, &mut versions);
    wait_for("wblock 1 is freed", || engine.stats().free_wblocks == 1);
    // Shard 0 fills wblock 31 and takes wblock 1; then half of wblock 1 is filled, over
    // old records of both shards.
    for key in keys_of_shard(0, 300_000, 5) {
        if engine.stats().free_wblocks == 0 {
            break;
        }
        put_big(&engine, key, 1);
    }
    assert_eq!(engine.stats().free_wblocks, 0, "shard 0 took wblock 1");
    for key in keys_of_shard(0, 200_000, 40) {
        put_vp(&engine, key, 1);
    }
    engine.flush();
    let reuses_held = engine.stats().wblock_reuses_held;
    let seq = scan_wblock(&disks[0], 1, wb).seq;
    engine.crash();
    drop(engine);
    disks[0].power_loss_keeping(&[(wb, 2 * wb)]);
    disks[0].clear_faults();
    let engine = open(&disks, c);
    for &key in &olds {
        let v = get_v(&engine, key);
        assert!(matches!(v, Ok(Some(1 | 2))), "key {key} of shard {} after the power loss: {v:?}", key_shard(key));
    }
    assert!(reuses_held >= 1, "the reuse of wblock 1 was not held");
    assert_ne!(seq, run1_seq, "wblock 1 was written again before the power loss");
}

/// The shard of two whose partitions hold test key `key`.
fn key_shard(key: u64) -> u16 {
    u16::from(on_shard_of_two(key, 1))
}

/// A device two shards filled in a run before (till 8 wblocks were free) and stopped.
struct EarlierRun {
    disks: Vec<SimDisk>,
    /// For the next run: no scrubs, nothing fsynced on a timer within a test.
    c: EngineConfig,
    /// The keys shard 0 wrote, in order.
    mine: Vec<u64>,
    /// The wblock holding the first of them, and its write sequence.
    first: u32,
    earlier: u64,
}

fn earlier_run_of_two_shards() -> EarlierRun {
    common::init_logs();
    let disks = disks(1, 4 << 20);
    let mut c = hold_cfg(2);
    c.scrub_free_wblocks = false;
    let engine = open(&disks, c.clone());
    let mut keys = 0;
    while engine.stats().free_wblocks > 8 {
        put_vp(&engine, keys, 1);
        keys += 1;
    }
    engine.shutdown().expect("clean shutdown");
    drop(engine);
    let mine: Vec<u64> = (0..keys).filter(|&k| on_shard_of_two(k, 0)).collect();
    let wb = c.wblock_bytes as u64;
    let first = wblock_of(&disks[0], wb, mine[0]);
    let earlier = scan_wblock(&disks[0], first, wb).seq;
    c.flush_max_ms = 60_000;
    EarlierRun { disks, c, mine, first, earlier }
}

/// After a restart, a wblock of the earlier run may hold any shard's records, so its reuse
/// waits until every shard's completed writes are durable. The shard reusing it asks the
/// others to fsync theirs at once, rather than waiting for their `flush_max_ms` timer.
#[test]
fn an_earlier_runs_wblock_is_reused_without_waiting_for_the_other_shards_timer() {
    let EarlierRun { disks, c, mine, first, earlier } = earlier_run_of_two_shards();
    let wb = c.wblock_bytes as u64;
    let engine = open(&disks, c.clone());
    // Shard 1 writes a wblock out (a full one): completed, not yet durable.
    for k in keys_of_shard(1, 1 << 20, 100) {
        put_vp(&engine, k, 1);
    }
    // Shard 0 rewrites its keys in order until the free list comes round to `first` and
    // a wblock's worth of records goes into it: that write waits for shard 1's.
    let (mut i, mut after_hold) = (0, 0);
    while after_hold < 90 && i < mine.len() {
        put_vp(&engine, mine[i], 2);
        i += 1;
        if engine.stats().wblock_reuses_held > 0 {
            after_hold += 1;
        }
    }
    assert!(engine.stats().wblock_reuses_held >= 1, "no reuse of an earlier run's wblock was held");
    wait_for("the held write of the reused wblock reaches the device", || {
        scan_wblock(&disks[0], first, wb).seq != earlier
    });
    engine.shutdown().expect("clean shutdown");
    drop(engine);
    let engine = open(&disks, c);
    for (n, &k) in mine.iter().enumerate() {
        let want = if n < i { 2 } else { 1 };
        assert_eq!(get_v(&engine, k), Ok(Some(want)), "key {k}");
    }
}

/// `Engine::flush` makes every write acknowledged before it durable, those already written
/// without DSYNC (waiting for the timer's fsync) too: it sends the fsync and waits for it.
#[test]
fn a_flush_makes_every_acknowledged_write_durable() {
    common::init_logs();
    let disks = disks(1, 4 << 20);
    let mut c = cfg(1);
    c.flush_max_ms = 60_000;
    let engine = open(&disks, c.clone());
    disks[0].set_faults(SimFaults { volatile_cache: true, fsync_delay_ms: 300, ..Default::default() });
    let mut latest = Latest::new();
    put_all(&engine, 0..200, 1, &mut latest);
    within_10s("the flush", {
        let engine = Arc::new(engine);
        let e = engine.clone();
        move || {
            e.flush();
            e.crash();
        }
    });
    disks[0].power_loss();
    disks[0].clear_faults();
    let engine = open(&disks, c);
    check_latest(&engine, &latest, "after a power loss right after the flush");
}

/// An earlier run's wblock waits, when reused, for the writes that were completed when it
/// was freed, not for those completed since: freed by writes made durable since, it is
/// reused at once though another shard has written more since, not yet fsynced.
#[test]
fn an_earlier_runs_wblock_freed_by_durable_writes_is_reused_without_a_hold() {
    let EarlierRun { disks, c, mine, first, earlier } = earlier_run_of_two_shards();
    let wb = c.wblock_bytes as u64;
    let engine = open(&disks, c);
    // Shard 0 rewrites a third of its keys: wblocks of the earlier run are freed (`first`
    // among them), and the flush makes the writes that freed them durable.
    let third = mine.len() / 3;
    for &k in &mine[..third] {
        put_vp(&engine, k, 2);
    }
    engine.flush();
    // Shard 1 writes a wblock out, not fsynced (the timer is a minute away).
    let writes = engine.stats().device_writes;
    for k in keys_of_shard(1, 1 << 20, 100) {
        put_vp(&engine, k, 1);
    }
    wait_for("shard 1 writes a full wblock", || engine.stats().device_writes > writes);
    // Shard 0 goes on until its free list comes round to `first` and a full wblock's
    // worth goes into it.
    let mut i = third;
    while scan_wblock(&disks[0], first, wb).seq == earlier {
        assert!(i < mine.len(), "shard 0 did not come round to wblock {first}");
        put_vp(&engine, mine[i], 2);
        i += 1;
    }
    assert_eq!(engine.stats().wblock_reuses_held, 0, "a reuse waited for writes made after its wblock was freed");
}

/// A flush that comes while the engine stops returns once the stop has made every write
/// durable, not at once.
#[test]
fn a_flush_during_a_stop_returns_once_the_writes_are_durable() {
    common::init_logs();
    let disks = disks(1, 4 << 20);
    let mut c = cfg(1);
    c.flush_max_ms = 60_000;
    let engine = Arc::new(open(&disks, c.clone()));
    disks[0].set_faults(SimFaults { volatile_cache: true, fsync_delay_ms: 2000, ..Default::default() });
    let mut latest = Latest::new();
    put_all(&engine, 0..200, 1, &mut latest);
    let before = disks[0].writes_seen();
    let e = engine.clone();
    let stop = std::thread::spawn(move || e.shutdown());
    // Once the stop has written the open wblock (its fsync then takes 2 s).
    wait_for("the stop writes the open wblock", || disks[0].writes_seen() > before);
    within_10s("the flush", {
        let e = engine.clone();
        move || e.flush()
    });
    // A power loss now keeps what the flush promised.
    disks[0].power_loss();
    stop.join().expect("stop thread").expect("clean shutdown");
    drop(engine);
    disks[0].clear_faults();
    let engine = open(&disks, c);
    check_latest(&engine, &latest, "after a power loss right after the flush");
}
