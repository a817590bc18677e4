#!/usr/bin/env bash
# Every check a submission must pass: formatting, lints, and all tests (the engine, the
# server through the official Rust and Python clients, hostile input, crash recovery, the
# tools). Tests that need root (loop devices) say what they used instead when not root.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# One closing line for the whole run (cargo prints one per test binary, the last of which
# is usually an empty doc-test run).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "summary: %d passed, %d failed\n", p, f; if (p == 0) exit 1 }' "$log"
