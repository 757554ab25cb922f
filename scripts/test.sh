#!/usr/bin/env bash
# The whole test suite, on a fresh machine or this one:
#
#   scripts/test.sh
#
# Installs what is missing (redis-server, PostgreSQL binaries, nginx, node,
# chromium, python3-venv — Debian packages, as root; npm packages from
# clients/js/package-lock.json; PyPI packages into .venv-deploy/ and .venv-api/), starts a throwaway PostgreSQL of its
# own on a free port (unless TEST_DATABASE_URL is set), then runs:
#   1. cargo fmt --check and clippy -D warnings
#   2. the deploy checks (Dockerfile, compose, Helm, nginx, alerts)
#   3. the Rust unit and integration tests (nextest; each Redis test starts
#      its own redis-server, each database test its own database)
#   4. the HTTP API against docs/openapi.json (validator, router paths,
#      Schemathesis against a live gateway; scripts/check-api.sh)
#   5. the JavaScript client, package and browser tests, the AsyncAPI
#      document (node --test, tsc, headless chromium)
#   6. a 75-second chaos soak (docs/RELIABILITY.md), counted as one test
# and ends with one line: "N passed, M failed".
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
log() { printf '\n[test] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "[test] need root to run: $*" >&2; return 1; fi
}

apt_updated=""
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  # Installing server packages must not start their services here.
  local policy=""
  if [ "$(id -u)" = 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod 0755 /usr/sbin/policy-rc.d; policy=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  [ -z "$policy" ] || rm -f /usr/sbin/policy-rc.d
}

# ------------------------------------------------------------ tools
command -v cargo >/dev/null || { echo "[test] cargo is required (rustup.rs)" >&2; exit 1; }
need=()
command -v redis-server >/dev/null || need+=(redis-server)
# Redis Cluster tests form their cluster with `redis-cli --cluster create`.
command -v redis-cli >/dev/null || need+=(redis-tools)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || need+=(postgresql)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v setpriv >/dev/null || need+=(util-linux)
# libfaketime: a replica with a skewed wall clock (tests/it/faults.rs).
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || need+=(faketime)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  apt_install "${need[@]}"
fi
export PATH="$PATH:/usr/sbin"

# ------------------------------------------------------------ throwaway PostgreSQL
pg_dir=""
cleanup() {
  if [ -n "$pg_dir" ]; then
    "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 ||
      setpriv --reuid=nobody --regid=nogroup --clear-groups "$pg_bin/pg_ctl" -D "$pg_dir/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$pg_dir"
  fi
}
trap cleanup EXIT

if [ -z "${TEST_DATABASE_URL:-}" ]; then
  pg_bin="$(dirname "$(ls -d /usr/lib/postgresql/*/bin/initdb | sort -V | tail -n1)")"
  pg_dir="$(mktemp -d /tmp/og-pg.XXXXXX)"
  pg_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  run_pg=()
  if [ "$(id -u)" = 0 ]; then
    # PostgreSQL refuses to run as root.
    chown nobody "$pg_dir"
    run_pg=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
  fi
  log "starting a throwaway PostgreSQL on 127.0.0.1:$pg_port"
  "${run_pg[@]}" "$pg_bin/initdb" -D "$pg_dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
  "${run_pg[@]}" "$pg_bin/pg_ctl" -D "$pg_dir/data" -l "$pg_dir/log" -w -o \
    "-c listen_addresses=127.0.0.1 -p $pg_port -k $pg_dir -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" start >/dev/null
  export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
fi

passed=0
failed=0
tally() { passed=$((passed + $1)); failed=$((failed + $2)); }

# ------------------------------------------------------------ 1. style
log "cargo fmt --check, clippy"
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings

# ------------------------------------------------------------ 2. deploy checks
log "deploy checks"
deploy_out="$(mktemp)"
set +e
# CI=true: check-deploy.sh installs its tools (promtool too), so a check that
# would skip for want of one fails instead.
CI=true bash scripts/check-deploy.sh 2>&1 | tee "$deploy_out"
deploy_rc=${PIPESTATUS[0]}
set -e
line="$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$deploy_out" | tail -n1 || true)"
if [ -n "$line" ]; then
  tally "$(echo "$line" | sed -E 's/^([0-9]+) passed.*/\1/')" "$(echo "$line" | sed -E 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/')"
