"""What "equal to the float model" means, per output: the one definition shared by the quantizer's
acceptance check and export verification (and the one cosine, agreement and relative error of
modelpress: other modules import them from here).

Each output is first classified (:mod:`modelpress.evaluation.output_kinds`: probabilities, logits,
integer labels, regression, embedding, dense map) from the graph and the reference values; its
kind decides the rule (``docs/verification.md`` has the rules with examples):

============  =========================================================  ===================================
kind          metric                                                     passes when
============  =========================================================  ===================================
classifier    top-1 agreement (probabilities, logits; Sigmoid outputs:    the flips are not more than
              decisions at 0.5; integer labels: exact)                   chance allows at the threshold
                                                                         (one-sided binomial test, 5 %)
              + per-row cosine of the scores (when ``min_cosine``)       >= ``min_cosine``
embedding     mean per-row cosine, and its 5th percentile                >= ``min_cosine``; the 5th
                                                                         percentile >= 1 - 2 (1 - min_cosine)
regression    relative L2 error ``||q - r|| / ||r||``                    <= ``max_relative_error``
dense         RMS error over the reference's scale: its standard          <= ``max_dense_error``, by default
              deviation over the judged batch, at least a tenth of the    sqrt(2 (1 - min_cosine)), the
              range of a bounded output (Sigmoid: [0, 1])                 error such a cosine allows
============  =========================================================  ===================================

Every kind can be overridden per output name (``{"boxes": "regression"}``, ``{"logits":
"agreement>=0.98"}``, ``{"*": "cosine"}``). Non-finite outputs always fail.
"""

from __future__ import annotations

import functools
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

from modelpress.base.errors import OptionsError
from modelpress.evaluation.output_kinds import FORMS, OutputKind, classify

if TYPE_CHECKING:
    from modelpress.ir.model import Model

__all__ = [
    "ALPHA",
    "EVALUATE_METRICS",
    "KIND_METRIC",
    "LOWER_IS_BETTER",
    "METRICS",
    "Bounds",
    "Criterion",
    "Judgement",
    "MissBound",
    "agreement",
    "allowed_flips",
    "cosine",
    "infer_criteria",
    "judge",
    "lower_is_better",
    "measure",
    "relative_error",
    "row_cosines",
    "score",
]

