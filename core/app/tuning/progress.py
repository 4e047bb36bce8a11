"""Progress of a tune: a live table of trials on a terminal, one log line per trial otherwise."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelpress.app.tuning.report import TrialRecord

__all__ = ["TrialBoard"]


class TrialBoard:
    def __init__(self, *, enabled: bool, metric: str, objective: str, rows: int = 12):
        self.enabled = enabled
        self.metric = metric
        self.objective = objective
        self.rows = rows
        self.live_mode = enabled and (
            sys.stderr.isatty() or os.environ.get("MODELPRESS_PROGRESS") == "1"
        )
        self.live: Any = None
        self.running: dict[int, str] = {}

    def __enter__(self) -> TrialBoard:
        if self.live_mode:
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(stderr=True), refresh_per_second=2, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)
            self.live = None

    def log(self, message: str) -> None:
        if not self.enabled:
            return
        if self.live is not None:
            self.live.console.print(message)
        else:
            print(f"modelpress tune: {message}", file=sys.stderr, flush=True)

    def started(self, number: int, config: dict[str, Any]) -> None:
        self.running[number] = str(config.get("pipeline", ""))
        if self.live is None:
            self.log(f"trial {number} started: {config.get('pipeline', '')}")

    def finished(self, record: TrialRecord) -> None:
        self.running.pop(record.number, None)
        if self.live is None:
            value = "-" if record.metric is None else f"{record.metric:.4f}"
            size = "-" if not record.size_bytes else f"{record.size_bytes / 1e6:.3f} MB"
            extra = f" ({record.error})" if record.error else ""
            self.log(
                f"trial {record.number} {record.status}: {self.metric} {value}, {size}, "
                f"{'meets' if record.meets else 'misses'} the criterion, {record.seconds or 0:.1f}s: {record.options()}{extra}"
            )

    def refresh(self, records: list[TrialRecord], running: int, elapsed: float) -> None:
        if self.live is None:
            return
        from rich.markup import escape
        from rich.table import Table

        ok = [r for r in records if r.status == "ok"]
        meeting = [r for r in ok if r.meets]
        best = min(meeting, key=lambda r: r.size_bytes or 0) if meeting else None
        counts = {s: sum(1 for r in records if r.status == s) for s in ("ok", "failed", "pruned")}
        title = (
            f"tune {elapsed:.0f}s: {running} running, {counts['ok']} done, {counts['failed']} failed, {counts['pruned']} stopped early"
            + (
                f"; best meeting: trial {best.number} {best.size_bytes / 1e6:.3f} MB"
                if best and best.size_bytes
                else ""
            )
        )
        table = Table(title=title, title_justify="left")
        for col in (
            "trial",
            "status",
            self.metric,
            "size (MB)",
            "latency ms",
            "meets",
            "configuration",
        ):
            table.add_column(col)
        for number, pipeline in sorted(self.running.items()):
            table.add_row(str(number), "running", "", "", "", "", escape(pipeline))
        for r in sorted(records, key=lambda r: r.number)[-self.rows :]:
            table.add_row(
                str(r.number),
                r.status,
                "-" if r.metric is None else f"{r.metric:.4f}",
                "-" if not r.size_bytes else f"{r.size_bytes / 1e6:.3f}",
                "-" if r.latency_ms is None else f"{r.latency_ms:.3f}",
                "yes" if r.meets else "no",
                escape(r.options()[:90]),
            )
        self.live.update(table)
