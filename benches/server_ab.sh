#!/usr/bin/env bash
# Two builds of the `ferrospike` server side by side, in one run: throughput, p99 and the
# server's CPU per request under the same client load, rounds alternating between the
# builds. Made for judging a change to the server on a noisy machine, where the ratio of two
# builds measured together means more than either number.
#
#   benches/server_ab.sh [--rounds 3] [--workload RU,100] [--seconds 8] [--keys 200000]
#                        [--connections 8] [--shards 2] [--device PATH] BINARY_A BINARY_B
#
# Each round starts each binary in turn on a fresh sparse 8 GiB file (1 MiB write blocks, in
# a temporary directory), or on the block device --device erased first with `BINARY
# --erase` (ITS CONTENTS ARE DESTROYED; e.g. the issue's reference setting, a loop device
# from `losetup -f --show --direct-io=on` over an 8 GiB image), on a free 127.0.0.1 port,
# inserts the keys with
# `ferrospike-bench -w I -z 4`, then runs the workload with `ferrospike-bench` and reads the
# server's user + system CPU time from /proc/PID/stat before and after it. Printed per run:
# ops/s, the read p99 (the write p99 for a write-only workload) and the server CPU per
# request in microseconds. It stops exactly the servers it started (by PID) and removes its
# temporary directory on exit. Build the client first: `cargo build --release -p
# ferrospike-tools` (it uses target/release/ferrospike-bench).

set -euo pipefail

rounds=3 workload=RU,100 seconds=8 keys=200000 conns=8 shards=2 device=
usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --workload) workload=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --keys) keys=$2; shift 2 ;;
    --connections) conns=$2; shift 2 ;;
    --shards) shards=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "server_ab.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) break ;;
  esac
done
if [[ $# -ne 2 ]]; then
  echo "server_ab.sh: give exactly two server binaries" >&2; usage >&2; exit 2
fi
bins=("$1" "$2")
if [[ -n $device && ! -b $device ]]; then
  echo "server_ab.sh: --device $device is not a block device" >&2; exit 2
fi
for b in "${bins[@]}"; do
  [[ -x "$b" ]] || { echo "server_ab.sh: $b is not an executable" >&2; exit 2; }
done
cd "$(dirname "$0")/.."
bench=target/release/ferrospike-bench
[[ -x $bench ]] || { echo "server_ab.sh: $bench missing; run cargo build --release -p ferrospike-tools" >&2; exit 2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/ferrospike-ab.XXXXXX")
pid=
cleanup() {
  if [[ -n $pid ]]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

tck=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

echo "date: $(date -u '+%F %T UTC'); $(nproc) CPUs; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "workload $workload, $conns connections, ${seconds}s, $keys keys of 1536 B, $shards shards, $rounds rounds"
echo "storage: ${device:-a fresh sparse 8 GiB file per run}"
echo "A = ${bins[0]}"
echo "B = ${bins[1]}"
for r in $(seq "$rounds"); do
  for i in 0 1; do
    label=$([[ $i == 0 ]] && echo A || echo B)
    port=$(free_port)
    rm -f "$tmp/dev.dat"
    if [[ -n $device ]]; then
      storage="devices = [\"$device\"]"
    else
      storage="files = [\"$tmp/dev.dat\"]
file-size = \"8G\""
    fi
    cat > "$tmp/srv.toml" <<EOF
[service]
address = "127.0.0.1"
port = $port
shards = $shards
[[namespaces]]
name = "test"
[namespaces.storage]
$storage
write-block-size = "1M"
EOF
    if [[ -n $device ]]; then
      "${bins[$i]}" --config "$tmp/srv.toml" --erase > "$tmp/erase.log" 2>&1 ||
        { echo "erasing $device failed:"; cat "$tmp/erase.log"; exit 1; }
    fi
    "${bins[$i]}" --config "$tmp/srv.toml" > "$tmp/server.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do grep -q "listening on" "$tmp/server.log" && break; sleep 0.1; done
    grep -q "listening on" "$tmp/server.log" || { echo "server $label did not start:"; cat "$tmp/server.log"; exit 1; }
    "$bench" -p "$port" -k "$keys" -o B1536 -w I -z 4 > /dev/null 2>&1
    c0=$(cpu_ticks "$pid")
    out=$("$bench" -p "$port" -k "$keys" -o B1536 -w "$workload" -z "$conns" -t "$seconds" 2>&1)
    c1=$(cpu_ticks "$pid")
    kill "$pid"; wait "$pid" || true; pid=
    echo "$out" | awk -v r="$r" -v l="$label" -v c=$((c1 - c0)) -v tck="$tck" '
      $1 == "read" || $1 == "write" { n += $2; t += $3; p99[$1] = $5 }
      END {
        p = ("read" in p99) ? p99["read"] : p99["write"]
        if (n == 0) { print "round " r " " l ": no operations"; exit 1 }
        printf "round %d %s  ops/s %8.0f  p99 %s ms  server CPU %.2f us/op\n", r, l, t, p, c * 1e6 / tck / n
      }'
  done
done
