"""Emitting ``int8-static``'s graph: a clone of the model with QDQ around the selected nodes.

Activations get ``QuantizeLinear -> DequantizeLinear`` pairs on the input and output edges of each
int8 node (spread through value-preserving ops after them, which ORT then runs in int8 too);
weights are stored int8 behind a ``DequantizeLinear`` (per output channel by default; their zero points,
all 0, left to the operator's default), biases int32; element-wise constants int8. Nodes the sensitivity search keeps out of int8 get a cheaper
form: *weight-only* nodes keep their int8 weights but read float activations; *half* nodes (float
fallback) store their weights as fp16 behind a ``Cast`` to float (float compute, half the bytes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from modelpress.plugin_api import Model, Out, WeightedLayer
from modelpress.plugins.quantize.affine import QRange
from modelpress.plugins.quantize.selection import TRANSPARENT

__all__ = ["FP16_MAX", "Params", "Plan", "Planned", "build", "half_eligible"]

FP16_MAX = 65504.0
Params = tuple[np.ndarray, np.ndarray]


@dataclass
class Plan:
    """How one node gets quantized: its activation tensors and quantized weight/bias."""

    layer: WeightedLayer | None  # None: a MatMul between two activations, or an element-wise op
    act_ins: list[str]
    act_out: str | None
    constants: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = (
        None  # input index -> (q, scale, zero)
    )
    weight_q: np.ndarray | None = None
    weight_scale: np.ndarray | None = None
    weight_zero: np.ndarray | None = None
    bias_q: np.ndarray | None = None
    bias_scale: np.ndarray | None = None
    bias_fix: tuple[str, np.ndarray] | None = (
        None  # a MatMul's bias in the Add after it: (initializer, corrected values)
    )
    # kept from saturating u8 x s8 kernels (static_plan.pairs_kept): (output channels whose scale
    # was widened, weight code pairs shrunk); None where not
    saturation: tuple[int, int] | None = None


@dataclass(frozen=True)
class Planned:
    """int8-static's plans for one model, shared by the steps that use them (building candidates,
    the sensitivity shadows): the model they are made on, each node's :class:`Plan`, each
    activation's (scale, zero point), the activations' integer grid and whether weights are per channel."""

    model: Model
    plans: dict[str, Plan]
    act: dict[str, Params]
    grid: QRange
    per_channel: bool


def build(planned: Planned, selected: list[str], half: Iterable[str] = ()) -> Model:
    """A clone of the planned model with QDQ for the ``selected`` nodes (in graph order) and fp16 weights for ``half``."""
    plans, act, grid, per_channel = planned.plans, planned.act, planned.grid, planned.per_channel
    result = planned.model.clone()
    by_name = {n.name: n for n in result.ir.graph}
    _Activations(result, dict(act), grid).emit(plans, selected)
    replaced = _weights(result, plans, [(name, by_name[name]) for name in selected], per_channel)
    replaced += _half_weights(result, [(plans[name], by_name[name]) for name in half])
    for name in (
        selected
    ):  # NOTE: bias correction of a MatMul whose bias is the constant of the Add after it
        if (fix := plans[name].bias_fix) is not None and fix[0] in result.ir.graph.initializers:
            result.replace_initializer(fix[0], fix[1])
    # NOTE: the float weights of quantized nodes are now unused unless shared; drop them.
    graph = result.ir.graph
    for value in replaced:
        if value.name in graph.initializers and not list(value.uses()):
            graph.initializers.pop(value.name)
    return result


class _Activations:
    """Q/DQ pairs on activation edges; outputs first (spread through value-preserving ops), then the
    inputs no output pair covers."""

    def __init__(self, result: Model, act: dict[str, Params], grid: QRange):
        self.result, self.act, self.grid = result, act, grid
        self.values: dict[str, ir.Value] = {v.name: v for v in result.ir.graph.inputs if v.name}
        for node in result.ir.graph:
            self.values.update({out.name: out for out in node.outputs if out.name})
        self.covered: set[str] = set()

    def qdq(self, tensor: str, consumers: list[ir.Node] | None) -> ir.Value:
        scale, zero = self.act[tensor]
        dtype = ir.DataType.INT8 if self.grid.signed else ir.DataType.UINT8
        s = self.result.add_initializer(f"{tensor}_s", np.asarray(scale, np.float32))
        z = self.result.add_initializer(f"{tensor}_z", np.asarray(zero, self.grid.dtype))
        q = self.result.insert_after(
            self.values[tensor],
            "QuantizeLinear",
            [s, z],
            name=f"{tensor}_Q",
            out=Out(f"{tensor}_q", dtype),
            consumers=consumers,
        )
        return self.result.insert_after(
            q,
            "DequantizeLinear",
            [s, z],
            name=f"{tensor}_DQ",
            out=Out(f"{tensor}_dq", ir.DataType.FLOAT),
        )

    def spread(self, dq_out: ir.Value, params: Params) -> None:
        """Give the outputs of value-preserving ops after a quantized tensor the same Q/DQ."""
        for user, index in list(dq_out.uses()):
            out = user.outputs[0] if user.outputs else None
            if (
                user.op_type not in TRANSPARENT
                or index != 0
                or out is None
                or not out.name
                or out.name in self.covered
                or out.is_graph_output()
            ):
                continue
            self.act[out.name] = params
            self.covered.add(out.name)
            users = [u for u, _ in out.uses()]
            if users:
                self.spread(self.qdq(out.name, users), params)

    def emit(self, plans: dict[str, Plan], selected: list[str]) -> None:
        for tensor in sorted({out for n in selected if (out := plans[n].act_out)}):
            users = [u for u, _ in self.values[tensor].uses()]
            if users:
                self.covered.add(tensor)
                self.spread(self.qdq(tensor, users), self.act[tensor])
        by_name = {n.name: n for n in self.result.ir.graph}
        inputs: dict[str, list[ir.Node]] = {}
        for name in selected:
            for tensor in plans[name].act_ins:
                if tensor not in self.covered:
                    inputs.setdefault(tensor, []).append(by_name[name])
        for tensor, users in inputs.items():
            self.qdq(tensor, users)


def _dq(
    result: Model,
    anchor: ir.Node,
    tensors: list[tuple[str, np.ndarray]],
    attrs: dict[str, int],
    name: str,
    scale: ir.Node | None = None,
) -> ir.Value:
    """A ``DequantizeLinear`` of new initializers ``tensors`` (q, scale[, zero]) placed before
    ``anchor``; with ``scale`` (a node not yet in the graph, placed before it too), its output is
    the scale and ``tensors`` holds only q."""
    inputs = [result.add_initializer(n, a) for n, a in tensors]
    if scale is not None:
        result.insert_before(anchor, [scale])
        inputs.insert(1, scale.outputs[0])
    b = result.builder()
    dq = b.op(
        "DequantizeLinear",
        inputs,
        attrs,
        name=f"{name}_DQ",
        out=Out(f"{name}_dq", ir.DataType.FLOAT),
    )
    dq.shape = ir.Shape(tensors[0][1].shape)
    result.insert_before(anchor, list(b.nodes))
    return dq


class _Dequantizing:
    """One build's DequantizeLinear nodes for constants, weights and biases; a weight shared by
    several nodes is dequantized once."""

    def __init__(self, result: Model, per_channel: bool) -> None:
        self.result, self.per_channel = result, per_channel
        self.dequantized: dict[tuple[int, int], ir.Value] = {}
        self.first_user: dict[int, ir.Node] = {}
        for node in result.ir.graph:
            for value in node.inputs:
                if value is not None and value.is_initializer():
                    self.first_user.setdefault(id(value), node)

    def constants(self, name: str, node: ir.Node, plan: Plan) -> list[ir.Value]:
        replaced = []
        for index, (cq, cs, cz) in (plan.constants or {}).items():
            original = node.inputs[index]
            assert original is not None
            base = original.name or f"{name}_{index}"
            node.replace_input_with(
                index,
                _dq(
                    self.result,
                    node,
                    [(f"{base}_q", cq), (f"{base}_s", cs), (f"{base}_z", cz)],
                    {},
                    f"{base}_{name}",
                ),
            )
            replaced.append(original)
        return replaced

    def weight(self, name: str, node: ir.Node, plan: Plan, layer: WeightedLayer) -> None:
        # NOTE: a weight shared by several nodes (tied embeddings, shared projections) is quantized
        # once; its DequantizeLinear sits before the first user and feeds them all.
        weight_q, weight_scale, weight_zero = plan.weight_q, plan.weight_scale, plan.weight_zero
        assert (
            weight_q is not None and weight_scale is not None and weight_zero is not None
        )  # NOTE: _weights calls only then
        weight_value = node.inputs[layer.weight_input]
        key = (id(weight_value), layer.out_axis)
        if key not in self.dequantized:
            w_name = layer.weight.name or f"{name}_weight"
            scale = (
                weight_scale
                if self.per_channel
                else np.asarray(weight_scale, np.float32).reshape(())
            )
            zero = weight_zero if self.per_channel else np.asarray(weight_zero).reshape(())
            anchor = self.first_user.get(id(weight_value), node)
            tensors = [(f"{w_name}_q", weight_q), (f"{w_name}_s", scale)]
            # NOTE: a symmetric int8 weight's zero points are all 0, DequantizeLinear's default for an int8
            # input: the file leaves them out, as ONNX Runtime's own weight files do (ORT fuses the same kernels)
            if weight_q.dtype != np.int8 or np.any(zero):
                tensors.append((f"{w_name}_z", zero))
            self.dequantized[key] = _dq(
                self.result,
                anchor,
                tensors,
                {"axis": layer.out_axis} if self.per_channel else {},
                w_name,
            )
        node.replace_input_with(layer.weight_input, self.dequantized[key])

    def bias(self, name: str, node: ir.Node, plan: Plan, layer: WeightedLayer) -> None:
        if plan.bias_q is None or plan.bias_scale is None or layer.bias is None:
            return
        b_name = layer.bias.name or f"{name}_bias"
        per_axis = np.ndim(plan.bias_scale) > 0
        bias_scale = (
            np.asarray(plan.bias_scale, np.float32)
            if self.per_channel or per_axis
            else np.asarray(plan.bias_scale, np.float32).reshape(())
        )
        product = _scale_product(self.result, node, layer, bias_scale)
        tensors = [(f"{b_name}_q", plan.bias_q)]
        if product is None:
            tensors.append((f"{b_name}_s", bias_scale))
        dq = _dq(self.result, node, tensors, {"axis": 0} if per_axis else {}, b_name, product)
        node.replace_input_with(2, dq)


def _scale_product(
    result: Model, node: ir.Node, layer: WeightedLayer, bias_scale: np.ndarray
) -> ir.Node | None:
    """A ``Mul`` of the input's and the weight's scale initializers that equals ``bias_scale``
    bit for bit (a float32 product is correctly rounded, as the plan's is), or None where the scales
    are not both there. The bias scale is ``input scale x weight scale`` by definition: stored, it
    repeated one float per output channel (per-channel weights); ONNX Runtime folds the constant
    ``Mul`` before its QDQ fusions, so the integer kernel is the same."""

    def scale_of(value: ir.Value | None) -> ir.Value | None:
        dq = value.producer() if value is not None else None
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) < 2:
            return None
        scale = dq.inputs[1]
        return scale if scale is not None and scale.is_initializer() else None

    x_scale, w_scale = scale_of(node.inputs[0]), scale_of(node.inputs[layer.weight_input])
    if x_scale is None or w_scale is None:
        return None
    assert x_scale.const_value is not None and w_scale.const_value is not None
    x, w = x_scale.const_value.numpy(), w_scale.const_value.numpy()
    if x.ndim != 0 or w.shape != bias_scale.shape or w.dtype != np.float32:
        return None
    if not np.array_equal(np.float32(x) * w, bias_scale):
        return None
    b = result.builder()
    return b.op(
        "Mul",
        [x_scale, w_scale],
        name=f"{layer.bias.name or node.name}_scale",
        out=Out(f"{layer.bias.name or node.name}_s", ir.DataType.FLOAT),
    ).producer()


def _weights(
    result: Model, plans: dict[str, Plan], nodes: list[tuple[str, ir.Node]], per_channel: bool
) -> list[ir.Value]:
    """Element-wise constants, weights and biases of the quantized nodes behind DequantizeLinear;
    returns the float values they replaced."""
    replaced: list[ir.Value] = []
    dequantizing = _Dequantizing(result, per_channel)
    for name, node in nodes:
        plan, layer = plans[name], plans[name].layer
        replaced += dequantizing.constants(name, node, plan)
        if (
            layer is None
            or plan.weight_q is None
            or plan.weight_scale is None
            or plan.weight_zero is None
        ):
            continue
        replaced += [
            v
            for v in (
                node.inputs[layer.weight_input],
                node.inputs[2] if len(node.inputs) > 2 else None,
            )
            if v is not None
        ]
        dequantizing.weight(name, node, plan, layer)
        dequantizing.bias(name, node, plan, layer)
    return replaced


def half_eligible(layer: WeightedLayer) -> bool:
    """Whether a layer's weight can be stored as fp16 without a change beyond fp16 rounding: float32,
    used by this node alone, and within fp16's range."""
    value = layer.weight
    if (
        value.const_value is None
        or value.dtype != ir.DataType.FLOAT
        or len(list(value.uses())) != 1
    ):
        return False
    return bool(np.all(np.abs(layer.weight_array()) <= FP16_MAX))


def _half_weights(result: Model, nodes: list[tuple[Plan, ir.Node]]) -> list[ir.Value]:
    """Store each node's weight as fp16 behind a ``Cast`` to float (the node computes in float)."""
    replaced: list[ir.Value] = []
    for plan, node in nodes:
        layer = plan.layer
        if layer is None or not half_eligible(layer):
            continue
        value = node.inputs[layer.weight_input]
        assert value is not None and value.const_value is not None
        w_name = value.name or f"{node.name}_weight"
        half = result.add_initializer(
            f"{w_name}_fp16", value.const_value.numpy().astype(np.float16)
        )
        b = result.builder()
        cast = b.op(
            "Cast",
            [half],
            {"to": int(ir.DataType.FLOAT)},
            name=f"{w_name}_Cast",
            out=Out(f"{w_name}_f", ir.DataType.FLOAT),
        )
        cast.shape = ir.Shape(value.const_value.shape)
        result.insert_before(node, list(b.nodes))
        node.replace_input_with(layer.weight_input, cast)
        replaced.append(value)
    return replaced
