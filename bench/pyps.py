#!/usr/bin/env python3
"""Baseline: the minimal Python parameter server a user would otherwise write.

A grpcio server (ThreadPoolExecutor, no .proto files: generic handlers on raw
bytes) for service ``pyps.PS`` that does synchronous data-parallel AdamW:

* ``Init``: 4-byte little-endian header length + JSON header
  ``{"shapes": [[...], ...], "workers": W, "lr": .., "weight_decay": ..,
  "max_norm": ..}`` followed by the concatenated initial float32 values of all
  tensors in order. Calling Init again replaces the whole state.
* ``Push``: 4-byte LE header length + JSON ``{"worker": w, "round": t}`` +
  the concatenated float32 gradients of all tensors in order. Rounds are
  numbered from 0; a push for a future round waits until that round is the
  current one.
* ``Pull``: JSON ``{"round": r}``; blocks until r rounds are complete
  (r = 0: the initial values; after pushing round t a worker pulls t + 1) and
  returns the concatenated float32 parameters (the latest snapshot).

When all W workers have pushed the current round, the gradients are averaged
(``np.frombuffer`` views of the request bytes, summed, divided by W), clipped
with ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (skipped when
max_norm is null or <= 0), and one ``torch.optim.AdamW(fused=True)`` step is
taken; the round is then complete and pullers are woken (threading.Condition).

What it measures: nothing by itself. Run it with ``pyps_load.py`` to get the
round time of a plain Python/grpcio/torch parameter server, the baseline
paramd is compared against.

Usage: ``pyps.py --port 0`` prints ``LISTENING <port>`` (flushed) once serving
and runs until SIGTERM/SIGINT, then stops cleanly and exits 0.
"""

import argparse
import json
import math
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
import numpy as np
import torch

SERVICE = "pyps.PS"
MAX_MESSAGE = 2**31 - 1  # 2 GiB - 1
WAIT_TIMEOUT_S = 300.0  # longest a Push/Pull waits for its round


class _Abort(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _split_header(body):
    """Return (header_dict, payload_offset) of a length-prefixed message."""
    if len(body) < 4:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "message shorter than 4 bytes")
    hlen = int.from_bytes(body[:4], "little")
    if 4 + hlen > len(body):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"header length {hlen} exceeds message size {len(body)}")
    try:
        header = json.loads(body[4 : 4 + hlen])
    except ValueError as e:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad JSON header: {e}")
    if not isinstance(header, dict):
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "header is not a JSON object")
    return header, 4 + hlen


def _int_field(header, name, lo=0):
    v = header.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"'{name}' must be an integer >= {lo}")
    return v


class _Model:
    """Parameters, gradient buffer and optimizer of one Init."""

    def __init__(self, header, body, offset):
        shapes = header.get("shapes")
        if not isinstance(shapes, list) or not shapes:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "'shapes' must be a non-empty list")
        sizes = []
        for s in shapes:
            if not isinstance(s, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in s):
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "each shape must be a list of non-negative integers")
            sizes.append(math.prod(s))
        self.workers = _int_field(header, "workers", lo=1)
        try:
            lr = float(header.get("lr", 1e-3))
            weight_decay = float(header.get("weight_decay", 0.01))
            mn = header.get("max_norm")
            self.max_norm = None if mn is None or float(mn) <= 0 else float(mn)
        except (TypeError, ValueError):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "lr/weight_decay/max_norm must be numbers")
        self.numel = sum(sizes)
        self.nbytes = self.numel * 4
        if len(body) - offset != self.nbytes:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"expected {self.nbytes} bytes of initial values, got {len(body) - offset}",
            )

        init = np.frombuffer(body, dtype=np.float32, count=self.numel, offset=offset)
        self.flat = torch.from_numpy(init.copy())  # all params, contiguous
        self.flat_grad = torch.zeros(self.numel, dtype=torch.float32)
        self.grad_np = self.flat_grad.numpy()  # shares memory
        self.params = []
        off = 0
        for shape, n in zip(shapes, sizes):
            p = self.flat[off : off + n].view(shape)
            p.grad = self.flat_grad[off : off + n].view(shape)
            self.params.append(p)
            off += n
        self.opt = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, fused=True)
        self.snapshot = self.flat.numpy().tobytes()  # what Pull returns
        self.round = 0  # completed rounds
        self.pending = {}  # worker -> float32 view

    def apply(self):
        """Average the pending gradients, clip, step. Caller holds the lock."""
        views = list(self.pending.values())
        g = self.grad_np
        if len(views) == 1:
            np.copyto(g, views[0])
        else:
            np.add(views[0], views[1], out=g)
            for v in views[2:]:
                np.add(g, v, out=g)
            np.divide(g, len(views), out=g)
        if self.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_norm)
        self.opt.step()
        self.snapshot = self.flat.numpy().tobytes()
        self.round += 1
        self.pending.clear()