fi
[ "$deploy_rc" = 0 ] || { [ -n "$line" ] || tally 0 1; }

# ------------------------------------------------------------ 3. Rust
log "Rust tests"
cargo build --locked --bins
rust_out="$(mktemp)"
set +e
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --all-targets --no-fail-fast 2>&1 | tee "$rust_out"
  rust_rc=${PIPESTATUS[0]}
  summary="$(grep -E 'Summary .* tests? run' "$rust_out" | tail -n1)"
  r_pass="$(echo "$summary" | sed -nE 's/.* ([0-9]+) passed.*/\1/p')"
  r_fail="$(echo "$summary" | sed -nE 's/.* ([0-9]+) failed.*/\1/p')"
else
  cargo test --locked --workspace --all-targets --no-fail-fast 2>&1 | tee "$rust_out"
  rust_rc=${PIPESTATUS[0]}
  r_pass="$(grep -E '^test result:' "$rust_out" | sed -nE 's/.* ([0-9]+) passed.*/\1/p' | paste -sd+ | bc)"
  r_fail="$(grep -E '^test result:' "$rust_out" | sed -nE 's/.* ([0-9]+) failed.*/\1/p' | paste -sd+ | bc)"
fi
set -e
tally "${r_pass:-0}" "${r_fail:-0}"
[ "$rust_rc" = 0 ] || [ "${r_fail:-0}" -gt 0 ] || tally 0 1

# ------------------------------------------------------------ 4. HTTP API document
log "OpenAPI document and Schemathesis against a live gateway"
api_out="$(mktemp)"
set +e
GATEWAY_BIN="$repo/target/debug/orders-gateway" bash scripts/check-api.sh 2>&1 | tee "$api_out"
api_rc=${PIPESTATUS[0]}
set -e
line="$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$api_out" | tail -n1 || true)"
if [ -n "$line" ]; then
  tally "$(echo "$line" | sed -E 's/^([0-9]+) passed.*/\1/')" "$(echo "$line" | sed -E 's/^[0-9]+ passed, ([0-9]+) failed.*/\1/')"
fi
[ "$api_rc" = 0 ] || { [ -n "$line" ] || tally 0 1; }

# ------------------------------------------------------------ 5. JavaScript
log "JavaScript client and browser tests"
js_out="$(mktemp)"
set +e
# CI=true: this suite has installed chromium and built the binary, so a test
# that would skip for want of either is a failure (the tally ignores skips).
CI=true GATEWAY_BIN="$repo/target/debug/orders-gateway" bash scripts/test-js.sh 2>&1 | tee "$js_out"
js_rc=${PIPESTATUS[0]}
set -e
j_pass="$(grep -E '^# pass [0-9]+' "$js_out" | tail -n1 | awk '{print $3}')"
j_fail="$(grep -E '^# fail [0-9]+' "$js_out" | tail -n1 | awk '{print $3}')"
j_skip="$(grep -E '^# skipped [0-9]+' "$js_out" | tail -n1 | awk '{print $3}')"
tally "${j_pass:-0}" "$(( ${j_fail:-0} + ${j_skip:-0} ))"
[ "$js_rc" = 0 ] || [ "${j_fail:-0}" -gt 0 ] || tally 0 1

# ------------------------------------------------------------ 6. chaos soak
# docs/RELIABILITY.md: 3 replicas, 30 dashboards, faults every ~4 s for 75 s
# against its own redis-server and PostgreSQL cluster; one test in the tally.
log "chaos soak (75 s, seed ${SOAK_SEED:-7})"
soak_rc=0
cargo build --locked --bin soak || soak_rc=$?
if [ "$soak_rc" = 0 ]; then
  set +e
  target/debug/soak --duration "${SOAK_DURATION:-75}" --settle 45 --seed "${SOAK_SEED:-7}" --own-postgres
  soak_rc=$?
  set -e
fi
if [ "$soak_rc" = 0 ]; then tally 1 0; else tally 0 1; fi

echo
echo "${passed} passed, ${failed} failed"
[ "$failed" = 0 ]
