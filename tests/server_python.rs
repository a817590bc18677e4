//! Runs tests/python/test_client.py (the official Python client, `aerospike` 19.x) against
//! a `ferrospike` server. The interpreter is `$FERROSPIKE_PYTHON`, or the virtualenv
//! `target/pyenv` that .ci/run creates (`python3 -m venv target/pyenv &&
//! target/pyenv/bin/pip install aerospike`).

mod common;
mod server_support;

use std::path::PathBuf;
use std::process::Command;

use server_support::{Scratch, ServerProc};

/// The interpreter with the official client: `$FERROSPIKE_PYTHON`, else the virtualenv
/// `target/pyenv`, created here (from PyPI) when it is missing. Failing to get the client
/// fails the test: it never passes without running.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FERROSPIKE_PYTHON") {
        return PathBuf::from(p);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let venv = root.join("target/pyenv");
    let py = venv.join("bin/python");
    let has_client =
        |py: &PathBuf| Command::new(py).args(["-c", "import aerospike"]).status().map(|s| s.success()).unwrap_or(false);
    if !has_client(&py) {
        eprintln!("setting up {} with the aerospike client (pip)", venv.display());
        let ok = Command::new("python3").arg("-m").arg("venv").arg(&venv).status().map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "python3 -m venv {} failed (apt-get install python3-venv)", venv.display());
        let ok = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "aerospike>=19,<20"])
            .status()
            .map(|s| s.success());
        assert!(matches!(ok, Ok(true)), "pip install aerospike failed");
        assert!(has_client(&py), "{} still cannot import aerospike", py.display());
    }
    py
}

#[test]
fn python_client_end_to_end() {
    let py = python();
    let dir = Scratch::new("server-python");
    let mut srv = ServerProc::start(&dir, "");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/test_client.py");
    let out = Command::new(&py).arg(&script).env("FERROSPIKE_PORT", srv.port.to_string()).output().expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "python client test failed:\n{stdout}\n{stderr}\nserver log:\n{}", srv.log_text());
    assert!(srv.stop().success());
}
