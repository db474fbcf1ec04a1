"""The golden PyTorch traces replayed through the Python client, one shard
and three: every worker pushes each step from its own thread and
connection, then pulls; the parameters after every step, the lr of every
group and the grad norm must match torch's within the golden tolerance
(shared/golden/README.md: atol 1e-6, rtol 1e-4; rtol 1e-3 for grad_norm)."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest

import paramd

safetensors = pytest.importorskip("safetensors")
from safetensors.numpy import load_file  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[3] / "tests" / "golden"
ATOL, RTOL, NORM_RTOL = 1e-6, 1e-4, 1e-3


def load_trace(path):
    with safetensors.safe_open(str(path), "np") as f:
        meta = f.metadata()
    assert meta.get("format") == "paramd-trace/1", meta.get("format")
    return json.loads(meta["config"]), load_file(str(path))


OPTIMIZERS = {"sgd": paramd.SGD, "adam": paramd.Adam, "adamw": paramd.AdamW}
# Implementation switches of torch that do not change the numbers.
IGNORED = {"kind", "params", "foreach", "fused", "capturable", "differentiable"}


def hyper(obj):
    out = {k: v for k, v in obj.items() if k not in IGNORED}
    if "betas" in out:
        out["betas"] = tuple(out["betas"])
    return out


def optimizer(opt):
    h = hyper(opt)
    kind = opt["kind"]
    # torch's Adam(decoupled_weight_decay=True) is AdamW with Adam's
    # default weight decay.
    if h.pop("decoupled_weight_decay", False):
        kind = "adamw"
        h.setdefault("weight_decay", 0.0)
    return OPTIMIZERS[kind](**h)


def schedule(cfg):
    s = cfg.get("schedule") or {"kind": "constant"}
    kind = s["kind"]
    if kind == "constant":
        return paramd.Constant()
    if kind == "warmup_cosine":
        return paramd.WarmupCosine(s["warmup_steps"], s["total_steps"], s.get("min_lr_ratio", 0.0))
    if kind == "cosine_annealing":
        return paramd.CosineAnnealing(s["t_max"], s.get("eta_min", 0.0))
    raise AssertionError("unknown schedule %r" % kind)


def close(name, got, want, rtol=RTOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, "%s: shape %s, torch %s" % (name, got.shape, want.shape)
    bad = np.abs(got - want) > ATOL + rtol * np.abs(want)
    if bad.any():
        i = int(np.argmax(bad.reshape(-1)))
        raise AssertionError(
            "%s: %d of %d values differ from torch beyond atol %g rtol %g, e.g. [%d] %r vs %r"
            % (name, bad.sum(), bad.size, ATOL, rtol, i, got.reshape(-1)[i], want.reshape(-1)[i])
        )


def traces():
    found = sorted(GOLDEN.glob("*.safetensors"))
    assert found, "no traces in %s" % GOLDEN
    return found


def replay(trace, job, make_client):
    """Replays `trace` as job `job`: every worker pushes each step from its
    own thread and `make_client()`, then pulls; checks every step against
    torch's values."""
    cfg, t = load_trace(trace)
    params, workers, steps = cfg["params"], cfg["workers"], cfg["steps"]
    opt = cfg["optimizer"]
    groups = None
    if cfg.get("param_groups"):
        groups = [dict(hyper(g), params=g["params"]) for g in cfg["param_groups"]]
    clip = paramd.ClipGradNorm(cfg["clip"]["max_norm"]) if cfg.get("clip") else None
    init = {p: t["init/" + p] for p in params}
    c = make_client()
    start = c.init(
        job,
        init,
        optimizer(opt),
        workers=workers,
        param_groups=groups,
        schedule=schedule(cfg),
        clip=clip,
    ).round
    assert start == 0

    after = [None] * steps
    outcomes = [None] * steps
    failures = []

    def worker(w):
        try:
            client = make_client()
            for s in range(steps):
                # A gradient the trace lacks is torch's `grad is None`.
                client.push(job, w, s, {p: t.get("grad/%d/%d/%s" % (s, w, p)) for p in params})
                pulled = client.pull(job, s + 1)
                if w == 0:
                    after[s] = pulled.params
                    outcomes[s] = pulled.last
            client.close()
        except BaseException as e:  # reported by the main thread
            failures.append((w, e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert not any(th.is_alive() for th in threads), "a worker did not finish within 300 s"
    assert not failures, failures

    for s in range(steps):
        assert outcomes[s].round == s
        close("lr/%d" % s, list(outcomes[s].lr), t["lr/%d" % s])
        close("grad_norm/%d" % s, outcomes[s].grad_norm, t["grad_norm/%d" % s], NORM_RTOL)
        for p in params:
            key = "expect/%d/%s" % (s, p)
            if key in t:
                close(key, after[s][p], t[key])
    for p in params:
        close("expect/final/" + p, after[-1][p], t["expect/final/" + p])
    c.close()


@pytest.mark.parametrize("trace", traces(), ids=lambda p: p.stem)
def test_trace_matches_torch(trace, cluster, job_name):
    replay(trace, job_name, lambda: cluster.client(timeout=60))
