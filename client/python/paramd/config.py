"""A job's configuration: optimizers, schedules and clipping, named as torch
names them, validated as torch validates them, and their wire form.

    paramd.AdamW(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False)
    paramd.Adam(...), paramd.SGD(lr, momentum, dampening, weight_decay, nesterov)
    paramd.WarmupCosine(warmup_steps, total_steps, min_lr_ratio=0.0)
    paramd.CosineAnnealing(t_max, eta_min=0.0), paramd.Constant()
    paramd.ClipGradNorm(max_norm)

Errors are `paramd.InvalidArgument` (a `ValueError`) naming the field and
the value.
"""

import math
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

from .errors import InvalidArgument
from .v1 import paramd_pb2 as pb

__all__ = [
    "Optimizer",
    "SGD",
    "Adam",
    "AdamW",
    "Schedule",
    "Constant",
    "WarmupCosine",
    "CosineAnnealing",
    "ClipGradNorm",
    "job_spec",
]


def _number(field: str, value: Any) -> float:
    # A 0-dim tensor or numpy scalar is accepted, as torch accepts a tensor lr.
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument("%s must be a number, got %r" % (field, value)) from None
    if math.isnan(v) or math.isinf(v):
        raise InvalidArgument("%s must be finite, got %r" % (field, v))
    return v


def _non_negative(field: str, value: Any) -> float:
    v = _number(field, value)
    if v < 0:
        raise InvalidArgument("%s must be >= 0, got %r" % (field, v))
    return v


