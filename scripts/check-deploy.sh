#!/usr/bin/env bash
# Validates the deployment files (Dockerfile, docker-compose.yml, nginx
# template, Helm chart, Prometheus rules, OPERATIONS.md) without Docker, a
# Helm binary or a cluster. Idempotent; safe on a fresh Debian machine as root.
#
#   scripts/check-deploy.sh            # installs what is missing, then checks
#   CHECK_DEPLOY_VERBOSE=1 scripts/check-deploy.sh   # tracebacks on failure
#
# Installs (only when missing):
#   Debian: nginx-light, docker-compose (v1, for `config`), prometheus (promtool),
#           gettext-base (envsubst), postgresql, python3-venv, openssl, util-linux
#   PyPI, into .venv-deploy/: scripts/requirements-deploy.txt
# Then runs scripts/check_deploy.py, whose last line is `N passed, 0 failed`.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv-deploy"
REQUIREMENTS="$ROOT/scripts/requirements-deploy.txt"

log() { printf '[check-deploy] %s\n' "$*" >&2; }

# ---------------------------------------------------------------- Debian tools
missing=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v envsubst >/dev/null 2>&1 || missing+=(gettext-base)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
if ! command -v python3 >/dev/null 2>&1; then
  missing+=(python3 python3-venv)
elif ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    log "missing Debian packages: ${missing[*]} (run as root, or install them)"
    exit 1
  fi
  log "installing: ${missing[*]}"
  # Installing nginx/prometheus/postgresql must not start their services on
  # this machine: a temporary policy-rc.d says "no" to invoke-rc.d.
  created_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    created_policy=1
  fi
  trap '[ -z "${created_policy:-}" ] || rm -f /usr/sbin/policy-rc.d' EXIT
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  [ -z "$created_policy" ] || rm -f /usr/sbin/policy-rc.d
  trap - EXIT
fi

# ---------------------------------------------------------------- Python venv
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

# ---------------------------------------------------------------- checks
exec "$VENV/bin/python" "$ROOT/scripts/check_deploy.py" "$@"
