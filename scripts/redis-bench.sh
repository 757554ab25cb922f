#!/usr/bin/env bash
# Redis broker throughput and Redis CPU per event: one redis-server vs a
# local Redis Cluster of 3 primaries + 3 replicas (docs/BENCHMARKS.md).
#
#   scripts/redis-bench.sh [events] [concurrency] [restaurants]
#
# Starts its own servers on loopback ports 17000-17099 (temporary directory,
# no persistence), runs src/bin/redisbench.rs against each, prints one JSON
# line per run, and stops everything it started.
#
# Then the failover gap (FAILOVER_ROUNDS, default 3, each on fresh servers):
# a cluster primary SIGKILLed (cluster-node-timeout NODE_TIMEOUT_MS, default
# 2000) and a Sentinel master SIGKILLed (down-after-milliseconds the same),
# each while a publish goes out every 10 ms. ONLY=failover skips the
# throughput runs.
set -euo pipefail
cd "$(dirname "$0")/.."

events=${1:-20000}
only=${ONLY:-all}
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

stop_all() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  pids=()
}

start() { # port [extra args...]
  local port=$1; shift
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no \
    --protected-mode no --dir "$dir" --dbfilename "dump-$port.rdb" "$@" >/dev/null 2>&1 &
  pids+=($!)
  until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.05; done
}

if [ "$only" != failover ]; then
# One node.
start 17000
"$bench" --mode single --urls redis://127.0.0.1:17000 \
  --events "$events" --concurrency "$concurrency" --restaurants "$restaurants"

# A 3-primary cluster with one replica each.
urls=()
for port in 17001 17002 17003 17004 17005 17006; do
  start "$port" --cluster-enabled yes --cluster-config-file "$dir/nodes-$port.conf" \
    --cluster-node-timeout "${NODE_TIMEOUT_MS:-2000}"
  urls+=("redis://127.0.0.1:$port")
done
redis-cli --cluster create 127.0.0.1:17001 127.0.0.1:17002 127.0.0.1:17003 \
  127.0.0.1:17004 127.0.0.1:17005 127.0.0.1:17006 --cluster-replicas 1 --cluster-yes >/dev/null
until redis-cli -p 17001 cluster info | grep -q cluster_state:ok; do sleep 0.1; done
sleep 1
"$bench" --mode cluster --urls "$(IFS=,; echo "${urls[*]}")" \
  --events "$events" --concurrency "$concurrency" --restaurants "$restaurants"

# One node with a replica, for CPU per event comparable with the cluster's
# (which replicates every write).
stop_all
start 17007
start 17008 --replicaof 127.0.0.1 17007
until redis-cli -p 17008 info replication | grep -q master_link_status:up; do sleep 0.1; done
"$bench" --mode single --urls redis://127.0.0.1:17007,redis://127.0.0.1:17008 \
  --events "$events" --concurrency "$concurrency" --restaurants "$restaurants"
stop_all
fi

cluster() { # base port: 6 nodes base..base+5
  local b=$1 nodes=()
  for i in 0 1 2 3 4 5; do
    start $((b + i)) --cluster-enabled yes --cluster-config-file "$dir/nodes-$((b + i)).conf" \
      --cluster-node-timeout "${NODE_TIMEOUT_MS:-2000}" --cluster-replica-validity-factor 0
    nodes+=("127.0.0.1:$((b + i))")
  done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >/dev/null
  for i in 0 1 2 3 4 5; do
    until redis-cli -p $((b + i)) cluster info | grep -q cluster_state:ok; do sleep 0.1; done
  done
  # Every replica in sync before a primary dies.
  for i in 0 1 2 3 4 5; do
    while redis-cli -p $((b + i)) info replication | grep -q master_link_status:down; do sleep 0.1; done
  done
}

sentinels() { # base port: master base, replica base+1, sentinels base+2..4
  local b=$1 conf
  start "$b"
  start $((b + 1)) --replicaof 127.0.0.1 "$b"
  until redis-cli -p $((b + 1)) info replication | grep -q master_link_status:up; do sleep 0.1; done
  for i in 2 3 4; do
    conf="$dir/sentinel-$((b + i)).conf"
    printf 'port %s\nbind 127.0.0.1\nsentinel monitor mymaster 127.0.0.1 %s 2\nsentinel down-after-milliseconds mymaster %s\nsentinel failover-timeout mymaster 10000\n' \
      $((b + i)) "$b" "${NODE_TIMEOUT_MS:-2000}" > "$conf"
    redis-server "$conf" --sentinel --protected-mode no >/dev/null 2>&1 &
    pids+=($!)
    until redis-cli -p $((b + i)) ping >/dev/null 2>&1; do sleep 0.05; done
  done
  until [ "$(redis-cli -p $((b + 2)) sentinel replicas mymaster | grep -c '^ip$')" -ge 1 ] &&
        [ "$(redis-cli -p $((b + 2)) sentinel sentinels mymaster | grep -c '^ip$')" -ge 2 ]; do
    sleep 0.2
  done
}

for round in $(seq 1 "${FAILOVER_ROUNDS:-3}"); do
  base=$((17010 + 20 * (round - 1)))
  cluster "$base"
  seeds=$(for i in 0 1 2 3 4 5; do printf 'redis://127.0.0.1:%s,' $((base + i)); done)
  "$bench" --mode cluster --failover --urls "${seeds%,}"
  stop_all
  sentinels $((base + 10))
  seeds=$(for i in 2 3 4; do printf 'redis://127.0.0.1:%s,' $((base + 10 + i)); done)
  "$bench" --mode sentinel --failover --urls "${seeds%,}"
  stop_all
done
