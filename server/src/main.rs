//! `ferrospike`: the Aerospike-compatible server. See `ferrospike --help`.

fn main() -> std::process::ExitCode {
    ferrospike_server::cli::run(std::env::args_os())
}
