"""The compression report: a terminal table, ``report.md``, ``report.json`` and ``report.html``.

The table has the shape people know from papers: stage | metric | size | ratio | latency | time.
The HTML report embeds an SVG chart of the metric against the size, one point per stage.
"""

from __future__ import annotations

import html
import json
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelpress.app.compress import StageMetrics

__all__ = [
    "BIGGER_BYTES",
    "BIGGER_TOLERANCE",
    "LATENCY_TOLERANCE",
    "Report",
    "figure_text",
    "looks_slower",
    "side_by_side",
    "write_reports",
]

# NOTE: figures a kind declares that the report measures itself on every stage (size, parameters):
# shown once, as measured, not again as the method reported them.
_MEASURED = frozenset(
    {
        "model_bytes_before",
        "model_bytes_after",
        "parameters",
        "parameters_before",
        "parameters_after",
        "size_bytes",
    }
)

# NOTE: latency medians on a busy CPU wobble by a few percent; only a clear slowdown is flagged:
# slower by more than this fraction *and* by more than the runs' noise band (the sum of the two
# stages' interquartile ranges, each relative to its median).
LATENCY_TOLERANCE = 0.05
# NOTE: a file a few hundred bytes bigger (an opset import, a name) is no regression: a stage is
# flagged bigger when it grows by more than this fraction *and* by more than BIGGER_BYTES.
BIGGER_TOLERANCE = 0.02
BIGGER_BYTES = 4096


def _bigger(before: StageMetrics, s: StageMetrics) -> str | None:
    grown = s.size_bytes - before.size_bytes
    if grown <= BIGGER_BYTES or grown <= before.size_bytes * BIGGER_TOLERANCE:
        return None
    return f"bigger than '{before.stage}' ({_mb(s.size_bytes)} vs {_mb(before.size_bytes)} MB)"


def _spread(s: StageMetrics, key: str) -> float:
    """The stage's timed runs' interquartile range relative to their median (0 when not measured)."""
    ms = s.latency_ms.get(key)
    return s.latency_iqr_ms.get(key, 0.0) / ms if ms else 0.0


def _past_noise(previous: float, ms: float, band: float) -> bool:
    return ms > previous * (1 + max(LATENCY_TOLERANCE, band))


def looks_slower(before: StageMetrics, s: StageMetrics, key: str) -> bool:
    """Whether ``s``'s own timing at ``key`` is slower than ``before``'s beyond 5 % and the noise
    band (the sum of the two stages' interquartile ranges, each relative to its median)."""
    previous = before.latency_ms.get(key)
    return bool(previous) and _past_noise(
        previous, s.latency_ms[key], _spread(before, key) + _spread(s, key)
    )


def _relative_iqr(times: list[float]) -> float:
    median = statistics.median(times)
    if len(times) < 2 or not median:
        return 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")  # NOTE: numpy's percentile
    return (q3 - q1) / median


def _relative_range(values: list[float]) -> float:
    median = statistics.median(values)
    return (max(values) - min(values)) / median if median else 0.0


def side_by_side(before: list[list[float]], stage: list[list[float]]) -> list[float]:
    """``[before's median, the stage's median, noise band]`` (``latency_recheck_ms``) of two files timed
    in turns: ``before[r]`` and ``stage[r]`` are round ``r``'s run times (ms) of each. The band is
    the larger of the runs' spread (the two interquartile ranges, each relative to its median) and
    the rounds' spread (each file's range of round medians, relative to its median, summed, and the
    range of the rounds' stage/before ratios): a busy moment of the machine that falls on one round
    widens the band instead of flagging."""
    pooled = [[t for times in rounds for t in times] for rounds in (before, stage)]
    runs_band = sum(_relative_iqr(times) for times in pooled if times)
    per_round = [
        [statistics.median(times) for times in rounds if times] for rounds in (before, stage)
    ]
    rounds_band = sum(_relative_range(m) for m in per_round if m)
    # NOTE: each round's two files ran back to back: their ratio is the paired measure; the spread of
    # those ratios is how much the slowdown itself varies (a round where it is not slower at all widens it)
    ratios = [s / b for b, s in zip(*per_round, strict=False) if b]
    ratios_band = max(ratios) - min(ratios) if ratios else 0.0
    medians = [statistics.median(times) for times in pooled]
    return [*medians, max(runs_band, rounds_band, ratios_band)]


