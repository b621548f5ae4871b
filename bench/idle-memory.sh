#!/usr/bin/env bash
# Memory per idle HTTP/1 keep-alive connection: the gateway's RSS before and after N clients
# each send one request and then stay idle (bench/compare's idle scenario, alone and quicker).
#
#   bench/idle-memory.sh [--n N] [--no-build] [--workers W] [--nginx] [--settle S]
#                        [--bin LABEL=COMMAND]...
#
# --bin runs COMMAND (default: the tether just built) as the gateway, with `serve --config FILE`
# appended; repeat it to compare binaries or settings in one run, e.g.
#   --bin base=/tmp/tether-old --bin new=target/release/tether --bin arena2="env MALLOC_ARENA_MAX=2 target/release/tether"
# --nginx adds nginx (same worker count) as a reference. Prints, per gateway: connections open,
# RSS before and after (VmRSS and its anonymous part), and KiB per connection 1 s after the last
# one opened and again after --settle seconds (default 5: memory given back late shows there).
# Starts compare-backend and each gateway on free loopback ports, and stops them by pid on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
N=10000
BUILD=1
WORKERS=2
NGINX=0
SETTLE=5
BINS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --n) N="$2"; shift ;;
    --no-build) BUILD=0 ;;
    --workers) WORKERS="$2"; shift ;;
    --nginx) NGINX=1 ;;
    --settle) SETTLE="$2"; shift ;;
    --bin) BINS+=("$2"); shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "idle-memory.sh: unknown option $1" >&2; exit 64 ;;
  esac
  shift
done

# shellcheck source=lib.sh
source "$ROOT/bench/lib.sh"

release_binaries "$BUILD"
CLIENT="$BIN/compare-client"
[ ${#BINS[@]} -gt 0 ] || BINS=("tether=$BIN/tether")
if [ "$NGINX" = 1 ] && ! command -v nginx >/dev/null; then
  echo "idle-memory.sh: --nginx needs nginx (apt-get install nginx)" >&2
  exit 1
fi

ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
if [ $((N + 500)) -gt "$NOFILE" ]; then
  echo "idle-memory.sh: --n $N needs more descriptors than the limit here ($NOFILE)" >&2
  exit 1
fi

RUN=$(mktemp -d /tmp/tether-idle-mem.XXXXXX)
read -r BPORT < <("$CLIENT" free-ports 1)
"$BIN/compare-backend" --listen "127.0.0.1:$BPORT" --threads 2 >"$RUN/backend.log" 2>&1 &
PIDS+=($!)
wait_port "$BPORT" "$!"

# Warm-up: every worker's lazily allocated state is touched before the baseline.
warm_up() {
  if command -v h2load >/dev/null; then
    timeout --kill-after=5 20 h2load --h1 -c8 -n 2000 "http://127.0.0.1:$1/" >/dev/null
  else
    timeout --kill-after=5 20 "$CLIENT" idle --target "127.0.0.1:$1" --n 16 --concurrency 8 \
      --hold-s 0 --ready-file "$RUN/warm.json" >/dev/null
  fi
}

ROWS=()
# measure LABEL PID PORT: RSS of PID before and after N idle connections to PORT.
measure() {
  local label=$1 pid=$2 port=$3 ready="$RUN/idle.$1.json" cpid open
  local rss0 anon0 rss1 anon1 rss2 anon2
  wait_port "$port" "$pid"
  warm_up "$port"
  sleep 0.5
  rss0=$(sum_status VmRSS "$pid"); anon0=$(sum_status RssAnon "$pid")
  "$CLIENT" idle --target "127.0.0.1:$port" --n "$N" --hold-s $((SETTLE + 60)) --ready-file "$ready" \
    >"$RUN/client.$label.log" 2>&1 &
  cpid=$!
  PIDS+=("$cpid")
  for _ in $(seq 1 600); do [ -f "$ready" ] && break; kill -0 "$cpid" 2>/dev/null || break; sleep 0.1; done
  [ -f "$ready" ] || { echo "idle-memory.sh: $label: the client gave up (see $RUN/client.$label.log)" >&2; exit 1; }
  # The first reading comes as tether's last connections park (500 ms idle); the second shows
  # what is left once they all have.
  sleep 1
  rss1=$(sum_status VmRSS "$pid"); anon1=$(sum_status RssAnon "$pid")
  sleep "$SETTLE"
  rss2=$(sum_status VmRSS "$pid"); anon2=$(sum_status RssAnon "$pid")
  kill -0 "$pid" 2>/dev/null || { echo "idle-memory.sh: $label exited during the run" >&2; exit 1; }
  stop_pid "$cpid"
  open=$(sed 's/.*"open":\([0-9]*\).*/\1/' "$ready")
  ROWS+=("$label $open $rss0 $rss1 $rss2 $anon0 $anon1 $anon2")
  log "$label: $open open, RSS $rss0 -> $rss1 -> $rss2 kB"
}

log "run directory $RUN; $N connections per gateway"
for spec in "${BINS[@]}"; do
  label=${spec%%=*}
  cmd=${spec#*=}
  read -r port < <("$CLIENT" free-ports 1)
  tether_h1_config "$RUN/tether.toml" "$WORKERS" "$port" "$BPORT"
  # shellcheck disable=SC2086 # COMMAND is split into words on purpose (env VAR=... binary).
  $cmd serve --config "$RUN/tether.toml" >/dev/null 2>"$RUN/$label.stderr" &
  pid=$!
  PIDS+=("$pid")
  measure "$label" "$pid" "$port"
  stop_pid "$pid"
done

if [ "$NGINX" = 1 ]; then
  read -r port < <("$CLIENT" free-ports 1)
  nginx_h1_config "$RUN/nginx" "$WORKERS" "$port" "$BPORT" "$NOFILE"
  nginx -p "$RUN/nginx" -c "$RUN/nginx/nginx.conf" -e "$RUN/nginx/error.log" &
  pid=$!
  PIDS+=("$pid")
  measure nginx "$pid" "$port"
  stop_pid "$pid"
fi

echo
printf '%-16s %7s %10s %10s %13s %13s %16s\n' gateway open "before MiB" "after MiB" "KiB/conn" "anon KiB/conn" "KiB/conn +${SETTLE}s"
for r in "${ROWS[@]}"; do
  # shellcheck disable=SC2086
  set -- $r
  awk -v l="$1" -v n="$2" -v b="$3" -v a="$4" -v s="$5" -v ab="$6" -v aa="$7" 'BEGIN {
    if (n == 0) n = 1
    printf "%-16s %7d %10.1f %10.1f %13.2f %13.2f %16.2f\n", l, n, b/1024, a/1024, (a-b)/n, (aa-ab)/n, (s-b)/n }'
done
