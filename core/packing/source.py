"""The model a pack is made from: its ONNX bytes (from a file or a :class:`modelpress.Model`), the
folder its external data is relative to, and the bytes of each tensor worth packing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from modelpress.base.errors import InvalidModelError
from modelpress.packing import walk
from modelpress.packing.format import MIN_PACKED_BYTES, STORED
from modelpress.packing.strip import strip as strip_proto
from modelpress.plugin.codec import TensorInfo

__all__ = ["Item", "Source", "item", "parse_source", "source_bytes"]


def source_bytes(model: Any) -> tuple[bytes, Path | None, str]:
    """The ONNX bytes to pack, the folder external data is relative to, and a label."""
    from modelpress.ir.model import Model

    if isinstance(model, Model):
        if any(
            isinstance(v.const_value, ir.ExternalTensor)
            for v in model.ir.graph.initializers.values()
        ):
            base = Path(model.path).parent if model.path else None
            proto = model.to_proto()
            return proto.SerializeToString(), base, model.name
        return model.to_proto().SerializeToString(), None, model.name
    path = Path(model)
    if not path.is_file():
        raise InvalidModelError(f"{str(path)!r}: no such file")
    return path.read_bytes(), path.parent, str(path)


@dataclass
class Item:
    """One tensor to pack: where it is in the model, its bytes and what codecs are told."""

    index: int
    tensor: onnx.TensorProto
    data: bytes
    info: TensorInfo
    external: dict[str, Any] | None
    codec: str = STORED
    blob: bytes = b""
    solid: int | None = None
    checksum: str = ""


@dataclass
class Source:
    """The model to pack, parsed: its proto (stripped if asked), the bytes it came from, where its
    external data lives, and whether re-serialising the proto gives those bytes back."""

    proto: onnx.ModelProto
    data: bytes
    original: int
    base: Path | None
    label: str
    identical: bool
    strip: bool


def parse_source(model: Any, strip: bool) -> Source:
    data, base, label = source_bytes(model)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:
        raise InvalidModelError(f"{label}: not a valid ONNX model ({exc})") from None
    if not proto.HasField("graph"):
        raise InvalidModelError(f"{label}: not an ONNX model (no graph)")
    original = len(data)
    if strip:
        strip_proto(proto)
        data = proto.SerializeToString()
    # NOTE: whether re-serialising gives ``data`` back is settled by the writer once the tensors'
    # bytes are out of the proto (:func:`reproduces`: no second copy of a large model); a stripped
    # model's bytes are its serialisation
    return Source(proto, data, original, base, label, strip, strip)


_COMPARE_STEP = 1 << 18  # NOTE: bytes per compare: the temporary bool array stays in the cache


def same_bytes(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bool:
    """``a == b`` for any two bytes-like objects at memory speed (``==`` on a memoryview compares
    element by element, ~100x slower on a large tensor; one ``array_equal`` on the whole tensor
    writes a bool per byte)."""
    if isinstance(a, bytes) and isinstance(b, bytes):
        return a == b
    import numpy as np

    x, y = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    return x.size == y.size and all(
        np.array_equal(x[i : i + _COMPARE_STEP], y[i : i + _COMPARE_STEP])
        for i in range(0, len(x), _COMPARE_STEP)
    )


class _Compare:
    """A write-only sink that checks what is written against ``data``, piece by piece."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.same = memoryview(data), 0, True

    def write(self, piece: bytes | memoryview) -> int:
        n = len(piece)
        if self.same:
            self.same = same_bytes(self.data[self.pos : self.pos + n], piece)
        self.pos += n
        return n


def reproduces(graph: bytes, items: list[Item], data: bytes) -> bool:
    """Whether ``graph`` (the serialised proto without the items' inline bytes) with those bytes
    put back is ``data`` byte for byte, compared as the wire splicer writes it."""
    from modelpress.packing.wire import splice, tensor_spans

    spans = tensor_spans(graph)
    inline = [it for it in items if it.external is None]
    if spans is not None and all(it.index < len(spans) for it in inline):
        fills = {spans[it.index][0]: (len(it.data), (lambda it=it: it.data)) for it in inline}
        sink = _Compare(data)
        try:
            splice(graph, fills, sink)  # type: ignore[arg-type]
            return sink.same and sink.pos == len(data)
        except ValueError:
            pass  # NOTE: wire bytes the walker does not expect: the proto path below is always right
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    return proto.SerializeToString() == data


def item(
    index: int,
    name: str,
    tensor: onnx.TensorProto,
    roles: dict[str, str],
    base: Path | None,
    label: str,
    externals: dict[str, list[tuple[int, int]]],
) -> Item | None:
    """The bytes of one tensor worth packing (inline ``raw_data`` or external data), else None."""
    nbytes = walk.nbytes(tensor)
    if nbytes is None:
        return None
    external = None
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = walk.external_info(tensor)
        if base is None:
            raise InvalidModelError(
                f"{label}: initializer {tensor.name!r} has external data but the model has no folder"
            )
        path = walk.safe_location(base, info.get("location", ""), label, tensor.name)
        offset = int(info.get("offset", 0) or 0)
        length = int(info.get("length", nbytes) or nbytes)
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read(length)
        except OSError as exc:
            raise InvalidModelError(
                f"{label}: external data of initializer {tensor.name!r} cannot be read: {exc.strerror}"
            ) from None
        if len(data) != length:
            raise InvalidModelError(
                f"{label}: external data of initializer {tensor.name!r} is truncated ({len(data)} of {length} bytes)"
            )
        external = {"location": info["location"], "offset": offset}
        externals.setdefault(info["location"], []).append((offset, length))
    elif tensor.HasField("raw_data"):
        data = tensor.raw_data  # NOTE: read once: each read of a bytes field copies it
        if len(data) < MIN_PACKED_BYTES or len(data) != nbytes:
            return None  # NOTE: tiny, or a malformed size: leave it in the graph untouched
    else:
        return None
    info_ = TensorInfo(
        name,
        ir.DataType(tensor.data_type),
        tuple(int(d) for d in tensor.dims),
        roles.get(name, "other"),
    )
    return Item(index, tensor, data, info_, external)
