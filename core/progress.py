"""Progress bars (rich), drawn only on a terminal unless forced."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["progress_bar"]


def _no_progress(n: int = 1) -> None:
    return None


@contextmanager
def progress_bar(description: str, *, total: int | None = None, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` callable; draws a rich progress bar on stderr when it is a terminal."""
    show = enabled and (sys.stderr.isatty() or os.environ.get("MODELPRESS_PROGRESS") == "1")
    if not show:
        yield _no_progress
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance
