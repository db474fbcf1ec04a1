#!/usr/bin/env python3
"""The Python client's data path: push and pull of 64 MiB through
`paramd.Client`, beside raw loopback TCP of the same byte count.

What is measured. A paramd started here (127.0.0.1, ports from the OS)
holds one job per layout: `--params` float32 values (default 16M, 64 MiB)
in one tensor, and in each other `--tensors` count asked for (e.g. 20),
one worker, SGD with lr 0, so that completing a round costs one cheap pass
and the parameters stay as they were. Each repeat, alternating:

  push  `client.push(job, 0, round, grads)`: numpy arrays in, every byte
        sent and acknowledged by the server (the round completes with it);
  pull  `client.pull(job, round + 1)` started only once the server reports
        that round complete (`client.job_status(job).round`), so it times
        the data path, not the wait: request, every byte back, new arrays
        out (whose first touch costs page faults);
  into  `client.pull_into(job, round + 1, arrays)` into arrays allocated
        once: what `paramd.torch` does with a model's parameters, and what
        the raw TCP receiver does with its buffer;
  tcp   one transfer of the same byte count over one loopback TCP
        connection, Python's sendall and recv_into (bench/raw_tcp.py, in
        this process): the ceiling for anything moving these bytes here.

One untimed push and pull of every layout come first (connections, the
layout, the server's buffers). GB/s is bytes / seconds / 1e9. The rates
are medians over `--repeat` repeats; the ratios push / tcp and pull / tcp
are the medians over the repeats of each repeat's ratio (its transfers
measured back to back), 1.0 meaning that the client moves data as fast as
bare sockets. Only the ratios mean much on a machine whose memory bandwidth
swings within minutes.

Run (with the package installed: client/python/ci/venv.sh prints such a
python):

    PY=$(client/python/ci/venv.sh)
    cargo build --release -p paramd
    $PY bench/client_io.py                          # 1 tensor of 16M f32
    $PY bench/client_io.py --tensors 1,20 --repeat 10
    $PY bench/client_io.py --paramd target/debug/paramd --params 1000000

Prints a summary, then one JSON line per layout (only those with `--json`):
{"tensors", "bytes", "repeat", "push_gbps", "pull_gbps", "into_gbps",
"tcp_gbps", "push_vs_tcp", "pull_vs_tcp", "into_vs_tcp", "push_seconds",
"pull_seconds", "into_seconds"}. Progress
goes to stderr.
"""

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List

import numpy as np

import paramd
import raw_tcp
from _paramd_local import LocalParamd, default_binary, exit_on_sigterm, log


