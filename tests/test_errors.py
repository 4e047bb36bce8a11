"""Issue 10's root causes, one named regression test each, plus the CLI's error contract.

Each test feeds the exact trigger the fuzzing found and checks the outcome is a ModelpressError
naming the file / tensor / node / option (or, where the input is valid, that it now works).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress import cli
from modelpress.testing import tiny_mlp
from tests import fuzzing
from tests.conftest import run_cli, run_cli_here


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())
    return path


def _external_mlp(folder: Path) -> tuple[Path, onnx.ModelProto]:
    path = fuzzing.with_external_data(tiny_mlp().to_proto(), folder)
    return path, onnx.load(path, load_external_data=False)


def _first_external(proto: onnx.ModelProto) -> onnx.TensorProto:
    return next(t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL)


# -- A: external-data entries ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("offset", "abc", "offset 'abc' is not a whole number"),
        ("offset", "1.5", "offset '1.5' is not a whole number"),
        ("offset", "-8", "offset is negative"),
        ("length", "-1", "length is negative"),
        ("length", "4", "needs 512 bytes"),
        ("location", "w\x00.bin", "NUL byte"),
    ],
)
def test_A_external_data_entry_damage_is_an_invalid_model_error(tmp_path, key, value, match):
    path, proto = _external_mlp(tmp_path)
    tensor = _first_external(proto)
    entry = (
        next((e for e in tensor.external_data if e.key == key), None) or tensor.external_data.add()
    )
    entry.key, entry.value = key, value
    _save(proto, path)
    with pytest.raises(modelpress.InvalidModelError, match=match) as info:
        modelpress.load(path)
    assert "model.onnx" in str(info.value) and repr(tensor.name) in str(info.value)


# -- B: damaged provenance metadata ---------------------------------------------------------------
@pytest.mark.parametrize(
    "stored",
    [
        "{not json",
        "[1, 2]",
        '{"passes": 3}',
        '{"passes": [{"kind": 1}]}',
        '{"source": 5}',
        "[" * 5000 + "]" * 5000,
    ],
)
def test_B_damaged_provenance_is_dropped_with_a_warning(tmp_path, stored):
    proto = tiny_mlp().to_proto()
    for entry in proto.metadata_props:
        if entry.key == "modelpress.ir.provenance":
            entry.value = stored
    path = _save(proto, tmp_path / "m.onnx")
    with pytest.warns(
        UserWarning, match=r"m.onnx: metadata entry 'modelpress.ir.provenance' is damaged"
    ):
        model = modelpress.load(path)
    assert (
        model.provenance.passes == () and "modelpress.ir.provenance" not in model.ir.metadata_props
    )
    result = modelpress.export(
        modelpress.apply(model, "fp16", show_progress=False), tmp_path / "out.onnx"
    )
    assert result.verification.cosine > 0.999  # the model itself is fine and still compresses


# -- C: invalid UTF-8 in names (the checker's UnicodeDecodeError) ----------------------------------
@pytest.mark.parametrize(
    ("name", "where"),
    [
        (b"relu1", "graph.node[1].name"),
        (b"Gemm", "op_type"),
        (b"h_relu", "output"),
        (b"tiny_mlp", "graph.name"),
        (b"modelpress.testing", "producer_name"),
    ],
)
def test_C_invalid_utf8_names_are_an_invalid_model_error(tmp_path, name, where):
    blob = (
        tiny_mlp()
        .to_proto()
        .SerializeToString()
        .replace(name, bytes([0xFF - i for i in range(len(name))]))
    )
    path = tmp_path / "names.onnx"
    path.write_bytes(blob)
    with pytest.raises(
        modelpress.InvalidModelError, match=r"names.onnx: .* is not valid UTF-8 text"
    ) as info:
        modelpress.load(path)
    assert where in str(info.value)


# -- D: fields the checker lets through but onnx_ir cannot read ------------------------------------
def test_D_unknown_data_type_is_an_invalid_model_error(tmp_path):
    proto = tiny_mlp().to_proto()
    proto.graph.initializer[0].data_type = 999
    path = _save(proto, tmp_path / "dtype.onnx")
    with pytest.raises(modelpress.InvalidModelError, match=r"dtype.onnx: (fails|cannot be read)"):
        modelpress.load(path)
    with pytest.raises(modelpress.InvalidModelError):
        modelpress.load(path, check=False)


# -- E: recipes that are not UTF-8 text -----------------------------------------------------------
@pytest.mark.parametrize("blob", [b"\x89PNG\r\n\x1a\n\x00\xff", "passes: []".encode("utf-16")])
def test_E_binary_or_utf16_recipe_is_an_options_error(tmp_path, blob):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(blob)
    with pytest.raises(modelpress.OptionsError, match=r"recipe.yaml' is not UTF-8 text"):
        modelpress.load_recipe(path)


# -- F and G: .npz files that are truncated or lie about their size --------------------------------
def test_F_truncated_npz_is_a_data_error(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.ones((16, 8), np.float32))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(modelpress.DataError, match=r"calib.npz.*(damaged|truncated)"):
        modelpress.apply(tiny_mlp(), "int8-static", calibration=path, show_progress=False)


def test_G_npz_declaring_1e11_rows_is_refused_before_allocating(tmp_path):
    header = repr({"descr": "<f4", "fortran_order": False, "shape": (10**11, 8)}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(
            "x.npy", b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + b"\0" * 64
        )
    with (
        fuzzing.limits(seconds=20, headroom=1 << 30),
        pytest.raises(
            modelpress.DataError, match=r"huge.npz' array 'x'.*declares shape \(100000000000, 8\)"
        ),
    ):
        modelpress.data.samples.load_dataset(path, tiny_mlp().signature)


def test_npz_with_object_arrays_is_refused(tmp_path):
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    path = tmp_path / "obj.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", buffer.getvalue())
    with pytest.raises(modelpress.DataError, match="Python objects"):
        modelpress.data.samples.load_dataset(path, tiny_mlp().signature)


# -- H: an output folder that cannot be written --------------------------------------------------
@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into a read-only folder")
def test_H_unwritable_output_folder_is_an_export_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(modelpress.ExportError, match=r"cannot create a file in folder .*ro"):
            modelpress.export(tiny_mlp(), folder / "m.onnx")
    finally:
        folder.chmod(0o755)


def test_H_output_folder_that_is_a_file_is_an_export_error(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(modelpress.ExportError, match="does not exist"):
        modelpress.export(tiny_mlp(), tmp_path / "file" / "m.onnx")


def test_H_temp_folder_failure_is_an_export_error(tmp_path, monkeypatch):
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    with pytest.raises(
        modelpress.ExportError, match=r"cannot create a file in folder.*Permission denied"
    ):
        modelpress.export(tiny_mlp(), tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())


# -- J: sparse initializers -------------------------------------------------------------------------
def _sparse_mlp() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The tiny MLP with fc1.weight as a sparse initializer (its non-zeros), and the dense original."""
    dense = tiny_mlp().to_proto()
    weight = next(t for t in dense.graph.initializer if t.name == "fc1.weight")
    array = numpy_helper.to_array(weight).copy()
    array[np.abs(array) < 0.3] = 0  # a pruned weight: sparse storage is what it is for
    weight.CopyFrom(numpy_helper.from_array(array, "fc1.weight"))
    flat = array.reshape(-1)
    nz = np.flatnonzero(flat)
    sparse_proto = onnx.ModelProto()
    sparse_proto.CopyFrom(dense)
    sparse_proto.graph.initializer.remove(
        next(t for t in sparse_proto.graph.initializer if t.name == "fc1.weight")
    )
    sparse_proto.graph.sparse_initializer.append(
        helper.make_sparse_tensor(
            numpy_helper.from_array(flat[nz], "fc1.weight"),
            numpy_helper.from_array(nz.astype(np.int64), ""),
            list(array.shape),
        )
    )
    return sparse_proto, dense


