"""The safetensors file format, written: what `Client.export` and
`paramctl export` produce (f32 tensors with their names and shapes, and
string metadata), readable by `safetensors.torch.load_file`."""

import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["write_safetensors"]


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
