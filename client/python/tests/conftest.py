"""Fixtures: real paramd processes on reserved loopback ports (one shard,
and three shards), and the paths of the binaries.

`cargo test -p paramd-tests --test python` sets PARAMD_BIN and PARAMCTL_BIN;
run by hand, the binaries are looked up in the cargo target directory.
"""

import ctypes
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, List, Optional

import pytest

import paramd

# The fake shards' fixture (`fakes`), for every test module.
pytest_plugins = ["fakes"]

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
EXAMPLES = HERE.parent / "examples"


def load_example(name: str):
    """The example script `examples/<name>.py` as a module (its model and
    data functions are what the tests' references use)."""
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / ("%s.py" % name))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# The installed package is under test, never the sources beside this folder
# (their stubs are generated at build time).
assert Path(paramd.__file__).resolve().parent != HERE.parent / "paramd", (
    "paramd was imported from the source tree; run pytest from client/python/tests "
    "with the package installed (client/python/ci/venv.sh)"
)


def pytest_report_header(config):
    return "paramd package: %s" % os.path.dirname(paramd.__file__)


def _die_with_parent() -> None:
    # SIGKILL when the parent dies, whatever kills it: pytest dies with the
    # cargo test that started it.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


if sys.platform == "linux" and os.environ.get("PARAMD_BIN"):
    _die_with_parent()

# The daemons get SIGKILL when pytest dies, set by util-linux's setpriv
# before it execs paramd (no Python code runs between fork and exec).
SETPRIV = ["setpriv", "--pdeathsig", "KILL", "--"] if shutil.which("setpriv") else []


def _binary(env: str, name: str) -> Path:
    if os.environ.get(env):
        p = Path(os.environ[env])
        assert p.is_file(), "%s=%s does not exist" % (env, p)
        return p
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    p = target / "debug" / name
    if not p.is_file():
        pytest.skip("%s not built (set %s or run cargo build --workspace --bins)" % (p, env))
    return p


@pytest.fixture(scope="session")
def paramd_bin() -> Path:
    return _binary("PARAMD_BIN", "paramd")


@pytest.fixture(scope="session")
def paramctl_bin() -> Path:
    return _binary("PARAMCTL_BIN", "paramctl")


_NEXT_PORT = 0


