#!/usr/bin/env bash
# Sets up what the tests need on a fresh Debian machine (as root), then runs every check:
# formatting, lints, unit tests and the integration tests against real peers.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: please install: ${need_apt[*]} (needs root)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Debian package may start a broker on 1883; the tests start their own on free ports.
if ! python3 -c 'import paho.mqtt' 2>/dev/null; then
  # A Debian-managed Python refuses plain pip installs (PEP 668); the flag is then needed.
  python3 -m pip install --quiet --disable-pip-version-check 'paho-mqtt>=2,<3' ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages 'paho-mqtt>=2,<3'
fi

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
