#!/usr/bin/env python3
"""Load generator for pyps.py: round time of synchronous data-parallel training.

W worker threads, each with its own gRPC channel, run R synchronous rounds
against a running pyps server (``pyps.PS``): in round t every worker pushes
its gradients for round t, then pulls round t + 1 (the parameters after the
round's averaged, clipped AdamW step). Gradients are random float32 (fixed
seed per worker), generated once and reused; worker 0 calls Init first.

A round's wall time runs from the first worker starting its push to the last
worker's pull completing. A threading.Barrier separates rounds so they do not
overlap (the next round's push message is built before the barrier, outside
the timed span). The first round is warmup and left out of the stats.

Prints one JSON line: ``{"rounds": R, "round_seconds_median": ..,
"round_seconds_p99": .., "rounds_per_s": ..}`` where rounds_per_s is the
number of measured rounds divided by their summed wall time. Starts no
processes; every gRPC call has a timeout (default 300 s), so it never hangs.
"""

import argparse
import json
import math
import statistics
import sys
import threading
import time

import grpc
import numpy as np

MAX_MESSAGE = 2**31 - 1


def split_sizes(n, k):
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def framed(header):
    """4-byte LE length + JSON header, padded with spaces (still valid JSON)
    so the float32 payload that follows starts 4-byte aligned."""
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-(4 + len(h)) % 4)
    return len(h).to_bytes(4, "little") + h


def percentile(values, q):
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100.0 * len(s)) - 1)]


def main(argv=None):
    ap = argparse.ArgumentParser(description="Load generator for pyps.py.")
    ap.add_argument("--server", required=True, help="host:port of a running pyps.py")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--params", type=int, default=16777216, help="total float32 elements")
    ap.add_argument("--tensors", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=10, help="rounds incl. 1 warmup round")
    ap.add_argument("--max-norm", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per gRPC call")
    args = ap.parse_args(argv)

    if args.workers < 1:
        ap.error("--workers must be >= 1")
    if args.params < 1 or not 1 <= args.tensors <= args.params:
        ap.error("need --params >= 1 and 1 <= --tensors <= --params")
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (the first round is warmup)")
    if args.timeout <= 0:
        ap.error("--timeout must be > 0")

    W, N, R = args.workers, args.params, args.rounds
    shapes = [[n] for n in split_sizes(N, args.tensors)]
    nbytes = N * 4

    starts = [[0.0] * W for _ in range(R)]
    ends = [[0.0] * W for _ in range(R)]
    errors = []
    errors_lock = threading.Lock()
    init_done = threading.Event()
    barrier = threading.Barrier(W)
    # Waiting at the barrier covers at most one push + one pull of a slower worker.
    barrier_timeout = 2 * args.timeout + 60

    def fail(w, e):
        with errors_lock:
            errors.append(f"worker {w}: {e!r}" if not isinstance(e, str) else f"worker {w}: {e}")
        barrier.abort()
        init_done.set()

    def worker(w):
        channel = None
        try:
            channel = grpc.insecure_channel(
                args.server,
                options=[
                    ("grpc.max_send_message_length", MAX_MESSAGE),
                    ("grpc.max_receive_message_length", MAX_MESSAGE),
                ],
            )
            connect_s = min(30.0, args.timeout)
            try:
                grpc.channel_ready_future(channel).result(timeout=connect_s)
            except grpc.FutureTimeoutError:
                raise ConnectionError(f"could not connect to {args.server} within {connect_s:.0f} s")
            init = channel.unary_unary("/pyps.PS/Init")
            push = channel.unary_unary("/pyps.PS/Push")
            pull = channel.unary_unary("/pyps.PS/Pull")

            rng = np.random.default_rng(args.seed + 1 + w)
            grads = rng.standard_normal(N, dtype=np.float32).tobytes()

            if w == 0:
                values = np.random.default_rng(args.seed).standard_normal(N, dtype=np.float32) * np.float32(0.02)
                body = (
                    framed(
                        {
                            "shapes": shapes,
                            "workers": W,
                            "lr": args.lr,
                            "weight_decay": args.weight_decay,
                            "max_norm": args.max_norm,
                        }
                    )
                    + values.tobytes()
                )
                del values
                init(body, timeout=args.timeout)
                del body
                init_done.set()
            elif not init_done.wait(args.timeout):
                raise TimeoutError("timed out waiting for worker 0's Init")
            if errors:
                return

            for t in range(R):
                body = framed({"worker": w, "round": t}) + grads
                pull_req = json.dumps({"round": t + 1}).encode()
                barrier.wait(barrier_timeout)
                starts[t][w] = time.perf_counter()
                push(body, timeout=args.timeout)
                params = pull(pull_req, timeout=args.timeout)
                ends[t][w] = time.perf_counter()
                if len(params) != nbytes:
                    raise ValueError(f"Pull returned {len(params)} bytes, expected {nbytes}")
                if t == R - 1 and not np.isfinite(np.frombuffer(params, np.float32)).all():
                    raise ValueError("non-finite parameters after the last round")
                del body, params
        except threading.BrokenBarrierError:
            pass  # another worker failed and reported it
        except grpc.RpcError as e:
            fail(w, f"{e.code()}: {e.details()}")
        except Exception as e:  # noqa: BLE001 - report and exit non-zero
            fail(w, e)
        finally:
            if channel is not None:
                channel.close()

    threads = [threading.Thread(target=worker, args=(w,), daemon=True, name=f"worker-{w}") for w in range(W)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()

    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 1

    times = [max(ends[t]) - min(starts[t]) for t in range(1, R)]
    print(
        json.dumps(
            {
                "rounds": R,
                "workers": W,
                "params": N,
                "tensors": args.tensors,
                "round_seconds_median": statistics.median(times),
                "round_seconds_p99": percentile(times, 99),
                "rounds_per_s": len(times) / sum(times),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
