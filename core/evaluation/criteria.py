"""What "equal to the float model" means, per output: the one definition shared by the quantizer's
acceptance check and export verification.

Each output gets a *kind*, decided from the graph (the op that produces it, its name) and from the
reference data, and the kind decides the metric:

=============  ====================================================  ==========================
kind           looks like                                            metric (higher is better
                                                                     unless noted)
=============  ====================================================  ==========================
classifier     Softmax/LogSoftmax output, or ``[N, C]`` logits whose  top-1 agreement along the
               arg-max varies over the samples                        class axis
embedding      ``[N, D]`` / ``[N, T, D]`` vectors: pooled, normalised  mean per-row cosine
               or named like an embedding, or rows whose arg-max
               never changes (no class structure)
regression     ``[N]`` or ``[N, 1]``                                  relative L2 error (lower)
dense          detection heads, score maps, states (rank >= 3)       mean per-sample cosine
=============  ====================================================  ==========================

Every kind can be overridden per output name (``{"logits": "cosine>=0.995"}``, ``{"*": "agreement"}``).
Non-finite outputs always fail.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from modelpress.base.errors import OptionsError

if TYPE_CHECKING:
    import onnx_ir as ir

    from modelpress.ir.model import Model

__all__ = ["KIND_METRIC", "METRICS", "Criterion", "Judgement", "cosine", "infer_criteria", "judge", "measure"]

METRICS = ("agreement", "cosine", "relative_error")
KIND_METRIC = {"classifier": "agreement", "embedding": "cosine", "dense": "cosine", "regression": "relative_error"}
_LOWER_IS_BETTER = {"relative_error"}
_CLASS_OPS = {"Softmax", "LogSoftmax"}
_POOL_OPS = {"ReduceMean", "ReduceSum", "LpNormalization", "ReduceL2", "GlobalAveragePool"}
_HEAD_OPS = {"MatMul", "Gemm", "Conv"}
_EMBED_NAME = re.compile(r"emb|pool|sentence|feature|hidden|vector|encod", re.I)
_CLASS_NAME = re.compile(r"logit|prob|class|label|pred", re.I)
_SPEC = re.compile(r"^\s*(agreement|cosine|relative_error|classifier|embedding|regression|dense)\s*(?:(>=|<=)\s*([-+0-9.eE]+))?\s*$")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two tensors flattened (1.0 when both are zero)."""
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _row_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    r = ref.reshape(-1, ref.shape[-1]).astype(np.float64)
    o = out.reshape(-1, out.shape[-1]).astype(np.float64)
    nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
    dot = np.einsum("ij,ij->i", r, o)
    both_zero = (nr == 0) & (no == 0)
    return np.where(both_zero, 1.0, dot / np.maximum(nr * no, 1e-300))


def measure(metric: str, ref: np.ndarray, out: np.ndarray, *, axis: int = -1) -> float:
    """One figure of ``out`` against ``ref``; the worst possible value if ``out`` is not finite."""
    if ref.shape != out.shape or (np.issubdtype(out.dtype, np.floating) and not np.all(np.isfinite(out))):
        return float("inf") if metric in _LOWER_IS_BETTER else (0.0 if metric == "agreement" else -1.0)
    if ref.size == 0:
        return 0.0 if metric in _LOWER_IS_BETTER else 1.0
    if metric == "agreement":
        if not np.issubdtype(ref.dtype, np.floating):
            return float(np.mean(ref == out))
        if ref.ndim < 2:
            return float(np.mean(np.round(ref) == np.round(out)))
        return float(np.mean(np.argmax(ref, axis=axis) == np.argmax(out, axis=axis)))
    if metric == "cosine":
        if ref.ndim <= 1:
            return cosine(ref, out)
        if ref.ndim == 2:
            return float(np.mean(_row_cosines(ref, out)))
        # dense maps and sequences: one cosine per sample over everything it holds
        n = ref.shape[0]
        return float(np.mean(_row_cosines(ref.reshape(n, -1), out.reshape(n, -1))))
    if metric == "relative_error":
        r = ref.astype(np.float64)
        return float(np.linalg.norm(out.astype(np.float64) - r) / max(float(np.linalg.norm(r)), 1e-12))
    raise OptionsError(f"unknown output metric {metric!r}: one of {', '.join(METRICS)}")


