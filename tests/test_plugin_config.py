"""Per-plugin configuration: MODELPRESS_PLUGIN_<PLUGIN>_<OPTION> environment defaults and a
recipe's `plugins:` section, both defaults under the options given explicitly."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import Field

import modelpress
from modelpress.plugin.config import env_name
from modelpress.plugin_api import Method, Options, hookimpl
from modelpress.testing import tiny_mlp


class ShrinkOptions(Options):
    factor: float = Field(1.0, gt=0, description="multiplies the first layer's weight")
    layers: list[str] = Field(default_factory=list, description="unused: a list option")


def shrink(model, options, context):
    layer = model.weighted_layers()[0]
    model.replace_initializer(
        layer.weight.name, (layer.weight_array() * options.factor).astype(np.float32)
    )
    context.figures["factor"] = options.factor
    return model


class Shrink:
    @hookimpl
    def modelpress_register_methods(self, register):
        register(
            Method(
                name="shrink", kind="scale", apply=shrink, options=ShrinkOptions, min_cosine=None
            )
        )


@pytest.fixture
def registry():
    registry = modelpress.create_registry()
    registry.register(Shrink(), name="my-plugin")
    return registry


def _factor(model):
    return model.provenance.passes[-1].options["factor"]


def test_environment_defaults_and_explicit_options_win(registry, monkeypatch):
    assert env_name("my-plugin", "factor") == "MODELPRESS_PLUGIN_MY_PLUGIN_FACTOR"
    model = tiny_mlp()
    monkeypatch.setenv("MODELPRESS_PLUGIN_MY_PLUGIN_FACTOR", "0.5")
    monkeypatch.setenv("MODELPRESS_PLUGIN_MY_PLUGIN_LAYERS", "[fc1, fc2]")  # read as YAML
    result = modelpress.apply(model, "shrink", kind="scale", registry=registry)
    assert _factor(result) == 0.5 and result.provenance.passes[-1].options["layers"] == [
        "fc1",
        "fc2",
    ]
    w = model.weighted_layers()[0].weight_array()
    assert np.allclose(result.weighted_layers()[0].weight_array(), w * 0.5)
    assert (
        _factor(modelpress.apply(model, "shrink", kind="scale", registry=registry, factor=2.0))
        == 2.0
    )
    monkeypatch.setenv("MODELPRESS_PLUGIN_MY_PLUGIN_FACTOR", "-3")
    with pytest.raises(
        modelpress.OptionsError, match=r"factor.*MODELPRESS_PLUGIN_MY_PLUGIN_FACTOR=-3"
    ):
        modelpress.apply(model, "shrink", kind="scale", registry=registry)
    # another plugin's variables are not this method's
    monkeypatch.delenv("MODELPRESS_PLUGIN_MY_PLUGIN_FACTOR")
    monkeypatch.setenv("MODELPRESS_PLUGIN_OTHER_FACTOR", "0.1")
    assert (
        _factor(
            modelpress.apply(model, "shrink", kind="scale", registry=registry, allow_no_gain=True)
        )
        == 1.0
    )


def _recipe(options=None, plugins=None):
    return {
        "passes": [{"kind": "scale", "method": "shrink", "options": options or {}}],
        "plugins": plugins or {},
    }


def test_a_recipe_plugins_section_sets_defaults(registry, monkeypatch, tmp_path):
    monkeypatch.setenv("MODELPRESS_PLUGIN_MY_PLUGIN_FACTOR", "0.5")
    model = tiny_mlp()
    result = modelpress.compress(
        model,
        _recipe(plugins={"my-plugin": {"factor": 0.25}}),
        registry=registry,
        show_progress=False,
        report_dir=tmp_path / "r1",
    )
    assert _factor(result.model) == 0.25  # the recipe's section wins over the environment
    result = modelpress.compress(
        model,
        _recipe({"factor": 0.75}, {"my-plugin": {"factor": 0.25}}),
        registry=registry,
        show_progress=False,
        report_dir=tmp_path / "r2",
    )
    assert _factor(result.model) == 0.75  # the pass's own option wins
    with pytest.raises(modelpress.OptionsError, match=r"no plugin 'my-plugn' is loaded"):
        modelpress.compress(
            model,
            _recipe(plugins={"my-plugn": {"factor": 0.25}}),
            registry=registry,
            show_progress=False,
        )
    with pytest.raises(
        modelpress.OptionsError,
        match=r"plugins.my-plugin: option\(s\) facter belong to none of its methods",
    ):
        modelpress.compress(
            model,
            _recipe(plugins={"my-plugin": {"facter": 0.25}}),
            registry=registry,
            show_progress=False,
        )
    with pytest.raises(modelpress.OptionsError, match=r"recipe pass 1: .*factor"):
        modelpress.compress(
            model,
            _recipe(plugins={"my-plugin": {"factor": -1}}),
            registry=registry,
            show_progress=False,
        )
