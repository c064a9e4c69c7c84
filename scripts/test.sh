#!/usr/bin/env bash
# The project's test command: everything CI checks, in the order that fails fastest.
#   1. install what the tests need (idempotent: a no-op when it is already there);
#   2. cargo fmt --check;  3. cargo clippy -D warnings;  4. the whole test suite.
# `.ci/run` calls exactly this script. Run it from anywhere.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- 1. Toolchain and packages -------------------------------------------------------------
# rust-toolchain.toml pins the toolchain the build machines have. Build machines cannot
# download toolchains, so if rustup does not know the pinned name but the installed stable
# is that version, link it under the pinned name instead of letting rustup try to fetch it.
pinned=$(sed -n 's/^channel = "\(.*\)"/\1/p' rust-toolchain.toml)
if command -v rustup >/dev/null && ! rustup toolchain list | grep -q "^$pinned"; then
  stable_version=$(rustup run stable rustc --version 2>/dev/null | awk '{print $2}')
  if [ "$stable_version" = "$pinned" ]; then
    log "Linking the installed stable toolchain as $pinned"
    rustup toolchain link "$pinned" "$(rustup run stable rustc --print sysroot)"
  fi
fi

# Debian packages the tests use. Installed only when missing, so repeated runs cost nothing.
need_packages=(git bubblewrap)
missing=()
for pkg in "${need_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "Installing ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

# Reuse one target directory outside the clone, so a fresh clone (as CI makes) does not
# rebuild every dependency. An explicit CARGO_TARGET_DIR wins.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  export CARGO_TARGET_DIR="${FLOTILLA_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flotilla}/target"
fi
mkdir -p "$CARGO_TARGET_DIR"
echo "cargo target directory: $CARGO_TARGET_DIR"
# Incremental compilation caches take tens of gigabytes over a day of runs and buy a test run
# little; a developer who wants them sets CARGO_INCREMENTAL=1.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# --- 2 and 3. Format and lints -------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

# --- 4. Tests --------------------------------------------------------------------------------
# Doc tests first: nextest does not run them, and the test runner's summary must be the last
# thing printed.
log "doc tests"
cargo test --workspace --doc --locked --quiet

if cargo nextest --version >/dev/null 2>&1; then
  log "cargo nextest run"
  cargo nextest run --workspace --locked --no-fail-fast
else
  log "cargo test (install cargo-nextest for faster, clearer runs)"
  cargo test --workspace --locked --no-fail-fast
fi
