"""Fuzzing every way a user can hand modelpress a bad file (issue 10).

Generated with hypothesis from small valid seed models: byte-level damage, protobuf-level
mutations (dims, dtypes, raw_data length, dangling inputs, cycles, unknown ops and domains,
opset 1 and 99, attribute and subgraph damage, damaged metadata, sparse initializers),
external-data tricks, bad ``.npz`` data and bad recipes. Each case runs through load, inspect,
a quick quantize/prune and export under a timeout and a memory cap; the property is in
``tests/fuzzing.py``. The default run is a few hundred cases; ``pytest --fuzz-cases 5000
tests/test_fuzz.py`` (or ``MODELPRESS_FUZZ_CASES=5000``) runs that many per test instead.
"""

from __future__ import annotations

import collections
import io
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

import modelpress
from tests import fuzzing

# NOTE: damaged provenance metadata is dropped with a warning by design (root cause B).
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*metadata entry 'modelpress.ir.provenance' is damaged:UserWarning"
)

SEEDS = fuzzing.seeds()
SEED_BYTES = {name: proto.SerializeToString() for name, proto in SEEDS.items()}


def fuzz_settings(examples: int) -> Any:
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


@pytest.fixture(autouse=True, scope="module")
def _quiet_onnxruntime():
    """ORT logs every model it refuses to stderr; thousands of refusals are expected here."""
    import onnxruntime

    onnxruntime.set_default_logger_severity(4)
    yield
    onnxruntime.set_default_logger_severity(2)


def _cases(config: pytest.Config, default: int) -> int:
    asked = config.getoption("--fuzz-cases") or int(
        os.environ.get("MODELPRESS_FUZZ_CASES", "0") or 0
    )
    return int(asked) if asked else default


@pytest.fixture
def fuzz(request, tmp_path_factory):
    """Run ``test_body(data, folder)`` for the configured number of hypothesis examples."""

    def run(default: int, body) -> None:  # type: ignore[no-untyped-def]
        counter = iter(range(10**9))

        @fuzz_settings(_cases(request.config, default))
        @given(data=st.data())
        def inner(data):  # type: ignore[no-untyped-def]
            folder = tmp_path_factory.mktemp(f"case{next(counter)}")
            body(data, folder)

        inner()

    return run


# -- protobuf-level mutations ---------------------------------------------------------------------
def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    found = [graph]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                found += _graphs(attr.g)
            for g in attr.graphs:
                found += _graphs(g)
    return found


HUGE = [0, -1, 1, 3, 7, 2**31, 2**40, 10**11]


def _mutate_dims(draw, proto):  # type: ignore[no-untyped-def]
    graph = draw(st.sampled_from(_graphs(proto.graph)))
    where = draw(st.sampled_from(["initializer", "output", "value_info", "input"]))
    if where == "initializer" and graph.initializer:
        tensor = draw(st.sampled_from(list(graph.initializer)))
        if tensor.dims and draw(st.booleans()):
            tensor.dims[draw(st.integers(0, len(tensor.dims) - 1))] = draw(st.sampled_from(HUGE))
        else:
            tensor.dims.append(draw(st.sampled_from(HUGE)))
        return
    infos = {"output": graph.output, "value_info": graph.value_info, "input": graph.input}.get(
        where
    ) or graph.output
    if not infos:
        return
    info = draw(st.sampled_from(list(infos)))
    dims = info.type.tensor_type.shape.dim
    # NOTE: graph *inputs* only get small sizes: random sample inputs for a declared batch of 10^9
    # are issue 11's (sample_inputs), not this suite's.
    sizes = [0, 1, 3, 64] if where == "input" else HUGE
    if dims and draw(st.booleans()):
        dims[draw(st.integers(0, len(dims) - 1))].dim_value = draw(st.sampled_from(sizes))
    elif draw(st.booleans()):
        dims.add().dim_param = draw(st.sampled_from(["n", "", "ü", "x" * 300]))
    else:
        info.type.tensor_type.ClearField("shape")


DTYPES = [*range(0, 27), 999, -3]


def _mutate_dtype(draw, proto):  # type: ignore[no-untyped-def]
    graph = draw(st.sampled_from(_graphs(proto.graph)))
    values = list(graph.initializer) + list(graph.input) + list(graph.output)
    if not values:  # NOTE: an earlier mutation emptied this subgraph
        return
    value = draw(st.sampled_from(values))
    dtype = draw(st.sampled_from(DTYPES))
    if isinstance(value, onnx.TensorProto):
        value.data_type = dtype
    else:
        value.type.tensor_type.elem_type = dtype


