"""A local paramd for the Python benchmarks (bench/step.py, bench/client_io.py).

    with LocalParamd(binary) as server:   # started on 127.0.0.1, ports from the OS
        client = paramd.Client(server.url)

`LocalParamd` runs one paramd shard with its defaults (no checkpoints, no
auth, no TLS: every PARAMD_* variable of the caller's environment is dropped,
so a stray PARAMD_CONFIG or PARAMD_CHECKPOINT_DIR cannot change what is
measured), gRPC and HTTP on ports the OS picks. It waits for the
`paramd ready` log line and takes the gRPC address from the `paramd serving`
line; no fixed sleeps. The daemon dies with the benchmark: `stop()` (called
on leaving the `with` block) sends SIGTERM and then SIGKILL, and where
util-linux's `setpriv` exists the daemon also gets SIGKILL when the
benchmark's process dies, however it dies.

`exit_on_sigterm()` turns SIGTERM into SystemExit, so that `finally` blocks
(and so `stop()`) run when the benchmark is terminated; `die_with_parent()`,
called first thing in a benchmark's worker process, has it killed when the
benchmark dies.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_GRPC = re.compile(r"\bgrpc=(\S+)")


def default_binary(profile: str = "release") -> Path:
    """`target/<profile>/paramd` of this repository (or of CARGO_TARGET_DIR)."""
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / profile / "paramd"


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit(143) in the main thread, so cleanup runs."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


class LocalParamd:
    """One paramd process on loopback; `url` is its gRPC address
    (`http://127.0.0.1:PORT`), `log` the lines it has printed."""

    def __init__(self, binary: Path, args: Sequence[str] = (), ready_timeout: float = 60.0):
        binary = Path(binary)
        if not binary.is_file():
            raise FileNotFoundError(
                "%s does not exist: build it (cargo build --release -p paramd) or pass --paramd PATH" % binary
            )
        self.log: List[str] = []
        self.url: Optional[str] = None
        self._ready = threading.Event()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PARAMD_")}
        env["PARAMD_LOG"] = "info"
        pdeathsig = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []
        cmd = pdeathsig + [str(binary), "--listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", *args]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, text=True
        )
        threading.Thread(target=self._drain, name="paramd-log", daemon=True).start()
        try:
            if not self._ready.wait(ready_timeout) or self.url is None or self.proc.poll() is not None:
                raise RuntimeError("paramd did not get ready within %.0f s:\n%s" % (ready_timeout, self.tail()))
        except BaseException:
            self.stop()
            raise

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        serving = None
        for line in self.proc.stdout:
            line = _ANSI.sub("", line.rstrip("\n"))
            self.log.append(line)
            if serving is None and "paramd serving" in line:
                m = _GRPC.search(line)
                serving = "http://%s" % m.group(1) if m else None
            if "paramd ready" in line:
                self.url = serving
                self._ready.set()
        self._ready.set()  # the process exited: wake the waiter

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log[-n:])

    def check_alive(self) -> None:
        """Raises if the daemon has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError("paramd exited with status %s:\n%s" % (self.proc.returncode, self.tail()))

    def stop(self, grace: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "LocalParamd":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def log(msg: str) -> None:
    """Progress, on stderr (stdout carries the results)."""
    print(msg, file=sys.stderr, flush=True)


def die_with_parent(parent_pid: int) -> None:
    """In a child process: SIGKILL when the parent dies (Linux), and exit at
    once if it is already gone."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:
        os._exit(1)
