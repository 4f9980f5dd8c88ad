#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for a bounded time each, with cargo fuzz on
# the nightly toolchain; fails on the first crash. The corpus grows in fuzz/corpus/TARGET;
# a crash leaves its input in fuzz/artifacts/TARGET.
#   AGORA_FUZZ_SECONDS=60 scripts/fuzz.sh          # default 30 s per target
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${AGORA_FUZZ_SECONDS:-30}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo +nightly fuzz build -O
for t in $(cargo +nightly fuzz list); do
    echo "==> fuzz $t (${seconds}s)" >&2
    mkdir -p "corpus/$t"
    cargo +nightly fuzz run -O "$t" "corpus/$t" -- -max_total_time="$seconds" -rss_limit_mb=2048
done
