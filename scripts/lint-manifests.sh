#!/usr/bin/env bash
# Lints what l4mesh ships for Kubernetes, without a cluster: the DaemonSet against Kubernetes'
# schemas (kubernetes-validate, strict: unknown fields fail), the Helm values file as YAML, and
# the Containerfile's contract (a build stage, the entrypoint, the chart's arguments).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v kubernetes-validate >/dev/null; then
  echo "installing: kubernetes-validate (python3 -m pip install kubernetes-validate)"
  python3 -m pip install --quiet kubernetes-validate 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages kubernetes-validate
  hash -r
  if command -v pyenv >/dev/null; then pyenv rehash; fi
  command -v kubernetes-validate >/dev/null || export PATH="$(python3 -m site --user-base)/bin:$PATH"
fi
kubernetes-validate --strict --kubernetes-version 1.30.0 docs/kubernetes/ztunnel-daemonset.yaml
python3 - <<'PY'
import sys, yaml
v = yaml.safe_load(open("docs/kubernetes/values-l4mesh.yaml"))
assert "/" in v["image"], "values-l4mesh.yaml: image must be a full reference (registry/name:tag)"
c = open("Containerfile").read()
for need in ("AS build", "ENTRYPOINT [\"/usr/local/bin/l4mesh\"]", "CMD [\"proxy\", \"ztunnel\"]", "WORKDIR /\n"):
    assert need in c, f"Containerfile: expected {need!r}"
print("manifests: values and Containerfile as expected")
PY
