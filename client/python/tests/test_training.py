"""Four real PyTorch worker processes (examples/train_mlp.py) train a small
MLP through paramd with AdamW, two param groups, warmup-cosine and
clipping, each on its own slice of the data; the result must be the model
a single torch process gets from torch.optim.AdamW + LambdaLR +
clip_grad_norm_ on the mean of the four workers' gradients."""

import subprocess
import sys

import numpy as np
import pytest

from conftest import EXAMPLES, load_example

torch = pytest.importorskip("torch")

WORLD, STEPS = 4, 60
ATOL, RTOL, NORM_RTOL = 1e-6, 1e-4, 1e-3


def example():
    return load_example("train_mlp")


def reference(ex, steps):
    """One process: the four workers' gradients, averaged as paramd does
    (summed in rank order, then divided), clipped, AdamW, LambdaLR."""
    torch.set_num_threads(1)
    model = ex.make_model()
    x, y = ex.dataset()
    opt = ex.torch_optimizer(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, ex.schedule(steps).factor)
    params = list(model.parameters())
    losses, lrs, norms = [], [], []
    for step in range(steps):
        per_worker, step_losses = [], []
        for r in range(WORLD):
            model.zero_grad()
            xb, yb = ex.batch(x, y, r, WORLD, step)
            loss = ex.loss_fn(model, xb, yb)
            loss.backward()
            step_losses.append(loss.item())
            per_worker.append([p.grad.clone() for p in params])
        for i, p in enumerate(params):
            g = per_worker[0][i].clone()
            for r in range(1, WORLD):
                g += per_worker[r][i]
            p.grad = g / WORLD
        lrs.append([g["lr"] for g in opt.param_groups])
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, ex.MAX_NORM, foreach=False)))
        opt.step()
        sched.step()
        losses.append(step_losses)
    return {n: p.detach().numpy() for n, p in model.named_parameters()}, np.asarray(losses), lrs, norms


def close(name, got, want, rtol=RTOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    bad = np.abs(got - want) > ATOL + rtol * np.abs(want)
    assert not bad.any(), "%s: %d of %d values beyond atol %g rtol %g; worst |diff| %g" % (
        name,
        bad.sum(),
        bad.size,
        ATOL,
        rtol,
        np.abs(got - want).max(),
    )


def run_workers(url, job, tmp_path, wrap):
    procs, outs = [], []
    for r in range(WORLD):
        out = tmp_path / ("rank%d.npz" % r)
        outs.append(out)
        cmd = [sys.executable, str(EXAMPLES / "train_mlp.py"), "--server", url, "--job", job]
        cmd += ["--rank", str(r), "--world-size", str(WORLD), "--steps", str(STEPS), "--out", str(out)]
        if wrap:
            cmd.append("--wrap")
        if wrap == "overlap":
            cmd.append("--overlap")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for r, p in enumerate(procs):
            log, _ = p.communicate(timeout=300)
            logs.append(log)
            assert p.returncode == 0, "worker %d exited with %s:\n%s" % (r, p.returncode, log)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [np.load(o) for o in outs], logs


@pytest.mark.parametrize(
    "wrap",
    [False, True, "overlap"],
    ids=["RemoteOptimizer", "DistributedOptimizer", "DistributedOptimizer-overlap"],
)
def test_four_workers_train_to_torchs_weights(cluster, job_name, tmp_path, wrap):
    ex = example()
    results, logs = run_workers(cluster.url, job_name, tmp_path, wrap)
    want, ref_losses, ref_lrs, ref_norms = reference(ex, STEPS)

    # Every worker ends with the same weights, the ones torch computes.
    for r, res in enumerate(results):
        for n, w in want.items():
            got = res["param/" + n]
            assert got.shape == w.shape
            np.testing.assert_array_equal(got, results[0]["param/" + n], err_msg="rank %d differs from rank 0" % r)
    for n, w in want.items():
        close(n, results[0]["param/" + n], w)
    # The lr of both groups and the pre-clip norm of every step; clipping
    # and the warmup were really exercised.
    close("lr", results[0]["lr"], ref_lrs)
    close("grad_norm", results[0]["grad_norm"], ref_norms, NORM_RTOL)
    assert results[0]["lr"][0].tolist() == [0.0, 0.0]
    assert (results[0]["clip_coefficient"] < 1).any(), "max_norm never clipped: make it smaller"
    # Each worker's losses are those of its own slice; the loss falls.
    for r, res in enumerate(results):
        close("loss of rank %d" % r, res["loss"], ref_losses[:, r], 1e-3)
    # The loss over the whole data set falls by more than half.
    x, y = ex.dataset()
    trained = ex.make_model()
    before = ex.loss_fn(trained, x, y).item()
    with torch.no_grad():
        for n, p in trained.named_parameters():
            p.copy_(torch.from_numpy(results[0]["param/" + n]))
    after = ex.loss_fn(trained, x, y).item()
    assert after < 0.5 * before, "the loss did not fall enough: %.4f -> %.4f" % (before, after)
    assert "step   50" in logs[0]
