#!/usr/bin/env bash
# Side-by-side benchmark of tether against nginx, HAProxy and Caddy on this machine, in one run.
#
#   bench/compare/run.sh            full run (under 10 minutes on 2 cores, after the build)
#   bench/compare/run.sh --quick    short run (under 2 minutes, after the build)
#
# Options: --proxies tether,nginx,haproxy,caddy   (subset; the direct baseline always runs for throughput)
#          --no-install                             (do not apt-get missing tools)
#          --no-build                               (use the binaries already in $CARGO_TARGET_DIR/release)
#          --out DIR                                (where RESULTS.md and results.png go; default bench/)
#
# Installs missing tools from Debian packages, builds tether and the harness in release mode,
# starts every proxy with a config generated for this run on free loopback ports, and stops
# everything it started, by pid, on exit. Writes bench/RESULTS.md and bench/results.png.
set -euo pipefail

MODE=full
PROXIES="tether,nginx,haproxy,caddy"
INSTALL=1
BUILD=1
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT="$ROOT/bench"
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --proxies) PROXIES="$2"; shift ;;
    --no-install) INSTALL=0 ;;
    --no-build) BUILD=0 ;;
    --out) OUT="$2"; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown option $1" >&2; exit 64 ;;
  esac
  shift
done

if [ "$MODE" = quick ]; then
  ROUNDS=1; T_LOAD=2; T_STREAM=2; CANCEL_N=60; MIX_S=2; IDLE_N=2000; IDLE_SETTLE=5; T_CPU=2; T_PERF=2
  CPU_ROUNDS=1
  # The backend alone is the baseline for throughput; elsewhere only a reference, left out here.
  REF=()
  WASTE_CASES="h1-h1 h2-h1"; CPU_CASES="h1"
else
  # Windows sized so that the whole run, nginx-same included, measures in under 10 minutes on
  # 2 cores.
  ROUNDS=2; T_LOAD=5; T_STREAM=5; CANCEL_N=300; MIX_S=6; IDLE_N=10000; IDLE_SETTLE=5; T_CPU=5; T_PERF=4
  # The median of three: one round disturbed by other work on the machine does not decide it.
  CPU_ROUNDS=3
  REF=(direct)
  WASTE_CASES="h1-h1 h2-h1 h2-h2"; CPU_CASES="h1 h2"
fi

# shellcheck source=../lib.sh
source "$ROOT/bench/lib.sh"
STARTED=$(date +%s)
RUN=$(mktemp -d /tmp/tether-compare.XXXXXX)

