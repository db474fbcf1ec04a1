"""PyTorch integration: an optimizer a training loop uses like `torch.optim`,
whose step runs on a paramd server.

    opt = paramd.torch.RemoteOptimizer(
        model.named_parameters(), server="http://ps:50051", job="bert-ft",
        rank=rank, world_size=world, optimizer=paramd.AdamW(lr=1e-4, weight_decay=0.01),
        schedule=paramd.WarmupCosine(warmup_steps=1000, total_steps=10000),
        clip=paramd.ClipGradNorm(max_norm=1.0))
    loss.backward(); opt.step(); opt.zero_grad()

or, keeping a script's own optimizer line (param groups included):

    opt = paramd.torch.DistributedOptimizer(
        torch.optim.AdamW([{"params": backbone, "lr": 1e-5}, {"params": head}], lr=1e-3),
        named_parameters=model.named_parameters(), server="http://ps:50051", job="bert-ft",
        schedule=paramd.WarmupCosine(1000, 10000), clip=paramd.ClipGradNorm(1.0))

`step()` pushes this rank's gradients for the current round, waits until
the round is complete on the server and copies the new parameters into the
model in place. With `overlap=True` each gradient is pushed as soon as
backward has accumulated it, so the network works while backward computes
the rest (as DDP's bucketed all-reduce does) and `step()` only completes
the push: then every backward must be followed by `step()` (no gradient
accumulation over several backward passes), and gradients must not be
changed between backward and `step()` (the server clips; no clipping of
your own). Rank 0 uploads the initial weights; the other ranks wait
for the job and pull them; a worker that restarts joins the current round.
"""

import os
import time
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from . import errors
from ._membership import Member
from ._state_dict import StateDict
from .client import Client
from .config import SGD, Adam, AdamW, Optimizer, job_spec
from .layout import check_wire
from .options import JobOptions

__all__ = ["RemoteOptimizer", "DistributedOptimizer", "JobOptions", "translate"]

