#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time each, with cargo fuzz on
# the nightly toolchain (scripts/setup.sh installs both); fails on the first crash.
# The checked-in seeds are fuzz/corpus/TARGET; what a run discovers goes to
# fuzz/target/corpus/TARGET (not checked in), and a crash leaves its input in
# fuzz/artifacts/TARGET: once the bug is fixed, copy that input into fuzz/corpus/TARGET.
#   AGORA_FUZZ_SECONDS=60 scripts/fuzz.sh          # default 30 s per target
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${AGORA_FUZZ_SECONDS:-30}
cargo +nightly fuzz build -O
for t in $(cargo +nightly fuzz list); do
    echo "==> fuzz $t (${seconds}s)" >&2
    mkdir -p "target/corpus/$t" "corpus/$t"
    log="target/fuzz-$t.log"
    if ! cargo +nightly fuzz run -O "$t" "target/corpus/$t" "corpus/$t" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "fuzz: target $t crashed; its input is in fuzz/artifacts/$t (the whole log: fuzz/$log)" >&2
        exit 1
    fi
    grep -E '^Done [0-9]+ runs' "$log" >&2 || true
done
