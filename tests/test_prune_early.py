"""The iterative schedule judges every step against the verification floor, stops when the target is out of
reach and returns the best step it saw, labelled (issue #25: minutes of training thrown away)."""

from __future__ import annotations

import math

import pytest

import modelpress
from modelpress.evaluation.comparison import compare_outputs, default_min_cosine
from modelpress.plugins.prune import ChannelOptions, MagnitudeOptions
from modelpress.runtime.session import make_session, run


def _cosine(model, result, x) -> float:
    return compare_outputs(
        ["logits"], run(make_session(model), {"x": x}), run(make_session(result), {"x": x})
    ).cosine


def test_stop_below_defaults_to_the_floor_export_applies(digits_mlp_path):
    model = modelpress.load(digits_mlp_path)
    magnitude = modelpress.prune(model, "magnitude", sparsity=0.3)
    channel = modelpress.prune(model, "channel", ratio=0.3)
    assert MagnitudeOptions().stop_below == default_min_cosine(magnitude.provenance) == 0.5
    assert ChannelOptions().stop_below is None and default_min_cosine(channel.provenance) is None
    with pytest.raises(modelpress.OptionsError, match="stop_below"):
        modelpress.prune(model, "magnitude", sparsity=0.5, stop_below=2.0)


@pytest.mark.torch
@pytest.mark.slow
def test_unreachable_sparsity_stops_early_and_returns_the_best_step(
    digits_mlp_path, digits, tmp_path
):
    model = modelpress.load(digits_mlp_path)
    train = {"x": digits["x_train"], "labels": digits["y_train"]}
    with pytest.warns(
        UserWarning,
        match=r"stopped at step (\d) of 4: cosine .* < 0.5 after fine-tuning; best so far: step",
    ):
        result = modelpress.prune(
            model,
            "magnitude",
            sparsity=0.99,
            data=train,
            fine_tune_epochs=1,
            schedule="iterative",
            steps=4,
            show_progress=False,
        )
    figures = result.provenance.passes[-1].figures
    cosines = figures["step_cosines"]
    assert len(cosines) < 4, "the schedule trained past the step that made the target unreachable"
    assert cosines[-1] < 0.5 and cosines[-1] < cosines[-2]
    best = figures["best_step"]
    assert best < len(cosines) and cosines[best - 1] >= 0.5
    assert figures["reached_sparsity"] == figures["schedule"][best - 1] < 0.99
    assert figures["stopped"].startswith(f"stopped at step {len(cosines)} of 4")
    # the returned model is the best step: its sparsity and its cosine on data it never saw
    assert figures["sparsity"] == pytest.approx(figures["reached_sparsity"], abs=2e-3)
    assert _cosine(model, result, digits["x_test"]) >= 0.5
    # it meets the floor at a lower sparsity than asked: export writes it
    modelpress.export(result, tmp_path / "best.onnx", sample={"x": digits["x_test"]})
    assert (tmp_path / "best.onnx").exists()


@pytest.mark.torch
@pytest.mark.slow
def test_reachable_sparsity_runs_every_step(digits_mlp_path, digits):
    model = modelpress.load(digits_mlp_path)
    train = {"x": digits["x_train"], "labels": digits["y_train"]}
    result = modelpress.prune(
        model,
        "magnitude",
        sparsity=0.8,
        data=train,
        fine_tune_epochs=1,
        schedule="iterative",
        steps=4,
        show_progress=False,
    )
    figures = result.provenance.passes[-1].figures
    assert len(figures["step_cosines"]) == 4 and min(figures["step_cosines"]) >= 0.5
    assert (
        figures["best_step"] == 4
        and figures["reached_sparsity"] == 0.8
        and "stopped" not in figures
    )
    assert figures["sparsity"] == pytest.approx(0.8, abs=2e-3)


@pytest.mark.torch
@pytest.mark.slow
def test_channel_schedule_judges_against_a_given_floor(digits_mlp_path, digits):
    model = modelpress.load(digits_mlp_path)
    train = {"x": digits["x_train"], "labels": digits["y_train"]}
    with pytest.warns(UserWarning, match="channel: stopped at step 1 of 3"):
        result = modelpress.prune(
            model,
            "channel",
            ratio=0.95,
            data=train,
            fine_tune_epochs=1,
            schedule="iterative",
            steps=3,
            stop_below=0.9999,
            calibration={"x": digits["x_test"][:200]},
            show_progress=False,
        )
    figures = result.provenance.passes[-1].figures
    # nothing met the floor: the step closest to the source is returned, labelled, for export to judge
    assert figures["best_step"] == 1 and len(figures["step_cosines"]) == 1
    assert [x["channels_after"] for x in figures["layers"].values()] == [
        math.ceil(64 * (1 - figures["reached_sparsity"]))
    ]
    assert _cosine(model, result, digits["x_test"][:200]) == pytest.approx(
        figures["step_cosines"][0], abs=1e-4
    )


@pytest.mark.torch
@pytest.mark.slow
def test_n_m_schedule_keeps_the_better_tuned_step(digits_mlp_path, digits):
    model = modelpress.load(digits_mlp_path)
    train = {"x": digits["x_train"], "labels": digits["y_train"]}
    result = modelpress.prune(
        model,
        "n:m",
        data=train,
        fine_tune_epochs=1,
        schedule="iterative",
        steps=2,
        show_progress=False,
    )
    figures = result.provenance.passes[-1].figures
    cosines = figures["step_cosines"]
    # the pattern is the same each step: the step kept is the one closer to the source
    assert figures["reached_sparsity"] == 0.5 and figures["best_step"] == 1 + int(
        cosines[1] > cosines[0]
    )
    assert figures["best_cosine"] == max(cosines) >= 0.5
