"""modelpress-lowrank: a method of a new kind, ``factorize``: one MatMul/Gemm into two low-rank ones.

Each 2-D weight ``W [in, out]`` is replaced by ``U [in, k] @ V [k, out]`` (truncated SVD), so the
layer becomes ``(x @ U) @ V + bias``. ``rank`` fixes ``k``; otherwise ``energy`` picks the smallest
``k`` that keeps that fraction of the squared singular values. Layers where two factors would not
be smaller are left alone, with the reason in the figures.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from modelpress.plugin_api import (
    Kind,
    Method,
    Model,
    Options,
    OptionsError,
    PassContext,
    WeightedLayer,
    hookimpl,
)

__all__ = ["LowRankOptions", "factorize"]


class LowRankOptions(Options):
    rank: int | None = Field(
        None, ge=1, description="rank k kept in every layer (default: chosen by energy)"
    )
    energy: float = Field(
        0.95,
        gt=0,
        le=1,
        description="without rank: keep this fraction of each weight's squared singular values",
    )
    min_elements: int = Field(256, ge=1, description="leave weights smaller than this alone")
    exclude: list[str] = Field(
        default_factory=list, description="layers (node names) to leave alone"
    )


def _rank(s: np.ndarray, opts: LowRankOptions) -> int:
    if opts.rank is not None:
        return min(opts.rank, len(s))
    kept = np.cumsum(s.astype(np.float64) ** 2) / max(
        float(np.sum(s.astype(np.float64) ** 2)), 1e-30
    )
    return int(np.searchsorted(kept, opts.energy - 1e-12) + 1)


def _refusal(layer: WeightedLayer, opts: LowRankOptions) -> str | None:
    if layer.name in opts.exclude:
        return "excluded"
    if layer.weight.shape is None or len(layer.weight.shape) != 2:
        return "weight is not a matrix"
    if layer.op_type == "Gemm" and layer.trans_a:
        return "Gemm with transA=1 is not supported"
    if layer.weight.const_value is not None and layer.weight.const_value.size < opts.min_elements:
        return f"fewer than {opts.min_elements} elements"
    return None


def _factorize(model: Model, layer: WeightedLayer, opts: LowRankOptions) -> tuple[int, float] | str:
    """Replace one layer by two MatMuls (and the bias Add); returns (rank, relative error) or why not."""
    w = layer.weight_array().astype(np.float64)
    if layer.op_type == "Gemm" and layer.trans_b:
        w = w.T  # NOTE: the accessors say how Gemm stores its weight; make it [in, out]
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    k = _rank(s, opts)
    n_in, n_out = w.shape
    if k * (n_in + n_out) >= n_in * n_out:
        return f"rank {k} would not be smaller than {n_in}x{n_out}"
    scale = layer.alpha if layer.op_type == "Gemm" else 1.0
    b = model.builder(layer.name)
    u_v = b.initializer((u[:, :k] * s[:k] * scale).astype(np.float32), f"{layer.name}.lowrank_u")
    v_v = b.initializer(vt[:k].astype(np.float32), f"{layer.name}.lowrank_v")
    y = b.op("MatMul", [b.op("MatMul", [layer.node.inputs[0], u_v]), v_v])
    if layer.op_type == "Gemm" and len(layer.node.inputs) > 2 and layer.node.inputs[2] is not None:
        bias = layer.node.inputs[2]
        if layer.beta != 1.0:
            bias = b.op(
                "Mul", [bias, b.initializer(np.array(layer.beta, np.float32), f"{layer.name}.beta")]
            )
        y = b.op("Add", [y, bias])
    model.replace_node(layer.node, list(b.nodes), y)
    approx = (u[:, :k] * s[:k]) @ vt[:k]
    return k, float(np.linalg.norm(w - approx) / max(float(np.linalg.norm(w)), 1e-30))


def factorize(model: Model, opts: LowRankOptions, ctx: PassContext) -> Model:
    done: dict[str, int] = {}
    skipped: dict[str, str] = {}
    errors: list[float] = []
    before = model.parameter_count()
    for layer in model.weighted_layers(frozenset({"MatMul", "Gemm"})):
        outcome = _refusal(layer, opts) or _factorize(model, layer, opts)
        if isinstance(outcome, str):
            skipped[layer.name] = outcome
        else:
            done[layer.name], error = outcome
            errors.append(error)
    if not done:
        raise OptionsError(
            f"lowrank: no layer of {model.name!r} can be factorized: {skipped or 'it has no MatMul/Gemm with a constant weight'}"
        )
    model.cleanup()
    ctx.figures.update(
        {
            "rank": max(done.values()),
            "layers": done,
            "skipped": skipped,
            "relative_error": round(max(errors), 6),
            "parameters_before": before,
            "parameters_after": model.parameter_count(),
        }
    )
    return model


FACTORIZE = Kind(
    "factorize",
    "replace weight matrices by products of low-rank factors (fewer parameters, fewer FLOPs)",
    columns=("rank", "relative_error", "parameters_after"),
    smaller=True,
)


@hookimpl
def modelpress_register_kinds(register):  # type: ignore[no-untyped-def]
    register(FACTORIZE)


@hookimpl
def modelpress_register_methods(register):  # type: ignore[no-untyped-def]
    register(
        Method(
            name="lowrank",
            kind="factorize",
            apply=factorize,
            options=LowRankOptions,
            mutates=True,
            summary="truncated SVD: each MatMul/Gemm into two smaller MatMuls",
        )
    )
