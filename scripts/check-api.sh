#!/usr/bin/env bash
# Holds the HTTP API to docs/openapi.json (served at /api/openapi.json):
# validates the document, compares its paths with the router, and runs
# Schemathesis against a live gateway (the real binary, loopback only); then
# holds the Grafana dashboard's metric and label names to that gateway's
# /metrics (after publishes and WebSocket sessions).
#
#   cargo build && scripts/check-api.sh
#   SCHEMATHESIS_SEED=random SCHEMATHESIS_MAX_EXAMPLES=500 scripts/check-api.sh   # explore more
#
# Installs (only when missing) python3-venv (Debian) and, into .venv-api/,
# scripts/requirements-api.txt. Last line: `N passed, M failed`.
# Failure details: target/check-api/schemathesis.log (+ JUnit XML).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv-api"
REQUIREMENTS="$ROOT/scripts/requirements-api.txt"
export GATEWAY_BIN="${GATEWAY_BIN:-$ROOT/target/debug/orders-gateway}"

log() { printf '[check-api] %s\n' "$*" >&2; }

if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then log "python3-venv missing (run as root, or install it)"; exit 1; fi
  log "installing python3-venv"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
fi

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
  log "creating $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want=$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  log "installing Python packages into $VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQUIREMENTS"
  echo "$want" > "$stamp"
fi

exec "$VENV/bin/python" "$ROOT/scripts/check_api.py" "$@"
