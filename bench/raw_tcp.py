#!/usr/bin/env python3
"""Ceiling probe: raw TCP throughput over loopback (127.0.0.1).

One connection; a receiver thread reads B bytes into a preallocated bytearray
with recv_into while the main thread sends a preallocated payload with
sendall. Each repeat times one full transfer (from the first send to the
receiver holding all B bytes) after one untimed warmup transfer. This is the
best a byte-moving protocol on this machine's loopback can do, the upper bound
for any gRPC parameter server here.

Prints one JSON line: {"bytes": B, "repeat": R, "gbps_median": ..,
"gbps_max": ..} with gbps = B / seconds / 1e9 (gigabytes per second).
"""

import argparse
import json
import socket
import statistics
import sys
import threading
import time

TIMEOUT_S = 60.0


def main(argv=None):
    ap = argparse.ArgumentParser(description="Raw TCP loopback throughput probe.")
    ap.add_argument("--bytes", type=int, default=64 * 1024 * 1024, help="bytes per transfer")
    ap.add_argument("--repeat", type=int, default=10, help="timed transfers")
    args = ap.parse_args(argv)
    if args.bytes < 1 or args.repeat < 1:
        ap.error("--bytes and --repeat must be >= 1")

    B = args.bytes
    payload = bytes(B)
    recv_buf = bytearray(B)
    rounds = args.repeat + 1  # first transfer is warmup
    done = [0.0] * rounds
    go = [threading.Event() for _ in range(rounds)]
    errors = []

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(TIMEOUT_S)
    port = listener.getsockname()[1]

    def receiver():
        try:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT_S)
            view = memoryview(recv_buf)
            with conn:
                for i in range(rounds):
                    got = 0
                    while got < B:
                        n = conn.recv_into(view[got:], B - got)
                        if n == 0:
                            raise ConnectionError("sender closed early")
                        got += n
                    done[i] = time.perf_counter()
                    go[i].set()
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
            for ev in go:
                ev.set()

    th = threading.Thread(target=receiver, daemon=True)
    th.start()
    times = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(rounds):
                t0 = time.perf_counter()
                s.sendall(payload)
                if not go[i].wait(TIMEOUT_S) or errors:
                    raise RuntimeError(errors[0] if errors else "receiver timed out")
                if i > 0:
                    times.append(done[i] - t0)
    except Exception as e:  # noqa: BLE001
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        listener.close()
    th.join(TIMEOUT_S)

    gbps = [B / t / 1e9 for t in times]
    print(
        json.dumps(
            {
                "bytes": B,
                "repeat": args.repeat,
                "gbps_median": statistics.median(gbps),
                "gbps_max": max(gbps),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
