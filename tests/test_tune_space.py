"""The default tune space comes from the methods' own declarations, for built-ins and third-party
methods alike (a method of a new kind included), and says what it left out and why; two plugins
declaring one kind differently fail loudly; a local tune starts its own Ray whatever an earlier
cluster left behind."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import Field

import modelpress
from modelpress import Kind, Method, Options
from modelpress.app.tuning.defaults import default_space
from modelpress.app.tuning.strategy import seeds
from modelpress.plugin import registry as registry_module
from modelpress.plugin.registry import DuplicateKindError
from modelpress.plugin_api import Tuning
from modelpress.testing import tiny_cnn, tiny_mlp
from tests.conftest import ROOT, run_cli


class RankOptions(Options):
    # NOTE: the search is declared where a plugin declares it: on the option, in the schema
    energy: float = Field(
        0.95,
        gt=0,
        le=1,
        json_schema_extra={"search": [0.99, 0.9]},
        description="share of the squared singular values kept",
    )


def low_rank(model, options, context):
    """Each 2-D weight replaced by its best approximation keeping ``energy`` of its squared singular values."""
    ranks = []
    for layer in model.weighted_layers():
        w = layer.weight_array()
        if w.ndim != 2:
            continue
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), options.energy - 1e-12) + 1)
        model.replace_initializer(layer.weight.name, ((u[:, :k] * s[:k]) @ vt[:k]).astype(w.dtype))
        ranks.append(k)
    context.figures["rank"] = max(ranks)


class Factorize:
    """A plugin with a method of a new kind; its tuning puts it first in the space and starts the study with it."""

    @modelpress.hookimpl
    def modelpress_register_kinds(self, register):
        register(
            Kind("factorize", "replace weight matrices by low-rank factors", columns=("rank",))
        )

    @modelpress.hookimpl
    def modelpress_register_methods(self, register):
        register(
            Method(
                name="svd",
                kind="factorize",
                apply=low_rank,
                options=RankOptions,
                summary="truncated SVD",
                tuning=Tuning(order=0, seed=True, ops=("MatMul", "Gemm"), min_elements=1024),
            )
        )


def _names(space):
    return [p.name for p in space.pipelines]


def test_builtin_spaces_come_from_their_declarations_in_todays_order(digits_mlp_path):
    model = modelpress.load(digits_mlp_path)
    registry = modelpress.create_registry(autoload=False)
    plain = default_space(model, registry, calibration=True, train=False, torch=True)
    assert _names(plain) == [
        "channel+int8-static",
        "int8-static",
        "codebook",
        "int4-weight-only",
        "int8-dynamic",
        "magnitude",
        "fp16",
    ]
    # without training data: pruning's recovery is not searched, and its ratio range is the declared one for that case
    channel = plain.pipeline("channel+int8-static").params()
    assert "1.fine_tune_epochs" not in channel and (
        channel["1.ratio"].low,
        channel["1.ratio"].high,
    ) == (0.05, 0.3)
    assert (
        "int8-qat" in plain.left_out
        and plain.left_out["int8-qat"] == "needs training data (--train)"
    )
    assert plain.left_out["kd"] == "needs training data (--train)"
    assert any(n.startswith("channel+kd+int8-static: kd needs training data") for n in plain.notes)
    # the study starts at int8-static's declared seed (its first values, nothing kept in float)
    first = seeds(plain, {"int8-static": ["a"], "channel+int8-static": ["a"]})[0]
    assert first == {
        "pipeline": "int8-static",
        "int8-static:1.calibrator": "percentile",
        "int8-static:1.per_channel": True,
        "int8-static:1.activation_type": "uint8",
        "int8-static:1.exclude": 0,
    }

    trained = default_space(model, registry, calibration=True, train=True, torch=True, labels=False)
    assert _names(trained)[:3] == ["channel+int8-static", "channel+kd+int8-static", "int8-static"]
    assert trained.pipeline("channel+int8-static").params()["1.fine_tune_epochs"].values == (
        3,
        1,
        0,
    )
    kd = trained.pipeline("channel+kd+int8-static").passes[1]
    assert (
        kd.options["alpha"] == 0.0
    )  # no labels: kd learns from the teacher only (declared `without={"labels": ...}`)
    assert "int8-qat" in trained.left_out and "declares no search" in trained.left_out["int8-qat"]


def test_a_method_of_a_new_kind_with_a_declared_search_joins_the_default_space(digits_mlp_path):
    registry = modelpress.create_registry(autoload=False, plugins=[Factorize()])
    space = default_space(
        modelpress.load(digits_mlp_path), registry, calibration=True, train=False, torch=False
    )
    assert _names(space)[0] == "svd"
    assert space.pipeline("svd").params()["1.energy"].values == (0.99, 0.9)
    assert seeds(space, {})[0] == {"pipeline": "svd", "svd:1.energy": 0.99}
    # a model it does not fit leaves it out, saying why
    conv = tiny_cnn()
    space = default_space(conv, registry, calibration=True, train=False, torch=False)
    assert "svd" not in _names(space) and "MatMul/Gemm" in space.left_out["svd"]


def test_bad_tuning_declarations_are_named():
    class Opts(Options):
        level: int = Field(1, ge=1, le=3)

    with pytest.raises(ValueError, match=r"names option.*'levle'"):
        Method(
            name="m",
            kind="factorize",
            apply=low_rank,
            options=Opts,
            tuning=Tuning(search={"levle": [1, 2]}),
        )
    with pytest.raises(ValueError, match="unknown condition"):
        Tuning(without={"gpu": {}})

    class Plugin:
        @modelpress.hookimpl
        def modelpress_register_methods(self, register):
            register(
                Method(
                    name="m",
                    kind="factorize",
                    apply=low_rank,
                    options=Opts,
                    tuning=Tuning(search={"level": [1, 5]}),
                )
            )

    registry = modelpress.create_registry(autoload=False, plugins=[Plugin()])
    with pytest.raises(
        modelpress.OptionsError,
        match=r"the tuning of factorize/m option 'level': value 5 is not valid",
    ):
        default_space(tiny_mlp(), registry, calibration=True, train=False, torch=False)


def _string_constants(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return {
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    }


def test_the_tuner_holds_no_name_of_a_builtin():
    registry = modelpress.create_registry(autoload=False)
    names = set()
    for method in registry.methods():
        names |= {method.name, method.kind, method.qualname}
        if method.tuning is not None:
            names |= method.tuning.options_named()
    # NOTE: the host's own words that happen to match an option name: a report column, the evaluation setting
    names -= {"ratio", "max_samples"}
    found = {
        str(path.name): _string_constants(path) & names
        for path in (ROOT / "core" / "app" / "tuning").glob("*.py")
    }
    assert not {k: v for k, v in found.items() if v}


# -- kinds declared by two plugins ------------------------------------------------------------------


class _KindPlugin:
    def __init__(self, description: str, method: str):
        self.description, self.method = description, method
        self.__name__ = f"{method}-plugin"  # NOTE: the plugin's name in the registry

    @modelpress.hookimpl
    def modelpress_register_kinds(self, register):
        register(Kind("factorize", self.description, columns=("rank",)))

    @modelpress.hookimpl
    def modelpress_register_methods(self, register):
        register(Method(name=self.method, kind="factorize", apply=low_rank, options=RankOptions))


PLUGIN_A = _KindPlugin("replace weight matrices by low-rank factors", "svd")
PLUGIN_B = _KindPlugin("replace weight matrices by low-rank factors", "tucker")
PLUGIN_C = _KindPlugin("something else", "cp")


def test_the_same_kind_from_two_plugins_merges_and_a_different_one_fails_naming_both():
    registry = modelpress.create_registry(autoload=False, plugins=[PLUGIN_A, PLUGIN_B])
    assert {m.name for m in registry.methods("factorize")} == {"svd", "tucker"}
    assert registry.kind("factorize").description == "replace weight matrices by low-rank factors"
    with pytest.raises(
        DuplicateKindError,
        match=r"kind 'factorize' is registered differently by both svd-plugin .*and cp-plugin .*something else",
    ) as info:
        modelpress.create_registry(autoload=False, plugins=[PLUGIN_A, PLUGIN_C])
    assert isinstance(info.value, modelpress.PluginError) and info.value.plugins == (
        "svd-plugin",
        "cp-plugin",
    )


def test_a_kind_conflict_between_installed_plugins_is_not_contained(monkeypatch):
    # NOTE: before, the second entry point (by name) was skipped with a warning and its methods vanished
    group = registry_module.ENTRY_POINT_GROUP
    points = [
        importlib.metadata.EntryPoint(name, f"tests.test_tune_space:{attr}", group)
        for name, attr in (("a-lowrank", "PLUGIN_A"), ("b-other", "PLUGIN_C"))
    ]
    monkeypatch.setattr(registry_module, "_entry_points", lambda: points)
    monkeypatch.delenv(registry_module.DISABLE_AUTOLOAD_ENV, raising=False)
    with pytest.raises(
        DuplicateKindError, match=r"registered differently by both a-lowrank .* and b-other"
    ) as info:
        registry_module.create_registry()
    assert info.value.plugins == ("a-lowrank", "b-other")


# -- tune runs (Ray) --------------------------------------------------------------------------------


class _TrialIds:
    """An observer of the tune's trial hooks (called on the driver)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[tuple[str, str]] = []

    @modelpress.hookimpl
    def modelpress_trial_start(self, trial_id, config):
        self.started.append(trial_id)

    @modelpress.hookimpl
    def modelpress_trial_finish(self, trial_id, status, figures):
        self.finished.append((trial_id, status))


