"""tune and batch on a real two-node Ray cluster: separate ``ray start`` processes on 127.0.0.1 (tests/cluster_helpers.py).

One cluster for the session: a head and a worker node of 1 CPU each, each with its own working folder and temp dir.
The drivers are ``modelpress`` processes attached with ``--address`` (as a user would run them); the tests read what
they wrote (report.json, summary.json, the study). The node-loss test kills the worker node's raylet by its PID, so it
runs last. A failing test prints the nodes' Ray logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.cluster_helpers import LocalCluster
from tests.conftest import ctrl_c_at_default

pytest.importorskip("ray", reason="needs the distributed extra")
pytest.importorskip("optuna", reason="needs the distributed extra")
pytestmark = pytest.mark.slow

_TIMEOUT = 420  # NOTE: generous: the machine is shared and loaded


@contextlib.contextmanager
def _two_nodes():
    """Head + worker, 1 CPU each; trials pause in the metric (tests.cluster_helpers:slow_accuracy) so they overlap (and
    the worker node, whose first worker may take seconds to import under load, gets its share), and on the worker node
    each trial marks itself running in the node's own folder (for the node-loss test)."""
    # NOTE: a short folder: Ray's socket paths under its temp dir must stay under 107 bytes
    base = Path(tempfile.mkdtemp(prefix="mpc-", dir="/tmp"))
    c = LocalCluster(base)
    try:
        c.start_head(pause=1.5)
        c.wait_for(1)
        c.add_worker(pause=2.5, markers=True)
        c.wait_for(2)
        yield c
    finally:
        c.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """The cluster the tests of this module share (none of them ends a node)."""
    with _two_nodes() as c:
        yield c


@pytest.fixture
def doomed_cluster():
    """A cluster of its own for the test that kills its worker node: the shared one stays whole, in any test order."""
    with _two_nodes() as c:
        yield c


@pytest.fixture(autouse=True)
def _print_ray_logs_on_failure(request):
    # NOTE: the clusters this test uses, taken now: a function-scoped one is torn down before this fixture's teardown
    clusters = [
        request.getfixturevalue(n)
        for n in ("cluster", "doomed_cluster")
        if n in request.fixturenames
    ]
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed > failed:  # NOTE: the call's report is counted before teardown
        for c in clusters:
            print(c.logs())


def _recipe(
    folder: Path,
    data: Path,
    options: dict,
    method: str = "int8-static",
    metric: str = "tests.cluster_helpers:slow_accuracy",
) -> Path:
    path = folder / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "passes": [{"kind": "quantize", "method": method, "options": options}],
                "data": {"calibration": str(data / "calib.npz"), "eval": str(data / "eval.npz")},
                "evaluate": {"metric": metric, "repeats": 2},
            }
        )
    )
    return path


_SPACE = {
    "calibrator": {"search": ["minmax", "percentile", "entropy", "mse"]},
    "per_channel": {"search": [True, False]},
    "sensitivity": False,
}


def _driver(cluster: LocalCluster, args: list[str], cwd: Path, **popen: object) -> subprocess.Popen:
    """``modelpress ARGS --address`` the cluster, as its own process (the test process never attaches to Ray)."""
    return subprocess.Popen(
        [sys.executable, "-m", "modelpress", *args, "--address", cluster.address],
        cwd=cwd,
        env=cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=ctrl_c_at_default,  # NOTE: the interrupted-driver test stops it with Ctrl-C
        **popen,
    )


