"""`state_dict()` and `load_state_dict()` of paramd.torch's optimizers, in
torch's format, against torch.optim running the same steps locally.

paramd to torch: the same entries (a parameter never stepped has none),
SGD's momentum buffers bit for bit, Adam's step and moments within the
golden tolerance; it survives torch.save/torch.load, and a local torch
optimizer loaded with it continues as paramd does.

torch to paramd: a run trained locally moves onto paramd mid-training with
its optimizer's state_dict and goes on as torch goes on (SGD bit for bit,
Adam within tolerance), on 1 and 3 shards; a state the job would not
reproduce (other hyperparameters, another lr, a missing buffer) is refused
before anything is sent, and one the server refuses changes nothing."""

import copy
import io
import re

import numpy as np
import pytest

import paramd

torch = pytest.importorskip("torch")
import paramd.torch as pt  # noqa: E402

STEPS = 4


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.a = torch.nn.Linear(4, 6)
        self.b = torch.nn.Linear(6, 3)
        self.unused = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def loss(model, step):
    g = torch.Generator().manual_seed(50 + step)
    x, y = torch.randn(7, 4, generator=g), torch.randn(7, 3, generator=g)
    return torch.nn.functional.mse_loss(model(x), y)


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "adamw_amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.01, amsgrad=True),
}


def distributed(kind, model, cluster, job_name):
    """A fresh torch optimizer of `kind` over `model`, running on paramd."""
    return pt.DistributedOptimizer(
        OPTIMIZERS[kind](model.parameters()),
        model.named_parameters(),
        server=cluster.url,
        job=job_name,
        rank=0,
        world_size=1,
        timeout=60,
    )


def train(model, opt, steps):
    for step in steps:
        opt.zero_grad()
        loss(model, step).backward()
        opt.step()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_state_dict_is_torchs(cluster, job_name, kind):
    torch.set_num_threads(1)
    local, remote = Net(), Net()
    opt = OPTIMIZERS[kind](local.parameters())
    dist = distributed(kind, remote, cluster, job_name)
    train(local, opt, range(STEPS))
    train(remote, dist, range(STEPS))

    mine, want = dist.state_dict(), opt.state_dict()
    assert mine["state"].keys() == want["state"].keys(), "the unused layer has no entry"
    for i, entry in want["state"].items():
        assert mine["state"][i].keys() == entry.keys(), i
        for k, v in entry.items():
            got = mine["state"][i][k]
            assert got.dtype == v.dtype and got.shape == v.shape, (i, k)
            if kind == "sgd" or k == "step":
                assert torch.equal(got, v), (i, k)
            else:
                np.testing.assert_allclose(got.numpy(), v.numpy(), rtol=1e-4, atol=1e-6, err_msg="%d %s" % (i, k))
    assert [g["params"] for g in mine["param_groups"]] == [g["params"] for g in want["param_groups"]]
    assert [g["lr"] for g in mine["param_groups"]] == [g["lr"] for g in want["param_groups"]]

    # It survives torch.save and torch.load.
    buf = io.BytesIO()
    torch.save(mine, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    assert all(torch.equal(loaded["state"][i][k], v) for i, e in mine["state"].items() for k, v in e.items())

    # A local torch optimizer loaded with it continues as paramd does.
    moved = Net()
    with torch.no_grad():
        for p, q in zip(moved.parameters(), remote.parameters()):
            p.copy_(q)
    cont = OPTIMIZERS[kind](moved.parameters())
    cont.load_state_dict(loaded)
    train(moved, cont, [STEPS])
    train(remote, dist, [STEPS])
    for (n, p), q in zip(moved.named_parameters(), remote.parameters()):
        if kind == "sgd":
            assert torch.equal(p, q), n
        else:
            np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=n)

    # The server's own state loads back: state_dict() shows it until the
    # next step applies it.
    now = dist.state_dict()
    dist.load_state_dict(now)
    again = dist.state_dict()
    assert all(torch.equal(again["state"][i][k], v) for i, e in now["state"].items() for k, v in e.items())


