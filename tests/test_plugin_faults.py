"""Contained plugin faults: observers, adapters and broken installed plugins never take modelpress down
(a warning naming the plugin; an error under MODELPRESS_STRICT_PLUGINS=1), and hooks go through pluggy."""

from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import pytest

import modelpress
from modelpress import Adapter, Method
from modelpress.testing import tiny_mlp
from tests.conftest import run_cli
from tests.test_plugins import ScalePlugin, _broken_dist


class FaultyObserver:
    """Raises in every observer hook."""

    @modelpress.hookimpl
    def modelpress_pass_finish(self, record):
        raise RuntimeError("tracking server down")

    @modelpress.hookimpl
    def modelpress_export_finish(self, result):
        raise ValueError("cannot log artifact")


class Recorder:
    def __init__(self):
        self.seen = []

    @modelpress.hookimpl
    def modelpress_pass_finish(self, method, record):  # an argument subset
        self.seen.append(("finish", method.name, record.figures["layers"]))


def test_observer_that_raises_is_a_warning_and_the_pass_result_stands(tmp_path):
    recorder = Recorder()
    registry = modelpress.create_registry(plugins=[ScalePlugin(), FaultyObserver(), recorder])
    model = tiny_mlp()
    with pytest.warns(
        modelpress.PluginWarning,
        match=r"plugin 'FaultyObserver' failed in modelpress_pass_finish: RuntimeError: tracking server down",
    ):
        result = modelpress.apply(
            model, "scale", registry=registry, factor=0.5, show_progress=False
        )
    weight = model.weighted_layers()[0].weight.name
    np.testing.assert_allclose(
        result.initializer(weight).const_value.numpy(),
        0.5 * model.initializer(weight).const_value.numpy(),
    )
    assert recorder.seen == [("finish", "scale", 2)]  # the other observer still ran
    out = tmp_path / "scaled.onnx"
    with pytest.warns(
        modelpress.PluginWarning,
        match=r"plugin 'FaultyObserver' failed in modelpress_export_finish: ValueError: cannot log artifact",
    ):
        exported = modelpress.export(result, out, registry=registry, show_progress=False)
    assert out.exists() and exported.verification is not None
    onnx.checker.check_model(str(out))


def test_strict_plugins_makes_an_observer_fault_an_error(monkeypatch):
    monkeypatch.setenv("MODELPRESS_STRICT_PLUGINS", "1")
    registry = modelpress.create_registry(plugins=[ScalePlugin(), FaultyObserver()])
    with pytest.raises(
        modelpress.PluginError,
        match=r"plugin 'FaultyObserver' failed in modelpress_pass_finish.*MODELPRESS_STRICT_PLUGINS=1",
    ):
        modelpress.apply(tiny_mlp(), "scale", registry=registry, show_progress=False)


def test_observer_wrappers_run_around_the_others_and_their_faults_are_contained():
    """Observer hooks are called by modelpress's own loop (pluggy's implementations are left as
    registered): wrappers, new- and old-style, still run around the others, and a wrapper that
    raises after its yield is a warning like any observer's fault."""
    order = []

    class Timing:
        @modelpress.hookimpl(wrapper=True)
        def modelpress_pass_finish(self, method):
            order.append("wrapper before")
            results = yield
            order.append(("wrapper after", method.name, results))
            raise RuntimeError("timer stopped twice")

    class OldStyle:
        @modelpress.hookimpl(hookwrapper=True)
        def modelpress_pass_finish(self):
            order.append("hookwrapper before")
            outcome = yield
            order.append(("hookwrapper after", outcome.get_result()))

    class Plain:
        @modelpress.hookimpl
        def modelpress_pass_finish(self, record):
            order.append("plain")
            return record.figures["layers"]

    plugins = [ScalePlugin(), Timing(), OldStyle(), Plain(), FaultyObserver()]
    registry = modelpress.create_registry(plugins=plugins)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        modelpress.apply(tiny_mlp(), "scale", registry=registry, show_progress=False)
    faults = sorted(
        str(w.message).split(":")[0]
        for w in caught
        if issubclass(w.category, modelpress.PluginWarning)
    )
    assert faults == [
        "plugin 'FaultyObserver' failed in modelpress_pass_finish",
        "plugin 'Timing' failed in modelpress_pass_finish",
    ]
    # pluggy's order: the last registered wrapper first, torn down last; the plain observer's result reaches both
    assert order == [
        "hookwrapper before",
        "wrapper before",
        "plain",
        ("wrapper after", "scale", [2]),
        ("hookwrapper after", [2]),
    ]
    impls = registry.pm.hook.modelpress_pass_finish.get_hookimpls()
    assert all(
        impl.function == impl.plugin.modelpress_pass_finish for impl in impls
    )  # nothing patched


