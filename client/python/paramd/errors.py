"""Exceptions of the paramd client, and the mapping from gRPC statuses.

Every error a server answers with becomes a `paramd.Error` whose message is
the server's own (it names the field or parameter and the value that was
wrong), with the gRPC code kept in `code`. Subclasses also derive from the
matching Python built-in (`ValueError`, `TimeoutError`, `ConnectionError`,
...) so that generic handlers keep working.
"""

import enum
from typing import Optional

__all__ = [
    "Error",
    "InvalidArgument",
    "NotFound",
    "FailedPrecondition",
    "JobMismatch",
    "StalePush",
    "EarlyPush",
    "NotMember",
    "DeadlineExceeded",
    "Unavailable",
    "ResourceExhausted",
    "Unauthenticated",
    "PermissionDenied",
    "Aborted",
    "Internal",
    "StatusCode",
    "from_status",
]


class StatusCode(enum.IntEnum):
    """The gRPC status codes, numbered as on the wire."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class Error(RuntimeError):
    """An error answered by a paramd server (or found by the client).

    `code` is the gRPC status code (None for errors found by the client),
    `message` the server's message, `shard` and `url` the shard that
    answered when the job spans several, `reason` the server's
    machine-readable reason (e.g. `stale`), when it gave one.
    """

    def __init__(
        self,
        message: str,
        code: Optional[StatusCode] = None,
        shard: Optional[int] = None,
        url: Optional[str] = None,
        reason: Optional[str] = None,
    ):
        self.message = message
        self.code = code
        self.shard = shard
        self.url = url
        self.reason = reason
        parts = []
        if shard is not None:
            parts.append("shard %d at %s" % (shard, url))
        if code is not None:
            parts.append(code.name)
        parts.append(message)
        super().__init__(": ".join(parts))


class InvalidArgument(Error, ValueError):
    """Bad configuration or a malformed push; the server kept nothing of it."""


class NotFound(Error, LookupError):
    """The job does not exist."""


class FailedPrecondition(Error):
    """The request does not fit the job's state."""


class JobMismatch(FailedPrecondition):
    """The job exists with a different configuration."""


class StalePush(FailedPrecondition):
    """A push for a round that is already complete."""


class EarlyPush(FailedPrecondition):
    """A push for a round beyond the one being collected."""


class NotMember(FailedPrecondition):
    """A call of an elastic job's member whose membership ended (it left, or
    its lease expired) or never was: join again."""


class DeadlineExceeded(Error, TimeoutError):
    """The call's deadline passed (e.g. a pull whose round did not complete)."""


class Unavailable(Error, ConnectionError):
    """The server or a shard could not be reached, or is not ready."""


class ResourceExhausted(Error):
    """A payload far larger than the job, or a message over the limit."""


class Unauthenticated(Error, PermissionError):
    """A missing or wrong token."""


class PermissionDenied(Error, PermissionError):
    """The token does not allow the call."""


class Aborted(Error):
    """The state moved under a long read; trying again may succeed."""


class Internal(Error):
    """The server failed; its message says how."""


_BY_CODE = {
    StatusCode.INVALID_ARGUMENT: InvalidArgument,
    StatusCode.NOT_FOUND: NotFound,
    StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    StatusCode.UNAVAILABLE: Unavailable,
    StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    StatusCode.UNAUTHENTICATED: Unauthenticated,
    StatusCode.PERMISSION_DENIED: PermissionDenied,
    StatusCode.ABORTED: Aborted,
    StatusCode.INTERNAL: Internal,
}

# The server's machine-readable reasons (the `paramd-reason` trailer) that
# name a finer error than the code.
_BY_REASON = {
    "stale": StalePush,
    "early": EarlyPush,
    "job_mismatch": JobMismatch,
    "not_member": NotMember,
}


def from_status(
    code: Optional[int],
    message: str,
    shard: Optional[int] = None,
    url: Optional[str] = None,
    reason: Optional[str] = None,
) -> Error:
    """The `Error` for a failed call: `code` is the gRPC status code (None
    for an error the client found before sending), `message` the server's,
    `reason` its machine-readable reason, if it gave one."""
    status = None
    if code is not None:
        try:
            status = StatusCode(code)
        except ValueError:
            status = StatusCode.UNKNOWN
    cls = _BY_CODE.get(status, Error) if status is not None else InvalidArgument
    sub = _BY_REASON.get(reason or "")
    if sub is not None and issubclass(sub, cls):
        cls = sub
    return cls(message, code=status, shard=shard, url=url, reason=reason)