@dataclass(frozen=True)
class Criterion:
    """How one output is judged: its kind, metric, axis (for agreement), threshold and why."""

    output: str
    kind: str
    metric: str
    threshold: float | None
    reason: str
    axis: int = -1

    def measure(self, ref: np.ndarray, out: np.ndarray) -> float:
        return measure(self.metric, ref, out, axis=self.axis)

    def passes(self, value: float) -> bool:
        if self.threshold is None:
            return bool(np.isfinite(value))
        return value <= self.threshold if self.metric in _LOWER_IS_BETTER else value >= self.threshold

    def shortfall(self, value: float) -> float:
        """How far ``value`` is from perfect (0 = identical), comparable across metrics."""
        if not np.isfinite(value):
            return float("inf")
        if self.metric == "relative_error":
            return value * value / 2  # ~ 1 - cosine for small errors
        return 1.0 - value

    def describe(self, value: float) -> str:
        if self.metric == "agreement":
            text = f"{self.output} top-1 agreement {value:.2%}"
            bound = f"{self.threshold:.2%}" if self.threshold is not None else ""
        else:
            text = f"{self.output} {self.metric.replace('_', ' ')} {value:.5f}"
            bound = f"{self.threshold:g}" if self.threshold is not None else ""
        if self.threshold is not None and not self.passes(value):
            text += f" (needs {'<=' if self.metric in _LOWER_IS_BETTER else '>='} {bound})"
        return text


@dataclass(frozen=True)
class Judgement:
    """The figures of one model's outputs against the reference, under ``criteria``."""

    criteria: tuple[Criterion, ...]
    values: tuple[float, ...]

    @property
    def met(self) -> bool:
        return all(c.passes(v) for c, v in zip(self.criteria, self.values, strict=True))

    @property
    def loss(self) -> float:
        """Sum of shortfalls from perfect (for ranking candidates; 0 = identical)."""
        return float(sum(c.shortfall(v) for c, v in zip(self.criteria, self.values, strict=True)))

    def figures(self) -> dict[str, float]:
        return {f"{c.output} {c.metric}": round(float(v), 6) for c, v in zip(self.criteria, self.values, strict=True)}

    def summary(self) -> str:
        return "; ".join(c.describe(v) for c, v in zip(self.criteria, self.values, strict=True))


def judge(criteria: Sequence[Criterion], reference: Sequence[np.ndarray], actual: Sequence[np.ndarray], names: Sequence[str] | None = None) -> Judgement:
    """Measure each criterion; outputs are matched by ``names`` (default: the criteria's outputs in order)."""
    names = list(names) if names is not None else list(dict.fromkeys(c.output for c in criteria))
    position = {name: i for i, name in enumerate(names)}
    values = tuple(c.measure(np.asarray(reference[position[c.output]]), np.asarray(actual[position[c.output]])) for c in criteria)
    return Judgement(tuple(criteria), values)


def _producers(model: Model | None, name: str, depth: int = 4) -> list[ir.Node]:
    """The nodes producing output ``name``, following single-input pass-through ops back a few steps."""
    if model is None:
        return []
    value = next((v for v in model.graph.outputs if v.name == name), None)
    chain: list[ir.Node] = []
    while value is not None and len(chain) < depth:
        node = value.producer()
        if node is None:
            break
        chain.append(node)
        value = node.inputs[0] if node.inputs else None
    return chain


