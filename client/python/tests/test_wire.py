"""bf16 and f16 on the wire from Python: `Client.push(..., wire=)` casts as
torch's `.to(torch.bfloat16)` / `.to(torch.float16)` do (round to nearest
even; the native core casts), and the server decodes exactly, so a round of
bf16/f16 pushes is bit for bit the round of f32 pushes of torch's cast
values (ties and subnormals included); `pull(..., wire=)` returns
torch's cast of the f32 values. On 1 and 3 shards."""

import numpy as np
import pytest

import paramd

torch = pytest.importorskip("torch")

WIRES = {"bf16": torch.bfloat16, "f16": torch.float16}


def values(n, seed):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(n).astype(np.float32) * 3
    # Ties, overflow, subnormals and NaN: where rounding rules differ.
    v[:6] = [1 + 2**-8, 1 + 3 * 2**-8, 65520.0, 3.4e38, 1e-40, np.nan]
    return v


def test_pushes_and_pulls_in_bf16_and_f16_are_torchs_casts(cluster, job_name):
    c = paramd.Client(cluster.url, timeout=60)
    shapes = {"w": (33, 5), "b": (7,)}
    init = {n: np.full(s, 0.5, np.float32) for n, s in shapes.items()}
    sgd = paramd.SGD(lr=0.7, momentum=0.9, nesterov=True)
    for job in (job_name + "-wire", job_name + "-f32"):
        c.init(job, init, optimizer=sgd, workers=2)
    for r in range(2):
        for w, wire in enumerate(("bf16", "f16")):
            grads = {
                n: np.nan_to_num(values(int(np.prod(s)), 10 * r + w), nan=0.5).reshape(s) for n, s in shapes.items()
            }
            grads = {n: np.clip(g, -6e4, 6e4) for n, g in grads.items()}
            c.push(job_name + "-wire", w, r, grads, wire=wire)
            cast = {n: torch.from_numpy(g).to(WIRES[wire]).float().numpy() for n, g in grads.items()}
            c.push(job_name + "-f32", w, r, cast)
        a, b = c.pull(job_name + "-wire", r + 1), c.pull(job_name + "-f32", r + 1)
        for n in shapes:
            assert a.params[n].tobytes() == b.params[n].tobytes(), (r, n)
            for wire, dtype in WIRES.items():
                got = c.pull(job_name + "-wire", r + 1, wire=wire).params[n]
                want = torch.from_numpy(a.params[n]).to(dtype).float().numpy()
                assert got.tobytes() == want.tobytes(), (r, n, wire)
    with pytest.raises(paramd.InvalidArgument, match="wire must be one of"):
        c.pull(job_name + "-wire", 0, wire="fp8")
