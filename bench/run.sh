#!/usr/bin/env bash
# The portcullis benchmark (issue 7): portcullis against nginx and the bare upstream, session
# API latency, Redis memory per session, RSS with idle connections, criterion micro-benchmarks.
#
#   bench/run.sh           full run: release build, writes bench/RESULTS.md (about 7-9 minutes
#                          of measuring, bounded at 12; plus the release builds when not cached)
#   bench/run.sh --smoke   a few seconds per step on the same code path, so the benchmark cannot
#                          rot (run by .ci/run); uses the debug build that the tests already made
#                          and writes its table to target/bench-smoke.md
#   bench/run.sh --pgo     the full run of a build with profile-guided optimisation against a
#                          hyper floor built the same way (bench/pgo.sh makes both: two release
#                          builds and a short training run each); writes bench/RESULTS-pgo.md
#   bench/run.sh --against REV
#                          only the paired comparison: the current release build against REV's
#                          (built in a git worktree under target/against), both under the same
#                          fixed-rate load at the same time; writes target/bench-paired.md
#
# Needs root or sudo for apt-get (wrk, nginx, redis-server, python3 when missing). Everything
# listens on 127.0.0.1 only, on free ports, and every load is bounded in time. See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

smoke=0
pgo=0
against=""
extra=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --pgo) pgo=1 ;;
    --against) against="${2:?--against needs a git revision}"; shift ;;
    --keep | --no-criterion) extra+=("$1") ;;
    *) echo "usage: bench/run.sh [--smoke] [--pgo] [--keep] [--no-criterion] [--against REV]" >&2
       exit 2 ;;
  esac
  shift
done

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
# Debian installs nginx in /usr/sbin, which a non-root user's PATH leaves out.
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v nginx >/dev/null || missing+=(nginx)
command -v redis-server >/dev/null || missing+=(redis-server)
command -v python3 >/dev/null || missing+=(python3)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bench: installing ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

# 10,000 held connections need ~10,100 descriptors in portcullis and in the client.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 10500 ]; then
  echo "bench: warning: ulimit -n is $(ulimit -n); holding 10,000 connections needs 10500+" >&2
fi

export CARGO_TERM_COLOR=never
target_dir="${CARGO_TARGET_DIR:-target}"

. bench/cargo-executable.sh

if [ -n "$against" ]; then
  rev=$(git rev-parse --verify "$against^{commit}")
  worktree="$target_dir/against/src"
  git worktree remove --force "$worktree" 2>/dev/null || rm -rf "$worktree"
  git worktree add --detach "$worktree" "$rev" >/dev/null
  trap 'git worktree remove --force "$worktree" 2>/dev/null || true' EXIT
  baseline_target="$(cd "$target_dir" && pwd)/against/target"
  (cd "$worktree" && CARGO_TARGET_DIR="$baseline_target" cargo build --locked --release --bin portcullis)
  cargo build --locked --release --bin portcullis
  timeout --signal=TERM --kill-after=20 600 \
    python3 bench/bench.py --bin "$target_dir/release/portcullis" \
    --against "$baseline_target/release/portcullis" --against-label "$against" \
    --out "$target_dir/bench-paired.md" "${extra[@]}"
  exit
fi

if [ "$smoke" -eq 1 ]; then
  # The debug binary, which the test suite has just built in CI (`cargo test --all-targets`):
  # reused when no source is newer, else built. This keeps the smoke run to seconds. Figures
  # from it mean nothing; the point is that every step still works.
  profile=dev
  bin="$target_dir/debug/portcullis"
  if [ -x "$bin" ] && [ -z "$(find src Cargo.toml Cargo.lock -newer "$bin" -print -quit)" ]; then
    echo "bench: reusing $bin (no source is newer)" >&2
  else
    cargo build --locked --bin portcullis
  fi
  floor=$(cargo_executable hyper_floor build --locked --bench hyper_floor)
  out="$target_dir/bench-smoke.md"
  budget=300
else
  profile=release
  cargo build --locked --release --bin portcullis
  bin="$target_dir/release/portcullis"
  out=bench/RESULTS.md
  # Build the criterion benches before measuring, so compiling does not eat the time budget.
  cargo bench --locked --bench gate --no-run
  floor=$(cargo_executable hyper_floor bench --locked --bench hyper_floor --no-run)
  if [ "$pgo" -eq 1 ]; then
    # Both profile-guided, so that the floor stays a like-for-like reference.
    profile="release, profile-guided (bench/pgo.sh), the hyper floor too"
    bin=$(bench/pgo.sh)
    floor=$(bench/pgo.sh --floor)
    out=bench/RESULTS-pgo.md
  fi
  budget=720
fi

smoke_flag=()
if [ "$smoke" -eq 1 ]; then
  smoke_flag=(--smoke)
  # The paired comparison's code path too, with the binary as its own baseline.
  timeout --signal=TERM --kill-after=20 120 \
    python3 bench/bench.py --smoke --bin "$bin" --against "$bin" --against-label itself \
    --out "$target_dir/bench-paired-smoke.md" "${extra[@]}"
  # And bench/pgo.sh's training runs (its builds take minutes: not part of the smoke run).
  timeout --signal=TERM --kill-after=20 120 \
    python3 bench/bench.py --smoke --bin "$bin" --train 2 "${extra[@]}"
  timeout --signal=TERM --kill-after=20 60 \
    python3 bench/bench.py --smoke --floor "$floor" --train 2 "${extra[@]}"
fi
exec timeout --signal=TERM --kill-after=20 "$budget" \
  python3 bench/bench.py "${smoke_flag[@]}" --bin "$bin" --floor "$floor" --profile "$profile" --out "$out" \
  "${extra[@]}"