def _infer_kind(name: str, ref: np.ndarray, producers: list[ir.Node]) -> tuple[str, str, int]:
    ops = [n.op_type for n in producers]
    if not np.issubdtype(ref.dtype, np.floating):
        return "classifier", "integer output: compared exactly", -1
    if ref.ndim <= 1 or (ref.shape[-1] == 1 and ref.ndim <= 2):
        return "regression", f"shape {list(ref.shape)}: one value per sample", -1
    if ops and ops[0] in _CLASS_OPS:
        attr = producers[0].attributes.get("axis")
        axis = int(attr.as_int()) if attr is not None else -1
        return "classifier", f"produced by {ops[0]}", axis
    # pooling/normalisation at the end (not behind a dense head, which makes scores out of pooled features)
    head = next((i for i, op in enumerate(ops) if op in _HEAD_OPS), len(ops))
    pooled = next((op for op in ops[:head] if op in _POOL_OPS), None)
    if ref.ndim == 2:
        if pooled or _EMBED_NAME.search(name):
            return "embedding", f"pooled/normalised vector ({pooled or 'name ' + repr(name)})", -1
        winners = np.unique(np.argmax(ref, axis=1))
        if ref.shape[0] >= 16 and len(winners) == 1 and not _CLASS_NAME.search(name):
            return "embedding", f"rows of {ref.shape[1]} values whose arg-max never changes (no class structure)", -1
        return "classifier", f"[N, {ref.shape[1]}] scores", 1
    if ref.ndim == 3 and (pooled or _EMBED_NAME.search(name)):
        return "embedding", "token vectors", -1
    return "dense", f"rank-{ref.ndim} map", -1


def _parse(spec: str, output: str) -> tuple[str | None, str | None, float | None]:
    match = _SPEC.match(spec)
    if not match:
        raise OptionsError(
            f"criteria for output {output!r}: cannot read {spec!r}; write a metric or kind with an optional bound, "
            "e.g. 'agreement>=0.98', 'cosine>=0.995', 'relative_error<=0.05', 'embedding'"
        )
    word, _, bound = match.groups()
    if word in KIND_METRIC:
        return word, KIND_METRIC[word], float(bound) if bound else None
    kind = {"agreement": "classifier", "cosine": "embedding", "relative_error": "regression"}[word]
    return kind, word, float(bound) if bound else None


def infer_criteria(
    names: Sequence[str],
    reference: Sequence[np.ndarray],
    *,
    model: Model | None = None,
    overrides: Mapping[str, str] | None = None,
    min_agreement: float | None = None,
    min_cosine: float | None = None,
    max_relative_error: float | None = None,
) -> list[Criterion]:
    """The criteria of each output (a classifier's agreement comes with a cosine guard on its scores
    when ``min_cosine`` is given), from the graph of ``model`` (when given) and the reference
    outputs. ``overrides`` maps an output name (or ``"*"``) to a metric/kind spec; the thresholds
    fill in bounds the spec does not give (``None``: the figure is reported, not enforced)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(names) - {"*"})
    if unknown:
        raise OptionsError(f"criteria name outputs the model does not have: {', '.join(unknown)} (outputs: {', '.join(names)})")
    bounds = {"agreement": min_agreement, "cosine": min_cosine, "relative_error": max_relative_error}
    result = []
    for name, ref in zip(names, reference, strict=True):
        ref = np.asarray(ref)
        kind, reason, axis = _infer_kind(name, ref, _producers(model, name))
        metric = KIND_METRIC[kind]
        threshold = bounds[metric]
        spec = overrides.get(name, overrides.get("*"))
        if spec is not None:
            kind_o, metric_o, bound = _parse(spec, name)
            if metric_o != metric:
                axis = -1
            kind, metric = kind_o or kind, metric_o or metric
            threshold = bound if bound is not None else bounds[metric]
            reason = f"set by option ({spec})"
        if not np.issubdtype(ref.dtype, np.floating) and spec is None:
            threshold = 1.0  # integer outputs (class ids, counts) must match exactly
        result.append(Criterion(name, kind, metric, threshold, reason, axis))
        if spec is None and kind == "classifier" and np.issubdtype(ref.dtype, np.floating) and min_cosine is not None:
            # NOTE: agreement on a few hundred samples tolerates flips that the logits' cosine still sees
            result.append(Criterion(name, kind, "cosine", min_cosine, "classifier scores stay close", -1))
    return result
