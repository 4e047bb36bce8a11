"""Shared fixtures: real data (scikit-learn's digits), models trained in the session, the example plugin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelpress

ROOT = Path(__file__).resolve().parents[1]


def pytest_addoption(parser):
    parser.addoption(
        "--fuzz-cases",
        type=int,
        default=0,
        metavar="N",
        help="run N generated cases per fuzz test in tests/test_fuzz.py (default: a few hundred in all; "
        "or set MODELPRESS_FUZZ_CASES)",
    )


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Each test sees the plugins installed at that moment (and no state from other tests).

    The suite is hermetic: third-party plugins installed in the environment are not loaded
    (autoload off, strictness and allow/block lists cleared); tests of plugins opt in with the
    ``example_plugin`` fixture or by deleting the variable.
    """
    monkeypatch.setenv("MODELPRESS_DISABLE_PLUGIN_AUTOLOAD", "1")
    for name in ("MODELPRESS_PLUGINS", "MODELPRESS_BLOCK_PLUGINS", "MODELPRESS_STRICT_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    modelpress.reset_registry()
    yield
    modelpress.reset_registry()


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's digits (ships with the package): 8x8 images scaled to [0, 1], fixed split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return {"x_train": x[:split], "y_train": y[:split], "x_test": x[split:], "y_test": y[split:]}


def _mlp_proto(coefs: list[np.ndarray], intercepts: list[np.ndarray]) -> onnx.ModelProto:
    nodes, inits = [], []
    current = "x"
    for i, (w, b) in enumerate(zip(coefs, intercepts, strict=True)):
        inits += [
            numpy_helper.from_array(w.astype(np.float32), f"fc{i}.weight"),
            numpy_helper.from_array(b.astype(np.float32), f"fc{i}.bias"),
        ]
        out = "logits" if i == len(coefs) - 1 else f"h{i}"
        nodes.append(
            helper.make_node(
                "Gemm", [current, f"fc{i}.weight", f"fc{i}.bias"], [out], name=f"fc{i}"
            )
        )
        if i < len(coefs) - 1:
            nodes.append(helper.make_node("Relu", [out], [f"{out}_relu"], name=f"relu{i}"))
            current = f"{out}_relu"
    graph = helper.make_graph(
        nodes,
        "digits_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests"
    )
    proto.ir_version = 8
    return proto


@pytest.fixture(scope="session")
def digits_mlp_path(digits, tmp_path_factory) -> Path:
    """An MLP trained on digits with scikit-learn, written as ONNX (Gemm -> Relu -> Gemm)."""
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=0)
    clf.fit(digits["x_train"], digits["y_train"])
    assert clf.score(digits["x_test"], digits["y_test"]) > 0.93
    path = tmp_path_factory.mktemp("models") / "digits_mlp.onnx"
    onnx.save(_mlp_proto(clf.coefs_, clf.intercepts_), path)
    return path


@pytest.fixture(scope="session")
def digits_npz(digits, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "digits_test.npz"
    np.savez(path, x=digits["x_test"], labels=digits["y_test"])
    return path


@pytest.fixture(scope="session")
def example_plugin_site(tmp_path_factory) -> Path:
    """pip-install examples/plugin-template into a private folder (no network, no build isolation)."""
    target = tmp_path_factory.mktemp("plugin-site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(ROOT / "examples" / "plugin-template"),
        ],
        check=True,
        env={**os.environ, "PIP_CONSTRAINT": ""},
    )
    return target


@pytest.fixture
def example_plugin(example_plugin_site, monkeypatch) -> Path:
    """The example plugin importable and discoverable in this process (and subprocesses via PYTHONPATH)."""
    monkeypatch.delenv(
        "MODELPRESS_DISABLE_PLUGIN_AUTOLOAD", raising=False
    )  # this test opts in to third-party plugins
    monkeypatch.syspath_prepend(str(example_plugin_site))
    monkeypatch.setenv(
        "PYTHONPATH",
        os.pathsep.join(filter(None, [str(example_plugin_site), os.environ.get("PYTHONPATH")])),
    )
    modelpress.reset_registry()
    return example_plugin_site


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed `modelpress` command in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "modelpress.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
    )


def ctrl_c_at_default() -> None:
    """``preexec_fn`` for a process a test stops with SIGINT (Ctrl-C): the signal at its default
    disposition, so Python raises KeyboardInterrupt. A test runner started as a background job
    (``pytest &``, ``nohup``) inherits SIGINT *ignored*, and so would the process: it would never
    see the Ctrl-C (a dashboard server outliving it, a tune driver finishing every trial)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_cli_here(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`run_cli` in this process: ``modelpress.cli.main`` (what the console script calls) with its own
    stdout/stderr, environment and folder, and a fresh plugin registry, as a new process would
    have. It saves a Python start and the imports (the fast tier); tests whose point is the process
    itself (import budgets, pipes, crashes, PYTHONPATH plugins) keep `run_cli`."""
    import contextlib
    import io
    import warnings

    from modelpress.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_show = dict(os.environ), os.getcwd(), warnings.showwarning
    os.environ.update(env or {})
    try:
        if cwd is not None:
            os.chdir(cwd)
        modelpress.reset_registry()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: --help, --version, usage errors
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        warnings.showwarning = saved_show
        modelpress.reset_registry()
    return subprocess.CompletedProcess(
        ["modelpress", *args], int(code or 0), out.getvalue(), err.getvalue()
    )


