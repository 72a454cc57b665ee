#!/usr/bin/env python3
"""Open N idle MQTT 3.1.1 connections (CONNECT, wait for CONNACK) and hold them.

Used by scripts/bench-conns.sh to measure a broker's resident memory per idle connection.
Plain TCP, or TLS with a client certificate (--cafile/--cert/--key). Prints "READY n" once
all n connections got a successful CONNACK, then holds them until SIGTERM. Exits non-zero if
any connection fails.
"""
import argparse
import signal
import socket
import ssl
import struct
import time


def connect_packet(client_id: str, keep_alive: int) -> bytes:
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack(">H", keep_alive) + struct.pack(">H", len(cid)) + cid
    return b"\x10" + bytes([len(body)]) + body


def open_one(args, ctx, i):
    s = socket.create_connection((args.host, args.port), timeout=30)
    if ctx is not None:
        # The certificate's CN is the agent's identity; client-id binding is off in the bench
        # config so every connection can share one certificate.
        s = ctx.wrap_socket(s, server_hostname="localhost")
    s.sendall(connect_packet(f"{args.prefix}{i:06d}", args.keep_alive))
    ack = b""
    while len(ack) < 4:
        chunk = s.recv(4 - len(ack))
        if not chunk:
            raise RuntimeError(f"connection {i}: closed before CONNACK")
        ack += chunk
    if ack[0] != 0x20 or ack[3] != 0:
        raise RuntimeError(f"connection {i}: CONNACK {ack.hex()}")
    s.setblocking(False)
    return s


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("--prefix", default="idle-")
    p.add_argument("--keep-alive", type=int, default=600)
    p.add_argument("--cafile")
    p.add_argument("--cert")
    p.add_argument("--key")
    args = p.parse_args()
    ctx = None
    if args.cafile:
        ctx = ssl.create_default_context(cafile=args.cafile)
        if args.cert:
            ctx.load_cert_chain(args.cert, args.key)
    socks = []
    started = time.monotonic()
    for i in range(args.n):
        for attempt in range(50):
            try:
                socks.append(open_one(args, ctx, i))
                break
            except (ConnectionRefusedError, ConnectionResetError, socket.timeout) as e:
                if attempt == 49:
                    raise
                time.sleep(0.05)
    print(f"READY {len(socks)} in {time.monotonic() - started:.1f}s", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    while not stop:
        time.sleep(0.2)
    for s in socks:
        s.close()


if __name__ == "__main__":
    main()
