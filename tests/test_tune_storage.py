"""A study shared by several `modelpress tune` drivers: claims (one run per configuration), lost drivers'
trials run again, and two CLI drivers on one PostgreSQL study.

The PostgreSQL server is Debian's (``/usr/lib/postgresql/*/bin``), started by this test session in a
temporary folder on 127.0.0.1 (a free port; its unix socket in that folder) and stopped by its PID. As
root it runs as the ``postgres`` system user (PostgreSQL refuses root). The claim tests run on SQLite too.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import ROOT

optuna = pytest.importorskip("optuna", reason="needs the distributed extra")

from modelpress.app.tuning.store import open_study, storage_url  # noqa: E402
from modelpress.app.tuning.strategy import config_key  # noqa: E402


def _bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server for the session: (host, port, superuser). Skipped when the binaries are absent."""
    pytest.importorskip("psycopg", reason="needs psycopg (the distributed extra)")
    bindir = _bin()
    if bindir is None:
        pytest.skip("needs PostgreSQL's server binaries (apt-get install postgresql)")
    folder = Path(tempfile.mkdtemp(prefix="modelpress-pg-"))
    as_user: list[str] = []
    if (
        os.geteuid() == 0
    ):  # NOTE: postgres refuses to run as root: its own system user runs it, in a folder it owns
        user = pwd.getpwnam("postgres")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups"]
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    subprocess.run(
        [
            *as_user,
            str(bindir / "initdb"),
            "-D",
            str(folder / "data"),
            "--auth=trust",
            "--username=modelpress",
            "--encoding=UTF8",
            "--no-sync",
            "--no-instructions",
        ],
        cwd=folder,
        env=env,
        check=True,
        capture_output=True,
    )
    port = _free_port()
    log = open(folder / "server.log", "w")
    # NOTE: setpriv execs postgres: this PID is the postmaster itself
    server = subprocess.Popen(
        [
            *as_user,
            str(bindir / "postgres"),
            "-D",
            str(folder / "data"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            str(folder),
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ],
        cwd=folder,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        import psycopg

        deadline = time.monotonic() + 60
        while True:
            try:
                psycopg.connect(
                    host="127.0.0.1",
                    port=port,
                    user="modelpress",
                    dbname="postgres",
                    connect_timeout=2,
                ).close()
                break
            except psycopg.OperationalError:
                assert server.poll() is None and time.monotonic() < deadline, (
                    folder / "server.log"
                ).read_text()
                time.sleep(0.2)
        yield ("127.0.0.1", port, "modelpress")
    finally:
        server.send_signal(signal.SIGINT)  # NOTE: PostgreSQL's fast shutdown, to its own PID
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def pg_url(postgres):
    """A fresh database on the session's server; its ``postgresql://`` URL."""
    import psycopg

    host, port, user = postgres
    name = f"study_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host=host, port=port, user=user, dbname="postgres", autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return f"postgresql://{user}@{host}:{port}/{name}"


def _open(url: str, tmp_path: Path, seed: int = 0):
    return open_study(url, "shared", "accuracy", "size", seed, tmp_path)


CONFIG = {"pipeline": "int8-static", "int8-static:1.calibrator": "minmax"}


def test_a_configuration_is_claimed_by_one_driver(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    a, b = _open(url, tmp_path), _open(url, tmp_path)
    try:
        assert (a.claims.ordinal, b.claims.ordinal) == (
            0,
            1,
        )  # NOTE: the second driver's sampler is seeded apart
        ta, tb = a.ask(), b.ask()
        assert a.claim(ta, CONFIG) is None
        a.set(ta, config=CONFIG, status="running", session=a.session)
        held = b.claim(tb, CONFIG)
        assert held is not None and held.number == ta.number
        b.set(tb, config=CONFIG, status="duplicate", duplicate_of=held.number)
        b.tell(tb, state=b.state("FAIL"))
        # a failed trial releases its claim (a failed configuration may be tried again); a duplicate's end does not
        assert b.claim(b.ask(), CONFIG).number == ta.number
        a.set(ta, status="failed", error="boom")
        a.tell(ta, state=a.state("FAIL"))
        again = b.ask()
        assert b.claim(again, CONFIG) is None
        b.set(again, config=CONFIG, status="ok", session=b.session)
        b.tell(again, [0.9, 0.1])
        assert (
            a.claim(a.ask(), CONFIG).number == again.number
        )  # NOTE: a completed claim stays: no second run
    finally:
        a.close()
        b.close()


@pytest.mark.slow
def test_a_killed_drivers_running_trials_run_again(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    proc = subprocess.run(
        [sys.executable, "-c", _LOST.format(url=url, config=CONFIG)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 9, proc.stderr
    store = _open(url, tmp_path)
    try:
        lost = next(iter(store.trials.values()))
        assert lost.state == store.state("RUNNING")
        # NOTE: its driver ran on this host and its process is gone: lost at once, not after the heartbeat's grace
        assert store.recover() == [CONFIG]
        assert store.trials[lost.number].state == store.state("FAIL")
        assert store.claim(store.ask(), CONFIG) is None
    finally:
        store.close()


@pytest.mark.slow
def test_a_driver_lost_mid_study_is_noticed_by_the_live_one(tmp_path):
    from modelpress.app.tuning.claims import BEAT_S

    url = f"sqlite:///{tmp_path / 'study.db'}"
    store = _open(url, tmp_path)
    try:
        assert store.recover() == [] and store.sync() == []
        proc = subprocess.run(
            [sys.executable, "-c", _LOST.format(url=url, config=CONFIG)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 9, proc.stderr
        time.sleep(BEAT_S + 0.1)  # NOTE: sync looks at the study once per beat
        assert store.sync() == [
            CONFIG
        ]  # NOTE: the driver that joined and died: its running trial runs again here
        lost = next(
            t
            for t in store.trials.values()
            if t.user_attrs.get("session") not in (None, store.session)
        )
        assert lost.state == store.state("FAIL") and store.running_elsewhere() == 0
        assert store.claim(store.ask(), CONFIG) is None
    finally:
        store.close()


_LOST = (
    "import os; from pathlib import Path; from modelpress.app.tuning.store import open_study; "
    "s = open_study({url!r}, 'shared', 'accuracy', 'size', 0, Path('.')); t = s.ask(); c = {config!r}; "
    "assert s.claim(t, c) is None; s.set(t, config=c, status='running', session=s.session); os._exit(9)"
)


def test_postgresql_urls_use_the_installed_driver():
    pytest.importorskip("psycopg", reason="needs psycopg (the distributed extra)")
    import importlib.util

    url = storage_url("postgresql://u@127.0.0.1:5432/db")
    assert url.endswith("://u@127.0.0.1:5432/db")
    assert url.startswith(
        "postgresql+psycopg2://"
        if importlib.util.find_spec("psycopg2")
        else "postgresql+psycopg://"
    )
    assert storage_url("sqlite:///x.db") == "sqlite:///x.db"


_RACER = """
import json, sys, time
from modelpress.app.tuning.claims import Claims
url, go, session = sys.argv[1], float(sys.argv[2]), sys.argv[3]
claims = Claims(url, "race", session)
while time.time() < go:
    time.sleep(0.001)
won = [key for number, key in enumerate(f"config-{i}" for i in range(40)) if claims.claim(number, key) is None]
claims.close()
print(json.dumps(won))
"""


@pytest.mark.slow
def test_concurrent_claims_on_postgresql_have_one_winner_each(pg_url):
    go = (
        time.time() + 8
    )  # NOTE: every racer starts claiming at the same moment, once all have connected
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, storage_url(pg_url), str(go), f"racer{i}"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    won = []
    for proc in racers:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        won.append(json.loads(out))
    every = [key for keys in won for key in keys]
    assert sorted(every) == sorted(
        f"config-{i}" for i in range(40)
    )  # NOTE: each configuration claimed exactly once


def _recipe(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "passes": [
                    {
                        "kind": "quantize",
                        "method": "int8-static",
                        "options": {
                            "calibrator": {"search": ["minmax", "percentile", "entropy", "mse"]},
                            "per_channel": {"search": [True, False]},
                            "sensitivity": False,
                        },
                    }
                ],
                "data": {"calibration": str(data / "calib.npz"), "eval": str(data / "eval.npz")},
            }
        )
    )
    return path


def _front(trials: list[dict]) -> set[int]:
    """The completed trials no other beats on (accuracy up, size down): computed here, not by modelpress."""
    done = [t for t in trials if t["status"] == "ok"]
    return {
        t["number"]
        for t in done
        if not any(
            o["metric"] >= t["metric"]
            and o["size_bytes"] <= t["size_bytes"]
            and (o["metric"] > t["metric"] or o["size_bytes"] < t["size_bytes"])
            for o in done
        )
    }


@pytest.mark.slow
def test_two_cli_drivers_share_one_postgresql_study(
    ray_address, pg_url, digits_mlp_path, tune_data, digits, tmp_path
):
    recipe = _recipe(tmp_path, tune_data)
    drivers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "modelpress.cli",
                "tune",
                str(digits_mlp_path),
                "--recipe",
                str(recipe),
                "--trials",
                "6",
                "--workers",
                "1",
                "--address",
                ray_address,
                "--storage",
                pg_url,
                "--study-name",
                "shared",
                "-o",
                str(tmp_path / f"driver{i}"),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in drivers:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name="shared", storage=storage_url(pg_url))
    ran = [
        t for t in study.get_trials() if t.user_attrs.get("status") in ("ok", "pruned", "failed")
    ]
    keys = [config_key(t.user_attrs["config"]) for t in ran]
    assert len(keys) == len(set(keys)), "a configuration ran twice"
    assert len([t for t in ran if t.user_attrs["status"] == "ok"]) >= 6
    sessions = {t.user_attrs["session"] for t in ran}
    assert len(sessions) == 2  # NOTE: both drivers ran trials
    duplicates = [t for t in study.get_trials() if t.user_attrs.get("status") == "duplicate"]
    for t in duplicates:  # NOTE: a proposal already claimed: recorded, not run
        assert t.user_attrs["duplicate_of"] in {r.number for r in ran} | {
            d.number for d in duplicates
        }

    print(
        f"two drivers: {len(ran)} trials ran, {len(duplicates)} proposals already claimed (not run), "
        + ", ".join(
            f"{sum(t.user_attrs['session'] == s for t in ran)} by {s}" for s in sorted(sessions)
        )
    )
    reports = [json.loads((tmp_path / f"driver{i}" / "report.json").read_text()) for i in range(2)]
    for report in reports:  # NOTE: each driver saw the other's results
        assert {t["session"] for t in report["trials"] if t["status"] == "ok"} == sessions
        assert (tmp_path / f"driver{reports.index(report)}" / "best.onnx").exists()
    last = max(reports, key=lambda r: len(r["trials"]))
    assert {t["number"] for t in last["trials"]} == {t.number for t in ran}
    assert set(last["pareto"]) == _front(
        last["trials"]
    )  # NOTE: one Pareto front over both drivers' trials

    # a third driver, elsewhere, with no time left: its best is a trial run by the others, rebuilt here from its passes
    late = tmp_path / "late"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modelpress.cli",
            "tune",
            str(digits_mlp_path),
            "--recipe",
            str(recipe),
            "--time",
            "0s",
            "--address",
            ray_address,
            "--storage",
            pg_url,
            "--study-name",
            "shared",
            "-o",
            str(late),
            "-q",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((late / "report.json").read_text())
    assert report["best"]["number"] == last["best"]["number"] and set(report["pareto"]) == set(
        last["pareto"]
    )
    source = tmp_path / f"driver{reports.index(last)}"
    np.testing.assert_array_equal(
        _outputs(late / "best.onnx", digits["x_test"]),
        _outputs(source / "best.onnx", digits["x_test"]),
    )


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    from modelpress.runtime.session import make_session, run

    return run(make_session(path), {"x": x})[0]


def test_trials_get_the_weights_of_a_model_loaded_with_external_data(tmp_path):
    """tune hands its trials ``source.onnx`` as one protobuf: a model whose weights sit in an
    external-data file (any model over 256 MB loads that way) used to be written pointing at a file
    the trial's folder does not have."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    import modelpress
    from modelpress.app.recipe import Evaluate
    from modelpress.app.tuning.inputs import Inputs
    from modelpress.runtime.session import make_session, run

    weight = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32), "W"
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="fc")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 32])],
        [weight],
    )
    source_dir, out = tmp_path / "source", tmp_path / "out"
    source_dir.mkdir()
    out.mkdir()
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        source_dir / "m.onnx",
        save_as_external_data=True,
        location="m.data",
        size_threshold=0,
    )
    model = modelpress.load(source_dir / "m.onnx", show_progress=False)
    Inputs(model, {}, Evaluate()).write(out)
    (source_dir / "m.data").unlink()  # the trial's copy must not need it
    trial = modelpress.load(out / "source.onnx", show_progress=False)
    x = {"x": np.ones((2, 64), np.float32)}
    np.testing.assert_array_equal(
        run(make_session(trial), x)[0], np.ones((2, 64), np.float32) @ numpy_helper.to_array(weight)
    )
