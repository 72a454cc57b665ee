#!/usr/bin/env bash
# TLS ingest throughput against plain TCP: one gateway with a plain and a mutual-TLS listener,
# the same gatehouse-loadgen workload against each, alternating, REPEAT times; prints the median
# msg/s of each and the ratio TLS / plain.
#
#   scripts/bench-tls.sh
#   Env (defaults): AGENTS=50 MESSAGES=2000 PAYLOAD=512 PROTOCOL=4 REPEAT=3
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/bench-lib.sh

AGENTS="${AGENTS:-50}"
MESSAGES="${MESSAGES:-2000}"
PAYLOAD="${PAYLOAD:-512}"
PROTOCOL="${PROTOCOL:-4}"
REPEAT="${REPEAT:-3}"

cargo build --release --quiet --bin gatehouse --bin gatehouse-loadgen
WORK=$(mktemp -d /tmp/gatehouse-bench-tls.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null; rm -rf "$WORK"' EXIT
make_certs "$WORK"

PLAIN=$(free_port)
TLS=$(free_port)
cat > "$WORK/config.json" <<JSON
{"thingName": "bench",
 "listeners": [
   {"bind": "127.0.0.1:$PLAIN"},
   {"bind": "127.0.0.1:$TLS", "clientIdBinding": false,
    "tls": {"certFile": "$WORK/server.pem", "keyFile": "$WORK/server.key", "clientCaFile": "$WORK/ca.pem"}}],
 "journal": {"path": "$WORK/journal.db"},
 "upstream": {"kind": "directory", "path": "$WORK/outbox"},
 "acl": [{"allow": "all", "topic": "#"}], "logLevel": "warn"}
JSON
target/release/gatehouse run --config "$WORK/config.json" > "$WORK/gatehouse.log" 2>&1 &
for _ in $(seq 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$TLS") 2>/dev/null && break
    sleep 0.1
done

run() { # NAME RUN PORT [loadgen TLS flags]
    local name=$1 run=$2 port=$3
    shift 3
    target/release/gatehouse-loadgen --port "$port" --agents "$AGENTS" --messages "$MESSAGES" \
        --payload-size "$PAYLOAD" --protocol "$PROTOCOL" --client-prefix "$name-$run-" "$@" \
        > "$WORK/$name-$run.out" 2> "$WORK/$name-$run.err" || {
        echo "loadgen against $name failed:" >&2; tail -5 "$WORK/$name-$run.err" >&2; exit 1; }
    local line
    line=$(grep '^RESULT' "$WORK/$name-$run.out")
    echo "$name run $run: $line" >&2
    sed -n 's/.*msg_per_sec=\([0-9]*\).*/\1/p' <<<"$line" >> "$WORK/rates-$name"
}

for r in $(seq "$REPEAT"); do
    run plain "$r" "$PLAIN"
    run tls "$r" "$TLS" --cafile "$WORK/ca.pem" --cert "$WORK/client.pem" --key "$WORK/client.key"
done

P=$(median < "$WORK/rates-plain")
T=$(median < "$WORK/rates-tls")
echo "workload: $AGENTS agents x $MESSAGES msgs x $PAYLOAD B, QoS 1, MQTT $PROTOCOL, $REPEAT runs each (median), $(nproc) cores"
echo "plain: $P msg/s   (runs: $(tr '\n' ' ' < "$WORK/rates-plain"))"
echo "tls:   $T msg/s   (runs: $(tr '\n' ' ' < "$WORK/rates-tls"))"
awk -v t="$T" -v p="$P" 'BEGIN { printf "ratio tls/plain: %.3f\n", t / p }'
