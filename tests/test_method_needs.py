"""Declared method needs: a third-party method says what data it needs (requires / requires_if) and
that it runs on the recipe's reference model (uses_reference); recipes and compress honour it
exactly as for the built-ins, with no built-in names in the core."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pytest
from pydantic import Field

import modelpress
from modelpress import Method, Options
from modelpress.testing import tiny_mlp


class ShrinkOptions(Options):
    factor: float = Field(0.5, gt=0, le=1)
    polish_epochs: int = Field(0, ge=0, description="needs training data when set")


def shrink(model, options, context):
    for layer in model.weighted_layers():
        model.replace_initializer(layer.weight.name, layer.weight_array() * options.factor)
    context.figures["calibration_batches"] = 0 if context.calibration is None else 1


class BlendOptions(Options):
    with_model: Literal["none", "given"] = "none"
    mix: float = Field(0.5, ge=0, le=1)


def blend(model, options, context):
    """Runs on the reference; averages its weights with the current model's (a 'student' given in extra)."""
    current = context.extra.get("current") if options.with_model == "given" else None
    if current is None:
        raise modelpress.OptionsError("blend needs the current model")
    out = current.clone()
    for layer in out.weighted_layers():
        ref = model.initializer(layer.weight.name).const_value.numpy()
        out.replace_initializer(
            layer.weight.name, options.mix * ref + (1 - options.mix) * layer.weight_array()
        )
    return out


class NeedsPlugin:
    @modelpress.hookimpl
    def modelpress_register_methods(self, register):
        register(
            Method(
                name="shrink",
                kind="prune",
                apply=shrink,
                options=ShrinkOptions,
                requires={"calibration"},
                requires_if={"polish_epochs": "train"},
            )
        )
        register(
            Method(
                name="blend",
                kind="merge",
                apply=blend,
                options=BlendOptions,
                mutates=False,
                uses_reference=True,
                reference_option="origin",
                reference_options={"with_model": "given"},
            )
        )


def test_declared_needs_are_checked_by_recipes(tmp_path):
    registry = modelpress.create_registry(plugins=[NeedsPlugin()])
    method = registry.method("shrink")
    assert method.data_needs({}) == {"calibration"} and method.data_needs({"polish_epochs": 2}) == {
        "calibration",
        "train",
    }
    no_data = modelpress.Recipe.model_validate({"passes": [{"kind": "prune", "method": "shrink"}]})
    with pytest.raises(
        modelpress.OptionsError, match=r"recipe pass 1 \(prune/shrink\) needs data\.calibration"
    ):
        no_data.validate_against(registry)
    calib_only = modelpress.Recipe.model_validate(
        {
            "passes": [{"kind": "prune", "method": "shrink", "options": {"polish_epochs": 1}}],
            "data": {"calibration": "c.npz"},
        }
    )
    with pytest.raises(
        modelpress.OptionsError, match=r"needs data\.train \(option 'polish_epochs' is set\)"
    ):
        calib_only.validate_against(registry)
    with pytest.raises(
        ValueError, match=r"requires 'gpu'; data needs are calibration, train, eval"
    ):
        Method(name="x", kind="prune", apply=shrink, requires={"gpu"})


def test_a_reference_method_runs_on_the_source_with_the_current_model(tmp_path):
    registry = modelpress.create_registry(plugins=[NeedsPlugin()])
    source = tiny_mlp()
    x = np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    recipe = {
        "passes": [
            {"kind": "prune", "method": "shrink", "options": {"factor": 0.5}},
            {"kind": "merge", "method": "blend", "options": {"origin": "source", "mix": 0.5}},
        ],
        "data": {"calibration": str(tmp_path / "calib.npz")},
    }
    result = modelpress.compress(
        source, recipe, report_dir=tmp_path, registry=registry, show_progress=False
    )
    layer = source.weighted_layers()[0].weight.name
    before = source.initializer(layer).const_value.numpy()
    np.testing.assert_allclose(
        result.model.initializer(layer).const_value.numpy(), 0.75 * before, rtol=1e-6
    )
    assert [(p.kind, p.method) for p in result.model.provenance.passes] == [
        ("prune", "shrink"),
        ("merge", "blend"),
    ]
    bad = {
        **recipe,
        "passes": [
            recipe["passes"][0],
            {"kind": "merge", "method": "blend", "options": {"origin": "elsewhere"}},
        ],
    }
    with pytest.raises(modelpress.OptionsError, match=r"recipe pass 2: origin must be 'source'"):
        modelpress.compress(
            source, bad, report_dir=tmp_path, registry=registry, show_progress=False
        )
