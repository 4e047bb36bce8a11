"""``modelpress compress`` (a recipe on one model or a batch), ``demo`` and ``recipe-schema``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from modelpress.cli.common import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXTERNAL,
    Command,
    add_overwrite_argument,
    add_seq_len_argument,
    add_task_argument,
    add_writing_arguments,
    console,
    load_options,
    print_result_line,
    refuse_overwrite,
)

__all__ = ["COMMANDS", "print_report"]

ACCEPT_LOSS_HELP = "write results that miss their accuracy criteria (otherwise exit 4)"


def compress_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        nargs="+",
        help="input model; several models (or --workers) make a batch job: -o is then a folder",
    )
    p.add_argument(
        "-r",
        "--recipe",
        required=True,
        help="recipe file (.yaml or .json); see `modelpress recipe-schema`",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="final .onnx path; each stage goes to <stem>-stages/ (batch: an output folder, one subfolder per model)",
    )
    p.add_argument(
        "--report-dir", help="folder for report.md/.json/.html (default: the output's folder)"
    )
    p.add_argument(
        "--no-imports",
        action="store_true",
        help="for recipes you did not write: a recipe is code (pkg.module:function entries are imported and run); "
        "refuse such entries and data paths outside the recipe's folder",
    )
    p.add_argument(
        "--sample",
        help=".npz inputs for each stage's verification run (default: the recipe's evaluation data, else generated)",
    )
    add_writing_arguments(p)
    add_overwrite_argument(p)
    p.add_argument(
        "--allow-no-gain",
        action="store_true",
        help="continue past a stage whose result is not smaller / unchanged (flagged in the report; default: stop, exit 1)",
    )
    p.add_argument("--accept-loss", action="store_true", help=ACCEPT_LOSS_HELP)
    p.add_argument(
        "--workers",
        type=int,
        help="batch: models compressed in parallel (Ray local, default: the machine's cores)",
    )
    p.add_argument(
        "--address", help="batch: attach to a Ray cluster (ray://HOST:PORT) instead of starting one"
    )
    add_task_argument(p)
    add_seq_len_argument(p)


def print_report(result: Any) -> None:
    """The stage table: the result of compress and demo (printed with -q too). Laid out for the
    terminal's width, piped for $COLUMNS or 80 as the other tables (a long stage name wraps)."""
    console().print(result.report.table())
    if result.interrupted:
        console().print("interrupted: the completed stages' files and a partial report were kept")


def run_compress(args: argparse.Namespace) -> int:
    import modelpress

    if len(args.model) > 1 or args.workers is not None or args.address is not None:
        return _run_batch(args)
    args.model = args.model[0]
    refuse_overwrite(args, args.model, args.recipe, args.sample)
    # NOTE: --task chooses what a checkpoint is exported for; --seq-len how the recipe's text data is cut
    model = modelpress.load(args.model, **load_options(args)) if args.task else args.model
    recipe: Any = args.recipe
    if args.seq_len is not None:
        recipe = modelpress.load_recipe(args.recipe, allow_imports=not args.no_imports)
        recipe.data = type(recipe.data)(
            **{**recipe.data.model_dump(), "sequence_length": args.seq_len}
        )
    result = modelpress.compress(
        model,
        recipe,
        output=args.output,
        report_dir=args.report_dir,
        show_progress=not args.quiet,
        allow_imports=not args.no_imports,
        overwrite=args.overwrite,
        verify=not args.no_verify,
        sample=args.sample,
        external_data=EXTERNAL[args.external_data],
        allow_no_gain=args.allow_no_gain,
        accept_loss=args.accept_loss,
    )
    print_report(result)
    target = args.report_dir or str(Path(args.output).parent)
    print_result_line(
        console(), f"wrote {args.output} and report.md/.json/.html in {target}", quiet=args.quiet
    )
    return EXIT_INTERRUPTED if result.interrupted else 0


def _run_batch(args: argparse.Namespace) -> int:
    from modelpress.app.tuning import compress_batch
    from modelpress.base.errors import OptionsError

    if Path(args.output).suffix.lower() == ".onnx":
        raise OptionsError(
            f"with several models (or --workers/--address) -o is a folder, not {args.output!r}"
        )
    if args.task or args.seq_len is not None:
        raise OptionsError(
            "--task and --seq-len apply to one model; for a batch, give checkpoints whose config names the task "
            "and the recipe's data.sequence_length"
        )
    result = compress_batch(
        args.model,
        args.recipe,
        args.output,
        workers=args.workers,
        address=args.address,
        show_progress=not args.quiet,
    )
    console().print(result.table())
    console().print(f"wrote one folder per model and summary.md/.json in {args.output}")
    if result.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_ERROR if result.failed else 0


def run_recipe_schema(args: argparse.Namespace) -> int:
    from modelpress.app.recipe import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))
    return 0


def demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="modelpress-demo", help="output folder (default ./modelpress-demo)"
    )
    p.add_argument("--fast", action="store_true", help="fewer epochs (same code path)")
    p.add_argument(
        "--framework",
        choices=("torch", "tensorflow"),
        help="framework to train with (default: torch if installed)",
    )


def run_demo(args: argparse.Namespace) -> int:
    from modelpress.app.demo import run_demo as demo

    result = demo(args.out, fast=args.fast, framework=args.framework, show_progress=not args.quiet)
    print_report(result)
    print_result_line(
        console(),
        f"compressed model: {result.output}; reports: {Path(args.out) / 'report.html'} (.md, .json); "
        f"recipe: {Path(args.out) / 'recipe.yaml'}",
        quiet=args.quiet,
    )
    return EXIT_INTERRUPTED if result.interrupted else 0


COMMANDS = (
    Command(
        "compress",
        "run a recipe (quantize / prune / distill passes) and report every stage",
        compress_arguments,
        run_compress,
        "Run the passes of RECIPE on MODEL, evaluating after the source and each stage (metric, size, latency, time); "
        "write the final model to OUT and report.md/.json/.html. A recipe is code: its pkg.module:function entries "
        "import and run Python; use --no-imports for a recipe you did not write.",
    ),
    Command("recipe-schema", "print the JSON Schema of recipes", lambda p: None, run_recipe_schema),
    Command(
        "demo",
        "train a CNN on scikit-learn's digits, then prune -> distill -> quantize it and report (nothing downloaded)",
        demo_arguments,
        run_demo,
    ),
)
