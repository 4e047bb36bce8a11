"""``int8-static``: QDQ static quantization with calibration and sensitivity-guided fallback.

The graph gets QuantizeLinear/DequantizeLinear pairs that ONNX Runtime fuses into integer
kernels: weights int8 symmetric (per output channel by default; 7-bit where the CPU's u8 x s8
kernels saturate, see :mod:`.cpu`) behind a DequantizeLinear,
biases int32 (scale = input scale x weight scale), MatMul/Gemm weights rounded by GPTQ against the
rows SmoothQuant samples (:mod:`.gptq_int8`) and Conv weights against their input patches where the
calibration data holds enough of them (:mod:`.conv_rounding`), activations uint8 asymmetric (or int8) on
the input and output edges of each quantized node (the output taken after a following
Relu/Clip, which ORT folds into the quantization; a MatMul's output only where an integer node reads it,
or where ORT would otherwise fuse it with its bias Add into a float Gemm, see :func:`.static_plan.gemm_fused`).

Normalisation/activation subgraphs as exporters decompose them and attention-mask Adds stay float
inside (:mod:`.patterns`); element-wise ops are quantized only where both sides stay integer
(:mod:`.selection`). With 32 calibration samples or more, SmoothQuant on/off and the
``percentile``/``minmax`` calibrator (those not set) are first chosen on held-out samples
(:mod:`.static_search`). The result is judged per output by :mod:`modelpress.evaluation.criteria` on the
calibration data; if it misses, :mod:`.sensitivity` scores every node's local error in one ORT
session, ranks nodes by error per byte of weight, and bisects over that ranking (a few
whole-model runs) for the fewest nodes to move to int8 weight-only, then to float (their weights
stored as fp16 behind a Cast: float compute, half the bytes). The figures say which nodes left
int8, in which form, and why. The parts: :mod:`.static_select` (which nodes), :mod:`.static_plan`
(scales, int8 weights), :mod:`.qdq` (the graph), :mod:`.sensitivity` (the fallback search).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
from pydantic import Field

from modelpress.plugin_api import (
    Bounds,
    Dataset,
    Judgement,
    Model,
    Options,
    PassContext,
    ensure_opset,
    load_dataset,
    lower_is_better,
    make_session,
)
from modelpress.plugin_api import run as run_session
from modelpress.plugins.quantize.affine import QRange
from modelpress.plugins.quantize.branches import Flat, flatten
from modelpress.plugins.quantize.calibrate import CALIBRATORS, TensorStats, collect_stats
from modelpress.plugins.quantize.calibrator_choice import Ranges, choose_calibrators
from modelpress.plugins.quantize.conv_rounding import conv_codes
from modelpress.plugins.quantize.cpu import REDUCE_RANGE_HELP, resolve_reduce_range
from modelpress.plugins.quantize.embeddings import TableReport, embedding_tables, quantize_tables
from modelpress.plugins.quantize.evaluate import Scorer, Unfinished
from modelpress.plugins.quantize.folding import (
    fuse_layer_norms,
    may_fold,
    move_attention_biases,
    move_residual_biases,
)
from modelpress.plugins.quantize.patterns import summary as patterns_summary
from modelpress.plugins.quantize.qdq import Plan, Planned, build, half_eligible
from modelpress.plugins.quantize.selection import feeds_quantized
from modelpress.plugins.quantize.sensitivity import Decision, Ranking, local_errors, search
from modelpress.plugins.quantize.smoothquant import smooth
from modelpress.plugins.quantize.static_plan import (
    act_params,
    constant_plan,
    fused_output,
    gemm_fused,
    gptq_grid,
    pairs_kept,
    weight_plan,
)
from modelpress.plugins.quantize.static_search import Search, choose_configuration
from modelpress.plugins.quantize.static_select import Selection, few_rows, select

__all__ = ["Int8StaticOptions", "int8_static", "int8_static_method"]


class Int8StaticOptions(Options):
    calibrator: Literal["minmax", "percentile", "entropy", "mse", "auto"] = Field(
        "percentile",
        description="how activation ranges are chosen: "
        + ", ".join(CALIBRATORS)
        + "; auto: per tensor, the one whose range gives the smallest error of the MatMul/Gemm outputs it feeds (others: percentile)",
    )
    percentile: float = Field(
        99.999, gt=50, le=100, description="percentile of |x| kept by the percentile calibrator"
    )
    per_channel: bool = Field(
        True, description="one weight scale per output channel (False: per tensor)"
    )
    activation_type: Literal["uint8", "int8"] = Field(
        "uint8", description="integer type of activations"
    )
    symmetric_activations: bool = Field(
        False, description="symmetric activation ranges (zero point 0 / 128)"
    )
    op_types: list[str] = Field(
        default_factory=lambda: ["Conv", "Gemm", "MatMul"],
        description="op types to quantize (weighted layers)",
    )
    exclude: list[str] = Field(default_factory=list, description="node names to keep in float")
    exclude_op_types: list[str] = Field(
        default_factory=list, description="op types to keep in float"
    )
    keep_first_last: bool = Field(
        False, description="keep the first and last quantizable layers in float"
    )
    bias_correction: bool = Field(
        False,
        description="correct each bias for the mean error its quantized weights cause (Conv/Gemm bias inputs, and a "
        "MatMul's bias in the Add after it, as exporters write a Linear)",
    )
    quantize_outputs: bool = Field(
        True, description="quantize node outputs too (needed for ORT's integer kernels)"
    )
    activation_matmuls: bool = Field(
        False,
        description="also quantize MatMuls between two activations (attention scores and context); off by default: on "
        "MiniLM they cost 0.0008 of embedding cosine for 6 % of the latency",
    )
    elementwise_ops: list[str] = Field(
        default_factory=lambda: ["Add", "Mul"],
        description="element-wise op types quantized where both sides stay integer (inputs quantized, output feeding a quantized node)",
    )
    min_agreement: float | None = Field(
        0.99,
        ge=0,
        le=1,
        description="target top-1 agreement with float on the calibration data (outputs judged as classifiers)",
    )
    min_cosine: float | None = Field(
        0.99,
        ge=-1,
        le=1,
        description="target mean per-sample cosine (outputs judged as embeddings or dense maps)",
    )
    max_relative_error: float | None = Field(
        0.1, ge=0, description="target relative L2 error (outputs judged as regression)"
    )
    criteria: dict[str, str] = Field(
        default_factory=dict,
        description="per output name (or '*'): how it is judged, e.g. 'agreement>=0.98', 'cosine>=0.995', 'relative_error<=0.05' (default: inferred)",
    )
    sensitivity: bool = Field(
        True,
        description="when the criteria are missed, move the most sensitive nodes (per byte) out of full int8 (see "
        "fallback), then to float, until they are met",
    )
    fallback: Literal["auto", "weight-only", "float"] = Field(
        "auto",
        description="first fallback of a sensitive weighted node: int8 weight-only (activations float), or float "
        "directly; auto: weight-only for a node holding at least 10% of the quantized layers' weight bytes (where float would "
        "cost the file most), float for the others (ONNX Runtime's CPU runs a weight-only node slower than "
        "fp32: it dequantizes the weight on every run, and a Conv loses its blocked kernels)",
    )
    fallback_fp16: bool = Field(
        True,
        description="a node the sensitivity search moves to float keeps its weights as fp16 (a Cast to float before it: "
        "float compute, half the bytes of fp32); False: fp32",
    )
    max_evaluations: int = Field(
        12,
        ge=1,
        description="whole-model evaluations the sensitivity search may use (bisection over the ranked nodes)",
    )
    embedding_tables: bool = Field(
        True,
        description="store embedding tables (read by Gather, or by Slice as position tables are) as int8, one scale per row, behind a DequantizeLinear",
    )
    smoothquant: bool = Field(
        True,
        description="SmoothQuant: migrate activation outlier channels into the weights of MatMul/Gemm groups (a Mul by "
        "1/s on the activation edge), with alpha chosen per group by the measured int8 output error (alpha 0, "
        "no migration, is a candidate)",
    )
    smoothquant_max_alpha: float = Field(
        0.8,
        gt=0,
        le=1,
        description="SmoothQuant: largest migration strength searched (s = max|x|^alpha / max|w|^(1-alpha))",
    )
    smoothquant_steps: int = Field(
        8,
        ge=1,
        le=50,
        description="SmoothQuant: points of the alpha grid searched in (0, smoothquant_max_alpha]",
    )
    weight_rounding: Literal["gptq", "nearest"] = Field(
        "gptq",
        description="how weights are rounded to int8: gptq, each input channel's rounding error moved onto the "
        "channels not yet rounded through the inverse Hessian of the layer's calibration inputs (the scales "
        "unchanged), for the MatMul/Gemm layers SmoothQuant samples rows for and the Conv layers (group 1) with at "
        "least as many sampled input patches as weights per output channel; nearest: to the nearest step",
    )
    fold_graph: bool = Field(
        True,
        description="before calibrating, rewrite the float graph where exact so fewer float ops run beside the "
        "integer kernels: decomposed LayerNorms become LayerNormalization (opset 17+), attention key biases are "
        "dropped and value biases moved into the output projection's (figure: graph_folds)",
    )
    search_config: bool = Field(
        False,
        description="True, with calibration data of 32 samples or more: try SmoothQuant on/off x calibrator percentile/minmax "
        "(only the options not set explicitly) calibrated on the first 3/4 of the samples, and keep the one best on the "
        "held-out rest by the outputs' criteria (figure: configuration; costs up to 1.4x the quantize CPU); "
        "False (the default): the options as given",
    )
    max_samples: int = Field(512, ge=1, description="calibration samples used (the first N)")
    batch_size: int = Field(64, ge=1, description="batch size for calibration runs")
    reduce_range: bool | None = Field(
        None,
        description="weights of the integer Conv/Gemm/MatMul " + REDUCE_RANGE_HELP + "; where None "
        "chooses 7 bits, MatMul/Gemm and ungrouped Conv weights keep 8-bit scales instead, each output "
        "channel's widened only as far as its codes need so that no pair can saturate (a MatMul/Gemm's on "
        "the calibrated inputs, a Conv's on any), and depthwise Conv weights full 8 bits (ORT's depthwise "
        "kernel sums in int32)",
    )


def int8_static_method(model: Model, opts: Int8StaticOptions, ctx: PassContext) -> Model:
    """The registered ``int8-static``: :func:`int8_static`, then the graph's intermediate values lose
    their value_info (ORT infers them: on PP-OCR's small models they were 5-10 % of the int8 file)."""
    if opts.per_channel:
        model = ensure_opset(model, 13, why="per-channel QDQ (int8-static)", figures=ctx.figures)
    flat = _flattened(model, opts, ctx)
    if flat is not None:  # NOTE: calibrated on the feeds that take the inlined branches
        ctx = replace(ctx, calibration=flat.data)
    result = int8_static(flat.model if flat else model, opts, ctx)
    if flat is not None:
        result = flat.restore(result)
        ctx.figures["if_branches"] = flat.figures()
        ctx.figures["weight_only_nodes"] = {
            **ctx.figures.get("weight_only_nodes", {}),
            **flat.weight_only_nodes(),
        }
        ctx.figures["low_bit_weight_share"] = flat.low_bit_share(
            ctx.figures["low_bit_weight_share"]
        )
    for node in result.ir.graph:
        for out in node.outputs:
            if not out.is_graph_output():
                out.type = None
                out.shape = None
    return result


def _flattened(model: Model, opts: Int8StaticOptions, ctx: PassContext) -> Flat | None:
    """The observation model with the If branches the calibration feeds take inlined (:mod:`.branches`), or
    None when no If branch holds a layer of ``op_types`` (or no calibration data was given)."""
    if ctx.calibration is None or not any(
        layer.scope.startswith("If ")
        for layer in model.weighted_layers(frozenset(opts.op_types), subgraphs=True)
    ):
        return None
    return flatten(_named(model), _calibration(model, opts, ctx), frozenset(opts.op_types))


def int8_static(model: Model, opts: Int8StaticOptions, ctx: PassContext) -> Model:
    """Select (:mod:`.static_select`), calibrate and plan (:mod:`.static_plan`), emit (:mod:`.qdq`),
    judge, and when the criteria are missed, search for the fallbacks (:mod:`.sensitivity`)."""
    # NOTE: calibration data is declared (Method.requires): the host refuses a call without it before any work
    if opts.per_channel:
        model = ensure_opset(model, 13, why="per-channel QDQ (int8-static)", figures=ctx.figures)
    model = _named(model)
    reference = model
    model, tables = _tables(model, opts)
    data, smoothed = None, None
    # NOTE: only with layers in the main graph: a model whose layers all sit in If/Loop bodies is refused by name later, before its data is read
    if ctx.calibration is not None and any(
        layer.op_type in opts.op_types for layer in model.weighted_layers()
    ):
        data = _calibration(model, opts, ctx)
        model = _folded(model, data, opts, ctx)
        candidates = _FullInt8()
        opts = choose_configuration(Search(reference, model, data, opts, ctx, candidates))
        smoothed = candidates.smoothed if opts.smoothquant else None
    # NOTE: GPTQ-rounded weights by layer, made where SmoothQuant sampled rows
    codes: dict[str, np.ndarray] = {}
    if (
        smoothed is not None
    ):  # NOTE: the search's SmoothQuant (on its first 3/4 of the samples), not redone
        model, codes = smoothed[0], dict(smoothed[1])
        ctx.figures.update(smoothed[2])
    elif opts.smoothquant and data is not None:
        model = _smooth(model, data, opts, ctx, codes)
    sel = select(model, opts)
    if data is None:
        data = _calibration(model, opts, ctx)
    _conv_gptq(model, sel, data, opts, codes)
    grid = QRange(8, opts.activation_type == "int8")
    planned = _plans(model, sel, data, grid, opts, ctx, codes)
    ctx.figures["gptq_rounded_layers"] = len(codes)
    codes.clear()
    plans = planned.plans
    # NOTE: score in the batches calibration found to fit its memory budget (peak memory must not
    # grow with the batch size the data allows).
    bounds = Bounds(
        agreement=opts.min_agreement, cosine=opts.min_cosine, relative_error=opts.max_relative_error
    )
    scorer = Scorer(
        reference,
        data,
        bounds,
        criteria=opts.criteria,
        batch_size=int(ctx.figures.get("calibration_batch", opts.batch_size)),
    )
    outcome = _Outcome(
        sel, {layer.name: int(layer.weight_array().nbytes) for layer in sel.candidates}
    )
    # NOTE: biases corrected (Conv/Gemm bias inputs, and a MatMul's bias in the Add after it)
    outcome.bias_corrected = sum(
        1
        for p in plans.values()
        if p.bias_fix is not None or (opts.bias_correction and p.bias_q is not None)
    )
    _decide(planned, data, scorer, outcome, opts, ctx)
    _figures(reference, outcome, tables, len(data), len(scorer.data), opts, ctx)
    assert outcome.model is not None
    return outcome.model


def _smooth(
    model: Model,
    data: Dataset,
    opts: Int8StaticOptions,
    ctx: PassContext,
    codes: dict[str, np.ndarray],
) -> Model:
    """SmoothQuant (:func:`.smoothquant.smooth`) on the layers whose calibration rows are not fewer than their
    input channels (:func:`.static_select.few_rows`; figure ``smoothquant_skipped``)."""
    skipped = {
        name: why
        for name, why in few_rows(model, len(data), opts.op_types).items()
        if name not in opts.exclude
    }
    if skipped:
        ctx.figures["smoothquant_skipped"] = skipped
        opts = opts.model_copy(update={"exclude": [*opts.exclude, *skipped]})
    return smooth(model, data, opts, ctx, codes)


def _conv_gptq(
    model: Model,
    sel: Selection,
    data: Dataset,
    opts: Int8StaticOptions,
    codes: dict[str, np.ndarray],
) -> None:
    """GPTQ codes of the selected Convs (:mod:`.conv_rounding`) into ``codes`` when ``opts.weight_rounding`` is gptq."""
    if opts.weight_rounding != "gptq":
        return
    paired = pairs_kept(opts, resolve_reduce_range(opts.reduce_range)[0])
    layers = [layer for layer in sel.candidates if layer.name not in codes]
    codes.update(
        conv_codes(model, layers, data, gptq_grid(opts), per_channel=opts.per_channel, pairs=paired)
    )


def _named(model: Model) -> Model:
    """``model`` with every main-graph node named (a clone when one had no name): selection,
    statistics and plans are keyed by node name, and ONNX allows unnamed nodes (they all collided
    at ``""``). A weighted node takes its layer's name (its weight's), so the names users see in
    reports and ``exclude=`` are those they saw before."""
    if all(node.name for node in model.ir.graph):
        return model
    model = model.clone()
    layers = {id(layer.node): layer.name for layer in model.weighted_layers()}
    for node in model.ir.graph:
        if not node.name:
            node.name = model.fresh_name(layers.get(id(node), node.op_type), node=True)
    return model


def _calibration(model: Model, opts: Int8StaticOptions, ctx: PassContext) -> Dataset:
    return load_dataset(ctx.calibration, model.signature, what="calibration").take(opts.max_samples)


def _folded(model: Model, data: Dataset, opts: Int8StaticOptions, ctx: PassContext) -> Model:
    """``model`` with :mod:`.folding`'s exact rewrites when ``opts.fold_graph``; kept only where its
    outputs equal the model's (to float rounding) on a few calibration samples, as a guard against a
    shape the graph declared wrongly."""
    if not opts.fold_graph or not may_fold(model):
        return model
    folded = model.clone()
    counts = {"layer_norms": fuse_layer_norms(folded), **move_attention_biases(folded)}
    counts["residual"] = move_residual_biases(folded)
    if not any(counts.values()):
        return model
    sample = next(data.take(min(len(data), 8)).batches(8))
    before = run_session(make_session(model, spin=False), sample)
    after = run_session(make_session(folded, spin=False), sample)
    for a, b in zip(before, after, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape or float(np.linalg.norm(a - b)) > 1e-4 * max(
            float(np.linalg.norm(a)), 1e-12
        ):
            ctx.figures["graph_folds"] = "refused: outputs changed beyond float rounding"
            return model
    ctx.figures["graph_folds"] = counts
    return folded


#: the fewest elements of an embedding table int8-static stores as int8 (smaller ones stay float)
_TABLE_MIN_ELEMENTS = 4096


def _tables(model: Model, opts: Int8StaticOptions) -> tuple[Model, TableReport]:
    """Int8 embedding tables (near-lossless; done first so every candidate is judged with them);
    ``model`` itself where it has no table to quantize (not a clone of it)."""
    exclude = set(opts.exclude)
    if not opts.embedding_tables or not embedding_tables(model, _TABLE_MIN_ELEMENTS, exclude):
        return model, TableReport()
    model = model.clone()
    tables = quantize_tables(
        model, bits=8, op_types={"Gather"}, min_elements=_TABLE_MIN_ELEMENTS, exclude=exclude
    )
    return model, tables


_SMOOTH_FIGURES = (
    "smoothquant_alpha",
    "smoothquant_error_ratio",
    "smoothquant_skipped",
    "smoothquant_folded",
)


class _FullInt8:
    """For :mod:`.static_search`: ``(model, opts, data, ctx, calibrators)`` -> each calibrator's fully
    quantized model under ``opts``, SmoothQuant (when ``opts`` has it) and the statistics done once on
    ``data`` for all of them; a candidate the same as an earlier one (equal ranges; or SmoothQuant off
    where it migrated nothing) yields that one's ``(smoothquant, calibrator)`` instead of a model. The
    smoothed model, its GPTQ codes and figures are kept
    (``smoothed``): the pass reuses them when SmoothQuant is chosen, rather than smoothing again."""

    def __init__(self) -> None:
        self.smoothed: tuple[Model, dict[str, np.ndarray], dict] | None = None
        self.unsmoothed = False  # NOTE: whether SmoothQuant left the model as it was

    def __call__(
        self,
        model: Model,
        opts: Int8StaticOptions,
        data: Dataset,
        ctx: PassContext,
        calibrators: list[str],
    ) -> Iterator[tuple[str, Model | tuple[bool, str]]]:
        codes: dict[str, np.ndarray] = {}
        if opts.smoothquant:
            smoothed = _smooth(model, data, opts, ctx, codes)
            figures = {k: ctx.figures[k] for k in _SMOOTH_FIGURES if k in ctx.figures}
            self.smoothed, self.unsmoothed = (smoothed, codes, figures), smoothed is model
            model = smoothed
        elif self.unsmoothed and self.smoothed is not None:
            # NOTE: SmoothQuant migrated nothing (a Conv-only model): without it, the same candidates
            for calibrator in calibrators:
                yield calibrator, (True, calibrator)
            return
        sel = select(model, opts)
        _conv_gptq(model, sel, data, opts, codes)
        grid = QRange(8, opts.activation_type == "int8")
        stats = _stats(model, sel, data, opts, ctx, histogram=calibrators != ["minmax"])
        order = [node.name for node in sel.nodes]
        seen: list[tuple[str, dict]] = []  # type: ignore[type-arg]
        for calibrator in calibrators:
            each = opts.model_copy(update={"calibrator": calibrator})
            planned = _plan(model, sel, _Calibration(stats, data, grid), each, ctx, codes)
            same = next((c for c, act in seen if _same_ranges(act, planned.act)), None)
            seen.append((calibrator, planned.act))
            yield (
                calibrator,
                (opts.smoothquant, same) if same is not None else build(planned, order),
            )


def _same_ranges(a: dict[str, tuple[np.ndarray, np.ndarray]], b: dict) -> bool:
    return a.keys() == b.keys() and all(
        np.array_equal(a[k][0], b[k][0]) and np.array_equal(a[k][1], b[k][1]) for k in a
    )


def _calibrated(
    model: Model, sel: Selection, opts: Int8StaticOptions
) -> tuple[list[str], dict[str, str | None]]:
    """The activations to calibrate, and each selected node's output to quantize (``None``: none,
    or a graph output, which stays float)."""
    all_nodes = sel.nodes
    # NOTE: a MatMul's output is quantized only where a quantized node reads it: rounding it on its way to a float
    # bias Add / LayerNorm only adds error (ORT runs DQ -> MatMul without it as MatMulIntegerToFloat), unless ORT
    # would fuse it with its bias into a float Gemm (static_plan.gemm_fused). Conv and Gemm keep it: ORT's
    # QLinearConv needs the output Q.
    quantized_ids = {id(node) for node in all_nodes}
    out_tensors = {
        node.name: (
            fused_output(node).name
            if opts.quantize_outputs
            and (
                node.op_type != "MatMul"
                or feeds_quantized(fused_output(node), quantized_ids)
                or gemm_fused(node)
            )
            else None
        )
        for node in all_nodes
    }
    names = [
        v.name or ""
        for node in all_nodes
        for v in node.inputs[:2]
        if v is not None and v.const_value is None
    ]
    names += [t for t in out_tensors.values() if t]
    graph_outputs = {v.name for v in model.graph.outputs}
    return names, {k: (v if v not in graph_outputs else None) for k, v in out_tensors.items()}


@dataclass(frozen=True)
class _Calibration:
    """What planning reads: the activations' statistics, the data they came from, the activations' grid."""

    stats: dict[str, TensorStats]
    data: Dataset
    grid: QRange


def _stats(
    model: Model,
    sel: Selection,
    data: Dataset,
    opts: Int8StaticOptions,
    ctx: PassContext,
    *,
    histogram: bool,
) -> dict[str, TensorStats]:
    """Statistics of the activations the selected nodes read and write (one sweep over ``data``)."""
    names, _ = _calibrated(model, sel, opts)
    axes = {
        layer.node.inputs[0].name or "": (1 if layer.op_type == "Conv" else -1)
        for layer in sel.candidates
    }
    return collect_stats(
        model, names, data, ctx, histogram=histogram, channel_axes=axes, batch_size=opts.batch_size
    )


def _plans(
    model: Model,
    sel: Selection,
    data: Dataset,
    grid: QRange,
    opts: Int8StaticOptions,
    ctx: PassContext,
    codes: dict[str, np.ndarray],
) -> Planned:
    """Calibrate (:func:`_stats`) and plan (:func:`_plan`)."""
    stats = _stats(model, sel, data, opts, ctx, histogram=opts.calibrator != "minmax")
    return _plan(model, sel, _Calibration(stats, data, grid), opts, ctx, codes)


def _plan(
    model: Model,
    sel: Selection,
    cal: _Calibration,
    opts: Int8StaticOptions,
    ctx: PassContext,
    codes: dict[str, np.ndarray],
) -> Planned:
    """Plan each selected node from the statistics ``cal`` (its weight codes from ``codes`` where GPTQ made them)."""
    stats, data, grid = cal.stats, cal.data, cal.grid
    _, out_tensors = _calibrated(model, sel, opts)
    base = (
        opts if opts.calibrator != "auto" else opts.model_copy(update={"calibrator": "percentile"})
    )
    act = {name: act_params(s, base, grid) for name, s in stats.items()}
    if opts.calibrator == "auto":
        ranges = Ranges(
            stats, lambda s, c: act_params(s, opts.model_copy(update={"calibrator": c}), grid), grid
        )
        act = choose_calibrators(
            model, sel.candidates, data, act, ranges, ctx, batch_size=opts.batch_size
        )
    reduce, ctx.figures["reduce_range"] = resolve_reduce_range(opts.reduce_range)
    plans = {
        layer.name: weight_plan(
            layer,
            stats,
            act[layer.node.inputs[0].name or ""],
            opts,
            out_tensors[layer.name],
            reduce_range=reduce,
            codes=codes.get(layer.name),
        )
        for layer in sel.candidates
    }
    kept = [p.saturation for p in plans.values() if p.saturation is not None]
    if kept:
        ctx.figures["reduce_range"] += (
            f"; but 8-bit scales for {len(kept)} MatMul/Gemm/Conv weight(s), {sum(k[0] for k in kept)} "
            f"output channel(s) widened and {sum(k[1] for k in kept)} code pair(s) shrunk so that u8 x s8 "
            "int16 sums cannot saturate (on any input for a Conv, on the calibrated ones for a MatMul/Gemm; "
            "a depthwise Conv's products ORT sums in int32: full 8 bits)"
        )
    for node in sel.act_matmuls:
        plans[node.name] = Plan(
            None, [v.name or "" for v in node.inputs if v is not None], out_tensors[node.name]
        )
    for node in sel.elementwise:
        plans[node.name] = constant_plan(node, grid, out_tensors[node.name])
    return Planned(model, plans, act, grid, opts.per_channel)


@dataclass
class _Outcome:
    """What the search decided: the int8, weight-only and fp16-weight nodes, the model and its judgement."""

    sel: Selection
    weight_bytes: dict[str, int]
    chosen: list[str] = field(default_factory=list)
    weight_only: list[str] = field(default_factory=list)
    half: list[str] = field(default_factory=list)
    errors: dict[str, float] = field(default_factory=dict)
    bias_corrected: int = 0
    model: Model | None = None
    judgement: Judgement | None = None


def _decide(
    planned: Planned,
    data: Dataset,
    scorer: Scorer,
    outcome: _Outcome,
    opts: Int8StaticOptions,
    ctx: PassContext,
) -> None:
    """Everything int8 if that meets the criteria; else the sensitivity search's fallbacks (ranked
    on ``data``). Fills ``outcome``: the nodes in each form, the model and its judgement."""
    plans = planned.plans
    order = [node.name for node in outcome.sel.nodes]
    halvable = {
        n for n in outcome.weight_bytes if opts.fallback_fp16 and half_eligible(plans[n].layer)
    }  # type: ignore[arg-type]

    def make(selected: list[str], weight_only: list[str] = ()) -> Model:  # type: ignore[assignment]
        use = dict(plans)
        for (
            name
        ) in weight_only:  # weights int8 behind a DequantizeLinear, activations (and bias) float
            use[name] = replace(plans[name], act_ins=[], act_out=None, bias_q=None, bias_scale=None)
        # NOTE: a node kept off int8 must read its inputs unrounded: their producers then skip output Q/DQ
        # (int8 consumers of the same tensor still get their own input Q/DQ).
        kept = set(selected) | set(weight_only)
        avoid = {t for n in set(order) - set(selected) for t in plans[n].act_ins}
        for name in selected:
            if plans[name].act_out in avoid:
                use[name] = replace(plans[name], act_out=None)
        return build(
            replace(planned, plans=use),
            [n for n in order if n in kept],
            half=[n for n in order if n in halvable and n not in kept],
        )

    outcome.chosen, outcome.model = order, make(order)
    # NOTE: with the search to follow, a sweep may stop once its first samples decide a miss
    outcome.judgement = scorer.score(outcome.model, stop_early=opts.sensitivity)
    if outcome.judgement.met or not opts.sensitivity:
        return
    outcome.errors = local_errors(planned, order, data, ctx, batch_size=scorer.batch_size)
    decision = search(
        Ranking(order, outcome.errors, outcome.weight_bytes),
        make,
        scorer.score,
        ctx,
        max_evaluations=opts.max_evaluations,
        weight_only_first=_weight_only_first(outcome.weight_bytes, opts.fallback),
        finish=scorer.finish,
    )
    if not _better_than_full(decision, outcome, ctx, scorer):
        return
    outcome.chosen, outcome.weight_only, outcome.model, outcome.judgement = (
        decision.int8,
        decision.weight_only,
        decision.model,
        decision.judgement,
    )
    outcome.half = [n for n in decision.float_ if n in halvable]
    for name in (
        decision.float_
    ):  # NOTE: the report groups names by the text before the colon: the form goes there
        form = (
            ("sensitive, fp16 weights", "; float compute")
            if name in outcome.half
            else ("sensitive", "")
        )
        outcome.sel.float_nodes[name] = (
            f"{form[0]}: 1/SQNR {outcome.errors[name]:.2g} alone{form[1]}"
        )


#: ``fallback="auto"``: a node holding at least this share of the weight bytes goes int8 weight-only
#: first (float with fp16 weights takes a byte more per weight than int8: 2.5 % of the fp32 model per
#: tenth held, a tenth of an int8 file); the others go to float first, which ORT runs at fp32's speed
WEIGHT_ONLY_SHARE = 0.1


def _weight_only_first(weight_bytes: dict[str, int], fallback: str) -> set[str]:
    """The weighted nodes the sensitivity search moves to int8 weight-only before float."""
    if fallback == "float":
        return set()
    if fallback == "weight-only":
        return set(weight_bytes)
    total = max(sum(weight_bytes.values()), 1)
    return {n for n, b in weight_bytes.items() if b >= WEIGHT_ONLY_SHARE * total}


def _better_than_full(
    decision: Decision | None, outcome: _Outcome, ctx: PassContext, scorer: Scorer
) -> bool:
    """Whether the search's ``decision`` replaces the fully quantized candidate: one that meets the
    criteria does; when none met, the best candidate judged does if it is closer to the criteria
    (smaller :attr:`Judgement.loss`) than the fully quantized one. Either way, when nothing met,
    the ``sensitivity_result`` figure says which was kept; the result stays flagged
    ``criteria_met: False`` (``PassContext.report_criteria``; the CLI refuses it without ``--accept-loss``)."""
    if decision is not None and decision.met:
        return True
    if isinstance(outcome.judgement, Unfinished):  # NOTE: its sweep stopped early; now it counts
        assert outcome.model is not None
        outcome.judgement = scorer.finish(outcome.model)
    full = outcome.judgement
    assert full is not None
    if decision is None or decision.judgement.loss >= full.loss:
        ctx.figures["sensitivity_result"] = (
            "no fallback met the criteria; the fully quantized candidate was the best judged"
        )
        return False
    moved = len(decision.weight_only) + len(decision.float_)
    ctx.figures["sensitivity_result"] = (
        f"no fallback met the criteria; returned the best candidate judged ({moved} node(s) out of full int8, "
        f"shortfall {decision.judgement.loss:.4g} against {full.loss:.4g} fully quantized)"
    )
    return True


def _figures(
    reference: Model,
    outcome: _Outcome,
    tables: TableReport,
    calibration_samples: int,
    judged: int,
    opts: Int8StaticOptions,
    ctx: PassContext,
) -> None:
    score, errors, weight_bytes = outcome.judgement, outcome.errors, outcome.weight_bytes
    assert score is not None
    total_bytes = sum(
        int(v.const_value.nbytes)
        for v in reference.graph.initializers.values()
        if v.const_value is not None
    )
    low_bit_nodes = set(outcome.chosen + outcome.weight_only)
    # NOTE: a weight shared by several nodes counts once, so the share stays in [0, 1]
    low_bit = sum(
        {
            layer.weight.name: weight_bytes.get(layer.name, 0)
            for layer in outcome.sel.candidates
            if layer.name in low_bit_nodes
        }.values()
    )
    low_bit += tables.bytes_before
    ctx.figures.update(
        {
            "quantized_nodes": len(outcome.chosen),
            "tables_quantized": len(tables.done),
            "weight_only_nodes": {
                n: f"sensitive: 1/SQNR {errors[n]:.2g} alone; int8 weights, float activations"
                for n in outcome.weight_only
            },
            "fp16_weight_nodes": len(outcome.half),
            "float_nodes": outcome.sel.float_nodes,
            "patterns_kept_float": patterns_summary(outcome.sel.patterns, outcome.sel.masks),
            "low_bit_weight_share": round(low_bit / max(total_bytes, 1), 4),
            "calibration_samples": calibration_samples,
            "judged_samples": judged,
            "calibrator": opts.calibrator,
            **({"bias_corrected": outcome.bias_corrected} if opts.bias_correction else {}),
            # NOTE: the local-error ranking (1/SQNR, higher = more sensitive), for tuners that fall back along it
            "sensitivity": {n: round(float(e), 6) for n, e in errors.items()},
        }
    )
    ctx.report_criteria(score.met, score.summary())
    ctx.figures.update({f"calibration_{k}": v for k, v in _per_metric(score).items()})


def _per_metric(judgement: Judgement) -> dict[str, float]:
    """The worst value of each metric over the outputs (``calibration_agreement``, ``calibration_cosine``)."""
    worst: dict[str, float] = {}
    for criterion, value in zip(judgement.criteria, judgement.values, strict=True):
        pick = max if lower_is_better(criterion.metric) else min
        worst[criterion.metric] = round(float(pick(worst.get(criterion.metric, value), value)), 6)
    return worst
