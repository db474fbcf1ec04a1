"""The DiLoCo example (examples/diloco.py) end to end: its three workers
(one joining late, one leaving early, elastic membership, bf16 pushes) run
as a real process against a real daemon, and end with the global weights
of a one-process simulation of DiLoCo with the participants each round
had: a model copy per worker with its own inner AdamW on the same data,
pseudo-gradients cast to bf16 and back, averaged in worker-id order,
`torch.optim.SGD(0.7, 0.9, nesterov=True)` stepping the global weights."""

import json
import subprocess
import sys

import pytest

from conftest import EXAMPLES, load_example
from diloco_reference import set_outer_gradient

torch = pytest.importorskip("torch")

ROUNDS, H, JOIN_AT, LEAVE_AFTER = 6, 5, 2, 4


def example():
    return load_example("diloco")


def simulate(ex, records):
    """Round r averages the pseudo-gradients of the workers whose records
    hold r, in worker-id order; a worker trains from the global weights of
    each round it takes part in, its inner AdamW going on across them."""
    torch.set_num_threads(1)
    glob = ex.build_model()
    outer = torch.optim.SGD(glob.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    copies = {who: ex.build_model() for who in records}
    inners = {who: torch.optim.AdamW(copies[who].parameters(), lr=4e-3) for who in records}
    for r in range(ROUNDS):
        members = sorted((w for w in records if r in records[w]["rounds"]), key=lambda w: records[w]["worker"])
        assert len(members) >= 2, "min_workers is 2: round %d had %s" % (r, members)
        for w in members:
            copies[w].load_state_dict(glob.state_dict())
        for k in range(H):
            for w in members:
                ex.inner_step(copies[w], inners[w], w, r * H + k)
        set_outer_gradient(glob, [copies[w] for w in members], torch.bfloat16)
        outer.step()
    return glob


def test_the_examples_workers_end_with_the_simulations_global_weights(cluster, job_name, tmp_path):
    cmd = [sys.executable, str(EXAMPLES / "diloco.py"), "--server", cluster.url, "--job", job_name]
    cmd += ["--rounds", str(ROUNDS), "--join-at", str(JOIN_AT), "--leave-after", str(LEAVE_AFTER)]
    cmd += ["--sync-every", str(H), "--out", str(tmp_path)]
    run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert run.returncode == 0, run.stdout
    records = {who: json.loads((tmp_path / ("worker%d.json" % who)).read_text()) for who in range(3)}
    # Worker 1 left early, worker 2 joined late, each taking part in every
    # round from the one it joined at (no push was stale).
    assert records[0]["rounds"] == list(range(ROUNDS)), records
    assert records[1]["rounds"] == list(range(LEAVE_AFTER)), records
    late = records[2]["rounds"]
    assert late and late[0] >= JOIN_AT and late == list(range(late[0], ROUNDS)), records
    want = simulate(example(), records)
    for who in (0, 2):
        got = torch.load(tmp_path / ("worker%d.pt" % who))
        for name, w in want.state_dict().items():
            torch.testing.assert_close(
                got[name], w, rtol=1e-5, atol=1e-7, msg=lambda m: "%d %s: %s\n%s" % (who, name, m, run.stdout)
            )
