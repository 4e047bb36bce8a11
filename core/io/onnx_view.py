"""A light reader of ``.onnx`` files: the read-only graph view (:mod:`modelpress.ir.view`) from
the protobuf wire format, without importing onnx, onnx-ir or ONNX Runtime.

``modelpress inspect model.onnx`` describes a model through it: opening a file costs what reading
its messages costs (tensor bytes are skipped in a memory map, never copied), instead of the
import of onnx, onnx-ir (which brings ml_dtypes and sympy) and the plugins, about a second of CPU.
:func:`modelpress.app.describe.describe` computes the same figures on this view as on a loaded
:class:`~modelpress.Model`: parameters, weight bytes, op counts, weighted layers, signature.

The view answers only for a file that loading would leave as it is. Anything else raises
:class:`CannotAnswer` and the caller loads the model (``modelpress.load``): a graph that
normalisation on import would change (``Constant``, ``Identity`` or ``BatchNormalization``
nodes, nodes of constants only, dead nodes or unused initializers), subgraphs (If/Loop/Scan),
functions, sparse or string tensors, external data that is not plainly beside the file, a file
the torch exporter wrote (the torch adapter renames its layers), a graph output whose type only
shape inference would complete, a shape of an intermediate value, and any byte it does not
expect. It does not validate: the ONNX checker runs when a model is loaded. Nor does it run
shape inference: a graph output is typed as the file declares it, so a named dimension that
inference would find fixed (declared ``[N, 3]``, computed ``[2, 3]``) stays named here.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from modelpress.base.wire import WireError, fields, int64s, signed, string_entry, varint
from modelpress.ir.counting import quantization_parameter
from modelpress.ir.provenance import PROVENANCE_KEY, Provenance
from modelpress.ir.signature import Signature

__all__ = ["CannotAnswer", "OnnxFileView", "read_onnx"]


class CannotAnswer(Exception):
    """The light reader cannot give what loading the model would: load it instead."""


# ONNX TensorProto.DataType -> (numpy dtype name, bytes per element); string and the types
# numpy has no name for without ml_dtypes are left out (CannotAnswer)
_DTYPES: dict[int, tuple[str | None, float]] = {
    1: ("float32", 4),
    2: ("uint8", 1),
    3: ("int8", 1),
    4: ("uint16", 2),
    5: ("int16", 2),
    6: ("int32", 4),
    7: ("int64", 8),
    9: ("bool", 1),
    10: ("float16", 2),
    11: ("float64", 8),
    12: ("uint32", 4),
    13: ("uint64", 8),
    14: ("complex64", 8),
    15: ("complex128", 16),
    16: (None, 2),  # bfloat16
    17: (None, 1),  # float8 e4m3fn, e4m3fnuz, e5m2, e5m2fnuz
    18: (None, 1),
    19: (None, 1),
    20: (None, 1),
    21: (None, 0.5),  # uint4, int4
    22: (None, 0.5),
}


class _DType(int):
    """An ONNX element type number that, like onnx-ir's ``DataType``, says its numpy dtype."""

    def numpy(self) -> Any:
        import numpy as np

        name = _DTYPES.get(int(self), (None, 0))[0]
        if name is None:
            raise CannotAnswer(f"element type {int(self)} needs ml_dtypes")
        return np.dtype(name)


class _Dim:
    """A symbolic dimension: its name, or None when unknown (onnx-ir's ``SymbolicDim``)."""

    __slots__ = ("value",)

    def __init__(self, value: str | None) -> None:
        self.value = value