def _adapter_plugin(name, accepts, load):
    class AdapterPlugin:
        @modelpress.hookimpl
        def modelpress_register_adapters(self, register):
            register(Adapter(name=name, accepts=accepts, load=load, priority=100))

    return AdapterPlugin()


def _explode(source):
    raise OSError("cannot stat the source")


def test_adapter_whose_accepts_raises_does_not_break_onnx_loading(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(tiny_mlp().to_proto(), path)
    registry = modelpress.create_registry(
        plugins=[_adapter_plugin("sklearn", _explode, lambda s: None)]
    )
    with pytest.warns(
        modelpress.PluginWarning,
        match=r"adapter 'sklearn' \(plugin AdapterPlugin\) failed in accepts\(\): OSError: cannot stat.*'onnx', loaded the model",
    ):
        model = modelpress.load(path, registry=registry)
    assert model.weighted_layers() and model.provenance.source_framework == "onnx"


def test_adapter_faults_are_plugin_errors_naming_the_plugin(tmp_path):
    obj = object()
    returns_none = modelpress.create_registry(
        plugins=[_adapter_plugin("lazy", lambda s: s is obj, lambda s: None)]
    )
    with pytest.raises(
        modelpress.PluginError,
        match=r"adapter 'lazy' \(plugin AdapterPlugin\): load\(\) returned NoneType, not a modelpress.Model",
    ) as info:
        modelpress.load(obj, registry=returns_none)
    assert info.value.plugin == "AdapterPlugin"
    raises = modelpress.create_registry(
        plugins=[_adapter_plugin("crashy", lambda s: s is obj, lambda s: 1 / 0)]
    )
    with pytest.raises(
        modelpress.PluginError,
        match=r"adapter 'crashy' \(plugin AdapterPlugin\) failed in load\(\): ZeroDivisionError",
    ):
        modelpress.load(obj, registry=raises)
    not_bool = modelpress.create_registry(
        plugins=[_adapter_plugin("vague", lambda s: "maybe", lambda s: None)]
    )
    with pytest.raises(
        modelpress.PluginError, match=r"adapter 'vague' .*accepts\(\) returned str, not a bool"
    ):
        modelpress.load(obj, registry=not_bool)


@pytest.mark.slow
def test_every_broken_installed_plugin_is_reported_and_commands_still_work(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    _broken_dist(site, "importfail", "import not_a_module_anywhere\n")
    _broken_dist(
        site,
        "raising",
        (
            "import modelpress\n"
            "@modelpress.hookimpl\n"
            "def modelpress_register_methods(register):\n"
            "    raise KeyError('missing config')\n"
        ),
    )
    model = tmp_path / "m.onnx"
    onnx.save(tiny_mlp().to_proto(), model)
    env = {"PYTHONPATH": str(site), "MODELPRESS_DISABLE_PLUGIN_AUTOLOAD": ""}
    listing = run_cli("plugins", env=env)
    assert listing.returncode == 0, listing.stderr
    assert "failed to load" in listing.stdout
    assert "importfail" in listing.stdout and "ModuleNotFoundError" in listing.stdout
    assert "raising" in listing.stdout and "KeyError" in listing.stdout
    assert (
        "warning: plugin 'importfail' failed to load" in listing.stderr
        and "plugin 'raising' failed to load" in listing.stderr
    )
    as_json = json.loads(run_cli("plugins", "--json", env=env).stdout)
    assert set(as_json["failed"]) == {"importfail", "raising"}
    inspect = run_cli("inspect", str(model), env=env)
    assert inspect.returncode == 0, inspect.stderr
    strict = run_cli("inspect", str(model), env={**env, "MODELPRESS_STRICT_PLUGINS": "1"})
    assert strict.returncode == 1
    assert (
        "2 plugin(s) failed to load" in strict.stderr
        and "importfail" in strict.stderr
        and "raising" in strict.stderr
    )


def test_unknown_names_in_the_switches_warn(monkeypatch):
    monkeypatch.setenv("MODELPRESS_BLOCK_PLUGINS", "quantise")
    with pytest.warns(
        modelpress.PluginWarning,
        match=r"MODELPRESS_BLOCK_PLUGINS names 'quantise', which no installed plugin is called .*quantize",
    ):
        registry = modelpress.create_registry()
    assert "quantize" in registry.plugins
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        modelpress.create_registry(block=["quantize"], allow=["modelpress"])  # known names: silent


def test_hook_without_hookimpl_is_an_error():
    class Forgot:
        def modelpress_register_methods(self, register):
            register(Method(name="never", kind="prune", apply=lambda m, o, c: None))

    with pytest.raises(
        modelpress.PluginError,
        match=r"Forgot .*defines modelpress_register_methods without @modelpress.hookimpl",
    ):
        modelpress.create_registry(plugins=[Forgot()])


def test_register_hooks_go_through_pluggy_so_wrappers_work():
    order = []

    class Wrapping:
        @modelpress.hookimpl(wrapper=True)
        def modelpress_register_methods(self, register):
            order.append("before")
            result = yield
            register(Method(name="wrapped", kind="prune", apply=lambda m, o, c: None, mutates=True))
            return result

    registry = modelpress.create_registry(plugins=[Wrapping()])
    assert registry.method("wrapped").plugin == "Wrapping" and order == ["before"]


def test_observer_order_follows_tryfirst_and_trylast():
    order = []

    class Late:
        @modelpress.hookimpl(trylast=True)
        def modelpress_pass_start(self, method):
            order.append(("late", method.name))

    class Early:
        @modelpress.hookimpl(tryfirst=True)
        def modelpress_pass_start(self):
            order.append("early")

    registry = modelpress.create_registry(plugins=[Late(), ScalePlugin(), Early()])
    modelpress.apply(tiny_mlp(), "scale", registry=registry, show_progress=False)
    assert order == ["early", ("late", "scale")]


def test_nested_distill_uses_the_registry_it_was_given():
    """kd's auto student comes from a nested `channel` prune: it must run in the same registry."""
    pytest.importorskip("torch")
    seen = []

    class Watcher:
        @modelpress.hookimpl
        def modelpress_pass_start(self, method):
            seen.append(method.qualname)

    registry = modelpress.create_registry(plugins=[Watcher()])
    x = np.random.default_rng(0).random((32, 8), dtype=np.float32)
    modelpress.apply(
        tiny_mlp(),
        "kd",
        kind="distill",
        registry=registry,
        train={"x": x},
        width=0.5,
        alpha=0.0,
        epochs=1,
        show_progress=False,
    )
    assert seen == ["distill/kd", "prune/channel"]


class Wrapped:
    """A source only the `wrapped` adapter below can load."""

    def __init__(self, model):
        self.proto = model.to_proto()


def _wrapped_adapter():
    return _adapter_plugin(
        "wrapped",
        lambda source: isinstance(source, Wrapped),
        lambda source, **_: modelpress.Model.from_onnx(source.proto),
    )


class ExportLog:
    def __init__(self):
        self.written = []

    @modelpress.hookimpl
    def modelpress_export_finish(self, result):
        self.written.append(result.path.name)


def test_compress_carries_its_registry_to_load_and_every_export(tmp_path):
    """The source is loaded by the registry's adapters, and each export tells the registry's observers."""
    log = ExportLog()
    registry = modelpress.create_registry(plugins=[ScalePlugin(), _wrapped_adapter(), log])
    recipe = {"passes": [{"kind": "prune", "method": "scale", "options": {"factor": 0.5}}]}
    with pytest.raises(
        modelpress.UnsupportedModelError
    ):  # the process-wide registry has no such adapter
        modelpress.load(Wrapped(tiny_mlp()), show_progress=False)
    result = modelpress.compress(
        Wrapped(tiny_mlp()),
        recipe,
        output=tmp_path / "out.onnx",
        registry=registry,
        show_progress=False,
    )
    assert log.written == ["00-source.onnx", "01-prune-scale.onnx", "out.onnx"]
    weight = tiny_mlp().weighted_layers()[0].weight.name
    np.testing.assert_allclose(
        result.model.initializer(weight).const_value.numpy(),
        0.5 * tiny_mlp().initializer(weight).const_value.numpy(),
    )


def test_distill_loads_the_given_student_with_the_registry_it_was_given():
    pytest.importorskip("torch")
    registry = modelpress.create_registry(plugins=[_wrapped_adapter()])
    x = np.random.default_rng(0).random((32, 8), dtype=np.float32)
    student = modelpress.distill(
        tiny_mlp(),
        Wrapped(tiny_mlp(hidden=8, seed=1)),
        data={"x": x},
        registry=registry,
        alpha=0.0,
        epochs=1,
        show_progress=False,
    )
    assert student.initializer("fc1.weight").const_value.shape == (
        8,
        8,
    )  # the given student, trained
    assert student.provenance.passes[-1].method == "kd"


def test_figures_must_be_json_and_the_error_names_plugin_and_key():
    def arrays(model, options, context):
        for layer in model.weighted_layers():
            model.replace_initializer(layer.weight.name, layer.weight_array() * 0.5)
        context.figures["ok"] = np.float32(0.5)  # a numpy scalar is fine
        context.figures["per_layer_error"] = np.zeros((4, 4))

    class Arrays:
        @modelpress.hookimpl
        def modelpress_register_methods(self, register):
            register(Method(name="arrays", kind="prune", apply=arrays))

    registry = modelpress.create_registry(plugins=[Arrays()])
    with pytest.raises(
        modelpress.PluginError,
        match=r"prune/arrays \(plugin Arrays\) reported figure 'per_layer_error' as an array of shape \(4, 4\)",
    ) as info:
        modelpress.apply(tiny_mlp(), "arrays", registry=registry, show_progress=False)
    assert info.value.plugin == "Arrays"


def test_observers_get_pass_ids_stage_names_and_run_start_finish(tmp_path):
    events = []

    class Tracker:
        @modelpress.hookimpl
        def modelpress_run_start(self, run_id, model, recipe):
            events.append(("run_start", run_id, model.name, len(recipe.passes)))

        @modelpress.hookimpl
        def modelpress_pass_start(self, pass_id, stage):
            events.append(("pass_start", pass_id, stage))

        @modelpress.hookimpl
        def modelpress_pass_finish(self, pass_id, stage, record):
            events.append(("pass_finish", pass_id, stage, record.method))

        @modelpress.hookimpl
        def modelpress_run_finish(self, run_id, result, error):
            events.append(("run_finish", run_id, result.output.name if result else None, error))

    registry = modelpress.create_registry(plugins=[ScalePlugin(), Tracker()])
    recipe = {
        "passes": [
            {"kind": "prune", "method": "scale", "name": "halve", "options": {"factor": 0.5}},
            {"kind": "prune", "method": "scale", "options": {"factor": 0.5}},
        ]
    }
    # NOTE: two halvings miss the prune kind's floor (cosine 0.5): accepted, the events are the point
    modelpress.compress(
        tiny_mlp(),
        recipe,
        output=tmp_path / "out.onnx",
        registry=registry,
        show_progress=False,
        accept_loss=True,
    )
    kinds = [e[0] for e in events]
    assert kinds == [
        "run_start",
        "pass_start",
        "pass_finish",
        "pass_start",
        "pass_finish",
        "run_finish",
    ]
    run_id = events[0][1]
    assert events[-1] == ("run_finish", run_id, "out.onnx", None)
    (_, id1, stage1), (_, id1b, stage1b, _) = events[1], events[2]
    (_, id2, stage2), (_, id2b, stage2b, _) = events[3], events[4]
    assert id1 == id1b and id2 == id2b and id1 != id2
    assert (stage1, stage1b, stage2, stage2b) == ("halve", "halve", "prune/scale", "prune/scale")
    events.clear()
    modelpress.apply(tiny_mlp(), "scale", registry=registry, show_progress=False)
    assert [e[0] for e in events] == ["pass_start", "pass_finish"] and events[0][2] is None
    events.clear()
    with pytest.raises(modelpress.UnknownMethodError):
        modelpress.compress(
            tiny_mlp(),
            {"passes": [{"kind": "prune", "method": "nope"}]},
            report_dir=tmp_path,
            registry=registry,
            show_progress=False,
        )
    assert events == []  # a recipe that does not validate never starts a run
