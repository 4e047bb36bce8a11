"""The plugin system: registration, attribution, isolation of inputs, errors naming the plugin."""

import numpy as np
import pytest
from pydantic import Field

import modelpress
from modelpress import Method, Options
from modelpress.testing import check_method, tiny_cnn, tiny_mlp


class ScaleOptions(Options):
    factor: float = Field(0.5, gt=0, description="multiply every weight by this")


def scale_weights(model, options, context):
    for layer in model.weighted_layers():
        model.replace_initializer(layer.weight.name, layer.weight_array() * options.factor)
    context.figures["layers"] = len(model.weighted_layers())


class ScalePlugin:
    @modelpress.hookimpl
    def modelpress_register_methods(self, register):
        register(
            Method(
                name="scale",
                kind="prune",
                apply=scale_weights,
                options=ScaleOptions,
                summary="scale weights",
            )
        )


def test_registered_method_runs_and_is_recorded():
    registry = modelpress.create_registry(plugins=[ScalePlugin()])
    model = tiny_cnn()
    result = check_method("scale", model, registry=registry, factor=0.25)
    record = result.provenance.passes[-1]
    assert (record.kind, record.method, record.plugin, record.options) == (
        "prune",
        "scale",
        "ScalePlugin",
        {"factor": 0.25},
    )
    assert record.figures == {"layers": 3}
    np.testing.assert_allclose(
        result.initializer("conv1.weight").const_value.numpy(),
        0.25 * model.initializer("conv1.weight").const_value.numpy(),
    )
    assert result.reference is model


def test_duplicate_method_names_both_plugins():
    class Other:
        @modelpress.hookimpl
        def modelpress_register_methods(self, register):
            register(Method(name="scale", kind="prune", apply=scale_weights, options=ScaleOptions))

    with pytest.raises(
        modelpress.DuplicateMethodError,
        match=r"'prune/scale' is registered by both ScalePlugin .* and Other",
    ):
        modelpress.create_registry(plugins=[ScalePlugin(), Other()])


def test_misspelt_hook_is_an_error():
    class Typo:
        @modelpress.hookimpl
        def modelpress_register_method(self, register):  # missing "s"
            pass

    with pytest.raises(modelpress.PluginError, match=r"Typo.*modelpress_register_method"):
        modelpress.create_registry(plugins=[Typo()])


def test_plugin_raising_at_registration_is_named():
    class Broken:
        @modelpress.hookimpl
        def modelpress_register_methods(self, register):
            raise RuntimeError("boom at load")

    with pytest.raises(
        modelpress.PluginError,
        match=r"plugin Broken .* failed in modelpress_register_methods: RuntimeError: boom at load",
    ):
        modelpress.create_registry(plugins=[Broken()])


def test_plugin_raising_in_apply_is_named_and_writes_nothing(tmp_path):
    def explode(model, options, context):
        model.replace_initializer("fc1.bias", np.zeros(16, np.float32))
        raise ValueError("bad weights")

    class Exploding:
        @modelpress.hookimpl
        def modelpress_register_methods(self, register):
            register(Method(name="explode", kind="quantize", apply=explode))

    registry = modelpress.create_registry(plugins=[Exploding()])
    model = tiny_mlp()
    before = model.to_proto().SerializeToString()
    with pytest.raises(
        modelpress.PluginError,
        match=r"quantize/explode \(plugin Exploding\).*ValueError: bad weights",
    ) as info:
        modelpress.apply(model, "explode", registry=registry)
    assert info.value.plugin == "Exploding" and info.value.method == "explode"
    assert model.to_proto().SerializeToString() == before
    assert list(tmp_path.iterdir()) == []


def test_functional_method_that_mutates_its_input_is_caught():
    def liar(model, options, context):
        model.replace_initializer("fc1.bias", np.zeros(16, np.float32))
        return model.clone()

    class Liar:
        @modelpress.hookimpl
        def modelpress_register_methods(self, register):
            register(Method(name="liar", kind="quantize", apply=liar, mutates=False))

    registry = modelpress.create_registry(plugins=[Liar()])
    with pytest.raises(
        modelpress.PluginError, match="declares mutates=False but changed the model"
    ):
        modelpress.apply(tiny_mlp(), "liar", registry=registry)


def test_functional_method_returning_a_new_model():
    def functional(model, options, context):
        new = model.clone()
        new.replace_initializer("fc2.bias", np.ones(4, np.float32))
        return new

    class Functional:
        @modelpress.hookimpl
        def modelpress_register_methods(self, register):
            register(Method(name="functional", kind="quantize", apply=functional, mutates=False))

    registry = modelpress.create_registry(plugins=[Functional()])
    result = check_method(
        "functional", tiny_mlp(), registry=registry, allow_no_gain=True
    )  # same size: no gain
    assert result.initializer("fc2.bias").const_value.numpy().tolist() == [1, 1, 1, 1]


