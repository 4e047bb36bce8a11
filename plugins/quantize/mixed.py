"""``mixed-precision``: per-layer int4 / int8 / float weights under a size budget or an accuracy drop.

Every weight the weight-only methods cover (MatMul/Gemm matrices, Gather embedding tables, Conv
kernels) is a candidate. Each is scored once, locally: the relative output error its int4 and its
int8 form would cause (``tr(dW^T H dW) / tr(W^T H W)`` with ``H = X^T X`` of its calibration inputs for
MatMul/Gemm; the relative weight error for tables and kernels, whose inputs are indices or images).
Starting from everything in int4 (the smallest file), the upgrades ``int4 -> int8`` and
``int8 -> float`` of all layers are ranked by error removed per byte added, and the result is the
shortest prefix of that ranking that

* ``target_size``: fits the budget (bytes, or a ratio of the model's weight bytes when <= 1): the
  longest prefix that fits, chosen from byte counts alone (no evaluation);
* ``max_drop``: keeps every output within the drop of the float model on the calibration data
  (cosine / agreement >= 1 - max_drop, relative error <= max_drop, by the outputs' kinds as
  :mod:`modelpress.evaluation.criteria` infers them), found by bisection over the prefix length with at most
  ``max_evaluations`` whole-model runs.

With both, the smallest prefix meeting ``max_drop`` is taken if it fits ``target_size``; otherwise the
largest prefix that fits is returned with ``criteria_met: False`` (the CLI refuses it without
``--accept-loss``). The layers are then emitted by ``int4-weight-only`` and ``int8-weight-only``
(blocked ``DequantizeLinear``, opset 21). Figures: ``bits_per_layer``, ``layers_by_bits``,
``weight_bytes_after``, ``size_ratio_estimate``, ``criteria``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from modelpress.plugin_api import Bounds, Model, Options, OptionsError, PassContext, load_dataset
from modelpress.plugins.quantize.embeddings import (
    TableReport,
    _reader,
    _tables,
    quantize_table,
)
from modelpress.plugins.quantize.evaluate import Scorer
from modelpress.plugins.quantize.weight_only import (
    WeightOnlyOptions,
    _fake_quantize,
    _hessians,
    _select,
    weight_only,
)

__all__ = ["MixedPrecisionOptions", "mixed_precision"]

FLOAT = 32


class MixedPrecisionOptions(Options):
    target_size: float | None = Field(
        None,
        gt=0,
        description="size budget for the weights: bytes (> 1) or a ratio of the model's weight bytes (<= 1)",
    )
    max_drop: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="largest accepted drop on the calibration data: cosine/agreement >= 1 - max_drop, relative error <= max_drop",
    )
    block_size: Literal[16, 32, 64, 128, 256] = Field(
        32, description="rows of K sharing one scale in the int4 and int8 blocks"
    )
    algorithm: Literal["rtn", "gptq", "awq", "awq-gptq"] = Field(
        "rtn", description="how the int4 layers are quantized (see int4-weight-only)"
    )
    op_types: list[str] = Field(
        default_factory=lambda: ["MatMul", "Gemm", "Gather", "Conv"],
        description="op types whose weights are candidates",
    )
    exclude: list[str] = Field(default_factory=list, description="node names kept in float")
    min_elements: int = Field(1024, ge=1, description="weights smaller than this stay float")
    max_evaluations: int = Field(
        10, ge=1, description="whole-model evaluations the max_drop search may use"
    )
    max_samples: int = Field(128, ge=1, description="calibration samples used")

    @model_validator(mode="after")
    def _one_goal(self) -> MixedPrecisionOptions:
        if self.target_size is None and self.max_drop is None:
            raise ValueError(
                "give target_size (bytes, or a ratio <= 1 of the weight bytes) and/or max_drop (e.g. 0.005)"
            )
        return self


@dataclass
class _Candidate:
    name: str  # the node name (tables: every node reading it, for exclusion)
    nodes: list[str]
    shape: tuple[int, ...]
    kind: str  # "matmul" | "embedding" | "conv"
    error: dict[int, float]  # bits -> relative error

    def bytes(self, bits: int, block: int) -> int:
        size = int(np.prod(self.shape))
        if bits == FLOAT:
            return size * 4
        if self.kind == "matmul":
            k, n = self.shape
            groups = -(-k // block) * n
        elif self.kind == "embedding":
            groups = self.shape[0] * (-(-self.shape[1] // min(block, 32)) if bits == 4 else 1)
        else:
            groups = self.shape[0]
        return size * bits // 8 + groups * 4 + groups * bits // 8


def _candidates(
    model: Model, opts: MixedPrecisionOptions, ctx: PassContext
) -> tuple[list[_Candidate], dict[str, str], dict[str, np.ndarray]]:
    """Every candidate weight with its int4/int8 errors, the layers left out (with reasons), and the
    GPTQ statistics of the layer inputs (kept: every candidate model the search builds reuses them)."""
    wo = WeightOnlyOptions(
        bits=4,
        block_size=opts.block_size,
        op_types=opts.op_types,
        exclude=opts.exclude,
        min_elements=opts.min_elements,
        max_samples=opts.max_samples,
    )
    layers, skipped = _select(model, wo)
    skipped.update(
        {
            layer.name: "inside control flow: not scored, kept in float"
            for layer in layers
            if layer.scope
        }
    )
    layers = [layer for layer in layers if not layer.scope]
    out: list[_Candidate] = []
    hessians: dict[str, np.ndarray] = {}
    if layers:
        hessians = _hessians(model, layers, ctx, wo)
        with ctx.progress("mixed precision: layer errors", total=len(layers)) as advance:
            for layer in layers:
                w = layer.weight_array().astype(np.float32)
                w = w.T if layer.out_axis == 0 else w
                h = hessians[layer.node.inputs[0].name or ""]
                norm = float(np.einsum("kn,kn->", w, h @ w)) or 1e-30
                errors = {}
                for bits in (4, 8):
                    d = (_fake_quantize(w, wo.model_copy(update={"bits": bits})) - w).astype(
                        np.float64
                    )
                    errors[bits] = float(np.einsum("kn,kn->", d, h @ d)) / norm
                out.append(_Candidate(layer.name, [layer.name], tuple(w.shape), "matmul", errors))
                advance(1)
    report = TableReport()
    for value, kind in _tables(
        model, set(opts.op_types) & {"Gather", "Conv"}, opts.min_elements, set(opts.exclude), report
    ):
        assert value.const_value is not None
        shape = tuple(int(d) for d in value.const_value.shape)
        errors = {}
        for bits in (
            4,
            8,
        ):  # NOTE: in chunks of rows, as the table is quantized (a vocabulary table is never copied whole)
            table = quantize_table(
                _reader(value.const_value),
                shape,
                bits=bits,
                kind=kind,
                block=min(opts.block_size, 32),
            )
            errors[bits] = table.squared_error / max(table.squared_norm, 1e-30)
        users = sorted({u.name or "" for u, _ in value.uses()})
        out.append(_Candidate(users[0], users, shape, kind, errors))
    return out, {**skipped, **report.skipped}, hessians


def _ranking(cands: list[_Candidate], block: int) -> list[tuple[int, int]]:
    """Upgrades ``(candidate index, new bits)`` by error removed per byte added, best first; an
    ``int8 -> float`` step ranked before its ``int4 -> int8`` takes the layer straight to float."""
    steps: list[tuple[float, int, int]] = []
    for i, c in enumerate(cands):
        gain8 = (c.error[4] - c.error[8]) / max(c.bytes(8, block) - c.bytes(4, block), 1)
        gain32 = c.error[8] / max(c.bytes(FLOAT, block) - c.bytes(8, block), 1)
        steps += [(gain8, i, 8), (gain32, i, FLOAT)]
    steps.sort(key=lambda s: -s[0])
    return [(i, bits) for _, i, bits in steps]


def _assignment(cands: list[_Candidate], ranking: list[tuple[int, int]], prefix: int) -> list[int]:
    bits = [4] * len(cands)
    for i, b in ranking[:prefix]:
        bits[i] = max(bits[i], b)
    return bits


def _build(
    model: Model,
    cands: list[_Candidate],
    bits: list[int],
    opts: MixedPrecisionOptions,
    ctx: PassContext,
    hessians: dict[str, np.ndarray],
) -> Model:
    result = model
    for width in (4, 8):
        chosen = {n for c, b in zip(cands, bits, strict=True) if b == width for n in c.nodes}
        if not chosen:
            continue
        others = [n.name for n in result.nodes() if n.name and n.name not in chosen]
        wo = WeightOnlyOptions(
            bits=width,
            block_size=opts.block_size,
            algorithm=opts.algorithm if width == 4 else "rtn",
            op_types=opts.op_types,
            exclude=others,
            min_elements=opts.min_elements,
            max_samples=opts.max_samples,
        )
        # NOTE: the int4 pass runs first, on the float model: the statistics of its inputs are the cached ones
        result = weight_only(
            result, wo, replace(ctx, figures={}), hessians=hessians if result is model else None
        )
    return result if result is not model else model.clone()


def mixed_precision(model: Model, opts: MixedPrecisionOptions, ctx: PassContext) -> Model:
    cands, skipped, hessians = _candidates(model, opts, ctx)
    if not cands:
        raise OptionsError(
            f"mixed-precision: no weight to quantize in {model.name!r} ({skipped or 'no MatMul/Gemm/Gather/Conv with a constant weight'})"
        )
    block = opts.block_size
    ranking = _ranking(cands, block)
    other = sum(
        int(v.const_value.nbytes)
        for v in model.graph.initializers.values()
        if v.const_value is not None
    ) - sum(c.bytes(FLOAT, block) for c in cands)
    total = other + sum(c.bytes(FLOAT, block) for c in cands)

    def size(prefix: int) -> int:
        return other + sum(
            c.bytes(b, block)
            for c, b in zip(cands, _assignment(cands, ranking, prefix), strict=True)
        )

    limit = len(ranking)
    if opts.target_size is not None:
        budget = opts.target_size * total if opts.target_size <= 1 else opts.target_size
        if size(0) > budget:
            raise OptionsError(
                f"mixed-precision: target_size {opts.target_size:g} ({int(budget):,} bytes) is below the smallest "
                f"this model reaches with int4 everywhere: {size(0):,} bytes ({size(0) / total:.3f}x); raise it"
            )
        limit = max(p for p in range(len(ranking) + 1) if size(p) <= budget)
    prefix, met, summary = limit, None, ""
    if opts.max_drop is not None:
        prefix, met, summary = _drop_search(model, cands, ranking, limit, opts, ctx, hessians)
    bits = _assignment(cands, ranking, prefix)
    result = _build(model, cands, bits, opts, ctx, hessians)
    counts = {
        f"int{b}" if b != FLOAT else "float": sum(1 for x in bits if x == b) for b in (4, 8, FLOAT)
    }
    ctx.figures.update(
        {
            "layers_by_bits": counts,
            "bits_per_layer": {
                c.name: ("float" if b == FLOAT else f"int{b}")
                for c, b in zip(cands, bits, strict=True)
            },
            "float_nodes": {
                **skipped,
                **{
                    c.name: "sensitive per byte: kept in float by the size/drop search"
                    for c, b in zip(cands, bits, strict=True)
                    if b == FLOAT
                },
            },
            "weight_bytes_after": size(prefix),
            "size_ratio_estimate": round(size(prefix) / max(total, 1), 4),
        }
    )
    if met is not None:
        ctx.report_criteria(met, summary)
    return result


def _drop_search(
    model: Model,
    cands: list[_Candidate],
    ranking: list[tuple[int, int]],
    limit: int,
    opts: MixedPrecisionOptions,
    ctx: PassContext,
    hessians: dict[str, np.ndarray],
) -> tuple[int, bool, str]:
    """The shortest prefix (<= ``limit``) of the upgrade ranking that keeps every output within ``max_drop``
    (bisection, at most ``max_evaluations`` whole-model runs); ``(limit, False, ...)`` if even that misses."""
    assert opts.max_drop is not None
    data = load_dataset(ctx.calibration, model.signature, what="calibration").take(opts.max_samples)
    scorer = Scorer(
        model,
        data,
        Bounds(agreement=1 - opts.max_drop, cosine=1 - opts.max_drop, relative_error=opts.max_drop),
    )
    cache: dict[int, bool] = {}
    judged: dict[int, str] = {}

    def meets(p: int) -> bool:
        if p not in cache:
            judgement = scorer.score(
                _build(model, cands, _assignment(cands, ranking, p), opts, ctx, hessians)
            )
            cache[p], judged[p] = judgement.met, judgement.summary()
        return cache[p]

    lo, hi = 0, limit
    with ctx.progress("mixed precision: max_drop search", total=opts.max_evaluations) as advance:
        if not meets(hi):
            return limit, False, judged[limit]
        advance(1)
        while lo < hi and scorer.evaluations < opts.max_evaluations:
            mid = (lo + hi) // 2
            if meets(mid):
                hi = mid
            else:
                lo = mid + 1
            advance(1)
    return hi, True, judged[hi]
