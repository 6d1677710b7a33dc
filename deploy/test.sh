#!/usr/bin/env bash
# Runs the whole test suite. Tests start their own redis-server on ephemeral ports, so only the
# binary is needed; it is installed here when missing, with openssl, kill (procps), ss (iproute2)
# and prlimit (util-linux), which a few tests run, and Node.js with npm for the Socket.IO test.
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v openssl >/dev/null || missing+=(openssl)
[ -x /bin/kill ] || missing+=(procps)
# ss (tests/connections.rs reads a socket's keepalive timer) and prlimit (tests/lifecycle.rs starts
# the binary at a low open-file limit).
command -v ss >/dev/null || missing+=(iproute2)
command -v prlimit >/dev/null || missing+=(util-linux)
# tests/socketio.rs runs a real Socket.IO server and client (it installs their locked packages).
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
cargo test --all-targets --locked "$@"
