//! ferrospike-inspect on a device the engine wrote: `verify` finds nothing on a clean device
//! and names the damaged record (by digest, with a non-zero exit status) after a bit flip;
//! `header`, `get`, `wblocks` and `dump-wblock` read it.

mod common;
mod tools_support;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ferrospike_engine::coldstart::scan_wblock;
use ferrospike_engine::format::DeviceHeader;
use ferrospike_engine::io::{open_devices, DeviceSpec};
use ferrospike_engine::{Bin, Command, Engine, EngineConfig, UserKey, Value};
use tools_support::{run_tool, Scratch};

const WBLOCK_BYTES: u32 = 128 << 10;
const RECORDS: i64 = 2000;

/// A 32 MiB file written by the engine: RECORDS records with stored keys, then a clean
/// shutdown.
fn engine_device(dir: &Scratch) -> String {
    let path = dir.path("ns.dat");
    let devs = open_devices(&[DeviceSpec { path: path.clone(), file_size: Some(32 << 20) }], 64).unwrap();
    let mut cfg = EngineConfig::new("test");
    cfg.wblock_bytes = WBLOCK_BYTES;
    cfg.shards = 1;
    cfg.pin_threads = false;
    let e = Engine::open(cfg, Arc::new(devs)).unwrap();
    for i in 0..RECORDS {
        let k = UserKey::Int(i);
        let bins = vec![Bin::new("n", Value::Int(i)), Bin::new("b", Value::Blob(vec![i as u8; 300]))];
        let r = e.execute(Command::put(k.digest("demo"), "demo", bins).with_key(k.to_field()));
        assert!(r.is_ok(), "{r:?}");
    }
    e.truncate(Some("gone"), None).unwrap();
    e.shutdown().unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn verify_clean_then_corrupted() {
    let dir = Scratch::new("inspect");
    let dev = engine_device(&dir);

    let r = run_tool("inspect", &[&dev, "verify"]);
    assert_eq!(r.code, 0, "{}", r.dump());
    assert!(r.stdout.contains(&format!("live:               {RECORDS} ")), "{}", r.dump());
    assert!(
        r.stdout.contains("damaged:            0 stretch(es)") && r.stdout.contains("RESULT: clean"),
        "{}",
        r.dump()
    );

    let r = run_tool("inspect", &[&dev, "header"]);
    assert_eq!(r.code, 0, "{}", r.dump());
    assert!(
        r.stdout.contains("namespace          test")
            && r.stdout.contains("clean shutdown     yes")
            && r.stdout.contains("truncate           set gone: records last updated before"),
        "{}",
        r.dump()
    );

    let r =
        run_tool("inspect", &[&dev, "get", "--namespace", "test", "--set", "demo", "--key", "7", "--key-type", "int"]);
    assert_eq!(r.code, 0, "{}", r.dump());
    assert!(
        r.stdout.contains("CURRENT:") && r.stdout.contains("bin n: 7") && r.stdout.contains("key: 7 (int)"),
        "{}",
        r.dump()
    );

    let r = run_tool("inspect", &[&dev, "wblocks"]);
    assert_eq!(r.code, 0, "{}", r.dump());
    assert!(r.stdout.contains("defrag-eligible:"), "{}", r.dump());

    // Flip one bit inside the 6th record of write block 2 (past its 72-byte header, in the
    // bins), found with the engine's own wblock parser.
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&dev).unwrap();
    let mut hdr = vec![0u8; 8192];
    f.read_exact_at(&mut hdr, 0).unwrap();
    let h = [DeviceHeader::decode(&hdr[..4096]), DeviceHeader::decode(&hdr[4096..])]
        .into_iter()
        .filter_map(Result::ok)
        .max_by_key(|h| h.write_seq)
        .unwrap();
    let w = 2u32;
    let base = w as u64 * WBLOCK_BYTES as u64;
    let mut buf = vec![0u8; WBLOCK_BYTES as usize];
    f.read_exact_at(&mut buf, base).unwrap();
    let scan = scan_wblock(&buf, h.device_id, h.device_index, w);
    assert!(scan.records.len() > 6, "write block 2 holds {} records", scan.records.len());
    let (meta, off, _, _) = scan.records[5];
    let victim = meta.digest.to_hex();
    let at = base + off as u64 + 150;
    let mut byte = [0u8; 1];
    f.read_exact_at(&mut byte, at).unwrap();
    byte[0] ^= 0x10;
    f.write_all_at(&byte, at).unwrap();
    f.sync_all().unwrap();
    drop(f);

    let r = run_tool("inspect", &[&dev, "verify"]);
    assert_eq!(r.code, 1, "damage must give a non-zero exit status\n{}", r.dump());
    assert!(r.stdout.contains("RESULT: DAMAGE FOUND"), "{}", r.dump());
    let line = r.stdout.lines().find(|l| l.starts_with("DAMAGED")).unwrap_or_else(|| panic!("{}", r.dump()));
    assert!(line.contains(&victim) && line.contains("corrupt") && line.contains("wblock 2"), "{line}");
    assert!(r.stdout.contains(&format!("live:               {} ", RECORDS - 1)), "{}", r.dump());

    let r = run_tool("inspect", &[&dev, "dump-wblock", "2"]);
    assert_eq!(r.code, 1, "{}", r.dump());
    assert!(r.stdout.lines().any(|l| l.contains(&victim) && l.contains("DAMAGED")), "{}", r.dump());

    // With the header gone, --write-block-size and the write block headers still identify
    // the device and find the same damage.
    let f = std::fs::OpenOptions::new().write(true).open(&dev).unwrap();
    f.write_all_at(&[0u8; 8192], 0).unwrap();
    drop(f);
    let r = run_tool("inspect", &[&dev, "verify"]);
    assert_eq!(r.code, 2, "{}", r.dump());
    assert!(r.stderr.contains("--write-block-size"), "{}", r.dump());
    let r = run_tool("inspect", &[&dev, "verify", "--write-block-size", "128K"]);
    assert_eq!(r.code, 1, "{}", r.dump());
    assert!(r.stdout.contains(&victim), "{}", r.dump());
}

#[test]
fn help_and_bad_usage() {
    for tool in ["inspect", "act", "bench"] {
        let r = run_tool(tool, &["--help"]);
        assert_eq!(r.code, 0, "{}", r.dump());
        assert!(r.stdout.contains("USAGE"), "{}", r.dump());
    }
    let r = run_tool("inspect", &["/nonexistent", "frobnicate"]);
    assert_eq!(r.code, 2, "{}", r.dump());
}
