"""`paramd.diloco.DiLoCo` against a single-process DiLoCo in torch: three
workers, each training its own copy with its own inner AdamW on its own
data, synchronized every few steps through paramd with Nesterov SGD as the
outer optimizer, end with the global weights of the simulation (three
model copies, the pseudo-gradients cast as the wire casts them, averaged
in worker order, `torch.optim.SGD(0.7, 0.9, nesterov=True)` stepping the
global weights), bit for bit; in f32 and bf16, by mean and weighted by
tokens, on 1 and 3 shards; and with a worker that stops, whose rounds
complete after the grace with the others."""

import threading

import numpy as np
import pytest

import paramd
from diloco_reference import set_outer_gradient

torch = pytest.importorskip("torch")
import paramd.diloco as dl  # noqa: E402

WORKERS, H, ROUNDS = 3, 3, 3
CASTS = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def model():
    torch.manual_seed(11)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def batch(worker, step):
    g = torch.Generator().manual_seed(1000 * worker + step)
    return torch.randn(6, 5, generator=g), torch.randn(6, 2, generator=g)


def inner_step(m, opt, worker, step):
    x, y = batch(worker, step)
    torch.nn.functional.mse_loss(m(x), y).backward()
    opt.step()
    opt.zero_grad()


def weight_of(worker, step):
    """Worker `worker`'s weight (tokens) at inner step `step`."""
    return float(1 + (worker * 7 + step) % 5)


def simulate(wire, weighted=False, members=lambda r: range(WORKERS)):
    """DiLoCo in one process, as the papers define it: round r averages the
    pseudo-gradients of `members(r)`, in worker order; weighted, each counts
    with its worker's tokens since the last synchronization, `sum(w_i *
    d_i) / sum(w_i)`."""
    glob = model()
    outer = torch.optim.SGD(glob.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    workers = [model() for _ in range(WORKERS)]
    inners = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in workers]
    step = 0
    for r in range(ROUNDS):
        ranks = list(members(r))
        for w in ranks:
            workers[w].load_state_dict(glob.state_dict())
        for k in range(H):
            for w in ranks:
                inner_step(workers[w], inners[w], w, step + k)
        weights = [sum(weight_of(w, step + k) for k in range(H)) for w in ranks] if weighted else None
        step += H
        set_outer_gradient(glob, [workers[w] for w in ranks], CASTS[wire], weights)
        outer.step()
    return glob


def run_workers(cluster, job_name, wire, merge, rounds_of=lambda rank: ROUNDS, **options):
    """Three DiLoCo workers in threads, worker `rank` leaving after
    `rounds_of(rank)` rounds; their final weights by rank, and the
    participants each saw in its last round."""
    torch.set_num_threads(1)
    finals, seen, errors = {}, {}, []
    # Made here: torch's global generator is not for threads to seed.
    models = [model() for _ in range(WORKERS)]

    def worker(rank):
        try:
            m = models[rank]
            inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
            with dl.DiLoCo(
                m,
                inner,
                server=cluster.url,
                job=job_name,
                sync_every=H,
                outer=paramd.SGD(lr=0.7, momentum=0.9, nesterov=True),
                wire=wire,
                merge=merge,
                rank=rank,
                world_size=WORKERS,
                timeout=120,
                **options,
            ) as diloco:
                for step in range(H * rounds_of(rank)):
                    inner_step(m, inner, rank, step)
                    weight = weight_of(rank, step) if merge == "weighted" else None
                    synced = diloco.step(weight)
                    assert synced == ((step + 1) % H == 0)
                assert diloco.round == rounds_of(rank) and diloco.last_pseudo_grad_norm > 0
                seen[rank] = diloco.participants
            finals[rank] = [p.detach().clone() for p in m.parameters()]
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(r,)) for r in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return finals, seen


@pytest.mark.parametrize("wire, merge", [("f32", "mean"), ("bf16", "mean"), ("bf16", "weighted")])
def test_three_workers_end_with_the_simulations_global_weights(cluster, job_name, wire, merge):
    finals, seen = run_workers(cluster, job_name, wire, merge)
    assert seen == {r: WORKERS for r in range(WORKERS)}
    want = [p.detach() for p in simulate(wire, merge == "weighted").parameters()]
    for rank in range(WORKERS):
        for got, w in zip(finals[rank], want):
            assert torch.equal(got, w), (rank, (got - w).abs().max())


def test_a_worker_that_stops_is_left_out_after_the_grace(one_shard, job_name):
    """Worker 2 stops after the first round (as if killed): every later
    round completes `grace_seconds` after its first push, with the workers
    that pushed, and equals the simulation with that participant set. The
    grace is long enough that workers 0 and 1 (a few milliseconds of work
    apart) both make it on a loaded machine."""
    finals, seen = run_workers(
        one_shard, job_name, "f32", "mean", rounds_of=lambda rank: 1 if rank == 2 else ROUNDS, grace_seconds=5.0
    )
    assert seen == {0: 2, 1: 2, 2: WORKERS}
    want = simulate("f32", members=lambda r: range(WORKERS) if r == 0 else range(2))
    for rank in (0, 1):
        for got, w in zip(finals[rank], want.parameters()):
            assert torch.equal(got, w.detach()), rank


