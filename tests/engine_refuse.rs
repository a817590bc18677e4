//! Devices the engine must refuse, with messages that name the values: another
//! write-block-size, another namespace, foreign data, a device that is too small.

mod common;

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use ferrospike_engine::io::open_devices;
use ferrospike_engine::{erase_devices, Engine, EngineConfig};

fn cfg(ns: &str, wb: u32) -> EngineConfig {
    let mut c = EngineConfig::new(ns);
    c.shards = 2;
    c.wblock_bytes = wb;
    c
}

fn try_open(spec: &ferrospike_engine::io::DeviceSpec, c: EngineConfig) -> Result<Engine, String> {
    let devs = open_devices(std::slice::from_ref(spec), 64).map_err(|e| e.to_string())?;
    Engine::open(c, Arc::new(devs)).map_err(|e| e.to_string())
}

#[test]
fn refuses_devices_formatted_differently_or_holding_foreign_data() {
    common::init_logs();
    let dir = common::TestDir::new("refuse");
    let spec = common::file_spec(&dir, "dev.dat", 64 << 20);
    let e = try_open(&spec, cfg("test", 1 << 20)).unwrap();
    e.shutdown().unwrap();
    drop(e);

    let err = try_open(&spec, cfg("test", 2 << 20)).err().expect("another write-block-size is refused");
    assert!(err.contains("1048576") && err.contains("2097152"), "{err}");
    let err = try_open(&spec, cfg("other", 1 << 20)).err().expect("another namespace is refused");
    assert!(err.contains("'test'") && err.contains("'other'"), "{err}");
    // The original configuration still works: refusing changed nothing.
    drop(try_open(&spec, cfg("test", 1 << 20)).unwrap());

    // Foreign data: a blank file with a few bytes at offset 5000.
    let foreign = common::file_spec(&dir, "foreign.dat", 64 << 20);
    drop(open_devices(std::slice::from_ref(&foreign), 64).unwrap());
    let f = std::fs::OpenOptions::new().write(true).open(&foreign.path).unwrap();
    f.write_all_at(b"not ferrospike", 5000).unwrap();
    drop(f);
    let err = try_open(&foreign, cfg("test", 1 << 20)).err().expect("foreign data is refused");
    assert!(err.contains("5000") && err.contains("not a Ferrospike device"), "{err}");
    // An explicit erase makes it usable.
    erase_devices(&open_devices(std::slice::from_ref(&foreign), 64).unwrap()).unwrap();
    drop(try_open(&foreign, cfg("test", 1 << 20)).unwrap());

    // Too small: 4 MiB holds fewer than the minimum number of write blocks.
    let small = common::file_spec(&dir, "small.dat", 4 << 20);
    let err = try_open(&small, cfg("test", 1 << 20)).err().expect("a tiny device is refused");
    assert!(err.contains("too small") && err.contains("4194304"), "{err}");

    // A corrupt header (both copies) is refused, not reformatted.
    let f = std::fs::OpenOptions::new().write(true).open(&spec.path).unwrap();
    f.write_all_at(&[0xff; 16], 40).unwrap();
    f.write_all_at(&[0xff; 16], 4096 + 40).unwrap();
    drop(f);
    let err = try_open(&spec, cfg("test", 1 << 20)).err().expect("a corrupt header is refused");
    assert!(err.contains("corrupt"), "{err}");
}
