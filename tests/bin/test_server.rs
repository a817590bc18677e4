//! The `ferrospike` command line, built as a binary of the root package so the end-to-end
//! tests can start it (`CARGO_BIN_EXE_*` is offered only for the tests' own package). It
//! runs exactly what the `ferrospike` binary runs.

// mimalloc: shards free what other threads allocated (requests handed between shards); glibc
// malloc serialises those frees on the allocating thread's arena lock.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ferrospike_server::cli::run(std::env::args_os())
}
