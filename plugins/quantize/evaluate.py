"""Scoring a quantized candidate against the float model on the calibration data."""

from __future__ import annotations

import numpy as np

from modelpress.data import Dataset
from modelpress.model import Model
from modelpress.runtime import make_session, run_dataset
from modelpress.verify import compare_outputs

__all__ = ["Scorer"]


class Scorer:
    """Float outputs computed once; ``score(candidate)`` gives its agreement and cosine."""

    def __init__(self, reference: Model, data: Dataset, min_agreement: float | None, min_cosine: float | None, *, batch_size: int = 64):
        self.data = data
        self.batch_size = batch_size
        self.names = reference.signature.output_names
        self.expected = run_dataset(make_session(reference), data.batches(batch_size))
        self.min_agreement = min_agreement
        self.min_cosine = min_cosine

    def score(self, candidate: Model) -> dict[str, float]:
        actual = run_dataset(make_session(candidate), self.data.batches(self.batch_size))
        comparison = compare_outputs(self.names, self.expected, actual)
        figures = {"cosine": comparison.cosine}
        if comparison.top1_agreement is not None:
            figures["agreement"] = comparison.top1_agreement
        if not comparison.finite:
            figures["cosine"] = -1.0
        return figures

    def meets(self, figures: dict[str, float]) -> bool:
        if self.min_cosine is not None and figures["cosine"] < self.min_cosine:
            return False
        agreement = figures.get("agreement")
        return not (self.min_agreement is not None and agreement is not None and agreement < self.min_agreement)

    @staticmethod
    def loss(figures: dict[str, float]) -> float:
        return float((1.0 - figures["cosine"]) + (1.0 - figures.get("agreement", 1.0)) + np.finfo(np.float32).eps)
