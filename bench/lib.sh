# Shared by the benchmark scripts: logging, the processes a script starts (stopped by pid on
# exit), waiting for a port, memory of a process tree, Debian packages, and the release build.
#
#   ROOT=... ; source "$ROOT/bench/lib.sh"
#
# Messages name the calling script.
SELF=$(basename "$0")

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# Every process a script starts goes into PIDS; all are stopped on exit.
PIDS=()
cleanup() {
  local p
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]}"; do
    for _ in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() {
  local keep=() p
  for p in "${PIDS[@]}"; do [ "$p" = "$1" ] || keep+=("$p"); done
  PIDS=("${keep[@]}")
}

# PID: stops it (TERM, then KILL after 5 s) and forgets it.
stop_pid() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  forget_pid "$pid"
}

# PORT PID: waits up to 5 s for PORT on 127.0.0.1 to accept, failing if PID exits first.
wait_port() {
  local port=$1 pid=$2
  for _ in $(seq 1 100); do
    kill -0 "$pid" 2>/dev/null || { echo "$SELF: process $pid exited before listening on $port" >&2; return 1; }
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "$SELF: nothing listens on $port after 5 s" >&2
  return 1
}

# PID: the pid and its direct children (nginx: master and workers).
tree() { echo "$1"; pgrep -P "$1" 2>/dev/null || true; }

# FIELD PID: sum of FIELD (kB) from /proc/PID/status over the process tree.
sum_status() {
  local total=0 p v
  for p in $(tree "$2"); do
    v=$(awk -v f="$1:" '$1 == f {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
    total=$((total + ${v:-0}))
  done
  echo "$total"
}

# FILE WORKERS PORT BACKEND_PORT: a tether config with one HTTP/1.1 listener on PORT in front
# of the backend, keeping 64 idle connections to it (as every proxy in bench/compare does).
tether_h1_config() {
  cat >"$1" <<EOF
workers = $2
shutdown_grace = "0s"

[[listeners]]
address = "127.0.0.1:$3"
protocols = ["http1"]
  [[listeners.routes]]
  upstream = "backend"

[[upstreams]]
name = "backend"
addresses = ["127.0.0.1:$4"]
protocol = "http1"
max_idle_per_endpoint = 64
idle_timeout = "60s"
EOF
}

# DIR WORKERS PORT BACKEND_PORT NOFILE: DIR/nginx.conf, nginx's counterpart of
# tether_h1_config: WORKERS worker processes, one HTTP/1.1 listener on PORT, an access-log line
# per request to /dev/null, 64 idle connections kept to the backend, NOFILE descriptors.
nginx_h1_config() {
  mkdir -p "$1/tmp"
  cat >"$1/nginx.conf" <<EOF
daemon off;
master_process on;
worker_processes $2;
worker_rlimit_nofile $5;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections $(($5 - 100)); }
http {
  access_log /dev/null;
  client_body_temp_path $1/tmp/body;
  proxy_temp_path $1/tmp/proxy;
  fastcgi_temp_path $1/tmp/fastcgi;
  uwsgi_temp_path $1/tmp/uwsgi;
  scgi_temp_path $1/tmp/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  upstream backend { server 127.0.0.1:$4; keepalive 64; }
  server {
    listen 127.0.0.1:$3;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
EOF
}

# nginx doing per request what tether does by default (`nginx-same` in the results): the client's
# Host passed on, X-Forwarded-For, X-Forwarded-Proto and Forwarded added, a request id
# ($request_id) sent upstream and returned to the client, and a JSON access-log line (format
# `same`) with the upstream timings. nginx_same_http goes in `http {}` before the access_log that
# names the format, nginx_same_server in each `server {}`. Quoted here-documents: nginx's
# variables are written as they are.
nginx_same_http() {
  cat <<'NGINX'
  log_format same escape=json '{"time_unix_ms":$msec,"request_id":"$request_id","client":"$remote_addr:$remote_port","local":"$server_addr:$server_port","protocol":"$server_protocol","method":"$request_method","authority":"$host","path":"$uri","status":$status,"bytes_sent":$body_bytes_sent,"bytes_received":$request_length,"duration":$request_time,"upstream":"backend","upstream_addr":"$upstream_addr","upstream_connect":"$upstream_connect_time","upstream_first_byte":"$upstream_header_time","upstream_time":"$upstream_response_time","connection_requests":$connection_requests}';
  proxy_set_header Host $http_host;
  proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
  proxy_set_header X-Forwarded-Proto $scheme;
  proxy_set_header Forwarded "for=$remote_addr;proto=$scheme;host=\"$http_host\"";
  proxy_set_header X-Request-Id $request_id;
NGINX
}
nginx_same_server() {
  # shellcheck disable=SC2016
  echo '    add_header X-Request-Id $request_id always;'
}

# PACKAGE...: installs the Debian packages named (nothing when none is), as root or with sudo.
install_packages() {
  [ $# -gt 0 ] || return 0
  log "installing $*"
  local as_root=()
  [ "$(id -u)" = 0 ] || as_root=(sudo)
  "${as_root[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends "$@" >&2
}

# BUILD: with 1, builds (build_release); either way sets BIN to the release binaries' directory.
release_binaries() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
  if [ "$1" = 1 ]; then build_release; fi
  BIN="$CARGO_TARGET_DIR/release"
}

# Builds tether and the harness in release mode into $CARGO_TARGET_DIR (default: target/).
# Two builds, so the harness's dependencies cannot change the features tether is built with.
build_release() {
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
  log "building tether and the harness (release; the first build takes several minutes)"
  (cd "$ROOT" && cargo build --release --quiet --bin tether && cargo build --release --quiet -p compare-harness)
}
