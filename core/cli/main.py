"""The ``modelpress`` command line: the parser, the dispatch, and errors mapped to exit codes.

Exit codes: 0 success; 1 a user error (bad input, bad options, bad command line: every
:class:`~modelpress.ModelpressError` and argparse's usage errors), printed as one line
``modelpress: error: ...``; 3 a bug in modelpress (any other exception), printed as one line that
says so, with the version; 4 the result misses its accuracy criteria (without ``--accept-loss``);
130 interrupted (Ctrl-C). ``-v/--verbose`` adds the traceback. The code comes from the class of
the error (:data:`EXIT_BY_ERROR`), never from a figure.

The parse has two stages: the command's own arguments name the method (``-m``/``-k``); the
command's parser then gets that method's options as flags (:mod:`modelpress.cli.options`) and
parses everything. Only the chosen command's parser is completed, so ``--help`` and
``--version`` import nothing heavy (no onnx, numpy, pydantic, rich).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from modelpress.base.errors import AccuracyLossError, ModelpressError, one_line
from modelpress.cli import compress, convert, dashboard, inspect, methods, pack, plugins, tune
from modelpress.cli.common import (
    EXIT_CODES_HELP,
    EXIT_CRITERIA,
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    Command,
    Parser,
    SubParser,
)

__all__ = ["EXIT_BY_ERROR", "build_parser", "main"]

# NOTE: the order `modelpress --help` lists them in
COMMANDS: tuple[Command, ...] = (
    *inspect.COMMANDS,
    *pack.COMMANDS,
    *plugins.COMMANDS,
    *convert.COMMANDS,
    *methods.COMMANDS[:3],
    *compress.COMMANDS[:1],
    *tune.COMMANDS,
    *dashboard.COMMANDS,
    *compress.COMMANDS[1:],
    methods.COMMANDS[3],
)

# NOTE: the most specific class first; every other ModelpressError is a user error
EXIT_BY_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (AccuracyLossError, EXIT_CRITERIA),
    (ModelpressError, EXIT_ERROR),
)


def _version() -> str:
    from modelpress import __version__

    return __version__


def _chosen(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """The command the line names and the arguments after it (before it only -v/-h/--version, which take no value)."""
    for i, token in enumerate(argv):
        if not token.startswith("-"):
            return token, list(argv[i + 1 :])
    return None, []


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line; ``argv`` (default: ``sys.argv[1:]``) picks the command whose parser is
    completed with what depends on the line (the chosen method's option flags)."""
    parser = Parser(
        prog="modelpress",
        description="Compress PyTorch, Keras and ONNX models (quantize, prune, distill); every output is verified in ONNX Runtime.",
        epilog=EXIT_CODES_HELP
        + " An output is never written over an input file unless --overwrite is given.",
    )
    parser.add_argument("--version", action="version", version=f"modelpress {_version()}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print the full traceback on errors"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=SubParser)
    chosen, rest = _chosen(list(sys.argv[1:] if argv is None else argv))
    for command in COMMANDS:
        p = sub.add_parser(
            command.name, help=command.help, description=command.description or command.help
        )
        command.arguments(p)
        p.set_defaults(run=command.run)
        if command.name == chosen and command.extend is not None:
            command.extend(p, rest)
    return parser


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """``-q``: no progress output anywhere in the command (nested loads, workers), restored after."""
    if not enabled:
        yield
        return
    before = os.environ.get("MODELPRESS_PROGRESS")
    os.environ["MODELPRESS_PROGRESS"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("MODELPRESS_PROGRESS", None)
        else:
            os.environ["MODELPRESS_PROGRESS"] = before


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (see the module docstring)."""
    warnings.showwarning = _show_warning
    args: argparse.Namespace | None = None
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not getattr(args, "run", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        with _quiet(bool(getattr(args, "quiet", False))):
            return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print(
            "modelpress: interrupted; nothing was written for the unfinished step", file=sys.stderr
        )
        return EXIT_INTERRUPTED
    except Exception as exc:
        return _report(exc, verbose=bool(getattr(args, "verbose", False)))


def _report(exc: Exception, *, verbose: bool) -> int:
    """One line on stderr (the traceback too with -v); the exit code of the error's class."""
    if verbose:
        traceback.print_exc()
    code = next((code for cls, code in EXIT_BY_ERROR if isinstance(exc, cls)), EXIT_INTERNAL)
    if code == EXIT_INTERNAL:  # NOTE: a bug, not bad input: still one line unless --verbose
        print(
            f"modelpress: internal error (a bug in modelpress {_safe_version()}, please report it): "
            f"{type(exc).__name__}: {one_line(exc, 300)}; rerun with -v for the traceback",
            file=sys.stderr,
        )
    else:
        print(f"modelpress: error: {one_line(exc, 2000)}", file=sys.stderr)
    return code


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    """Warnings (a damaged optional metadata entry, ...) as one line, like errors."""
    print(f"modelpress: warning: {one_line(message, 2000)}", file=sys.stderr)


def _safe_version() -> str:
    try:
        return _version()
    except Exception:  # pragma: no cover - a broken install
        return "?"
