#!/usr/bin/env bash
# Prepares a fresh machine for building Agora: the Wasm targets the example tasks compile
# to, and the Debian packages the tests use. Safe to run again; does nothing when all is there.
set -euo pipefail

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found; install Rust with rustup (https://rustup.rs) first" >&2
    exit 1
fi

installed=$(rustup target list --installed 2>/dev/null || true)
for target in wasm32-wasip1 wasm32-wasip2; do
    if ! grep -qx "$target" <<<"$installed"; then
        echo "setup: rustup target add $target" >&2
        rustup target add "$target" >&2
    fi
done

# The partition test puts an agent in a network namespace of its own: it needs `ip`.
if ! command -v ip >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: apt-get install iproute2" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iproute2 >&2 \
        || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iproute2 >&2; }
fi

# The fuzz targets (scripts/fuzz.sh) build with cargo fuzz, which needs a nightly toolchain.
if ! rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    echo "setup: rustup toolchain install nightly" >&2
    rustup toolchain install nightly --profile minimal >&2
fi
if ! command -v cargo-fuzz >/dev/null; then
    echo "setup: cargo install cargo-fuzz" >&2
    cargo install cargo-fuzz --version 0.13.2 --locked >&2
fi
