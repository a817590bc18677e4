//! ferrospike-bench against a `ferrospike` server: a linear insert, then RU,50 for 3
//! seconds with no errors, the JSON summary written, then RU,50 in an open loop at a set
//! rate; the server is killed by PID at the end.

mod common;
mod tools_support;

use tools_support::{run_tool, Scratch, Server};

#[test]
fn insert_then_read_update() {
    let dir = Scratch::new("bench");
    let server = Server::start(&dir);
    let port = server.port.to_string();
    let common = ["-h", "127.0.0.1", "-p", &port, "-n", "test", "-s", "bench", "-k", "5000", "-z", "4"];

    let mut args = common.to_vec();
    args.extend(["-w", "I", "-o", "I,S32"]);
    let r = run_tool("bench", &args);
    assert_eq!(r.code, 0, "{}\n--- server log\n{}", r.dump(), server.log_text());
    assert!(r.stdout.contains("errors: none\n"), "{}", r.dump());
    let write_line = r.stdout.lines().find(|l| l.starts_with("write ")).unwrap_or_else(|| panic!("{}", r.dump()));
    assert_eq!(write_line.split_whitespace().nth(1), Some("5000"), "{write_line}");

    let json = dir.path("ru.json");
    let mut args = common.to_vec();
    args.extend(["-w", "RU,50", "-t", "3", "-o", "I,S32", "--json", json.to_str().unwrap()]);
    let r = run_tool("bench", &args);
    assert_eq!(r.code, 0, "{}\n--- server log\n{}", r.dump(), server.log_text());
    let seconds = r.stdout.lines().filter(|l| l.starts_with('[') && l.contains("s]")).count();
    assert!(seconds >= 3, "a line per second\n{}", r.dump());
    assert!(r.stdout.contains("errors: none\n"), "{}", r.dump());
    let j = std::fs::read_to_string(&json).expect("JSON written");
    assert!(j.starts_with('{') && j.trim_end().ends_with('}'), "{j}");
    assert!(
        j.contains("\"workload\":\"RU,50\"") && j.contains("\"errors\":{}") && j.contains("\"net_errors\":0"),
        "{j}"
    );
    assert!(
        j.contains("\"read\":{\"count\":") && j.contains("\"write\":{\"count\":") && j.contains("\"p999_us\""),
        "{j}"
    );

    // Open loop: the offered rate, whatever the server could do.
    let mut args = common.to_vec();
    args.extend(["-w", "RU,50", "-t", "2", "-o", "I,S32", "--throughput", "1000"]);
    let r = run_tool("bench", &args);
    assert_eq!(r.code, 0, "{}", r.dump());
    let done = count(&r.stdout, "read") + count(&r.stdout, "write");
    assert!((1800..=2200).contains(&done), "{done} requests in 2 s at 1000/s\n{}", r.dump());
    drop(server);
}

/// The request count of the summary line of `kind` (read, write, delete) in `out`.
fn count(out: &str, kind: &str) -> u64 {
    let line = out.lines().find(|l| l.starts_with(&format!("{kind} "))).unwrap_or_else(|| panic!("{out}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `--async`: two event loops drive five connections through a linear insert, RU,50 closed
/// and open loop (`--throughput`) and a linear delete; then every read misses, which the
/// summary counts as KEY_NOT_FOUND errors.
#[test]
fn event_loops_insert_read_update_delete() {
    let dir = Scratch::new("bench-async");
    let server = Server::start(&dir);
    let port = server.port.to_string();
    let common = ["-p", &port, "-s", "evl", "-k", "3000", "-z", "5", "-a", "-W", "2", "-o", "B200"];
    let run = |extra: &[&str]| {
        let mut args = common.to_vec();
        args.extend(extra);
        run_tool("bench", &args)
    };
    let r = run(&["-w", "I"]);
    assert_eq!(r.code, 0, "{}\n--- server log\n{}", r.dump(), server.log_text());
    assert!(r.stdout.contains("on 2 event loop(s)"), "{}", r.dump());
    assert_eq!(count(&r.stdout, "write"), 3000, "{}", r.dump());

    let r = run(&["-w", "RU,50", "-t", "2"]);
    assert_eq!(r.code, 0, "{}", r.dump());
    assert!(r.stdout.contains("errors: none\n"), "{}", r.dump());
    assert!(count(&r.stdout, "read") > 0 && count(&r.stdout, "write") > 0, "{}", r.dump());

    // Open loop: the offered rate, not as fast as the server answers (thousands a second
    // here), spread over the five connections.
    let r = run(&["-w", "RU,50", "-t", "2", "--throughput", "1500"]);
    assert_eq!(r.code, 0, "{}", r.dump());
    assert!(r.stdout.contains("throughput 1500 ops/s (open loop)"), "{}", r.dump());
    let done = count(&r.stdout, "read") + count(&r.stdout, "write");
    assert!((2700..=3300).contains(&done), "{done} requests in 2 s at 1500/s\n{}", r.dump());

    let r = run(&["-w", "DB"]);
    assert_eq!(r.code, 0, "{}", r.dump());
    assert_eq!(count(&r.stdout, "delete"), 3000, "{}", r.dump());

    let r = run(&["-w", "RU,100", "-t", "1"]);
    assert_eq!(r.code, 1, "reads of deleted keys fail\n{}", r.dump());
    let reads = count(&r.stdout, "read");
    assert!(reads > 0, "{}", r.dump());
    assert!(r.stdout.contains("KEY_NOT_FOUND"), "{}", r.dump());

    // Flags it cannot honour are refused.
    let r = run(&["-w", "RU,50", "--batch-size", "4"]);
    assert_eq!(r.code, 2, "{}", r.dump());
    drop(server);
}
