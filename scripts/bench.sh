#!/usr/bin/env bash
# Gatehouse throughput benchmark.
#
# Builds the release binaries, then runs the same gatehouse-loadgen workload against
#   1. a memory-only mosquitto broker (baseline), and
#   2. `gatehouse run` (journal with synchronous=full, directory upstream, all in a temp dir),
# and prints msg/s for both plus the ratio gatehouse/mosquitto.
#
# Usage: scripts/bench.sh            (from anywhere; it cds to the repo root)
# Env (defaults): AGENTS=50 MESSAGES=1000 PAYLOAD=512 QOS=1 PROTOCOL=4 REPEAT=1
#                 INFLIGHT=100 TIMEOUT=300 SYNCHRONOUS=full MOSQUITTO=mosquitto
#                 LOADGEN_ARGS="" (extra loadgen flags)  KEEP_TMP=0 (1 = keep the temp dir)
#                 SKIP_BUILD=0  SKIP_MOSQUITTO=0
# Only 127.0.0.1 is used. Exit status is non-zero if any run fails.
set -euo pipefail

AGENTS="${AGENTS:-50}"
MESSAGES="${MESSAGES:-1000}"
PAYLOAD="${PAYLOAD:-512}"
QOS="${QOS:-1}"
PROTOCOL="${PROTOCOL:-4}"
REPEAT="${REPEAT:-1}"
INFLIGHT="${INFLIGHT:-100}"
TIMEOUT="${TIMEOUT:-300}"
SYNCHRONOUS="${SYNCHRONOUS:-full}"
LOADGEN_ARGS="${LOADGEN_ARGS:-}"
KEEP_TMP="${KEEP_TMP:-0}"
SKIP_BUILD="${SKIP_BUILD:-0}"
SKIP_MOSQUITTO="${SKIP_MOSQUITTO:-0}"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
GATEHOUSE="$TARGET_DIR/release/gatehouse"
LOADGEN="$TARGET_DIR/release/gatehouse-loadgen"

if [[ -z "${MOSQUITTO:-}" ]]; then
    MOSQUITTO="$(command -v mosquitto || true)"
    [[ -z "$MOSQUITTO" && -x /usr/sbin/mosquitto ]] && MOSQUITTO=/usr/sbin/mosquitto
fi

TMP="$(mktemp -d "${TMPDIR:-/tmp}/gatehouse-bench.XXXXXX")"
SERVER_PID=""
LOADGEN_PID=""

log() { printf '[bench] %s\n' "$*" >&2; }

