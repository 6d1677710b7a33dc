#!/usr/bin/env bash
# Prepares a development machine for the default config.toml: installs and starts Redis on
# 127.0.0.1:6379 if it is not running, and creates a self-signed TLS pair and a random JWT
# secret under deploy/dev/ (kept out of git). Safe to run again: existing files are kept.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v redis-server >/dev/null || ! command -v openssl >/dev/null; then
  echo "installing redis-server and openssl..."
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server openssl >/dev/null
fi

if ! redis-cli -p 6379 ping >/dev/null 2>&1; then
  echo "starting redis-server on 127.0.0.1:6379..."
  redis-server --port 6379 --bind 127.0.0.1 --daemonize yes --appendonly yes \
    --dir "$(mktemp -d)" >/dev/null
  for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi

mkdir -p deploy/dev
if [ ! -s deploy/dev/tls.crt ] || [ ! -s deploy/dev/tls.key ]; then
  echo "creating a self-signed development certificate for localhost..."
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 365 \
    -subj "/CN=localhost" \
    -addext "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1" \
    -keyout deploy/dev/tls.key -out deploy/dev/tls.crt 2>/dev/null
fi
if [ ! -s deploy/dev/jwt-secret ]; then
  echo "creating a random development JWT secret..."
  (umask 077; openssl rand -hex 32 > deploy/dev/jwt-secret)
fi
echo "development setup ready (deploy/dev/)"
