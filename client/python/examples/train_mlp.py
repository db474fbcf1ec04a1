"""Trains a small MLP on synthetic data, its optimizer step running on paramd.

Start paramd, then four workers, with torchrun:

    paramd --listen 127.0.0.1:50051 &
    torchrun --nproc-per-node 4 client/python/examples/train_mlp.py --server http://127.0.0.1:50051 --job mlp

or as plain processes:

    for r in 0 1 2 3; do
        python client/python/examples/train_mlp.py --rank $r --world-size 4 --job mlp &
    done; wait

Each worker trains on its own slice of the data; paramd averages the four
gradients, clips them, applies AdamW with two param groups and a
warmup-cosine schedule, and every worker continues from the same weights.
`--wrap` keeps a plain `torch.optim.AdamW` line and wraps it with
`paramd.torch.DistributedOptimizer` instead of using `RemoteOptimizer`.

For a server that wants a token or serves TLS (an https:// --server), set
PARAMD_TOKEN_FILE (or PARAMD_TOKEN), PARAMD_CA_CERT, PARAMD_CERT and
PARAMD_KEY as for paramctl: the client reads them.
"""

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

import paramd
import paramd.torch

IN, HIDDEN = 16, 32
BATCH = 32
LR, WEIGHT_DECAY, HEAD_LR = 1e-2, 0.01, 3e-2
MAX_NORM = 0.5


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def dataset(n: int = 4096, seed: int = 1):
    """Inputs and targets of a smooth nonlinear function, with noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, IN, generator=g)
    w = torch.randn(IN, 1, generator=g) / IN**0.5
    y = torch.sin(2 * x @ w) + 0.3 * x[:, :1] ** 2 + 0.05 * torch.randn(n, 1, generator=g)
    return x, y


def batch(x, y, rank: int, world: int, step: int):
    """Worker `rank`'s batch at `step`: its own slice (rows rank, rank+world, ...)."""
    xs, ys = x[rank::world], y[rank::world]
    idx = (step * BATCH + torch.arange(BATCH)) % xs.shape[0]
    return xs[idx], ys[idx]


def loss_fn(model, xb, yb):
    return nn.functional.mse_loss(model(xb), yb)


def head_names(model):
    """The last layer: its own param group (higher lr, no weight decay)."""
    return {n for n, _ in model.named_parameters() if n.startswith("4.")}


def schedule(steps: int) -> paramd.WarmupCosine:
    return paramd.WarmupCosine(warmup_steps=max(1, steps // 10), total_steps=steps)


def torch_optimizer(model) -> torch.optim.AdamW:
    """The optimizer line a torch script would have."""
    head = head_names(model)
    backbone = [p for n, p in model.named_parameters() if n not in head]
    top = [p for n, p in model.named_parameters() if n in head]
    return torch.optim.AdamW(
        [{"params": backbone}, {"params": top, "lr": HEAD_LR, "weight_decay": 0.0}],
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        foreach=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server", default=os.environ.get("PARAMD_SERVER", "http://127.0.0.1:50051"))
    ap.add_argument("--job", default="mlp")
    ap.add_argument("--rank", type=int, default=None, help="default: $RANK (torchrun)")
    ap.add_argument("--world-size", type=int, default=None, help="default: $WORLD_SIZE (torchrun)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--wrap", action="store_true", help="wrap torch.optim.AdamW with DistributedOptimizer")
    ap.add_argument("--overlap", action="store_true", help="push each gradient while backward still runs")
    ap.add_argument("--out", help="write losses, lr, norms and the final weights here (.npz)")
    args = ap.parse_args()
    # Several workers share the machine's cores.
    torch.set_num_threads(1)

    model = make_model()
    x, y = dataset()
    common = dict(
        server=args.server,
        job=args.job,
        rank=args.rank,
        world_size=args.world_size,
        schedule=schedule(args.steps),
        clip=paramd.ClipGradNorm(max_norm=MAX_NORM),
        timeout=120,
        overlap=args.overlap,
    )
    if args.wrap:
        opt = paramd.torch.DistributedOptimizer(
            torch_optimizer(model), named_parameters=model.named_parameters(), **common
        )
    else:
        head = head_names(model)
        names = [n for n, _ in model.named_parameters()]
        opt = paramd.torch.RemoteOptimizer(
            model.named_parameters(),
            optimizer=paramd.AdamW(lr=LR, weight_decay=WEIGHT_DECAY),
            param_groups=[
                {"params": [n for n in names if n not in head]},
                {"params": [n for n in names if n in head], "lr": HEAD_LR, "weight_decay": 0.0},
            ],
            **common,
        )

    losses, lrs, norms, coefs = [], [], [], []
    started = time.monotonic()
    for step in range(args.steps):
        xb, yb = batch(x, y, opt.rank, opt.world_size, step)
        loss = loss_fn(model, xb, yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        lrs.append(opt.lrs)
        norms.append(opt.last_grad_norm)
        coefs.append(opt.clip_coefficient)
        if opt.rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(
                "step %4d  loss %.5f  lr %.3e  grad norm %.4f" % (step, loss.item(), opt.lr, opt.last_grad_norm),
                flush=True,
            )
    if opt.rank == 0:
        print("%d steps in %.1f s" % (args.steps, time.monotonic() - started), flush=True)
    if args.out:
        weights = {"param/" + n: p.detach().numpy() for n, p in model.named_parameters()}
        np.savez(
            args.out,
            loss=np.asarray(losses),
            lr=np.asarray(lrs),
            grad_norm=np.asarray(norms, dtype=np.float32),
            clip_coefficient=np.asarray(coefs, dtype=np.float32),
            **weights,
        )


if __name__ == "__main__":
    main()
