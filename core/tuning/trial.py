"""One trial, as it runs in a worker process: apply the passes, export, measure.

The model and the data arrive as bytes (so a trial runs the same on this machine or on a cluster
node), the passes as recipe passes: the same :func:`modelpress.compress.run_pass` that
``modelpress compress`` runs, so the winning configuration written as a recipe reproduces the model.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

METRICS_LOWER_IS_BETTER = ("mse",)


def drop(metric_name: str, baseline: float, value: float) -> float:
    """How much worse ``value`` is than ``baseline`` (positive = worse), on the metric's own scale."""
    return value - baseline if metric_name in METRICS_LOWER_IS_BETTER else baseline - value


def prepare_worker(torch: bool = False) -> None:
    """What every trial imports, and the methods' registry (with ``torch``: torch too, for fine-tuning and distillation)."""
    import onnxruntime  # noqa: F401

    import modelpress.compress
    import modelpress.export  # noqa: F401
    from modelpress.registry import get_registry

    get_registry()
    if torch:
        import torch as _torch

        weight = _torch.zeros(2, 2, requires_grad=True)  # NOTE: autograd's first backward pass sets up its engine
        (weight * 2).sum().backward()


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
        return {phase: {"wall": round(w, 4), "cpu": round(c, 4)} for phase, (w, c) in self.seconds.items()}


def run_trial(model: bytes, data: dict[str, bytes | None], passes: list[dict[str, Any]], evaluate: dict[str, Any],
              baseline: float | None = None, hopeless_drop: float | None = None) -> dict[str, Any]:
    """Run a configuration; returns metric, size, latency, the model's bytes and the pass figures.

    ``status`` is ``"pruned"`` when the trial was cut early: a prune pass that fine-tunes is first
    measured before fine-tuning, and if its drop already exceeds ``hopeless_drop`` the
    fine-tuning (and the rest of the trial) is skipped.
    """
    from modelpress.compress import _Evaluator, measure_latency, run_pass
    from modelpress.data import load_dataset
    from modelpress.export import export
    from modelpress.loading import load
    from modelpress.recipe import DataSources, Evaluate, PassSpec, Recipe
    from modelpress.registry import get_registry

    start = time.perf_counter()
    laps = _Laps()
    registry = get_registry()
    laps.lap("import")
    with tempfile.TemporaryDirectory(prefix="modelpress-trial-") as tmp:
        folder = Path(tmp)
        (folder / "source.onnx").write_bytes(model)
        sources: dict[str, str | None] = {}
        for name, blob in data.items():
            if blob is not None:
                (folder / f"{name}.npz").write_bytes(blob)
                sources[name] = str(folder / f"{name}.npz")
        recipe = Recipe(passes=[PassSpec(**p) for p in passes], data=DataSources(**sources), evaluate=Evaluate(**evaluate))
        recipe.validate_against(registry)
        source = load(folder / "source.onnx")
        eval_data = load_dataset(sources["eval"], source.signature, what="evaluation").take(recipe.evaluate.max_samples) if sources.get("eval") else None
        evaluator = _Evaluator(recipe, source, eval_data)
        sample = eval_data.take(64) if eval_data is not None else None
        laps.lap("load")
        common = {"calibration": sources.get("calibration"), "train": sources.get("train"), "eval_source": sources.get("eval"),
                  "show_progress": False, "registry": registry}
        current = source
        figures: list[dict[str, Any]] = []
        for index, spec in enumerate(recipe.passes, 1):
            if hopeless_drop is not None and baseline is not None and spec.kind == "prune" and spec.options.get("fine_tune_epochs"):
                probe = run_pass(spec.model_copy(update={"options": {**spec.options, "fine_tune_epochs": 0}}), index, current, source, **common)
                export(probe, folder / "probe.onnx", verify=False)
                before = evaluator.metric(folder / "probe.onnx")
                laps.lap("probe")
                if drop(recipe.evaluate.metric, baseline, before) > hopeless_drop:
                    return {"status": "pruned", "metric": before, "seconds": time.perf_counter() - start,
                            "reason": f"stage {index} ({spec.kind}/{spec.method}) before fine-tuning: {recipe.evaluate.metric} {before:.4f} "
                                      f"vs {baseline:.4f}, a drop over {hopeless_drop:g}; fine-tuning skipped", "phases": laps.figures()}
            current = run_pass(spec, index, current, source, **common)
            figures.append(current.provenance.passes[-1].figures if current.provenance.passes else {})
            laps.lap("passes")
        out = folder / "model.onnx"
        export(current, out, sample=sample, reference=source)
        laps.lap("export")
        blob = out.read_bytes()
        external = out.with_name(out.name + ".data")
        if external.exists():
            raise ValueError("trial model is over the single-file limit (external data); tune models under ~1.5 GB")
        latency = measure_latency(out, evaluator.latency_feeds["b1"], threads=recipe.evaluate.threads, repeats=recipe.evaluate.repeats)
        laps.lap("latency")
        metric = evaluator.metric(out)
        laps.lap("metric")
        return {
            "status": "ok", "metric": metric, "size_bytes": len(blob), "latency_ms": latency,
            "parameters": current.parameter_count(), "seconds": time.perf_counter() - start, "model": blob, "figures": figures,
            "phases": laps.figures(),
        }
