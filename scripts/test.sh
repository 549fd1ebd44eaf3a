#!/usr/bin/env bash
# Runs every l4mesh check and test. On a fresh Debian machine it first installs what the tests need.
# Usage: scripts/test.sh        (as root for the network-namespace tests; they say so and skip otherwise)
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v ip >/dev/null       || need_apt+=(iproute2)
command -v iptables >/dev/null || need_apt+=(iptables)
command -v nft >/dev/null      || need_apt+=(nftables)
command -v taskset >/dev/null  || need_apt+=(util-linux)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "installing: ${need_apt[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
  else
    echo "warning: missing ${need_apt[*]} and not root; privileged tests will be skipped" >&2
  fi
fi

echo "== fmt";    cargo fmt --all -- --check
echo "== clippy"; cargo clippy --workspace --all-targets -- -D warnings
echo "== tests";  cargo test --workspace --all-targets
