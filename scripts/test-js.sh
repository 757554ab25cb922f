#!/usr/bin/env bash
# Runs the JavaScript client and live-board tests (node --test): the client
# against a fake server and the real gateway; the board in headless chromium
# at 1920x1080, 1280x800, 1024x768 and 390x844 (screenshots in
# clients/js/test-artifacts/); the npm package (tsc --noEmit over the
# declarations and the typed/React examples, npm pack contents); the AsyncAPI
# document and the frames the gateway sends against it.
#
# Needs the gateway binary for the integration and browser tests: run after
# `cargo build` (default target/debug/orders-gateway, or set GATEWAY_BIN).
# Without it, and without CI=true, those tests are skipped; with CI=true they fail.
# Installs what it needs: Debian's chromium (as root) and the npm dev dependencies.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
js="$repo/clients/js"
export GATEWAY_BIN="${GATEWAY_BIN:-$repo/target/debug/orders-gateway}"

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    echo "test-js: need root to run: $*" >&2; return 1; fi
}

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  echo "test-js: installing node and npm" >&2
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs npm
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 20 ]; then
  echo "test-js: node >= 20 required, found $(node --version)" >&2
  exit 1
fi

if [ ! -x /usr/bin/chromium ] && [ -z "${CHROMIUM_PATH:-}" ]; then
  echo "test-js: installing chromium" >&2
  as_root apt-get update -q
  # Recommends pull in systemd and desktop services a headless test never uses.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium fonts-liberation
fi

cd "$js"
npm ci --no-audit --no-fund --loglevel=error

mkdir -p test-artifacts
echo "test-js: node $(node --version), gateway ${GATEWAY_BIN}$([ -x "$GATEWAY_BIN" ] || echo ' (missing)')"
# One file at a time: the browser and gateway tests are heavy for 2 cores.
exec node --test --test-concurrency=1 test/*.test.mjs