def moved_onto_paramd(cluster, job_name, kind, before, after):
    """Trains `before` steps locally, then moves the run onto paramd with
    the local optimizer's state_dict and trains `after` more steps there;
    returns the moved model and optimizer and the local run continued."""
    local = Net()
    opt = OPTIMIZERS[kind](local.parameters())
    train(local, opt, range(before))
    saved = copy.deepcopy(opt.state_dict())
    moved = Net()
    with torch.no_grad():
        for p, q in zip(moved.parameters(), local.parameters()):
            p.copy_(q)
    dist = distributed(kind, moved, cluster, job_name)
    dist.load_state_dict(saved)
    shown = dist.state_dict()
    assert shown["state"].keys() == saved["state"].keys()
    assert all(torch.equal(shown["state"][i][k], v) for i, e in saved["state"].items() for k, v in e.items())
    train(local, opt, range(before, before + after))
    train(moved, dist, range(before, before + after))
    return moved, dist, local, opt


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_a_local_run_moves_onto_paramd_mid_training(cluster, job_name, kind):
    torch.set_num_threads(1)
    moved, dist, local, opt = moved_onto_paramd(cluster, job_name, kind, STEPS, 3)
    # Adam's steps continue from the state; SGD keeps none, so the job
    # counts its own.
    assert dist.optimizer_step == (3 if kind == "sgd" else STEPS + 3)
    for (n, p), q in zip(moved.named_parameters(), local.parameters()):
        if kind == "sgd":
            assert torch.equal(p, q), n
        else:
            np.testing.assert_allclose(p.detach().numpy(), q.detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=n)
    mine, want = dist.state_dict(), opt.state_dict()
    assert mine["state"].keys() == want["state"].keys()
    for i, entry in want["state"].items():
        for k, v in entry.items():
            got = mine["state"][i][k]
            if kind == "sgd" or k == "step":
                assert torch.equal(got, v), (i, k)
            else:
                np.testing.assert_allclose(got.numpy(), v.numpy(), rtol=1e-4, atol=1e-6, err_msg="%d %s" % (i, k))


def test_a_state_the_job_would_not_reproduce_is_refused(one_shard, job_name):
    torch.set_num_threads(1)
    local = Net()
    opt = OPTIMIZERS["sgd"](local.parameters())
    train(local, opt, range(2))
    remote = Net()
    dist = distributed("sgd", remote, one_shard, job_name)
    good = copy.deepcopy(opt.state_dict())

    def changed(edit):
        sd = copy.deepcopy(good)
        edit(sd)
        return sd

    cases = [
        (changed(lambda sd: sd["param_groups"][0].update(momentum=0.8)), "momentum is 0.8"),
        (changed(lambda sd: sd["param_groups"][0].update(lr=0.2)), "schedule gives 0.1"),
        (changed(lambda sd: sd["state"][0].pop("momentum_buffer")), "keeps ['momentum_buffer']"),
        (changed(lambda sd: sd["state"][0].update(momentum_buffer=torch.zeros(3))), "has shape (3,)"),
        (changed(lambda sd: sd["state"].update({99: {}})), "entries [99]"),
        (changed(lambda sd: sd["param_groups"].append(dict(sd["param_groups"][0]))), "2 groups"),
    ]
    for sd, match in cases:
        with pytest.raises(paramd.InvalidArgument, match=re.escape(match)):
            dist.load_state_dict(sd)
    # Refused by the server (a value it will not load): nothing changes, and
    # the next step runs as if no load had been tried.
    bad = changed(lambda sd: sd["state"][0]["momentum_buffer"].fill_(float("nan")))
    with pytest.raises(paramd.InvalidArgument, match="must be finite"):
        dist.load_state_dict(bad)
    fresh = Net()
    ref = OPTIMIZERS["sgd"](fresh.parameters())
    train(fresh, ref, [0])
    train(remote, dist, [0])
    for (n, p), q in zip(remote.named_parameters(), fresh.parameters()):
        assert torch.equal(p, q), n