class ParameterServer:
    def __init__(self):
        self.cond = threading.Condition()
        self.model = None
        self.generation = 0
        self.stopping = False

    def shutdown(self):
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    # Caller holds self.cond.
    def _wait(self, context, model, ready):
        deadline = time.monotonic() + WAIT_TIMEOUT_S
        while not ready():
            if self.stopping:
                raise _Abort(grpc.StatusCode.UNAVAILABLE, "server shutting down")
            if self.model is not model:
                raise _Abort(grpc.StatusCode.ABORTED, "server re-initialized while waiting")
            if not context.is_active():
                raise _Abort(grpc.StatusCode.CANCELLED, "client went away")
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"waited {WAIT_TIMEOUT_S:.0f} s for the round")
            self.cond.wait(min(1.0, left))

    def _model(self):
        if self.model is None:
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "Init has not been called")
        return self.model

    def init(self, body, context):
        header, offset = _split_header(body)
        model = _Model(header, body, offset)  # heavy work outside the lock
        with self.cond:
            self.model = model
            self.generation += 1
            self.cond.notify_all()  # wake (and abort) waiters of the old model
        return json.dumps({"ok": True, "params": model.numel}).encode()

    def push(self, body, context):
        header, offset = _split_header(body)
        worker = _int_field(header, "worker")
        rnd = _int_field(header, "round")
        with self.cond:
            m = self._model()
            if worker >= m.workers:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"worker {worker} out of range (workers={m.workers})")
            if len(body) - offset != m.nbytes:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"expected {m.nbytes} gradient bytes, got {len(body) - offset}"
                )
            self._wait(context, m, lambda: m.round >= rnd)
            if rnd < m.round:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION, f"round {rnd} already complete (current round {m.round})"
                )
            if worker in m.pending:
                raise _Abort(grpc.StatusCode.ALREADY_EXISTS, f"worker {worker} already pushed round {rnd}")
            m.pending[worker] = np.frombuffer(body, dtype=np.float32, count=m.numel, offset=offset)
            if len(m.pending) == m.workers:
                try:
                    m.apply()
                except Exception as e:
                    m.pending.clear()
                    raise _Abort(grpc.StatusCode.INTERNAL, f"update failed: {e!r}")
                self.cond.notify_all()
        return b'{"ok":true}'

    def pull(self, body, context):
        try:
            header = json.loads(body)
        except ValueError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad JSON: {e}")
        if not isinstance(header, dict):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "request is not a JSON object")
        rnd = _int_field(header, "round")
        with self.cond:
            m = self._model()
            self._wait(context, m, lambda: m.round >= rnd)
            return m.snapshot


def _handler(fn):
    def call(request, context):
        try:
            return fn(request, context)
        except _Abort as e:
            context.abort(e.code, e.message)

    return grpc.unary_unary_rpc_method_handler(call)  # raw bytes in and out


def main(argv=None):
    ap = argparse.ArgumentParser(description="Minimal Python/grpcio parameter server (pyps.PS).")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    ap.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    ap.add_argument(
        "--threads", type=int, default=32, help="gRPC handler threads; must exceed 2x workers (blocked Pull + Push)"
    )
    ap.add_argument(
        "--torch-threads", type=int, default=0, help="torch.set_num_threads(N) for the update; 0 = torch's default"
    )
    args = ap.parse_args(argv)
    if args.threads < 1 or args.torch_threads < 0:
        ap.error("--threads must be >= 1 and --torch-threads >= 0")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    ps = ParameterServer()
    generic = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Init": _handler(ps.init),
            "Push": _handler(ps.push),
            "Pull": _handler(ps.pull),
        },
    )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.threads),
        handlers=[generic],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
        ],
    )
    try:
        port = server.add_insecure_port(f"{args.host}:{args.port}")
    except RuntimeError as e:
        print(f"error: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    if port == 0:
        print(f"error: cannot bind {args.host}:{args.port}", file=sys.stderr)
        return 1

    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    server.start()
    print(f"LISTENING {port}", flush=True)
    while not stop.wait(0.5):
        pass
    ps.shutdown()
    server.stop(grace=2).wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