def _slower(
    before: StageMetrics | None, s: StageMetrics, key: str, *, paired: bool = True
) -> str | None:
    """The slowdown note, when the stage looks slower and, where the two files were re-timed side by
    side (``latency_recheck_ms``: the machine's load drifts between stages), is slower there too.
    ``paired=False`` for a ``before`` that is not the stage before (the source): its own timings only,
    as the side-by-side timing was against the stage before."""
    if before is None or not looks_slower(before, s, key):
        return None
    ms, previous = s.latency_ms[key], before.latency_ms[key]
    band = _spread(before, key) + _spread(s, key)
    noise = f"; noise band {band:.1%}" if band else ""
    recheck = s.latency_recheck_ms.get(key) if paired else None
    if recheck:
        if not _past_noise(recheck[0], recheck[1], recheck[2]):
            return None
        noise += f"; side by side {recheck[1]:.3f} vs {recheck[0]:.3f} ms"
    return f"slower than '{before.stage}' at {key} ({ms:.3f} vs {previous:.3f} ms{noise})"


def figure_text(value: Any) -> str:
    """Figures for people: a {node: reason} dict (``float_nodes``, ``weight_only_nodes``) as a count
    and its names grouped by reason; anything else as ``str``."""
    if (
        not isinstance(value, dict)
        or not value
        or not all(isinstance(v, str) for v in value.values())
    ):
        return str(value)
    groups: dict[str, list[str]] = {}
    for name, reason in value.items():
        groups.setdefault(reason.split(":")[0], []).append(name)
    parts = [
        f"{reason} ({len(names)}): {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
        for reason, names in groups.items()
    ]
    return f"{len(value)} — " + "; ".join(parts)


def _is_reasons(value: Any) -> bool:
    return (
        isinstance(value, dict) and bool(value) and all(isinstance(v, str) for v in value.values())
    )


# NOTE: the terminal table's headers (report.md and report.html keep the long ones)
_SHORT_HEADERS = {
    "size (MB)": "MB",
    "zip (MB)": "zip MB",
    "packed size (MB)": "mpk MB",
    "ratio (packed)": "mpk x",
    "parameters": "params",
    "time (s)": "s",
}


def _short_header(column: str) -> str:
    """``latency b64 ms`` -> ``b64 ms``; ``relative_error`` -> ``relative error`` (wraps on the space)."""
    if column.startswith("latency "):
        return column[len("latency ") :]
    return _SHORT_HEADERS.get(column, column.replace("_", " "))


