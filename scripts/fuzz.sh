#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/ for a bounded time each, starting from the committed seeds
# (fuzz/seeds/<target>/) plus what earlier runs found (fuzz/corpus/<target>/, not committed).
# Usage: scripts/fuzz.sh [SECONDS_PER_TARGET]     (default 30; CI uses the default)
#        FUZZ_TARGETS="socks5_request local_config" scripts/fuzz.sh 600
# Needs the nightly toolchain (cargo +nightly) and cargo-fuzz; installs cargo-fuzz from crates.io
# when it is missing. A crash fails the script and leaves its input in fuzz/artifacts/<target>/.
# Targets build in release mode with debug assertions and overflow checks (cargo-fuzz's default).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-30}"

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: SKIPPED — no nightly toolchain on this machine (cargo +nightly --version failed); the fuzz targets were not built or run" >&2
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
  cargo install --quiet cargo-fuzz --locked
fi

targets="${FUZZ_TARGETS:-$(cd fuzz && cargo +nightly fuzz list)}"
echo "fuzz: building $(echo $targets | wc -w) targets"
(cd fuzz && cargo +nightly fuzz build)
ran=0
for t in $targets; do
  mkdir -p "fuzz/corpus/$t" fuzz/artifacts
  echo "fuzz: $t for ${secs}s"
  log="fuzz/artifacts/$t.log"
  # -max_len bounds one input; -rss_limit_mb an allocation a parser must never make.
  status=0
  # -timeout: one input taking longer is a hang, reported as a failure with its input; the outer
  # timeout bounds the whole run whatever happens.
  (cd fuzz && timeout --kill-after=10 $((secs + 120)) cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$secs" -timeout=10 -max_len=65536 -rss_limit_mb=2048 -print_final_stats=1) \
    >"$log" 2>&1 || status=$?
  grep -E "^(Done [0-9]+ runs|stat::new_units_added|==[0-9]+==|SUMMARY)" "$log" || true
  if [ "$status" != 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz: $t FAILED (exit $status; the crashing input is in fuzz/artifacts/$t/, the log in $log)" >&2
    exit 1
  fi
  ran=$((ran + 1))
done
echo "fuzz: $ran passed, 0 failed"