METRICS = ("agreement", "cosine", "cosine_p5", "relative_error", "nrmse")
# NOTE: a recipe's ``evaluate.metric`` (the report's figure of a whole evaluation set): see :func:`score`
EVALUATE_METRICS = ("accuracy", "agreement", "cosine", "mse")
KIND_METRIC = {
    "classifier": "agreement",
    "embedding": "cosine",
    "dense": "nrmse",
    "regression": "relative_error",
}
LOWER_IS_BETTER = frozenset({"relative_error", "nrmse", "mse"})
ALPHA = 0.05  # agreement fails when its flips would be this unlikely at the threshold
_METRIC_FORM = {"cosine": "embedding", "relative_error": "regression", "nrmse": "dense"}
_SPEC = re.compile(
    r"^\s*(agreement|cosine|relative_error|nrmse|classifier|probabilities|logits|labels|embedding|regression|dense)"
    r"\s*(?:(>=|<=)\s*([-+0-9.eE]+))?\s*$"
)


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` (an output metric or an ``evaluate.metric``) is better."""
    return metric in LOWER_IS_BETTER


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two tensors flattened (1.0 when both are zero)."""
    return float(row_cosines(np.asarray(a).reshape(1, -1), np.asarray(b).reshape(1, -1))[0])


def row_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Cosine of each row (the last axis; a 1.0 where both rows are zero, 0.0 where one is)."""
    # NOTE: no copy of what is float64 already (export's comparison hands over float64 outputs)
    r = ref.reshape(-1, ref.shape[-1] if ref.ndim else 1).astype(np.float64, copy=False)
    o = out.reshape(-1, out.shape[-1] if out.ndim else 1).astype(np.float64, copy=False)
    nr, no = np.linalg.norm(r, axis=1), np.linalg.norm(o, axis=1)
    dot = np.einsum("ij,ij->i", r, o)
    both_zero = (nr == 0) & (no == 0)
    return np.where(both_zero, 1.0, dot / np.maximum(nr * no, 1e-300))


def _sample_cosines(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per-row cosines of ``[N, D]``; per sample over everything it holds for rank >= 3; one for rank <= 1."""
    if ref.ndim <= 1:
        return row_cosines(ref.reshape(1, -1), out.reshape(1, -1))
    n = ref.shape[0]
    return row_cosines(ref.reshape(n, -1), out.reshape(n, -1))


def _agrees(ref: np.ndarray, out: np.ndarray, axis: int | None) -> np.ndarray:
    """Each decision's agreement: exact for integers, the arg-max along ``axis``, or (``axis=None``)
    each value's side of 0.5."""
    if not np.issubdtype(ref.dtype, np.floating):
        return ref == out
    if axis is None:
        return (ref > 0.5) == (out > 0.5)
    if ref.ndim < 2:
        return np.round(ref) == np.round(out)
    return np.argmax(ref, axis=axis) == np.argmax(out, axis=axis)


def agreement(ref: np.ndarray, out: np.ndarray, axis: int | None = -1) -> float:
    """Share of decisions that agree: exact for integers, the arg-max along ``axis``, or (``axis=None``)
    each value's side of 0.5."""
    return float(np.mean(_agrees(ref, out, axis)))


def decisions(ref: np.ndarray, axis: int | None = -1) -> int:
    """How many decisions :func:`agreement` counts in ``ref``."""
    if axis is None or ref.ndim < 2 or not np.issubdtype(ref.dtype, np.floating):
        return int(ref.size)
    return int(ref.size // max(ref.shape[axis], 1))


def relative_error(ref: np.ndarray, out: np.ndarray) -> float:
    """``||out - ref|| / ||ref||`` over the whole tensor."""
    r = ref.astype(np.float64)
    return float(np.linalg.norm(out.astype(np.float64) - r) / max(float(np.linalg.norm(r)), 1e-12))


def _dense_scale(r: np.ndarray, value_range: float) -> float:
    """:func:`dense_error`'s divisor: the reference's standard deviation, at least a tenth of ``value_range``."""
    return max(float(r.std()), 0.1 * value_range)


def dense_error(ref: np.ndarray, out: np.ndarray, value_range: float = 0.0) -> float:
    """RMS error over the reference's scale: its standard deviation over everything judged, at
    least a tenth of ``value_range`` (a blank page's near-zero map is judged against [0, 1])."""
    r = ref.astype(np.float64)
    rms = float(np.sqrt(np.mean((out.astype(np.float64) - r) ** 2)))
    scale = _dense_scale(r, value_range)
    if scale == 0:
        return 0.0 if rms == 0 else float("inf")
    return rms / scale


def _standard_error(values: np.ndarray) -> float:
    """The standard error of the mean of ``values`` (0 for fewer than two)."""
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n >= 2 else 0.0


def _worst(metric: str) -> float:
    """The figure of an output that is not finite or not of the reference's shape."""
    return float("inf") if metric in LOWER_IS_BETTER else (0.0 if metric == "agreement" else -1.0)


def measure(
    metric: str,
    ref: np.ndarray,
    out: np.ndarray,
    *,
    axis: int | None = -1,
    value_range: float = 0.0,
    margin: float = 0.0,
) -> float:
    """One figure of ``out`` against ``ref``; the worst possible value if ``out`` is not finite.
    ``margin`` (cosine only): the per-sample mean less that many standard errors of it."""
    if ref.shape != out.shape or (
        np.issubdtype(out.dtype, np.floating) and not np.all(np.isfinite(out))
    ):
        return _worst(metric)
    if ref.size == 0:
        return 0.0 if metric in LOWER_IS_BETTER else 1.0
    if metric == "agreement":
        return agreement(ref, out, axis)
    if metric == "cosine":
        cosines = _sample_cosines(ref, out)
        return float(np.mean(cosines) - margin * _standard_error(cosines))
    if metric == "cosine_p5":
        return float(np.percentile(_sample_cosines(ref, out), 5))
    if metric == "relative_error":
        return relative_error(ref, out)
    if metric == "nrmse":
        return dense_error(ref, out, value_range)
    raise OptionsError(f"unknown output metric {metric!r}: one of {', '.join(METRICS)}")


def score(
    metric: str, reference: np.ndarray, out: np.ndarray, labels: np.ndarray | None = None
) -> float:
    """The figure of one of :data:`EVALUATE_METRICS` for a whole evaluation set: ``accuracy`` is
    the share of rows whose arg-max class is the label, ``agreement`` and ``cosine`` are
    :func:`measure`'s (per-sample cosines averaged, as verification judges), ``mse`` the mean
    squared error against the reference (lower is better)."""
    if metric == "accuracy":
        if labels is None:
            raise OptionsError(
                "metric 'accuracy' needs evaluation data with an array named 'labels'"
            )
        return agreement(np.asarray(labels), np.argmax(out, axis=-1))
    if metric == "mse":
        diff = out.astype(np.float64) - reference.astype(np.float64)
        return float(np.mean(diff**2)) if diff.size else 0.0
    if metric in ("agreement", "cosine"):
        return measure(metric, reference, out)
    raise OptionsError(
        f"unknown evaluation metric {metric!r}: one of {', '.join(EVALUATE_METRICS)} or pkg.module:function"
    )


@functools.lru_cache(maxsize=256)
def allowed_flips(n: int, threshold: float, alpha: float = ALPHA) -> int:
    """The most disagreements among ``n`` decisions that a true agreement of ``threshold`` still
    explains: the largest k with P(X >= k) >= ``alpha`` for X ~ Binomial(n, 1 - threshold).
    (64 rows at 0.99: 2; 1000 rows: 15; any threshold of 1: 0.)"""
    q = 1.0 - threshold
    if n <= 0 or q <= 0:
        return 0
    if q >= 1:
        return n
    if n * q > 1000:  # NOTE: the normal approximation is exact enough here and O(1)
        z = statistics.NormalDist().inv_cdf(1.0 - alpha)  # 1.6449 at 5 %
        return min(n, max(0, int(n * q + z * math.sqrt(n * q * (1 - q)))))
    log_q, log_p, tail, k = math.log(q), math.log1p(-q), 1.0, 0
    while k < n:
        pmf = math.exp(
            math.lgamma(n + 1)
            - math.lgamma(k + 1)
            - math.lgamma(n - k + 1)
            + k * log_q
            + (n - k) * log_p
        )
        if tail - pmf < alpha:  # P(X >= k + 1) would be below alpha
            return k
        tail -= pmf
        k += 1
    return n


@dataclass(frozen=True)
class Criterion:
    """How one output is judged: its kind (the judging family), metric, threshold and why; ``form``
    says what the output is (``probabilities``, ``logits``, ``labels``, ...), ``axis`` the class axis
    (``None``: decisions at 0.5), ``samples`` how many decisions agreement counts (for its binomial
    test), ``value_range`` the known range of a bounded output (for the dense scale), ``alpha`` the
    binomial test's level (:data:`ALPHA`: verification's benefit of the doubt; 0.5: the flips may be no
    more than the median count at the threshold, i.e. the observed agreement itself must meet it),
    ``margin`` how many standard errors of the per-sample mean a cosine is judged below that mean
    (0: the mean itself, as verification judges; a quantizer choosing among candidates asks for a
    margin, so that the one it keeps meets the bound on samples it was not judged on too)."""

    output: str
    kind: str
    metric: str
    threshold: float | None
    reason: str
    axis: int | None = -1
    samples: int = 0
    form: str = ""
    value_range: float = 0.0
    alpha: float = ALPHA
    margin: float = 0.0

    def measure(self, ref: np.ndarray, out: np.ndarray) -> float:
        return measure(
            self.metric,
            ref,
            out,
            axis=self.axis,
            value_range=self.value_range,
            margin=self.margin,
        )

    def allowed(self) -> int | None:
        """Flips the agreement threshold allows among ``samples`` decisions (``None``: not agreement)."""
        if self.metric != "agreement" or self.threshold is None or self.samples <= 0:
            return None
        return allowed_flips(self.samples, float(self.threshold), self.alpha)

    def flips(self, value: float) -> int:
        return round((1.0 - value) * self.samples)

    def passes(self, value: float) -> bool:
        if self.threshold is None:
            return bool(np.isfinite(value))
        allowed = self.allowed()
        if allowed is not None:
            return bool(np.isfinite(value)) and self.flips(value) <= allowed
        return (
            value <= self.threshold if self.metric in LOWER_IS_BETTER else value >= self.threshold
        )

    def shortfall(self, value: float) -> float:
        """How far ``value`` is from perfect (0 = identical), comparable across metrics."""
        if not np.isfinite(value):
            return float("inf")
        if self.metric in LOWER_IS_BETTER:
            return value * value / 2  # ~ 1 - cosine for small errors
        return 1.0 - value

    def _text(self, value: float) -> tuple[str, str]:
        """The figure, and the bound as written after ``>=``/``<=``."""
        bound = self.threshold
        if self.metric == "agreement":
            what = (
                "exact agreement"
                if self.form == "labels"
                else ("decision agreement" if self.axis is None else "top-1 agreement")
            )
            text = f"{self.output} {what} {value:.2%}"
            if self.samples and self.allowed() is None:
                text += f" ({self.flips(value)} of {self.samples} differ)"
            return text, f"{bound:.2%}" if bound is not None else ""
        if self.metric in ("relative_error", "nrmse"):
            what = (
                "relative error" if self.metric == "relative_error" else "RMS error over its scale"
            )
            return f"{self.output} {what} {value:.2%}", f"{bound:.2%}" if bound is not None else ""
        what = "cosine" if self.metric == "cosine" else "5th-percentile cosine"
        if self.metric == "cosine" and self.margin:
            what += f" (mean - {self.margin:g} standard error{'' if self.margin == 1 else 's'})"
        return f"{self.output} {what} {value:.5f}", f"{bound:g}" if bound is not None else ""

    def describe(self, value: float) -> str:
        """One line naming the rule: ``boxes relative error 0.80% <= 10.00% (regression)``."""
        text, bound = self._text(value)
        allowed = self.allowed()
        if allowed is not None:
            # NOTE: the binomial rule, as applied: the count of flips against what a true agreement of the bound explains
            # (a plain "96.88% >= 99.00%" would read false where 2 flips in 64 pass)
            within = "within" if self.passes(value) else "more than"
            return (
                f"{text}: {self.flips(value)} of {self.samples} differ, {within} the {allowed} that {bound} agreement "
                f"allows on {self.samples} rows ({self.form or self.kind})"
            )
        op = "<=" if self.metric in LOWER_IS_BETTER else ">="
        if self.threshold is not None:
            text += f" {op} {bound}" if self.passes(value) else f" (needs {op} {bound})"
        return f"{text} ({self.form or self.kind})"


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
        return {
            f"{c.output} {c.metric}": round(float(v), 6)
            for c, v in zip(self.criteria, self.values, strict=True)
        }

    def summary(self) -> str:
        return "; ".join(c.describe(v) for c, v in zip(self.criteria, self.values, strict=True))


def judge(
    criteria: Sequence[Criterion],
    reference: Sequence[np.ndarray],
    actual: Sequence[np.ndarray],
    names: Sequence[str] | None = None,
) -> Judgement:
    """Measure each criterion; outputs are matched by ``names`` (default: the criteria's outputs in order).
    An agreement criterion counts the decisions of the reference it is given."""
    names = list(names) if names is not None else list(dict.fromkeys(c.output for c in criteria))
    position = {name: i for i, name in enumerate(names)}
    judged, values = [], []
    for c in criteria:
        ref, out = np.asarray(reference[position[c.output]]), np.asarray(actual[position[c.output]])
        if c.metric == "agreement":
            c = replace(c, samples=decisions(ref, c.axis))
        judged.append(c)
        values.append(c.measure(ref, out))
    return Judgement(tuple(judged), tuple(values))


# NOTE: a miss is decided only past this relative margin: the sums here and the figure judge() computes
# add the same terms in another order
_MARGIN = 1e-9


class MissBound:
    """Whether the outputs of the first rows (axis 0) of a judged set already miss ``criterion``,
    whatever the other rows hold: fed batch by batch (:meth:`add`) beside the reference ``ref``
    of every row, :attr:`missed` turns True once :func:`judge` on the whole set must say the
    criterion fails. A quantizer judging candidates can stop a sweep there (the figure itself is
    only known from every row). Agreement counts the flips; a mean cosine assumes the other rows
    perfect; relative and RMS errors add the squared error seen. Other metrics, and outputs whose
    rows do not line up with ``ref``'s, never decide early. Rows may come in any order (``add``'s
    ``start``: where they sit in ``ref``), each once: what decides a miss does not depend on the order."""

    def __init__(self, criterion: Criterion, ref: np.ndarray) -> None:
        if criterion.metric == "agreement":
            criterion = replace(criterion, samples=decisions(ref, criterion.axis))
        self.criterion, self.ref = criterion, ref
        self.threshold = criterion.threshold
        metric = criterion.metric
        r = ref.astype(np.float64) if metric in ("relative_error", "nrmse") and ref.size else None
        # NOTE: the divisor of each metric over the whole set, as measure() computes it
        self.scale = (
            max(float(np.linalg.norm(r)), 1e-12)
            if metric == "relative_error" and r is not None
            else _dense_scale(r, criterion.value_range) * math.sqrt(ref.size)
            if metric == "nrmse" and r is not None
            else float(ref.shape[0])
            if metric == "cosine" and ref.ndim >= 2
            else 0.0
        )
        # NOTE: agreement needs the rows to be decisions (not the class axis); the others a divisor
        lines_up = (
            criterion.axis is None or ref.ndim < 2 or criterion.axis % ref.ndim != 0
            if metric == "agreement"
            else self.scale > 0
        )
        self.bounded = self.threshold is not None and ref.size > 0 and lines_up
        self.reset()

    def reset(self) -> MissBound:
        """Start over (the next set's first rows); returns itself."""
        self.usable, self.rows, self.sum, self.missed = self.bounded, 0, 0.0, False
        return self

    def add(self, out: np.ndarray, start: int | None = None) -> bool:
        """Take the outputs of the next rows (``start``: their first row's index in ``ref``; by
        default the row after those taken so far); returns :attr:`missed`."""
        if not self.usable or self.missed:
            return self.missed
        start = self.rows if start is None else start
        ref = self.ref[start : start + len(out)]
        self.rows += len(out)
        c = self.criterion
        if ref.shape != out.shape or (
            np.issubdtype(out.dtype, np.floating) and not np.all(np.isfinite(out))
        ):
            # NOTE: a non-finite output makes the figure the worst value; a shape apart, no bound
            self.usable = ref.shape == out.shape
            self.missed = self.usable and not c.passes(_worst(c.metric))
            return self.missed
        if c.metric == "agreement":
            self.sum += int(np.count_nonzero(~_agrees(ref, out, c.axis)))
            allowed = c.allowed()
            self.missed = (
                self.sum > allowed
                if allowed is not None
                else 1.0 - self.sum / max(c.samples, 1) < self.threshold - _MARGIN  # type: ignore[operator]
            )
        elif c.metric == "cosine":
            # NOTE: a mean that misses decides a miss under any margin too (that only lowers the figure)
            self.sum += float(np.sum(_sample_cosines(ref, out)))
            best = (self.sum + (self.scale - self.rows)) / self.scale
            self.missed = best < self.threshold - _MARGIN  # type: ignore[operator]
        elif c.metric in ("relative_error", "nrmse"):
            self.sum += float(np.sum((out.astype(np.float64) - ref.astype(np.float64)) ** 2))
            least = math.sqrt(self.sum) / self.scale
            self.missed = least > self.threshold * (1 + _MARGIN) + 1e-15  # type: ignore[operator]
        return self.missed

    @property
    def spent(self) -> float:
        """The share of what the criterion allows over the whole set that the rows taken so far
        have used (1 and over: a miss; 0 where no bound applies): a search ranks rows by it, to
        run the rows likeliest to decide a miss first."""
        if not self.usable or not self.rows:
            return 0.0
        c, threshold = self.criterion, float(self.threshold)  # type: ignore[arg-type]
        if c.metric == "agreement":
            allowed = c.allowed()
            room = allowed + 1 if allowed is not None else max(c.samples, 1) * (1.0 - threshold)
            used = self.sum / max(room, 1e-12)
        elif c.metric == "cosine":
            used = (self.rows - self.sum) / max(self.scale * (1.0 - threshold), 1e-12)
        elif c.metric in ("relative_error", "nrmse"):
            used = self.sum / max((threshold * self.scale) ** 2, 1e-300)
        else:
            used = 0.0
        # NOTE: a non-finite row decides a miss without adding to the sum
        return max(used, 1.0) if self.missed else used


def _parse(spec: str, output: str) -> tuple[str | None, str, float | None]:
    """``(form or None to keep a classifier's own, metric, bound)`` of an override."""
    match = _SPEC.match(spec)
    if not match:
        raise OptionsError(
            f"criteria for output {output!r}: cannot read {spec!r}; write a metric or kind with an optional bound, "
            "e.g. 'agreement>=0.98', 'cosine>=0.995', 'relative_error<=0.05', 'nrmse<=0.1', 'regression', 'embedding'"
        )
    word, _, bound = match.groups()
    value = float(bound) if bound else None
    if word in FORMS:
        return word, KIND_METRIC[FORMS[word]], value
    if word in ("classifier", "agreement"):
        return None, "agreement", value
    return _METRIC_FORM[word], word, value


@dataclass(frozen=True)
class Bounds:
    """The thresholds :func:`infer_criteria` fills in where an output's spec gives none (``None``:
    the figure is reported, not enforced): top-1 agreement, cosine, relative error (regressions) and
    normalised RMS error (dense maps; by default ``sqrt(2 (1 - cosine))``)."""

    agreement: float | None = None
    cosine: float | None = None
    relative_error: float | None = None
    nrmse: float | None = None

    def of(self, metric: str) -> float | None:
        if metric == "cosine_p5":
            return None if self.cosine is None else 1.0 - 2.0 * (1.0 - self.cosine)
        return getattr(self, metric)


def _primary(
    name: str, ref: np.ndarray, found: OutputKind, spec: str | None, bounds: Bounds
) -> Criterion:
    form, axis, reason = found.form, found.axis, found.reason
    metric = KIND_METRIC[found.kind]
    threshold = bounds.of(metric)
    if spec is not None:
        form_o, metric_o, bound = _parse(spec, name)
        if metric_o != metric:
            axis, form = -1, form_o or "logits"
        elif form_o is not None:
            form = form_o
        metric = metric_o
        threshold = bound if bound is not None else bounds.of(metric)
        reason = f"set by option ({spec})"
    elif form == "labels":
        threshold = 1.0  # integer outputs (class ids, counts) must match exactly
    return Criterion(
        name,
        FORMS[form],
        metric,
        threshold,
        reason,
        axis,
        decisions(ref, axis) if metric == "agreement" else 0,
        form,
        found.value_range,
    )


def infer_criteria(
    names: Sequence[str],
    reference: Sequence[np.ndarray],
    *,
    model: Model | None = None,
    overrides: Mapping[str, str] | None = None,
    bounds: Bounds | None = None,
) -> list[Criterion]:
    """The criteria of each output, from the graph of ``model`` (when given) and the reference
    outputs (see the module's table). A classifier's agreement comes with a cosine guard on its
    scores when ``bounds.cosine`` is given; an embedding's mean cosine with its 5th percentile.
    ``overrides`` maps an output name (or ``"*"``) to a kind/metric spec; the thresholds fill in
    bounds the spec does not give (:class:`Bounds`)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(names) - {"*"})
    if unknown:
        raise OptionsError(
            f"criteria name outputs the model does not have: {', '.join(unknown)} (outputs: {', '.join(names)})"
        )
    bounds = bounds or Bounds()
    if bounds.nrmse is None and bounds.cosine is not None:
        bounds = replace(bounds, nrmse=math.sqrt(2.0 * max(1.0 - bounds.cosine, 0.0)))
    min_cosine = bounds.cosine
    result = []
    for name, ref in zip(names, reference, strict=True):
        ref = np.asarray(ref)
        spec = overrides.get(name, overrides.get("*"))
        criterion = _primary(name, ref, classify(name, ref, model), spec, bounds)
        result.append(criterion)
        if criterion.metric == "cosine" and criterion.kind == "embedding":
            p5 = None if criterion.threshold is None else 1.0 - 2.0 * (1.0 - criterion.threshold)
            result.append(
                replace(
                    criterion,
                    metric="cosine_p5",
                    threshold=p5,
                    reason="and its 5th percentile (a few bad rows)",
                )
            )
        elif (
            spec is None
            and criterion.kind == "classifier"
            and criterion.form != "labels"
            and min_cosine is not None
        ):
            # NOTE: agreement on a few hundred samples tolerates flips that the scores' cosine still sees
            result.append(
                replace(
                    criterion,
                    metric="cosine",
                    threshold=min_cosine,
                    reason="classifier scores stay close",
                    axis=-1,
                    samples=0,
                )
            )
    return result
