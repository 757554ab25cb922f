#!/usr/bin/env bash
# Gateway benchmark of docs/BENCHMARKS.md ("Gateway").
#
#   scripts/bench.sh                 # all four measurements, RUNS runs each
#   scripts/bench.sh idle latency    # only some: idle | latency | max
#
# Everything runs on 127.0.0.1: a private redis-server on a free port (never
# the system one), a fresh gateway per run pinned to core $GATEWAY_CPU, and
# loadgen + redis pinned to core $LOAD_CPU. Results (JSON lines, logs, a
# summary with medians) go to bench-results/<timestamp>/.
#
# Knobs (environment): RUNS (3), CONNECTIONS (10000), RESTAURANTS (1000),
# RATE (2000 events/s), DURATION (20 s), WARMUP (3 s), HOLD (10 s),
# STEP_RATES (events/s list for the max-rate search), STEP_DURATION (10 s),
# GATEWAY_CPU (0), LOAD_CPU (1), SOURCE_IPS (e.g. 127.0.0.2,127.0.0.3 past
# ~28k sockets), SKIP_BUILD=1, CARGO_TARGET_DIR (target-bench),
# GATEWAY_ENV (extra "K=V K=V" for the gateway).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=${RUNS:-3}
CONNECTIONS=${CONNECTIONS:-10000}
RESTAURANTS=${RESTAURANTS:-1000}
RATE=${RATE:-2000}
DURATION=${DURATION:-20}
WARMUP=${WARMUP:-3}
HOLD=${HOLD:-10}
STEP_RATES=${STEP_RATES:-4000,6000,7000,8000,9000,10000,11000,12000,14000,16000}
STEP_DURATION=${STEP_DURATION:-10}
GATEWAY_CPU=${GATEWAY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
SOURCE_IPS=${SOURCE_IPS:-}
GATEWAY_ENV=${GATEWAY_ENV:-}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target-bench}
SECRET=bench-secret-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')
TESTS=("$@")
[ ${#TESTS[@]} -eq 0 ] && TESTS=(idle latency max)

OUT=$ROOT/bench-results/$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"
echo "results: $OUT"

# 10k sockets on each side need file descriptors; the hard limit caps us.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
echo "open files limit: $(ulimit -n)"
if [ "$(ulimit -n)" -lt $((CONNECTIONS + 1024)) ]; then
  echo "bench: ulimit -n $(ulimit -n) is too low for $CONNECTIONS sockets" >&2
  exit 1
fi

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  cargo build --release --features loadgen --bin orders-gateway --bin loadgen
fi
GATEWAY=$CARGO_TARGET_DIR/release/orders-gateway
LOADGEN=$CARGO_TARGET_DIR/release/loadgen

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo none) (plus working tree)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | xargs), $(nproc) cores"
  echo "memory: $(free -g | awk '/Mem:/{print $2}') GiB"
  echo "kernel: $(uname -r)"
  echo "redis: $(redis-server --version | head -1)"
  echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "pinning: gateway core $GATEWAY_CPU; loadgen and redis core $LOAD_CPU"
} | tee "$OUT/machine.txt"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

REDIS_PID=""
GATEWAY_PID=""
stop() {
  local pid=$1
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}
cleanup() {
  stop "$GATEWAY_PID"; GATEWAY_PID=""
  stop "$REDIS_PID"; REDIS_PID=""
}
trap cleanup EXIT INT TERM

# A fresh private Redis and a fresh gateway for every run.
start_stack() {
  local name=$1
  REDIS_PORT=$(free_port)
  taskset -c "$LOAD_CPU" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 \
    --save "" --appendonly no --maxclients 1000 >"$OUT/$name.redis.log" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 50); do
    redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  GATEWAY_PORT=$(free_port)
  # shellcheck disable=SC2086
  env BIND_ADDR=127.0.0.1:$GATEWAY_PORT REDIS_URL=redis://127.0.0.1:$REDIS_PORT \
    JWT_SECRET=$SECRET MAX_CONNECTIONS=$((CONNECTIONS + 1000)) \
    MAX_CONNECTIONS_PER_RESTAURANT=$((CONNECTIONS / RESTAURANTS + 100)) \
    LOG_FORMAT=json $GATEWAY_ENV \
    taskset -c "$GATEWAY_CPU" "$GATEWAY" >"$OUT/$name.gateway.log" 2>&1 &
  GATEWAY_PID=$!
  for _ in $(seq 100); do
    curl -fsS "http://127.0.0.1:$GATEWAY_PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
  curl -fsS "http://127.0.0.1:$GATEWAY_PORT/readyz" >/dev/null
  sleep 1 # let start-up work (function install, first heartbeat) finish
}

loadgen() {
  local name=$1
  shift
  local src=()
  [ -n "$SOURCE_IPS" ] && src=(--source-ips "$SOURCE_IPS")
  JWT_SECRET=$SECRET taskset -c "$LOAD_CPU" "$LOADGEN" \
    --urls "ws://127.0.0.1:$GATEWAY_PORT" --redis-url "redis://127.0.0.1:$REDIS_PORT" \
    --connections "$CONNECTIONS" --restaurants "$RESTAURANTS" \
    --gateway-pid "$GATEWAY_PID" --redis-pid "$REDIS_PID" --json --label "$name" \
    "${src[@]}" "$@" >>"$OUT/results.jsonl" 2> >(tee "$OUT/$name.loadgen.log" >&2)
}

# CPU pressure (PSI): the share of time some runnable task of the machine
# waited for a CPU. Others' work on the machine shows up here.
psi_total() { awk '/^some/ { sub("total=", "", $5); print $5 }' /proc/pressure/cpu 2>/dev/null || echo 0; }

