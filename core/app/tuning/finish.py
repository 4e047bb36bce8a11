"""The ends of a tune: the baseline measured before the trials, and after them the best configuration
exported and verified, its recipe and the study's report (always, whatever stopped the run)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelpress.app.recipe import Evaluate, Recipe, load_recipe
from modelpress.app.tuning.inputs import eval_data
from modelpress.app.tuning.report import TrialRecord, TuneReport, pareto_front
from modelpress.app.tuning.runner import record
from modelpress.app.tuning.strategy import pick_best
from modelpress.evaluation.criteria import lower_is_better

if TYPE_CHECKING:
    from modelpress.app.tuning.inputs import TuneRun

__all__ = ["TuneResult", "finish", "measure_baseline"]


@dataclass
class TuneResult:
    """What a tune found. ``best`` meets the criterion when ``meets`` is True."""

    best: TrialRecord | None
    meets: bool
    baseline: dict[str, Any]
    trials: list[TrialRecord]
    pareto: list[TrialRecord]
    output: Path
    model_path: Path | None
    recipe_path: Path | None
    report: TuneReport
    stop_reason: str
    interrupted: bool = False
    space: list[dict[str, Any]] = field(default_factory=list)


def _evaluator(out: Path, evaluate_spec: Evaluate) -> Any:
    from modelpress.app.compress import _Evaluator

    source, data = eval_data(out, evaluate_spec)
    # NOTE: _Evaluator reads only the recipe's evaluation settings: no pass is needed (nor validated)
    recipe = Recipe.model_construct(passes=[], evaluate=evaluate_spec)
    return _Evaluator(recipe, source, data)


def measure_baseline(out: Path, evaluate_spec: Evaluate) -> dict[str, Any]:
    """The source model's metric, size and latency (from the copies in ``out``)."""
    from modelpress.app.compress import measure_latency

    evaluator = _evaluator(out, evaluate_spec)
    path = out / "source.onnx"
    return {
        "metric": evaluator.metric(path),
        "size_bytes": path.stat().st_size,
        "latency_ms": measure_latency(
            path,
            evaluator.latency_feeds["b1"],
            threads=evaluate_spec.threads,
            repeats=evaluate_spec.repeats,
        ),
    }


@dataclass
class _Outputs:
    model_path: Path | None = None
    recipe_path: Path | None = None
    verification: str = ""


def _export_best(run: TuneRun, best: TrialRecord) -> _Outputs:
    """``best.onnx`` (exported from the trial's model, verified against the source) and ``best-recipe.yaml``."""
    from modelpress.app.compress import measure_latency
    from modelpress.io.export import export
    from modelpress.plugin.loading import load

    spec, out = run.inputs.evaluate, run.out
    # NOTE: the evaluation data only (the metric is the trial's): no run of the source model over all of it
    _, data = eval_data(out, spec)
    model_path = out / "best.onnx"
    model = load(_trial_model(run, best))
    text = _judge_text(run, model, data)
    exported = export(
        model,
        model_path,
        sample=data.take(64),
        reference=run.inputs.source,
        accept_loss=run.settings.accept_loss,
    )
    verification = exported.verification.summary() if exported.verification is not None else ""
    verification += f"; text: {text}" if text else ""
    first = {
        name: array[:1] for name, array in data.inputs.items()
    }  # NOTE: the trials' latency input (batch 1)
    best.latency_alone_ms = measure_latency(
        model_path, first, threads=spec.threads, repeats=spec.repeats
    )
    recipe_path = out / "best-recipe.yaml"
    _write_recipe(recipe_path, best.passes, run.inputs.blobs, spec)
    return _Outputs(model_path, recipe_path, verification)


def _trial_model(run: TuneRun, best: TrialRecord) -> Path:
    """The trial's model file; rebuilt here from its passes when another driver of a shared study ran it (its file is on that driver's disk)."""
    path = run.out / "trials" / f"trial-{best.number:04d}.onnx"
    if not path.exists():
        from modelpress.app.tuning.inputs import atomic_write
        from modelpress.app.tuning.trial import run_trial

        value = run_trial(
            run.model_bytes,
            run.inputs.blobs,
            best.passes,
            run.inputs.evaluate.model_dump(),
            plugins=run.registry.local_plugins(),
        )
        atomic_write(path, value["model"])
    return path


