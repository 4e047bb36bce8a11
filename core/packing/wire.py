"""Writing an unpacked model without re-serialising it: the packed graph's wire bytes, spliced.

A ``.mpk`` stores the graph as the serialised ``ModelProto`` with every packed tensor's
``raw_data`` cleared. Unpacking used to parse that graph, put each tensor's bytes back into the
proto and serialise the whole model again: three copies of every weight and a protobuf encoder
pass, for bytes that are known up front. This module walks the protobuf *wire format* of the
stored graph instead (only the messages on the way to tensors: model -> graph -> node ->
attribute -> tensor, subgraphs included), and streams out the original bytes with each
``raw_data`` field inserted where the encoder puts it (field 9 of ``TensorProto``, after the
fields numbered below 9) and every enclosing length prefix rewritten.

The result is byte for byte what ``SerializeToString`` gives for the filled proto (upb, like
every protobuf runtime, writes known fields in field-number order); the tests compare both on
models with subgraphs, ``Constant`` tensors and external data. Anything this walker does not
expect (group wire types, a tensor count that differs from :func:`modelpress.packing.walk.tensors`)
makes :func:`tensor_spans` return ``None`` and the caller falls back to the proto path.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from modelpress.base.wire import WireError, int64s, string_entry, tagged_fields, varint

__all__ = ["ModelTensors", "WireTensor", "cut", "model_tensors", "splice", "tensor_spans"]

# field numbers (onnx.proto3)
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_ATTRIBUTE = 5
_ATTR_T, _ATTR_G, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_TENSOR_RAW_DATA = 9
_RAW_TAG = bytes([(_TENSOR_RAW_DATA << 3) | 2])


class _Unexpected(WireError):
    """The wire bytes are not what this walker handles: use the proto path."""


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _messages(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """``(field number, key start, payload start, payload end)`` of each field of the message in
    ``buf[start:end]``, as :func:`modelpress.base.wire.tagged_fields` reads them; a field that is
    not length-delimited spans its key too (payload start = key start)."""
    for number, wire, tag, p0, p1 in tagged_fields(buf, start, end):
        yield number, tag, p0 if wire == 2 else tag, p1


def _graph_order(buf: memoryview, start: int, end: int, spans: list[tuple[int, int]]) -> None:
    """Append the tensor spans of this graph and its subgraphs in ``_tensors`` order: graphs in
    ``_graphs`` order (a graph, then its nodes' subgraphs depth first), each contributing its
    initializers, then its nodes' attribute tensors."""
    inits: list[tuple[int, int]] = []
    attr_tensors: list[tuple[int, int]] = []
    subgraphs: list[tuple[int, int]] = []
    for number, _tag, p0, p1 in _messages(buf, start, end):
        if number == _GRAPH_INITIALIZER:
            inits.append((p0, p1))
        elif number == _GRAPH_NODE:
            for n_number, _t, a0, a1 in _messages(buf, p0, p1):
                if n_number != _NODE_ATTRIBUTE:
                    continue
                for a_number, _t2, v0, v1 in _messages(buf, a0, a1):
                    if a_number in (
                        _ATTR_T,
                        _ATTR_TENSORS,
                    ):  # NOTE: t (5) then tensors (10), as _tensors yields them
                        attr_tensors.append((v0, v1))
                    elif a_number in (_ATTR_G, _ATTR_GRAPHS):
                        subgraphs.append((v0, v1))
    spans.extend(inits)
    spans.extend(attr_tensors)
    for g0, g1 in subgraphs:
        _graph_order(buf, g0, g1, spans)


def tensor_spans(graph: bytes | memoryview) -> list[tuple[int, int]] | None:
    """The byte span of every ``TensorProto`` in the serialised model ``graph``, in the order of
    :func:`modelpress.packing.walk.tensors`; ``None`` if the bytes hold something unexpected."""
    buf = memoryview(graph)
    spans: list[tuple[int, int]] = []
    try:
        for number, _tag, p0, p1 in _messages(buf, 0, len(buf)):
            if number == _MODEL_GRAPH:
                _graph_order(buf, p0, p1, spans)
    except (WireError, IndexError):
        return None
    return spans


class _Lazy:
    """A tensor's bytes, decoded only when written; its length is known beforehand."""

    __slots__ = ("fill", "length")

    def __init__(self, length: int, fill: Callable[[], bytes | memoryview]) -> None:
        self.length, self.fill = length, fill

    def __len__(self) -> int:
        return self.length

    def __call__(self) -> bytes | memoryview:
        data = self.fill()
        if len(data) != self.length:
            raise ValueError(f"a tensor decoded to {len(data)} bytes, not {self.length}")
        return data


Fill = tuple[int, Callable[[], "bytes | memoryview"]]


def splice(graph: bytes | memoryview, fills: dict[int, Fill], out: BinaryIO) -> int:
    """Write ``graph`` to ``out`` with ``raw_data`` put back into tensors. ``fills`` maps a tensor
    span's start (from :func:`tensor_spans`) to ``(length, get_bytes)``; ``get_bytes`` is called
    once per tensor, in file order, just before its bytes are written (so one decoded tensor is
    held at a time). Returns the bytes written; ``ValueError`` on wire bytes it does not expect.

    Protobuf writes lengths before contents, so the pieces are planned first (a tensor's length
    is known from the manifest), then written in one pass.
    """
    buf = memoryview(graph)
    try:
        pieces = _plan(buf, 0, len(buf), sorted(fills), fills, depth=0, kind="model")
    except (WireError, IndexError) as exc:
        raise ValueError(f"cannot splice the graph's wire bytes: {exc}") from None
    written = 0
    for piece in pieces:
        data = piece() if isinstance(piece, _Lazy) else piece
        out.write(data)
        written += len(data)
    return written


def _contains(starts: list[int], lo: int, hi: int) -> bool:
    i = bisect_left(starts, lo)
    return i < len(starts) and starts[i] <= hi


# the fields of each message kind that lead to tensors, and the kind of message they hold
_PATHS: dict[str, dict[int, str]] = {
    "model": {_MODEL_GRAPH: "graph"},
    "graph": {_GRAPH_NODE: "node", _GRAPH_INITIALIZER: "tensor"},
    "node": {_NODE_ATTRIBUTE: "attr"},
    "attr": {_ATTR_T: "tensor", _ATTR_TENSORS: "tensor", _ATTR_G: "graph", _ATTR_GRAPHS: "graph"},
}


def _plan(
    buf: memoryview,
    start: int,
    end: int,
    starts: list[int],
    fills: dict[int, Fill],
    *,
    depth: int,
    kind: str,
) -> list[Any]:
    """The pieces of message ``buf[start:end]`` (a ``kind``) with its tensors filled: slices of
    ``buf`` where nothing changes, re-encoded fields on the way to a filled tensor."""
    if depth > 64:
        raise _Unexpected("nesting deeper than 64")
    if kind == "tensor":
        fill = fills[start]
        if fill is _CUT:
            return _cut_pieces(buf, start, end)
        return _tensor_pieces(buf, start, end, _Lazy(*fill))
    pieces: list[Any] = []
    copied = start
    paths = _PATHS[kind]
    for number, tag, p0, p1 in _messages(buf, start, end):
        child = paths.get(number)
        if (
            child is None
            or not _contains(starts, p0, p1)
            or (child == "tensor" and p0 not in fills)
        ):
            continue
        inner = _plan(buf, p0, p1, starts, fills, depth=depth + 1, kind=child)
        key_end = varint(buf, tag)[1]
        pieces += [buf[copied:key_end], _encode_varint(sum(len(p) for p in inner)), *inner]
        copied = p1
    pieces.append(buf[copied:end])
    return pieces


def _tensor_pieces(buf: memoryview, start: int, end: int, data: _Lazy) -> list[Any]:
    """A tensor's fields with ``raw_data`` inserted in field-number order."""
    insert_at = end
    for number, tag, _p0, _p1 in _messages(buf, start, end):
        if number == _TENSOR_RAW_DATA:
            raise _Unexpected("a packed tensor still has raw_data")
        if number > _TENSOR_RAW_DATA:
            insert_at = tag
            break
    return [buf[start:insert_at], _RAW_TAG, _encode_varint(len(data)), data, buf[insert_at:end]]


_CUT: Any = ()  # NOTE: a ``fills`` value of :func:`_plan` that drops the tensor's raw_data instead


def _raw_span(buf: memoryview, start: int, end: int) -> tuple[int, int] | None:
    """Where the ``raw_data`` payload of the tensor ``buf[start:end]`` lies, if it has one."""
    span = None
    for number, _tag, p0, p1 in _messages(buf, start, end):
        if number == _TENSOR_RAW_DATA:
            span = (p0, p1)  # NOTE: protobuf keeps the last of a repeated scalar field
    return span


def _cut_pieces(buf: memoryview, start: int, end: int) -> list[Any]:
    """A tensor's fields without its ``raw_data``."""
    pieces: list[Any] = []
    copied = start
    for number, tag, _p0, p1 in _messages(buf, start, end):
        if number == _TENSOR_RAW_DATA:
            pieces.append(buf[copied:tag])
            copied = p1
    pieces.append(buf[copied:end])
    return pieces


def cut(
    model: bytes | memoryview, min_bytes: int
) -> tuple[bytes, dict[int, tuple[int, int]]] | None:
    """The serialised model without the ``raw_data`` of any tensor that holds at least
    ``min_bytes`` of it, and where each removed payload lies in ``model`` (by the tensor's place
    in :func:`modelpress.packing.walk.tensors` order): the weights are then never copied by a
    protobuf parse. ``None`` on wire bytes this walker does not expect."""
    buf = memoryview(model)
    spans = tensor_spans(buf)
    if spans is None:
        return None
    raws: dict[int, tuple[int, int]] = {}
    try:
        for index, (t0, t1) in enumerate(spans):
            raw = _raw_span(buf, t0, t1)
            if raw is not None and raw[1] - raw[0] >= min_bytes:
                raws[index] = raw
        fills = {spans[i][0]: _CUT for i in raws}
        pieces = _plan(buf, 0, len(buf), sorted(fills), fills, depth=0, kind="model")
    except (WireError, IndexError):
        return None
    return b"".join(pieces), raws


# -- the tensors of a serialised model, read without a protobuf parse ------------------------------

# field numbers (onnx.proto3) of what model_tensors reads
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE = 1, 2, 3, 4
_ATTR_NAME = 1
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_EXTERNAL, _TENSOR_LOCATION = 1, 2, 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass
class WireTensor:
    """One tensor of a serialised model, as :func:`model_tensors` reads it: its name (as
    :func:`modelpress.packing.walk.tensors` names it), element type, dims, external-data entries
    (``None`` unless its data location is external) and its span in the bytes."""

    name: str
    data_type: int
    dims: list[int]
    external: dict[str, str] | None
    span: tuple[int, int]


@dataclass
class ModelTensors:
    """Every tensor of a model in :func:`modelpress.packing.walk.tensors` order, and the role of
    each name (:func:`modelpress.packing.walk.roles`)."""

    tensors: list[WireTensor] = field(default_factory=list)
    roles: dict[str, str] = field(default_factory=dict)


def model_tensors(model: bytes | memoryview) -> ModelTensors | None:
    """The tensors and roles of the serialised model ``model``, read from its wire bytes (no onnx
    import, no parse: what ``unpack`` needs to put each tensor back); ``None`` on bytes this
    walker does not expect (the caller parses the model instead)."""
    buf = memoryview(model)
    found = ModelTensors()
    try:
        for number, _tag, p0, p1 in _messages(buf, 0, len(buf)):
            if number == _MODEL_GRAPH:
                _read_graph(buf, p0, p1, found, 0)
    except (WireError, IndexError, UnicodeDecodeError):
        return None
    return found


def _text(buf: memoryview, p0: int, p1: int) -> str:
    return bytes(buf[p0:p1]).decode("utf-8")


def _read_graph(buf: memoryview, start: int, end: int, found: ModelTensors, depth: int) -> None:
    """A graph's initializers, then its nodes' attribute tensors, then its subgraphs (depth first),
    as :func:`modelpress.packing.walk.tensors` orders them; the roles its nodes give their inputs."""
    if depth > 64:
        raise _Unexpected("nesting deeper than 64")
    inits: list[WireTensor] = []
    attr_tensors: list[WireTensor] = []
    subgraphs: list[tuple[int, int]] = []
    for number, _tag, p0, p1 in _messages(buf, start, end):
        if number == _GRAPH_INITIALIZER:
            inits.append(_read_tensor(buf, p0, p1, None))
        elif number == _GRAPH_NODE:
            _read_node(buf, p0, p1, found.roles, attr_tensors, subgraphs)
    found.tensors += inits + attr_tensors
    for g0, g1 in subgraphs:
        _read_graph(buf, g0, g1, found, depth + 1)


def _read_node(
    buf: memoryview,
    start: int,
    end: int,
    roles: dict[str, str],
    tensors: list[WireTensor],
    subgraphs: list[tuple[int, int]],
) -> None:
    from modelpress.packing.walk import input_role

    inputs: list[str] = []
    outputs: list[str] = []
    attributes: list[tuple[int, int]] = []
    name = op_type = ""
    for number, _tag, p0, p1 in _messages(buf, start, end):
        if number == _NODE_INPUT:
            inputs.append(_text(buf, p0, p1))
        elif number == _NODE_OUTPUT:
            outputs.append(_text(buf, p0, p1))
        elif number == _NODE_NAME:
            name = _text(buf, p0, p1)
        elif number == _NODE_OP_TYPE:
            op_type = _text(buf, p0, p1)
        elif number == _NODE_ATTRIBUTE:
            attributes.append((p0, p1))
    for i, value in enumerate(inputs):
        role = input_role(op_type, i)
        if role is not None:
            roles.setdefault(value, role)
    for a0, a1 in attributes:
        parts = list(_messages(buf, a0, a1))
        attr = next((_text(buf, p0, p1) for n, _t, p0, p1 in parts if n == _ATTR_NAME), "")
        label = outputs[0] if op_type == "Constant" and outputs else f"{name or op_type}.{attr}"
        for number, _tag, p0, p1 in parts:
            if number in (_ATTR_T, _ATTR_TENSORS):
                tensors.append(_read_tensor(buf, p0, p1, label))
            elif number in (_ATTR_G, _ATTR_GRAPHS):
                subgraphs.append((p0, p1))


def _read_tensor(buf: memoryview, start: int, end: int, label: str | None) -> WireTensor:
    """A ``TensorProto``'s name, element type, dims and external data (``label``: the name
    :func:`modelpress.packing.walk.tensors` gives an attribute's tensor)."""
    tensor = WireTensor(label or "", 0, [], None, (start, end))
    entries: dict[str, str] = {}
    location = 0
    for number, wire, _tag, p0, p1 in tagged_fields(buf, start, end):
        if number == _TENSOR_DIMS:
            tensor.dims += _int64s(buf, wire, p0, p1)
        elif number == _TENSOR_DATA_TYPE and wire == 0:
            tensor.data_type = varint(buf, p0)[0]
        elif number == _TENSOR_NAME and label is None and wire == 2:
            tensor.name = _text(buf, p0, p1)
        elif number == _TENSOR_EXTERNAL and wire == 2:
            key, value = string_entry(buf, p0, p1)
            entries[key] = value
        elif number == _TENSOR_LOCATION and wire == 0:
            location = varint(buf, p0)[0]
    if location == _EXTERNAL:
        tensor.external = entries
    return tensor


def _int64s(buf: memoryview, wire: int, p0: int, p1: int) -> list[int]:
    """The int64 values of a repeated field (packed or not), two's complement read back."""
    if wire not in (0, 2):
        raise _Unexpected(f"dims of wire type {wire}")
    return list(int64s(buf, wire, p0, p1))
