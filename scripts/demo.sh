#!/usr/bin/env bash
# Starts a local cluster (a master and two agents, `agora dev`), runs the hello example on it
# with `agora run`, then a task bundle written with the guest SDK (it reports progress and
# messages its framework), prints their output, and stops the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

port=${AGORA_DEMO_PORT:-5050}
echo "==> building agora and the example tasks" >&2
cargo build --quiet -p agora-cli
cargo build --quiet --release --manifest-path examples/tasks/Cargo.toml --target wasm32-wasip1 -p hello
bundle=$(cargo run --quiet -p agora-examples --bin build-examples | awk '$1 == "bundle" && $2 == "progress" {print $3}')
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

echo "==> $agora run --master 127.0.0.1:$port $bundle" >&2
"$agora" run --master "127.0.0.1:$port" "$bundle"
