"""Batch compression: one recipe, many models, in parallel on the same executor as ``tune``.

Each model runs ``modelpress.compress`` in its own Ray worker process and writes
``OUT_DIR/<model stem>/<stem>.onnx`` with its stages and report; a model that fails is reported
and the others go on. ``OUT_DIR/summary.{md,json}`` has one row per model, with the node it ran on.
The models and the recipe's data files are read by this process and travel as Ray objects; the
outputs come back as bytes: with a cluster (``address``) the nodes need none of this machine's files.
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


# NOTE: the summary's columns, in the console table and in summary.md alike
SUMMARY_COLUMNS = (
    "model",
    "status",
    "metric",
    "source",
    "compressed",
    "size (MB)",
    "ratio",
    "latency b1 ms",
    "time (s)",
    "output / error",
)


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
    node: str = ""  # NOTE: the Ray node and host it ran on
    host: str = ""
    attempts: int = 1  # NOTE: > 1: it ran again after its node was lost


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
        for col in SUMMARY_COLUMNS:
            table.add_column(col)
        for row in summary_rows(self.rows):
            table.add_row(*(escape(c) for c in row))
        return table


def summary_rows(rows: list[BatchRow]) -> list[list[str]]:
    out = []
    for r in rows:
        b1 = next((v for k, v in r.latency_ms.items() if k.startswith("b1")), None)
        out.append(
            [
                r.model,
                r.status,
                r.metric,
                "-" if r.source_value is None else f"{r.source_value:.4f}",
                "-" if r.value is None else f"{r.value:.4f}",
                "-" if r.size_bytes is None else f"{r.size_bytes / 1e6:.3f}",
                f"{r.source_bytes / r.size_bytes:.2f}x" if r.size_bytes and r.source_bytes else "-",
                "-" if b1 is None else f"{b1:.3f}",
                f"{r.seconds:.1f}",
                r.output or r.error,
            ]
        )
    return out


def _compress_one(
    model: dict[str, bytes],
    name: str,
    recipe: dict[str, Any],
    data: dict[str, tuple[str, bytes]],
    stem: str,
) -> dict[str, Any]:
    """Runs in a worker: the same ``compress`` as ``modelpress compress MODEL``, on copies in a temp folder of this
    node (``model``: its files by relative path, ``name`` the one to open; ``data``: role -> (file name, bytes)).
    Returns the figures and the output files' bytes by relative path: no path of the driver's is read or written here."""
    import tempfile

    from modelpress.app.compress import compress

    with tempfile.TemporaryDirectory(prefix="modelpress-batch-") as tmp:
        folder = Path(tmp)
        for rel, blob in model.items():
            (folder / "model" / rel).parent.mkdir(parents=True, exist_ok=True)
            (folder / "model" / rel).write_bytes(blob)
        recipe = {**recipe, "data": dict(recipe.get("data") or {})}
        for role, (file_name, blob) in data.items():
            (folder / "data").mkdir(exist_ok=True)
            (folder / "data" / f"{role}-{file_name}").write_bytes(blob)
            recipe["data"][role] = str(folder / "data" / f"{role}-{file_name}")
        parsed = Recipe(**recipe)
        parsed.base_dir = str(folder)
        out = folder / "out"
        result = compress(
            str(folder / "model" / name),
            parsed,
            output=out / f"{stem}.onnx",
            report_dir=out,
            show_progress=False,
        )
        files = {
            str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
        }
    first, last = result.stages[0], result.stages[-1]
    return {
        "status": "interrupted" if result.interrupted else "ok",
        "metric": last.metric,
        "source_value": first.value,
        "value": last.value,
        "source_bytes": first.size_bytes,
        "size_bytes": last.size_bytes,
        "latency_ms": last.latency_ms,
        "files": files,
    }


def _model_files(path: str) -> tuple[dict[str, bytes], str]:
    """A model's files (a folder's, or the file and the external-data files beside it that it names) and its name among them."""
    model = Path(path)
    if model.is_dir():
        return {
            str(p.relative_to(model.parent)): p.read_bytes()
            for p in sorted(model.rglob("*"))
            if p.is_file()
        }, model.name
    files = {model.name: model.read_bytes()}
    if model.suffix == ".onnx":
        import onnx
        from onnx.external_data_helper import uses_external_data

        try:
            proto = onnx.load(str(model), load_external_data=False)
        except Exception:  # NOTE: not a model: the job reports it, as `modelpress compress` would
            return files, model.name
        for tensor in proto.graph.initializer:
            if uses_external_data(tensor):
                location = next(e.value for e in tensor.external_data if e.key == "location")
                files.setdefault(location, (model.parent / location).read_bytes())
    return files, model.name


def _data_files(recipe: Recipe) -> dict[str, tuple[str, bytes]]:
    """The recipe's data files, read here (role -> (file name, bytes)); ``pkg.module:function`` sources stay names."""
    found: dict[str, tuple[str, bytes]] = {}
    for role in ("calibration", "train", "eval"):
        source = getattr(recipe.data, role)
        if source is None or recipe._is_callable_ref(source):
            continue
        path = Path(source) if Path(source).is_absolute() else Path(recipe.base_dir or ".") / source
        found[role] = (path.name, path.read_bytes())
    return found


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
    retries: int = 1,
) -> BatchResult:
    """Compress every model with ``recipe`` in parallel Ray workers; write per-model outputs and a summary.

    The models and the recipe's data files are read here and reach the workers as Ray objects, and the outputs come back
    the same way: on a cluster (``address``) no node needs this machine's files. A job lost with its node runs again,
    up to ``retries`` times."""
    from modelpress.app.tuning.progress import TrialBoard

    paths, parsed = _checked(models, recipe)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    board = TrialBoard(enabled=show_progress, metric=parsed.evaluate.metric, objective="")
    executor = RayExecutor(workers, address)
    jobs = list(zip(range(len(paths)), paths, _stems([str(m) for m in models]), strict=True))
    rows = {
        i: BatchRow(model=str(models[i]), status="pending", output=str(out / stem / f"{stem}.onnx"))
        for i, _, stem in jobs
    }
    interrupted = False
    try:
        _run_jobs(_Batch(executor, rows, parsed, out, board, timeout, memory_mb, retries), jobs)
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


