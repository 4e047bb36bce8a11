"""The default search space: every installed method that declares how it is tuned, whatever its kind.

A method declares its tuning (:class:`modelpress.plugin.tuning.Tuning` on the :class:`Method`, and
``search`` entries in its options schema); this module reads those declarations for every method
alike and keeps the pipelines whose methods fit the model and whose data needs the data given meet.
What it leaves out, and why, goes into the space's ``left_out`` (and the study's report).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from modelpress.app.tuning.space import (
    SEARCH_KEY,
    PassTemplate,
    Pipeline,
    SearchSpace,
    check_values,
    is_param,
    is_search,
    parse_param,
)
from modelpress.base.errors import OptionsError, UnknownMethodError
from modelpress.plugin.tuning import TuneStage, Tuning

if TYPE_CHECKING:
    from modelpress.ir.model import Model
    from modelpress.plugin.methods import Method
    from modelpress.plugin.registry import Registry

__all__ = ["Available", "declared_tuning", "default_space"]

# NOTE: how a user gives each data source (the data roles of a PassContext), for the reasons in the report
_DATA_FLAGS = {
    "calibration": "calibration data (--calib)",
    "train": "training data (--train)",
    "eval": "evaluation data (--eval)",
}
_TRAINING_ENGINE = "the training engine (pip install 'modelpress[torch]')"


@dataclass(frozen=True)
class Available:
    """What this run has, for the declarations' needs and conditions."""

    data: frozenset[str]
    labels: bool = False
    training: bool = False

    def recovery(self, method: Method, tuning: Tuning) -> bool:
        """Whether ``tuning.recovery`` (training to recover accuracy) can run: its data and the training engine are there."""
        return (
            bool(tuning.recovery)
            and self.training
            and method.data_needs({tuning.recovery: True}) <= self.data
        )

    def met(self, condition: str, method: Method, tuning: Tuning) -> bool:
        if condition == "labels":
            return self.labels
        if condition == "training":
            return self.training
        if condition == "recovery":
            return self.recovery(method, tuning)
        return condition in self.data

    def missing(self, method: Method, tuning: Tuning) -> str | None:
        """Why the method cannot run with what this run has (None: it can)."""
        lacking = sorted(method.requires - self.data)
        if lacking:
            return "needs " + " and ".join(_DATA_FLAGS.get(d, d) for d in lacking)
        if tuning.trains and not self.training:
            return f"trains: needs {_TRAINING_ENGINE}"
        return None


def declared_tuning(method: Method) -> Tuning | None:
    """The method's :class:`Tuning`, with the ``search`` entries of its options schema merged in (None: nothing declared)."""
    schema: dict[str, Any] = {}
    for name, info in method.options.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and SEARCH_KEY in extra:
            schema[name] = extra[SEARCH_KEY]
    if method.tuning is None:
        return Tuning(search=schema) if schema else None
    return replace(
        method.tuning,
        search={
            **method.tuning.search,
            **{k: v for k, v in schema.items() if k not in method.tuning.search},
        },
    )


def _fits(model: Model, tuning: Tuning) -> str | None:
    """Why the model has nothing this method works on (None: it has)."""
    if not tuning.ops:
        return None
    if not tuning.weighted:
        histogram = model.op_histogram()
        return (
            None
            if any(histogram.get(op) for op in tuning.ops)
            else f"the model has no {'/'.join(tuning.ops)} node"
        )
    for layer in model.weighted_layers():
        tensor = layer.weight.const_value
        if (
            layer.op_type in tuning.ops
            and tensor is not None
            and math.prod(tensor.shape.numpy()) >= tuning.min_elements
        ):
            return None
    size = f" of at least {tuning.min_elements} elements" if tuning.min_elements else ""
    return f"the model has no {'/'.join(tuning.ops)} layer with constant weights{size}"


def _recipe_value(value: Any, where: str) -> Any:
    """A recipe-form option: ``{search: ...}`` -> a parameter, anything else a fixed value."""
    return parse_param(value, where) if is_search(value) else value


