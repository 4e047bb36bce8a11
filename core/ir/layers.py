"""Finding the layers that carry weights: Conv, ConvTranspose, Gemm and MatMul with a constant weight.

The rules read the graph through :mod:`modelpress.ir.view` (an onnx-ir graph, or the light
reader's view of an ``.onnx`` file); only reading a weight's values needs onnx-ir and numpy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from modelpress.ir.view import GRAPH, GRAPHS

if TYPE_CHECKING:
    import numpy as np
    import onnx_ir as ir

__all__ = [
    "RECURRENT_OPS",
    "WEIGHTED_OPS",
    "WeightedLayer",
    "find_weighted_layers",
    "recurrent_refusals",
    "subgraph_refusals",
]

WEIGHTED_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})


@dataclass(frozen=True)
class WeightedLayer:
    """A node with a constant weight (and optionally a constant bias).

    ``weight_input`` is the index of the weight among the node's inputs. ``out_axis`` /
    ``in_axis`` are the axes of the weight tensor that index output and input channels
    (features), whatever the op's layout: Conv ``[O, I/g, kH, kW]``, ConvTranspose
    ``[I, O/g, kH, kW]``, Gemm ``[O, I]`` with ``transB=1`` else ``[I, O]``, MatMul ``[I, O]``.
    """

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    weight_input: int
    out_axis: int
    in_axis: int
    scope: str = ""  # "" in the main graph; else where the node lives, e.g. "If 'If_0' then_branch"

    @property
    def name(self) -> str:
        return self.node.name or self.weight.name or self.node.op_type

    @property
    def op_type(self) -> str:
        return self.node.op_type

    def attribute(self, name: str, default: Any = None) -> Any:
        """The node's attribute ``name`` as a Python value (int, float, list, ...), or ``default``."""
        attr = self.node.attributes.get(name)
        if attr is None or attr.is_ref():
            return default
        value = attr.value
        return list(value) if isinstance(value, (tuple, list)) else value

    # NOTE: ONNX's defaults, so a plugin never re-reads the operator spec to interpret a layer.
    @property
    def group(self) -> int:
        """Conv/ConvTranspose ``group`` (1 when absent; the channel count for a depthwise conv)."""
        return int(self.attribute("group", 1))

    @property
    def pads(self) -> list[int]:
        """Conv/ConvTranspose ``pads`` ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]`` (zeros when absent)."""
        return [int(p) for p in self.attribute("pads", [0] * (2 * self.spatial_rank))]

    @property
    def strides(self) -> list[int]:
        """Conv/ConvTranspose ``strides`` (ones when absent)."""
        return [int(s) for s in self.attribute("strides", [1] * self.spatial_rank)]

    @property
    def dilations(self) -> list[int]:
        """Conv/ConvTranspose ``dilations`` (ones when absent)."""
        return [int(d) for d in self.attribute("dilations", [1] * self.spatial_rank)]

    @property
    def spatial_rank(self) -> int:
        """Spatial dimensions of a Conv/ConvTranspose kernel (2 for ``[O, I, kH, kW]``); 0 otherwise."""
        if self.op_type not in ("Conv", "ConvTranspose") or self.weight.shape is None:
            return 0
        return max(len(self.weight.shape) - 2, 0)

    @property
    def trans_a(self) -> bool:
        """Gemm ``transA``: the input is transposed (False when absent or not a Gemm)."""
        return bool(self.attribute("transA", 0))

    @property
    def trans_b(self) -> bool:
        """Gemm ``transB``: the weight is stored ``[out, in]`` (False when absent or not a Gemm)."""
        return bool(self.attribute("transB", 0))

    @property
    def alpha(self) -> float:
        """Gemm ``alpha``, the factor on ``A @ B`` (1.0 when absent or not a Gemm)."""
        return float(self.attribute("alpha", 1.0))

    @property
    def beta(self) -> float:
        """Gemm ``beta``, the factor on the bias ``C`` (1.0 when absent or not a Gemm)."""
        return float(self.attribute("beta", 1.0))

    def weight_array(self) -> np.ndarray:
        """The weight as an array. From external data it is a copy and the memory map is closed
        at once: the model caches nothing, so a pass over a large model holds one layer at a time."""
        import numpy as np
        import onnx_ir as ir

        tensor = self.weight.const_value
        assert tensor is not None
        if isinstance(tensor, ir.ExternalTensor):
            array = np.array(tensor.numpy())
            tensor.release()
            return array
        return tensor.numpy()

    def bias_array(self) -> np.ndarray | None:
        if self.bias is None or self.bias.const_value is None:
            return None
        return self.bias.const_value.numpy()


