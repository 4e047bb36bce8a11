"""The Optuna study a tune writes to, and this run's mirror of it.

The study lives in SQLite in the output folder (or any SQLAlchemy URL): rerunning the same command
resumes it; completed trials are kept and count towards the budget, trials that were running when
the previous run stopped are run again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from modelpress.app.tuning.strategy import config_key
from modelpress.base.errors import ModelpressError, OptionsError
from modelpress.evaluation.criteria import lower_is_better

__all__ = ["Objective", "Snapshot", "StudyStore", "open_study"]

Objective = Literal["size", "latency", "both"]


@dataclass
class Snapshot:
    """What the study holds for one trial, mirrored here: the run reads this, not the database."""

    number: int
    state: Any
    values: list[float] | None
    user_attrs: dict[str, Any]


class StudyStore:
    """The Optuna study plus the bookkeeping of one tune run.

    The run reads the study's trials once and then keeps its own mirror up to date as it writes
    (this run is the study's only writer): the driver does not query the database in its loop,
    only writes to it. SQLite runs in WAL mode with normal sync (a commit is not an fsync; a
    killed run still resumes from every committed write).
    """

    def __init__(self, storage: str, name: str, directions: list[str], objective: Objective, seed: int):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.optuna = optuna
        sampler = (optuna.samplers.NSGAIISampler(seed=seed, population_size=8) if objective == "both"
                   else optuna.samplers.TPESampler(seed=seed, n_startup_trials=6))
        try:
            store = _storage(optuna, storage)
            self.study = optuna.create_study(storage=store, study_name=name, directions=directions,  # type: ignore[arg-type]
                                             sampler=sampler, load_if_exists=True)
        except Exception as exc:
            raise ModelpressError(f"cannot open the study {name!r} in {storage!r}: {exc}") from None
        if list(self.study.directions) != [optuna.study.StudyDirection.MAXIMIZE if d == "maximize" else optuna.study.StudyDirection.MINIMIZE for d in directions]:
            raise OptionsError(f"study {name!r} in {storage!r} was made for another objective; use another --output/--storage or the same --objective")
        self.trials = {t.number: Snapshot(t.number, t.state, list(t.values) if t.values else None, dict(t.user_attrs))
                       for t in self.study.get_trials(deepcopy=False)}

    def state(self, name: str) -> Any:
        """An Optuna trial state by name (``COMPLETE``, ``FAIL``, ``PRUNED``, ``RUNNING``)."""
        return getattr(self.optuna.trial.TrialState, name)

    def ask(self) -> Any:
        trial = self.study.ask()
        self.trials[trial.number] = Snapshot(trial.number, self.state("RUNNING"), None, {})
        return trial

    def set(self, trial: Any, **attrs: Any) -> None:
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        self.trials[trial.number].user_attrs.update(attrs)

    def tell(self, trial: Any, values: list[float] | None = None, state: Any = None) -> None:
        number = trial if isinstance(trial, int) else trial.number
        self.study.tell(trial, values, state=state)
        snapshot = self.trials[number]
        snapshot.state = state if state is not None else self.state("COMPLETE")
        snapshot.values = list(values) if values is not None else None

    def recover(self) -> list[dict[str, Any]]:
        """Configurations to run again: trials a previous run left RUNNING (it was killed) or interrupted.

        Stale RUNNING trials are closed as failed; a configuration that has finished since is not repeated.
        """
        for t in list(self.trials.values()):
            if t.state == self.state("RUNNING"):
                self.tell(t.number, state=self.state("FAIL"))
        finished = {config_key(t.user_attrs.get("config") or {}) for t in self.finished()}
        again: dict[str, dict[str, Any]] = {}
        for t in self.trials.values():
            config = t.user_attrs.get("config")
            if config and t.user_attrs.get("status") in ("running", "interrupted") and config_key(config) not in finished:
                again[config_key(config)] = config
        return list(again.values())

    def finished(self) -> list[Snapshot]:
        return [t for t in self.trials.values() if t.user_attrs.get("status") in ("ok", "failed", "pruned")]


def _storage(optuna: Any, url: str) -> Any:
    """An Optuna RDB storage; SQLite in WAL mode with normal sync (each trial is a dozen small commits)."""
    storage = optuna.storages.RDBStorage(url)
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


def open_study(storage: str, name: str, metric: str, objective: Objective, seed: int, out: Path) -> StudyStore:
    """Open (or resume) the study; a study made for another objective is refused."""
    higher = not lower_is_better(metric)
    directions = ["maximize" if higher else "minimize"] + {"size": ["minimize"], "latency": ["minimize"], "both": ["minimize", "minimize"]}[objective]
    store = StudyStore(storage, name, directions, objective, seed)
    study = store.study
    if study.user_attrs.get("objective", objective) != objective:
        raise OptionsError(f"the study in {out} was run with --objective {study.user_attrs['objective']}; resume it with the same objective or use another output")
    study.set_user_attr("objective", objective)
    return store
