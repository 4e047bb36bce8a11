"""The model a pack is made from: its ONNX bytes (from a file or a :class:`modelpress.Model`), the
folder its external data is relative to, and the bytes of each tensor worth packing."""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from modelpress.base.errors import InvalidModelError
from modelpress.packing import walk, wire
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


def _source_buffer(model: Any) -> tuple[Any, Path | None, str]:
    """Like :func:`source_bytes`, but a file is memory-mapped (read-only), not read: the packer
    copies each weight once, out of the page cache."""
    from modelpress.ir.model import Model

    path = None if isinstance(model, Model) else Path(model)
    if path is None or not path.is_file() or path.stat().st_size == 0:
        return source_bytes(model)
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), path.parent, str(path)


@dataclass
class Item:
    """One tensor to pack: where it is in the model, its bytes and what codecs are told."""

    index: int
    tensor: onnx.TensorProto
    data: bytes | memoryview
    info: TensorInfo
    external: dict[str, Any] | None
    codec: str = STORED
    blob: bytes = b""
    solid: int | None = None
    checksum: str = ""


@dataclass
class Source:
    """The model to pack, parsed: its proto (stripped if asked), the bytes it came from (a file's
    memory map), where its external data lives, and whether re-serialising the proto gives those
    bytes back. ``raws``: the inline weights left out of the parsed proto, by tensor index: where
    their bytes lie in ``data``."""

    proto: onnx.ModelProto
    data: Any
    original: int
    base: Path | None
    label: str
    identical: bool
    strip: bool
    raws: dict[int, tuple[int, int]] = field(default_factory=dict)

    def close(self) -> None:
        if isinstance(self.data, mmap.mmap):
            try:
                self.data.close()
            except BufferError:
                pass  # NOTE: a view is still alive (an error's frame): unmapped when it goes


def parse_source(model: Any, strip: bool) -> Source:
    data, base, label = (source_bytes if strip else _source_buffer)(model)
    proto = onnx.ModelProto()
    # NOTE: the weights' bytes are cut out at the wire level first: parsing them would copy every
    # weight into the proto, and reading a field copies it again
    cut = None if strip else wire.cut(data, MIN_PACKED_BYTES)
    try:
        proto.ParseFromString(data if cut is None else cut[0])
    except Exception as exc:
        raise InvalidModelError(f"{label}: not a valid ONNX model ({exc})") from None
    if not proto.HasField("graph"):
        raise InvalidModelError(f"{label}: not an ONNX model (no graph)")
    if cut is not None and cut[1] and max(cut[1]) >= sum(1 for _ in walk.tensors(proto)):
        cut = None  # NOTE: the walker and the proto disagree: parse everything
        proto.ParseFromString(data)
    original = len(data)
    if strip:
        strip_proto(proto)
        data = proto.SerializeToString()
    # NOTE: whether re-serialising gives ``data`` back is settled by the writer once the tensors'
    # bytes are out of the proto (:func:`reproduces`: no second copy of a large model); a stripped
    # model's bytes are its serialisation
    return Source(proto, data, original, base, label, strip, strip, {} if cut is None else cut[1])


_COMPARE_STEP = 1 << 18  # NOTE: bytes per compare: the temporary bool array stays in the cache


def same_bytes(a: bytes | bytearray | memoryview, b: bytes | bytearray | memoryview) -> bool:
    """``a == b`` for any two bytes-like objects at memory speed (``==`` on a memoryview compares
    element by element, ~100x slower on a large tensor; one ``array_equal`` on the whole tensor
    writes a bool per byte)."""
    if isinstance(a, bytes) or isinstance(b, bytes):
        a, b = (a, b) if isinstance(a, bytes) else (b, a)
        # NOTE: bytes.startswith takes any buffer and compares in place (memcmp)
        return len(a) == memoryview(b).nbytes and a.startswith(b)  # type: ignore[union-attr]
    if memoryview(a).nbytes <= _COMPARE_STEP:
        return bytes(a) == bytes(b)  # NOTE: two small copies cost less than numpy's set-up
    import numpy as np

    x, y = np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)
    if x.size != y.size:
        return False
    whole = x.size // 8 * 8  # NOTE: compared 8 bytes at a time (a bool per word, not per byte)
    x8, y8 = x[:whole].view(np.uint64), y[:whole].view(np.uint64)
    step = _COMPARE_STEP // 8
    return np.array_equal(x[whole:], y[whole:]) and all(
        np.array_equal(x8[i : i + step], y8[i : i + step]) for i in range(0, x8.size, step)
    )