# ---------------------------------------------------------------------------------------------
# Tools.
SKIPPED=()
have_caddy=1
if [ "$INSTALL" = 1 ]; then
  need=()
  command -v nginx >/dev/null || need+=(nginx)
  command -v haproxy >/dev/null || need+=(haproxy)
  command -v wrk >/dev/null || need+=(wrk)
  command -v h2load >/dev/null || need+=(nghttp2-client)
  [ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
  command -v caddy >/dev/null || need+=(caddy)
  if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    as_root=(); [ "$(id -u)" = 0 ] || as_root=(sudo)
    "${as_root[@]}" apt-get update -qq
    # Read whole before matching: with pipefail, `grep -q` leaving early fails the pipe.
    if [[ " ${need[*]} " == *" caddy "* ]] && [[ "$(apt-cache policy caddy 2>/dev/null)" != *"Candidate: "[0-9]* ]]; then
      need=("${need[@]/caddy}")
    fi
    # shellcheck disable=SC2068
    DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends ${need[@]} >&2
  fi
fi
for t in nginx haproxy wrk h2load; do
  command -v "$t" >/dev/null || { echo "run.sh: $t is missing" >&2; exit 1; }
done
if ! command -v caddy >/dev/null; then
  have_caddy=0
  SKIPPED+=("caddy: not installed, and this Debian release has no caddy package")
fi
HAVE_PERF=0
if command -v perf >/dev/null && perf stat -e task-clock true >/dev/null 2>&1; then HAVE_PERF=1; fi

# ---------------------------------------------------------------------------------------------
# Build.
release_binaries "$BUILD"
# The time limits are for the measurements: installs and the build are counted apart.
MEASURING=$(date +%s)
TETHER="$BIN/tether"
CLIENT="$BIN/compare-client"

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
# HAProxy reserves two descriptors per connection (downstream and upstream), so it admits at most
# NOFILE / 2 connections; every proxy gets the same N.
IDLE_MAX=$(( (NOFILE / 2 - 500) / 1000 * 1000 ))
if [ "$IDLE_N" -gt "$IDLE_MAX" ]; then
  SKIPPED+=("idle connections: $IDLE_MAX instead of $IDLE_N, because the descriptor limit here is $NOFILE (hard) and HAProxy needs two per connection")
  IDLE_N=$IDLE_MAX
fi
CLK_TCK=$(getconf CLK_TCK)

free_ports() { "$CLIENT" free-ports "$1"; }

cpu_ticks() { # PID: "utime stime" summed over the process tree
  local user=0 sys=0 p u k
  for p in $(tree "$1"); do
    read -r u k < <(sed 's/^.*) //' "/proc/$p/stat" 2>/dev/null | awk '{print $12, $13}') || true
    user=$((user + ${u:-0}))
    sys=$((sys + ${k:-0}))
  done
  echo "$user $sys"
}

RESULTS="$RUN/results.jsonl"
: >"$RESULTS"
emit() { # SCENARIO PROXY CASE ROUND JSON
  printf '{"scenario":"%s","proxy":"%s","case":"%s","round":%s,"m":%s}\n' "$1" "$2" "$3" "$4" "$5" >>"$RESULTS"
}

# ---------------------------------------------------------------------------------------------
# The backend: one for the whole run.
read -r BPORT < <(free_ports 1)
"$BIN/compare-backend" --listen "127.0.0.1:$BPORT" --threads 2 >"$RUN/backend.log" 2>&1 &
BACKEND_PID=$!
PIDS+=("$BACKEND_PID")
wait_port "$BPORT" "$BACKEND_PID"
log "backend on 127.0.0.1:$BPORT (pid $BACKEND_PID), run directory $RUN"

# ---------------------------------------------------------------------------------------------
# Proxies. start_proxy NAME sets PROXY_PID and the ports: H1 (h1 → h1 upstream), H2 (h2c → h1
# upstream) and H2H2 (h2c → h2c upstream; empty when the proxy cannot).
PROXY_PID=""; H1=""; H2=""; H2H2=""

start_proxy() {
  local name=$1 dir="$RUN/$1" p
  mkdir -p "$dir"
  mapfile -t p < <(free_ports 3)
  H1=${p[0]}; H2=${p[1]}; H2H2=${p[2]}
  case "$name" in
    direct)
      PROXY_PID=$BACKEND_PID; H1=$BPORT; H2=$BPORT; H2H2=$BPORT
      return 0 ;;
    tether)
      cat >"$dir/tether.toml" <<EOF
workers = 2
shutdown_grace = "0s"

[[listeners]]
address = "127.0.0.1:$H1"
protocols = ["http1"]
  [[listeners.routes]]
  upstream = "backend_h1"

[[listeners]]
address = "127.0.0.1:$H2"
protocols = ["h2c"]
  [[listeners.routes]]
  upstream = "backend_h1"

[[listeners]]
address = "127.0.0.1:$H2H2"
protocols = ["h2c"]
  [[listeners.routes]]
  upstream = "backend_h2"

[[upstreams]]
name = "backend_h1"
addresses = ["127.0.0.1:$BPORT"]
protocol = "http1"
max_idle_per_endpoint = 64
idle_timeout = "60s"

[[upstreams]]
name = "backend_h2"
addresses = ["127.0.0.1:$BPORT"]
protocol = "h2c"
EOF
      # The access log (one JSON line per request) goes to stdout; like the others', to /dev/null.
      "$TETHER" serve --config "$dir/tether.toml" >/dev/null 2>"$dir/stderr.log" &
      ;;
    nginx|nginx-same)
      mkdir -p "$dir/tmp"
      # nginx-same: nginx doing per request what tether does by default (see SAME above).
      local same="" same_server=""
      if [ "$name" = nginx-same ]; then
        same=$(nginx_same_http)
        same_server=$(nginx_same_server)
      fi
      cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes 2;