def _judge_text(run: TuneRun, model: Any, data: Any) -> str | None:
    """A text decoder's best model on the evaluation text against the source (perplexity, greedy-token
    agreement, decode speed), held to its passes' text floor before it is written (unless accept_loss)."""
    from modelpress.base.errors import AccuracyLossError
    from modelpress.evaluation.text import (
        TextEvaluation,
        is_decoder,
        text_floor,
        text_misses,
        text_summary,
    )

    source = run.inputs.source
    if data.ragged or not is_decoder(source.signature):
        return None
    figures: dict[str, Any] = TextEvaluation(source, data.take(64).inputs).measure(model)
    missed = text_misses(figures, text_floor(model.provenance, run.registry))
    if missed and not run.settings.accept_loss:
        raise AccuracyLossError(
            f"the best configuration misses its text criteria on the evaluation text: {missed} ({text_summary(figures)}); "
            "best.onnx was not written (accept_loss=True / --accept-loss keeps it)"
        )
    return text_summary({**figures, "loss_accepted": missed})


def finish(run: TuneRun, stop_reason: str, interrupted: bool) -> TuneResult:
    """Pick the best, export and verify it, write its recipe and the report (always)."""
    study, spec, settings = run.store.study, run.inputs.evaluate, run.settings
    baseline = study.user_attrs.get("baseline") or {
        "metric": float("nan"),
        "size_bytes": 1,
        "latency_ms": 1.0,
    }
    records = [
        record(t, baseline["metric"], spec.metric, settings.max_drop)
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get("status") not in (None, "running", "duplicate")
    ]
    front = pareto_front(
        records, settings.objective, higher_is_better=not lower_is_better(spec.metric)
    )
    best = pick_best(records, settings.objective, baseline)
    outputs = _export_best(run, best) if best is not None else _Outputs()
    if not settings.keep_trial_models:
        _drop_trial_models(run, {r.number for r in front} | ({best.number} if best else set()))
    status = stop_reason + (
        ""
        if best is None
        else (
            " — best meets the criterion"
            if best.meets
            else " — no configuration met the criterion; best by metric shown"
        )
    )
    report = TuneReport(
        title=f"modelpress tune: {run.inputs.source.name}",
        metric=spec.metric,
        objective=settings.objective,
        max_drop=settings.max_drop,
        baseline=baseline,
        trials=records,
        pareto=front,
        best=best,
        status=status,
        verification=outputs.verification,
        space=run.space.describe(),
        notes=run.space.notes,
        left_out=run.space.left_out,
        dashboard=run.dashboard,
        cluster=run.executor.describe(),
    )
    report.write(run.out)
    return TuneResult(
        best=best,
        meets=bool(best and best.meets),
        baseline=baseline,
        trials=records,
        pareto=front,
        output=run.out,
        model_path=outputs.model_path,
        recipe_path=outputs.recipe_path,
        report=report,
        stop_reason=stop_reason,
        interrupted=interrupted,
        space=run.space.describe(),
    )


def _drop_trial_models(run: TuneRun, keep: set[int]) -> None:
    """Delete the trial models not in ``keep`` (the Pareto front and the best)."""
    for path in (run.out / "trials").glob("trial-*.onnx"):
        if int(path.stem.split("-")[1]) not in keep:
            path.unlink()


def _write_recipe(
    path: Path,
    passes: list[dict[str, Any]],
    blobs: dict[str, bytes | None],
    evaluate_spec: Evaluate,
) -> None:
    import yaml

    recipe = {
        "passes": passes,
        "data": {role: f"data/{role}.npz" for role, blob in blobs.items() if blob is not None},
        "evaluate": evaluate_spec.model_dump(),
    }
    load_recipe(recipe)  # NOTE: what we write must load
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(
        "# written by modelpress tune: `modelpress compress source.onnx --recipe best-recipe.yaml -o out.onnx` reproduces best.onnx\n"
        + yaml.safe_dump(recipe, sort_keys=False)
    )
    os.replace(tmp, path)