def test_J_sparse_initializer_loads_clones_and_compresses(tmp_path):
    sparse_proto, dense = _sparse_mlp()
    model = modelpress.load(_save(sparse_proto, tmp_path / "sparse.onnx"))
    np.testing.assert_array_equal(
        model.initializer("fc1.weight").const_value.numpy(),
        numpy_helper.to_array(dense.graph.initializer[0]),
    )
    result = modelpress.apply(model, "magnitude", sparsity=0.5, show_progress=False)
    exported = modelpress.export(result, tmp_path / "out.onnx")
    assert exported.verification.cosine > 0.9
    # The sparse file and the dense one compute the same thing in ORT.
    x = {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}
    ref = modelpress.runtime.session.run(
        modelpress.runtime.session.make_session(modelpress.load(dense)), x
    )
    got = modelpress.runtime.session.run(modelpress.runtime.session.make_session(model), x)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)


def test_J_sparse_initializer_with_bad_indices_is_an_invalid_model_error(tmp_path):
    sparse_proto, _ = _sparse_mlp()
    sparse_proto.graph.sparse_initializer[0].indices.CopyFrom(
        numpy_helper.from_array(np.array([10**9], np.int64), "")
    )
    with pytest.raises(
        modelpress.InvalidModelError, match=r"sparse initializer 'fc1.weight' cannot be expanded"
    ):
        modelpress.load(_save(sparse_proto, tmp_path / "bad.onnx"))


