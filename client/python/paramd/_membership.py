"""A worker's membership of an elastic job: joined once, its lease renewed
by a background thread, joined again if it ended, left on close."""

import threading
import warnings
from typing import Optional

from . import errors
from .client import Client, Membership


class Member:
    """The membership of this process in elastic job `job`. `current` is
    the membership pushes carry; `lost` is set once a heartbeat was refused
    (the lease ran out: the server no longer waits for this worker, and its
    pushes are refused until it joins again)."""

    def __init__(self, client: Client, job: str):
        self._client = client
        self._job = job
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.lost = False
        self.current: Membership = client.join(job)
        self._thread: Optional[threading.Thread] = threading.Thread(
            target=self._renew, name="paramd-heartbeat-%s" % job, daemon=True
        )
        self._thread.start()

    def _renew(self) -> None:
        # A third of the lease: two heartbeats may fail (a slow or briefly
        # unreachable server) before the lease runs out.
        while not self._stop.wait(max(self.current.lease_seconds / 3.0, 0.05)):
            with self._lock:
                member = self.current
            try:
                self._client.heartbeat(self._job, member)
            except errors.NotMember:
                with self._lock:
                    if self.current == member:
                        self.lost = True
            except errors.Error:
                # Unreachable for now: the next heartbeat tries again.
                continue

    def rejoin(self) -> Membership:
        """Joins again after the membership ended: a new worker id, lease
        and round."""
        member = self._client.join(self._job)
        with self._lock:
            self.current, self.lost = member, False
        return member

    def leave(self) -> None:
        """Stops the heartbeats and ends the membership: rounds no longer
        wait for this worker. A failure to reach the server only means the
        lease runs out instead."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self._client.leave(self._job, self.current)
        except errors.Error as e:
            warnings.warn(
                "leaving job %r: %s; the membership ends when its lease runs out" % (self._job, e),
                stacklevel=2,
            )
