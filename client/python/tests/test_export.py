"""`paramctl export` (and `Client.export`) loaded by PyTorch: a model's
`load_state_dict(safetensors.torch.load_file(path))` accepts the file, and
the tensors are exactly what the client pulls."""

import subprocess

import pytest

import paramd

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")
import paramd.torch as pt  # noqa: E402


class Net(torch.nn.Module):
    """Parameters of several ranks, a scalar among them, nested names."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(5, 40), torch.nn.GELU(), torch.nn.LayerNorm(40))
        self.head = torch.nn.Linear(40, 3)
        self.temperature = torch.nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.head(self.encoder(x)) / self.temperature


def test_export_loads_into_a_torch_model(cluster, job_name, tmp_path, paramctl_bin):
    torch.manual_seed(3)
    model = Net()
    opt = pt.RemoteOptimizer(
        model.named_parameters(),
        server=cluster.url,
        job=job_name,
        rank=0,
        world_size=1,
        optimizer=paramd.Adam(lr=0.05, amsgrad=True),
        schedule=paramd.CosineAnnealing(t_max=4),
    )
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert opt.round == 5 and opt.optimizer_step == 5

    pulled = paramd.Client(cluster.url).pull(job_name, 5)
    exported = tmp_path / "model.safetensors"
    out = subprocess.run(
        [str(paramctl_bin), "--server", cluster.url, "export", "--job", job_name, "--out", str(exported)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    ours = tmp_path / "client.safetensors"
    paramd.Client(cluster.url).export(ours, job=job_name)

    for path in (exported, ours):
        fresh = Net()
        state = safetensors_torch.load_file(str(path))
        result = fresh.load_state_dict(state, strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        for name, p in fresh.named_parameters():
            assert p.dtype == torch.float32 and tuple(p.shape) == pulled.params[name].shape
            assert torch.equal(p.detach(), torch.from_numpy(pulled.params[name])), name
            # The model trained in place holds the same values.
            assert torch.equal(p.detach(), dict(model.named_parameters())[name].detach()), name
        # The loaded model computes what the trained one does.
        assert torch.equal(fresh(x), model(x))