def test_in_place_method_returning_another_model_is_caught():
    class Wrong:
        @modelpress.hookimpl
        def modelpress_register_methods(self, register):
            register(
                Method(name="wrong", kind="quantize", apply=lambda m, o, c: m.clone(), mutates=True)
            )

    registry = modelpress.create_registry(plugins=[Wrong()])
    with pytest.raises(
        modelpress.PluginError, match="declares mutates=True but returned a new model"
    ):
        modelpress.apply(tiny_mlp(), "wrong", registry=registry)


def test_options_are_validated_before_work_with_suggestions():
    calls = []

    def record(model, options, context):
        calls.append(options)

    class Recorder:
        @modelpress.hookimpl
        def modelpress_register_methods(self, register):
            register(Method(name="rec", kind="prune", apply=record, options=ScaleOptions))

    registry = modelpress.create_registry(plugins=[Recorder()])
    with pytest.raises(
        modelpress.OptionsError, match=r"unknown option 'factr' \(did you mean 'factor'\?\)"
    ):
        modelpress.apply(tiny_mlp(), "rec", registry=registry, factr=2)
    with pytest.raises(modelpress.OptionsError, match=r"option 'factor'.*greater than 0"):
        modelpress.apply(tiny_mlp(), "rec", registry=registry, factor=-1)
    with pytest.raises(modelpress.OptionsError, match=r"option 'factor'.*valid number"):
        modelpress.apply(tiny_mlp(), "rec", registry=registry, factor="lots")
    assert calls == []


def test_unknown_method_lists_installed_ones():
    registry = modelpress.create_registry(plugins=[ScalePlugin()])
    with pytest.raises(modelpress.UnknownMethodError, match=r"'sclae'.*installed: .*prune/scale"):
        modelpress.apply(tiny_mlp(), "sclae", registry=registry)


def test_observer_hooks_see_each_pass():
    seen = []

    class Observer:
        @modelpress.hookimpl
        def modelpress_pass_start(self, method, options):
            seen.append(("start", method.name, options.factor))

        @modelpress.hookimpl
        def modelpress_pass_finish(self, method, record):
            seen.append(("finish", method.name, record.seconds >= 0, record.figures["layers"]))

    registry = modelpress.create_registry(plugins=[ScalePlugin(), Observer()])
    modelpress.apply(tiny_cnn(), "scale", registry=registry, factor=2.0)
    assert seen == [("start", "scale", 2.0), ("finish", "scale", True, 3)]


def test_method_spec_is_checked():
    with pytest.raises(ValueError, match="kind 'Low Rank' is not a valid kind name"):
        Method(name="x", kind="Low Rank", apply=scale_weights)
    with pytest.raises(TypeError, match="Options subclass"):
        Method(name="x", kind="prune", apply=scale_weights, options=dict)  # type: ignore[arg-type]


def test_builtins_come_through_the_entry_point_group():
    registry = modelpress.create_registry()
    onnx_plugin = registry.plugins["onnx"]
    assert onnx_plugin.builtin and onnx_plugin.distribution == "modelpress"
    assert [a.name for a in onnx_plugin.adapters] == ["onnx"]


@pytest.mark.slow
def test_autoload_switches(example_plugin, monkeypatch):
    assert "fp16-weights" in modelpress.create_registry().plugins
    monkeypatch.setenv("MODELPRESS_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry = modelpress.create_registry()
    assert "fp16-weights" not in registry.plugins and "onnx" in registry.plugins
    assert "autoload disabled" in registry.skipped["fp16-weights"]
    monkeypatch.delenv("MODELPRESS_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("MODELPRESS_PLUGINS", "something-else")
    with pytest.warns(modelpress.PluginWarning, match="MODELPRESS_PLUGINS names 'something-else'"):
        assert "fp16-weights" not in modelpress.create_registry().plugins
    monkeypatch.setenv(
        "MODELPRESS_PLUGINS", "modelpress-fp16-weights"
    )  # distribution name works too
    assert "fp16-weights" in modelpress.create_registry().plugins
    monkeypatch.setenv("MODELPRESS_BLOCK_PLUGINS", "fp16-weights")
    assert "fp16-weights" not in modelpress.create_registry().plugins


def test_a_plugin_that_fails_to_import_is_skipped_and_named(tmp_path, monkeypatch):
    """A broken third-party distribution: its entry point names a module that raises on import."""
    _broken_dist(tmp_path, "broken", "raise RuntimeError('this plugin is broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("MODELPRESS_DISABLE_PLUGIN_AUTOLOAD")
    with pytest.warns(
        modelpress.PluginWarning,
        match=r"plugin 'broken' failed to load .*broken-plugin 0\.1.*RuntimeError: this plugin is broken.*MODELPRESS_BLOCK_PLUGINS=broken",
    ):
        registry = modelpress.create_registry()
    assert "broken" not in registry.plugins and "onnx" in registry.plugins
    assert "RuntimeError: this plugin is broken" in registry.failed["broken"]
    assert "broken" not in modelpress.create_registry(block=["broken"]).failed


def _broken_dist(site, name, source):
    module = f"{name}_plugin_module"
    dist = site / f"{name}_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[modelpress]\n{name} = {module}\n")
    (site / f"{module}.py").write_text(source)
