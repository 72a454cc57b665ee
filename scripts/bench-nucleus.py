#!/usr/bin/env python3
"""A minimal Greengrass nucleus stand-in for scripts/bench-ipc.sh: just enough event-stream RPC
(docs: ../shared/greengrass/IPC.md) for `gatehouse run` as a component.

It answers Connect, GetConfiguration (the component configuration from CONFIG; for
aws.greengrass.NucleusLite an empty one, so the gateway detects nucleus lite), UpdateState,
SubscribeToConfigurationUpdate, and PublishToIoTCore, counting publishes, payload bytes and
5 KB billing units. Like nucleus lite it closes the connection on a frame over MAX_FRAME bytes,
never terminates unary streams, and refuses SubscribeToValidateConfigurationUpdates. While the
file OFFLINE exists, PublishToIoTCore fails with the ServiceError nucleus lite gives offline.
Its counters are written to STATS (JSON) every 100 ms.

Usage: bench-nucleus.py SOCKET TOKEN CONFIG.json STATS.json OFFLINE MAX_FRAME
The tests use the Rust fake in tests/it/fake_nucleus.rs; this one only serves the benchmark.
"""

import json
import math
import os
import socket
import struct
import sys
import threading
import zlib
import base64

SOCKET, TOKEN, CONFIG, STATS, OFFLINE, MAX_FRAME = sys.argv[1:7]
MAX_FRAME = int(MAX_FRAME)
config = json.load(open(CONFIG))
stats = {"publishes": 0, "payload_bytes": 0, "billing_units": 0, "refused": 0, "oversize": 0}
lock = threading.Lock()


def header(name, value):
    n = name.encode()
    if isinstance(value, int):
        return bytes([len(n)]) + n + b"\x04" + struct.pack(">i", value)
    v = value.encode()
    return bytes([len(n)]) + n + b"\x07" + struct.pack(">H", len(v)) + v


def frame(headers, payload=b""):
    h = b"".join(header(k, v) for k, v in headers)
    total = 16 + len(h) + len(payload)
    prelude = struct.pack(">II", total, len(h))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + h + payload
    return body + struct.pack(">I", zlib.crc32(body))


def parse_headers(data):
    out, i = {}, 0
    while i < len(data):
        n = data[i]
        name = data[i + 1:i + 1 + n].decode()
        i += 1 + n
        t = data[i]
        i += 1
        if t == 4:
            out[name] = struct.unpack(">i", data[i:i + 4])[0]
            i += 4
        elif t in (6, 7):
            ln = struct.unpack(">H", data[i:i + 2])[0]
            out[name] = data[i + 2:i + 2 + ln].decode(errors="replace")
            i += 2 + ln
        elif t in (0, 1):
            out[name] = t == 0
        else:
            i += {2: 1, 3: 2, 5: 8, 8: 8, 9: 16}[t]
    return out


def reply(conn, stream, model, body, error=False):
    headers = [(":message-type", 1 if error else 0), (":message-flags", 2 if error else 0),
               (":stream-id", stream), (":content-type", "application/json"),
               ("service-model-type", "aws.greengrass#" + model)]
    conn.sendall(frame(headers, json.dumps(body).encode()))


def serve(conn):
    buf = b""
    connected = False
    while True:
        while len(buf) < 4 or len(buf) < struct.unpack(">I", buf[:4])[0]:
            if len(buf) >= 4 and struct.unpack(">I", buf[:4])[0] > MAX_FRAME:
                with lock:
                    stats["oversize"] += 1
                conn.close()
                return
            chunk = conn.recv(65536)
            if not chunk:
                return
            buf += chunk
        total, hlen = struct.unpack(">II", buf[:8])
        raw, buf = buf[:total], buf[total:]
        h = parse_headers(raw[12:12 + hlen])
        payload = raw[12 + hlen:total - 4]
        if not connected:
            if json.loads(payload or b"{}").get("authToken") != TOKEN:
                conn.close()
                return
            conn.sendall(frame([(":message-type", 5), (":message-flags", 1), (":stream-id", 0)]))
            connected = True
            continue
        op = h.get("operation", "").replace("aws.greengrass#", "")
        stream = h.get(":stream-id", 0)
        if not op:
            continue  # a stream close
        body = json.loads(payload or b"{}")
        if op == "GetConfiguration":
            value = config if body.get("componentName") in (None, "io.gatehouse.AgentGateway") else {}
            reply(conn, stream, "GetConfigurationResponse", {"componentName": "x", "value": value})
        elif op == "PublishToIoTCore":
            if os.path.exists(OFFLINE):
                with lock:
                    stats["refused"] += 1
                reply(conn, stream, "ServiceError",
                      {"_message": "Device is offline", "_errorCode": "ServiceError"}, error=True)
                continue
            data = base64.b64decode(body.get("payload", ""))
            with lock:
                stats["publishes"] += 1
                stats["payload_bytes"] += len(data)
                stats["billing_units"] += math.ceil((len(data) + len(body["topicName"])) / 5120)
            reply(conn, stream, "PublishToIoTCoreResponse", {})
        elif op in ("UpdateState", "SubscribeToConfigurationUpdate"):
            reply(conn, stream, op + "Response", {})
        else:
            reply(conn, stream, "ServiceError", {"_message": "", "_errorCode": "ServiceError"},
                  error=True)


def write_stats():
    import time
    while True:
        time.sleep(0.1)
        with lock:
            json.dump(stats, open(STATS + ".tmp", "w"))
        os.replace(STATS + ".tmp", STATS)


threading.Thread(target=write_stats, daemon=True).start()
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
if os.path.exists(SOCKET):
    os.unlink(SOCKET)
server.bind(SOCKET)
server.listen(4)
while True:
    c, _ = server.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
