"""Recipes, compress runs and their reports, the demo and the examples."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import modelpress
from modelpress.testing import tiny_cnn
from tests.conftest import ROOT, run_cli, run_cli_here


@pytest.fixture
def tiny_setup(tmp_path):
    model = tiny_cnn(channels=8, classes=4)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 1, 8, 8)).astype(np.float32)
    labels = np.argmax(
        modelpress.runtime.session.run(modelpress.runtime.session.make_session(model), {"x": x})[0],
        axis=1,
    )
    np.savez(tmp_path / "calib.npz", x=x[:64])
    np.savez(tmp_path / "train.npz", x=x, labels=labels)
    np.savez(tmp_path / "eval.npz", x=x[64:], labels=labels[64:])
    path = tmp_path / "tiny.onnx"
    modelpress.export(model, path)
    return path


def _recipe(tmp_path, passes, **more):
    recipe = {
        "passes": passes,
        "data": {"calibration": "calib.npz", "train": "train.npz", "eval": "eval.npz"},
        "evaluate": {"metric": "accuracy", "repeats": 3, "batch_size": 16},
        **more,
    }
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps(recipe))
    return path


def test_recipe_errors_come_before_any_work(tiny_setup, tmp_path):
    out = tmp_path / "out.onnx"
    cases = [
        (
            [{"kind": "prune", "method": "chanel"}],
            r"no installed plugin provides a method 'chanel' of kind 'prune'; installed: .*prune/channel",
        ),
        (
            [{"kind": "prune", "method": "channel", "options": {"ratio": "half"}}],
            r"recipe pass 1: prune/channel: option 'ratio': .*valid number",
        ),
        (
            [{"kind": "prune", "method": "channel", "options": {"ration": 0.5}}],
            r"unknown option 'ration' \(did you mean 'ratio'\?\)",
        ),
        (
            [{"kind": "compress", "method": "x"}],
            r"recipe pass 1: unknown method kind 'compress'; installed kinds: quantize, prune, distill",
        ),
    ]
    for passes, message in cases:
        with pytest.raises((modelpress.OptionsError, modelpress.UnknownMethodError), match=message):
            modelpress.compress(tiny_setup, _recipe(tmp_path, passes), output=out)
    with pytest.raises(
        modelpress.DataError, match=r"recipe data file .*missing\.npz' does not exist"
    ):
        modelpress.compress(
            tiny_setup,
            {
                "passes": [{"kind": "prune", "method": "channel"}],
                "data": {"eval": str(tmp_path / "missing.npz")},
            },
            output=out,
        )
    with pytest.raises(modelpress.OptionsError, match="unknown metric 'f1'"):
        modelpress.compress(
            tiny_setup,
            {"passes": [{"kind": "prune", "method": "channel"}], "evaluate": {"metric": "f1"}},
            output=out,
        )
    with pytest.raises(modelpress.OptionsError, match=r"needs data\.calibration"):
        modelpress.compress(
            tiny_setup, {"passes": [{"kind": "quantize", "method": "int8-static"}]}, output=out
        )
    assert not out.exists() and not (tmp_path / "report.md").exists()
    bad = run_cli_here(
        "compress",
        str(tiny_setup),
        "--recipe",
        str(_recipe(tmp_path, [{"kind": "prune", "method": "chanel"}])),
        "-o",
        str(out),
    )
    assert (
        bad.returncode != 0
        and "installed:" in bad.stderr
        and len(bad.stderr.strip().splitlines()) == 1
    )


@pytest.mark.torch
def test_compress_writes_consistent_reports(tiny_setup, tmp_path):
    recipe = _recipe(
        tmp_path,
        [
            {"kind": "prune", "method": "channel", "options": {"ratio": 0.5}},
            {"kind": "distill", "method": "kd", "options": {"epochs": 2}},
            {
                "kind": "quantize",
                "method": "int8-static",
                "options": {"min_agreement": None, "min_cosine": None},
            },
        ],
    )
    out = tmp_path / "small.onnx"
    # NOTE: on this 4-channel toy the int8 file is bigger than the float one (QDQ overhead): no gain
    with pytest.raises(modelpress.NoGainError, match="quantize/int8-static: no gain"):
        modelpress.compress(
            tiny_setup, recipe, output=tmp_path / "refused.onnx", show_progress=False
        )
    assert (
        "stopped at stage 3" in (tmp_path / "report.md").read_text()
        and not (tmp_path / "refused.onnx").exists()
    )
    result = modelpress.compress(
        tiny_setup, recipe, output=out, show_progress=False, allow_no_gain=True
    )
    assert "[NO GAIN]" in result.report.rows()[3][0]
    assert [s.stage for s in result.stages] == [
        "source",
        "prune/channel",
        "distill/kd",
        "quantize/int8-static",
    ]
    for stage in result.stages:
        assert os.path.getsize(stage.path) == stage.size_bytes  # sizes are the files on disk
        assert (
            0 < stage.zip_bytes
            and 0 <= stage.value <= 1
            and all(v > 0 for v in stage.latency_ms.values())
        )
    assert result.stages[1].parameters < result.stages[0].parameters
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "complete" and [s["stage"] for s in report["stages"]] == [
        s.stage for s in result.stages
    ]
    assert report["stages"][2]["size_bytes"] == result.stages[2].size_bytes
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "| stage | accuracy | size (MB) | ratio |" in markdown
        and "quantize/int8-static" in markdown
    )
    html = (tmp_path / "report.html").read_text()
    assert "<svg" in html and html.count("<circle") == 4
    passes = [f"{p.kind}/{p.method}" for p in modelpress.load(out).provenance.passes]
    assert passes == ["prune/channel", "distill/kd", "quantize/int8-static"]


def test_interrupted_run_keeps_completed_stages(tiny_setup, tmp_path, monkeypatch):
    import modelpress.plugins.prune as prune_plugin

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prune_plugin, "n_m", interrupt)
    modelpress.reset_registry()
    recipe = _recipe(
        tmp_path, [{"kind": "prune", "method": "magnitude"}, {"kind": "prune", "method": "n:m"}]
    )
    result = modelpress.compress(
        tiny_setup, recipe, output=tmp_path / "small.onnx", show_progress=False
    )
    assert result.interrupted and len(result.stages) == 2
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"].startswith("interrupted during stage 2 (prune/n:m)")
    assert (tmp_path / "small-stages" / "01-prune-magnitude.onnx").exists() and not (
        tmp_path / "small.onnx"
    ).exists()


def test_recipe_schema_cli():
    result = run_cli_here("recipe-schema")
    schema = json.loads(result.stdout)
    assert result.returncode == 0 and set(schema["properties"]) >= {"passes", "data", "evaluate"}


@pytest.mark.slow
@pytest.mark.torch
def test_demo_end_to_end(tmp_path):
    result = run_cli("demo", "--out", str(tmp_path / "demo"), "--fast", "-q", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    for name in (
        "digits-compressed.onnx",
        "report.md",
        "report.json",
        "report.html",
        "recipe.yaml",
    ):
        assert (tmp_path / "demo" / name).exists(), name
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    stages = report["stages"]
    assert stages[0]["stage"] == "source" and len(stages) == 4
    assert stages[-1]["size_bytes"] < stages[0]["size_bytes"] / 3
    assert stages[-1]["value"] > stages[0]["value"] - 0.05  # accuracy kept through the pipeline
    # NOTE: piped, the table takes $COLUMNS or 80: a long stage name wraps ("quantize (int8" / "static)")
    assert "source" in result.stdout and "quantize (int8" in result.stdout
    lines = result.stdout.splitlines()
    table = lines[: next(i for i, line in enumerate(lines) if line.startswith("compressed model"))]
    assert len(table) > 4 and max(len(line.rstrip()) for line in table) <= 80


@pytest.mark.slow
@pytest.mark.torch
def test_examples_run(tmp_path):
    out = tmp_path / "walkthrough"
    script = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "compress_digits.py"), str(out), "--epochs", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert script.returncode == 0, script.stderr[-2000:]
    assert (out / "digits-small.onnx").exists() and "compressed model" in script.stdout
    # the recipe file on its own, through the CLI, on the data the script wrote
    cli = run_cli(
        "compress",
        str(out / "digits-cnn.onnx"),
        "--recipe",
        str(out / "digits-recipe.yaml"),
        "-o",
        str(out / "again.onnx"),
        "-q",
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads((out / "report.json").read_text())["status"] == "complete"


def test_report_flags_a_stage_bigger_or_slower_than_the_one_before():
    from modelpress.app.compress import StageMetrics
    from modelpress.app.report import Report

    def stage(name, size, b1, b64):
        return StageMetrics(
            name,
            "accuracy",
            0.99,
            size,
            size // 2,
            100,
            0.0,
            {"b1 (1t)": b1, "b64 (1t)": b64},
            0.1,
            f"{name}.onnx",
        )

    report = Report(title="t", metric="accuracy")
    for s in (
        stage("source", 1_000_000, 0.040, 1.00),
        stage("distill", 400_000, 0.030, 0.44),
        stage("quantize", 200_000, 0.029, 0.52),
        stage("fp16", 300_000, 0.0301, 0.40),
    ):
        report.add(s)
    worse = report.regressions()
    assert list(worse) == ["quantize", "fp16"]
    assert worse["quantize"] == ["slower than 'distill' at b64 (1t) (0.520 vs 0.440 ms)"]
    # 0.0301 vs 0.029 ms at b1 is inside the 5 % noise tolerance: not flagged
    assert worse["fp16"] == ["bigger than 'quantize' (0.300 vs 0.200 MB)"]
    labels = [row[0] for row in report.rows()]
    assert labels == ["source", "distill", "quantize [slower]", "fp16 [bigger]"]
    assert "**quantize** is slower than 'distill' at b64 (1t)" in report.markdown()
    assert report.to_json()["regressions"] == worse
