"""What the commands share: the parser classes, exit codes, the flags of commands that write a
model, the console and size formatting. Imports nothing heavy (``--help`` and ``--version``
must stay fast): rich, numpy and the rest of modelpress are imported inside the functions."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "EXIT_CODES_HELP",
    "EXIT_CRITERIA",
    "EXIT_ERROR",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_USAGE",
    "EXTERNAL",
    "Command",
    "Parser",
    "SubParser",
    "add_output_arguments",
    "add_overwrite_argument",
    "add_seq_len_argument",
    "add_task_argument",
    "add_writing_arguments",
    "capped_sample",
    "console",
    "escape",
    "human_bytes",
    "print_result_line",
    "print_wrapped",
    "refuse_overwrite",
]

EXIT_ERROR = 1  # a user error: bad input, options or command line (ModelpressError, argparse)
EXIT_USAGE = EXIT_ERROR  # NOTE: one code for every user error; argparse's own 2 is not used
EXIT_INTERNAL = 3  # a bug in modelpress: an exception that is not a ModelpressError
EXIT_CRITERIA = 4  # the result misses its accuracy criteria (without --accept-loss)
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "exit codes: 0 success; 1 user error (bad model, data, options or command line); "
    "3 internal error (a bug in modelpress: please report it with the -v traceback); "
    "4 the result misses its accuracy criteria (nothing written; --accept-loss keeps it); 130 interrupted."
)

EXTERNAL: dict[str, bool | str] = {"auto": "auto", "always": True, "never": False}


class Parser(argparse.ArgumentParser):
    """argparse, but usage errors exit with the same code as every other user error."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"modelpress: error: {message}\n")


class SubParser(Parser):
    """A command's parser: the exit codes in its --help; ``-v`` and ``-q`` after the command too."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("epilog", EXIT_CODES_HELP)
        super().__init__(**kwargs)
        # NOTE: SUPPRESS keeps a command from resetting a `-v` given before it.
        self.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            default=argparse.SUPPRESS,
            help="print the full traceback on errors",
        )
        self.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            help="no progress output: only the result (and errors, warnings)",
        )


@dataclass(frozen=True)
class Command:
    """One command: its name and help, a function adding its arguments, and the function that runs it.
    ``extend`` (optional) adds what depends on the command line itself (a method's option flags)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None
    extend: Callable[[argparse.ArgumentParser, Sequence[str]], None] | None = None


def escape(text: Any) -> str:
    from rich.markup import escape as rich_escape

    return rich_escape(str(text))


def console(stderr: bool = False) -> Any:
    """A rich console at the terminal's width, piped at $COLUMNS or 80 (rich's rule), for tables and result
    lines alike (a fixed 160 for piped result lines ignored $COLUMNS: issue #25). A line meant to stay whole
    (a -q result line) is printed with ``soft_wrap=True``."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def print_wrapped(out: Any, text: str, indent: int = 4) -> None:
    """``text`` (plain, not markup) wrapped at ``out``'s width with a hanging indent, so a long figure or
    result line reads as one item at 80 columns (rich wraps continuation lines flush left). A word longer
    than a line (a path) is not cut."""
    import textwrap

    lines = textwrap.wrap(
        text,
        width=max(out.width, indent + 20),
        subsequent_indent=" " * indent,
        break_on_hyphens=False,
        break_long_words=False,  # NOTE: a path longer than a line stays whole (copy and paste)
    )
    out.print("\n".join(lines) or text, markup=False, soft_wrap=True, highlight=False)


def print_result_line(out: Any, text: str, *, quiet: bool) -> None:
    """A command's result line (plain text): with -q one line however long (for scripts; a terminal wraps
    it itself), else wrapped at the width with a hanging indent."""
    if quiet:
        out.print(text, markup=False, soft_wrap=True, highlight=False)
    else:
        print_wrapped(out, text, indent=2)


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} GB"


def refuse_overwrite(args: argparse.Namespace, *inputs: str | None) -> None:
    """The output must not be any file the command reads (models are also checked by export)."""
    from modelpress.io.safety import refuse_overwrite as refuse

    refuse([getattr(args, "output", None)], inputs, overwrite=args.overwrite)


def capped_sample(path: Any, limit: int = 256) -> Any:
    """The first ``limit`` samples of a data file (or of arrays a plugin read from one), for the
    verification run (labels dropped)."""
    if path is None or (isinstance(path, str) and not path):
        return None
    from modelpress.data.samples import LABELS, read_arrays

    data = read_arrays(Path(path), "sample") if isinstance(path, (str, os.PathLike)) else path
    if isinstance(data, dict):
        # NOTE: a scalar input (silero-vad's sample rate) is one value for every sample
        return {k: v[:limit] if v.ndim else v for k, v in data.items() if k != LABELS}
    return data[:limit]


def add_output_arguments(p: argparse.ArgumentParser, *, sample_help: str) -> None:
    """The arguments every command that applies a method and writes a verified model shares."""
    p.add_argument(
        "-O",
        "--option",
        action="append",
        metavar="NAME=VALUE",
        help="any method option; VALUE is JSON or a plain string; a list option takes a,b,c or the flag repeated (-O exclude=a -O exclude=b)",
    )
    p.add_argument("--sample", help=f".npz inputs for the verification run ({sample_help})")
    add_writing_arguments(p)
    add_overwrite_argument(p)
    p.add_argument(
        "--allow-no-gain",
        action="store_true",
        help="write the result even if it is not smaller than the input (quantize) or the method changed nothing (default: exit 1)",
    )
    p.add_argument(
        "--accept-loss",
        action="store_true",
        help=f"write the result even when it misses its accuracy criteria (otherwise: one line with the figures, exit {EXIT_CRITERIA})",
    )
    p.add_argument(
        "--no-normalize",
        action="store_true",
        help="ONNX input: skip normalisation on import (Constant weights to initializers, folding, BatchNorm fusion)",
    )


def add_writing_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="skip the numerical check (ORT still loads the file)",
    )
    p.add_argument(
        "--external-data",
        choices=("auto", "always", "never"),
        default="auto",
        help="weights in <output>.data beside the file: auto (when the input had external data or weights exceed ~1.5 GB), always, never",
    )


def add_overwrite_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="allow OUT to be an input file (the model, its external data, or a data file); refused by default",
    )


# NOTE: optimum's task names; the adapter that exports per task checks them (no plugin import for --help)
TASK_HELP = (
    "what to export a Hugging Face checkpoint for: feature-extraction, text-classification, text-generation "
    "(no KV cache) or text-generation-with-past (default: from its config); a task the model cannot do is refused "
    "with the list of those it can"
)


def add_task_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", help=TASK_HELP)


def _seq_len(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of tokens >= 2")
    return value


def add_seq_len_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--seq-len",
        type=_seq_len,
        metavar="N",
        help="tokens per sample when a text corpus (.txt/.jsonl) is given as data (default 64)",
    )


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of ``modelpress.load`` the command line sets."""
    options: dict[str, Any] = {"show_progress": not args.quiet}
    if getattr(args, "no_normalize", False):
        options["normalize"] = False
    if getattr(args, "task", None):
        options["task"] = args.task
    return options
