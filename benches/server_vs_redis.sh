#!/usr/bin/env bash
# Ferrospike next to Redis 7 over loopback, in the same run (issue 3's benchmark):
# throughput and HDR latency of 1536-byte records at 50/50 read/update and 100% read,
# with 16..64 client connections. Goal: more operations per second than Redis at an equal
# or lower p99. Run `benches/server_vs_redis.sh --help` for the options.
#
# What it does, and the choices behind it:
#
# * Servers. It starts its own `ferrospike` (by default one shard and a 4 GiB post-write
#   cache, see "Configuration" below; namespace "test" on a sparse 8 GiB file
#   with 1 MiB write blocks in a temporary directory, or on --device) and its own
#   `redis-server` (appendonly yes, appendfsync everysec, no RDB snapshots) on free 127.0.0.1
#   ports, each in the background with its PID recorded. It never touches a system Redis
#   service or any process it did not start; on exit, error or Ctrl-C it stops exactly its
#   own PIDs and removes its temporary directory. Durability is comparable: Ferrospike's
#   default (commit-to-device = false, flush-max-ms = 1000) acknowledges a write before it is
#   on the device and writes it within about a second, like appendfsync everysec. Both
#   servers' data live on the same filesystem unless --device is given.
#
# * Configuration. The goal is judged like for like. redis-server answers on one thread and
#   holds every record in memory; the load generator runs on the same 2-CPU machine. So
#   Ferrospike gets one shard (one serving thread, the other CPU left to the load generator,
#   as Redis leaves it) and a post-write cache that holds every record (4G; 200k records of
#   1536 bytes fill about 320 MiB of write blocks). --server-defaults runs the server on its
#   own defaults instead (shards = online CPUs, post-write-cache 256M, Aerospike's default):
#   there two shards share the two CPUs with the busy load generator, and part of the reads
#   go to the device, so that run shows what the defaults cost on one shared machine; it is
#   not the goal's measure. --shards and --post-write-cache set either one in both cases.
#
# * Population. Ferrospike gets every key 0..K-1 from `ferrospike-bench -w I -z 16`. Redis
#   gets every key redis-benchmark will ask for, key:000000000000 .. key:<K-1, 12 digits>
#   (redis-benchmark's `-r K` replaces __rand_int__ with a zero-padded random number below K),
#   through `redis-cli --pipe`, each with a 1536-byte value of 'x' as `-d 1536` sends. That
#   is exact and quick; `redis-benchmark -t set -r K -n 3K` would leave ~5% of the keys
#   missing, and a GET of a missing key is cheaper than one returning 1536 bytes. The AOF is
#   then rewritten (BGREWRITEAOF, waited for), so both stores start the runs with their data
#   persisted. Redis's default auto-aof-rewrite stays on and may fork a rewrite during the
#   update runs, as it would in production with this configuration.
#
# * Load. One request in flight per connection on both sides (ferrospike-bench and
#   redis-benchmark without -P), closed loop, keys uniformly random over the K keys.
#   - Ferrospike: `ferrospike-bench -a -w RU,50|RU,100 -z C -t S -o B1536 -k K --json F`:
#     with -a one event loop drives the C connections, as redis-benchmark does; `--client
#     threads` runs a thread per connection instead (asbench's default, and the official
#     clients' synchronous calls), which costs more CPU on the shared cores.
#   - Redis, 100% read: `redis-benchmark -t get -d 1536 -r K -c C -n N --csv`. redis-benchmark
#     has no duration flag, so N is the rate last measured for the same workload and
#     connection count times S. A ~2 s calibration before the first run gives the first rate
#     (it doubles as a warm-up; Ferrospike gets the same 2 s warm-up). When a process still
#     ends before 80% of S (the machine got faster), the measurement is repeated, sized from
#     the new rate, up to 3 attempts, and the last one counts; the per-run lines show each
#     process's run time.
#   - Redis, 50/50: redis-benchmark runs one command per test, so two run in parallel:
#     `-t set` with C/2 connections and `-t get` with the other C/2, each sized as above to
#     last about S seconds. ops/s is the sum of the two processes' rates and p99 is the larger
#     of their two p99s. This approximation can only favour Redis: should one process end
#     first, the other runs alone for the tail, faster. The read:update mix follows the two
#     commands' speeds rather than an exact 50/50 coin per request; the per-run lines show it.
#     For Ferrospike's 50/50 the p99 is likewise the larger of its read and write p99s
#     (ferrospike-bench reports HDR percentiles per op kind, not merged).
#   - Redis GETs are checked to have hit (keyspace_misses 0, printed at the end);
#     ferrospike-bench counts a read of a missing key as an error, also printed.
#   - redis-benchmark runs single-threaded (its default), like ferrospike-bench -a; so does
#     redis-server's command loop.
# * The same client for both (--same-client). redis-benchmark is the reference, but it is not
#   timed like ferrospike-bench: it writes a connection's next request only in the event
#   loop's next pass, after re-arming the socket for writing (epoll_ctl), and its clock
#   starts at that write; with 16..64 connections and the client near a full CPU, a good
#   part of each request's round trip is spent in that gap and never counted. With
#   --same-client each cell also drives Redis with `ferrospike-bench -a --resp` (GET and SET
#   of the same keys and 1536-byte values): one event loop, the next request written as soon
#   as the answer is read, the clock from that write to the answer, exactly as for
#   Ferrospike. Its 50/50 is one process tossing a coin per request, as Ferrospike's is.
# * Fairness. The order of the systems rotates from cell to cell and from run to run (with
#   --same-client, the three measurements of a cell in turn).
#   The machine is shared and noisy: compare the ratios measured in one run, and look at the
#   load averages printed at the start and the end.
#
# Output: the environment and versions, a line per measurement, then a Markdown table per
# workload and connection count (ops/s min/median/max, median p99, the median of the per-run
# ferrospike/Redis ratios, goal met or not) ready to paste into the README.

