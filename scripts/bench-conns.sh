#!/usr/bin/env bash
# Resident memory per idle agent connection: the gateway against mosquitto, plain TCP and TLS
# (client certificates), in the same run on the same machine.
#
#   scripts/bench-conns.sh [N]      # N idle connections per server (default 10000)
#
# For each server: start it, read its VmRSS, open N connections with gatehouse-idle
# (src/bin/gatehouse-idle.rs: CONNECT + CONNACK, then idle; 64 set-ups at once), wait until RSS
# settles, read VmRSS again; per connection = (after - before) / N. Prints one RESULT line per
# server and a summary table. SERVERS="gatehouse-plain gatehouse-tls" limits the run to those.
# N is bounded by the open-files limit (each side holds N sockets).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh

N="${1:-10000}"
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((N + 200)) ]; then
    echo "bench-conns: open-files limit $(ulimit -n) is below N=$N plus margin" >&2
    exit 1
fi
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || { echo "needs mosquitto" >&2; exit 1; }
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

cargo build --release --quiet --bin gatehouse --bin gatehouse-idle
GATEHOUSE=target/release/gatehouse
WORK=$(mktemp -d /tmp/gatehouse-bench-conns.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
make_certs "$WORK"

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }

wait_port() {
    for _ in $(seq 200); do
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "port $1 never opened" >&2; return 1
}

# settle PID: wait until RSS stops growing (two equal reads 1 s apart, at most 15 s).
settle() {
    local last now
    last=$(rss_kb "$1")
    for _ in $(seq 15); do
        sleep 1
        now=$(rss_kb "$1")
        [ "$now" -le "$last" ] && break
        last=$now
    done
    rss_kb "$1"
}

declare -A PER
measure() { # NAME PID PORT [tls]
    local name=$1 pid=$2 port=$3 tls=${4:-}
    wait_port "$port"
    sleep 1
    local before after client
    before=$(rss_kb "$pid")
    local args=(--port "$port" -n "$N")
    [ -n "$tls" ] && args+=(--cafile "$WORK/ca.pem" --cert "$WORK/client.pem" --key "$WORK/client.key")
    target/release/gatehouse-idle --sources 4 "${args[@]}" > "$WORK/$name.client" 2>&1 &
    client=$!
    for _ in $(seq 600); do
        grep -q READY "$WORK/$name.client" 2>/dev/null && break
        kill -0 "$client" 2>/dev/null || { echo "$name: client failed" >&2; cat "$WORK/$name.client" >&2; return 1; }
        sleep 0.5
    done
    after=$(settle "$pid")
    local per=$(( (after - before) * 1024 / N ))
    PER[$name]=$per
    echo "RESULT server=$name connections=$N rss_before_kb=$before rss_after_kb=$after bytes_per_connection=$per ($(cat "$WORK/$name.client"))"
    kill "$client"; wait "$client" 2>/dev/null || true
}

gateway() { # NAME tls?
    local name=$1 tls=${2:-} port
    port=$(free_port)
    local listener="{\"bind\": \"127.0.0.1:$port\", \"clientIdBinding\": false, \"maxConnections\": 1000000, \"connectionsPerSec\": 1000000, \"connectionBurst\": 1000000"
    [ -n "$tls" ] && listener+=", \"tls\": {\"certFile\": \"$WORK/server.pem\", \"keyFile\": \"$WORK/server.key\", \"clientCaFile\": \"$WORK/ca.pem\"}"
    listener+="}"
    mkdir -p "$WORK/$name"
    cat > "$WORK/$name/config.json" <<JSON
{"thingName": "bench", "listeners": [$listener],
 "journal": {"path": "$WORK/$name/journal.db"},
 "upstream": {"kind": "directory", "path": "$WORK/$name/outbox"},
 "acl": [{"allow": "all", "topic": "#"}], "logLevel": "warn"}
JSON
    "$GATEHOUSE" run --config "$WORK/$name/config.json" > "$WORK/$name/log" 2>&1 &
    local pid=$!
    measure "$name" "$pid" "$port" "$tls"
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

broker() { # NAME tls?
    local name=$1 tls=${2:-} port
    port=$(free_port)
    mkdir -p "$WORK/$name"
    {
        echo "listener $port 127.0.0.1"
        echo "allow_anonymous true"
        echo "max_connections -1"
        echo "user $(id -un)"
        if [ -n "$tls" ]; then
            echo "cafile $WORK/ca.pem"; echo "certfile $WORK/server.pem"; echo "keyfile $WORK/server.key"
            echo "require_certificate true"
        fi
    } > "$WORK/$name/mosquitto.conf"
    "$MOSQUITTO" -c "$WORK/$name/mosquitto.conf" > "$WORK/$name/log" 2>&1 &
    local pid=$!
    measure "$name" "$pid" "$port" "$tls"
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

SERVERS="${SERVERS:-mosquitto-plain gatehouse-plain mosquitto-tls gatehouse-tls}"
echo "# $N idle connections per server; $(nproc) cores; $(uname -r); mosquitto $("$MOSQUITTO" -h | head -1 | awk '{print $3}')"
for server in $SERVERS; do
    case $server in
        mosquitto-plain) broker mosquitto-plain ;;
        gatehouse-plain) gateway gatehouse-plain ;;
        mosquitto-tls) broker mosquitto-tls tls ;;
        gatehouse-tls) gateway gatehouse-tls tls ;;
        *) echo "unknown server $server" >&2; exit 1 ;;
    esac
done

printf '\n| transport | mosquitto B/conn | gatehouse B/conn | ratio |\n|---|---|---|---|\n'
for t in plain tls; do
    m=${PER[mosquitto-$t]:-0}; g=${PER[gatehouse-$t]:-0}
    printf '| %s | %s | %s | %s |\n' "$t" "$m" "$g" "$(python3 -c "print(f'{$g/max($m,1):.2f}x')")"
done