class _Compare:
    """A write-only sink that checks what is written against ``data``, piece by piece."""

    def __init__(self, data: Any) -> None:
        self.data, self.view, self.pos, self.same = data, memoryview(data), 0, True

    def write(self, piece: Any) -> int:
        if isinstance(piece, _From):
            self.same = self.same and piece.start == self.pos
            self.pos += len(piece)
            return len(piece)
        n = memoryview(piece).nbytes
        if self.same and isinstance(self.data, bytes):
            # NOTE: bytes.startswith takes any buffer and compares in place (memcmp)
            self.same = self.data.startswith(piece, self.pos)
        elif self.same:
            self.same = same_bytes(self.view[self.pos : self.pos + n], piece)
        self.pos += n
        return n


class _From:
    """A tensor's bytes, known to be ``data[start : start + length]`` (they were cut from there):
    written where they came from, they match without comparing them."""

    __slots__ = ("length", "start")

    def __init__(self, start: int, length: int) -> None:
        self.start, self.length = start, length

    def __len__(self) -> int:
        return self.length


def reproduces(
    graph: bytes, items: list[Item], data: Any, raws: dict[int, tuple[int, int]] | None = None
) -> bool:
    """Whether ``graph`` (the serialised proto without the items' inline bytes) with those bytes
    put back is ``data`` byte for byte, compared as the wire splicer writes it (a tensor cut
    from ``data`` at ``raws[index]`` matches where it is written at the same offset)."""
    from modelpress.packing.wire import splice, tensor_spans

    spans = tensor_spans(graph)
    inline = [it for it in items if it.external is None]
    raws = raws or {}

    def fill(it: Item) -> Any:
        raw = raws.get(it.index)
        return it.data if raw is None else _From(raw[0], raw[1] - raw[0])

    if spans is not None and all(it.index < len(spans) for it in inline):
        fills = {spans[it.index][0]: (len(it.data), (lambda it=it: fill(it))) for it in inline}
        sink = _Compare(data)
        try:
            splice(graph, fills, sink)  # type: ignore[arg-type]
            return sink.same and sink.pos == len(data)
        except ValueError:
            pass  # NOTE: wire bytes the walker does not expect: the proto path below is always right
        finally:
            sink.view.release()
    proto = onnx.ModelProto()
    proto.ParseFromString(data)
    return proto.SerializeToString() == bytes(data)


def item(
    index: int,
    name: str,
    tensor: onnx.TensorProto,
    roles: dict[str, str],
    src: Source,
    externals: dict[str, list[tuple[int, int]]],
) -> Item | None:
    """The bytes of one tensor worth packing (inline ``raw_data`` or external data), else None."""
    nbytes = walk.nbytes(tensor)
    raw = src.raws.get(index)
    if raw is not None:
        # NOTE: a view of the file's map (or of the model's bytes): the weight is not copied
        data = memoryview(src.data)[raw[0] : raw[1]]
        if nbytes is None or len(data) != nbytes:
            tensor.raw_data = bytes(data)  # NOTE: malformed size: put back, left untouched
            return None
        return Item(index, tensor, data, _info(name, tensor, roles), None)
    if nbytes is None:
        return None
    base, label = src.base, src.label
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
                data = f.read(length)  # type: ignore[assignment]
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
        data = tensor.raw_data  # type: ignore[assignment]  # NOTE: read once: each read of a bytes field copies it
        if len(data) < MIN_PACKED_BYTES or len(data) != nbytes:
            return None  # NOTE: tiny, or a malformed size: leave it in the graph untouched
    else:
        return None
    return Item(index, tensor, data, _info(name, tensor, roles), external)


def _info(name: str, tensor: onnx.TensorProto, roles: dict[str, str]) -> TensorInfo:
    return TensorInfo(
        name,
        ir.DataType(tensor.data_type),
        tuple(int(d) for d in tensor.dims),
        roles.get(name, "other"),
    )
