"""The tune report: every trial, the Pareto front, the best configuration; md, json and html (with a chart)."""

from __future__ import annotations

import html
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from modelpress.app.report import write_reports
from modelpress.evaluation.criteria import lower_is_better

__all__ = ["TrialRecord", "TuneReport", "pareto_front"]


class _Configuration:
    """A configuration cell that breaks lines after a comma, a space or an opening parenthesis only
    (rich folds a long identifier mid-word: ``int8-static(calibrator`` / ``=percentile,``), then
    after "=" where an option is wider than the column; a value wider still is folded."""

    def __init__(self, text: str) -> None:
        import re

        self.text = text
        self.pieces = [p for p in re.findall(r"[^,( ]*[,( ]?", text) if p]

    def __rich_measure__(self, console: Any, options: Any) -> Any:
        from rich.measure import Measurement

        longest = max((len(p.strip()) for p in self.pieces), default=0)
        return Measurement(min(longest, options.max_width), len(self.text))

    def lines(self, width: int) -> list[str]:
        import re

        # NOTE: a piece wider than the column (`calibrator=percentile,` in 21) breaks after its "="
        pieces = [
            part
            for piece in self.pieces
            for part in (re.findall(r"[^=]*=?", piece) if len(piece.rstrip()) > width else [piece])
            if part
        ]
        lines: list[str] = []
        line = ""
        for piece in pieces:
            if line and len((line + piece).rstrip()) > width:
                lines.append(line.rstrip())
                line = piece.lstrip()
            else:
                line += piece
        return [*lines, line.rstrip()] if line or not lines else lines

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.text import Text

        yield Text("\n".join(self.lines(options.max_width)), overflow="fold")


@dataclass
class TrialRecord:
    number: int
    status: str  # ok | failed | pruned | interrupted
    pipeline: str
    config: dict[str, Any]
    passes: list[dict[str, Any]]
    metric: float | None
    drop: float | None
    meets: bool
    size_bytes: int | None
    latency_ms: float | None
    seconds: float | None
    error: str = ""
    session: str = ""
    figures: list[dict[str, Any]] = field(default_factory=list)
    latency_alone_ms: float | None = None
    # NOTE: where a trial's time went (see Outcome.timing and run_trial's phases): CPU seconds are load-independent
    timing: dict[str, Any] = field(default_factory=dict)
    # NOTE: where it ran (the Ray node id and its host); attempt > 1: it reruns trial retry_of, lost with its node
    node: str = ""
    host: str = ""
    attempt: int = 1
    retry_of: int | None = None
    retried: bool = False

    def options(self) -> str:
        parts = []
        for p in self.passes:
            opts = ", ".join(
                f"{k}={v}"
                for k, v in p.get("options", {}).items()
                if not (isinstance(v, (list, dict)) and not v)
            )
            parts.append(f"{p['method']}({opts})")
        return " -> ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def pareto_front(
    records: list[TrialRecord], objective: str, *, higher_is_better: bool = True
) -> list[TrialRecord]:
    """Completed trials no other completed trial beats on the metric and the objective(s)."""
    done = [r for r in records if r.status == "ok" and r.metric is not None]

    def point(r: TrialRecord) -> tuple[float, ...]:
        m = -r.metric if higher_is_better else r.metric  # type: ignore[operator]
        extra = {
            "size": (r.size_bytes,),
            "latency": (r.latency_ms,),
            "both": (r.size_bytes, r.latency_ms),
        }[objective]
        return (m, *extra)  # type: ignore[return-value,arg-type]

    front = [r for r in done if not any(_dominates(point(o), point(r)) for o in done if o is not r)]
    return sorted(front, key=lambda r: r.size_bytes or 0)


def _f(value: float | None, fmt: str = ".4f") -> str:
    return "-" if value is None else format(value, fmt)


def _padded_range(values: list[float]) -> tuple[float, float]:
    """The chart's y range: the values' with a tenth of margin each side (a flat line gets ±0.05 first)."""
    y0, y1 = min(values), max(values)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.05, y1 + 0.05
    margin = (y1 - y0) * 0.1
    return y0 - margin, y1 + margin


def _svg_frame(width: int, height: int, pad: int, metric: str) -> list[str]:
    """The chart's opening: the canvas, both axes and their labels."""
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="black"/>',
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="black"/>',
        f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">size (MB)</text>',
        f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">{html.escape(metric)}</text>',
    ]


