"""Recipes: an ordered list of passes, the data they use and how each stage is evaluated.

A recipe is YAML or JSON::

    passes:
      - {kind: prune, method: channel, options: {ratio: 0.5}}
      - {kind: distill, method: kd, options: {epochs: 5}}      # teacher: the source model
      - {kind: quantize, method: int8-static}
    data:
      calibration: calib.npz          # .npz/.npy (or .txt/.jsonl text) paths (relative to the recipe) or pkg.module:function
      train: train.npz
      eval: test.npz
      sequence_length: 64           # a .txt/.jsonl corpus (Hugging Face checkpoints): tokens per sample
    evaluate:
      metric: accuracy                # accuracy | agreement | cosine | mse | pkg.module:function
      batch_size: 64                  # latency is measured at batch 1 and this
      threads: 1
      repeats: 20
    pack: {codecs: auto}              # optional last stage: lossless .mpk beside the output

Everything is validated before any work starts: unknown methods list the installed ones, option
typos name the closest valid option, missing data files are named.

A recipe is code: a ``pkg.module:function`` entry imports that module and calls the function, and
data paths may point anywhere the user can read. For a recipe you did not write, load it with
``allow_imports=False`` (``modelpress compress --no-imports``): such entries, and data paths that
leave the recipe's folder, are then refused before anything runs.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import pydantic
from pydantic import Field

from modelpress.base.errors import (
    DataError,
    OptionsError,
    UnknownMethodError,
    one_line,
    validation_problems,
)
from modelpress.evaluation.criteria import EVALUATE_METRICS
from modelpress.plugin.methods import Method
from modelpress.plugin.registry import Registry, get_registry

__all__ = [
    "METRICS",
    "DataSources",
    "Evaluate",
    "PackSpec",
    "PassSpec",
    "Recipe",
    "load_recipe",
    "resolve_callable",
    "validate_pass_options",
]

METRICS = EVALUATE_METRICS  # NOTE: defined once, in modelpress.evaluation.criteria


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class PassSpec(_Strict):
    kind: str = Field(
        description="the method's kind: quantize, prune, distill or one a plugin registers (see `modelpress plugins`)"
    )
    method: str = Field(description="method name, as listed by `modelpress plugins`")
    options: dict[str, Any] = Field(
        default_factory=dict, description="method options, validated against its schema"
    )
    name: str | None = Field(
        None, description="label of the stage in the report (default kind/method)"
    )


class DataSources(_Strict):
    calibration: str | None = Field(
        None, description=".npz/.npy path or pkg.module:function for calibration data"
    )
    train: str | None = Field(
        None, description="training data (fine-tuning, distillation), with `labels` when needed"
    )
    eval: str | None = Field(None, description="evaluation data; `labels` for the accuracy metric")
    sequence_length: int | None = Field(
        None,
        ge=2,
        description="tokens per sample of a text corpus (.txt/.jsonl) given as data (default 64)",
    )


class Evaluate(_Strict):
    metric: str = Field(
        "agreement",
        description="accuracy | agreement | cosine | mse | pkg.module:function(outputs, labels, reference) -> float",
    )
    batch_size: int = Field(
        64, ge=1, description="latency is measured at batch 1 and at this batch size"
    )
    threads: int = Field(1, ge=1, description="ORT intra-op threads for latency")
    repeats: int = Field(20, ge=1, description="latency runs per setting (the median is reported)")
    max_samples: int = Field(2048, ge=1, description="evaluation samples used")


class PackSpec(_Strict):
    codecs: str | list[str] = Field(
        "auto", description="'auto' (every installed codec) or codec names (`modelpress plugins`)"
    )


class Recipe(_Strict):
    passes: list[PassSpec] = Field(min_length=1, description="passes, applied in order")
    pack: PackSpec | None = Field(
        None,
        description="finally pack the model losslessly into <output>.mpk (and report every stage's packed size)",
    )
    data: DataSources = Field(default_factory=DataSources)
    evaluate: Evaluate = Field(default_factory=Evaluate)
    plugins: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-plugin option defaults: {plugin name: {option: value}} for every pass of that plugin's methods (a pass's own options win)",
    )
    base_dir: str = Field(
        "", exclude=True, description="folder data paths are relative to (set when loading a file)"
    )
    allow_imports: bool = Field(
        True,
        exclude=True,
        description="False: refuse pkg.module:function entries and data outside base_dir",
    )

    def _is_callable_ref(self, source: str) -> bool:
        return (
            ":" in source
            and not os.path.exists(source)
            and not Path(self.base_dir, source).exists()
        )

    def resolve(self, source: str | None) -> Any:
        """A data source: a path (relative to the recipe) or the result of pkg.module:function()."""
        if source is None:
            return None
        if self._is_callable_ref(source):
            self._refuse_import(source, "data")
            return resolve_callable(source)()
        path = Path(source)
        if not path.is_absolute():
            path = Path(self.base_dir or ".") / path
        if not self.allow_imports:
            folder = Path(self.base_dir or ".").resolve()
            if folder not in path.resolve().parents:
                raise OptionsError(
                    f"recipe data path {source!r} is outside the recipe's folder {str(folder)!r}; "
                    "refused because imports are disabled (--no-imports): copy the data next to the recipe"
                )
        if not path.exists():
            raise DataError(f"recipe data file {str(path)!r} does not exist")
        return path

    def _refuse_import(self, entry: str, where: str) -> None:
        if not self.allow_imports:
            raise OptionsError(
                f"recipe {where} entry {entry!r} would import and call Python code; refused because imports are "
                "disabled (--no-imports / allow_imports=False). Use a data file or a built-in metric, or trust the recipe"
            )

    def validate_against(self, registry: Registry | None = None) -> None:
        """Every method exists and every option validates, before any work starts; the ``plugins:``
        section's options become each pass's defaults (its own options win)."""
        registry = registry or get_registry()
        _check_plugin_section(self.plugins, registry)
        for i, spec in enumerate(self.passes, 1):
            try:
                method = registry.method(spec.method, spec.kind)
            except UnknownMethodError as exc:
                raise UnknownMethodError(f"recipe pass {i}: {exc}") from None
            # NOTE: the plugins: section becomes the pass's options (its own win), so a report or a
            # tuned recipe written from it says every option the pass ran with
            spec.options = {
                **{
                    k: v
                    for k, v in self.plugins.get(method.plugin, {}).items()
                    if k in method.options.model_fields
                },
                **spec.options,
            }
            options = dict(spec.options)
            searched = [
                k for k, v in options.items() if isinstance(v, dict) and set(v) == {"search"}
            ]
            if searched:
                raise OptionsError(
                    f"recipe pass {i} ({spec.kind}/{spec.method}): option(s) {', '.join(searched)} are search ranges; "
                    "run `modelpress tune MODEL --recipe ...` to search them, or give single values to compress"
                )
            validate_pass_options(method, options, i)
            # NOTE: what a pass needs is declared by its method (requires / requires_if), not known here
            for need in sorted(method.data_needs(spec.options)):
                if not getattr(self.data, need, None):
                    why = next(
                        (
                            f" (option {opt!r} is set)"
                            for opt, data in method.requires_if
                            if data == need and spec.options.get(opt)
                        ),
                        "",
                    )
                    raise OptionsError(
                        f"recipe pass {i} ({spec.kind}/{spec.method}) needs data.{need}{why}"
                    )
        for field_name in ("calibration", "train", "eval"):
            source = getattr(self.data, field_name)
            if source is not None and self._is_callable_ref(source):
                self._refuse_import(source, f"data.{field_name}")
            elif source is not None:
                self.resolve(source)
        metric = self.evaluate.metric
        if metric not in METRICS and ":" not in metric:
            raise OptionsError(
                f"unknown metric {metric!r}; use one of {', '.join(METRICS)} or pkg.module:function"
            )
        if metric not in METRICS:
            self._refuse_import(metric, "evaluate.metric")
        if metric == "accuracy" and not self.data.eval:
            raise OptionsError("metric 'accuracy' needs data.eval with an array named 'labels'")


def _check_plugin_section(plugins: dict[str, dict[str, Any]], registry: Registry) -> None:
    """Every plugin the ``plugins:`` section names is loaded, and each option is one of its methods'."""
    for name, options in plugins.items():
        info = registry.plugins.get(name)
        if info is None:
            raise OptionsError(
                f"recipe plugins: no plugin {name!r} is loaded; loaded: {', '.join(sorted(registry.plugins))}"
            )
        known = {option for method in info.methods for option in method.options.model_fields}
        unknown = sorted(set(options) - known)
        if unknown:
            raise OptionsError(
                f"recipe plugins.{name}: option(s) {', '.join(unknown)} belong to none of its methods; "
                f"its options: {', '.join(sorted(known)) or 'none'}"
            )


