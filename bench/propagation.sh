#!/usr/bin/env bash
# Cancellation propagation latency through the gateway, per downstream x upstream protocol pair.
# Builds the benchmark in release mode and runs it from the repository root; arguments are passed
# through (--quick, --iterations N, --workers N, --output PATH, --help).
# Run with: bench/propagation.sh [--quick]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

cargo build --release -p tether-bench --bin propagation
target_dir="${CARGO_TARGET_DIR:-$root/target}"
exec "$target_dir/release/propagation" "$@"
