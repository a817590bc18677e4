//! The `ferrospike` command line, built as a binary of the root package so the end-to-end
//! tests can start it (`CARGO_BIN_EXE_*` is offered only for the tests' own package). It
//! runs exactly what the `ferrospike` binary runs.

// mimalloc: shards free what other threads allocated, and glibc malloc makes such a free wait
// on the allocating thread's arena lock (measured with benches/engine_vs_fio --driver threads:
// +15-20% puts; the server's own A/B showed no difference beyond noise).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ferrospike_server::cli::run(std::env::args_os())
}
