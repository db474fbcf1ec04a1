"""Parameters without a gradient through paramd.torch, compared with
torch: a frozen part (requires_grad=False, yet held by the optimizer), a
branch only one rank takes and only on some steps, and a head no rank ever
uses. torch.optim skips a parameter whose grad is None (no weight decay, no
moments, its step count unchanged) and clip_grad_norm_ leaves it out; DDP
averages a gradient some ranks lack over every rank, the others counting
as zeros. paramd must end with the weights one torch process computes under
those rules, on one shard and on three."""

import threading

import numpy as np
import pytest

import paramd

torch = pytest.importorskip("torch")
import paramd.torch as pt  # noqa: E402

WORLD, STEPS, MAX_NORM = 2, 6, 0.5
ATOL, RTOL = 1e-6, 1e-4


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.trunk = torch.nn.Linear(4, 8)
        self.frozen = torch.nn.Linear(8, 8)
        self.a = torch.nn.Linear(8, 2)
        self.b = torch.nn.Linear(8, 2)
        self.never = torch.nn.Linear(8, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x, rank, step):
        h = torch.relu(self.frozen(torch.relu(self.trunk(x))))
        out = self.a(h)
        if rank == 1 and step % 2 == 0:
            out = out + self.b(h)
        return out


def batch(rank, step):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(5, 4, generator=g), torch.randn(5, 2, generator=g)


def loss(model, rank, step):
    x, y = batch(rank, step)
    return torch.nn.functional.mse_loss(model(x, rank, step), y)


def optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)


def reference():
    """One torch process: each rank's gradients, combined as DDP does."""
    torch.set_num_threads(1)
    model = Net()
    opt = optimizer(model)
    params = list(model.parameters())
    for step in range(STEPS):
        grads = []
        for r in range(WORLD):
            model.zero_grad(set_to_none=True)
            loss(model, r, step).backward()
            grads.append([None if p.grad is None else p.grad.clone() for p in params])
        for i, p in enumerate(params):
            given = [g[i] for g in grads]
            if all(g is None for g in given):
                p.grad = None
                continue
            total = None
            for g in given:
                g = torch.zeros_like(p) if g is None else g
                total = g.clone() if total is None else total + g
            p.grad = total / WORLD
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=False)
        opt.step()
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def close(name, got, want):
    bad = np.abs(got.astype(np.float64) - want) > ATOL + RTOL * np.abs(want)
    assert not bad.any(), "%s: %d of %d beyond tolerance; worst |diff| %g" % (
        name,
        bad.sum(),
        bad.size,
        np.abs(got.astype(np.float64) - want).max(),
    )


def test_frozen_and_unused_parameters_train_as_torch_does(cluster, job_name):
    initial = {n: p.detach().numpy().copy() for n, p in Net().named_parameters()}
    models = [Net() for _ in range(WORLD)]
    opts = [
        pt.DistributedOptimizer(
            optimizer(m),
            m.named_parameters(),
            server=cluster.url,
            job=job_name,
            rank=r,
            world_size=WORLD,
            clip=paramd.ClipGradNorm(MAX_NORM),
            timeout=60,
        )
        for r, m in enumerate(models)
    ]
    failures = []

    def train(rank):
        try:
            for step in range(STEPS):
                opts[rank].zero_grad()
                loss(models[rank], rank, step).backward()
                opts[rank].step()
        except Exception as e:  # reported by the main thread
            failures.append((rank, e))

    threads = [threading.Thread(target=train, args=(r,)) for r in range(WORLD)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a rank did not finish"
    assert not failures, failures

    want = reference()
    got = [{n: p.detach().numpy() for n, p in m.named_parameters()} for m in models]
    for n, w in want.items():
        np.testing.assert_array_equal(got[1][n], got[0][n], err_msg="rank 1 differs from rank 0 in %s" % n)
        close(n, got[0][n], w)
    # Never stepped: not even weight decay touched them.
    for n in ["frozen.weight", "frozen.bias", "never.weight", "never.bias"]:
        np.testing.assert_array_equal(got[0][n], initial[n], err_msg=n)
    # The branch one rank takes moved, and differently from pushing zeros
    # would have (that would decay it on the odd steps too: checked by the
    # reference above).
    assert not np.array_equal(got[0]["b.weight"], initial["b.weight"])
    assert opts[0].round == STEPS
