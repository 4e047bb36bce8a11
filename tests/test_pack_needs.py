"""Which codecs a pack needs: recorded with their plugin and distribution, named when missing
(the error says what to install), listed by `modelpress inspect x.mpk`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import modelpress
from modelpress.packing.container import PackedModel
from modelpress.packing.needs import missing_codec_error, pack_needs
from modelpress.plugin.codec import Codec
from tests.conftest import run_cli_here


class _Constant:
    """A codec plugin: a tensor whose elements are all equal becomes one element."""

    @modelpress.hookimpl
    def modelpress_register_codecs(self, register):
        def encode(data, info):
            width = info.dtype.bitwidth // 8
            return data[:width] if data and data == data[:width] * (len(data) // width) else None

        register(
            Codec(
                "constant",
                encode,
                lambda blob, info: bytes(blob) * info.size,
                summary="all elements equal",
            )
        )


def _model(path):
    """One constant weight (coded by 'constant') and one random weight (coded by a built-in)."""
    ws = [
        numpy_helper.from_array(np.full((16, 16), 0.25, np.float32), "w0"),
        numpy_helper.from_array(
            np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), "w1"
        ),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"]),
        helper.make_node("MatMul", ["h", "w1"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        ws,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _installed_registry():
    """The constant codec as an installed distribution would register it."""
    registry = modelpress.create_registry()
    registry.register(
        _Constant(), name="constant-codec", distribution="modelpress-constant", version="1.2.0"
    )
    return registry


def test_the_pack_records_each_codecs_plugin_and_distribution(tmp_path):
    registry = _installed_registry()
    modelpress.pack(_model(tmp_path / "m.onnx"), tmp_path / "m.mpk", registry=registry, solid=False)
    with PackedModel(tmp_path / "m.mpk", registry=registry) as packed:
        recorded = packed.manifest["codec_plugins"]
        codecs = {e.name: e.codec for e in packed.entries}
    assert codecs["w0"] == "constant" and codecs["w1"] != "constant"
    assert recorded["constant"] == {
        "plugin": "constant-codec",
        "distribution": "modelpress-constant",
        "version": "1.2.0",
    }
    assert (
        recorded[codecs["w1"]]["plugin"] == "pack"
        and recorded[codecs["w1"]]["distribution"] == "modelpress"
    )
    rows = {r["codec"]: r for r in pack_needs(tmp_path / "m.mpk", registry=registry)}
    assert (
        rows["constant"]["installed"]
        and rows["constant"]["installed_from"] == "modelpress-constant 1.2.0"
    )
    assert rows["constant"]["tensors"] == 1
    assert pack_needs(tmp_path / "m.onnx") is None  # not a pack


def test_a_missing_codec_names_the_distribution_to_install(tmp_path):
    modelpress.pack(_model(tmp_path / "m.onnx"), tmp_path / "m.mpk", registry=_installed_registry())
    with pytest.raises(
        modelpress.PluginError,
        match=r"codec 'constant' \(plugin 'constant-codec' from modelpress-constant 1.2.0\), "
        r"which no installed plugin provides; install distribution 'modelpress-constant' "
        r"\(pip install 'modelpress-constant==1.2.0'\)",
    ) as caught:
        modelpress.unpack(tmp_path / "m.mpk", tmp_path / "back.onnx")
    assert caught.value.plugin == "constant-codec"
    # a plugin registered in code has no distribution: the error says to register it again
    modelpress.pack(
        tmp_path / "m.onnx",
        tmp_path / "local.mpk",
        registry=modelpress.create_registry(plugins=[_Constant()]),
    )
    with pytest.raises(
        modelpress.PluginError,
        match=r"codec 'constant' \(plugin '_Constant'\), .*registered in code by plugin "
        r"'_Constant'.*registry=modelpress.create_registry\(plugins=\[...\]\)",
    ):
        modelpress.unpack(tmp_path / "local.mpk", tmp_path / "local.onnx")


def test_a_pack_from_before_codec_plugins_names_the_plugin(tmp_path):
    modelpress.pack(_model(tmp_path / "m.onnx"), tmp_path / "m.mpk", registry=_installed_registry())
    with PackedModel(tmp_path / "m.mpk") as packed:
        manifest = {k: v for k, v in packed.manifest.items() if k != "codec_plugins"}
    assert manifest["codecs"]["constant"] == "constant-codec 1.2.0"
    error = missing_codec_error("old.mpk", "tensor 'w0'", "constant", manifest)
    assert "install the distribution that provides plugin 'constant-codec'" in str(error)


def test_cli_inspect_lists_the_codecs_a_pack_needs(tmp_path):
    model = _model(tmp_path / "m.onnx")
    assert run_cli_here("pack", str(model), "-o", str(tmp_path / "builtin.mpk")).returncode == 0
    shown = run_cli_here("inspect", str(tmp_path / "builtin.mpk"))
    assert shown.returncode == 0, shown.stderr
    assert (
        "codecs this pack needs" in shown.stdout
        and "modelpress" in shown.stdout
        and "yes" in shown.stdout
    )
    as_json = json.loads(run_cli_here("inspect", str(tmp_path / "builtin.mpk"), "--json").stdout)
    assert as_json["codecs"] and all(
        row["installed"] and row["distribution"] == "modelpress" for row in as_json["codecs"]
    )
    # coded by a codec the command line does not have: listed, then one error naming what to install
    modelpress.pack(model, tmp_path / "m.mpk", registry=_installed_registry())
    missing = run_cli_here("inspect", str(tmp_path / "m.mpk"))
    assert missing.returncode != 0
    assert (
        "constant" in missing.stdout
        and "modelpress-constant" in missing.stdout
        and "no" in missing.stdout
    )
    assert "pip install 'modelpress-constant==1.2.0'" in missing.stderr
    listed = json.loads(run_cli_here("inspect", str(tmp_path / "m.mpk"), "--json").stdout)
    assert {row["codec"]: row["installed"] for row in listed["codecs"]}["constant"] is False
