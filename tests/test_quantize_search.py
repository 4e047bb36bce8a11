"""int8-static's configuration search (:mod:`modelpress.plugins.quantize.static_search`): the
configuration kept is the one best on the held-out samples, and an option the user sets is never searched."""

from __future__ import annotations

import numpy as np
import pytest

import modelpress
from modelpress.plugins.quantize.static_search import MARGIN, split
from modelpress.runtime.session import make_session, run
from tests.test_quantize_quality import _mlp

CONFIGS = [(sq, cal) for sq in (True, False) for cal in ("percentile", "minmax")]


def _label(sq: bool, cal: str) -> str:
    return f"calibrator={cal}, smoothquant={'on' if sq else 'off'}"


def test_search_keeps_the_configuration_best_on_held_out_samples_and_the_users_option_wins(
    tmp_path,
):
    model, x, _ = _mlp(tmp_path)
    # NOTE: judged as a regression, the held-out score is relative error squared over two: checkable below
    common = dict(criteria={"y": "relative_error<=0.1"}, sensitivity=False, show_progress=False)
    result = modelpress.quantize(
        model, "int8-static", calibration={"x": x}, search_config=True, **common
    )
    figures = result.provenance.passes[-1].figures
    config = figures["configuration"]
    assert set(config["candidates"]) == {_label(*c) for c in CONFIGS}
    fit, held = x[:192], x[192:]  # 256 samples: a quarter held out
    (expected,) = run(make_session(model), {"x": held})
    errors = {}
    for sq, cal in CONFIGS:
        each = modelpress.quantize(
            model, "int8-static", calibration={"x": fit}, smoothquant=sq, calibrator=cal, **common
        )
        assert "configuration" not in each.provenance.passes[-1].figures  # both options given
        exported = modelpress.export(each, tmp_path / f"{sq}-{cal}.onnx", verify=False)
        (out,) = run(make_session(exported.path), {"x": held})
        errors[_label(sq, cal)] = float(np.linalg.norm(out - expected) / np.linalg.norm(expected))
    for label, error in errors.items():
        assert config["candidates"][label] == pytest.approx(error**2 / 2, rel=1e-2)
    best, default = min(errors, key=errors.get), _label(True, "percentile")
    # NOTE: the default wins near-ties: another candidate must score MARGIN lower on the held-out samples
    expect = best if errors[best] ** 2 < (1 - MARGIN) * errors[default] ** 2 else default
    assert config["chosen"] == expect
    assert len(set(np.round(list(errors.values()), 4))) > 1  # the candidates really differ
    chosen_sq = config["chosen"].endswith("on")
    assert figures["calibrator"] == config["chosen"].split(",")[0].split("=")[1]
    # NOTE: only the chosen run's figures remain
    assert bool(figures.get("smoothquant_alpha")) <= chosen_sq
    # NOTE: an explicit option is never searched: only the other one is
    given = modelpress.quantize(
        model,
        "int8-static",
        calibration={"x": x},
        calibrator="minmax",
        search_config=True,
        **common,
    )
    candidates = given.provenance.passes[-1].figures["configuration"]["candidates"]
    assert set(candidates) == {_label(True, "minmax"), _label(False, "minmax")}
    off = modelpress.quantize(model, "int8-static", calibration={"x": x}, **common)
    assert "configuration" not in off.provenance.passes[-1].figures  # NOTE: off by default
    assert off.provenance.passes[-1].figures["calibrator"] == "percentile"


def test_too_few_samples_keep_the_defaults_and_say_why(tmp_path):
    model, x, _ = _mlp(tmp_path)
    result = modelpress.quantize(
        model,
        "int8-static",
        calibration={"x": x[:6]},
        search_config=True,
        sensitivity=False,
        show_progress=False,
    )
    config = result.provenance.passes[-1].figures["configuration"]
    assert config["chosen"] == _label(True, "percentile") and "too few" in config["why"]


def test_split_keeps_runs_and_order():
    data = modelpress.plugin_api.Dataset({"x": np.arange(10, dtype=np.float32)[:, None]})
    head, tail = split(data, 7)
    assert len(head) == 7 and len(tail) == 3
    assert tail.inputs["x"][:, 0].tolist() == [7, 8, 9]
