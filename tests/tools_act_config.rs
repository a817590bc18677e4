//! ferrospike-act's configuration: every ACT key, every default, unknown keys, bad values,
//! and the rates ACT derives for its published load definitions.

mod common;
mod tools_support;

use ferrospike_tools::act::config::{ActConfig, ConfigError, KEYS};

fn checked(text: &str) -> Result<ActConfig, ConfigError> {
    let mut c = ActConfig::parse(text)?;
    c.check()?;
    Ok(c)
}

/// ACT's 1x load for one device (README: 2000 reads/s + 1000 writes/s, 1536-byte records,
/// 128 KiB large blocks, defaults for everything else), plus `extra` lines.
fn one_x(extra: &str) -> String {
    format!(
        "device-names: /dev/sdX\ntest-duration-sec: 86400\nread-reqs-per-sec: 2000\nwrite-reqs-per-sec: 1000\n{extra}"
    )
}

#[test]
fn defaults_are_acts() {
    let c = ActConfig::parse("").unwrap();
    assert_eq!(c.device_names, Vec::<String>::new());
    assert_eq!(c.file_size_mbytes, 0);
    assert_eq!(c.service_threads, 0, "resolved to 5 x CPUs by check()");
    assert_eq!(c.test_duration_sec, 0);
    assert_eq!(c.report_interval_sec, 1);
    assert!(!c.microsecond_histograms);
    assert_eq!((c.read_reqs_per_sec, c.write_reqs_per_sec), (0, 0));
    assert_eq!((c.record_bytes, c.record_bytes_range_max), (1536, 0));
    assert_eq!(c.large_block_op_kbytes, 128);
    assert_eq!(c.replication_factor, 1);
    assert_eq!(c.update_pct, 0);
    assert_eq!(c.defrag_lwm_pct, 50);
    assert!(!c.no_defrag_reads);
    assert_eq!(c.compress_pct, 100);
    assert!(!c.disable_odsync && !c.commit_to_device && !c.tomb_raider);
    assert_eq!(c.tomb_raider_sleep_usec, 0);
    assert_eq!(c.max_lag_sec, 10);
    let c = checked(&one_x("")).unwrap();
    let cpus = std::thread::available_parallelism().unwrap().get() as u32;
    assert_eq!(c.service_threads, 5 * cpus);
}

