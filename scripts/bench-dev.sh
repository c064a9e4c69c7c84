#!/usr/bin/env bash
# Webhook to runner start: signed GitHub pushes of a one-job pipeline against `flotilla dev`
# (one-member federator + one local cell) with the repository already fetched.
# Prints p50/p90/p99/max from webhook receipt to the runner's first instruction, broken down
# into pipeline load, placement commit, assignment delivery and runner start.
# Extra arguments go to the benchmark (see --help), e.g. --rate 20, --count 200, --fetch.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"
command -v git >/dev/null || { apt-get update -qq && apt-get install -y -qq git; }
cargo build --release --locked -q -p flotilla --bin flotilla
export FLOTILLA_BIN="$CARGO_TARGET_DIR/release/flotilla"
exec cargo run --release --locked -q -p flotilla-tests --example bench_dev -- "$@"