def reserve_ports(n: int) -> List[int]:
    """Loopback ports free right now, for processes that must know each
    other's addresses before they start. As tests/src/lib.rs does, they are
    taken below the kernel's ephemeral range, so that no bind to port 0
    lands on one between a shard's stop and its restart."""
    global _NEXT_PORT
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            ephemeral_low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    low = max(ephemeral_low - 12000, 10000)
    span = max(ephemeral_low - low, 1)
    start = (os.getpid() * 2654435761) % span
    ports: List[int] = []
    for _ in range(span):
        if len(ports) == n:
            break
        port = low + (start + _NEXT_PORT) % span
        _NEXT_PORT += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    assert len(ports) == n, "no %d free ports below %d" % (n, ephemeral_low)
    return ports


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Daemon:
    """One `paramd` process, its log drained by a thread."""

    def __init__(self, binary: Path, args: List[str]):
        self.binary = binary
        self.args = args
        self.log: List[str] = []
        #: The HTTP address (/metrics), from the "paramd serving" line.
        self.http: Optional[str] = None
        self._ready = threading.Event()
        env = dict(os.environ, PARAMD_LOG="info")
        self.proc = subprocess.Popen(
            SETPRIV + [str(binary)] + args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = _ANSI.sub("", line.rstrip("\n"))
            self.log.append(line)
            if self.http is None and "paramd serving" in line:
                m = re.search(r"\bhttp=(\S+)", line)
                self.http = m.group(1) if m else None
            if "paramd ready" in line:
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 30.0) -> None:
        if not self._ready.wait(timeout) or self.proc.poll() is not None:
            self.stop()
            raise RuntimeError("paramd %s did not get ready:\n%s" % (" ".join(self.args), "\n".join(self.log)))

    def metric(self, name: str, **labels: str) -> float:
        """The value of one series on /metrics (0 when it is absent)."""
        assert self.http, "paramd logged no HTTP address:\n%s" % "\n".join(self.log)
        with urllib.request.urlopen("http://%s/metrics" % self.http, timeout=10) as r:
            body = r.read().decode()
        want = ",".join('%s="%s"' % kv for kv in sorted(labels.items()))
        for line in body.splitlines():
            if line.startswith("#") or " " not in line:
                continue
            series, value = line.rsplit(" ", 1)
            got_name, _, rest = series.partition("{")
            got = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
            if got_name == name and got == want:
                return float(value)
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Cluster:
    """`n` paramd shards on loopback; `url` is the coordinator's.

    `extra` are flags of every shard, `shard_args(i)` those of shard `i`
    alone; `scheme` and `host` make the URLs (`https` and `localhost` for a
    TLS cluster whose certificate names localhost)."""

    def __init__(
        self,
        binary: Path,
        n: int,
        extra: Optional[List[str]] = None,
        shard_args: Optional[Callable[[int], List[str]]] = None,
        scheme: str = "http",
        host: str = "127.0.0.1",
    ):
        self.binary = binary
        self.ports = reserve_ports(n)
        # The shard-to-shard service's own ports (a cluster needs them).
        self.peer_ports = reserve_ports(n) if n > 1 else []
        self.urls = ["%s://%s:%d" % (scheme, host, p) for p in self.ports]
        peers = ["%s://%s:%d" % (scheme, host, p) for p in self.peer_ports]
        self.url = self.urls[0]
        self.args: List[List[str]] = []
        for i, port in enumerate(self.ports):
            args = ["--listen", "127.0.0.1:%d" % port, "--http-listen", "127.0.0.1:0"]
            if n > 1:
                args += ["--shard-index", str(i), "--cluster", ",".join(self.urls)]
                args += ["--peer-listen", "127.0.0.1:%d" % self.peer_ports[i], "--peers", ",".join(peers)]
            args += list(extra or []) + list(shard_args(i) if shard_args else [])
            self.args.append(args)
        self.daemons: List[Daemon] = []
        try:
            for args in self.args:
                self.daemons.append(Daemon(binary, args))
            for d in self.daemons:
                d.wait_ready()
        except BaseException:
            self.stop()
            raise

    def client(self, **kw) -> paramd.Client:
        return paramd.Client(self.url, **kw)

    def start(self, i: int) -> Daemon:
        """Starts shard `i` again (after `stop`), with the same flags, and
        waits until it is ready."""
        assert self.daemons[i].proc.poll() is not None, "shard %d is running" % i
        self.daemons[i] = Daemon(self.binary, self.args[i])
        self.daemons[i].wait_ready()
        return self.daemons[i]

    def stop(self) -> None:
        for d in self.daemons:
            d.stop()


# Small chunks, so that even a small model is cut into several chunks and
# spread over every shard of a cluster.
CHUNK_BYTES = ["--chunk-bytes", "1024"]


@pytest.fixture(scope="session")
def one_shard(paramd_bin):
    c = Cluster(paramd_bin, 1, CHUNK_BYTES)
    yield c
    c.stop()


@pytest.fixture(scope="session")
def three_shards(paramd_bin):
    c = Cluster(paramd_bin, 3, CHUNK_BYTES)
    yield c
    c.stop()


@pytest.fixture(params=[1, 3], ids=["1-shard", "3-shards"])
def cluster(request):
    """Each test that takes it runs on one shard and on three."""
    return request.getfixturevalue("one_shard" if request.param == 1 else "three_shards")


@pytest.fixture
def job_name(request) -> str:
    """A job name no other test uses."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name)[:40]
    return "%s-%s" % (base, uuid.uuid4().hex[:8])


def wait_for(cond, timeout: float = 30.0, what: str = "condition"):
    """Polls `cond()` until it returns a true value, or fails after `timeout`."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.0f s waiting for %s" % (timeout, what))
        time.sleep(delay)
        delay = min(delay * 2, 0.5)
