"""`state_dict()` of paramd.torch's optimizers, in torch's format, against
torch.optim running the same steps locally: the same entries (a parameter
never stepped has none), SGD's momentum buffers bit for bit, Adam's step
and moments within the golden tolerance; it survives torch.save/torch.load,
and a local torch optimizer loaded with it continues as paramd does. The
other direction (setting the server's state from a client) is refused
unless the state is the one the server holds."""

import io

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
    dist = pt.DistributedOptimizer(
        OPTIMIZERS[kind](remote.parameters()),
        remote.named_parameters(),
        server=cluster.url,
        job=job_name,
        rank=0,
        world_size=1,
        timeout=60,
    )
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

    # The server's own state is accepted back; another one is refused.
    now = dist.state_dict()
    dist.load_state_dict(now)
    first = next(iter(now["state"]))
    key = next(k for k in now["state"][first] if k != "step")
    now["state"][first][key] = now["state"][first][key] + 1.0
    with pytest.raises(paramd.InvalidArgument, match="differs from the one job"):
        dist.load_state_dict(now)
