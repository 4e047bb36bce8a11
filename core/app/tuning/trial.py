"""One trial, as it runs in a worker process: apply the passes, export, measure.

The model and the data arrive as bytes (so a trial runs the same on this machine or on a cluster
node), the passes as recipe passes: the same :func:`modelpress.app.compress.run_pass` that
``modelpress compress`` runs, so the winning configuration written as a recipe reproduces the model.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from modelpress.evaluation.criteria import lower_is_better


def drop(metric_name: str, baseline: float, value: float) -> float:
    """How much worse ``value`` is than ``baseline`` (positive = worse), on the metric's own scale."""
    return value - baseline if lower_is_better(metric_name) else baseline - value


def prepare_worker(torch: bool = False) -> None:
    """What every trial imports, and the methods' registry (with ``torch``: torch too, for fine-tuning and distillation)."""
    import onnxruntime  # noqa: F401

    import modelpress.app.compress
    import modelpress.io.export  # noqa: F401
    from modelpress.plugin.registry import get_registry

    get_registry()
    if torch:
        import torch as _torch

        weight = _torch.zeros(
            2, 2, requires_grad=True
        )  # NOTE: autograd's first backward pass sets up its engine
        (weight * 2).sum().backward()
        # NOTE: a torch optimizer's first construction imports torch._dynamo (~800 modules, ~2 s of CPU): once per
        # worker either way, but here it is start-up, not the first fine-tuning trial's time
        _torch.optim.Adam([weight]).step()


