"""Submits configurations as trials on the executor and records their outcomes in the study."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from modelpress.app.tuning.inputs import atomic_write
from modelpress.app.tuning.report import TrialRecord
from modelpress.app.tuning.space import _encode
from modelpress.app.tuning.trial import drop, run_trial

if TYPE_CHECKING:
    from modelpress.app.tuning.inputs import TuneRun

__all__ = ["Runner", "record"]


class Runner:
    """Starts trials (the configuration given, or the sampler's) and records how each one ended.

    ``sensitivity``: pipeline name -> the ranking its fallback walks; ``submit_args``: what every trial
    gets besides its passes (the model and data references, the evaluation settings, the baseline).
    """

    def __init__(
        self, run: TuneRun, sensitivity: dict[str, list[str]], submit_args: dict[str, Any]
    ):
        self.run, self.sensitivity, self.submit_args = run, sensitivity, submit_args
        self.store, self.space, self.executor, self.board = (
            run.store,
            run.space,
            run.executor,
            run.board,
        )
        self.session = run.store.session
        self.live: dict[int, Any] = {}
        (run.out / "trials").mkdir(exist_ok=True)

    def submit(self, fixed: dict[str, Any] | None = None) -> bool:
        """Start a trial (``fixed``: this configuration, else the sampler's); False if it repeated a finished one."""
        store = self.store
        if fixed:
            store.study.enqueue_trial(
                {
                    k: _encode(v)
                    for k, v in fixed.items()
                    if k != "pipeline" or len(self.space.pipelines) > 1
                }
            )
        trial = store.ask()
        config = self.space.suggest(trial, self.sensitivity)
        # NOTE: a configuration runs once, whichever driver of the study proposes it (a claim in the study's database);
        # samplers re-propose tried points in small spaces: reuse the earlier result, don't rerun
        earlier = store.claim(trial, config)
        if earlier is not None:
            store.set(trial, config=config, status="duplicate", duplicate_of=earlier.number)
            if (
                earlier.state == store.state("COMPLETE")
                and earlier.user_attrs.get("status") == "ok"
            ):
                store.tell(trial, list(earlier.values or []))
            else:
                store.tell(
                    trial,
                    state=earlier.state
                    if earlier.state == store.state("PRUNED")
                    else store.state("FAIL"),
                )
            return False
        self._start(trial, config)
        return True

    def _start(self, trial: Any, config: dict[str, Any], **attrs: Any) -> None:
        """Submit the trial's passes to the executor (``attrs``: more to record, e.g. which trial this one retries)."""
        passes = [
            p.model_dump(exclude_none=True) for p in self.space.passes(config, self.sensitivity)
        ]
        self.store.set(
            trial, config=config, passes=passes, status="running", session=self.session, **attrs
        )
        self.live[trial.number] = trial
        settings = self.run.settings
        self.executor.submit(
            trial.number,
            run_trial,
            passes=passes,
            timeout_s=settings.trial_timeout,
            memory_mb=settings.trial_memory_mb,
            **self.submit_args,
        )
        self.board.started(trial.number, config)
        self.run.registry.hook.modelpress_trial_start(
            trial_id=self._trial_id(trial.number), config=config, passes=passes
        )

    def _retry(self, lost: Any) -> None:
        """Run a trial lost with its node again, as a new trial of the same configuration (Ray places it on a live node)."""
        store = self.store
        config = store.trials[lost.number].user_attrs["config"]
        store.study.enqueue_trial(
            {
                k: _encode(v)
                for k, v in config.items()
                if k != "pipeline" or len(self.space.pipelines) > 1
            }
        )
        trial = store.ask()
        self.space.suggest(
            trial, self.sensitivity
        )  # NOTE: the enqueued parameters: the same configuration
        attempt = int(store.trials[lost.number].user_attrs.get("attempt", 1)) + 1
        self._start(trial, config, retry_of=lost.number, attempt=attempt)
        self.board.log(
            f"trial {lost.number} lost with its node; retried as trial {trial.number} (attempt {attempt})"
        )

    def _trial_id(self, number: int) -> str:
        return f"{self.store.study.study_name}/{number}"

    def collect(self, outcomes: list[Any]) -> None:
        for outcome in outcomes:
            # NOTE: live until recorded: a Ctrl-C between taking an outcome and telling the study left a
            # trial RUNNING with status "ok" (the resumed driver ran its configuration again); abandon()
            # records whatever is still live as interrupted
            trial = self.live[outcome.job.key]
            value = outcome.value if outcome.ok else None
            common: dict[str, Any] = {
                "seconds": round(outcome.seconds, 3),
                **{k: outcome.timing[k] for k in ("node", "host") if k in outcome.timing},
            }
            if outcome.timing:
                common["timing"] = {
                    **{
                        k: v
                        for k, v in outcome.timing.items()
                        if k not in ("began", "ended", "node", "host")
                    },
                    "phases": (value or {}).get("phases", {}),
                }
            # NOTE: a trial lost with its node is recorded (failed, "node lost") and run again, up to --trial-retries times
            retry = (
                outcome.node_lost
                and int(self.store.trials[trial.number].user_attrs.get("attempt", 1))
                <= self.run.settings.trial_retries
            )
            self._tell(
                trial, value, outcome.error, {**common, **({"retried": True} if retry else {})}
            )
            self.live.pop(outcome.job.key)
            if retry:
                self._retry(trial)
            self.board.finished(self.record(self.store.trials[trial.number]))
            attrs = self.store.trials[trial.number].user_attrs
            figures = {
                k: attrs[k]
                for k in (
                    "metric",
                    "size_bytes",
                    "latency_ms",
                    "error",
                    "floor_missed",
                    "text",
                    "text_missed",
                    "seconds",
                )
                if k in attrs
            }
            self.run.registry.hook.modelpress_trial_finish(
                trial_id=self._trial_id(trial.number),
                status=attrs.get("status", "failed"),
                figures=figures,
            )

    def _tell(
        self, trial: Any, value: dict[str, Any] | None, error: str, common: dict[str, Any]
    ) -> None:
        """Record one trial's end in the study: failed, pruned (cut early) or measured."""
        store = self.store
        if value is None:
            store.set(trial, **common, error=error, status="failed")
            store.tell(trial, state=store.state("FAIL"))
        elif value["status"] == "pruned":
            store.set(
                trial, **common, metric=value["metric"], error=value["reason"], status="pruned"
            )
            store.tell(trial, state=store.state("PRUNED"))
        else:
            atomic_write(self.run.out / "trials" / f"trial-{trial.number:04d}.onnx", value["model"])
            figures = json.loads(json.dumps(_slim(value["figures"]), default=str))
            # NOTE: drop and meets too: the dashboard shows user attributes as they are
            worse = drop(
                self.run.inputs.evaluate.metric, self.submit_args["baseline"], value["metric"]
            )
            store.set(
                trial,
                **common,
                **{
                    k: value[k]
                    for k in (
                        "metric",
                        "size_bytes",
                        "latency_ms",
                        "parameters",
                        "floor_missed",
                        "text",
                        "text_missed",
                    )
                    if k in value
                },
                drop=worse,
                # NOTE: a text decoder's trial that misses its passes' text floor does not meet the criterion
                meets=worse <= self.run.settings.max_drop + 1e-12 and not value.get("text_missed"),
                figures=figures,
                status="ok",
            )
            objectives = {
                "size": [value["size_bytes"] / 1e6],
                "latency": [value["latency_ms"]],
                "both": [value["size_bytes"] / 1e6, value["latency_ms"]],
            }[self.run.settings.objective]
            store.tell(trial, [value["metric"], *objectives])

    def abandon(self, why: str, *, cancel: bool = True) -> None:
        """The running trials recorded as ``why`` (interrupted or out of time); ``cancel=False``
        leaves their tasks to end with the driver (see :meth:`RayExecutor.cancel_all`)."""
        keys = [job.key for job in self.executor.cancel_all(cancel=cancel)]
        # NOTE: and those whose outcome came back but was not yet recorded (see collect); a trial
        # already told is closed, and set/tell leave a finished trial as it is
        for key in [*keys, *[k for k in self.live if k not in keys]]:
            trial = self.live.pop(key, None)
            if trial is not None:
                self.store.set(trial, status="interrupted", error=why)
                self.store.tell(trial, state=self.store.state("FAIL"))

    def record(self, snapshot: Any) -> TrialRecord:
        return record(
            snapshot,
            self.submit_args["baseline"],
            self.run.inputs.evaluate.metric,
            self.run.settings.max_drop,
        )

    def records(self) -> list[TrialRecord]:
        return [
            self.record(t)
            for t in self.store.trials.values()
            if t.user_attrs.get("status") not in (None, "running", "duplicate")
        ]


_BULKY_CHARS = 2000


def _slim(figures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pass figures without the bulky tables (per-node, per-layer: any table over ~2 KB as JSON); the study keeps every trial's."""

    def small(value: Any) -> bool:
        return (
            not isinstance(value, (dict, list))
            or len(json.dumps(value, default=str)) <= _BULKY_CHARS
        )

    return [{k: v for k, v in f.items() if small(v)} for f in figures]


def record(t: Any, baseline: float, metric_name: str, max_drop: float) -> TrialRecord:
    """A trial of the study as a report row."""
    attrs = t.user_attrs
    metric = attrs.get("metric")
    d = drop(metric_name, baseline, metric) if metric is not None else None
    return TrialRecord(
        number=t.number,
        status=attrs.get("status", "failed"),
        pipeline=str((attrs.get("config") or {}).get("pipeline", "")),
        config=attrs.get("config") or {},
        passes=attrs.get("passes") or [],
        metric=metric,
        drop=d,
        meets=attrs.get("status") == "ok"
        and d is not None
        and d <= max_drop + 1e-12
        and not attrs.get("text_missed"),
        size_bytes=attrs.get("size_bytes"),
        latency_ms=attrs.get("latency_ms"),
        seconds=attrs.get("seconds"),
        error=attrs.get("error", ""),
        session=attrs.get("session", ""),
        figures=attrs.get("figures") or [],
        timing=attrs.get("timing") or {},
        node=attrs.get("node", ""),
        host=attrs.get("host", ""),
        attempt=int(attrs.get("attempt", 1)),
        retry_of=attrs.get("retry_of"),
        retried=bool(attrs.get("retried")),
    )