@dataclass
class _Builder:
    """The default space as it is built: pipelines (with their order), and what was left out and why."""

    model: Model
    registry: Registry
    available: Available
    pipelines: list[tuple[int, int, Pipeline]] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    used: set[str] = field(default_factory=set)

    def add(self, method: Method, tuning: Tuning) -> None:
        """The pipelines ``method`` declares (itself alone, then those it leads); each one whose methods all fit."""
        stages = ([(TuneStage(method.qualname),)] if tuning.alone else []) + list(tuning.pipelines)
        for declared in stages:
            templates: list[PassTemplate] = []
            why: str | None = None
            for stage in declared:
                template = self._template(stage, declared)
                if isinstance(template, str):
                    why = template
                    break
                templates.append(template)
            name = self._name(declared)
            if why is not None:
                if (
                    len(declared) > 1
                ):  # NOTE: a method alone that does not fit is listed in left_out
                    self.notes.append(f"{name}: {why}")
                continue
            seed = len(templates) == 1 and bool(tuning.seed)
            self.pipelines.append(
                (tuning.order, len(self.pipelines), Pipeline(name, tuple(templates), seed=seed))
            )
            self.used.update(f"{t.kind}/{t.method}" for t in templates)

    def _name(self, declared: tuple[TuneStage, ...]) -> str:
        name = "+".join(s.method.split("/", 1)[-1] for s in declared)
        if any(
            p.name == name for _, _, p in self.pipelines
        ):  # NOTE: two kinds with a method of the same name
            name = "+".join(s.method.replace("/", "-") for s in declared)
        return name

    def _template(self, stage: TuneStage, declared: tuple[TuneStage, ...]) -> PassTemplate | str:
        """The stage's pass template, or why it cannot be in the space."""
        kind, _, name = stage.method.partition("/")
        try:
            method = self.registry.method(name, kind or None)
        except UnknownMethodError:
            return f"method {stage.method} is not installed"
        tuning = declared_tuning(method) or Tuning()
        why = self.available.missing(method, tuning) or _fits(self.model, tuning)
        if why is not None:
            return f"{method.name} {why}" if len(declared) > 1 else why
        where = f"the tuning of {method.qualname}"
        if stage.options is None:
            options = self._own_options(method, tuning, where)
        else:
            options = {
                k: _recipe_value(v, f"{where} option {k!r}") for k, v in stage.options.items()
            }
        options.update(tuning.fixed)
        return _checked(PassTemplate(method.kind, method.name, options), method, where)

    def _own_options(self, method: Method, tuning: Tuning, where: str) -> dict[str, Any]:
        """The method's declared search, less what this run cannot use (recovery without its data, ``without`` conditions)."""
        options: dict[str, Any] = {
            k: parse_param({SEARCH_KEY: spec}, f"{where} option {k!r}")
            for k, spec in tuning.search.items()
        }
        if tuning.recovery in options and not self.available.recovery(method, tuning):
            options.pop(tuning.recovery)
            lacking = method.data_needs({tuning.recovery: True}) - self.available.data
            needs = (
                " and ".join(_DATA_FLAGS.get(d, d) for d in sorted(lacking))
                if lacking
                else _TRAINING_ENGINE
            )
            self.notes.append(
                f"{method.name}: {tuning.recovery} (recovery) not searched: needs {needs}"
            )
        for condition, overrides in tuning.without.items():
            if self.available.met(condition, method, tuning):
                continue
            for key, value in overrides.items():
                if value is None:
                    options.pop(key, None)
                else:
                    options[key] = _recipe_value(value, f"{where} option {key!r}")
        return options

    def explain(self) -> None:
        """Why each installed method that is in no pipeline was left out."""
        for method in self.registry.methods():
            if method.qualname in self.used:
                continue
            tuning = declared_tuning(method)
            why = self.available.missing(method, tuning or Tuning()) or (
                _fits(self.model, tuning) if tuning else None
            )
            if why is None and tuning is None:
                why = "declares no search (Tuning(search=...) or options with json_schema_extra={'search': ...})"
            elif why is None and not tuning.alone and not tuning.pipelines:  # type: ignore[union-attr]
                why = "declares no pipeline of its own: tuned in a recipe, or inside another method's pipeline"
            self.left_out[method.name] = why or "none of its pipelines fits (see the notes)"


def _checked(template: PassTemplate, method: Method, where: str) -> PassTemplate:
    """Every value the template can take validates against the method's schema (a bad declaration is named)."""
    fixed = {k: v for k, v in template.options.items() if not is_param(v)}
    try:
        method.validate_options(fixed)
    except OptionsError as exc:
        raise OptionsError(f"{where}: {exc}") from None
    for key, value in template.options.items():
        if is_param(value):
            check_values(method, fixed, key, value, f"{where} option {key!r}")
    return template


def default_space(
    model: Model,
    registry: Registry,
    *,
    calibration: bool,
    train: bool,
    torch: bool,
    labels: bool = True,
    evaluation: bool = True,
) -> SearchSpace:
    """The pipelines of every installed method with a declared search that fits ``model`` and the data given.

    ``calibration``/``train``/``evaluation``: which data sources the run has; ``labels``: the training data
    has labels; ``torch``: the training engine is installed. Pipelines are in their methods' declared
    ``order`` (ties: registry order, kind then name).
    """
    data = frozenset(
        role
        for role, given in (("calibration", calibration), ("train", train), ("eval", evaluation))
        if given
    )
    builder = _Builder(model, registry, Available(data, labels=train and labels, training=torch))
    for method in registry.methods():
        tuning = declared_tuning(method)
        if tuning is not None:
            builder.add(method, tuning)
    builder.explain()
    if not builder.pipelines:
        raise OptionsError(
            "no installed method fits this model and data; give --calib/--train data or a recipe with `search:` options"
            f" (left out: {'; '.join(f'{k}: {v}' for k, v in builder.left_out.items())})"
        )
    pipelines = [p for _, _, p in sorted(builder.pipelines, key=lambda entry: entry[:2])]
    return SearchSpace(pipelines, builder.notes, left_out=builder.left_out)
