"""Computes the golden traces this repository adds, with torch.

    python tests/golden/generate.py            # writes tests/golden/<name>.safetensors
    python tests/golden/generate.py --check    # recomputes them and compares bit for bit

Run with the test venv (`client/python/ci/venv.sh`: the torch it pins).
Each trace is a run of `torch.optim` (`foreach=False`), `LambdaLR` and
`clip_grad_norm_` on the mean of the workers' gradients, in the format of
the README's "Golden traces" section: `init/{p}`, `grad/{t}/{w}/{p}`,
`expect/{t}/{p}`, `expect/final/{p}`, `lr/{t}` (f64), `grad_norm/{t}`, and
the config as JSON in the metadata. A `grad/{t}/{w}/{p}` that is absent
means worker w has no gradient for p at step t (`grad is None`); the mean
is then taken as DistributedDataParallel takes it: the rank-order sum with
zeros for the absent ones, over every worker, and a parameter no worker
has a gradient for keeps `grad = None` (torch.optim skips it).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

HERE = Path(__file__).resolve().parent


def factor(schedule):
    kind = schedule["kind"]
    if kind == "constant":
        return lambda t: 1.0
    if kind == "warmup_cosine":
        w, total, floor = schedule["warmup_steps"], schedule["total_steps"], schedule.get("min_lr_ratio", 0.0)

        def f(t):
            if t < w:
                return t / w
            p = min(1.0, (t - w) / max(1, total - w))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))

        return f
    raise ValueError(kind)


def optimizer(params, cfg):
    opt = dict(cfg["optimizer"])
    kind = opt.pop("kind")
    if "betas" in opt:
        opt["betas"] = tuple(opt["betas"])
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    return cls(params, foreach=False, **opt)


def run(name, cfg, shapes, grad, seed):
    """`grad(t, w, p, shape, gen)` gives worker w's gradient of p at step t,
    or None."""
    gen = torch.Generator().manual_seed(seed)
    names = cfg["params"]
    init = {p: torch.randn(shapes[p], generator=gen) for p in names}
    params = [torch.nn.Parameter(init[p].clone()) for p in names]
    opt = optimizer(params, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor(cfg.get("schedule") or {"kind": "constant"}))
    clip = cfg.get("clip")
    W, steps = cfg["workers"], cfg["steps"]
    out = {"init/" + p: init[p].numpy() for p in names}
    for t in range(steps):
        given = {}
        for w in range(W):
            for p in names:
                g = grad(t, w, p, shapes[p], gen)
                given[(w, p)] = g
                if g is not None:
                    out["grad/%d/%d/%s" % (t, w, p)] = g.numpy()
        for p, param in zip(names, params):
            gs = [given[(w, p)] for w in range(W)]
            if all(g is None for g in gs):
                param.grad = None
                continue
            total = None
            for g in gs:
                g = torch.zeros(shapes[p]) if g is None else g
                total = g.clone() if total is None else total + g
            param.grad = total / W if W > 1 else total
        out["lr/%d" % t] = np.array([g["lr"] for g in opt.param_groups], dtype=np.float64)
        max_norm = clip["max_norm"] if clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=False)
        out["grad_norm/%d" % t] = np.array(float(norm), dtype=np.float32)
        opt.step()
        sched.step()
        for p, param in zip(names, params):
            out["expect/%d/%s" % (t, p)] = param.detach().numpy().copy()
    for p, param in zip(names, params):
        out["expect/final/" + p] = param.detach().numpy().copy()
    meta = {"format": "paramd-trace/1", "config": json.dumps(cfg)}
    return {k: np.require(v, requirements="C") for k, v in out.items()}, meta


def dense(scale=1.0):
    return lambda t, w, p, shape, gen: scale * torch.randn(shape, generator=gen)


def unused(t, w, p, shape, gen):
    """`frozen` never has a gradient; `branch` only from worker 1 on even
    steps; `head` from everyone but worker 2 on step 1."""
    g = torch.randn(shape, generator=gen)
    if p == "frozen":
        return None
    if p == "branch" and not (w == 1 and t % 2 == 0):
        return None
    if p == "head.weight" and w == 2 and t == 1:
        return None
    return g


TRACES = {
    # lr 10: the fused multiply-adds of torch's kernels decide the last bits.
    "sgd_high_lr_nesterov": (
        {
            "params": ["w", "b"],
            "workers": 2,
            "steps": 6,
            "optimizer": {"kind": "sgd", "lr": 10.0, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
            "schedule": {"kind": "constant"},
            "clip": None,
        },
        {"w": (8, 5), "b": (5,)},
        dense(0.1),
        1,
    ),
    # lr 1 with weight decay: Adam's fused moments and its square root
    # decide the last bits, and a unit in the last place moves the weights
    # a hundred times further than at lr 0.01.
    "adamw_high_lr": (
        {
            "params": ["w", "b"],
            "workers": 2,
            "steps": 6,
            "optimizer": {"kind": "adamw", "lr": 1.0, "weight_decay": 0.05, "betas": [0.8, 0.95]},
            "schedule": {"kind": "constant"},
            "clip": None,
        },
        {"w": (8, 5), "b": (5,)},
        dense(0.1),
        6,
    ),
    "sgd_maximize_dampening": (
        {
            "params": ["w", "b"],
            "workers": 3,
            "steps": 6,
            "optimizer": {
                "kind": "sgd",
                "lr": 0.05,
                "momentum": 0.8,
                "dampening": 0.3,
                "weight_decay": 0.02,
                "maximize": True,
            },
            "schedule": {"kind": "warmup_cosine", "warmup_steps": 2, "total_steps": 6, "min_lr_ratio": 0.1},
            "clip": {"max_norm": 1.0},
        },
        {"w": (6, 4), "b": (4,)},
        dense(),
        2,
    ),
    "adam_maximize_decoupled": (
        {
            "params": ["w", "b"],
            "workers": 2,
            "steps": 6,
            "optimizer": {
                "kind": "adam",
                "lr": 0.01,
                "weight_decay": 0.1,
                "decoupled_weight_decay": True,
                "maximize": True,
            },
            "schedule": {"kind": "constant"},
            "clip": {"max_norm": 0.5},
        },
        {"w": (7, 3), "b": (3,)},
        dense(),
        3,
    ),
    "adamw_unused_params": (
        {
            "params": ["trunk", "frozen", "branch", "head.weight"],
            "workers": 3,
            "steps": 6,
            "optimizer": {"kind": "adamw", "lr": 0.02, "weight_decay": 0.1},
            "schedule": {"kind": "warmup_cosine", "warmup_steps": 1, "total_steps": 6, "min_lr_ratio": 0.0},
            "clip": {"max_norm": 2.0},
        },
        {"trunk": (5, 4), "frozen": (4, 4), "branch": (4, 2), "head.weight": (2, 4)},
        unused,
        4,
    ),
    "sgd_empty_tensors": (
        {
            "params": ["w", "empty", "none", "b"],
            "workers": 2,
            "steps": 4,
            "optimizer": {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
            "schedule": {"kind": "constant"},
            "clip": {"max_norm": 1.0},
        },
        {"w": (4, 3), "empty": (3, 0), "none": (0,), "b": (3,)},
        dense(),
        5,
    ),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the files instead of writing them")
    args = ap.parse_args()
    torch.set_num_threads(1)
    bad = 0
    for name, (cfg, shapes, grad, seed) in TRACES.items():
        tensors, meta = run(name, cfg, shapes, grad, seed)
        path = HERE / (name + ".safetensors")
        if args.check:
            have = load_file(str(path))
            same = have.keys() == tensors.keys() and all(
                have[k].tobytes() == tensors[k].tobytes() and have[k].shape == tensors[k].shape for k in tensors
            )
            print("%s: %s" % (path.name, "same" if same else "DIFFERS"))
            bad += not same
        else:
            save_file(tensors, str(path), metadata=meta)
            print("wrote %s (%d tensors)" % (path.name, len(tensors)))
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