def _finish(proc: subprocess.Popen, cluster: LocalCluster, code: int = 0) -> str:
    try:
        out, _ = proc.communicate(timeout=_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == code, f"exit {proc.returncode}\n{text[-6000:]}\n{cluster.logs()}"
    return text


def test_tune_spreads_trials_over_both_nodes_and_sends_no_paths(
    cluster, digits_mlp_path, tune_data, tmp_path
):
    recipe = _recipe(tmp_path, tune_data, _SPACE)
    spy = tmp_path / "spy.json"
    # NOTE: the driver wraps RayExecutor.submit to record what each trial is given (the real submit runs): only bytes, object
    # references and settings may reach a worker, no path of this machine's files
    code = f"""
import json, sys
from modelpress.app.tuning import executor
from modelpress.cli.main import main
seen = []
real = executor.RayExecutor.submit
def submit(self, key, fn, *args, **kwargs):
    def leaves(v):
        if isinstance(v, dict):
            return [x for item in v.values() for x in leaves(item)]
        if isinstance(v, (list, tuple)):
            return [x for item in v for x in leaves(item)]
        return [v]
    seen.append([type(v).__name__ if not isinstance(v, str) else v for v in leaves([args, kwargs])])
    return real(self, key, fn, *args, **kwargs)
executor.RayExecutor.submit = submit
try:
    code = main(sys.argv[1:])
finally:
    open({str(spy)!r}, "w").write(json.dumps(seen))
sys.exit(code)
"""
    args = [
        "tune",
        str(digits_mlp_path),
        "--recipe",
        str(recipe),
        "--trials",
        "6",
        "--workers",
        "2",
        "--keep-trial-models",
        "-q",
        "-o",
        str(tmp_path / "out"),
    ]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args, "--address", cluster.address],
        cwd=tmp_path,
        env=cluster.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    _finish(proc, cluster)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    placement = report["cluster"]
    assert (
        placement["executor"] == "ray"
        and placement["attached"]
        and placement["address"] == cluster.address
    )
    assert len(placement["nodes"]) == 2
    trials = [t for t in report["trials"] if t["status"] == "ok"]
    assert len(trials) == 6
    assert {t["node"] for t in trials} == {
        n["node"] for n in placement["nodes"]
    }  # both nodes ran trials
    assert all(t["host"] for t in trials)
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "## Where the trials ran" in markdown and cluster.address in markdown
    assert "Where the trials ran" in (tmp_path / "out" / "report.html").read_text()
    seen = json.loads(spy.read_text())
    assert seen, "no trial was submitted"
    for leaves in seen:
        paths = [v for v in leaves if isinstance(v, str) and (os.sep in v and os.path.exists(v))]
        assert not paths, f"a trial was handed paths of the driver's file system: {paths}"
        assert "ObjectRef" in leaves  # the model and data travel as Ray objects


