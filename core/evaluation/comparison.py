"""Numerical comparison of a model's outputs with a reference's."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from modelpress.base.errors import VerificationError
from modelpress.evaluation.criteria import Criterion, cosine, infer_criteria

if TYPE_CHECKING:
    from modelpress.ir.model import Model
    from modelpress.ir.provenance import PassRecord, Provenance
    from modelpress.plugin.registry import Registry

__all__ = [
    "Comparison",
    "OutputComparison",
    "check_import",
    "compare_outputs",
    "default_min_cosine",
    "method_floor",
]


@dataclass(frozen=True)
class OutputComparison:
    name: str
    max_abs_diff: float
    mean_abs_diff: float
    max_rel_diff: float
    cosine: float
    top1_agreement: float | None
    finite: bool
    criterion: str | None = None  # "kind: metric" from modelpress.evaluation.criteria
    value: float | None = None  # the criterion's figure
    passed: bool | None = None  # None: no threshold applied


@dataclass(frozen=True)
class Comparison:
    """Figures of one model against a reference on the same inputs.

    ``top1_agreement`` is the share of samples whose arg-max class matches (for rank-2 outputs
    judged as classifiers by :mod:`modelpress.evaluation.criteria`), else ``None``.
    """

    samples: int
    outputs: tuple[OutputComparison, ...] = field(default_factory=tuple)
    # NOTE: what the result missed when it was kept anyway (export's accept_loss=True); None: nothing missed
    loss_accepted: str | None = None
    # NOTE: the inputs were generated from the signature (no sample given), not real data
    random_inputs: bool = False

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((o.max_rel_diff for o in self.outputs), default=0.0)

    @property
    def cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def top1_agreement(self) -> float | None:
        values = [o.top1_agreement for o in self.outputs if o.top1_agreement is not None]
        return min(values) if values else None

    @property
    def finite(self) -> bool:
        return all(o.finite for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "cosine": self.cosine,
            "top1_agreement": self.top1_agreement,
            "outputs": [asdict(o) for o in self.outputs],
            "loss_accepted": self.loss_accepted,
            "random_inputs": self.random_inputs,
        }

    def summary(self) -> str:
        text = f"max |diff| {self.max_abs_diff:.3g}, cosine {self.cosine:.6f}"
        if self.top1_agreement is not None:
            text += f", top-1 agreement {self.top1_agreement:.2%}"
        judged = [o for o in self.outputs if o.criterion and o.value is not None]
        if judged:
            text += "; " + ", ".join(f"{o.name} ({o.criterion}) {o.value:.5g}" for o in judged)
        if self.random_inputs:
            text += f" on {self.samples} random input{'s' if self.samples != 1 else ''} — pass --sample (sample=) for real data"
        else:
            text += f" on {self.samples} sample{'s' if self.samples != 1 else ''}"
        return text + (f"; LOSS ACCEPTED: {self.loss_accepted}" if self.loss_accepted else "")

    @property
    def criteria_met(self) -> bool:
        """Every output meets its criterion's threshold (outputs without one count as met if finite)."""
        return self.finite and all(o.passed is not False for o in self.outputs)


def method_floor(record: PassRecord, registry: Registry) -> float | None:
    """The verification floor one pass declared (see :attr:`modelpress.Method.min_cosine`): the
    method's own, else its kind's; a method no longer installed gets its kind's, and an unknown
    kind :data:`modelpress.plugin.methods.DEFAULT_FLOOR`."""
    from modelpress.base.errors import ModelpressError
    from modelpress.plugin.methods import DEFAULT_FLOOR, KIND_FLOOR

    try:
        declared = registry.method(record.method, record.kind).min_cosine
    except ModelpressError:
        declared = KIND_FLOOR
    if declared != KIND_FLOOR:
        return None if declared is None else float(declared)
    try:
        return registry.kind(record.kind).min_cosine
    except ModelpressError:
        return DEFAULT_FLOOR


