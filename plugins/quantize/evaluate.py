"""Scoring a quantized candidate against the float model on the calibration data, by the
per-output criteria of :mod:`modelpress.evaluation.criteria` (the ones export verification uses too):
each output judged by what it is (probabilities and logits by top-1 agreement, regressions by relative
error, embeddings by per-row cosine, dense maps by RMS error over the reference's scale;
``docs/verification.md``).

A candidate's agreement must itself meet the threshold (:data:`ACCEPT_ALPHA`: the flips no more than
the median count of a model exactly at the threshold, 0 of 64 rows at 99 %), not merely be
explained by one (export verification's binomial test at 5 %, which lets 2 of 64 pass): a quantizer
that accepts what chance explains keeps candidates whose true agreement is below the target. On
Magika's byte CNN (256 calibration files, then 64 of them judged) the fully int8 model flipped 2 of 64, passed
that test, and agreed on 98.05 % of 768 held-out files; its Conv in weight-only form, which the
fallback picks once 2 flips fail, flips 0 of 64 and agrees on 99.09 %.

Likewise a cosine criterion is judged on the per-sample mean less one standard error of it
(:data:`ACCEPT_MARGIN`): a mean over a few samples is a lucky draw where one sample's cosine is far
below the rest. On PP-OCR's text-direction classifier (16 calibration crops, a few of them near its
decision boundary) the candidate kept on the plain mean (0.9929 >= 0.99, one crop at 0.92) showed
a cosine of 0.9815 on 64 held-out crops; with the margin the search keeps more nodes off int8 and
the held-out cosine is 0.9943-0.9947 (ORT's ``quantize_dynamic``: 0.9919).

Candidates are judged on the first calibration samples, as many as ``JUDGED_SAMPLES`` and as many as
those whose model outputs fit ``OUTPUT_BUDGET`` (never fewer than ``MIN_JUDGED``): the float outputs of
those are kept (and each candidate's, while it is judged), so memory and time per judgement do not
grow with the calibration set; calibration itself still sweeps every sample."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np

from modelpress.plugin_api import (
    Bounds,
    Dataset,
    Judgement,
    MissBound,
    Model,
    infer_criteria,
    judge,
    make_session,
    run,
    run_dataset,
)

__all__ = ["ACCEPT_ALPHA", "ACCEPT_MARGIN", "JUDGED_SAMPLES", "Scorer", "Unfinished"]

ACCEPT_ALPHA = 0.5
ACCEPT_MARGIN = 1.0  # standard errors of a mean cosine

# NOTE: 256, not 64: a flip rate of 2 % shows no flip in 64 rows 27 % of the time (0.98^64), in 256 rows
# at most 2 flips 12 % of the time. Magika's byte CNN on 3 corpora x 3 seeds: 64 judged let the fully int8
# model (98.05 % on 768 held-out files) through once in 9; 256 judged, never in 6 (the Conv goes weight-only:
# 98.96-99.74 %). Only calibration sets above 64 samples pay for it, one model run per judged sample.
JUDGED_SAMPLES = 256
MIN_JUDGED = 8
# Bytes of float model outputs kept to judge candidates against (YOLOv8n: ~23 samples, PP-OCR det: ~40).
OUTPUT_BUDGET = 16 * 1024 * 1024


class Scorer:
    """Float outputs computed once; ``score(candidate)`` judges it output by output."""

    def __init__(
        self,
        reference: Model,
        data: Dataset,
        bounds: Bounds,
        *,
        criteria: Mapping[str, str] | None = None,
        batch_size: int = 64,
    ):
        # NOTE: not pre-packed: it runs the judged samples once, and packing would copy every float weight
        session = make_session(reference, spin=False, prepack=False)
        first = next(data.batches(1))
        sized = run(session, first)
        per_sample = sum(int(out.nbytes) for out in sized)
        judged = max(MIN_JUDGED, min(JUDGED_SAMPLES, OUTPUT_BUDGET // max(per_sample, 1)))
        self.data = data.take(min(len(data), judged))
        self.batch_size = batch_size
        self.names = reference.signature.output_names
        parts = [
            # NOTE: a first batch of that one sample is not run twice (batch 1: PP-OCR, YOLOv8n, silero-vad)
            sized if i == 0 and _same_feeds(feeds, first) else run(session, feeds)
            for i, feeds in enumerate(self.data.batches(batch_size))
        ]
        self.order = _BatchOrder([[np.shape(o) for o in outs] for outs in parts])
        self.expected = run_dataset(_Replay(parts), [{} for _ in parts])
        del parts, sized
        self.criteria = [
            replace(c, alpha=ACCEPT_ALPHA, margin=ACCEPT_MARGIN)
            for c in infer_criteria(
                self.names, self.expected, model=reference, overrides=criteria, bounds=bounds
            )
        ]
        self.evaluations = 0
        position = {name: i for i, name in enumerate(self.names)}
        self.bounds = [
            (position[c.output], MissBound(c, self.expected[position[c.output]]))
            for c in self.criteria
        ]

    def score(self, candidate: Model, *, stop_early: bool = False) -> Judgement:
        """The candidate's judgement on the judged samples. ``stop_early``: the sweep ends as soon as
        the samples run decide that it misses (:class:`~modelpress.plugin_api.MissBound`), and
        an :class:`Unfinished` judgement says so (:meth:`finish` gives its figures); its batches
        run in :class:`_BatchOrder`'s order (those that came nearest to a miss before first), the
        judgement of a full sweep made on its outputs in the samples' order, as in order."""
        self.evaluations += 1
        session = make_session(candidate, spin=False)
        if not stop_early:
            actual = run_dataset(session, self.data.batches(self.batch_size))
            return judge(self.criteria, self.expected, actual, self.names)
        for _, bound in self.bounds:
            bound.reset()
        batches = list(self.data.batches(self.batch_size))
        parts: list[list[np.ndarray] | None] = [None] * len(batches)
        for b in self.order.next():
            parts[b] = run(session, batches[b])
            if self._missed(b, parts[b]):  # type: ignore[arg-type]
                return Unfinished(tuple(self.criteria), tuple(float("nan") for _ in self.criteria))
        actual = run_dataset(_Replay(parts), [{} for _ in parts])  # NOTE: joined as in order
        return judge(self.criteria, self.expected, actual, self.names)

    def _missed(self, batch: int, outputs: list[np.ndarray]) -> bool:
        """Whether the judged batches so far, ``batch`` last, decide a miss; the share of the
        criteria's allowance ``batch`` used is recorded for the next sweeps' order."""
        spent = [bound.spent for _, bound in self.bounds]
        # NOTE: every bound takes the batch (a list, not any() over a generator)
        missed = any(
            [bound.add(outputs[i], self.order.start(batch, i)) for i, bound in self.bounds]
        )
        used = [bound.spent - s for (_, bound), s in zip(self.bounds, spent, strict=True)]
        self.order.record(batch, max(used, default=0.0))
        return missed

    def finish(self, candidate: Model) -> Judgement:
        """The full judgement of a candidate whose :meth:`score` stopped early (not counted again)."""
        self.evaluations -= 1
        return self.score(candidate)

    @staticmethod
    def meets(judgement: Judgement) -> bool:
        return judgement.met

    @staticmethod
    def loss(judgement: Judgement) -> float:
        return judgement.loss


