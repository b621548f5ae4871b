#!/usr/bin/env bash
# User-space instructions per proxied request, tether and nginx side by side, counted by
# valgrind's callgrind: a count, not a time, so it is the same on a busy machine as on an idle one
# and shows per-request work that noisy CPU-time figures hide.
#
#   bench/instructions.sh [--no-build] [--requests N]
#
# Each proxy runs under callgrind in front of the same backend (bench/compare's compare-backend);
# h2load sends 2000 warm-up requests over 8 HTTP/1.1 keep-alive connections (or 8 cleartext
# HTTP/2 connections with 8 streams each), the counters are zeroed, N more requests (default
# 5000) are sent and the counters dumped. Kernel work (the system
# calls themselves) is not counted: compare CPU time in bench/RESULTS.md for that.
# Writes bench/RESULTS-instructions.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=1
N=5000
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --requests) N="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "instructions.sh: unknown option $1" >&2; exit 64 ;;
  esac
  shift
done

# shellcheck source=lib.sh
source "$ROOT/bench/lib.sh"

need=()
command -v valgrind >/dev/null || need+=(valgrind)
command -v nginx >/dev/null || need+=(nginx)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v curl >/dev/null || need+=(curl)
install_packages "${need[@]}"

release_binaries "$BUILD"

RUN=$(mktemp -d /tmp/tether-instr.XXXXXX)

mapfile -t ports < <("$BIN/compare-client" free-ports 3)
BPORT=${ports[0]}
PPORT=${ports[1]}
P2PORT=${ports[2]}
"$BIN/compare-backend" --listen "127.0.0.1:$BPORT" --threads 2 >"$RUN/backend.log" 2>&1 &
PIDS+=($!)

cat >"$RUN/tether.toml" <<EOF
workers = 1
shutdown_grace = "0s"
[[listeners]]
address = "127.0.0.1:$PPORT"
protocols = ["http1"]
  [[listeners.routes]]
  upstream = "backend"
[[listeners]]
address = "127.0.0.1:$P2PORT"
protocols = ["h2c"]
  [[listeners.routes]]
  upstream = "backend"
[[upstreams]]
name = "backend"
addresses = ["127.0.0.1:$BPORT"]
protocol = "http1"
max_idle_per_endpoint = 64
idle_timeout = "60s"
EOF

nginx_conf() {
  mkdir -p "$RUN/nginx/tmp"
  cat >"$RUN/nginx/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $RUN/nginx/nginx.pid;
error_log $RUN/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log $1;
  client_body_temp_path $RUN/nginx/tmp/body;
  proxy_temp_path $RUN/nginx/tmp/proxy;
  fastcgi_temp_path $RUN/nginx/tmp/fastcgi;
  uwsgi_temp_path $RUN/nginx/tmp/uwsgi;
  scgi_temp_path $RUN/nginx/tmp/scgi;
  keepalive_requests 1000000;
  upstream backend { server 127.0.0.1:$BPORT; keepalive 64; }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  server {
    listen 127.0.0.1:$PPORT;
    listen 127.0.0.1:$P2PORT http2;
    location / { proxy_pass http://backend; }
  }
}
EOF
}

# measure LABEL h1|h2 COMMAND...: instructions per request of COMMAND, HTTP/1.1 clients on
# $PPORT or HTTP/2 (cleartext, 8 streams per connection) on $P2PORT.
ROWS=()
measure() {
  local label=$1 mode=$2; shift 2
  local load=(--h1 -c 8 "http://127.0.0.1:$PPORT/")
  [ "$mode" = h2 ] && load=(-c 8 -m 8 "http://127.0.0.1:$P2PORT/")
  local out="$RUN/callgrind.$label"
  valgrind --tool=callgrind --callgrind-out-file="$out" "$@" >"$RUN/$label.stdout" 2>"$RUN/$label.stderr" &
  local pid=$!
  PIDS+=("$pid")
  local up=0
  for _ in $(seq 1 150); do
    if curl -s -o /dev/null "http://127.0.0.1:$PPORT/"; then up=1; break; fi
    sleep 0.2
  done
  [ "$up" = 1 ] || { echo "instructions.sh: $label did not start (see $RUN/$label.stderr)" >&2; exit 1; }
  h2load -n 2000 "${load[@]}" >/dev/null
  callgrind_control -z "$pid" >/dev/null 2>&1
  local done_n
  done_n=$(h2load -n "$N" "${load[@]}" | awk '/^requests:/ {print $8}')
  callgrind_control -d "$pid" >/dev/null 2>&1
  sleep 0.5
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  local ir
  ir=$(grep -E '^summary:' "$out.1" | awk '{print $2}')
  local per=$((ir / done_n))
  log "$label: $per instructions per request ($done_n requests)"
  ROWS+=("$label|$per|$done_n")
}

log "run directory $RUN"
measure "tether" h1 "$BIN/tether" serve --config "$RUN/tether.toml"
measure "tether-log-off" h1 "$BIN/tether" serve --config "$RUN/tether.toml" --log-format off
measure "tether-h2" h2 "$BIN/tether" serve --config "$RUN/tether.toml"
nginx_conf /dev/null
measure "nginx" h1 nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -e "$RUN/nginx/error.log"
measure "nginx-h2" h2 nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -e "$RUN/nginx/error.log"
nginx_conf off
measure "nginx-log-off" h1 nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -e "$RUN/nginx/error.log"

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
get() { local r; for r in "${ROWS[@]}"; do [ "${r%%|*}" = "$1" ] && { r=${r#*|}; echo "${r%%|*}"; return; }; done; }
t=$(get tether); toff=$(get tether-log-off); n=$(get nginx); noff=$(get nginx-log-off)
t2=$(get tether-h2); n2=$(get nginx-h2)
{
  echo "# User-space instructions per request"
  echo
  echo "Generated by \`bench/instructions.sh\` on $(date -u '+%Y-%m-%d %H:%M') UTC. Rerun the script rather than editing this file."
  echo
  echo "Each proxy ran under valgrind's callgrind in front of the same backend, one worker each, with"
  echo "its access log written to /dev/null (\`on\`) or turned off (\`off\`). After 2000 warm-up requests,"
  echo "$N \`GET /\` requests (100-byte body) were counted, over 8 HTTP/1.1 keep-alive connections"
  echo "(\`h1\`) or 8 cleartext HTTP/2 connections with 8 streams each (\`h2\`); the backend is HTTP/1.1."
  echo "Instructions are counted, not timed, so the figures repeat on a busy machine; they leave out"
  echo "the kernel's work (the socket system calls, about the same for every proxy) and the cost of"
  echo "cache misses. A copy done by one \`rep movsb\` counts as one instruction."
  echo
  echo "| proxy | clients | access log | instructions per request | vs nginx (same clients and log setting) |"
  echo "|---|---|---|---:|---:|"
  echo "| **tether** | h1 | on | $t | $(ratio "$t" "$n")× |"
  echo "| nginx | h1 | on | $n | 1.00× |"
  echo "| **tether** | h1 | off | $toff | $(ratio "$toff" "$noff")× |"
  echo "| nginx | h1 | off | $noff | 1.00× |"
  echo "| **tether** | h2 | on | $t2 | $(ratio "$t2" "$n2")× |"
  echo "| nginx | h2 | on | $n2 | 1.00× |"
  echo
  echo "- tether: $("$BIN/tether" --version 2>/dev/null || echo tether), release profile"
  echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
  echo "- valgrind: $(valgrind --version)"
} >"$ROOT/bench/RESULTS-instructions.md"
log "wrote bench/RESULTS-instructions.md"
