#!/usr/bin/env bash
# Redis broker throughput and Redis CPU per event: one redis-server vs a
# local Redis Cluster of 3 primaries + 3 replicas (docs/BENCHMARKS.md).
#
#   scripts/redis-bench.sh [events] [concurrency] [restaurants]
#
# Starts its own servers on loopback ports 17000-17006 (temporary directory,
# no persistence), runs src/bin/redisbench.rs against each, prints one JSON
# line per run, and stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

events=${1:-20000}
concurrency=${2:-64}
restaurants=${3:-200}
profile=${PROFILE:-release}
dir=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

if [ "$profile" = release ]; then
  cargo build --release --bin redisbench >&2
  bench=target/release/redisbench
else
  cargo build --bin redisbench >&2
  bench=target/debug/redisbench
fi

start() { # port [extra args...]
  local port=$1; shift
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
    --protected-mode no --dir "$dir" --dbfilename "dump-$port.rdb" "$@" >/dev/null 2>&1 &
  pids+=($!)
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
}

# One node.
start 17000
"$bench" --mode single --urls redis://127.0.0.1:17000 \
  --events "$events" --concurrency "$concurrency" --restaurants "$restaurants"

# A 3-primary cluster with one replica each.
urls=()
for port in 17001 17002 17003 17004 17005 17006; do
  start "$port" --cluster-enabled yes --cluster-config-file "$dir/nodes-$port.conf" \
    --cluster-node-timeout 2000
  urls+=("redis://127.0.0.1:$port")
done
redis-cli --cluster create 127.0.0.1:17001 127.0.0.1:17002 127.0.0.1:17003 \
  127.0.0.1:17004 127.0.0.1:17005 127.0.0.1:17006 --cluster-replicas 1 --cluster-yes >/dev/null
until redis-cli -p 17001 cluster info | grep -q cluster_state:ok; do sleep 0.1; done
sleep 1
"$bench" --mode cluster --urls "$(IFS=,; echo "${urls[*]}")" \
  --events "$events" --concurrency "$concurrency" --restaurants "$restaurants"
