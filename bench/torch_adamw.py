#!/usr/bin/env python3
"""Baseline: wall time of one torch.optim.AdamW step on CPU.

Measures how fast PyTorch itself applies AdamW to N float32 elements split
into K tensors, either with ``fused=True`` ("fused") or with no
implementation flag at all ("default", i.e. what a user gets on CPU).
Gradients are drawn once (fixed seed) and reused; each timed step is
``opt.step()`` only (plus ``clip_grad_norm_(..., foreach=True)`` when
``--clip`` is given, timed together with the step).

Prints one JSON line. ``bytes_per_step`` counts 7 float32 streams per element
(param r/w, grad r, exp_avg r/w, exp_avg_sq r/w); ``gbps`` is that divided by
the median step time.

``--threads`` sets torch's intra-op thread count (default: torch's own
choice, one per core). On a 2-core machine where another process keeps one
core busy, OpenMP's per-tensor parallel regions can stall for a scheduler
slice each, so many-tensor runs with 2 threads may be far slower and noisier
than with ``--threads 1``; ``step_seconds_min`` shows the unstalled cost.
"""

import argparse
import json
import statistics
import sys
import time

import torch


def split_sizes(n, k):
    """Split n into k nearly equal positive parts."""
    base, extra = divmod(n, k)
    return [base + (1 if i < extra else 0) for i in range(k)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=int, default=16777216, help="total float32 elements (default 16777216)")
    ap.add_argument("--tensors", type=int, default=1, help="number of tensors to split --params into (default 1)")
    ap.add_argument("--mode", choices=("fused", "default"), default="fused")
    ap.add_argument("--repeat", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument(
        "--clip",
        action="store_true",
        help="also run clip_grad_norm_(params, 1.0, foreach=True) before each step (timed together)",
    )
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N) first; 0 = torch's default")
    args = ap.parse_args(argv)

    if args.params < 1:
        ap.error("--params must be >= 1")
    if not 1 <= args.tensors <= args.params:
        ap.error("--tensors must be in [1, --params]")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.threads < 0:
        ap.error("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    params = []
    for size in split_sizes(args.params, args.tensors):
        p = torch.randn(size, dtype=torch.float32).mul_(0.02).requires_grad_(True)
        p.grad = torch.randn(size, dtype=torch.float32)
        params.append(p)

    kwargs = dict(lr=1e-3, weight_decay=0.01)
    if args.mode == "fused":
        kwargs["fused"] = True
    opt = torch.optim.AdamW(params, **kwargs)

    def step():
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()

    for _ in range(args.warmup):
        step()

    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)

    # Sanity: the optimizer must not have produced non-finite values.
    if not all(torch.isfinite(p).all().item() for p in params):
        print("error: non-finite parameter after AdamW steps", file=sys.stderr)
        return 1

    median = statistics.median(times)
    bytes_per_step = args.params * 4 * 7
    print(
        json.dumps(
            {
                "mode": args.mode,
                "params": args.params,
                "tensors": args.tensors,
                "clip": args.clip,
                "threads": torch.get_num_threads(),
                "step_seconds_median": median,
                "step_seconds_min": min(times),
                "bytes_per_step": bytes_per_step,
                "gbps": bytes_per_step / median / 1e9,
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
