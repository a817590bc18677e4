//! Damage on the device image: a bit flip, a zeroed sector, and a record copied over another
//! one. After a restart each damaged record is skipped and counted, no damaged or misplaced
//! data is served, and every other record is intact.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ferrospike_engine::coldstart::scan_wblock;
use ferrospike_engine::format::DeviceHeader;
use ferrospike_engine::io::open_devices;
use ferrospike_engine::{Bin, Command, Digest, Engine, EngineConfig, ResultCode};

const SIZE: u64 = 256 << 20;
const WB: usize = 1 << 20;
const N: u64 = 2000;

fn engine(spec: &ferrospike_engine::io::DeviceSpec) -> Engine {
    let mut c = EngineConfig::new("test");
    c.shards = 2;
    c.wblock_bytes = WB as u32;
    Engine::open(c, Arc::new(open_devices(std::slice::from_ref(spec), 64).unwrap())).unwrap()
}

fn bins(i: u64) -> Vec<Bin> {
    vec![Bin::new("v", ferrospike_engine::Value::Blob(common::pattern(i, 1500 + (i as usize % 5) * 700)))]
}

#[test]
fn damaged_records_are_skipped_counted_and_never_served() {
    common::init_logs();
    let dir = common::TestDir::new("corrupt");
    let spec = common::file_spec(&dir, "dev.dat", SIZE);
    let e = engine(&spec);
    let puts = (0..N).map(|i| Command::put(common::digest_of(i).0, "demo", bins(i)));
    common::pipeline(&e, puts, 64, |i, r| assert!(r.is_ok(), "put {i}"));
    e.shutdown().unwrap();
    drop(e);

    // Locate every record on the image.
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&spec.path).unwrap();
    let mut image = vec![0u8; SIZE as usize];
    file.read_exact_at(&mut image, 0).unwrap();
    let device_id = [0usize, 4096]
        .iter()
        .filter_map(|&o| DeviceHeader::decode(&image[o..o + 4096]).ok())
        .max_by_key(|h| h.write_seq)
        .unwrap()
        .device_id;
    // (digest, absolute offset, padded length, wblock, index within wblock, records in wblock)
    let mut recs: Vec<(Digest, usize, usize, usize, usize, usize)> = Vec::new();
    for w in 1..(SIZE as usize / WB) {
        let s = scan_wblock(&image[w * WB..(w + 1) * WB], device_id, 0, w as u32);
        let n = s.records.len();
        for (k, (meta, off, plen, _)) in s.records.into_iter().enumerate() {
            recs.push((meta.digest, w * WB + off as usize, plen as usize, w, k, n));
        }
    }
    assert_eq!(recs.len() as u64, N);
    // Pick victims in the middle of different wblocks, away from each other.
    let mid = |w_pick: usize| recs.iter().find(|r| r.3 == w_pick && r.4 == r.5 / 2).copied().unwrap();
    let used_wblocks: Vec<usize> = {
        let mut v: Vec<usize> = recs.iter().map(|r| r.3).collect();
        v.dedup();
        v
    };
    assert!(used_wblocks.len() >= 4, "need records in several wblocks");
    let a = mid(used_wblocks[0]);
    let b = mid(used_wblocks[1]);
    let c = recs.iter().find(|r| r.3 == used_wblocks[2] && r.4 == 1).copied().unwrap();
    let d = recs
        .iter()
        .find(|r| r.3 == used_wblocks[3] && r.4 > 0 && r.4 + 1 < r.5 && r.2 >= c.2)
        .copied()
        .expect("a record at least as long as c");

    // 1. A bit flip in a's value.
    let at = a.1 + a.2 / 2;
    image[at] ^= 0x04;
    file.write_all_at(&image[at..at + 1], at as u64).unwrap();
    // 2. A zeroed 512-byte sector inside b.
    let sector = (b.1 + 512).div_ceil(512) * 512;
    assert!(sector + 512 <= b.1 + b.2);
    file.write_all_at(&[0u8; 512], sector as u64).unwrap();
    // 3. c copied over d, in another wblock.
    let copy = image[c.1..c.1 + c.2].to_vec();
    file.write_all_at(&copy, d.1 as u64).unwrap();
    file.sync_all().unwrap();
    drop(file);

    let e = engine(&spec);
    let st = e.stats();
    assert_eq!(st.cold_start_corrupt, 3, "three damaged records counted");
    assert_eq!(st.records, N - 3);
    for victim in [a.0, b.0, d.0] {
        let r = e.execute(Command::get(victim));
        assert_eq!(r.result, ResultCode::NotFound, "a damaged record is never served");
    }
    for i in 0..N {
        let dg = common::digest_of(i).0;
        if [a.0, b.0, d.0].contains(&dg) {
            continue;
        }
        let r = e.execute(Command::get(dg));
        assert_eq!(r.result, ResultCode::Ok, "record {i}");
        assert_eq!(r.bin("v"), Some(&bins(i)[0].value), "record {i} intact");
    }
}
