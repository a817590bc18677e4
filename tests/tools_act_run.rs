//! 5-second ferrospike-act runs, raw and --engine, produce well-formed ACT interval reports
//! and a summary. On a loop device when running as root (created with direct I/O on a
//! sparse file and always detached), else on a regular file.

mod common;
mod tools_support;

use tools_support::{parse_act_reports, run_tool, LoopDevice, Scratch};

const DEVICE_BYTES: u64 = 64 << 20;
const SECS: u64 = 5;

/// The device line of the config, and the loop device guard when one is used.
fn device(dir: &Scratch) -> (String, Option<LoopDevice>) {
    match LoopDevice::create(&dir.path("loop.img"), DEVICE_BYTES) {
        Ok(l) => {
            eprintln!("using loop device {}", l.dev);
            (format!("device-names: {}\n", l.dev), Some(l))
        }
        Err(why) => {
            eprintln!("no loop device ({why}); using a regular file instead");
            (
                format!("device-names: {}\nfile-size-mbytes: {}\n", dir.path("act.dat").display(), DEVICE_BYTES >> 20),
                None,
            )
        }
    }
}

fn run_act(name: &str, engine: bool) {
    let dir = Scratch::new(name);
    let (dev_line, _loop_guard) = device(&dir);
    let cfg = dir.path("act.conf");
    std::fs::write(
        &cfg,
        format!(
            "{dev_line}service-threads: 2\ntest-duration-sec: {SECS}\nread-reqs-per-sec: 1000\n\
             write-reqs-per-sec: 500\nmax-lag-sec: 4\n"
        ),
    )
    .unwrap();
    let mut args = vec![cfg.to_str().unwrap()];
    if engine {
        args.push("--engine");
    }
    let r = run_tool("act", &args);
    assert_eq!(r.code, 0, "{}", r.dump());
    let out = &r.stdout;
    for needle in [
        "ACT version 6.6\n",
        "\nACT-STORAGE CONFIGURATION\n",
        "\nDERIVED CONFIGURATION\n",
        "large-block-reads-per-sec: 11.76\n",
        " size = 67108864 bytes, 512 large blocks, minimum IO size = ",
        "\nHISTOGRAM NAMES\n",
        "\nSUMMARY (",
    ] {
        assert!(out.contains(needle), "missing {needle:?}\n{}", r.dump());
    }
    assert!(r.stderr.contains("destroys the contents"), "{}", r.dump());
    let names: Vec<&str> =
        out.split("\nHISTOGRAM NAMES\n").nth(1).unwrap().lines().take_while(|l| !l.is_empty()).collect();
    let expected: Vec<String> = if engine {
        vec!["reads".into(), "writes".into()]
    } else {
        let dev = dev_line.split_whitespace().nth(1).unwrap();
        vec!["reads".into(), format!("{dev}-reads"), "large-block-reads".into(), "large-block-writes".into()]
    };
    assert_eq!(names, expected, "{}", r.dump());
    let reports = parse_act_reports(out).unwrap_or_else(|e| panic!("{e}\n{}", r.dump()));
    let secs: Vec<u64> = reports.iter().map(|r| r.0).collect();
    assert_eq!(secs, (1..=SECS).collect::<Vec<_>>(), "{}", r.dump());
    let mut last = vec![0u64; names.len()];
    for (_, rep) in &reports {
        let got: Vec<&str> = rep.iter().map(|h| h.0.as_str()).collect();
        assert_eq!(got, names, "every report has every histogram, in order");
        for (i, (_, total, _)) in rep.iter().enumerate() {
            assert!(*total >= last[i], "counts are cumulative");
            last[i] = *total;
        }
    }
    // Open loop at 1000 reads/s for 5 s: the schedule, not the device, sets the count.
    let reads = last[0];
    assert!((4000..=5200).contains(&reads), "reads {reads}\n{}", r.dump());
    let summary = out.split("\nSUMMARY (").nth(1).unwrap();
    for n in &names {
        assert!(summary.lines().any(|l| l.starts_with(&format!("{n} "))), "summary lacks {n}\n{summary}");
    }
    assert!(summary.contains("p99.9"), "{summary}");
    if engine {
        assert!(out.contains("\nENGINE (during the timed test)\n"), "{}", r.dump());
        assert!(out.contains("no errors"), "{}", r.dump());
    }
}

#[test]
fn raw_mode_reports_like_act() {
    run_act("act-raw", false);
}

#[test]
fn engine_mode_reports_like_act() {
    run_act("act-engine", true);
}

/// A device holding Ferrospike data is refused without --force.
#[test]
fn refuses_ferrospike_devices_without_force() {
    let dir = Scratch::new("act-refuse");
    let dev = dir.path("dev.dat");
    let h = ferrospike_engine::format::DeviceHeader {
        write_seq: 1,
        device_id: 7,
        namespace: "prod".into(),
        wblock_bytes: 1 << 20,
        device_index: 0,
        n_devices: 1,
        flags: 0,
        device_bytes: 16 << 20,
        format_time_ms: 0,
        namespace_signature: 1,
        truncates: Vec::new(),
    };
    let mut img = vec![0u8; 16 << 20];
    img[..4096].copy_from_slice(&h.encode());
    std::fs::write(&dev, &img).unwrap();
    let cfg = dir.path("act.conf");
    std::fs::write(&cfg, format!("device-names: {}\ntest-duration-sec: 1\nread-reqs-per-sec: 100\n", dev.display()))
        .unwrap();
    let r = run_tool("act", &[cfg.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.dump());
    assert!(
        r.stderr.contains("holds Ferrospike data (namespace 'prod'") && r.stderr.contains("--force"),
        "{}",
        r.dump()
    );
    let r = run_tool("act", &[cfg.to_str().unwrap(), "--force"]);
    assert_eq!(r.code, 0, "{}", r.dump());
    assert!(r.stdout.contains("after 1 sec:"), "{}", r.dump());
}
