"""The tune command's budgets: --trials and --time together stop at whichever runs out first."""

from __future__ import annotations

import argparse
import json

import pytest

from modelpress.base.errors import OptionsError
from modelpress.cli.tune import _budget
from tests.conftest import run_cli


def test_a_bare_time_is_seconds_and_keeps_the_trial_budget():
    # `--trials 4 --time 300` once read 300 as a trial count that replaced the 4
    assert _budget(argparse.Namespace(trials=4, time="300")) == {"trials": 4, "seconds": 300.0}
    assert _budget(argparse.Namespace(trials=None, time="2m")) == {"seconds": 120.0}
    assert _budget(argparse.Namespace(trials=None, time=None)) == {"trials": 20}
    with pytest.raises(OptionsError, match=r"--time 'soon'.*90s"):
        _budget(argparse.Namespace(trials=4, time="soon"))


@pytest.mark.slow
def test_cli_tune_stops_at_the_trial_budget_when_a_time_is_given_too(
    ray_address, digits_mlp_path, tune_data, tmp_path
):
    pytest.importorskip("optuna", reason="needs the distributed extra")
    proc = run_cli(
        "tune",
        str(digits_mlp_path),
        "--eval",
        str(tune_data / "eval.npz"),
        "--calib",
        str(tune_data / "calib.npz"),
        "--trials",
        "2",
        "--time",
        "300",
        "--workers",
        "1",
        "--address",
        ray_address,
        "-o",
        str(tmp_path / "tuned"),
        "-q",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "tuned" / "report.json").read_text())
    counted = [
        t
        for t in report["trials"]
        if t["status"] in ("ok", "failed", "pruned") and not t.get("retried")
    ]
    assert len(counted) == 2, [t["status"] for t in report["trials"]]
    assert report["status"].startswith("trial budget (2) used"), report["status"]
