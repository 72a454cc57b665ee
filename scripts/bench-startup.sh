#!/usr/bin/env bash
# Start-up and ingest with a large backlog.
#
# 1. Runs `gatehouse run` with an mqtt upstream nobody answers, so nothing is ever confirmed,
#    and journals BACKLOG agent messages (QoS 1, PAYLOAD bytes) with gatehouse-loadgen.
# 2. Stops it (SIGTERM) and starts it again on that journal, REPEAT times: time from spawning
#    the process to the first CONNACK+PUBACK an agent gets (mosquitto_pub -q 1, retried until it
#    succeeds). The same is measured on an empty journal: the baseline.
# 3. Ingest: gatehouse-loadgen (AGENTS x MESSAGES, QoS 1) against the gateway holding the
#    backlog, and against one with an empty journal, alternately, REPEAT times each.
# Prints every run and the ratios (backlog / empty).
#
# Env (defaults): BACKLOG=10000000 PAYLOAD=512 AGENTS=50 MESSAGES=5000 REPEAT=3 SKIP_BUILD=0
#                 KEEP_TMP=0 WORK= (a directory to keep the backlog journal in and reuse on the
#                 next run: filling 10M records takes minutes). Needs about 1 KB of disk per
#                 backlog record.
set -euo pipefail

BACKLOG="${BACKLOG:-10000000}"
PAYLOAD="${PAYLOAD:-512}"
AGENTS="${AGENTS:-50}"
MESSAGES="${MESSAGES:-5000}"
REPEAT="${REPEAT:-3}"
SKIP_BUILD="${SKIP_BUILD:-0}"
KEEP_TMP="${KEEP_TMP:-0}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
GATEHOUSE="$TARGET_DIR/release/gatehouse"
LOADGEN="$TARGET_DIR/release/gatehouse-loadgen"
[[ "$SKIP_BUILD" == 1 ]] || cargo build --release --bins --quiet

if [[ -n "${WORK:-}" ]]; then
    mkdir -p "$WORK"; TMP="$(cd "$WORK" && pwd)"; KEEP_TMP=1
else
    TMP="$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-startup.XXXXXX")"
fi
GW_PID=""
cleanup() {
    [[ -n "$GW_PID" ]] && kill "$GW_PID" 2>/dev/null || true
    wait 2>/dev/null || true
    [[ "$KEEP_TMP" == 1 ]] && echo "[startup] kept $TMP" || rm -rf "$TMP"
}
trap cleanup EXIT INT TERM
# shellcheck source=scripts/bench-lib.sh
source "$ROOT/scripts/bench-lib.sh"
[[ -f "$TMP/client.pem" ]] || make_certs "$TMP"
DEAD_BROKER=$(free_port)

# config NAME: a config whose journal is $TMP/NAME.db, on its own ports.
config() {
    local name="$1" port admin
    port=$(free_port); admin=$(free_port)
    cat > "$TMP/$name.json" <<JSON
{
  "thingName": "bench-gw",
  "listeners": [{"bind": "127.0.0.1:$port"}],
  "journal": {"path": "$TMP/$name.db", "maxBytes": 68719476736, "dedupWindowSecs": 0},
  "upstream": {"kind": "mqtt", "host": "localhost", "port": $DEAD_BROKER,
               "caFile": "$TMP/ca.pem", "certFile": "$TMP/client.pem", "keyFile": "$TMP/client.key",
               "reconnectMinMs": 5000, "reconnectMaxMs": 10000},
  "logLevel": "warn",
  "metrics": {"bind": "127.0.0.1:$admin"}
}
JSON
    echo "$port $admin"
}

# start NAME: starts the gateway on NAME's config; sets STARTED_IN to the seconds until an
# agent's QoS 1 publish was acknowledged.
start() {
    local name="$1" port t0 t1
    port=$(python3 -c "import json,sys; print(json.load(open('$TMP/$name.json'))['listeners'][0]['bind'].split(':')[1])")
    t0=$(date +%s.%N)
    "$GATEHOUSE" run --config "$TMP/$name.json" >> "$TMP/$name.log" 2>&1 &
    GW_PID=$!
    until mosquitto_pub -h 127.0.0.1 -p "$port" -q 1 -i probe -t probe -m up 2>/dev/null; do
        kill -0 "$GW_PID" 2>/dev/null || { echo "[startup] gateway died; see $TMP/$name.log" >&2; KEEP_TMP=1; exit 1; }
        sleep 0.01
    done
    t1=$(date +%s.%N)
    STARTED_IN=$(python3 -c "print(f'{$t1 - $t0:.3f}')")
}

stop() {
    kill -TERM "$GW_PID"; wait "$GW_PID" || true; GW_PID=""
}

read -r BIG_PORT BIG_ADMIN < <(config backlog)
read -r EMPTY_PORT EMPTY_ADMIN < <(config empty)

start backlog
ADMIN=$BIG_ADMIN
if [[ "$(metric gatehouse_journal_rows)" -lt "$BACKLOG" ]]; then
    echo "[startup] journaling $BACKLOG messages of $PAYLOAD B (upstream unreachable)"
    PER_AGENT=$(( (BACKLOG + AGENTS - 1) / AGENTS ))
    "$LOADGEN" --port "$BIG_PORT" --agents "$AGENTS" --messages "$PER_AGENT" --payload-size "$PAYLOAD" \
        --qos 1 --timeout-secs 7200 | grep '^RESULT'
fi
echo "[startup] journal holds $(metric gatehouse_journal_rows) records, $(du -sh "$TMP/backlog.db" | cut -f1) on disk"
stop

for i in $(seq "$REPEAT"); do
    start backlog; s_big=$STARTED_IN; stop
    start empty; s_empty=$STARTED_IN; stop
    echo "[startup] run $i: first acknowledged publish after ${s_big} s with the backlog, ${s_empty} s empty"
done

rate() {   # rate PORT -> msg/s of one loadgen run
    "$LOADGEN" --port "$1" --agents "$AGENTS" --messages "$MESSAGES" --payload-size "$PAYLOAD" \
        --qos 1 --client-prefix "ingest-$RANDOM-" | awk '/^RESULT/ { for (i=1;i<=NF;i++) if ($i ~ /^msg_per_sec=/) { split($i,a,"="); print a[2] } }'
}
BIG_RATES=(); EMPTY_RATES=()
for i in $(seq "$REPEAT"); do
    rm -f "$TMP"/empty.db*
    start backlog; BIG_RATES+=("$(rate "$BIG_PORT")"); stop
    start empty; EMPTY_RATES+=("$(rate "$EMPTY_PORT")"); stop
    echo "[startup] ingest run $i: ${BIG_RATES[-1]} msg/s with the backlog, ${EMPTY_RATES[-1]} msg/s empty"
done
python3 - "${BIG_RATES[*]}" "${EMPTY_RATES[*]}" <<'PY'
import statistics, sys
big = [float(x) for x in sys.argv[1].split()]
empty = [float(x) for x in sys.argv[2].split()]
print(f"ingest: median {statistics.median(big):,.0f} msg/s with the backlog, "
      f"{statistics.median(empty):,.0f} msg/s empty: ratio {statistics.median(big)/statistics.median(empty):.2f}")
PY
