"""Packs written by earlier encoders still unpack bit-exactly: ``tests/data/pack/v2-bytegroup.mpk``
was written by the format-2 encoder before the fast one (bytegroup planes coded with zstd -19,
an LZMA-coded tensor, a solid stream of six fp32 tensors; see ``make_v2_fixture.py`` there)."""

from __future__ import annotations

from pathlib import Path

import onnx

import modelpress
from modelpress.packing.reader import PackedModel, read_packed

DATA = Path(__file__).parent / "data" / "pack"


def test_a_pack_from_the_previous_encoder_unpacks_bit_exactly(tmp_path):
    packed = DATA / "v2-bytegroup.mpk"
    with PackedModel(packed) as opened:
        codecs = {e.codec for e in opened.entries}
        assert {"bytegroup", "lzma", "zstd"} <= codecs and opened.manifest["solids"]
    out = modelpress.unpack(packed, tmp_path / "back.onnx")
    assert out.read_bytes() == (DATA / "v2-bytegroup.onnx").read_bytes()
    proto = read_packed(packed)
    assert (
        proto.SerializeToString() == onnx.load(str(DATA / "v2-bytegroup.onnx")).SerializeToString()
    )
