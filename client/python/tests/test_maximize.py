"""maximize=True through paramd.torch, against torch.optim continuing the
same model locally: SGD bit for bit, Adam and AdamW within the golden
tolerance (their kernels round like torch's in most but not every
element, see the README's numerics)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import paramd.torch as pt  # noqa: E402

STEPS = 5


def model():
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def loss(m, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    return -torch.nn.functional.mse_loss(m(x), y)  # something to maximize


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=True, maximize=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=0.05, maximize=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, maximize=True),
}


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_maximize_matches_torch(cluster, job_name, kind):
    torch.set_num_threads(1)
    local, remote = model(), model()
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
    for step in range(STEPS):
        for m, o in ((local, opt), (remote, dist)):
            o.zero_grad()
            loss(m, step).backward()
            o.step()
    for (n, want), got in zip(local.named_parameters(), remote.parameters()):
        want, got = want.detach().numpy(), got.detach().numpy()
        if kind == "sgd":
            np.testing.assert_array_equal(got, want, err_msg=n)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=n)
    start = dict(model().named_parameters())
    moved = [n for n, p in remote.named_parameters() if not torch.equal(p, start[n])]
    assert len(moved) == 4, "every parameter moved"
