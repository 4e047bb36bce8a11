"""``modelpress dashboard``: serve a tune's study with optuna-dashboard until Ctrl-C."""

from __future__ import annotations

import argparse
import sys

from modelpress.cli.common import Command

__all__ = ["COMMANDS"]


def arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "study",
        metavar="OUT_DIR_OR_STORAGE",
        help="a `modelpress tune` output folder (its study.db) or a storage URL",
    )
    p.add_argument(
        "--study-name",
        default="modelpress-tune",
        help="the study to open first (default modelpress-tune)",
    )
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")


def run(args: argparse.Namespace) -> int:
    from modelpress.app.tuning.dashboard import Dashboard, study_storage

    view = Dashboard(study_storage(args.study), port=args.port)
    url = view.url(
        args.study_name
        if args.study_name in view.studies() or not view.studies()
        else view.studies()[0]
    )
    print(f"modelpress dashboard: {url} (Ctrl-C stops it)", file=sys.stderr, flush=True)
    view.serve()
    print("modelpress dashboard: stopped", file=sys.stderr, flush=True)
    return 0


COMMANDS = (
    Command(
        "dashboard",
        "serve a tune's study live in the browser (optuna-dashboard, 127.0.0.1)",
        arguments,
        run,
        "Serve the study of a `modelpress tune` output folder (or any Optuna storage URL, e.g. the PostgreSQL database that "
        "several drivers share) with optuna-dashboard on 127.0.0.1: every trial with its metric, size, latency and "
        "configuration as user attributes. Runs until Ctrl-C.",
    ),
)
