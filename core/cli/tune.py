"""``modelpress tune``: a thin front of :func:`modelpress.tune` (the search lives in ``modelpress.app.tuning``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from modelpress.cli.common import (
    EXIT_INTERRUPTED,
    Command,
    add_seq_len_argument,
    add_task_argument,
    console,
    load_options,
    print_result_line,
)
from modelpress.cli.compress import ACCEPT_LOSS_HELP

__all__ = ["COMMANDS"]


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="input model")
    p.add_argument(
        "--eval",
        help=".npz evaluation data (`labels` for the accuracy metric), or a .txt/.jsonl corpus for a Hugging Face checkpoint "
        "(default for a --calib corpus: the part held out of its calibration)",
    )
    p.add_argument(
        "--calib",
        help=".npz calibration data (default: the evaluation data), or a .txt/.jsonl corpus for a Hugging Face checkpoint",
    )
    add_seq_len_argument(p)
    add_task_argument(p)
    p.add_argument("--train", help=".npz training data: enables fine-tuning, distillation")
    p.add_argument(
        "--recipe",
        help="recipe whose options may be {search: [choices]} or {search: {low, high, step}} (replaces the default space)",
    )
    p.add_argument(
        "--max-drop", default="1%", help="largest allowed metric drop: 1%% or 0.01 (default 1%%)"
    )
    p.add_argument(
        "--metric",
        help="accuracy (default with labels), agreement (default without), cosine, mse or pkg.module:function",
    )
    _search_arguments(p)
    _runner_arguments(p)
    p.add_argument("--accept-loss", action="store_true", help=ACCEPT_LOSS_HELP)
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output folder (best.onnx, best-recipe.yaml, report.md/.json/.html, study.db)",
    )


def _search_arguments(p: argparse.ArgumentParser) -> None:
    """What the search minimises, how, and for how long."""
    p.add_argument(
        "--objective",
        choices=("size", "latency", "both"),
        default="size",
        help="what to minimise (default size)",
    )
    p.add_argument(
        "--strategy",
        choices=("pareto", "accuracy-first"),
        default="pareto",
        help="pareto: Optuna TPE (NSGA-II for both) over the space; accuracy-first: most aggressive first, then fall back",
    )
    p.add_argument(
        "--trials", type=int, help="trial budget (default 20; counts trials of a resumed study)"
    )
    p.add_argument(
        "--time",
        help="time budget for this run, e.g. 90s, 20m, 1.5h (a bare number is seconds); with --trials, whichever runs out first",
    )


def _runner_arguments(p: argparse.ArgumentParser) -> None:
    """Where the trials run and where the study is kept."""
    p.add_argument(
        "--workers",
        type=int,
        help="trials in parallel (Ray local CPUs; default: the machine's cores)",
    )
    p.add_argument(
        "--address",
        help="attach to a Ray cluster (HOST:PORT of its head, or ray://HOST:PORT) instead of starting one",
    )
    p.add_argument(
        "--fresh-workers",
        action="store_true",
        help="run every trial in a new worker process (default: workers are kept between trials, imports paid once)",
    )
    p.add_argument(
        "--storage",
        help="Optuna storage URL (default sqlite:///OUT_DIR/study.db); postgresql://USER@HOST/DB: a study "
        "several drivers (machines) share, each configuration run once",
    )
    p.add_argument("--study-name", default="modelpress-tune", help="study name inside the storage")
    p.add_argument(
        "--dashboard",
        action="store_true",
        help="serve the study live with optuna-dashboard on 127.0.0.1 (a free port, printed)",
    )
    p.add_argument(
        "--trial-timeout",
        help="time limit per trial (e.g. 10m; a bare number is seconds); a trial over it is recorded as failed",
    )
    p.add_argument(
        "--trial-memory",
        help="memory limit per trial (e.g. 4GB); a trial over it is recorded as failed",
    )
    p.add_argument(
        "--trial-retries",
        type=int,
        default=1,
        help="times a trial lost with its Ray node (the node died) runs again on a live node (default 1); it is recorded as failed, 'node lost'",
    )
    p.add_argument(
        "--keep-trial-models",
        action="store_true",
        help="keep every trial's model (default: the Pareto front and the best)",
    )


def _fraction(text: str) -> float:
    from modelpress.base.errors import OptionsError

    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise OptionsError(
            f"--max-drop {text!r}: give a fraction (0.01) or a percentage (1%)"
        ) from None


def _megabytes(text: str) -> float:
    from modelpress.base.errors import OptionsError

    units = {"k": 1 / 1024, "m": 1, "g": 1024}
    t = text.strip().lower().rstrip("b")
    try:
        return float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise OptionsError(f"--trial-memory {text!r}: give a size like 4GB or 1500MB") from None


def _seconds(text: str, flag: str) -> float:
    """A duration option: ``90s``, ``20m``, ``1.5h``, or a bare number of seconds (never a trial count)."""
    from modelpress.app.tuning import parse_budget
    from modelpress.base.errors import OptionsError

    try:
        limits = parse_budget(text)
    except OptionsError:
        raise OptionsError(
            f"{flag} {text!r}: give a time like 90s, 20m or 1.5h (a bare number is seconds)"
        ) from None
    return limits.get("seconds", limits.get("trials", 0.0))


def _budget(args: argparse.Namespace) -> dict[str, float]:
    # NOTE: --time 300 is 300 seconds; parse_budget alone reads a bare number as trials (it once replaced --trials 4 by 300 trials)
    if args.time is not None:
        return {
            **({"trials": args.trials} if args.trials is not None else {}),
            "seconds": _seconds(args.time, "--time"),
        }
    return {"trials": args.trials if args.trials is not None else 20}


def run(args: argparse.Namespace) -> int:
    import modelpress
    from modelpress.app.tuning import tune
    from modelpress.base.errors import OptionsError

    data = (
        None
        if args.recipe and not args.eval
        else {
            "eval": args.eval,
            "calibration": args.calib,
            "train": args.train,
            "sequence_length": args.seq_len,
        }
    )
    if data is not None and not args.eval and not args.calib:
        raise OptionsError(
            "tune needs --eval data (arrays named after the model inputs, `labels` for accuracy), or a --recipe with data.eval"
        )
    timeout = _seconds(args.trial_timeout, "--trial-timeout") if args.trial_timeout else None
    model = (
        modelpress.load(args.model, **load_options(args)) if args.task else args.model
    )  # NOTE: --task: what a checkpoint is exported for
    result = tune(
        model,
        objective=args.objective,
        data=data,
        recipe=args.recipe,
        max_drop=_fraction(args.max_drop),
        budget=_budget(args),
        metric=args.metric,
        strategy=args.strategy,
        output=args.output,
        workers=args.workers,
        address=args.address,
        fresh_workers=args.fresh_workers,
        storage=args.storage,
        study_name=args.study_name,
        trial_timeout=timeout,
        trial_memory_mb=_megabytes(args.trial_memory) if args.trial_memory else None,
        trial_retries=args.trial_retries,
        keep_trial_models=args.keep_trial_models,
        show_progress=not args.quiet,
        accept_loss=args.accept_loss,
        dashboard=args.dashboard,
    )
    print_result(result, args.output, quiet=args.quiet)
    return EXIT_INTERRUPTED if result.interrupted else 0


def print_result(result: Any, output: str, *, quiet: bool = False) -> None:
    """The trials table at the terminal's width (piped: $COLUMNS or 80, as the other tables), then the
    result line; ``quiet`` (-q): the result line only."""
    if not quiet:
        console().print(result.report.table())
    if result.model_path is not None:
        line = (
            f"best model: {result.model_path} ({'meets' if result.meets else 'does NOT meet'} the criterion); "
            f"recipe: {result.recipe_path}; reports: {Path(output) / 'report.html'} (.md, .json)"
        )
    else:
        line = f"no trial completed; reports: {Path(output) / 'report.html'}"
    print_result_line(console(), line, quiet=quiet)


COMMANDS = (
    Command(
        "tune",
        "search compression configurations for the smallest/fastest model within an accuracy drop (on Ray)",
        arguments,
        run,
        "Try compression configurations (a default space from the installed methods that fit MODEL and the data, or a "
        "recipe with `search:` options) as Ray tasks; keep the best that loses at most --max-drop of the metric. Always writes the best "
        "so far (labelled meets / does not meet), its recipe, the Pareto front and every trial to OUT_DIR. Rerun to resume.",
    ),
)
