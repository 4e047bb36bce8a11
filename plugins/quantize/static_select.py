"""``int8-static``'s op selection: the weighted layers, activation MatMuls and element-wise nodes it
quantizes, and a reason for each node it keeps in float (options, control flow, recurrent ops,
normalisation/activation patterns and mask Adds, see :mod:`.patterns` and :mod:`.selection`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import onnx_ir as ir

from modelpress.plugin_api import (
    Model,
    OptionsError,
    UnsupportedModelError,
    WeightedLayer,
    recurrent_refusals,
)
from modelpress.plugins.quantize.patterns import Pattern, find_patterns, mask_adds
from modelpress.plugins.quantize.selection import integer_elementwise
from modelpress.plugins.quantize.static_plan import fused_output

if TYPE_CHECKING:
    from modelpress.plugins.quantize.static import Int8StaticOptions

__all__ = ["Selection", "few_rows", "select"]


@dataclass
class Selection:
    candidates: list[WeightedLayer] = field(default_factory=list)
    act_matmuls: list[ir.Node] = field(default_factory=list)
    elementwise: list[ir.Node] = field(default_factory=list)
    float_nodes: dict[str, str] = field(default_factory=dict)
    patterns: list[Pattern] = field(default_factory=list)
    masks: list[ir.Node] = field(default_factory=list)

    @property
    def nodes(self) -> list[ir.Node]:
        return [layer.node for layer in self.candidates] + self.act_matmuls + self.elementwise


def select(model: Model, opts: Int8StaticOptions) -> Selection:
    """What int8-static quantizes in ``model``; refuses a model with nothing to quantize, by reason."""
    unknown = sorted(set(opts.exclude) - {n.name for n in model.nodes()})
    if unknown:
        raise OptionsError(
            f"int8-static: exclude names nodes that do not exist: {', '.join(unknown)}"
        )
    sel = Selection(
        float_nodes=model.subgraph_refusals(
            frozenset(opts.op_types),
            "int8-static",
            "reaches If branches through the calibration feeds that take them, not Loop/Scan bodies: kept in float",
        )
    )
    recurrent = recurrent_refusals(model.graph, "int8-static")
    sel.float_nodes.update(recurrent)
    _weighted(model, opts, sel)
    if (
        opts.activation_matmuls
        and "MatMul" in opts.op_types
        and "MatMul" not in opts.exclude_op_types
    ):
        for node in model.nodes():
            ins = list(node.inputs)
            if (
                node.op_type == "MatMul"
                and node.domain in ("", "ai.onnx")
                and len(ins) == 2
                and node.name
                and all(
                    v is not None and v.const_value is None and v.dtype == ir.DataType.FLOAT
                    for v in ins
                )
            ):
                if node.name in opts.exclude:
                    sel.float_nodes[node.name] = "excluded by option"
                else:
                    sel.act_matmuls.append(node)
    _elementwise(model, opts, sel)
    if not sel.candidates and not sel.act_matmuls and not sel.elementwise:
        if sel.float_nodes:
            first, why = next(iter(sel.float_nodes.items()))
            raise UnsupportedModelError(
                f"int8-static: nothing it can quantize in {model.name!r}: its {len(sel.float_nodes)} weighted layers are not reachable "
                f"(first: {first!r} {why}); weight-only methods (codebook, int8-weight-only) reach layers inside subgraphs"
                + (
                    f"; recurrent nodes {', '.join(repr(n) for n in recurrent)}: {next(iter(recurrent.values()))}"
                    if recurrent
                    else ""
                )
            )
        raise OptionsError(
            f"int8-static: no quantizable nodes among op types {opts.op_types} in {model.name!r}"
        )
    return sel


def _weighted(model: Model, opts: Int8StaticOptions, sel: Selection) -> None:
    layers = [layer for layer in model.weighted_layers() if layer.op_type in opts.op_types]
    for i, layer in enumerate(layers):
        if layer.name in opts.exclude:
            sel.float_nodes[layer.name] = "excluded by option"
        elif layer.op_type in opts.exclude_op_types:
            sel.float_nodes[layer.name] = f"op type {layer.op_type} excluded by option"
        elif opts.keep_first_last and (i == 0 or i == len(layers) - 1):
            sel.float_nodes[layer.name] = "first/last layer kept in float by option"
        elif layer.node.inputs[0] is None or layer.node.inputs[0].const_value is not None:
            sel.float_nodes[layer.name] = "input is not an activation"
        else:
            sel.candidates.append(layer)


def _elementwise(model: Model, opts: Int8StaticOptions, sel: Selection) -> None:
    # NOTE: decomposed LayerNorm/RMSNorm/GELU/Softmax and attention-mask Adds stay float inside; only their boundary is quantized
    sel.patterns, sel.masks = find_patterns(model.graph), mask_adds(model.graph)
    protected = {id(n) for p in sel.patterns for n in p.nodes} | {id(n) for n in sel.masks}
    pool: list[ir.Node] = []
    for node in model.nodes():
        ins = [v for v in node.inputs if v is not None]
        if (
            node.op_type in opts.elementwise_ops
            and node.domain in ("", "ai.onnx")
            and node.name
            and len(ins) == 2
            and all(v.dtype == ir.DataType.FLOAT for v in ins)
            and any(v.const_value is None for v in ins)
        ):
            if node.name in opts.exclude or node.op_type in opts.exclude_op_types:
                sel.float_nodes[node.name] = "excluded by option"
            elif node.outputs[0].is_graph_output():
                sel.float_nodes[node.name] = "produces a model output"
            elif id(node) not in protected:
                pool.append(node)
    sel.elementwise, _ = integer_elementwise(
        model.graph, [layer.node for layer in sel.candidates] + sel.act_matmuls, pool, fused_output
    )


def few_rows(model: Model, samples: int, op_types: list[str]) -> dict[str, str]:
    """The MatMul/Gemm layers SmoothQuant should leave alone because ``samples`` calibration samples give
    fewer rows of their input than it has channels (rows per sample from the input's static shape: 1 for
    ``[N, K]``; unknown, and so never counted few, when a middle axis is symbolic), each with the reason.

    SmoothQuant picks each group's scales by the error on the rows it sampled; with fewer rows than
    channels that error is fitted, not measured: on MTCNN's ONet (16 face crops, 1152- and 256-wide dense
    layers) the scales it kept cut the sampled error by 29 % and raised the box error on 96 other crops
    by a quarter (box cosine 0.99691 -> 0.99604)."""
    found: dict[str, str] = {}
    for layer in model.weighted_layers(frozenset(op_types) & {"MatMul", "Gemm"}):
        x, w = layer.node.inputs[0], layer.weight.shape
        if x is None or x.shape is None or w is None or len(x.shape) < 2:
            continue
        middle = list(x.shape)[1:-1]
        k = w[layer.in_axis]
        if not isinstance(k, int) or not all(isinstance(d, int) for d in middle):
            continue
        rows = samples
        for d in middle:
            rows *= d
        if rows < k:
            found[layer.name] = (
                f"{rows} calibration rows < {k} input channels: SmoothQuant would fit them"
            )
    return found
