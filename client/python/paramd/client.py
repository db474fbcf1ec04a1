"""`paramd.Client`: a connection to a paramd server or cluster.

    import numpy as np, paramd
    c = paramd.Client("http://127.0.0.1:50051")
    c.init("demo", {"w": np.zeros((4, 3), np.float32)}, paramd.AdamW(lr=1e-3), workers=2)
    c.push("demo", worker=0, round=0, grads={"w": g0})
    pulled = c.pull("demo", round=1)       # waits until round 0 is complete
    pulled.params["w"]                     # numpy array, shape (4, 3)

Every call runs in the native core (`paramd._native`: the Rust client that
`paramctl` uses too), with the GIL released: it fetches a job's layout from
the coordinator once and sends each chunk straight to the shard holding it,
every shard at once. A push reads float32 arrays where they are (no copy);
a pull writes into new arrays, or, with `pull_into`, straight into arrays
the caller gives (a model's parameters).
"""

import os
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union
from urllib.parse import urlparse

import numpy as np

from . import _native, errors
from .config import ClipGradNorm, Optimizer, Schedule, job_spec
from .credentials import TLS, resolve_tls, resolve_token
from .layout import Route, as_f32, check_wire
from .safetensors import write_safetensors
from .v1 import paramd_pb2 as pb

__all__ = ["Client", "InitResult", "PushResult", "PushStream", "Pulled", "Exported"]


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


class Membership(NamedTuple):
    """A member of an elastic job, as `Client.join` made it."""

    #: The worker id it pushes as.
    worker: int
    #: The lease its pushes, heartbeats and leave carry.
    lease: int
    #: How long the lease lasts without a heartbeat.
    lease_seconds: float
    #: The round it joined at: it pushes for it, from its parameters.
    round: int


class Pulled(NamedTuple):
    #: Rounds completed when the parameters were read.
    round: int
    #: The outcome of the last completed round (`paramd.v1.RoundOutcome`:
    #: round, step, skipped, grad_norm, clip_coefficient, lr per group), or
    #: None before the first.
    last: Optional[Any]
    #: Values by parameter name, shaped as the job declared them.
    params: Dict[str, np.ndarray]


class ParamState(NamedTuple):
    #: Updates applied to the parameter (torch's `state['step']`).
    step: int
    #: State buffers by torch's name (`momentum_buffer`, `exp_avg`,
    #: `exp_avg_sq`, `max_exp_avg_sq`), shaped as the parameter.
    buffers: Dict[str, np.ndarray]


class OptimizerState(NamedTuple):
    #: Rounds completed when the state was read.
    round: int
    #: The state of every parameter by name.
    params: Dict[str, ParamState]


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


def _url(url: str, tls: bool) -> str:
    """`url` with a scheme the native client takes: a bare `host:port` is
    `https://` when TLS was asked for explicitly, else `http://`."""
    target, secure = _target(url)
    if secure is None:
        return ("https://" if tls else "http://") + target
    return ("https://" if secure else "http://") + target


