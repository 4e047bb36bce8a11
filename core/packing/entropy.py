"""``modelpress inspect --entropy``: per packable tensor, its order-0 entropy and what the best codec makes of it."""

from __future__ import annotations

from typing import Any

from modelpress.packing import walk
from modelpress.packing.codec_choice import encode_best
from modelpress.packing.source import Source, item, parse_source
from modelpress.plugin.codec import TensorInfo
from modelpress.plugin.registry import Registry, current_registry

__all__ = ["tensor_report"]


def _element_entropy(data: bytes, info: TensorInfo) -> float | None:
    """Order-0 entropy of the tensor's element values in bits per element (the bound a
    Huffman/ANS coder of single elements approaches); None for sub-byte types."""
    import numpy as np

    from modelpress.plugin.codec import numpy_dtype

    dt = numpy_dtype(info.dtype)
    if dt is None or not data:
        return None
    _, counts = np.unique(np.frombuffer(data, dt), return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def tensor_report(model: Any, *, registry: Registry | None = None) -> list[dict[str, Any]]:
    """Per packable tensor: dtype, shape, bytes, element width (``bits``), order-0 entropy of the
    element values (``entropy_bits``, bits/element) and the best codec's blob size and ratio."""
    registry = registry or current_registry()
    codecs = registry.codecs()
    src = parse_source(model, strip=False)
    try:
        return _rows(src, codecs)
    finally:
        src.close()


def _rows(src: Source, codecs: list[Any]) -> list[dict[str, Any]]:
    roles = walk.roles(src.proto.graph)
    rows = []
    for index, (name, tensor) in enumerate(walk.tensors(src.proto)):
        item_ = item(index, name, tensor, roles, src, {})
        if item_ is None:
            continue
        codec, blob = encode_best(item_.data, item_.info, codecs, prefer="size")
        info = item_.info
        rows.append(
            {
                "name": name,
                "dtype": info.dtype.name.lower(),
                "shape": list(info.shape),
                "role": info.role,
                "bytes": len(item_.data),
                "bits": info.dtype.bitwidth,
                "entropy_bits": _element_entropy(item_.data, info),
                "codec": codec,
                "packed_bytes": len(blob),
                "ratio": len(item_.data) / max(len(blob), 1),
            }
        )
    return rows
