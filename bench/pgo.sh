#!/usr/bin/env bash
# Builds portcullis with profile-guided optimisation and prints the binary's path
# ($CARGO_TARGET_DIR/pgo/use/release/portcullis):
#   1. a release build instrumented to count what runs (target/pgo/gen);
#   2. that build serves the benchmark's request paths for a few seconds: pass-through,
#      enforcing, session creates (bench.py --train, on loopback, bounded in time);
#   3. llvm-profdata merges the counts; the release build that uses them is the result.
# With --floor it does the same for the hyper floor (scenario 6), trained on pass-through load
# under target/pgo/floor-*, so that a profile-guided portcullis is compared with a
# profile-guided floor.
# Needs what bench/run.sh needs (wrk, nginx, redis-server), plus llvm-profdata from the
# toolchain's own LLVM: rustup's llvm-tools component, added when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/cargo-executable.sh

# What is built, where (target/pgo/PREFIX*), and how bench.py is told of it for training.
case "${1:-}" in
  "") what=portcullis prefix="" train_flag=--bin ;;
  --floor) what=floor prefix=floor- train_flag=--floor ;;
  *) echo "usage: bench/pgo.sh [--floor]" >&2; exit 2 ;;
esac

target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir/pgo"
pgo="$(cd "$target_dir/pgo" && pwd)"
host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  echo "pgo: adding rustup's llvm-tools component (llvm-profdata)" >&2
  rustup component add llvm-tools >&2
fi

# build DIR FLAGS: a release build of $what under $pgo/DIR with RUSTFLAGS=FLAGS; prints its path.
build() {
  if [ "$what" = portcullis ]; then
    RUSTFLAGS="$2" CARGO_TARGET_DIR="$pgo/$1" cargo build --locked --release --bin portcullis >&2
    echo "$pgo/$1/release/portcullis"
  else
    RUSTFLAGS="$2" CARGO_TARGET_DIR="$pgo/$1" \
      cargo_executable hyper_floor bench --locked --bench hyper_floor --no-run
  fi
}

raw="$pgo/${prefix}raw"
instrumented=$(build "${prefix}gen" "-Cprofile-generate=$raw")
# Build scripts ran instrumented too: only the training's counts go into the profile.
rm -rf "$raw"
timeout --signal=TERM --kill-after=20 300 \
  python3 bench/bench.py "$train_flag" "$instrumented" --train 10 >&2
"$profdata" merge -o "$pgo/${prefix}merged.profdata" "$raw"
build "${prefix}use" "-Cprofile-use=$pgo/${prefix}merged.profdata"