class _BatchOrder:
    """The order a stopping sweep runs the judged batches in: those that used most of the criteria's
    allowance (:attr:`MissBound.spent`) in the sweeps so far first, those not run yet at the mean
    of those run, ties in the samples' order; the first sweep in the samples' order. Reordered only
    where every output's batches are rows of one shape, so that each batch's rows have a fixed place
    (``start``) in the reference; otherwise always in order."""

    def __init__(self, shapes: list[list[tuple[int, ...]]]):
        self.count = len(shapes)
        self.harm = np.zeros(self.count)
        self.seen = np.zeros(self.count, bool)
        self.starts: list[list[int]] | None = None
        # NOTE: parts of one shape past axis 0 are joined by concatenation along it (run_dataset)
        if shapes and all(
            all(len(s) >= 1 and s[1:] == parts[0][1:] for s in parts)
            for parts in zip(*shapes, strict=True)
        ):
            rows = np.array([[s[0] for s in batch] for batch in shapes], np.int64)
            rows = rows.reshape(self.count, -1)
            self.starts = (np.cumsum(rows, axis=0) - rows).tolist()

    def next(self) -> list[int]:
        if self.starts is None or not self.seen.any():
            return list(range(self.count))
        guess = float(self.harm[self.seen].mean())
        harm = np.where(self.seen, self.harm, guess)
        return sorted(range(self.count), key=lambda b: (-harm[b], b))

    def start(self, batch: int, output: int) -> int | None:
        """Where ``batch``'s rows of ``output`` start in the reference (None: after those taken so far)."""
        return None if self.starts is None else self.starts[batch][output]

    def record(self, batch: int, spent: float) -> None:
        self.harm[batch] += spent
        self.seen[batch] = True


def _same_feeds(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


class _Replay:
    """An ORT session's stand-in that hands back outputs already computed, one run at a time: through
    :func:`run_dataset`, the outputs of batches run out of order are joined exactly as a sweep in order joins them."""

    def __init__(self, parts: list) -> None:  # type: ignore[type-arg]
        self.parts = iter(parts)

    def run(self, names: object, feeds: object, options: object = None) -> list:  # type: ignore[type-arg]
        return next(self.parts)


class Unfinished(Judgement):
    """A candidate's judgement whose sweep stopped once the samples run decided it misses: not met,
    its figures (and :attr:`loss`) unknown until :meth:`Scorer.finish` runs the rest."""

    @property
    def met(self) -> bool:
        return False

    @property
    def loss(self) -> float:
        return float("inf")