worker_rlimit_nofile $NOFILE;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections $((NOFILE - 100)); }
http {
$same
  access_log /dev/null${same:+ same};
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  upstream backend {
    server 127.0.0.1:$BPORT;
    keepalive 64;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
  }
  proxy_http_version 1.1;
  proxy_set_header Connection "";
  proxy_max_temp_file_size 0;
  server {
    listen 127.0.0.1:$H1;
$same_server
    location / { proxy_pass http://backend; }
  }
  server {
    listen 127.0.0.1:$H2 http2;
$same_server
    location / { proxy_pass http://backend; }
  }
}
EOF
      H2H2=""
      nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log" >/dev/null 2>"$dir/stderr.log" &
      ;;
    haproxy)
      cat >"$dir/haproxy.cfg" <<EOF
global
  nbthread 2
  maxconn $(( (NOFILE - 100) / 2 ))
  log stdout format raw local0
defaults
  mode http
  log global
  option httplog
  # Abort the upstream request when the client closes, as nginx and tether do by default.
  option abortonclose
  http-reuse always
  maxconn $(( (NOFILE - 100) / 2 ))
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  timeout http-keep-alive 60s
frontend fe_h1
  bind 127.0.0.1:$H1
  default_backend be_h1
frontend fe_h2
  bind 127.0.0.1:$H2 proto h2
  default_backend be_h1
frontend fe_h2h2
  bind 127.0.0.1:$H2H2 proto h2
  default_backend be_h2
backend be_h1
  server s1 127.0.0.1:$BPORT
backend be_h2
  server s1 127.0.0.1:$BPORT proto h2
EOF
      haproxy -db -f "$dir/haproxy.cfg" >/dev/null 2>"$dir/stderr.log" &
      ;;
    caddy)
      cat >"$dir/Caddyfile" <<EOF
{
  admin off
  auto_https off
  servers {
    protocols h1 h2 h2c
  }
}
http://:$H1, http://:$H2 {
  bind 127.0.0.1
  log {
    output stdout
  }
  reverse_proxy 127.0.0.1:$BPORT {
    transport http {
      keepalive 60s
      keepalive_idle_conns_per_host 64
    }
  }
}
http://:$H2H2 {
  bind 127.0.0.1
  log {
    output stdout
  }
  reverse_proxy 127.0.0.1:$BPORT {
    transport http {
      versions h2c 2
    }
  }
}
EOF
      GOMAXPROCS=2 XDG_DATA_HOME="$dir/data" XDG_CONFIG_HOME="$dir/config" \
        caddy run --config "$dir/Caddyfile" --adapter caddyfile >/dev/null 2>"$dir/stderr.log" &
      ;;
  esac
  PROXY_PID=$!
  PIDS+=("$PROXY_PID")
  wait_port "$H1" "$PROXY_PID" && wait_port "$H2" "$PROXY_PID" || { tail -5 "$dir/stderr.log" >&2; return 1; }
  [ -z "$H2H2" ] || wait_port "$H2H2" "$PROXY_PID"
}

stop_proxy() {
  [ "$PROXY_PID" = "$BACKEND_PID" ] || stop_pid "$PROXY_PID"
  PROXY_PID=""
}

LIST=(); IFS=',' read -r -a LIST <<<"$PROXIES"
if [ "$have_caddy" = 0 ]; then
  keep=(); for p in "${LIST[@]}"; do [ "$p" = caddy ] || keep+=("$p"); done; LIST=("${keep[@]}")
