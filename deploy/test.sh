#!/usr/bin/env bash
# Runs the whole test suite. Tests start their own redis-server on ephemeral ports, so only the
# binary is needed; it is installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v redis-server >/dev/null; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
cargo test --all-targets --locked "$@"
