"""``modelpress.tune``: search compression configurations on Ray, stored in an Optuna study.

Flow: import the model and materialise the data in ``output/data`` (every trial, and the winning
recipe, use those files) -> measure the source (the baseline) -> measure the per-node sensitivity
ranking once when the space falls back along it (:mod:`.sensitivity`) -> run trials on the executor
(:mod:`.runner`), each told to the Optuna study (:mod:`.store`) as it finishes -> pick the best,
export and verify it, write its recipe and the report (:mod:`.finish`). The steps share one
:class:`~modelpress.app.tuning.inputs.TuneRun`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from modelpress.app.recipe import Recipe, load_recipe
from modelpress.app.tuning.defaults import default_space
from modelpress.app.tuning.executor import RayExecutor
from modelpress.app.tuning.finish import TuneResult, finish, measure_baseline
from modelpress.app.tuning.inputs import Inputs, Settings, TuneRun, gather_inputs
from modelpress.app.tuning.progress import TrialBoard
from modelpress.app.tuning.runner import Runner
from modelpress.app.tuning.sensitivity import collect_rankings, start_rankings
from modelpress.app.tuning.space import SearchSpace, space_from_recipe
from modelpress.app.tuning.store import Objective, open_study
from modelpress.app.tuning.strategy import Plan, Strategy
from modelpress.app.tuning.trial import prepare_worker
from modelpress.base.errors import OptionsError
from modelpress.plugin.registry import Registry, get_registry

__all__ = ["TuneResult", "parse_budget", "tune"]


def parse_budget(text: str | int | float | None) -> dict[str, float]:
    """``20`` / ``"20"`` -> 20 trials; ``"20m"``, ``"90s"``, ``"1.5h"`` -> seconds."""
    if text is None:
        return {}
    if isinstance(text, (int, float)):
        return {"trials": int(text)}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|min|h)?\s*", str(text))
    if not match:
        raise OptionsError(
            f"budget {text!r}: give a number of trials (20) or a time (90s, 20m, 1.5h)"
        )
    value, unit = float(match.group(1)), match.group(2)
    if unit is None:
        return {"trials": int(value)}
    return {"seconds": value * {"s": 1, "m": 60, "min": 60, "h": 3600}[unit]}


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
    trial_retries: int = 1,
    fresh_workers: bool = False,
    hopeless_drop: float | None = None,
    evaluate: dict[str, Any] | None = None,
    keep_trial_models: bool = False,
    show_progress: bool = True,
    seed: int = 0,
    registry: Registry | None = None,
    accept_loss: bool = False,
    dashboard: bool = False,
) -> TuneResult:
    """Search compression configurations for the smallest / fastest model within ``max_drop``.

    ``data``: ``{"eval": ..., "calibration": ..., "train": ...}`` (paths, dicts of arrays, ...; one
    source alone is the evaluation data, also used for calibration). ``recipe``: a recipe whose
    options may be ``{search: ...}`` (else the default space: every installed method that declares
    a search and fits the model and data; the report lists the others and why). ``budget``: trials
    (``30``) or time (``"20m"``), or ``{"trials":, "seconds":}``; default 20 trials. ``max_drop``:
    the largest allowed drop of the metric, on its scale (accuracy 0.01 = one point; for ``mse`` the
    largest allowed increase). Always returns: when the budget runs out, nothing meets the criterion
    or Ctrl-C is pressed, the best configuration so far (``meets`` says whether it meets) is
    exported, verified and reported in ``output``. Trials run in Ray worker processes kept from
    trial to trial (``fresh_workers=True``: a new process per trial; slower, same results). Trials are
    judged by ``max_drop``, not refused at their verification floor (a miss is recorded); the best model
    is written only if it meets its floor, unless ``accept_loss`` (:class:`~modelpress.AccuracyLossError`).
    ``storage``: an Optuna storage URL (default SQLite in ``output``); drivers on one study in a shared
    database (``postgresql://``) run each configuration once and see each other's trials. ``dashboard``: serve
    the study with optuna-dashboard on 127.0.0.1 while it runs (its address is printed and in the report).
    ``address``: a Ray cluster to run on (else a local Ray instance); a trial lost with its node is recorded as failed
    ("node lost") and run again on a live node, up to ``trial_retries`` times.
    """
    registry = registry or get_registry()
    if trial_retries < 0:
        raise OptionsError(
            f"trial_retries {trial_retries!r} must be >= 0 (how many times a trial lost with its node runs again)"
        )
    limits = _check_arguments(objective, strategy, max_drop, budget)
    parsed_recipe = load_recipe(recipe) if recipe is not None else None
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    inputs = gather_inputs(model, data, parsed_recipe, metric, evaluate)
    settings = Settings(
        objective,
        strategy,
        max_drop,
        hopeless_drop if hopeless_drop is not None else max(30 * max_drop, 0.3),
        trial_timeout,
        trial_memory_mb,
        torch=_has_torch(),
        keep_trial_models=keep_trial_models,
        accept_loss=accept_loss,
        trial_retries=trial_retries,
    )
    space = _space(
        inputs, parsed_recipe, registry, settings.torch
    )  # NOTE: validated before Ray starts
    model_bytes = inputs.write(out)
    store = open_study(
        storage or f"sqlite:///{(out / 'study.db').resolve()}",
        study_name,
        inputs.evaluate.metric,
        objective,
        seed,
        out,
    )
    run = TuneRun(
        out,
        inputs,
        settings,
        space,
        store,
        RayExecutor(workers, address, fresh_workers=fresh_workers),
        TrialBoard(enabled=show_progress, metric=inputs.evaluate.metric, objective=objective),
        registry,
        limits,
        model_bytes,
    )
    view = _start_dashboard(run, study_name) if dashboard else None
    try:
        stop_reason, interrupted = _run(run)
        return finish(run, stop_reason, interrupted)
    finally:
        store.close()
        if view is not None:
            view.stop()


def _start_dashboard(run: TuneRun, study_name: str) -> Any:
    from modelpress.app.tuning.dashboard import Dashboard

    try:
        view = Dashboard(run.store.url).start()
        run.dashboard = view.url(study_name)
    except BaseException:
        run.store.close()
        raise
    print(
        f"modelpress tune: dashboard at {run.dashboard} (while the study runs; `modelpress dashboard {run.out}` serves it after)",
        file=sys.stderr,
        flush=True,
    )
    return view


def _check_arguments(
    objective: str, strategy: str, max_drop: float, budget: int | str | dict[str, float] | None
) -> dict[str, float]:
    """The budget's limits (default 20 trials), after the arguments' checks."""
    if objective not in ("size", "latency", "both"):
        raise OptionsError(f"objective {objective!r}: use size, latency or both")
    if strategy not in ("pareto", "accuracy-first"):
        raise OptionsError(f"strategy {strategy!r}: use pareto or accuracy-first")
    if max_drop < 0:
        raise OptionsError(f"max_drop {max_drop!r} must be >= 0 (0.01 = one point of accuracy)")
    limits = budget if isinstance(budget, dict) else parse_budget(budget)
    return limits or {"trials": 20}


def _space(inputs: Inputs, recipe: Recipe | None, registry: Registry, torch: bool) -> SearchSpace:
    if recipe is not None:
        return space_from_recipe(recipe, registry)
    blobs = inputs.blobs
    return default_space(
        inputs.source,
        registry,
        calibration=blobs["calibration"] is not None,
        train=blobs["train"] is not None,
        torch=torch,
        labels=inputs.has_labels("train"),
        evaluation=blobs["eval"] is not None,
    )


def _run(run: TuneRun) -> tuple[str, bool]:
    """Run trials until the budget or the space runs out, or Ctrl-C; why the study stopped, and whether Ctrl-C stopped it."""
    start = time.monotonic()
    runner: Runner | None = None
    try:
        runner = _prepare(run)
        plan = Plan(runner, run.store.recover())
        return _loop(run, plan, runner, start), False
    except KeyboardInterrupt:
        if runner is not None:
            runner.abandon("interrupted", cancel=False)
        return "interrupted (Ctrl-C); rerun the same command to resume", True
    finally:
        try:
            run.executor.shutdown()
        except Exception as exc:  # NOTE: Ctrl-C may have reached Ray's own processes too; the results are in the study
            run.board.log(f"Ray shutdown: {type(exc).__name__}: {exc}")


def _prepare(run: TuneRun) -> Runner:
    """Send the model and data to Ray, measure the baseline (and the sensitivity rankings) while the workers warm up."""
    study, executor, inputs = run.store.study, run.executor, run.inputs
    model_ref = executor.put(run.model_bytes)
    data_refs = {
        role: executor.put(blob) if blob is not None else None
        for role, blob in inputs.blobs.items()
    }
    plugins = run.registry.local_plugins()
    # NOTE: the ranking jobs and the workers' imports run while this process measures the baseline
    ranking_jobs = start_rankings(run, model_ref, data_refs, plugins)
    executor.warm_up(
        executor.workers - len(ranking_jobs),
        prepare_worker,
        run.settings.torch and inputs.blobs["train"] is not None,
    )
    baseline = study.user_attrs.get("baseline") or measure_baseline(run.out, inputs.evaluate)
    study.set_user_attr("baseline", baseline)
    sensitivity = collect_rankings(run, ranking_jobs)
    return Runner(
        run,
        sensitivity,
        dict(
            model=model_ref,
            data=data_refs,
            evaluate=inputs.evaluate.model_dump(),
            baseline=baseline["metric"],
            hopeless_drop=run.settings.hopeless_drop,
            plugins=plugins,
        ),
    )


def _loop(run: TuneRun, plan: Plan, runner: Runner, start: float) -> str:
    """Keep the workers busy until a budget or the plan runs out; why it stopped."""
    executor, board, limits = run.executor, run.board, run.limits
    deadline = start + limits["seconds"] if "seconds" in limits else None
    max_trials = int(limits.get("trials", 10**9))
    with board:
        while True:
            done = len(run.store.finished())
            if deadline is not None and time.monotonic() >= deadline:
                runner.abandon("cancelled: the time budget ran out")
                return f"time budget ({limits['seconds']:.0f}s) used"
            plan.queue += (
                run.store.sync()
            )  # NOTE: with other drivers on the study: their results, and the trials of lost ones
            budget_left = max_trials - done - len(executor.running) - run.store.running_elsewhere()
            while (
                budget_left > 0 and len(executor.running) < executor.workers and not plan.exhausted
            ):
                if plan.submit_next():
                    budget_left -= 1
                elif not plan.queue and plan.strategy == "accuracy-first":
                    break
            if not executor.running and (
                done >= max_trials or plan.exhausted or not run.store.running_elsewhere()
            ):
                return (
                    f"trial budget ({max_trials}) used"
                    if done >= max_trials
                    else (plan.why_stopped or "search space exhausted")
                )
            if not executor.running:  # NOTE: the budget waits on other drivers' trials: they may fail and leave it to this one
                time.sleep(1.0)
                continue
            # NOTE: blocks until a trial ends (or a time limit is up); wakes every second for Ctrl-C and the live table
            runner.collect(
                executor.wait(
                    1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
                )
            )
            if board.live is not None:
                board.refresh(runner.records(), len(executor.running), time.monotonic() - start)


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None
