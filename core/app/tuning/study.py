"""``modelpress.tune``: search compression configurations on Ray, stored in an Optuna study.

Flow: import the model and materialise the data in ``output/data`` (every trial, and the winning
recipe, use those files) -> measure the source (the baseline) -> measure per-node quantization
sensitivity once when the space falls back along it -> run trials on the executor, each told to
the Optuna study as it finishes -> pick the best, export and verify it, write its recipe and the
report. The study lives in SQLite in the output folder (or any SQLAlchemy URL): rerunning the same
command resumes it; completed trials are kept and count towards the budget, trials that were
running when the previous run stopped are run again.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from modelpress.app.recipe import DataSources, Evaluate, Recipe, load_recipe
from modelpress.app.tuning.executor import RayExecutor
from modelpress.app.tuning.progress import TrialBoard
from modelpress.app.tuning.report import TrialRecord, TuneReport, pareto_front
from modelpress.app.tuning.space import SearchSpace, _encode, default_space, space_from_recipe
from modelpress.app.tuning.strategy import Plan, Strategy, config_key, pick_best
from modelpress.app.tuning.trial import METRICS_LOWER_IS_BETTER, drop, prepare_worker, run_trial
from modelpress.base.errors import ModelpressError, OptionsError
from modelpress.plugin.registry import Registry, get_registry

__all__ = ["TuneResult", "parse_budget", "tune"]

Objective = Literal["size", "latency", "both"]
_DATA_ROLES = ("eval", "calibration", "train")


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


def parse_budget(text: str | int | float | None) -> dict[str, float]:
    """``20`` / ``"20"`` -> 20 trials; ``"20m"``, ``"90s"``, ``"1.5h"`` -> seconds."""
    if text is None:
        return {}
    if isinstance(text, (int, float)):
        return {"trials": int(text)}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*", str(text))
    if not match:
        raise OptionsError(f"budget {text!r}: give a number of trials (20) or a time (90s, 20m, 1.5h)")
    value, unit = float(match.group(1)), match.group(2)
    if unit is None:
        return {"trials": int(value)}
    return {"seconds": value * {"s": 1, "m": 60, "min": 60, "h": 3600}[unit]}


def _npz_bytes(source: Any, signature: Any, role: str) -> bytes:
    """Any accepted data source -> .npz bytes (validated against the model's signature)."""
    from modelpress.data.samples import LABELS, load_dataset

    if isinstance(source, (str, os.PathLike)) and str(source).endswith(".npz"):
        load_dataset(source, signature, what=role)  # validate before any work
        return Path(source).read_bytes()
    data = load_dataset(source, signature, what=role)
    buffer = io.BytesIO()
    arrays = dict(data.inputs)
    if data.labels is not None:
        arrays[LABELS] = data.labels
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _data_sources(data: Any, recipe: Recipe | None) -> dict[str, Any]:
    if recipe is not None and data is None:
        return {role: recipe.resolve(getattr(recipe.data, role)) for role in _DATA_ROLES}
    if isinstance(data, DataSources):
        data = data.model_dump()
    if isinstance(data, dict) and set(data) <= set(_DATA_ROLES) and data:
        out = {role: data.get(role) for role in _DATA_ROLES}
    else:
        out = {"eval": data, "calibration": None, "train": None}
    if out["eval"] is None:
        raise OptionsError("tune needs evaluation data: data={'eval': 'eval.npz', ...} (--eval): the metric is measured on it")
    if out["calibration"] is None:
        out["calibration"] = out["eval"]  # NOTE: as ORT's and INC's tools do when no calibration set is given
    return out


@dataclass
class _Snapshot:
    """What the study holds for one trial, mirrored here: the run reads this, not the database."""

    number: int
    state: Any
    values: list[float] | None
    user_attrs: dict[str, Any]


class _Study:
    """The Optuna study plus the bookkeeping of one tune run.

    The run reads the study's trials once and then keeps its own mirror up to date as it writes
    (this run is the study's only writer): the driver does not query the database in its loop,
    only writes to it. SQLite runs in WAL mode with normal sync (a commit is not an fsync; a
    killed run still resumes from every committed write).
    """

    def __init__(self, storage: str, name: str, directions: list[str], objective: Objective, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        sampler = (optuna.samplers.NSGAIISampler(seed=seed, population_size=8) if objective == "both"
                   else optuna.samplers.TPESampler(seed=seed, n_startup_trials=6))
        try:
            store = _storage(optuna, storage)
            self.study = optuna.create_study(storage=store, study_name=name, directions=directions,  # type: ignore[arg-type]
                                             sampler=sampler, load_if_exists=True)
        except Exception as exc:
            raise ModelpressError(f"cannot open the study {name!r} in {storage!r}: {exc}") from None
        if list(self.study.directions) != [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE for d in directions]:
            raise OptionsError(f"study {name!r} in {storage!r} was made for another objective; use another --output/--storage or the same --objective")
        self.trials = {t.number: _Snapshot(t.number, t.state, list(t.values) if t.values else None, dict(t.user_attrs))
                       for t in self.study.get_trials(deepcopy=False)}

    def ask(self) -> Any:
        trial = self.study.ask()
        self.trials[trial.number] = _Snapshot(trial.number, self.optuna.trial.TrialState.RUNNING, None, {})
        return trial

    def set(self, trial: Any, **attrs: Any) -> None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        self.trials[trial.number].user_attrs.update(attrs)

    def tell(self, trial: Any, values: list[float] | None = None, state: Any = None) -> None:
        number = trial if isinstance(trial, int) else trial.number
        self.study.tell(trial, values, state=state)
        snapshot = self.trials[number]
        snapshot.state = state if state is not None else self.optuna.trial.TrialState.COMPLETE
        snapshot.values = list(values) if values is not None else None

    def recover(self) -> list[dict[str, Any]]:
        """Configurations to run again: trials a previous run left RUNNING (it was killed) or interrupted.

        Stale RUNNING trials are closed as failed; a configuration that has finished since is not repeated.
        """
        for t in list(self.trials.values()):
            if t.state == self.optuna.trial.TrialState.RUNNING:
                self.tell(t.number, state=self.optuna.trial.TrialState.FAIL)
        finished = {config_key(t.user_attrs.get("config") or {}) for t in self.finished()}
        again: dict[str, dict[str, Any]] = {}
        for t in self.trials.values():
            config = t.user_attrs.get("config")
            if config and t.user_attrs.get("status") in ("running", "interrupted") and config_key(config) not in finished:
                again[config_key(config)] = config
        return list(again.values())

    def finished(self) -> list[_Snapshot]:
        return [t for t in self.trials.values() if t.user_attrs.get("status") in ("ok", "failed", "pruned")]


def _storage(optuna: Any, url: str) -> Any:
    """An Optuna RDB storage; SQLite in WAL mode with normal sync (each trial is a dozen small commits)."""
    storage = optuna.storages.RDBStorage(url)
    if url.startswith("sqlite:"):
        from sqlalchemy import event

        def _pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        event.listen(storage.engine, "connect", _pragmas)
        storage.engine.dispose()  # NOTE: connections made before the listener reopen with the pragmas
    return storage


def tune(
    model: Any,
    *,
    objective: Objective = "size",
    data: Any = None,
    recipe: str | os.PathLike[str] | dict[str, Any] | Recipe | None = None,
    max_drop: float = 0.01,
    budget: int | str | dict[str, float] | None = None,
    metric: str | None = None,
    strategy: Strategy = "pareto",
    output: str | os.PathLike[str] = "modelpress-tune",
    workers: int | None = None,
    address: str | None = None,
    storage: str | None = None,
    study_name: str = "modelpress-tune",
    trial_timeout: float | None = None,
    trial_memory_mb: float | None = None,
    fresh_workers: bool = False,
    hopeless_drop: float | None = None,
    evaluate: dict[str, Any] | None = None,
    keep_trial_models: bool = False,
    show_progress: bool = True,
    seed: int = 0,
    registry: Registry | None = None,
) -> TuneResult:
    """Search compression configurations for the smallest / fastest model within ``max_drop``.

    ``data``: ``{"eval": ..., "calibration": ..., "train": ...}`` (paths, dicts of arrays, ...; one
    source alone is the evaluation data, also used for calibration). ``recipe``: a recipe whose
    options may be ``{search: ...}`` (else the default space of the installed methods that fit the
    model and data). ``budget``: trials (``30``) or time (``"20m"``), or ``{"trials":, "seconds":}``;
    default 20 trials. ``max_drop``: the largest allowed drop of the metric, on its scale
    (accuracy 0.01 = one point; for ``mse`` the largest allowed increase). Always returns: when the
    budget runs out, nothing meets the criterion or Ctrl-C is pressed, the best configuration so
    far (``meets`` says whether it meets) is exported, verified and reported in ``output``.
    Trials run in Ray worker processes kept from trial to trial (``fresh_workers=True``: a new
    process per trial; slower, same results).
    """
    registry = registry or get_registry()
    limits = _check_arguments(objective, strategy, max_drop, budget)
    parsed_recipe = load_recipe(recipe) if recipe is not None else None
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    inputs = _gather_inputs(model, data, parsed_recipe, metric, evaluate)
    settings = _Settings(objective, strategy, max_drop, hopeless_drop if hopeless_drop is not None else max(30 * max_drop, 0.3),
                         trial_timeout, trial_memory_mb, torch=_has_torch())
    space = _space(inputs, parsed_recipe, registry, settings.torch)  # NOTE: validated before Ray starts
    model_bytes = inputs.write(out)
    tracker = _open_study(storage or f"sqlite:///{(out / 'study.db').resolve()}", study_name, inputs.evaluate, objective, seed, out)
    executor = RayExecutor(workers, address, fresh_workers=fresh_workers)
    board = TrialBoard(enabled=show_progress, metric=inputs.evaluate.metric, objective=objective)
    stop_reason, interrupted = _run(tracker, space, executor, board, inputs, model_bytes, out, limits, settings)
    return _finish(out, tracker.study, inputs.evaluate, objective, max_drop, space, stop_reason, interrupted, keep_trial_models,
                   inputs.blobs, inputs.source)


def _check_arguments(objective: str, strategy: str, max_drop: float, budget: int | str | dict[str, float] | None) -> dict[str, float]:
    """The budget's limits (default 20 trials), after the arguments' checks."""
    if objective not in ("size", "latency", "both"):
        raise OptionsError(f"objective {objective!r}: use size, latency or both")
    if strategy not in ("pareto", "accuracy-first"):
        raise OptionsError(f"strategy {strategy!r}: use pareto or accuracy-first")
    if max_drop < 0:
        raise OptionsError(f"max_drop {max_drop!r} must be >= 0 (0.01 = one point of accuracy)")
    limits = budget if isinstance(budget, dict) else parse_budget(budget)
    return limits or {"trials": 20}


@dataclass
class _Settings:
    """How this run's trials run and are judged."""

    objective: Objective
    strategy: Strategy
    max_drop: float
    hopeless_drop: float
    trial_timeout: float | None
    trial_memory_mb: float | None
    torch: bool


@dataclass
class _Inputs:
    """The source model, the data as .npz bytes per role and the evaluation settings: what every trial gets."""

    source: Any
    blobs: dict[str, bytes | None]
    evaluate: Evaluate

    def write(self, out: Path) -> bytes:
        """Copies in ``out`` (the data under ``data/``, the model as ``source.onnx``) for the winning recipe; the model's bytes."""
        data_dir = out / "data"
        data_dir.mkdir(exist_ok=True)
        for role, blob in self.blobs.items():
            if blob is not None:
                _atomic_write(data_dir / f"{role}.npz", blob)
        model_bytes: bytes = self.source.to_proto().SerializeToString()
        _atomic_write(out / "source.onnx", model_bytes)
        return model_bytes


def _gather_inputs(model: Any, data: Any, recipe: Recipe | None, metric: str | None, evaluate: dict[str, Any] | None) -> _Inputs:
    from modelpress.plugin.loading import load

    source = load(model)
    sources = _data_sources(data, recipe)
    settings = {"metric": metric or (recipe.evaluate.metric if recipe else None), "batch_size": 1, "repeats": 10,
                "threads": 1, "max_samples": 2048}
    if recipe is not None:
        settings.update(recipe.evaluate.model_dump(exclude={"metric"}))
    settings.update(evaluate or {})
    blobs = {role: _npz_bytes(src, source.signature, role) if src is not None else None for role, src in sources.items()}
    if settings["metric"] is None:
        with np.load(io.BytesIO(blobs["eval"] or b"")) as npz:
            settings["metric"] = "accuracy" if "labels" in npz.files else "agreement"
    return _Inputs(source, blobs, Evaluate(**settings))


def _space(inputs: _Inputs, recipe: Recipe | None, registry: Registry, torch: bool) -> SearchSpace:
    if recipe is not None:
        return space_from_recipe(recipe, registry)
    labels = False
    if inputs.blobs["train"] is not None:
        with np.load(io.BytesIO(inputs.blobs["train"])) as npz:
            labels = "labels" in npz.files
    return default_space(inputs.source, registry, calibration=inputs.blobs["calibration"] is not None, train=inputs.blobs["train"] is not None,
                         torch=torch, labels=labels)


def _open_study(storage: str, name: str, evaluate_spec: Evaluate, objective: Objective, seed: int, out: Path) -> _Study:
    higher = evaluate_spec.metric not in METRICS_LOWER_IS_BETTER
    directions = ["maximize" if higher else "minimize"] + {"size": ["minimize"], "latency": ["minimize"], "both": ["minimize", "minimize"]}[objective]
    tracker = _Study(storage, name, directions, objective, seed)
    study = tracker.study
    if study.user_attrs.get("objective", objective) != objective:
        raise OptionsError(f"the study in {out} was run with --objective {study.user_attrs['objective']}; resume it with the same objective or use another output")
    study.set_user_attr("objective", objective)
    return tracker


def _run(tracker: _Study, space: SearchSpace, executor: RayExecutor, board: TrialBoard, inputs: _Inputs, model_bytes: bytes, out: Path,
         limits: dict[str, float], settings: _Settings) -> tuple[str, bool]:
    """Run trials until the budget or the space runs out, or Ctrl-C; why the study stopped, and whether Ctrl-C stopped it."""
    start = time.monotonic()
    runner: _Runner | None = None
    try:
        runner = _prepare(tracker, space, executor, board, inputs, model_bytes, out, settings)
        plan = Plan(space, runner.sensitivity, settings.strategy, tracker.recover(), tracker, runner)
        return _loop(plan, runner, executor, board, limits, start), False
    except KeyboardInterrupt:
        if runner is not None:
            runner.abandon("interrupted")
        return "interrupted (Ctrl-C); rerun the same command to resume", True
    finally:
        try:
            executor.shutdown()
        except Exception as exc:  # NOTE: Ctrl-C may have reached Ray's own processes too; the results are in the study
            board.log(f"Ray shutdown: {type(exc).__name__}: {exc}")


def _prepare(tracker: _Study, space: SearchSpace, executor: RayExecutor, board: TrialBoard, inputs: _Inputs, model_bytes: bytes, out: Path,
             settings: _Settings) -> _Runner:
    """Send the model and data to Ray, measure the baseline (and the sensitivity ranking) while the workers warm up."""
    study = tracker.study
    model_ref = executor.put(model_bytes)
    data_refs = {role: executor.put(blob) if blob is not None else None for role, blob in inputs.blobs.items()}
    # NOTE: the sensitivity job and the workers' imports run while this process measures the baseline
    measuring = _start_sensitivity(study, space, executor, model_ref, data_refs, board)
    executor.warm_up(executor.workers - (measuring is not None), prepare_worker, settings.torch and inputs.blobs["train"] is not None)
    baseline = study.user_attrs.get("baseline") or _measure_baseline(out, inputs.evaluate)
    study.set_user_attr("baseline", baseline)
    sensitivity = _sensitivity(study, space, executor, measuring, board)
    return _Runner(tracker, space, sensitivity, executor, board, session=uuid.uuid4().hex[:8], out=out,
                   submit_args=dict(model=model_ref, data=data_refs, evaluate=inputs.evaluate.model_dump(), baseline=baseline["metric"],
                                    hopeless_drop=settings.hopeless_drop),
                   trial_timeout=settings.trial_timeout, trial_memory_mb=settings.trial_memory_mb, max_drop=settings.max_drop,
                   metric_name=inputs.evaluate.metric, objective=settings.objective)


def _loop(plan: Plan, runner: _Runner, executor: RayExecutor, board: TrialBoard, limits: dict[str, float], start: float) -> str:
    """Keep the workers busy until a budget or the plan runs out; why it stopped."""
    deadline = start + limits["seconds"] if "seconds" in limits else None
    max_trials = int(limits.get("trials", 10**9))
    with board:
        while True:
            done = len(runner.tracker.finished())
            if deadline is not None and time.monotonic() >= deadline:
                runner.abandon("cancelled: the time budget ran out")
                return f"time budget ({limits['seconds']:.0f}s) used"
            budget_left = max_trials - done - len(executor.running)
            while budget_left > 0 and len(executor.running) < executor.workers and not plan.exhausted:
                if plan.submit_next():
                    budget_left -= 1
                elif not plan.queue and plan.strategy == "accuracy-first":
                    break
            if not executor.running:
                return f"trial budget ({max_trials}) used" if done >= max_trials else (plan.why_stopped or "search space exhausted")
            # NOTE: blocks until a trial ends (or a time limit is up); wakes every second for Ctrl-C and the live table
            runner.collect(executor.wait(1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))))
            if board.live is not None:
                board.refresh(runner.records(), len(executor.running), time.monotonic() - start)


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _atomic_write(path: Path, blob: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def _eval_data(out: Path, evaluate_spec: Evaluate) -> tuple[Any, Any]:
    """The source model and the evaluation data, from the copies in ``out``."""
    from modelpress.data.samples import load_dataset
    from modelpress.plugin.loading import load

    source = load(out / "source.onnx")
    return source, load_dataset(out / "data" / "eval.npz", source.signature, what="evaluation").take(evaluate_spec.max_samples)


def _evaluator(out: Path, evaluate_spec: Evaluate) -> Any:
    from modelpress.app.compress import _Evaluator

    source, eval_data = _eval_data(out, evaluate_spec)
    recipe = Recipe(passes=[{"kind": "quantize", "method": "fp16"}], evaluate=evaluate_spec)  # type: ignore[list-item]
    return _Evaluator(recipe, source, eval_data)


def _measure_baseline(out: Path, evaluate_spec: Evaluate) -> dict[str, Any]:
    from modelpress.app.compress import measure_latency

    evaluator = _evaluator(out, evaluate_spec)
    path = out / "source.onnx"
    return {"metric": evaluator.metric(path), "size_bytes": path.stat().st_size,
            "latency_ms": measure_latency(path, evaluator.latency_feeds["b1"], threads=evaluate_spec.threads, repeats=evaluate_spec.repeats)}


def measure_sensitivity(model: bytes, calibration: bytes) -> list[str]:
    """Nodes ranked by their quantization sensitivity (int8-static's per-node measurement)."""
    import tempfile

    from modelpress.app.pipeline import apply
    from modelpress.plugin.loading import load

    with tempfile.TemporaryDirectory(prefix="modelpress-sensitivity-") as tmp:
        Path(tmp, "c.npz").write_bytes(calibration)
        # NOTE: unreachable targets make int8-static measure every node alone
        # NOTE: the weighted layers only, on a few samples: a ranking needs no more, and it runs once per node
        result = apply(load(model), "int8-static", kind="quantize", calibration=Path(tmp, "c.npz"), show_progress=False, allow_no_gain=True,
                       options={"min_cosine": 1.0, "min_agreement": 1.0, "max_samples": 16, "elementwise_ops": [], "activation_matmuls": False})
    ranking = result.provenance.passes[-1].figures.get("sensitivity", {})
    return sorted(ranking, key=lambda n: ranking[n], reverse=True)


def _start_sensitivity(study: Any, space: SearchSpace, executor: RayExecutor, model_ref: Any, data_refs: dict[str, Any], board: TrialBoard) -> Any:
    """Submit the per-node sensitivity measurement when the space falls back along it and the study has none yet."""
    if not any(p.has_fallback for p in space.pipelines) or "sensitivity" in study.user_attrs:
        return None
    if data_refs.get("calibration") is None:
        raise OptionsError("the search space falls back along quantization sensitivity: it needs calibration data (--calib)")
    board.log("measuring per-node quantization sensitivity (once per study)")
    return executor.submit("sensitivity", measure_sensitivity, model_ref, data_refs["calibration"])


def _sensitivity(study: Any, space: SearchSpace, executor: RayExecutor, measuring: Any, board: TrialBoard) -> dict[str, list[str]]:
    needs = [p.name for p in space.pipelines if p.has_fallback]
    if not needs:
        return {}
    if measuring is not None:
        outcomes: list[Any] = []
        while not outcomes:
            outcomes = executor.wait(1.0)
        outcome = outcomes[0]
        ranking = outcome.value if outcome.ok else []
        if not outcome.ok:
            board.log(f"sensitivity measurement failed ({outcome.error}); fallback steps keep no node in float")
        study.set_user_attr("sensitivity", ranking)
    ranking = list(study.user_attrs["sensitivity"])
    return {name: ranking for name in needs}


class _Runner:
    """Submits configurations as trials and records their outcomes in the study."""

    def __init__(self, tracker: _Study, space: SearchSpace, sensitivity: dict[str, list[str]], executor: RayExecutor, board: TrialBoard,
                 *, session: str, out: Path, submit_args: dict[str, Any], trial_timeout: float | None, trial_memory_mb: float | None,
                 max_drop: float, metric_name: str, objective: str):
        self.tracker, self.space, self.sensitivity, self.executor, self.board = tracker, space, sensitivity, executor, board
        self.session, self.out, self.submit_args = session, out, submit_args
        self.trial_timeout, self.trial_memory_mb, self.max_drop, self.metric_name = trial_timeout, trial_memory_mb, max_drop, metric_name
        self.objective = objective
        self.live: dict[int, Any] = {}
        (out / "trials").mkdir(exist_ok=True)

    def _done_with(self, config: dict[str, Any]) -> Any:
        key = config_key(config)
        for t in self.tracker.finished():
            if t.user_attrs.get("status") in ("ok", "pruned") and config_key(t.user_attrs.get("config") or {}) == key:
                return t
        return None

    def submit(self, fixed: dict[str, Any] | None = None) -> bool:
        """Start a trial (``fixed``: this configuration, else the sampler's); False if it repeated a finished one."""
        tracker = self.tracker
        if fixed:
            tracker.study.enqueue_trial({k: _encode(v) for k, v in fixed.items() if k != "pipeline" or len(self.space.pipelines) > 1})
        trial = tracker.ask()
        config = self.space.suggest(trial, self.sensitivity)
        if any(config_key(tracker.trials[n].user_attrs.get("config") or {}) == config_key(config) for n in self.live):
            tracker.set(trial, config=config, status="duplicate")  # NOTE: the same configuration is running right now
            tracker.tell(trial, state=optuna_state(tracker, "FAIL"))
            return False
        earlier = self._done_with(config)
        if earlier is not None:  # NOTE: samplers re-propose tried points in small spaces: reuse, don't rerun
            tracker.set(trial, config=config, status="duplicate", duplicate_of=earlier.number)
            if earlier.state == optuna_state(tracker, "COMPLETE"):
                tracker.tell(trial, list(earlier.values or []))
            else:
                tracker.tell(trial, state=earlier.state)
            return False
        passes = [p.model_dump(exclude_none=True) for p in self.space.passes(config, self.sensitivity)]
        tracker.set(trial, config=config, passes=passes, status="running", session=self.session)
        self.live[trial.number] = trial
        self.executor.submit(trial.number, run_trial, passes=passes, timeout_s=self.trial_timeout, memory_mb=self.trial_memory_mb, **self.submit_args)
        self.board.started(trial.number, config)
        return True

    def collect(self, outcomes: list[Any]) -> None:
        tracker = self.tracker
        states = tracker.optuna.trial.TrialState
        for outcome in outcomes:
            trial = self.live.pop(outcome.job.key)
            value = outcome.value if outcome.ok else None
            timing = {}
            if outcome.timing:
                timing = {"timing": {**{k: v for k, v in outcome.timing.items() if k not in ("began", "ended")},
                                     "phases": (value or {}).get("phases", {})}}
            if value is None:
                tracker.set(trial, seconds=round(outcome.seconds, 3), **timing, error=outcome.error, status="failed")
                tracker.tell(trial, state=states.FAIL)
            elif value["status"] == "pruned":
                tracker.set(trial, seconds=round(outcome.seconds, 3), **timing, metric=value["metric"], error=value["reason"], status="pruned")
                tracker.tell(trial, state=states.PRUNED)
            else:
                _atomic_write(self.out / "trials" / f"trial-{trial.number:04d}.onnx", value["model"])
                figures = json.loads(json.dumps(_slim(value["figures"]), default=str))
                tracker.set(trial, seconds=round(outcome.seconds, 3), **timing, **{k: value[k] for k in ("metric", "size_bytes", "latency_ms", "parameters")},
                            figures=figures, status="ok")
                objectives = {"size": [value["size_bytes"] / 1e6], "latency": [value["latency_ms"]],
                              "both": [value["size_bytes"] / 1e6, value["latency_ms"]]}[self.objective]
                tracker.tell(trial, [value["metric"], *objectives])
            self.board.finished(_record(tracker.trials[trial.number], self.submit_args["baseline"], self.metric_name, self.max_drop))

    def abandon(self, why: str) -> None:
        optuna = self.tracker.optuna
        for job in self.executor.cancel_all():
            trial = self.live.pop(job.key, None)
            if trial is not None:
                self.tracker.set(trial, status="interrupted", error=why)
                self.tracker.tell(trial, state=optuna.trial.TrialState.FAIL)

    def records(self) -> list[TrialRecord]:
        base = self.submit_args["baseline"]
        return [_record(t, base, self.metric_name, self.max_drop) for t in self.tracker.trials.values()
                if t.user_attrs.get("status") not in (None, "running", "duplicate")]


def optuna_state(tracker: _Study, name: str) -> Any:
    return getattr(tracker.optuna.trial.TrialState, name)


def _slim(figures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pass figures without the bulky per-node tables."""
    return [{k: v for k, v in f.items() if k not in ("sensitivity", "float_nodes", "layers")} for f in figures]


def _record(t: Any, baseline: float, metric_name: str, max_drop: float) -> TrialRecord:
    attrs = t.user_attrs
    metric = attrs.get("metric")
    d = drop(metric_name, baseline, metric) if metric is not None else None
    return TrialRecord(
        number=t.number, status=attrs.get("status", "failed"), pipeline=str((attrs.get("config") or {}).get("pipeline", "")),
        config=attrs.get("config") or {}, passes=attrs.get("passes") or [], metric=metric, drop=d,
        meets=attrs.get("status") == "ok" and d is not None and d <= max_drop + 1e-12,
        size_bytes=attrs.get("size_bytes"), latency_ms=attrs.get("latency_ms"), seconds=attrs.get("seconds"),
        error=attrs.get("error", ""), session=attrs.get("session", ""), figures=attrs.get("figures") or [], timing=attrs.get("timing") or {},
    )


def _finish(out: Path, study: Any, evaluate_spec: Evaluate, objective: str, max_drop: float, space: SearchSpace, stop_reason: str,
            interrupted: bool, keep_trial_models: bool, blobs: dict[str, bytes | None], source: Any) -> TuneResult:
    """Pick the best, export and verify it, write its recipe and the report (always)."""
    from modelpress.app.compress import measure_latency
    from modelpress.io.export import export
    from modelpress.plugin.loading import load

    baseline = study.user_attrs.get("baseline") or {"metric": float("nan"), "size_bytes": 1, "latency_ms": 1.0}
    records = [_record(t, baseline["metric"], evaluate_spec.metric, max_drop) for t in study.get_trials(deepcopy=False)
               if t.user_attrs.get("status") not in (None, "running", "duplicate")]
    front = pareto_front(records, objective, higher_is_better=evaluate_spec.metric not in METRICS_LOWER_IS_BETTER)
    best = pick_best(records, objective, baseline)
    model_path = recipe_path = None
    verification = ""
    if best is not None:
        # NOTE: the evaluation data only (the metric is the trial's): no run of the source model over all of it
        _, eval_data = _eval_data(out, evaluate_spec)
        model_path = out / "best.onnx"
        exported = export(load(out / "trials" / f"trial-{best.number:04d}.onnx"), model_path, sample=eval_data.take(64), reference=source)
        verification = exported.verification.summary() if exported.verification is not None else ""
        first = {name: array[:1] for name, array in eval_data.inputs.items()}  # NOTE: the trials' latency input (batch 1)
        best.latency_alone_ms = measure_latency(model_path, first, threads=evaluate_spec.threads, repeats=evaluate_spec.repeats)
        recipe_path = out / "best-recipe.yaml"
        _write_recipe(recipe_path, best.passes, blobs, evaluate_spec)
    if not keep_trial_models:
        keep = {r.number for r in front} | ({best.number} if best else set())
        for path in (out / "trials").glob("trial-*.onnx"):
            if int(path.stem.split("-")[1]) not in keep:
                path.unlink()
    status = stop_reason + ("" if best is None else (" — best meets the criterion" if best.meets else " — no configuration met the criterion; best by metric shown"))
    report = TuneReport(title=f"modelpress tune: {source.name}", metric=evaluate_spec.metric, objective=objective, max_drop=max_drop,
                        baseline=baseline, trials=records, pareto=front, best=best, status=status, verification=verification,
                        space=space.describe(), notes=space.notes)
    report.write(out)
    return TuneResult(best=best, meets=bool(best and best.meets), baseline=baseline, trials=records, pareto=front, output=out,
                      model_path=model_path, recipe_path=recipe_path, report=report, stop_reason=stop_reason, interrupted=interrupted,
                      space=space.describe())


def _write_recipe(path: Path, passes: list[dict[str, Any]], blobs: dict[str, bytes | None], evaluate_spec: Evaluate) -> None:
    import yaml

    recipe = {
        "passes": passes,
        "data": {role: f"data/{role}.npz" for role, blob in blobs.items() if blob is not None},
        "evaluate": evaluate_spec.model_dump(),
    }
    load_recipe(recipe)  # NOTE: what we write must load
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("# written by modelpress tune: `modelpress compress source.onnx --recipe best-recipe.yaml -o out.onnx` reproduces best.onnx\n"
                   + yaml.safe_dump(recipe, sort_keys=False))
    os.replace(tmp, path)
