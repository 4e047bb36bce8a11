"""``modelpress unpack`` starts light: an import budget (no timer) for the command, the codec
contract without onnx-ir (:class:`ElementType`), and the registry that loads only the plugins a
pack records as providing its codecs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.packing import reader
from modelpress.plugin.codec import ElementType, TensorInfo, numpy_dtype
from modelpress.testing import tiny_mlp

DATA = Path(__file__).parent / "data" / "pack"

# what `modelpress unpack` of a pack whose codecs are light must not import
NEVER = ("onnx", "onnx_ir", "ml_dtypes", "sympy", "onnxruntime", "torch", "tensorflow")


def _unpack_in_a_child(pack: Path, out: Path, env: dict | None = None) -> dict:
    code = (
        "import json, sys\n"
        "from modelpress.cli import main\n"
        f"code = main(['unpack', {str(pack)!r}, '-o', {str(out)!r}])\n"
        f"print(json.dumps({{'code': code, 'heavy': sorted(m for m in {NEVER!r} if m in sys.modules),"
        " 'plugins': sorted(m for m in sys.modules if m.startswith('modelpress.plugins.')),"
        " 'modules': sorted(sys.modules)}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mixed_model(path: Path) -> Path:
    """fp32 weights (bytegroup), an int8 table (codebook) and a Constant, so several codecs and
    both tensor places are in the pack."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant",
                [],
                ["k"],
                value=numpy_helper.from_array(rng.standard_normal(300).astype(np.float32)),
            ),
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Gather", ["t", "i"], ["g"]),
        ],
        "mixed",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64]),
            helper.make_tensor_value_info("i", TensorProto.INT64, [2]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32]),
            helper.make_tensor_value_info("g", TensorProto.INT8, [2, 16]),
        ],
        [
            numpy_helper.from_array(rng.standard_normal((64, 32)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.integers(-8, 8, (40, 16)).astype(np.int8), "t"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_unpack_imports_no_onnx_and_only_the_plugin_of_its_codecs(tmp_path):
    source = _mixed_model(tmp_path / "m.onnx")
    packed = modelpress.pack(source, tmp_path / "m.mpk")
    assert len(packed.codec_counts()) >= 2, packed.codec_counts()
    seen = _unpack_in_a_child(packed.path, tmp_path / "back.onnx")
    assert seen["code"] == 0 and seen["heavy"] == [], seen
    assert {p.split(".")[2] for p in seen["plugins"]} == {"pack"}, seen["plugins"]
    assert (tmp_path / "back.onnx").read_bytes() == source.read_bytes()


def test_an_older_format_pack_unpacks_light_and_bit_exact(tmp_path):
    seen = _unpack_in_a_child(DATA / "v2-bytegroup.mpk", tmp_path / "back.onnx")
    assert seen["code"] == 0 and seen["heavy"] == [], seen
    assert (tmp_path / "back.onnx").read_bytes() == (DATA / "v2-bytegroup.onnx").read_bytes()


def test_a_codec_plugin_module_imports_no_onnx():
    code = (
        "import sys\n"
        "from modelpress.plugin_api import Codec, ElementType, TensorInfo, hookimpl, numpy_dtype\n"
        "import modelpress.plugins.pack\n"
        f"print(sorted(m for m in {NEVER!r} if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout + done.stderr


def test_the_codec_registry_loads_the_recorded_plugins_else_every_plugin(tmp_path):
    source = tmp_path / "m.onnx"
    modelpress.export(tiny_mlp(), source, verify=False)
    packed = modelpress.pack(source, tmp_path / "m.mpk")
    with reader.PackedModel(packed.path) as opened:
        manifest = opened.manifest
    light = reader.codec_registry(manifest)
    assert set(light.plugins) == {"pack"} and light is not modelpress.get_registry()
    # a codec recorded as coming from a plugin that is not installed under that name: every plugin
    renamed = {
        **manifest,
        "codec_plugins": {n: {**o, "plugin": "gone"} for n, o in manifest["codec_plugins"].items()},
    }
    assert reader.codec_registry(renamed) is modelpress.get_registry()


def test_element_types_are_onnx_irs_numbers_and_widths():
    for dtype in ir.DataType:
        ours = ElementType(dtype)
        assert ours == dtype and hash(ours) == hash(dtype) and ir.DataType(ours) is dtype
        try:
            width = dtype.bitwidth
        except TypeError:
            with pytest.raises(TypeError):
                ours.bitwidth  # noqa: B018
            continue
        assert ours.bitwidth == width and ours.itemsize == width / 8
    assert ElementType.BFLOAT16.short_name() == "bf16"  # the rest of onnx_ir.DataType's API
    assert (
        numpy_dtype(ir.DataType.FLOAT16) == np.dtype("<u2")
        and numpy_dtype(ElementType.INT4) is None
    )


def test_tensor_info_takes_an_onnx_ir_dtype_as_before():
    info = TensorInfo("w", ir.DataType.FLOAT, (3,), "weight")
    assert type(info.dtype) is ElementType and info.dtype == ir.DataType.FLOAT
    assert info.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
    assert (
        info
        == TensorInfo("w", ElementType.FLOAT, (3,), "weight")
        == TensorInfo("w", 1, (3,), "weight")
    )
    with pytest.raises(ValueError):
        TensorInfo("w", 99, (3,))


_THIRD_PARTY = """
import zlib

from modelpress.plugin_api import Codec, hookimpl


@hookimpl
def modelpress_register_codecs(register):
    register(
        Codec(
            name="deflate",
            encode=lambda data, info: zlib.compress(data, 9),
            decode=lambda blob, info: zlib.decompress(blob),
            summary="zlib at level 9",
        )
    )
"""


def test_a_third_party_codec_is_found_as_a_built_in_one_is(tmp_path):
    """An installed distribution (a dist-info folder on the path, with its entry point in the
    ``modelpress`` group) whose codec a pack uses: unpack imports that plugin, and no built-in one."""
    site = tmp_path / "site"
    (site / "deflatecodec-1.0.dist-info").mkdir(parents=True)
    (site / "deflatecodec.py").write_text(_THIRD_PARTY)
    (site / "deflatecodec-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: deflatecodec\nVersion: 1.0\n"
    )
    (site / "deflatecodec-1.0.dist-info" / "entry_points.txt").write_text(
        "[modelpress]\ndeflate = deflatecodec\n"
    )
    source = _mixed_model(tmp_path / "m.onnx")
    # NOTE: the suite disables third-party autoload (conftest); an installed plugin is what this is about
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    env.pop("MODELPRESS_DISABLE_PLUGIN_AUTOLOAD", None)
    pack = (
        "import modelpress, sys\n"
        f"r = modelpress.pack({str(source)!r}, {str(tmp_path / 'm.mpk')!r}, codecs=['deflate'], solid=False)\n"
        "print(sorted(r.codec_counts()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", pack], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "['deflate']", done.stdout + done.stderr
    seen = _unpack_in_a_child(tmp_path / "m.mpk", tmp_path / "back.onnx", env)
    assert seen["code"] == 0 and seen["heavy"] == [] and seen["plugins"] == [], seen
    assert "deflatecodec" in seen["modules"]
    assert (tmp_path / "back.onnx").read_bytes() == source.read_bytes()
