"""paramd.Client against real paramd processes, one shard and three."""

import subprocess

import numpy as np
import pytest

import paramd
from conftest import Cluster

RNG = np.random.default_rng(7)
# Sizes chosen so that with 1 KiB chunks every shard of three holds some.
INIT = {
    "enc.weight": RNG.standard_normal((24, 20)).astype(np.float32),
    "enc.bias": RNG.standard_normal(24).astype(np.float32),
    "head.weight": RNG.standard_normal((3, 24)).astype(np.float32),
    "scale": np.float32(0.5),
}


def sgd_step(p, g, lr):
    """One plain SGD step as torch and paramd compute it in f32: `p + (-lr) * g`
    rounded once (a fused multiply-add; the f64 product of two f32 is exact)."""
    return (np.float64(np.float32(-lr)) * np.float64(g) + np.float64(np.float32(p))).astype(np.float32)


def grads(seed):
    r = np.random.default_rng(seed)
    return {n: r.standard_normal(np.shape(v)).astype(np.float32) for n, v in INIT.items()}


def test_init_push_pull_status_round_trip(cluster, job_name):
    c = cluster.client()
    r = c.init(job_name, INIT, paramd.SGD(lr=0.1), workers=2)
    assert r == paramd.InitResult(round=0, created=True)
    # The same job again is found, not created.
    assert c.init(job_name, [(n, np.shape(v)) for n, v in INIT.items()], paramd.SGD(lr=0.1), workers=2) == (0, False)
    pulled = c.pull(job_name, 0)
    assert pulled.round == 0 and pulled.last is None
    for n, v in INIT.items():
        assert pulled.params[n].shape == np.shape(v) and pulled.params[n].dtype == np.float32
        np.testing.assert_array_equal(pulled.params[n], v)

    g0, g1 = grads(0), grads(1)
    assert c.push(job_name, 0, 0, g0) == paramd.PushResult(duplicate=False, pushed=1)
    # A retry is acknowledged and counted once.
    assert c.push(job_name, 0, 0, g0).duplicate
    c.push(job_name, 1, 0, g1)
    pulled = c.pull(job_name, 1)
    assert pulled.round == 1
    assert pulled.last.round == 0 and pulled.last.step == 1 and list(pulled.last.lr) == [pytest.approx(0.1)]
    for n, v in INIT.items():
        mean = (g0[n] + g1[n]) / np.float32(2)
        np.testing.assert_allclose(pulled.params[n], v - np.float32(0.1) * mean, rtol=1e-6, atol=1e-7)
    # Only some parameters.
    assert set(c.pull(job_name, 1, params=["scale"]).params) == {"scale"}

    status = c.job_status(job_name)
    assert (status.round, status.step, status.workers_expected, status.optimizer) == (1, 1, 2, "sgd")
    assert status.parameters == sum(np.size(v) for v in INIT.values())
    assert len(status.shards) == len(cluster.daemons)
    assert all(s.up and s.chunks > 0 for s in status.shards)
    assert job_name in [j.job for j in c.status().jobs]
    c.delete_job(job_name)
    with pytest.raises(paramd.NotFound, match=job_name):
        c.status(job_name)


def test_refusals_carry_the_servers_message(cluster, job_name):
    c = cluster.client(timeout=10)
    c.init(job_name, INIT, paramd.AdamW(), workers=1)
    with pytest.raises(paramd.JobMismatch, match="already exists with a different configuration"):
        c.init(job_name, INIT, paramd.AdamW(), workers=3)
    with pytest.raises(paramd.EarlyPush, match="early push: job '%s' is collecting round 0, not round 2" % job_name):
        c.push(job_name, 0, 2, grads(0))
    # A malformed push is refused whole before any shard counts part of it.
    bad = dict(grads(0), nope=np.ones(2, np.float32))
    with pytest.raises(paramd.InvalidArgument, match="push of worker 0 for round 0: unknown parameter 'nope'"):
        c.push(job_name, 0, 0, bad)
    with pytest.raises(paramd.InvalidArgument, match="worker 5"):
        c.push(job_name, 5, 0, grads(0))
    assert c.job_status(job_name).workers_pushed == 0
    c.push(job_name, 0, 0, grads(0))
    c.pull(job_name, 1)
    with pytest.raises(paramd.StalePush, match="stale push: round 0 of job '%s' is complete" % job_name):
        c.push(job_name, 0, 0, grads(1))
    with pytest.raises(paramd.NotFound, match="job 'no-such-job' does not exist"):
        c.pull("no-such-job", 0)
    with pytest.raises(paramd.InvalidArgument, match="lr"):
        c.init(job_name + "-x", INIT, spec=_bad_spec())
    # A round that does not complete before the deadline.
    short = cluster.client(timeout=1.0)
    with pytest.raises(paramd.DeadlineExceeded):
        short.pull(job_name, 5)


