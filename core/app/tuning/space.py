"""Search spaces: which pipelines of passes a tune tries, and which options vary.

A space is a list of *pipelines* (alternatives, e.g. ``int8-static`` or ``channel -> int8-static``),
each a list of pass templates whose options are fixed values or parameters:

* :class:`Choice` — a list of values (``search: [minmax, entropy]`` in a recipe);
* :class:`Range` — ``search: {low: 0.2, high: 0.6, step: 0.1}`` (ints when both bounds are ints;
  ``log: true`` for a log scale);
* :class:`Fallback` — the ``exclude`` option filled with the ``k`` nodes most sensitive to
  quantization, ``k`` from a ladder (measured once per study; INC's op-wise fallback).

Spaces come from a recipe whose options may be ``{search: ...}`` (:func:`space_from_recipe`), or are
built from the installed methods' tuning declarations (:mod:`.defaults`): a method joins the default
space by declaring tunable options in its ``Options`` schema, or a :class:`modelpress.plugin_api.Tuning`::

    class MyOptions(modelpress.Options):
        strength: float = Field(0.5, json_schema_extra={"search": {"low": 0.1, "high": 0.9}})
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydantic

from modelpress.app.recipe import PassSpec, validate_pass_options
from modelpress.base.errors import OptionsError, validation_problems

if TYPE_CHECKING:
    from modelpress.app.recipe import Recipe
    from modelpress.plugin.methods import Method
    from modelpress.plugin.registry import Registry

__all__ = [
    "Choice",
    "Fallback",
    "Pipeline",
    "Range",
    "SearchSpace",
    "check_values",
    "is_param",
    "is_search",
    "space_from_recipe",
]

SEARCH_KEY = "search"


@dataclass(frozen=True)
class Choice:
    values: tuple[Any, ...]

    def grid(self) -> list[Any]:
        return list(self.values)


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    step: float | None = None
    log: bool = False
    integer: bool = False

    def grid(self, points: int = 4) -> list[Any]:
        """Up to ``points`` values from ``high`` down to ``low`` (the aggressive end first)."""
        if self.step:
            n = math.floor((self.high - self.low) / self.step + 1e-9) + 1
            values = [self.low + i * self.step for i in range(n)]
            if len(values) > points:
                values = [values[round(i * (n - 1) / (points - 1))] for i in range(points)]
        elif self.log:
            values = [
                self.low * (self.high / self.low) ** (i / (points - 1)) for i in range(points)
            ]
        else:
            values = [self.low + (self.high - self.low) * i / (points - 1) for i in range(points)]
        values = [round(v) if self.integer else round(v, 6) for v in values]
        return list(dict.fromkeys(reversed(values)))


@dataclass(frozen=True)
class Fallback:
    """``exclude`` = the ``k`` most quantization-sensitive nodes; ``k`` from ``ladder``."""

    ladder: tuple[int, ...] = (0, 1, 2, 4, 8, 16)

    def grid(self) -> list[Any]:
        return list(self.ladder)

    def steps(self, ranked: int) -> list[int]:
        """The ladder for a ranking of ``ranked`` nodes, capped so that one of them stays quantized (with every
        ranked node in float, int8-static has nothing left to quantize and refuses: a wasted trial)."""
        return sorted({min(k, max(ranked - 1, 0)) for k in self.ladder})


Param = Choice | Range | Fallback


@dataclass(frozen=True)
class PassTemplate:
    kind: str
    method: str
    options: dict[str, Any]
    name: str | None = None

    def params(self) -> dict[str, Param]:
        return {k: v for k, v in self.options.items() if is_param(v)}


def is_param(value: Any) -> bool:
    """Whether an option's value is searched (a :class:`Choice`, :class:`Range` or :class:`Fallback`), not fixed."""
    return isinstance(value, (Choice, Range, Fallback))


@dataclass(frozen=True)
class Pipeline:
    """``seed``: the study starts with this pipeline's first point (its method declares ``Tuning(seed=True)``)."""

    name: str
    passes: tuple[PassTemplate, ...]
    seed: bool = False

    def params(self) -> dict[str, Param]:
        """``{"<stage>.<option>": param}``; stage numbers start at 1."""
        return {f"{i}.{k}": p for i, t in enumerate(self.passes, 1) for k, p in t.params().items()}

    @property
    def has_fallback(self) -> bool:
        return any(isinstance(p, Fallback) for p in self.params().values())


