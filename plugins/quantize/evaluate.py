"""Scoring a quantized candidate against the float model on the calibration data, by the
per-output criteria of :mod:`modelpress.evaluation.criteria` (the ones export verification uses too):
each output judged by what it is (probabilities and logits by top-1 agreement under a binomial
test on the judged rows, regressions by relative error, embeddings by per-row cosine, dense maps by
RMS error over the reference's scale; ``docs/verification.md``).

Candidates are judged on the first calibration samples, as many as ``JUDGED_SAMPLES`` and as
whose model outputs fit ``OUTPUT_BUDGET`` (never fewer than ``MIN_JUDGED``): the float outputs of
those are kept (and each candidate's, while it is judged), so memory and time per judgement do not
grow with the calibration set; calibration itself still sweeps every sample."""

from __future__ import annotations

from collections.abc import Mapping

from modelpress.plugin_api import (
    Bounds,
    Dataset,
    Judgement,
    Model,
    infer_criteria,
    judge,
    make_session,
    run,
    run_dataset,
)

__all__ = ["JUDGED_SAMPLES", "Scorer"]

JUDGED_SAMPLES = 64
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
        per_sample = sum(int(out.nbytes) for out in run(session, next(data.batches(1))))
        judged = max(MIN_JUDGED, min(JUDGED_SAMPLES, OUTPUT_BUDGET // max(per_sample, 1)))
        self.data = data.take(min(len(data), judged))
        self.batch_size = batch_size
        self.names = reference.signature.output_names
        self.expected = run_dataset(session, self.data.batches(batch_size))
        self.criteria = infer_criteria(
            self.names, self.expected, model=reference, overrides=criteria, bounds=bounds
        )
        self.evaluations = 0

    def score(self, candidate: Model) -> Judgement:
        self.evaluations += 1
        actual = run_dataset(
            make_session(candidate, spin=False), self.data.batches(self.batch_size)
        )
        return judge(self.criteria, self.expected, actual, self.names)

    @staticmethod
    def meets(judgement: Judgement) -> bool:
        return judgement.met

    @staticmethod
    def loss(judgement: Judgement) -> float:
        return judgement.loss