class _Tensor:
    """A constant's element type and dims; ``path`` is its external-data file (else None)."""

    __slots__ = ("dtype", "path", "shape")

    def __init__(self, dtype: int, dims: tuple[int, ...], path: str | None) -> None:
        if dtype not in _DTYPES:
            raise CannotAnswer(f"a tensor of element type {dtype}")
        self.dtype, self.shape, self.path = _DType(dtype), dims, path

    @property
    def size(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count

    @property
    def nbytes(self) -> int:
        return math.ceil(
            _DTYPES[self.dtype][1] * self.size
        )  # NOTE: as onnx-ir (4-bit: half a byte)


class _Use:
    __slots__ = ("idx", "node")

    def __init__(self, node: _Node, idx: int) -> None:
        self.node, self.idx = node, idx


class _Value:
    __slots__ = ("_declared", "_producer", "_uses", "const_value", "initializer", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.const_value: _Tensor | None = None
        self.initializer = False
        self._declared: tuple[_DType | None, tuple[Any, ...] | None] | None = None
        self._producer: _Node | None = None
        self._uses: list[_Use] = []

    def _type(self) -> tuple[_DType | None, tuple[Any, ...] | None]:
        if self._declared is not None:
            return self._declared
        if self.const_value is not None:
            return self.const_value.dtype, self.const_value.shape
        raise CannotAnswer(f"the type of {self.name!r} (shape inference would give it)")

    @property
    def dtype(self) -> _DType | None:
        return self._type()[0]

    @property
    def shape(self) -> tuple[Any, ...] | None:
        return self._type()[1]

    def is_initializer(self) -> bool:
        return self.initializer

    def uses(self) -> list[_Use]:
        return list(self._uses)

    def producer(self) -> _Node | None:
        return self._producer


class _Attr:
    __slots__ = ("name", "type", "value")

    def __init__(self, name: str, kind: int, value: Any) -> None:
        self.name, self.type, self.value = name, kind, value

    def as_int(self) -> int:
        return int(self.value)

    def is_ref(self) -> bool:
        return False


class _Node:
    __slots__ = ("attributes", "domain", "inputs", "metadata_props", "name", "op_type", "outputs")

    def __init__(self) -> None:
        self.name: str | None = None
        self.op_type = ""
        self.domain = ""
        self.inputs: list[_Value | None] = []
        self.outputs: list[_Value] = []
        self.attributes: dict[str, _Attr] = {}
        self.metadata_props: dict[str, str] = {}


class _Graph:
    __slots__ = ("initializers", "inputs", "name", "nodes", "outputs")

    def __init__(self) -> None:
        self.name: str | None = None
        self.nodes: list[_Node] = []
        self.inputs: list[_Value] = []
        self.outputs: list[_Value] = []
        self.initializers: dict[str, _Value] = {}

    def __iter__(self) -> Iterator[_Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def all_nodes(self) -> Iterator[_Node]:
        return iter(self.nodes)


class _Model:
    __slots__ = (
        "graph",
        "ir_version",
        "metadata_props",
        "opset_imports",
        "producer_name",
        "producer_version",
    )

    def __init__(self) -> None:
        self.graph = _Graph()
        self.ir_version = 0
        self.producer_name: str | None = None
        self.producer_version: str | None = None
        self.opset_imports: dict[str, int] = {}
        self.metadata_props: dict[str, str] = {}

    def graphs(self) -> list[_Graph]:
        return [self.graph]


class OnnxFileView:
    """What :func:`modelpress.app.describe.describe` reads of a model, from an ``.onnx`` file:
    ``name``, ``path``, ``ir`` (the graph view), ``signature`` and ``provenance``."""

    def __init__(self, path: str, model: _Model, provenance: Provenance) -> None:
        self.path, self.ir, self.provenance = path, model, provenance
        self.name = os.path.basename(path)
        self.signature = Signature.from_graph(model.graph)  # type: ignore[arg-type]


# -- the wire format --------------------------------------------------------------------------


def _text(buf: memoryview, p0: int, p1: int) -> str:
    try:
        return bytes(buf[p0:p1]).decode("utf-8")
    except UnicodeDecodeError:
        raise CannotAnswer("text that is not UTF-8") from None


def _entry(buf: memoryview, p0: int, p1: int) -> tuple[str, str]:
    """A ``StringStringEntryProto``: key, value (:func:`modelpress.base.wire.string_entry`)."""
    try:
        return string_entry(buf, p0, p1)
    except UnicodeDecodeError:
        raise CannotAnswer("text that is not UTF-8") from None


def _external(entries: dict[str, str], declared: int, base: Path) -> str:
    """The file of an external tensor, when its data plainly lies beside the model; anything
    else (an absolute or escaping location, a missing or short file) is for the full load to judge."""
    location = entries.get("location", "")
    if (
        not location
        or "\x00" in location
        or os.path.isabs(location)
        or ".." in Path(location).parts
    ):
        raise CannotAnswer(f"external data at {location!r}")
    target = base / location
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else declared
        inside = target.resolve().is_relative_to(base.resolve()) and target.is_file()
        fits = (
            inside
            and 0 <= offset
            and length == declared
            and offset + length <= target.stat().st_size
        )
    except (OSError, ValueError):
        fits = False
    if not fits:
        raise CannotAnswer(f"external data {location!r} does not fit")
    return os.path.join(str(base), location)


def _tensor(buf: memoryview, p0: int, p1: int, base: Path) -> tuple[str, _Tensor]:
    """An initializer's name, element type and dims; its data (``raw_data``, ``float_data``...)
    is skipped, never copied."""
    name, dtype, external = "", 0, False
    dims: list[int] = []
    entries: dict[str, str] = {}
    for number, wire, a, b in fields(buf, p0, p1):
        if number == 1:
            dims.extend(int64s(buf, wire, a, b))
        elif number == 2:
            dtype = varint(buf, a)[0]
        elif number == 3:
            raise CannotAnswer("a segmented tensor")
        elif number == 8:
            name = _text(buf, a, b)
        elif number == 13:
            key, value = _entry(buf, a, b)
            entries[key] = value
        elif number == 14:
            external = varint(buf, a)[0] == 1
        elif number == 12:
            _text(buf, a, b)  # NOTE: decoded only to send text that is not UTF-8 to the full load
    if any(d < 0 for d in dims):
        raise CannotAnswer(f"tensor {name!r} has a negative dimension")
    tensor = _Tensor(dtype, tuple(dims), None)
    if external:
        tensor.path = _external(entries, tensor.nbytes, base)
    return name, tensor


def _dims(buf: memoryview, p0: int, p1: int) -> tuple[Any, ...]:
    """A ``TensorShapeProto``'s dims: ints, and named or unknown dims as :class:`_Dim`."""
    dims: list[Any] = []
    for number, _w, a, b in fields(buf, p0, p1):
        if number != 1:
            continue
        dim: Any = _Dim(None)
        for d_number, d_wire, c, e in fields(buf, a, b):
            if d_number == 1 and d_wire == 0:
                dim = signed(varint(buf, c)[0])
            elif d_number == 2:
                dim = _Dim(_text(buf, c, e))
        dims.append(dim)
    return tuple(dims)


def _value_info(
    buf: memoryview, p0: int, p1: int
) -> tuple[str, _DType | None, tuple[Any, ...] | None]:
    """A ``ValueInfoProto``'s name, element type and shape (None where not given)."""
    name, dtype, shape = "", None, None
    for number, _w, a, b in fields(buf, p0, p1):
        if number == 1:
            name = _text(buf, a, b)
        elif number == 3:
            _text(buf, a, b)
        elif number == 2:
            for t_number, _tw, c, e in fields(buf, a, b):
                if t_number != 1:
                    raise CannotAnswer(f"{name or 'a value'} is not a tensor")
                for f_number, f_wire, g, h in fields(buf, c, e):
                    if f_number == 1 and f_wire == 0:
                        dtype = _DType(varint(buf, g)[0])
                    elif f_number == 2:
                        shape = _dims(buf, g, h)
    return name, dtype, shape


_ATTR_VALUES = {1: 2, 2: 3, 3: 4, 6: 7, 7: 8, 8: 9}  # attribute type -> the field holding its value


def _attribute(buf: memoryview, p0: int, p1: int, base: Path) -> _Attr:
    """A node attribute: name, type and value (numbers, text, a tensor's metadata; none for the rest)."""
    name, kind = "", 0
    found: dict[int, Any] = {}  # field -> (wire, start, end), a list of them for repeated fields
    for number, wire, a, b in fields(buf, p0, p1):
        if number == 1:
            name = _text(buf, a, b)
        elif number == 20:
            kind = varint(buf, a)[0]
        elif number == 21:
            raise CannotAnswer("a function attribute reference")
        elif number == 13:
            _text(buf, a, b)
        elif number in (6, 11):
            raise CannotAnswer("a subgraph (If/Loop/Scan)")
        elif number in (2, 3, 4, 5):
            found[number] = (wire, a, b)
        elif number in (7, 8, 9):
            found.setdefault(number, []).append((wire, a, b))
    if not kind:
        raise CannotAnswer(f"attribute {name!r} has no type")
    field, value = _ATTR_VALUES.get(kind), None
    if field == 2 and 2 in found:
        value = struct.unpack("<f", bytes(buf[found[2][1] : found[2][2]]))[0]
    elif field == 3:
        value = signed(varint(buf, found[3][1])[0]) if 3 in found else 0
    elif field == 4:
        value = _text(buf, found[4][1], found[4][2]) if 4 in found else ""
    elif field == 8:
        value = tuple(v for w, a, b in found.get(8, []) for v in int64s(buf, w, a, b))
    elif field == 9:
        value = tuple(_text(buf, a, b) for _w, a, b in found.get(9, []))
    elif kind == 4 and 5 in found:
        value = _tensor(buf, found[5][1], found[5][2], base)[1]
    return _Attr(name, kind, value)


def _node(buf: memoryview, p0: int, p1: int, base: Path) -> tuple[_Node, list[str], list[str]]:
    """A node, with the names of its inputs and outputs."""
    node, inputs, outputs = _Node(), [], []
    for number, _w, a, b in fields(buf, p0, p1):
        if number == 1:
            inputs.append(_text(buf, a, b))
        elif number == 2:
            outputs.append(_text(buf, a, b))
        elif number == 3:
            node.name = _text(buf, a, b) or None
        elif number == 4:
            node.op_type = _text(buf, a, b)
        elif number == 5:
            attr = _attribute(buf, a, b, base)
            node.attributes[attr.name] = attr
        elif number == 7:
            node.domain = _text(buf, a, b)
        elif number == 8:
            raise CannotAnswer("a node with an overload")
        elif number == 6:
            _text(buf, a, b)
        elif number == 9:
            key, value = _entry(buf, a, b)
            node.metadata_props[key] = value
    return node, inputs, outputs


class _GraphParts:
    """A ``GraphProto``'s messages, read before they are linked into values and nodes."""

    def __init__(self) -> None:
        self.name: str | None = None
        self.nodes: list[tuple[_Node, list[str], list[str]]] = []
        self.tensors: list[tuple[str, _Tensor]] = []
        self.inputs: list[tuple[str, _DType | None, tuple[Any, ...] | None]] = []
        self.outputs: list[tuple[str, _DType | None, tuple[Any, ...] | None]] = []
        self.value_info: set[str] = set()


def _graph_parts(buf: memoryview, p0: int, p1: int, base: Path) -> _GraphParts:
    parts = _GraphParts()
    for number, _w, a, b in fields(buf, p0, p1):
        if number == 1:
            parts.nodes.append(_node(buf, a, b, base))
        elif number == 2:
            parts.name = _text(buf, a, b) or None
        elif number == 5:
            parts.tensors.append(_tensor(buf, a, b, base))
        elif number == 11:
            parts.inputs.append(_value_info(buf, a, b))
        elif number == 12:
            parts.outputs.append(_value_info(buf, a, b))
        elif number == 13:
            parts.value_info.add(_value_info(buf, a, b)[0])
        elif number == 15:
            raise CannotAnswer("a sparse initializer")
        elif number == 10:
            _text(buf, a, b)
    return parts


def _link_values(parts: _GraphParts, graph: _Graph) -> dict[str, _Value]:
    """Graph inputs and initializers as values (an initializer listed as an input, as IR < 4 files
    do, is one value typed as the input declares, else as its tensor)."""
    values: dict[str, _Value] = {}
    for name, dtype, shape in parts.inputs:
        value = values[name] = _Value(name)
        value._declared = (dtype, shape)
        graph.inputs.append(value)
    for name, tensor in parts.tensors:
        if not name or name in graph.initializers:
            raise CannotAnswer(f"initializer {name!r} is unnamed or repeated")
        if name in parts.value_info:
            raise CannotAnswer(f"initializer {name!r} has a value_info")
        value = values.get(name) or _Value(name)
        value.const_value, value.initializer = tensor, True
        if value._declared is not None:
            dtype, shape = value._declared
            value._declared = (dtype or tensor.dtype, tensor.shape if shape is None else shape)
        values[name] = graph.initializers[name] = value
    return values


def _link(parts: _GraphParts) -> _Graph:
    graph = _Graph()
    graph.name = parts.name
    values = _link_values(parts, graph)
    for node, inputs, outputs in parts.nodes:
        for name in inputs:
            if name and name not in values:
                raise CannotAnswer(f"node input {name!r} is defined nowhere before it")
            node.inputs.append(values[name] if name else None)
        for name in outputs:
            if name in values:
                raise CannotAnswer(f"node output {name!r} is defined twice")
            value = _Value(name)  # NOTE: "" is an optional output left out
            if name:
                values[name] = value
            value._producer = node
            node.outputs.append(value)
        for idx, used in enumerate(node.inputs):
            if used is not None:
                used._uses.append(_Use(node, idx))
        graph.nodes.append(node)
    for name, dtype, shape in parts.outputs:
        output = values.get(name)
        complete = shape is not None and all(
            isinstance(d, int) or d.value is not None for d in shape
        )
        if output is None or output._producer is None or dtype is None or not complete:
            raise CannotAnswer(f"graph output {name!r}: shape inference would complete its type")
        output._declared = (dtype, shape)
        graph.outputs.append(output)
    return graph


# NOTE: the ops normalisation on import never folds (modelpress.data.normalize) that a weight of an
# ordinary model sits behind; any other node of constants only may be folded: the full load answers
_KEPT_ON_CONSTANTS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})
_CHANGED_BY_NORMALISATION = frozenset({"Constant", "Identity", "BatchNormalization"})


def _unchanged_by_normalisation(graph: _Graph) -> None:
    """Raise :class:`CannotAnswer` unless normalisation on import would leave ``graph`` as it is
    (so its figures are "nothing to change" and no ONNX Runtime check runs)."""
    outputs = {id(v) for v in graph.outputs}
    inputs = {id(v) for v in graph.inputs}
    for node in graph:
        onnx_domain = node.domain in ("", "ai.onnx")
        if onnx_domain and node.op_type in _CHANGED_BY_NORMALISATION:
            raise CannotAnswer(f"a {node.op_type} node (normalisation changes it)")
        if (
            onnx_domain
            and node.op_type not in _KEPT_ON_CONSTANTS
            and not quantization_parameter(node)
            and node.inputs
            and all(v is None or (v.initializer and id(v) not in inputs) for v in node.inputs)
        ):
            raise CannotAnswer(f"node {node.name!r} of constants only (normalisation folds it)")
        if not any(v._uses or id(v) in outputs for v in node.outputs):
            raise CannotAnswer(f"dead node {node.name!r} (normalisation removes it)")
    for value in graph.initializers.values():
        if not (value._uses or id(value) in outputs or id(value) in inputs):
            raise CannotAnswer(f"unused initializer {value.name!r} (normalisation removes it)")


def _model(buf: memoryview, base: Path) -> _Model:
    model, graph = _Model(), None
    for number, _w, a, b in fields(buf, 0, len(buf)):
        if number == 1:
            model.ir_version = varint(buf, a)[0]
        elif number == 2:
            model.producer_name = _text(buf, a, b)
        elif number == 3:
            model.producer_version = _text(buf, a, b)
        elif number == 7:
            if graph is not None:
                raise CannotAnswer("two graph fields")
            graph = _graph_parts(buf, a, b, base)
        elif number == 8:
            domain, version = "", 0
            for o_number, _ow, c, e in fields(buf, a, b):
                if o_number == 1:
                    domain = _text(buf, c, e)
                elif o_number == 2:
                    version = signed(varint(buf, c)[0])
            model.opset_imports[domain] = version
        elif number == 14:
            key, value = _entry(buf, a, b)
            model.metadata_props[key] = value
        elif number in (20, 25):
            raise CannotAnswer("training information or model-local functions")
        elif number in (4, 6):
            _text(buf, a, b)
    if model.ir_version <= 0 or graph is None or not model.opset_imports:
        raise CannotAnswer("not an ONNX model: the full load says why")
    model.graph = _link(graph)
    return model


def _parse(path: Path) -> _Model:
    """The model in the file at ``path``, memory-mapped: tensor bytes are never read."""
    try:
        with path.open("rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise CannotAnswer("an empty file")
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise CannotAnswer(f"cannot be read: {exc}") from None
    buf = memoryview(mapped)
    try:
        return _model(buf, path.parent)
    except (WireError, IndexError, struct.error) as exc:
        raise CannotAnswer(f"the wire bytes: {exc}") from None
    finally:
        buf.release()
        mapped.close()


def _provenance(model: _Model, path: Path, normalize: bool) -> Provenance:
    """The provenance loading would give: the one stored in the file, else the ONNX adapter's."""
    if PROVENANCE_KEY in model.metadata_props:
        stored = model.metadata_props[PROVENANCE_KEY]
        try:
            return Provenance.from_json(stored) if stored else Provenance()
        except ValueError:
            raise CannotAnswer("a damaged provenance entry (the full load warns)") from None
    if model.producer_name == "pytorch":
        raise CannotAnswer("a torch export (the ONNX adapter names its layers after the modules)")
    nodes = len(model.graph)
    normalised: dict[str, Any] = (
        {
            "constants_lifted": 0,
            "constants_folded": 0,
            "identities_removed": 0,
            "batchnorms_folded": 0,
            "subgraph_initializers_lifted": 0,
            "nodes_before": nodes,
            "nodes_after": nodes,
        }
        if normalize
        else {"skipped": "normalize=False"}
    )
    version = f"opset {model.opset_imports.get('', 0)}, producer {model.producer_name or '?'} {model.producer_version or ''}"
    return Provenance(
        source_framework="onnx",
        source_version=version.strip(),
        source=str(path),
        importer="modelpress.adapters.onnx",
        extra={"normalize": normalised},
    )


def read_onnx(path: str | os.PathLike[str], *, normalize: bool = True) -> OnnxFileView:
    """The graph view of the ``.onnx`` file at ``path`` as loading it would give (``normalize``:
    as ``modelpress.load``'s option); :class:`CannotAnswer` when only loading it can tell."""
    where = Path(path)
    if where.suffix.lower() != ".onnx" or not where.is_file():
        raise CannotAnswer("not an .onnx file")
    model = _parse(where)
    if normalize:
        _unchanged_by_normalisation(model.graph)
    return OnnxFileView(str(where), model, _provenance(model, where, normalize))
