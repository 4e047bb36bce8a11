"""``int8-static``: QDQ static quantization with calibration and sensitivity-guided fallback.

The graph gets QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into integer
kernels: weights int8 symmetric (per output channel by default) behind a DequantizeLinear,
biases int32 (scale = input scale x weight scale), activations uint8 asymmetric (or int8) on
the input and output edges of each quantized node (the output taken after a following
Relu/Clip, which ORT folds into the quantization).

Normalisation/activation subgraphs as exporters decompose them and attention-mask Adds stay float
inside (:mod:`.patterns`); element-wise ops are quantized only where both sides stay integer
(:mod:`.selection`). The result is judged per output by :mod:`modelpress.criteria` on the
calibration data; if it misses, :mod:`.sensitivity` scores every node's local error in one ORT
session, ranks nodes by error per byte of weight, and bisects over that ranking (a few
whole-model runs) for the fewest nodes to move to int8 weight-only, then to float. The figures
say which nodes left int8 and why.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from modelpress.plugin_api import (
    DataError,
    Dataset,
    Judgement,
    Model,
    Options,
    OptionsError,
    PassContext,
    UnsupportedModelError,
    WeightedLayer,
    ensure_opset,
    load_dataset,
    recurrent_refusals,
)
from modelpress.plugins.quantize.affine import (
    QRange,
    affine_params,
    dequantize,
    per_axis,
    quantize,
    symmetric_params,
)
from modelpress.plugins.quantize.calibrate import (
    CALIBRATORS,
    TensorStats,
    choose_range,
    collect_stats,
)
from modelpress.plugins.quantize.calibrator_choice import choose_calibrators
from modelpress.plugins.quantize.embeddings import TableReport, quantize_tables
from modelpress.plugins.quantize.evaluate import Scorer
from modelpress.plugins.quantize.patterns import find_patterns, mask_adds
from modelpress.plugins.quantize.patterns import summary as patterns_summary
from modelpress.plugins.quantize.selection import feeds_quantized, integer_elementwise
from modelpress.plugins.quantize.sensitivity import local_errors, search
from modelpress.plugins.quantize.smoothquant import smooth

__all__ = ["Int8StaticOptions", "int8_static", "int8_static_method"]

_FUSABLE_ACTIVATIONS = {"Relu", "Clip"}
# Ops that only move or select values: a quantized input stays exactly on the same grid, so their
# outputs get Q/DQ with the input's scale (no accuracy cost) and ORT keeps them in int8.
_TRANSPARENT = {"MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split", "Gather"}


class Int8StaticOptions(Options):
    calibrator: Literal["minmax", "percentile", "entropy", "mse", "auto"] = Field("percentile", description="how activation ranges are chosen: " + ", ".join(CALIBRATORS) + "; auto: per tensor, the one whose range gives the smallest error of the MatMul/Gemm outputs it feeds (others: percentile)")
    percentile: float = Field(99.999, gt=50, le=100, description="percentile of |x| kept by the percentile calibrator")
    per_channel: bool = Field(True, description="one weight scale per output channel (False: per tensor)")
    activation_type: Literal["uint8", "int8"] = Field("uint8", description="integer type of activations")
    symmetric_activations: bool = Field(False, description="symmetric activation ranges (zero point 0 / 128)")
    op_types: list[str] = Field(default_factory=lambda: ["Conv", "Gemm", "MatMul"], description="op types to quantize (weighted layers)")
    exclude: list[str] = Field(default_factory=list, description="node names to keep in float")
    exclude_op_types: list[str] = Field(default_factory=list, description="op types to keep in float")
    keep_first_last: bool = Field(False, description="keep the first and last quantizable layers in float")
    bias_correction: bool = Field(False, description="correct each bias for the mean error its quantized weights cause")
    quantize_outputs: bool = Field(True, description="quantize node outputs too (needed for ORT's integer kernels)")
    activation_matmuls: bool = Field(True, description="also quantize MatMuls between two activations (attention scores and context)")
    elementwise_ops: list[str] = Field(default_factory=lambda: ["Add", "Mul"], description="element-wise op types quantized where both sides stay integer (inputs quantized, output feeding a quantized node)")
    min_agreement: float | None = Field(0.99, ge=0, le=1, description="target top-1 agreement with float on the calibration data (outputs judged as classifiers)")
    min_cosine: float | None = Field(0.99, ge=-1, le=1, description="target mean per-sample cosine (outputs judged as embeddings or dense maps)")
    max_relative_error: float | None = Field(0.1, ge=0, description="target relative L2 error (outputs judged as regression)")
    criteria: dict[str, str] = Field(default_factory=dict, description="per output name (or '*'): how it is judged, e.g. 'agreement>=0.98', 'cosine>=0.995', 'relative_error<=0.05' (default: inferred)")
    sensitivity: bool = Field(True, description="when the criteria are missed, move the most sensitive nodes (per byte) to int8 weight-only, then float, until they are met")
    fallback: Literal["weight-only", "float"] = Field("weight-only", description="first fallback of a sensitive weighted node: int8 weight-only (activations float), or float directly")
    max_evaluations: int = Field(12, ge=1, description="whole-model evaluations the sensitivity search may use (bisection over the ranked nodes)")
    embedding_tables: bool = Field(True, description="store Gather embedding tables as int8 (one scale per row) behind a DequantizeLinear")
    smoothquant: bool = Field(True, description="SmoothQuant: migrate activation outlier channels into the weights of MatMul/Gemm groups (a Mul by 1/s on the activation edge), with alpha chosen per group by the measured int8 output error (alpha 0, no migration, is a candidate)")
    smoothquant_max_alpha: float = Field(0.8, gt=0, le=1, description="SmoothQuant: largest migration strength searched (s = max|x|^alpha / max|w|^(1-alpha))")
    smoothquant_steps: int = Field(8, ge=1, le=50, description="SmoothQuant: points of the alpha grid searched in (0, smoothquant_max_alpha]")
    max_samples: int = Field(512, ge=1, description="calibration samples used (the first N)")
    batch_size: int = Field(64, ge=1, description="batch size for calibration runs")


@dataclass
class _Plan:
    """How one node gets quantized: its activation tensors and quantized weight/bias."""

    layer: WeightedLayer | None  # None: a MatMul between two activations, or an element-wise op
    act_ins: list[str]
    act_out: str | None
    constants: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None  # input index -> (q, scale, zero)
    weight_q: np.ndarray | None = None
    weight_scale: np.ndarray | None = None
    weight_zero: np.ndarray | None = None
    bias_q: np.ndarray | None = None
    bias_scale: np.ndarray | None = None


def _fused_output(node: ir.Node) -> ir.Value:
    """The tensor to quantize after ``node``: its output, or that of a sole Relu/Clip consumer."""
    out = node.outputs[0]
    users = list(out.uses())
    if len(users) == 1 and not out.is_graph_output():
        user = users[0][0]
        if user.op_type in _FUSABLE_ACTIVATIONS and user.domain in ("", "ai.onnx"):
            return user.outputs[0]
    return out


def _act_params(stats: TensorStats, opts: Int8StaticOptions, grid: QRange) -> tuple[np.ndarray, np.ndarray]:
    rmin, rmax = choose_range(stats, opts.calibrator, percentile=opts.percentile, signed=grid.signed)
    if opts.symmetric_activations:
        bound = max(abs(rmin), abs(rmax))
        if grid.signed:
            return symmetric_params(bound, grid)
        scale = np.float32(max(bound, 1e-12) * 2 / (grid.qmax - grid.qmin))
        return np.asarray(scale, np.float32), np.asarray(128, grid.dtype)
    scale, zero = affine_params(rmin, rmax, grid)
    return np.asarray(scale, np.float32), np.asarray(zero, grid.dtype)


def _plan(layer: WeightedLayer, stats: dict[str, TensorStats], act_scale: np.ndarray, opts: Int8StaticOptions, act_out: str | None) -> _Plan:
    w = layer.weight_array().astype(np.float32)
    grid = QRange(8, True, restricted=True)
    if opts.per_channel:
        axes = tuple(a for a in range(w.ndim) if a != layer.out_axis)
        scale, zero = symmetric_params(np.abs(w).max(axis=axes), grid)
        s_b = per_axis(scale, w.ndim, layer.out_axis)
        z_b = per_axis(zero, w.ndim, layer.out_axis)
    else:
        scale, zero = symmetric_params(float(np.abs(w).max()), grid)
        s_b, z_b = scale, zero
    wq = quantize(w, s_b, z_b, grid)
    bias = layer.bias_array()
    bias_q = bias_scale = None
    act_in = layer.node.inputs[0].name or ""
    if bias is not None:
        bias = bias.astype(np.float32)
        if opts.bias_correction and stats.get(act_in) is not None and stats[act_in].channel_mean is not None:
            mean = stats[act_in].channel_mean
            error = dequantize(wq, s_b, z_b) - w
            # expected output error per output channel = sum over inputs (and kernel) of error * input mean
            moved = np.moveaxis(error, (layer.out_axis, layer.in_axis), (0, 1))
            per_in = moved.reshape(moved.shape[0], moved.shape[1], -1).sum(axis=2)
            if mean is not None and per_in.shape[1] == mean.shape[0]:
                bias = bias - (per_in @ mean).astype(np.float32)
        bias_scale = (act_scale.astype(np.float64) * scale.astype(np.float64)).astype(np.float32)
        bias_q = np.clip(np.round(bias / bias_scale), -(2**31), 2**31 - 1).astype(np.int32)
    return _Plan(layer, [act_in], act_out, weight_q=wq, weight_scale=scale, weight_zero=zero, bias_q=bias_q, bias_scale=bias_scale)


def _build(model: Model, plans: dict[str, _Plan], selected: list[str], act: dict[str, tuple[np.ndarray, np.ndarray]], grid: QRange, per_channel: bool) -> Model:
    """A clone of ``model`` with QDQ for the ``selected`` nodes."""
    result = model.clone()
    graph = result.ir.graph
    by_name = {n.name: n for n in graph}
    values = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        for out in node.outputs:
            if out.name:
                values[out.name] = out
    act_dtype = ir.DataType.UINT8 if not grid.signed else ir.DataType.INT8

    act = dict(act)

    def qdq(tensor: str, consumers: list[ir.Node] | None) -> ir.Value:
        value = values[tensor]
        scale, zero = act[tensor]
        s = result.add_initializer(f"{tensor}_s", np.asarray(scale, np.float32))
        z = result.add_initializer(f"{tensor}_z", np.asarray(zero, grid.dtype))
        q = result.insert_after(value, "QuantizeLinear", [s, z], dtype=act_dtype, consumers=consumers, name=f"{tensor}_Q", output=f"{tensor}_q")
        return result.insert_after(q, "DequantizeLinear", [s, z], dtype=ir.DataType.FLOAT, name=f"{tensor}_DQ", output=f"{tensor}_dq")

    nodes = [by_name[name] for name in selected]
    outputs: set[str] = {out for n in selected if (out := plans[n].act_out)}
    covered: set[str] = set()

    def spread(dq_out: ir.Value, params: tuple[np.ndarray, np.ndarray]) -> None:
        """Give the outputs of value-preserving ops after a quantized tensor the same Q/DQ."""
        for user, index in list(dq_out.uses()):
            out = user.outputs[0] if user.outputs else None
            if user.op_type not in _TRANSPARENT or index != 0 or out is None or not out.name or out.name in covered or out.is_graph_output():
                continue
            act[out.name] = params
            covered.add(out.name)
            users = [u for u, _ in out.uses()]
            if users:
                spread(qdq(out.name, users), params)

    for tensor in sorted(outputs):
        users = [u for u, _ in values[tensor].uses()]
        if users:
            covered.add(tensor)
            spread(qdq(tensor, users), act[tensor])
    inputs: dict[str, list[ir.Node]] = {}
    for name, node in zip(selected, nodes, strict=True):
        for tensor in plans[name].act_ins:
            if tensor not in covered:
                inputs.setdefault(tensor, []).append(node)
    for tensor, users in inputs.items():
        qdq(tensor, users)

    replaced: list[ir.Value] = []
    dequantized: dict[tuple[int, int], ir.Value] = {}
    first_user: dict[int, ir.Node] = {}
    for node in graph:
        for value in node.inputs:
            if value is not None and value.is_initializer():
                first_user.setdefault(id(value), node)
    for name, node in zip(selected, nodes, strict=True):
        plan = plans[name]
        layer = plan.layer
        for index, (cq, cs, cz) in (plan.constants or {}).items():
            original = node.inputs[index]
            assert original is not None
            base = original.name or f"{name}_{index}"
            inputs_c = [result.add_initializer(f"{base}_q", cq), result.add_initializer(f"{base}_s", cs),
                        result.add_initializer(f"{base}_z", cz)]
            cdq = result.new_node("DequantizeLinear", inputs_c, name=f"{base}_{name}_DQ",
                                  outputs=[(f"{base}_{name}_dq", ir.DataType.FLOAT)])
            cdq.outputs[0].shape = ir.Shape(cq.shape)
            result.insert_before(node, cdq)
            node.replace_input_with(index, cdq.outputs[0])
            replaced.append(original)
        if layer is None or plan.weight_q is None or plan.weight_scale is None or plan.weight_zero is None:
            continue
        replaced += [v for v in (node.inputs[layer.weight_input], node.inputs[2] if len(node.inputs) > 2 else None) if v is not None]
        w_name = layer.weight.name or f"{name}_weight"
        # NOTE: a weight shared by several nodes (tied embeddings, shared projections) is quantized
        # once; its DequantizeLinear sits before the first user and feeds them all.
        weight_value = node.inputs[layer.weight_input]
        shared_key = (id(weight_value), layer.out_axis)
        if shared_key in dequantized:
            node.replace_input_with(layer.weight_input, dequantized[shared_key])
        else:
            wq = result.add_initializer(f"{w_name}_q", plan.weight_q)
            ws = result.add_initializer(f"{w_name}_s", plan.weight_scale if per_channel else np.asarray(plan.weight_scale, np.float32).reshape(()))
            wz = result.add_initializer(f"{w_name}_z", plan.weight_zero if per_channel else np.asarray(plan.weight_zero).reshape(()))
            attrs = {"axis": layer.out_axis} if per_channel else {}
            dq = result.new_node("DequantizeLinear", [wq, ws, wz], attrs, name=f"{w_name}_DQ",
                                 outputs=[(f"{w_name}_dq", ir.DataType.FLOAT)])
            dq.outputs[0].shape = ir.Shape(plan.weight_q.shape)
            result.insert_before(first_user.get(id(weight_value), node), dq)
            node.replace_input_with(layer.weight_input, dq.outputs[0])
            dequantized[shared_key] = dq.outputs[0]
        if plan.bias_q is not None and plan.bias_scale is not None and layer.bias is not None:
            b_name = layer.bias.name or f"{name}_bias"
            bq = result.add_initializer(f"{b_name}_q", plan.bias_q)
            bias_per_channel = per_channel or np.ndim(plan.bias_scale) > 0
            bs = result.add_initializer(f"{b_name}_s", np.asarray(plan.bias_scale, np.float32) if bias_per_channel else np.asarray(plan.bias_scale, np.float32).reshape(()))
            bdq = result.new_node("DequantizeLinear", [bq, bs], {"axis": 0} if np.ndim(plan.bias_scale) > 0 else {},
                                  name=f"{b_name}_DQ", outputs=[(f"{b_name}_dq", ir.DataType.FLOAT)])
            bdq.outputs[0].shape = ir.Shape(plan.bias_q.shape)
            result.insert_before(node, bdq)
            node.replace_input_with(2, bdq.outputs[0])
    # NOTE: the float weights of quantized nodes are now unused unless shared; drop them.
    for value in replaced:
        if value.name in graph.initializers and not list(value.uses()):
            graph.initializers.pop(value.name)
    return result


def int8_static_method(model: Model, opts: Int8StaticOptions, ctx: PassContext) -> Model:
    """The registered ``int8-static``: :func:`int8_static`, then the graph's intermediate values lose
    their value_info (ORT infers them: on PP-OCR's small models they were 5-10 % of the int8 file)."""
    result = int8_static(model, opts, ctx)
    for node in result.ir.graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.type = None
                out.shape = None
    return result


def int8_static(model: Model, opts: Int8StaticOptions, ctx: PassContext) -> Model:
    no_data = "int8-static needs calibration data (calibration=..., --calib data.npz): a few hundred representative inputs"
    if ctx.calibration is None and not model.subgraph_refusals(frozenset(opts.op_types), "", ""):
        raise DataError(no_data)  # NOTE: before any work; a model whose layers are all in subgraphs is refused by name below
    if opts.per_channel:
        model = ensure_opset(model, 13, why="per-channel QDQ (int8-static)", figures=ctx.figures)
    reference = model
    tables = TableReport()
    if opts.embedding_tables:  # NOTE: int8 rows are near-lossless; done first so every candidate is judged with them
        model = model.clone()
        tables = quantize_tables(model, bits=8, op_types={"Gather"}, min_elements=4096, exclude=set(opts.exclude))
    # NOTE: only with layers in the main graph: a model whose layers all sit in If/Loop bodies is refused by name below, before its data is read
    if opts.smoothquant and ctx.calibration is not None and any(layer.op_type in opts.op_types for layer in model.weighted_layers()):
        model = smooth(model, load_dataset(ctx.calibration, model.signature, what="calibration").take(opts.max_samples), ctx,
                       op_types=set(opts.op_types) - set(opts.exclude_op_types), exclude=set(opts.exclude),
                       max_alpha=opts.smoothquant_max_alpha, steps=opts.smoothquant_steps, batch_size=opts.batch_size)
    layers = [layer for layer in model.weighted_layers() if layer.op_type in opts.op_types]
    unknown = sorted(set(opts.exclude) - {n.name for n in model.nodes()})
    if unknown:
        raise OptionsError(f"int8-static: exclude names nodes that do not exist: {', '.join(unknown)}")
    float_nodes: dict[str, str] = model.subgraph_refusals(
        frozenset(opts.op_types), "int8-static", "cannot observe activations inside control flow to calibrate them; kept in float"
    )
    recurrent = recurrent_refusals(model.graph, "int8-static")
    float_nodes.update(recurrent)
    candidates: list[WeightedLayer] = []
    for i, layer in enumerate(layers):
        if layer.name in opts.exclude:
            float_nodes[layer.name] = "excluded by option"
        elif layer.op_type in opts.exclude_op_types:
            float_nodes[layer.name] = f"op type {layer.op_type} excluded by option"
        elif opts.keep_first_last and (i == 0 or i == len(layers) - 1):
            float_nodes[layer.name] = "first/last layer kept in float by option"
        elif layer.node.inputs[0] is None or layer.node.inputs[0].const_value is not None:
            float_nodes[layer.name] = "input is not an activation"
        else:
            candidates.append(layer)
    act_matmuls: list[ir.Node] = []
    if opts.activation_matmuls and "MatMul" in opts.op_types and "MatMul" not in opts.exclude_op_types:
        for node in model.nodes():
            ins = list(node.inputs)
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and len(ins) == 2 and node.name and all(
                v is not None and v.const_value is None and v.dtype == ir.DataType.FLOAT for v in ins
            ):
                if node.name in opts.exclude:
                    float_nodes[node.name] = "excluded by option"
                else:
                    act_matmuls.append(node)
    # NOTE: decomposed LayerNorm/RMSNorm/GELU/Softmax and attention-mask Adds stay float inside; only their boundary is quantized
    patterns, masks = find_patterns(model.graph), mask_adds(model.graph)
    protected = {id(n) for p in patterns for n in p.nodes} | {id(n) for n in masks}
    elementwise: list[ir.Node] = []
    for node in model.nodes():
        ins = [v for v in node.inputs if v is not None]
        if node.op_type in opts.elementwise_ops and node.domain in ("", "ai.onnx") and node.name and len(ins) == 2 and all(
            v.dtype == ir.DataType.FLOAT for v in ins) and any(v.const_value is None for v in ins):
            if node.name in opts.exclude or node.op_type in opts.exclude_op_types:
                float_nodes[node.name] = "excluded by option"
            elif node.outputs[0].is_graph_output():
                float_nodes[node.name] = "produces a model output"
            elif id(node) not in protected:
                elementwise.append(node)
    elementwise, _ = integer_elementwise(model.graph, [layer.node for layer in candidates] + act_matmuls, elementwise, _fused_output)
    if not candidates and not act_matmuls and not elementwise:
        if float_nodes:
            first, why = next(iter(float_nodes.items()))
            raise UnsupportedModelError(
                f"int8-static: nothing it can quantize in {model.name!r}: its {len(float_nodes)} weighted layers are not reachable "
                f"(first: {first!r} {why}); weight-only methods (codebook, int8-weight-only) reach layers inside subgraphs"
                + (f"; recurrent nodes {', '.join(repr(n) for n in recurrent)}: {next(iter(recurrent.values()))}" if recurrent else "")
            )
        raise OptionsError(f"int8-static: no quantizable nodes among op types {opts.op_types} in {model.name!r}")

    if ctx.calibration is None:
        raise DataError(no_data)
    data: Dataset = load_dataset(ctx.calibration, model.signature, what="calibration").take(opts.max_samples)
    grid = QRange(8, opts.activation_type == "int8")
    all_nodes = [layer.node for layer in candidates] + act_matmuls + elementwise
    # NOTE: a MatMul's output is quantized only where a quantized node reads it: rounding it on its way to a float
    # bias Add / LayerNorm only adds error (ORT runs DQ -> MatMul without it as MatMulIntegerToFloat). Conv and
    # Gemm keep it: ORT's QLinearConv needs the output Q.
    quantized_ids = {id(node) for node in all_nodes}
    out_tensors = {node.name: (_fused_output(node).name if opts.quantize_outputs and (
                       node.op_type != "MatMul" or feeds_quantized(_fused_output(node), quantized_ids)) else None)
                   for node in all_nodes}
    names = [v.name or "" for node in all_nodes for v in node.inputs[:2] if v is not None and v.const_value is None]
    names += [t for t in out_tensors.values() if t]
    graph_outputs = {v.name for v in model.graph.outputs}
    out_tensors = {k: (v if v not in graph_outputs else None) for k, v in out_tensors.items()}
    axes = {layer.node.inputs[0].name or "": (1 if layer.op_type == "Conv" else -1) for layer in candidates}
    stats = collect_stats(model, names, data, ctx, histogram=opts.calibrator != "minmax", channel_axes=axes, batch_size=opts.batch_size)
    base = opts if opts.calibrator != "auto" else opts.model_copy(update={"calibrator": "percentile"})
    act = {name: _act_params(s, base, grid) for name, s in stats.items()}
    if opts.calibrator == "auto":
        act = choose_calibrators(model, stats, candidates, data, lambda s, c: _act_params(s, opts.model_copy(update={"calibrator": c}), grid),
                                 act, signed=grid.signed, batch_size=opts.batch_size, ctx=ctx)
    plans = {
        layer.name: _plan(layer, stats, act[layer.node.inputs[0].name or ""][0], opts, out_tensors[layer.name])
        for layer in candidates
    }
    for node in act_matmuls:
        plans[node.name] = _Plan(None, [v.name or "" for v in node.inputs if v is not None], out_tensors[node.name])
    for node in elementwise:
        constants = {}
        for index, value in enumerate(node.inputs):
            if value is not None and value.const_value is not None:
                array = value.const_value.numpy().astype(np.float32)
                scale, zero = affine_params(float(array.min()), float(array.max()), grid)
                constants[index] = (quantize(array, scale, zero, grid), np.asarray(scale, np.float32), np.asarray(zero, grid.dtype))
        act_ins = [v.name or "" for v in node.inputs if v is not None and v.const_value is None]
        plans[node.name] = _Plan(None, act_ins, out_tensors[node.name], constants=constants)

    # NOTE: score in the batches calibration found to fit its memory budget (peak memory must not
    # grow with the batch size the data allows).
    scorer = Scorer(reference, data, opts.min_agreement, opts.min_cosine, max_relative_error=opts.max_relative_error,
                    criteria=opts.criteria, batch_size=int(ctx.figures.get("calibration_batch", opts.batch_size)))
    order = [node.name for node in all_nodes]

    def build(selected: list[str], weight_only: list[str] = ()) -> Model:  # type: ignore[assignment]
        use = dict(plans)
        for name in weight_only:  # weights int8 behind a DequantizeLinear, activations (and bias) float
            use[name] = replace(plans[name], act_ins=[], act_out=None, bias_q=None, bias_scale=None)
        # NOTE: a node kept off int8 must read its inputs unrounded: their producers then skip output Q/DQ
        # (int8 consumers of the same tensor still get their own input Q/DQ).
        backed_off = set(order) - set(selected)
        avoid = {t for n in backed_off for t in plans[n].act_ins}
        for name in selected:
            if plans[name].act_out in avoid:
                use[name] = replace(plans[name], act_out=None)
        return _build(model, use, [n for n in order if n in set(selected) | set(weight_only)], act, grid, opts.per_channel)

    full = build(order)
    score = scorer.score(full)
    chosen, weight_only, result = order, [], full
    errors: dict[str, float] = {}
    weight_bytes = {layer.name: int(layer.weight_array().nbytes) for layer in candidates}
    if not score.met and opts.sensitivity:
        errors = local_errors(model, plans, order, act, data, opts.per_channel, ctx, batch_size=scorer.batch_size)
        decision = search(order, errors, weight_bytes, build, scorer.score, ctx, max_evaluations=opts.max_evaluations,
                          fallback_weight_only=opts.fallback == "weight-only")
        if decision is not None:
            chosen, weight_only, result, score = decision.int8, decision.weight_only, decision.model, decision.judgement
            for name in decision.float_:
                float_nodes[name] = f"sensitive: 1/SQNR {errors[name]:.2g} alone"
        else:  # nothing met the criteria: ship the fully quantized model, flagged (the CLI refuses it without --accept-loss)
            ctx.figures["sensitivity_result"] = "no fallback met the criteria"
    total_bytes = sum(int(v.const_value.nbytes) for v in reference.graph.initializers.values() if v.const_value is not None)
    low_bit = sum(weight_bytes.get(n, 0) for n in chosen) + sum(weight_bytes.get(n, 0) for n in weight_only) + tables.bytes_before
    ctx.figures.update(
        {
            "quantized_nodes": len(chosen),
            "tables_quantized": len(tables.done),
            "weight_only_nodes": {n: f"sensitive: 1/SQNR {errors[n]:.2g} alone; int8 weights, float activations" for n in weight_only},
            "float_nodes": float_nodes,
            "patterns_kept_float": patterns_summary(patterns, masks),
            "low_bit_weight_share": round(low_bit / max(total_bytes, 1), 4),
            "calibration_samples": len(data),
            "judged_samples": len(scorer.data),
            "calibrator": opts.calibrator,
            # NOTE: the local-error ranking (1/SQNR, higher = more sensitive), for tuners that fall back along it
            "sensitivity": {n: round(float(e), 6) for n, e in errors.items()},
            "criteria_met": score.met,
            "criteria": score.summary(),
            **{f"calibration_{k}": v for k, v in _per_metric(score).items()},
        }
    )
    return result


def _per_metric(judgement: Judgement) -> dict[str, float]:
    """The worst value of each metric over the outputs (``calibration_agreement``, ``calibration_cosine``)."""
    worst: dict[str, float] = {}
    for criterion, value in zip(judgement.criteria, judgement.values, strict=True):
        pick = max if criterion.metric == "relative_error" else min
        worst[criterion.metric] = round(float(pick(worst.get(criterion.metric, value), value)), 6)
    return worst
