"""Normalisation on import: graphs as real exporters write them, made into graphs methods can read.

Exporters (Paddle2ONNX, older tf2onnx and torch exporters, hand-written graphs) store weights as
``Constant`` nodes, keep BatchNormalization unfused, leave Identity chains and constant
subexpressions, and put whole networks inside If/Loop branches. :func:`normalize` runs, in place
on an :class:`onnx_ir.Model`:

1. ``Constant`` nodes -> initializers (onnx-ir's ``LiftConstantsToInitializersPass``), in every
   graph;
2. constant folding: a node whose inputs are all constants is evaluated once (ONNX's reference
   evaluator) and replaced by an initializer, unless its result would be much bigger than its
   inputs (Expand, Tile, ConstantOfShape of big shapes stay), or it is a QuantizeLinear /
   DequantizeLinear or a Mul of their scales (quantized models stay quantized as written);
3. Identity nodes removed (not those that are a graph's output);
4. ``BatchNormalization`` after a Conv or Gemm folded into its weight and bias (inference-mode
   BN with constant parameters, the Conv/Gemm output used by the BN alone);
5. dead nodes and initializers removed, and initializers of subgraphs lifted into the main graph
   (``LiftSubgraphInitializersToMainGraphPass``), so every weight is a main-graph initializer
   whatever branch uses it.

:func:`modelpress.runtime.import_check.normalize_on_import` runs it and then the original and the
normalised model in ONNX Runtime on the same inputs; the ONNX adapter records both the counts and
that comparison in the provenance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import common as common_passes

from modelpress.ir.counting import quantization_parameter

__all__ = ["NormalizeReport", "fold_batchnorm", "fold_constants", "normalize", "remove_identities"]

# NOTE: never folded: randomness, control flow, and the quantization ops (a quantized model's
# int8 weights must stay int8 behind their DequantizeLinear).
_NO_FOLD = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    "If",
    "Loop",
    "Scan",
    "SequenceConstruct",
    "SequenceEmpty",
    "Optional",
}
# A folded result may be at most this many elements larger than its inputs together.
_FOLD_GROWTH = 4096


@dataclass
class NormalizeReport:
    """What :func:`normalize` changed (the counts go into the provenance)."""

    constants_lifted: int = 0
    constants_folded: int = 0
    identities_removed: int = 0
    batchnorms_folded: int = 0
    subgraph_initializers_lifted: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return (
            self.nodes_before != self.nodes_after
            or self.subgraph_initializers_lifted > 0
            or self.constants_lifted > 0
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "constants_lifted": self.constants_lifted,
            "constants_folded": self.constants_folded,
            "identities_removed": self.identities_removed,
            "batchnorms_folded": self.batchnorms_folded,
            "subgraph_initializers_lifted": self.subgraph_initializers_lifted,
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            **({"notes": list(self.notes)} if self.notes else {}),
        }


def _count(model: ir.Model, op_type: str | None = None) -> int:
    return sum(
        1
        for n in model.graph.all_nodes()
        if op_type is None or (n.op_type == op_type and n.domain in ("", "ai.onnx"))
    )


def normalize(model: ir.Model) -> NormalizeReport:
    """Normalise ``model`` in place (see the module docstring) and say what changed."""
    report = NormalizeReport(nodes_before=_count(model))
    constants = _count(model, "Constant")
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    report.constants_lifted = constants - _count(model, "Constant")
    report.constants_folded = fold_constants(model)
    report.identities_removed = remove_identities(model)
    report.batchnorms_folded = fold_batchnorm(model)
    common_passes.RemoveUnusedNodesPass()(model)
    in_subgraphs = sum(len(g.initializers) for g in model.graphs() if g is not model.graph)
    common_passes.LiftSubgraphInitializersToMainGraphPass()(model)
    report.subgraph_initializers_lifted = in_subgraphs - sum(
        len(g.initializers) for g in model.graphs() if g is not model.graph
    )
    report.nodes_after = _count(model)
    return report


# -- constant folding ---------------------------------------------------------------------------


def _constant(value: ir.Value | None) -> bool:
    return value is None or (
        value.const_value is not None and value.is_initializer() and not value.is_graph_input()
    )


def _foldable(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD or not node.inputs:
        return False
    if quantization_parameter(node):  # NOTE: a bias scale as input scale x weight scale, as written
        return False
    if any(
        a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
        for a in node.attributes.values()
    ):
        return False
    if any(o.is_graph_output() for o in node.outputs):
        return False
    if not all(_constant(v) for v in node.inputs):
        return False
    # NOTE: folding one of several users of a big constant (24 Slices of one LSTM weight) would
    # copy it; only a big constant's sole user is folded.
    return all(
        v is None
        or v.const_value is None
        or v.const_value.size <= _FOLD_GROWTH
        or len(list(v.uses())) == 1
        for v in node.inputs
    )


def _evaluate(node: ir.Node, opset: int) -> list[np.ndarray] | None:
    # NOTE: evaluated by ONNX Runtime, which import checks load anyway; onnx.reference's evaluator
    # costs 12 MB of imports, a third of a small model's quantize peak.
    import onnxruntime as ort

    proto = ir.serde.serialize_node(node)
    names = [v.name or "" for v in node.inputs if v is not None]
    feeds = {
        v.name or "": v.const_value.numpy()
        for v in node.inputs
        if v is not None and v.const_value is not None
    }
    graph = onnx.helper.make_graph(
        [proto],
        "fold",
        [
            onnx.helper.make_tensor_value_info(
                n, onnx.helper.np_dtype_to_tensor_dtype(feeds[n].dtype), feeds[n].shape
            )
            for n in dict.fromkeys(names)
        ],
        [onnx.helper.make_empty_tensor_value_info(o.name or "") for o in node.outputs if o.name],
    )
    opsets = [onnx.helper.make_opsetid("", opset)]
    ir_version = max(8, onnx.helper.find_min_ir_version_for(opsets))
    model = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.enable_cpu_mem_arena = False
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        # NOTE: copies: an output ORT hands over keeps its session's allocator alive, and a folded
        # constant lives as long as the model (silero-vad's 56 kept 14 MB of arenas resident)
        return [np.array(x, copy=True) for x in session.run(None, feeds)]
    except Exception:  # NOTE: an op ONNX Runtime cannot run here stays a node
        return None


def _fold_graph(graph: ir.Graph, opset: int, root: ir.Graph) -> int:
    folded = 0
    for node in list(graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                folded += _fold_graph(attr.as_graph(), opset, root)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.as_graphs():
                    folded += _fold_graph(sub, opset, root)
        if not _foldable(node):
            continue
        size_in = sum(
            int(v.const_value.size)
            for v in node.inputs
            if v is not None and v.const_value is not None
        )
        results = _evaluate(node, opset)
        if (
            results is None
            or len(results) != len(node.outputs)
            or sum(r.size for r in results) > size_in + _FOLD_GROWTH
        ):
            continue
        if any(r.dtype == object for r in results):
            continue
        for out, array in zip(node.outputs, results, strict=True):
            tensor = ir.tensor(array, name=out.name)
            value = ir.Value(
                name=out.name,
                shape=ir.Shape(array.shape),
                type=ir.TensorType(tensor.dtype),
                const_value=tensor,
            )
            out.replace_all_uses_with(value)
            out.name = None
            value.name = tensor.name
            graph.register_initializer(value)
        graph.remove(node, safe=True)
        folded += 1
    return folded


def fold_constants(model: ir.Model) -> int:
    """Evaluate nodes whose inputs are all constants; returns how many were folded."""
    opset = int(model.opset_imports.get("", 0))
    return _fold_graph(model.graph, opset, model.graph)


def remove_identities(model: ir.Model) -> int:
    """Bypass Identity nodes whose output is not a graph output (of any graph); returns the count.

    NOTE: onnx-ir's IdentityEliminationPass also rewires graph outputs, which fails on a
    subgraph output fed by an outer-scope value (silero-vad's If branches); those stay.
    """
    removed = 0
    for graph in model.graphs():
        for node in list(graph):
            if (
                node.op_type != "Identity"
                or node.domain not in ("", "ai.onnx")
                or len(node.inputs) != 1
            ):
                continue
            source, out = node.inputs[0], node.outputs[0]
            if source is None or out.is_graph_output():
                continue
            out.replace_all_uses_with(source)
            graph.remove(node, safe=True)
            removed += 1
    return removed


# -- BatchNormalization folding -----------------------------------------------------------------


def _array(value: ir.Value | None) -> np.ndarray | None:
    if value is None or not _constant(value) or value.const_value is None:
        return None
    return value.const_value.numpy()


@dataclass
class _Fold:
    """A BatchNormalization ``bn`` that folds into the Conv/Gemm ``producer`` before it: the layer's
    float32 weight (and bias, if any), BN's ``factor = scale / sqrt(var + eps)``, ``shift`` and
    ``mean`` (float64), and the weight's output-channel axis."""

    bn: ir.Node
    producer: ir.Node
    weight_value: ir.Value
    weight: np.ndarray
    bias_value: ir.Value | None
    bias: np.ndarray | None
    factor: np.ndarray
    shift: np.ndarray
    mean: np.ndarray
    out_axis: int


def _foldable_producer(bn: ir.Node) -> ir.Node | None:
    """The Conv/Gemm (same graph, default domain) whose output only ``bn`` reads, when ``bn`` is in
    inference mode and its extra outputs are unused; else None."""
    graph = bn.graph
    x = bn.inputs[0]
    producer = x.producer() if x is not None else None
    if graph is None or x is None or producer is None or producer.graph is not graph:
        return None
    if producer.op_type not in ("Conv", "Gemm") or producer.domain not in ("", "ai.onnx"):
        return None
    if (
        len(list(x.uses())) != 1
        or x.is_graph_output()
        or any(o.uses() or o.is_graph_output() for o in bn.outputs[1:])
    ):
        return None
    mode = bn.attributes.get("training_mode")
    if mode is not None and mode.as_int() != 0:
        return None
    return producer


def _gemm_out_axis(producer: ir.Node, weight: np.ndarray, bias: np.ndarray | None) -> int | None:
    """The output-channel axis of a Conv's weight (0) or a plain Gemm's (``transB``: 0, else 1);
    None for a Gemm with transA, alpha/beta other than 1, or a bias not per output column."""
    if producer.op_type == "Conv":
        return 0
    attrs = {k: a.value for k, a in producer.attributes.items()}
    if (
        attrs.get("transA", 0)
        or float(attrs.get("alpha", 1.0)) != 1.0
        or float(attrs.get("beta", 1.0)) != 1.0
    ):
        return None
    out_axis = 0 if attrs.get("transB", 0) else 1
    if bias is not None and bias.shape != (weight.shape[out_axis],):
        return None  # NOTE: a broadcast Gemm bias other than per output column is not folded
    return out_axis


def _fold_plan(bn: ir.Node) -> _Fold | None:
    """How ``bn`` folds into the layer before it, or None when it cannot: constant BN parameters,
    a float32 weight (and bias) used by that layer alone, one BN factor per output channel."""
    producer = _foldable_producer(bn)
    if producer is None:
        return None
    params = [_array(v) for v in bn.inputs[1:5]]
    weight_value = producer.inputs[1] if len(producer.inputs) > 1 else None
    weight = _array(weight_value)
    bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
    bias = _array(bias_value)
    if (
        weight is None
        or any(p is None for p in params)
        or (bias_value is not None and bias is None)
    ):
        return None
    assert weight_value is not None
    if len(list(weight_value.uses())) != 1 or (
        bias_value is not None and len(list(bias_value.uses())) != 1
    ):
        return None
    if weight.dtype != np.float32:
        return None
    scale, shift, mean, var = (np.asarray(p, np.float64) for p in params)  # type: ignore[arg-type]
    eps_attr = bn.attributes.get("epsilon")
    eps = eps_attr.as_float() if eps_attr is not None else 1e-5
    factor = scale / np.sqrt(var + eps)
    out_axis = _gemm_out_axis(producer, weight, bias)
    if out_axis is None or factor.shape != (weight.shape[out_axis],):
        return None
    return _Fold(
        bn, producer, weight_value, weight, bias_value, bias, factor, shift, mean, out_axis
    )


def _install_folded_weights(fold: _Fold) -> None:
    """Scale the layer's weight by BN's factor per output channel and set its bias to
    ``(bias - mean) * factor + shift`` (a new initializer when it had none)."""
    graph, producer, weight_value, weight = (
        fold.producer.graph,
        fold.producer,
        fold.weight_value,
        fold.weight,
    )
    assert graph is not None
    channels = weight.shape[fold.out_axis]
    shape = [1] * weight.ndim
    shape[fold.out_axis] = channels
    new_weight = (weight.astype(np.float64) * fold.factor.reshape(shape)).astype(np.float32)
    old_bias = fold.bias.astype(np.float64) if fold.bias is not None else np.zeros(channels)
    new_bias = ((old_bias - fold.mean) * fold.factor + fold.shift).astype(np.float32)
    weight_value.const_value = ir.tensor(new_weight, name=weight_value.name)
    bias_value = fold.bias_value
    if bias_value is not None:
        bias_value.const_value = ir.tensor(new_bias, name=bias_value.name)
        bias_value.type = ir.TensorType(ir.DataType.FLOAT)
        return
    name = f"{producer.name or weight_value.name}.folded_bias"
    taken = set(graph.initializers)
    while name in taken:
        name += "_"
    bias_value = ir.Value(
        name=name,
        shape=ir.Shape([channels]),
        type=ir.TensorType(ir.DataType.FLOAT),
        const_value=ir.tensor(new_bias, name=name),
    )
    graph.register_initializer(bias_value)
    producer.resize_inputs(3)
    producer.replace_input_with(2, bias_value)


def _bypass(bn: ir.Node) -> None:
    """Remove ``bn``: its readers (and the graph's outputs) read its input, which takes BN's
    output shape, and its output name when that was a graph output."""
    graph, x, out = bn.graph, bn.inputs[0], bn.outputs[0]
    assert graph is not None and x is not None
    x.shape = out.shape.copy() if out.shape is not None else x.shape
    out.replace_all_uses_with(x, replace_graph_outputs=True)
    if out.is_graph_output() or any(o is x for o in graph.outputs):
        x.name, out.name = out.name, None
    graph.remove(bn, safe=True)


def _fold_one_batchnorm(bn: ir.Node) -> bool:
    """Fold ``bn`` into the Conv/Gemm before it if it can be (see :func:`_fold_plan`); whether it was."""
    fold = _fold_plan(bn)
    if fold is None:
        return False
    _install_folded_weights(fold)
    _bypass(bn)
    return True


def fold_batchnorm(model: ir.Model) -> int:
    """Fold inference-mode BatchNormalization into the Conv/Gemm before it; returns the count."""
    folded = 0
    for graph in model.graphs():
        for node in list(graph):
            if (
                node.op_type == "BatchNormalization"
                and node.domain in ("", "ai.onnx")
                and _fold_one_batchnorm(node)
            ):
                folded += 1
    return folded