fi
# nginx-same: nginx configured to do per request what tether does by default (the client's Host
# passed on; X-Forwarded-For, X-Forwarded-Proto and Forwarded added; a request id sent upstream and
# returned to the client; a JSON access-log line with the upstream timings), beside nginx as
# configured above. Measured for throughput and CPU at fixed load, in full mode only (the quick
# run has no time for it). The targets are judged against plain nginx.
SAME=()
if [ "$MODE" = full ] && [[ " ${LIST[*]} " == *" nginx "* ]]; then SAME=(nginx-same); fi
reversed() { local i; for ((i = $# ; i > 0 ; i--)); do echo "${!i}"; done; }

# Bounded external tools: a hung tool must not hang the run.
bounded() { timeout --kill-after=5 "$1" "${@:2}"; }

# ---------------------------------------------------------------------------------------------
# 1. Throughput and latency, small responses.
scenario_throughput() {
  local round=$1 proxy f
  shift
  for proxy in "$@"; do
    start_proxy "$proxy"
    f="$RUN/tp.$proxy.$round"
    bounded 20 wrk -t2 -c64 -d1s "http://127.0.0.1:$H1/" >/dev/null
    bounded $((T_LOAD + 20)) wrk -t2 -c64 -d"${T_LOAD}s" --latency "http://127.0.0.1:$H1/" >"$f.h1.txt"
    emit throughput "$proxy" h1 "$round" "$("$CLIENT" parse-wrk "$f.h1.txt")"
    bounded 20 h2load -t2 -c8 -m8 -D 1 "http://127.0.0.1:$H2/" >/dev/null
    bounded $((T_LOAD + 20)) h2load -t2 -c8 -m8 -D "$T_LOAD" --log-file="$f.h2.log" "http://127.0.0.1:$H2/" >"$f.h2.txt"
    emit throughput "$proxy" h2 "$round" "$("$CLIENT" parse-h2load "$f.h2.txt" --log "$f.h2.log")"
    rm -f "$f.h2.log"
    stop_proxy
    log "throughput round $round: $proxy done"
  done
}

# 2. Streaming a large body; peak RSS of a freshly started proxy.
scenario_stream() {
  local proxy f m rss
  for proxy in "${REF[@]}" "${LIST[@]}"; do
    start_proxy "$proxy"
    f="$RUN/stream.$proxy.txt"
    bounded $((T_STREAM + 30)) wrk -t1 -c4 -d"${T_STREAM}s" --timeout 20s \
      "http://127.0.0.1:$H1/large?bytes=268435456" >"$f"
    m=$("$CLIENT" parse-wrk "$f")
    if [ "$proxy" != direct ]; then
      rss=$(sum_status VmHWM "$PROXY_PID")
      m="${m%\}},\"peak_rss_mib\":$(awk -v k="$rss" 'BEGIN{printf "%.1f", k/1024}')}"
    fi
    emit stream "$proxy" h1 1 "$m"
    stop_proxy
  done
  log "streaming done"
}

# 3. Cancellation propagation latency. 30 clients, each with its own connection, abort one
# request after another: 300 aborts give a p99 that a single late sample does not decide, in
# the time 100 sequential ones would take.
scenario_cancel() {
  local proxy case port proto m
  for proxy in "${REF[@]}" "${LIST[@]}"; do
    start_proxy "$proxy"
    for case in h1-h1 h2-h1 h2-h2; do
      case "$case" in
        h1-h1) port=$H1; proto=h1 ;;
        h2-h1) port=$H2; proto=h2 ;;
        h2-h2) port=$H2H2; proto=h2 ;;
      esac
      [ -n "$port" ] || continue
      # Without a proxy there is no h2 → h1 translation.
      if [ "$proxy" = direct ] && [ "$case" = h2-h1 ]; then continue; fi
      m=$(bounded 60 "$CLIENT" cancel --target "127.0.0.1:$port" --backend "127.0.0.1:$BPORT" \
        --proto "$proto" --n "$CANCEL_N" --concurrency 30 --work-ms 2000 --seed 7)
      emit cancel "$proxy" "$case" 1 "$m"
    done
    stop_proxy
    log "cancellation: $proxy done"
  done
}

# 4. Wasted upstream work, 30 % of the requests given up.
scenario_waste() {
  local proxy case port proto m
  for proxy in "${LIST[@]}"; do
    start_proxy "$proxy"
    for case in $WASTE_CASES; do
      case "$case" in
        h1-h1) port=$H1; proto=h1 ;;
        h2-h1) port=$H2; proto=h2 ;;
        h2-h2) port=$H2H2; proto=h2 ;;
      esac
      [ -n "$port" ] || continue
      m=$(bounded $((MIX_S + 60)) "$CLIENT" mix --target "127.0.0.1:$port" --backend "127.0.0.1:$BPORT" \
        --proto "$proto" --clients 32 --duration-s "$MIX_S" --abort-share 0.3 --seed 11)
      emit waste "$proxy" "$case" 1 "$m"
    done
    stop_proxy
    log "wasted work: $proxy done"
  done
}

