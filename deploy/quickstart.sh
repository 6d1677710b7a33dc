#!/usr/bin/env bash
# Starts portcullis on the default config.toml with the echo upstream behind it:
# prepares Redis, a development certificate and JWT secret (deploy/dev-setup.sh), builds,
# starts `portcullis echo-upstream` on 127.0.0.1:8080, then portcullis on https://127.0.0.1:8443
# (admin on 127.0.0.1:9090). Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/dev-setup.sh
cargo build --release --quiet
bin=target/release/portcullis
"$bin" echo-upstream --listen 127.0.0.1:8080 &
echo_pid=$!
"$bin" --config config.toml &
proxy_pid=$!
# Whatever stops this script (Ctrl-C, SIGTERM, one of the two exiting) stops both, and waits
# for them: portcullis drains for up to server.shutdown_grace, and the prompt comes back after.
stop() {
  kill -TERM "$proxy_pid" "$echo_pid" 2>/dev/null || true
  wait "$proxy_pid" "$echo_pid" 2>/dev/null || true
}
trap stop EXIT
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
wait -n "$proxy_pid" "$echo_pid"