def test_J_plugin_error_message_stays_one_short_line():
    def explode(model, opts, ctx):
        raise RuntimeError("graph dump:\n" + repr(model.ir) * 50)

    method = modelpress.Method(
        name="explode", kind="prune", apply=explode, options=modelpress.Options, mutates=True
    )
    with pytest.raises(modelpress.PluginError) as info:
        modelpress.apply(tiny_mlp(), method, show_progress=False)
    message = str(info.value)
    assert (
        "\n" not in message
        and len(message) < 500
        and "RuntimeError: graph dump:" in message
        and message.endswith("(truncated)")
    )


# -- K: output == input ---------------------------------------------------------------------------
def test_K_export_over_the_input_is_refused_unless_overwrite(tmp_path):
    path = _save(tiny_mlp().to_proto(), tmp_path / "m.onnx")
    before = _sha(path)
    result = modelpress.apply(modelpress.load(path), "fp16", show_progress=False)
    (tmp_path / "link.onnx").symlink_to(path)
    os.link(path, tmp_path / "hard.onnx")
    for target in (
        path,
        tmp_path / "link.onnx",
        tmp_path / "hard.onnx",
        tmp_path / "sub" / ".." / "m.onnx",
    ):
        with pytest.raises(
            modelpress.ExportError, match=r"refusing to write .* it is the input file .*--overwrite"
        ):
            modelpress.export(result, target)
    assert _sha(path) == before
    modelpress.export(result, path, overwrite=True)
    assert _sha(path) != before and modelpress.load(path).provenance.passes[-1].method == "fp16"


def test_K_export_over_the_inputs_external_data_is_refused(tmp_path):
    proto = tiny_mlp().to_proto()
    path = tmp_path / "a.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="b.onnx.data", size_threshold=64)
    data = tmp_path / "b.onnx.data"
    before = _sha(data)
    model = modelpress.load(path)
    # Exporting to b.onnx would write its weights to b.onnx.data: the input's data file.
    with pytest.raises(modelpress.ExportError, match=r"b\.onnx\.data"):
        modelpress.export(model, tmp_path / "b.onnx", external_data=True)
    with pytest.raises(modelpress.ExportError, match=r"b\.onnx\.data"):
        modelpress.export(model, data)
    assert _sha(data) == before
    modelpress.export(model, tmp_path / "c.onnx", external_data=True)  # any other name is fine


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["quantize", "-m", "fp16"],
        ["prune", "--sparsity", "0.5"],
        ["apply", "-m", "int8-dynamic", "-O", "min_elements=16", "--allow-no-gain"],
    ],
)
def test_K_cli_refuses_to_write_over_its_input(tmp_path, command):
    path = _save(tiny_mlp().to_proto(), tmp_path / "m.onnx")
    before = _sha(path)
    refused = run_cli(command[0], str(path), *command[1:], "-o", str(path), "-q")
    assert (
        refused.returncode == 1
        and "it is the input file" in refused.stderr
        and "--overwrite" in refused.stderr
    )
    assert len(refused.stderr.strip().splitlines()) == 1 and _sha(path) == before
    done = run_cli(command[0], str(path), *command[1:], "-o", str(path), "-q", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert _sha(path) != before


def test_K_cli_refuses_to_write_over_a_data_file(tmp_path):
    path = _save(tiny_mlp().to_proto(), tmp_path / "m.onnx")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((32, 8)).astype(np.float32))
    before = _sha(calib)
    refused = run_cli_here("quantize", str(path), "--calib", str(calib), "-o", str(calib), "-q")
    assert refused.returncode == 1 and "calib.npz" in refused.stderr and _sha(calib) == before


# -- L: ref_attr_name outside a function ------------------------------------------------------------
def test_L_ref_attr_name_outside_a_function_is_an_invalid_model_error(tmp_path):
    proto = tiny_mlp().to_proto()
    node = next(n for n in proto.graph.node if n.name == "fc1")
    attr = next(a for a in node.attribute if a.name == "transB")
    attr.ref_attr_name = "transpose_me"
    path = _save(proto, tmp_path / "ref.onnx")
    with pytest.raises(
        modelpress.InvalidModelError,
        match=r"ref.onnx: node 'fc1' attribute 'transB' refers to a function attribute",
    ):
        modelpress.load(path)


