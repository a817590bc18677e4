#!/usr/bin/env bash
# Every check a submission must pass: formatting, lints, and all tests (the engine, the
# server through the official Rust and Python clients, hostile input, crash recovery).
# Tests that need root (loop devices) say what they used instead when not run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
