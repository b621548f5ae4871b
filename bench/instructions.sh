#!/usr/bin/env bash
# User-space instructions per proxied request, tether and nginx side by side, counted by
# valgrind's callgrind: a count, not a time, so it is the same on a busy machine as on an idle one
# and shows per-request work that noisy CPU-time figures hide. A bare hyper proxy
# (bench/compare/harness/src/bin/compare-bare.rs) is counted too: what hyper and tokio cost per
# request before any of tether's own work, so the gap to nginx splits into the two. nginx is
# counted twice more as `nginx-same`, configured to do per request what tether does by default
# (forwarding headers, a request id both ways, a JSON access-log line).
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
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
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

# nginx_conf ACCESS_LOG [same]: `same` configures nginx to do per request what tether does by
# default, as bench/compare/run.sh's nginx-same (nginx_same_http in lib.sh).
nginx_conf() {
  mkdir -p "$RUN/nginx/tmp"
  local same="" same_server="" format=""
  if [ "${2:-}" = same ]; then
    same=$(nginx_same_http)
    same_server=$(nginx_same_server)
    format=" same"
  fi
  cat >"$RUN/nginx/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
pid $RUN/nginx/nginx.pid;
error_log $RUN/nginx/error.log warn;
events { worker_connections 1024; }
http {
$same
  access_log $1$format;
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
$same_server
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
bare=("$BIN/compare-bare" --listen "127.0.0.1:$PPORT" --listen-h2 "127.0.0.1:$P2PORT" --upstream "127.0.0.1:$BPORT")
measure "bare" h1 "${bare[@]}"
measure "bare-h2" h2 "${bare[@]}"
nginx_conf /dev/null
measure "nginx" h1 nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -e "$RUN/nginx/error.log"
measure "nginx-h2" h2 nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -e "$RUN/nginx/error.log"
nginx_conf off
measure "nginx-log-off" h1 nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -e "$RUN/nginx/error.log"
nginx_conf /dev/null same
measure "nginx-same" h1 nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -e "$RUN/nginx/error.log"
measure "nginx-same-h2" h2 nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -e "$RUN/nginx/error.log"

# incl LABEL FUNCTION: FUNCTION's inclusive instructions per request in LABEL's profile (0 when the
# name is not in it).
incl() {
  local label=$1 fn=$2 r n
  for r in "${ROWS[@]}"; do [ "${r%%|*}" = "$label" ] && n=${r##*|}; done
  callgrind_annotate --inclusive=yes --threshold=100 "$RUN/callgrind.$label.1" 2>/dev/null |
    awk -v fn="$fn" -v n="$n" '
      { line = $0; sub(/^ *[0-9,]+ \([ 0-9.%]+\) +/, "", line); sub(/^[^:]*:/, "", line); sub(/ \[[^]]*\]$/, "", line) }
      line == fn { v = $1; gsub(/,/, "", v); if (v + 0 > best) best = v + 0 }
      END { printf "%d", best / n }'
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
get() { local r; for r in "${ROWS[@]}"; do [ "${r%%|*}" = "$1" ] && { r=${r#*|}; echo "${r%%|*}"; return; }; done; }
t=$(get tether); toff=$(get tether-log-off); n=$(get nginx); noff=$(get nginx-log-off)
t2=$(get tether-h2); n2=$(get nginx-h2)
b=$(get bare); b2=$(get bare-h2)
ns=$(get nginx-same); ns2=$(get nginx-same-h2)
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
  echo "| bare hyper proxy | h1 | none | $b | $(ratio "$b" "$noff")× (vs nginx, log off) |"
  echo "| bare hyper proxy | h2 | none | $b2 | $(ratio "$b2" "$n2")× |"
  echo
  echo "tether does more per request by default than nginx as configured above: it passes on the"
  echo "client's Host, adds \`X-Forwarded-For\`, \`X-Forwarded-Proto\` and \`Forwarded\`, sends a request"
  echo "id upstream and returns it to the client, and its access-log line is JSON with upstream"
  echo "timings. \`nginx-same\` is nginx configured to do the same (\`proxy_set_header\` for each"
  echo "header, \`\$request_id\`, \`add_header X-Request-Id\`, a \`log_format ... escape=json\` line; the"
  echo "configuration is in [instructions.sh](instructions.sh)):"
  echo
  echo "| proxy | clients | access log | instructions per request | tether / this |"
  echo "|---|---|---|---:|---:|"
  echo "| nginx-same | h1 | on (JSON) | $ns | $(ratio "$t" "$ns")× |"
  echo "| nginx-same | h2 | on (JSON) | $ns2 | $(ratio "$t2" "$ns2")× |"
  echo
  echo "The bare hyper proxy ([compare-bare.rs](compare/harness/src/bin/compare-bare.rs)) is what"
  echo "tether is built from and nothing more: hyper's HTTP/1.1 and HTTP/2 servers, hyper's HTTP/1.1"
  echo "client over a thread-local keep-alive pool, tokio's current-thread runtime, jemalloc; no"
  echo "routing, request ids, forwarding headers, cancellation context, disconnect watcher, timeouts,"
  echo "retries, metrics or access log. Against it, tether's own work per request is:"
  echo
  echo "| clients | tether (log on) | bare hyper proxy | tether's own work | share of tether's total |"
  echo "|---|---:|---:|---:|---:|"
  echo "| h1 | $t | $b | $((t - b)) | $(awk -v a=$((t - b)) -v c="$t" 'BEGIN { printf "%.0f %%", 100 * a / c }') |"
  echo "| h2 | $t2 | $b2 | $((t2 - b2)) | $(awk -v a=$((t2 - b2)) -v c="$t2" 'BEGIN { printf "%.0f %%", 100 * a / c }') |"
  echo
  echo "Where it goes (h1, log on): the same pieces of the two proxies, each with everything it calls"
  echo "(callgrind's inclusive count per request; a piece's figure includes the pieces below it that"
  echo "it runs)."
  echo
  echo "| piece | tether | bare hyper proxy |"
  echo "|---|---:|---:|"
  echo "| downstream connection task: hyper's server and everything it polls | $(incl tether 'tether_gateway::downstream::h1::serve_tcp::{{closure}}') | $(incl bare 'compare_bare::accept::{{closure}}::{{closure}}') |"
  echo "| the request handler, to the response head: routing, request id and record, header rewriting, cancellation context, pool checkout, hyper's client send | $(incl tether 'tether_gateway::proxy::handle::{{closure}}') | $(incl bare 'compare_bare::proxy::{{closure}}') |"
  echo "| the response body, to its end: idle timeout, pool return, metrics, access log | $(incl tether '<tether_gateway::downstream::probe::GuardedBody<B> as http_body::Body>::poll_frame') | $(incl bare '<compare_bare::PoolBody as http_body::Body>::poll_frame') |"
  echo "| of which the access log line | $(incl tether '<tether_gateway::observe::access::JsonLines as tether_gateway::observe::access::AccessLog>::record') | none |"
  echo "| the disconnect watcher (woken only by a close or an error) | $(incl tether 'tether_gateway::downstream::h1::watch::{{closure}}') | none |"
  echo "| upstream connection task: hyper's client | $(incl tether 'tether_gateway::upstream::pool::start_h1::{{closure}}') | $(incl bare '<hyper::client::conn::http1::Connection<T,B> as core::future::future::Future>::poll') |"
  echo
  echo "- tether: $("$BIN/tether" --version 2>/dev/null || echo tether), release profile"
  echo "- nginx: $(nginx -v 2>&1 | sed 's/^nginx version: //')"
  echo "- valgrind: $(valgrind --version)"
} >"$ROOT/bench/RESULTS-instructions.md"
log "wrote bench/RESULTS-instructions.md"
