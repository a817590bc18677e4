//! `ferrospike`: the Aerospike-compatible server. See `ferrospike --help`.

// mimalloc: shards free what other threads allocated (requests handed between shards); glibc
// malloc serialises those frees on the allocating thread's arena lock.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    ferrospike_server::cli::run(std::env::args_os())
}