# -- fp16 with control flow -------------------------------------------------------------------------
@pytest.mark.parametrize("make", [fuzzing.if_model, fuzzing.loop_model], ids=["If", "Loop"])
def test_fp16_with_if_and_loop_subgraphs_exports_and_verifies(tmp_path, make):
    model = modelpress.load(make())
    result = modelpress.apply(
        model, "fp16", show_progress=False, allow_no_gain=True
    )  # NOTE: tiny: the Casts outweigh the halving
    exported = modelpress.export(result, tmp_path / "fp16.onnx")
    figures = result.provenance.passes[-1].figures
    assert (
        figures["float16_subgraph_nodes"] >= 1
        and figures["float16_subgraph_nodes"] == figures["subgraph_nodes"]
    )
    assert exported.verification.cosine > 0.999 and exported.verification.max_abs_diff < 0.05
    written = onnx.load(tmp_path / "fp16.onnx")
    assert all(
        t.data_type == TensorProto.FLOAT16
        for t in written.graph.initializer
        if t.name.startswith("w")
    )  # every weight is float16
    body = next(a.g for n in written.graph.node for a in n.attribute if a.HasField("g"))
    assert {n.op_type for n in body.node} >= {"Cast"}  # the body converts at its boundary


# -- recipes are code: --no-imports -----------------------------------------------------------------
def test_no_imports_refuses_callables_and_data_outside_the_recipe_folder(tmp_path):
    folder = tmp_path / "recipes"
    folder.mkdir()
    np.savez(tmp_path / "outside.npz", x=np.zeros((4, 8), np.float32))
    np.savez(folder / "inside.npz", x=np.zeros((4, 8), np.float32))
    cases = {
        "metric.yaml": (
            "passes: [{kind: quantize, method: fp16}]\nevaluate: {metric: 'os:getcwd'}",
            "evaluate.metric entry 'os:getcwd'",
        ),
        "data.yaml": (
            "passes: [{kind: quantize, method: fp16}]\ndata: {eval: 'tests.fuzzing:seeds'}",
            "data.eval entry",
        ),
        "outside.yaml": (
            "passes: [{kind: quantize, method: fp16}]\ndata: {eval: ../outside.npz}",
            "outside the recipe's folder",
        ),
    }
    for name, (text, match) in cases.items():
        (folder / name).write_text(text)
        modelpress.load_recipe(folder / name).validate_against()  # trusted: fine
        with pytest.raises(modelpress.OptionsError, match=match):
            modelpress.load_recipe(folder / name, allow_imports=False).validate_against()
    (folder / "ok.yaml").write_text(
        "passes: [{kind: quantize, method: fp16}]\ndata: {eval: inside.npz}"
    )
    modelpress.load_recipe(folder / "ok.yaml", allow_imports=False).validate_against()


def test_cli_compress_no_imports(tmp_path):
    model = _save(tiny_mlp().to_proto(), tmp_path / "m.onnx")
    (tmp_path / "r.yaml").write_text(
        "passes: [{kind: quantize, method: fp16}]\nevaluate: {metric: 'os:getcwd', repeats: 1}"
    )
    result = run_cli_here(
        "compress",
        str(model),
        "-r",
        str(tmp_path / "r.yaml"),
        "-o",
        str(tmp_path / "out.onnx"),
        "--no-imports",
        "-q",
    )
    assert result.returncode == 1 and "refused because imports are disabled" in result.stderr
    assert not (tmp_path / "out.onnx").exists() and not (tmp_path / "out-stages").exists()