def _const_initializer(value: ir.Value | None) -> bool:
    return value is not None and value.const_value is not None and value.is_initializer()


def _graphs(graph: ir.Graph, scope: str = "") -> list[tuple[ir.Graph, str]]:
    """``graph`` and every subgraph under it (If/Loop/Scan bodies), each with its scope."""
    found = [(graph, scope)]
    for node in graph:
        for attr in node.attributes.values():
            subs = (
                [attr.as_graph()]
                if attr.type == GRAPH
                else attr.as_graphs()
                if attr.type == GRAPHS
                else []
            )
            for sub in subs:
                where = f"{node.op_type} {node.name!r} {attr.name}"
                found += _graphs(sub, f"{scope} > {where}" if scope else where)
    return found


def find_weighted_layers(
    graph: ir.Graph, op_types: frozenset[str] = WEIGHTED_OPS, *, subgraphs: bool = False
) -> list[WeightedLayer]:
    """Weighted layers of ``graph``; with ``subgraphs``, also those inside If/Loop/Scan bodies
    (their ``scope`` says where). A weight defined in an outer graph counts as constant."""
    if subgraphs:
        return [
            layer
            if not scope
            else WeightedLayer(
                layer.node,
                layer.weight,
                layer.bias,
                layer.weight_input,
                layer.out_axis,
                layer.in_axis,
                scope,
            )
            for sub, scope in _graphs(graph)
            for layer in _layers_of(sub, op_types)
        ]
    return _layers_of(graph, op_types)


def subgraph_refusals(
    graph: ir.Graph, op_types: frozenset[str], method: str, why: str
) -> dict[str, str]:
    """``{layer: reason}`` for the weighted layers inside subgraphs that ``method`` leaves alone,
    so a method that cannot reach them says so by name instead of silently skipping them."""
    return {
        layer.name: f"inside {layer.scope}: {method} {why}"
        for layer in find_weighted_layers(graph, op_types, subgraphs=True)
        if layer.scope
    }


def recurrent_refusals(graph: ir.Graph, method: str) -> dict[str, str]:
    """``{node: reason}`` for the LSTM/GRU/RNN nodes anywhere in ``graph``, which no integer method
    quantizes (their W and R inputs, often computed from constants by the exporter's gate
    reordering): what a method says by name instead of "nothing to quantize"."""
    found: dict[str, str] = {}
    for sub, scope in _graphs(graph):
        for node in sub:
            if node.op_type not in RECURRENT_OPS or node.domain not in ("", "ai.onnx"):
                continue
            weights = [v for v in list(node.inputs)[1:3] if v is not None]
            size = sum(
                math.prod(d if isinstance(d, int) else 0 for d in v.shape)
                for v in weights
                if v.shape is not None
            )
            computed = any(not _const_initializer(v) for v in weights)
            where = f" inside {scope}" if scope else ""
            found[node.name or node.op_type] = (
                f"{node.op_type}{where}: {method} does not quantize recurrent weights (W, R: {size:,} values"
                f"{', computed from constants by the exporter' if computed else ''}); fp16 reaches them"
            )
    return found


def _layers_of(graph: ir.Graph, op_types: frozenset[str]) -> list[WeightedLayer]:
    layers: list[WeightedLayer] = []
    for node in graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in op_types:
            continue
        inputs = list(node.inputs)
        if node.op_type in ("Conv", "ConvTranspose"):
            if len(inputs) < 2 or not _const_initializer(inputs[1]):
                continue
            bias = inputs[2] if len(inputs) > 2 and _const_initializer(inputs[2]) else None
            out_axis, in_axis = (0, 1) if node.op_type == "Conv" else (1, 0)
            layers.append(WeightedLayer(node, inputs[1], bias, 1, out_axis, in_axis))  # type: ignore[arg-type]
        elif node.op_type == "Gemm":
            if len(inputs) < 2 or not _const_initializer(inputs[1]):
                continue
            trans_b = node.attributes.get("transB")
            transposed = trans_b is not None and trans_b.as_int() == 1
            bias = inputs[2] if len(inputs) > 2 and _const_initializer(inputs[2]) else None
            out_axis, in_axis = (0, 1) if transposed else (1, 0)
            layers.append(WeightedLayer(node, inputs[1], bias, 1, out_axis, in_axis))  # type: ignore[arg-type]
        elif node.op_type == "MatMul":
            if len(inputs) == 2 and _const_initializer(inputs[1]):
                weight = inputs[1]
                assert weight is not None
                rank = len(weight.shape) if weight.shape is not None else 2
                layers.append(WeightedLayer(node, weight, None, 1, rank - 1, rank - 2))
    return layers