stop_server() {
    local pid="$SERVER_PID"
    SERVER_PID=""
    [[ -z "$pid" ]] && return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        local i
        for ((i = 0; i < 300; i++)); do # up to 30 s for a graceful shutdown
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            log "pid $pid did not stop within 30 s of SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$?
    if [[ -n "$LOADGEN_PID" ]]; then
        kill -TERM "$LOADGEN_PID" 2>/dev/null || true
        wait "$LOADGEN_PID" 2>/dev/null || true
    fi
    stop_server
    if [[ "$KEEP_TMP" == 1 ]]; then
        log "kept temp dir $TMP"
    else
        rm -rf "$TMP"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

free_port() {
    local i port
    for ((i = 0; i < 200; i++)); do
        port=$((20000 + (RANDOM * 32768 + RANDOM) % 40000))
        if ! port_in_use "$port"; then
            echo "$port"
            return 0
        fi
    done
    log "no free port found"
    return 1
}

# wait_listening PORT LOGFILE NAME: until PORT accepts connections (max 30 s) or the server dies.
wait_listening() {
    local port="$1" logfile="$2" name="$3" i
    for ((i = 0; i < 300; i++)); do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            log "$name exited during startup; last log lines:"
            tail -n 20 "$logfile" >&2 || true
            return 1
        fi
        port_in_use "$port" && return 0
        sleep 0.1
    done
    log "$name did not listen on 127.0.0.1:$port within 30 s; last log lines:"
    tail -n 20 "$logfile" >&2 || true
    return 1
}

# run_load NAME PORT: runs the loadgen REPEAT times, appends one msg/s figure per line to
# $TMP/rates-NAME. The loadgen runs in the background so that a signal to this script is handled
# at once (bash defers traps while a foreground child runs).
run_load() {
    local name="$1" port="$2" r rc rate out
    for ((r = 1; r <= REPEAT; r++)); do
        out="$TMP/loadgen-$name-$r"
        # A distinct client prefix per run keeps every payload unique across repeats.
        # shellcheck disable=SC2086
        "$LOADGEN" --host 127.0.0.1 --port "$port" --agents "$AGENTS" \
            --messages "$MESSAGES" --payload-size "$PAYLOAD" --qos "$QOS" \
            --protocol "$PROTOCOL" --inflight "$INFLIGHT" --timeout-secs "$TIMEOUT" \
            --client-prefix "bench-${name}-r${r}-" $LOADGEN_ARGS >"$out.out" 2>"$out.err" &
        LOADGEN_PID=$!
        rc=0
        wait "$LOADGEN_PID" || rc=$?
        LOADGEN_PID=""
        grep '^RESULT ' "$out.out" >&2 || true
        if [[ "$rc" != 0 ]]; then
            log "loadgen against $name failed (run $r, exit $rc):"
            tail -n 20 "$out.err" >&2 || true
            return 1
        fi
        rate="$(sed -n 's/^RESULT .*msg_per_sec=\([0-9.]*\).*/\1/p' "$out.out" | tail -n 1)"
        [[ -n "$rate" ]] || { log "no RESULT line from loadgen"; return 1; }
        echo "$rate" >>"$TMP/rates-$name"
    done
}

median() { sort -n | awk '{v[NR] = $1} END { if (NR == 0) exit 1; print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# --- build -------------------------------------------------------------------------------------
if [[ "$SKIP_BUILD" != 1 ]]; then
    log "building release binaries"
    cargo build --release --bins
fi
for bin in "$GATEHOUSE" "$LOADGEN"; do
    [[ -x "$bin" ]] || { log "missing binary $bin"; exit 1; }
done

log "workload: agents=$AGENTS messages/agent=$MESSAGES payload=${PAYLOAD}B qos=$QOS protocol=$PROTOCOL inflight=$INFLIGHT repeat=$REPEAT"

# --- baseline: mosquitto -----------------------------------------------------------------------
MOSQ_RATE=""
if [[ "$SKIP_MOSQUITTO" != 1 ]]; then
    [[ -n "$MOSQUITTO" ]] || { log "mosquitto not found (set MOSQUITTO=/path or SKIP_MOSQUITTO=1)"; exit 1; }
    MPORT="$(free_port)"
    # max_inflight_messages is also the Receive Maximum mosquitto announces to MQTT 5 clients.
    cat >"$TMP/mosquitto.conf" <<EOF
persistence false
listener $MPORT 127.0.0.1
allow_anonymous true
max_inflight_messages $((INFLIGHT > 1000 ? INFLIGHT : 1000))
max_queued_messages 1000000
max_queued_bytes 0
log_dest stderr
log_type error
log_type warning
EOF
    log "starting mosquitto on 127.0.0.1:$MPORT"
    "$MOSQUITTO" -c "$TMP/mosquitto.conf" >"$TMP/mosquitto.log" 2>&1 &
    SERVER_PID=$!
    wait_listening "$MPORT" "$TMP/mosquitto.log" mosquitto
    run_load mosquitto "$MPORT"
    stop_server
    MOSQ_RATES="$(cat "$TMP/rates-mosquitto")"
    MOSQ_RATE="$(median <"$TMP/rates-mosquitto")"
fi

# --- gatehouse ---------------------------------------------------------------------------------
GPORT="$(free_port)"
mkdir -p "$TMP/gatehouse"
cat >"$TMP/gatehouse.json" <<EOF
{
  "thingName": "gw-bench",
  "listeners": [{"bind": "127.0.0.1:$GPORT"}],
  "journal": {"path": "$TMP/gatehouse/journal.db", "synchronous": "$SYNCHRONOUS"},
  "upstream": {"kind": "directory", "path": "$TMP/gatehouse/outbox"},
  "logLevel": "info"
}
EOF
log "starting gatehouse on 127.0.0.1:$GPORT (journal synchronous=$SYNCHRONOUS)"
"$GATEHOUSE" run --config "$TMP/gatehouse.json" >"$TMP/gatehouse.log" 2>&1 &
SERVER_PID=$!
wait_listening "$GPORT" "$TMP/gatehouse.log" gatehouse
if ! run_load gatehouse "$GPORT"; then
    log "gatehouse log tail:"
    tail -n 20 "$TMP/gatehouse.log" >&2 || true
    exit 1
fi
stop_server
GH_RATES="$(cat "$TMP/rates-gatehouse")"
GH_RATE="$(median <"$TMP/rates-gatehouse")"

# --- summary -----------------------------------------------------------------------------------
echo
echo "workload: $AGENTS agents x $MESSAGES msgs x ${PAYLOAD} B, QoS $QOS, MQTT protocol $PROTOCOL, inflight $INFLIGHT, repeat $REPEAT (median)"
if [[ -n "$MOSQ_RATE" ]]; then
    printf 'mosquitto: %10.0f msg/s   (runs: %s)\n' "$MOSQ_RATE" "$(echo $MOSQ_RATES)"
fi
printf 'gatehouse: %10.0f msg/s   (runs: %s)\n' "$GH_RATE" "$(echo $GH_RATES)"
if [[ -n "$MOSQ_RATE" ]]; then
    awk -v g="$GH_RATE" -v m="$MOSQ_RATE" 'BEGIN { printf "ratio gatehouse/mosquitto: %.3f\n", (m > 0 ? g / m : 0) }'
fi
