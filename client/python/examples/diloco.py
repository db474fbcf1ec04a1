"""Low-communication training (DiLoCo) with paramd as the outer optimizer.

Three workers each train their own copy of a small model with a local
AdamW for H steps, then push their pseudo-gradient (the global weights
they started from minus their own) in bf16; paramd averages them and steps
the global weights with Nesterov SGD, and every worker continues from the
new global weights. Communication is one push and one pull every H steps
instead of every step.

    paramd --listen 127.0.0.1:50051 &
    torchrun --nproc-per-node 3 client/python/examples/diloco.py --server http://127.0.0.1:50051 --job diloco

or as plain processes:

    for r in 0 1 2; do
        python client/python/examples/diloco.py --rank $r --world-size 3 --job diloco &
    done; wait

The settings are OpenDiLoCo's scaled down: inner AdamW, outer SGD with lr
0.7, momentum 0.9 and Nesterov; H (--sync-every) is 500 in the papers and
20 here, for a model this small.
"""

import argparse
import os

import torch
from torch import nn

import paramd
import paramd.diloco

IN, HIDDEN = 16, 64


def data(rank: int, step: int):
    """Worker `rank`'s batch `step`: a fixed teacher's regression task, each
    worker seeing its own samples."""
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(IN, 1, generator=g)
    g.manual_seed(1_000_003 * rank + step)
    x = torch.randn(32, IN, generator=g)
    return x, torch.tanh(x @ teacher)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="http://127.0.0.1:50051")
    ap.add_argument("--job", default="diloco")
    ap.add_argument("--rank", type=int, default=int(os.environ.get("RANK", "0")))
    ap.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sync-every", type=int, default=20)
    ap.add_argument("--wire", default="bf16", choices=["f32", "bf16", "f16"])
    args = ap.parse_args()

    torch.manual_seed(0)  # every worker builds the same model; rank 0's weights start the job
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))
    inner = torch.optim.AdamW(model.parameters(), lr=4e-3)
    with paramd.diloco.DiLoCo(
        model,
        inner,
        server=args.server,
        job=args.job,
        rank=args.rank,
        world_size=args.world_size,
        sync_every=args.sync_every,
        outer=paramd.SGD(lr=0.7, momentum=0.9, nesterov=True),
        wire=args.wire,
    ) as diloco:
        for step in range(args.steps):
            x, y = data(args.rank, step)
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            inner.step()
            inner.zero_grad()
            if diloco.step():
                print(
                    "rank %d round %d: loss %.4f, pseudo-gradient norm %.4f, %d workers"
                    % (args.rank, diloco.round, loss.item(), diloco.last_pseudo_grad_norm, diloco.participants),
                    flush=True,
                )


if __name__ == "__main__":
    main()
