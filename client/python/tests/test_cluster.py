"""What a cluster needs of the client: every shard gets every push (a
shard holding none of the job's chunks an empty one), copies of one push
racing each other are counted once, and a client keeps trying a cluster
that restarted until its shards agree on the restored checkpoint, within
its deadline."""

import threading

import grpc
import numpy as np
import pytest

import paramd
from conftest import CHUNK_BYTES, Cluster, wait_for
from paramd.v1 import paramd_pb2 as pb
from fakes import pb_grpc


def test_a_shard_without_chunks_of_the_job_still_gets_every_push(three_shards, job_name):
    c = three_shards.client(timeout=20)
    c.init(job_name, {"tiny": np.array([1.0, 2.0], np.float32)}, paramd.SGD(lr=1.0), workers=2)
    layout = c.layout(job_name)
    assert len(layout.shards) == 3 and len(set(layout.owners)) == 1, "one shard holds the only chunk"
    c.push(job_name, 0, 0, {"tiny": np.array([1.0, 1.0], np.float32)})
    c.push(job_name, 1, 0, {"tiny": np.array([3.0, 1.0], np.float32)})
    # The round completes only once every shard has both workers' pushes.
    pulled = c.pull(job_name, 1)
    assert pulled.round == 1
    np.testing.assert_array_equal(pulled.params["tiny"], [-1.0, 1.0])
    assert [s.round for s in c.job_status(job_name).shards] == [1, 1, 1]


def test_backup_workers_on_a_cluster(cluster, job_name):
    # Three workers, one of them a backup: the coordinator closes the round
    # with the first two to have pushed to every shard; the third is late.
    c = cluster.client(timeout=20)
    w0 = np.ones(3000, np.float32)
    c.init(job_name, {"w": w0}, paramd.SGD(lr=1.0), workers=3, backup_workers=1)
    g = [_grads(3000, 20 + k)["w"] for k in range(3)]
    c.push(job_name, 2, 0, {"w": g[2]})
    c.push(job_name, 0, 0, {"w": g[0]})
    pulled = c.pull(job_name, 1)
    np.testing.assert_allclose(pulled.params["w"], w0 - (g[2] + g[0]) / 2, rtol=1e-6, atol=1e-6)
    assert all(s.round == 1 for s in c.job_status(job_name).shards)
    with pytest.raises(paramd.StalePush, match="stale push: round 0 of job '%s' is complete" % job_name):
        c.push(job_name, 1, 0, {"w": g[1]})


def _grads(n, seed):
    return {"w": np.random.default_rng(seed).standard_normal(n).astype(np.float32)}