def resolve_callable(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise OptionsError(f"cannot import {path!r}: {exc}") from None


def validate_pass_options(method: Method, options: dict[str, Any], index: int) -> dict[str, Any]:
    """Validate recipe pass ``index``'s (fixed) options against ``method``'s schema and return what
    was checked: the options less the one that names the reference model (a recipe's source,
    filled in at run time)."""
    options = dict(options)
    if method.uses_reference:
        options.pop(method.reference_option, None)
    try:
        method.validate_options(options)
    except OptionsError as exc:
        raise OptionsError(f"recipe pass {index}: {exc}") from None
    return options


def load_recipe(
    source: str | os.PathLike[str] | dict[str, Any] | Recipe, *, allow_imports: bool = True
) -> Recipe:
    """Parse and validate the structure of a recipe (a file, a dict or a Recipe).

    A recipe is code (``pkg.module:function`` entries are imported and called); with
    ``allow_imports=False`` those entries and data paths outside the recipe's folder are refused.
    """
    if isinstance(source, Recipe):
        if not allow_imports and source.allow_imports:
            source = source.model_copy(update={"allow_imports": False})
        return source
    base = ""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise OptionsError(f"recipe {str(path)!r} does not exist or is not a file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise OptionsError(
                f"recipe {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8 YAML or JSON"
            ) from None
        except OSError as exc:
            raise OptionsError(f"recipe {str(path)!r} cannot be read: {exc.strerror}") from None
        try:
            if path.suffix.lower() == ".json":
                raw = json.loads(text)
            else:
                import yaml

                raw = yaml.safe_load(text)
        except Exception as exc:
            raise OptionsError(
                f"recipe {str(path)!r} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {one_line(exc)}"
            ) from None
        base = str(path.parent)
        label = str(path)
    else:
        raw, label = source, "recipe"
    if not isinstance(raw, dict):
        raise OptionsError(
            f"{label}: a recipe is a mapping with `passes` (and optionally `data`, `evaluate`)"
        )
    bad_keys = [k for k in raw if not isinstance(k, str)]
    if bad_keys:
        raise OptionsError(f"{label}: keys must be names, not {one_line(repr(bad_keys[0]), 60)}")
    try:
        recipe = Recipe(**raw)
    except pydantic.ValidationError as exc:
        raise OptionsError(f"{label}: {one_line(validation_problems(exc), 600)}") from None
    recipe.base_dir = base
    recipe.allow_imports = allow_imports
    return recipe


def recipe_schema() -> dict[str, Any]:
    """The JSON Schema of recipes (``modelpress recipe-schema``)."""
    return Recipe.model_json_schema()