# 5. RSS per idle keep-alive connection.
scenario_idle() {
  local proxy before early after ready cpid open m
  # direct: the backend itself (hyper), a reference for what a hyper server costs per connection.
  for proxy in "${REF[@]}" "${LIST[@]}"; do
    start_proxy "$proxy"
    # Touch every worker's lazily allocated state before the baseline.
    bounded 20 h2load --h1 -c8 -n 2000 "http://127.0.0.1:$H1/" >/dev/null
    sleep 0.5
    before=$(sum_status VmRSS "$PROXY_PID")
    ready="$RUN/idle.$proxy.json"
    rm -f "$ready"
    "$CLIENT" idle --target "127.0.0.1:$H1" --n "$IDLE_N" --hold-s 120 --ready-file "$ready" &
    cpid=$!
    PIDS+=("$cpid")
    for _ in $(seq 1 600); do [ -f "$ready" ] && break; kill -0 "$cpid" 2>/dev/null || break; sleep 0.1; done
    # Read 1 s after the last connection opened, and again once the connections have been idle
    # for IDLE_SETTLE s: memory an allocator frees late after the burst shows in the first only.
    sleep 1
    early=$(sum_status VmRSS "$PROXY_PID")
    sleep $((IDLE_SETTLE - 1))
    after=$(sum_status VmRSS "$PROXY_PID")
    stop_pid "$cpid"
    if [ -f "$ready" ]; then
      open=$(sed 's/.*"open":\([0-9]*\).*/\1/' "$ready")
      m=$(awk -v b="$before" -v e="$early" -v a="$after" -v n="$open" -v req="$IDLE_N" 'BEGIN{
        printf "{\"requested\":%d,\"open\":%d,\"rss_before_mib\":%.1f,\"rss_after_mib\":%.1f,\"per_conn_kib\":%s,\"per_conn_kib_1s\":%s}",
          req, n, b/1024, a/1024, (n > 0 ? sprintf("%.2f", (a-b)/n) : "null"), (n > 0 ? sprintf("%.2f", (e-b)/n) : "null") }')
      emit idle "$proxy" h1 1 "$m"
    fi
    stop_proxy
    log "idle connections: $proxy done"
  done
}

