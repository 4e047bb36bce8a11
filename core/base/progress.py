"""Progress for long phases: a live rich bar on a terminal, plain periodic log lines otherwise.

When stderr is not a terminal (CI logs, a redirected run), a phase that lasts longer than a few
seconds prints ``modelpress: <phase>: <done>/<total> (<elapsed>s)`` every 10 s and a closing line,
so a long run is never silent; short phases print nothing. A phase without a total shows the count
only once something was counted (``running (20s)``, not ``running 0 (20s)``).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["progress_bar"]

LOG_INTERVAL_S = 10.0


def _no_progress(n: int = 1) -> None:
    return None


@contextmanager
def _log_lines(
    description: str, total: int | None, interval: float
) -> Iterator[Callable[[int], None]]:
    done = [0]
    start = time.perf_counter()
    stop = threading.Event()
    printed = [False]

    def line(final: bool = False) -> None:
        count = f" {done[0]}/{total}" if total else (f" {done[0]}" if done[0] else "")
        state = "done" if final else "running"
        print(
            f"modelpress: {description}: {state}{count} ({time.perf_counter() - start:.0f}s)",
            file=sys.stderr,
            flush=True,
        )
        printed[0] = True

    def ticker() -> None:
        while not stop.wait(interval):
            line()

    thread = threading.Thread(target=ticker, name="modelpress-progress", daemon=True)
    thread.start()

    def advance(n: int = 1) -> None:
        done[0] += n

    try:
        yield advance
    finally:
        stop.set()
        thread.join()
        if printed[0]:
            line(final=True)


@contextmanager
def progress_bar(
    description: str, *, total: int | None = None, enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """Yield an ``advance(n)`` callable: a rich bar on a terminal (or with ``MODELPRESS_PROGRESS=1``),
    periodic log lines on stderr otherwise (``MODELPRESS_PROGRESS=0`` silences both)."""
    mode = os.environ.get("MODELPRESS_PROGRESS")
    if not enabled or mode == "0":
        yield _no_progress
        return
    if not (sys.stderr.isatty() or mode == "1"):
        with _log_lines(
            description,
            total,
            float(os.environ.get("MODELPRESS_PROGRESS_INTERVAL", LOG_INTERVAL_S)),
        ) as advance:
            yield advance
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    counted = (
        (MofNCompleteColumn(),) if total else ()
    )  # NOTE: no "0/?" for a phase that has no count
    with Progress(
        TextColumn("{task.description}"), BarColumn(), *counted, TimeElapsedColumn(), transient=True
    ) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int = 1) -> None:
            bar.advance(task, n)

        yield advance
