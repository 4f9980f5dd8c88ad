#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "==> cargo fmt --check" >&2
cargo fmt --all --check
# The Wasm workspaces (example tasks, guest-SDK examples, the guest SDK) are their own.
for ws in examples/tasks examples/guest sdk/guest; do
    cargo fmt --all --check --manifest-path "$ws/Cargo.toml"
done
echo "==> cargo clippy" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test" >&2
cargo test --workspace --locked
# Every decoder of untrusted input, fuzzed for a bounded time (AGORA_FUZZ_SECONDS each).
echo "==> fuzz" >&2
scripts/fuzz.sh