def _checked(
    models: list[str | os.PathLike[str]], recipe: str | os.PathLike[str] | dict[str, Any] | Recipe
) -> tuple[list[str], Recipe]:
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
    retries: int = 1


def _run_jobs(batch: _Batch, pending: list[tuple[int, str, str]]) -> None:
    """Submit the models as workers come free and fill in their rows as they finish."""
    executor, rows, out, board, timeout, memory_mb = (
        batch.executor,
        batch.rows,
        batch.out,
        batch.board,
        batch.timeout,
        batch.memory_mb,
    )
    raw = batch.recipe.model_dump()
    # NOTE: the data travels once, as Ray objects; each model as one when its job starts (read here, not on a worker)
    data = executor.put(_data_files(batch.recipe))
    jobs = {i: (path, stem) for i, path, stem in pending}
    while pending or executor.running:
        # NOTE: no more jobs than workers at a time: a job's time limit counts from its submission
        while pending and len(executor.running) < executor.workers:
            i, path, stem = pending.pop(0)
            rows[i].status = "running"
            files, name = _model_files(path)
            executor.submit(
                i,
                _compress_one,
                executor.put(files),
                name,
                raw,
                data,
                stem,
                timeout_s=timeout,
                memory_mb=memory_mb,
            )
        for outcome in executor.wait(1.0):
            row = rows[outcome.job.key]
            row.seconds = round(outcome.seconds, 2)
            row.node, row.host = outcome.timing.get("node", ""), outcome.timing.get("host", "")
            if outcome.ok:
                _write_outputs(out / jobs[outcome.job.key][1], outcome.value.pop("files"))
                for key, value in outcome.value.items():
                    setattr(row, key, value)
            elif outcome.node_lost and row.attempts <= batch.retries:
                row.attempts += 1
                row.error = outcome.error
                pending.insert(0, (outcome.job.key, *jobs[outcome.job.key]))
            else:
                row.status, row.error, row.output = "failed", outcome.error, ""
            board.log(
                f"{row.model}: {row.status} in {row.seconds:.1f}s"
                + (f" ({row.error})" if row.error else "")
            )


def _write_outputs(folder: Path, files: dict[str, bytes]) -> None:
    """A job's output files (model, stages, reports), written where ``modelpress compress`` would have written them."""
    from modelpress.app.tuning.inputs import atomic_write

    for rel, blob in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / rel, blob)


def _write_summary(result: BatchResult) -> None:
    cols = SUMMARY_COLUMNS
    lines = [
        f"# batch compression ({len(result.rows)} models{', interrupted' if result.interrupted else ''})",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "|".join("---" for _ in cols) + "|",
    ]
    lines += [
        "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"
        for row in summary_rows(result.rows)
    ]
    for name, text in (
        ("summary.md", "\n".join(lines) + "\n"),
        (
            "summary.json",
            json.dumps(
                {"interrupted": result.interrupted, "models": [asdict(r) for r in result.rows]},
                indent=1,
            ),
        ),
    ):
        tmp = result.output / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, result.output / name)
