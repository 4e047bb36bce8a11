"""Observer hooks with ids for pack/unpack (and their faults contained); tune trials' hooks are
exercised by tests/test_tune_space.py's third-party tune."""

from __future__ import annotations

import pytest

import modelpress
from modelpress.testing import tiny_mlp


class _Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    @modelpress.hookimpl
    def modelpress_pack_finish(self, pack_id, source, result):
        self.calls.append(
            ("pack", {"pack_id": pack_id, "source": source, "size": result.size_bytes})
        )

    @modelpress.hookimpl
    def modelpress_unpack_finish(self, pack_id, output):
        self.calls.append(("unpack", {"pack_id": pack_id, "output": str(output)}))


class _Broken:
    @modelpress.hookimpl
    def modelpress_pack_finish(self, pack_id):
        raise RuntimeError("observer bug")


def test_pack_and_unpack_call_their_observers_with_the_pack_id(tmp_path):
    recorder = _Recorder()
    registry = modelpress.create_registry(plugins=[recorder])
    source = tmp_path / "m.onnx"
    modelpress.export(tiny_mlp(), source, verify=False)
    packed = modelpress.pack(source, tmp_path / "m.mpk", registry=registry)
    restored = modelpress.unpack(tmp_path / "m.mpk", tmp_path / "back.onnx", registry=registry)
    assert [kind for kind, _ in recorder.calls] == ["pack", "unpack"]
    pack_call, unpack_call = recorder.calls[0][1], recorder.calls[1][1]
    assert (
        pack_call["pack_id"] == str(tmp_path / "m.mpk") == unpack_call["pack_id"]
        and pack_call["size"] == packed.size_bytes
    )
    assert unpack_call["output"] == str(restored) and restored.read_bytes() == source.read_bytes()


def test_a_failing_pack_observer_is_a_warning_and_the_pack_is_written(tmp_path):
    registry = modelpress.create_registry(plugins=[_Broken()])
    source = tmp_path / "m.onnx"
    modelpress.export(tiny_mlp(), source, verify=False)
    with pytest.warns(
        modelpress.PluginWarning,
        match=r"failed in modelpress_pack_finish: RuntimeError: observer bug",
    ):
        modelpress.pack(source, tmp_path / "m.mpk", registry=registry)
    assert (tmp_path / "m.mpk").is_file()
