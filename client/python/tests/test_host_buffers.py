"""Parameters that cannot be pulled into in place: a non-contiguous
parameter (its gradient is non-contiguous too) is pushed through one
conversion and pulled into a host buffer that is kept across steps, then
copied into the parameter's own memory; training ends where torch's does."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import paramd.torch as pt  # noqa: E402

STEPS = 4


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        # A (3, 4) view of a (4, 3) tensor: strides (1, 3), not contiguous.
        self.w = torch.nn.Parameter(torch.randn(4, 3).t())
        self.b = torch.nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.tanh(x @ self.w.t() + self.b)


def batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(6, 4, generator=g), torch.randn(6, 3, generator=g)


def train(model, opt):
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def test_a_non_contiguous_parameter_trains_in_its_own_memory(one_shard, job_name):
    torch.set_num_threads(1)
    want = Net()
    train(want, sgd(want))

    model = Net()
    assert not model.w.is_contiguous()
    where = model.w.data_ptr()
    opt = pt.DistributedOptimizer(
        sgd(model), model.named_parameters(), server=one_shard.url, job=job_name, rank=0, world_size=1, timeout=60
    )
    buffers = dict(opt._pull_host)
    assert set(buffers) == {"w"}, "only the non-contiguous parameter is staged"
    train(model, opt)

    assert model.w.data_ptr() == where and not model.w.is_contiguous()
    assert opt._pull_host["w"] is buffers["w"], "the host buffer is reused across steps"
    for n, p in want.named_parameters():
        got = dict(model.named_parameters())[n].detach().numpy()
        np.testing.assert_allclose(got, p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=n)
