#!/usr/bin/env bash
# Starts a local cluster (a master and two agents, `agora dev`), runs the hello example on it
# with `agora run`, prints its output, and stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

port=${AGORA_DEMO_PORT:-5050}
echo "==> building agora and the example tasks" >&2
cargo build --quiet -p agora-cli
cargo build --quiet --release --manifest-path examples/tasks/Cargo.toml --target wasm32-wasip1 -p hello
agora=target/debug/agora
hello=examples/tasks/target/wasm32-wasip1/release/hello.wasm

log=$(mktemp)
echo "==> $agora dev --agents 2 --port $port   (log: $log)" >&2
"$agora" dev --agents 2 --port "$port" >"$log" 2>&1 &
dev=$!
trap 'kill $dev 2>/dev/null; wait $dev 2>/dev/null || true' EXIT

for _ in $(seq 100); do
    if grep -q "^ready:" "$log"; then break; fi
    if ! kill -0 $dev 2>/dev/null; then cat "$log" >&2; exit 1; fi
    sleep 0.1
done
grep -q "^ready:" "$log" || { cat "$log" >&2; echo "demo: the cluster did not start" >&2; exit 1; }

echo "==> $agora run --master 127.0.0.1:$port $hello -- Agora" >&2
"$agora" run --master "127.0.0.1:$port" "$hello" -- Agora