class _Laps:
    """Wall and CPU seconds (this process, all its threads) per phase of a trial: load-independent figures."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, phase: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        spent = self.seconds.setdefault(phase, [0.0, 0.0])
        spent[0] += wall - self._wall
        spent[1] += cpu - self._cpu
        self._wall, self._cpu = wall, cpu

    def figures(self) -> dict[str, dict[str, float]]:
        return {
            phase: {"wall": round(w, 4), "cpu": round(c, 4)}
            for phase, (w, c) in self.seconds.items()
        }


_REGISTRIES: dict[tuple[str, ...], Any] = {}


def trial_registry(plugins: list[Any] | None = None) -> Any:
    """The registry a worker runs with: the process-wide one, plus the plugin objects the driver's registry had
    registered itself (``create_registry(plugins=[...])``, which no entry point brings); made once per worker."""
    from modelpress.plugin.registry import create_registry, get_registry

    if not plugins:
        return get_registry()
    key = tuple(
        getattr(p, "__name__", None) or f"{type(p).__module__}.{type(p).__qualname__}"
        for p in plugins
    )
    if key not in _REGISTRIES:
        _REGISTRIES[key] = create_registry(plugins=plugins)
    return _REGISTRIES[key]


def run_trial(
    model: bytes,
    data: dict[str, bytes | None],
    passes: list[dict[str, Any]],
    evaluate: dict[str, Any],
    baseline: float | None = None,
    hopeless_drop: float | None = None,
    plugins: list[Any] | None = None,
) -> dict[str, Any]:
    """Run a configuration; returns metric, size, latency, the model's bytes and the pass figures.

    ``status`` is ``"pruned"`` when the trial was cut early: a pass whose method declares a
    ``recovery`` option it may ``probe`` (e.g. pruning's fine-tuning epochs), with that option set,
    is first measured with it at its default, and if its drop already exceeds ``hopeless_drop``
    the recovery (and the rest of the trial) is skipped. ``plugins``: see :func:`trial_registry`.
    """
    start = time.perf_counter()
    laps = _Laps()
    registry = trial_registry(plugins)
    laps.lap("import")
    with tempfile.TemporaryDirectory(prefix="modelpress-trial-") as tmp:
        trial = _Trial.open(Path(tmp), model, data, passes, evaluate, registry)
        laps.lap("load")
        current, figures, cut = trial.apply(laps, baseline, hopeless_drop)
        if cut is not None:
            return {**cut, "seconds": time.perf_counter() - start, "phases": laps.figures()}
        return {
            **trial.measure(current, laps),
            "parameters": current.parameter_count(),
            "seconds": time.perf_counter() - start,
            "figures": figures,
            "phases": laps.figures(),
        }


def _probed_recovery(registry: Any, spec: Any) -> tuple[str, Any] | None:
    """``(option, its default)`` when the pass's method declares a recovery option it may probe and the pass sets it."""
    method = registry.method(spec.method, spec.kind)
    tuning = method.tuning
    if (
        tuning is None
        or not tuning.probe
        or not tuning.recovery
        or not spec.options.get(tuning.recovery)
    ):
        return None
    return tuning.recovery, method.options.model_fields[tuning.recovery].get_default(
        call_default_factory=True
    )


class _Trial:
    """A trial's files (in ``folder``), recipe, source model and evaluator."""

    def __init__(
        self,
        folder: Path,
        sources: dict[str, str | None],
        recipe: Any,
        source: Any,
        evaluator: Any,
        sample: Any,
        registry: Any,
    ):
        self.folder, self.sources, self.recipe, self.source, self.evaluator, self.sample = (
            folder,
            sources,
            recipe,
            source,
            evaluator,
            sample,
        )
        from modelpress.app.compress import PassData

        self.common = PassData(
            calibration=sources.get("calibration"),
            train=sources.get("train"),
            eval_source=sources.get("eval"),
            show_progress=False,
            registry=registry,
        )

    @classmethod
    def open(
        cls,
        folder: Path,
        model: bytes,
        data: dict[str, bytes | None],
        passes: list[dict[str, Any]],
        evaluate: dict[str, Any],
        registry: Any,
    ) -> _Trial:
        """Write the model and the data into ``folder``; validate the passes; load the source and the evaluation data."""
        from modelpress.app.compress import _Evaluator
        from modelpress.app.recipe import DataSources, Evaluate, PassSpec, Recipe
        from modelpress.data.samples import load_dataset
        from modelpress.plugin.loading import load

        (folder / "source.onnx").write_bytes(model)
        sources: dict[str, str | None] = {}
        for name, blob in data.items():
            if blob is not None:
                (folder / f"{name}.npz").write_bytes(blob)
                sources[name] = str(folder / f"{name}.npz")
        recipe = Recipe(
            passes=[PassSpec(**p) for p in passes],
            data=DataSources(**sources),
            evaluate=Evaluate(**evaluate),
        )
        recipe.validate_against(registry)
        source = load(folder / "source.onnx")
        eval_data = (
            load_dataset(sources["eval"], source.signature, what="evaluation").take(
                recipe.evaluate.max_samples
            )
            if sources.get("eval")
            else None
        )
        sample = eval_data.take(64) if eval_data is not None else None
        return cls(
            folder, sources, recipe, source, _Evaluator(recipe, source, eval_data), sample, registry
        )

    def apply(
        self, laps: _Laps, baseline: float | None, hopeless_drop: float | None
    ) -> tuple[Any, list[dict[str, Any]], dict[str, Any] | None]:
        """Run the passes in turn: the model, each pass's figures, and the result of a trial cut before fine-tuning (else None)."""
        from modelpress.app.compress import run_pass

        current: Any = self.source
        figures: list[dict[str, Any]] = []
        for index, spec in enumerate(self.recipe.passes, 1):
            recovery = _probed_recovery(self.common.registry, spec)
            if hopeless_drop is not None and baseline is not None and recovery is not None:
                cut = self._probe(index, spec, current, recovery, (baseline, hopeless_drop))
                laps.lap("probe")
                if cut is not None:
                    return current, figures, cut
            current = run_pass(spec, index, current, self.source, self.common)
            figures.append(
                current.provenance.passes[-1].figures if current.provenance.passes else {}
            )
            laps.lap("passes")
        return current, figures, None

    def _probe(
        self,
        index: int,
        spec: Any,
        current: Any,
        recovery: tuple[str, Any],
        limit: tuple[float, float],
    ) -> dict[str, Any] | None:
        """The pass without its recovery (``(option, default)``), measured: the cut trial's result when its drop
        from ``limit``'s baseline is over ``limit``'s hopeless drop."""
        from modelpress.app.compress import run_pass
        from modelpress.io.export import export

        baseline, hopeless_drop = limit
        option, default = recovery
        probe = run_pass(
            spec.model_copy(update={"options": {**spec.options, option: default}}),
            index,
            current,
            self.source,
            self.common,
        )
        export(probe, self.folder / "probe.onnx", verify=False)
        before = self.evaluator.metric(self.folder / "probe.onnx")
        metric = self.recipe.evaluate.metric
        if drop(metric, baseline, before) <= hopeless_drop:
            return None
        return {
            "status": "pruned",
            "metric": before,
            "reason": f"stage {index} ({spec.kind}/{spec.method}) before recovery ({option}): {metric} {before:.4f} "
            f"vs {baseline:.4f}, a drop over {hopeless_drop:g}; {option} skipped",
        }

    def measure(self, current: Any, laps: _Laps) -> dict[str, Any]:
        """Export and verify the model, then its latency and metric."""
        from modelpress.app.compress import measure_latency
        from modelpress.io.export import export

        out = self.folder / "model.onnx"
        # NOTE: a trial is judged by the study's own criterion (max_drop); a missed verification floor is
        # recorded, not a wasted trial (the best model's export applies the floor)
        exported = export(current, out, sample=self.sample, reference=self.source, accept_loss=True)
        laps.lap("export")
        blob = out.read_bytes()
        if out.with_name(out.name + ".data").exists():
            raise ValueError(
                "trial model is over the single-file limit (external data); tune models under ~1.5 GB"
            )
        evaluate = self.recipe.evaluate
        latency = measure_latency(
            out,
            self.evaluator.latency_feeds["b1"],
            threads=evaluate.threads,
            repeats=evaluate.repeats,
        )
        laps.lap("latency")
        metric = self.evaluator.metric(out)
        laps.lap("metric")
        text = self._judge_text(current, out)
        laps.lap("text")
        missed = exported.verification.loss_accepted if exported.verification is not None else None
        return {
            "status": "ok",
            "metric": metric,
            "size_bytes": len(blob),
            "latency_ms": latency,
            "model": blob,
            **({"floor_missed": missed} if missed else {}),
            **text,
        }

    def _judge_text(self, current: Any, out: Path) -> dict[str, Any]:
        """A text decoder's trial against its passes' text floor on the evaluation samples: ``text`` (perplexity,
        greedy-token agreement, decode speed in one line) and ``text_missed`` (what it misses; such a trial does
        not meet the criterion); nothing for other models or without evaluation data."""
        from modelpress.evaluation.text import (
            TextEvaluation,
            is_decoder,
            text_floor,
            text_misses,
            text_summary,
        )

        if self.sample is None or self.sample.ragged or not is_decoder(self.source.signature):
            return {}
        figures = TextEvaluation(self.source, self.sample.inputs).measure(out)
        missed = text_misses(figures, text_floor(current.provenance, self.common.registry))
        return {"text": text_summary(figures), **({"text_missed": missed} if missed else {})}