def _mutate_raw_data(draw, proto):  # type: ignore[no-untyped-def]
    tensors = [t for g in _graphs(proto.graph) for t in g.initializer]
    if not tensors:
        return
    tensor = draw(st.sampled_from(tensors))
    raw = tensor.raw_data or tensor.SerializeToString()
    action = draw(st.sampled_from(["truncate", "extend", "empty", "float_data"]))
    if action == "truncate":
        tensor.raw_data = raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    elif action == "extend":
        tensor.raw_data = raw + draw(st.binary(min_size=1, max_size=64))
    elif action == "empty":
        tensor.ClearField("raw_data")
    else:
        tensor.float_data.extend(draw(st.lists(st.floats(allow_nan=True), min_size=1, max_size=5)))


def _mutate_wiring(draw, proto):  # type: ignore[no-untyped-def]
    graph = draw(st.sampled_from(_graphs(proto.graph)))
    if not graph.node:
        return
    kind = draw(
        st.sampled_from(
            [
                "dangling",
                "cycle",
                "duplicate_output",
                "drop_node",
                "drop_output",
                "empty_input",
                "reorder",
            ]
        )
    )
    nodes = list(graph.node)
    node = draw(st.sampled_from(nodes))
    if kind == "dangling" and node.input:
        node.input[draw(st.integers(0, len(node.input) - 1))] = draw(
            st.sampled_from(["nowhere", "", "x\x00y", "../w"])
        )
    elif kind == "cycle" and node.input:
        node.input[0] = nodes[-1].output[0]
    elif kind == "duplicate_output" and len(nodes) > 1:
        node.output[0] = nodes[0].output[0] if node is not nodes[0] else nodes[1].output[0]
    elif kind == "drop_node":
        graph.node.remove(node)
    elif kind == "drop_output" and graph.output:
        del graph.output[:]
    elif kind == "empty_input":
        node.input.append("")
    else:
        graph.node.reverse()


def _mutate_op(draw, proto):  # type: ignore[no-untyped-def]
    graph = draw(st.sampled_from(_graphs(proto.graph)))
    if not graph.node:
        return
    node = draw(st.sampled_from(list(graph.node)))
    kind = draw(st.sampled_from(["op", "domain", "both"]))
    if kind in ("op", "both"):
        node.op_type = draw(
            st.sampled_from(
                ["Foo", "", "Conv", "MatMul", "Loop", "If", "Relu", "QuantizeLinear", "Gemm"]
            )
        )
    if kind in ("domain", "both"):
        node.domain = draw(st.sampled_from(["com.evil", "ai.onnx.ml", "com.microsoft", "ai.onnx"]))


def _mutate_opset(draw, proto):  # type: ignore[no-untyped-def]
    choice = draw(st.sampled_from(["1", "99", "0", "-1", "none", "dup", "custom", "ir"]))
    if choice == "none":
        del proto.opset_import[:]
    elif choice == "dup":
        proto.opset_import.add().CopyFrom(helper.make_opsetid("", 11))
    elif choice == "custom":
        proto.opset_import.add().CopyFrom(helper.make_opsetid("com.evil", 1))
    elif choice == "ir":
        proto.ir_version = draw(st.sampled_from([0, 1, 3, 99, -1]))
    elif proto.opset_import:
        proto.opset_import[0].version = int(choice)


