#!/usr/bin/env python3
"""The user's step: one data-parallel training step on torch DDP versus on paramd.

What is measured. The same small fleet trains the same model twice:

  A "ddp"     W ranks, torch.distributed over gloo on loopback,
              DistributedDataParallel (which averages the gradients),
              torch.nn.utils.clip_grad_norm_(params, 1.0),
              torch.optim.AdamW(lr=1e-3, weight_decay=0.01, fused=True)
              (foreach when fused does not run on this CPU build), and
              LambdaLR with the warmup-cosine factor;
  B "paramd"  the same W ranks, no torch.distributed: the script's own
              torch.optim.AdamW(lr=1e-3, weight_decay=0.01) wrapped in
              paramd.torch.DistributedOptimizer, with
              schedule=paramd.WarmupCosine(5, steps) and
              clip=paramd.ClipGradNorm(1.0), against a paramd started here
              (the server averages, clips, schedules and steps; the workers
              do not clip).

Each rank is its own process (torch.multiprocessing, spawn) running a plain
MLP: `--tensors / 2` Linear layers of one width (weight and bias each, tanh
between them), the width chosen so that the parameter count is close to
`--params`. Every rank builds it from the same seed, so all ranks and both
sides start from the same weights; each rank draws its own synthetic batches
(inputs and regression targets, seeded by rank) and the loss is their mean
squared error. The schedule is linear warmup from 0 over 5 steps, then
cosine to 0 at `--steps` (the factor of the README's "Numerics and torch"
and shared/golden/README.md: the first step runs with lr 0, as LambdaLR does).

A step is the whole of what a training loop does per batch: forward,
backward, (A: clip,) optimizer step, (A: scheduler step,) zero_grad; on
paramd the optimizer step is the push of this rank's gradients, the wait for
the round and the copy of the new parameters into the model. Each rank
stamps a monotonic clock after every step; a step's time is the largest over
the ranks, and a side's figure is the median of its steps, the first `--skip`
of every run left out (connections, allocator and caches warming up).

The two sides run alternately, A B A B ... `--repeat` times, each run in
fresh processes, so that a noisy machine (memory bandwidth here swings 2-3x
within minutes) moves both sides alike. The daemon is started once, on ports
the OS picks, and idles during the DDP runs.

Correctness. After the last run, rank 0's final weights of A and B are
compared with the golden traces' rule (README.md, "Numerics and torch";
shared/golden/README.md and its compare.py): |B - A| <= atol + rtol * |A|
for every value, atol = 1e-6, rtol = 1e-4, torch's run A the reference.
The two sides compute the same thing with different last bits: the AdamW
kernel (fused against torch's single-tensor one, which paramd reproduces;
torch's own kernels differ from each other by about 1e-5 relative), the
norm (f32 against paramd's f64) and, beyond two ranks, how the mean is
formed (DDP's all-reduce against paramd's rank-order sum).

The activation is tanh rather than ReLU for this check: with ReLU such a
last-bit difference now and then moves a unit across its kink, its gradient
changes outright, Adam turns that into a difference of the order of lr, and
the two runs part ways (with ReLU, 16M parameters over 12 steps, or 1M over
20, ended with millions of values up to 4 lr apart, although the server's
grad norm matched the gradients the workers pushed to 1e-8). With a smooth
activation the runs stay within the rule, so a failure means something.

Run (with the package and torch installed: client/python/ci/venv.sh prints
such a python):

    PY=$(client/python/ci/venv.sh)
    cargo build --release -p paramd
    $PY bench/step.py                                  # 2 ranks, 16M parameters
    $PY bench/step.py --params 1000000 --steps 8 --repeat 1 --paramd target/debug/paramd
    $PY bench/step.py --json                           # only the JSON line

Prints a summary and one JSON line (only the JSON line with `--json`):
`ddp_step_seconds` and `paramd_step_seconds` (medians over every timed step
of every run of that side), `paramd_vs_ddp` (the step-time ratio paramd/DDP,
above 1 when a step on paramd takes longer: the median over the repeats of
each repeat's ratio, the two runs of a repeat being back to back, so that a
burst of load on the machine spoils one pair rather than one side), the
per-run medians and ratios, and the comparison of the final weights: `same_weights` (every value within the rule),
`outside_tolerance` (how many values break it), `max_abs_diff` (the largest
|B - A|) and `max_rel_diff` (the largest |B - A| / (atol + |A|), compare.py's
"worst relative deviation"); `ddp_deterministic` and `paramd_deterministic`
say whether every run of a side ended with bit-identical weights.
Progress goes to stderr.
"""

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import paramd
import paramd.torch
from _paramd_local import LocalParamd, default_binary, die_with_parent, exit_on_sigterm, log

