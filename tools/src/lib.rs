//! Ferrospike tools: `ferrospike-act` (ACT-style device certification), `ferrospike-bench`
//! (an asbench-style load generator over the Aerospike wire protocol) and
//! `ferrospike-inspect` (offline device inspection). Each binary is a thin wrapper around the
//! `main` of its module here (the tests run them through `ferrospike-test-tool`).
#![deny(unsafe_code)]

pub mod act;
pub mod bench;
pub mod hist;
pub mod inspect;
pub mod rng;
pub mod wire;

/// The outcome of a tool's argument parsing: the options, or the exit status after
/// printing the usage text (asked for: 0) or the error (2). `parse_args` returns
/// `Err(usage)` for `--help`.
pub(crate) fn options_or_exit<T>(parsed: Result<T, String>, usage: &str, tool: &str) -> Result<T, i32> {
    match parsed {
        Ok(o) => Ok(o),
        Err(msg) if msg == usage => {
            print!("{usage}");
            Err(0)
        }
        Err(msg) => {
            eprintln!("{tool}: {msg}");
            Err(2)
        }
    }
}