# Keys of a torch param group that only choose an implementation; they do
# not change the numbers paramd reproduces.
_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def _rank_and_world(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    """Explicit values, else torch.distributed's, else torchrun's RANK and
    WORLD_SIZE, else a single worker."""
    dist = torch.distributed
    if rank is None:
        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank()
        else:
            rank = int(os.environ.get("RANK", "0"))
    if world_size is None:
        if dist.is_available() and dist.is_initialized():
            world_size = dist.get_world_size()
        else:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
    for name, v in (("rank", rank), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise errors.InvalidArgument("%s must be an integer, got %r" % (name, v))
    if world_size < 1 or not 0 <= rank < world_size:
        raise errors.InvalidArgument("rank must be in [0, world_size): got rank %d, world_size %d" % (rank, world_size))
    return rank, world_size


def _scalar(field: str, v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise errors.InvalidArgument("%s must be a scalar, got a tensor of shape %s" % (field, tuple(v.shape)))
        return v.item()
    if isinstance(v, (tuple, list)):
        return tuple(_scalar("%s[%d]" % (field, i), x) for i, x in enumerate(v))
    return v


def translate(optimizer: "torch.optim.Optimizer") -> Tuple[Optimizer, List[Tuple[List[torch.Tensor], Dict[str, Any]]]]:
    """The paramd optimizer and param groups equivalent to a torch optimizer:
    `torch.optim.SGD`, `Adam` or `AdamW`, every hyperparameter and group
    carried over (`maximize` included). Anything paramd would not
    reproduce exactly (another class, an attached LR scheduler, existing
    state) is refused with `paramd.InvalidArgument` rather than changed."""
    cls = type(optimizer)
    where = "%s.%s" % (cls.__module__, cls.__qualname__)
    defaults = dict(getattr(optimizer, "defaults", {}))
    kind: type
    if cls is torch.optim.SGD:
        kind = SGD
    elif cls is torch.optim.AdamW:
        kind = AdamW
    elif cls is torch.optim.Adam:
        kind = AdamW if defaults.get("decoupled_weight_decay") else Adam
    else:
        raise errors.InvalidArgument(
            "%s cannot run on paramd: only torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW "
            "are translated (use paramd.torch.RemoteOptimizer with paramd.SGD/Adam/AdamW otherwise)" % where
        )
    if len(optimizer.state) > 0:
        raise errors.InvalidArgument(
            "%s has optimizer state already (it has stepped): paramd keeps the optimizer state on the "
            "server and would start it afresh; wrap the optimizer before its first step" % where
        )

    def hyper(group: Mapping[str, Any], field: str) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for key, value in group.items():
            if key in ("params", "param_names") or key in _IMPLEMENTATION:
                continue
            if key in kind.options:
                out[key] = _scalar("%s.%s" % (field, key), value)
            elif key == "decoupled_weight_decay":
                if bool(value) != (kind is AdamW):
                    raise errors.InvalidArgument(
                        "%s.decoupled_weight_decay=%r differs from the optimizer's" % (field, value)
                    )
            elif key == "initial_lr":
                raise errors.InvalidArgument(
                    "%s has initial_lr: a torch LR scheduler is attached to the optimizer, and it would "
                    "not be applied; pass schedule=paramd.WarmupCosine(...) (or Constant, CosineAnnealing) "
                    "instead: the server runs the schedule" % field
                )
            else:
                raise errors.InvalidArgument("%s.%s=%r is not supported by paramd" % (field, key, value))
        return out

    base = kind(**hyper(defaults, "%s defaults" % where))
    groups = []
    for i, g in enumerate(optimizer.param_groups):
        field = "%s param_groups[%d]" % (where, i)
        groups.append((list(g["params"]), kind.validate(hyper(g, field), field)))
    return base, groups


class _Remote(StateDict):
    """What RemoteOptimizer and DistributedOptimizer share: the job, the
    round, pushing, pulling and copying into the model."""

    def _setup(
        self,
        named: Sequence[Tuple[str, torch.Tensor]],
        optimizer: Optimizer,
        groups: Optional[List[Dict[str, Any]]],
        o: JobOptions,
    ) -> None:
        job, client = o.job, o.client
        if not isinstance(job, str) or not job:
            raise errors.InvalidArgument("job must be a non-empty string, got %r" % (job,))
        if client is None:
            if not o.server:
                raise errors.InvalidArgument("server is required (e.g. 'http://ps:50051'), or pass client=")
            client = Client(o.server, token=o.token, tls=o.tls, timeout=o.timeout)
        self.client = client
        self.job = job
        self._wire, self._pull_wire = check_wire(o.wire), check_wire(o.pull_wire)
        if o.overlap and self._wire != "f32":
            raise errors.InvalidArgument(
                "overlap=True pushes float32 (wire=%r is sent whole at step(); use overlap=False)" % o.wire
            )
        self._schedule = o.schedule
        self._base = optimizer
        elastic = o.min_workers is not None
        if elastic:
            if o.rank is not None or o.world_size is not None:
                raise errors.InvalidArgument(
                    "rank=%r, world_size=%r: an elastic job (min_workers=%r) numbers its members itself; "
                    "give max_workers for the most members at once" % (o.rank, o.world_size, o.min_workers)
                )
            if o.overlap:
                raise errors.InvalidArgument("overlap=True is for a job of fixed workers, not an elastic one")
            self.rank, self.world_size = 0, o.max_workers
        else:
            self.rank, self.world_size = _rank_and_world(o.rank, o.world_size)
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        for n, p in named:
            if not isinstance(p, torch.Tensor):
                raise errors.InvalidArgument("parameter %r is not a tensor: %r" % (n, type(p)))
            if p.dtype != torch.float32:
                raise errors.InvalidArgument("parameter %r is %s: paramd trains float32 parameters" % (n, p.dtype))
        spec = job_spec(
            [(n, tuple(p.shape)) for n, p in named],
            optimizer,
            self.world_size,
            param_groups=groups,
            schedule=o.schedule,
            clip=o.clip,
            non_finite=o.non_finite,
            worker_timeout=o.worker_timeout,
            backup_workers=o.backup_workers,
            merge=o.merge,
            min_workers=o.min_workers,
            lease_seconds=o.lease_seconds,
        )
        self.last = None
        self._loading = None  # see StateDict
        self._member: Optional[Member] = None
        if elastic:
            # The first worker to arrive creates the job from its weights
            # (two arriving at once both send them; one creates the job);
            # the others' Init only checks it matches. Every worker then
            # joins and starts from the round the server gives it.
            try:
                client.status(job)
                client.init(job, [(n, tuple(p.shape)) for n, p in named], spec=spec)
            except errors.NotFound:
                client.init(job, {n: p.detach().to("cpu").numpy() for n, p in named}, spec=spec)
            self._member = Member(client, job)
            self.rank, r = self._member.current.worker, self._member.current
        elif self.rank == 0:
            values = {n: p.detach().to("cpu").numpy() for n, p in named}
            r = client.init(job, values, spec=spec)
        else:
            self._wait_for_job(o.timeout if o.join_timeout is None else o.join_timeout)
            r = client.init(job, [(n, tuple(p.shape)) for n, p in named], spec=spec)
        self.round = r.round
        # Host buffers for parameters not in CPU float32 contiguous memory,
        # reused every step: pinned (page-locked) when CUDA is available, so
        # a device copy is one DMA pass and no page is faulted in per step.
        self._pull_host: Dict[str, torch.Tensor] = {}
        self._grad_host: Dict[str, torch.Tensor] = {}
        try:
            self._sync(self.round)
        except BaseException:
            self.leave()
            raise
        # With overlap, each gradient is pushed as soon as backward has
        # accumulated it (the push is open from the first), so the network
        # works while backward computes the rest, as DDP's bucketed
        # all-reduce does.
        self._overlap = bool(o.overlap)
        self._stream: Any = None
        self._sent: set = set()
        if self._overlap:
            for n, p in zip(self._names, self._params):
                p.register_post_accumulate_grad_hook(self._on_grad(n))

    def _on_grad(self, name: str) -> Callable[[torch.Tensor], None]:
        def on_grad(p: torch.Tensor) -> None:
            if name in self._sent:
                raise errors.InvalidArgument(
                    "parameter %r got a second gradient before step(): with overlap=True every "
                    "backward is followed by step() (accumulating gradients over several backward "
                    "passes needs overlap=False)" % name
                )
            if self._stream is None:
                self._stream = self.client.push_stream(self.job, self.rank, self.round)
            self._stream.send(name, self._grad_array(name, p))
            self._sent.add(name)

        return on_grad

    def _wait_for_job(self, limit: float) -> None:
        """Waits (bounded) until rank 0 has created the job."""
        deadline = time.monotonic() + limit
        delay = 0.05
        while True:
            try:
                self.client.status(self.job)
                return
            except errors.NotFound:
                if time.monotonic() + delay > deadline:
                    raise errors.DeadlineExceeded(
                        "rank %d: job %r was not created by rank 0 within %.0f s" % (self.rank, self.job, limit)
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _sync(self, round: int) -> None:
        """Pulls the parameters once `round` rounds are complete, written
        straight into the model's memory (CPU float32 contiguous
        parameters; any other is pulled into a buffer, then copied in)."""
        out: Dict[str, np.ndarray] = {}
        staged: List[Tuple[torch.Tensor, torch.Tensor]] = []
        for n, p in zip(self._names, self._params):
            if p.device.type == "cpu" and p.is_contiguous():
                out[n] = p.detach().numpy()
            else:
                buf = _host_buffer(self._pull_host, n, p)
                staged.append((p, buf))
                out[n] = buf.numpy()
        _, last = self.client.pull_into(self.job, round, out, self._pull_wire)
        if staged:
            with torch.no_grad():
                for p, buf in staged:
                    p.copy_(buf)
        if last is not None:
            self.last = last

    def _grads(self) -> Dict[str, Optional[np.ndarray]]:
        return {n: self._grad_array(n, p) for n, p in zip(self._names, self._params)}

    def _grad_array(self, n: str, p: torch.Tensor) -> Optional[np.ndarray]:
        """The gradient to push, or None for none (`grad is None`): the
        server then skips the parameter as torch.optim does, unless another
        worker has a gradient for it."""
        g = p.grad
        if g is None:
            return None
        if g.is_sparse:
            raise errors.InvalidArgument("parameter %r has a sparse gradient: not supported by paramd" % n)
        # A CPU float32 gradient is read where it is. A CUDA one is copied
        # (and converted, if it is not float32) into this parameter's pinned
        # host buffer in one pass; a CPU one of another dtype or layout is
        # converted once.
        if g.is_cuda:
            host = _host_buffer(self._grad_host, n, g)
            host.copy_(g.detach())
            return host.numpy()
        return g.detach().to(torch.float32).contiguous().numpy()

    def _push(self, grads: Optional[Dict[str, Optional[np.ndarray]]] = None, weight: Optional[float] = None) -> None:
        """Pushes this rank's gradients for the current round (`grads`, or
        the parameters'), with `weight` in a weighted job: the open push
        (overlap) completed with what backward did not give it, or all of
        them at once."""
        if grads is not None or not self._overlap:
            given = self._grads() if grads is None else grads
            lease = self._member.current.lease if self._member is not None else 0
            self.client.push(self.job, self.rank, self.round, given, self._wire, weight, lease)
            return
        stream, self._stream = self._stream, None
        sent, self._sent = self._sent, set()
        if stream is None:
            stream = self.client.push_stream(self.job, self.rank, self.round)
        for n, p in zip(self._names, self._params):
            if n not in sent:
                stream.send(n, self._grad_array(n, p))
        stream.finish()

    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Pushes this rank's gradients for the current round, waits for the
        round and copies the new parameters into the model. Returns the
        closure's loss, as torch.optim does."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._exchange(None)
        return loss

    def _exchange(self, grads: Optional[Dict[str, Optional[np.ndarray]]], weight: Optional[float] = None) -> bool:
        """Pushes `grads` (the parameters' gradients when None), with
        `weight` in a weighted job, for the current round, waits for it and
        copies the new parameters into the model. False if the round
        completed without this worker (its push was stale): the model then
        holds the current parameters."""
        if self._member is not None and self._member.lost:
            self._rejoin("its lease ran out")
            return False
        try:
            self._push(grads, weight)
        except errors.NotMember:
            self._rejoin("its membership had ended")
            return False
        except errors.StalePush:
            # The round completed without this worker (dropped after the
            # job's worker_timeout): take the current parameters and join
            # the next round; these gradients were for stale parameters.
            # The round is closed, though perhaps not applied yet: the
            # next one to push for is after it.
            current = max(self.client.job_status(self.job).round, self.round + 1)
            warnings.warn(
                "rank %d: round %d of job %r completed without this worker; rejoining at round %d"
                % (self.rank, self.round, self.job, current),
                stacklevel=2,
            )
            self.round = current
            self._sync(current)
            self._check_loaded()
            return False
        self.round += 1
        self._sync(self.round)
        self._check_loaded()
        return True

    def _rejoin(self, why: str) -> None:
        """Joins an elastic job again after the membership ended, and takes
        the parameters of the round the server gives."""
        assert self._member is not None
        old = self.rank
        member = self._member.rejoin()
        warnings.warn(
            "worker %d of job %r: %s; joined again as worker %d at round %d"
            % (old, self.job, why, member.worker, member.round),
            stacklevel=3,
        )
        self.rank, self.round = member.worker, member.round
        self._sync(self.round)
        self._check_loaded()

    def leave(self) -> None:
        """Leaves an elastic job: rounds no longer wait for this worker (a
        push it made for the open round still counts). Nothing to do in a
        job of fixed workers."""
        if self._member is not None:
            self._member.leave()
            self._member = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clears the gradients of the job's parameters, as torch.optim does."""
        for p in self._params:
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                p.grad.detach_()
                p.grad.zero_()

    # -- for logging -----------------------------------------------------------

    @property
    def lrs(self) -> List[float]:
        """The lr each param group used in the last step (empty before it)."""
        return list(self.last.lr) if self.last is not None else []

    @property
    def lr(self) -> Optional[float]:
        """The lr the first param group used in the last step."""
        lrs = self.lrs
        return lrs[0] if lrs else None

    @property
    def last_grad_norm(self) -> Optional[float]:
        """The global L2 norm of the last round's mean gradient, before clipping."""
        return float(self.last.grad_norm) if self.last is not None else None

    @property
    def clip_coefficient(self) -> Optional[float]:
        return float(self.last.clip_coefficient) if self.last is not None else None

    @property
    def optimizer_step(self) -> int:
        """Optimizer steps applied so far (rounds skipped for a non-finite
        norm do not count)."""
        return int(self.last.step) if self.last is not None else 0

    @property
    def last_skipped(self) -> bool:
        """Whether the last round was skipped (non-finite gradient norm)."""
        return bool(self.last.skipped) if self.last is not None else False


def _host_buffer(cache: Dict[str, torch.Tensor], name: str, like: torch.Tensor) -> torch.Tensor:
    """The reused float32 host buffer of `like`'s shape for `name`, made on
    first use: pinned when CUDA is available (a device copy to or from it is
    one DMA pass), ordinary memory otherwise."""
    buf = cache.get(name)
    if buf is None or buf.shape != like.shape:
        pin = torch.cuda.is_available()
        buf = torch.empty(tuple(like.shape), dtype=torch.float32, pin_memory=pin)
        cache[name] = buf
    return buf


def _named(named_parameters: Iterable[Tuple[str, torch.Tensor]], what: str) -> List[Tuple[str, torch.Tensor]]:
    if named_parameters is None:
        raise errors.InvalidArgument("%s is required: model.named_parameters()" % what)
    named = list(named_parameters)
    for item in named:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise errors.InvalidArgument(
                "%s must yield (name, parameter) pairs like model.named_parameters(), got %r" % (what, item)
            )
    if not named:
        raise errors.InvalidArgument("%s is empty: the job needs at least one parameter" % what)
    return named


class RemoteOptimizer(_Remote):
    """An optimizer whose step runs on paramd, configured like torch.optim.

    `optimizer` is paramd.SGD, Adam or AdamW. `param_groups` are dicts like
    torch's, whose "params" are names or the parameters themselves; every
    parameter must be in one group. The server, the job, the rank and the
    rest are `paramd.JobOptions`, given as keywords or as `options=`.
    """

    def __init__(
        self,
        named_parameters: Iterable[Tuple[str, torch.Tensor]],
        *,
        optimizer: Optional[Optimizer] = None,
        param_groups: Optional[Sequence[Mapping[str, Any]]] = None,
        options: Optional[JobOptions] = None,
        **keywords: Any,
    ):
        o = JobOptions.of(options, keywords, "RemoteOptimizer")
        named = _named(named_parameters, "named_parameters")
        if optimizer is None:
            raise errors.InvalidArgument("optimizer is required: paramd.SGD, paramd.Adam or paramd.AdamW")
        if isinstance(optimizer, torch.optim.Optimizer):
            raise errors.InvalidArgument(
                "optimizer is a torch optimizer (%s): pass paramd.SGD/Adam/AdamW here, or wrap it with "
                "paramd.torch.DistributedOptimizer" % type(optimizer).__name__
            )
        if not isinstance(optimizer, Optimizer):
            raise errors.InvalidArgument(
                "optimizer must be paramd.SGD, paramd.Adam or paramd.AdamW, got %r" % (optimizer,)
            )
        by_id = {id(p): n for n, p in named}
        groups = None
        if param_groups is not None:
            groups = []
            for i, g in enumerate(param_groups):
                if not isinstance(g, Mapping) or "params" not in g:
                    raise errors.InvalidArgument("param_groups[%d] must be a dict with 'params', got %r" % (i, g))
                names = []
                for p in g["params"]:
                    if isinstance(p, str):
                        names.append(p)
                    elif id(p) in by_id:
                        names.append(by_id[id(p)])
                    else:
                        raise errors.InvalidArgument(
                            "param_groups[%d] holds a tensor that is not in named_parameters" % i
                        )
                groups.append(dict(g, params=names))
        self.optimizer = optimizer
        self.param_groups = groups or [{"params": [n for n, _ in named]}]
        self._setup(named, optimizer, groups, o)

    def _torch_groups(self, step: Optional[int] = None) -> List[Tuple[Dict[str, Any], List[str]]]:
        out = []
        for g in self.param_groups:
            hyper = dict(self.optimizer.hyper)
            hyper.update({k: v for k, v in g.items() if k != "params"})
            hyper["lr"] = self._next_lr(hyper["lr"], step)
            out.append((hyper, list(g["params"])))
        return out

    def __repr__(self) -> str:
        return "paramd.torch.RemoteOptimizer(job=%r, rank=%d/%d, %r, round=%d)" % (
            self.job,
            self.rank,
            self.world_size,
            self.optimizer,
            self.round,
        )


class DistributedOptimizer(_Remote):
    """Wraps a torch optimizer (SGD, Adam or AdamW) so that its step runs on
    paramd, with its hyperparameters and param groups, as Horovod's and
    BytePS's DistributedOptimizer wrap one. The wrapped optimizer's own
    step is never called. Parameters of `named_parameters` the optimizer
    does not hold stay as they are (frozen), as they would with torch.
    The hyperparameters are read once, here: the server holds them (and
    the schedule) from then on, so changing the wrapped optimizer's groups
    later has no effect. The server, the job, the rank and the rest are
    `paramd.JobOptions`, given as keywords or as `options=`.
    """

    def __init__(
        self,
        optimizer: "torch.optim.Optimizer",
        named_parameters: Iterable[Tuple[str, torch.Tensor]] = None,  # type: ignore[assignment]
        *,
        options: Optional[JobOptions] = None,
        **keywords: Any,
    ):
        o = JobOptions.of(options, keywords, "DistributedOptimizer")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise errors.InvalidArgument(
                "optimizer must be a torch.optim optimizer, got %r (for paramd.SGD/Adam/AdamW use "
                "paramd.torch.RemoteOptimizer)" % (optimizer,)
            )
        named = _named(named_parameters, "named_parameters")
        base, torch_groups = translate(optimizer)
        by_id = {id(p): n for n, p in named}
        held = set()
        groups = []
        for i, (params, hyper) in enumerate(torch_groups):
            names = []
            for p in params:
                if id(p) not in by_id:
                    raise errors.InvalidArgument(
                        "param_groups[%d] of the optimizer holds a tensor of shape %s that is not in "
                        "named_parameters" % (i, tuple(p.shape))
                    )
                names.append(by_id[id(p)])
                held.add(id(p))
            groups.append(dict(hyper, params=names))
        # The job holds what the optimizer trains, in the model's order.
        job_params = [(n, p) for n, p in named if id(p) in held]
        self._by_id = by_id
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self._setup(job_params, base, groups, o)

    def _torch_groups(self, step: Optional[int] = None) -> List[Tuple[Dict[str, Any], List[str]]]:
        out = []
        for g in self.optimizer.param_groups:
            group = {k: v for k, v in g.items() if k != "params"}
            group["lr"] = self._next_lr(float(g["lr"]), step)
            out.append((group, [self._by_id[id(p)] for p in g["params"]]))
        return out

    def __repr__(self) -> str:
        return "paramd.torch.DistributedOptimizer(%s, job=%r, rank=%d/%d, round=%d)" % (
            type(self.optimizer).__name__,
            self.job,
            self.rank,
            self.world_size,
            self.round,
        )
