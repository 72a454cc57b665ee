#!/usr/bin/env bash
# The test command (README.md): sets up what the tests need on a fresh Debian machine (as root
# for apt), then runs every check: formatting, lints, unit tests and the integration tests
# against real peers, and last a short fuzzing run (scripts/fuzz.sh). Python packages go into a
# virtual environment (target/test-venv), never into the system Python; the tests find it
# through GATEHOUSE_PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need_apt+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
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

# paho-mqtt plays agents; awsiotsdk is AWS's own Greengrass IPC client, driving the fake nucleus.
VENV=target/test-venv
if ! "$VENV/bin/python" -c 'import paho.mqtt, awsiot.greengrasscoreipc.clientv2' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    'paho-mqtt>=2,<3' 'awsiotsdk>=1.31,<2'
fi
export GATEHOUSE_PYTHON="$PWD/$VENV/bin/python"

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --all-targets --locked
# Last: a short run of every fuzz target (docs/FUZZING.md), about 60 s of fuzzing after its build.
scripts/fuzz.sh
