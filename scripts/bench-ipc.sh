#!/usr/bin/env bash
# Backlog drain through the Greengrass IPC upstream under nucleus lite's 10,000-byte frames,
# against the mqtt upstream's 128 KiB batches, on the same load.
#
# Both runs journal AGENTS x MESSAGES real endpoint events (../shared/corpus, replayed by
# gatehouse-loadgen --corpus, QoS 1) while the upstream is down, then bring it up and time the
# drain until the journal is empty, with IoT Core's per-connection caps in force (100
# publishes/s, 512 KiB/s, the gateway's defaults):
#   ipc:  `gatehouse run` as a component of scripts/bench-nucleus.py (a minimal nucleus lite
#         stand-in: 10,000-byte frame cap, PublishToIoTCore refused as offline until the drain
#         starts), upstream {"kind": "greengrass"};
#   mqtt: `gatehouse run` with the mqtt upstream to a mosquitto (mutual TLS) started for the
#         drain.
# Prints, for each: drain time and events/s, publishes, payload bytes, and IoT Core 5 KB
# billing units per 1,000 events; then the ratios.
#
# Env (defaults): AGENTS=20 MESSAGES=2000 CORPUS=../shared/corpus/edr-sample.jsonl.zst
#                 SKIP_BUILD=0 KEEP_TMP=0 DRAIN_TIMEOUT=1800
set -euo pipefail

AGENTS="${AGENTS:-20}"
MESSAGES="${MESSAGES:-2000}"
SKIP_BUILD="${SKIP_BUILD:-0}"
KEEP_TMP="${KEEP_TMP:-0}"
DRAIN_TIMEOUT="${DRAIN_TIMEOUT:-1800}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CORPUS="${CORPUS:-$ROOT/../shared/corpus/edr-sample.jsonl.zst}"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
GATEHOUSE="$TARGET_DIR/release/gatehouse"
LOADGEN="$TARGET_DIR/release/gatehouse-loadgen"
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
[[ -f "$CORPUS" ]] || { echo "[ipc] no corpus at $CORPUS (set CORPUS)" >&2; exit 1; }
[[ "$SKIP_BUILD" == 1 ]] || cargo build --release --bins --quiet

TMP="$(mktemp -d /tmp/gatehouse-ipc.XXXXXX)"
chmod 755 "$TMP"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ "$KEEP_TMP" == 1 ]] && echo "[ipc] kept $TMP" || rm -rf "$TMP"
}
trap cleanup EXIT INT TERM
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"
make_certs "$TMP"
TOTAL=$((AGENTS * MESSAGES))

load() {   # load PORT: journals the events, each acknowledged
    "$LOADGEN" --port "$1" --agents "$AGENTS" --messages "$MESSAGES" --corpus "$CORPUS" \
        --qos 1 --timeout-secs 1800 | grep '^RESULT'
}

drain() {   # drain NAME: seconds until the journal is empty
    local start deadline
    start=$(date +%s.%N)
    deadline=$(( $(date +%s) + DRAIN_TIMEOUT ))
    while [[ "$(metric gatehouse_journal_rows)" != "0" ]]; do
        if (( $(date +%s) > deadline )); then
            echo "[ipc] $1: not drained within $DRAIN_TIMEOUT s; see $TMP" >&2
            KEEP_TMP=1; exit 1
        fi
        sleep 0.2
    done
    python3 -c "print($(date +%s.%N) - $start)"
}

# ---- ipc: nucleus lite
mkdir -p "$TMP/ipc"
AGENT_PORT=$(free_port); ADMIN=$(free_port)
cat > "$TMP/ipc/config.json" <<JSON
{
  "listeners": [{"bind": "127.0.0.1:$AGENT_PORT"}],
  "journal": {"dedupWindowSecs": 0, "maxBytes": 4294967296},
  "upstream": {"kind": "greengrass", "retryMinMs": 200, "retryMaxMs": 1000},
  "logLevel": "warn",
  "metrics": {"bind": "127.0.0.1:$ADMIN"}
}
JSON
touch "$TMP/ipc/offline"
TOKEN=BENCHTOKEN000000
python3 scripts/bench-nucleus.py "$TMP/ipc/ipc.socket" "$TOKEN" "$TMP/ipc/config.json" \
    "$TMP/ipc/stats.json" "$TMP/ipc/offline" 10000 > "$TMP/ipc/nucleus.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do [[ -S "$TMP/ipc/ipc.socket" ]] && break; sleep 0.1; done
