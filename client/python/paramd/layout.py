"""Where a job's chunks live, and cutting tensors into the segments each
shard receives; the inverse for pulled segments. Pure numpy, no I/O.

Chunk `i` of a job is the `i`-th in canonical order: parameters in the
layout's order, each cut into runs of `chunk_elems` elements (the last
shorter). `owners[i]` is the shard holding chunk `i`.
"""

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import Error, InvalidArgument
from .v1 import paramd_pb2 as pb

__all__ = ["Route", "MESSAGE_BYTES", "segments", "pack", "as_f32", "Assembler"]

#: Largest segment a tensor is cut into, and the payload packed into one
#: message: far below the server's 64 MiB message limit whatever the model.
MESSAGE_BYTES = 4 << 20

_F32 = np.dtype("<f4")


def as_f32(name: str, values) -> np.ndarray:
    """`values` (a numpy array, a CPU tensor's `.numpy()`, a list) as a flat
    contiguous little-endian f32 array, copied only when it must be."""
    a = np.asarray(values)
    if a.dtype != _F32:
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise Error("tensor %r has dtype %s; expected floats" % (name, a.dtype))
        a = a.astype(_F32)
    return np.ascontiguousarray(a).reshape(-1)


def segments(name: str, flat: np.ndarray, start: int = 0, stop: Optional[int] = None) -> List["pb.Segment"]:
    """Elements `[start, stop)` of a flat f32 array as segments of at most
    MESSAGE_BYTES. An empty tensor is one empty segment, so it is still sent."""
    stop = flat.size if stop is None else stop
    if stop <= start:
        return [pb.Segment(param=name, offset=start, data=b"")]
    step = MESSAGE_BYTES // 4
    return [
        pb.Segment(param=name, offset=off, data=flat[off : min(off + step, stop)].tobytes())
        for off in range(start, stop, step)
    ]


def pack(segs: Sequence["pb.Segment"], limit: int = MESSAGE_BYTES) -> List[List["pb.Segment"]]:
    """Groups segments into messages of at most `limit` bytes of payload (a
    larger single segment gets a message of its own)."""
    out: List[List[pb.Segment]] = []
    size = 0
    for s in segs:
        n = len(s.data)
        if not out or (size + n > limit and out[-1]):
            out.append([])
            size = 0
        out[-1].append(s)
        size += n
    return out


class Route:
    """A job's layout: the shards' addresses and the owner of every chunk."""

    def __init__(self, layout: "pb.LayoutResponse", job: str = ""):
        self.job = job
        self.shards: List[str] = list(layout.shards)
        self.chunk_elems = int(layout.chunk_elems)
        if self.chunk_elems <= 0:
            raise Error("layout of %r: chunk_elems is %d" % (job, self.chunk_elems))
        #: name -> (first chunk id, element count)
        self.params: Dict[str, Tuple[int, int]] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.order: List[str] = []
        nxt = 0
        for p in layout.params:
            shape = tuple(int(d) for d in p.shape)
            numel = int(np.prod(shape, dtype=np.int64))
            self.params[p.name] = (nxt, numel)
            self.shapes[p.name] = shape
            self.order.append(p.name)
            nxt += -(-numel // self.chunk_elems)
        self.owners = np.asarray(layout.owners, dtype=np.int64)
        if nxt != self.owners.size:
            raise Error("layout of %r has %d owners for %d chunks" % (job, self.owners.size, nxt))
        n = max(1, len(self.shards))
        if self.owners.size and (self.owners.max() >= n or self.owners.min() < 0):
            raise Error("layout of %r names shard %d of %d" % (job, int(self.owners.max()), n))
        self.n_shards = n

    def check(self, tensors: Mapping[str, np.ndarray], what: str) -> None:
        """Refuses tensors that do not cover the job's parameters exactly
        (unknown names, wrong sizes, missing ones). On a cluster each shard
        only sees its own chunks, so this is where a malformed push is
        refused whole, before any shard has counted part of it."""
        for name, flat in tensors.items():
            where = self.params.get(name)
            if where is None:
                known = ", ".join(repr(n) for n in self.order[:8]) + (", ..." if len(self.order) > 8 else "")
                raise InvalidArgument("%s: unknown parameter %r (job %r has %s)" % (what, name, self.job, known))
            if where[1] != flat.size:
                raise InvalidArgument(
                    "%s: %r has %d values; its shape %s holds %d"
                    % (what, name, flat.size, list(self.shapes[name]), where[1])
                )
        missing = [n for n in self.order if n not in tensors]
        if missing:
            raise InvalidArgument(
                "%s: parameter %s missing; a push covers every parameter of job %r"
                % (what, ", ".join(repr(n) for n in missing), self.job)
            )

    def split(self, tensors: Mapping[str, np.ndarray]) -> List[List["pb.Segment"]]:
        """Cuts flat f32 tensors (checked by `check`) into one list of
        segments per shard, each chunk to the shard that owns it."""
        out: List[List[pb.Segment]] = [[] for _ in range(self.n_shards)]
        ce = self.chunk_elems
        for name, flat in tensors.items():
            first, numel = self.params[name]
            k = 0
            # Consecutive chunks on the same shard travel as one run (cut
            # into segments of MESSAGE_BYTES), not one segment per chunk.
            n_chunks = -(-numel // ce)
            while k < n_chunks:
                owner = int(self.owners[first + k])
                j = k + 1
                while j < n_chunks and int(self.owners[first + j]) == owner:
                    j += 1
                out[owner].extend(segments(name, flat, k * ce, min(j * ce, numel)))
                k = j
        return out


class Assembler:
    """Writes pulled segments into preallocated arrays, one per parameter."""

    def __init__(self, shapes: Optional[Mapping[str, Tuple[int, ...]]] = None):
        self.shapes = dict(shapes or {})
        self.flat: Dict[str, np.ndarray] = {}
        self.filled: Dict[str, int] = {}

    def place(self, seg: "pb.Segment") -> None:
        data = seg.data
        if len(data) % 4:
            raise Error("server sent %d bytes for %r, not a multiple of 4" % (len(data), seg.param))
        values = np.frombuffer(data, dtype=_F32)
        off = int(seg.offset)
        end = off + values.size
        arr = self.flat.get(seg.param)
        if arr is None:
            shape = self.shapes.get(seg.param)
            size = int(np.prod(shape, dtype=np.int64)) if shape is not None else end
            arr = np.empty(max(size, end), dtype=_F32)
            self.flat[seg.param] = arr
            self.filled[seg.param] = 0
        elif arr.size < end:
            grown = np.empty(end, dtype=_F32)
            grown[: arr.size] = arr
            arr = self.flat[seg.param] = grown
        arr[off:end] = values
        self.filled[seg.param] += values.size

    def arrays(self, expected: Sequence[str] = ()) -> Dict[str, np.ndarray]:
        """Every parameter received, shaped as the layout says; each of
        `expected` must have arrived whole."""
        out = {}
        for name in expected:
            if name not in self.flat:
                shape = self.shapes.get(name, ())
                if int(np.prod(shape, dtype=np.int64)) != 0:
                    raise Error("the server sent no values for %r" % name)
                out[name] = np.empty(shape, dtype=_F32)
        for name, flat in self.flat.items():
            shape = self.shapes.get(name)
            if shape is not None:
                numel = int(np.prod(shape, dtype=np.int64))
                if self.filled[name] != numel or flat.size != numel:
                    raise Error("pulled %d of the %d values of %r" % (self.filled[name], numel, name))
                out[name] = flat.reshape(shape)
            else:
                out[name] = flat
        return out