def _flag(field: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument("%s must be True or False, got %r" % (field, value))
    return value


def _steps(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument("%s must be an integer >= 0, got %r" % (field, value))
    return value


class Optimizer:
    """An optimizer paramd runs: its kind and hyperparameters (torch's names)."""

    kind: str = ""
    torch_name: str = ""
    #: Hyperparameters a param group may override.
    options: Tuple[str, ...] = ()
    _pb_kind: int = 0

    def __init__(self, **hyper: Any):
        self.hyper = self.validate(hyper, self.torch_name)

    @classmethod
    def validate(cls, hyper: Mapping[str, Any], where: str) -> Dict[str, Any]:
        """Checks hyperparameters (a full set or a group's overrides) as
        torch checks them; returns them normalised."""
        out: Dict[str, Any] = {}
        for key, value in hyper.items():
            if key not in cls.options:
                raise InvalidArgument(
                    "%s: %s is not an option of %s (options: %s)" % (where, key, cls.torch_name, ", ".join(cls.options))
                )
            out[key] = cls._check(key, value, "%s.%s" % (where, key))
        return out

    @classmethod
    def _check(cls, key: str, value: Any, field: str) -> Any:
        raise NotImplementedError

    def merged(self, overrides: Mapping[str, Any]) -> Dict[str, Any]:
        """The hyperparameters of a group with `overrides`."""
        h = dict(self.hyper)
        h.update(overrides)
        return h

    def hyper_pb(self, hyper: Mapping[str, Any]) -> "pb.Hyperparameters":
        """Wire form of hyperparameters (every field given is sent)."""
        h = pb.Hyperparameters()
        for key, value in hyper.items():
            if key == "betas":
                h.beta1, h.beta2 = value
            else:
                setattr(h, key, value)
        return h

    def to_pb(self) -> "pb.Optimizer":
        return pb.Optimizer(kind=self._pb_kind, hyper=self.hyper_pb(self.hyper))

    def __repr__(self) -> str:
        args = ", ".join("%s=%r" % kv for kv in self.hyper.items())
        return "paramd.%s(%s)" % (self.torch_name, args)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.hyper == self.hyper  # type: ignore[attr-defined]


class SGD(Optimizer):
    """torch.optim.SGD: weight decay added to the gradient, momentum buffer
    created from the first gradient, dampening, nesterov, maximize."""

    kind = "sgd"
    torch_name = "SGD"
    options = ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")
    _pb_kind = pb.OPTIMIZER_KIND_SGD

    def __init__(
        self,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        maximize: bool = False,
    ):
        super().__init__(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            maximize=maximize,
        )
        self.check_group(self.hyper, "SGD")

    @classmethod
    def _check(cls, key: str, value: Any, field: str) -> Any:
        if key in ("nesterov", "maximize"):
            return _flag(field, value)
        if key == "dampening":
            return _number(field, value)
        return _non_negative(field, value)

    @staticmethod
    def check_group(h: Mapping[str, Any], where: str) -> None:
        """torch's rule across fields: nesterov needs momentum and no dampening."""
        if h.get("nesterov") and (h.get("momentum", 0.0) <= 0 or h.get("dampening", 0.0) != 0):
            raise InvalidArgument(
                "%s.nesterov requires momentum > 0 and dampening 0, got momentum %r and dampening %r"
                % (where, h.get("momentum", 0.0), h.get("dampening", 0.0))
            )


class Adam(Optimizer):
    """torch.optim.Adam: coupled L2 decay, bias-corrected moments, amsgrad,
    maximize."""

    kind = "adam"
    torch_name = "Adam"
    options = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize")
    _pb_kind = pb.OPTIMIZER_KIND_ADAM
    _default_weight_decay = 0.0

    def __init__(
        self,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: Optional[float] = None,
        amsgrad: bool = False,
        maximize: bool = False,
    ):
        if weight_decay is None:
            weight_decay = self._default_weight_decay
        super().__init__(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize)

    @classmethod
    def _check(cls, key: str, value: Any, field: str) -> Any:
        if key in ("amsgrad", "maximize"):
            return _flag(field, value)
        if key == "betas":
            try:
                b1, b2 = value
            except (TypeError, ValueError):
                raise InvalidArgument("%s must be a pair, got %r" % (field, value)) from None
            out = []
            for i, b in enumerate((b1, b2)):
                v = _number("%s[%d]" % (field, i), b)
                if not 0.0 <= v < 1.0:
                    raise InvalidArgument("%s[%d] must be in [0, 1), got %r" % (field, i, v))
                out.append(v)
            return tuple(out)
        return _non_negative(field, value)


class AdamW(Adam):
    """torch.optim.AdamW: `p *= 1 - lr * weight_decay` before the Adam update;
    weight_decay defaults to 0.01 as in torch."""

    kind = "adamw"
    torch_name = "AdamW"
    _pb_kind = pb.OPTIMIZER_KIND_ADAMW
    _default_weight_decay = 0.01


class Schedule:
    """A learning-rate schedule, evaluated before each optimizer step as
    torch's LambdaLR does."""

    def to_pb(self) -> "pb.Schedule":
        raise NotImplementedError

    def lr(self, base_lr: float, step: int) -> float:
        """The lr of a group whose base lr is `base_lr` at optimizer step `step`."""
        raise NotImplementedError


class Constant(Schedule):
    """The base lr at every step."""

    def to_pb(self) -> "pb.Schedule":
        return pb.Schedule(constant=pb.Constant())

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr

    def __repr__(self) -> str:
        return "paramd.Constant()"


class WarmupCosine(Schedule):
    """Linear warmup from 0 over `warmup_steps`, then cosine down to
    `min_lr_ratio` of the base lr at `total_steps`, held there after."""

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0):
        self.warmup_steps = _steps("schedule.warmup_steps", warmup_steps)
        self.total_steps = _steps("schedule.total_steps", total_steps)
        if self.warmup_steps > self.total_steps:
            raise InvalidArgument(
                "schedule.warmup_steps (%d) must not exceed schedule.total_steps (%d)"
                % (self.warmup_steps, self.total_steps)
            )
        self.min_lr_ratio = _number("schedule.min_lr_ratio", min_lr_ratio)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise InvalidArgument("schedule.min_lr_ratio must be in [0, 1], got %r" % self.min_lr_ratio)

    def factor(self, step: int) -> float:
        """The LambdaLR factor at optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return step / self.warmup_steps
        p = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

    def lr(self, base_lr: float, step: int) -> float:
        return base_lr * self.factor(step)

    def to_pb(self) -> "pb.Schedule":
        return pb.Schedule(
            warmup_cosine=pb.WarmupCosine(
                warmup_steps=self.warmup_steps,
                total_steps=self.total_steps,
                min_lr_ratio=self.min_lr_ratio,
            )
        )

    def __repr__(self) -> str:
        return "paramd.WarmupCosine(warmup_steps=%d, total_steps=%d, min_lr_ratio=%r)" % (
            self.warmup_steps,
            self.total_steps,
            self.min_lr_ratio,
        )


class CosineAnnealing(Schedule):
    """torch's CosineAnnealingLR: one absolute floor `eta_min`, periodic past
    `t_max` as torch's is."""

    def __init__(self, t_max: int, eta_min: float = 0.0):
        self.t_max = _steps("schedule.t_max", t_max)
        if self.t_max == 0:
            raise InvalidArgument("schedule.t_max must be > 0, got 0")
        self.eta_min = _non_negative("schedule.eta_min", eta_min)

    def lr(self, base_lr: float, step: int) -> float:
        return self.eta_min + (base_lr - self.eta_min) * (1 + math.cos(math.pi * step / self.t_max)) / 2

    def to_pb(self) -> "pb.Schedule":
        return pb.Schedule(cosine_annealing=pb.CosineAnnealing(t_max=self.t_max, eta_min=self.eta_min))

    def __repr__(self) -> str:
        return "paramd.CosineAnnealing(t_max=%d, eta_min=%r)" % (self.t_max, self.eta_min)


class ClipGradNorm:
    """torch.nn.utils.clip_grad_norm_ over every parameter of the job, on the
    averaged gradient: `coef = min(1, max_norm / (norm + 1e-6))`."""

    def __init__(self, max_norm: float, norm_type: float = 2.0):
        self.max_norm = _number("clip.max_norm", max_norm)
        if self.max_norm <= 0:
            raise InvalidArgument("clip.max_norm must be > 0, got %r" % self.max_norm)
        if float(norm_type) != 2.0:
            raise InvalidArgument(
                "clip.norm_type %r is not supported: paramd clips by the L2 norm (2.0)" % (norm_type,)
            )

    def to_pb(self) -> "pb.Clip":
        return pb.Clip(max_norm=self.max_norm)

    def __repr__(self) -> str:
        return "paramd.ClipGradNorm(max_norm=%r)" % self.max_norm


_NON_FINITE = {"skip": pb.NON_FINITE_POLICY_SKIP, "error": pb.NON_FINITE_POLICY_ERROR}
_MERGE = {"mean": pb.MERGE_MEAN, "weighted": pb.MERGE_WEIGHTED}


def _seconds(field: str, value: Any) -> float:
    """A duration in seconds, > 0."""
    t = _number(field, value)
    if t <= 0:
        raise InvalidArgument("%s must be > 0 seconds, got %r" % (field, t))
    return t


def job_spec(
    params: Sequence[Tuple[str, Sequence[int]]],
    optimizer: Optimizer,
    workers: int,
    param_groups: Optional[Iterable[Mapping[str, Any]]] = None,
    schedule: Optional[Schedule] = None,
    clip: Optional[ClipGradNorm] = None,
    non_finite: str = "skip",
    worker_timeout: Optional[float] = None,
    backup_workers: int = 0,
    merge: str = "mean",
    min_workers: Optional[int] = None,
    lease_seconds: Optional[float] = None,
) -> "pb.JobSpec":
    """The wire form of a job.

    `params` are (name, shape) pairs in the model's order. `param_groups` are
    dicts like torch's: `{"params": [names...], "lr": ..., ...}`; when given,
    every parameter must be in exactly one group, and each group's other keys
    override the optimizer's hyperparameters. `merge` is how a round
    combines its pushes: "mean", or "weighted" (`sum(w_i * g_i) /
    sum(w_i)`, each push giving its weight). `min_workers` makes the job
    elastic: workers join and leave (`Client.join`), at most `workers` at
    once, and a round completes when every member pushed and at least
    `min_workers` did, or `worker_timeout` (the grace) after the
    `min_workers`-th push; `lease_seconds` is how long a membership lasts
    without a heartbeat.
    """
    if not isinstance(optimizer, Optimizer):
        raise InvalidArgument("optimizer must be paramd.SGD, paramd.Adam or paramd.AdamW, got %r" % (optimizer,))
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise InvalidArgument("workers must be an integer >= 1, got %r" % (workers,))
    if schedule is not None and not isinstance(schedule, Schedule):
        raise InvalidArgument(
            "schedule must be paramd.Constant, paramd.WarmupCosine or paramd.CosineAnnealing, got %r" % (schedule,)
        )
    if clip is not None and not isinstance(clip, ClipGradNorm):
        raise InvalidArgument("clip must be paramd.ClipGradNorm, got %r" % (clip,))
    if non_finite not in _NON_FINITE:
        raise InvalidArgument("non_finite must be 'skip' or 'error', got %r" % (non_finite,))
    if merge not in _MERGE:
        raise InvalidArgument("merge must be 'mean' or 'weighted', got %r" % (merge,))
    spec = pb.JobSpec(
        optimizer=optimizer.to_pb(),
        workers=workers,
        merge=_MERGE[merge],
        non_finite=_NON_FINITE[non_finite],
        backup_workers=_steps("backup_workers", backup_workers),
    )
    seen = set()
    for name, shape in params:
        if name in seen:
            raise InvalidArgument("parameter %r is listed twice" % name)
        seen.add(name)
        spec.params.add(name=name, shape=[int(d) for d in shape])
    if param_groups is not None:
        owner: Dict[str, int] = {}
        for i, group in enumerate(param_groups):
            where = "param_groups[%d]" % i
            if "params" not in group:
                raise InvalidArgument("%s has no 'params'" % where)
            names = list(group["params"])
            overrides = optimizer.validate({k: v for k, v in group.items() if k != "params"}, where)
            if isinstance(optimizer, SGD):
                SGD.check_group(optimizer.merged(overrides), where)
            for n in names:
                if n not in seen:
                    raise InvalidArgument("%s names parameter %r, which the job does not have" % (where, n))
                if n in owner:
                    raise InvalidArgument("parameter %r is in param_groups[%d] and %s" % (n, owner[n], where))
                owner[n] = i
            spec.param_groups.add(params=names, hyper=optimizer.hyper_pb(overrides))
        missing = [n for n, _ in params if n not in owner]
        if missing:
            raise InvalidArgument(
                "parameters %s are in no param group: with param_groups every parameter must be in one"
                % ", ".join(repr(n) for n in missing)
            )
    if schedule is not None:
        spec.schedule.CopyFrom(schedule.to_pb())
    if clip is not None:
        spec.clip.CopyFrom(clip.to_pb())
    if worker_timeout is not None:
        spec.worker_timeout_seconds = _seconds("worker_timeout", worker_timeout)
    if min_workers is not None:
        least = _steps("min_workers", min_workers)
        if not 1 <= least <= workers:
            raise InvalidArgument("min_workers must be between 1 and workers (%d), got %r" % (workers, min_workers))
        spec.membership = pb.MEMBERSHIP_ELASTIC
        spec.min_workers = least
        if lease_seconds is not None:
            spec.lease_seconds = _seconds("lease_seconds", lease_seconds)
    elif lease_seconds is not None:
        raise InvalidArgument("lease_seconds is for an elastic job (give min_workers), got %r" % (lease_seconds,))
    return spec