# -- the CLI's exit codes -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["quantize"],
        ["quantize", "m.onnx"],
        ["prune", "m.onnx", "-o", "x.onnx", "--sparsity", "lots"],
        ["inspect", "nope.onnx"],
        ["quantize", "m.onnx", "-o", "x.onnx", "-O", "=3"],
        ["demo", "--framework", "jax"],
    ],
)
def test_user_errors_exit_1(argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _save(tiny_mlp().to_proto(), tmp_path / "m.onnx")
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == cli.EXIT_ERROR == 1
    assert "modelpress: error:" in capsys.readouterr().err or not argv


def test_a_bug_exits_3_with_one_line_naming_the_version(capsys, monkeypatch, tmp_path):
    def broken(model):
        raise KeyError("a bug")

    monkeypatch.setattr(modelpress, "describe", broken)
    path = _save(tiny_mlp().to_proto(), tmp_path / "m.onnx")
    code = cli.main(["inspect", str(path)])
    err = capsys.readouterr().err.strip()
    assert code == cli.EXIT_INTERNAL == 3
    assert (
        len(err.splitlines()) == 1
        and f"a bug in modelpress {modelpress.__version__}" in err
        and "rerun with -v" in err
        and "KeyError" in err
    )


def test_help_documents_exit_codes_overwrite_and_no_imports():
    out = run_cli("compress", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert (
        "--no-imports" in text
        and "--overwrite" in text
        and "3 internal error" in text
        and "A recipe is code" in text
    )


def test_K_convert_and_compress_refuse_to_write_over_their_input(tmp_path):
    path = _save(tiny_mlp().to_proto(), tmp_path / "m.onnx")
    before = _sha(path)
    refused = run_cli_here("convert", str(path), "-o", str(path))
    assert refused.returncode == 1 and "it is the input file" in refused.stderr
    recipe = {"passes": [{"kind": "quantize", "method": "fp16"}], "evaluate": {"repeats": 1}}
    with pytest.raises(modelpress.ExportError, match="it is the input file"):
        modelpress.compress(path, recipe, output=path, show_progress=False)
    assert _sha(path) == before and not (tmp_path / "m-stages").exists()
    result = modelpress.compress(path, recipe, output=path, show_progress=False, overwrite=True)
    assert result.output == path and _sha(path) != before


def test_int8_static_with_a_weight_shared_by_two_layers(tmp_path):
    """Found running the fuzz seeds through every method: two DequantizeLinear nodes got one name."""
    model = modelpress.load(fuzzing.if_model())  # `w` feeds both MatMul mm and MatMul mm2
    calibration = {"x": np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)}
    result = modelpress.apply(
        model, "int8-static", calibration=calibration, show_progress=False, allow_no_gain=True
    )  # NOTE: tiny
    exported = modelpress.export(result, tmp_path / "q.onnx", sample=calibration)
    assert exported.verification.cosine > 0.99
    nodes = onnx.load(tmp_path / "q.onnx").graph.node
    names = [n.name for n in nodes]
    assert (
        len(names) == len(set(names)) and sum(n.op_type == "DequantizeLinear" for n in nodes) >= 2
    )


def test_B_cli_shows_the_dropped_provenance_as_one_warning_line(tmp_path):
    proto = tiny_mlp().to_proto()
    for entry in proto.metadata_props:
        if entry.key == "modelpress.ir.provenance":
            entry.value = "{bad"
    path = _save(proto, tmp_path / "m.onnx")
    result = run_cli_here("inspect", str(path))
    assert result.returncode == 0 and "parameters 212" in result.stdout
    assert result.stderr.strip().splitlines() == [
        f"modelpress: warning: {path}: metadata entry 'modelpress.ir.provenance' is damaged (not JSON (JSONDecodeError)); "
        "ignoring it (the model's history is unknown)"
    ]


def test_a_run_that_never_finishes_is_stopped_with_a_clean_error(tmp_path, monkeypatch):
    # NOTE: found by the fuzz suite: a mutated Loop trip count (10^15) hung export's verification
    # run, and no Python signal can interrupt ONNX Runtime while it runs
    body = helper.make_graph(
        [
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "", "x"], ["y"], name="loop", body=body)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        [helper.make_tensor("M", TensorProto.INT64, [], [10**15])],
    )
    path = _save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        tmp_path / "loop.onnx",
    )
    monkeypatch.setenv("MODELPRESS_RUN_TIMEOUT", "1")
    model = modelpress.load(path, normalize=False)
    with pytest.raises(
        modelpress.InvalidModelError, match=r"stopped after 1 s \(MODELPRESS_RUN_TIMEOUT\)"
    ):
        modelpress.export(model, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_a_method_whose_data_runs_never_finish_stops_with_a_clean_error(tmp_path, monkeypatch):
    """The methods' own ORT runs (calibration, SmoothQuant, sensitivity, GPTQ statistics, pruning
    importance, distillation's teacher) honour MODELPRESS_RUN_TIMEOUT as export's verification does."""
    body = helper.make_graph(
        [
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1, 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1, 8]),
        ],
        [helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])],
    )
    w = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["M", "", "x"], ["h"], name="loop", body=body),
            helper.make_node("MatMul", ["h", "w"], ["y"], name="mm"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [
            helper.make_tensor("M", TensorProto.INT64, [], [10**15]),
            onnx.numpy_helper.from_array(w, "w"),
        ],
    )
    path = _save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        tmp_path / "loop.onnx",
    )
    monkeypatch.setenv("MODELPRESS_RUN_TIMEOUT", "1")
    model = modelpress.load(path, normalize=False)
    calibration = {"x": np.zeros((1, 8), np.float32)}
    with pytest.raises(
        modelpress.InvalidModelError, match=r"stopped after 1 s \(MODELPRESS_RUN_TIMEOUT\)"
    ):
        modelpress.quantize(model, "int8-static", calibration=calibration, show_progress=False)
