"""modelpress.tune and batch compression on Ray (local), with the study in Optuna/SQLite.

One Ray session is shared by the module (starting Ray costs seconds); studies are a few tiny trials
on a digits MLP.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

import modelpress
from modelpress.app.tuning.defaults import default_space
from tests.conftest import ROOT, run_cli

ray = pytest.importorskip("ray", reason="needs the distributed extra")
pytest.importorskip("optuna", reason="needs the distributed extra")


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    from modelpress.runtime.session import make_session, run

    return run(make_session(path), {"x": x})[0]


def _recipe(
    tmp_path: Path, data: Path, options: dict, method: str = "int8-static", metric: str = "accuracy"
) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "passes": [{"kind": "quantize", "method": method, "options": options}],
                "data": {"calibration": str(data / "calib.npz"), "eval": str(data / "eval.npz")},
                "evaluate": {"metric": metric},
            }
        )
    )
    return path


@pytest.mark.slow
def test_default_space_study_end_to_end(ray_address, digits_mlp_path, tune_data, digits, tmp_path):
    out = tmp_path / "tune"
    result = modelpress.tune(
        digits_mlp_path,
        data={"eval": tune_data / "eval.npz", "calibration": tune_data / "calib.npz"},
        objective="size",
        max_drop=0.01,
        budget=4,
        output=out,
        show_progress=False,
    )
    ok = [t for t in result.trials if t.status == "ok"]
    assert len(result.trials) == 4 and len(ok) >= 3
    # the first trial is int8-static's defaults; every trial was measured on the real evaluation data
    assert (
        result.trials[0].pipeline == "int8-static"
        and result.trials[0].config["int8-static:1.calibrator"] == "percentile"
    )
    assert result.meets and result.best is not None
    assert result.best.size_bytes < result.baseline["size_bytes"] and result.best.drop <= 0.01
    assert result.best.size_bytes == min(t.size_bytes for t in ok if t.meets)
    assert result.best in result.pareto
    # the winner is exported, verified, and measured again on its own
    accuracy = float(
        np.mean(_outputs(result.model_path, digits["x_test"]).argmax(1) == digits["y_test"])
    )
    assert accuracy == pytest.approx(result.best.metric)
    report = json.loads((out / "report.json").read_text())
    assert (
        report["meets"]
        and len(report["trials"]) == 4
        and report["best"]["number"] == result.best.number
    )
    assert (
        "<svg" in (out / "report.html").read_text()
        and "Pareto front" in (out / "report.md").read_text()
    )
    # its recipe reproduces it exactly with `modelpress compress`
    proc = run_cli(
        "compress",
        str(out / "source.onnx"),
        "--recipe",
        str(result.recipe_path),
        "-o",
        str(tmp_path / "again.onnx"),
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(
        _outputs(tmp_path / "again.onnx", digits["x_test"]),
        _outputs(result.model_path, digits["x_test"]),
    )

    # a spent time budget still returns the best stored so far, exported and reported
    again = modelpress.tune(
        digits_mlp_path,
        data={"eval": tune_data / "eval.npz", "calibration": tune_data / "calib.npz"},
        budget="0s",
        output=out,
        show_progress=False,
    )
    assert (
        "time budget" in again.stop_reason
        and again.best.number == result.best.number
        and again.model_path.exists()
    )


def test_crashing_trial_does_not_stop_the_study(ray_address, digits_mlp_path, tune_data, tmp_path):
    # codebook bits=2 is far enough from the float outputs that the metric kills its worker process
    recipe = _recipe(
        tmp_path,
        tune_data,
        {"bits": {"search": [2, 8, 4]}, "min_elements": 16},
        method="codebook",
        metric="tests.tune_helpers:crash_when_far",
    )
    result = modelpress.tune(
        digits_mlp_path, recipe=recipe, budget=3, output=tmp_path / "out", show_progress=False
    )
    by_bits = {t.passes[0]["options"]["bits"]: t for t in result.trials}
    assert by_bits[2].status == "failed" and "died" in by_bits[2].error
    assert by_bits[8].status == "ok" and by_bits[4].status == "ok"
    assert result.best is not None and result.best.passes[0]["options"]["bits"] in (4, 8)
    assert "failed" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_unreachable_criterion_still_returns_the_best(
    ray_address, digits_mlp_path, tune_data, tmp_path
):
    recipe = _recipe(
        tmp_path,
        tune_data,
        {"bits": {"search": [3, 6]}, "min_elements": 16},
        method="codebook",
        metric="cosine",
    )
    result = modelpress.tune(
        digits_mlp_path,
        recipe=recipe,
        budget=2,
        max_drop=0.0,
        output=tmp_path / "out",
        show_progress=False,
    )
    assert not result.meets and result.best is not None
    assert result.best.passes[0]["options"]["bits"] == 6  # the closest to the source
    assert result.model_path.exists() and result.recipe_path.exists()
    assert "does NOT meet" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.slow
def test_interrupted_study_resumes_without_rerunning_completed_trials(
    ray_address, digits_mlp_path, tune_data, tmp_path
):
    recipe = _recipe(
        tmp_path,
        tune_data,
        {
            "calibrator": {"search": ["minmax", "percentile", "entropy", "mse"]},
            "per_channel": {"search": [True, False]},
            "sensitivity": False,
        },
    )
    out = tmp_path / "out"
    code = (
        f"import modelpress; modelpress.tune({str(digits_mlp_path)!r}, recipe={str(recipe)!r}, budget=5, workers=1, "
        f"output={str(out)!r}, address={ray_address!r}, keep_trial_models=True, show_progress=False)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )

    def completed() -> int:
        import sqlite3

        try:
            with sqlite3.connect(out / "study.db", timeout=5) as db:
                return int(
                    db.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'").fetchone()[0]
                )
        except sqlite3.Error:  # NOTE: not created yet
            return 0

    deadline = time.monotonic() + 180
    while completed() < 2 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.3)
    assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
    os.kill(proc.pid, signal.SIGKILL)  # NOTE: a crash, not a clean stop: nothing gets to tidy up
    proc.wait()

    result = modelpress.tune(
        digits_mlp_path,
        recipe=recipe,
        budget=5,
        output=out,
        keep_trial_models=True,
        show_progress=False,
    )
    sessions: dict[str, list] = {}
    for t in result.trials:
        sessions.setdefault(t.session, []).append(t)
    assert len(sessions) == 2
    first = next(trials for trials in sessions.values() if any(t.number == 0 for t in trials))
    completed_first = [t for t in first if t.status == "ok"]
    assert len(completed_first) >= 2
    done = [t for t in result.trials if t.status == "ok"]
    assert len(done) == 5  # the budget counts the completed trials of the first run
    keys = [json.dumps(t.config, sort_keys=True) for t in done]
    assert len(set(keys)) == len(keys)  # nothing that completed was run again
    assert result.best is not None and result.model_path.exists()


def test_search_space_errors_are_clear(digits_mlp_path, tune_data, tmp_path):
    cases = [
        ({"calibrator": {"search": ["minmax", "bogus"]}}, ["calibrator", "'bogus'"]),
        (
            {"percentile": {"search": {"low": 99.99, "high": 99.0}}},
            ["percentile", "must be below high"],
        ),
        ({"calibratr": {"search": ["minmax"]}}, ["calibratr", "did you mean 'calibrator'"]),
        ({"per_channel": {"search": []}}, ["per_channel", "empty"]),
        ({"calibrator": {"search": "minmax"}}, ["calibrator", "list of choices"]),
        ({"per_channel": {"search": "fallback"}}, ["exclude"]),
    ]
    for options, needles in cases:
        with pytest.raises(modelpress.OptionsError) as info:
            modelpress.tune(
                digits_mlp_path,
                recipe=_recipe(tmp_path, tune_data, options),
                budget=1,
                output=tmp_path / "x",
                show_progress=False,
            )
        for needle in needles:
            assert needle in str(info.value), (needle, str(info.value))
    # compress refuses a recipe that still has search ranges, and says what to do
    with pytest.raises(modelpress.OptionsError, match="modelpress tune"):
        modelpress.compress(
            digits_mlp_path, _recipe(tmp_path, tune_data, {"calibrator": {"search": ["minmax"]}})
        )
    with pytest.raises(modelpress.OptionsError, match="90s"):
        modelpress.tune(
            digits_mlp_path, data=tune_data / "eval.npz", budget="soon", output=tmp_path / "y"
        )


def test_third_party_options_join_the_default_space(digits_mlp_path):
    from pydantic import Field

    class ScaleOptions(modelpress.Options):
        strength: float = Field(
            0.5, json_schema_extra={"search": {"low": 0.1, "high": 0.9, "step": 0.1}}
        )

    class Plugin:
        @modelpress.hookimpl
        def modelpress_register_methods(self, register):
            register(
                modelpress.Method(
                    name="scale", kind="prune", apply=lambda m, o, c: None, options=ScaleOptions
                )
            )

    registry = modelpress.create_registry(plugins=[Plugin()])
    space = default_space(
        modelpress.load(digits_mlp_path), registry, calibration=True, train=False, torch=False
    )
    pipeline = space.pipeline("scale")
    assert pipeline.params()["1.strength"].low == pytest.approx(0.1)


def test_batch_compress_runs_models_in_parallel(ray_address, digits_mlp_path, tune_data, tmp_path):
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
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not a model")
    result = modelpress.compress_batch(
        [digits_mlp_path, bad], recipe, tmp_path / "out", show_progress=False
    )
    good, failed = result.rows
    assert (
        good.status == "ok" and good.size_bytes < good.source_bytes and Path(good.output).exists()
    )
    assert (tmp_path / "out" / "digits_mlp" / "report.json").exists()
    assert failed.status == "failed" and "broken.onnx" in failed.error
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [m["status"] for m in summary["models"]] == ["ok", "failed"]


@pytest.mark.slow
def test_cli_tune_accuracy_first_and_batch(ray_address, digits_mlp_path, tune_data, tmp_path):
    recipe = _recipe(
        tmp_path,
        tune_data,
        {
            "calibrator": {"search": ["minmax", "entropy"]},
            "sensitivity": False,
            "exclude": {"search": "fallback"},
        },
    )
    proc = run_cli(
        "tune",
        str(digits_mlp_path),
        "--recipe",
        str(recipe),
        "--max-drop",
        "1%",
        "--strategy",
        "accuracy-first",
        "--workers",
        "1",
        "--address",
        ray_address,
        "-o",
        str(tmp_path / "tuned"),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "tuned" / "report.json").read_text())
    # accuracy-first starts from the most aggressive point (everything int8, no fallback) and stops once one meets
    assert report["meets"] and report["trials"][0]["config"]["int8-static:1.exclude"] == 0
    assert "accuracy-first" in report["status"] and "best model:" in proc.stdout
    assert "trial 0 ok" in proc.stderr  # log lines when not on a terminal
    assert (tmp_path / "tuned" / "best.onnx").exists()

    plain = tmp_path / "plain.yaml"
    plain.write_text(
        yaml.safe_dump(
            {"passes": [{"kind": "quantize", "method": "int8-dynamic"}], "evaluate": {"repeats": 2}}
        )
    )
    proc = run_cli(
        "compress",
        "--recipe",
        str(plain),
        str(digits_mlp_path),
        str(tmp_path / "tuned" / "source.onnx"),
        "-o",
        str(tmp_path / "batch"),
        "--address",
        ray_address,
        "-q",
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert {p.name for p in (tmp_path / "batch").iterdir()} >= {
        "digits_mlp",
        "source",
        "summary.md",
        "summary.json",
    }


def test_hopeless_prune_trial_is_cut_before_fine_tuning(
    digits_mlp_path, tune_data, digits, tmp_path
):
    from modelpress.app.tuning.trial import run_trial

    np.savez(tmp_path / "train.npz", x=digits["x_train"], labels=digits["y_train"])
    blobs = {
        "eval": (tune_data / "eval.npz").read_bytes(),
        "train": (tmp_path / "train.npz").read_bytes(),
        "calibration": None,
    }
    passes = [
        {"kind": "prune", "method": "channel", "options": {"ratio": 0.9, "fine_tune_epochs": 50}}
    ]
    result = run_trial(
        Path(digits_mlp_path).read_bytes(),
        blobs,
        passes,
        {"metric": "accuracy"},
        baseline=0.95,
        hopeless_drop=0.3,
    )
    # 90% of the channels gone: measured before any fine-tuning, far below, so the 50 epochs never run
    assert result["status"] == "pruned" and result["metric"] < 0.65
    assert "before recovery (fine_tune_epochs)" in result["reason"]


@pytest.mark.slow
def test_trial_limits_fail_the_trial_not_the_study(
    ray_address, digits_mlp_path, tune_data, tmp_path
):
    recipe = _recipe(
        tmp_path, tune_data, {"per_channel": {"search": [True]}}, method="int8-dynamic"
    )
    result = modelpress.tune(
        digits_mlp_path,
        recipe=recipe,
        budget=1,
        trial_memory_mb=1,
        output=tmp_path / "mem",
        show_progress=False,
    )
    assert result.trials[0].status == "failed" and "memory limit of 1 MB" in result.trials[0].error
    assert (
        result.best is None and "no trial completed" in (tmp_path / "mem" / "report.md").read_text()
    )
    result = modelpress.tune(
        digits_mlp_path,
        recipe=recipe,
        budget=1,
        trial_timeout=0.01,
        output=tmp_path / "time",
        show_progress=False,
    )
    assert result.trials[0].status == "failed" and "time limit" in result.trials[0].error


@pytest.mark.slow
def test_reused_workers_give_the_same_trials_as_fresh_ones(
    ray_address, digits_mlp_path, tune_data, tmp_path
):
    # int8-static calibrations (histograms, percentiles, entropy): state a reused worker carried over would show in these numbers
    recipe = _recipe(
        tmp_path,
        tune_data,
        {
            "calibrator": {"search": ["minmax", "entropy", "percentile"]},
            "per_channel": {"search": [True, False]},
            "sensitivity": False,
        },
    )
    runs = {}
    for fresh in (True, False):
        result = modelpress.tune(
            digits_mlp_path,
            recipe=recipe,
            budget=4,
            workers=1,
            fresh_workers=fresh,
            output=tmp_path / f"fresh-{fresh}",
            keep_trial_models=True,
            show_progress=False,
        )
        runs[fresh] = [t for t in result.trials if t.status == "ok"]
        assert len(runs[fresh]) == 4
    for a, b in zip(runs[True], runs[False], strict=True):
        assert a.config == b.config and a.metric == b.metric
        # the same graph and weights, byte for byte (the provenance metadata holds each run's own timings)
        graphs = [
            onnx.load(tmp_path / f"fresh-{fresh}" / "trials" / f"trial-{t.number:04d}.onnx").graph
            for fresh, t in ((True, a), (False, b))
        ]
        assert graphs[0].SerializeToString() == graphs[1].SerializeToString()
    # fresh: a new process per trial; reused: the workers ran earlier jobs (and so skipped their start-up and imports)
    assert (
        all(t.timing["earlier_jobs"] == 0 for t in runs[True])
        and len({t.timing["pid"] for t in runs[True]}) == 4
    )
    assert (
        sum(t.timing["earlier_jobs"] > 0 for t in runs[False]) >= 2
        and len({t.timing["pid"] for t in runs[False]}) <= 2
    )
    # where each trial's time went is recorded, phase by phase
    assert all(
        t.timing["phases"]["passes"]["cpu"] > 0 and "metric" in t.timing["phases"]
        for t in runs[False]
    )


@pytest.mark.slow
def test_parallel_jobs_use_one_thread_each(ray_address, digits_mlp_path):
    # two jobs on two CPUs: each one's ORT sessions, torch and BLAS must use one thread, or they oversubscribe the cores
    pytest.importorskip("torch")
    from modelpress.app.tuning.executor import RayExecutor
    from modelpress.app.tuning.trial import prepare_worker
    from tests.tune_helpers import thread_pools

    executor = RayExecutor(2)
    try:
        executor.warm_up(
            2, prepare_worker, True
        )  # NOTE: as tune does: the imports, torch's included, before the trials
        for key in range(2):
            executor.submit(key, thread_pools, str(digits_mlp_path))
        outcomes = []
        while len(outcomes) < 2:
            outcomes += executor.wait(5.0)
    finally:
        executor.shutdown()
    for outcome in outcomes:
        assert outcome.ok, outcome.error
        assert (
            outcome.value["ort"] == outcome.value["torch"] == outcome.value["torch_interop"] == 1
        ), outcome.value
        assert all(n == 1 for name, n in outcome.value.items() if name.startswith("blas:")), (
            outcome.value
        )


def test_a_failed_job_reports_its_error_and_where_its_time_went(ray_address):
    from modelpress.app.tuning.executor import RayExecutor
    from tests.tune_helpers import fail_after_work

    executor = RayExecutor(1)
    try:
        executor.submit("late", fail_after_work, 0.2)
        outcomes = []
        while not outcomes:
            outcomes = executor.wait(5.0)
    finally:
        executor.shutdown()
    assert not outcomes[0].ok and outcomes[0].error == "ValueError: refused after some work"
    assert outcomes[0].timing["cpu"] >= 0.2 and outcomes[0].timing["pid"] != os.getpid()


def test_sensitivity_ranking_covers_the_weighted_layers(digits_mlp_path, tune_data):
    from modelpress.app.tuning.sensitivity import measure_sensitivity

    # int8-static's declared ranking run (Tuning(fallback="exclude", ranking=...)) on the calibration data
    ranking = measure_sensitivity(
        Path(digits_mlp_path).read_bytes(),
        {"calibration": (tune_data / "calib.npz").read_bytes()},
        "int8-static",
        "quantize",
    )
    layers = {layer.node.name for layer in modelpress.load(digits_mlp_path).weighted_layers()}
    assert set(ranking) == layers
    # the fallback ladder along it keeps at most all but one in float: with every weighted layer excluded int8-static refuses
    from modelpress.app.tuning.space import Fallback

    steps = Fallback().steps(len(ranking))
    assert steps[0] == 0 and steps[-1] == len(layers) - 1 and steps == sorted(set(steps))


@pytest.mark.slow
def test_ctrl_c_while_a_trial_is_recorded_leaves_it_to_run_again(
    ray_address, digits_mlp_path, tune_data, tmp_path, monkeypatch
):
    """A Ctrl-C after a trial's outcome came back but before the study was told: the trial is
    recorded as interrupted (it was left RUNNING with status "ok", so a resumed study ran its
    configuration again: one CI run of tests/test_cluster.py saw two ok trials of one configuration)."""
    from modelpress.app.tuning import runner

    recipe = _recipe(
        tmp_path,
        tune_data,
        {
            "calibrator": {"search": ["minmax", "percentile"]},
            "per_channel": {"search": [True, False]},
            "sensitivity": False,
        },
    )
    out, written = tmp_path / "out", []
    real = runner.atomic_write

    def ctrl_c_on_the_second(path, data):  # type: ignore[no-untyped-def]
        written.append(path)
        if len(written) == 2:
            raise KeyboardInterrupt  # NOTE: while the driver records the second finished trial
        return real(path, data)

    monkeypatch.setattr(runner, "atomic_write", ctrl_c_on_the_second)
    args = dict(
        recipe=recipe,
        budget=4,
        workers=1,
        output=out,
        address=ray_address,
        keep_trial_models=True,
        show_progress=False,
    )
    first = modelpress.tune(digits_mlp_path, **args)
    hit = int(written[1].stem.split("-")[1])
    status = {t.number: t.status for t in first.trials}
    assert status[hit] == "interrupted", status
    assert "interrupted" in first.report.status, first.report.status

    monkeypatch.setattr(runner, "atomic_write", real)
    again = modelpress.tune(digits_mlp_path, **args)
    done = [t for t in again.trials if t.status == "ok"]
    keys = [json.dumps(t.config, sort_keys=True) for t in done]
    assert len(done) == 4 and len(set(keys)) == 4, keys  # every configuration once, none twice
    assert (
        json.dumps(next(t for t in again.trials if t.number == hit).config, sort_keys=True) in keys
    )
