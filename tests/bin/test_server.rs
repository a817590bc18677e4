//! The `ferrospike` command line, built as a binary of the root package so the end-to-end
//! tests can start it (`CARGO_BIN_EXE_*` is offered only for the tests' own package). It
//! runs exactly what the `ferrospike` binary runs.

// The `ferrospike` binary's allocator (why: server/src/main.rs). A library must not choose
// the global allocator for its users, so each binary names it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ferrospike_server::cli::run(std::env::args_os())
}