@dataclass
class SearchSpace:
    """Alternative pipelines; a configuration is ``{"pipeline": name, "<pipeline>:<stage>.<option>": value}``."""

    pipelines: list[Pipeline]
    notes: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(
        default_factory=dict
    )  # NOTE: installed methods not in the space -> why

    def pipeline(self, name: str) -> Pipeline:
        for p in self.pipelines:
            if p.name == name:
                return p
        raise OptionsError(
            f"search space has no pipeline {name!r}; it has {', '.join(p.name for p in self.pipelines)}"
        )

    def suggest(self, trial: Any, sensitivity: dict[str, list[str]]) -> dict[str, Any]:
        """Sample a configuration from an Optuna trial (define-by-run: each pipeline's own options)."""
        name = (
            self.pipelines[0].name
            if len(self.pipelines) == 1
            else trial.suggest_categorical("pipeline", [p.name for p in self.pipelines])
        )
        config: dict[str, Any] = {"pipeline": name}
        for key, param in self.pipeline(name).params().items():
            pname = f"{name}:{key}"
            if isinstance(param, Choice):
                encoded = [_encode(v) for v in param.values]
                config[pname] = _decode(trial.suggest_categorical(pname, encoded))
            elif isinstance(param, Range):
                if param.integer:
                    step = int(param.step or 1)
                    config[pname] = trial.suggest_int(
                        pname,
                        int(param.low),
                        int(param.high),
                        step=1 if param.log else step,
                        log=param.log,
                    )
                else:
                    value = trial.suggest_float(
                        pname,
                        param.low,
                        param.high,
                        step=None if param.log else param.step,
                        log=param.log,
                    )
                    config[pname] = round(
                        value, 6
                    )  # NOTE: 0.6000000000000001 -> 0.6 in reports and recipes
            else:
                ranking = sensitivity.get(name, [])
                config[pname] = trial.suggest_categorical(pname, param.steps(len(ranking)))
        return config

    def passes(self, config: dict[str, Any], sensitivity: dict[str, list[str]]) -> list[PassSpec]:
        """The concrete recipe passes of a configuration (fallback ``k`` -> the top-k node names)."""
        name = config.get("pipeline", self.pipelines[0].name)
        pipeline = self.pipeline(name)
        out = []
        for i, template in enumerate(pipeline.passes, 1):
            options = {}
            for key, value in template.options.items():
                if isinstance(value, (Choice, Range)):
                    value = config[f"{name}:{i}.{key}"]
                elif isinstance(value, Fallback):
                    value = list(sensitivity.get(name, [])[: int(config[f"{name}:{i}.{key}"])])
                options[key] = value
            out.append(
                PassSpec(
                    kind=template.kind, method=template.method, options=options, name=template.name
                )
            )  # type: ignore[arg-type]
        return out

    def ladder(self, sensitivity: dict[str, list[str]]) -> list[dict[str, Any]]:
        """Configurations for accuracy-first search, most aggressive first.

        Per pipeline (in the space's order): every parameter at its most aggressive value (the
        first choice; the high end of a range; no fallback), then one parameter at a time through
        its other values (INC's knob-by-knob tuning). Fallback steps are added later by the
        strategy, on the best configuration measured, since they depend on what was measured.
        """
        configs: list[dict[str, Any]] = []
        for pipeline in self.pipelines:
            params = {f"{pipeline.name}:{k}": p for k, p in pipeline.params().items()}
            base = {"pipeline": pipeline.name, **{k: p.grid()[0] for k, p in params.items()}}
            configs.append(base)
            for key, param in params.items():
                if isinstance(param, Fallback):
                    continue
                for value in param.grid()[1:]:
                    configs.append({**base, key: value})
        return configs

    def describe(self) -> list[dict[str, Any]]:
        rows = []
        for p in self.pipelines:
            rows.append(
                {
                    "pipeline": p.name,
                    "passes": [f"{t.kind}/{t.method}" for t in p.passes],
                    "params": {k: _describe(v) for k, v in p.params().items()},
                }
            )
        return rows


def _describe(param: Param) -> Any:
    if isinstance(param, Choice):
        return {"choice": list(param.values)}
    if isinstance(param, Range):
        return {"low": param.low, "high": param.high, "step": param.step, "log": param.log}
    return {"fallback": list(param.ladder)}


