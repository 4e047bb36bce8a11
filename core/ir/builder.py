"""The graph-building toolkit: every node modelpress (or a plugin) adds goes through here.

:class:`GraphBuilder` is onnx-ir's :class:`onnx_ir.tape.Tape` bound to a :class:`~modelpress.Model`:
it records the nodes a pass creates, as the tape does, and adds what a rewrite needs so that no
plugin names values or sets types by hand:

- node and value names are unique in the model by construction (``<prefix>/<Op>``, ``_1``, ...);
- each output's element type and shape are inferred from the node's inputs (ONNX's per-node
  inference, no model round trip), or set explicitly with ``out=Out(name, dtype, shape)``;
- weights go into the model as initializers (``builder.initializer(array, "name")``).

Typical use, replacing one node by two (see ``docs/writing-a-plugin.md``)::

    b = model.builder(prefix=node.name)
    u = b.initializer(u_array, f"{node.name}.u")
    v = b.initializer(v_array, f"{node.name}.v")
    h = b.op("MatMul", [node.inputs[0], u])
    y = b.op("MatMul", [h, v])
    model.replace_node(node, b.nodes, y)

The nodes are *not* in any graph until you put them there (``model.replace_node``,
``graph.insert_before``/``insert_after``, or :meth:`GraphBuilder.insert`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.tape import Tape

if TYPE_CHECKING:
    from modelpress.ir.model import Model

__all__ = ["GraphBuilder", "Out", "infer_node_types"]

# NOTE: constant inputs up to this size are handed to per-node inference (Reshape's shape, Slice's
# starts, ...); larger ones are weights, whose type alone is enough.
_SMALL_CONSTANT_BYTES = 1024


def _type_proto(value: ir.Value) -> onnx.TypeProto | None:
    if value.type is None:
        return None
    proto = onnx.TypeProto()
    ir.serde.serialize_type_into(proto, value.type)
    if value.shape is not None:
        ir.serde.serialize_shape_into(proto, value.shape)
    return proto


def infer_node_types(node: ir.Node, opset_imports: Mapping[str, int]) -> bool:
    """Set the element type and shape of ``node``'s untyped outputs from its inputs' types.

    Uses ONNX's per-node inference (``onnx.shape_inference.infer_node_outputs``): only this node
    is serialised, with the values of its small constant inputs, so it costs nothing on a
    multi-GB model. Returns whether every output got a type; an op ONNX has no schema for (a
    custom domain) or inputs of unknown type leave the outputs as they are."""
    try:
        schema = onnx.defs.get_schema(
            node.op_type, int(opset_imports.get(node.domain, opset_imports.get("", 1))), node.domain
        )
    except Exception:  # NOTE: onnx.defs.SchemaError: no schema for a custom or unknown op
        return False
    types: dict[str, onnx.TypeProto] = {}
    data: dict[str, onnx.TensorProto] = {}
    for value in node.inputs:
        if value is None or not value.name:
            continue
        proto = _type_proto(value)
        if proto is None:
            return False
        types[value.name] = proto
        const = value.const_value
        if const is not None and const.nbytes <= _SMALL_CONSTANT_BYTES:
            data[value.name] = ir.serde.serialize_tensor(const)
    opsets = [
        onnx.helper.make_opsetid(domain, int(version)) for domain, version in opset_imports.items()
    ]
    try:
        inferred = onnx.shape_inference.infer_node_outputs(
            schema, ir.serde.serialize_node(node), types, data, opset_imports=opsets
        )
    except (
        Exception
    ):  # NOTE: onnx.shape_inference.InferenceError; the graph-level check catches real errors
        return False
    complete = True
    for out in node.outputs:
        proto_type = inferred.get(out.name or "")
        if (
            proto_type is None
            or not proto_type.HasField("tensor_type")
            or not proto_type.tensor_type.elem_type
        ):
            complete = complete and out.type is not None
            continue
        if out.type is None:
            out.type = ir.TensorType(ir.DataType(proto_type.tensor_type.elem_type))
        if out.shape is None and proto_type.tensor_type.HasField("shape"):
            out.shape = ir.serde.deserialize_type_proto_for_shape(proto_type)
    return complete


@dataclass(frozen=True)
class Out:
    """A new node's output as :meth:`GraphBuilder.op` makes it: ``name`` (made unique; default
    ``<node name>_output``), element type ``dtype`` and ``shape`` (default: inferred from the
    node's inputs)."""

    name: str | None = None
    dtype: ir.DataType | None = None
    shape: ir.Shape | Sequence[int | str | None] | None = None


class GraphBuilder(Tape):
    """A :class:`onnx_ir.tape.Tape` that makes unique names and infers types (see the module docstring).

    Created by :meth:`modelpress.Model.builder`. ``prefix`` starts every node and value name it
    makes (default: the op type). ``nodes`` and ``initializers`` are what it recorded, in order.
    """

    def __init__(self, model: Model, *, prefix: str = "", graph: ir.Graph | None = None) -> None:
        super().__init__(None)
        self.model = model
        self.prefix = prefix
        self.target = (
            graph  # NOTE: the graph the nodes are meant for (a subgraph); None: the main graph
        )

    def _base(self, op_type: str, name: str | None) -> str:
        if name:
            return name
        return f"{self.prefix}/{op_type}" if self.prefix else op_type

    def op(  # type: ignore[override]
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: Mapping[str, Any] | None = None,
        *,
        name: str | None = None,
        out: Out | None = None,
        **kwargs: Any,
    ) -> ir.Value:
        """Create ``op_type(*inputs, **attributes)`` and return its output.

        ``name`` is the node's name (default ``<prefix>/<op_type>``), made unique with a ``_N``
        suffix when taken; ``out`` names and types its output (:class:`Out`; default: named
        ``<node name>_output``, typed by inference from the inputs). Other keywords (``domain``,
        ``version``, ``doc_string``, ...) are onnx-ir's :meth:`~onnx_ir.tape.Tape.op`'s."""
        return self.op_multi_out(
            op_type,
            inputs,
            attributes,
            num_outputs=1,
            name=name,
            outs=[out] if out is not None else None,
            **kwargs,
        )[0]

    def op_multi_out(  # type: ignore[override]
        self,
        op_type: str,
        inputs: Sequence[ir.Value | None],
        attributes: Mapping[str, Any] | None = None,
        *,
        num_outputs: int | None = None,
        name: str | None = None,
        outs: Sequence[Out] | None = None,
        **kwargs: Any,
    ) -> Sequence[ir.Value]:
        """Like :meth:`op` for a node with several outputs (``num_outputs``, or one :class:`Out` each in ``outs``)."""
        count = len(outs) if outs is not None else (num_outputs or 1)
        node_name = self.model.fresh_name(self._base(op_type, name), node=True)
        outputs = super().op_multi_out(
            op_type, inputs, _clean(attributes), num_outputs=count, name=node_name, **kwargs
        )
        for i, value in enumerate(outputs):
            spec = outs[i] if outs is not None else Out()
            value.name = self.model.fresh_name(
                spec.name or (f"{node_name}_output" if count == 1 else f"{node_name}_out{i}")
            )
            if spec.dtype is not None:
                value.type = ir.TensorType(spec.dtype)
            if spec.shape is not None:
                value.shape = (
                    spec.shape.copy() if isinstance(spec.shape, ir.Shape) else ir.Shape(spec.shape)
                )
        node = outputs[0].producer()
        assert node is not None
        if not _same_shape(node):
            infer_node_types(node, self.model.ir.opset_imports)
        return outputs

    def initializer(
        self, tensor: ir.TensorProtocol | np.ndarray | Any, name: str | None = None
    ) -> ir.Value:  # type: ignore[override]
        """Add a constant (an array, or an onnx_ir tensor such as ``ir.PackedTensor``) to the model
        as an initializer named ``name`` (made unique) and return its value."""
        base = (
            name
            or getattr(tensor, "name", None)
            or (f"{self.prefix}/const" if self.prefix else "const")
        )
        value = self.model.add_initializer(base, tensor)
        self._initializers.append(value)
        return value

    def insert(self, *, before: ir.Node | None = None, after: ir.Node | None = None) -> None:
        """Put every recorded node not yet in a graph into the target graph (default: the main
        graph), in recording order, before or after ``before``/``after`` (default: at the end)."""
        pending = [node for node in self.nodes if node.graph is None]
        if not pending:
            return
        graph = (
            self.target
            or (before.graph if before is not None else after.graph if after is not None else None)
            or self.model.graph
        )
        if before is not None:
            graph.insert_before(before, pending)
        elif after is not None:
            graph.insert_after(after, pending)
        else:
            graph.extend(pending)


# Ops whose one output has the shape of their first input (ONNX's inference copies it)
_SHAPE_KEEPING = frozenset({"QuantizeLinear", "DequantizeLinear", "Cast"})


def _same_shape(node: ir.Node) -> bool:
    """For a node of :data:`_SHAPE_KEEPING` whose output's type is given (``Out(dtype=...)``):
    gives the output its first input's shape, as ONNX's per-node inference would, without a
    round trip through protobuf (int8-static emits thousands of Q/DQ pairs); False otherwise."""
    if node.domain not in ("", "ai.onnx") or node.op_type not in _SHAPE_KEEPING:
        return False
    out, source = node.outputs[0], node.inputs[0] if node.inputs else None
    if len(node.outputs) != 1 or out.type is None or source is None or source.type is None:
        return False
    if out.shape is None and source.shape is not None:
        out.shape = source.shape.copy()
    return True


def _clean(attributes: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Attributes as onnx-ir converts them; an ``ir.DataType`` value (Cast's ``to``) becomes its int."""
    if attributes is None:
        return None
    return {
        key: int(value) if isinstance(value, ir.DataType) else value
        for key, value in attributes.items()
    }
