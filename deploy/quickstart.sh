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
trap 'kill $echo_pid 2>/dev/null || true' EXIT
exec_status=0
"$bin" --config config.toml || exec_status=$?
exit $exec_status
