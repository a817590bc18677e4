//! Helpers of the server end-to-end tests: a `ferrospike` server process on a file device
//! and a free loopback port, killed when the guard drops.
//!
//! The server process is `ferrospike-test-server` (tests/bin/test_server.rs), which runs the
//! real `ferrospike` command line (`ferrospike_server::cli::run`).
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Scratch directories are the end-to-end tests' common ones.
pub use crate::common::TestDir as Scratch;

/// A running `ferrospike` server process.
pub struct ServerProc {
    pub child: Option<Child>,
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
    /// Starts so far: the log holds one `listening on` line per start.
    starts: usize,
}

impl ServerProc {
    /// Write a config (file device of 256M, 1M write blocks, 2 shards, `extra_service`
    /// appended to [service]) into `dir` and start a server on it. The server picks a free
    /// port itself; restarts use the same one.
    pub fn start(dir: &Scratch, extra_service: &str) -> ServerProc {
        let port = 0;
        let config = dir.0.join("ferrospike.toml");
        let text = format!(
            "[service]\naddress = \"127.0.0.1\"\nport = {port}\nshards = 2\n{extra_service}\n\n\
             [[namespaces]]\nname = \"test\"\nnsup-period = 1\n\n[namespaces.storage]\nfiles = [\"{}\"]\n\
             file-size = \"256M\"\nwrite-block-size = \"1M\"\nflush-max-ms = 100\n",
            dir.0.join("test.dat").display()
        );
        std::fs::write(&config, text).expect("write config");
        let mut s = ServerProc { child: None, port, config, log: dir.0.join("server.log"), starts: 0 };
        s.restart();
        let text = std::fs::read_to_string(&s.config).expect("read config");
        std::fs::write(&s.config, text.replacen("port = 0\n", &format!("port = {}\n", s.port), 1))
            .expect("rewrite config");
        s
    }

    /// Start (again) on the same config and port; wait until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "server already running");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_ferrospike-test-server"))
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .expect("spawn ferrospike");
        let child = self.child.insert(child);
        self.starts += 1;
        let port = crate::common::wait_listening(child, &self.log, self.starts);
        assert!(self.port == 0 || self.port == port, "restarted on port {port}, not {}", self.port);
        self.port = port;
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait (at most 30 s, then SIGKILL); returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.stop_with(libc::SIGTERM)
    }

    /// Send `signal` (SIGTERM or SIGINT) and wait (at most 30 s, then SIGKILL); returns the
    /// exit status.
    pub fn stop_with(&mut self, signal: i32) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ferrospike did not stop within 30 s of signal {signal}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Resident memory of the server in KiB, from /proc/PID/status.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Send one info request on a fresh connection and return the response body.
    pub fn info(&self, cmds: &str) -> String {
        crate::common::info_round_trip(self.port, cmds).expect("info request")
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
