"""The live view of a study: `modelpress tune --dashboard` and `modelpress dashboard OUT_DIR` serve it with
optuna-dashboard on 127.0.0.1; headless Chromium renders the trials with modelpress's figures.

The servers are started by these tests and stopped by their own PIDs (SIGINT: Ctrl-C). With
``MODELPRESS_WRITE_DOCS_IMAGES=1`` the screenshots are also written to docs/img/tune-dashboard*.png.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest
import yaml

import modelpress
from tests import browser as chromium
from tests.conftest import ROOT, ctrl_c_at_default

pytest.importorskip("ray", reason="needs the distributed extra")
pytest.importorskip("optuna", reason="needs the distributed extra")
pytest.importorskip("optuna_dashboard", reason="needs optuna-dashboard (the distributed extra)")


@pytest.fixture(scope="module")
def study(ray_address, digits_mlp_path, tune_data, tmp_path_factory):
    """A finished small study, run with the dashboard on."""
    folder = tmp_path_factory.mktemp("dashboard")
    recipe = folder / "space.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "passes": [
                    {
                        "kind": "quantize",
                        "method": "codebook",
                        "options": {"bits": {"search": [2, 3, 4, 6]}, "min_elements": 16},
                    }
                ],
                "data": {
                    "calibration": str(tune_data / "calib.npz"),
                    "eval": str(tune_data / "eval.npz"),
                },
                "evaluate": {"metric": "accuracy"},
            }
        )
    )
    result = modelpress.tune(
        digits_mlp_path,
        recipe=recipe,
        budget=4,
        workers=1,
        address=ray_address,
        output=folder / "out",
        show_progress=False,
        dashboard=True,
    )
    return result


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_tune_dashboard_is_linked_from_the_report_and_stopped_after(study):
    url = study.report.dashboard
    assert url.startswith("http://127.0.0.1:") and "/dashboard/studies/" in url
    assert f'href="{url}"' in (study.output / "report.html").read_text()
    assert json.loads((study.output / "report.json").read_text())["dashboard"] == url
    assert _refused(
        int(url.split(":")[2].split("/")[0])
    )  # NOTE: served while the study ran, closed with it


def _serve(target: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        # NOTE: -X faulthandler: a server that outlives its Ctrl-C is sent SIGABRT, which prints where
        # each of its threads stood (one file-order run of the slow tier saw it take over 30 s)
        [sys.executable, "-X", "faulthandler", "-m", "modelpress.cli", "dashboard", target],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_at_default,  # NOTE: stopped by its Ctrl-C
    )
    line = proc.stderr.readline()
    assert "http://127.0.0.1:" in line, line + (
        proc.stderr.read() if proc.poll() is not None else ""
    )
    return proc, line.split()[2]


def _stopped(proc: subprocess.Popen) -> str:
    """The server's stderr once it has exited after its Ctrl-C; past 30 s, its threads' stacks."""
    try:
        return proc.communicate(timeout=30)[1]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # NOTE: to its own PID; faulthandler prints every thread
        err = proc.communicate(timeout=30)[1]
        pytest.fail(f"the dashboard server did not stop within 30 s of its Ctrl-C:\n{err}")


@pytest.mark.slow
def test_dashboard_shows_the_trials_in_headless_chromium(study, tmp_path):
    if chromium.chromium() is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    proc, url = _serve(str(study.output))
    try:
        base, study_id = url.split("/dashboard/studies/")
        # NOTE: the app's own REST API: every trial with modelpress's figures as user attributes
        detail = _get(f"{base}/api/studies/{study_id}?after=0")
        trials = {
            t["number"]: {a["key"]: a["value"] for a in t["user_attrs"]} for t in detail["trials"]
        }
        ok = [r for r in study.trials if r.status == "ok"]
        assert ok and {r.number for r in study.trials} <= set(trials)
        for r in ok:
            attrs = trials[r.number]
            assert {
                "metric",
                "drop",
                "meets",
                "size_bytes",
                "latency_ms",
                "config",
                "passes",
                "status",
            } <= set(attrs)
            assert attrs["meets"] == str(r.meets) and float(attrs["drop"]) == pytest.approx(r.drop)
            assert (
                float(attrs["metric"]) == pytest.approx(r.metric)
                and int(attrs["size_bytes"]) == r.size_bytes
            )
        assert detail["objective_names"] == [
            "accuracy",
            "size_mb",
        ]  # NOTE: the study's metric names, on its axes

        dom = chromium.dump_dom(f"{url}/trials")
        assert "User Attributes" in dom and "size_bytes" in dom and "latency_ms" in dom
        for r in ok:
            assert f"Trial {r.number}" in dom
        home = chromium.dump_dom(url)
        assert "Pareto Front" in home and "size_mb" in home and "accuracy" in home
        # NOTE: the study's page (the Pareto front on the named objectives) and the trials page (the user attributes)
        for page, name in (("", "tune-dashboard.png"), ("/trials", "tune-dashboard-trials.png")):
            png = chromium.screenshot(
                f"{url}{page}", tmp_path / name, size=(1400, 1000), budget_ms=15000
            )
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
            if os.environ.get("MODELPRESS_WRITE_DOCS_IMAGES") == "1":
                shutil.copyfile(png, ROOT / "docs" / "img" / name)
    finally:
        proc.send_signal(signal.SIGINT)  # NOTE: Ctrl-C, to this server's own PID
        err = _stopped(proc)
    assert proc.returncode == 0 and "stopped" in err, err
    assert _refused(int(url.split(":")[2].split("/")[0]))


def test_dashboard_refuses_a_folder_without_a_study(tmp_path):
    from modelpress.app.tuning.dashboard import study_storage
    from modelpress.base.errors import OptionsError
    from tests.conftest import run_cli_here

    with pytest.raises(OptionsError, match=r"no study\.db"):
        study_storage(str(tmp_path))
    assert study_storage("postgresql://u@127.0.0.1/db") == "postgresql://u@127.0.0.1/db"
    proc = run_cli_here("dashboard", str(tmp_path))
    assert proc.returncode == 1 and "no study.db" in proc.stderr and "storage URL" in proc.stderr, (
        proc.stderr
    )
