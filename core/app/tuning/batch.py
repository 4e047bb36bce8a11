"""Batch compression: one recipe, many models, in parallel on the same executor as ``tune``.

Each model runs ``modelpress.compress`` in its own Ray worker process and writes
``OUT_DIR/<model stem>/<stem>.onnx`` with its stages and report; a model that fails is reported
and the others go on. ``OUT_DIR/summary.{md,json}`` has one row per model. Model paths and the
recipe's data paths are read by the workers: with a remote cluster (``address``) they must be on
storage every node sees.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelpress.app.recipe import Recipe, load_recipe
from modelpress.app.tuning.executor import RayExecutor
from modelpress.base.errors import OptionsError
from modelpress.plugin.registry import get_registry

__all__ = ["BatchResult", "compress_batch"]


@dataclass
class BatchRow:
    model: str
    status: str  # ok | failed | interrupted
    output: str = ""
    metric: str = ""
    source_value: float | None = None
    value: float | None = None
    source_bytes: int | None = None
    size_bytes: int | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""


@dataclass
class BatchResult:
    rows: list[BatchRow]
    output: Path
    interrupted: bool = False

    @property
    def failed(self) -> list[BatchRow]:
        return [r for r in self.rows if r.status != "ok"]

    def table(self) -> Any:
        from rich.markup import escape
        from rich.table import Table

        table = Table(title=f"batch compression: {len(self.rows)} models", title_justify="left")
        for col in ("model", "status", "metric", "source", "compressed", "size (MB)", "ratio", "latency b1 ms", "time (s)", "output / error"):
            table.add_column(col)
        for row in summary_rows(self.rows):
            table.add_row(*(escape(c) for c in row))
        return table


def summary_rows(rows: list[BatchRow]) -> list[list[str]]:
    out = []
    for r in rows:
        b1 = next((v for k, v in r.latency_ms.items() if k.startswith("b1")), None)
        out.append([
            r.model, r.status, r.metric, "-" if r.source_value is None else f"{r.source_value:.4f}",
            "-" if r.value is None else f"{r.value:.4f}", "-" if r.size_bytes is None else f"{r.size_bytes / 1e6:.3f}",
            f"{r.source_bytes / r.size_bytes:.2f}x" if r.size_bytes and r.source_bytes else "-",
            "-" if b1 is None else f"{b1:.3f}", f"{r.seconds:.1f}", r.output or r.error,
        ])
    return out


def _compress_one(model: str, recipe: dict[str, Any], base_dir: str, output: str, report_dir: str) -> dict[str, Any]:
    """Runs in a worker: the same ``compress`` as ``modelpress compress MODEL``."""
    from modelpress.app.compress import compress

    parsed = Recipe(**recipe)
    parsed.base_dir = base_dir
    result = compress(model, parsed, output=output, report_dir=report_dir, show_progress=False)
    first, last = result.stages[0], result.stages[-1]
    return {"status": "interrupted" if result.interrupted else "ok", "metric": last.metric, "source_value": first.value, "value": last.value,
            "source_bytes": first.size_bytes, "size_bytes": last.size_bytes, "latency_ms": last.latency_ms}


def _stems(models: list[str]) -> list[str]:
    stems: list[str] = []
    for m in models:
        stem = Path(m).stem or Path(m).name
        candidate, n = stem, 2
        while candidate in stems:  # NOTE: a/model.onnx and b/model.onnx get model and model-2
            candidate, n = f"{stem}-{n}", n + 1
        stems.append(candidate)
    return stems


def compress_batch(
    models: list[str | os.PathLike[str]],
    recipe: str | os.PathLike[str] | dict[str, Any] | Recipe,
    output_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    address: str | None = None,
    timeout: float | None = None,
    memory_mb: float | None = None,
    show_progress: bool = True,
) -> BatchResult:
    """Compress every model with ``recipe`` in parallel Ray workers; write per-model outputs and a summary."""
    from modelpress.app.tuning.progress import TrialBoard

    paths, parsed = _checked(models, recipe)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    board = TrialBoard(enabled=show_progress, metric=parsed.evaluate.metric, objective="")
    executor = RayExecutor(workers, address)
    jobs = list(zip(range(len(paths)), paths, _stems([str(m) for m in models]), strict=True))
    rows = {i: BatchRow(model=str(models[i]), status="pending", output=str(out / stem / f"{stem}.onnx")) for i, _, stem in jobs}
    interrupted = False
    try:
        _run_jobs(_Batch(executor, rows, parsed, out, board, timeout, memory_mb), jobs)
    except KeyboardInterrupt:
        interrupted = True
        for job in executor.cancel_all():
            rows[job.key].status, rows[job.key].output = "interrupted", ""
        for row in rows.values():
            if row.status == "pending":
                row.status, row.output = "interrupted", ""
    finally:
        executor.shutdown()
    result = BatchResult([rows[i] for i in sorted(rows)], out, interrupted)
    _write_summary(result)
    return result


def _checked(models: list[str | os.PathLike[str]], recipe: str | os.PathLike[str] | dict[str, Any] | Recipe) -> tuple[list[str], Recipe]:
    """The models' absolute paths and the recipe, validated against the installed methods, before Ray starts."""
    if not models:
        raise OptionsError("batch compression needs at least one model")
    paths = [str(Path(m).resolve()) for m in models]
    for path in paths:
        if not os.path.exists(path):
            raise OptionsError(f"model {path!r} does not exist")
    parsed = load_recipe(recipe)
    parsed.validate_against(get_registry())
    return paths, parsed


@dataclass
class _Batch:
    """One batch run's state: where jobs run, their rows, the recipe and limits."""

    executor: RayExecutor
    rows: dict[int, BatchRow]
    recipe: Recipe
    out: Path
    board: Any
    timeout: float | None
    memory_mb: float | None


def _run_jobs(batch: _Batch, pending: list[tuple[int, str, str]]) -> None:
    """Submit the models as workers come free and fill in their rows as they finish."""
    executor, rows, out, board, timeout, memory_mb = batch.executor, batch.rows, batch.out, batch.board, batch.timeout, batch.memory_mb
    raw, base_dir = batch.recipe.model_dump(), str(Path(batch.recipe.base_dir or ".").resolve())
    while pending or executor.running:
        # NOTE: no more jobs than workers at a time: a job's time limit counts from its submission
        while pending and len(executor.running) < executor.workers:
            i, path, stem = pending.pop(0)
            rows[i].status = "running"
            executor.submit(i, _compress_one, path, raw, base_dir, rows[i].output, str(out / stem), timeout_s=timeout, memory_mb=memory_mb)
        for outcome in executor.wait(1.0):
            row = rows[outcome.job.key]
            row.seconds = round(outcome.seconds, 2)
            if outcome.ok:
                for key, value in outcome.value.items():
                    setattr(row, key, value)
            else:
                row.status, row.error, row.output = "failed", outcome.error, ""
            board.log(f"{row.model}: {row.status} in {row.seconds:.1f}s" + (f" ({row.error})" if row.error else ""))


def _write_summary(result: BatchResult) -> None:
    cols = ["model", "status", "metric", "source", "compressed", "size (MB)", "ratio", "latency b1 ms", "time (s)", "output / error"]
    lines = [f"# batch compression ({len(result.rows)} models{', interrupted' if result.interrupted else ''})", "",
             "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in summary_rows(result.rows)]
    for name, text in (("summary.md", "\n".join(lines) + "\n"),
                       ("summary.json", json.dumps({"interrupted": result.interrupted, "models": [asdict(r) for r in result.rows]}, indent=1))):
        tmp = result.output / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, result.output / name)