set -euo pipefail

usage() {
    cat <<'EOF'
benches/server_vs_redis.sh: Ferrospike next to Redis 7 over loopback (issue 3).

USAGE:
    benches/server_vs_redis.sh [--runs N] [--seconds S] [--keys K] [--conns "16 64"]
                               [--bin-dir DIR] [--device PATH] [--client async|threads]
                               [--shards N] [--post-write-cache SIZE] [--server-defaults]
                               [--same-client]

OPTIONS:
    --runs N        measured runs of every workload and connection count (default 3)
    --seconds S     length of each measurement, per system (default 15)
    --keys K        records in each store, 1536-byte values (default 200000)
    --conns "C..."  client connection counts, space-separated, each at least 2 (default "16 64")
    --bin-dir DIR   where the ferrospike and ferrospike-bench binaries are (default
                    target/release of this repository). When they are missing and DIR ends in
                    "release" it runs `cargo build --release -p ferrospike-server
                    -p ferrospike-tools` with CARGO_TARGET_DIR set to DIR's parent.
    --device PATH   serve Ferrospike's namespace from this block device (e.g. a loop device
                    you made with `losetup -f --show --direct-io=on IMAGE`; the script never
                    runs losetup) instead of a sparse 8 GiB file in the temporary directory.
                    ITS CONTENTS ARE DESTROYED. Ferrospike refuses a device holding data that
                    is not Ferrospike's; one formatted with another namespace or write-block
                    size needs `ferrospike --erase` first.
    --client MODE   async (default): ferrospike-bench -a, one event loop for all connections,
                    as redis-benchmark; threads: a thread per connection
    --shards N      ferrospike's shard threads (default 1: one server thread, as redis-server
                    has, and the other CPU left to the single-threaded load generator)
    --post-write-cache SIZE
                    ferrospike's post-write-cache (default 4G). Redis holds every record in
                    memory; the cache keeps the write blocks written last, and defrag rewrites
                    the records left in older blocks into new ones. 200k records of 1536 bytes
                    fill about 320 MiB of blocks; with "1G" every read was answered from
                    memory (device_reads in namespace/test stayed 0 through RU,50 and then
                    RU,100)
    --server-defaults
                    run ferrospike on its own defaults instead: shards = online CPUs and
                    post-write-cache 256M (Aerospike's default). On a 2-CPU machine its two
                    shards share the CPUs with the load generator and part of the reads go to
                    the device: a measure of that, not of the goal (judged like for like).
                    --shards or --post-write-cache, given too, override that one default
    --same-client   also drive Redis with ferrospike-bench -a --resp (GET/SET of the same
                    keys and values, one event loop, timed exactly as Ferrospike is) in every
                    cell, and print a second table: Ferrospike against Redis under the same
                    client. redis-benchmark stays the reference the goal is judged by
    --help          this text

Each measurement runs:
    ferrospike-bench -a -w RU,50  -z C -t S -o B1536 -k K  (50% reads, 50% updates)
    ferrospike-bench -a -w RU,100 -z C -t S -o B1536 -k K  (100% reads)
    redis-benchmark -t get -d 1536 -r K -c C -n <~S s> --csv                 (100% reads)
    redis-benchmark -t set ... -c C/2  &  redis-benchmark -t get ... -c C/2  (50/50)
against a ferrospike (1 shard and a 4G post-write cache unless told otherwise; 1M write
blocks) and a redis-server (appendonly yes, appendfsync everysec, save '') that the script
starts on free 127.0.0.1 ports and stops at the end. Both stores hold all K keys first.
See the comment at the top of the script for how the Redis side is sized, populated and
summed.

Needs python3, and redis-server, redis-benchmark and redis-cli (as root it installs the
Debian package redis-server when they are missing). The temporary directory is made under
$TMPDIR (default /tmp), which must support O_DIRECT unless --device is given.

Output: versions, load averages at start and end, a line per measurement, and Markdown
tables of ops/s (min/median/max), median p99 and the median per-run ferrospike/Redis ratio.
EOF
}

