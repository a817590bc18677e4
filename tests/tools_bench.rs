//! ferrospike-bench against a `ferrospike` server: a linear insert, then RU,50 for 3
//! seconds with no errors, the JSON summary written; the server is killed by PID at the end.

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
    drop(server);
}