# 6. CPU per request at a fixed offered load (12 800 req/s).
PROFILES=()
scenario_cpu() {
  local round=$1 proxy case args url f t0 t1 m done_n pp
  shift
  for proxy in "$@"; do
    start_proxy "$proxy"
    for case in $CPU_CASES; do
      if [ "$case" = h1 ]; then args=(--h1 -t2 -c64 --rps 200); url="http://127.0.0.1:$H1/"
      else args=(-t2 -c8 -m8 --rps 1600); url="http://127.0.0.1:$H2/"; fi
      f="$RUN/cpu.$proxy.$case.$round"
      bounded 20 h2load "${args[@]}" -D 1 "$url" >/dev/null
      t0=$(cpu_ticks "$PROXY_PID")
      if [ "$HAVE_PERF" = 1 ] && [ "$round" = 1 ]; then
        # Software counters only: they cost next to nothing, unlike sampling.
        perf stat -e task-clock,context-switches,cpu-migrations,page-faults \
          -p "$(tree "$PROXY_PID" | paste -sd,)" -o "$f.perfstat" -- sleep "$T_CPU" >/dev/null 2>&1 &
        pp=$!
      else
        pp=""
      fi
      bounded $((T_CPU + 20)) h2load "${args[@]}" -D "$T_CPU" "$url" >"$f.txt"
      t1=$(cpu_ticks "$PROXY_PID")
      [ -z "$pp" ] || wait "$pp" 2>/dev/null || true
      m=$("$CLIENT" parse-h2load "$f.txt")
      done_n=$(printf '%s' "$m" | sed -n 's/.*"done":\([0-9]*\).*/\1/p')
      # Total, and split into user space and kernel (utime and stime).
      m="${m%\}},$(awk -v a="$t0" -v b="$t1" -v hz="$CLK_TCK" -v n="${done_n:-0}" 'BEGIN{
        split(a, x, " "); split(b, y, " "); u = y[1] - x[1]; k = y[2] - x[2]
        if (n > 0) printf "\"cpu_ticks\":%d,\"cpu_us_per_req\":%.2f,\"cpu_user_us_per_req\":%.2f,\"cpu_sys_us_per_req\":%.2f", u + k, (u + k) * 1e6 / hz / n, u * 1e6 / hz / n, k * 1e6 / hz / n
        else printf "\"cpu_ticks\":%d,\"cpu_us_per_req\":null", u + k }')}"
      emit cpu "$proxy" "$case" "$round" "$m"
      if [ -f "$f.perfstat" ]; then
        { echo "$proxy, $case at 12 800 req/s for ${T_CPU} s: perf stat"; grep -E 'task-clock|context-switches|migrations|page-faults|elapsed' "$f.perfstat"; } >"$RUN/perfstat.$proxy.$case.txt"
      fi
      # A sampled profile of tether, in a separate window so sampling does not skew its figure.
      if [ "$HAVE_PERF" = 1 ] && [ "$round" = 1 ] && [ "$proxy" = tether ] && [ "$case" = h1 ]; then
        bounded $((T_CPU + 20)) h2load "${args[@]}" -D "$T_CPU" "$url" >/dev/null &
        local hp=$!
        PIDS+=("$hp")
        sleep 0.5
        bounded 30 perf record -F 1999 -p "$PROXY_PID" -o "$RUN/perf.tether.data" -- sleep "$T_PERF" >/dev/null 2>&1 || true
        stop_pid "$hp"
        perf report -i "$RUN/perf.tether.data" --no-children --sort dso,symbol --stdio \
          --percent-limit 0.2 2>/dev/null | grep -v '^#' | grep -v '^$' | sed -E 's/( +-)+ *$//; s/  +/  /g' \
          | cut -c1-150 >"$RUN/profile.tether.txt" || true
      fi
    done
    stop_proxy
    log "cpu at fixed load round $round: $proxy done"
  done
}

