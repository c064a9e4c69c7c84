#!/usr/bin/env bash
# Placement benchmark: 100 cells, 500 tenants, 50,000 queued + 5,000 leased jobs, decisions
# committed through a 3-replica federator on loopback; then a 5,000-job burst from one push.
# Also runs the pure scheduler benchmark of flotilla-core. `--quick` runs a tenth of the load.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"
cargo run --release --locked -q -p flotilla-core --example bench_placement -- "$@"
exec cargo run --release --locked -q -p flotilla-federator --example bench_placement_raft -- "$@"
