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

# The Mesos client-library tests (cli/tests/all/mesos_clients.rs) run frameworks written with
# real Mesos libraries: mesoshttp from PyPI and mesos-framework from npm, installed (pinned)
# into target/mesos-clients.
clients="$(cd "$(dirname "$0")/.." && pwd)/target/mesos-clients"
apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "setup: apt-get install $*" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2 \
            || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2; }
    fi
}
if ! "$clients/venv/bin/python" -c "import mesoshttp" 2>/dev/null; then
    python3 -m venv --help >/dev/null 2>&1 || apt_install python3 python3-venv
    echo "setup: pip install mesoshttp into $clients/venv" >&2
    rm -rf "$clients/venv"
    python3 -m venv "$clients/venv" >&2
    "$clients/venv/bin/pip" install --quiet --disable-pip-version-check mesoshttp==0.4.2 >&2
fi
if [ ! -f "$clients/node/node_modules/mesos-framework/package.json" ]; then
    command -v npm >/dev/null || apt_install nodejs npm
    echo "setup: npm install mesos-framework into $clients/node" >&2
    mkdir -p "$clients/node"
    npm install --prefix "$clients/node" --silent --no-audit --no-fund mesos-framework@0.5.3 >&2
fi
