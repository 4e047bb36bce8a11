"""Samples as users have them: sequences of different lengths, per-sample .npz files, lists and
generators, a model exported with batch 1, and generated token ids that index every table in range."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.data.samples import index_limits, load_dataset, sample_inputs
from modelpress.runtime.session import make_session, run, run_dataset
from tests.conftest import run_cli_here

ROLES = 4  # rows of the role table, reached through Cast -> Add 1: atoms must stay in [0, 3)
ATOMS = 64  # rows of the atom table, reached through Unsqueeze -> Gather -> Reshape
WIDTH = 32


def _graph_transformer() -> onnx.ModelProto:
    """``atoms: int64[1, seq_len]`` -> atom and role embeddings -> a MatMul stack -> ``y[1, seq_len, 8]``,
    as a graph transformer exported with batch 1 and a dynamic sequence length is."""
    rng = np.random.default_rng(0)

    def init(name: str, *shape: int, scale: float = 1.0) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    inits = [
        init("atom_table", ATOMS, WIDTH),
        init("role_table", ROLES, WIDTH),
        init("w1", WIDTH, 64, scale=0.2),
        init("w2", 64, WIDTH, scale=0.15),
        init("w3", WIDTH, 8, scale=0.2),
        numpy_helper.from_array(np.array(1, np.int32), "one"),
        numpy_helper.from_array(np.array([1, -1, WIDTH], np.int64), "rows"),
        numpy_helper.from_array(np.array([0], np.int64), "axis0"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["atoms", "axis0"], ["atoms3"]),
        helper.make_node("Gather", ["atom_table", "atoms3"], ["atom_rows"]),
        helper.make_node("Reshape", ["atom_rows", "rows"], ["atom_emb"]),
        helper.make_node("Cast", ["atoms"], ["atoms32"], to=TensorProto.INT32),
        helper.make_node("Add", ["atoms32", "one"], ["roles"]),
        helper.make_node("Gather", ["role_table", "roles"], ["role_emb"]),
        helper.make_node("Add", ["atom_emb", "role_emb"], ["h0"]),
        helper.make_node("MatMul", ["h0", "w1"], ["m1"], name="mm1"),
        helper.make_node("Relu", ["m1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "h0"], ["h1"]),
        helper.make_node("MatMul", ["h1", "w3"], ["y"], name="mm3"),
    ]
    graph = helper.make_graph(
        nodes,
        "graph_transformer",
        [helper.make_tensor_value_info("atoms", TensorProto.INT64, [1, "seq_len"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq_len", 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


LENGTHS = (5, 5, 9, 3, 12, 7, 7, 7, 4, 10, 6, 8)


def _samples() -> list[np.ndarray]:
    """One sequence of atom ids per sample, without the batch axis (as users keep them), ids in range."""
    rng = np.random.default_rng(1)
    return [rng.integers(0, ROLES - 1, size=n).astype(np.int64) for n in LENGTHS]


@pytest.fixture(scope="module")
def transformer() -> modelpress.Model:
    return modelpress.load(_graph_transformer())


def _static(model: modelpress.Model, calibration) -> modelpress.Model:  # type: ignore[no-untyped-def]
    return modelpress.quantize(model, "int8-static", calibration=calibration, show_progress=False)


def test_per_sample_npz_list_and_generator_calibrate_alike(transformer, tmp_path):
    samples = _samples()
    npz = tmp_path / "calib.npz"
    # NOTE: half with their batch axis, half without: both are one sample
    np.savez(npz, **{f"atoms/{i}": s[np.newaxis] if i % 2 else s for i, s in enumerate(samples)})
    data = load_dataset(npz, transformer.signature, what="calibration")
    assert len(data) == len(LENGTHS) and data.ragged and data.max_batch == 1
    assert [b["atoms"].shape for b in data.batches(64)] == [(1, n) for n in LENGTHS]
    from_file = _static(transformer, str(npz))
    from_list = _static(transformer, samples)
    from_dicts = _static(transformer, [{"atoms": s} for s in samples])
    from_generator = _static(transformer, (s for s in samples))
    graph = from_file.ir.graph
    assert sum(node.op_type == "QuantizeLinear" for node in graph) >= 3
    for other in (from_list, from_dicts, from_generator):
        assert _weights(other) == _weights(from_file)
    exported = modelpress.export(
        from_file, tmp_path / "q.onnx", sample=str(npz), show_progress=False
    )
    # every sample ran, one at a time, and each token's output was compared
    assert exported.verification.cosine > 0.99 and exported.verification.samples == sum(LENGTHS)


def _weights(model: modelpress.Model) -> dict[str, bytes]:
    return {
        name: value.const_value.numpy().tobytes()
        for name, value in model.ir.graph.initializers.items()
        if value.const_value is not None
    }


@pytest.mark.parametrize("method", ["int8-dynamic", "int4-weight-only"])
def test_weight_methods_verify_without_a_sample(transformer, method, tmp_path):
    result = modelpress.quantize(transformer, method, show_progress=False)
    exported = modelpress.export(result, tmp_path / f"{method}.onnx", show_progress=False)
    assert exported.verification.finite and exported.verification.cosine > 0.9


def test_generated_atoms_stay_in_the_smallest_table(transformer):
    limits = index_limits(transformer.ir.graph)
    assert limits == {"atoms": ROLES - 1}  # the role table's 4 rows, less the 1 added
    feeds = sample_inputs(transformer.signature, limits=limits, batch=64)
    assert (
        feeds["atoms"].shape == (1, 16)
        and feeds["atoms"].min() >= 0
        and feeds["atoms"].max() == ROLES - 2
    )
    run(make_session(transformer), feeds)  # ORT would refuse an index out of range


def _lookup(
    chain: list[onnx.NodeProto], inits: list[onnx.TensorProto], rows: int = 10
) -> modelpress.Model:
    """``ids -> chain -> idx -> Gather(table[rows, 4])``, the table behind a DequantizeLinear."""
    table = numpy_helper.from_array(np.ones((rows, 4), np.int8), "table_q")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    nodes = [
        *chain,
        helper.make_node("DequantizeLinear", ["table_q", "scale"], ["table"]),
        helper.make_node("Gather", ["table", "idx"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "lookup",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["a", "b", 4])],
        [table, scale, *inits],
    )
    return modelpress.load(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    )


def _const(name: str, value) -> onnx.TensorProto:  # type: ignore[no-untyped-def]
    return numpy_helper.from_array(np.asarray(value), name)


@pytest.mark.parametrize(
    ("chain", "inits", "expected"),
    [
        ([helper.make_node("Identity", ["ids"], ["idx"])], [], 10),
        (
            [
                helper.make_node("Slice", ["ids", "s0", "s1", "s2"], ["a"]),
                helper.make_node("Expand", ["a", "shape"], ["b"]),
                helper.make_node("Add", ["b", "three"], ["idx"]),
            ],
            [
                _const("s0", [0]),
                _const("s1", [4]),
                _const("s2", [1]),
                _const("shape", [2, 4]),
                _const("three", np.array([1, 3], np.int64).reshape(2, 1)),
            ],
            7,
        ),
        ([helper.make_node("Sub", ["ids", "two"], ["idx"])], [_const("two", np.int64(2))], (2, 12)),
        (
            [
                helper.make_node(
                    "Constant", [], ["five"], value=numpy_helper.from_array(np.int64(5))
                ),
                helper.make_node("Add", ["five", "ids"], ["idx"]),
            ],
            [],
            5,
        ),
        ([helper.make_node("Concat", ["ids", "ids"], ["idx"], axis=1)], [], 10),
    ],
)
def test_index_limits_follow_the_value_to_each_table(chain, inits, expected):
    model = _lookup(chain, inits)
    assert index_limits(model.ir.graph) == {"ids": expected}
    feeds = sample_inputs(model.signature, limits=index_limits(model.ir.graph))
    low, high = (0, expected) if isinstance(expected, int) else expected
    assert low <= feeds["ids"].min() and feeds["ids"].max() < high
    run(make_session(model), feeds)


def test_no_value_fits_every_table_is_a_clear_error():
    model = _lookup(
        [helper.make_node("Add", ["ids", "big"], ["idx"])], [_const("big", np.int64(10))]
    )
    with pytest.raises(
        modelpress.DataError, match=r"no value indexes every table.*\[0, 0\).*pass sample inputs"
    ):
        sample_inputs(model.signature, limits=index_limits(model.ir.graph))


def test_consecutive_samples_of_one_shape_are_batched_together():
    signature = modelpress.load(
        _lookup([helper.make_node("Identity", ["ids"], ["idx"])], [])
    ).signature
    rng = np.random.default_rng(0)
    items = [{"ids": rng.integers(0, 10, (2, n)), "labels": np.arange(2)} for n in (3, 3, 5, 3)]
    data = load_dataset(items, signature)
    assert data.ragged and data.max_batch is None and len(data) == 8
    assert [b["ids"].shape for b in data.batches(64)] == [(4, 3), (2, 5), (2, 3)]
    assert [b["ids"].shape for b in data.batches(3)] == [
        (3, 3),
        (1, 3),
        (2, 5),
        (2, 3),
    ] and data.batch_count(3) == 4
    assert np.array_equal(data.labels, [0, 1, 0, 1, 0, 1, 0, 1])
    assert [b["ids"].shape for b in data.take(5).batches()] == [(4, 3), (1, 5)]
    with pytest.raises(modelpress.DataError, match=r"samples of 2 different shapes.*pad them"):
        data.inputs  # noqa: B018 - training needs one array per input
    as_lists = load_dataset(
        {"ids": [i["ids"] for i in items], "labels": [i["labels"] for i in items]}, signature
    )
    assert [b["ids"].tobytes() for b in as_lists.batches()] == [
        b["ids"].tobytes() for b in data.batches()
    ]


def test_a_batch_one_model_takes_stacked_samples_one_at_a_time(transformer):
    stacked = np.random.default_rng(0).integers(0, 3, (40, 6))  # padded samples, as in the issue
    data = load_dataset({"atoms": stacked}, transformer.signature, what="calibration")
    assert (
        len(data) == 40
        and data.batch_count(64) == 40
        and all(b["atoms"].shape == (1, 6) for b in data.batches(64))
    )


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        (
            {"atoms/0": np.zeros(3, np.int64), "atoms": np.zeros((1, 3), np.int64)},
            r"mixes per-sample arrays .* with whole arrays",
        ),
        (
            {"atoms/0": np.zeros(3, np.int64), "atoms/2": np.zeros(4, np.int64)},
            r"no array 'atoms/1'",
        ),
        (
            {"atoms/0": np.zeros(3, np.int64), "other/0": np.zeros(3, np.int64)},
            r"mixes per-sample arrays",
        ),
    ],
)
def test_bad_per_sample_files_are_clear_errors(transformer, tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(modelpress.DataError, match=match):
        load_dataset(str(tmp_path / "bad.npz"), transformer.signature, what="calibration")


def test_outputs_of_different_lengths_are_joined_by_rows(transformer):
    session = make_session(transformer)
    batches = [{"atoms": s[np.newaxis]} for s in _samples()[:3]]
    joined = run_dataset(session, batches)[0]
    assert joined.shape == (sum(LENGTHS[:3]), 1, 8)  # one row per token, the rank kept
    assert np.array_equal(joined[:5, 0], run(session, batches[0])[0][0])


@pytest.fixture(scope="module")
def docs_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs_files")
    subprocess.run(
        [sys.executable, str(Path(__file__).parent / "docs_files.py"), str(out)],
        check=True,
        capture_output=True,
    )
    return out


def test_the_one_array_layout_is_unchanged(docs_dir, tmp_path):
    """Today's layouts (one array per input: .npz, dict, one array, batches from an iterable) give
    the batches plain slicing gives, and the same quantized model as the same samples one by one."""
    model = modelpress.load(docs_dir / "model.onnx")
    x = np.load(docs_dir / "calib.npz")["x"]
    data = load_dataset(str(docs_dir / "calib.npz"), model.signature, what="calibration")
    assert not data.ragged and data.max_batch is None and data.inputs["x"].tobytes() == x.tobytes()
    assert [b["x"].tobytes() for b in data.batches(100)] == [
        x[i : i + 100].tobytes() for i in range(0, len(x), 100)
    ]
    from_iterable = load_dataset((x[i : i + 64] for i in range(0, len(x), 64)), model.signature)
    assert not from_iterable.ragged and from_iterable.inputs["x"].tobytes() == x.tobytes()
    per_sample = tmp_path / "per_sample.npz"
    np.savez(per_sample, **{f"x/{i}": s for i, s in enumerate(x)})
    reference = _weights(_static(model, str(docs_dir / "calib.npz")))
    for other in (x, {"x": x}, list(x), str(per_sample)):
        assert _weights(_static(model, other)) == reference
    exported = modelpress.export(
        _static(model, x),
        tmp_path / "q.onnx",
        sample=str(docs_dir / "data.npz"),
        show_progress=False,
    )
    assert exported.verification.top1_agreement == 1.0


def test_the_cli_reads_a_per_sample_file(transformer, tmp_path):
    modelpress.export(transformer, tmp_path / "model.onnx", show_progress=False)
    np.savez(tmp_path / "calib.npz", **{f"atoms/{i}": s for i, s in enumerate(_samples())})
    done = run_cli_here(
        "quantize",
        str(tmp_path / "model.onnx"),
        "-m",
        "int8-static",
        "--calib",
        str(tmp_path / "calib.npz"),
        "-o",
        str(tmp_path / "q.onnx"),
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "q.onnx").exists() and "cosine" in done.stdout


def test_an_array_that_is_not_one_sample_keeps_its_clear_error(docs_dir):
    signature = modelpress.load(docs_dir / "model.onnx").signature  # x: float32[batch, 1, 8, 8]
    with pytest.raises(
        modelpress.DataError, match=r"input 'x' has shape \(5, 8, 8\); the model expects"
    ):
        load_dataset(
            np.zeros((5, 8, 8), np.float32), signature
        )  # a channel axis missing, not one sample
    assert (
        len(load_dataset(np.zeros((1, 8, 8), np.float32), signature)) == 1
    )  # one sample without its batch axis