die() {
    echo "server_vs_redis: $*" >&2
    exit 1
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=3
DURATION=15
KEYS=200000
CONNS="16 64"
BIN_DIR="$REPO/target/release"
DEVICE=""
CLIENT=async
SHARDS=""
PWC=""
SERVER_DEFAULTS=0
SAME_CLIENT=0
RECORD=1536

while (($# > 0)); do
    case $1 in
        --help | -h) usage; exit 0 ;;
        --same-client) SAME_CLIENT=1; shift; continue ;;
        --server-defaults) SERVER_DEFAULTS=1; shift; continue ;;
        --runs | --seconds | --keys | --conns | --bin-dir | --device | --client | --shards | --post-write-cache)
            (($# >= 2)) || die "$1 needs a value (see --help)"
            case $1 in
                --runs) RUNS=$2 ;;
                --seconds) DURATION=$2 ;;
                --keys) KEYS=$2 ;;
                --conns) CONNS=$2 ;;
                --bin-dir) BIN_DIR=$2 ;;
                --device) DEVICE=$2 ;;
                --client) CLIENT=$2 ;;
                --shards) SHARDS=$2 ;;
                --post-write-cache) PWC=$2 ;;
            esac
            shift 2
            ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

{ is_uint "$RUNS" && ((RUNS >= 1)); } || die "--runs must be a positive integer"
{ is_uint "$DURATION" && ((DURATION >= 1)); } || die "--seconds must be a positive integer"
if ((!SERVER_DEFAULTS)); then
    # Like for like (see "Configuration" at the top), unless told otherwise.
    SHARDS=${SHARDS:-1}
    PWC=${PWC:-4G}
fi
[[ -z $SHARDS ]] || { is_uint "$SHARDS" && ((SHARDS >= 1 && SHARDS <= 256)); } || die "--shards must be 1..256"
[[ -z $PWC || $PWC =~ ^[0-9]+[KMGkmg]?$ ]] || die "--post-write-cache must be a size such as 512M or 1G"
{ is_uint "$KEYS" && ((KEYS >= 1 && KEYS <= 999999999999)); } || die "--keys must be 1..999999999999"
read -r -a CONN_LIST <<<"$CONNS"
((${#CONN_LIST[@]} > 0)) || die "--conns needs at least one connection count"
for c in "${CONN_LIST[@]}"; do
    { is_uint "$c" && ((c >= 2 && c <= 1024)); } || die "--conns: '$c' is not 2..1024"
done
if [[ -n $DEVICE ]]; then
    [[ -b $DEVICE ]] || die "--device $DEVICE is not a block device"
fi
[[ $CLIENT == async ]] || ((!SAME_CLIENT)) || die "--same-client drives both servers with ferrospike-bench -a: it needs --client async"
case $CLIENT in
    async) CLIENT_FLAGS=(-a) ;;
    threads) CLIENT_FLAGS=() ;;
    *) die "--client must be async or threads" ;;
esac
BIN_DIR=$(realpath -m "$BIN_DIR")
FERROSPIKE="$BIN_DIR/ferrospike"
BENCH="$BIN_DIR/ferrospike-bench"

# ---- tools -----------------------------------------------------------------------------

command -v python3 >/dev/null || die "python3 is needed (to read ferrospike-bench's JSON and redis-benchmark's CSV)"

if ! command -v redis-server >/dev/null || ! command -v redis-benchmark >/dev/null || ! command -v redis-cli >/dev/null; then
    if ((EUID == 0)) && command -v apt-get >/dev/null; then
        echo "== installing redis-server (apt-get install -y redis-server)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y redis-server >/dev/null || { apt-get update >/dev/null && apt-get install -y redis-server >/dev/null; } ||
            die "apt-get install -y redis-server failed"
    else
        die "redis-server, redis-benchmark and redis-cli are needed: install them (Debian: sudo apt-get install redis-server), or run this as root to have it installed"
    fi
fi

if [[ ! -x $FERROSPIKE || ! -x $BENCH ]]; then
    [[ $(basename "$BIN_DIR") == release ]] ||
        die "$FERROSPIKE or $BENCH is missing, and --bin-dir does not end in 'release' so it cannot be built there"
    echo "== building: CARGO_TARGET_DIR=$(dirname "$BIN_DIR") cargo build --release -p ferrospike-server -p ferrospike-tools"
    (cd "$REPO" && CARGO_TARGET_DIR=$(dirname "$BIN_DIR") cargo build --release -p ferrospike-server -p ferrospike-tools) ||
        die "cargo build failed"
    [[ -x $FERROSPIKE && -x $BENCH ]] || die "the build did not produce $FERROSPIKE and $BENCH"
