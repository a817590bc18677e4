//! `ferrospike`: the Aerospike-compatible server. See `ferrospike --help`.

// mimalloc: shards free what other threads allocated, and glibc malloc makes such a free wait
// on the allocating thread's arena lock (measured with benches/engine_vs_fio --driver threads:
// +15-20% puts; the server's own A/B showed no difference beyond noise).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ferrospike_server::cli::run(std::env::args_os())
}
