"""``modelpress.Model``: the intermediate representation every adapter produces and every pass edits.

A thin layer over :class:`onnx_ir.Model` (the graph, with lazy memory-mapped weights) that adds
what compression needs: the model's :class:`~modelpress.Signature`, its
:class:`~modelpress.Provenance`, the *reference* model it is verified against, and small helpers
to find weighted layers and edit tensors and nodes.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

from modelpress.base.errors import InvalidModelError, ModelpressError
from modelpress.ir.builder import GraphBuilder, Out
from modelpress.ir.counting import op_histogram, parameter_count, weight_bytes
from modelpress.ir.layers import (
    WEIGHTED_OPS,
    WeightedLayer,
    find_weighted_layers,
    subgraph_refusals,
)
from modelpress.ir.provenance import PROVENANCE_KEY, Provenance
from modelpress.ir.signature import Signature

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["Model", "references_in_place", "type_initializers"]

# NOTE: weights up to this size stay in the proto handed to ONNX shape inference (shape tensors
# that data propagation reads); bigger ones are left out, so inference never copies the weights.
_INLINE_BYTES = 1024


@contextlib.contextmanager
def references_in_place(values: Sequence[ir.Value], location: str) -> Iterator[None]:
    """While inside: each of ``values``' tensors stands as an external-data reference to ``location``
    (its name, type and shape, no bytes), so serialising the graph copies none of their weights; the
    tensors are put back on exit. For callers that hand the weights over another way (ORT's external
    initializers) or size them without their bytes."""
    swapped = [(value, value.const_value) for value in values if value.const_value is not None]
    for value, tensor in swapped:
        value.const_value = ir.ExternalTensor(
            location,
            0,
            tensor.nbytes,
            tensor.dtype,
            shape=tensor.shape,  # type: ignore[arg-type]
            name=value.name or "",
        )
    try:
        yield
    finally:
        for value, tensor in swapped:
            value.const_value = tensor


def type_initializers(model: ir.Model) -> None:
    """An initializer's tensor says its element type and shape; a ``value_info`` entry without a
    type (the torch exporter writes some holding only metadata) makes the IR forget them, and
    methods then skip those weights. Take them back from the tensor."""
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            if value.type is None:
                value.type = ir.TensorType(tensor.dtype)
            if value.shape is None:
                value.shape = ir.Shape(list(tensor.shape.numpy()))


def _stored_provenance(ir_model: ir.Model, path: str | os.PathLike[str] | None) -> Provenance:
    """The provenance a model file carries; a damaged entry is dropped with a warning.

    NOTE: the entry is optional metadata: it must never stop a valid model from loading."""
    stored = ir_model.metadata_props.get(PROVENANCE_KEY)
    if not stored:
        return Provenance()
    try:
        return Provenance.from_json(stored)
    except ValueError as exc:
        where = os.fspath(path) if path is not None else (ir_model.graph.name or "model")
        warnings.warn(
            f"{where}: metadata entry {PROVENANCE_KEY!r} is damaged ({exc}); ignoring it (the model's history is unknown)",
            stacklevel=3,
        )
        del ir_model.metadata_props[PROVENANCE_KEY]
        return Provenance()


class Model:
    """A model in modelpress's IR.

    Attributes:
        ir: the underlying :class:`onnx_ir.Model`. Passes edit it through onnx_ir's API.
        provenance: source framework and the passes applied so far.
        path: the file it was loaded from, if any (for messages).
        reference: the model as it was imported, before any pass; exports are verified
            against it. ``None`` on a freshly imported model (it is its own reference).
        declared_value_info: names of the intermediate values whose type/shape the source file
            declared (``value_info``), when the adapter knows them. The shapes the importer
            inferred for the others serve the passes but are not written out (see
            :meth:`stamped`); ``None`` (unknown): everything known is written.
    """

    __slots__ = ("_declared", "_names", "ir", "path", "provenance", "reference")

    def __init__(
        self,
        ir_model: ir.Model,
        *,
        provenance: Provenance | None = None,
        path: str | os.PathLike[str] | None = None,
        reference: Model | None = None,
        declared_value_info: frozenset[str] | None = None,
    ) -> None:
        self.ir = ir_model
        self._declared = declared_value_info
        if provenance is None:
            provenance = _stored_provenance(ir_model, path)
        self.provenance = provenance
        self.path = os.fspath(path) if path is not None else None
        self.reference = reference
        self._names: tuple[tuple[int, ...], set[str], set[str]] | None = None

    # -- reading ---------------------------------------------------------------------------
    @property
    def graph(self) -> ir.Graph:
        return self.ir.graph

    @property
    def signature(self) -> Signature:
        return Signature.from_graph(self.ir.graph)

    @property
    def opset(self) -> int:
        return int(self.ir.opset_imports.get("", 0))

    @property
    def name(self) -> str:
        return os.path.basename(self.path) if self.path else (self.ir.graph.name or "model")

    def initializers(self) -> dict[str, ir.Value]:
        return dict(self.ir.graph.initializers)

    def initializer(self, name: str) -> ir.Value:
        try:
            return self.ir.graph.initializers[name]
        except KeyError:
            raise ModelpressError(
                f"model {self.name!r} has no initializer named {name!r}"
            ) from None

    def node(self, name: str) -> ir.Node:
        for node in self.ir.graph.all_nodes():
            if node.name == name:
                return node
        raise ModelpressError(f"model {self.name!r} has no node named {name!r}")

    def weighted_layers(
        self, op_types: frozenset[str] = WEIGHTED_OPS, *, subgraphs: bool = False
    ) -> list[WeightedLayer]:
        """Conv, ConvTranspose, Gemm and MatMul nodes whose weight is a constant initializer;
        with ``subgraphs``, also those inside If/Loop/Scan bodies (``layer.scope`` says where)."""
        return find_weighted_layers(self.ir.graph, op_types, subgraphs=subgraphs)

    def subgraph_refusals(self, op_types: frozenset[str], method: str, why: str) -> dict[str, str]:
        """``{layer: "inside If 'x' then_branch: <method> <why>"}`` for weighted layers in
        subgraphs: what a method that cannot reach them records instead of skipping silently."""
        return subgraph_refusals(self.ir.graph, op_types, method, why)

    def parameter_count(self) -> int:
        """Parameters as users count them, in every graph (no weight is read: shapes only): the
        elements of weight tensors (a quantized weight once, as its integer tensor; a bias as
        stored), not quantization scales and zero points nor shape, axes and index constants,
        so quantizing a model leaves its count unchanged (:mod:`modelpress.ir.counting`)."""
        return parameter_count(self.ir)

    def weight_bytes(self) -> int:
        """Bytes of all weights as stored, in every graph (no weight is read)."""
        return weight_bytes(self.ir)

    def op_histogram(self) -> dict[str, int]:
        return op_histogram(self.ir.graph)

    def nodes(self) -> Iterator[ir.Node]:
        return iter(self.ir.graph)

    # -- editing ---------------------------------------------------------------------------
    def replace_initializer(self, name: str, array: ArrayLike) -> ir.Value:
        """Give initializer ``name`` a new value (dtype and shape may change); returns its Value."""
        value = self.initializer(name)
        data = np.asarray(array)
        value.const_value = ir.tensor(data, name=name)
        # NOTE: assign new type/shape objects: a clone shares them with the model it came from.
        value.type = ir.TensorType(ir.DataType.from_numpy(data.dtype))
        value.shape = ir.Shape(data.shape)
        return value

    def add_initializer(self, name: str, array: ArrayLike | ir.TensorProtocol) -> ir.Value:
        """Add a new constant initializer; the name is made unique if it is taken. ``array`` is
        array-like or an onnx_ir tensor (e.g. an ``ir.PackedTensor`` of int4 values, two per byte)."""
        unique = self._unique_name(name)
        if isinstance(array, np.ndarray):
            # NOTE: what ir.tensor makes of an array, without its Protocol checks (slow: int8-static
            # adds thousands of initializers across its candidates)
            tensor: ir.TensorProtocol = ir.Tensor(array, name=unique)
        elif isinstance(array, ir.TensorProtocol):
            tensor = array
            tensor.name = unique
        else:
            tensor = ir.tensor(np.asarray(array), name=unique)
        value = ir.Value(
            name=unique,
            shape=ir.Shape(list(tensor.shape.numpy())),
            type=ir.TensorType(tensor.dtype),
            const_value=tensor,
        )
        self.ir.graph.register_initializer(value)
        self._sync_names()
        return value

    def builder(self, prefix: str = "", *, graph: ir.Graph | None = None) -> GraphBuilder:
        """A :class:`~modelpress.ir.builder.GraphBuilder` (onnx-ir's tape) for this model: the nodes
        it creates get unique names and inferred types, its initializers go into this model.
        ``prefix`` starts the names it makes; ``graph`` is the (sub)graph the nodes are meant for."""
        return GraphBuilder(self, prefix=prefix, graph=graph)

    def fresh_name(self, base: str, *, node: bool = False) -> str:
        """A value name (or, with ``node=True``, a node name) not used in this model: ``base``,
        or ``base_1``, ``base_2``, ... The name is reserved: a second call never returns it again."""
        return self._unique_name(base, nodes=node)

    def insert_before(self, anchor: ir.Node, nodes: ir.Node | list[ir.Node]) -> None:
        """Put nodes made by :meth:`builder` into the graph before ``anchor`` (use this rather than
        ``graph.insert_before``: the names those nodes took stay known without rescanning the graph,
        which made a pass inserting one node per layer quadratic)."""
        self.ir.graph.insert_before(anchor, nodes)
        self._sync_names()

    @staticmethod
    def producer(value: ir.Value) -> ir.Node | None:
        """The node that computes ``value``; ``None`` for a graph input or an initializer."""
        return value.producer()

    @staticmethod
    def consumers(value: ir.Value) -> list[ir.Node]:
        """The nodes that read ``value`` (each once, in graph order of their uses), in any graph."""
        seen: dict[int, ir.Node] = {}
        for user, _ in value.uses():
            seen.setdefault(id(user), user)
        return list(seen.values())

    def insert_after(
        self,
        value: ir.Value,
        op_type: str,
        extra_inputs: list[ir.Value | None] | None = None,
        *,
        attributes: dict[str, Any] | None = None,
        name: str | None = None,
        out: Out | None = None,
        consumers: list[ir.Node] | None = None,
    ) -> ir.Value:
        """Insert ``op_type(value, *extra_inputs)`` on every edge leaving ``value``.

        Every consumer of ``value`` (and the graph output, if it is one) is rewired to the new
        node's output, which is returned. Used to put Cast, QuantizeLinear/DequantizeLinear and
        similar nodes on an edge. ``out`` (:class:`~modelpress.ir.builder.Out`) names the output
        (made unique; default ``<value>_<op_type>``) and gives its element type (default: Cast's
        ``to``, else ``value``'s); the output keeps ``value``'s shape. With ``consumers``, only
        those nodes are rewired (and the graph output is left alone). The node's name is ``name``
        (default ``<value>/<op_type>``).
        """
        spec = out or Out()
        dtype = spec.dtype
        if dtype is None and op_type == "Cast" and attributes and "to" in attributes:
            dtype = ir.DataType(int(attributes["to"]))
        result = Out(
            spec.name or f"{value.name}_{op_type.lower()}",
            dtype if dtype is not None else value.dtype,
            spec.shape
            if spec.shape is not None
            else value.shape.copy()
            if value.shape is not None
            else None,
        )
        new = self.builder().op(
            op_type,
            [value, *(extra_inputs or [])],
            attributes or {},
            name=name or f"{value.name}/{op_type}",
            out=result,
        )
        node = new.producer()
        assert node is not None
        uses = [(user, idx) for user, idx in value.uses() if user is not node]
        if consumers is not None:
            uses = [(user, idx) for user, idx in uses if any(user is c for c in consumers)]
        for user, idx in uses:
            user.replace_input_with(idx, new)
        graph = self.ir.graph
        if value.is_graph_output() and consumers is None:
            # NOTE: keep the public output name; the new node's output takes it over.
            old_name = value.name
            value.name = self._unique_name(f"{old_name}_pre_{op_type.lower()}")
            new.name = old_name
            for i, o in enumerate(graph.outputs):
                if o is value:
                    graph.outputs[i] = new
        producer = value.producer()
        if producer is not None and producer.graph is graph:
            graph.insert_after(producer, node)
        elif len(graph):
            graph.insert_before(graph[0], node)  # a graph input or initializer: put it first
        else:
            graph.append(node)
        self._sync_names()
        return new

    def replace_node(self, node: ir.Node, new_nodes: list[ir.Node], output: ir.Value) -> None:
        """Swap ``node`` for ``new_nodes`` whose ``output`` takes over the node's (first) output.

        Consumers and graph outputs are rewired, the output keeps its name and shape, the old
        node is removed, and initializers it alone used are dropped. The node may live in a
        subgraph (an If/Loop body): the new nodes go into that graph.
        """
        graph = node.graph or self.ir.graph
        graph.insert_before(node, new_nodes)
        self._sync_names(new_nodes)
        old = node.outputs[0]
        output.shape = old.shape.copy() if old.shape is not None else None
        if output.type is None and isinstance(old.type, ir.TensorType):
            output.type = ir.TensorType(old.type.dtype)
        old.replace_all_uses_with(output, replace_graph_outputs=True)
        output.name, old.name = old.name, self._unique_name(f"{old.name}_replaced")
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        for value in inputs:
            owner = value.graph
            if (
                value.is_initializer()
                and owner is not None
                and not list(value.uses())
                and not value.is_graph_output()
            ):
                owner.initializers.pop(value.name or "")
        self._sync_names()  # NOTE: our own edit (a rescan per replaced layer made big passes slow)

    # -- whole-graph upkeep ------------------------------------------------------------------
    def infer_shapes(self, *, reset: bool = False) -> None:
        """Run ONNX's strict shape inference over the whole model and store the inferred element
        types and shapes on its values (in every graph).

        In memory and cheap on a large model: weights over 1 KB are left out of the proto handed
        to ONNX (their type and shape say all inference needs), so nothing is copied and models
        over 2 GB work. ``reset`` first forgets every intermediate shape (after an edit changed
        them, e.g. channel pruning). Raises :class:`~modelpress.InvalidModelError` naming the model
        and ONNX's reason when the graph is inconsistent."""
        if reset:
            for graph in self.ir.graphs():
                keep = {id(v) for v in [*graph.inputs, *graph.outputs]}
                for node in graph:
                    for out in node.outputs:
                        if id(out) not in keep:
                            out.shape = None
        light = self.ir.clone()  # NOTE: structural copy; tensors are shared, not copied
        graph = light.graph
        for value in list(graph.initializers.values()):
            tensor = value.const_value
            if tensor is not None and tensor.nbytes > _INLINE_BYTES:
                value.shape = value.shape or ir.Shape(list(tensor.shape.numpy()))
                value.type = value.type or ir.TensorType(tensor.dtype)
                graph.initializers.pop(value.name or "")
                graph.inputs.append(value)
        try:
            inferred = onnx.shape_inference.infer_shapes(
                ir.serde.serialize_model(light), check_type=True, strict_mode=True, data_prop=True
            )
        except Exception as exc:  # NOTE: onnx.shape_inference.InferenceError and checker errors
            text = str(exc).strip().splitlines()
            raise InvalidModelError(
                f"{self.name}: fails ONNX shape inference: {text[0] if text else type(exc).__name__}"
            ) from None
        for original, result in zip(
            self.ir.graphs(), ir.serde.deserialize_model(inferred).graphs(), strict=False
        ):
            found = ir.convenience.create_value_mapping(result)
            for name, value in ir.convenience.create_value_mapping(original).items():
                new = found.get(name)
                if new is None or value.is_initializer():
                    continue
                if new.shape is not None and value.shape != new.shape:
                    value.shape = new.shape
                if new.dtype is not None and value.dtype != new.dtype:
                    value.type = ir.TensorType(new.dtype)

    def cleanup(self, *, shapes: bool = True) -> bool:
        """Tidy the graph after an edit with onnx-ir's common passes: drop nodes and initializers
        nothing uses (``RemoveUnusedNodesPass``), restore topological order
        (``TopologicalSortPass``), give every node and value a unique name (``NameFixPass``), then,
        with ``shapes``, re-infer types and shapes in memory (:meth:`infer_shapes`). Inputs,
        outputs and their names are kept. Returns whether a pass changed the graph."""
        from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass, TopologicalSortPass

        modified = False
        for step in (RemoveUnusedNodesPass(), TopologicalSortPass(), NameFixPass()):
            modified = step(self.ir).modified or modified
        self._names = None  # NOTE: the passes renamed and removed behind the name cache
        if shapes:
            self.infer_shapes(reset=True)
        return modified

    @classmethod
    def from_onnx(
        cls,
        proto: onnx.ModelProto | ir.Model,
        *,
        provenance: Provenance | None = None,
        path: str | os.PathLike[str] | None = None,
        check: bool = True,
    ) -> Model:
        """A :class:`Model` from an ONNX ``ModelProto`` (or an ``onnx_ir.Model``) an adapter made.

        What an adapter's ``load`` returns after converting its framework's model to ONNX. The
        proto is not modified. With ``check`` (the default), the ONNX checker and strict shape
        inference run first and a failure is an :class:`~modelpress.InvalidModelError` naming
        ``provenance.source``. ``provenance`` says where the model came from (``source_framework``,
        ``source``, ``importer``; see :class:`~modelpress.Provenance`); pair this with
        :func:`modelpress.plugin_api.check_import` to prove the conversion faithful."""
        where = (
            provenance.source if provenance is not None and provenance.source else ""
        ) or "the converted model"
        if isinstance(proto, ir.Model):
            ir_model = proto.clone()
        else:
            if not isinstance(proto, onnx.ModelProto):
                raise InvalidModelError(
                    f"{where}: Model.from_onnx wants an onnx.ModelProto or onnx_ir.Model, not {type(proto).__name__}"
                )
            if check:
                try:
                    onnx.checker.check_model(proto)
                except Exception as exc:
                    text = str(exc).strip().splitlines()
                    raise InvalidModelError(
                        f"{where}: fails the ONNX checker: {text[0] if text else type(exc).__name__}"
                    ) from None
            ir_model = ir.serde.deserialize_model(proto)
            type_initializers(ir_model)
        model = cls(ir_model, provenance=provenance, path=path)
        if check:
            try:
                model.infer_shapes()
            except InvalidModelError as exc:
                raise InvalidModelError(
                    f"{where}: {exc}".replace(f"{model.name}: ", "", 1)
                ) from None
        return model

    def _graph_key(self) -> tuple[int, ...]:
        graph = self.ir.graph
        return (id(graph), len(graph), len(graph.initializers), len(graph.inputs))

    def _taken_names(self) -> tuple[set[str], set[str]]:
        """Value and node names in use. Cached: rebuilt when the graph's size changed behind our back
        (scanning the whole graph for every new name made big edits quadratic)."""
        key = self._graph_key()
        if self._names is None or self._names[0] != key:
            graph = self.ir.graph
            values = {v.name for v in graph.initializers.values() if v.name} | {
                v.name for v in graph.inputs if v.name
            }
            nodes: set[str] = set()
            for node in graph.all_nodes():
                nodes.add(node.name or "")
                values.update(o.name for o in node.outputs if o.name)
            if self._names is not None:
                # NOTE: keep names handed out for nodes not yet inserted (never reused; only suffixes grow).
                values |= self._names[1]
                nodes |= self._names[2]
            self._names = (key, values, nodes)
        return self._names[1], self._names[2]

    def _sync_names(self, added: Sequence[ir.Node] = ()) -> None:
        """Our own edit changed the graph's size; the cache already holds the names it used (and
        takes those of ``added``, nodes that may not come from :meth:`builder`)."""
        if self._names is not None:
            for node in added:
                self._names[2].add(node.name or "")
                self._names[1].update(o.name for o in node.outputs if o.name)
            self._names = (self._graph_key(), self._names[1], self._names[2])

    def _unique_name(self, base: str, *, nodes: bool = False) -> str:
        values, node_names = self._taken_names()
        taken = node_names if nodes else values
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        return name

    # -- copying and serialising -----------------------------------------------------------
    def clone(self) -> Model:
        """A structural copy: new graph, nodes and values; weight tensors are shared, not copied.

        Passes replace tensors rather than write into them, so sharing is safe and a clone of a
        multi-GB model costs no weight memory.
        """
        cloned = self.ir.clone()
        # NOTE: onnx_ir's clone shares type and shape objects between the two models, so setting
        # `value.dtype` on the clone would retype the original too; give the clone its own.
        for graph in cloned.graphs():
            values = [
                *graph.inputs,
                *graph.initializers.values(),
                *(o for n in graph for o in n.outputs),
            ]
            for value in values:
                if isinstance(value.type, ir.TensorType):
                    value.type = ir.TensorType(value.type.dtype)
                if value.shape is not None:
                    value.shape = value.shape.copy()
        return Model(
            cloned,
            provenance=self.provenance,
            path=self.path,
            reference=self.reference if self.reference is not None else self,
            declared_value_info=self._declared,
        )

    @property
    def declared_value_info(self) -> frozenset[str] | None:
        """See the class docstring; a model derived from an import inherits its reference's."""
        if self._declared is None and self.reference is not None:
            return self.reference.declared_value_info
        return self._declared

    @contextlib.contextmanager
    def without_inferred_shapes(self) -> Iterator[ir.Model]:
        """The onnx_ir model with the type/shape of intermediate values hidden unless the source
        declared them, for as long as it is serialised (restored afterwards).

        NOTE: intermediate ``value_info`` that the importer's shape inference wrote makes ONNX
        Runtime choose other kernels (the logits of an int4 model differed from ORT's own tool's
        by ~1e-5 although the weights were bit-identical); ORT infers these shapes itself."""
        declared = self.declared_value_info
        hidden: list[tuple[ir.Value, Any, Any]] = []
        if declared is not None:
            for graph in self.ir.graphs():
                for node in graph:
                    for out in node.outputs:
                        if (
                            (out.type is None and out.shape is None)
                            or out.name in declared
                            or out.is_graph_output()
                        ):
                            continue
                        hidden.append((out, out.type, out.shape))
                        out.type, out.shape = None, None
        try:
            yield self.ir
        finally:
            for value, type_, shape in hidden:
                value.type, value.shape = type_, shape

    @contextlib.contextmanager
    def stamped(self) -> Iterator[ir.Model]:
        """The onnx_ir model as it is written: provenance in ``metadata_props`` and no inferred
        intermediate shapes (:meth:`without_inferred_shapes`), for as long as it is serialised;
        both are restored afterwards, so writing a model does not change it.

        Initializers are written without a ``value_info`` (onnx-ir writes one for every typed value,
        but an initializer's tensor carries its type and shape, and readers take them from there):
        a value_info per weight and scale was 6 % of a small int8 file."""
        from modelpress.ir.provenance import modelpress_version

        metadata = self.ir.metadata_props
        saved = dict(metadata)
        metadata[PROVENANCE_KEY] = self.provenance.to_json()
        metadata["modelpress.version"] = modelpress_version()
        typed = [
            (value, value.type, value.shape)
            for graph in self.ir.graphs()
            for value in graph.initializers.values()
            if value.const_value is not None
            and (value.type is not None or value.shape is not None)
            and not value.is_graph_input()
            and not value.metadata_props
        ]  # NOTE: with metadata, onnx-ir writes a value_info anyway: keep its type then
        for value, _, _ in typed:
            value.type, value.shape = None, None
        try:
            with self.without_inferred_shapes():
                yield self.ir
        finally:
            metadata.clear()
            metadata.update(saved)
            for value, type_, shape in typed:
                value.type, value.shape = type_, shape

    @contextlib.contextmanager
    def inlined(self) -> Iterator[ir.Model]:
        """The onnx_ir model with every external-data tensor read into memory, for as long as the
        block runs (for an inline save or a re-check that must not point at the source's files);
        the memory-mapped tensors are put back afterwards, so the model is not changed."""
        swapped = []
        for graph in self.ir.graphs():
            for value in graph.initializers.values():
                tensor = value.const_value
                if isinstance(tensor, ir.ExternalTensor):
                    swapped.append((value, tensor))
                    value.const_value = ir.Tensor(
                        np.array(tensor.numpy()), dtype=tensor.dtype, name=tensor.name
                    )
                    tensor.release()
        try:
            yield self.ir
        finally:
            for value, tensor in swapped:
                value.const_value = tensor

    def to_proto(self) -> onnx.ModelProto:
        """Serialise to an in-memory ``ModelProto`` (weights included; use export for > 2 GB)."""
        with self.stamped() as stamped:
            return ir.serde.serialize_model(stamped)

    def __repr__(self) -> str:
        sig = self.signature
        ins = ", ".join(s.describe() for s in sig.inputs)
        outs = ", ".join(s.describe() for s in sig.outputs)
        return (
            f"<modelpress.Model {self.name!r} from {self.provenance.source_framework}: "
            f"{len(self.ir.graph)} nodes, {self.parameter_count():,} parameters; ({ins}) -> ({outs})>"
        )
