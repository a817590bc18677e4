//! The tools' and the server's command lines in one binary of the root package, so the
//! end-to-end tests can start them (`CARGO_BIN_EXE_*` is offered only for the tests' own
//! package): `ferrospike-test-tool act|bench|inspect|server ARGS…` runs exactly what
//! `ferrospike-act`, `ferrospike-bench`, `ferrospike-inspect` and `ferrospike` run.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let tool = args.next().and_then(|t| t.into_string().ok()).unwrap_or_default();
    if tool == "server" {
        let mut argv = vec![std::ffi::OsString::from("ferrospike")];
        argv.extend(args);
        return ferrospike_server::cli::run(argv);
    }
    let rest: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
    let code = match tool.as_str() {
        "act" => ferrospike_tools::act::main(rest),
        "bench" => ferrospike_tools::bench::main(rest),
        "inspect" => ferrospike_tools::inspect::main(rest),
        other => {
            eprintln!("usage: ferrospike-test-tool act|bench|inspect|server ARGS… (got '{other}')");
            2
        }
    };
    ExitCode::from(code.clamp(0, 255) as u8)
}
