"""``fp16``: run the model in float16, keeping numerically fragile ops in float32.

Every node runs in float16 unless its op type is in ``keep_float32`` (by default the reductions
and exponentials whose range or accumulation float16 cannot hold: Softmax, LayerNormalization,
ReduceMean, Pow, Exp, ...) or it is named in ``exclude``. Float initializers used by float16 nodes
are stored as float16; a Cast is inserted wherever a tensor crosses between the two precisions.
With ``keep_io_types`` (default) the model's inputs and outputs stay float32.

Nodes inside If/Loop/Scan bodies are converted the same way; the control-flow nodes themselves
and the bodies' inputs and outputs stay float32 (a Cast at each body boundary), so the types the
outer node declares still hold. Outer-scope tensors a body reads get a Cast where the precision
differs.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from pydantic import Field

from modelpress.plugin_api import Model, Options, Out, PassContext

__all__ = ["Fp16Options", "fp16"]

KEEP_FLOAT32 = [
    "Softmax",
    "LogSoftmax",
    "LayerNormalization",
    "ReduceMean",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceL2",
    "ReduceProd",
    "Pow",
    "Exp",
    "Log",
    "Sqrt",
    "Erf",
    "Range",
    "CumSum",
    "Resize",
    "TopK",
    "RandomNormal",
    "RandomUniform",
    "NonMaxSuppression",
    "Upsample",
    "Einsum",
]
CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})
QUANTIZED = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
    }
)
_FLOAT = ir.DataType.FLOAT
_HALF = ir.DataType.FLOAT16


class Fp16Options(Options):
    keep_float32: list[str] = Field(
        default_factory=lambda: list(KEEP_FLOAT32), description="op types that stay float32"
    )
    exclude: list[str] = Field(default_factory=list, description="node names that stay float32")
    keep_io_types: bool = Field(
        True, description="keep model inputs and outputs float32 (Casts at the boundary)"
    )


class _Retyping:
    """The Casts and float16 initializers one fp16 pass has made, each made once and reused."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.casts: dict[tuple[int, ir.DataType], ir.Value] = {}
        self.converted: dict[str, ir.Value] = {}

    def cast(self, value: ir.Value, to: ir.DataType) -> ir.Value:
        key = (id(value), to)
        if key not in self.casts:
            b = self.model.builder()
            b.op(
                "Cast",
                [value],
                {"to": to},
                name=f"{value.name}_to_{to.name.lower()}",
                out=Out(f"{value.name}_{to.name.lower()}", to, value.shape),
            )
            node = b.nodes[0]
            producer = value.producer()
            # NOTE: in the graph that owns the value, so every body nested below can read the cast too.
            owner = producer.graph if producer is not None else value.graph
            assert owner is not None
            if producer is not None:
                owner.insert_after(producer, node)
            elif len(owner):
                owner.insert_before(owner[0], node)
            else:
                owner.append(node)
            self.casts[key] = node.outputs[0]
        return self.casts[key]

    def half_initializer(self, value: ir.Value) -> ir.Value:
        if value.name not in self.converted:
            array = value.const_value.numpy()  # type: ignore[union-attr]
            self.converted[value.name or ""] = self.model.add_initializer(
                f"{value.name}_fp16", np.clip(array, -65504, 65504).astype(np.float16)
            )
        return self.converted[value.name or ""]


def fp16(model: Model, opts: Fp16Options, ctx: PassContext) -> None:
    main = model.ir.graph
    _typed(model)
    keep = set(opts.keep_float32) | CONTROL_FLOW | QUANTIZED
    nodes = list(
        main.all_nodes()
    )  # NOTE: pre-order: every outer producer comes before the bodies reading it
    half_nodes = {
        id(n)
        for n in nodes
        if n.domain in ("", "ai.onnx") and n.op_type not in keep and n.name not in opts.exclude
    }
    retyping = _Retyping(model)
    n_half = 0
    for node in nodes:
        want = _HALF if id(node) in half_nodes else _FLOAT
        for i, value in enumerate(node.inputs):
            if value is None or value.dtype not in (_FLOAT, _HALF) or value.dtype == want:
                continue
            if (
                value.const_value is not None
                and value.is_initializer()
                and value.graph is main
                and want == _HALF
            ):
                node.replace_input_with(i, retyping.half_initializer(value))
            else:
                node.replace_input_with(i, retyping.cast(value, want))
        if want == _HALF:
            n_half += 1
            _to_half(node)
    _tidy(model, keep_io_types=opts.keep_io_types)
    ctx.figures.update(
        {
            "float16_nodes": n_half,
            "float32_nodes": len(nodes) - n_half,
            "casts": len(retyping.casts),
        }
    )
    inner = sum(1 for n in nodes if n.graph is not main)
    if inner:
        ctx.figures["subgraph_nodes"] = inner
        ctx.figures["float16_subgraph_nodes"] = sum(
            1 for n in nodes if n.graph is not main and id(n) in half_nodes
        )


def _tidy(model: Model, *, keep_io_types: bool) -> None:
    """After retyping: float32 outputs where they must stay so, no unused initializer, nodes in order."""
    main = model.ir.graph
    for graph in model.ir.graphs():
        if graph is not main:
            _float_outputs(model, graph)  # the If/Loop node declares float32 outputs
    if keep_io_types:
        _float_outputs(model, main)
    _drop_unused(main)
    main.sort()


def _typed(model: Model) -> None:
    """Infer the element types a pass before left unset (int8-static's Q/DQ outputs): the float ones must be known here."""
    if any(
        out.dtype is None for node in model.ir.graph.all_nodes() for out in node.outputs if out.name
    ):
        model.infer_shapes()


def _drop_unused(graph: ir.Graph) -> None:
    """Drop the initializers nothing reads any more (the float32 originals of converted weights)."""
    for value in list(graph.initializers.values()):
        if not list(value.uses()) and not value.is_graph_output():
            graph.initializers.pop(value.name)  # type: ignore[arg-type]


def _to_half(node: ir.Node) -> None:
    """Retype a node that now runs in float16: its float outputs, a Cast's target, a constant."""
    for out in node.outputs:
        if out.dtype == _FLOAT:
            out.dtype = _HALF
    if (
        node.op_type == "Cast"
        and node.attributes.get("to") is not None
        and node.attributes["to"].as_int() == _FLOAT
    ):
        node.attributes["to"] = ir.AttrInt64("to", int(_HALF))
    if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
        tensor = node.attributes["value"].as_tensor()
        if tensor.dtype == _FLOAT:
            node.attributes["value"] = ir.AttrTensor(
                "value", ir.tensor(tensor.numpy().astype(np.float16), name=tensor.name)
            )


def _float_outputs(model: Model, graph: ir.Graph) -> None:
    """Cast every float16 output of ``graph`` back to float32, keeping the output's name."""
    for i, out in enumerate(list(graph.outputs)):
        if out.dtype != _HALF:
            continue
        name = out.name
        assert name is not None
        node = (
            model.builder()
            .op(
                "Cast",
                [out],
                {"to": _FLOAT},
                name=f"{name}_to_float32_output",
                out=Out(f"{name}_float32", _FLOAT),
            )
            .producer()
        )
        assert node is not None
        graph.append(node)
        out.name = model.fresh_name(f"{name}_fp16")
        node.outputs[0].name = name
        node.outputs[0].shape = out.shape.copy() if out.shape is not None else None
        graph.outputs[i] = node.outputs[0]
