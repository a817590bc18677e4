//! Helpers of the tools tests: run a tool (`ferrospike-act`, `-bench`, `-inspect`) as a
//! process, scratch directories, loop devices, a `ferrospike` server process, and a parser of
//! ACT's output.
//!
//! A tool (or the server) runs as `ferrospike-test-tool TOOL ARGS…` (tests/bin/test_tool.rs),
//! which calls the tool's `main`, the same function its own binary calls.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

fn tool_command(tool: &str, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferrospike-test-tool"));
    c.arg(tool).args(args).stdin(Stdio::null());
    c
}

/// The result of a tool run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn dump(&self) -> String {
        format!("exit {}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// Run a tool to completion.
pub fn run_tool(tool: &str, args: &[&str]) -> Run {
    let out: Output = tool_command(tool, args).output().expect("run tool");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Scratch directories are the end-to-end tests' common ones.
pub use crate::common::TestDir as Scratch;

/// A loop device over a sparse file (direct I/O on), detached on drop.
pub struct LoopDevice {
    pub dev: String,
}

impl LoopDevice {
    /// One when running as root with losetup; `Err` says why not.
    pub fn create(backing: &Path, size: u64) -> Result<LoopDevice, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not running as root".into());
        }
        let f = std::fs::File::create(backing).map_err(|e| e.to_string())?;
        f.set_len(size).map_err(|e| e.to_string())?;
        drop(f);
        let out = Command::new("losetup")
            .args(["-f", "--show", "--direct-io=on"])
            .arg(backing)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!("losetup failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
        }
        Ok(LoopDevice { dev: String::from_utf8_lossy(&out.stdout).trim().to_string() })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A `ferrospike` server process on a free loopback port and a file device, killed by PID
/// when dropped.
pub struct Server {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Server {
    pub fn start(dir: &Scratch) -> Server {
        let config = dir.path("ferrospike.toml");
        std::fs::write(
            &config,
            format!(
                "[service]\naddress = \"127.0.0.1\"\nport = 0\nshards = 2\n\n[[namespaces]]\nname = \"test\"\n\n\
                 [namespaces.storage]\nfiles = [\"{}\"]\nfile-size = \"256M\"\nwrite-block-size = \"1M\"\n\
                 flush-max-ms = 100\n",
                dir.path("server.dat").display()
            ),
        )
        .expect("write config");
        let log = dir.path("server.log");
        let logf = std::fs::File::create(&log).expect("log");
        let cfg = config.to_str().expect("utf8 path").to_string();
        let mut child = tool_command("server", &["--config", &cfg])
            .env("RUST_LOG", "info")
            .stdout(logf.try_clone().expect("log fd"))
            .stderr(logf)
            .spawn()
            .expect("spawn server");
        let port = crate::common::wait_listening(&mut child, &log, 1);
        Server { child, port, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// One interval report of ACT's output: histogram name → (total, bucket counts).
pub type Report = Vec<(String, u64, Vec<(usize, u64)>)>;

/// Parse ACT's interval reports, checking the layout strictly: `after N sec:`, then for each
/// histogram `<name> (<total> total)` followed by lines of one to four ` (BB: CCCCCCCCCC)`
/// groups whose counts add up to the total, then a blank line.
pub fn parse_act_reports(out: &str) -> Result<Vec<(u64, Report)>, String> {
    let lines: Vec<&str> = out.lines().collect();
    let mut reports = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(sec) = lines[i].strip_prefix("after ").and_then(|r| r.strip_suffix(" sec:")) else {
            i += 1;
            continue;
        };
        let sec: u64 = sec.parse().map_err(|_| format!("bad line {:?}", lines[i]))?;
        i += 1;
        let mut report: Report = Vec::new();
        while i < lines.len() && !lines[i].is_empty() {
            let l = lines[i];
            let (name, total) = l
                .strip_suffix(" total)")
                .and_then(|r| r.rsplit_once(" ("))
                .ok_or(format!("expected '<name> (<n> total)', got {l:?}"))?;
            let total: u64 = total.parse().map_err(|_| format!("bad total in {l:?}"))?;
            i += 1;
            let mut buckets = Vec::new();
            while i < lines.len() && lines[i].starts_with(" (") {
                let groups: Vec<&str> = lines[i].split(" (").skip(1).collect();
                if groups.is_empty() || groups.len() > 4 {
                    return Err(format!("bad bucket line {:?}", lines[i]));
                }
                for g in groups {
                    let g = g.strip_suffix(')').ok_or(format!("bad group in {:?}", lines[i]))?;
                    let (b, c) = g.split_once(": ").ok_or(format!("bad group {g:?}"))?;
                    if b.len() != 2 || c.len() != 10 {
                        return Err(format!("bad widths in group {g:?}"));
                    }
                    buckets.push((b.parse().map_err(|_| "bucket")?, c.parse().map_err(|_| "count")?));
                }
                i += 1;
            }
            let sum: u64 = buckets.iter().map(|b| b.1).sum();
            if sum != total {
                return Err(format!("{name}: buckets add up to {sum}, total says {total}"));
            }
            report.push((name.to_string(), total, buckets));
        }
        reports.push((sec, report));
    }
    Ok(reports)
}
