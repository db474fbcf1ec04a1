"""Low-communication training (DiLoCo) with paramd as the outer optimizer.

Workers each train their own copy of a small model with a local AdamW for
H steps, then push their pseudo-gradient (the global weights they started
from minus their own) in bf16; paramd averages the pseudo-gradients of the
round's participants and steps the global weights with Nesterov SGD, and
every worker continues from the new global weights. Communication is one
push and one pull every H steps instead of every step.

Membership is elastic: the job needs 2 workers a round (min_workers) and
takes whoever joins. This demo runs 3 workers as threads: workers 0 and 1
start together, worker 2 joins late (once round --join-at is reached) and
worker 1 leaves early (after --leave-after rounds):

    paramd --listen 127.0.0.1:50051 &
    python client/python/examples/diloco.py --server http://127.0.0.1:50051 --job diloco

One worker per process, as on a real fleet (start and stop them as you
like; each runs --rounds rounds from the round it joins at):

    python client/python/examples/diloco.py --who 0 --job diloco &
    python client/python/examples/diloco.py --who 1 --job diloco --rounds 5 &

The settings are OpenDiLoCo's scaled down: inner AdamW, outer SGD with lr
0.7, momentum 0.9 and Nesterov; H (--sync-every) is 500 in the papers and
20 here, for a model this small. With --out DIR, each worker writes the
rounds it took part in and its final weights there (the tests compare them
with a one-process simulation).
"""

import argparse
import json
import os
import threading
import time
from typing import Dict, List, Optional

import torch
from torch import nn

import paramd
import paramd.diloco

IN, HIDDEN = 16, 64


def build_model() -> nn.Module:
    """The model every worker starts from (the first to join creates the
    job from its weights; the others load the job's)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 1))


def data(who: int, step: int):
    """Worker `who`'s batch at inner step `step` of the run (round * H +
    the step within the round): a fixed teacher's regression task, each
    worker seeing its own samples."""
    g = torch.Generator().manual_seed(7)
    teacher = torch.randn(IN, 1, generator=g)
    g.manual_seed(1_000_003 * who + step)
    x = torch.randn(32, IN, generator=g)
    return x, torch.tanh(x @ teacher)


def inner_step(model: nn.Module, inner: torch.optim.Optimizer, who: int, step: int) -> float:
    x, y = data(who, step)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    inner.step()
    inner.zero_grad()
    return loss.item()


def train(args: argparse.Namespace, who: int, model: nn.Module, until: Optional[int] = None) -> None:
    """Worker `who`: joins the job, trains `model` until the job has
    completed `until` rounds (`--rounds` rounds from the one it joined at
    if None), and leaves."""
    inner = torch.optim.AdamW(model.parameters(), lr=4e-3)
    took: List[int] = []
    with paramd.diloco.DiLoCo(
        model,
        inner,
        server=args.server,
        job=args.job,
        sync_every=args.sync_every,
        outer=paramd.SGD(lr=0.7, momentum=0.9, nesterov=True),
        wire=args.wire,
        min_workers=2,
        grace_seconds=args.grace,
    ) as diloco:
        first = diloco.round
        print("worker %d joined as worker id %d at round %d" % (who, diloco.worker, first), flush=True)
        end = first + args.rounds if until is None else until
        k = 0
        while diloco.round < end:
            r = diloco.round
            loss = inner_step(model, inner, who, r * args.sync_every + k)
            k += 1
            stale = diloco.stale_rounds
            if diloco.step():
                k = 0
                if diloco.stale_rounds == stale:
                    took.append(r)
                print(
                    "worker %d round %d: loss %.4f, pseudo-gradient norm %.4f, %d workers"
                    % (who, r, loss, diloco.last_pseudo_grad_norm, diloco.participants),
                    flush=True,
                )
        worker = diloco.worker
    print("worker %d left after round %d" % (who, diloco.round - 1), flush=True)
    if args.out is not None:
        with open(os.path.join(args.out, "worker%d.json" % who), "w") as f:
            json.dump({"worker": worker, "rounds": took}, f)
        torch.save(model.state_dict(), os.path.join(args.out, "worker%d.pt" % who))


def wait_for_round(args: argparse.Namespace, round: int) -> None:
    """Waits until the job has completed `round` rounds (it may not exist
    yet)."""
    client = paramd.Client(args.server)
    while True:
        try:
            if client.job_status(args.job).round >= round:
                return
        except paramd.NotFound:
            pass
        time.sleep(0.05)


def demo(args: argparse.Namespace) -> None:
    """Three workers: 0 and 1 from the start, 2 joining late, 1 leaving
    early."""
    torch.set_num_threads(1)
    failures: Dict[int, BaseException] = {}
    # Built here: torch's global generator, which seeds them, is not for
    # threads to share.
    models = [build_model() for _ in range(3)]

    def run(who: int, until: int, join_at: int = 0) -> None:
        try:
            if join_at:
                wait_for_round(args, join_at)
            train(args, who, models[who], until)
        except BaseException as e:
            failures[who] = e
            raise

    threads = [
        threading.Thread(target=run, args=(0, args.rounds)),
        threading.Thread(target=run, args=(1, args.leave_after)),
        threading.Thread(target=run, args=(2, args.rounds, args.join_at)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise SystemExit("workers %s failed" % sorted(failures))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--server", default="http://127.0.0.1:50051")
    ap.add_argument("--job", default="diloco")
    ap.add_argument("--who", type=int, help="run this one worker (its data); without it, the three-worker demo")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of the demo; rounds of a worker run with --who")
    ap.add_argument("--join-at", type=int, default=2, help="demo: worker 2 joins once this round is reached")
    ap.add_argument("--leave-after", type=int, default=5, help="demo: worker 1 leaves once this round is reached")
    ap.add_argument("--sync-every", type=int, default=20)
    ap.add_argument("--wire", default="bf16", choices=["f32", "bf16", "f16"])
    ap.add_argument("--grace", type=float, default=60.0, help="seconds a round waits for late members")
    ap.add_argument("--out", help="a directory for each worker's rounds and final weights")
    args = ap.parse_args()
    if args.who is None:
        demo(args)
    else:
        train(args, args.who, build_model())


if __name__ == "__main__":
    main()
