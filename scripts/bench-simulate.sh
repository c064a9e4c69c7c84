#!/usr/bin/env bash
# Simulation benchmark: a day of each built-in profile (100,000 builds, ~500,000 jobs, 20
# cells) after a day that teaches the time-of-day floor, autoscaled against the smallest
# static pools with the same p95 queue wait. Prints each report with its wall time.
# Extra arguments go to every run: `--floor none` gives the `--floor none` table of docs/benchmarks.md,
# `--builds 20000` a quicker run. Takes 10-15 minutes on 2 cores (static:auto is ~12 runs).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"
cargo build --release --locked -q -p flotilla
for profile in busy sparse spiky; do
  cargo run --release --locked -q -p flotilla -- simulate --profile "$profile" --days 2 \
    --compare static:auto "$@"
  echo
done