def test_concurrent_copies_of_a_push_are_all_acknowledged_and_counted_once(cluster, job_name):
    n = 3000
    c = cluster.client(timeout=30)
    w0 = np.ones(n, np.float32)
    c.init(job_name, {"w": w0}, paramd.SGD(lr=0.5), workers=2)
    g0, g1 = _grads(n, 0), _grads(n, 1)
    results, failures = [], []

    def push():
        try:
            results.append(c.push(job_name, 0, 0, g0))
        except BaseException as e:  # reported below
            failures.append(e)

    threads = [threading.Thread(target=push) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures and len(results) == 6, failures
    assert all(r.pushed == 1 for r in results), results
    assert c.job_status(job_name).workers_pushed == 1
    c.push(job_name, 1, 0, g1)
    got = c.pull(job_name, 1).params["w"]
    np.testing.assert_allclose(got, w0 - np.float32(0.5) * (g0["w"] + g1["w"]) / 2, rtol=1e-6, atol=1e-6)


def test_a_push_refused_while_another_copy_is_received_is_sent_again(one_shard, job_name):
    # Worker 0's push held open on a raw stream, after its header: the
    # shard reads one push per worker at a time, so the client's copy is
    # refused ABORTED, unread, and sent again until the held one is done;
    # it is then a duplicate. Both succeed; the data is counted once.
    n = 1 << 16
    c = one_shard.client(timeout=60)
    w0 = np.zeros(n, np.float32)
    c.init(job_name, {"w": w0}, paramd.SGD(lr=1.0), workers=2)
    g0, g1 = _grads(n, 2)["w"], _grads(n, 3)["w"]
    shard = one_shard.daemons[0]

    def aborted():
        return shard.metric("paramd_refused_pushes_total", job=job_name, reason="aborted")

    release = threading.Event()

    def held():
        yield pb.PushRequest(job=job_name, worker=0, round=0)
        release.wait(60)
        yield pb.PushRequest(grads=[pb.Segment(param="w", offset=0, data=g0.tobytes())])

    channel = grpc.insecure_channel(one_shard.url.split("://")[1])
    try:
        stub = pb_grpc.ParamServerStub(channel)
        # Two raw copies: whichever the shard admits first holds the
        # worker's slot; the other is refused at once.
        raw = [stub.Push.future(held(), timeout=60) for _ in range(2)]
        wait_for(lambda: any(f.done() for f in raw), 30, "one of two raw copies refused")
        (refused,) = [f for f in raw if f.done()]
        (holder,) = [f for f in raw if not f.done()]
        assert refused.exception().code() == grpc.StatusCode.ABORTED, refused.exception()
        assert "is already being received; retry if it fails" in refused.exception().details()
        assert aborted() == 1

        out = {}
        t = threading.Thread(target=lambda: out.setdefault("r", c.push(job_name, 0, 0, {"w": g0})))
        t.start()
        wait_for(lambda: aborted() >= 3, 30, "the client's copy refused (ABORTED) and sent again")
        assert t.is_alive() and not holder.done()
        release.set()
        assert holder.result(30) == pb.PushResponse(duplicate=False, pushed=1)
        t.join(30)
        assert out.get("r") == paramd.PushResult(duplicate=True, pushed=1)
    finally:
        release.set()
        channel.close()
    c.push(job_name, 1, 0, {"w": g1})
    np.testing.assert_array_equal(c.pull(job_name, 1).params["w"], w0 - (g0 + g1) / np.float32(2))


def test_a_client_waits_for_a_restarted_cluster_to_agree_on_its_checkpoint(paramd_bin, one_shard, tmp_path, job_name):
    init = {"w": np.random.default_rng(5).standard_normal((30, 20)).astype(np.float32)}
    grads = [_grads(600, 10 + t)["w"].reshape(30, 20) for t in range(5)]
    opt = paramd.SGD(lr=0.1, momentum=0.9)
    # The run that never stops, on one shard.
    ref = one_shard.client(timeout=30)
    ref.init(job_name, init, opt, workers=1)
    want = []
    for t, g in enumerate(grads):
        ref.push(job_name, 0, t, {"w": g})
        want.append(ref.pull(job_name, t + 1).params["w"])

    cluster = Cluster(
        paramd_bin, 2, CHUNK_BYTES, shard_args=lambda i: ["--checkpoint-dir", str(tmp_path / ("shard%d" % i))]
    )
    try:
        c = cluster.client(timeout=60)
        c.init(job_name, init, opt, workers=1)
        for t in range(3):
            c.push(job_name, 0, t, {"w": grads[t]})
            c.pull(job_name, t + 1)
        # SIGTERM: the coordinator checkpoints round 3 on both shards.
        cluster.stop()
        # The coordinator alone: it has restored round 3 but serves the job
        # only once every shard has reported what it can restore.
        cluster.start(0)
        out, failures = {}, []

        def resume():
            try:
                c.push(job_name, 0, 3, {"w": grads[3]})
                out["pulled"] = c.pull(job_name, 4)
            except BaseException as e:  # reported below
                failures.append(e)

        worker = threading.Thread(target=resume)
        worker.start()
        # Five tries, 1.5 s: longer than the client's old budget of three.
        wait_for(lambda: c.retried["unavailable"] >= 5, 30, "the client to be answered UNAVAILABLE five times")
        assert worker.is_alive()
        cluster.start(1)
        worker.join(60)
        assert not worker.is_alive() and not failures, failures
        assert out["pulled"].round == 4
        np.testing.assert_array_equal(out["pulled"].params["w"], want[3])
        c.push(job_name, 0, 4, {"w": grads[4]})
        np.testing.assert_array_equal(c.pull(job_name, 5).params["w"], want[4])
    finally:
        cluster.stop()
