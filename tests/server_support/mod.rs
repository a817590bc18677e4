//! Helpers of the server end-to-end tests: a `ferrospike` server process on a file device
//! and a free loopback port, killed when the guard drops.
//!
//! The server process is `ferrospike-test-server` (tests/bin/test_server.rs), which runs the
//! real `ferrospike` command line (`ferrospike_server::cli::run`).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Scratch directories are the end-to-end tests' common ones.
pub use crate::common::TestDir as Scratch;

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// A running `ferrospike` server process.
pub struct ServerProc {
    pub child: Option<Child>,
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl ServerProc {
    /// Write a config (file device of 256M, 1M write blocks, 2 shards, `extra_service`
    /// appended to [service]) into `dir` and start a server on it.
    pub fn start(dir: &Scratch, extra_service: &str) -> ServerProc {
        let port = free_port();
        let config = dir.0.join("ferrospike.toml");
        let text = format!(
            "[service]\naddress = \"127.0.0.1\"\nport = {port}\nshards = 2\n{extra_service}\n\n\
             [[namespaces]]\nname = \"test\"\nnsup-period = 1\n\n[namespaces.storage]\nfiles = [\"{}\"]\n\
             file-size = \"256M\"\nwrite-block-size = \"1M\"\nflush-max-ms = 100\n",
            dir.0.join("test.dat").display()
        );
        std::fs::write(&config, text).expect("write config");
        let mut s = ServerProc { child: None, port, config, log: dir.0.join("server.log") };
        s.restart();
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
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(st) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("ferrospike exited during start-up ({st}):\n{}", self.log_text());
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("ferrospike did not start listening within 60 s:\n{}", self.log_text());
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait (at most 30 s, then SIGKILL); returns the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = child.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("ferrospike did not stop within 30 s of SIGTERM:\n{}", self.log_text());
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
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut frame = vec![2u8, 1, 0, 0, 0, 0, 0, 0];
        frame[2..8].copy_from_slice(&(cmds.len() as u64).to_be_bytes()[2..]);
        frame.extend_from_slice(cmds.as_bytes());
        s.write_all(&frame).expect("send info");
        let mut h = [0u8; 8];
        s.read_exact(&mut h).expect("info header");
        let n = (u64::from_be_bytes(h) & ((1 << 48) - 1)) as usize;
        let mut body = vec![0; n];
        s.read_exact(&mut body).expect("info body");
        String::from_utf8(body).expect("utf8 info")
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
