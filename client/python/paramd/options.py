"""How a torch optimizer joins its paramd job: `JobOptions`, shared by
`paramd.torch.RemoteOptimizer` and `paramd.torch.DistributedOptimizer`."""

import dataclasses
from typing import Any, Mapping, Optional

from .client import Client
from .config import ClipGradNorm, Schedule


@dataclasses.dataclass(frozen=True)
class JobOptions:
    """The server, the job and this rank's place in it, what the job is
    created with besides the optimizer, and how the client behaves.

    Either optimizer takes these as keyword arguments, or as `options=`
    (keywords given too override its fields).

    - `server`, `token`, `tls`, `timeout`: `paramd.Client`'s (token and TLS
      default to paramctl's environment variables); or pass a ready
      `client`.
    - `job`: the job's name (required).
    - `rank`, `world_size`: default to torch.distributed's, else to
      torchrun's RANK and WORLD_SIZE.
    - `schedule`, `clip`: the job's learning-rate schedule and global-norm
      clipping (none by default).
    - `non_finite`: what a round with a non-finite gradient does ("skip" or
      "error"); `worker_timeout`: seconds after a round's first push
      before late workers are dropped (the server's default if None);
      `backup_workers`: workers a round may go without.
    - `join_timeout`: how long ranks other than 0 wait for rank 0 to create
      the job (default: `timeout`).
    - `overlap`: push each gradient as soon as backward has accumulated it
      (see `paramd.torch`).
    - `wire`, `pull_wire`: the dtype gradients are pushed in and parameters
      pulled in, "f32" (default), "bf16" or "f16": half the bytes, cast as
      torch's `.to()` casts (round to nearest even); the server decodes
      and computes in f32, so the step is the f32 step on the cast values.
    - `merge`: how a round combines the workers' pushes, "mean" (default)
      or "weighted" (`paramd.diloco`'s weighted merge).
    - `min_workers`: makes the job elastic. Workers join it (the server
      gives each its worker id; `rank` is not given) and leave it, at most
      `max_workers` (default 64) at once; a round completes when every
      member pushed and at least `min_workers` did, or `worker_timeout`
      seconds (the grace) after the `min_workers`-th push. A background
      thread renews the membership's lease (`lease_seconds`, the server's
      30 s if None); `leave()` ends it.
    """

    server: Optional[str] = None
    job: str = ""
    rank: Optional[int] = None
    world_size: Optional[int] = None
    schedule: Optional[Schedule] = None
    clip: Optional[ClipGradNorm] = None
    client: Optional[Client] = None
    token: Optional[str] = None
    tls: Any = None
    timeout: float = 300.0
    join_timeout: Optional[float] = None
    non_finite: str = "skip"
    worker_timeout: Optional[float] = None
    backup_workers: int = 0
    overlap: bool = False
    wire: str = "f32"
    pull_wire: str = "f32"
    merge: str = "mean"
    min_workers: Optional[int] = None
    max_workers: int = 64
    lease_seconds: Optional[float] = None

    @classmethod
    def of(cls, options: Optional["JobOptions"], keywords: Mapping[str, Any], caller: str) -> "JobOptions":
        """`options` (or the defaults) with `keywords` over them; a keyword
        that is not an option is refused as Python refuses one."""
        fields = {f.name for f in dataclasses.fields(cls)}
        for k in keywords:
            if k not in fields:
                raise TypeError("%s() got an unexpected keyword argument %r" % (caller, k))
        if options is not None and not isinstance(options, JobOptions):
            raise TypeError("%s() options must be paramd.JobOptions, got %r" % (caller, options))
        return dataclasses.replace(options or cls(), **keywords)