def _bad_spec():
    from paramd.config import job_spec

    spec = job_spec([(n, np.shape(v)) for n, v in INIT.items()], paramd.AdamW(), 1)
    spec.optimizer.hyper.lr = -1.0  # past the client's own check: the server's refusal
    return spec


def test_export_writes_what_the_client_pulls(cluster, job_name, tmp_path, paramctl_bin):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    c = cluster.client()
    c.init(job_name, INIT, paramd.Adam(lr=0.01), workers=1)
    for t in range(3):
        c.push(job_name, 0, t, grads(t))
        pulled = c.pull(job_name, t + 1)
    ours = tmp_path / "client.safetensors"
    e = c.export(ours, job=job_name)
    assert (e.job, e.round, e.tensors) == (job_name, 3, len(INIT))
    theirs = tmp_path / "paramctl.safetensors"
    subprocess.run(
        [str(paramctl_bin), "--server", cluster.url, "export", "--job", job_name, "--out", str(theirs)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    for path in (ours, theirs):
        loaded = safetensors_numpy.load_file(str(path))
        assert set(loaded) == set(INIT)
        for n in INIT:
            np.testing.assert_array_equal(loaded[n], pulled.params[n])


def test_checkpoint_returns_the_round(paramd_bin, tmp_path, job_name):
    server = Cluster(paramd_bin, 1, ["--checkpoint-dir", str(tmp_path / "ckpt")])
    try:
        c = server.client()
        c.init(job_name, INIT, paramd.AdamW(), workers=1)
        c.push(job_name, 0, 0, grads(0))
        c.pull(job_name, 1)
        assert c.checkpoint(job_name) == {job_name: 1}
        (taken,) = (tmp_path / "ckpt" / job_name).iterdir()
        assert int(taken.name) == 1 and (taken / "MANIFEST.json").is_file()
    finally:
        server.stop()


def test_a_waiting_pull_releases_the_gil_and_writes_into_the_callers_arrays(one_shard, job_name):
    # A pull waits in the native core for a round that only this thread can
    # complete: if the core held the GIL while it waits, the push below
    # could not run and the pull would time out.
    import threading

    c = one_shard.client(timeout=60)
    c.init(job_name, INIT, paramd.SGD(lr=0.5), workers=1)
    out = {n: np.zeros(np.shape(v), np.float32) for n, v in INIT.items()}
    addresses = {n: a.__array_interface__["data"][0] for n, a in out.items()}
    got = {}

    def pull():
        got["result"] = c.pull_into(job_name, 1, out)

    waiter = threading.Thread(target=pull)
    waiter.start()
    g = grads(3)
    c.push(job_name, 0, 0, g)
    waiter.join(60)
    assert not waiter.is_alive() and got["result"][0] == 1
    for n, v in INIT.items():
        np.testing.assert_array_equal(out[n], sgd_step(v, g[n], 0.5))
        # Written where the arrays are, not replaced.
        assert out[n].__array_interface__["data"][0] == addresses[n]
    # Arrays the core cannot write into are refused before any call.
    with pytest.raises(paramd.InvalidArgument, match="contiguous, writable float32"):
        c.pull_into(job_name, 1, {"enc.bias": np.zeros(24, np.float64)})
    with pytest.raises(paramd.InvalidArgument, match="destination holds 23"):
        c.pull_into(job_name, 1, {"enc.bias": np.zeros(23, np.float32)})


def test_a_push_stream_sends_tensor_by_tensor_and_counts_only_whole_pushes(cluster, job_name):
    c = cluster.client()
    c.init(job_name, INIT, paramd.SGD(lr=0.1), workers=1)
    g = grads(3)
    # Refused before anything of the tensor is sent: unknown, wrong size,
    # given twice; a push lacking a tensor is counted nowhere.
    s = c.push_stream(job_name, 0, 0)
    with pytest.raises(paramd.InvalidArgument, match="unknown parameter 'nope'"):
        s.send("nope", np.zeros(3, np.float32))
    with pytest.raises(paramd.InvalidArgument, match="'enc.bias' has 3 values"):
        s.send("enc.bias", np.zeros(3, np.float32))
    s.send("enc.bias", g["enc.bias"])
    with pytest.raises(paramd.InvalidArgument, match="given twice"):
        s.send("enc.bias", g["enc.bias"])
    with pytest.raises(paramd.InvalidArgument, match="missing"):
        s.finish()
    # A cancelled one is counted nowhere either.
    s = c.push_stream(job_name, 0, 0)
    s.send("enc.weight", g["enc.weight"])
    s.cancel()
    assert c.job_status(job_name).workers_pushed == 0
    # A whole one, in any order, is the same as a push.
    s = c.push_stream(job_name, 0, 0)
    for n in reversed(list(INIT)):
        s.send(n, g[n])
    assert s.finish() == paramd.PushResult(duplicate=False, pushed=1)
    pulled = c.pull(job_name, 1)
    for n, v in INIT.items():
        np.testing.assert_array_equal(pulled.params[n], sgd_step(v, g[n], 0.1))
