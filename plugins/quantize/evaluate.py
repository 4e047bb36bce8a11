"""Scoring a quantized candidate against the float model on the calibration data, by the
per-output criteria of :mod:`modelpress.criteria` (the ones export verification uses too)."""

from __future__ import annotations

from collections.abc import Mapping

from modelpress.plugin_api import (
    Dataset,
    Judgement,
    Model,
    infer_criteria,
    judge,
    make_session,
    run_dataset,
)

__all__ = ["Scorer"]


class Scorer:
    """Float outputs computed once; ``score(candidate)`` judges it output by output."""

    def __init__(
        self,
        reference: Model,
        data: Dataset,
        min_agreement: float | None,
        min_cosine: float | None,
        *,
        max_relative_error: float | None = 0.1,
        criteria: Mapping[str, str] | None = None,
        batch_size: int = 64,
    ):
        self.data = data
        self.batch_size = batch_size
        self.names = reference.signature.output_names
        self.expected = run_dataset(make_session(reference), data.batches(batch_size))
        self.criteria = infer_criteria(
            self.names, self.expected, model=reference, overrides=criteria,
            min_agreement=min_agreement, min_cosine=min_cosine, max_relative_error=max_relative_error,
        )
        self.evaluations = 0

    def score(self, candidate: Model) -> Judgement:
        self.evaluations += 1
        actual = run_dataset(make_session(candidate), self.data.batches(self.batch_size))
        return judge(self.criteria, self.expected, actual, self.names)

    @staticmethod
    def meets(judgement: Judgement) -> bool:
        return judgement.met

    @staticmethod
    def loss(judgement: Judgement) -> float:
        return judgement.loss
