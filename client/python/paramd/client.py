"""`paramd.Client`: a connection to a paramd server or cluster.

    import numpy as np, paramd
    c = paramd.Client("http://127.0.0.1:50051")
    c.init("demo", {"w": np.zeros((4, 3), np.float32)}, paramd.AdamW(lr=1e-3), workers=2)
    c.push("demo", worker=0, round=0, grads={"w": g0})
    pulled = c.pull("demo", round=1)       # waits until round 0 is complete
    pulled.params["w"]                     # numpy array, shape (4, 3)

The client fetches a job's layout from the coordinator once and sends each
chunk straight to the shard holding it, every shard at once, as the Rust
client does. Tensors go in and come out as numpy arrays (little-endian f32
on the wire), converted without per-element Python loops.
"""

import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import grpc
import numpy as np

from . import errors
from .config import ClipGradNorm, Optimizer, Schedule, job_spec
from .credentials import TLS, resolve_tls, resolve_token
from .layout import Assembler, Route, as_f32, pack, segments
from .v1 import paramd_pb2 as pb
from .v1 import paramd_pb2_grpc as pb_grpc

__all__ = ["Client", "InitResult", "PushResult", "Pulled", "Exported"]

#: Largest message the client encodes or decodes (the server's default limit).
MAX_MESSAGE_BYTES = 64 << 20

# Pauses between tries: UNAVAILABLE (a shard restarting) doubling from
# 50 ms to 1 s; ABORTED (another copy of a push being received) from 5 ms to
# 200 ms, as the Rust client does.
_UNAVAILABLE_PAUSE, _UNAVAILABLE_MAX = 0.05, 1.0
_ABORTED_PAUSE, _ABORTED_MAX = 0.005, 0.2

# A TLS handshake that failed (the server's certificate not signed by the
# CA given, a name that does not match) fails again: not retried.
_TLS_REFUSED = re.compile(r"handshake failed", re.IGNORECASE)

log = logging.getLogger("paramd")


class InitResult(NamedTuple):
    #: The round workers push next.
    round: int
    #: False when the job already existed (with the same configuration).
    created: bool


class PushResult(NamedTuple):
    #: True when every shard had already counted this (worker, round).
    duplicate: bool
    #: Workers counted so far for this round (the least over the shards).
    pushed: int


class Pulled(NamedTuple):
    #: Rounds completed when the parameters were read.
    round: int
    #: The outcome of the last completed round (`paramd.v1.RoundOutcome`:
    #: round, step, skipped, grad_norm, clip_coefficient, lr per group), or
    #: None before the first.
    last: Optional[Any]
    #: Values by parameter name, shaped as the job declared them.
    params: Dict[str, np.ndarray]


class Exported(NamedTuple):
    job: str
    round: int
    tensors: int
    bytes: int


def _target(url: str) -> Tuple[str, Optional[bool]]:
    """`host:port`, and whether the URL asks for TLS: True for
    `https://host:port`, False for `http://host:port`, None for a bare
    `host:port`."""
    if "://" not in url:
        return url, None
    u = urlparse(url)
    if u.scheme not in ("http", "https", "grpc", "grpcs"):
        raise errors.InvalidArgument("server URL %r: scheme must be http or https" % url)
    try:
        port = u.port
    except ValueError:
        port = None
    if not u.hostname or port is None:
        raise errors.InvalidArgument("server URL %r must name a host and a port" % url)
    host = "[%s]" % u.hostname if ":" in u.hostname else u.hostname
    return "%s:%d" % (host, port), u.scheme in ("https", "grpcs")


