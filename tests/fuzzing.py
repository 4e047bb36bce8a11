"""Seed models, damage and the property every bad input must satisfy (used by test_fuzz and test_errors).

The property (issue 10): running a file through load -> inspect -> a quick method -> export ends in
success or a ``ModelpressError`` whose message is one line; never another exception, a hang or a
runaway allocation; the input files are byte-for-byte unchanged; a failed export leaves nothing
at the target.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.runtime.session import RUN_TIMEOUT_ENV
from modelpress.testing import tiny_cnn, tiny_mlp

CASE_SECONDS = 30  # NOTE: generous: a real case takes milliseconds; this only catches hangs
MEMORY_HEADROOM = 3 << 30  # bytes a single case may allocate beyond what the process already uses


# -- seed models (valid, small, each exercising something different) ----------------------------
def _finish(graph: onnx.GraphProto, opset: int = 17) -> onnx.ModelProto:
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="fuzz"
    )
    proto.ir_version = 8
    return proto


def if_model() -> onnx.ModelProto:
    """MatMul -> If (then: MatMul with its own weight; else: Relu), both reading the outer ``h``."""
    rng = np.random.default_rng(0)
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["h", "w2"], ["t_out"], name="then_mm")],
        "then",
        [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, ["b", 8])],
    )
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["h"], ["e_out"], name="else_relu")],
        "else",
        [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, ["b", 8])],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0, name="rs"),
        helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
        helper.make_node(
            "If", ["c"], ["y0"], then_branch=then_g, else_branch=else_g, name="branch"
        ),
        helper.make_node("MatMul", ["y0", "w"], ["y"], name="mm2"),
    ]
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "w"),
        numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(0, np.float32), "zero"),
    ]
    return _finish(
        helper.make_graph(
            nodes,
            "if_model",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
            inits,
        )
    )


def loop_model() -> onnx.ModelProto:
    """MatMul -> Loop (3 times: acc = acc @ w + h, reading the outer ``w`` and ``h``) -> Tanh."""
    rng = np.random.default_rng(1)
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["acc_in", "w"], ["mm_out"], name="body_mm"),
            helper.make_node("Add", ["mm_out", "h"], ["acc_out"], name="body_add"),
            helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_id"),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["b", 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["b", 8]),
        ],
    )
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Loop", ["n", "t", "h"], ["y0"], body=body, name="loop"),
        helper.make_node("Tanh", ["y0"], ["y"], name="tanh"),
    ]
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 8)) * 0.3).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(3, np.int64), "n"),
        numpy_helper.from_array(np.array(True), "t"),
    ]
    return _finish(
        helper.make_graph(
            nodes,
            "loop_model",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
            inits,
        )
    )


def seeds() -> dict[str, onnx.ModelProto]:
    return {
        "mlp": tiny_mlp().to_proto(),
        "cnn": tiny_cnn().to_proto(),
        "if": if_model(),
        "loop": loop_model(),
    }


def with_external_data(proto: onnx.ModelProto, folder: Path, name: str = "model.onnx") -> Path:
    """Write ``proto`` with every initializer of 64+ bytes in ``<name>.data`` beside it."""
    path = folder / name
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)  # NOTE: onnx.save moves the weights out of the proto it is given
    onnx.save(
        copy,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=name + ".data",
        size_threshold=64,
    )
    return path


# -- the property ---------------------------------------------------------------------------------
class CaseTimeout(
    BaseException
):  # NOTE: BaseException: no `except Exception` in the code under test swallows it
    pass


@contextlib.contextmanager
def limits(seconds: int = CASE_SECONDS, headroom: int = MEMORY_HEADROOM) -> Iterator[None]:
    """A wall-clock timeout (SIGALRM) and a cap on new private memory (RLIMIT_DATA) for one case."""

    def _alarm(signum: int, frame: Any) -> None:
        raise CaseTimeout(f"case ran longer than {seconds}s (a hang)")

    old_handler = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(seconds)
    # NOTE: SIGALRM cannot interrupt ONNX Runtime while it runs (a mutated Loop trip count of 10^18
    # hung the suite); modelpress stops such a run itself when told to, with a clean error
    old_timeout = os.environ.get(RUN_TIMEOUT_ENV)
    os.environ[RUN_TIMEOUT_ENV] = str(max(1, seconds // 3))
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(
            resource.RLIMIT_DATA,
            (min(_data_bytes() + headroom, hard if hard > 0 else 1 << 62), hard),
        )
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_timeout is None:
            os.environ.pop(RUN_TIMEOUT_ENV, None)
        else:
            os.environ[RUN_TIMEOUT_ENV] = old_timeout
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))


def _data_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmData:"):
            return int(line.split()[1]) * 1024
    return 0


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every regular file under ``folder`` (symlinks and devices are not followed)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def assert_clean_error(exc: BaseException, case: str) -> None:
    """The only acceptable failure: a ModelpressError whose message is one line."""
    if not isinstance(exc, modelpress.ModelpressError):
        raise AssertionError(
            f"{case}: {type(exc).__name__} escaped instead of a ModelpressError: {str(exc)[:500]}"
        ) from exc
    message = str(exc)
    assert message and "\n" not in message, f"{case}: message is not one line: {message[:500]!r}"


QUICK_METHODS: list[tuple[str, dict[str, Any]]] = [
    ("magnitude", {"sparsity": 0.5}),
    ("int8-dynamic", {"min_elements": 16}),
    ("fp16", {}),
    ("int8-weight-only", {"block_size": 16}),
]


def run_pipeline(source: Any, out_dir: Path, *, method: int = 0, case: str = "") -> str:
    """load -> describe -> one quick method -> export into ``out_dir``; returns how far it got.

    Raises AssertionError if the property is broken (see the module docstring)."""
    target = out_dir / "out.onnx"
    stage = "load"
    try:
        with limits():
            model = modelpress.load(source)
            stage = "inspect"
            modelpress.describe(model)
            stage = "apply"
            name, options = QUICK_METHODS[method % len(QUICK_METHODS)]
            result = modelpress.apply(model, name, show_progress=False, **options)
            stage = "export"
            modelpress.export(result, target)
            stage = "done"
    except CaseTimeout:
        raise AssertionError(f"{case}: hung in {stage}") from None
    except Exception as exc:
        assert_clean_error(exc, f"{case} ({stage})")
        leftovers = sorted(p.name for p in out_dir.iterdir())
        assert not leftovers, f"{case}: failed {stage} left {leftovers} in the output folder"
    return stage


def check_case(
    make_inputs: Callable[[Path], Any], folder: Path, *, method: int = 0, case: str = ""
) -> str:
    """Create a case's input files in ``folder/in``, run the pipeline, check the inputs are untouched."""
    inputs, out = folder / "in", folder / "out"
    inputs.mkdir(parents=True)
    out.mkdir()
    source = make_inputs(inputs)
    before = hashes(inputs)
    stage = run_pipeline(source, out, method=method, case=case)
    assert hashes(inputs) == before, f"{case}: an input file changed"
    return stage


def fifo_supported() -> bool:
    return hasattr(os, "mkfifo")
