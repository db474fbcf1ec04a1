"""paramd as the outer optimizer of DiLoCo-style training.

Each worker trains its own copy of the model with its own inner optimizer
(AdamW in the papers) for `sync_every` steps, then pushes its
pseudo-gradient, the global weights it started from minus its weights now;
paramd averages the workers' pseudo-gradients (in worker order, as every
paramd round) and applies the outer optimizer to the global weights
(`paramd.SGD(lr=0.7, momentum=0.9, nesterov=True)` in the papers); every
worker then continues from the new global weights::

    inner = torch.optim.AdamW(model.parameters(), lr=4e-4)
    with paramd.diloco.DiLoCo(model, inner, server=url, job="run1", sync_every=500,
                              outer=paramd.SGD(lr=0.7, momentum=0.9, nesterov=True),
                              wire="bf16") as diloco:
        for batch in data:
            loss = model(batch).mean(); loss.backward(); inner.step(); inner.zero_grad()
            diloco.step()

The result is what `torch.optim.SGD(...)` stepping the global weights with
`.grad = mean_i(cast(delta_i))` gives, where `cast` is the wire dtype's
round-to-nearest-even cast and back (exact for f32). The inner optimizer's
state stays in each worker, untouched by a sync, as in OpenDiLoCo.

Membership is elastic when `min_workers` is given: each worker joins the
job (the first to arrive creates it from its weights), receives its worker
id and the round to start from, renews its lease from a background thread,
and leaves when the `with` block ends. A round completes when every member
pushed and at least `min_workers` did, or `grace_seconds` after the
`min_workers`-th push with those that pushed; a member that leaves, or
whose lease (`lease_seconds`) runs out, is not waited for. A worker whose
push comes after its round completed is told its push is stale and
continues from the new global weights; one whose lease ran out joins
again. At most `max_workers` (64) are members at once.

Without `min_workers`, the members are the job's fixed `world_size`
workers (ranks from torchrun or given): a round completes when every worker
pushed, or `grace_seconds` after its first push with those that pushed.
"""

import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import errors
from .config import Optimizer
from .options import JobOptions
from .torch import RemoteOptimizer, _named