fi

# ---- temporary directory, processes, clean-up --------------------------------------------

WORK=""
SERVER_PIDS=() # ferrospike and redis-server
LOAD_PIDS=()   # load generators currently running

stop_pid() { # PID [seconds before SIGKILL]
    local pid=$1 wait_s=${2:-15} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait_s * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "server_vs_redis: PID $pid did not stop after SIGTERM, sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    set +e
    for pid in "${LOAD_PIDS[@]}"; do stop_pid "$pid" 5; done
    for pid in "${SERVER_PIDS[@]}"; do stop_pid "$pid" 30; done
    if [[ -n $WORK && -d $WORK ]]; then
        if ((rc != 0)); then
            for f in "$WORK"/ferrospike.log "$WORK"/redis/redis.log; do
                [[ -s $f ]] && { echo "---- last lines of $(basename "$f")" >&2; tail -n 15 "$f" >&2; }
            done
        fi
        rm -rf -- "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

WORK=$(mktemp -d -p "${TMPDIR:-/tmp}" ferrospike-vs-redis.XXXXXX)
mkdir -p "$WORK/redis" "$WORK/out"

if [[ -z $DEVICE ]]; then
    dd if=/dev/zero of="$WORK/odirect.probe" bs=4096 count=1 oflag=direct status=none 2>/dev/null ||
        die "$WORK does not support O_DIRECT (Ferrospike's file devices need it): set TMPDIR to a directory on another filesystem, or use --device"
    rm -f "$WORK/odirect.probe"
fi

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Run a command in the background with its PID in LOAD_PIDS (so the trap can stop it) and
# wait for it; returns its exit status.
run_load() {
    local pid rc=0
    "$@" &
    pid=$!
    LOAD_PIDS+=("$pid")
    wait "$pid" || rc=$?
    forget_load "$pid"
    return "$rc"
}

forget_load() { # PID: it has been waited for
    local p keep=()
    for p in "${LOAD_PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    LOAD_PIDS=("${keep[@]}")
}

# ---- environment -------------------------------------------------------------------------

git_rev=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$REPO" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    git_rev="$git_rev (working tree has uncommitted changes)"
fi
echo "== environment"
echo "date:            $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
echo "host:            $(uname -srm), $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
echo "cpu:             $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
echo "repository:      $REPO at $git_rev"
[[ $BIN_DIR == "$REPO/target/release" ]] ||
    echo "                 (the binaries come from --bin-dir $BIN_DIR and may be built from other sources)"
echo "ferrospike:      $("$FERROSPIKE" --version 2>&1 | head -n 1) ($FERROSPIKE)"
echo "ferrospike client: ferrospike-bench ${CLIENT_FLAGS[*]:-} ($CLIENT: $([[ $CLIENT == async ]] && echo "one event loop for all connections" || echo "a thread per connection"))"
echo "redis-server:    $(redis-server --version)"
echo "redis-benchmark: $(redis-benchmark --version 2>&1 | head -n 1)"
echo "storage:         ferrospike on ${DEVICE:-a sparse 8 GiB file in $WORK}; redis AOF in $WORK/redis"
echo "parameters:      runs $RUNS, $DURATION s per measurement, $KEYS keys, $RECORD-byte values, connections ${CONN_LIST[*]}"
echo "load at start:   $(uptime)"

# ---- servers -----------------------------------------------------------------------------

FERRO_PORT=$(free_port)
REDIS_PORT=$(free_port)
while [[ $REDIS_PORT == "$FERRO_PORT" ]]; do REDIS_PORT=$(free_port); done

if [[ -n $DEVICE ]]; then
    storage="devices = [\"$DEVICE\"]"
else
    storage="files = [\"$WORK/ferro.dat\"]
file-size = \"8G\""
fi
shards_line=""
[[ -z $SHARDS ]] || shards_line="shards = $SHARDS"
pwc_line=""
[[ -z $PWC ]] || pwc_line="post-write-cache = \"$PWC\""
cat >"$WORK/ferrospike.toml" <<EOF
[service]
address = "127.0.0.1"
port = $FERRO_PORT
$shards_line

[[namespaces]]
name = "test"

[namespaces.storage]
$storage
write-block-size = "1M"
$pwc_line
EOF

wait_port() { # NAME PID PORT TIMEOUT_S
    local name=$1 pid=$2 port=$3 timeout=$4 i
    for ((i = 0; i < timeout * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || die "$name (PID $pid) exited before accepting connections"
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    die "$name (PID $pid) does not accept connections on 127.0.0.1:$port after $timeout s"
}

echo "== starting ferrospike on 127.0.0.1:$FERRO_PORT"
"$FERROSPIKE" --config "$WORK/ferrospike.toml" >"$WORK/ferrospike.log" 2>&1 &
SERVER_PIDS+=($!)
FERRO_PID=$!
wait_port ferrospike "$FERRO_PID" "$FERRO_PORT" 120

echo "== starting redis-server on 127.0.0.1:$REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --dir "$WORK/redis" --appendonly yes \
    --appendfsync everysec --save '' --daemonize no --logfile "$WORK/redis/redis.log" &
SERVER_PIDS+=($!)
REDIS_PID=$!
wait_port redis-server "$REDIS_PID" "$REDIS_PORT" 60
for ((i = 0; i < 300; i++)); do
    [[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] && break
    sleep 0.1
done
[[ $(redis-cli -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] || die "redis-server does not answer PING"
rcli() { redis-cli -p "$REDIS_PORT" "$@"; }

server_alive() {
    kill -0 "$FERRO_PID" 2>/dev/null || die "ferrospike (PID $FERRO_PID) is gone"
    kill -0 "$REDIS_PID" 2>/dev/null || die "redis-server (PID $REDIS_PID) is gone"
}

# ---- population --------------------------------------------------------------------------

echo "== populating ferrospike: ferrospike-bench -w I -k $KEYS -o B$RECORD -z 16"
run_load "$BENCH" -p "$FERRO_PORT" -k "$KEYS" -o "B$RECORD" -w I -z 16 --json "$WORK/out/populate.json" \
    >"$WORK/out/populate.log" 2>&1 || { tail -n 20 "$WORK/out/populate.log" >&2; die "ferrospike population failed"; }
echo "   $(python3 -c 'import json, sys
j = json.load(open(sys.argv[1])); w = j["ops"]["write"]
print("%d records in %.1f s, %.1fk/s, p99 %.2f ms" % (w["count"], j["duration_secs"], w["tps"] / 1e3, w["p99_us"] / 1e3))' "$WORK/out/populate.json")"

echo "== populating redis: SET key:000000000000 .. key:$(printf '%012d' $((KEYS - 1))) ($RECORD-byte values) through redis-cli --pipe"
t0=$(date +%s.%N)
python3 - "$KEYS" "$RECORD" <<'EOF' | rcli --pipe >"$WORK/out/redis-populate.log" 2>&1 || { cat "$WORK/out/redis-populate.log" >&2; die "redis population failed"; }
import sys
keys, size = int(sys.argv[1]), int(sys.argv[2])
value = b"x" * size
tail = b"\r\n$%d\r\n%s\r\n" % (size, value)
out = sys.stdout.buffer
batch = []
for k in range(keys):
    batch.append(b"*3\r\n$3\r\nSET\r\n$16\r\nkey:%012d" % k + tail)
    if len(batch) == 1000:
        out.write(b"".join(batch))
        batch.clear()
out.write(b"".join(batch))
EOF
dbsize=$(rcli dbsize)
[[ $dbsize == "$KEYS" ]] || die "redis holds $dbsize keys after population, expected $KEYS"
rcli bgrewriteaof >/dev/null
for ((i = 0; i < 6000; i++)); do
    rcli info persistence | grep -q '^aof_rewrite_in_progress:0' &&
        ! rcli info persistence | grep -q '^aof_rewrite_scheduled:1' && break
    sleep 0.1
done
echo "   $dbsize keys in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s (AOF rewritten), used_memory $(rcli info memory | awk -F: '/^used_memory_human/ {print $2}' | tr -d '\r')"

# ---- measurements ------------------------------------------------------------------------

RESULTS="$WORK/out/results.tsv" # run workload conns system ops_s p99_ms errors
: >"$RESULTS"
declare -A REDIS_RATE # "workload conns set|get" -> last measured ops/s of that process

# ferrospike-bench: prints "ops_s p99_ms errors detail" from its JSON.
ferro_parse() {
    python3 - "$1" <<'EOF'
import json, sys
j = json.load(open(sys.argv[1]))
ops = j["ops"]
total = sum(o["tps"] for o in ops.values())
p99 = max(o["p99_us"] for o in ops.values()) / 1e3
errors = sum(j["errors"].values()) + j["net_errors"]
detail = ", ".join(f'{k} {o["tps"] / 1e3:.1f}k/s p50 {o["p50_us"] / 1e3:.3f} p99 {o["p99_us"] / 1e3:.3f} p99.9 {o["p999_us"] / 1e3:.3f} ms'
                   for k, o in ops.items())
codes = "".join(f" code {c}: {n}" for c, n in j["errors"].items()) + (f" network: {j['net_errors']}" if j["net_errors"] else "")
print(f"{total:.1f} {p99:.3f} {errors} {detail} ({j['duration_secs']:.1f} s){'; errors' + codes if errors else ''}")
EOF
}

# redis-benchmark --csv of one or two parallel processes. Arguments: groups of TEST CONNS N
# FILE. Prints "OPS_S P99_MS SHORTEST_S" (SHORTEST_S: the shortest process's run time), then a
# detail line, then "TEST RATE" per process.
redis_parse() {
    python3 - "$@" <<'EOF'
import csv, sys
a = sys.argv[1:]
total, p99max, detail, rates, secs = 0.0, 0.0, [], [], []
for i in range(0, len(a), 4):
    test, conns, n, path = a[i], a[i + 1], int(a[i + 2]), a[i + 3]
    rows = [r for r in csv.reader(open(path)) if r]
    head = next((r for r in rows if r[0] == "test"), None)
    res = [r for r in rows if r[0] == test.upper()]
    if head is None or len(res) != 1:
        sys.exit("no %s result in %s" % (test.upper(), path))
    row = dict(zip(head, res[0]))
    rps, p50, p99 = float(row["rps"]), float(row["p50_latency_ms"]), float(row["p99_latency_ms"])
    total += rps
    p99max = max(p99max, p99)
    detail.append("%s -c %s %.1fk/s p50 %.3f p99 %.3f max %.3f ms (%.1f s)"
                  % (test, conns, rps / 1e3, p50, p99, float(row["max_latency_ms"]), n / rps))
    rates.append("%s %.1f" % (test, rps))
    secs.append(n / rps)
print("%.1f %.3f %.2f" % (total, p99max, min(secs)))
print(", ".join(detail))
print("\n".join(rates))
EOF
}

redis_errors() { rcli info stats | tr -d '\r' | awk -F: '/^total_error_replies:/ {print $2}'; }

# Redis, one attempt: WORKLOAD CONNS TAG SECONDS. Sets R_OPS R_P99 R_SECS R_ERR R_DETAIL. Each
# process gets N = its last measured rate (REDIS_RATE) x SECONDS requests, or a short first
# guess. R_ERR: error replies Redis sent meanwhile (redis-benchmark does not count them).
redis_attempt() {
    local w=$1 c=$2 tag=$3 secs=$4 n rate i out test r errors0
    local tests conns pids=() args=()
    errors0=$(redis_errors)
    if [[ $w == RU,100 ]]; then
        tests=(get) conns=("$c")
    else
        tests=(set get) conns=($((c / 2)) $((c - c / 2)))
    fi
    for i in "${!tests[@]}"; do
        rate=${REDIS_RATE["$w $c ${tests[i]}"]:-}
        if [[ -n $rate ]]; then
            n=$(awk -v r="$rate" -v s="$secs" 'BEGIN { n = int(r * s); print (n < 1000 ? 1000 : n) }')
        else
            n=$((2000 * conns[i]))
        fi
        out="$WORK/out/redis-$tag-${tests[i]}.csv"
        redis-benchmark -p "$REDIS_PORT" -t "${tests[i]}" -d "$RECORD" -r "$KEYS" -c "${conns[i]}" -n "$n" --csv \
            >"$out" 2>"$out.err" &
        pids+=($!)
        LOAD_PIDS+=($!)
        args+=("${tests[i]}" "${conns[i]}" "$n" "$out")
    done
    for i in "${!pids[@]}"; do
        wait "${pids[i]}" || { cat "$WORK/out/redis-$tag-${tests[i]}.csv.err" >&2; die "redis-benchmark -t ${tests[i]} -c ${conns[i]} failed"; }
        forget_load "${pids[i]}"
    done
    {
        { read -r R_OPS R_P99 R_SECS && read -r R_DETAIL; } || die "cannot read redis-benchmark's output for $tag"
        while read -r test r; do REDIS_RATE["$w $c $test"]=$r; done
    } < <(redis_parse "${args[@]}")
    R_ERR=$(($(redis_errors) - errors0))
    if ((R_ERR > 0)); then
        echo "   WARNING: redis answered $R_ERR requests with errors during $tag: $(rcli info errorstats | tr -d '\r' | grep '^errorstat' | tr '\n' ' ')" >&2
    fi
}

# Redis, one measurement: as redis_attempt, measured again (up to 3 attempts in all) while a
# process ended before 80% of SECONDS because the rate it was sized from was too low.
redis_measure() { # WORKLOAD CONNS TAG SECONDS
    local attempt
    for attempt in 1 2 3; do
        redis_attempt "$1" "$2" "$3-$attempt" "$4"
        awk -v a="$R_SECS" -v b="$4" 'BEGIN { exit !(a >= 0.8 * b) }' && return 0
        ((attempt < 3)) && echo "   (redis ${R_DETAIL%% -c*}...: a process ran $R_SECS s instead of ~$4 s; measuring again, sized from the new rate)"
    done
    return 0
}

# ferrospike-bench against one server: NAME PORT WORKLOAD CONNS TAG SECONDS [FLAGS...] ->
# B_OPS B_P99 B_ERR B_DETAIL (NAME names its output files).
bench_measure() {
    local name=$1 port=$2 w=$3 c=$4 tag=$5 secs=$6 rc=0
    shift 6
    local json="$WORK/out/$name-$tag.json" log="$WORK/out/$name-$tag.log"
    run_load "$BENCH" "$@" -p "$port" -k "$KEYS" -o "B$RECORD" -w "$w" -z "$c" -t "$secs" --json "$json" \
        >"$log" 2>&1 || rc=$?
    if ((rc != 0 && rc != 1)) || [[ ! -s $json ]]; then
        tail -n 20 "$log" >&2
        die "ferrospike-bench $* -w $w -z $c exited with status $rc"
    fi
    read -r B_OPS B_P99 B_ERR B_DETAIL < <(ferro_parse "$json") || die "cannot read $json"
    if ((B_ERR > 0)); then
        echo "   WARNING: ferrospike-bench $* -w $w -z $c saw $B_ERR failed requests: ${B_DETAIL##*; errors} $(grep -m1 'first network' "$log" || true)" >&2
    fi
}

ferro_measure() { # WORKLOAD CONNS TAG SECONDS -> F_OPS F_P99 F_ERR F_DETAIL
    bench_measure ferro "$FERRO_PORT" "$@" "${CLIENT_FLAGS[@]}"
    F_OPS=$B_OPS F_P99=$B_P99 F_ERR=$B_ERR F_DETAIL=$B_DETAIL
}

# Redis through ferrospike-bench --resp: WORKLOAD CONNS TAG SECONDS -> S_OPS S_P99 S_ERR S_DETAIL
same_client_measure() {
    bench_measure redis-fb "$REDIS_PORT" "$@" -a --resp
    S_OPS=$B_OPS S_P99=$B_P99 S_ERR=$B_ERR S_DETAIL=$B_DETAIL
}

kilo() { awk -v x="$1" 'BEGIN { printf "%.1fk", x / 1e3 }'; }

WORKLOADS=("RU,50" "RU,100")
wname() { [[ $1 == RU,50 ]] && echo "50/50 read/update" || echo "100% read"; }

rcli config resetstat >/dev/null # keyspace hits/misses of the GETs below, reported at the end

echo "== warm-up and redis-benchmark calibration (2 s per workload and connection count)"
for c in "${CONN_LIST[@]}"; do
    for w in "${WORKLOADS[@]}"; do
        server_alive
        ferro_measure "$w" "$c" "warmup-$w-$c" 2
        redis_measure "$w" "$c" "cal-$w-$c" 2 >/dev/null # first guess short, then ~2 s at the measured rate
        echo "   $(wname "$w"), $c connections: ferrospike $(kilo "$F_OPS") ops/s, redis $(kilo "$R_OPS") ops/s"
    done
done

echo "== measurements ($DURATION s each)"
cell=0
for ((run = 1; run <= RUNS; run++)); do
    for c in "${CONN_LIST[@]}"; do
        for w in "${WORKLOADS[@]}"; do
            cell=$((cell + 1))
            if ((SAME_CLIENT)); then
                case $(((run + cell) % 3)) in
                    0) order=(ferrospike redis redis-fb) ;;
                    1) order=(redis redis-fb ferrospike) ;;
                    *) order=(redis-fb ferrospike redis) ;;
                esac
            elif (((run + cell) % 2 == 0)); then
                order=(ferrospike redis)
            else
                order=(redis ferrospike)
            fi
            for sys in "${order[@]}"; do
                server_alive
                tag="run$run-$w-$c"
                if [[ $sys == ferrospike ]]; then
                    ferro_measure "$w" "$c" "$tag" "$DURATION"
                    printf 'run %d  %-18s %3d conns  ferrospike  %9s ops/s  p99 %7.3f ms  errors %s  [%s]\n' \
                        "$run" "$(wname "$w")" "$c" "$(kilo "$F_OPS")" "$F_P99" "$F_ERR" "$F_DETAIL"
                    printf '%s\t%s\t%s\tferrospike\t%s\t%s\t%s\n' "$run" "$w" "$c" "$F_OPS" "$F_P99" "$F_ERR" >>"$RESULTS"
                elif [[ $sys == redis-fb ]]; then
                    same_client_measure "$w" "$c" "$tag" "$DURATION"
                    printf 'run %d  %-18s %3d conns  redis (fb) %9s ops/s  p99 %7.3f ms  errors %s  [%s]\n' \
                        "$run" "$(wname "$w")" "$c" "$(kilo "$S_OPS")" "$S_P99" "$S_ERR" "$S_DETAIL"
                    printf '%s\t%s\t%s\tredis-fb\t%s\t%s\t%s\n' "$run" "$w" "$c" "$S_OPS" "$S_P99" "$S_ERR" >>"$RESULTS"
                else
                    redis_measure "$w" "$c" "$tag" "$DURATION"
                    printf 'run %d  %-18s %3d conns  redis       %9s ops/s  p99 %7.3f ms  errors %s  [%s]\n' \
                        "$run" "$(wname "$w")" "$c" "$(kilo "$R_OPS")" "$R_P99" "$R_ERR" "$R_DETAIL"
                    printf '%s\t%s\t%s\tredis\t%s\t%s\t%s\n' "$run" "$w" "$c" "$R_OPS" "$R_P99" "$R_ERR" >>"$RESULTS"
                fi
            done
        done
    done
done
server_alive
misses=$(rcli info stats | tr -d '\r' | awk -F: '/^keyspace_misses:/ {print $2}')
hits=$(rcli info stats | tr -d '\r' | awk -F: '/^keyspace_hits:/ {print $2}')
echo "redis GETs (warm-up included): $hits hits, $misses misses (ferrospike-bench counts a read of a missing key as an error)"
[[ $misses == 0 ]] || echo "WARNING: redis GETs missed keys: the population did not cover them" >&2

# ---- summary -----------------------------------------------------------------------------

echo
echo "== summary: $RUNS run(s) of $DURATION s, $KEYS keys, $RECORD-byte values, loopback, ferrospike $git_rev (shards ${SHARDS:-"= online CPUs (its default)"}, post-write-cache ${PWC:-"256M (its default)"}), $(redis-server --version | grep -o 'v=[^ ]*')"
echo
summary_table() { # REDIS_SYSTEM (redis | redis-fb)
python3 - "$RESULTS" "$1" "${CONN_LIST[@]}" <<'EOF'
import statistics as st, sys
from collections import defaultdict
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
redis_system, conns = sys.argv[2], sys.argv[3:]
data = defaultdict(dict)  # (workload, conns, system) -> {run: (ops, p99, errors)}
for run, w, c, system, ops, p99, errors in rows:
    data[(w, c, system)][run] = (float(ops), float(p99), int(errors))
def k(x): return f"{x / 1e3:.1f}k"
goal_name = "goal" if redis_system == "redis" else "ahead (not the goal's measure)"
print("| workload | connections | ferrospike ops/s min / median / max | ferrospike p99 (median) "
      f"| Redis ops/s min / median / max | Redis p99 (median) | ferrospike / Redis ops/s (median of runs) | {goal_name} |")
print("|---|---|---|---|---|---|---|---|")
for w, wn in (("RU,50", "50/50 read/update"), ("RU,100", "100% read")):
    for c in conns:
        f, r = data.get((w, c, "ferrospike"), {}), data.get((w, c, redis_system), {})
        if not f or not r:
            continue
        fo, ro = [v[0] for v in f.values()], [v[0] for v in r.values()]
        fp, rp = st.median(v[1] for v in f.values()), st.median(v[1] for v in r.values())
        ratios = [f[x][0] / r[x][0] for x in f if x in r and r[x][0] > 0]
        ratio = st.median(ratios)
        goal = "met" if ratio > 1 and fp <= rp else "missed"
        if redis_system != "redis":
            goal = "yes" if ratio > 1 and fp <= rp else "no"
        bad = [name for name, d in (("ferrospike", f), ("Redis", r)) if any(v[2] for v in d.values())]
        if bad:
            goal += " (but %s answered errors: not comparable)" % " and ".join(bad)
        print(f"| {wn} | {c} | {k(min(fo))} / {k(st.median(fo))} / {k(max(fo))} | {fp:.2f} ms "
              f"| {k(min(ro))} / {k(st.median(ro))} / {k(max(ro))} | {rp:.2f} ms "
              f"| {ratio:.2f} (min {min(ratios):.2f}, max {max(ratios):.2f}) | {goal} |")
EOF
}
summary_table redis
if ((SAME_CLIENT)); then
    echo
    echo "Redis driven by ferrospike-bench -a --resp instead (the same client, event loop and timing as"
    echo "Ferrospike's; its 50/50 is one process with a coin per request, as Ferrospike's is):"
    echo
    summary_table redis-fb
fi
echo
echo "Goal (issue 3): more ops/s than Redis (ratio > 1) at an equal or lower p99 (medians)."
echo "50/50 p99 = the larger of the read and update p99s on both sides; Redis 50/50 ops/s = sum of"
echo "two parallel redis-benchmark processes (SET and GET, half the connections each). Error replies"
echo "count in ops/s on both sides; a cell with any says so in its goal column."
echo "load at end:     $(uptime)"
