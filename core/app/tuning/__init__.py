"""Accuracy-aware tuning and batch compression on Ray (extra ``modelpress[distributed]``).

``import modelpress`` imports this package but neither Ray nor Optuna: they are imported when a
tune or a batch job starts.
"""

from __future__ import annotations

from modelpress.app.tuning.batch import BatchResult, compress_batch
from modelpress.app.tuning.defaults import default_space
from modelpress.app.tuning.report import TrialRecord, TuneReport
from modelpress.app.tuning.space import SearchSpace
from modelpress.app.tuning.study import TuneResult, parse_budget, tune

__all__ = [
    "BatchResult",
    "SearchSpace",
    "TrialRecord",
    "TuneReport",
    "TuneResult",
    "compress_batch",
    "default_space",
    "parse_budget",
    "tune",
]
