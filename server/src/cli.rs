//! The `ferrospike` command line: arguments, logging, signals, start and stop.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use std::sync::atomic::{AtomicI32, Ordering::SeqCst};

use crate::config::{Config, DEFAULT_CONFIG, REFERENCE};
use crate::net::Server;

/// Ferrospike: an Aerospike-compatible key-value server on raw devices.
#[derive(Parser, Debug)]
#[command(name = "ferrospike", version, after_long_help = REFERENCE, after_help = "Run with --help for every configuration option.")]
struct Args {
    /// TOML configuration file (default: the embedded configuration, namespace "test" on a
    /// sparse 4 GiB file data/test.dat, 127.0.0.1:3000).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,

    /// DESTROY all data on every configured device and file (their Ferrospike format), then
    /// exit. Use it to reuse a device formatted for another namespace or write-block-size.
    #[arg(long)]
    erase: bool,
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).try_init();
}

/// Write end of the pipe the signal handler reports signals on (-1 before set-up).
static SIGNAL_PIPE_WR: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_signal(sig: libc::c_int) {
    let fd = SIGNAL_PIPE_WR.load(SeqCst);
    if fd >= 0 {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; `b` is a valid one-byte buffer and `fd` the
        // pipe's write end, which stays open for the life of the process.
        unsafe {
            libc::write(fd, &b as *const u8 as *const libc::c_void, 1);
        }
    }
}

/// Route SIGTERM and SIGINT to a pipe; returns its read end. A handler (rather than a
/// blocked mask and sigwait) works whichever thread the kernel picks to deliver to.
fn install_signal_pipe() -> std::io::Result<std::fs::File> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    SIGNAL_PIPE_WR.store(fds[1], SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: sigaction is plain data, zero-initialised and then filled in; the handler
        // only performs an async-signal-safe write.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(sig, &sa, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    // SAFETY: fds[0] is a fresh descriptor owned by nothing else.
    Ok(unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) })
}

/// Run the command line with these arguments (the first is the program name).
pub fn run<I, T>(argv: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args = match Args::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    init_logs();
    let cfg = match &args.config {
        Some(p) => Config::load(p),
        None => {
            tracing::info!("no --config given: using the embedded default configuration");
            Config::parse(DEFAULT_CONFIG)
        }
    };
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferrospike: bad configuration: {e}");
            return ExitCode::from(2);
        }
    };
    if args.erase {
        return erase(&cfg);
    }
    let mut signals = match install_signal_pipe() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ferrospike: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let server = match Server::start(cfg) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ferrospike: cannot start: {e}");
            return ExitCode::from(1);
        }
    };
    let stop = server.stop_handle();
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        use std::io::Read;
        let mut b = [0u8; 1];
        while let Err(e) = signals.read_exact(&mut b) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return;
            }
        }
        tracing::info!("signal {} received", b[0]);
        stop.stop();
    });
    if let Err(e) = spawned {
        eprintln!("ferrospike: cannot start the signal thread: {e}");
        return ExitCode::from(1);
    }
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferrospike: {e}");
            ExitCode::from(1)
        }
    }
}

fn erase(cfg: &Config) -> ExitCode {
    for ns in &cfg.namespaces {
        for d in &ns.devices {
            eprintln!(
                "ferrospike: WARNING: erasing {} (namespace {}): all its data is destroyed",
                d.path.display(),
                ns.engine.namespace
            );
        }
        let devices = match ferrospike_engine::io::open_devices(&ns.devices, ns.engine.ring_entries) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("ferrospike: {e}");
                return ExitCode::from(1);
            }
        };
        if let Err(e) = ferrospike_engine::erase_devices(&devices) {
            eprintln!("ferrospike: erase failed: {e}");
            return ExitCode::from(1);
        }
    }
    eprintln!("ferrospike: erased");
    ExitCode::SUCCESS
}