def _rpc(fn, *args):
    """Calls the native client, raising its errors as `paramd.Error`s."""
    try:
        return fn(*args)
    except _native.RpcError as e:
        code, message, shard, url, reason = e.args
        raise errors.from_status(code, message, shard, url, reason) from None
    except ValueError as e:
        raise errors.InvalidArgument(str(e)) from None


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
    again, and so is a pull during which a round was applied. Retrying is
    safe: the server counts a (worker, round) once, and Init of an existing
    job is a no-op. A TLS handshake that failed (the server's certificate
    not signed by the CA given) is not retried. This is the Rust client's
    policy: the same code runs both.
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
        tls_settings, explicit = (None, False) if tls is None and secure is False else resolve_tls(tls)
        if secure is False and explicit:
            raise errors.InvalidArgument("url %r is plaintext (http://) but tls= is given: use https://" % url)
        if secure and tls is False:
            raise errors.InvalidArgument("url %r is https:// but tls=False" % url)
        tls_settings = tls_settings or TLS()
        self.url = url
        self.timeout = float(timeout)
        self.retries = retries
        self._native = _rpc(
            _native.Client,
            _url(url, explicit),
            token,
            tls_settings.ca_cert,
            tls_settings.cert,
            tls_settings.key,
            self.timeout,
            retries,
        )
        self._routes: Dict[str, Route] = {}

    def close(self) -> None:
        """Closes every connection (they also close when the client is
        garbage-collected)."""
        self._native = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, *args):
        if self._native is None:
            raise errors.Error("the client is closed")
        return _rpc(getattr(self._native, method), *args)

    @property
    def retried(self) -> Dict[str, int]:
        """Calls tried again so far, by the answer that made them:
        `{"unavailable": n, "aborted": m}`."""
        unavailable, aborted = self._call("retried")
        return {"unavailable": int(unavailable), "aborted": int(aborted)}

    # -- layout ----------------------------------------------------------------

    def layout(self, job: str) -> "pb.LayoutResponse":
        """Where the chunks of `job` live, and its parameters' names and shapes."""
        return pb.LayoutResponse.FromString(self._call("layout", job))

    def route(self, job: str) -> Route:
        """The names and shapes of `job`'s parameters, fetched once."""
        r = self._routes.get(job)
        if r is None:
            layout = pb.LayoutResponse.FromString(self._call("route_layout", job))
            r = self._routes[job] = Route(layout, job)
        return r

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
        merge: str = "mean",
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
                merge=merge,
            )
        flat = [as_f32(n, v) for n, v in values.items()]
        round, created = self._call("init", job, spec.SerializeToString(), list(values), flat)
        return InitResult(int(round), bool(created))

    def push(
        self,
        job: str,
        worker: int,
        round: int,
        grads: Mapping[str, Any],
        wire: str = "f32",
        weight: Optional[float] = None,
        lease: int = 0,
    ) -> PushResult:
        """Pushes worker `worker`'s gradients for `round`, each chunk
        straight to its shard, every shard at once; a shard holding none of
        the job's chunks still gets the push, without payload, since a round
        completes on a shard once every worker has pushed there. Every
        parameter of the job must be given, with its number of elements
        (refused here, before any shard counts part of it), or as None:
        this worker has no gradient for it (torch's `grad is None`). A
        parameter no worker of the round has a gradient for is not stepped
        (no weight decay, no momentum, its step count unchanged); one that
        only some workers have a gradient for is averaged over all of them,
        the others counting as zeros, as DistributedDataParallel does.
        Contiguous float32 arrays are sent from their own memory; others are
        converted once first. `wire` "bf16" or "f16" sends the values cast
        to that dtype (rounded to nearest even, as torch's `.to()` casts),
        half the bytes; the server decodes them exactly to f32. `weight`
        (> 0) is the push's weight in a job whose merge is "weighted"
        (tokens or samples), required there and refused elsewhere. In an
        elastic job, `worker` and `lease` are the membership `join` gave
        (`NotMember` once it ended). Safe to retry."""
        check_wire(wire)
        names = [n for n in grads if grads[n] is not None]
        no_grad = [n for n in grads if grads[n] is None]
        flat = [as_f32(n, grads[n]) for n in names]
        w = 0.0 if weight is None else float(weight)
        duplicate, pushed = self._call("push", job, int(worker), int(round), names, flat, no_grad, wire, w, int(lease))
        return PushResult(duplicate=bool(duplicate), pushed=int(pushed))

    def push_stream(self, job: str, worker: int, round: int) -> "PushStream":
        """Opens worker `worker`'s push for `round` on every shard; the
        gradients follow one at a time with `PushStream.send` (e.g. while
        backward still computes the others) and `PushStream.finish` ends
        it. A stream dropped or cancelled before `finish` is cut: no shard
        counts it."""
        return PushStream(self._call("push_start", job, int(worker), int(round)))

    def pull_into(
        self, job: str, round: int, out: Mapping[str, np.ndarray], wire: str = "f32"
    ) -> Tuple[int, Optional[Any]]:
        """Pulls the parameters `out` names once `round` rounds have
        completed, writing each straight into its array (contiguous,
        writable float32 of the parameter's size: a model's parameters
        through `param.detach().numpy()`). Returns the round the values are
        from and its outcome (as `Pulled`). All values come from one round.
        A pull that fails may have written part of the arrays. `wire` "bf16"
        or "f16" has the server send the values rounded to that dtype (to
        nearest even), half the bytes, written into the arrays as f32."""
        check_wire(wire)
        names = list(out)
        flat = []
        for n in names:
            a = out[n]
            if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous and a.flags.writeable):
                raise errors.InvalidArgument(
                    "pull_into: %r must be a contiguous, writable float32 numpy array, got %s"
                    % (n, "%s %s" % (a.dtype, a.shape) if isinstance(a, np.ndarray) else type(a).__name__)
                )
            flat.append(a.reshape(-1))  # a view: the same memory
        round, last = self._call("pull_into", job, int(round), names, flat, wire)
        return int(round), (pb.RoundOutcome.FromString(last) if last is not None else None)

    def pull(self, job: str, round: int = 0, params: Optional[Sequence[str]] = None, wire: str = "f32") -> Pulled:
        """The parameters (all, or those named) once `round` rounds have
        completed on every shard; waits for that, within the deadline
        (`paramd.DeadlineExceeded` past it). `round=0` reads them as they
        are. All values come from the same round: if the shards answered
        from different rounds (training went on meanwhile), the pull is
        repeated at the newest of them. `wire`: as `pull_into`'s."""
        route = self.route(job)
        names = list(params) if params else route.order
        arrays = {}
        for n in names:
            shape = route.shapes.get(n)
            if shape is None:
                raise errors.InvalidArgument("pull of job %r: unknown parameter %r" % (job, n))
            arrays[n] = np.empty(shape, dtype="<f4")
        got, last = self.pull_into(job, round, arrays, wire)
        return Pulled(got, last, arrays)

    def state(self, job: str, round: int = 0) -> OptimizerState:
        """The optimizer state of every parameter once `round` rounds have
        completed on every shard (waits as `pull` does), all from one
        round."""
        route = self.route(job)
        got, params = self._call("state", job, int(round))
        out = {}
        for name, step, buffers in params:
            shape = route.shapes[name]
            arrays = {b: np.frombuffer(data, dtype="<f4").reshape(shape).copy() for b, data in buffers}
            out[name] = ParamState(int(step), arrays)
        return OptimizerState(int(got), out)

    def load_state(self, job: str, round: int, params: Mapping[str, ParamState], step: int) -> int:
        """Sets the optimizer state of `job` (torch's `load_state_dict`):
        loaded when round `round`, the open round, is applied, before its
        step, on every shard or on none; the job then counts optimizer steps
        (the schedule's position) from `step`. `params` gives every
        parameter's step and every buffer its optimizer keeps, shaped as
        the parameter; the server refuses anything else, and any shard's
        refusal leaves the state as it was. Returns the load's id, new at
        every call: the round's outcome carries it as `loaded_state` once
        it is applied."""
        route = self.route(job)
        out = []
        for name, ps in params.items():
            shape = route.shapes.get(name)
            buffers = []
            for b, v in ps.buffers.items():
                a = np.ascontiguousarray(v, dtype="<f4")
                if shape is not None and a.shape != tuple(shape):
                    raise errors.InvalidArgument(
                        "state: parameter %r buffer %r has shape %s, the parameter %s"
                        % (name, b, tuple(a.shape), tuple(shape))
                    )
                buffers.append((b, a.tobytes()))
            out.append((name, int(ps.step), buffers))
        return int(self._call("load_state", job, int(round), int(step), out))

    def join(self, job: str) -> "Membership":
        """Joins elastic job `job` (its membership "elastic"): the worker id
        to push as, the lease to push with and renew (`heartbeat`, well
        within `lease_seconds`), and the round to push next, from that
        round's parameters (`pull(job, round)`). Not retried once it may
        have reached the server."""
        worker, lease, lease_seconds, round = self._call("join", job)
        return Membership(int(worker), int(lease), float(lease_seconds), int(round))

    def heartbeat(self, job: str, member: "Membership") -> int:
        """Renews `member`'s lease; returns the round being collected.
        Raises `NotMember` once the membership ended (join again)."""
        return int(self._call("heartbeat", job, member.worker, member.lease))

    def leave(self, job: str, member: "Membership") -> None:
        """Ends `member`'s membership (harmless if it ended already): rounds
        no longer wait for it; a push it made for the open round still
        counts."""
        self._call("leave", job, member.worker, member.lease)

    def status(self, job: Optional[str] = None) -> "pb.StatusResponse":
        """Round, step, lr of every group, last grad norm and clip
        coefficient, workers, sizes and shards of `job` (every job when
        None): a `paramd.v1.StatusResponse`."""
        return pb.StatusResponse.FromString(self._call("status", job or ""))

    def job_status(self, job: str) -> "pb.JobStatus":
        """The status of one job."""
        return self.status(job).jobs[0]

    def checkpoint(self, job: Optional[str] = None) -> Dict[str, int]:
        """Takes a checkpoint of `job` (every job when None) on every shard;
        returns the round each job was checkpointed at."""
        return {j: int(r) for j, r in self._call("checkpoint", job or "")}

    def delete_job(self, job: str) -> None:
        """Drops `job` on every shard."""
        self._call("delete_job", job)
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


class PushStream:
    """A push sent tensor by tensor (see `Client.push_stream`)."""

    def __init__(self, native: Any):
        self._native = native

    def send(self, name: str, grad: Any) -> None:
        """Sends gradient `name`. A contiguous float32 array is read where
        it is, up to `finish`: do not change it before. Refuses an unknown
        name, a wrong size or a gradient given twice, before sending it.
        None says that this worker has no gradient for it (see
        `Client.push`)."""
        if grad is None:
            _rpc(self._native.no_grad, name)
        else:
            _rpc(self._native.send, name, as_f32(name, grad))

    def finish(self) -> PushResult:
        """Ends the push on every shard (a push that lacks a parameter is
        refused and counted nowhere)."""
        duplicate, pushed = _rpc(self._native.finish)
        return PushResult(duplicate=bool(duplicate), pushed=int(pushed))

    def cancel(self) -> None:
        """Cuts the push: no shard counts it."""
        self._native.cancel()