def _encode(value: Any) -> Any:
    """Optuna choices are None/bool/int/float/str: other values (lists, dicts) travel as JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return "json:" + json.dumps(value, sort_keys=True)


def _decode(value: Any) -> Any:
    if isinstance(value, str) and value.startswith("json:"):
        return json.loads(value[5:])
    return value


# -- the recipe form ----------------------------------------------------------------------------


class _RangeSpec(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    low: float
    high: float
    step: float | None = pydantic.Field(None, gt=0)
    log: bool = False

    @pydantic.model_validator(mode="after")
    def _ordered(self) -> _RangeSpec:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        return self


def is_search(value: Any) -> bool:
    return isinstance(value, dict) and set(value) == {SEARCH_KEY}


def parse_param(value: Any, where: str) -> Param:
    """``{search: [a, b]}`` -> Choice, ``{search: {low, high, step?, log?}}`` -> Range, ``{search: fallback}``."""
    spec = value[SEARCH_KEY]
    if spec == "fallback" or (isinstance(spec, dict) and set(spec) == {"fallback"}):
        ladder = spec["fallback"] if isinstance(spec, dict) else Fallback.ladder
        if not (
            isinstance(ladder, (list, tuple))
            and ladder
            and all(isinstance(k, int) and k >= 0 for k in ladder)
        ):
            raise OptionsError(
                f"{where}: search fallback must be a list of non-negative integers (layers kept in float), got {ladder!r}"
            )
        return Fallback(tuple(ladder))
    if isinstance(spec, list):
        if not spec:
            raise OptionsError(f"{where}: search choice list is empty; give at least one value")
        return Choice(tuple(spec))
    if isinstance(spec, dict):
        try:
            r = _RangeSpec(**spec)
        except pydantic.ValidationError as exc:
            raise OptionsError(
                f"{where}: invalid search range ({validation_problems(exc, root='range')}); write {{search: {{low: 0.1, high: 0.5, step: 0.1}}}}"
            ) from None
        integer = all(
            isinstance(spec.get(k), int) and not isinstance(spec.get(k), bool)
            for k in ("low", "high")
        ) and (r.step is None or float(r.step).is_integer())
        return Range(r.low, r.high, r.step, r.log, integer)
    raise OptionsError(
        f"{where}: `search` must be a list of choices, a range {{low, high, step, log}} or 'fallback'; got {spec!r}"
    )


def check_values(
    method: Method, fixed: dict[str, Any], name: str, param: Param, where: str
) -> None:
    """Every value a parameter can take must validate against the method's options schema."""
    if isinstance(param, Fallback):
        option = method.tuning.fallback if method.tuning is not None else ""
        if not option:
            raise OptionsError(
                f"{where}: 'fallback' needs a method that declares a fallback option (Tuning(fallback=...)); {method.qualname} declares none"
            )
        if name != option:
            raise OptionsError(
                f"{where}: 'fallback' fills {method.qualname}'s `{option}` option (node names kept out of it), not {name!r}"
            )
        values: list[Any] = [[]]
    elif isinstance(param, Choice):
        values = list(param.values)
    else:
        values = [param.low, param.high] if not param.integer else [int(param.low), int(param.high)]
    for v in values:
        try:
            method.validate_options({**fixed, name: v})
        except OptionsError as exc:
            raise OptionsError(f"{where}: value {v!r} is not valid: {exc}") from None


def template_from_spec(spec: PassSpec, index: int, registry: Registry) -> PassTemplate:
    method = registry.method(spec.method, spec.kind)
    options: dict[str, Any] = {}
    for key, value in spec.options.items():
        options[key] = (
            parse_param(value, f"recipe pass {index} ({spec.kind}/{spec.method}) option {key!r}")
            if is_search(value)
            else value
        )
    fixed = validate_pass_options(
        method, {k: v for k, v in options.items() if not is_param(v)}, index
    )
    for key, value in options.items():
        if is_param(value):
            check_values(
                method,
                fixed,
                key,
                value,
                f"recipe pass {index} ({spec.kind}/{spec.method}) option {key!r}",
            )
    return PassTemplate(spec.kind, spec.method, options, spec.name)


def space_from_recipe(recipe: Recipe, registry: Registry) -> SearchSpace:
    """One pipeline: the recipe's passes, with its ``{search: ...}`` options as parameters."""
    templates = tuple(
        template_from_spec(spec, i, registry) for i, spec in enumerate(recipe.passes, 1)
    )
    name = "+".join(t.method for t in templates)
    tuning = (
        registry.method(templates[0].method, templates[0].kind).tuning
        if len(templates) == 1
        else None
    )
    return SearchSpace([Pipeline(name, templates, seed=bool(tuning and tuning.seed))])