( cd "$TMP/ipc" && SVCUID=$TOKEN AWS_GG_NUCLEUS_DOMAIN_SOCKET_FILEPATH_FOR_COMPONENT="$TMP/ipc/ipc.socket" \
    AWS_IOT_THING_NAME=bench-gw exec "$GATEHOUSE" run ) > "$TMP/ipc/gatehouse.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -s "http://127.0.0.1:$ADMIN/metrics" >/dev/null && break; sleep 0.1; done
echo "[ipc] journaling $TOTAL corpus events with the nucleus offline"
load "$AGENT_PORT"
for _ in $(seq 600); do [[ "$(metric gatehouse_messages_journaled_total)" == "$TOTAL" ]] && break; sleep 0.1; done
rm "$TMP/ipc/offline"
IPC_SECS=$(drain ipc)
sleep 0.5   # the stand-in writes its counters every 100 ms
IPC_STATS=$(cat "$TMP/ipc/stats.json")

# ---- mqtt: 128 KiB batches to mosquitto
mkdir -p "$TMP/mqtt"
BROKER=$(free_port); AGENT_PORT=$(free_port); ADMIN=$(free_port)
cat > "$TMP/mqtt/mosquitto.conf" <<CONF
listener $BROKER 127.0.0.1
cafile $TMP/ca.pem
certfile $TMP/server.pem
keyfile $TMP/server.key
require_certificate true
use_identity_as_username true
persistence false
max_inflight_messages 1000
max_queued_messages 1000000
CONF
cat > "$TMP/mqtt/gatehouse.json" <<JSON
{
  "thingName": "bench-gw",
  "listeners": [{"bind": "127.0.0.1:$AGENT_PORT"}],
  "journal": {"path": "$TMP/mqtt/journal.db", "dedupWindowSecs": 0, "maxBytes": 4294967296},
  "upstream": {"kind": "mqtt", "host": "localhost", "port": $BROKER,
               "caFile": "$TMP/ca.pem", "certFile": "$TMP/client.pem", "keyFile": "$TMP/client.key",
               "reconnectMinMs": 1000, "reconnectMaxMs": 2000},
  "logLevel": "warn",
  "metrics": {"bind": "127.0.0.1:$ADMIN"}
}
JSON
"$GATEHOUSE" run --config "$TMP/mqtt/gatehouse.json" > "$TMP/mqtt/gatehouse.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -s "http://127.0.0.1:$ADMIN/metrics" >/dev/null && break; sleep 0.1; done
echo "[ipc] journaling $TOTAL corpus events with the broker down"
load "$AGENT_PORT"
for _ in $(seq 600); do [[ "$(metric gatehouse_messages_journaled_total)" == "$TOTAL" ]] && break; sleep 0.1; done
"$MOSQUITTO" -c "$TMP/mqtt/mosquitto.conf" > "$TMP/mqtt/mosquitto.log" 2>&1 &
PIDS+=($!)
sleep 0.3
mosquitto_sub -h localhost -p "$BROKER" --cafile "$TMP/ca.pem" --cert "$TMP/client.pem" \
    --key "$TMP/client.key" -i collector -t 'gatehouse/#' -q 1 > /dev/null &
PIDS+=($!)
MQTT_SECS=$(drain mqtt)
MQTT_STATS=$(printf '{"publishes": %s, "payload_bytes": %s, "billing_units": %s}' \
    "$(metric gatehouse_upstream_publishes_total)" "$(metric gatehouse_upstream_bytes_total)" \
    "$(metric gatehouse_billing_units_total)")

python3 - "$TOTAL" "$IPC_SECS" "$IPC_STATS" "$MQTT_SECS" "$MQTT_STATS" <<'PY'
import json, sys
total = int(sys.argv[1])
rows = []
for name, secs, stats in (("ipc (lite, 10,000-byte frames)", sys.argv[2], sys.argv[3]),
                          ("mqtt (128 KiB batches)", sys.argv[4], sys.argv[5])):
    s, st = float(secs), json.loads(stats)
    rows.append((name, s, st))
    print(f"{name}: {total} events drained in {s:.1f} s ({total/s:,.0f} events/s); "
          f"{st['publishes']} publishes ({st['publishes']/s:.1f}/s), "
          f"{st['payload_bytes']/s/1024:.0f} KiB/s, {st['billing_units']} billing units "
          f"= {1000*st['billing_units']/total:.1f} per 1,000 events")
(_, si, ipc), (_, sm, mqtt) = rows
print(f"ratio ipc/mqtt: drain events/s {sm/si:.2f}, billing units {ipc['billing_units']/mqtt['billing_units']:.2f}")
PY
