"""Reading one weight at a time, from its file when it is external data (weight-only and int8-dynamic).

A large model's weights stay on disk until a pass needs them; the pass reads one weight (or a few
rows of it), quantizes it and drops the float copy, and the source model caches nothing.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from modelpress.plugin_api import WeightedLayer

__all__ = ["FileRows", "read_weight"]


class FileRows:
    """Rows ``[r0:r1]`` of an external-data float32 matrix ``[K, N]`` (an N-D tensor is read as
    ``[shape[0], rest]``), read with ``pread``: no memory map, so the pages read are not charged to the
    process once a chunk is done."""

    def __init__(self, tensor: ir.ExternalTensor):
        self.path, self.offset = tensor.path, int(tensor.offset or 0)
        dims = [int(d) for d in tensor.shape.numpy()]
        self.shape = (dims[0], int(np.prod(dims[1:], dtype=np.int64)))

    def __getitem__(self, rows: slice) -> np.ndarray:
        k, n = self.shape
        r0, r1, _ = rows.indices(k)
        with open(self.path, "rb") as f:
            f.seek(self.offset + r0 * n * 4)
            data = np.fromfile(f, np.float32, count=(r1 - r0) * n)
        return data.reshape(r1 - r0, n)


def read_weight(layer: WeightedLayer) -> np.ndarray:
    """The layer's weight as stored (a fresh float32 array when it is external data: read from
    its file, nothing mapped or cached), else the in-memory array itself (do not write into it)."""
    tensor = layer.weight.const_value
    assert tensor is not None
    if (
        isinstance(tensor, ir.ExternalTensor)
        and tensor.dtype == ir.DataType.FLOAT
        and len(tensor.shape) == 2
    ):
        return FileRows(tensor)[:]
    return layer.weight_array()