class Client:
    """A connection to paramd, through its coordinator (shard 0).

    `url` is `http://host:port` or `https://host:port`. The credentials
    mirror paramctl's flags (see `paramd.credentials`): `token` or
    `token_file` is sent as `authorization: Bearer <token>` on every call
    (default: PARAMD_TOKEN_FILE, then PARAMD_TOKEN); `tls` is a
    `paramd.TLS(ca_cert=, cert=, key=)` for `https://` servers (default:
    PARAMD_CA_CERT, PARAMD_CERT and PARAMD_KEY, else the system's roots),
    True, or a CA's path or PEM bytes. Every shard of a cluster is reached
    with the same credentials.

    `timeout` is the deadline of every call in seconds, a pull's wait and
    every retry included. Calls answered UNAVAILABLE (a shard down,
    starting, or waiting for the others to agree on a restored checkpoint)
    are tried again, with a pause growing to 1 s, until that deadline, or
    at most `retries` more times when `retries` is set (0: never). A push
    refused ABORTED because another copy of it is being received is sent
    again, as the Rust client does. Retrying is safe: the server counts a
    (worker, round) once, and Init of an existing job is a no-op. A TLS
    handshake that failed (the server's certificate not signed by the CA
    given) is not retried.
    """

    def __init__(
        self,
        url: str,
        token: Optional[str] = None,
        tls: Union[None, bool, TLS, bytes, str, "os.PathLike[str]"] = None,
        timeout: float = 300.0,
        retries: Optional[int] = None,
        token_file: Optional[Union[str, "os.PathLike[str]"]] = None,
    ):
        if not isinstance(url, str) or not url:
            raise errors.InvalidArgument("url must be a non-empty string, got %r" % (url,))
        if timeout is None or float(timeout) <= 0:
            raise errors.InvalidArgument("timeout must be > 0 seconds, got %r" % (timeout,))
        if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int) or retries < 0):
            raise errors.InvalidArgument("retries must be None or an integer >= 0, got %r" % (retries,))
        _, secure = _target(url)
        token = resolve_token(token, token_file)
        # PARAMD_CA_CERT and the like are for https:// servers: an http://
        # one does not read them.
        self._tls, explicit = (None, False) if tls is None and secure is False else resolve_tls(tls)
        if secure is False and explicit:
            raise errors.InvalidArgument("url %r is plaintext (http://) but tls= is given: use https://" % url)
        if secure and tls is False:
            raise errors.InvalidArgument("url %r is https:// but tls=False" % url)
        # A bare host:port uses TLS only when asked for explicitly.
        self._bare_tls = explicit
        self.url = url
        self.timeout = float(timeout)
        self.retries = retries
        self._metadata = (("authorization", "Bearer " + token),) if token else ()
        self._lock = threading.Lock()
        self._channels: Dict[str, grpc.Channel] = {}
        self._routes: Dict[str, Route] = {}
        self._pool: Optional[ThreadPoolExecutor] = None
        self._stub = self._shard_stub(url)

    # -- connections ---------------------------------------------------------

    def _shard_stub(self, url: str) -> "pb_grpc.ParamServerStub":
        with self._lock:
            ch = self._channels.get(url)
            if ch is None:
                target, secure = _target(url)
                options = [
                    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                    # Reconnect to a restarted shard within a second or two
                    # (gRPC's default backoff grows to two minutes).
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 2000),
                ]
                if secure or (secure is None and self._bare_tls):
                    creds = (self._tls or TLS()).channel_credentials()
                    ch = grpc.secure_channel(target, creds, options)
                else:
                    ch = grpc.insecure_channel(target, options)
                self._channels[url] = ch
        return pb_grpc.ParamServerStub(ch)

    def close(self) -> None:
        """Closes every connection."""
        with self._lock:
            for ch in self._channels.values():
                ch.close()
            self._channels.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=False)
                self._pool = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(
        self,
        fn: Callable[[float], Any],
        shard: Optional[int] = None,
        url: Optional[str] = None,
        aborted: bool = False,
        deadline: Optional[float] = None,
    ):
        """Runs `fn(timeout)` (one RPC, given what is left of the deadline:
        `timeout` seconds from now unless `deadline` is given), mapping
        errors. UNAVAILABLE is retried (see the class), and ABORTED too when
        `aborted`: pushes and pulls, for which it means another copy is
        being received, or a round was applied during the read."""
        if deadline is None:
            deadline = time.monotonic() + self.timeout
        unavailable, busy = _UNAVAILABLE_PAUSE, _ABORTED_PAUSE
        attempt = retried = 0
        while True:
            try:
                return fn(max(deadline - time.monotonic(), 0.001))
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                details = (e.details() if hasattr(e, "details") else None) or ""
                if (
                    code == grpc.StatusCode.UNAVAILABLE
                    and (self.retries is None or retried < self.retries)
                    and not _TLS_REFUSED.search(details)
                ):
                    pause, unavailable = unavailable, min(unavailable * 2, _UNAVAILABLE_MAX)
                    retried += 1
                elif code == grpc.StatusCode.ABORTED and aborted:
                    pause, busy = busy, min(busy * 2, _ABORTED_MAX)
                else:
                    raise errors.from_rpc_error(e, shard, url) from None
                if time.monotonic() + pause >= deadline:
                    raise errors.from_rpc_error(e, shard, url) from None
                attempt += 1
                log.debug(
                    "%s%s: %s; trying again in %.3f s (attempt %d)",
                    "shard %d at %s: " % (shard, url) if shard is not None else "",
                    code.name if code else "error",
                    details,
                    pause,
                    attempt,
                )
                time.sleep(pause)

    def _kw(self, timeout: float) -> Dict[str, Any]:
        return {"timeout": timeout, "metadata": self._metadata}

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="paramd")
            return self._pool

    # -- layout ----------------------------------------------------------------

    def layout(self, job: str) -> "pb.LayoutResponse":
        """Where the chunks of `job` live, and its parameters' names and shapes."""
        return self._call(lambda t: self._stub.Layout(pb.LayoutRequest(job=job), **self._kw(t)))

    def route(self, job: str) -> Route:
        """The layout of `job`, fetched from the coordinator once."""
        r = self._routes.get(job)
        if r is None:
            r = Route(self.layout(job), job)
            # Shard 0 is reached as the coordinator was; the others at the
            # addresses the cluster was started with.
            if r.shards:
                r.shards[0] = self.url
            else:
                r.shards = [self.url]
            self._routes[job] = r
        return r

    def _shard_call(self, route: Route, i: int, fn, aborted: bool = False, deadline: Optional[float] = None):
        """`fn(stub, timeout)` on shard `i`, as `_call` runs it."""
        url = route.shards[i]
        stub = self._shard_stub(url)
        if route.n_shards == 1:
            return self._call(lambda t: fn(stub, t), aborted=aborted, deadline=deadline)
        return self._call(lambda t: fn(stub, t), shard=i, url=url, aborted=aborted, deadline=deadline)

    # -- jobs ------------------------------------------------------------------

    def init(
        self,
        job: str,
        params: Union[Mapping[str, Any], Sequence[Tuple[str, Sequence[int]]]],
        optimizer: Optional[Optimizer] = None,
        workers: int = 1,
        param_groups: Optional[Sequence[Mapping[str, Any]]] = None,
        schedule: Optional[Schedule] = None,
        clip: Optional[ClipGradNorm] = None,
        non_finite: str = "skip",
        worker_timeout: Optional[float] = None,
        backup_workers: int = 0,
        spec: Optional["pb.JobSpec"] = None,
    ) -> InitResult:
        """Creates job `job`, or finds it and returns its current round.

        `params` maps names to initial values (numpy arrays or anything
        `np.asarray` takes), in the model's order, or lists (name, shape)
        pairs to join a job that exists already without uploading values.
        The other arguments are the job's configuration (see
        `paramd.config.job_spec`); `spec` gives a ready `JobSpec` instead.
        A job that exists with another configuration is refused
        (`paramd.JobMismatch`).
        """
        values: Dict[str, np.ndarray] = {}
        if isinstance(params, Mapping):
            for name, v in params.items():
                values[name] = np.asarray(v)
            shapes = [(n, v.shape) for n, v in values.items()]
        else:
            shapes = [(n, tuple(s)) for n, s in params]
        if spec is None:
            if optimizer is None:
                raise errors.InvalidArgument("optimizer is required (paramd.SGD, paramd.Adam or paramd.AdamW)")
            spec = job_spec(
                shapes,
                optimizer,
                workers,
                param_groups=param_groups,
                schedule=schedule,
                clip=clip,
                non_finite=non_finite,
                worker_timeout=worker_timeout,
                backup_workers=backup_workers,
            )

        def messages() -> Iterator["pb.InitRequest"]:
            segs: List[pb.Segment] = []
            for name, v in values.items():
                segs.extend(segments(name, as_f32(name, v)))
            packed = pack(segs) or [[]]
            for k, part in enumerate(packed):
                if k == 0:
                    yield pb.InitRequest(job=job, spec=spec, values=part)
                else:
                    yield pb.InitRequest(values=part)

        r = self._call(lambda t: self._stub.Init(messages(), **self._kw(t)))
        return InitResult(int(r.round), bool(r.created))

    def push(self, job: str, worker: int, round: int, grads: Mapping[str, Any]) -> PushResult:
        """Pushes worker `worker`'s gradients for `round`, each chunk
        straight to its shard, every shard at once; a shard holding none of
        the job's chunks still gets the push, without payload, since a round
        completes on a shard once every worker has pushed there. Every
        parameter of the job must be given, with its number of elements
        (refused here, before any shard counts part of it). Safe to retry."""
        route = self.route(job)
        flat = {name: as_f32(name, g) for name, g in grads.items()}
        route.check(flat, "push of worker %d for round %d" % (worker, round))
        parts = route.split(flat)

        def call(i: int) -> "pb.PushResponse":
            # A header-only first message: the shard admits or refuses the
            # push (stale, early, duplicate, another copy being received)
            # before any payload is sent.
            messages = [pb.PushRequest(job=job, worker=worker, round=round)]
            messages += [pb.PushRequest(grads=segs) for segs in pack(parts[i])]
            return self._shard_call(route, i, lambda stub, t: stub.Push(iter(messages), **self._kw(t)), aborted=True)

        results = self._on_every_shard(route, call)
        return PushResult(
            duplicate=all(r.duplicate for r in results),
            pushed=min(int(r.pushed) for r in results),
        )

    def _on_every_shard(self, route: Route, call) -> List[Any]:
        """`call(i)` for every shard at once. Every shard is given its part
        even if another fails, so a retry has only the failed ones to reach;
        the first error is raised."""
        if route.n_shards == 1:
            return [call(0)]
        futures = [self._executor().submit(call, i) for i in range(route.n_shards)]
        out, first = [], None
        for f in futures:
            try:
                out.append(f.result())
            except errors.Error as e:
                first = first or e
        if first is not None:
            raise first
        return out

    def pull(self, job: str, round: int = 0, params: Optional[Sequence[str]] = None) -> Pulled:
        """The parameters (all, or those named) once `round` rounds have
        completed on every shard; waits for that, within the deadline
        (`paramd.DeadlineExceeded` past it). `round=0` reads them as they
        are. All values come from the same round: if the shards answered
        from different rounds (training went on meanwhile), the pull is
        repeated at the newest of them."""
        route = self.route(job)
        names = list(params) if params else []
        deadline = time.monotonic() + self.timeout

        def call(want: int, i: int) -> List["pb.PullResponse"]:
            req = pb.PullRequest(job=job, round=want, params=names)
            return self._shard_call(
                route, i, lambda stub, t: list(stub.Pull(req, **self._kw(t))), aborted=True, deadline=deadline
            )

        want = round
        while True:
            replies = self._on_every_shard(route, lambda i: call(want, i))
            rounds = [int(msgs[0].round) for msgs in replies if msgs]
            if len(set(rounds)) <= 1 or time.monotonic() >= deadline:
                break
            want = max(rounds)
        if len(set(rounds)) > 1:
            raise errors.Aborted(
                "pull of job %r: the shards kept answering from different rounds (%s) until the deadline"
                % (job, ", ".join(map(str, rounds)))
            )
        asm = Assembler(route.shapes)
        last = None
        for i, msgs in enumerate(replies):
            for k, m in enumerate(msgs):
                if k == 0 and i == 0 and m.HasField("last"):
                    last = m.last
                for seg in m.params:
                    asm.place(seg)
        return Pulled(rounds[0] if rounds else 0, last, asm.arrays(names or route.order))

    def status(self, job: Optional[str] = None) -> "pb.StatusResponse":
        """Round, step, lr of every group, last grad norm and clip
        coefficient, workers, sizes and shards of `job` (every job when
        None): a `paramd.v1.StatusResponse`."""
        return self._call(lambda t: self._stub.Status(pb.StatusRequest(job=job or ""), **self._kw(t)))

    def job_status(self, job: str) -> "pb.JobStatus":
        """The status of one job."""
        return self.status(job).jobs[0]

    def checkpoint(self, job: Optional[str] = None) -> Dict[str, int]:
        """Takes a checkpoint of `job` (every job when None) on every shard;
        returns the round each job was checkpointed at."""
        r = self._call(lambda t: self._stub.Checkpoint(pb.CheckpointRequest(job=job or ""), **self._kw(t)))
        return {j.job: int(j.round) for j in r.jobs}

    def delete_job(self, job: str) -> None:
        """Drops `job` on every shard."""
        self._call(lambda t: self._stub.DeleteJob(pb.DeleteJobRequest(job=job), **self._kw(t)))
        self._routes.pop(job, None)

    def export(self, path: Union[str, "os.PathLike[str]"], job: Optional[str] = None) -> Exported:
        """Writes the parameters of `job` (the only job when None) to `path`
        as plain safetensors with their names and shapes, as `paramctl
        export` does: ready for `model.load_state_dict(safetensors.torch.load_file(path))`."""
        if job is None:
            jobs = [j.job for j in self.status().jobs]
            if len(jobs) != 1:
                raise errors.InvalidArgument(
                    "the server has %d jobs (%s); name one with job=" % (len(jobs), ", ".join(jobs))
                    if jobs
                    else "the server has no job to export"
                )
            job = jobs[0]
        pulled = self.pull(job, 0)
        order = self.route(job).order
        meta = {"format": "pt", "paramd.job": job, "paramd.round": str(pulled.round)}
        size = write_safetensors(path, [(n, pulled.params[n]) for n in order], meta)
        return Exported(job, pulled.round, len(order), size)


def write_safetensors(
    path: Union[str, "os.PathLike[str]"],
    tensors: Sequence[Tuple[str, np.ndarray]],
    metadata: Optional[Mapping[str, str]] = None,
) -> int:
    """Writes f32 tensors as a safetensors file (beside the target, then
    renamed, so a reader never sees half a file); returns its size."""
    header: Dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    blobs = []
    for name, a in tensors:
        a = np.ascontiguousarray(a, dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        blobs.append(a)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = "%s.tmp-%d" % (os.fspath(path), os.getpid())
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for a in blobs:
            f.write(a.tobytes())
    os.replace(tmp, path)
    return 8 + len(head) + offset
