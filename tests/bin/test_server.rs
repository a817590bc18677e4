//! The `ferrospike` command line, built as a binary of the root package so the end-to-end
//! tests can start it (`CARGO_BIN_EXE_*` is offered only for the tests' own package). It
//! runs exactly what the `ferrospike` binary runs.

fn main() -> std::process::ExitCode {
    ferrospike_server::cli::run(std::env::args_os())
}
