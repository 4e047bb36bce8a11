"""The iterative schedule judges each step and keeps the best model it has seen.

After every step (prune, then fine-tune) the result's outputs are compared with the unpruned
model's, with the cosine export verifies by (:func:`modelpress.plugin_api.compare_outputs`), on
the calibration data or, without it, the held-out tenth of the training data that fine-tuning
never trains on. A step whose cosine is under ``stop_below`` (the method's verification floor by
default) *and* lower than the step before (1.0 before the first step) makes the target
unreachable: the schedule stops there, says so in a warning and in the figures, and the pass
returns the best step: the sparsest one that met the floor, else the one closest to the source.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from modelpress.plugin_api import (
    Dataset,
    Model,
    PassContext,
    compare_outputs,
    load_dataset,
    make_session,
    run_dataset,
)

__all__ = ["Step", "StepJudge", "held_out_split"]

# NOTE: enough samples for a stable cosine, few enough that judging a step costs a fraction of its fine-tuning
_JUDGE_SAMPLES = 256


def held_out_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, held_out)`` indices of ``n`` training samples: the first tenth is held out (validation)."""
    held = max(1, n // 10)
    return np.arange(held, n), np.arange(held)


@dataclass
class Step:
    """One judged step: its number (1-based), the sparsity it aimed at, the cosine, the model and figures."""

    number: int
    sparsity: float
    cosine: float
    model: Model
    state: Any = None  # what the method needs to report this step (its figures, its layer report)

    def describe(self) -> str:
        return f"step {self.number}, sparsity {self.sparsity:.2f}, cosine {self.cosine:.2f}"


@dataclass
class StepJudge:
    """The state of one judged schedule: the floor, the reference outputs, the steps seen, the best."""

    floor: float | None
    steps: int
    feeds: Dataset | None = None
    expected: list[np.ndarray] = field(default_factory=list)
    cosines: list[float] = field(default_factory=list)
    best: Step | None = None
    stopped: str | None = None

    @classmethod
    def start(
        cls,
        source: Model,
        ctx: PassContext,
        training: Dataset | None,
        stop_below: float | None,
        steps: int,
    ) -> StepJudge:
        """A judge for ``steps`` steps of pruning ``source`` (inactive for one step or without a floor or data)."""
        judge = cls(floor=stop_below, steps=steps)
        if stop_below is None or steps < 2:
            return judge
        if ctx.calibration is not None:
            judge.feeds = load_dataset(ctx.calibration, source.signature, what="calibration").take(
                _JUDGE_SAMPLES
            )
        elif training is not None:
            held = held_out_split(len(training))[1][:_JUDGE_SAMPLES]
            judge.feeds = Dataset({k: v[held] for k, v in training.inputs.items()})
        if judge.feeds is not None:
            judge.expected = judge._outputs(source)
        return judge

    @property
    def active(self) -> bool:
        return self.feeds is not None

    def _outputs(self, model: Model) -> list[np.ndarray]:
        return [
            np.asarray(x)
            for x in run_dataset(make_session(model), self.feeds.batches(_JUDGE_SAMPLES))  # type: ignore[union-attr]
        ]

    def judge(self, model: Model, number: int, sparsity: float, state: Any = None) -> bool:
        """Judge step ``number`` (1-based); ``False``: the target is out of reach, stop here."""
        if not self.active:
            return True
        names = model.signature.output_names
        cosine = compare_outputs(names, self.expected, self._outputs(model)).cosine
        previous = self.cosines[-1] if self.cosines else 1.0
        self.cosines.append(cosine)
        step = Step(number, sparsity, cosine, model, state)
        if self.best is None or self._better(step, self.best):
            self.best = step
            step.model = (
                model.clone()
            )  # NOTE: the schedule goes on editing `model`; only the best is copied
        if cosine < self.floor and cosine < previous:  # type: ignore[operator]
            self.stopped = (
                f"stopped at step {number} of {self.steps}: cosine {cosine:.2f} < {self.floor:g} after fine-tuning; "
                f"best so far: {self.best.describe()}"
            )
            return False
        return True

    def _better(self, step: Step, best: Step) -> bool:
        """The sparsest step that meets the floor wins (the closer to the source at equal sparsity: n:m
        repeats its pattern); among steps that miss it, the closest to the source."""
        meets, best_meets = step.cosine >= self.floor, best.cosine >= self.floor  # type: ignore[operator]
        if meets != best_meets:
            return meets
        return (
            (step.sparsity, step.cosine) > (best.sparsity, best.cosine)
            if meets
            else step.cosine > best.cosine
        )

    def outcome(
        self, last: Model, last_state: Any, ctx: PassContext, method: str
    ) -> tuple[Model, Any]:
        """The model to return and its state: the best step when judged, else the last; figures and a warning say which."""
        if not self.active or self.best is None:
            return last, last_state
        best = self.best
        ctx.figures.update(
            {
                "step_cosines": [round(c, 4) for c in self.cosines],
                "stop_below": self.floor,
                "best_step": best.number,
                "reached_sparsity": round(best.sparsity, 4),
                "best_cosine": round(best.cosine, 4),
            }
        )
        if self.stopped:
            ctx.figures["stopped"] = self.stopped
            warnings.warn(
                f"{method}: {self.stopped}; returning step {best.number} (export still verifies it)",
                UserWarning,
                stacklevel=4,
            )
        elif best.number != len(self.cosines):
            note = (
                f"the last step's cosine {self.cosines[-1]:.2f} < {self.floor:g}; returning {best.describe()}, "
                "the sparsest step that meets it"
            )
            ctx.figures["stopped"] = note
            warnings.warn(f"{method}: {note}", UserWarning, stacklevel=4)
        return best.model, best.state
