"""How ``modelpress tune`` searches a method: declared on the method, read for every method alike.

The tuner (``modelpress.app.tuning``) holds no table of methods: what it searches, in which
pipelines, what recovers accuracy and what falls back along a sensitivity ranking, it reads from
each installed method's :class:`Tuning` (``Method(tuning=...)``) and from the ``search`` entries of
its options schema (``Field(json_schema_extra={"search": ...})``). A method with a declared search
joins the default space of ``modelpress tune`` whatever its kind, when the data given meets its
needs (``Method.requires``) and the model has what it works on (``ops``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CONDITIONS", "TuneStage", "Tuning"]

# What the tuner knows of a run, for ``Tuning.without``: the data sources given, whether the training
# data has labels, and "training" (the training engine, torch, is installed), "recovery" (this method's
# ``recovery`` option can be used: its data and the training engine are there).
CONDITIONS: tuple[str, ...] = ("calibration", "train", "eval", "labels", "training", "recovery")


@dataclass(frozen=True)
class TuneStage:
    """One pass of a declared pipeline: the method (``"kind/name"``) and, optionally, the options it
    has in this pipeline, in recipe form (fixed values or ``{"search": ...}``) instead of its own search."""

    method: str
    options: Mapping[str, Any] | None = None


@dataclass(
    frozen=True, eq=False
)  # NOTE: eq=False: hashed by identity, so a Method holding one stays hashable
class Tuning:
    """A method's tuning declaration (all optional).

    ``search``: option -> search (``[a, b]`` a choice, ``{low, high, step?, log?}`` a range,
    ``"fallback"`` the sensitivity-ranked fallback of the ``fallback`` option), in the order the
    sampler draws them; merged with the ``search`` entries of the options schema. ``fixed``: options
    set in every trial of this method. ``without``: condition (see :data:`CONDITIONS`) -> options
    replaced when the condition is not met (recipe form; ``None`` drops the option from the search).

    ``recovery``: the option that recovers accuracy by training (e.g. fine-tuning epochs); it is
    searched only when its data needs and the training engine are there. ``probe``: a trial that sets
    ``recovery`` is first measured with it at its default and cut (``pruned``) when its drop is
    already hopeless. ``trains``: the method always trains (left out without the training engine).

    ``fallback``: the option that takes the node names kept out of the method (e.g. ``exclude``);
    ``ranking``: the options of one run of the method, on the source model, whose figure
    ``ranking_figure`` (``{node: sensitivity}``) ranks the nodes for that fallback.

    ``seed``: the method's pipeline starts the study (each search at its first value, no fallback).
    ``ops``: the model must have one of these op types (``weighted``: as a layer with a constant
    weight of at least ``min_elements`` elements), else the method is left out. ``alone``: the method
    is a pipeline of its own; ``pipelines``: more pipelines it leads (each a sequence of
    :class:`TuneStage` or ``"kind/name"``). ``order``: where its pipelines go in the default space
    (lower first; ties by kind and name).
    """

    search: Mapping[str, Any] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)
    without: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    recovery: str = ""
    probe: bool = False
    trains: bool = False
    fallback: str = ""
    ranking: Mapping[str, Any] = field(default_factory=dict)
    ranking_figure: str = "sensitivity"
    seed: bool = False
    ops: tuple[str, ...] = ()
    weighted: bool = True
    min_elements: int = 0
    alone: bool = True
    pipelines: tuple[tuple[TuneStage | str, ...], ...] = ()
    order: int = 100

    def __post_init__(self) -> None:
        for name in ("search", "fixed", "ranking"):
            object.__setattr__(self, name, dict(getattr(self, name)))
        object.__setattr__(self, "without", {k: dict(v) for k, v in self.without.items()})
        unknown = [c for c in self.without if c not in CONDITIONS]
        if unknown:
            raise ValueError(
                f"Tuning.without: unknown condition(s) {', '.join(map(repr, unknown))}; conditions are {', '.join(CONDITIONS)}"
            )
        object.__setattr__(self, "ops", tuple(self.ops))
        stages = tuple(
            tuple(s if isinstance(s, TuneStage) else TuneStage(s) for s in p)
            for p in self.pipelines
        )
        object.__setattr__(self, "pipelines", stages)

    def options_named(self) -> set[str]:
        """Every option this declaration names (checked against the method's schema)."""
        named = {
            *self.search,
            *self.fixed,
            *self.ranking,
            *(o for v in self.without.values() for o in v),
        }
        return named | {o for o in (self.recovery, self.fallback) if o}

    def check(self, method: str, fields: set[str]) -> None:
        """Raise if the declaration names an option the method's schema does not have."""
        unknown = sorted(self.options_named() - fields)
        if unknown:
            raise ValueError(
                f"method {method!r}: its Tuning names option(s) {', '.join(map(repr, unknown))}, which its options schema lacks"
            )