for test in "${TESTS[@]}"; do
  for run in $(seq "$RUNS"); do
    name=$test-$run
    echo "== $name (load: $(cut -d' ' -f1-3 /proc/loadavg))"
    psi0=$(psi_total) t0=$(date +%s.%N)
    start_stack "$name"
    case $test in
      idle) loadgen "$name" --idle --hold-secs "$HOLD" ;;
      latency) loadgen "$name" --rates "$RATE" --duration-secs "$DURATION" --warmup-secs "$WARMUP" ;;
      max) loadgen "$name" --rates "$STEP_RATES" --duration-secs "$STEP_DURATION" \
             --warmup-secs 2 --drain-secs 5 --stop-above-p99-ms 100 ;;
      *) echo "unknown test $test (idle | latency | max)" >&2; exit 2 ;;
    esac
    cleanup
    psi1=$(psi_total) t1=$(date +%s.%N)
    echo "{\"kind\":\"env\",\"label\":\"$name\",\"cpu_pressure_pct\":$(echo "($psi1 - $psi0) / 10000 / ($t1 - $t0)" | bc -l),\"loadavg\":\"$(cut -d' ' -f1-3 /proc/loadavg)\"}" >>"$OUT/results.jsonl"
    sleep 1
  done
done
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/machine.txt"

python3 - "$OUT" <<'EOF' | tee "$OUT/summary.md"
import json, statistics, sys, collections
out = sys.argv[1]
rows = [json.loads(l) for l in open(f"{out}/results.jsonl") if l.strip()]
by = collections.defaultdict(list)
for r in rows:
    by[(r["label"].rsplit("-", 1)[0], r["kind"])].append(r)
med = lambda xs: statistics.median(xs) if xs else float("nan")
def show(name, vals, fmt):
    print(f"| {name} | {fmt.format(med(vals))} | {', '.join(fmt.format(v) for v in vals)} |")
env = {r["label"]: r for r in rows if r["kind"] == "env"}
print("| metric | median | runs |")
print("|---|---|---|")
idle = by[("idle", "idle")]
if idle:
    show("idle connections open", [r["open"] for r in idle], "{:.0f}")
    show("RSS per idle connection (KiB)", [r["rss_per_connection_kib"] for r in idle], "{:.2f}")
    show("gateway RSS with 10k idle (MiB)", [r["rss_after_kib"] / 1024 for r in idle], "{:.1f}")
    show("idle gateway CPU (% of a core)", [100 * r["idle_cpu_cores"] for r in idle], "{:.2f}")
conn = by[("idle", "connect")] + by[("latency", "connect")]
if conn:
    show("connect rate (sockets/s)", [r["connects_per_s"] for r in conn], "{:.0f}")
    show("gateway CPU per connect (µs)", [r["gateway_cpu_us_per_connection"] for r in conn], "{:.0f}")
lat = by[("latency", "phase")]
for t in ("idle", "latency", "max"):
    runs = sorted(l for l in env if l.rsplit("-", 1)[0] == t)
    if runs:
        show(f"{t}: CPU pressure during run (% of time)", [env[l]["cpu_pressure_pct"] for l in runs], "{:.0f}")
if lat:
    show("deliveries/s", [r["deliveries_per_s"] for r in lat], "{:.0f}")
    show("lost", [r["lost"] for r in lat], "{:.0f}")
    show("duplicates", [r["dups"] for r in lat], "{:.0f}")
    for q in ("p50", "p90", "p99", "p999", "max"):
        show(f"latency {q} (ms)", [r[f"{q}_ms"] for r in lat], "{:.2f}")
    show("gateway CPU per delivery (µs)", [r["gateway_cpu_us_per_delivery"] for r in lat], "{:.2f}")
    show("gateway CPU (% of a core)", [100 * r["gateway_cpu_cores"] for r in lat], "{:.0f}")
    show("loadgen CPU (% of a core)", [100 * r["loadgen_cpu_cores"] for r in lat], "{:.0f}")
    show("redis CPU (% of a core)", [100 * r["redis_cpu_cores"] for r in lat], "{:.0f}")
mx = by[("max", "phase")]
for r in mx:
    # Deliveries per second over the time the events really took to go out
    # (when the load side cannot keep the target rate, a phase runs longer).
    r["deliveries_per_s"] = r["delivered"] * r["rate_achieved"] / max(r["events"], 1)
if mx:
    best = collections.defaultdict(float)
    for r in mx:
        kept_up = r["rate_achieved"] >= 0.97 * r["rate_target"]
        if r["lost"] == 0 and r["dups"] == 0 and r["p99_ms"] < 100 and kept_up:
            best[r["label"]] = max(best[r["label"]], r["deliveries_per_s"])
    labels = sorted({r["label"] for r in mx})
    show("max deliveries/s with p99 < 100 ms, no loss", [best[l] for l in labels], "{:.0f}")
    print()
    print("| run | events/s target | achieved | deliveries/s | lost | p50 ms | p99 ms | gw CPU % | gw µs/delivery | loadgen CPU % | redis CPU % |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in mx:
        print(f"| {r['label']} | {r['rate_target']:.0f} | {r['rate_achieved']:.0f} | {r['deliveries_per_s']:.0f} | {r['lost']} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {100*r['gateway_cpu_cores']:.0f} | {r['gateway_cpu_us_per_delivery']:.2f} | "
              f"{100*r['loadgen_cpu_cores']:.0f} | {100*r['redis_cpu_cores']:.0f} |")
EOF