@dataclass
class TuneReport:
    title: str
    metric: str
    objective: str
    max_drop: float
    baseline: dict[str, Any]
    trials: list[TrialRecord]
    pareto: list[TrialRecord]
    best: TrialRecord | None
    status: str
    verification: str = ""
    space: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(
        default_factory=dict
    )  # NOTE: installed methods the search space left out -> why
    dashboard: str = ""  # NOTE: the live dashboard's address when `tune --dashboard` served one
    # NOTE: where the trials ran (RayExecutor.describe()): executor, cluster address, nodes
    cluster: dict[str, Any] = field(default_factory=dict)

    COLUMNS = (
        "trial",
        "status",
        "meets",
        "metric",
        "drop",
        "size (MB)",
        "ratio",
        "latency b1 ms",
        "time (s)",
        "configuration",
    )

    def rows(self) -> list[list[str]]:
        front = {r.number for r in self.pareto}
        base = self.baseline.get("size_bytes") or 1
        rows = []
        for r in sorted(self.trials, key=lambda r: r.number):
            mark = ("*" if self.best is not None and r.number == self.best.number else "") + (
                "P" if r.number in front else ""
            )
            rows.append(
                [
                    f"{r.number}{(' ' + mark) if mark else ''}",
                    r.status,
                    "yes" if r.meets else "no",
                    _f(r.metric),
                    _f(r.drop),
                    _f(r.size_bytes / 1e6 if r.size_bytes else None, ".3f"),
                    f"{base / r.size_bytes:.2f}x" if r.size_bytes else "-",
                    _f(r.latency_ms, ".3f"),
                    _f(r.seconds, ".1f"),
                    r.options() + (f" [{r.error}]" if r.error else ""),
                ]
            )
        return rows

    def summary_lines(self) -> list[str]:
        b = self.baseline
        lines = [
            f"Status: {self.status}",
            f"Criterion: {self.metric} drop <= {self.max_drop:g} vs the source ({self.metric} {_f(b.get('metric'))}, "
            f"{_f(b.get('size_bytes', 0) / 1e6, '.3f')} MB, {_f(b.get('latency_ms'), '.3f')} ms); objective: {self.objective}",
        ]
        counts: dict[str, int] = {}
        for r in self.trials:
            counts[r.status] = counts.get(r.status, 0) + 1
        lines.append(
            "Trials: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            if counts
            else "Trials: none finished"
        )
        if self.best is None:
            lines.append("Best: no trial completed; nothing was exported")
        else:
            r = self.best
            lines.append(
                f"Best: trial {r.number} ({'meets' if r.meets else 'does NOT meet'} the criterion): {self.metric} {_f(r.metric)} "
                f"(drop {_f(r.drop)}), {_f((r.size_bytes or 0) / 1e6, '.3f')} MB "
                f"({(b.get('size_bytes') or 1) / (r.size_bytes or 1):.2f}x smaller), latency b1 "
                f"{_f(r.latency_alone_ms or r.latency_ms, '.3f')} ms: {r.options()}"
            )
            if self.verification:
                lines.append(
                    f"best.onnx verified in ONNX Runtime against the source: {self.verification}"
                )
        return lines

    def placement_lines(self) -> list[str]:
        """Where the trials ran: the executor, the cluster address, each node with its trials, and the retries."""
        c = self.cluster
        if not c:
            return []
        how = (
            f"Ray cluster at {c.get('address')} (attached)"
            if c.get("attached")
            else "Ray, a local instance started for this run"
        )
        used: dict[str, list[int]] = {}
        for r in self.trials:
            used.setdefault(r.node, []).append(r.number)
        lines = [
            f"Executor: {how}; {len(c.get('nodes', []))} node(s) seen, {len([n for n in used if n])} used"
        ]
        for n in c.get("nodes", []):
            numbers = used.get(n["node"], [])
            lines.append(
                f"Node {n['node'][:12]} ({n.get('host', '')} {n.get('ip', '')}, {n.get('cpus', 0):g} CPU"
                f"{'' if n.get('alive', True) else ', LOST during the run'}): {len(numbers)} trial(s)"
                + (f" ({', '.join(map(str, sorted(numbers)))})" if numbers else "")
            )
        lines += [
            f"Retry: trial {r.number} (attempt {r.attempt}) reran trial {r.retry_of}, lost with its node"
            for r in self.trials
            if r.retry_of is not None
        ]
        return lines

    def trial_nodes(self) -> list[list[str]]:
        """trial, status, node, host, attempt: one row per trial."""
        return [
            [
                str(r.number),
                r.status,
                r.node[:12] or "-",
                r.host or "-",
                str(r.attempt) + (" (retried)" if r.retried else ""),
            ]
            for r in sorted(self.trials, key=lambda r: r.number)
        ]

    def table(self) -> Any:
        from rich import box
        from rich.markup import escape
        from rich.table import Table

        table = Table(
            title=f"{self.title}",
            title_justify="left",
            caption="\n".join(self.summary_lines()),
            caption_justify="left",
            box=box.SIMPLE_HEAD,  # NOTE: one space between columns, as the compress report's table
            show_edge=False,
            padding=(0, 0),
        )
        for i, col in enumerate(self.COLUMNS):
            # NOTE: fits 80 columns (a pipe, a narrow terminal): a number never wraps or is cut (its
            # header breaks at spaces instead), the configuration takes the rest and folds
            last = i == len(self.COLUMNS) - 1
            table.add_column(
                col if last else col.replace(" ", "\n"),
                justify="left" if i in (0, 1) or last else "right",
                no_wrap=not last,
                overflow="fold" if last else "ellipsis",
                ratio=1 if last else None,
            )
        for row in self.rows():
            table.add_row(*(escape(c) for c in row[:-1]), _Configuration(row[-1]))
        return table

    def markdown(self) -> str:
        lines = [
            f"# {self.title}",
            "",
            *[f"{line}  " for line in self.summary_lines()],
            "",
            "| " + " | ".join(self.COLUMNS) + " |",
            "|" + "|".join("---" for _ in self.COLUMNS) + "|",
        ]
        lines += [
            "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows()
        ]
        lines += [
            "",
            "`*` best, `P` on the Pareto front. Sizes: ONNX files on disk. Latency: ONNX Runtime, CPU, batch 1, median "
            "(measured inside each trial while other trials run; the best's is re-measured alone).",
            "",
        ]
        lines += ["## Pareto front", ""] + [
            f"- trial {r.number}: {self.metric} {_f(r.metric)}, {_f((r.size_bytes or 0) / 1e6, '.3f')} MB, "
            f"{_f(r.latency_ms, '.3f')} ms: {r.options()}"
            for r in self.pareto
        ]
        lines += [
            "",
            "## Search space",
            "",
            "```json",
            json.dumps(self.space, indent=1, default=str),
            "```",
        ]
        if self.notes:
            lines += ["", *[f"- {n}" for n in self.notes]]
        if self.left_out:
            lines += [
                "",
                "## Left out of the search space",
                "",
                *[f"- {name}: {why}" for name, why in self.left_out.items()],
            ]
        if self.cluster:
            lines += [
                "",
                "## Where the trials ran",
                "",
                *[f"- {line}" for line in self.placement_lines()],
                "",
                "| trial | status | node | host | attempt |",
                "|---|---|---|---|---|",
                *["| " + " | ".join(row) + " |" for row in self.trial_nodes()],
            ]
        if self.dashboard:
            lines += [
                "",
                f"Live dashboard (optuna-dashboard, while the tune ran): {self.dashboard}",
            ]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "status": self.status,
            "metric": self.metric,
            "objective": self.objective,
            "max_drop": self.max_drop,
            "baseline": self.baseline,
            "best": self.best.to_dict() if self.best else None,
            "meets": bool(self.best and self.best.meets),
            "pareto": [r.number for r in self.pareto],
            "trials": [r.to_dict() for r in self.trials],
            "space": self.space,
            "verification": self.verification,
            "notes": self.notes,
            "left_out": self.left_out,
            "dashboard": self.dashboard,
            "cluster": self.cluster,
        }

    def svg_chart(self, width: int = 620, height: int = 360) -> str:
        """Metric vs size: every completed trial, the Pareto front joined, the best ringed."""
        points = [
            r for r in self.trials if r.status == "ok" and r.metric is not None and r.size_bytes
        ]
        if not points:
            return ""
        pad = 55
        xs = [r.size_bytes / 1e6 for r in points] + [self.baseline.get("size_bytes", 0) / 1e6]  # type: ignore[operator]
        ys = [r.metric for r in points] + [self.baseline.get("metric", 0.0)]
        x1 = max(xs) * 1.1 or 1.0
        y0, y1 = _padded_range(ys)  # type: ignore[arg-type]

        def sx(v: float) -> float:
            return pad + v / x1 * (width - 2 * pad)

        def sy(v: float) -> float:
            return height - pad - (v - y0) / (y1 - y0) * (height - 2 * pad)  # type: ignore[operator]

        parts = _svg_frame(width, height, pad, self.metric)
        for i in range(5):
            xv, yv = x1 * i / 4, y0 + (y1 - y0) * i / 4  # type: ignore[operator]
            parts.append(
                f'<text x="{sx(xv):.1f}" y="{height - pad + 14}" text-anchor="middle">{xv:.2f}</text>'
            )
            parts.append(
                f'<text x="{pad - 4}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.3f}</text>'
            )
        limit = (
            self.baseline.get("metric", 0.0) - self.max_drop
            if not lower_is_better(self.metric)
            else self.baseline.get("metric", 0.0) + self.max_drop
        )
        if y0 <= limit <= y1:  # type: ignore[operator]
            parts.append(
                f'<line x1="{pad}" y1="{sy(limit):.1f}" x2="{width - pad}" y2="{sy(limit):.1f}" stroke="#999" stroke-dasharray="5 4"/>'
                f'<text x="{width - pad}" y="{sy(limit) - 4:.1f}" text-anchor="end" fill="#666">criterion</text>'
            )
        front = sorted(self.pareto, key=lambda r: r.size_bytes or 0)
        if front:
            path = " ".join(f"{sx(r.size_bytes / 1e6):.1f},{sy(r.metric):.1f}" for r in front)  # type: ignore[operator,arg-type]
            parts.append(
                f'<polyline points="{path}" fill="none" stroke="#d0553f" stroke-width="1.5"/>'
            )
        for r in points:
            colour = "#d0553f" if r in front else "#4a7fb0"
            parts.append(
                f'<circle cx="{sx(r.size_bytes / 1e6):.1f}" cy="{sy(r.metric):.1f}" r="4" fill="{colour}"><title>trial {r.number}: '  # type: ignore[operator,arg-type]
                f"{html.escape(r.options())}</title></circle>"
            )
        bx, by = sx(self.baseline.get("size_bytes", 0) / 1e6), sy(self.baseline.get("metric", 0.0))
        parts.append(
            f'<rect x="{bx - 4:.1f}" y="{by - 4:.1f}" width="8" height="8" fill="black"/><text x="{bx - 6:.1f}" '
            f'y="{by - 8:.1f}" text-anchor="end">source</text>'
        )
        if self.best is not None and self.best.size_bytes and self.best.metric is not None:
            parts.append(
                f'<circle cx="{sx(self.best.size_bytes / 1e6):.1f}" cy="{sy(self.best.metric):.1f}" r="8" fill="none" stroke="black" stroke-width="2"/>'
            )
        parts.append("</svg>")
        return "".join(parts)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(c)}</th>" for c in self.COLUMNS)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in self.rows()
        )
        summary = "".join(f"<p>{html.escape(line)}</p>" for line in self.summary_lines())
        return (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(self.title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:last-child{text-align:left}</style>"
            f"</head><body><h1>{html.escape(self.title)}</h1>{summary}{self._dashboard_link()}"
            f"<h2>Pareto front: {html.escape(self.metric)} vs size</h2>{self.svg_chart()}"
            "<p>Red: the Pareto front; ringed: the best; black square: the source; dashed: the criterion.</p>"
            f"<h2>Trials</h2><table><tr>{head}</tr>{body}</table>{self._placement_html()}</body></html>\n"
        )

    def _placement_html(self) -> str:
        """The "Where the trials ran" section."""
        parts = []
        if self.cluster:
            head = "".join(f"<th>{c}</th>" for c in ("trial", "status", "node", "host", "attempt"))
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in self.trial_nodes()
            )
            parts.append(
                "<h2 id='placement'>Where the trials ran</h2>"
                + "".join(f"<p>{html.escape(line)}</p>" for line in self.placement_lines())
                + f"<table><tr>{head}</tr>{body}</table>"
            )
        return "".join(parts)

    def _dashboard_link(self) -> str:
        if not self.dashboard:
            return ""
        url = html.escape(self.dashboard, quote=True)
        return (
            f'<p>Live dashboard (optuna-dashboard, while the tune ran): <a href="{url}">{url}</a>; '
            "<code>modelpress dashboard OUT_DIR</code> serves it again.</p>"
        )

    def write(self, folder: str | os.PathLike[str]) -> dict[str, Path]:
        return write_reports(folder, self.markdown(), self.to_json(), self.html())
