"""Embedding tables and Conv weights are quantized in chunks of rows: the same bytes as in one go, and
temporaries bounded by the chunk, not by the table (a 0.5-2 GB vocabulary table is never copied whole)."""

import tracemalloc

import ml_dtypes
import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import modelpress
from modelpress.plugins.quantize import embeddings
from modelpress.plugins.quantize.embeddings import _int8_rows, _uint4_blocks, quantize_table
from modelpress.runtime.session import make_session, run


def _one_shot(w: np.ndarray, bits: int, kind: str) -> tuple[bytes, bytes, bytes]:
    """The whole table quantized at once, stored as onnx-ir stores it (int4 packed two per byte)."""
    flat = w.reshape(w.shape[0], -1)
    q, scale, zero, _ = (
        _int8_rows(flat) if bits == 8 else _uint4_blocks(flat, 1 if kind == "embedding" else 0, 32)
    )
    if bits == 8:
        return q.astype(np.int8).tobytes(), scale.tobytes(), zero.tobytes()
    as_uint4 = [
        ir.tensor(a.astype(ml_dtypes.uint4), dtype=ir.DataType.UINT4).tobytes() for a in (q, zero)
    ]
    return as_uint4[0], scale.astype(np.float32).tobytes(), as_uint4[1]


@pytest.mark.parametrize(
    ("bits", "kind", "shape"),
    [(4, "embedding", (301, 99)), (4, "conv", (77, 3, 3, 5)), (8, "embedding", (301, 99))],
)
def test_chunked_table_equals_the_one_shot_result_bit_for_bit(monkeypatch, bits, kind, shape):
    """Odd row and column counts (a last chunk of odd length, blocks padded at the end of each row)."""
    monkeypatch.setattr(embeddings, "CHUNK_ELEMENTS", 600)
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    flat = w.reshape(shape[0], -1)
    reads: list[int] = []

    def read(r0: int, r1: int) -> np.ndarray:
        reads.append(r1 - r0)
        return flat[r0:r1]

    table = quantize_table(read, shape, bits=bits, kind=kind, block=32)
    assert len(reads) > 3 and max(reads) * flat.shape[1] <= 600 and sum(reads) == shape[0]
    data, scale, zero = _one_shot(w, bits, kind)
    assert (
        table.data.tobytes()[: len(data)] == data
        and table.scale.tobytes() == scale
        and table.zero.tobytes()[: len(zero)] == zero
    )


def test_chunk_size_bounds_the_temporaries(monkeypatch):
    """A 4 MB table in chunks of 16 K weights: the traced peak stays under the table's own size (in one go,
    its float64 copies alone are 4x that)."""
    monkeypatch.setattr(embeddings, "CHUNK_ELEMENTS", 1 << 14)
    w = np.random.default_rng(1).standard_normal((2048, 512)).astype(np.float32)
    tracemalloc.start()
    try:
        table = quantize_table(lambda r0, r1: w[r0:r1], w.shape, bits=4, kind="embedding", block=32)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    result = table.data.nbytes + table.scale.nbytes + table.zero.nbytes
    assert peak - result < 24 * 8 * (1 << 14) < w.nbytes
    monkeypatch.setattr(embeddings, "CHUNK_ELEMENTS", w.size)
    tracemalloc.start()
    try:
        quantize_table(lambda r0, r1: w[r0:r1], w.shape, bits=4, kind="embedding", block=32)
        _, one_chunk = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert one_chunk > 2 * w.nbytes  # NOTE: the bound above is the chunking's doing


def _gather_model(folder, w: np.ndarray) -> str:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed")],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, ["n", w.shape[1]])],
        [helper.make_tensor("table", TensorProto.FLOAT, w.shape, w.tobytes(), raw=True)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    import onnx

    path = str(folder / "table.onnx")
    onnx.save(model, path, save_as_external_data=True, location="table.onnx.data", size_threshold=0)
    return path


def test_an_external_table_is_read_in_chunks_and_looks_up_the_one_shot_rows(monkeypatch, tmp_path):
    """Through int4-weight-only on a model whose table is external data: ORT's lookups are the one-shot
    table's rows dequantized."""
    monkeypatch.setattr(embeddings, "CHUNK_ELEMENTS", 4096)
    w = np.random.default_rng(2).standard_normal((500, 64)).astype(np.float32)
    model = modelpress.load(_gather_model(tmp_path, w), show_progress=False)
    quantized = modelpress.quantize(model, "int4-weight-only", block_size=32, show_progress=False)
    assert quantized.provenance.passes[-1].figures["tables_quantized"] == 1
    ids = np.array([0, 7, 499, 250], np.int64)
    got = run(make_session(quantized), {"ids": ids})[0]
    q, scale, zero, attrs = _uint4_blocks(w, 1, 32)
    expected = embeddings._dequantized(q, scale, zero, attrs, w.shape)[ids]
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)


def test_an_int8_table_is_looked_up_before_it_is_dequantized(tmp_path):
    """int8 rows: ``Gather`` reads the int8 table and only the rows read are dequantized (ORT never folds
    a DequantizeLinear, so one in front of the table dequantized all of it on every run); the values are
    the per-row DequantizeLinear's, and the lookup's output keeps its name (here a graph output)."""
    w = np.random.default_rng(3).standard_normal((500, 64)).astype(np.float32)
    model = modelpress.load(_gather_model(tmp_path, w), show_progress=False)
    quantized = modelpress.quantize(model, "int8-dynamic", show_progress=False)
    assert quantized.provenance.passes[-1].figures["tables_quantized"] == 1
    ops = [node.op_type for node in quantized.ir.graph]
    assert "DequantizeLinear" not in ops and ops.count("Gather") == 2
    assert [v.name for v in quantized.ir.graph.outputs] == ["rows"]
    assert all(
        v.const_value.dtype != ir.DataType.FLOAT or v.const_value.size < w.size
        for v in quantized.ir.graph.initializers.values()
    )
    ids = np.array([0, 7, 499, 250, 7], np.int64)
    got = run(make_session(quantized), {"ids": ids})[0]
    q, scale, _, _ = _int8_rows(w)
    np.testing.assert_array_equal(got, (q.astype(np.float32) * scale[:, None])[ids])


def test_an_int8_table_read_by_another_op_keeps_its_dequantize_for_that_op(tmp_path):
    """A table tied to an output projection (``Gather`` and ``MatMul`` read it): the lookup reads int8 rows,
    the MatMul reads the table through one DequantizeLinear."""
    import onnx

    w = np.random.default_rng(4).standard_normal((300, 300)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["rows"], name="embed"),
            helper.make_node("MatMul", ["rows", "table"], ["logits"], name="head"),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 300])],
        [helper.make_tensor("table", TensorProto.FLOAT, w.shape, w.tobytes(), raw=True)],
    )
    path = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = modelpress.load(path, show_progress=False)
    quantized = modelpress.quantize(model, "int8-dynamic", op_types=["Gather"], show_progress=False)
    ops = [node.op_type for node in quantized.ir.graph]
    assert ops.count("DequantizeLinear") == 1 and ops.count("Gather") == 2
    ids = np.array([3, 299], np.int64)
    q, scale, _, _ = _int8_rows(w)
    table = q.astype(np.float32) * scale[:, None]
    got = run(make_session(quantized), {"ids": ids})[0]
    np.testing.assert_allclose(got, table[ids] @ table, rtol=1e-5, atol=1e-4)