def test_what_paramd_would_not_reproduce_is_refused(one_shard, job_name):
    m = model()
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
    common = dict(server=one_shard.url, job=job_name, sync_every=2, rank=0, world_size=1)
    with pytest.raises(paramd.InvalidArgument, match="outer must be paramd.SGD"):
        dl.DiLoCo(m, inner, outer=torch.optim.SGD(m.parameters(), lr=0.7), **common)
    with pytest.raises(paramd.InvalidArgument, match="elastic"):
        dl.DiLoCo(m, inner, outer=paramd.SGD(lr=0.7), min_workers=2, **{**common, "world_size": 3})
    with pytest.raises(paramd.InvalidArgument, match="wire must be one of"):
        dl.DiLoCo(m, inner, outer=paramd.SGD(lr=0.7), wire="fp8", **common)
    with pytest.raises(paramd.InvalidArgument, match="sync_every"):
        dl.DiLoCo(m, inner, outer=paramd.SGD(lr=0.7), **{**common, "sync_every": 0})


def test_members_join_late_and_leave_early(cluster, job_name):
    """Elastic membership: workers 0 and 1 join and train from round 0;
    worker 2 joins once round 0 is complete and takes part from round 1
    (the others start round 1 once it has joined, so it is a member before
    round 1 can close); worker 1 leaves after round 1, and round 2 does not
    wait for it. The workers' final weights are the simulation's with the
    participant sets [0, 1], [0, 1, 2], [0, 2]. The grace is long: every
    round completes because its members pushed, whatever the timing."""
    torch.set_num_threads(1)
    models = [model() for _ in range(WORKERS)]
    rounds = {0: (0, ROUNDS), 1: (0, 2), 2: (1, ROUNDS)}
    joined = [threading.Event() for _ in range(WORKERS)]
    round0_done = threading.Event()
    finals, seen, workers, errors = {}, {}, {}, []

    def worker(who):
        try:
            if who == 2:
                assert round0_done.wait(120)
            m = models[who]
            inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
            first, last = rounds[who]
            with dl.DiLoCo(
                m,
                inner,
                server=cluster.url,
                job=job_name,
                sync_every=H,
                outer=paramd.SGD(lr=0.7, momentum=0.9, nesterov=True),
                min_workers=2,
                grace_seconds=120,
                timeout=120,
            ) as diloco:
                workers[who] = diloco.worker
                assert diloco.round == first
                joined[who].set()
                for step in range(H * first, H * last):
                    if step == H and who != 2:
                        assert joined[2].wait(120)
                    inner_step(m, inner, who, step)
                    diloco.step()
                    if step == H - 1 and who == 0:
                        round0_done.set()
                assert diloco.round == last
                seen[who] = diloco.participants
            finals[who] = [p.detach().clone() for p in m.parameters()]
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            for e in joined + [round0_done]:
                e.set()

    threads = []
    for who in range(WORKERS):
        t = threading.Thread(target=worker, args=(who,))
        t.start()
        threads.append(t)
        # Joining in turn gives worker ids in that order.
        if who < 2:
            assert joined[who].wait(120) or errors, errors
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert workers == {0: 0, 1: 1, 2: 2}
    assert seen == {0: 2, 1: 3, 2: 2}
    members = [[0, 1], [0, 1, 2], [0, 2]]
    want = simulate("f32", members=lambda r: members[r])
    for who in (0, 2):
        for got, w in zip(finals[who], want.parameters()):
            assert torch.equal(got, w.detach()), who
    status = paramd.Client(cluster.url).job_status(job_name)
    assert list(status.members) == [], "every worker left"


def test_a_member_whose_membership_ended_joins_again(one_shard, job_name):
    """A worker's membership ends under it (here another client makes it
    leave, as an expired lease would): its next synchronization is refused
    as `not_member`, it joins again with a warning, loads the global
    weights of the round it is given, and goes on."""
    m = model()
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
    client = paramd.Client(one_shard.url)
    with dl.DiLoCo(
        m,
        inner,
        server=one_shard.url,
        job=job_name,
        sync_every=1,
        outer=paramd.SGD(lr=0.7, momentum=0.9, nesterov=True),
        min_workers=1,
    ) as diloco:
        inner_step(m, inner, 0, 0)
        assert diloco.step() and diloco.round == 1
        member = diloco.outer._member.current
        client.leave(job_name, member)
        with pytest.raises(paramd.NotMember, match="join again"):
            client.heartbeat(job_name, member)
        inner_step(m, inner, 0, 1)
        with pytest.warns(UserWarning, match="joined again as worker"):
            diloco.step()
        assert diloco.stale_rounds == 1 and diloco.round == 1
        inner_step(m, inner, 0, 2)
        assert diloco.step() and diloco.round == 2 and diloco.participants == 1
        assert [w.worker for w in client.job_status(job_name).members] == [diloco.worker]
    assert list(client.job_status(job_name).members) == []


def test_membership_calls_are_for_elastic_jobs(one_shard, job_name):
    client = paramd.Client(one_shard.url)
    client.init(job_name, {"w": np.zeros(2, np.float32)}, optimizer=paramd.SGD(lr=0.1), workers=2)
    with pytest.raises(paramd.FailedPrecondition, match="has fixed workers"):
        client.join(job_name)
    with pytest.raises(paramd.InvalidArgument, match="lease_seconds is for an elastic job"):
        paramd.config.job_spec([("w", (2,))], paramd.SGD(lr=0.1), 2, lease_seconds=3.0)
    with pytest.raises(paramd.InvalidArgument, match="min_workers must be between 1 and workers"):
        paramd.config.job_spec([("w", (2,))], paramd.SGD(lr=0.1), 2, min_workers=3)