class DiLoCo:
    """Synchronizes `model`, trained locally by `inner`, through job `job`
    every `sync_every` calls of `step()`. The first worker (rank 0) creates
    the job from its weights; every worker starts from the job's current
    global weights. `outer` is paramd.SGD, Adam or AdamW. `wire` is the
    dtype pseudo-gradients are pushed in, `pull_wire` the dtype the global
    weights are pulled in ("f32", "bf16" or "f16"). `merge` "weighted"
    averages the pseudo-gradients weighted by the weights `step()` is given
    (tokens or samples). `min_workers` makes membership elastic (see the
    module), with `max_workers` and `lease_seconds`. The other keywords are
    `paramd.JobOptions` (server, rank, world_size, client, token, tls,
    timeout, join_timeout)."""

    def __init__(
        self,
        model: torch.nn.Module,
        inner: torch.optim.Optimizer,
        *,
        sync_every: int,
        outer: Optimizer,
        wire: str = "f32",
        pull_wire: str = "f32",
        merge: str = "mean",
        min_workers: Optional[int] = None,
        grace_seconds: Optional[float] = None,
        max_workers: int = 64,
        lease_seconds: Optional[float] = None,
        options: Optional[JobOptions] = None,
        **keywords: Any,
    ):
        if not isinstance(sync_every, int) or sync_every < 1:
            raise errors.InvalidArgument("sync_every must be a whole number of steps >= 1, got %r" % (sync_every,))
        if isinstance(outer, torch.optim.Optimizer) or not isinstance(outer, Optimizer):
            raise errors.InvalidArgument(
                "outer must be paramd.SGD, paramd.Adam or paramd.AdamW (the server runs it), got %r" % (outer,)
            )
        if not isinstance(inner, torch.optim.Optimizer):
            raise errors.InvalidArgument("inner must be a torch.optim optimizer, got %r" % (inner,))
        for key in (
            "schedule",
            "clip",
            "overlap",
            "backup_workers",
            "worker_timeout",
            "wire",
            "pull_wire",
            "merge",
            "min_workers",
            "max_workers",
            "lease_seconds",
        ):
            if key in keywords:
                raise TypeError("DiLoCo() got an unexpected keyword argument %r" % key)
        o = JobOptions.of(options, keywords, "DiLoCo")
        held = {id(p) for g in inner.param_groups for p in g["params"]}
        named = [(n, p) for n, p in _named(model.named_parameters(), "model.named_parameters()") if id(p) in held]
        if len(named) != len(held):
            raise errors.InvalidArgument("the inner optimizer holds tensors that are not parameters of the model")
        elastic = {}
        if min_workers is not None:
            elastic = {"min_workers": min_workers, "max_workers": max_workers, "lease_seconds": lease_seconds}
        elif lease_seconds is not None:
            raise errors.InvalidArgument("lease_seconds is for elastic membership (give min_workers)")
        self._o = JobOptions.of(
            o,
            dict(wire=wire, pull_wire=pull_wire, worker_timeout=grace_seconds, merge=merge, **elastic),
            "DiLoCo",
        )
        self.outer = RemoteOptimizer(named, optimizer=outer, options=self._o)
        self.inner = inner
        self.sync_every = sync_every
        self._params: List[Tuple[str, torch.Tensor]] = named
        # The global weights this worker's round started from: set by the
        # job's current parameters, which the setup pulled into the model.
        self._global = self._snapshot()
        self._calls = 0
        self._merge = merge
        # The weight gathered since the last synchronization.
        self._weight = 0.0
        self.last_pseudo_grad_norm: Optional[float] = None
        self.stale_rounds = 0

    def _snapshot(self) -> Dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in self._params}

    @property
    def round(self) -> int:
        """The outer round this worker trains for."""
        return self.outer.round

    @property
    def worker(self) -> int:
        """This worker's id in the job (the server's, in an elastic job)."""
        return self.outer.rank

    @property
    def participants(self) -> Optional[int]:
        """How many workers the last outer round averaged."""
        last = self.outer.last
        return int(last.participants) if last is not None else None

    def step(self, weight: Optional[float] = None) -> bool:
        """Counts one inner step; every `sync_every` calls, synchronizes
        (`sync`). With merge="weighted", `weight` is this step's weight
        (its tokens or samples; 1 by default): a worker's pseudo-gradient
        counts with the sum of its steps' weights since the last
        synchronization. Returns whether it synchronized."""
        if weight is not None and self._merge != "weighted":
            raise errors.InvalidArgument("step(weight=%r): the job merges by mean (pass merge='weighted')" % weight)
        w = 1.0 if weight is None else float(weight)
        if not (w > 0 and math.isfinite(w)):
            raise errors.InvalidArgument("step(weight=%r): a weight must be > 0 and finite" % weight)
        self._weight += w
        self._calls += 1
        if self._calls % self.sync_every:
            return False
        self.sync()
        return True

    def sync(self) -> None:
        """Pushes this worker's pseudo-gradient (the global weights it
        started from minus its weights now), waits for the outer round and
        loads the new global weights into the model. If the round completed
        without this worker, it loads the current global weights instead."""
        deltas: Dict[str, Optional[np.ndarray]] = {}
        total = 0.0
        for n, p in self._params:
            d = (self._global[n] - p.detach().to("cpu", torch.float32)).contiguous()
            total += float(torch.sum(d.double() * d.double()))
            deltas[n] = d.numpy()
        self.last_pseudo_grad_norm = math.sqrt(total)
        weight = (self._weight or 1.0) if self._merge == "weighted" else None
        self._weight = 0.0
        if not self.outer._exchange(deltas, weight):
            self.stale_rounds += 1
        self._global = self._snapshot()

    def close(self) -> None:
        """Leaves the job. In an elastic job the rounds stop waiting for this
        worker at once; a job of fixed workers has nothing to tell, so the
        other workers' rounds wait for it up to grace_seconds."""
        self.outer.leave()

    def __enter__(self) -> "DiLoCo":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return "paramd.diloco.DiLoCo(job=%r, worker=%d/%d, sync_every=%d, round=%d)" % (
            self.outer.job,
            self.outer.rank,
            self.outer.world_size,
            self.sync_every,
            self.round,
        )