@dataclass
class _FittedTable:
    """Fits 80 columns: short headers (report.md keeps the long ones), each number column as wide
    as its widest value (a number never wraps or is cut; a header word longer than that folds
    when there is no room for it), one space between columns, and the stage column takes the
    rest, wrapping at most once. A wider terminal gives the headers and stage names their room."""

    title: str
    columns: list[str]
    rows: list[list[str]]

    def widths(self, max_width: int) -> tuple[int, list[int]]:
        """The stage column's width and the other columns' widths for ``max_width`` characters."""
        values = [
            max([len(row[i]) for row in self.rows] + [2]) for i in range(1, len(self.columns))
        ]
        words = [max(len(word) for word in _short_header(col).split()) for col in self.columns[1:]]
        longest = max((len(row[0]) for row in self.rows), default=5)
        spare = max_width - len(values) - sum(values) - min(longest, max(5, -(-longest // 2)))
        for i, word in enumerate(
            words
        ):  # NOTE: header words get their room while the stage column keeps its minimum
            grow = min(max(word - values[i], 0), max(spare, 0))
            values[i] += grow
            spare -= grow
        return max(min(longest, max_width - len(values) - sum(values)), 5), values

    def room(self) -> int:
        """The width of the number columns with every value and header word whole, and their spaces."""
        return sum(
            max(
                [len(row[i]) for row in self.rows]
                + [2]
                + [len(w) for w in _short_header(col).split()]
            )
            + 1
            for i, col in enumerate(self.columns)
            if i > 0
        )

    def stage_room(self) -> int:
        """What the stage column needs: its longest label in at most two lines (at least 5)."""
        longest = max((len(row[0]) for row in self.rows), default=5)
        return min(longest, max(5, -(-longest // 2)))

    def fitted(self, max_width: int) -> tuple[_FittedTable, list[str]]:
        """This table with the columns that fit ``max_width`` (the stage keeping its two lines), and the
        headers left out: the least read first (``_DROPPED_FIRST``: time, zip, the raw perplexity, the
        larger batches' latency), never the metric, size or ratio. report.md and .html keep every column."""
        kept = list(range(len(self.columns)))
        dropped: list[str] = []
        candidates = [c for c in _DROPPED_FIRST if c in self.columns] + [
            c for c in reversed(self.columns) if c.startswith("latency ")
        ][:-1]
        table = self
        for column in candidates:
            if table.room() + table.stage_room() <= max_width:
                break
            kept.remove(self.columns.index(column))
            dropped.append(column)
            table = _FittedTable(
                self.title,
                [self.columns[i] for i in kept],
                [[r[i] for i in kept] for r in self.rows],
            )
        return table, dropped

    def __rich_console__(self, console: Any, options: Any) -> Any:
        import textwrap

        from rich import box
        from rich.markup import escape
        from rich.table import Table
        from rich.text import Text

        fitted, dropped = self.fitted(options.max_width)
        if fitted is not self:
            yield from fitted.__rich_console__(console, options)
            left_out = ", ".join(_short_header(c) for c in dropped)
            yield Text(
                f"(not shown at {options.max_width} columns: {left_out}; report.md has them)"
            )
            return
        stage, widths = self.widths(options.max_width)
        table = Table(
            title=self.title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            padding=(0, 0),
        )
        table.add_column(self.columns[0], overflow="fold", width=stage)
        for col, width in zip(self.columns[1:], widths, strict=True):
            header = textwrap.fill(_short_header(col), width, break_long_words=True)
            table.add_column(escape(header), justify="right", no_wrap=True, width=width)
        for row in self.rows:
            # NOTE: a long name breaks after a hyphen or a slash where it can (`distill-into-the-` /
            # `pruned-student`), not wherever the column ends
            table.add_row(escape(_wrap_label(row[0], stage)), *(escape(c) for c in row[1:]))
        yield table


def _wrap_label(text: str, width: int) -> str:
    """``text`` in lines of ``width``, broken after a space, a hyphen or a slash where it can
    (``quantize/`` / ``int8-dynamic``), a piece longer than a line folded."""
    lines = [""]
    for piece in re.findall(r"[^-/ ]*[-/ ]|[^-/ ]+$", text):
        if lines[-1] and len(lines[-1]) + len(piece.rstrip()) > width:
            lines.append("")
        while len(lines[-1]) + len(piece.rstrip()) > width:
            room = width - len(lines[-1])
            lines[-1] += piece[:room]
            lines.append("")
            piece = piece[room:]
        lines[-1] += piece
    return "\n".join(line.rstrip() for line in lines if line.strip())


# NOTE: what a narrow terminal's table leaves out first (see _FittedTable.fitted)
_DROPPED_FIRST = ("time (s)", "zip (MB)", "perplexity", "ratio (packed)", "decode tokens/s")

# NOTE: a text decoder's columns, in StageMetrics.text's keys' order
_TEXT_COLUMNS = ("perplexity", "perplexity change", "token agreement", "decode tokens/s")
_TEXT_FOOTNOTE = (
    " Text decoders: perplexity on the evaluation text (held out of the calibration text unless given), its change against the source, "
    "the share of greedy tokens generated as the source does from a few prompts, and decode tokens/s (one token per step with the KV cache, ONNX Runtime, CPU)."
)

_FOOTNOTE = (
    "Sizes are the ONNX files on disk (zip: deflate-compressed; packed: the lossless `.mpk` of `modelpress pack`, ratio against the source ONNX). "
    "Latency: ONNX Runtime, CPU, median. Flags: [bigger] when more than 2 % and 4 KB bigger than the stage before; "
    "[slower] when slower by more than 5 % and more than the noise band "
    "(the sum of the two stages' interquartile ranges of the timed runs, each relative to its median), "
    "and again when both files are re-timed side by side in rounds (beyond the spread of the rounds); "
    "also when slower than the source by the same rule, where the stage before is not the source."
)


def _code_spans(text: str) -> str:
    """``text`` escaped for HTML, its Markdown `code` spans as <code> (the footnote and notes are shared with report.md)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


_CSS = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
    ".flag{font-weight:bold;padding:0 3px;border-radius:3px;white-space:nowrap}code{background:#f0f0f0;padding:0 2px}"
    ".flag-bigger{color:#fff;background:#c77700}"
    ".flag-slower{color:#fff;background:#b3261e}.flag-no-gain{color:#fff;background:#6b1b9a}"
    "tr.flagged-bigger,tr.flagged-slower,tr.flagged-no-gain{background:#fff5f0}"
    ".note{border-left:4px solid #b3261e;padding-left:8px}.note.no-gain{border-color:#6b1b9a}"
    "pre{background:#f6f6f6;padding:8px;overflow-x:auto}"
)


def _css_name(flag: str) -> str:
    return flag.lower().replace(" ", "-")


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f}"


@dataclass
class Report:
    title: str
    metric: str
    stages: list[StageMetrics] = field(default_factory=list)
    status: str = "running"
    # NOTE: {kind: the figure keys it reports} from the registry (Kind.columns); each stage's kind
    # contributes its columns, so a factorize stage shows its rank, not a meaningless sparsity.
    kind_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def add(self, stage: StageMetrics) -> None:
        self.stages.append(stage)

    # -- rows ------------------------------------------------------------------------------
    def columns(self) -> list[str]:
        latency = list(self.stages[0].latency_ms) if self.stages else []
        packed = ["packed size (MB)", "ratio (packed)"] if self._packed() else []
        return [
            "stage",
            self.metric,
            *self.text_columns(),
            "size (MB)",
            "ratio",
            "zip (MB)",
            *packed,
            "parameters",
            *self.figure_columns(),
            *[f"latency {k} ms" for k in latency],
            "time (s)",
        ]

    def text_columns(self) -> list[str]:
        """A text decoder's columns (:attr:`StageMetrics.text`), when a stage has them."""
        return list(_TEXT_COLUMNS) if any(s.text for s in self.stages) else []

    @staticmethod
    def _text_cells(s: StageMetrics) -> list[str]:
        if not s.text:
            return ["-"] * len(_TEXT_COLUMNS)
        return [
            f"{s.text['perplexity']:.3f}",
            f"{s.text['perplexity_increase']:+.2%}",
            f"{s.text['token_agreement']:.1%}",
            f"{s.text['decode_tokens_per_s']:.1f}",
        ]

    def figure_columns(self) -> list[str]:
        """The columns the stages' kinds declare, in order of appearance. ``sparsity`` is measured
        on every stage; another column is shown when at least one stage reported that figure
        (sizes and parameter counts are measured columns already, so they are not repeated).
        Without kind information (a bare Report) it is ``sparsity`` alone, as before kinds were open."""
        if not self.kind_columns:
            return ["sparsity"]
        wanted: dict[str, None] = {}
        for s in self.stages:
            for column in self.kind_columns.get(s.kind, ()):
                if column in _MEASURED:
                    continue
                if column == "sparsity" or any(column in t.figures for t in self.stages):
                    wanted.setdefault(column)
        return list(wanted)

    @staticmethod
    def _figure_cell(s: StageMetrics, column: str) -> str:
        if column == "sparsity":
            return f"{s.sparsity:.1%}"
        value = s.figures.get(column)
        if value is None:
            return "-"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return str(value)[:40]
        return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"

    def _packed(self) -> bool:
        return any(s.packed_bytes is not None for s in self.stages)

    def regressions(self) -> dict[str, list[str]]:
        """Per stage, where it is really worse than the stage before it (and slower than the source,
        where the stage before it is not the source): bigger on disk by more
        than ``BIGGER_TOLERANCE`` and ``BIGGER_BYTES``, or slower at a measured batch size (e.g.
        int8 QDQ at batch 64 on a CPU without fast integer kernels) by more than
        ``LATENCY_TOLERANCE`` and the latency's noise band (the sum of the interquartile ranges of
        the two stages' timed runs, each relative to its median). A user reads "compressed" as smaller and faster: say so."""
        found: dict[str, list[str]] = {}
        source = self.stages[0] if self.stages else None
        for before, s in zip(self.stages, self.stages[1:], strict=False):
            slower = {key: _slower(before, s, key) for key in s.latency_ms}
            if before is not source:
                # NOTE: a stage faster than the one before it can still be slower than the source
                # (fp16 after an int4 stage): flagged against the source too, by its own timings
                slower.update(
                    {
                        key: _slower(source, s, key, paired=False)
                        for key, note in slower.items()
                        if note is None
                    }
                )
            notes = [note for note in (_bigger(before, s), *slower.values()) if note]
            if notes:
                found[s.stage] = notes
        return found

    def rows(self) -> list[list[str]]:
        if not self.stages:
            return []
        base = self.stages[0].size_bytes
        worse = self.regressions()
        figure_columns = self.figure_columns()
        rows = []
        for s in self.stages:
            value = "-" if s.value is None else f"{s.value:.4f}"
            # NOTE: a stage with no gain (not smaller, or nothing changed), or bigger or slower than the
            # stage before it, is flagged where it is read.
            label = s.stage + "".join(f" [{', '.join(group)}]" for group in self._flags(s, worse))
            packed: list[str] = []
            if self._packed():
                packed = (
                    ["-", "-"]
                    if s.packed_bytes is None
                    else [_mb(s.packed_bytes), f"{base / max(s.packed_bytes, 1):.2f}x"]
                )
            rows.append(
                [
                    label,
                    value,
                    *(self._text_cells(s) if self.text_columns() else []),
                    _mb(s.size_bytes),
                    f"{base / s.size_bytes:.2f}x",
                    _mb(s.zip_bytes),
                    *packed,
                    f"{s.parameters:,}",
                    *[self._figure_cell(s, c) for c in figure_columns],
                    *[f"{v:.3f}" for v in s.latency_ms.values()],
                    f"{s.seconds:.1f}",
                ]
            )
        return rows

    # -- renderings ------------------------------------------------------------------------
    def table(self) -> Any:
        """The terminal table (a rich renderable), laid out for the width it is printed at: see :class:`_FittedTable`."""
        return _FittedTable(f"{self.title} ({self.status})", self.columns(), self.rows())

    def _flags(self, s: StageMetrics, worse: dict[str, list[str]]) -> list[list[str]]:
        """The stage's flags as they are printed, in groups: ``[["NO GAIN"], ["bigger", "slower"]]``."""
        groups = [["NO GAIN"]] if s.figures.get("no_gain") else []
        if s.stage in worse:
            groups.append(sorted({note.split()[0] for note in worse[s.stage]}))
        return groups

    def footnote(self) -> str:
        return _FOOTNOTE + (_TEXT_FOOTNOTE if self.text_columns() else "")

    def notes(self) -> list[tuple[str, str, str]]:
        """What the flags mean, one ``(css class, stage, sentence)`` per flagged stage: its no-gain
        reason, or where it is bigger or slower than the stage before it and by how much."""
        found = [
            ("no-gain", f"No gain at {s.stage}", str(s.figures["no_gain"]))
            for s in self.stages
            if s.figures.get("no_gain")
        ]
        found += [
            (
                "regression",
                s.stage,
                f"misses its text criteria, kept with accept_loss: {s.text['loss_accepted']}.",
            )
            for s in self.stages
            if s.text.get("loss_accepted")
        ]
        return found + [
            ("regression", stage, f"is {'; '.join(notes)}.")
            for stage, notes in self.regressions().items()
        ]

    def details(self) -> list[tuple[str, dict[str, str], str]]:
        """Per stage after the source with figures: its name, the {node: reason} figures (skipped
        layers, fallback nodes, ...) as text grouped by reason, and the other figures as JSON."""
        found = []
        for s in self.stages[1:]:
            if s.figures:
                reasons = {k: figure_text(v) for k, v in s.figures.items() if _is_reasons(v)}
                rest = {k: v for k, v in s.figures.items() if k not in reasons}
                found.append((s.stage, reasons, json.dumps(rest, indent=1, default=str)[:4000]))
        return found

    def markdown(self) -> str:
        cols = self.columns()
        lines = [
            f"# {self.title}",
            "",
            f"Status: {self.status}",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "|".join("---" for _ in cols) + "|",
        ]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows()]
        lines += ["", self.footnote()]
        lines += [
            f"\n**{stage}**: {text}" if css == "no-gain" else f"\n**{stage}** {text}"
            for css, stage, text in self.notes()
        ]
        for stage, reasons, rest in self.details():
            # NOTE: {node: reason} figures (float_nodes, ...) as one line each, grouped by reason; the rest as JSON
            lines += ["", f"## {stage}", ""] + [f"- **{k}**: {text}" for k, text in reasons.items()]
            lines += ["", "```json", rest, "```"]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "metric": self.metric,
            "status": self.status,
            "stages": [s.to_dict() for s in self.stages],
            "regressions": self.regressions(),
        }

    def svg_chart(self, width: int = 560, height: int = 320, legend: int = 240) -> str:
        points = [
            (s.size_bytes / 1e6, s.value, s.stage) for s in self.stages if s.value is not None
        ]
        if not points:
            return ""
        pad = 50
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        x0, x1 = 0.0, max(xs) * 1.1 or 1.0
        y0, y1 = min(ys), max(ys)
        if y1 - y0 < 1e-9:
            y0, y1 = y0 - 0.05, y1 + 0.05
        margin = (y1 - y0) * 0.15
        y0, y1 = y0 - margin, y1 + margin

        def sx(v: float) -> float:
            return pad + (v - x0) / (x1 - x0) * (width - 2 * pad)

        def sy(v: float) -> float:
            return height - pad - (v - y0) / (y1 - y0) * (height - 2 * pad)

        parts = [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + legend}" height="{height}" font-family="sans-serif" font-size="11">',
            f'<rect width="{width + legend}" height="{height}" fill="white"/>',
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
            f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">size (MB)</text>',
            f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">{html.escape(self.metric)}</text>',
        ]
        for i in range(5):
            xv = x0 + (x1 - x0) * i / 4
            yv = y0 + (y1 - y0) * i / 4
            parts.append(
                f'<text x="{sx(xv):.1f}" y="{height - pad + 14}" text-anchor="middle">{xv:.2f}</text>'
            )
            parts.append(
                f'<text x="{pad - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3f}</text>'
            )
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in points)
        parts.append(
            f'<polyline points="{path}" fill="none" stroke="#4a7fb0" stroke-dasharray="4 3"/>'
        )
        # NOTE: points are numbered and named in a legend: stage names next to close points overlap
        for i, (x, y, label) in enumerate(points):
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="#d0553f"/>')
            parts.append(
                f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 6:.1f}" font-weight="bold">{i}</text>'
            )
            parts.append(
                f'<text x="{width}" y="{pad + 16 * i:.1f}">{i}: {html.escape(label)}</text>'
            )
        parts.append("</svg>")
        return "".join(parts)

    def html(self) -> str:
        """Everything report.md has (table, notes on each flag, per-stage details) with coloured
        flags (``flag-bigger``, ``flag-slower``, ``flag-no-gain`` classes) and the chart."""
        esc = html.escape
        cols = "".join(f"<th>{esc(c)}</th>" for c in self.columns())
        notes = "".join(
            f"<p class='note {css}'><b>{esc(stage)}</b>{':' if css == 'no-gain' else ''} {_code_spans(text)}</p>"
            for css, stage, text in self.notes()
        )
        details = "".join(
            f"<h2>{esc(stage)}</h2><ul>"
            + "".join(f"<li><b>{esc(k)}</b>: {esc(text)}</li>" for k, text in reasons.items())
            + f"</ul><pre>{esc(rest)}</pre>"
            for stage, reasons, rest in self.details()
        )
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{esc(self.title)}</title><style>{_CSS}</style>"
            f"</head><body><h1>{esc(self.title)}</h1><p>Status: {esc(self.status)}</p>"
            f"<table><tr>{cols}</tr>{self._html_rows()}</table><p>{_code_spans(self.footnote())}</p>{notes}"
            f"<h2>{esc(self.metric)} vs size</h2>{self.svg_chart()}{details}</body></html>\n"
        )

    def _html_rows(self) -> str:
        worse = self.regressions()
        body = []
        for s, row in zip(self.stages, self.rows(), strict=True):
            flags = self._flags(s, worse)
            label = html.escape(s.stage)
            for group in flags:
                label += (
                    " ["
                    + ", ".join(
                        f"<span class='flag flag-{_css_name(flag)}'>{html.escape(flag)}</span>"
                        for flag in group
                    )
                    + "]"
                )
            css = " ".join(f"flagged-{_css_name(flag)}" for group in flags for flag in group)
            cells = [label] + [html.escape(c) for c in row[1:]]
            body.append(f"<tr class='{css}'>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        return "".join(body)

    def write(self, folder: str | os.PathLike[str]) -> dict[str, Path]:
        """Write report.md/.json/.html into ``folder`` (each atomically)."""
        return write_reports(folder, self.markdown(), self.to_json(), self.html())


def write_reports(
    folder: str | os.PathLike[str], markdown: str, data: Any, html_text: str
) -> dict[str, Path]:
    """``report.md``, ``report.json`` and ``report.html`` into ``folder``, each written atomically."""
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, text in (
        ("report.md", markdown),
        ("report.json", json.dumps(data, indent=1, default=str)),
        ("report.html", html_text),
    ):
        path = target / name
        tmp = target / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, path)
        written[name] = path
    return written
