#!/usr/bin/env bash
# CPU per request for keep-alive clients that pause between requests, tether and nginx side by
# side: the pattern of browsers and API clients, where a connection is idle most of the time.
#
#   bench/sparse.sh [--no-build] [--seconds S] [--rounds R]
#
# Each case is h2load with 120 HTTP/1.1 keep-alive clients, each sending one `GET /` (100-byte
# body) every GAP: 250 ms (below tether's 500 ms parking delay: connections stay active), 2 s
# (above it: every request wakes a parked connection), and a busy reference of 64 clients at
# 200 requests a second each (bench/compare's fixed load). CPU time is read from
# /proc/PID/task/*/schedstat (nanoseconds, every thread of every process of the proxy) over the
# window of S seconds (default 10), after a 2 s warm-up; R rounds (default 2), proxies
# alternating. Both proxies run 2 workers, write an access-log line per request to /dev/null and
# keep 64 idle connections to the backend (bench/compare's backend). Writes
# bench/RESULTS-sparse.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=1
SECONDS_PER=10
ROUNDS=2
while [ $# -gt 0 ]; do
  case "$1" in
    --no-build) BUILD=0 ;;
    --seconds) SECONDS_PER="$2"; shift ;;
    --rounds) ROUNDS="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "sparse.sh: unknown option $1" >&2; exit 64 ;;
  esac
  shift
done

# shellcheck source=lib.sh
source "$ROOT/bench/lib.sh"

need=()
command -v nginx >/dev/null || need+=(nginx)
command -v h2load >/dev/null || need+=(nghttp2-client)
install_packages "${need[@]}"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
if [ "$BUILD" = 1 ]; then build_release; fi
BIN="$CARGO_TARGET_DIR/release"
ulimit -n 65536 2>/dev/null || true

RUN=$(mktemp -d /tmp/tether-sparse.XXXXXX)
mapfile -t ports < <("$BIN/compare-client" free-ports 3)
BPORT=${ports[0]}
TPORT=${ports[1]}
NPORT=${ports[2]}
"$BIN/compare-backend" --listen "127.0.0.1:$BPORT" --threads 2 >"$RUN/backend.log" 2>&1 &
PIDS+=($!)
wait_port "$BPORT" "$!"

tether_h1_config "$RUN/tether.toml" 2 "$TPORT" "$BPORT"

mkdir -p "$RUN/nginx/tmp"
cat >"$RUN/nginx/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 2;
pid $RUN/nginx/nginx.pid;
error_log $RUN/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log /dev/null;
  client_body_temp_path $RUN/nginx/tmp/body;
  proxy_temp_path $RUN/nginx/tmp/proxy;
  fastcgi_temp_path $RUN/nginx/tmp/fastcgi;
  uwsgi_temp_path $RUN/nginx/tmp/uwsgi;
  scgi_temp_path $RUN/nginx/tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  upstream backend { server 127.0.0.1:$BPORT; keepalive 64; }
  server {
    listen 127.0.0.1:$NPORT;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF

# PID: CPU time (ns) of every thread of PID and its children.
cpu_ns() {
  local total=0 p v
  for p in $(tree "$1"); do
    v=$(cat /proc/"$p"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.0f", s}')
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

start_proxy() { # tether|nginx: sets PID
  if [ "$1" = tether ]; then
    "$BIN/tether" serve --config "$RUN/tether.toml" >/dev/null 2>"$RUN/tether.stderr" &
  else
    nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -e "$RUN/nginx/error.log" >/dev/null 2>&1 &
  fi
  PID=$!
  PIDS+=("$PID")
}

# case name, clients, requests per second per client
CASES=("250ms 120 4" "2s 120 0.5" "busy 64 200")
ROWS=()
for round in $(seq 1 "$ROUNDS"); do
  order=(tether nginx)
  [ $((round % 2)) = 0 ] && order=(nginx tether)
  for proxy in "${order[@]}"; do
    port=$TPORT; [ "$proxy" = nginx ] && port=$NPORT
    start_proxy "$proxy"
    pid=$PID
    wait_port "$port" "$pid"
    for c in "${CASES[@]}"; do
      # shellcheck disable=SC2086
      set -- $c
      name=$1 clients=$2 rps=$3
      h2load --h1 -c "$clients" --rps "$rps" -D 2 "http://127.0.0.1:$port/" >/dev/null
      before=$(cpu_ns "$pid")
      out=$(h2load --h1 -c "$clients" --rps "$rps" -D "$SECONDS_PER" "http://127.0.0.1:$port/")
      after=$(cpu_ns "$pid")
      done_n=$(awk '/^requests:/ {print $8}' <<<"$out")
      ok=$(awk '/^status codes:/ {print $3}' <<<"$out")
      [ "${ok:-0}" = "$done_n" ] || { echo "sparse.sh: $proxy $name: $ok of $done_n requests got 2xx" >&2; exit 1; }
      us=$(awk -v a="$after" -v b="$before" -v n="$done_n" 'BEGIN {printf "%.1f", (a - b) / 1000 / n}')
      log "round $round, $proxy, $name: $us us/req ($done_n requests)"
      ROWS+=("$name $proxy $round $us $done_n")
    done
    stop_pid "$pid"
  done
done

# NAME PROXY: the median over rounds.
median() {
  local r
  for r in "${ROWS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    if [ "$1" = "$NAME" ] && [ "$2" = "$PROXY" ]; then echo "$4"; fi
  done | sort -n | awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f", (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
rounds_of() {
  local r vals=()
  for r in "${ROWS[@]}"; do
    # shellcheck disable=SC2086
    set -- $r
    if [ "$1" = "$NAME" ] && [ "$2" = "$PROXY" ]; then vals+=("$4"); fi
  done
  local IFS=/
  echo "${vals[*]}"
}

{
  echo "# CPU per request, keep-alive clients that pause"
  echo
  echo "Generated by \`bench/sparse.sh\` on $(date -u '+%Y-%m-%d %H:%M') UTC ($ROUNDS rounds, $SECONDS_PER s windows). Rerun the script rather than editing this file."
  echo
  echo "120 HTTP/1.1 keep-alive clients each send \`GET /\` (100-byte body) through the proxy once per gap;"
  echo "\`busy\` is bench/compare's fixed load (64 clients, 200 requests a second each) for reference."
  echo "CPU is every thread of the proxy, from /proc/PID/task/*/schedstat, over the window, divided by"
  echo "the requests served. Both proxies: 2 workers, an access-log line per request to /dev/null, 64"
  echo "idle connections kept to the backend. Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
  echo "| gap | requests/s | tether µs/req | nginx µs/req | tether / nginx | per round (tether; nginx) |"
  echo "|---|---:|---:|---:|---:|---|"
  for c in "${CASES[@]}"; do
    # shellcheck disable=SC2086
    set -- $c
    NAME=$1
    rate=$(awk -v c="$2" -v r="$3" 'BEGIN {printf "%d", c * r}')
    PROXY=tether; t=$(median); tr=$(rounds_of)
    PROXY=nginx; n=$(median); nr=$(rounds_of)
    ratio=$(awk -v a="$t" -v b="$n" 'BEGIN {printf "%.2f", a / b}')
    echo "| $NAME | $rate | $t | $n | ${ratio}× | $tr; $nr |"
  done
  echo
  echo "- tether: $("$BIN/tether" --version 2>/dev/null || echo tether), release profile"
  echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
} >"$ROOT/bench/RESULTS-sparse.md"
log "wrote bench/RESULTS-sparse.md"