def default_min_cosine(provenance: Provenance, registry: Registry | None = None) -> float | None:
    """The default verification threshold for a model with this history: the loosest floor its
    passes declared; ``None`` when there were no passes, or one declared that it changes outputs
    by design (``min_cosine=None``: distillation, structural pruning), so thresholds must be given."""
    from modelpress.plugin.registry import get_registry

    floors = [method_floor(p, registry or get_registry()) for p in provenance.passes]
    return (
        None
        if not floors or any(f is None for f in floors)
        else min(f for f in floors if f is not None)
    )


def compare_outputs(
    names: list[str],
    reference: list[np.ndarray],
    actual: list[np.ndarray],
    criteria: list[Criterion] | None = None,
) -> Comparison:
    """Raw figures per output, plus each output's criterion (inferred from the data when not given)."""
    results = []
    samples = 0
    criteria = criteria if criteria is not None else infer_criteria(names, reference)
    primary: dict[str, Criterion] = {}
    for c in criteria:
        primary.setdefault(c.output, c)
    for name, ref, out in zip(names, reference, actual, strict=True):
        criterion = primary[name]
        value = criterion.measure(ref, out)
        judged = {
            "criterion": f"{criterion.kind}: {criterion.metric}",
            "value": value,
            "passed": None if criterion.threshold is None else criterion.passes(value),
        }
        samples = max(samples, int(ref.shape[0]) if ref.ndim else 1)
        finite = bool(np.all(np.isfinite(out))) if np.issubdtype(out.dtype, np.floating) else True
        if ref.shape != out.shape:
            results.append(
                OutputComparison(
                    name, float("inf"), float("inf"), float("inf"), 0.0, None, finite, **judged
                )
            )
            continue
        r = ref.astype(np.float64)
        o = out.astype(np.float64)
        diff = np.abs(r - o)
        scale = max(float(np.max(np.abs(r))) if r.size else 0.0, 1e-12)
        top1 = None
        if (
            criterion.kind == "classifier"
            and np.issubdtype(ref.dtype, np.floating)
            and ref.ndim == 2
            and ref.shape[1] > 1
        ):
            top1 = float(np.mean(np.argmax(r, axis=1) == np.argmax(o, axis=1)))
        results.append(
            OutputComparison(
                name=name,
                max_abs_diff=float(diff.max()) if diff.size else 0.0,
                mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
                max_rel_diff=float(diff.max() / scale) if diff.size else 0.0,
                cosine=cosine(r, o),
                top1_agreement=top1,
                finite=finite,
                **judged,
            )
        )
    return Comparison(samples=samples, outputs=tuple(results))


def check_import(
    reference_outputs: list[np.ndarray],
    model: Model,
    feeds: dict[str, np.ndarray],
    rtol: float,
    what: str,
) -> dict[str, float]:
    """Run the imported model in ORT and compare with the source framework's outputs."""
    from modelpress.runtime.session import make_session, run

    outputs = run(make_session(model), feeds)
    if len(outputs) != len(reference_outputs):
        raise VerificationError(
            f"{what}: the import has {len(outputs)} outputs, the source {len(reference_outputs)}"
        )
    worst_abs, worst_rel = 0.0, 0.0
    for ref, out in zip(reference_outputs, outputs, strict=True):
        if ref.shape != out.shape:
            raise VerificationError(
                f"{what}: output shape {out.shape} differs from the source's {ref.shape}"
            )
        diff = (
            float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64))))
            if ref.size
            else 0.0
        )
        scale = max(float(np.max(np.abs(ref))) if ref.size else 0.0, 1.0)
        worst_abs, worst_rel = max(worst_abs, diff), max(worst_rel, diff / scale)
    if not worst_rel <= rtol:
        raise VerificationError(
            f"{what}: the imported model differs from the source by {worst_abs:.3g} (relative {worst_rel:.3g} > "
            f"rtol {rtol:g}) on the example inputs; the export is not faithful"
        )
    return {"max_abs_diff": worst_abs, "max_rel_diff": worst_rel}
