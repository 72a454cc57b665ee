#!/usr/bin/env bash
# Backlog drain benchmark for the MQTT upstream.
#
# 1. Starts `gatehouse run` with the mqtt upstream pointing at a mosquitto (mutual TLS) that is
#    NOT running yet, with AWS IoT Core's per-connection caps in force (100 publishes/s,
#    512 KiB/s, 100 in flight).
# 2. Journals AGENTS x MESSAGES agent messages (QoS 1, PAYLOAD bytes of JSON telemetry) with
#    gatehouse-loadgen: all are PUBACKed while the upstream is down.
# 3. Starts the broker and a QoS 1 subscriber, and times the drain until the journal is empty.
# Prints drain time, publishes/s, bytes/s against the cap, and IoT Core billing units (5 KB
# metering units) against relaying every agent message on its own.
#
# Env (defaults): AGENTS=50 MESSAGES=20000 PAYLOAD=512 SKIP_BUILD=0 KEEP_TMP=0 DRAIN_TIMEOUT=3600
# Only 127.0.0.1 is used.
set -euo pipefail

AGENTS="${AGENTS:-50}"
MESSAGES="${MESSAGES:-20000}"
PAYLOAD="${PAYLOAD:-512}"
SKIP_BUILD="${SKIP_BUILD:-0}"
KEEP_TMP="${KEEP_TMP:-0}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
GATEHOUSE="$TARGET_DIR/release/gatehouse"
LOADGEN="$TARGET_DIR/release/gatehouse-loadgen"
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"

[[ "$SKIP_BUILD" == 1 ]] || cargo build --release --bins --quiet

TMP="$(mktemp -d /tmp/gatehouse-drain.XXXXXX)"
chmod 755 "$TMP"   # mosquitto drops to its own user and must read the certificates
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [[ "$KEEP_TMP" == 1 ]] && echo "[drain] kept $TMP" || rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"
make_certs "$TMP"

BROKER=$(free_port); AGENT_PORT=$(free_port); ADMIN=$(free_port)
cat > "$TMP/mosquitto.conf" <<CONF
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
cat > "$TMP/gatehouse.json" <<JSON
{
  "thingName": "bench-gw",
  "listeners": [{"bind": "127.0.0.1:$AGENT_PORT"}],
  "journal": {"path": "$TMP/journal.db", "maxBytes": 4294967296},
  "upstream": {"kind": "mqtt", "host": "localhost", "port": $BROKER,
               "caFile": "$TMP/ca.pem", "certFile": "$TMP/client.pem", "keyFile": "$TMP/client.key",
               "reconnectMinMs": 1000, "reconnectMaxMs": 2000},
  "logLevel": "warn",
  "metrics": {"bind": "127.0.0.1:$ADMIN"}
}
JSON

"$GATEHOUSE" run --config "$TMP/gatehouse.json" > "$TMP/gatehouse.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do curl -s "http://127.0.0.1:$ADMIN/metrics" >/dev/null && break; sleep 0.1; done

TOTAL=$((AGENTS * MESSAGES))
echo "[drain] journaling $TOTAL messages of $PAYLOAD B with the upstream down"
"$LOADGEN" --port "$AGENT_PORT" --agents "$AGENTS" --messages "$MESSAGES" --payload-size "$PAYLOAD" \
    --qos 1 --timeout-secs 900 | grep '^RESULT'
for _ in $(seq 600); do
    [[ "$(metric gatehouse_messages_journaled_total)" == "$TOTAL" ]] && break; sleep 0.1
done
ROWS=$(metric gatehouse_journal_rows); JBYTES=$(metric gatehouse_journal_bytes)
echo "[drain] journal holds $ROWS records ($JBYTES accounted bytes); starting the broker"

"$MOSQUITTO" -c "$TMP/mosquitto.conf" > "$TMP/mosquitto.log" 2>&1 &
PIDS+=($!)
sleep 0.3
mosquitto_sub -h localhost -p "$BROKER" --cafile "$TMP/ca.pem" --cert "$TMP/client.pem" \
    --key "$TMP/client.key" -i collector -t 'gatehouse/#' -q 1 > /dev/null &
PIDS+=($!)
P0=$(metric gatehouse_upstream_publishes_total); P0=${P0:-0}
B0=$(metric gatehouse_upstream_bytes_total); B0=${B0:-0}
U0=$(metric gatehouse_billing_units_total); U0=${U0:-0}
START=$(date +%s.%N)
DEADLINE=$(( $(date +%s) + ${DRAIN_TIMEOUT:-3600} ))
while [[ "$(metric gatehouse_journal_rows)" != "0" ]]; do
    if (( $(date +%s) > DEADLINE )); then
        echo "[drain] not drained within ${DRAIN_TIMEOUT:-3600} s; see $TMP" >&2
        KEEP_TMP=1; exit 1
    fi
    sleep 0.2
done
END=$(date +%s.%N)
P=$(( $(metric gatehouse_upstream_publishes_total) - P0 ))
B=$(( $(metric gatehouse_upstream_bytes_total) - B0 ))
U=$(( $(metric gatehouse_billing_units_total) - U0 ))
python3 - "$START" "$END" "$P" "$B" "$U" "$TOTAL" "$PAYLOAD" <<'PY'
import math, sys
start, end, pubs, sent, units, total, payload = sys.argv[1:]
secs = float(end) - float(start)
pubs, sent, units, total, payload = int(pubs), int(sent), int(units), int(total), int(payload)
topic = len("agents/loadgen-00000/telemetry")
alone = total * math.ceil((payload + topic) / 5120)
print(f"drain: {total} messages in {secs:.1f} s ({total/secs:,.0f} msg/s)")
print(f"publishes: {pubs} ({pubs/secs:.1f}/s; cap 100/s), {total/max(pubs,1):,.0f} messages per publish")
print(f"bytes: {sent:,} ({sent/secs/1024:.0f} KiB/s; cap 512 KiB/s = {sent/secs/524288:.0%} of it)")
print(f"billing units: {units:,} vs {alone:,} relaying each message alone ({alone/max(units,1):,.0f}x fewer)")
PY
