"""Workers joining and restarting: rank 0 uploads the weights, the others
wait for the job and pull them; a worker that restarts (with a freshly
initialised model) picks up the current round and the current weights."""

import threading

import pytest

import paramd

torch = pytest.importorskip("torch")
import paramd.torch as pt  # noqa: E402


def net(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def optimizer(model, url, job, rank):
    return pt.RemoteOptimizer(
        model.named_parameters(),
        server=url,
        job=job,
        rank=rank,
        world_size=2,
        optimizer=paramd.SGD(lr=0.05, momentum=0.9),
        timeout=60,
    )


def train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def in_parallel(*fns):
    """Runs each fn in its own thread (each rank's step blocks until the
    round is complete, so two ranks in one process need two threads)."""
    errors = []

    def wrap(fn):
        try:
            fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a rank did not finish within 120 s"
    assert not errors, errors


def same_weights(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_ranks_join_and_restarted_workers_pick_up_the_current_round(cluster, job_name):
    m0, m1 = net(0), net(1)
    assert not same_weights(m0, m1)
    opts = {}
    # Rank 1 starts first: it waits until rank 0 has created the job.
    t1 = threading.Thread(target=lambda: opts.setdefault(1, optimizer(m1, cluster.url, job_name, 1)))
    t1.start()
    opts[0] = optimizer(m0, cluster.url, job_name, 0)
    t1.join(60)
    assert 1 in opts, "rank 1 did not join"
    assert same_weights(m0, m1), "rank 1 did not pull rank 0's initial weights"

    in_parallel(lambda: train(m0, opts[0], 3, 10), lambda: train(m1, opts[1], 3, 11))
    assert opts[0].round == opts[1].round == 3 and same_weights(m0, m1)

    # Rank 1 restarts with a fresh model: it joins round 3 with the current
    # weights. Then rank 0 restarts too: its new weights are not uploaded.
    m1 = net(2)
    opts[1] = optimizer(m1, cluster.url, job_name, 1)
    assert opts[1].round == 3 and same_weights(m0, m1)
    m0 = net(3)
    opts[0] = optimizer(m0, cluster.url, job_name, 0)
    assert opts[0].round == 3 and same_weights(m0, m1)

    in_parallel(lambda: train(m0, opts[0], 2, 12), lambda: train(m1, opts[1], 2, 13))
    assert opts[0].round == opts[1].round == 5 and same_weights(m0, m1)
    assert opts[0].optimizer_step == 5 and opts[0].lr == pytest.approx(0.05)


def test_a_rank_waits_for_the_job_only_so_long(cluster, job_name):
    with pytest.raises(paramd.DeadlineExceeded, match="was not created by rank 0 within 1 s"):
        pt.RemoteOptimizer(
            net(0).named_parameters(),
            server=cluster.url,
            job=job_name,
            rank=1,
            world_size=2,
            optimizer=paramd.SGD(),
            join_timeout=1.0,
        )


def test_a_different_configuration_is_refused(cluster, job_name):
    optimizer(net(0), cluster.url, job_name, 0)
    with pytest.raises(paramd.JobMismatch, match="different configuration"):
        pt.RemoteOptimizer(
            net(0).named_parameters(),
            server=cluster.url,
            job=job_name,
            rank=1,
            world_size=2,
            optimizer=paramd.SGD(lr=0.1),
        )


def test_a_worker_dropped_from_a_round_rejoins_at_the_current_one(cluster, job_name):
    # worker_timeout: a round that waited this long completes with the
    # workers that pushed (on a cluster, the coordinator chooses them).
    def opt(model, rank):
        return pt.RemoteOptimizer(
            model.named_parameters(),
            server=cluster.url,
            job=job_name,
            rank=rank,
            world_size=2,
            optimizer=paramd.SGD(lr=0.1),
            worker_timeout=0.5,
            timeout=30,
        )

    m0, m1 = net(0), net(1)
    o0 = opt(m0, 0)
    o1 = opt(m1, 1)
    # Rank 0 alone: the round completes without rank 1 after 0.5 s.
    train(m0, o0, 1, 20)
    assert o0.round == 1 and not same_weights(m0, m1)
    # Rank 1's push for round 0 is stale: it takes the current weights and
    # joins round 1, its gradients for the old weights dropped.
    with pytest.warns(UserWarning, match="round 0 of job .* completed without this worker; rejoining at round 1"):
        train(m1, o1, 1, 21)
    assert o1.round == 1 and same_weights(m0, m1)
    in_parallel(lambda: train(m0, o0, 1, 22), lambda: train(m1, o1, 1, 23))
    assert o0.round == o1.round == 2 and same_weights(m0, m1)
