#!/usr/bin/env bash
# Consensus commit benchmark: a 3-replica Flotilla cluster against a 3-member etcd 3.4 cluster
# (Debian's etcd-server), both on loopback with fsync on, driven by the same load generator.
# Prints ops/s, p50/p99 latency and writes per fsync; the last line has the ratios to etcd.
#   scripts/bench-consensus.sh [extra options for the bench example, see --help]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v etcd >/dev/null 2>&1; then
  echo "==> installing etcd-server (Debian) for the comparison"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq etcd-server
  # The package starts a system etcd on the default ports; the benchmark runs its own.
  $SUDO systemctl stop etcd 2>/dev/null || $SUDO pkill -x etcd || true
fi

# Data on the real disk (not tmpfs), so fsync costs what it costs in production.
data_dir="${FLOTILLA_BENCH_DIR:-/var/tmp/flotilla-bench}"
cargo run --release --locked -p flotilla-consensus --example bench -- \
  --etcd-bin "$(command -v etcd)" --data-dir "$data_dir" "$@"
