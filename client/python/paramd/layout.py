"""A job's layout as the Python side needs it (names, shapes, order), and
the one conversion of tensors into what the native client reads. Routing
chunks to shards, cutting and packing segments, and placing pulled values
are done by the native core (`paramd._native`, the Rust client).
"""

from typing import Dict, List, Tuple

import numpy as np

from .errors import Error, InvalidArgument
from .v1 import paramd_pb2 as pb

__all__ = ["Route", "as_f32"]

_F32 = np.dtype("<f4")


def as_f32(name: str, values) -> np.ndarray:
    """`values` (a numpy array, a CPU tensor's `.numpy()`, a list) as a flat
    contiguous little-endian f32 array: the same memory when it is one
    already (no copy), else converted once."""
    a = np.asarray(values)
    if a.dtype != _F32:
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise Error("tensor %r has dtype %s; expected floats" % (name, a.dtype))
        a = a.astype(_F32)
    return np.ascontiguousarray(a).reshape(-1)


WIRE_DTYPES = ("f32", "bf16", "f16")


def check_wire(wire: str) -> str:
    """`wire` if it names a wire dtype, else a refusal naming it."""
    if wire not in WIRE_DTYPES:
        raise InvalidArgument("wire must be one of %s, got %r" % (", ".join(map(repr, WIRE_DTYPES)), wire))
    return wire


class Route:
    """A job's parameters: names in the layout's order, and their shapes."""

    def __init__(self, layout: "pb.LayoutResponse", job: str = ""):
        self.job = job
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self.order: List[str] = []
        for p in layout.params:
            self.shapes[p.name] = tuple(int(d) for d in p.shape)
            self.order.append(p.name)