# -- framework models, trained once per session ------------------------------------------------
@pytest.fixture(scope="session")
def torch_digits(digits):
    """Trained torch models on digits: {"cnn": (module, x_test), "mlp": ..., "transformer": ...}."""
    pytest.importorskip("torch", reason="needs the torch extra")
    import torch

    from tests import torch_models as tm
    from tests.models import images

    torch.manual_seed(0)
    out = {
        "cnn": (
            tm.train_torch(
                tm.DigitsCNN(), images(digits["x_train"], "nchw"), digits["y_train"], epochs=6
            ),
            images(digits["x_test"], "nchw"),
        ),
        "mlp": (
            tm.train_torch(tm.DigitsMLP(), digits["x_train"], digits["y_train"], epochs=15),
            digits["x_test"],
        ),
        "transformer": (
            tm.train_torch(
                tm.DigitsTransformer(),
                digits["x_train"].reshape(-1, 8, 8),
                digits["y_train"],
                epochs=12,
            ),
            digits["x_test"].reshape(-1, 8, 8),
        ),
    }
    for name, (module, x_test) in out.items():
        accuracy = float(np.mean(tm.torch_predict(module, x_test).argmax(1) == digits["y_test"]))
        assert accuracy > 0.85, f"{name} trained to only {accuracy:.2%}"
    return out


@pytest.fixture(scope="session")
def keras_digits(digits):
    """Trained Keras models on digits: {"cnn": (model, x_test), "mlp": (model, x_test)}."""
    pytest.importorskip("tensorflow", reason="needs the tensorflow extra")
    pytest.importorskip("tf2onnx", reason="needs the tensorflow extra")
    from tests import models

    out = {
        "cnn": (
            models.train_keras(
                models.keras_cnn(),
                models.images(digits["x_train"], "nhwc"),
                digits["y_train"],
                epochs=6,
            ),
            models.images(digits["x_test"], "nhwc"),
        ),
        "mlp": (
            models.train_keras(models.keras_mlp(), digits["x_train"], digits["y_train"], epochs=15),
            digits["x_test"],
        ),
    }
    for name, (model, x_test) in out.items():
        accuracy = float(np.mean(model.predict(x_test, verbose=0).argmax(1) == digits["y_test"]))
        assert accuracy > 0.85, f"keras {name} trained to only {accuracy:.2%}"
    return out


# -- the fast tier: `pytest -m "not slow"` ------------------------------------------------------------

# NOTE: fixtures that make every test using them slow: they train models (once per session) or start
# Ray (once per module); the tests that take seconds on their own carry @pytest.mark.slow.
SLOW_FIXTURES = {"torch_digits", "keras_digits", "encoders", "ray_address"}


@pytest.hookimpl(tryfirst=True)  # NOTE: before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


_SOURCES = {
    "core": "modelpress",
    "adapters": "modelpress.adapters",
    "plugins": "modelpress.plugins",
}
# NOTE: `python -m modelpress` entry shims: one call into modelpress.cli, run in subprocesses only
_SCRIPTS = {"modelpress.__main__", "modelpress.cli.__main__"}


def source_modules() -> list[str]:
    """The dotted name of every module of core/, adapters/ and plugins/."""
    names = []
    for folder, package in _SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            names.append(".".join((package, *parts)))
    return names


def pytest_sessionfinish(session, exitstatus):
    """A green run of the whole tests/ folder (``pytest`` or ``pytest -m "not slow"``) must have
    imported every module of core/, adapters/ and plugins/ in this process: a module no fast test
    reaches is a module the fast tier does not check. The run fails naming them."""
    config = session.config
    whole = config.args_source == pytest.Config.ArgsSource.TESTPATHS and not config.getoption(
        "keyword"
    )
    if (
        exitstatus != 0
        or not whole
        or config.option.collectonly
        or config.getoption("markexpr") not in ("", "not slow")
    ):
        return
    missing = [
        name for name in source_modules() if name not in sys.modules and name not in _SCRIPTS
    ]
    if missing:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(
                f"no test of this run imports {len(missing)} module(s): {', '.join(missing)}; "
                "add a fast test for each (or unmark one that reaches it)",
                red=True,
            )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="module")
def ray_address():
    """A local Ray session for the module (``address="local"``: whatever an earlier ``ray start``
    left in /tmp/ray); workers can import ``tests.*`` helpers. Stopped when the module ends."""
    ray = pytest.importorskip("ray", reason="needs the distributed extra")
    pytest.importorskip("optuna", reason="needs the distributed extra")
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
            object_store_memory=256 * 2**20,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},
        )
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def tune_data(digits, tmp_path_factory):
    """The digits evaluation (with labels) and calibration files the tune tests study on."""
    folder = tmp_path_factory.mktemp("tune-data")
    np.savez(folder / "eval.npz", x=digits["x_test"], labels=digits["y_test"])
    np.savez(folder / "calib.npz", x=digits["x_train"][:256])
    return folder
