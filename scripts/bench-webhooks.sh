#!/usr/bin/env bash
# Webhook intake benchmark: signed GitHub pushes against a 3-replica federator on loopback.
# Prints p50/p99 ack latency at a fixed 1,200 req/s, then the highest rate sustained.
# Extra arguments go to the benchmark (see --help), e.g. --git to load pipelines from git.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla/target}"
command -v git >/dev/null || { apt-get update -qq && apt-get install -y -qq git; }
exec cargo run --release --locked -q -p flotilla-federator --example bench_webhooks -- "$@"
