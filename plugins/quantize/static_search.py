"""int8-static's configuration search: a few configurations tried, the best on held-out data kept.

No single setting of the switches that matter suits every model: SmoothQuant helps a transformer and
costs a byte-classifier CNN 1.2 points of agreement; ``minmax`` ranges keep that CNN at 100 % where
``percentile`` clips it, and lose on PP-OCR cls and YOLOv8n. So, with ``search_config=True`` (off by
default: it costs up to 1.4x the pass's CPU) and calibration data given (as
Intel Neural Compressor's accuracy-aware tuning and NNCF's parameter search do), the options the user did
not set among ``smoothquant`` (on, off) and ``calibrator`` (``percentile``, ``minmax``) are searched:
each candidate is calibrated on the first samples and judged, fully quantized, on the held-out rest
(a quarter, at most :data:`MAX_HELD_OUT`; with fewer than :data:`MIN_SAMPLES` samples, none: the
defaults stand) by the output-kind-aware criteria of
:mod:`modelpress.evaluation.criteria` (agreement for probabilities and logits, cosine for embeddings,
relative error for regressions: the sum of shortfalls, :attr:`Judgement.loss`, plus, for agreement
outputs, the relative error's square over two, so that a near-tie that did not flip still counts).
Statistics are collected once per SmoothQuant setting and every calibrator's ranges come from the
same histograms. The default (``percentile`` with SmoothQuant) is tried first and wins near-ties (another
candidate must score :data:`MARGIN` lower). The
rest of the pass then calibrates the chosen configuration on all the samples (SmoothQuant's scales and
GPTQ codes, when chosen, are the search's own: not searched again). An option the user set is
never searched. Figure: ``configuration`` (the
options chosen, why, each candidate's held-out score).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from modelpress.plugin_api import (
    Bounds,
    Dataset,
    Model,
    PassContext,
    judge,
    make_session,
    run_dataset,
)
from modelpress.plugins.quantize.evaluate import Scorer

__all__ = ["MARGIN", "MAX_HELD_OUT", "MIN_SAMPLES", "Search", "choose_configuration", "split"]

MAX_HELD_OUT = 64
# NOTE: fewer calibration samples than this: nothing is held out, the defaults stand. With 16 (the zoo's), 4 held out
# could not tell candidates apart: MTCNN ONet's minmax scored 3.5 % below the default there and lost 0.001 of box
# cosine on 16 other crops.
MIN_SAMPLES = 32
# NOTE: a candidate replaces the default only when its held-out score is this much lower (a near-tie is noise)
MARGIN = 0.1

Candidates = Callable[
    [Model, Any, Dataset, PassContext, list[str]], Iterator[tuple[str, Model | tuple[bool, str]]]
]


@dataclass(frozen=True)
class Search:
    """What the search needs: the float model (the reference), the model to quantize (embedding
    tables done), the calibration data, the options as given, the pass context, and ``candidates``:
    ``(model, options, data, ctx, calibrators)`` -> each calibrator's fully quantized model (or the
    ``(smoothquant, calibrator)`` of an earlier candidate that is the same: not built or judged twice)."""

    reference: Model
    model: Model
    data: Dataset
    opts: Any
    ctx: PassContext
    candidates: Candidates


def split(data: Dataset, n: int) -> tuple[Dataset, Dataset]:
    """The first ``n`` samples and the rest."""
    head, tail, left = [], [], n
    for run in data.runs:
        if left >= len(run):
            head.append(run)
        elif left <= 0:
            tail.append(run)
        else:
            head.append(run.take(left))
            rest = {k: v[left:] for k, v in run.inputs.items()}
            labels = run.labels[left:] if run.labels is not None else None
            tail.append(replace(run, inputs=rest, labels=labels))
        left -= len(run)
    return (
        Dataset(runs=tuple(head), max_batch=data.max_batch),
        Dataset(runs=tuple(tail), max_batch=data.max_batch),
    )


def _grid(opts: Any) -> list[tuple[bool, list[str]]]:
    """(SmoothQuant, calibrators) to try: only the options the user did not set, the default first."""
    given = opts.model_fields_set
    smooth = [opts.smoothquant] if "smoothquant" in given else [True, False]
    calibrators = [opts.calibrator] if "calibrator" in given else ["percentile", "minmax"]
    return [(s, calibrators) for s in smooth]


def _label(smoothquant: bool, calibrator: str) -> str:
    return f"calibrator={calibrator}, smoothquant={'on' if smoothquant else 'off'}"


def _held_out(data: Dataset) -> int:
    """How many samples to hold out (0: too few to hold any out)."""
    n = len(data)
    if n < MIN_SAMPLES:
        return 0
    held = min(MAX_HELD_OUT, n // 4)
    step = data.max_batch if data.max_batch and data.max_batch > 1 else 1
    held -= held % step
    return held if n - held >= step else 0


def _score(scorer: Scorer, candidate: Model) -> tuple[float, str]:
    """The candidate's held-out score (lower is better) and the criteria's summary."""
    # NOTE: not pre-packed: each candidate runs its few held-out batches once
    session = make_session(candidate, spin=False, prepack=False)
    actual = run_dataset(session, scorer.data.batches(scorer.batch_size))
    judgement = judge(scorer.criteria, scorer.expected, actual, scorer.names)
    position = {name: i for i, name in enumerate(scorer.names)}
    ties = 0.0
    for c in scorer.criteria:
        if c.metric == "agreement":
            i = position[c.output]
            ties += (
                replace(c, metric="relative_error").measure(scorer.expected[i], actual[i]) ** 2 / 2
            )
    return judgement.loss + ties, judgement.summary()


def choose_configuration(search: Search) -> Any:
    """``search.opts`` with the searched options set to the candidate best on held-out data (as
    given when nothing is searched or the data is too small to hold samples out)."""
    opts, ctx = search.opts, search.ctx
    grid = _grid(opts)
    if not opts.search_config or (len(grid) == 1 and len(grid[0][1]) == 1):
        return opts
    held = _held_out(search.data)
    if not held:
        ctx.figures["configuration"] = {
            "chosen": _label(opts.smoothquant, opts.calibrator),
            "why": f"the defaults: {len(search.data)} calibration samples are too few to hold "
            f"{MIN_SAMPLES // 4} or more out ({MIN_SAMPLES} needed)",
        }
        return opts
    fit, held_out = split(search.data, len(search.data) - held)
    saved = dict(
        ctx.figures
    )  # NOTE: the candidates' own figures (SmoothQuant's alphas...) are not the result's
    bounds = Bounds(
        agreement=opts.min_agreement, cosine=opts.min_cosine, relative_error=opts.max_relative_error
    )
    scorer = Scorer(
        search.reference, held_out, bounds, criteria=opts.criteria, batch_size=opts.batch_size
    )
    scores: dict[tuple[bool, str], tuple[float, str]] = {}
    with ctx.progress("choosing the configuration", total=sum(len(c) for _, c in grid)) as advance:
        for smoothquant, calibrators in grid:
            each = opts.model_copy(update={"smoothquant": smoothquant})
            for calibrator, model in search.candidates(search.model, each, fit, ctx, calibrators):
                same = isinstance(model, tuple)
                scores[(smoothquant, calibrator)] = scores[model] if same else _score(scorer, model)
                advance(1)
    ctx.figures.clear()
    ctx.figures.update(saved)
    default = next(iter(scores))
    best = min(scores, key=lambda k: scores[k][0])
    if scores[best][0] > (1 - MARGIN) * scores[default][0]:
        best = default  # NOTE: the default wins near-ties
    why = (
        f"smallest held-out shortfall on {len(scorer.data)} samples not calibrated on ({scores[best][1]})"
        if best != default or scores[default][0] <= min(v[0] for v in scores.values())
        else f"the default: no candidate scored {MARGIN:.0%} below it on {len(scorer.data)} held-out samples "
        f"({scores[best][1]})"
    )
    if best != default:
        why += f"; the default {_label(*default)} scored {scores[default][0]:.4g} against {scores[best][0]:.4g}"
    ctx.figures["configuration"] = {
        "chosen": _label(*best),
        "why": why,
        "candidates": {_label(*k): round(v[0], 6) for k, v in scores.items()},
    }
    return opts.model_copy(update={"smoothquant": best[0], "calibrator": best[1]})