LR = 1e-3
WEIGHT_DECAY = 0.01
MAX_NORM = 1.0
WARMUP_STEPS = 5
# The golden traces' tolerance (README.md, "Numerics and torch").
ATOL = 1e-6
RTOL = 1e-4
TIMEOUT = timedelta(seconds=300)
SIDES = ("ddp", "paramd")


# -- the model, the data, the schedule ------------------------------------------


def mlp_width(params: int, layers: int) -> int:
    """The width w whose `layers` square Linear layers (w*w + w parameters
    each) come closest to `params` parameters."""
    w = (-1 + math.sqrt(1 + 4 * params / layers)) / 2
    return min((max(1, math.floor(w)), math.ceil(w)), key=lambda v: abs(layers * (v * v + v) - params))


def build_model(width: int, layers: int, seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    mods: List[torch.nn.Module] = []
    for i in range(layers):
        if i:
            mods.append(torch.nn.Tanh())
        mods.append(torch.nn.Linear(width, width))
    return torch.nn.Sequential(*mods)


def batches(cfg: Dict, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s inputs and targets for every step, drawn up front."""
    g = torch.Generator().manual_seed(cfg["seed"] * 1000 + 1 + rank)
    shape = (cfg["steps"], cfg["batch"], cfg["width"])
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def warmup_cosine(steps: int):
    """The LambdaLR factor of paramd.WarmupCosine(WARMUP_STEPS, steps), min
    ratio 0, written out from shared/golden/README.md."""

    def factor(t: int) -> float:
        if t < WARMUP_STEPS:
            return t / WARMUP_STEPS
        p = min(1.0, (t - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS))
        return 0.5 * (1 + math.cos(math.pi * p))

    return factor


def fused_adamw_works() -> bool:
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    try:
        torch.optim.AdamW([p], lr=LR, weight_decay=WEIGHT_DECAY, fused=True).step()
        return True
    except (RuntimeError, ValueError, TypeError):
        return False


# -- one rank ---------------------------------------------------------------------


def rank_main(rank: int, cfg: Dict, side: str, out: str, endpoint) -> None:
    """One rank of one run: `endpoint` is the TCPStore's port for DDP, the
    server's URL for paramd. Writes its step clock stamps to
    `out/<rank>.json`, and rank 0 its final weights to `out/weights.pt`."""
    die_with_parent(cfg["parent_pid"])
    torch.set_num_threads(cfg["threads"])
    W, steps = cfg["workers"], cfg["steps"]
    model = build_model(cfg["width"], cfg["layers"], cfg["seed"])
    params = list(model.parameters())
    xs, ys = batches(cfg, rank)
    loss_fn = torch.nn.MSELoss()

    if side == "ddp":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        store = dist.TCPStore("127.0.0.1", endpoint, is_master=False, timeout=TIMEOUT)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=W, timeout=TIMEOUT)
        net = torch.nn.parallel.DistributedDataParallel(model)
        impl = {"fused": True} if cfg["fused"] else {"foreach": True}
        opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, **impl)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(steps))

        def step(x, y):
            loss_fn(net(x), y).backward()  # DDP averages the gradients
            torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
            opt.step()
            sched.step()
            opt.zero_grad()

    else:
        opt = paramd.torch.DistributedOptimizer(
            torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY),
            named_parameters=model.named_parameters(),
            server=endpoint,
            job=cfg["job"],
            rank=rank,
            world_size=W,
            schedule=paramd.WarmupCosine(WARMUP_STEPS, steps),
            clip=paramd.ClipGradNorm(MAX_NORM),
            overlap=cfg["overlap"],
            wire=cfg["wire"],
            pull_wire=cfg["pull_wire"],
        )

        def step(x, y):
            loss_fn(model(x), y).backward()
            opt.step()  # push, wait for the round, copy the new parameters in
            opt.zero_grad()

    stamps = [time.perf_counter()]
    for t in range(steps):
        step(xs[t], ys[t])
        stamps.append(time.perf_counter())

    if rank == 0:
        torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, os.path.join(out, "weights.pt"))
    with open(os.path.join(out, "%d.json" % rank), "w") as f:
        json.dump(stamps, f)
    if side == "ddp":
        dist.destroy_process_group()


# -- one run of one side ------------------------------------------------------------


def run_side(cfg: Dict, side: str, out: Path, endpoint) -> Tuple[List[float], Dict[str, torch.Tensor]]:
    """Runs the W ranks of one side; returns each step's time (the largest
    over the ranks) and rank 0's final weights."""
    out.mkdir()
    ctx = mp.start_processes(
        rank_main, args=(cfg, side, str(out), endpoint), nprocs=cfg["workers"], join=False, start_method="spawn"
    )
    try:
        while not ctx.join():
            pass
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    stamps = [json.loads((out / ("%d.json" % r)).read_text()) for r in range(cfg["workers"])]
    per_step = [max(s[t + 1] - s[t] for s in stamps) for t in range(cfg["steps"])]
    return per_step, torch.load(out / "weights.pt")


def digest(weights: Dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for n in sorted(weights):
        h.update(n.encode())
        h.update(weights[n].numpy().tobytes())
    return h.hexdigest()


def compare(ref: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor]) -> Dict:
    """The golden rule, |got - ref| <= atol + rtol * |ref| for every value,
    with the largest absolute and relative (|got - ref| / (atol + |ref|))
    differences, as shared/golden/compare.py computes them."""
    if sorted(ref) != sorted(got):
        raise RuntimeError("the two sides' weights have different names")
    max_abs = max_rel = 0.0
    outside = 0
    for n in ref:
        a = ref[n].double().numpy()
        b = got[n].double().numpy()
        d = np.abs(b - a)
        max_abs = max(max_abs, float(d.max()))
        max_rel = max(max_rel, float((d / (ATOL + np.abs(a))).max()))
        outside += int(np.count_nonzero(~(d <= ATOL + RTOL * np.abs(a))))
    return {
        "same_weights": outside == 0,
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "outside_tolerance": outside,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="A training step on torch DDP versus on paramd, alternating.")
    ap.add_argument("--workers", type=int, default=2, help="ranks, one process each (default 2)")
    ap.add_argument("--params", type=int, default=16 * 2**20, help="model parameters, about (default 16M)")
    ap.add_argument("--tensors", type=int, default=20, help="parameter tensors, even: a weight and a bias per layer")
    ap.add_argument("--steps", type=int, default=20, help="steps per run, schedule included (default 20)")
    ap.add_argument("--skip", type=int, default=3, help="untimed first steps of every run (default 3)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side, alternating (default 3)")
    ap.add_argument("--batch", type=int, default=32, help="samples per rank per step (default 32)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores / workers)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--paramd", type=Path, default=default_binary(), help="paramd binary (default target/release/paramd)"
    )
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    ap.add_argument(
        "--overlap", action="store_true", help="paramd side: push each gradient while backward runs (overlap=True)"
    )
    ap.add_argument(
        "--wire",
        choices=["f32", "bf16", "f16"],
        default="f32",
        help="paramd side: the dtype gradients are pushed in (bf16/f16 change the result: the weights then differ from DDP's)",
    )
    ap.add_argument(
        "--pull-wire",
        choices=["f32", "bf16", "f16"],
        default="f32",
        help="paramd side: the dtype parameters are pulled in",
    )
    args = ap.parse_args(argv)
    if args.workers < 1 or args.repeat < 1 or args.batch < 1 or args.params < 1:
        ap.error("--workers, --repeat, --batch and --params must be >= 1")
    if args.tensors < 2 or args.tensors % 2:
        ap.error("--tensors must be even and >= 2 (each layer is a weight and a bias)")
    if args.steps < WARMUP_STEPS or not 0 <= args.skip < args.steps:
        ap.error("--steps must be >= %d and > --skip >= 0" % WARMUP_STEPS)
    exit_on_sigterm()

    layers = args.tensors // 2
    width = mlp_width(args.params, layers)
    cfg = {
        "workers": args.workers,
        "layers": layers,
        "width": width,
        "steps": args.steps,
        "batch": args.batch,
        "seed": args.seed,
        "threads": args.threads or max(1, (os.cpu_count() or 1) // args.workers),
        "fused": fused_adamw_works(),
        "overlap": args.overlap,
        "wire": args.wire,
        "pull_wire": args.pull_wire,
        "parent_pid": os.getpid(),
    }
    n_params = layers * (width * width + width)
    log(
        "step.py: %d ranks, MLP of %d layers of width %d (%d parameters in %d tensors), batch %d, %d steps "
        "(%d timed) x %d runs per side, %d torch threads per rank, DDP AdamW %s"
        % (
            args.workers,
            layers,
            width,
            n_params,
            args.tensors,
            args.batch,
            args.steps,
            args.steps - args.skip,
            args.repeat,
            cfg["threads"],
            "fused" if cfg["fused"] else "foreach",
        )
    )

    times: Dict[str, List[List[float]]] = {s: [] for s in SIDES}
    digests: Dict[str, set] = {s: set() for s in SIDES}
    final: Dict[str, Dict[str, torch.Tensor]] = {}
    with (
        LocalParamd(args.paramd) as server,
        paramd.Client(server.url) as client,
        tempfile.TemporaryDirectory(prefix="paramd-step-") as tmp,
    ):
        for r in range(args.repeat):
            for side in SIDES:
                out = Path(tmp) / ("%s-%d" % (side, r))
                if side == "ddp":
                    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=TIMEOUT)
                    per_step, weights = run_side(cfg, side, out, store.port)
                    del store
                else:
                    server.check_alive()
                    cfg["job"] = "bench-step-%s-%d" % (uuid.uuid4().hex[:8], r)
                    per_step, weights = run_side(cfg, side, out, server.url)
                    client.delete_job(cfg["job"])
                timed = per_step[args.skip :]
                times[side].append(timed)
                digests[side].add(digest(weights))
                final[side] = weights
                log("  run %d %-6s median step %.1f ms" % (r + 1, side, statistics.median(timed) * 1e3))

    ddp = statistics.median(t for run in times["ddp"] for t in run)
    ps = statistics.median(t for run in times["paramd"] for t in run)
    per_run = {side: [statistics.median(run) for run in times[side]] for side in SIDES}
    ratios = [b / a for a, b in zip(per_run["ddp"], per_run["paramd"])]
    result = {
        "workers": args.workers,
        "params": n_params,
        "tensors": args.tensors,
        "width": width,
        "batch": args.batch,
        "steps": args.steps,
        "timed_steps": args.steps - args.skip,
        "repeat": args.repeat,
        "threads": cfg["threads"],
        "ddp_adamw": "fused" if cfg["fused"] else "foreach",
        "ddp_step_seconds": ddp,
        "paramd_step_seconds": ps,
        "paramd_vs_ddp": statistics.median(ratios),
        "ddp_step_seconds_per_run": per_run["ddp"],
        "paramd_step_seconds_per_run": per_run["paramd"],
        "paramd_vs_ddp_per_run": ratios,
        **compare(final["ddp"], final["paramd"]),
        "atol": ATOL,
        "rtol": RTOL,
        "ddp_deterministic": len(digests["ddp"]) == 1,
        "paramd_deterministic": len(digests["paramd"]) == 1,
        "paramd_binary": str(args.paramd),
        "paramd_overlap": args.overlap,
    }
    if not args.json:
        print(
            "step time: DDP %.1f ms, paramd %.1f ms, paramd/DDP %.2f (median of the repeats' ratios); "
            "final weights %s (max abs diff %.3g, max rel diff %.3g, %d values outside atol %g + rtol %g)"
            % (
                ddp * 1e3,
                ps * 1e3,
                result["paramd_vs_ddp"],
                "match" if result["same_weights"] else "DIFFER",
                result["max_abs_diff"],
                result["max_rel_diff"],
                result["outside_tolerance"],
                ATOL,
                RTOL,
            )
        )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
