"""Strategies: which configuration a tune tries next, and which trial is the best.

* ``pareto``: seeds (the first point of each pipeline whose method declares ``Tuning(seed=True)``, then
  each pipeline's most aggressive point), then the
  Optuna sampler of the study (TPE; NSGA-II for two objectives besides the metric).
* ``accuracy-first`` (INC's basic strategy): the space's ladder, most aggressive first, one knob at
  a time, then the fallback ladder along the measured sensitivity on the best configuration; stops
  at the first configuration that meets the criterion.

Configurations interrupted in an earlier run go first.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal

from modelpress.app.tuning.report import TrialRecord
from modelpress.app.tuning.space import Fallback, SearchSpace

if TYPE_CHECKING:
    from modelpress.app.tuning.runner import Runner

__all__ = ["Plan", "Strategy", "config_key", "pick_best", "seeds"]

Strategy = Literal["pareto", "accuracy-first"]


class Plan:
    """Which configuration to try next: retries of interrupted trials, then the strategy's."""

    def __init__(self, runner: Runner, retry: list[dict[str, Any]]):
        self.runner, self.space, self.sensitivity, self.tracker = (
            runner,
            runner.space,
            runner.sensitivity,
            runner.store,
        )
        self.strategy: Strategy = runner.run.settings.strategy
        self.queue: list[dict[str, Any]] = list(retry)
        self.exhausted = False
        self.why_stopped = ""
        self.fallback_added = False
        self.repeats = 0
        tried = {config_key(t.user_attrs.get("config") or {}) for t in self.tracker.finished()}
        start = (
            self.space.ladder(self.sensitivity)
            if self.strategy == "accuracy-first"
            else seeds(self.space, self.sensitivity)
        )
        self.queue += [c for c in start if config_key(c) not in tried]

    def _met(self) -> bool:
        return any(r.meets for r in self.runner.records())

    def submit_next(self) -> bool:
        if self.strategy == "accuracy-first" and self._met():
            self.exhausted, self.why_stopped = (
                True,
                "accuracy-first: a configuration meets the criterion",
            )
            return False
        if not self.queue and self.strategy == "accuracy-first":
            if self.runner.executor.running:
                return (
                    False  # NOTE: the fallback ladder starts from the best measured configuration
                )
            if not self.fallback_added:
                self.fallback_added = True
                self.queue += self._fallback_ladder()
            if not self.queue:
                self.exhausted, self.why_stopped = (
                    True,
                    "accuracy-first: every configuration and fallback step tried",
                )
                return False
        ran = self.runner.submit(self.queue.pop(0)) if self.queue else self.runner.submit()
        self.repeats = 0 if ran else self.repeats + 1
        if self.repeats >= 30:
            self.exhausted, self.why_stopped = (
                True,
                "search space exhausted (the sampler only proposes configurations already tried)",
            )
        return ran

    def _fallback_ladder(self) -> list[dict[str, Any]]:
        """Keep the k most sensitive nodes in float, k growing, on the best-metric configuration that has a fallback."""
        records = [
            r
            for r in self.runner.records()
            if r.status == "ok" and self.space.pipeline(r.pipeline).has_fallback
        ]
        if not records:
            return []
        best = min(records, key=lambda r: r.drop if r.drop is not None else 1e9)
        tried = {config_key(t.user_attrs.get("config") or {}) for t in self.tracker.finished()}
        configs = []
        for key, param in self.space.pipeline(best.pipeline).params().items():
            if isinstance(param, Fallback):
                n = len(self.sensitivity.get(best.pipeline, []))
                for k in param.steps(n):
                    config = {**best.config, f"{best.pipeline}:{key}": k}
                    if config_key(config) not in tried:
                        configs.append(config)
        return configs


def seeds(space: SearchSpace, sensitivity: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Known points to start from: the seed pipelines' first points (no fallback), then each pipeline's most
    aggressive point; the sampler explores from there."""
    first = [
        {
            "pipeline": p.name,
            **{
                f"{p.name}:{k}": (0 if isinstance(param, Fallback) else param.grid()[0])
                for k, param in p.params().items()
            },
        }
        for p in space.pipelines
        if p.seed
    ]
    aggressive = [
        c
        for c in space.ladder(sensitivity)
        if all(
            v == space.pipeline(c["pipeline"]).params()[k.split(":", 1)[1]].grid()[0]
            for k, v in c.items()
            if k != "pipeline"
        )
    ]
    return list(dict((config_key(c), c) for c in first + aggressive).values())


def config_key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=str)


def pick_best(
    records: list[TrialRecord], objective: str, baseline: dict[str, Any]
) -> TrialRecord | None:
    """Meeting the criterion: the smallest / fastest / best sum of ratios; else the smallest drop."""
    done = [r for r in records if r.status == "ok"]
    if not done:
        return None
    meeting = [r for r in done if r.meets]
    if not meeting:
        return min(done, key=lambda r: (r.drop, r.size_bytes))
    if objective == "size":
        return min(meeting, key=lambda r: (r.size_bytes, r.drop, r.latency_ms))
    if objective == "latency":
        return min(meeting, key=lambda r: (r.latency_ms, r.drop, r.size_bytes))
    return min(
        meeting,
        key=lambda r: (
            r.size_bytes / baseline["size_bytes"] + r.latency_ms / baseline["latency_ms"],
            r.drop,
        ),
    )