# ---------------------------------------------------------------------------------------------
log "mode $MODE: proxies ${LIST[*]} ${SAME[*]}, $ROUNDS round(s)"
for r in $(seq 1 "$ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order=(direct "${LIST[@]}" "${SAME[@]}"); else mapfile -t order < <(reversed direct "${LIST[@]}" "${SAME[@]}"); fi
  scenario_throughput "$r" "${order[@]}"
done
scenario_stream
scenario_cancel
scenario_waste
scenario_idle
for r in $(seq 1 "$CPU_ROUNDS"); do
  if [ $((r % 2)) = 1 ]; then order=("${LIST[@]}" "${SAME[@]}"); else mapfile -t order < <(reversed "${LIST[@]}" "${SAME[@]}"); fi
  scenario_cpu "$r" "${order[@]}"
done

# ---------------------------------------------------------------------------------------------
# Report.
jstr() { printf '"%s"' "$(printf '%s' "$1" | sed 's/\\/\\\\/g; s/"/\\"/g' | tr -d '\n')"; }
pairs=()
pairs+=("[$(jstr tether),$(jstr "$("$TETHER" --version 2>&1 | head -1) (release profile: fat LTO, codegen-units 1, panic abort)")]")
pairs+=("[$(jstr nginx),$(jstr "$(nginx -v 2>&1 | head -1)")]")
pairs+=("[$(jstr HAProxy),$(jstr "$(haproxy -v 2>&1 | head -1)")]")
[ "$have_caddy" = 0 ] || pairs+=("[$(jstr Caddy),$(jstr "$(caddy version 2>&1 | head -1)")]")
pairs+=("[$(jstr wrk),$(jstr "$(wrk -v 2>&1 | head -1 | sed 's/ Copyright.*//')")]")
pairs+=("[$(jstr h2load),$(jstr "$(h2load --version 2>&1 | head -1)")]")
pairs+=("[$(jstr rustc),$(jstr "$(rustc --version 2>&1)")]")
pairs+=("[$(jstr backend),$(jstr "compare-backend: hyper 1.x server (h1 + h2c on one port), tokio multi-thread runtime with 2 worker threads")]")
settings=(
  "2 workers: tether \`workers = 2\`, nginx \`worker_processes 2\`, HAProxy \`nbthread 2\`, Caddy \`GOMAXPROCS=2\`."
  "Access logs on for all, one line per request, written to /dev/null (tether: JSON lines on stdout, its default)."
  "Keep-alive to the backend for all: nginx \`keepalive 64\`, HAProxy \`http-reuse always\`, Caddy \`keepalive_idle_conns_per_host 64\`, tether \`max_idle_per_endpoint = 64\`."
  "Client aborts reach the upstream by default in nginx, Caddy and tether; HAProxy gets \`option abortonclose\` for the same behaviour."
  "Everything on 127.0.0.1; h2 is cleartext h2c with prior knowledge on every proxy (no TLS in this run)."
  "Descriptor limit $NOFILE; idle-connection scenario with $IDLE_N connections."
)
if [ ${#SAME[@]} -gt 0 ]; then
  settings+=("\`nginx-same\` (throughput and CPU at fixed load only): nginx configured to do per request what tether does by default: the client's Host passed on, \`X-Forwarded-For\`, \`X-Forwarded-Proto\` and \`Forwarded\` added, a request id (\`\$request_id\`) sent upstream and returned as \`X-Request-Id\`, and a JSON access-log line (\`escape=json\`) with the client and local addresses, request, status, sizes, durations and upstream timings. Plain \`nginx\` does none of this; the targets are judged against plain nginx.")
fi
settings_json=""
for s in "${settings[@]}"; do settings_json+="${settings_json:+,}$(jstr "$s")"; done
skipped_json=""
SKIPPED+=("nginx h2-h2: nginx proxies HTTP/2 to upstreams only for gRPC (grpc_pass), not for plain HTTP")
for s in "${SKIPPED[@]}"; do skipped_json+="${skipped_json:+,}$(jstr "$s")"; done
profiles_json=""
for f in "$RUN"/perfstat.*.h1.txt "$RUN"/perfstat.*.h2.txt; do
  [ -f "$f" ] || continue
  n=$(basename "$f" .txt); n=${n#perfstat.}
  profiles_json+="${profiles_json:+,}[$(jstr "perf stat, ${n/./ }"),$(jstr "$f")]"
done
if [ -s "$RUN/profile.tether.txt" ]; then
  profiles_json+="${profiles_json:+,}[$(jstr "tether, h1 at 12 800 req/s: perf record -F 1999 for $T_PERF s, symbols by self time"),$(jstr "$RUN/profile.tether.txt")]"
fi
mem=$(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)
cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
cat >"$RUN/meta.json" <<EOF
{"date":$(jstr "$(date -u '+%Y-%m-%d %H:%M UTC')"),"mode":"$MODE","rounds":$ROUNDS,"cpu_rounds":$CPU_ROUNDS,
 "nproc":$(jstr "$(nproc)"),"cpu":$(jstr "$cpu"),"kernel":$(jstr "$(uname -r)"),"memory":$(jstr "$mem"),
 "versions":[$(IFS=,; echo "${pairs[*]}")],
 "settings":[$settings_json],"skipped":[$skipped_json],"profiles":[$profiles_json],
 "load":$(jstr "1/5/15-minute load average $LOAD_START at the start of the measurements, $(cut -d' ' -f1-3 /proc/loadavg) at the end"),
 "setup_s":$(( MEASURING - STARTED )),"elapsed_s":$(( $(date +%s) - MEASURING ))}
EOF
mkdir -p "$OUT"
"$BIN/compare-report" --results "$RESULTS" --meta "$RUN/meta.json" --md "$OUT/RESULTS.md" --png "$OUT/results.png"
log "wrote $OUT/RESULTS.md and $OUT/results.png (raw results in $RUN)"