#[test]
fn every_key_parses() {
    let text = "\
# every key, with ACT's separators and a comment after a value
device-names: /dev/a,/dev/b;/dev/c /dev/d
file-size-mbytes: 64
service-threads: 7
test-duration-sec: 60   # one minute
report-interval-sec: 5
microsecond-histograms: yes
read-reqs-per-sec: 4000
write-reqs-per-sec: 2000
record-bytes: 1000
record-bytes-range-max: 3000
large-block-op-kbytes: 256
replication-factor: 2
update-pct: 30
defrag-lwm-pct: 60
no-defrag-reads: yes
compress-pct: 70
disable-odsync: yes
commit-to-device: no
tomb-raider: yes
tomb-raider-sleep-usec: 1000
max-lag-sec: 3
";
    let c = checked(text).unwrap();
    assert_eq!(c.device_names, ["/dev/a", "/dev/b", "/dev/c", "/dev/d"]);
    assert_eq!(c.file_size_mbytes, 64);
    assert_eq!(c.service_threads, 7);
    assert_eq!(c.test_duration_sec, 60);
    assert_eq!(c.report_interval_sec, 5);
    assert!(c.microsecond_histograms);
    assert_eq!((c.read_reqs_per_sec, c.write_reqs_per_sec), (4000, 2000));
    assert_eq!((c.record_bytes, c.record_bytes_range_max), (1000, 3000));
    assert_eq!(c.large_block_op_kbytes, 256);
    assert_eq!(c.replication_factor, 2);
    assert_eq!(c.update_pct, 30);
    assert_eq!(c.defrag_lwm_pct, 60);
    assert!(c.no_defrag_reads);
    assert_eq!(c.compress_pct, 70);
    assert!(c.disable_odsync && !c.commit_to_device && c.tomb_raider);
    assert_eq!(c.tomb_raider_sleep_usec, 1000);
    assert_eq!(c.max_lag_sec, 3);
    // The echo names every key (file-size-mbytes only when set, as ACT does).
    let echo = c.echo();
    for k in KEYS {
        assert!(echo.contains(&format!("\n{k}:")), "echo lacks {k}:\n{echo}");
    }
    assert!(echo.starts_with("ACT-STORAGE CONFIGURATION\ndevice-names: /dev/a /dev/b /dev/c /dev/d\nnum-devices: 4\n"));
    // Derived: stored 1008 .. 3008, average 2008; 262144 / 2008 = 130 records per block;
    // 4000 writes/s / 130 x 2.5 = 76.92 large-block writes/s, no defrag reads.
    let d = c.derive();
    assert_eq!((d.record_stored_bytes, d.record_stored_bytes_rmx), (1008, 3008));
    assert_eq!(d.records_per_large_block, 130);
    assert_eq!(d.internal_read_reqs_per_sec, 4600);
    assert_eq!(format!("{:.2}", d.large_block_writes_per_sec), "76.92");
    assert_eq!(d.large_block_reads_per_sec, 0.0);
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let e = ActConfig::parse(&one_x("num-queues: 4\n")).unwrap_err();
    assert_eq!(e, ConfigError::UnknownKey { key: "num-queues".into(), line: 5 });
    assert!(e.to_string().contains("'num-queues'"), "{e}");
    // The tool refuses it with exit status 2 and names it.
    let dir = tools_support::Scratch::new("act-unknown");
    let cfg = dir.path("bad.conf");
    std::fs::write(&cfg, one_x("scheduler-mode: noop\n")).unwrap();
    let r = tools_support::run_tool("act", &[cfg.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.dump());
    assert!(r.stderr.contains("'scheduler-mode'"), "{}", r.dump());
}

#[test]
fn bad_values_are_errors_naming_the_key() {
    for (line, key) in [
        ("read-reqs-per-sec: lots", "read-reqs-per-sec"),
        ("record-bytes: -5", "record-bytes"),
        ("record-bytes:", "record-bytes"),
        ("commit-to-device: maybe", "commit-to-device"),
        ("test-duration-sec: 99999999999", "test-duration-sec"),
    ] {
        let e = ActConfig::parse(&one_x(&format!("{line}\n"))).unwrap_err();
        assert!(matches!(&e, ConfigError::BadValue { key: k, .. } if k == key), "{line}: {e:?}");
        assert!(e.to_string().contains(key));
    }
    for (extra, key) in [
        ("large-block-op-kbytes: 100", "large-block-op-kbytes"),
        ("large-block-op-kbytes: 16384", "large-block-op-kbytes"),
        ("defrag-lwm-pct: 100", "defrag-lwm-pct"),
        ("update-pct: 101", "update-pct"),
        ("compress-pct: 101", "compress-pct"),
        ("replication-factor: 0", "replication-factor"),
        ("record-bytes: 0", "record-bytes"),
        ("record-bytes: 9000000", "record-bytes"),
        ("record-bytes-range-max: 1000", "record-bytes-range-max"),
        ("report-interval-sec: 0", "report-interval-sec"),
        ("test-duration-sec: 0", "test-duration-sec"),
        ("disable-odsync: yes\ncommit-to-device: yes", "disable-odsync"),
        ("record-bytes: 200000", "large-block-op-kbytes"),
    ] {
        let e = checked(&one_x(&format!("{extra}\n"))).unwrap_err();
        assert!(matches!(&e, ConfigError::Invalid { key: k, .. } if k == key), "{extra}: {e:?}");
    }
    let e = checked("test-duration-sec: 10\nread-reqs-per-sec: 10\n").unwrap_err();
    assert!(matches!(&e, ConfigError::Invalid { key, .. } if key == "device-names"), "{e:?}");
    let e = checked("device-names: /dev/x\ntest-duration-sec: 10\n").unwrap_err();
    assert!(e.to_string().contains("can't both be zero"), "{e}");
    let e = checked(&one_x("service-threads: 10000\n")).unwrap_err();
    assert!(matches!(&e, ConfigError::Invalid { key, .. } if key == "service-threads"), "{e:?}");
}

/// The derived rates equal ACT's (cfg_storage.c derive_configuration()) for the published
/// load definitions.
#[test]
fn derived_rates_match_act() {
    let rates = |extra: &str| {
        let c = checked(&one_x(extra)).unwrap();
        let d = c.derive();
        (
            d.records_per_large_block,
            d.internal_read_reqs_per_sec,
            d.internal_write_reqs_per_sec,
            format!("{:.2}", d.large_block_reads_per_sec),
            format!("{:.2}", d.large_block_writes_per_sec),
        )
    };
    // 1x: 131072 / 1536 = 85 records per block; 1000 / 85 x 2 = 23.53 (config/act_storage.conf).
    assert_eq!(rates(""), (85, 2000, 0, "23.53".into(), "23.53".into()));
    // README's 1500-byte example: stored 1504 → 87 per block → 22.99 (the README's 22.95 uses
    // the unrounded quotient; ACT's code truncates).
    assert_eq!(rates("record-bytes: 1500\n"), (87, 2000, 0, "22.99".into(), "22.99".into()));
    // commit-to-device: client writes become record writes; large-block writes are defrag's.
    assert_eq!(rates("commit-to-device: yes\n"), (85, 2000, 1000, "23.53".into(), "11.76".into()));
    // defrag-lwm-pct 60: amplification 2.5.
    assert_eq!(rates("defrag-lwm-pct: 60\n"), (85, 2000, 0, "29.41".into(), "29.41".into()));
    // update-pct adds reads; replication-factor multiplies the writes.
    assert_eq!(rates("update-pct: 50\nreplication-factor: 2\n"), (85, 2500, 0, "47.06".into(), "47.06".into()));
    // no-defrag-reads (storage-engine memory).
    assert_eq!(rates("no-defrag-reads: yes\n"), (85, 2000, 0, "0.00".into(), "23.53".into()));
    // 30x certification load for one device: 60000 r/s + 30000 w/s.
    let c =
        checked("device-names: /dev/x\ntest-duration-sec: 1\nread-reqs-per-sec: 60000\nwrite-reqs-per-sec: 30000\n")
            .unwrap();
    assert_eq!(format!("{:.2}", c.derive().large_block_reads_per_sec), "705.88");
    // And the echo prints them exactly as ACT does.
    let echo = checked(&one_x("")).unwrap().echo();
    assert!(echo.contains(
        "\nDERIVED CONFIGURATION\nrecord-stored-bytes: 1536 ... 1536\ninternal-read-reqs-per-sec: 2000\n\
         internal-write-reqs-per-sec: 0\nlarge-block-reads-per-sec: 23.53\nlarge-block-writes-per-sec: 23.53\n\n"
    ));
}
