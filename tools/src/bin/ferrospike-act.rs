//! `ferrospike-act`: see `ferrospike-act --help`.

fn main() {
    // Die quietly on a closed pipe (`ferrospike-act ... | head`) instead of panicking.
    // SAFETY: restoring the default SIGPIPE disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    std::process::exit(ferrospike_tools::act::main(args));
}
