"""Fake shards: grpcio servers implementing the paramd service in Python,
for tests of the client's routing, errors and retries without a daemon.

Their gRPC stubs are generated here from the repository's proto with
grpcio-tools (the package itself carries only the message classes)."""

import importlib.util
import tempfile
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_tools import protoc

from paramd.v1 import paramd_pb2 as pb

PROTO_ROOT = Path(__file__).resolve().parents[3] / "proto" / "proto"
PROTO = "paramd/v1/paramd.proto"


def generate(out: Path, *kinds: str) -> None:
    """Runs grpcio-tools on the proto: `kinds` among python, pyi, grpc_python."""
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = ["protoc", "-I%s" % PROTO_ROOT, "-I%s" % include]
    args += ["--%s_out=%s" % (k, out) for k in kinds]
    if protoc.main(args + [PROTO]) != 0:
        raise RuntimeError("grpcio-tools failed on %s" % (PROTO_ROOT / PROTO))


def _grpc_stubs():
    out = Path(tempfile.mkdtemp(prefix="paramd-stubs-"))
    generate(out, "grpc_python")
    path = out / "paramd" / "v1" / "paramd_pb2_grpc.py"
    spec = importlib.util.spec_from_file_location("paramd_pb2_grpc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pb_grpc = _grpc_stubs()


class FakeShard(pb_grpc.ParamServerServicer):
    """Records what it receives; answers as told."""

    def __init__(self):
        self.pushes = []  # (worker, round, [(param, offset, values)])
        self.metadata = []
        self.fail = None  # (code, message[, paramd-reason]) for every call
        self.unavailable = 0  # answer UNAVAILABLE this many times first
        self.aborted = 0  # answer pushes ABORTED this many times first
        self.at_least = 0  # pulls answer from this round at the earliest
        self.first_messages = []
        self.pulled = []  # the round of every pull
        self.layout = None
        self.calls = 0

    def _enter(self, context):
        self.calls += 1
        self.metadata.append(dict(context.invocation_metadata()))
        if self.unavailable > 0:
            self.unavailable -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "starting up")
        if self.fail is not None:
            code, message, *reason = self.fail
            if reason:
                context.set_trailing_metadata([("paramd-reason", reason[0])])
            context.abort(code, message)

    def Layout(self, request, context):
        self._enter(context)
        return self.layout

    def Status(self, request, context):
        self._enter(context)
        return pb.StatusResponse(jobs=[pb.JobStatus(job=request.job, round=3)])

    def Push(self, request_iterator, context):
        self._enter(context)
        if self.aborted > 0:
            self.aborted -= 1
            context.abort(grpc.StatusCode.ABORTED, "already being received")
        first, segs = None, []
        for m in request_iterator:
            if first is None:
                self.first_messages.append(m)
            first = first or m
            segs += [(s.param, s.offset, np.frombuffer(s.data, "<f4").tolist()) for s in m.grads]
        self.pushes.append((first.worker, first.round, segs))
        return pb.PushResponse(duplicate=False, pushed=1)

    def Pull(self, request, context):
        self._enter(context)
        _, _, segs = self.pushes[-1]
        self.pulled.append(request.round)
        got = max(request.round, self.at_least)
        yield pb.PullResponse(
            round=got,
            last=pb.RoundOutcome(round=got - 1, lr=[0.5]),
            params=[pb.Segment(param=p, offset=o, data=np.asarray(v, "<f4").tobytes()) for p, o, v in segs],
        )


def serve(n: int, layout):
    """`n` fake shards on loopback, shard 0 serving `layout(urls)`; returns
    (shards, urls, stop)."""
    shards, servers, urls = [], [], []
    for _ in range(n):
        # paramd's message limit (64 MiB), not grpcio's default 4 MiB.
        limit = 64 << 20
        s = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4),
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)],
        )
        fake = FakeShard()
        pb_grpc.add_ParamServerServicer_to_server(fake, s)
        port = s.add_insecure_port("127.0.0.1:0")
        s.start()
        shards.append(fake)
        servers.append(s)
        urls.append("http://127.0.0.1:%d" % port)
    shards[0].layout = layout(urls)

    def stop():
        for s in servers:
            s.stop(None)

    return shards, urls, stop


@pytest.fixture
def fakes():
    """Three fake shards on loopback; shard 0 serves a layout naming all three."""
    # w: 10 elements in chunks of 4 (owners 2, 0, 1); b: 3 elements (owner 2).
    shards, urls, stop = serve(
        3,
        lambda urls: pb.LayoutResponse(
            shards=urls,
            chunk_elems=4,
            params=[pb.ParamSpec(name="w", shape=[2, 5]), pb.ParamSpec(name="b", shape=[3])],
            owners=[2, 0, 1, 2],
        ),
    )
    yield shards, urls
    stop()