def _mutate_attribute(draw, proto):  # type: ignore[no-untyped-def]
    graph = draw(st.sampled_from(_graphs(proto.graph)))
    nodes = [n for n in graph.node if n.attribute] or list(graph.node)
    if not nodes:
        return
    node = draw(st.sampled_from(nodes))
    kind = draw(st.sampled_from(["ref", "type", "ints", "remove", "add", "graph", "tensor"]))
    if kind == "add" or not node.attribute:
        node.attribute.append(
            helper.make_attribute(
                draw(st.sampled_from(["bogus", "axis", "to", "pads"])),
                draw(st.sampled_from([1, -(2**40), 2**62, 1.5, "s", [1, 2], [2**40, -1]])),
            )
        )
        return
    attr = draw(st.sampled_from(list(node.attribute)))
    if kind == "ref":
        attr.ref_attr_name = draw(st.sampled_from(["alpha", "", "x" * 50]))
    elif kind == "type":
        attr.type = draw(
            st.sampled_from([0, 1, 2, 3, 4, 5, 7, 10, 14])
        )  # NOTE: protobuf itself refuses values outside the enum
    elif kind == "ints":
        attr.ClearField("ints")
        attr.ints.extend(draw(st.lists(st.sampled_from([0, -1, 2**40, 7]), max_size=6)))
        attr.i = draw(st.sampled_from([0, -1, 2**40, 2**62]))
    elif kind == "remove":
        node.attribute.remove(attr)
    elif kind == "graph":
        attr.g.CopyFrom(helper.make_graph([], "empty", [], []))
        attr.type = onnx.AttributeProto.GRAPH
    else:
        attr.t.name, attr.t.data_type = "t", TensorProto.FLOAT
        attr.t.dims[:] = [2, 2]
        attr.t.float_data[:] = [1.0, 2.0]  # too few values
        attr.type = onnx.AttributeProto.TENSOR


def _mutate_subgraph(draw, proto):  # type: ignore[no-untyped-def]
    subgraphs = _graphs(proto.graph)[1:]
    if not subgraphs:
        return _mutate_attribute(draw, proto)
    graph = draw(st.sampled_from(subgraphs))
    kind = draw(st.sampled_from(["outputs", "inputs", "node", "outer", "dtype"]))
    if kind == "outputs":
        del graph.output[:]
    elif kind == "inputs":
        graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    elif kind == "node" and graph.node:
        graph.node[0].op_type = draw(st.sampled_from(["Foo", "Softmax", "Loop"]))
    elif kind == "outer" and graph.node:
        graph.node[0].input[0] = draw(st.sampled_from(["x", "y", "undefined_outer"]))
    elif graph.output:
        graph.output[0].type.tensor_type.elem_type = draw(
            st.sampled_from([TensorProto.INT64, TensorProto.FLOAT16, 0])
        )
    return None


def _mutate_metadata(draw, proto):  # type: ignore[no-untyped-def]
    entry = proto.metadata_props.add()
    entry.key = draw(st.sampled_from(["modelpress.ir.provenance", "modelpress.version", "other"]))
    entry.value = draw(
        st.sampled_from(
            [
                "{",
                "[]",
                "null",
                "1e999",
                '{"passes": 3}',
                '{"passes": [{"kind": 1}]}',
                '{"passes": [null]}',
                '{"source": 5}',
                '{"extra": []}',
                '{"passes": [{"kind": "q", "method": "m", "options": {}, "plugin": "p", "plugin_version": "1", "bogus": 1}]}',
                "[" * 5000 + "]" * 5000,
                "\u0000",
                "ü",
            ]
        )
    )


def _mutate_sparse(draw, proto):  # type: ignore[no-untyped-def]
    graph = proto.graph
    if not graph.initializer:
        return
    dense = draw(st.sampled_from(list(graph.initializer)))
    try:
        array = onnx.numpy_helper.to_array(dense).reshape(-1)
    except (
        Exception
    ):  # NOTE: an earlier mutation already broke this tensor; onnx cannot read it either
        return
    nnz = min(len(array), 4)
    indices = draw(
        st.sampled_from(
            [np.arange(nnz), np.array([-1] * nnz), np.arange(nnz) * 10**6, np.arange(nnz + 1)]
        )
    )
    values = onnx.numpy_helper.from_array(array[:nnz].copy(), dense.name)
    sparse = helper.make_sparse_tensor(
        values, onnx.numpy_helper.from_array(indices.astype(np.int64), ""), list(dense.dims)
    )
    graph.sparse_initializer.append(sparse)
    graph.initializer.remove(dense)


MUTATIONS = {
    "dims": _mutate_dims,
    "dtype": _mutate_dtype,
    "raw_data": _mutate_raw_data,
    "wiring": _mutate_wiring,
    "op": _mutate_op,
    "opset": _mutate_opset,
    "attribute": _mutate_attribute,
    "subgraph": _mutate_subgraph,
    "metadata": _mutate_metadata,
    "sparse": _mutate_sparse,
}


