#!/usr/bin/env bash
# Builds portcullis with profile-guided optimisation and prints the binary's path
# ($CARGO_TARGET_DIR/pgo/use/release/portcullis):
#   1. a release build instrumented to count what runs (target/pgo/gen);
#   2. that build serves the benchmark's request paths for a few seconds: pass-through,
#      enforcing, session creates (bench.py --train, on loopback, bounded in time);
#   3. llvm-profdata merges the counts; the release build that uses them is the result.
# Needs what bench/run.sh needs (wrk, nginx, redis-server), plus llvm-profdata from the
# toolchain's own LLVM: rustup's llvm-tools component, added when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir/pgo"
pgo="$(cd "$target_dir/pgo" && pwd)"
host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  echo "pgo: adding rustup's llvm-tools component (llvm-profdata)" >&2
  rustup component add llvm-tools >&2
fi

RUSTFLAGS="-Cprofile-generate=$pgo/raw" CARGO_TARGET_DIR="$pgo/gen" \
  cargo build --locked --release --bin portcullis >&2
# Build scripts ran instrumented too: only the training's counts go into the profile.
rm -rf "$pgo/raw"
timeout --signal=TERM --kill-after=20 300 \
  python3 bench/bench.py --bin "$pgo/gen/release/portcullis" --train 10 >&2
"$profdata" merge -o "$pgo/merged.profdata" "$pgo/raw"
RUSTFLAGS="-Cprofile-use=$pgo/merged.profdata" CARGO_TARGET_DIR="$pgo/use" \
  cargo build --locked --release --bin portcullis >&2
echo "$pgo/use/release/portcullis"