def test_batch_attached_to_the_cluster_runs_on_both_nodes(
    cluster, digits_mlp_path, tune_data, tmp_path
):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "passes": [{"kind": "quantize", "method": "int8-dynamic"}],
                "data": {"eval": str(tune_data / "eval.npz")},
                "evaluate": {"metric": "tests.cluster_helpers:slow_accuracy", "repeats": 2},
            }
        )
    )
    second = tmp_path / "copy" / "digits_mlp.onnx"
    second.parent.mkdir()
    second.write_bytes(Path(digits_mlp_path).read_bytes())
    proc = _driver(
        cluster,
        [
            "compress",
            str(digits_mlp_path),
            str(second),
            "--recipe",
            str(recipe),
            "-o",
            str(tmp_path / "out"),
            "-q",
        ],
        tmp_path,
    )
    _finish(proc, cluster)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    rows = summary["models"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert len({r["node"] for r in rows}) == 2 and all(r["host"] for r in rows)
    for row in rows:  # the outputs came back from the nodes as bytes and were written here
        assert (
            Path(row["output"]).exists() and (Path(row["output"]).parent / "report.json").exists()
        )


def test_memory_error_in_a_trial_fails_that_trial_only(
    cluster, digits_mlp_path, tune_data, tmp_path
):
    # codebook bits=2 is far from the float outputs: the metric then asks for more memory than a node has (MemoryError)
    recipe = _recipe(
        tmp_path,
        tune_data,
        {"bits": {"search": [2, 8, 4]}, "min_elements": 16},
        method="codebook",
        metric="tests.cluster_helpers:greedy_when_far",
    )
    proc = _driver(
        cluster,
        [
            "tune",
            str(digits_mlp_path),
            "--recipe",
            str(recipe),
            "--trials",
            "3",
            "--workers",
            "2",
            "-q",
            "-o",
            str(tmp_path / "out"),
        ],
        tmp_path,
    )
    _finish(proc, cluster)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    by_bits = {t["passes"][0]["options"]["bits"]: t for t in report["trials"]}
    assert by_bits[2]["status"] == "failed" and by_bits[2]["error"].startswith("MemoryError")
    assert by_bits[8]["status"] == "ok" and by_bits[4]["status"] == "ok"
    assert report["best"] is not None


def _finished(db: Path) -> dict[int, str]:
    """Trial number -> its configuration, for the trials the study holds as finished and ok (read while a
    driver writes). NOTE: COMPLETE too: a driver sets a trial's attributes (status "ok") before it tells
    the study, and a Ctrl-C between the two records the trial as interrupted, to run again."""
    try:
        with sqlite3.connect(db, timeout=5) as con:
            rows = con.execute(
                "SELECT t.number, a.key, a.value_json FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE a.key IN ('status', 'config') AND t.state = 'COMPLETE'"
            ).fetchall()
    except sqlite3.Error:  # NOTE: not created yet
        return {}
    attrs: dict[int, dict[str, str]] = {}
    for number, key, value in rows:
        attrs.setdefault(number, {})[key] = value
    return {n: a.get("config", "") for n, a in attrs.items() if a.get("status") == '"ok"'}


def _wait(condition, proc: subprocess.Popen, cluster: LocalCluster, what: str) -> None:
    deadline = time.monotonic() + _TIMEOUT
    while not condition():
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
            raise AssertionError(
                f"driver ended (or timed out) before {what}: {proc.poll()}\n{out[-6000:]}\n{cluster.logs()}"
            )
        time.sleep(0.3)


def test_interrupted_driver_resumes_without_rerunning_finished_trials(
    cluster, digits_mlp_path, tune_data, tmp_path
):
    recipe = _recipe(tmp_path, tune_data, _SPACE)
    args = [
        "tune",
        str(digits_mlp_path),
        "--recipe",
        str(recipe),
        "--trials",
        "6",
        "--workers",
        "2",
        "--keep-trial-models",
        "-q",
        "-o",
        str(tmp_path / "out"),
    ]
    proc = _driver(cluster, args, tmp_path)
    db = tmp_path / "out" / "study.db"
    # NOTE: 6 trials, interrupted after 2 (a driver that ignored its Ctrl-C, SIGINT inherited ignored
    # from a runner started in the background, ended with exit 0 and every trial done)
    _wait(lambda: len(_finished(db)) >= 2, proc, cluster, "two trials finished")
    proc.send_signal(
        signal.SIGINT
    )  # NOTE: Ctrl-C in the driver alone: the cluster's processes are in their own sessions
    _finish(proc, cluster, code=130)
    first = _finished(db)
    assert len(first) >= 2
    _finish(_driver(cluster, args, tmp_path), cluster)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    ok = [t for t in report["trials"] if t["status"] == "ok"]
    assert len(ok) == 6
    configs = [json.dumps(t["config"], sort_keys=True) for t in ok]
    assert len(set(configs)) == len(configs)  # no finished configuration ran again
    again = {t["number"]: t for t in ok}
    assert set(first) <= set(again)  # every trial the first run finished is kept, as it was
    assert all(json.loads(first[n]) == again[n]["config"] for n in first)


def test_worker_node_lost_mid_study_costs_only_its_trials(
    doomed_cluster, digits_mlp_path, tune_data, tmp_path
):
    """On a cluster of its own: it ends the worker node."""
    cluster = doomed_cluster
    recipe = _recipe(tmp_path, tune_data, _SPACE)
    proc = _driver(
        cluster,
        [
            "tune",
            str(digits_mlp_path),
            "--recipe",
            str(recipe),
            "--trials",
            "6",
            "--workers",
            "2",
            "--keep-trial-models",
            "-q",
            "-o",
            str(tmp_path / "out"),
        ],
        tmp_path,
    )
    worker = cluster.nodes[1]
    markers = worker.folder / "running"
    db = tmp_path / "out" / "study.db"
    # NOTE: kill the worker node while one of its trials is in its metric (it marks itself in the node's folder),
    # right after seeing its mark: reading the study again first (its lock held by the driver's writes for up
    # to 5 s under load) let that trial finish before the kill in one run of this file alone at load 5
    before: dict[int, str] = {}

    def trial_in_flight_on_worker() -> bool:
        before.update(_finished(db))
        return len(before) >= 1 and any(markers.glob("*"))

    _wait(trial_in_flight_on_worker, proc, cluster, "a trial ran on the worker node")
    # NOTE: the node dies as a machine does: its raylet and its worker processes (SIGKILL by PID). Ending the raylet
    # alone lets a worker already in its trial finish it and hand the (small, inlined) result straight to the driver.
    worker.stop(signal.SIGKILL)
    _finish(proc, cluster)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    trials = {t["number"]: t for t in report["trials"]}
    lost = [t for t in trials.values() if t["error"].startswith("node lost")]
    # NOTE: at most the trials in flight on the worker node (1 CPU)
    assert 1 <= len(lost) <= 2, [(t["status"], t["node"][:8], t["error"]) for t in trials.values()]
    head = next(n["node"] for n in report["cluster"]["nodes"] if n["alive"])
    for t in lost:
        assert t["status"] == "failed" and t["retried"]
        retry = next(r for r in trials.values() if r["retry_of"] == t["number"])
        assert (
            retry["status"] == "ok"
            and retry["attempt"] == 2
            and retry["node"] == head
            and retry["config"] == t["config"]
        )
    assert all(trials[n]["status"] == "ok" for n in before)  # nothing that finished is lost
    assert (
        len([t for t in trials.values() if t["status"] == "ok"]) == 6
    )  # the study completed on the head node
    assert "LOST during the run" in (tmp_path / "out" / "report.md").read_text()
    assert any(not n["alive"] for n in report["cluster"]["nodes"])