@pytest.mark.slow
def test_protobuf_mutations(fuzz):
    stages: list[str] = []

    def body(data, folder: Path) -> None:
        seed = data.draw(st.sampled_from(sorted(SEEDS)), label="seed")
        proto = onnx.ModelProto()
        proto.CopyFrom(SEEDS[seed])
        names = data.draw(
            st.lists(st.sampled_from(sorted(MUTATIONS)), min_size=1, max_size=3), label="mutations"
        )
        for name in names:
            MUTATIONS[name](data.draw, proto)
        blob = proto.SerializeToString()
        method = data.draw(st.integers(0, 3), label="method")

        def make(inputs: Path) -> Path:
            path = inputs / "model.onnx"
            path.write_bytes(blob)
            return path

        stages.append(fuzzing.check_case(make, folder, method=method, case=f"{seed} + {names}"))

    fuzz(150, body)
    print("protobuf mutation outcomes:", dict(collections.Counter(stages)))  # shown with -s
    # NOTE: not vacuous: some mutants are refused at load, others get past it into a method and export
    # (which of them ends in a verified export shifts with Hypothesis's generation, which is not
    # reproducible across test orders and machine load even derandomized: 0 to 5 of 150 seen).
    assert "load" in stages and {"apply", "export", "done"} & set(stages), sorted(set(stages))


# -- byte-level damage ----------------------------------------------------------------------------
def test_byte_damage(fuzz):
    stages: list[str] = []

    def body(data, folder: Path) -> None:
        seed = data.draw(st.sampled_from(sorted(SEED_BYTES)), label="seed")
        blob = bytearray(SEED_BYTES[seed])
        kind = data.draw(
            st.sampled_from(["flip", "truncate", "insert", "splice", "zero", "names"]),
            label="damage",
        )
        if kind == "flip":
            for _ in range(data.draw(st.integers(1, 8))):
                i = data.draw(st.integers(0, len(blob) - 1))
                blob[i] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
        elif kind == "insert":
            i = data.draw(st.integers(0, len(blob)))
            blob[i:i] = data.draw(st.binary(min_size=1, max_size=32))
        elif kind == "splice":
            i, j = sorted(
                (data.draw(st.integers(0, len(blob))), data.draw(st.integers(0, len(blob))))
            )
            blob = blob[:j] + blob[i:j] + blob[j:]
        elif kind == "zero":
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i : i + 16] = bytes(len(blob[i : i + 16]))
        else:  # NOTE: invalid UTF-8 in names (root cause C)
            for name in data.draw(
                st.lists(
                    st.sampled_from(
                        [
                            b"fc1",
                            b"relu1",
                            b"conv1",
                            b"mm",
                            b"loop",
                            b"branch",
                            b"Gemm",
                            b"x",
                            b"fuzz",
                        ]
                    ),
                    min_size=1,
                    max_size=3,
                )
            ):
                blob = blob.replace(
                    name, bytes(0xFF - i for i in range(len(name)))
                )  # same length: still parses
        method = data.draw(st.integers(0, 3), label="method")

        def make(inputs: Path) -> Path:
            path = inputs / "model.onnx"
            path.write_bytes(bytes(blob))
            return path

        stages.append(fuzzing.check_case(make, folder, method=method, case=f"{seed} bytes {kind}"))

    fuzz(80, body)
    print("byte damage outcomes:", dict(collections.Counter(stages)))
    # NOTE: as above: some damaged files are refused at load, others get past it.
    assert "load" in stages and {"apply", "export", "done"} & set(stages), sorted(set(stages))