def tcp_gbps(nbytes: int) -> float:
    """One timed raw TCP loopback transfer of `nbytes` (after raw_tcp's own
    untimed warmup transfer), in GB/s."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = raw_tcp.main(["--bytes", str(nbytes), "--repeat", "1"])
    if rc != 0:
        raise RuntimeError("raw TCP transfer failed (see stderr)")
    return json.loads(out.getvalue())["gbps_median"]


def wait_for_round(client: paramd.Client, job: str, round: int, timeout: float = 300.0) -> None:
    """Returns once `round` rounds of `job` are complete on the server."""
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while client.job_status(job).round < round:
        if time.monotonic() > deadline:
            raise TimeoutError("round %d of job %r did not complete within %.0f s" % (round, job, timeout))
        time.sleep(pause)
        pause = min(pause * 2, 0.05)


class Layout:
    """One job: `n` float32 values in `k` tensors, and the gradients pushed."""

    def __init__(self, client: paramd.Client, n: int, k: int):
        self.client = client
        self.k = k
        self.job = "bench-io-%d-%s" % (k, uuid.uuid4().hex[:8])
        base, extra = divmod(n, k)
        sizes = [base + (1 if i < extra else 0) for i in range(k)]
        self.names = ["t%03d" % i for i in range(k)]
        rng = np.random.default_rng(k)
        self.grads = {m: rng.standard_normal(s, dtype=np.float32) for m, s in zip(self.names, sizes)}
        self.round = client.init(
            self.job, {m: np.zeros(s, np.float32) for m, s in zip(self.names, sizes)}, paramd.SGD(lr=0.0), workers=1
        ).round
        self.into = {m: np.empty(s, np.float32) for m, s in zip(self.names, sizes)}
        self.push_s: List[float] = []
        self.pull_s: List[float] = []
        self.into_s: List[float] = []

    def once(self, timed: bool) -> None:
        """Pushes one round, waits for it, pulls it; times the push and the pull."""
        t0 = time.perf_counter()
        self.client.push(self.job, 0, self.round, self.grads)
        t1 = time.perf_counter()
        self.round += 1
        wait_for_round(self.client, self.job, self.round)
        t2 = time.perf_counter()
        pulled = self.client.pull(self.job, self.round)
        t3 = time.perf_counter()
        self.client.pull_into(self.job, self.round, self.into)
        t4 = time.perf_counter()
        if timed:
            self.push_s.append(t1 - t0)
            self.pull_s.append(t3 - t2)
            self.into_s.append(t4 - t3)
        else:
            # SGD with lr 0 keeps the zeros: a sanity check of what came back.
            for m, g in self.grads.items():
                for a in (pulled.params[m], self.into[m]):
                    if a.shape != g.shape or np.any(a):
                        raise RuntimeError("pulled %s: not the %s zeros pushed to a lr-0 job" % (m, g.shape))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="paramd.Client push and pull of 64 MiB beside raw TCP loopback.")
    ap.add_argument("--params", type=int, default=16 * 2**20, help="float32 values per push (default 16M = 64 MiB)")
    ap.add_argument("--tensors", default="1", help="comma-separated tensor counts, one job each (default 1; e.g. 1,20)")
    ap.add_argument("--repeat", type=int, default=10, help="timed repeats (default 10)")
    ap.add_argument(
        "--paramd", type=Path, default=default_binary(), help="paramd binary (default target/release/paramd)"
    )
    ap.add_argument("--json", action="store_true", help="print only the JSON lines")
    args = ap.parse_args(argv)
    try:
        counts = [int(x) for x in args.tensors.split(",")]
    except ValueError:
        ap.error("--tensors must be comma-separated integers, got %r" % args.tensors)
    if args.params < 1 or args.repeat < 1 or not all(1 <= k <= args.params for k in counts):
        ap.error("--params and --repeat must be >= 1, and every tensor count in [1, --params]")
    exit_on_sigterm()

    nbytes = 4 * args.params
    log("client_io.py: %d bytes per transfer, tensors %s, %d repeats" % (nbytes, counts, args.repeat))
    tcp: List[float] = []
    with LocalParamd(args.paramd) as server, paramd.Client(server.url) as client:
        layouts = [Layout(client, args.params, k) for k in counts]
        for lay in layouts:
            lay.once(timed=False)
        for r in range(args.repeat):
            for lay in layouts:
                lay.once(timed=True)
            tcp.append(tcp_gbps(nbytes))
            done = [
                "%d tensors push %.2f pull %.2f" % (lay.k, nbytes / lay.push_s[-1] / 1e9, nbytes / lay.pull_s[-1] / 1e9)
                for lay in layouts
            ]
            log("  repeat %d: %s, tcp %.2f GB/s" % (r + 1, ", ".join(done), tcp[-1]))
        for lay in layouts:
            client.delete_job(lay.job)

    tcp_med = statistics.median(tcp)
    results: List[Dict] = []
    for lay in layouts:
        push = [nbytes / t / 1e9 for t in lay.push_s]
        pull = [nbytes / t / 1e9 for t in lay.pull_s]
        into = [nbytes / t / 1e9 for t in lay.into_s]
        results.append(
            {
                "tensors": lay.k,
                "bytes": nbytes,
                "repeat": args.repeat,
                "push_gbps": statistics.median(push),
                "pull_gbps": statistics.median(pull),
                "into_gbps": statistics.median(into),
                "tcp_gbps": tcp_med,
                "push_vs_tcp": statistics.median(p / t for p, t in zip(push, tcp)),
                "pull_vs_tcp": statistics.median(p / t for p, t in zip(pull, tcp)),
                "into_vs_tcp": statistics.median(p / t for p, t in zip(into, tcp)),
                "push_seconds": statistics.median(lay.push_s),
                "pull_seconds": statistics.median(lay.pull_s),
                "into_seconds": statistics.median(lay.into_s),
            }
        )
    if not args.json:
        for d in results:
            print(
                "%g MiB in %d tensor%s: push %.2f GB/s (%.2f of raw TCP), pull %.2f GB/s (%.2f of raw TCP), "
                "pull_into %.2f GB/s (%.2f of raw TCP), raw TCP %.2f GB/s"
                % (
                    nbytes / 2**20,
                    d["tensors"],
                    "" if d["tensors"] == 1 else "s",
                    d["push_gbps"],
                    d["push_vs_tcp"],
                    d["pull_gbps"],
                    d["pull_vs_tcp"],
                    d["into_gbps"],
                    d["into_vs_tcp"],
                    tcp_med,
                )
            )
    for d in results:
        print(json.dumps(d), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
