"""The read-only graph view that what ``inspect`` counts is computed on.

The counting rules (parameters as users count them, weight bytes, the op histogram, weighted
layers: :mod:`modelpress.ir.layers`, :func:`modelpress.app.describe.layer_rows`) read a model
through the small part of onnx-ir's API these protocols name, and nothing else. An
:class:`onnx_ir.Model` satisfies them as it is; so does the light reader
(:mod:`modelpress.io.onnx_view`), which answers them from an ``.onnx`` file's protobuf without
importing onnx or onnx-ir. A rule added to those modules uses only what is listed here (or
extends the protocols and the light reader together).

Element types are ONNX's ``TensorProto.DataType`` numbers, attribute types
``AttributeProto.AttributeType``'s: onnx-ir's enums are ``IntEnum`` and compare equal to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol

__all__ = [
    "BFLOAT16",
    "FLOAT",
    "FLOAT16",
    "GRAPH",
    "GRAPHS",
    "INT64",
    "AttrView",
    "GraphView",
    "ModelView",
    "NodeView",
    "TensorView",
    "UseView",
    "ValueView",
]

# ONNX TensorProto.DataType
FLOAT, INT64, FLOAT16, BFLOAT16 = 1, 7, 10, 16
# ONNX AttributeProto.AttributeType
GRAPH, GRAPHS = 5, 10


class TensorView(Protocol):
    """A constant's metadata; its data is never read by the counting rules."""

    @property
    def dtype(self) -> int: ...
    @property
    def shape(self) -> Any: ...  # iterable of ints
    @property
    def size(self) -> int: ...
    @property
    def nbytes(self) -> int: ...


class AttrView(Protocol):
    name: str

    @property
    def type(self) -> int: ...
    @property
    def value(self) -> Any: ...
    def as_int(self) -> int: ...
    def is_ref(self) -> bool: ...


class UseView(Protocol):
    node: NodeView
    idx: int


class ValueView(Protocol):
    """A value: its name, element type (``dtype``), ``shape`` (ints, and dims with a ``.value``: a
    name or None) and, for a constant, ``const_value``."""

    @property
    def name(self) -> str | None: ...
    @property
    def dtype(self) -> Any: ...
    @property
    def shape(self) -> Any: ...
    @property
    def const_value(self) -> TensorView | None: ...
    def is_initializer(self) -> bool: ...
    def uses(self) -> Iterable[UseView]: ...
    def producer(self) -> NodeView | None: ...


class NodeView(Protocol):
    @property
    def name(self) -> str | None: ...
    @property
    def op_type(self) -> str: ...
    @property
    def domain(self) -> str: ...
    @property
    def inputs(self) -> Sequence[ValueView | None]: ...
    @property
    def outputs(self) -> Sequence[ValueView]: ...
    @property
    def attributes(self) -> Mapping[str, AttrView]: ...
    @property
    def metadata_props(self) -> Mapping[str, str]: ...


class GraphView(Protocol):
    """Nodes in order (iterating the graph), initializers by name, inputs and outputs."""

    @property
    def name(self) -> str | None: ...
    @property
    def inputs(self) -> Sequence[ValueView]: ...
    @property
    def outputs(self) -> Sequence[ValueView]: ...
    @property
    def initializers(self) -> Mapping[str, ValueView]: ...
    def __iter__(self) -> Iterator[NodeView]: ...
    def __len__(self) -> int: ...
    def all_nodes(self) -> Iterator[NodeView]: ...


class ModelView(Protocol):
    @property
    def graph(self) -> GraphView: ...
    @property
    def ir_version(self) -> int: ...
    @property
    def producer_name(self) -> str | None: ...
    @property
    def producer_version(self) -> str | None: ...
    @property
    def opset_imports(self) -> Mapping[str, int]: ...
    @property
    def metadata_props(self) -> Mapping[str, str]: ...
    def graphs(self) -> Iterable[GraphView]: ...