# -- external-data tricks -------------------------------------------------------------------------
def test_external_data_tricks(fuzz):
    def body(data, folder: Path) -> None:
        seed = data.draw(st.sampled_from(["mlp", "cnn", "loop"]), label="seed")
        trick = data.draw(
            st.sampled_from(
                [
                    "location",
                    "offset",
                    "length",
                    "truncate_data",
                    "symlink_out",
                    "fifo",
                    "directory",
                    "swap_data",
                    "none",
                ]
            ),
            label="trick",
        )
        value = data.draw(
            st.sampled_from(
                [
                    "../outside.bin",
                    "/etc/passwd",
                    "/proc/self/environ",
                    "/dev/zero",
                    "a\x00b",
                    "",
                    ".",
                    "sub/../model.onnx.data",
                    "abc",
                    "1.5",
                    "-8",
                    "99999999999999",
                    "0x10",
                    " 4",
                ]
            ),
            label="value",
        )
        method = data.draw(st.integers(0, 3), label="method")

        def make(inputs: Path) -> Path:
            path = fuzzing.with_external_data(SEEDS[seed], inputs)
            proto = onnx.load(path, load_external_data=False)
            external = [
                t
                for g in _graphs(proto.graph)
                for t in g.initializer
                if t.data_location == TensorProto.EXTERNAL
            ]
            tensor = external[0]
            entries = {e.key: e for e in tensor.external_data}
            data_file = inputs / "model.onnx.data"
            if trick in ("location", "offset", "length"):
                entry = entries.get(trick) or tensor.external_data.add()
                entry.key, entry.value = trick, value
            elif trick == "truncate_data":
                data_file.write_bytes(data_file.read_bytes()[: len(value) * 7])
            elif trick == "symlink_out":
                (folder / "outside.bin").write_bytes(data_file.read_bytes())
                data_file.unlink()
                data_file.symlink_to(folder / "outside.bin")
            elif trick == "fifo" and fuzzing.fifo_supported():
                data_file.unlink()
                os.mkfifo(data_file)
            elif trick == "directory":
                data_file.unlink()
                data_file.mkdir()
            elif trick == "swap_data":
                data_file.write_bytes(
                    os.urandom(data_file.stat().st_size)
                )  # valid layout, garbage weights
            path.write_bytes(proto.SerializeToString())
            return path

        fuzzing.check_case(make, folder, method=method, case=f"{seed} external {trick}={value!r}")

    fuzz(60, body)


# -- bad .npz data --------------------------------------------------------------------------------
def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def _bad_npz(draw, path: Path) -> None:  # type: ignore[no-untyped-def]
    good = {"x": np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)}
    kind = draw(
        st.sampled_from(
            [
                "truncated",
                "random",
                "huge_rows",
                "object",
                "wrong_name",
                "nan",
                "wrong_shape",
                "empty",
                "bomb_claim",
                "not_npy_member",
                "int_dtype",
                "complex",
                "scalar",
                "good",
            ]
        )
    )
    if kind in ("truncated", "random", "good"):
        np.savez(path, **good)
        blob = path.read_bytes()
        if kind == "truncated":
            path.write_bytes(blob[: draw(st.integers(0, len(blob) - 1))])
        elif kind == "random":
            path.write_bytes(os.urandom(len(blob)))
        return
    with zipfile.ZipFile(path, "w") as archive:
        if kind == "huge_rows":  # root cause G: a header declaring 10^11 rows
            archive.writestr(
                "x.npy",
                _npy_header((draw(st.sampled_from([10**11, 2**40, 10**6])), 8)) + b"\0" * 64,
            )
        elif kind == "object":
            archive.writestr("x.npy", _npy_header((2,), "|O") + b"\0" * 16)
        elif kind == "bomb_claim":
            info = zipfile.ZipInfo("x.npy")
            archive.writestr(info, _npy_header((4, 8)) + b"\0" * 128)
        elif kind == "not_npy_member":
            archive.writestr("x.npy", b"hello")
        else:
            arrays = {
                "wrong_name": {"y": good["x"]},
                "nan": {"x": np.full((4, 8), np.nan, np.float32)},
                "wrong_shape": {"x": np.zeros((4, 3), np.float32)},
                "empty": {"x": np.zeros((0, 8), np.float32)},
                "int_dtype": {"x": np.ones((4, 8), np.int64)},
                "complex": {"x": np.ones((4, 8), np.complex64)},
                "scalar": {"x": np.float32(1.0)},
            }[kind]
            for name, array in arrays.items():
                buffer = io.BytesIO()
                np.save(buffer, np.asarray(array))
                archive.writestr(f"{name}.npy", buffer.getvalue())


