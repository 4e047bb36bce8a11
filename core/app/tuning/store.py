"""The Optuna study a tune writes to, and this run's mirror of it.

The study lives in SQLite in the output folder (or any SQLAlchemy URL: ``postgresql://`` for a study
several drivers share): rerunning the same command resumes it; completed trials are kept and count
towards the budget, trials that were running when the previous run stopped are run again.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from modelpress.app.tuning.strategy import config_key
from modelpress.base.errors import ModelpressError, OptionsError
from modelpress.evaluation.criteria import lower_is_better

__all__ = ["Objective", "Snapshot", "StudyStore", "open_study", "storage_url"]

Objective = Literal["size", "latency", "both"]


@dataclass
class Snapshot:
    """What the study holds for one trial, mirrored here: the run reads this, not the database."""

    number: int
    state: Any
    values: list[float] | None
    user_attrs: dict[str, Any]


class StudyStore:
    """The Optuna study plus the bookkeeping of one tune run (one *driver*).

    The run reads the study's trials once and then keeps its own mirror up to date as it writes: the
    driver does not query the database in its loop while it is the study's only driver. When other
    drivers work on the same study (a shared ``--storage``), :meth:`sync` reloads the mirror every
    :data:`~modelpress.app.tuning.claims.BEAT_S` seconds, so each sees the others' results, and a
    configuration runs once however many drivers propose it (:mod:`.claims`). SQLite runs in WAL mode
    with normal sync (a commit is not an fsync; a killed run still resumes from every committed write).
    """

    def __init__(
        self, storage: str, name: str, directions: list[str], objective: Objective, seed: int
    ):
        import optuna

        from modelpress.app.tuning.claims import Claims

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna, self.url, self.session = optuna, storage_url(storage), uuid.uuid4().hex[:8]
        claims: Claims | None = None
        try:
            self.claims = claims = Claims(self.url, name, self.session)
            seed += claims.ordinal  # NOTE: drivers of one study sample apart (the first one keeps --seed: reproducible alone)
            sampler = (
                optuna.samplers.NSGAIISampler(seed=seed, population_size=8)
                if objective == "both"
                else optuna.samplers.TPESampler(seed=seed, n_startup_trials=6)
            )
            self.study = optuna.create_study(
                storage=_storage(optuna, self.url),
                study_name=name,
                directions=directions,  # type: ignore[arg-type]
                sampler=sampler,
                load_if_exists=True,
            )
        except Exception as exc:
            if claims is not None:
                claims.close()
            raise ModelpressError(
                f"cannot open the study {name!r} in {_safe(storage)!r}: {exc}"
            ) from None
        if list(self.study.directions) != [
            optuna.study.StudyDirection.MAXIMIZE
            if d == "maximize"
            else optuna.study.StudyDirection.MINIMIZE
            for d in directions
        ]:
            raise OptionsError(
                f"study {name!r} in {_safe(storage)!r} was made for another objective; use another --output/--storage or the same --objective"
            )
        self.trials: dict[int, Snapshot] = {}
        self.refresh()
        self.claims.adopt(
            {
                config_key(t.user_attrs["config"]): t.number
                for t in self.finished()
                if t.user_attrs.get("status") in ("ok", "pruned") and t.user_attrs.get("config")
            }
        )
        self._synced, self._others = time.monotonic(), False

    def refresh(self) -> None:
        """Reload the mirror from the database (every driver's trials)."""
        self.trials = {
            t.number: Snapshot(
                t.number, t.state, list(t.values) if t.values else None, dict(t.user_attrs)
            )
            for t in self.study.get_trials(deepcopy=False)
        }

    def state(self, name: str) -> Any:
        """An Optuna trial state by name (``COMPLETE``, ``FAIL``, ``PRUNED``, ``RUNNING``)."""
        return getattr(self.optuna.trial.TrialState, name)

    def ask(self) -> Any:
        trial = self.study.ask()
        self.trials[trial.number] = Snapshot(trial.number, self.state("RUNNING"), None, {})
        return trial

    def set(self, trial: Any, **attrs: Any) -> None:
        try:
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
        except self.optuna.exceptions.UpdateFinishedTrialError:
            return  # NOTE: another driver took this driver for lost and closed the trial; its configuration was run again
        self.trials[trial.number].user_attrs.update(attrs)

    def tell(self, trial: Any, values: list[float] | None = None, state: Any = None) -> None:
        number = trial if isinstance(trial, int) else trial.number
        try:
            self.study.tell(trial, values, state=state)
        except (self.optuna.exceptions.UpdateFinishedTrialError, ValueError) as exc:
            if "finished" not in str(exc).lower() and "cannot tell a" not in str(exc).lower():
                raise
            return  # NOTE: closed already, by another driver (see set) or by this one (Runner.abandon)
        snapshot = self.trials[number]
        snapshot.state = state if state is not None else self.state("COMPLETE")
        snapshot.values = list(values) if values is not None else None
        config = snapshot.user_attrs.get("config")
        if (
            snapshot.state == self.state("FAIL")
            and config
            and snapshot.user_attrs.get("status") != "duplicate"
        ):
            # NOTE: a failed, interrupted or lost trial's configuration may be tried again (a retry claims it anew)
            self.claims.release(config_key(config), number)

    def claim(self, trial: Any, config: dict[str, Any]) -> Snapshot | None:
        """Claim ``config`` for ``trial``: None when this driver runs it, else the trial (of any driver) that holds it."""
        holder = self.claims.claim(trial.number, config_key(config))
        if holder is None:
            return None
        if holder not in self.trials:
            self.refresh()
        return self.trials.get(holder) or Snapshot(
            holder, self.state("RUNNING"), None, {"config": config, "status": "running"}
        )

    def _lost(self, live: Container[str], unowned: bool) -> list[dict[str, Any]]:
        """Fail the RUNNING trials of sessions that are not ``live`` (``unowned``: and those no session has written to yet);
        the configurations of those that had started, to run again."""
        again = []
        for t in list(self.trials.values()):
            session = t.user_attrs.get("session")
            if t.state == self.state("RUNNING") and (session not in live if session else unowned):
                self.tell(t.number, state=self.state("FAIL"))
                if t.user_attrs.get("status") == "running" and t.user_attrs.get("config"):
                    again.append(t.user_attrs["config"])
        return again

    def recover(self) -> list[dict[str, Any]]:
        """Configurations to run again: trials a previous run left RUNNING (it was killed or lost) or interrupted.

        Stale RUNNING trials (of no live driver) are closed as failed; a configuration that has finished since is not repeated.
        """
        live = self.claims.live()
        self._lost(live, unowned=live == {self.session})
        finished = {config_key(t.user_attrs.get("config") or {}) for t in self.finished()}
        again: dict[str, dict[str, Any]] = {}
        for t in self.trials.values():
            config = t.user_attrs.get("config")
            if (
                config
                and t.user_attrs.get("status") in ("running", "interrupted")
                and t.state != self.state("RUNNING")
                and config_key(config) not in finished
            ):
                again[config_key(config)] = config
        return list(again.values())

    def sync(self) -> list[dict[str, Any]]:
        """While other drivers work on the study (checked every BEAT_S seconds): reload the mirror, and fail the
        running trials of drivers that were lost; returns those trials' configurations, to run again."""
        from modelpress.app.tuning.claims import BEAT_S

        if time.monotonic() - self._synced < BEAT_S:
            return []
        self._synced = time.monotonic()
        seen = self.claims.seen
        live = self.claims.live()
        others, was_shared = len(live) > 1, self._others
        self._others = others
        if not (others or was_shared or self.claims.seen != seen or self.running_elsewhere()):
            return []
        self.refresh()
        return self._lost(live, unowned=False)

    def running_elsewhere(self) -> int:
        """Trials other drivers are running now (as of the last :meth:`sync`)."""
        return sum(
            1
            for t in self.trials.values()
            if t.state == self.state("RUNNING")
            and t.user_attrs.get("session") not in (None, self.session)
        )

    def finished(self) -> list[Snapshot]:
        """Trials that count towards the budget: those lost with their node and run again (``retried``) do not."""
        return [
            t
            for t in self.trials.values()
            if t.user_attrs.get("status") in ("ok", "failed", "pruned")
            and not t.user_attrs.get("retried")
        ]

    def close(self) -> None:
        self.claims.close()


def storage_url(storage: str) -> str:
    """The SQLAlchemy URL of a storage: ``postgresql://`` uses psycopg (3) when psycopg2 is not installed."""
    import importlib.util

    if storage.startswith(("postgresql://", "postgres://")):
        rest = storage.split("://", 1)[1]
        if importlib.util.find_spec("psycopg2") is not None:
            return "postgresql+psycopg2://" + rest
        if importlib.util.find_spec("psycopg") is None:
            raise ModelpressError(
                "a postgresql:// study storage needs a PostgreSQL driver: pip install 'modelpress[distributed]' (psycopg)"
            )
        return "postgresql+psycopg://" + rest
    return storage


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def _rdb_storage(optuna: Any, url: str, attempts: int = 5) -> Any:
    """``RDBStorage(url)``, tried again when another driver creates the schema of a new shared database at
    the same moment (PostgreSQL refuses the second ``CREATE TABLE alembic_version``: a unique violation)."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts - 1):
        try:
            return optuna.storages.RDBStorage(url)
        except (IntegrityError, ProgrammingError):
            time.sleep(
                0.5 * (attempt + 1)
            )  # NOTE: the other driver's schema is then there to be read
    return optuna.storages.RDBStorage(url)


def _storage(optuna: Any, url: str) -> Any:
    """An Optuna RDB storage; SQLite in WAL mode with normal sync (each trial is a dozen small commits)."""
    storage = _rdb_storage(optuna, url)
    if url.startswith("sqlite:"):
        from sqlalchemy import event

        def _pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        event.listen(storage.engine, "connect", _pragmas)
        storage.engine.dispose()  # NOTE: connections made before the listener reopen with the pragmas
    return storage


def open_study(
    storage: str, name: str, metric: str, objective: Objective, seed: int, out: Path
) -> StudyStore:
    """Open (or resume) the study; a study made for another objective is refused."""
    higher = not lower_is_better(metric)
    directions = ["maximize" if higher else "minimize"] + {
        "size": ["minimize"],
        "latency": ["minimize"],
        "both": ["minimize", "minimize"],
    }[objective]
    store = StudyStore(storage, name, directions, objective, seed)
    study = store.study
    if study.user_attrs.get("objective", objective) != objective:
        store.close()
        raise OptionsError(
            f"the study in {out} was run with --objective {study.user_attrs['objective']}; resume it with the same objective or use another output"
        )
    study.set_user_attr("objective", objective)
    if study.metric_names is None:
        import warnings

        with (
            warnings.catch_warnings()
        ):  # NOTE: Optuna marks metric names experimental; optuna-dashboard shows them on its axes
            warnings.simplefilter("ignore")
            study.set_metric_names(
                [
                    metric,
                    *{
                        "size": ["size_mb"],
                        "latency": ["latency_ms"],
                        "both": ["size_mb", "latency_ms"],
                    }[objective],
                ]
            )
    return store
