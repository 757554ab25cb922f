#!/bin/sh
# Renders deploy/nginx/nginx.conf.template from the environment.
#
# usage: render.sh [-t TEMPLATE] [-o OUTPUT]     (default: stdout)
#
# Used by docker-compose.yml (the nginx container's entrypoint) and by the
# loopback topology test, which runs the same config with Debian's nginx as an
# unprivileged user:
#
#   dir=$(mktemp -d)
#   NGINX_RUNTIME_DIR=$dir LISTEN_PORT=127.0.0.1:18080 \
#   UPSTREAMS="127.0.0.1:18081 127.0.0.1:18082" \
#       deploy/nginx/render.sh -o "$dir/nginx.conf"
#   nginx -p "$dir" -c "$dir/nginx.conf" -e stderr        # foreground (daemon off)
#
# Environment (defaults in brackets):
#   UPSTREAMS                 gateway replicas, host:port separated by spaces or
#                             commas. Required unless UPSTREAM_SERVERS is given.
#   UPSTREAM_SERVERS          pre-rendered `server ...;` lines (overrides UPSTREAMS)
#   UPSTREAM_MAX_FAILS        [1]   passive health check: failures before a
#   UPSTREAM_FAIL_TIMEOUT     [2s]  replica is skipped, and for how long
#   UPSTREAM_CONNECT_TIMEOUT  [2s]
#   LISTEN_PORT               [8080] anything `listen` takes: 8080, 127.0.0.1:18080
#   WS_READ_TIMEOUT           [3600s]
#   NGINX_RUNTIME_DIR         [/tmp/orders-gateway-nginx] base of the defaults below
#   NGINX_PID_PATH            [$NGINX_RUNTIME_DIR/nginx.pid]
#   NGINX_TEMP_DIR            [$NGINX_RUNTIME_DIR/tmp]   (created if missing)
#   NGINX_ERROR_LOG           [stderr]
#   NGINX_ERROR_LOG_LEVEL     [warn]
#   NGINX_ACCESS_LOG          [$NGINX_RUNTIME_DIR/access.log gateway]; `off` disables,
#                             `/dev/stdout gateway` in a container
#   NGINX_DAEMON              [off]  foreground, so a supervisor owns the process
#   NGINX_WORKER_PROCESSES    [auto]
#   NGINX_WORKER_CONNECTIONS  [4096]
#   NGINX_WORKER_RLIMIT_NOFILE [2 x worker connections + 64]
set -eu

here=$(cd "$(dirname "$0")" && pwd)
template="$here/nginx.conf.template"
output=""
while [ $# -gt 0 ]; do
  case "$1" in
    -t) template=$2; shift 2 ;;
    -o) output=$2; shift 2 ;;
    -h|--help) sed -n '2,36p' "$0"; exit 0 ;;
    *) echo "render.sh: unknown argument: $1" >&2; exit 2 ;;
  esac
done

die() { echo "render.sh: $*" >&2; exit 1; }
command -v envsubst >/dev/null 2>&1 || die "envsubst not found (Debian: apt-get install gettext-base)"
[ -r "$template" ] || die "template not readable: $template"

: "${LISTEN_PORT:=8080}"
: "${UPSTREAM_MAX_FAILS:=1}"
: "${UPSTREAM_FAIL_TIMEOUT:=2s}"
: "${UPSTREAM_CONNECT_TIMEOUT:=2s}"
: "${WS_READ_TIMEOUT:=3600s}"
: "${NGINX_RUNTIME_DIR:=/tmp/orders-gateway-nginx}"
: "${NGINX_PID_PATH:=$NGINX_RUNTIME_DIR/nginx.pid}"
: "${NGINX_TEMP_DIR:=$NGINX_RUNTIME_DIR/tmp}"
: "${NGINX_ERROR_LOG:=stderr}"
: "${NGINX_ERROR_LOG_LEVEL:=warn}"
: "${NGINX_ACCESS_LOG:=$NGINX_RUNTIME_DIR/access.log gateway}"
: "${NGINX_DAEMON:=off}"
: "${NGINX_WORKER_PROCESSES:=auto}"
: "${NGINX_WORKER_CONNECTIONS:=4096}"
: "${NGINX_WORKER_RLIMIT_NOFILE:=$((NGINX_WORKER_CONNECTIONS * 2 + 64))}"

if [ -z "${UPSTREAM_SERVERS:-}" ]; then
  [ -n "${UPSTREAMS:-}" ] || die "set UPSTREAMS (e.g. \"gateway-1:8080 gateway-2:8080\") or UPSTREAM_SERVERS"
  UPSTREAM_SERVERS=""
  for addr in $(printf '%s' "$UPSTREAMS" | tr ',' ' '); do
    case "$addr" in
      *:[0-9]*) ;;
      *) die "upstream '$addr' is not host:port" ;;
    esac
    line="        server $addr max_fails=$UPSTREAM_MAX_FAILS fail_timeout=$UPSTREAM_FAIL_TIMEOUT;"
    if [ -z "$UPSTREAM_SERVERS" ]; then
      UPSTREAM_SERVERS=$line
    else
      UPSTREAM_SERVERS=$(printf '%s\n%s' "$UPSTREAM_SERVERS" "$line")
    fi
  done
  [ -n "$UPSTREAM_SERVERS" ] || die "UPSTREAMS is empty"
fi

# nginx creates the temp subdirectories itself, but not their parent.
mkdir -p "$NGINX_TEMP_DIR" || die "cannot create NGINX_TEMP_DIR $NGINX_TEMP_DIR"
mkdir -p "$(dirname "$NGINX_PID_PATH")" || die "cannot create the directory of NGINX_PID_PATH $NGINX_PID_PATH"

export LISTEN_PORT UPSTREAM_SERVERS UPSTREAM_CONNECT_TIMEOUT WS_READ_TIMEOUT \
  NGINX_PID_PATH NGINX_TEMP_DIR NGINX_ERROR_LOG NGINX_ERROR_LOG_LEVEL NGINX_ACCESS_LOG \
  NGINX_DAEMON NGINX_WORKER_PROCESSES NGINX_WORKER_CONNECTIONS NGINX_WORKER_RLIMIT_NOFILE

vars='${LISTEN_PORT} ${UPSTREAM_SERVERS} ${UPSTREAM_CONNECT_TIMEOUT} ${WS_READ_TIMEOUT}
${NGINX_PID_PATH} ${NGINX_TEMP_DIR} ${NGINX_ERROR_LOG} ${NGINX_ERROR_LOG_LEVEL}
${NGINX_ACCESS_LOG} ${NGINX_DAEMON} ${NGINX_WORKER_PROCESSES} ${NGINX_WORKER_CONNECTIONS}
${NGINX_WORKER_RLIMIT_NOFILE}'

rendered=$(envsubst "$vars" < "$template")

# A placeholder the list above does not know would reach nginx verbatim.
leftover=$(printf '%s\n' "$rendered" | grep -o '\${[A-Za-z_][A-Za-z0-9_]*}' | sort -u | tr '\n' ' ' || true)
[ -z "$leftover" ] || die "unresolved placeholders in $template: $leftover"

if [ -n "$output" ]; then
  tmp="$output.tmp.$$"
  printf '%s\n' "$rendered" > "$tmp"
  mv "$tmp" "$output"
else
  printf '%s\n' "$rendered"
fi