def test_bad_npz_data(fuzz):
    model = modelpress.load(SEEDS["mlp"])

    def body(data, folder: Path) -> None:
        folder.joinpath("in").mkdir()
        path = folder / "in" / "calib.npz"
        _bad_npz(data.draw, path)
        before = fuzzing.hashes(folder / "in")
        which = data.draw(st.sampled_from(["int8-static", "dataset", "export-sample"]), label="use")
        try:
            with fuzzing.limits():
                if which == "int8-static":
                    modelpress.apply(model, "int8-static", calibration=path, show_progress=False)
                elif which == "dataset":
                    modelpress.data.samples.load_dataset(path, model.signature, what="calibration")
                else:
                    folder.joinpath("out").mkdir()
                    modelpress.export(model, folder / "out" / "m.onnx", sample=path)
        except fuzzing.CaseTimeout:
            raise AssertionError(f"npz case hung in {which}") from None
        except Exception as exc:
            fuzzing.assert_clean_error(exc, f"npz {which}")
        assert fuzzing.hashes(folder / "in") == before

    fuzz(60, body)


# -- bad recipes ----------------------------------------------------------------------------------
_YAML_SNIPPETS = [
    "passes: []",
    "passes: 3",
    "passes: [{kind: quantize}]",
    "passes: [{kind: shrink, method: x}]",
    "passes: [{kind: quantize, method: nope}]",
    "passes: [{kind: quantize, method: fp16, options: {bogus: 1}}]",
    "passes: [{kind: quantize, method: fp16, options: [1]}]",
    "passes: [{kind: prune, method: magnitude, options: {sparsity: 7}}]",
    "passes: [{kind: quantize, method: int8-static}]",
    "passes: [{kind: distill, method: kd}]",
    "passes: [{kind: quantize, method: fp16}]\nevaluate: {metric: os:system}",
    "passes: [{kind: quantize, method: fp16}]\nevaluate: {metric: nosuchmodule:fn}",
    "passes: [{kind: quantize, method: fp16}]\ndata: {eval: ../../etc/passwd}",
    "passes: [{kind: quantize, method: fp16}]\ndata: {eval: os:getcwd}",
    "passes: [{kind: quantize, method: fp16}]\nevaluate: {batch_size: -1}",
    "passes: [{kind: quantize, method: fp16}]\nbase_dir: /",
    "!!python/object/apply:os.system ['true']",
    "a: &a [*a]",
    "{1: 2}",
    "[1, 2]",
    "null",
    "passes:\n\t- bad tab",
    "passes: [{kind: quantize, method: fp16, name: " + "x" * 5000 + "}]",
    "? [1, 2]\n: 3",
]


def test_bad_recipes(fuzz):
    def body(data, folder: Path) -> None:
        kind = data.draw(
            st.sampled_from(["snippet", "bytes", "utf16", "json", "random_text"]), label="kind"
        )
        suffix = (
            ".json" if kind == "json" else data.draw(st.sampled_from([".yaml", ".yml", ".json"]))
        )
        path = folder / f"recipe{suffix}"
        if kind == "snippet":
            path.write_text(data.draw(st.sampled_from(_YAML_SNIPPETS)))
        elif kind == "bytes":
            path.write_bytes(data.draw(st.binary(max_size=200)))
        elif kind == "utf16":
            path.write_bytes(data.draw(st.sampled_from(_YAML_SNIPPETS)).encode("utf-16"))
        elif kind == "json":
            path.write_text(
                data.draw(
                    st.sampled_from(
                        [
                            '{"passes": [{"kind": "quantize"',
                            '{"passes": NaN}',
                            "[]",
                            '{"passes": [{"kind": "prune", "method": "magnitude"}], "x": 1}',
                        ]
                    )
                )
            )
        else:
            path.write_text(data.draw(st.text(max_size=200)), encoding="utf-8")
        allow = data.draw(st.booleans(), label="allow_imports")
        before = path.read_bytes()
        try:
            with fuzzing.limits():
                recipe = modelpress.load_recipe(path, allow_imports=allow)
                recipe.validate_against()
        except fuzzing.CaseTimeout:
            raise AssertionError("recipe case hung") from None
        except Exception as exc:
            fuzzing.assert_clean_error(exc, f"recipe {kind}")
        assert path.read_bytes() == before

    fuzz(60, body)


def test_the_harness_catches_hangs_and_runaway_allocations():
    """The limits every case runs under are real: a hang and a 4 GB allocation are both stopped."""
    import time

    with pytest.raises(fuzzing.CaseTimeout), fuzzing.limits(seconds=1):
        time.sleep(5)
    with pytest.raises(MemoryError), fuzzing.limits(headroom=256 << 20):
        np.ones(1 << 29, np.float64)  # 4 GiB
    np.ones(1 << 20)  # limits are lifted afterwards