def test_a_third_party_kind_runs_in_a_default_tune_next_to_builtins(
    ray_address, digits_mlp_path, tune_data, tmp_path
):
    trials = _TrialIds()
    registry = modelpress.create_registry(plugins=[Factorize(), trials])
    result = modelpress.tune(
        digits_mlp_path,
        data={"eval": tune_data / "eval.npz", "calibration": tune_data / "calib.npz"},
        budget=2,
        workers=2,
        output=tmp_path / "out",
        show_progress=False,
        registry=registry,
    )
    by_pipeline = {t.pipeline: t for t in result.trials}
    # the factorize method's declared seed, then int8-static's: both measured on the evaluation data in Ray workers
    assert set(by_pipeline) == {"svd", "int8-static"}, [
        (t.pipeline, t.error) for t in result.trials
    ]
    svd = by_pipeline["svd"]
    assert svd.status == "ok" and svd.passes == [
        {"kind": "factorize", "method": "svd", "options": {"energy": 0.99}}
    ]
    assert svd.figures[0]["rank"] >= 1 and 0 < svd.metric <= 1
    assert by_pipeline["int8-static"].status == "ok"
    # the trial hooks: one id per trial, "<study>/<number>", the same at start and finish
    assert (
        sorted(trials.started)
        == sorted(i for i, _ in trials.finished)
        == [f"modelpress-tune/{t.number}" for t in sorted(result.trials, key=lambda t: t.number)]
    )
    assert {status for _, status in trials.finished} == {"ok"}
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["left_out"]["int8-qat"] == "needs training data (--train)"
    assert report["space"][0]["pipeline"] == "svd" and report["space"][0]["passes"] == [
        "factorize/svd"
    ]
    assert "## Left out of the search space" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_a_local_tune_ignores_a_stale_ray_cluster_file(digits_mlp_path, tune_data, tmp_path):
    pytest.importorskip("ray", reason="needs the distributed extra")
    pytest.importorskip("optuna", reason="needs the distributed extra")
    # NOTE: a short folder: Ray's socket paths under it must stay within the Unix socket path limit
    ray_tmp = Path(tempfile.mkdtemp(prefix="mp-ray-", dir="/tmp"))
    try:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(
            "127.0.0.1:6390"
        )  # NOTE: what a dead `ray start` leaves
        recipe = tmp_path / "r.yaml"
        recipe.write_text(
            yaml.safe_dump(
                {
                    "passes": [{"kind": "quantize", "method": "int8-dynamic"}],
                    "data": {"eval": str(tune_data / "eval.npz")},
                    "evaluate": {"metric": "accuracy", "repeats": 2},
                }
            )
        )
        env = {"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": "", "PYTHONPATH": str(ROOT)}
        proc = run_cli(
            "tune",
            str(digits_mlp_path),
            "--recipe",
            str(recipe),
            "--trials",
            "1",
            "--workers",
            "1",
            "-o",
            str(tmp_path / "out"),
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (
            json.loads((tmp_path / "out" / "report.json").read_text())["trials"][0]["status"]
            == "ok"
        )
        assert "Token authentication" not in proc.stderr and "num_cpus" not in proc.stderr
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
